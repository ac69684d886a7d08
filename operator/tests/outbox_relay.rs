#![allow(clippy::expect_used, clippy::unwrap_used)]
//! The OutboxRelay on the real API server, Postgres and Redis, with the operator as a process: what a commit
//! becomes on the stream, and what crashes, outages, poison rows, a second relay, retention and stale rows do.

mod relay_support;

use std::{collections::HashMap, time::Duration};

use kubesaga_operator::crd::OutboxRelay;
use kubesaga_testkit::{RedisServer, wait_for};
use relay_support::{Fixture, condition, eventually};
use serde_json::json;

#[tokio::test]
async fn committed_events_reach_the_stream_in_order_and_rolled_back_ones_never_do() {
    let fx = Fixture::new("relay-basic", &kubesaga_testkit::redis_url()).await;
    let operator = fx.operator(&[]);
    fx.create_relay("orders", json!({})).await;

    let a1 = fx.insert("order", "a", "OrderCreated").await;
    let b1 = fx.insert("order", "b", "OrderCreated").await;
    let a2 = fx.insert("order", "a", "OrderApproved").await;
    fx.insert_rolled_back("order", "c", "OrderCreated").await;

    let entries = fx.wait_for_entries("order", 3).await;
    let ids: Vec<_> = entries.iter().map(|e| e.event_id.clone()).collect();
    assert_eq!(ids, [a1, b1, a2].map(|id| id.to_string()), "commit order, nothing rolled back");
    let first = &entries[0];
    assert_eq!(
        (first.event_type.as_str(), first.aggregate_type.as_str(), first.aggregate_id.as_str()),
        ("OrderCreated", "order", "a")
    );
    assert_eq!(serde_json::from_str::<serde_json::Value>(&first.payload).unwrap()["aggregate"], "a");
    assert!(first.headers.contains_key("saga_id"), "headers travel as fields: {:?}", first.headers);
    assert!(!first.created_at.is_empty());
    eventually(Duration::from_secs(10), "every row PUBLISHED", || async {
        fx.count("status = 'PUBLISHED'").await == 3
    })
    .await;

    let relay = wait_for(&fx.relays(), "orders", Duration::from_secs(30), |r: &OutboxRelay| {
        r.status.as_ref().is_some_and(|s| s.published_total == Some(3) && s.pending == Some(0))
    })
    .await;
    let status = relay.status.unwrap();
    assert_eq!(condition(&status, "Ready"), ("True".into(), "Relaying".into()));
    assert_eq!(condition(&status, "Degraded"), ("False".into(), "AsExpected".into()));
    assert_eq!(status.observed_generation, relay.metadata.generation);
    assert!(status.last_published_at.is_some());
    assert!(fx.metric(&operator, "kubesaga_outbox_published_total", "orders").await >= 3.0);
    fx.finish().await;
}

#[tokio::test]
async fn a_relay_killed_mid_batch_is_recovered_and_every_event_is_published_at_least_once() {
    let fx = Fixture::new("relay-crash", &kubesaga_testkit::redis_url()).await;
    let mut operator = fx.operator_with_env(&[], &[("KUBESAGA_FAULT_INJECTION", "relay-crash-after-publish")]);
    // Five rows committed together: the first claim takes them all, publishes them, and the process dies before
    // marking any.
    let ids = fx.insert_many("order", &["a", "b", "c", "d", "e"], "OrderCreated").await;
    fx.create_relay("orders", json!({"processingTimeout": "1s"})).await;
    operator.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(fx.count("status = 'PROCESSING'").await, 5, "the crash left the batch claimed");
    assert_eq!(fx.wait_for_entries("order", 5).await.len(), 5, "the batch reached the stream before the crash");

    operator.restart();
    eventually(Duration::from_secs(30), "every row PUBLISHED after zombie recovery", || async {
        fx.count("status = 'PUBLISHED'").await == 5
    })
    .await;
    let entries = fx.wait_for_entries("order", 10).await;
    let mut times: HashMap<String, usize> = HashMap::new();
    for entry in &entries {
        *times.entry(entry.event_id.clone()).or_default() += 1;
    }
    for id in &ids {
        assert_eq!(times.get(&id.to_string()), Some(&2), "published before the crash and again after recovery: {id}");
    }
    assert!(fx.metric(&operator, "kubesaga_outbox_recovered_total", "orders").await >= 5.0);
    assert!(operator.log().contains("went back to PENDING"), "recovery is logged");
    fx.finish().await;
}

#[tokio::test]
async fn while_redis_is_down_rows_stay_pending_without_spending_attempts_and_are_published_when_it_returns() {
    let mut redis = RedisServer::start().await;
    let fx = Fixture::new("relay-outage", &redis.url).await;
    let operator = fx.operator(&[]);
    fx.create_relay("orders", json!({"maxAttempts": 2})).await;
    let before = fx.insert("order", "a", "OrderCreated").await;
    fx.wait_for_entries("order", 1).await;

    redis.stop();
    let during = fx.insert_many("order", &["b", "c", "d"], "OrderCreated").await;
    let relay = wait_for(&fx.relays(), "orders", Duration::from_secs(30), |r: &OutboxRelay| {
        r.status.as_ref().is_some_and(|s| condition(s, "Ready") == ("False".into(), "RedisUnavailable".into()))
    })
    .await;
    assert!(relay.status.unwrap().last_error.is_some_and(|e| e.contains("Redis")));
    eventually(Duration::from_secs(10), "a Warning Event about the outage", || async {
        fx.events("RedisUnavailable").await >= 1
    })
    .await;
    // Several failed rounds later (the relay retries at growing intervals) the rows are still waiting, no attempt
    // spent: with maxAttempts 2 a spent attempt per round would have dead-lettered them by now.
    eventually(Duration::from_secs(30), "three failed rounds logged", || async {
        operator.log().matches("relay round failed").count() >= 3
    })
    .await;
    assert_eq!(fx.count("status = 'PENDING' AND attempts = 0").await, 3);
    assert_eq!(fx.dead_letters().await, 0);

    redis.restart().await;
    let entries = fx.wait_for_entries("order", 3).await;
    let published: Vec<_> = entries.iter().map(|e| e.event_id.clone()).collect();
    assert_eq!(published, during.map(|id| id.to_string()), "the empty new Redis gets exactly the waiting rows");
    assert_eq!(fx.count("status = 'PUBLISHED'").await, 4, "{before} and the three waiting rows");
    wait_for(&fx.relays(), "orders", Duration::from_secs(30), |r: &OutboxRelay| {
        r.status.as_ref().is_some_and(|s| condition(s, "Ready").0 == "True" && s.last_error.is_none())
    })
    .await;
    fx.finish().await;
}

#[tokio::test]
async fn a_row_redis_rejects_is_dead_lettered_after_max_attempts_with_an_event_and_a_metric() {
    let fx = Fixture::new("relay-poison", &kubesaga_testkit::redis_url()).await;
    // The stream key of aggregate type "poison" holds a string, so every XADD to it fails with WRONGTYPE.
    fx.set_plain_key("poison").await;
    let operator = fx.operator(&[]);
    fx.create_relay("orders", json!({"maxAttempts": 3, "backoff": {"initial": "100ms", "max": "200ms"}})).await;
    let poison = fx.insert("poison", "p", "Broken").await;
    let healthy = fx.insert("order", "h", "OrderCreated").await;

    assert_eq!(
        fx.wait_for_entries("order", 1).await[0].event_id,
        healthy.to_string(),
        "a poison row blocks no other aggregate"
    );
    eventually(Duration::from_secs(30), "the poison row in the dead-letter table", || async {
        fx.dead_letters().await == 1
    })
    .await;
    let (id, attempts, error): (uuid::Uuid, i32, String) =
        sqlx::query_as("SELECT id, attempts, last_error FROM outbox_dead_letter").fetch_one(&fx.pool).await.unwrap();
    assert_eq!((id, attempts), (poison, 3));
    assert!(error.contains("WRONGTYPE"), "the last error is kept: {error}");
    assert_eq!(fx.count("true").await, 1, "only the healthy row is left in the outbox");
    eventually(Duration::from_secs(10), "a Warning Event naming the row", || async {
        fx.events("DeadLettered").await >= 1
    })
    .await;
    assert_eq!(fx.metric(&operator, "kubesaga_outbox_dead_lettered_total", "orders").await, 1.0);
    assert!(fx.metric(&operator, "kubesaga_outbox_publish_failures_total", "orders").await >= 3.0);
    wait_for(&fx.relays(), "orders", Duration::from_secs(30), |r: &OutboxRelay| {
        r.status.as_ref().is_some_and(|s| s.dead_lettered == Some(1))
    })
    .await;
    fx.finish().await;
}

#[tokio::test]
async fn two_relays_on_one_table_keep_per_aggregate_order_and_publish_each_row_once() {
    let fx = Fixture::new("relay-pair", &kubesaga_testkit::redis_url()).await;
    let operator = fx.operator(&[]);
    // A backlog both relays start on: 1,000 aggregates with 10 events each, round robin, so concurrent batches
    // hold different aggregates and both relays get work; then one hot aggregate with 500 consecutive events, whose
    // batches are all one aggregate's and must still go out in order.
    const TOTAL: i64 = 1000 * 10 + 500;
    fx.insert_backlog("agg", 1000, 10, true).await;
    fx.insert_backlog("hot", 1, 500, false).await;
    fx.create_relay("first", json!({"batchSize": 25})).await;
    fx.create_relay("second", json!({"batchSize": 25})).await;

    eventually(Duration::from_secs(60), "every row PUBLISHED", || async {
        fx.count("status = 'PUBLISHED'").await == TOTAL
    })
    .await;
    let entries = fx.entries("order").await;
    assert_eq!(entries.len(), TOTAL as usize, "no row published twice");
    let seq: HashMap<String, i64> = sqlx::query_as::<_, (uuid::Uuid, i64)>("SELECT id, seq FROM outbox")
        .fetch_all(&fx.pool)
        .await
        .unwrap()
        .into_iter()
        .map(|(id, seq)| (id.to_string(), seq))
        .collect();
    let mut last: HashMap<&str, i64> = HashMap::new();
    for entry in &entries {
        let s = seq[&entry.event_id];
        let previous = last.insert(entry.aggregate_id.as_str(), s);
        assert!(previous.is_none_or(|p| p < s), "{} out of order: seq {s} after {previous:?}", entry.aggregate_id);
    }
    let first = fx.metric(&operator, "kubesaga_outbox_published_total", "first").await;
    let second = fx.metric(&operator, "kubesaga_outbox_published_total", "second").await;
    assert_eq!(first + second, TOTAL as f64);
    assert!(first > 0.0 && second > 0.0, "both relays took part: {first} + {second}");
    fx.finish().await;
}

#[tokio::test]
async fn published_rows_are_deleted_after_the_retention() {
    let fx = Fixture::new("relay-retention", &kubesaga_testkit::redis_url()).await;
    let operator = fx.operator(&[]);
    fx.create_relay("orders", json!({"publishedRetention": "1s"})).await;
    fx.insert_many("order", &["a", "b", "c"], "OrderCreated").await;
    fx.wait_for_entries("order", 3).await;
    eventually(Duration::from_secs(30), "the published rows deleted", || async { fx.count("true").await == 0 }).await;
    assert_eq!(fx.metric(&operator, "kubesaga_outbox_purged_total", "orders").await, 3.0);
    fx.finish().await;
}

#[tokio::test]
async fn a_stale_pending_row_raises_degraded_and_draining_it_clears_it() {
    let fx = Fixture::new("relay-stale", &kubesaga_testkit::redis_url()).await;
    let operator = fx.operator(&[]);
    fx.create_relay("orders", json!({"pollInterval": "200ms", "stalePendingAfter": "2s"})).await;
    // A row committed ten minutes ago and held back by its backoff for an hour.
    let stuck = fx.insert_backdated("order", "a").await;

    let relay = wait_for(&fx.relays(), "orders", Duration::from_secs(30), |r: &OutboxRelay| {
        r.status.as_ref().is_some_and(|s| condition(s, "Degraded").0 == "True")
    })
    .await;
    let status = relay.status.unwrap();
    assert_eq!(condition(&status, "Degraded").1, "StalePending");
    assert_eq!(condition(&status, "Ready").0, "True", "stale rows degrade a relay that still works");
    assert!(status.oldest_pending_age.as_deref().is_some_and(|a| a.starts_with("10m")), "{status:?}");
    eventually(Duration::from_secs(10), "a StalePending Warning Event", || async {
        fx.events("StalePending").await >= 1
    })
    .await;
    assert_eq!(fx.metric(&operator, "kubesaga_outbox_stale", "orders").await, 1.0);

    sqlx::query("UPDATE outbox SET next_attempt_at = now()").execute(&fx.pool).await.unwrap();
    assert_eq!(fx.wait_for_entries("order", 1).await[0].event_id, stuck.to_string());
    let relay = wait_for(&fx.relays(), "orders", Duration::from_secs(30), |r: &OutboxRelay| {
        r.status.as_ref().is_some_and(|s| condition(s, "Degraded").0 == "False")
    })
    .await;
    assert_eq!(condition(relay.status.as_ref().unwrap(), "Degraded").1, "AsExpected");
    assert_eq!(fx.metric(&operator, "kubesaga_outbox_stale", "orders").await, 0.0);
    fx.finish().await;
}

#[tokio::test]
async fn a_relay_follows_its_resource_missing_secrets_spec_changes_and_deletion() {
    let fx = Fixture::new("relay-lifecycle", &kubesaga_testkit::redis_url()).await;
    let operator = fx.operator(&[]);
    fx.create_relay("orders", json!({"database": {"secretKeyRef": {"name": "late-db"}}})).await;
    let relay = wait_for(&fx.relays(), "orders", Duration::from_secs(30), |r: &OutboxRelay| {
        r.status.as_ref().is_some_and(|s| condition(s, "Ready") == ("False".into(), "SecretNotFound".into()))
    })
    .await;
    let message = relay.status.unwrap().conditions.into_iter().find(|c| c.type_ == "Ready").unwrap().message;
    assert!(message.contains("kubectl") && message.contains("late-db"), "the message says what to create: {message}");

    fx.create_secret("late-db", &fx.db.url).await;
    let first = fx.insert("order", "a", "OrderCreated").await;
    assert_eq!(fx.wait_for_entries("order", 1).await[0].event_id, first.to_string(), "relaying once the Secret exists");

    fx.patch_relay("orders", json!({"destination": {"streamPrefix": format!("{}v2.", fx.prefix)}})).await;
    let generation = fx.relays().get("orders").await.unwrap().metadata.generation;
    wait_for(&fx.relays(), "orders", Duration::from_secs(30), |r: &OutboxRelay| {
        r.status.as_ref().is_some_and(|s| s.observed_generation == generation)
    })
    .await;
    let second = fx.insert("order", "a", "OrderApproved").await;
    let moved = fx.wait_for_stream(&format!("{}v2.order", fx.prefix), 1).await;
    assert_eq!(moved[0].event_id, second.to_string(), "the restarted relay uses the new spec");

    fx.delete_relay("orders").await;
    eventually(Duration::from_secs(30), "the worker stopped", || async { operator.log().contains("relay stopped") })
        .await;
    fx.finish().await;
}

#[tokio::test]
async fn only_the_leader_relays_and_a_standby_takes_over_when_it_dies() {
    let fx = Fixture::new("relay-leader", &kubesaga_testkit::redis_url()).await;
    let mut first = fx.operator(&[]);
    eventually(Duration::from_secs(30), "the first operator leads", || async {
        first.log().contains("became the leader")
    })
    .await;
    let second = fx.operator(&[]);
    fx.create_relay("orders", json!({})).await;
    let before = fx.insert("order", "a", "OrderCreated").await;
    assert_eq!(fx.wait_for_entries("order", 1).await[0].event_id, before.to_string());
    eventually(Duration::from_secs(10), "the standby waiting for the Lease", || async {
        second.log().contains("waiting to become the leader")
    })
    .await;
    assert!(first.log().contains("starting the relay"));
    assert!(!second.log().contains("starting the relay"), "a standby runs no relay:\n{}", second.log());

    first.kill();
    eventually(Duration::from_secs(30), "the standby takes over", || async {
        second.log().contains("starting the relay")
    })
    .await;
    let after = fx.insert("order", "a", "OrderApproved").await;
    let entries = fx.wait_for_entries("order", 2).await;
    assert_eq!(
        entries.iter().map(|e| e.event_id.clone()).collect::<Vec<_>>(),
        [before, after].map(|id| id.to_string())
    );
    fx.finish().await;
}

#[tokio::test]
async fn a_rotated_secret_moves_the_relay_to_the_new_redis_without_a_restart() {
    let fx = Fixture::new("relay-rotate", &kubesaga_testkit::redis_url()).await;
    let operator = fx.operator(&[]);
    fx.create_relay("orders", json!({})).await;
    let before = fx.insert("order", "a", "OrderCreated").await;
    assert_eq!(fx.wait_for_entries("order", 1).await[0].event_id, before.to_string());

    let moved_to = RedisServer::start().await;
    fx.update_secret("redis", &moved_to.url).await;
    eventually(Duration::from_secs(60), "the relay noticing the new URL", || async {
        operator.log().contains("a Secret's URL changed")
    })
    .await;
    let after = fx.insert("order", "a", "OrderApproved").await;
    let mut redis =
        redis::Client::open(moved_to.url.as_str()).unwrap().get_multiplexed_async_connection().await.unwrap();
    let stream = format!("{}order", fx.prefix);
    eventually(Duration::from_secs(60), "the event on the new Redis", || {
        let mut redis = redis.clone();
        let stream = stream.clone();
        async move { redis::AsyncCommands::xlen::<_, usize>(&mut redis, &stream).await.unwrap_or(0) == 1 }
    })
    .await;
    assert_eq!(fx.entries("order").await.len(), 1, "{after} went to the new Redis only");
    let _: () = redis::AsyncCommands::del(&mut redis, &stream).await.unwrap();
    fx.finish().await;
}
