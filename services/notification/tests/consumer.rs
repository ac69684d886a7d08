//! The order event consumer against real Redis and Postgres: every test has a stream, a group and a database of
//! its own, and waits for the group to settle instead of sleeping.

#![allow(clippy::expect_used, clippy::unwrap_used)] // test code: a panic is the failure report

use std::{
    collections::HashMap,
    fs::File,
    future::Future,
    os::unix::process::ExitStatusExt,
    path::PathBuf,
    process::{ExitStatus, Stdio},
    time::Duration,
};

use kubesaga_events::StreamEvent;
use kubesaga_notification::{
    MIGRATOR,
    consumer::{self, Config, DEAD_LETTER_DELIVERIES, DEAD_LETTER_ORIGINAL_ID, DEAD_LETTER_REASON},
};
use kubesaga_testkit::{TestDatabase, redis_url, unique_suffix};
use redis::{
    AsyncCommands, Value,
    aio::MultiplexedConnection,
    streams::{StreamInfoGroupsReply, StreamRangeReply, StreamReadOptions},
};
use sqlx::PgPool;
use tokio::{process::Child, task::JoinHandle};
use tokio_util::sync::CancellationToken;

const SETTLE: Duration = Duration::from_secs(30);

/// A stream, a group and a database of one test.
struct World {
    database: TestDatabase,
    db: PgPool,
    redis: MultiplexedConnection,
    run: String,
    stream: String,
    group: String,
}

impl World {
    async fn new() -> Self {
        let database = TestDatabase::create("notification").await;
        let db = database.pool().await;
        MIGRATOR.run(&db).await.expect("migrate");
        let redis = redis::Client::open(redis_url())
            .expect("REDIS_URL")
            .get_multiplexed_async_connection()
            .await
            .expect("connect to Redis");
        let run = unique_suffix();
        Self { database, db, redis, stream: format!("test.events.order.{run}"), group: format!("notify-{run}"), run }
    }

    /// A consumer named `name` that would not claim anything within a test unless told otherwise.
    fn config(&self, name: &str) -> Config {
        Config {
            stream: self.stream.clone(),
            group: self.group.clone(),
            consumer: name.to_owned(),
            dead_letter_stream: format!("{}.dead-letter", self.stream),
            max_deliveries: 5,
            claim_min_idle: Duration::from_secs(3600),
            block: Duration::from_millis(100),
        }
    }

    fn start(&self, config: Config) -> Running {
        config.validate().expect("valid config");
        let shutdown = CancellationToken::new();
        let client = redis::Client::open(redis_url()).expect("REDIS_URL");
        let task = tokio::spawn(consumer::run(config, self.db.clone(), client, shutdown.clone()));
        Running { shutdown, task }
    }

    async fn add(&mut self, fields: &[(&str, &str)]) -> String {
        self.redis.xadd(&self.stream, "*", fields).await.expect("XADD")
    }

    async fn add_event(&mut self, event: &StreamEvent) -> String {
        self.add(&event.to_fields()).await
    }

    /// Creates the group as the consumer would, for tests that read with another consumer first.
    async fn create_group(&mut self) {
        let () = self.redis.xgroup_create_mkstream(&self.stream, &self.group, "0").await.expect("XGROUP CREATE");
    }

    /// Reads with `consumer` and never acknowledges, as a consumer that then died: `>` for the next new entry,
    /// `0` to read its pending ones again.
    async fn read_as(&mut self, consumer: &str, id: &str) -> Value {
        let options = StreamReadOptions::default().group(&self.group, consumer).count(1);
        self.redis.xread_options(&[&self.stream], &[id], &options).await.expect("XREADGROUP")
    }

    /// The group's last delivered id and pending count.
    async fn group_state(&mut self) -> (String, usize) {
        let groups: StreamInfoGroupsReply = self.redis.xinfo_groups(&self.stream).await.expect("XINFO GROUPS");
        groups
            .groups
            .into_iter()
            .find(|g| g.name == self.group)
            .map(|g| (g.last_delivered_id, g.pending))
            .unwrap_or_else(|| ("<no group>".into(), 0))
    }

    /// Waits until every entry up to `last` was delivered and acknowledged.
    async fn settled(&mut self, last: &str) {
        let last = last.to_owned();
        let mut seen = None;
        let settled = within(SETTLE, async {
            loop {
                let state = self.group_state().await;
                if state.0 == last && state.1 == 0 {
                    return;
                }
                seen = Some(state);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(settled, "the group did not acknowledge up to {last} within {SETTLE:?}; last seen {seen:?}");
    }

    async fn pending(&mut self) -> usize {
        self.group_state().await.1
    }

    /// (recipient, subject, order id) of every notification, oldest first.
    async fn notifications(&self) -> Vec<(String, Option<String>, Option<String>)> {
        sqlx::query_as("SELECT recipient, subject, order_id FROM notifications ORDER BY sent_at, id")
            .fetch_all(&self.db)
            .await
            .expect("read notifications")
    }

    async fn processed(&self) -> Vec<String> {
        sqlx::query_scalar("SELECT event_id FROM processed_events ORDER BY event_id")
            .fetch_all(&self.db)
            .await
            .expect("read processed events")
    }

    /// The dead-letter entries by the id they had on the stream.
    async fn dead_letters(&mut self) -> HashMap<String, HashMap<String, String>> {
        let range: StreamRangeReply =
            self.redis.xrange_all(format!("{}.dead-letter", self.stream)).await.expect("XRANGE");
        range
            .ids
            .into_iter()
            .map(|entry| {
                let fields: HashMap<String, String> =
                    entry.map.keys().map(|k| (k.clone(), entry.get::<String>(k).unwrap_or_default())).collect();
                (fields[DEAD_LETTER_ORIGINAL_ID].clone(), fields)
            })
            .collect()
    }

    async fn finish(mut self) {
        let dead_letter = format!("{}.dead-letter", self.stream);
        let _: u64 = self.redis.del(&[&self.stream, &dead_letter]).await.expect("DEL");
        self.db.close().await;
        self.database.drop_database().await;
    }
}

/// A consumer running in this process.
struct Running {
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl Running {
    async fn stop(self) {
        self.shutdown.cancel();
        assert!(within(Duration::from_secs(10), self.task).await, "the consumer did not stop on shutdown");
    }
}

/// Whether `future` finished within `timeout`.
async fn within(timeout: Duration, future: impl Future) -> bool {
    tokio::time::timeout(timeout, future).await.is_ok()
}

fn order_event(event_type: &str, event_id: &str, order_id: &str, email: &str) -> StreamEvent {
    let payload = serde_json::json!({
        "id": order_id, "customerEmail": email, "sku": "BOOK-1", "quantity": 2, "amountCents": 4200,
        "currency": "EUR", "status": "PENDING", "version": 1, "saga": format!("shop/order-{order_id}"),
    });
    StreamEvent {
        event_id: event_id.into(),
        event_type: event_type.into(),
        aggregate_type: "order".into(),
        aggregate_id: order_id.into(),
        payload: payload.to_string(),
        created_at: "2026-11-26T05:00:00Z".into(),
        headers: [
            ("traceparent".to_owned(), "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_owned()),
            ("saga_id".to_owned(), format!("shop/order-{order_id}")),
        ]
        .into(),
    }
}

#[tokio::test]
async fn an_approved_order_is_confirmed_by_one_email_and_acknowledged() {
    let mut world = World::new().await;
    let event_id = format!("approved-{}", world.run);
    let last = world.add_event(&order_event("OrderApproved", &event_id, "o-1", "ada@example.com")).await;
    let consumer = world.start(world.config("live"));
    world.settled(&last).await;

    assert_eq!(
        world.notifications().await,
        vec![("ada@example.com".into(), Some("Your order is confirmed".into()), Some("o-1".into()))]
    );
    assert_eq!(world.processed().await, vec![event_id]);
    assert_eq!(world.pending().await, 0);
    consumer.stop().await;
    world.finish().await;
}

#[tokio::test]
async fn the_saga_outcome_decides_the_message_and_a_created_order_sends_none() {
    let mut world = World::new().await;
    let run = world.run.clone();
    world.add_event(&order_event("OrderCreated", &format!("a1-{run}"), "o-a", "ada@example.com")).await;
    world.add_event(&order_event("OrderApproved", &format!("a2-{run}"), "o-a", "ada@example.com")).await;
    world.add_event(&order_event("OrderCreated", &format!("b1-{run}"), "o-b", "bob@example.com")).await;
    let last = world.add_event(&order_event("OrderCancelled", &format!("b2-{run}"), "o-b", "bob@example.com")).await;
    let consumer = world.start(world.config("live"));
    world.settled(&last).await;

    assert_eq!(
        world.notifications().await,
        vec![
            ("ada@example.com".into(), Some("Your order is confirmed".into()), Some("o-a".into())),
            ("bob@example.com".into(), Some("Your order was cancelled".into()), Some("o-b".into())),
        ]
    );
    assert_eq!(world.processed().await.len(), 4, "created events are recorded as processed too");
    consumer.stop().await;
    world.finish().await;
}

#[tokio::test]
async fn an_event_delivered_twice_notifies_once() {
    let mut world = World::new().await;
    let event = order_event("OrderApproved", &format!("twice-{}", world.run), "o-2", "ada@example.com");
    world.add_event(&event).await;
    let last = world.add_event(&event).await;
    let consumer = world.start(world.config("live"));
    world.settled(&last).await;

    assert_eq!(world.notifications().await.len(), 1);
    assert_eq!(world.processed().await, vec![event.event_id]);
    consumer.stop().await;
    world.finish().await;
}

#[tokio::test]
async fn entries_a_dead_consumer_left_pending_are_claimed_and_processed_once() {
    let mut world = World::new().await;
    world.create_group().await;
    let event_id = format!("orphan-{}", world.run);
    let last = world.add_event(&order_event("OrderApproved", &event_id, "o-3", "ada@example.com")).await;
    world.read_as("dead-consumer", ">").await;
    assert_eq!(world.pending().await, 1);

    let config = Config { claim_min_idle: Duration::from_millis(300), ..world.config("live") };
    let consumer = world.start(config);
    world.settled(&last).await;

    assert_eq!(world.notifications().await.len(), 1);
    assert_eq!(world.processed().await, vec![event_id]);
    consumer.stop().await;
    world.finish().await;
}

#[tokio::test]
async fn poison_entries_are_dead_lettered_with_the_reason_and_acknowledged() {
    let mut world = World::new().await;
    world.create_group().await;
    let run = world.run.clone();
    // Delivered three times to a consumer that never acknowledged it: over a limit of two.
    let too_often =
        world.add_event(&order_event("OrderApproved", &format!("p1-{run}"), "o-4", "ada@example.com")).await;
    world.read_as("dead-consumer", ">").await;
    world.read_as("dead-consumer", "0").await;
    world.read_as("dead-consumer", "0").await;
    // Deleted from the stream while pending.
    let deleted = world.add_event(&order_event("OrderApproved", &format!("p2-{run}"), "o-5", "ada@example.com")).await;
    world.read_as("dead-consumer", ">").await;
    let _: u64 = world.redis.xdel(&world.stream, &[&deleted]).await.expect("XDEL");
    let undecodable = world.add(&[("hello", "world")]).await;
    let mut bad_payload = order_event("OrderApproved", &format!("p3-{run}"), "o-6", "ada@example.com");
    bad_payload.payload = "not json".into();
    let bad_payload = world.add_event(&bad_payload).await;
    let last = world.add_event(&order_event("OrderCancelled", &format!("p4-{run}"), "o-7", "nobody")).await;

    let config = Config { max_deliveries: 2, claim_min_idle: Duration::from_millis(300), ..world.config("live") };
    let consumer = world.start(config);
    world.settled(&last).await;
    let mut dead = HashMap::new();
    let complete = within(SETTLE, async {
        loop {
            dead = world.dead_letters().await;
            if dead.len() == 5 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(complete, "expected 5 dead letters, found {dead:#?}");

    let reason = |id: &str| dead[id][DEAD_LETTER_REASON].clone();
    assert_eq!(reason(&too_often), "delivered 4 times, more than the limit of 2 (--max-deliveries)");
    assert_eq!(dead[&too_often][DEAD_LETTER_DELIVERIES], "4");
    assert_eq!(dead[&too_often]["event_id"], format!("p1-{run}"), "the original fields are kept");
    assert_eq!(reason(&deleted), "the entry was deleted from the stream before it was processed");
    assert_eq!(reason(&undecodable), "the entry is not an outbox event: stream entry has no `event_id` field");
    assert_eq!(dead[&undecodable]["hello"], "world");
    assert!(reason(&bad_payload).starts_with("the payload of OrderApproved is not an order: "), "{dead:#?}");
    assert_eq!(reason(&last), "the order's message cannot be sent: recipient: an e-mail needs an e-mail address");

    assert_eq!(world.pending().await, 0, "dead-lettered entries are acknowledged");
    assert!(world.notifications().await.is_empty());
    assert!(world.processed().await.is_empty());
    consumer.stop().await;
    world.finish().await;
}

#[tokio::test]
async fn a_consumer_whose_connection_is_killed_reconnects_and_goes_on() {
    let mut world = World::new().await;
    let name = format!("live-{}", world.run);
    let first =
        world.add_event(&order_event("OrderApproved", &format!("r1-{}", world.run), "o-9", "ada@example.com")).await;
    let consumer = world.start(world.config(&name));
    world.settled(&first).await;

    // The consumer names its connection after itself; killing it is Redis going away for this consumer alone.
    let clients: String = redis::cmd("CLIENT").arg("LIST").query_async(&mut world.redis).await.expect("CLIENT LIST");
    let id = clients
        .lines()
        .find(|line| line.split(' ').any(|field| field == format!("name={name}")))
        .and_then(|line| line.split(' ').find_map(|field| field.strip_prefix("id=")))
        .unwrap_or_else(|| panic!("no connection named {name} in\n{clients}"))
        .to_owned();
    let killed: u64 =
        redis::cmd("CLIENT").arg("KILL").arg("ID").arg(&id).query_async(&mut world.redis).await.expect("KILL");
    assert_eq!(killed, 1);

    let second =
        world.add_event(&order_event("OrderCancelled", &format!("r2-{}", world.run), "o-10", "ada@example.com")).await;
    world.settled(&second).await;
    assert_eq!(world.notifications().await.len(), 2);
    consumer.stop().await;
    world.finish().await;
}

/// The service binary with its consumer on the test's stream, logging to a file.
struct Service {
    child: Child,
    log: PathBuf,
}

impl Service {
    fn start(world: &World, fault: Option<&str>) -> Self {
        let log = std::env::temp_dir().join(format!("kubesaga-notification-{}-{}.log", world.run, unique_suffix()));
        let file = File::create(&log).expect("create log");
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_kubesaga-notification"));
        command
            .args(["--listen", "127.0.0.1:0", "--stream", &world.stream, "--group", &world.group])
            .args(["--consumer-name", "replica-0", "--block", "100ms", "--claim-min-idle", "1h"])
            .env("NOTIFICATION_DATABASE_URL", &world.database.url)
            .env("REDIS_URL", redis_url())
            .env_remove("KUBESAGA_FAULT_INJECTION")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("clone log"))
            .stderr(file)
            .kill_on_drop(true);
        if let Some(fault) = fault {
            command.env("KUBESAGA_FAULT_INJECTION", fault);
        }
        Self { child: command.spawn().expect("start kubesaga-notification"), log }
    }

    async fn exit(&mut self, timeout: Duration) -> ExitStatus {
        let log = &self.log;
        tokio::time::timeout(timeout, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("the service did not exit within {timeout:?}; log: {}", log.display()))
            .expect("wait for the service")
    }

    async fn terminate(mut self) -> ExitStatus {
        let pid = self.child.id().expect("running").to_string();
        let sent = tokio::process::Command::new("kill").args(["-TERM", &pid]).status().await.expect("run kill");
        assert!(sent.success());
        self.exit(Duration::from_secs(10)).await
    }
}

#[tokio::test]
async fn a_crash_between_commit_and_acknowledgement_does_not_notify_twice() {
    let mut world = World::new().await;
    let event_id = format!("crash-{}", world.run);
    let last = world.add_event(&order_event("OrderApproved", &event_id, "o-8", "ada@example.com")).await;

    let mut crashing = Service::start(&world, Some("crash-before-ack"));
    let status = crashing.exit(Duration::from_secs(60)).await;
    assert_eq!(status.signal(), Some(6), "expected an abort, got {status}; log: {}", crashing.log.display());
    assert_eq!(world.notifications().await.len(), 1, "the transaction committed before the crash");
    assert_eq!(world.pending().await, 1, "the entry was never acknowledged");

    // The same consumer name, as after a container restart; claiming is off (1h), so only the drain of its own
    // pending entries can acknowledge the entry.
    let restarted = Service::start(&world, None);
    world.settled(&last).await;
    assert_eq!(world.notifications().await.len(), 1, "the redelivered event is a duplicate");
    assert_eq!(world.processed().await, vec![event_id]);
    let log = restarted.log.clone();
    let status = restarted.terminate().await;
    assert!(status.success(), "SIGTERM stops the service cleanly, got {status}; log: {}", log.display());
    world.finish().await;
}
