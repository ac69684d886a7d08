//! The step target behaves like a well-behaved idempotent service and records what it was sent.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use kubesaga_testkit::{Behaviour, RequestOutcome, StepTarget};
use serde_json::{Value, json};

const PATIENCE: Duration = Duration::from_secs(10);

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().expect("reqwest client")
}

async fn send(
    client: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    key: Option<&str>,
    body: Option<Value>,
) -> reqwest::Result<reqwest::Response> {
    let mut request = client.request(method, url);
    if let Some(key) = key {
        request = request.header("Idempotency-Key", key);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    request.send().await
}

async fn post(target: &StepTarget, path: &str, key: &str, body: Value) -> (u16, Value) {
    let response =
        send(&client(), reqwest::Method::POST, &target.url(path), Some(key), Some(body)).await.expect("response");
    let status = response.status().as_u16();
    (status, response.json().await.expect("JSON body"))
}

fn outcomes(target: &StepTarget, path: &str) -> Vec<RequestOutcome> {
    target.requests_for(path).iter().map(|r| r.outcome).collect()
}

#[tokio::test]
async fn answers_any_method_and_path_with_the_default_success_body() {
    let target = StepTarget::start().await;
    let client = client();

    let response = send(&client, reqwest::Method::GET, &target.url("/anything?x=1"), None, None).await.expect("GET");
    assert_eq!(response.status(), 200);
    assert_eq!(response.json::<Value>().await.expect("body"), json!({"ok": true, "path": "/anything", "key": null}));

    let response =
        send(&client, reqwest::Method::DELETE, &target.url("a/b/c"), Some("k1"), None).await.expect("DELETE");
    assert_eq!(response.json::<Value>().await.expect("body"), json!({"ok": true, "path": "/a/b/c", "key": "k1"}));

    let requests = target.requests();
    assert_eq!(requests.len(), 2);
    assert_eq!((requests[0].method.as_str(), requests[0].path.as_str()), ("GET", "/anything"));
    assert_eq!(requests[0].query.as_deref(), Some("x=1"));
    assert_eq!(requests[1].method, "DELETE");
    assert_eq!(outcomes(&target, "/a/b/c"), [RequestOutcome::Executed(200)]);
    assert_eq!(target.executions("k1"), 1);
    assert_eq!(target.executions("unknown"), 0);
    assert_eq!(target.url("/x"), format!("http://{}/x", target.addr()));
}

#[tokio::test]
async fn records_the_saga_headers_the_body_and_the_arrival_time() {
    let target = StepTarget::start().await;
    let before = Instant::now();
    let response = client()
        .put(target.url("/reserve"))
        .header("Idempotency-Key", "uid-reserve-action")
        .header("X-Saga-Id", "shop/order-42")
        .header("X-Saga-Step", "reserve")
        .header("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
        .header("X-Custom", "yes")
        .json(&json!({"sku": "A-1", "qty": 2}))
        .send()
        .await
        .expect("PUT");
    assert_eq!(response.status(), 200);
    let after = Instant::now();

    let request = &target.requests_for("/reserve")[0];
    assert_eq!(request.method, "PUT");
    assert_eq!(request.idempotency_key.as_deref(), Some("uid-reserve-action"));
    assert_eq!(request.saga_id.as_deref(), Some("shop/order-42"));
    assert_eq!(request.saga_step.as_deref(), Some("reserve"));
    assert_eq!(request.traceparent.as_deref(), Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"));
    assert_eq!(request.header("x-custom"), Some("yes"));
    assert_eq!(request.header("X-CUSTOM"), Some("yes"));
    assert_eq!(request.header("content-type"), Some("application/json"));
    assert_eq!(request.body, Some(json!({"sku": "A-1", "qty": 2})));
    assert_eq!(serde_json::from_slice::<Value>(&request.raw_body).expect("raw JSON"), json!({"sku": "A-1", "qty": 2}));
    assert!(before <= request.received_at && request.received_at <= after);
}

#[tokio::test]
async fn a_body_that_is_not_json_is_kept_raw() {
    let target = StepTarget::start().await;
    client().post(target.url("/text")).body("plain words").send().await.expect("POST");
    let request = &target.requests()[0];
    assert_eq!(request.body, None);
    assert_eq!(request.raw_body, b"plain words");
}

#[tokio::test]
async fn replays_an_executed_key_without_executing_it_again() {
    let target = StepTarget::start().await;
    target.script("/charge", [Behaviour::ok(json!({"paymentId": "p-1"})), Behaviour::ok(json!({"paymentId": "p-2"}))]);
    let expected = json!({"ok": true, "path": "/charge", "key": "k", "paymentId": "p-1"});

    assert_eq!(post(&target, "/charge", "k", json!({"amount": 5})).await, (200, expected.clone()));
    let replay = send(&client(), reqwest::Method::POST, &target.url("/charge"), Some("k"), Some(json!({"amount": 5})))
        .await
        .expect("retry");
    assert_eq!(replay.headers().get("idempotent-replayed").map(|v| v.as_bytes()), Some(&b"true"[..]));
    assert_eq!(replay.json::<Value>().await.expect("body"), expected);

    assert_eq!(target.executions("k"), 1);
    assert_eq!(outcomes(&target, "/charge"), [RequestOutcome::Executed(200), RequestOutcome::Replayed(200)]);
    // The replay did not use up the second scripted behaviour.
    assert_eq!(post(&target, "/charge", "k2", json!({"amount": 5})).await.1["paymentId"], "p-2");
    assert_eq!(target.keys_executed(), ["k", "k2"]);
}

#[tokio::test]
async fn refuses_a_key_reused_for_a_different_request() {
    let target = StepTarget::start().await;
    assert_eq!(post(&target, "/charge", "k", json!({"amount": 5})).await.0, 200);

    let (status, body) = post(&target, "/charge", "k", json!({"amount": 6})).await;
    assert_eq!(status, 422);
    assert_eq!(body["executed"], json!({"method": "POST", "path": "/charge", "body": {"amount": 5}}));
    assert_eq!(post(&target, "/refund", "k", json!({"amount": 5})).await.0, 422);

    assert_eq!(target.executions("k"), 1);
    assert_eq!(outcomes(&target, "/charge"), [RequestOutcome::Executed(200), RequestOutcome::KeyReused]);
    assert_eq!(outcomes(&target, "/refund"), [RequestOutcome::KeyReused]);
}

#[tokio::test]
async fn scripted_failures_do_not_execute_and_the_retry_that_succeeds_does() {
    let target = StepTarget::start().await;
    target.script(
        "/reserve",
        [
            Behaviour::status(503),
            Behaviour::status(429).header("Retry-After", "1"),
            Behaviour::respond(400, json!({"title": "Out of stock"})),
            Behaviour::ok(json!({"reservationId": "r-1"})).header("X-Served-By", "target"),
        ],
    );
    let client = client();
    let url = target.url("/reserve");
    let attempt = || send(&client, reqwest::Method::POST, &url, Some("k"), Some(json!({})));

    let response = attempt().await.expect("first");
    assert_eq!(response.status(), 503);
    assert_eq!(response.json::<Value>().await.expect("body"), json!({"error": "scripted 503", "path": "/reserve"}));
    let response = attempt().await.expect("second");
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers().get("retry-after").map(|v| v.as_bytes()), Some(&b"1"[..]));
    let response = attempt().await.expect("third");
    assert_eq!(response.status(), 400);
    assert_eq!(response.json::<Value>().await.expect("body"), json!({"title": "Out of stock"}));
    assert_eq!(target.executions("k"), 0);

    let response = attempt().await.expect("fourth");
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers().get("x-served-by").map(|v| v.as_bytes()), Some(&b"target"[..]));
    assert_eq!(
        response.json::<Value>().await.expect("body"),
        json!({"ok": true, "path": "/reserve", "key": "k", "reservationId": "r-1"})
    );
    assert_eq!(target.executions("k"), 1);
    assert_eq!(
        outcomes(&target, "/reserve"),
        [
            RequestOutcome::Failed(503),
            RequestOutcome::Failed(429),
            RequestOutcome::Failed(400),
            RequestOutcome::Executed(200)
        ]
    );
    assert_eq!(attempt().await.expect("fifth").status(), 200);
    assert_eq!(target.executions("k"), 1);
}

#[tokio::test]
async fn scripts_are_per_path_whatever_the_method_and_the_query() {
    let target = StepTarget::start().await;
    target.script("/a", [Behaviour::status(500)]);
    let client = client();
    let status = |method: reqwest::Method, path: &'static str| {
        let client = &client;
        let url = target.url(path);
        async move { send(client, method, &url, None, None).await.expect("response").status().as_u16() }
    };
    assert_eq!(status(reqwest::Method::GET, "/b").await, 200);
    assert_eq!(status(reqwest::Method::PUT, "/a?attempt=1").await, 500);
    assert_eq!(status(reqwest::Method::GET, "/a?attempt=2").await, 200);
}

#[tokio::test]
async fn default_response_answers_once_the_script_runs_out() {
    let target = StepTarget::start().await;
    target.default_response("/d", 201, json!({"id": "x"}));
    target.script("/d", [Behaviour::status(502)]);
    target.default_response("/e", 500, json!({"error": "down"}));

    assert_eq!(post(&target, "/d", "k1", json!({})).await.0, 502);
    assert_eq!(
        post(&target, "/d", "k2", json!({})).await,
        (201, json!({"ok": true, "path": "/d", "key": "k2", "id": "x"}))
    );
    assert_eq!(post(&target, "/e", "k3", json!({})).await, (500, json!({"error": "down"})));
    assert_eq!(target.keys_executed(), ["k2"]);
}

#[tokio::test]
async fn a_success_body_that_is_not_an_object_replaces_the_default() {
    let target = StepTarget::start().await;
    target.script("/list", [Behaviour::ok(json!([1, 2]))]);
    assert_eq!(post(&target, "/list", "k", json!({})).await, (200, json!([1, 2])));
}

#[tokio::test]
async fn a_delayed_request_executes_when_its_delay_ends_even_after_the_client_gave_up() {
    let target = StepTarget::start().await;
    target.script("/slow", [Behaviour::ok(json!({"n": 1})).after(Duration::from_millis(800))]);
    let client = client();

    let started = Instant::now();
    let err = client
        .post(target.url("/slow"))
        .header("Idempotency-Key", "k")
        .timeout(Duration::from_millis(100))
        .send()
        .await
        .expect_err("the client times out");
    assert!(err.is_timeout(), "{err}");
    assert_eq!(target.executions("k"), 0);
    assert_eq!(outcomes(&target, "/slow"), [RequestOutcome::Pending]);

    // The retry waits for the original instead of executing again, then gets its answer.
    let response = send(&client, reqwest::Method::POST, &target.url("/slow"), Some("k"), None).await.expect("retry");
    assert!(started.elapsed() >= Duration::from_millis(700), "{:?}", started.elapsed());
    assert_eq!(response.headers().get("idempotent-replayed").map(|v| v.as_bytes()), Some(&b"true"[..]));
    assert_eq!(response.json::<Value>().await.expect("body")["n"], 1);
    assert_eq!(target.executions("k"), 1);
    assert_eq!(outcomes(&target, "/slow"), [RequestOutcome::Executed(200), RequestOutcome::Replayed(200)]);
}

#[tokio::test]
async fn a_retry_waiting_on_a_delayed_failure_executes_itself() {
    let target = Arc::new(StepTarget::start().await);
    target.script("/slow", [Behaviour::status(503).after(Duration::from_millis(300))]);
    let url = target.url("/slow");
    let first = tokio::spawn(async move {
        send(&client(), reqwest::Method::POST, &url, Some("k"), None).await.expect("first").status().as_u16()
    });
    target.wait_for_requests("/slow", 1, PATIENCE).await;

    let (status, _) = post(&target, "/slow", "k", json!(null)).await;
    assert_eq!(status, 200);
    assert_eq!(first.await.expect("first request"), 503);
    assert_eq!(outcomes(&target, "/slow"), [RequestOutcome::Failed(503), RequestOutcome::Executed(200)]);
    assert_eq!(target.executions("k"), 1);
}

#[tokio::test]
async fn goes_down_and_comes_back_on_the_same_port() {
    let target = StepTarget::start().await;
    let addr = target.addr();
    let client = client();
    assert_eq!(post(&target, "/pay", "k", json!({})).await.0, 200);
    // Keep a pooled keep-alive connection open across the outage.
    assert!(send(&client, reqwest::Method::GET, &target.url("/up"), None, None).await.is_ok());

    target.go_down().await;
    target.go_down().await;
    let refused = tokio::net::TcpStream::connect(addr).await.expect_err("nothing listens");
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    assert!(send(&client, reqwest::Method::GET, &target.url("/up"), None, None).await.is_err());
    let err = send(
        &reqwest::Client::builder().no_proxy().build().expect("client"),
        reqwest::Method::GET,
        &target.url("/"),
        None,
        None,
    )
    .await
    .expect_err("refused");
    assert!(err.is_connect(), "{err:?}");

    target.come_back().await;
    target.come_back().await;
    assert_eq!(target.addr(), addr);
    assert_eq!(send(&client, reqwest::Method::GET, &target.url("/up"), None, None).await.expect("up").status(), 200);
    // The idempotency store outlived the outage.
    let replay =
        send(&client, reqwest::Method::POST, &target.url("/pay"), Some("k"), Some(json!({}))).await.expect("replay");
    assert!(replay.headers().contains_key("idempotent-replayed"));
    assert_eq!(target.executions("k"), 1);
}

#[tokio::test]
async fn going_down_abandons_a_delayed_request() {
    let target = Arc::new(StepTarget::start().await);
    target.script("/slow", [Behaviour::ok(json!({})).after(Duration::from_secs(30))]);
    let url = target.url("/slow");
    let pending = tokio::spawn(async move { send(&client(), reqwest::Method::POST, &url, Some("k"), None).await });
    target.wait_for_requests("/slow", 1, PATIENCE).await;

    target.go_down().await;
    assert!(pending.await.expect("request task").is_err(), "the connection is cut");
    assert_eq!(outcomes(&target, "/slow"), [RequestOutcome::Abandoned]);
    assert_eq!(target.executions("k"), 0);

    target.come_back().await;
    assert_eq!(post(&target, "/slow", "k", json!(null)).await.0, 200);
    assert_eq!(outcomes(&target, "/slow"), [RequestOutcome::Abandoned, RequestOutcome::Executed(200)]);
    target.wait_for_executions("k", 1, PATIENCE).await;
}

#[tokio::test]
async fn wait_for_requests_wakes_when_they_arrive() {
    let target = Arc::new(StepTarget::start().await);
    let url = target.url("/w");
    tokio::spawn(async move {
        let client = client();
        for i in 0..3 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            send(&client, reqwest::Method::POST, &url, Some(&format!("k{i}")), None).await.expect("POST");
        }
    });
    let seen = target.wait_for_requests("/w", 3, PATIENCE).await;
    let keys: Vec<_> = seen.iter().map(|r| r.idempotency_key.clone().unwrap_or_default()).collect();
    assert_eq!(keys, ["k0", "k1", "k2"]);
    // Requests that did not wait are answered by the time the waiter sees them.
    assert!(seen.iter().all(|r| r.outcome == RequestOutcome::Executed(200)), "{seen:?}");
}

#[tokio::test]
async fn wait_for_requests_panics_with_what_it_saw() {
    let target = Arc::new(StepTarget::start().await);
    post(&target, "/other", "k-other", json!({})).await;
    let waiter = target.clone();
    let panicked = tokio::spawn(async move { waiter.wait_for_requests("/never", 2, Duration::from_millis(200)).await })
        .await
        .expect_err("the wait times out");
    let payload = panicked.into_panic();
    let message = payload.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(message.contains("waited 200ms for 2 request(s) to /never; it saw:"), "{message}");
    assert!(message.contains("POST /other key=k-other step=- -> Executed(200)"), "{message}");
    assert!(message.contains(r#"executions: {"k-other": 1}"#), "{message}");
}
