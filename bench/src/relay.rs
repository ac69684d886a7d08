//! The outbox relay: throughput on a backlog at several batch sizes, and commit → stream latency under a steady
//! commit rate with LISTEN/NOTIFY and with polling only, all in one run.
//!
//! Method: the release operator runs as its own process watching one namespace; every scenario gets a fresh
//! database with the outbox migrations, a Secret with its URL, and an `OutboxRelay` of its own with a stream prefix
//! no other scenario uses, deleted when the scenario ends. Rows are committed the way a service commits them
//! (`kubesaga_kit::outbox::write` in a transaction).
//!
//! - Throughput: N rows are committed before the relay exists, round robin over N / k aggregates (k = 1 for the
//!   batch-size runs; larger k, up to all rows in one aggregate, shows what per-aggregate order costs), the relay
//!   is created, and `XLEN` of its stream is sampled every 5 ms. The rate is measured from the first entry on the
//!   stream to the last, so the operator noticing the new resource and connecting is left out (it is reported
//!   apart); the run ends when every row is PUBLISHED.
//! - Latency: the relay runs first (one warm-up event proves it connected), then writers commit one event per
//!   transaction on a fixed schedule (one writer per 200 commits/s) while a reader blocks in `XREAD` on its own
//!   Redis connection. Each event's latency is the time from its `COMMIT` returning in the writer to the reader
//!   receiving its entry, both on this process's monotonic clock; the same is given from the row's `created_at`
//!   (Postgres' `now()`, the start of the transaction, on the same machine's wall clock) as a cross-check.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use futures::{StreamExt, stream};
use k8s_openapi::{api::core::v1::Secret, jiff::Timestamp};
use kube::{
    Api,
    api::{DeleteParams, PostParams},
};
use kubesaga_events::StreamEvent;
use kubesaga_kit::outbox::{self, Event};
use kubesaga_operator::crd::OutboxRelay;
use kubesaga_testkit::{OperatorProcess, TestDatabase, TestNamespace, install_crds, redis_url};
use redis::{
    AsyncCommands,
    aio::MultiplexedConnection,
    streams::{StreamReadOptions, StreamReadReply},
};
use serde_json::{Value, json};
use sqlx::{PgPool, migrate::Migrator};
use uuid::Uuid;

use crate::{free_port, wait_ready};

/// The aggregate type of every event, so each scenario writes one stream.
const AGGREGATE_TYPE: &str = "order";

/// Relay benchmark settings.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Batch sizes (`batchSize`) to measure throughput at.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 100, 1000])]
    batch_sizes: Vec<u32>,
    /// Rows of the backlog for batch sizes above 1.
    #[arg(long, default_value_t = 20_000)]
    rows: usize,
    /// Rows of the backlog for batch size 1.
    #[arg(long, default_value_t = 3_000)]
    rows_batch_1: usize,
    /// Events per aggregate of extra throughput runs at the largest batch size (rows round robin over the
    /// aggregates), showing the cost of per-aggregate order; empty: none.
    #[arg(long, value_delimiter = ',', num_args = 0.., default_values_t = [10, 100])]
    events_per_aggregate: Vec<usize>,
    /// Rows of one more throughput run at the largest batch size in which every row belongs to one aggregate
    /// (0: none).
    #[arg(long, default_value_t = 1_000)]
    single_aggregate_rows: usize,
    /// Commits per second in the latency runs.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..))]
    rate: u32,
    /// Commits per second of one more LISTEN/NOTIFY latency run (0: none).
    #[arg(long, default_value_t = 3000)]
    load_rate: u32,
    /// Seconds of commits per latency run.
    #[arg(long, default_value_t = 15)]
    seconds: u64,
    /// `pollInterval`s of the polling-only latency runs (the LISTEN/NOTIFY run keeps the default, 1s).
    #[arg(long, value_delimiter = ',', num_args = 0.., default_values_t = ["1s".to_owned(), "100ms".to_owned()])]
    poll_intervals: Vec<String>,
    /// The operator binary (a release build).
    #[arg(long, env = "KUBESAGA_OPERATOR_BIN", default_value = "target/release/kubesaga-operator")]
    operator: String,
}

/// Runs the throughput and latency scenarios and prints their tables.
pub async fn run(args: Args) {
    let mut bench = Bench::start(&args.operator).await;
    println!("machine: {} cores", std::thread::available_parallelism().map_or(0, usize::from));

    let mut throughputs = Vec::new();
    for &batch in &args.batch_sizes {
        let rows = if batch == 1 { args.rows_batch_1 } else { args.rows };
        throughputs.push(bench.throughput(batch, rows, 1).await);
    }
    if let Some(&batch) = args.batch_sizes.iter().max() {
        for &per_aggregate in args.events_per_aggregate.iter().filter(|&&n| n > 1) {
            throughputs.push(bench.throughput(batch, args.rows, per_aggregate).await);
        }
        if args.single_aggregate_rows > 1 {
            let rows = args.single_aggregate_rows;
            throughputs.push(bench.throughput(batch, rows, rows).await);
        }
    }

    let notify = json!({"listenNotify": true});
    let mut latencies = vec![bench.latency("listen-notify", notify.clone(), args.rate, args.seconds).await];
    for poll in &args.poll_intervals {
        let overrides = json!({"listenNotify": false, "pollInterval": poll});
        latencies.push(bench.latency(&format!("poll-{poll}"), overrides, args.rate, args.seconds).await);
    }
    if args.load_rate > 0 {
        latencies.push(bench.latency("listen-notify", notify, args.load_rate, args.seconds).await);
    }

    println!();
    println!("throughput: a backlog committed before the relay starts; rate from the first entry to the last");
    println!(
        "{:>6} {:>7} {:>10} {:>12} {:>18} {:>22}",
        "batch", "rows", "per aggr.", "events/s", "create->1st entry", "create->all PUBLISHED"
    );
    for t in &throughputs {
        println!(
            "{:>6} {:>7} {:>10} {:>12.0} {:>16.0}ms {:>21.2}s",
            t.batch,
            t.rows,
            t.per_aggregate,
            t.events_per_second,
            t.first_entry.as_secs_f64() * 1000.0,
            t.all_published.as_secs_f64()
        );
    }
    println!();
    println!("latency: one event per commit for {}s; COMMIT returned -> entry read (created_at -> read)", args.seconds);
    println!(
        "{:>14} {:>8} {:>8} {:>10} {:>22} {:>22} {:>10}",
        "mode", "writers", "commits", "commits/s", "p50", "p99", "max"
    );
    for l in &latencies {
        println!(
            "{:>14} {:>8} {:>8} {:>10.0} {:>9.1} ms ({:>6.1}) {:>9.1} ms ({:>6.1}) {:>7.1} ms",
            l.mode, l.writers, l.commits, l.commit_rate, l.p50, l.created_p50, l.p99, l.created_p99, l.max
        );
    }
    bench.finish().await;
}

/// The namespace, the operator and Redis shared by every scenario.
struct Bench {
    ns: TestNamespace,
    redis_client: redis::Client,
    redis: MultiplexedConnection,
    _operator: OperatorProcess,
    scenarios: usize,
}

/// One scenario's database, relay and stream.
struct Scenario {
    label: String,
    db: TestDatabase,
    pool: PgPool,
    prefix: String,
    stream: String,
}

struct Throughput {
    batch: u32,
    rows: usize,
    per_aggregate: usize,
    events_per_second: f64,
    first_entry: Duration,
    all_published: Duration,
}

struct Latency {
    mode: String,
    writers: usize,
    commits: usize,
    commit_rate: f64,
    p50: f64,
    p99: f64,
    max: f64,
    created_p50: f64,
    created_p99: f64,
}

impl Bench {
    async fn start(operator: &str) -> Self {
        let client = kubesaga_testkit::client().await;
        let crds: Vec<_> = kubesaga_operator::crd::all().into_iter().map(|(_, crd)| crd).collect();
        install_crds(&client, &crds).await;
        let ns = TestNamespace::create(&client, "bench-relay").await;
        let url = redis_url();
        let redis_client = redis::Client::open(url.as_str()).expect("redis url");
        let redis = redis_client.get_multiplexed_async_connection().await.expect("connect to redis");
        let listen = format!("127.0.0.1:{}", free_port());
        let operator = OperatorProcess::start(operator, &ns.name, &["--listen", &listen]);
        wait_ready(&listen).await;
        let bench = Self { ns, redis_client, redis, _operator: operator, scenarios: 0 };
        bench.secret("redis", &url).await;
        bench
    }

    async fn secret(&self, name: &str, url: &str) {
        let secret: Secret = serde_json::from_value(json!({"metadata": {"name": name}, "stringData": {"url": url}}))
            .expect("secret object");
        self.ns.api::<Secret>().create(&PostParams::default(), &secret).await.expect("create secret");
    }

    /// A fresh database with the outbox tables, its Secret, and a stream name no other scenario uses.
    async fn scenario(&mut self, name: &str) -> Scenario {
        self.scenarios += 1;
        let label = format!("{}-{name}", self.scenarios).replace('.', "-");
        let db = TestDatabase::create("bench_relay").await;
        let pool = db.pool().await;
        kubesaga_kit::stores::migrate_with_outbox(&pool, &Migrator::DEFAULT).await.expect("migrations");
        self.secret(&format!("db-{label}"), &db.url).await;
        let prefix = format!("bench.{}.{label}.", self.ns.name);
        let stream = kubesaga_events::stream_for(&prefix, AGGREGATE_TYPE);
        Scenario { label, db, pool, prefix, stream }
    }

    /// Creates the scenario's relay; `overrides` replaces top-level spec fields.
    async fn start_relay(&self, scenario: &Scenario, overrides: Value) {
        let mut spec = json!({
            "database": {"secretKeyRef": {"name": format!("db-{}", scenario.label)}},
            "destination": {"redis": {"secretKeyRef": {"name": "redis"}}, "streamPrefix": scenario.prefix},
        });
        for (key, value) in overrides.as_object().expect("overrides object") {
            spec[key] = value.clone();
        }
        let relay: OutboxRelay = serde_json::from_value(json!({
            "apiVersion": "kubesaga.dev/v1alpha1", "kind": "OutboxRelay",
            "metadata": {"name": scenario.label}, "spec": spec,
        }))
        .expect("relay object");
        let relays: Api<OutboxRelay> = self.ns.api();
        relays.create(&PostParams::default(), &relay).await.expect("create relay");
    }

    /// Deletes the relay, waits for its worker to let go, and removes the stream and the database.
    async fn end(&mut self, scenario: Scenario) {
        let relays: Api<OutboxRelay> = self.ns.api();
        relays.delete(&scenario.label, &DeleteParams::default()).await.expect("delete relay");
        while relays.get_opt(&scenario.label).await.expect("get relay").is_some() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // The supervisor stops the worker after the watch event; give it the moment to finish its round.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let _: () = self.redis.del(&scenario.stream).await.expect("DEL stream");
        scenario.pool.close().await;
        scenario.db.drop_database().await;
    }

    async fn xlen(&mut self, stream: &str) -> usize {
        self.redis.xlen(stream).await.expect("XLEN")
    }

    /// A backlog of `rows` rows, `per_aggregate` per aggregate, drained by a relay with `batchSize: batch`.
    async fn throughput(&mut self, batch: u32, rows: usize, per_aggregate: usize) -> Throughput {
        let name =
            if per_aggregate == 1 { format!("batch-{batch}") } else { format!("batch-{batch}-x{per_aggregate}") };
        let scenario = self.scenario(&name).await;
        preload(&scenario.pool, rows, per_aggregate).await;
        // The planner sees the backlog as it would on a table in service.
        sqlx::query("ANALYZE outbox").execute(&scenario.pool).await.expect("ANALYZE");

        let created = Instant::now();
        self.start_relay(&scenario, json!({"batchSize": batch})).await;
        let mut first = None;
        let last = loop {
            let len = self.xlen(&scenario.stream).await;
            let now = Instant::now();
            if len > 0 && first.is_none() {
                first = Some((now, len));
            }
            if len >= rows {
                break now;
            }
            assert!(created.elapsed() < Duration::from_secs(900), "{name}: {len} of {rows} entries after 15 min");
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let all_published = loop {
            let published: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE status = 'PUBLISHED'")
                .fetch_one(&scenario.pool)
                .await
                .expect("count");
            if published as usize >= rows {
                break created.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let (first_at, first_len) = first.expect("entries were seen");
        let events_per_second =
            if last > first_at { (rows - first_len) as f64 / (last - first_at).as_secs_f64() } else { f64::INFINITY };
        let result = Throughput {
            batch,
            rows,
            per_aggregate,
            events_per_second,
            first_entry: first_at - created,
            all_published,
        };
        println!(
            "{name}: {rows} rows ({per_aggregate} per aggregate): {events_per_second:.0} events/s; first entry {:.0} ms \
             after create, all PUBLISHED after {:.2} s",
            result.first_entry.as_secs_f64() * 1000.0,
            all_published.as_secs_f64()
        );
        self.end(scenario).await;
        result
    }

    /// A steady stream of one-event commits through a relay configured by `overrides`.
    /// Commits come from one writer per 200 commits/s, so one slow commit does not hold up the next ones.
    async fn latency(&mut self, mode: &str, overrides: Value, rate: u32, seconds: u64) -> Latency {
        let scenario = self.scenario(mode).await;
        self.start_relay(&scenario, overrides).await;
        // The warm-up event shows the worker connected (and LISTENing, when it does).
        commit(&scenario.pool, "warm-up", 0).await;
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.xlen(&scenario.stream).await == 0 {
            assert!(Instant::now() < deadline, "{mode}: the warm-up event was not relayed within 60 s");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }

        let commits = (u64::from(rate) * seconds) as usize;
        let writers = rate.div_ceil(200).clamp(1, 16) as usize;
        let reader = {
            let redis = self.redis_client.get_multiplexed_async_connection().await.expect("connect to redis");
            tokio::spawn(read(redis, scenario.stream.clone(), commits + 1))
        };
        // Commit i is due at start + i / rate; writer w makes the commits i with i % writers == w.
        let period = Duration::from_secs_f64(1.0 / f64::from(rate));
        let start = tokio::time::Instant::now();
        let tasks: Vec<_> = (0..writers)
            .map(|w| {
                let pool = scenario.pool.clone();
                tokio::spawn(async move {
                    let mut committed = Vec::with_capacity(commits / writers + 1);
                    for i in (w..commits).step_by(writers) {
                        tokio::time::sleep_until(start + period.mul_f64(i as f64)).await;
                        let id = commit(&pool, "bench", i).await;
                        committed.push((id, Instant::now()));
                    }
                    committed
                })
            })
            .collect();
        let mut committed = Vec::with_capacity(commits);
        for task in tasks {
            committed.extend(task.await.expect("writer"));
        }
        let commit_rate = commits as f64 / start.elapsed().as_secs_f64();
        let received = tokio::time::timeout(Duration::from_secs(120), reader)
            .await
            .unwrap_or_else(|_| panic!("{mode}: not every event reached the stream within 2 min"))
            .expect("reader");

        let mut latencies = Vec::with_capacity(commits);
        let mut from_created = Vec::with_capacity(commits);
        for (id, at) in &committed {
            let entry = &received[&id.to_string()];
            latencies.push(entry.at.saturating_duration_since(*at).as_secs_f64() * 1000.0);
            let created: Timestamp = entry.created_at.parse().expect("created_at is RFC 3339");
            from_created.push(entry.wall.duration_since(created).as_secs_f64() * 1000.0);
        }
        latencies.sort_by(f64::total_cmp);
        from_created.sort_by(f64::total_cmp);
        let result = Latency {
            mode: mode.to_owned(),
            writers,
            commits,
            commit_rate,
            p50: quantile(&latencies, 0.50),
            p99: quantile(&latencies, 0.99),
            max: *latencies.last().unwrap_or(&0.0),
            created_p50: quantile(&from_created, 0.50),
            created_p99: quantile(&from_created, 0.99),
        };
        println!(
            "{mode}: {commits} commits at {commit_rate:.0}/s ({writers} writers); COMMIT -> read p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; \
             created_at -> read p50 {:.1} ms, p99 {:.1} ms",
            result.p50, result.p99, result.max, result.created_p50, result.created_p99
        );
        self.end(scenario).await;
        result
    }

    async fn finish(self) {
        drop(self._operator);
        self.ns.delete().await;
    }
}

/// Commits one event in its own transaction, as a service does.
async fn commit(pool: &PgPool, prefix: &str, i: usize) -> Uuid {
    let mut tx = pool.begin().await.expect("begin");
    let event = Event::new(AGGREGATE_TYPE, format!("{prefix}-{i}"), "OrderPlaced", json!({"n": i}));
    let id = outbox::write(&mut tx, &event, None).await.expect("write event");
    tx.commit().await.expect("commit");
    id
}

/// Commits `rows` events over `rows / per_aggregate` aggregates, round robin (aggregate `i % aggregates`), in
/// transactions of 500 rows, four at a time.
async fn preload(pool: &PgPool, rows: usize, per_aggregate: usize) {
    const CHUNK: usize = 500;
    let aggregates = rows.div_ceil(per_aggregate.max(1));
    stream::iter((0..rows).step_by(CHUNK))
        .map(|start| async move {
            let mut tx = pool.begin().await.expect("begin");
            for i in start..(start + CHUNK).min(rows) {
                let event =
                    Event::new(AGGREGATE_TYPE, format!("agg-{}", i % aggregates), "OrderPlaced", json!({"n": i}));
                outbox::write(&mut tx, &event, None).await.expect("write event");
            }
            tx.commit().await.expect("commit");
        })
        .buffered(4)
        .collect::<Vec<()>>()
        .await;
}

/// An entry as the reader received it.
struct Received {
    /// When the `XREAD` that returned it came back (monotonic).
    at: Instant,
    /// The same moment on the wall clock.
    wall: Timestamp,
    /// The row's `created_at`.
    created_at: String,
}

/// Reads `stream` from the beginning until `n` entries arrived, keyed by event id.
async fn read(mut redis: MultiplexedConnection, stream: String, n: usize) -> HashMap<String, Received> {
    // Under the client's 500 ms response timeout; a reply comes back as soon as an entry is added anyway.
    let options = StreamReadOptions::default().block(200).count(1000);
    let mut last_id = "0-0".to_owned();
    let mut received = HashMap::with_capacity(n);
    while received.len() < n {
        let reply: Option<StreamReadReply> =
            redis.xread_options(&[&stream], &[&last_id], &options).await.expect("XREAD");
        let (at, wall) = (Instant::now(), Timestamp::now());
        for entry in reply.into_iter().flat_map(|r| r.keys).flat_map(|k| k.ids) {
            last_id = entry.id;
            let fields = entry.map.into_iter().map(|(k, v)| {
                let v: String = redis::from_redis_value(v).expect("string field");
                (k, v)
            });
            let event = StreamEvent::from_fields(fields).expect("an outbox event");
            received.insert(event.event_id, Received { at, wall, created_at: event.created_at });
        }
    }
    received
}

/// The `q` quantile of sorted `values` (nearest rank).
fn quantile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values[((values.len() as f64 * q).ceil() as usize).clamp(1, values.len()) - 1]
}
