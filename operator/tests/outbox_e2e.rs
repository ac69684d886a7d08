#![allow(clippy::expect_used, clippy::unwrap_used)]
//! From an order's commit to the customer's notification: the order service's own code writes the order and its
//! outbox event, the operator's relay moves the event to Redis, and the notification service's consumer turns the
//! saga's outcome into exactly one message — also when the relay crashes and publishes a batch twice.

mod relay_support;

use std::time::Duration;

use kubesaga_notification::consumer::{self, Config};
use kubesaga_order::orders::{self, NewOrder, Transition};
use kubesaga_testkit::TestDatabase;
use relay_support::{Fixture, eventually};
use serde_json::json;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The notification service's consumer, running in this test on a database of its own.
struct Notifications {
    db: TestDatabase,
    pool: PgPool,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Notifications {
    async fn start(stream: &str) -> Self {
        let db = TestDatabase::create("relay_e2e_notification").await;
        let pool = db.pool().await;
        kubesaga_notification::MIGRATOR.run(&pool).await.expect("notification migrations");
        let config = Config {
            stream: stream.to_owned(),
            group: "notification".into(),
            consumer: "notification-0".into(),
            dead_letter_stream: format!("{stream}.dead-letter"),
            max_deliveries: 5,
            claim_min_idle: Duration::from_secs(60),
            block: Duration::from_millis(500),
        };
        let redis = redis::Client::open(kubesaga_testkit::redis_url()).expect("redis url");
        let stop = CancellationToken::new();
        let task = tokio::spawn(consumer::run(config, pool.clone(), redis, stop.clone()));
        Self { db, pool, stop, task }
    }

    /// `(subject, recipient)` of the messages about `order`.
    async fn about(&self, order: Uuid) -> Vec<(String, String)> {
        sqlx::query_as("SELECT coalesce(subject, ''), recipient FROM notifications WHERE order_id = $1")
            .bind(order.to_string())
            .fetch_all(&self.pool)
            .await
            .expect("read notifications")
    }

    async fn processed(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM processed_events").fetch_one(&self.pool).await.expect("count")
    }

    async fn finish(self) {
        self.stop.cancel();
        self.task.await.expect("consumer task");
        self.pool.close().await;
        self.db.drop_database().await;
    }
}

fn new_order(email: &str) -> NewOrder {
    NewOrder {
        customer_email: email.into(),
        sku: "BOOK-1".into(),
        quantity: 1,
        amount_cents: 4200,
        currency: "EUR".into(),
    }
}

#[tokio::test]
async fn an_approved_order_becomes_one_confirmation_email() {
    let fx = Fixture::with_service("relay-e2e", &kubesaga_testkit::redis_url(), &kubesaga_order::MIGRATOR).await;
    let _operator = fx.operator(&[]);
    fx.create_relay("order-outbox", json!({})).await;
    let notifications = Notifications::start(&format!("{}order", fx.prefix)).await;

    let id = Uuid::new_v4();
    orders::create(&fx.pool, id, &new_order("ada@example.com"), "shop/checkout-1").await.expect("create order");
    orders::transition(&fx.pool, id, Transition::Approve).await.expect("approve order");

    eventually(Duration::from_secs(30), "both order events processed", || async {
        notifications.processed().await == 2
    })
    .await;
    let sent = notifications.about(id).await;
    assert_eq!(sent.len(), 1, "OrderCreated sends nothing, OrderApproved one e-mail: {sent:?}");
    assert_eq!(sent[0].1, "ada@example.com");
    assert!(sent[0].0.to_lowercase().contains("confirmed"), "{sent:?}");
    assert_eq!(fx.count("status = 'PUBLISHED'").await, 2);
    notifications.finish().await;
    fx.finish().await;
}

#[tokio::test]
async fn a_relay_crash_publishes_a_batch_twice_and_each_customer_is_still_notified_once() {
    let fx = Fixture::with_service("relay-e2e-crash", &kubesaga_testkit::redis_url(), &kubesaga_order::MIGRATOR).await;
    let notifications = Notifications::start(&format!("{}order", fx.prefix)).await;
    // Three orders approved and cancelled before the relay starts, so its first claim takes all six events, and the
    // operator dies after publishing them, before marking any.
    let approved = [Uuid::new_v4(), Uuid::new_v4()];
    let cancelled = Uuid::new_v4();
    for (id, transition) in
        [(approved[0], Transition::Approve), (approved[1], Transition::Approve), (cancelled, Transition::Cancel)]
    {
        orders::create(&fx.pool, id, &new_order(&format!("{id}@example.com")), "shop/checkout").await.expect("create");
        orders::transition(&fx.pool, id, transition).await.expect("transition");
    }
    let mut operator = fx.operator_with_env(&[], &[("KUBESAGA_FAULT_INJECTION", "relay-crash-after-publish")]);
    fx.create_relay("order-outbox", json!({"processingTimeout": "1s"})).await;
    operator.wait_exit(Duration::from_secs(30)).await;
    operator.restart();

    eventually(Duration::from_secs(30), "every event published after recovery", || async {
        fx.count("status = 'PUBLISHED'").await == 6
    })
    .await;
    let entries = fx.wait_for_entries("order", 6).await;
    eventually(Duration::from_secs(30), "every distinct event processed", || async {
        notifications.processed().await == 6
    })
    .await;
    // The consumer has read the redelivered copies too once the stream's last entry is processed; wait for that
    // entry's id to be known before counting messages.
    let last = fx.entries("order").await.last().map(|e| e.event_id.clone()).expect("entries");
    eventually(Duration::from_secs(30), "the last stream entry processed", || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM processed_events WHERE event_id = $1")
            .bind(&last)
            .fetch_one(&notifications.pool)
            .await
            .expect("count")
            == 1
    })
    .await;
    assert!(entries.len() >= 6, "at least once on the stream");
    for id in approved.iter().chain([&cancelled]) {
        assert_eq!(notifications.about(*id).await.len(), 1, "one message for order {id}");
    }
    notifications.finish().await;
    fx.finish().await;
}
