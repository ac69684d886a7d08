//! The services' write path under load: what the Idempotency-Key layer, the transaction and the outbox row cost
//! next to a handler that does nothing, measured in one run with wrk (Debian's package).
//!
//! Method: the order service's router (kit HTTP shell, Idempotency-Key layer, Postgres and Redis as in
//! production) serves in this process on loopback; wrk drives, for `--seconds` each, with `--connections` over
//! `--threads`: (1) `PUT /bare/{id}`, a handler in the same shell that answers `{}` without touching Redis or
//! Postgres; (2) `PUT /orders/{id}` with a new id and key per request: claim the key in Redis, insert the order
//! and its outbox row in one transaction, store the answer; (3) the same request repeated with one key: the
//! replay path (one Redis read).

use std::process::Command;

use axum::{Router, routing::put};
use kubesaga_kit::{
    http::{self, Limits, Readiness},
    stores,
};
use kubesaga_order::{
    MIGRATOR,
    api::{self, AppState},
    checkout::{self, Endpoints, SagaStarter},
};
use kubesaga_testkit::{TestDatabase, redis_url, unique_suffix};
use serde_json::json;

/// Load settings.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Seconds per scenario.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Open connections.
    #[arg(long, default_value_t = 32)]
    connections: u32,
    /// wrk threads.
    #[arg(long, default_value_t = 2)]
    threads: u32,
}

struct Result {
    requests_per_second: f64,
    p99_ms: f64,
    non_2xx: u64,
}

/// Runs the three scenarios and prints them with the overhead ratio.
pub async fn run(args: Args) {
    let database = TestDatabase::create("bench_order").await;
    let db = database.pool().await;
    stores::migrate_with_outbox(&db, &MIGRATOR).await.expect("migrate");
    let redis = stores::redis(&redis_url()).await.expect("redis");
    let endpoints = Endpoints { order: "http://o".into(), inventory: "http://i".into(), payment: "http://p".into() };
    let template = checkout::load_template(checkout::DEFAULT_TEMPLATE, &endpoints).expect("template");
    let sagas = SagaStarter::new(kubesaga_testkit::client().await, "default", template);
    let api = api::routes(AppState { db: db.clone(), sagas }, redis.clone())
        .merge(Router::new().route("/bare/{id}", put(|| async { axum::Json(json!({})) })));
    let readiness = Readiness { redis: Some(redis), postgres: Some(db.clone()) };
    let app = http::app("bench", api, readiness, json!({}), &Limits::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });

    let run = unique_suffix();
    let body = r#"{"customerEmail":"bench@example.com","sku":"B-1","quantity":1,"amountCents":100,"currency":"EUR"}"#;
    let unique = |path: &str| {
        format!(
            "local n = 0\nlocal t = 0\nfunction setup(thread) t = t + 1; thread:set('tid', t) end\n\
             function request()\n  n = n + 1\n  local id = string.format('00000000-0000-4000-8%03d-%012d', tid, n)\n  \
             return wrk.format('PUT', '{path}' .. id, {{['Content-Type'] = 'application/json', \
             ['Idempotency-Key'] = '{run}-' .. id}}, '{body}')\nend\n"
        )
    };
    let replay_id = uuid::Uuid::new_v4();
    let replay = format!(
        "function request()\n  return wrk.format('PUT', '/orders/{replay_id}', {{['Content-Type'] = 'application/json', \
         ['Idempotency-Key'] = '{run}-replay'}}, '{body}')\nend\n"
    );
    // The first request executes; everything wrk sends afterwards is a replay.
    let first = reqwest::Client::new()
        .put(format!("{base}/orders/{replay_id}"))
        .header("content-type", "application/json")
        .header("idempotency-key", format!("{run}-replay"))
        .body(body)
        .send()
        .await
        .expect("first request");
    assert!(first.status().is_success(), "the replay scenario's first request failed: {}", first.status());

    let bare = wrk(&args, &base, &unique("/bare/"));
    let write = wrk(&args, &base, &unique("/orders/"));
    let replayed = wrk(&args, &base, &replay);
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox").fetch_one(&db).await.expect("count");
    println!("machine: {} cores", std::thread::available_parallelism().map_or(0, usize::from));
    println!("wrk -t{} -c{} -d{}s per scenario, loopback", args.threads, args.connections, args.seconds);
    for (name, result) in [("bare handler", &bare), ("write path", &write), ("replay path", &replayed)] {
        println!(
            "{name:>13}: {:>8.0} req/s, p99 {:>7.2} ms, non-2xx {}",
            result.requests_per_second, result.p99_ms, result.non_2xx
        );
    }
    println!(
        "overhead vs bare: write path {:.1}x the time per request, replay path {:.1}x; {rows} outbox rows written",
        bare.requests_per_second / write.requests_per_second,
        bare.requests_per_second / replayed.requests_per_second,
    );
    db.close().await;
    database.drop_database().await;
}

fn wrk(args: &Args, base: &str, script: &str) -> Result {
    let path = std::env::temp_dir().join(format!("kubesaga-wrk-{}.lua", unique_suffix()));
    std::fs::write(&path, script).expect("write wrk script");
    let output = Command::new("wrk")
        .args(["--latency", "-t", &args.threads.to_string(), "-c", &args.connections.to_string()])
        .args(["-d", &format!("{}s", args.seconds), "-s"])
        .arg(&path)
        .arg(base)
        .output()
        .expect("run wrk (apt-get install wrk)");
    let _ = std::fs::remove_file(&path);
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "wrk failed: {text}{}", String::from_utf8_lossy(&output.stderr));
    let field = |prefix: &str| text.lines().find_map(|l| l.trim().strip_prefix(prefix).map(|r| r.trim().to_owned()));
    let requests_per_second = field("Requests/sec:").and_then(|v| v.parse().ok()).expect("Requests/sec in wrk output");
    let p99_ms = field("99%").map(|v| parse_latency(&v)).expect("99% latency in wrk output");
    let non_2xx = field("Non-2xx or 3xx responses:").and_then(|v| v.parse().ok()).unwrap_or(0);
    Result { requests_per_second, p99_ms, non_2xx }
}

/// wrk prints latencies as `850.00us`, `12.34ms` or `1.20s`.
fn parse_latency(text: &str) -> f64 {
    let (number, factor) = if let Some(v) = text.strip_suffix("us") {
        (v, 0.001)
    } else if let Some(v) = text.strip_suffix("ms") {
        (v, 1.0)
    } else if let Some(v) = text.strip_suffix('s') {
        (v, 1000.0)
    } else {
        (text, 1.0)
    };
    number.parse::<f64>().map_or(f64::NAN, |n| n * factor)
}
