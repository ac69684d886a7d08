//! Outbox events commit together with the payment change they describe, and not at all when it rolls back.

mod common;

use axum::http::{Method, StatusCode};
use common::{TestApp, new_id};
use kubesaga_payment::store::{self, NewPayment, PaymentStatus};
use serde_json::json;

fn new_payment(id: &str) -> NewPayment<'_> {
    NewPayment {
        id,
        order_id: "order-9",
        amount_cents: 300,
        currency: "USD",
        card_token: "tok_visa",
        status: PaymentStatus::Authorized,
        gateway_ref: Some("gw_test"),
        decline_reason: None,
    }
}

#[tokio::test]
async fn every_change_through_the_api_writes_its_event() {
    let app = TestApp::start().await;
    let (captured, voided, declined) = (new_id(), new_id(), new_id());
    assert_eq!(app.authorize(&captured, 500, "tok_visa").await.status, StatusCode::CREATED);
    assert_eq!(app.call(Method::POST, &format!("/payments/{captured}/capture"), None).await.status, StatusCode::OK);
    assert_eq!(app.call(Method::POST, &format!("/payments/{captured}/refund"), None).await.status, StatusCode::OK);
    assert_eq!(app.authorize(&voided, 500, "tok_visa").await.status, StatusCode::CREATED);
    let void =
        app.call(Method::POST, &format!("/payments/{voided}/void"), Some(json!({"reason": "out of stock"}))).await;
    assert_eq!(void.status, StatusCode::OK);
    assert_eq!(app.authorize(&declined, 500, "tok_decline").await.status, StatusCode::UNPROCESSABLE_ENTITY);

    let types = |events: Vec<(String, serde_json::Value, serde_json::Value)>| {
        events.into_iter().map(|(event_type, _, _)| event_type).collect::<Vec<_>>()
    };
    assert_eq!(types(app.events(&captured).await), ["PaymentAuthorized", "PaymentCaptured", "PaymentRefunded"]);
    assert_eq!(types(app.events(&declined).await), ["PaymentDeclined"]);
    let events = app.events(&voided).await;
    let (event_type, payload, headers) = &events[1];
    assert_eq!(event_type, "PaymentVoided");
    assert_eq!((payload["paymentId"].as_str(), payload["status"].as_str()), (Some(voided.as_str()), Some("VOIDED")));
    assert_eq!(payload["reason"], "out of stock");
    assert!(payload.get("cardToken").is_none());
    assert_eq!(headers["saga_id"], "shop/checkout-test");

    // Answers that change nothing write nothing: repeats, refusals, validation failures.
    let before = app.count("SELECT count(*) FROM outbox").await;
    assert_eq!(app.call(Method::POST, &format!("/payments/{voided}/void"), None).await.status, StatusCode::OK);
    assert_eq!(app.call(Method::POST, &format!("/payments/{voided}/capture"), None).await.status, StatusCode::CONFLICT);
    assert_eq!(app.authorize(&declined, 500, "tok_decline").await.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(app.authorize(&new_id(), 0, "tok_visa").await.status, StatusCode::BAD_REQUEST);
    assert_eq!(app.count("SELECT count(*) FROM outbox").await, before);
    app.finish().await;
}

#[tokio::test]
async fn the_event_commits_with_the_payment_and_rolls_back_with_it() {
    let app = TestApp::start().await;
    let id = new_id();

    let mut tx = app.pool.begin().await.expect("begin");
    let payment = store::insert(&mut tx, &new_payment(&id), None).await.expect("insert").expect("new payment");
    let inside: (i64,) = sqlx::query_as("SELECT count(*) FROM outbox WHERE aggregate_id = $1")
        .bind(&id)
        .fetch_one(&mut *tx)
        .await
        .expect("count");
    assert_eq!(inside.0, 1, "the event is written in the same transaction");
    tx.rollback().await.expect("rollback");
    assert_eq!(store::find(&app.pool, &id).await.expect("find"), None);
    assert!(app.events(&id).await.is_empty(), "rolled back with the payment");

    let mut tx = app.pool.begin().await.expect("begin");
    store::insert(&mut tx, &new_payment(&id), Some("shop/s1")).await.expect("insert").expect("new payment");
    tx.commit().await.expect("commit");
    assert_eq!(store::find(&app.pool, &id).await.expect("find").map(|p| p.status), Some(payment.status));
    let events = app.events(&id).await;
    assert_eq!(events.len(), 1);
    assert_eq!((events[0].0.as_str(), &events[0].2["saga_id"]), ("PaymentAuthorized", &json!("shop/s1")));

    // A transition that commits brings its event; one rolled back leaves neither.
    let mut tx = app.pool.begin().await.expect("begin");
    let captured = store::transition(&mut tx, &id, 1, PaymentStatus::Captured, None, None).await.expect("transition");
    assert_eq!(captured.map(|p| (p.status, p.version)), Some((PaymentStatus::Captured, 2)));
    tx.rollback().await.expect("rollback");
    assert_eq!(
        store::find(&app.pool, &id).await.expect("find").map(|p| (p.status, p.version)),
        Some((PaymentStatus::Authorized, 1))
    );
    assert_eq!(app.events(&id).await.len(), 1);

    let mut tx = app.pool.begin().await.expect("begin");
    store::transition(&mut tx, &id, 1, PaymentStatus::Voided, Some("test"), None)
        .await
        .expect("transition")
        .expect("applies");
    tx.commit().await.expect("commit");
    assert_eq!(
        app.events(&id).await.iter().map(|e| e.0.as_str()).collect::<Vec<_>>(),
        ["PaymentAuthorized", "PaymentVoided"]
    );
    app.finish().await;
}

#[tokio::test]
async fn a_stale_version_changes_nothing_and_writes_no_event() {
    let app = TestApp::start().await;
    let id = new_id();
    let mut tx = app.pool.begin().await.expect("begin");
    store::insert(&mut tx, &new_payment(&id), None).await.expect("insert");
    tx.commit().await.expect("commit");

    let mut first = app.pool.begin().await.expect("begin");
    store::transition(&mut first, &id, 1, PaymentStatus::Captured, None, None)
        .await
        .expect("transition")
        .expect("applies");
    first.commit().await.expect("commit");
    // A writer that read version 1 before the capture loses.
    let mut stale = app.pool.begin().await.expect("begin");
    let lost = store::transition(&mut stale, &id, 1, PaymentStatus::Voided, None, None).await.expect("transition");
    assert_eq!(lost, None);
    stale.commit().await.expect("commit");

    let payment = store::find(&app.pool, &id).await.expect("find").expect("payment");
    assert_eq!((payment.status, payment.version), (PaymentStatus::Captured, 2));
    assert_eq!(
        app.events(&id).await.iter().map(|e| e.0.as_str()).collect::<Vec<_>>(),
        ["PaymentAuthorized", "PaymentCaptured"]
    );
    app.finish().await;
}
