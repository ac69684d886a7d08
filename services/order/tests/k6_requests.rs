//! The checkout requests of `k6/requests/checkout.json`, the file the k6 scripts and the Helm chart's test send,
//! against the real order service (Postgres, Redis and the API server): the checkout is accepted with the status
//! the scripts expect, the order is readable where they poll it, the statuses they wait for are the ones the saga
//! ends an order with, and both paths are in the service's OpenAPI document.

#![allow(clippy::expect_used, clippy::unwrap_used)] // test code: a panic is the failure report

use axum::{
    Router,
    body::Body,
    http::{Request, StatusCode},
};
use kube::Api;
use kubesaga_operator::crd::{InputValue, Saga};
use kubesaga_order::api::ApiDoc;
use serde_json::{Value, json};
use tower::ServiceExt;
use utoipa::OpenApi;

mod common;

/// The shared request shapes; a change there that the service does not accept fails this test.
const REQUESTS: &str = include_str!("../../../k6/requests/checkout.json");

fn requests() -> Value {
    serde_json::from_str(REQUESTS).expect("k6/requests/checkout.json is JSON")
}

fn text<'a>(value: &'a Value, pointer: &str) -> &'a str {
    value.pointer(pointer).and_then(Value::as_str).unwrap_or_else(|| panic!("checkout.json has no string {pointer}"))
}

/// Sends `method path` with `headers` (a JSON object) and `body`; the status and the JSON answer.
async fn send(
    app: &Router,
    method: &str,
    path: &str,
    headers: Option<&Value>,
    body: Option<&Value>,
) -> (StatusCode, Value) {
    let mut request = Request::builder().method(method).uri(path);
    for (name, value) in headers.and_then(Value::as_object).into_iter().flatten() {
        request = request.header(name, value.as_str().expect("header values are strings"));
    }
    let body = body.map_or_else(Body::empty, |b| Body::from(b.to_string()));
    let response = app.clone().oneshot(request.body(body).unwrap()).await.unwrap();
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

/// A path template with its placeholders' names left out: `/orders/{id}` and `/orders/{orderId}` are one path.
fn shape(path: &str) -> String {
    path.split('/')
        .map(|part| if part.starts_with('{') && part.ends_with('}') { "{}" } else { part })
        .collect::<Vec<_>>()
        .join("/")
}

/// The file's headers with `{idempotencyKey}` filled in.
fn headers_with_key(template: &Value, key: &str) -> Value {
    let mut headers = template.clone();
    for value in headers.as_object_mut().expect("headers is an object").values_mut() {
        *value = json!(value.as_str().unwrap().replace("{idempotencyKey}", key));
    }
    headers
}

#[tokio::test]
async fn the_load_test_checkout_is_accepted_and_its_order_polled_where_the_scripts_look() {
    let requests = requests();
    let checkout = &requests["checkout"];
    let order = &requests["order"];

    let service = common::service("order-k6").await;
    let (app, run, ns) = (&service.app, &service.run, &service.ns);

    // The paths and methods the scripts use are the service's (placeholder names aside: {orderId} is {id}).
    let openapi = serde_json::to_value(ApiDoc::openapi()).unwrap();
    for request in [checkout, order] {
        let (method, path) = (text(request, "/method").to_lowercase(), text(request, "/path"));
        let documented = openapi["paths"]
            .as_object()
            .unwrap()
            .iter()
            .any(|(documented, item)| shape(documented) == shape(path) && item[&method].is_object());
        assert!(documented, "{method} {path} is not in the order service's API");
        assert_eq!(text(request, "/service"), "order");
    }
    let pending = text(order, "/pendingStatus");
    let finals: Vec<&str> = order["finalStatuses"].as_array().unwrap().iter().map(|s| s.as_str().unwrap()).collect();

    // Paid with the good card and with the declined one (the helm test and DECLINE_RATIO send that one).
    let declined_token = text(checkout, "/declinedCardToken");
    let mut good = checkout["body"].clone();
    good["sku"] = json!(format!("{}-0", text(checkout, "/body/sku")));
    let mut declined = good.clone();
    declined["cardToken"] = json!(declined_token);
    let sagas: Api<Saga> = ns.api();
    let mut order_ids = Vec::new();
    for (i, body) in [&good, &declined].into_iter().enumerate() {
        let headers = headers_with_key(&checkout["headers"], &format!("k6-test-{run}-{i}"));
        let (status, accepted) =
            send(app, text(checkout, "/method"), text(checkout, "/path"), Some(&headers), Some(body)).await;
        assert_eq!(u64::from(status.as_u16()), checkout["expectedStatus"].as_u64().unwrap(), "{accepted}");
        let order_id = accepted["orderId"].as_str().expect("the answer has the orderId the scripts read").to_owned();

        let path = text(order, "/path").replace("{orderId}", &order_id);
        let (status, found) = send(app, text(order, "/method"), &path, None, None).await;
        assert_eq!(u64::from(status.as_u16()), order["expectedStatus"].as_u64().unwrap(), "{found}");
        assert_eq!(found["status"], pending, "{found}");
        for field in ["customerEmail", "sku", "quantity", "amountCents", "currency"] {
            assert_eq!(found[field], body[field], "{field} of {found}");
        }

        let saga = sagas.get(&format!("checkout-{order_id}")).await.expect("the checkout started its saga");
        assert_eq!(
            saga.spec.input.get("cardToken"),
            Some(&InputValue::String(body["cardToken"].as_str().unwrap().to_owned()))
        );
        order_ids.push(order_id);
    }

    // The saga ends an order by approving or cancelling it: the statuses the scripts wait for.
    for (order_id, step) in order_ids.iter().zip(["approve", "cancel"]) {
        let key = headers_with_key(&json!({"Idempotency-Key": "{idempotencyKey}"}), &format!("k6-{step}-{run}"));
        let (status, ended) = send(app, "POST", &format!("/orders/{order_id}/{step}"), Some(&key), None).await;
        assert_eq!(status, StatusCode::OK, "{ended}");
        let path = text(order, "/path").replace("{orderId}", order_id);
        let (_, found) = send(app, text(order, "/method"), &path, None, None).await;
        let status = found["status"].as_str().unwrap();
        assert!(finals.contains(&status), "{status} after {step} is not one of the final statuses {finals:?}");
    }

    service.done().await;
}
