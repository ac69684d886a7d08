//! A namespace, a database with the outbox tables, the Secrets an OutboxRelay points at, and the operator as a
//! process with its metrics on a known port; plus helpers to commit rows and read the streams. Each test binary
//! that includes it uses a different part.

#![allow(dead_code, clippy::expect_used, clippy::unwrap_used)]

use std::{
    future::Future,
    ops::{Deref, DerefMut},
    time::Duration,
};

use k8s_openapi::{api::core::v1::Secret, api::events::v1::Event as KubeEvent};
use kube::{
    Api,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
};
use kubesaga_events::StreamEvent;
use kubesaga_kit::outbox::{self, Event};
use kubesaga_operator::crd::{self, OutboxRelay, OutboxRelayStatus};
use kubesaga_testkit::{OperatorProcess, TestDatabase, TestNamespace, install_crds};
use redis::{AsyncCommands, aio::ConnectionManager, streams::StreamRangeReply};
use serde_json::{Value, json};
use sqlx::{AssertSqlSafe, PgPool};
use uuid::Uuid;

/// The operator binary under test.
const OPERATOR: &str = env!("CARGO_BIN_EXE_kubesaga-operator");

/// The operator process and where its metrics are.
pub struct Operator {
    process: OperatorProcess,
    metrics_url: String,
}

impl Deref for Operator {
    type Target = OperatorProcess;
    fn deref(&self) -> &OperatorProcess {
        &self.process
    }
}

impl DerefMut for Operator {
    fn deref_mut(&mut self) -> &mut OperatorProcess {
        &mut self.process
    }
}

/// Everything one relay test works with.
pub struct Fixture {
    pub ns: TestNamespace,
    pub db: TestDatabase,
    pub pool: PgPool,
    /// Stream prefix of this test's relays; streams are `<prefix><aggregate_type>`.
    pub prefix: String,
    redis: ConnectionManager,
}

impl Fixture {
    /// A namespace `<name>-…`, a database with the outbox migrations, and Secrets `db` and `redis` with the URLs.
    pub async fn new(name: &str, redis_url: &str) -> Self {
        Self::with_service(name, redis_url, &sqlx::migrate::Migrator::DEFAULT).await
    }

    /// Like [`Fixture::new`], with a service's own migrations applied beside the outbox ones, as the service does.
    pub async fn with_service(name: &str, redis_url: &str, service: &sqlx::migrate::Migrator) -> Self {
        let client = kubesaga_testkit::client().await;
        let crds: Vec<_> = crd::all().into_iter().map(|(_, c)| c).collect();
        install_crds(&client, &crds).await;
        let ns = TestNamespace::create(&client, name).await;
        let db = TestDatabase::create(&name.replace('-', "_")).await;
        let pool = db.pool().await;
        kubesaga_kit::stores::migrate_with_outbox(&pool, service).await.expect("migrations");
        let redis = redis::Client::open(redis_url).expect("redis url");
        let redis = ConnectionManager::new(redis).await.expect("connect to redis");
        let fx = Self { prefix: format!("test.{}.", ns.name), ns, db, pool, redis };
        fx.create_secret("db", &fx.db.url).await;
        fx.create_secret("redis", redis_url).await;
        fx
    }

    /// Starts the operator for this namespace.
    pub fn operator(&self, extra_args: &[&str]) -> Operator {
        self.operator_with_env(extra_args, &[])
    }

    /// Starts the operator with environment variables for its first start only.
    pub fn operator_with_env(&self, extra_args: &[&str], env: &[(&str, &str)]) -> Operator {
        let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
        let listen = format!("127.0.0.1:{port}");
        let mut args = vec!["--listen", listen.as_str()];
        args.extend_from_slice(extra_args);
        let process = OperatorProcess::start_with_env(OPERATOR, &self.ns.name, &args, env);
        Operator { process, metrics_url: format!("http://{listen}/metrics") }
    }

    pub async fn create_secret(&self, name: &str, url: &str) {
        let secret: Secret = serde_json::from_value(json!({
            "metadata": {"name": name},
            "stringData": {"url": url},
        }))
        .unwrap();
        self.ns.api::<Secret>().create(&PostParams::default(), &secret).await.expect("create secret");
    }

    /// Points Secret `name` at another URL, as rotating credentials would.
    pub async fn update_secret(&self, name: &str, url: &str) {
        let patch = Patch::Merge(json!({"stringData": {"url": url}}));
        self.ns.api::<Secret>().patch(name, &PatchParams::default(), &patch).await.expect("update secret");
    }

    pub fn relays(&self) -> Api<OutboxRelay> {
        self.ns.api()
    }

    /// Creates a relay on this test's database, Redis and stream prefix; `overrides` replaces top-level spec fields.
    pub async fn create_relay(&self, name: &str, overrides: Value) {
        let mut spec = json!({
            "database": {"secretKeyRef": {"name": "db"}},
            "destination": {"redis": {"secretKeyRef": {"name": "redis"}}, "streamPrefix": self.prefix},
        });
        for (key, value) in overrides.as_object().expect("overrides object") {
            spec[key] = value.clone();
        }
        let relay: OutboxRelay = serde_json::from_value(json!({
            "apiVersion": "kubesaga.dev/v1alpha1",
            "kind": "OutboxRelay",
            "metadata": {"name": name},
            "spec": spec,
        }))
        .expect("relay object");
        self.relays().create(&PostParams::default(), &relay).await.expect("create relay");
    }

    pub async fn patch_relay(&self, name: &str, spec: Value) {
        let patch = Patch::Merge(json!({"spec": spec}));
        self.relays().patch(name, &PatchParams::default(), &patch).await.expect("patch relay");
    }

    pub async fn delete_relay(&self, name: &str) {
        self.relays().delete(name, &DeleteParams::default()).await.expect("delete relay");
    }

    /// Commits one event the way a service does: through the outbox writer, in a transaction.
    pub async fn insert(&self, aggregate_type: &'static str, aggregate_id: &str, event_type: &'static str) -> Uuid {
        let [id] = self.insert_many(aggregate_type, &[aggregate_id], event_type).await;
        id
    }

    /// Commits one event per aggregate id, all in one transaction.
    pub async fn insert_many<const N: usize>(
        &self,
        aggregate_type: &'static str,
        aggregate_ids: &[&str; N],
        event_type: &'static str,
    ) -> [Uuid; N] {
        let mut tx = self.pool.begin().await.expect("begin");
        let mut ids = [Uuid::nil(); N];
        for (slot, aggregate_id) in ids.iter_mut().zip(aggregate_ids) {
            let event = Event::new(aggregate_type, *aggregate_id, event_type, json!({"aggregate": aggregate_id}));
            *slot = outbox::write(&mut tx, &event, Some("shop/checkout-1")).await.expect("write event");
        }
        tx.commit().await.expect("commit");
        ids
    }

    /// Writes an event and rolls the transaction back.
    pub async fn insert_rolled_back(&self, aggregate_type: &'static str, aggregate_id: &str, event_type: &'static str) {
        let mut tx = self.pool.begin().await.expect("begin");
        let event = Event::new(aggregate_type, aggregate_id, event_type, json!({}));
        outbox::write(&mut tx, &event, None).await.expect("write event");
        tx.rollback().await.expect("rollback");
    }

    /// Commits `aggregates × events` rows of aggregate type `order` (ids `<name>-0`, `<name>-1`, …) in one
    /// statement: round robin over the aggregates when `interleaved`, else each aggregate's events consecutive.
    pub async fn insert_backlog(&self, name: &str, aggregates: i64, events: i64, interleaved: bool) {
        let order = if interleaved { "n, a" } else { "a, n" };
        let sql = format!(
            "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload) \
             SELECT gen_random_uuid(), 'order', $3 || '-' || a, 'OrderChanged', jsonb_build_object('n', n) \
             FROM generate_series(0, $1 - 1) a, generate_series(1, $2) n ORDER BY {order}"
        );
        sqlx::query(AssertSqlSafe(sql))
            .bind(aggregates)
            .bind(events)
            .bind(name)
            .execute(&self.pool)
            .await
            .expect("insert backlog");
    }

    /// A row committed ten minutes ago whose next attempt is an hour away.
    pub async fn insert_backdated(&self, aggregate_type: &str, aggregate_id: &str) -> Uuid {
        let id = Uuid::new_v4();
        sqlx::query(
            "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload, created_at, next_attempt_at) \
             VALUES ($1, $2, $3, 'Stuck', '{}', now() - interval '10 minutes', now() + interval '1 hour')",
        )
        .bind(id)
        .bind(aggregate_type)
        .bind(aggregate_id)
        .execute(&self.pool)
        .await
        .expect("insert backdated row");
        id
    }

    /// Outbox rows matching `condition` (SQL).
    pub async fn count(&self, condition: &str) -> i64 {
        let sql = format!("SELECT count(*) FROM outbox WHERE {condition}");
        sqlx::query_scalar(AssertSqlSafe(sql)).fetch_one(&self.pool).await.expect("count rows")
    }

    pub async fn dead_letters(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM outbox_dead_letter").fetch_one(&self.pool).await.expect("count")
    }

    /// Makes the stream key of `aggregate_type` a plain string, so XADD to it fails.
    pub async fn set_plain_key(&self, aggregate_type: &str) {
        let mut redis = self.redis.clone();
        let _: () = redis.set(format!("{}{aggregate_type}", self.prefix), "not a stream").await.expect("SET");
    }

    /// Entries of the stream of `aggregate_type`.
    pub async fn entries(&self, aggregate_type: &str) -> Vec<StreamEvent> {
        self.stream(&format!("{}{aggregate_type}", self.prefix)).await
    }

    async fn stream(&self, key: &str) -> Vec<StreamEvent> {
        self.try_stream(key).await.expect("XRANGE")
    }

    /// Entries of `key`, or the error of a connection that has not yet noticed a Redis restart.
    async fn try_stream(&self, key: &str) -> redis::RedisResult<Vec<StreamEvent>> {
        let mut redis = self.redis.clone();
        let reply: StreamRangeReply = redis.xrange_all(key).await?;
        Ok(reply
            .ids
            .into_iter()
            .map(|entry| {
                let fields = entry.map.into_iter().map(|(k, v)| {
                    let v: String = redis::from_redis_value(v).expect("string field");
                    (k, v)
                });
                StreamEvent::from_fields(fields).expect("an outbox event")
            })
            .collect())
    }

    /// Waits until the stream of `aggregate_type` has at least `n` entries and returns them.
    pub async fn wait_for_entries(&self, aggregate_type: &str, n: usize) -> Vec<StreamEvent> {
        self.wait_for_stream(&format!("{}{aggregate_type}", self.prefix), n).await
    }

    pub async fn wait_for_stream(&self, key: &str, n: usize) -> Vec<StreamEvent> {
        eventually(Duration::from_secs(30), &format!("{n} entries on {key}"), || async {
            self.try_stream(key).await.is_ok_and(|entries| entries.len() >= n)
        })
        .await;
        self.stream(key).await
    }

    /// Events with `reason` in the namespace.
    pub async fn events(&self, reason: &str) -> usize {
        let events: Api<KubeEvent> = self.ns.api();
        let list = events.list(&ListParams::default()).await.expect("list events");
        list.items.iter().filter(|e| e.reason.as_deref() == Some(reason)).count()
    }

    /// A metric of relay `relay` (0 when absent).
    pub async fn metric(&self, operator: &Operator, name: &str, relay: &str) -> f64 {
        let text = reqwest::get(&operator.metrics_url).await.expect("GET /metrics").text().await.expect("body");
        let label = format!("relay=\"{}/{relay}\"", self.ns.name);
        text.lines()
            .find(|l| l.starts_with(&format!("{name}{{")) && l.contains(&label))
            .and_then(|l| l.rsplit(' ').next())
            .map_or(0.0, |v| v.parse().expect("metric value"))
    }

    /// Removes the namespace and the database (a failing test never gets here and leaves them).
    pub async fn finish(self) {
        self.ns.delete().await;
        self.pool.close().await;
        self.db.drop_database().await;
    }
}

/// `(status, reason)` of a condition, empty when absent.
pub fn condition(status: &OutboxRelayStatus, type_: &str) -> (String, String) {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone()))
        .unwrap_or_default()
}

/// Polls `check` until it holds, failing the test after `timeout`.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, check: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
