//! Bad input on every route is a problem+json naming what is wrong, and changes nothing.

mod common;

use axum::http::{Method, StatusCode};
use common::{TestApp, new_id, raw_request};
use serde_json::{Value, json};

/// A body over the 64 KiB the service accepts.
fn huge_body() -> Vec<u8> {
    let order_id = "x".repeat(100 * 1024);
    format!(r#"{{"orderId":"{order_id}","amountCents":1,"currency":"EUR","cardToken":"t"}}"#).into_bytes()
}

async fn expect_field(app: &TestApp, method: Method, path: &str, body: Value, field: &str) {
    let reply = app.call(method, path, Some(body.clone())).await;
    let problem = reply.problem(StatusCode::BAD_REQUEST, "validation");
    assert_eq!(problem["field"], field, "{body} -> {problem}");
}

async fn expect_raw(
    app: &TestApp,
    method: Method,
    path: &str,
    content_type: Option<&str>,
    body: Vec<u8>,
    status: StatusCode,
    kind: &str,
) -> Value {
    let reply = app.send(raw_request(method, path, content_type, body)).await;
    reply.problem(status, kind).clone()
}

#[tokio::test]
async fn authorize_rejects_bad_bodies_by_field_without_recording_anything() {
    let app = TestApp::start().await;
    let path = format!("/payments/{}", new_id());
    let valid = json!({"orderId": "o-1", "amountCents": 100, "currency": "EUR", "cardToken": "tok_visa"});
    let with = |field: &str, value: Value| {
        let mut body = valid.clone();
        body[field] = value;
        body
    };
    let without = |field: &str| {
        let mut body = valid.clone();
        body.as_object_mut().expect("object").remove(field);
        body
    };

    // Wrong types.
    expect_field(&app, Method::PUT, &path, with("amountCents", json!("ten")), "amountCents").await;
    expect_field(&app, Method::PUT, &path, with("amountCents", json!(1.5)), "amountCents").await;
    expect_field(&app, Method::PUT, &path, with("currency", json!(978)), "currency").await;
    expect_field(&app, Method::PUT, &path, with("orderId", json!(["o-1"])), "orderId").await;
    expect_field(&app, Method::PUT, &path, with("cardToken", json!(true)), "cardToken").await;
    // Missing (or null) fields.
    for field in ["orderId", "amountCents", "currency", "cardToken"] {
        expect_field(&app, Method::PUT, &path, without(field), field).await;
        expect_field(&app, Method::PUT, &path, with(field, Value::Null), field).await;
    }
    // Values that break the rules.
    expect_field(&app, Method::PUT, &path, with("amountCents", json!(0)), "amountCents").await;
    expect_field(&app, Method::PUT, &path, with("amountCents", json!(-100)), "amountCents").await;
    for currency in ["eur", "EURO", "", "E1R"] {
        expect_field(&app, Method::PUT, &path, with("currency", json!(currency)), "currency").await;
    }
    expect_field(&app, Method::PUT, &path, with("orderId", json!("   ")), "orderId").await;
    expect_field(&app, Method::PUT, &path, with("cardToken", json!("tok visa")), "cardToken").await;
    expect_field(&app, Method::PUT, &path, json!([valid.clone()]), "body").await;

    // Malformed, too large, not JSON.
    let json_type = Some("application/json");
    let problem = expect_raw(
        &app,
        Method::PUT,
        &path,
        json_type,
        b"{\"orderId\": ".to_vec(),
        StatusCode::BAD_REQUEST,
        "validation",
    )
    .await;
    assert_eq!(problem["field"], "body");
    expect_raw(&app, Method::PUT, &path, json_type, huge_body(), StatusCode::PAYLOAD_TOO_LARGE, "payload-too-large")
        .await;
    let body = serde_json::to_vec(&valid).expect("JSON");
    expect_raw(
        &app,
        Method::PUT,
        &path,
        None,
        body.clone(),
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported-media-type",
    )
    .await;
    expect_raw(
        &app,
        Method::PUT,
        &path,
        Some("text/plain"),
        body,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported-media-type",
    )
    .await;

    // Bad ids and a missing Idempotency-Key.
    for bad in ["/payments/a:b", "/payments/a%20b", &format!("/payments/{}", "x".repeat(201))] {
        expect_field(&app, Method::PUT, bad, valid.clone(), "id").await;
    }
    let unkeyed = axum::http::Request::put(&path)
        .header("content-type", "application/json")
        .body(axum::body::Body::from(serde_json::to_vec(&valid).expect("JSON")))
        .expect("request");
    app.send(unkeyed).await.problem(StatusCode::BAD_REQUEST, "idempotency-key-missing");

    assert_eq!(app.get(&path).await.status, StatusCode::NOT_FOUND);
    for count in [
        "SELECT count(*) FROM payments",
        "SELECT count(*) FROM gateway_ledger",
        "SELECT count(*) FROM outbox",
        "SELECT count(*) FROM payment_tombstones",
    ] {
        assert_eq!(app.count(count).await, 0, "{count}: nothing recorded");
    }
    app.finish().await;
}

#[tokio::test]
async fn capture_void_and_refund_reject_bad_bodies_without_changing_the_payment() {
    let app = TestApp::start().await;
    let id = new_id();
    let authorized = app.authorize(&id, 800, "tok_visa").await;
    assert_eq!(authorized.status, StatusCode::CREATED);

    let json_type = Some("application/json");
    for action in ["capture", "void", "refund"] {
        let path = format!("/payments/{id}/{action}");
        let problem = expect_raw(
            &app,
            Method::POST,
            &path,
            json_type,
            b"{\"amountCents\"".to_vec(),
            StatusCode::BAD_REQUEST,
            "validation",
        )
        .await;
        assert_eq!(problem["field"], "body");
        expect_raw(
            &app,
            Method::POST,
            &path,
            json_type,
            huge_body(),
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload-too-large",
        )
        .await;
        expect_raw(
            &app,
            Method::POST,
            &path,
            Some("text/plain"),
            b"{}".to_vec(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
        )
        .await;
        expect_field(&app, Method::POST, &path, json!("capture please"), "body").await;
        expect_field(&app, Method::POST, &format!("/payments/a:b/{action}"), json!({}), "id").await;
    }
    for action in ["capture", "refund"] {
        let path = format!("/payments/{id}/{action}");
        expect_field(&app, Method::POST, &path, json!({"amountCents": "800"}), "amountCents").await;
        expect_field(&app, Method::POST, &path, json!({"amountCents": 0}), "amountCents").await;
        expect_field(&app, Method::POST, &path, json!({"amountCents": -800}), "amountCents").await;
    }
    for action in ["void", "refund"] {
        let path = format!("/payments/{id}/{action}");
        expect_field(&app, Method::POST, &path, json!({"reason": 5}), "reason").await;
        expect_field(&app, Method::POST, &path, json!({"reason": " "}), "reason").await;
    }

    let payment = app.get(&format!("/payments/{id}")).await;
    assert_eq!(payment.body, authorized.body, "the payment did not change");
    assert_eq!(app.count("SELECT count(*) FROM outbox").await, 1, "only the authorization's event");
    assert_eq!(app.count("SELECT count(*) FROM gateway_ledger").await, 1, "only the authorization reached the gateway");
    app.finish().await;
}
