//! The fake gateway's own idempotency and switches: a retried call with one key charges once, also across a
//! restart of the service and when the service crashed between the gateway's answer and its own commit.

mod common;

use std::time::Duration;

use axum::http::{Method, StatusCode};
use common::{Settings, TestApp, authorize_body, new_id, new_key, settings};
use kubesaga_payment::{
    PaymentError,
    gateway::{Authorization, FakeGateway, GatewayConfig, Operation, Reply},
};

const CARD: Authorization<'static> = Authorization { amount_cents: 2500, currency: "EUR", card_token: "tok_ok" };

fn reference(reply: &Reply) -> &str {
    match reply {
        Reply::Approved { reference } | Reply::Declined { reference, .. } => reference,
    }
}

#[tokio::test]
async fn a_retried_authorization_charges_once_even_across_a_restart() {
    let app = TestApp::start().await;
    let id = new_id();
    let key = FakeGateway::key(&id, Operation::Authorize);

    // The first answer is lost on the way back; the caller retries with the same key.
    let first = app.gateway.authorize(&key, &CARD).await.expect("authorize");
    let again = app.gateway.authorize(&key, &CARD).await.expect("authorize again");
    assert!(matches!(first, Reply::Approved { .. }), "{first:?}");
    assert_eq!(again, first);
    // A restarted service has nothing in memory; the gateway still knows the key.
    let (restarted, gateway) = app.restarted();
    assert_eq!(gateway.authorize(&key, &CARD).await.expect("after restart"), first);

    // The service crashed before recording the payment; the saga's retry records it with the same authorization.
    let reply = common::send(
        &restarted,
        common::json_request(Method::PUT, &format!("/payments/{id}"), &new_key(), Some(authorize_body(2500, "tok_ok"))),
    )
    .await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
    assert_eq!(reply.body["gatewayRef"], reference(&first));

    let entries = app.gateway.entries(reference(&first)).await.expect("ledger");
    assert_eq!(entries.len(), 1, "charged once: {entries:?}");
    assert!(entries[0].approved);
    app.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_calls_with_one_key_charge_once() {
    let app = TestApp::with(Settings {
        gateway: GatewayConfig { latency: Duration::from_millis(20), ..GatewayConfig::instant() },
        ..settings()
    })
    .await;
    let key = FakeGateway::key(&new_id(), Operation::Authorize);
    let calls: Vec<_> = (0..8)
        .map(|_| {
            let (gateway, key) = (app.gateway.clone(), key.clone());
            tokio::spawn(async move { gateway.authorize(&key, &CARD).await.expect("authorize") })
        })
        .collect();
    let mut replies = Vec::new();
    for call in calls {
        replies.push(call.await.expect("task"));
    }
    assert!(replies.windows(2).all(|pair| pair[0] == pair[1]), "{replies:?}");
    assert_eq!(app.count("SELECT count(*) FROM gateway_ledger").await, 1);
    app.finish().await;
}

#[tokio::test]
async fn a_retried_capture_charges_once() {
    let app = TestApp::start().await;
    let id = new_id();
    let authorized = app.authorize(&id, 2500, "tok_ok").await;
    assert_eq!(authorized.status, StatusCode::CREATED, "{}", authorized.body);
    let reference = authorized.body["gatewayRef"].as_str().expect("gatewayRef").to_owned();

    // The gateway captured, but the service died before recording it: the gateway knows, the database does not.
    let capture_key = FakeGateway::key(&id, Operation::Capture);
    let captured = app.gateway.capture(&capture_key, &reference, 2500).await.expect("capture");
    assert_eq!(captured, Reply::Approved { reference: reference.clone() });
    assert_eq!(app.get(&format!("/payments/{id}")).await.body["status"], "AUTHORIZED");

    // The saga retries the capture (and retries again, with the same Idempotency-Key and with another).
    let path = format!("/payments/{id}/capture");
    let key = new_key();
    let first = app.call_with_key(Method::POST, &path, &key, None).await;
    assert_eq!((first.status, first.body["status"].as_str()), (StatusCode::OK, Some("CAPTURED")), "{}", first.body);
    let replayed = app.call_with_key(Method::POST, &path, &key, None).await;
    assert_eq!(replayed.header("idempotent-replayed"), Some("true"));
    assert_eq!(replayed.raw, first.raw);
    let other_key = app.call(Method::POST, &path, None).await;
    assert_eq!(other_key.body, first.body);

    let entries = app.gateway.entries(&reference).await.expect("ledger");
    let captures = entries.iter().filter(|entry| entry.operation == "capture").count();
    assert_eq!(captures, 1, "captured once: {entries:?}");
    assert_eq!(app.gateway.capture(&capture_key, &reference, 2500).await.expect("replay"), captured);
    app.finish().await;
}

#[tokio::test]
async fn a_key_reused_for_other_details_is_refused() {
    let app = TestApp::start().await;
    let key = FakeGateway::key(&new_id(), Operation::Authorize);
    app.gateway.authorize(&key, &CARD).await.expect("authorize");
    let other = Authorization { amount_cents: 9999, ..CARD };
    let err = app.gateway.authorize(&key, &other).await.expect_err("another amount under the same key");
    assert!(matches!(err, PaymentError::GatewayKeyReused { .. }), "{err}");

    // Through the API: the same payment id with another amount is a conflict, and nothing more is charged.
    let id = new_id();
    assert_eq!(app.authorize(&id, 2500, "tok_ok").await.status, StatusCode::CREATED);
    app.authorize(&id, 2600, "tok_ok").await.problem(StatusCode::CONFLICT, "invalid-state");
    assert_eq!(app.count("SELECT count(*) FROM gateway_ledger").await, 2);
    app.finish().await;
}

#[tokio::test]
async fn tok_fail_fails_transiently_and_records_nothing() {
    let app = TestApp::start().await;
    let id = new_id();
    let (path, key) = (format!("/payments/{id}"), new_key());
    for _ in 0..2 {
        // Not stored as the key's answer: the retry runs again, and fails again.
        let reply = app.call_with_key(Method::PUT, &path, &key, Some(authorize_body(100, "tok_fail"))).await;
        reply.problem(StatusCode::SERVICE_UNAVAILABLE, "unavailable");
        assert!(reply.header("retry-after").is_some());
        assert!(reply.header("idempotent-replayed").is_none());
    }
    assert_eq!(app.get(&path).await.status, StatusCode::NOT_FOUND);
    let gateway_key = FakeGateway::key(&id, Operation::Authorize);
    assert_eq!(app.gateway.entry(&gateway_key).await.expect("ledger"), None);
    assert_eq!(app.count("SELECT count(*) FROM outbox").await, 0);
    app.finish().await;
}

#[tokio::test]
async fn the_decline_switches_decline() {
    let app = TestApp::with(Settings {
        gateway: GatewayConfig { decline_threshold_cents: 50_000, ..GatewayConfig::instant() },
        ..settings()
    })
    .await;
    for (amount, token, reason) in
        [(100, "tok_decline", "card_declined"), (50_000, "tok_ok", "amount_over_limit"), (49_999, "tok_ok", "")]
    {
        let reply = app.authorize(&new_id(), amount, token).await;
        if reason.is_empty() {
            assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
        } else {
            assert_eq!(reply.problem(StatusCode::UNPROCESSABLE_ENTITY, "unprocessable")["reason"], reason);
        }
    }
    app.finish().await;
}

#[tokio::test]
async fn the_random_rates_apply() {
    let always_fails = TestApp::with(Settings {
        gateway: GatewayConfig { failure_rate: 1.0, ..GatewayConfig::instant() },
        ..settings()
    })
    .await;
    always_fails.authorize(&new_id(), 100, "tok_ok").await.problem(StatusCode::SERVICE_UNAVAILABLE, "unavailable");
    always_fails.finish().await;

    let always_declines = TestApp::with(Settings {
        gateway: GatewayConfig { decline_rate: 1.0, ..GatewayConfig::instant() },
        ..settings()
    })
    .await;
    let reply = always_declines.authorize(&new_id(), 100, "tok_ok").await;
    assert_eq!(reply.problem(StatusCode::UNPROCESSABLE_ENTITY, "unprocessable")["reason"], "insufficient_funds");
    always_declines.finish().await;
}
