//! The API server rejects every invalid OutboxRelay with a message naming the field (docs/outbox-relay.md lists the
//! rules), applied with `kubectl` as a user would; a minimal relay is accepted and comes back with every default.

#![allow(clippy::expect_used, clippy::unwrap_used)] // test code: a panic is the failure report

use kube::api::PostParams;
use kubesaga_operator::crd::OutboxRelay;
use kubesaga_testkit::{TestNamespace, client, install_crds, kubectl_apply};
use serde_json::{Value, json};

async fn setup(prefix: &str) -> TestNamespace {
    let client = client().await;
    let crds: Vec<_> = kubesaga_operator::crd::all().into_iter().map(|(_, crd)| crd).collect();
    install_crds(&client, &crds).await;
    TestNamespace::create(&client, prefix).await
}

/// The smallest valid spec with `changes` merged in at the top level (`null` removes a field).
fn relay(name: &str, changes: Value) -> Value {
    let mut spec = json!({
        "database": {"secretKeyRef": {"name": "order-db"}},
        "destination": {"redis": {"secretKeyRef": {"name": "redis"}}, "streamPrefix": "events."},
    });
    for (key, value) in changes.as_object().unwrap() {
        if value.is_null() {
            spec.as_object_mut().unwrap().remove(key);
        } else {
            spec[key] = value.clone();
        }
    }
    json!({"apiVersion": "kubesaga.dev/v1alpha1", "kind": "OutboxRelay", "metadata": {"name": name}, "spec": spec})
}

#[tokio::test]
async fn a_minimal_relay_is_accepted_with_every_default_filled_in() {
    let ns = setup("relay-valid").await;
    let object: OutboxRelay = serde_json::from_value(relay("minimal", json!({}))).unwrap();
    let created = ns.api::<OutboxRelay>().create(&PostParams::default(), &object).await.expect("accepted");
    let spec = serde_json::to_value(&created.spec).unwrap();
    for (field, default) in [
        ("table", json!("outbox")),
        ("deadLetterTable", json!("outbox_dead_letter")),
        ("batchSize", json!(100)),
        ("pollInterval", json!("1s")),
        ("listenNotify", json!(true)),
        ("processingTimeout", json!("30s")),
        ("maxAttempts", json!(10)),
        ("backoff", json!({"initial": "1s", "max": "5m"})),
        ("publishedRetention", json!("24h")),
        ("stalePendingAfter", json!("5m")),
    ] {
        assert_eq!(spec[field], default, "{field}");
    }
    assert_eq!(spec["database"]["secretKeyRef"]["key"], "url");
    ns.delete().await;
}

#[tokio::test]
async fn every_invalid_relay_is_rejected_naming_the_field() {
    let ns = setup("relay-invalid").await;
    let redis = json!({"secretKeyRef": {"name": "redis"}});
    let cases = [
        ("no-database", json!({"database": null}), "spec.database: Required value"),
        ("bad-table", json!({"table": "Outbox; DROP"}), "spec.table: Invalid value"),
        (
            "same-tables",
            json!({"deadLetterTable": "outbox"}),
            "spec.deadLetterTable: Invalid value: must differ from table",
        ),
        (
            "two-streams",
            json!({"destination": {"redis": redis, "stream": "a", "streamPrefix": "b."}}),
            "spec.destination: Required value: set exactly one of stream",
        ),
        (
            "no-stream",
            json!({"destination": {"redis": redis}}),
            "spec.destination: Required value: set exactly one of stream",
        ),
        ("spaced-stream", json!({"destination": {"redis": redis, "stream": "a b"}}), "spec.destination.stream"),
        (
            "zero-maxlen",
            json!({"destination": {"redis": redis, "streamPrefix": "e.", "maxLen": 0}}),
            "spec.destination.maxLen",
        ),
        ("batch-zero", json!({"batchSize": 0}), "spec.batchSize"),
        ("batch-huge", json!({"batchSize": 10001}), "spec.batchSize"),
        ("attempts-zero", json!({"maxAttempts": 0}), "spec.maxAttempts"),
        ("bad-duration", json!({"pollInterval": "1 second"}), "spec.pollInterval"),
        (
            "zero-poll",
            json!({"pollInterval": "0s"}),
            "spec.pollInterval: Invalid value: \"0s\": must be longer than 0s and at most 1h",
        ),
        (
            "long-timeout",
            json!({"processingTimeout": "25h"}),
            "spec.processingTimeout: Invalid value: \"25h\": must be longer than 0s and at most 24h",
        ),
        (
            "backoff-order",
            json!({"backoff": {"initial": "10m", "max": "1m"}}),
            "spec.backoff.initial: Invalid value: must not be greater than max",
        ),
        ("long-retention", json!({"publishedRetention": "721h"}), "spec.publishedRetention: Invalid value"),
        (
            "stale-vs-poll",
            json!({"pollInterval": "10m", "stalePendingAfter": "5m"}),
            "spec.stalePendingAfter: Invalid value: must be longer than pollInterval",
        ),
        (
            "bad-secret",
            json!({"database": {"secretKeyRef": {"name": "Not_A_Name"}}}),
            "spec.database.secretKeyRef.name",
        ),
    ];
    let mut failures = Vec::new();
    for (name, changes, expected) in cases {
        let manifest = serde_json::to_string(&relay(name, changes)).unwrap();
        let (ok, stderr) = kubectl_apply(&ns.name, &manifest);
        if ok || !stderr.contains(expected) {
            failures.push(format!("{name}: expected rejection containing {expected:?}, got ok={ok}: {stderr}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    ns.delete().await;
}
