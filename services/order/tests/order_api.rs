//! The order service's API against real Postgres, Redis and API server.

#![allow(clippy::expect_used, clippy::unwrap_used)] // test code: a panic is the failure report

use axum::http::StatusCode;
use kube::Api;
use kubesaga_operator::crd::{InputValue, Saga};

mod common;

use common::service;

const CHECKOUT: &str = r#"{"customerEmail":"ada@example.com","sku":"BOOK-1","quantity":2,"amountCents":4200,"currency":"EUR","cardToken":"tok_ok"}"#;

#[tokio::test]
async fn checkout_records_a_pending_order_and_starts_its_saga_once_per_key() {
    let service = service("order-api").await;
    let key = "checkout";
    let (status, accepted) = service.call("POST", "/checkout", Some(key), Some(CHECKOUT)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
    let order_id = accepted["orderId"].as_str().expect("orderId").to_owned();
    assert_eq!(accepted["saga"], format!("{}/checkout-{order_id}", service.ns.name));

    let (status, order) = service.call("GET", &format!("/orders/{order_id}"), None, None).await;
    assert_eq!((status, order["status"].as_str()), (StatusCode::OK, Some("PENDING")));
    assert_eq!(service.count("SELECT count(*) FROM outbox WHERE event_type = 'OrderCreated'").await, 1);

    let sagas: Api<Saga> = service.ns.api();
    let saga = sagas.get(&format!("checkout-{order_id}")).await.expect("the saga exists");
    assert_eq!(saga.spec.input.get("orderId"), Some(&InputValue::String(order_id.clone())));
    assert_eq!(saga.spec.input.get("amountCents"), Some(&InputValue::Int(4200)));
    assert_eq!(saga.spec.steps.len(), 6);

    // A repeat is replayed; even without the replay (another key path) the same order id is never reused twice.
    let (status, again) = service.call("POST", "/checkout", Some(key), Some(CHECKOUT)).await;
    assert_eq!((status, &again), (StatusCode::ACCEPTED, &accepted));
    assert_eq!(service.count("SELECT count(*) FROM orders").await, 1);
    assert_eq!(sagas.list(&Default::default()).await.expect("list").items.len(), 1);
    service.done().await;
}

#[tokio::test]
async fn saga_steps_create_approve_and_cancel_idempotently() {
    let service = service("order-api").await;
    let id = uuid::Uuid::new_v4();
    let body = r#"{"customerEmail":"a@b.c","sku":"A","quantity":1,"amountCents":100,"currency":"EUR"}"#;
    let path = format!("/orders/{id}");
    let put = |key: &'static str| service.call("PUT", &path, Some(key), Some(body));
    assert_eq!(put("k1").await.0, StatusCode::OK);
    // The same order created again under another key (checkout and the saga's first step) is the same order.
    let (status, order) = put("k2").await;
    assert_eq!((status, order["version"].as_i64()), (StatusCode::OK, Some(1)));
    let other = r#"{"customerEmail":"a@b.c","sku":"A","quantity":9,"amountCents":100,"currency":"EUR"}"#;
    let (status, problem) = service.call("PUT", &format!("/orders/{id}"), Some("k3"), Some(other)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{problem}");

    let (status, cancelled) = service.call("POST", &format!("/orders/{id}/cancel"), Some("c1"), None).await;
    assert_eq!((status, cancelled["status"].as_str()), (StatusCode::OK, Some("CANCELLED")));
    let (status, again) = service.call("POST", &format!("/orders/{id}/cancel"), Some("c2"), None).await;
    assert_eq!((status, again["status"].as_str()), (StatusCode::OK, Some("CANCELLED")));
    let (status, problem) = service.call("POST", &format!("/orders/{id}/approve"), Some("a1"), None).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(problem["type"], "https://kubesaga.dev/problems/invalid-state");
    assert_eq!(service.count("SELECT count(*) FROM outbox WHERE event_type = 'OrderCancelled'").await, 1);

    let unknown = uuid::Uuid::new_v4();
    let (status, nothing) = service.call("POST", &format!("/orders/{unknown}/cancel"), Some("c3"), None).await;
    assert_eq!((status, nothing["status"].as_str()), (StatusCode::OK, Some("NOT_FOUND")));
    let (status, _) = service.call("POST", &format!("/orders/{unknown}/approve"), Some("a2"), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    service.done().await;
}

#[tokio::test]
async fn bad_input_gets_a_problem_naming_the_field_and_changes_nothing() {
    let service = service("order-api").await;
    let cases: &[(&str, Option<&str>, u16, &str)] = &[
        ("{not json", Some("k"), 400, "body"),
        (
            r#"{"customerEmail":"a@b.c","sku":"A","quantity":"two","amountCents":1,"currency":"EUR","cardToken":"t"}"#,
            Some("k"),
            400,
            "quantity",
        ),
        (
            r#"{"customerEmail":"a@b.c","sku":"A","quantity":1,"currency":"EUR","cardToken":"t"}"#,
            Some("k"),
            400,
            "amountCents",
        ),
        (
            r#"{"customerEmail":"a@b.c","sku":"A","quantity":0,"amountCents":1,"currency":"EUR","cardToken":"t"}"#,
            Some("k"),
            400,
            "quantity",
        ),
        (
            r#"{"customerEmail":"a@b.c","sku":"A","quantity":1,"amountCents":-5,"currency":"EUR","cardToken":"t"}"#,
            Some("k"),
            400,
            "amountCents",
        ),
        (
            r#"{"customerEmail":"a@b.c","sku":"A","quantity":1,"amountCents":5,"currency":"euro","cardToken":"t"}"#,
            Some("k"),
            400,
            "currency",
        ),
        (
            r#"{"customerEmail":"nobody","sku":"A","quantity":1,"amountCents":5,"currency":"EUR","cardToken":"t"}"#,
            Some("k"),
            400,
            "customerEmail",
        ),
        (CHECKOUT, None, 400, ""),
    ];
    for (i, (body, key, status, field)) in cases.iter().enumerate() {
        let key = key.map(|k| format!("{k}-{i}"));
        let (got, problem) = service.call("POST", "/checkout", key.as_deref(), Some(body)).await;
        assert_eq!(got.as_u16(), *status, "case {i}: {problem}");
        assert!(
            problem["type"].as_str().is_some_and(|t| t.starts_with("https://kubesaga.dev/problems/")),
            "case {i}: {problem}"
        );
        if !field.is_empty() {
            assert_eq!(problem["field"], *field, "case {i}: {problem}");
        }
    }
    let huge = format!(
        r#"{{"customerEmail":"a@b.c","sku":"{}","quantity":1,"amountCents":5,"currency":"EUR","cardToken":"t"}}"#,
        "x".repeat(100_000)
    );
    let (status, problem) = service.call("POST", "/checkout", Some("huge"), Some(&huge)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{problem}");
    assert_eq!(service.count("SELECT count(*) FROM orders").await, 0);
    assert_eq!(service.count("SELECT count(*) FROM outbox").await, 0);
    service.done().await;
}
