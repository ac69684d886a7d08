//! The `Idempotency-Key` layer against the real Redis that `make test` provides: one handler execution per key,
//! exact replays, conflicts, and refusing to run the handler when Redis is gone.

#![allow(clippy::expect_used, clippy::unwrap_used)] // test code: a panic is the failure report

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU16, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::{Body, Bytes},
    http::{HeaderMap, Request, StatusCode},
    response::{IntoResponse, Response},
    routing::post,
};
use kubesaga_kit::{
    idempotency::{IDEMPOTENT_REPLAYED, IdempotencyConfig, IdempotencyLayer, METRIC},
    problem::types,
    stores,
};
use kubesaga_testkit::{redis_url, unique_suffix};
use redis::{
    AsyncCommands,
    aio::{ConnectionManager, ConnectionManagerConfig},
};
use serde_json::{Value, json};
use tokio::{net::TcpListener, task::JoinSet};
use tower::ServiceExt;

/// A handler that counts its executions and answers with the status the test sets, a JSON body naming the
/// execution, and headers of which only some are to be stored.
#[derive(Clone)]
struct Handler {
    calls: Arc<AtomicUsize>,
    status: Arc<AtomicU16>,
    delay: Duration,
}

impl Handler {
    fn new(delay: Duration) -> Self {
        Self { calls: Arc::default(), status: Arc::new(AtomicU16::new(201)), delay }
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn answer_with(&self, status: u16) {
        self.status.store(status, Ordering::SeqCst);
    }

    fn app(&self, layer: IdempotencyLayer) -> Router {
        let handler = {
            let this = self.clone();
            move |body: String| {
                let this = this.clone();
                async move { this.run(body).await }
            }
        };
        let list = || async { "[]" };
        Router::new()
            .route("/orders", post(handler.clone()).patch(handler.clone()).get(list))
            .route("/orders/{id}/cancel", post(handler.clone()))
            .route("/payments", post(handler))
            .route_layer(layer)
    }

    async fn run(&self, body: String) -> Response {
        let call = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        tokio::time::sleep(self.delay).await;
        let status = StatusCode::from_u16(self.status.load(Ordering::SeqCst)).expect("status");
        let headers = [
            ("location", format!("/orders/{call}")),
            ("x-order-id", call.to_string()),
            ("cache-control", "no-store".to_owned()),
        ];
        (status, headers, axum::Json(json!({ "call": call, "body": body }))).into_response()
    }
}

/// A response read to the end.
#[derive(Debug, Clone)]
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    fn replayed(&self) -> bool {
        self.headers.get(&IDEMPOTENT_REPLAYED).is_some_and(|value| value == "true")
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|value| value.to_str().ok())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }

    /// The problem type, checking that this is a problem document.
    fn problem(&self) -> String {
        assert_eq!(self.header("content-type"), Some("application/problem+json"), "{self:?}");
        self.json()["type"].as_str().expect("problem type").to_owned()
    }
}

/// What a request sends besides its body.
#[derive(Default, Clone, Copy)]
struct Call<'a> {
    method: Option<&'a str>,
    path: &'a str,
    key: Option<&'a str>,
    caller: Option<&'a str>,
    saga: Option<&'a str>,
}

impl<'a> Call<'a> {
    fn post(path: &'a str, key: &'a str) -> Self {
        Self { path, key: Some(key), ..Self::default() }
    }
}

async fn send(app: &Router, what: Call<'_>, body: &str) -> Answer {
    let mut request = Request::builder()
        .method(what.method.unwrap_or("POST"))
        .uri(what.path)
        .header("content-type", "application/json");
    for (name, value) in [("idempotency-key", what.key), ("x-caller", what.caller), ("x-saga-id", what.saga)] {
        if let Some(value) = value {
            request = request.header(name, value);
        }
    }
    let request = request.body(Body::from(body.to_owned())).expect("request");
    let response = app.clone().oneshot(request).await.expect("infallible");
    let (parts, body) = response.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX).await.expect("body");
    Answer { status: parts.status, headers: parts.headers, body }
}

fn config() -> IdempotencyConfig {
    IdempotencyConfig::new(format!("kubesaga-test-idem-{}", unique_suffix()))
}

async fn redis() -> ConnectionManager {
    stores::redis(&redis_url()).await.expect("connect to Redis")
}

fn key() -> String {
    format!("key-{}", unique_suffix())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_identical_requests_run_the_handler_once() {
    let handler = Handler::new(Duration::from_millis(100));
    let app = handler.app(IdempotencyLayer::new(redis().await, config()));
    let key = key();
    let body = r#"{"sku":"A-1","quantity":2}"#;

    let mut requests = JoinSet::new();
    for _ in 0..50 {
        let (app, key) = (app.clone(), key.clone());
        requests.spawn(async move { send(&app, Call::post("/orders", &key), body).await });
    }
    let answers = requests.join_all().await;
    assert_eq!(handler.calls(), 1, "the handler ran once");

    let (executed, others): (Vec<_>, Vec<_>) =
        answers.into_iter().partition(|answer| answer.status == StatusCode::CREATED && !answer.replayed());
    let [original] = executed.as_slice() else { panic!("exactly one answer comes from the handler: {executed:?}") };
    assert_eq!(original.json(), json!({ "call": 1, "body": body }));
    for answer in &others {
        if answer.status == StatusCode::CONFLICT {
            assert_eq!(answer.problem(), types::IDEMPOTENCY_IN_FLIGHT);
            assert_eq!(answer.header("retry-after"), Some("1"));
        } else {
            assert_replay_of(answer, original);
        }
    }

    let again = send(&app, Call::post("/orders", &key), body).await;
    assert_replay_of(&again, original);
    assert_eq!(handler.calls(), 1);
}

/// A replay repeats status, body and the stored headers exactly, and nothing else the handler set.
fn assert_replay_of(replay: &Answer, original: &Answer) {
    assert!(replay.replayed(), "{replay:?}");
    assert_eq!((replay.status, &replay.body), (original.status, &original.body));
    for name in ["content-type", "location", "x-order-id"] {
        assert_eq!(replay.header(name), original.header(name), "{name}");
    }
    assert_eq!(original.header("cache-control"), Some("no-store"));
    assert_eq!(replay.header("cache-control"), None, "headers outside the stored list are not replayed");
    assert!(!original.replayed());
}

#[tokio::test]
async fn a_reused_key_must_carry_the_same_request() {
    let handler = Handler::new(Duration::ZERO);
    let app = handler.app(IdempotencyLayer::new(redis().await, config()));
    let key = key();

    let original =
        send(&app, Call::post("/orders", &key), r#"{"sku":"A-1","quantity":2,"meta":{"a":1,"b":[1,2]}}"#).await;
    assert_eq!(original.status, StatusCode::CREATED);

    let reordered = r#"{ "meta": {"b": [1, 2], "a": 1}, "quantity": 2, "sku": "A-1" }"#;
    assert_replay_of(&send(&app, Call::post("/orders", &key), reordered).await, &original);

    for changed in [
        r#"{"sku":"A-1","quantity":3,"meta":{"a":1,"b":[1,2]}}"#,
        r#"{"sku":"A-1","quantity":2,"meta":{"a":1,"b":[2,1]}}"#,
    ] {
        let answer = send(&app, Call::post("/orders", &key), changed).await;
        assert_eq!(answer.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(answer.problem(), types::IDEMPOTENCY_KEY_REUSED);
    }
    let query = send(&app, Call::post("/orders?dryRun=true", &key), reordered).await;
    assert_eq!(query.status, StatusCode::UNPROCESSABLE_ENTITY, "the query is part of the request");

    // Keys are scoped by route template, so another resource on the same template is another request.
    let other = key_for_template(&app, "/orders/1/cancel", "/orders/2/cancel").await;
    assert_eq!(other.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(handler.calls(), 2);
}

async fn key_for_template(app: &Router, first: &str, second: &str) -> Answer {
    let key = key();
    assert_eq!(send(app, Call::post(first, &key), "{}").await.status, StatusCode::CREATED);
    send(app, Call::post(second, &key), "{}").await
}

#[tokio::test]
async fn server_errors_are_retried_and_client_errors_are_replayed() {
    let handler = Handler::new(Duration::ZERO);
    let app = handler.app(IdempotencyLayer::new(redis().await, config()));
    let key = key();

    handler.answer_with(503);
    for call in 1..=2 {
        let answer = send(&app, Call::post("/orders", &key), "{}").await;
        assert_eq!((answer.status, answer.replayed()), (StatusCode::SERVICE_UNAVAILABLE, false));
        assert_eq!(answer.json()["call"], call, "a 5xx is not stored: the retry runs the handler");
    }
    handler.answer_with(201);
    let created = send(&app, Call::post("/orders", &key), "{}").await;
    assert_eq!((created.status, created.replayed()), (StatusCode::CREATED, false));
    assert_replay_of(&send(&app, Call::post("/orders", &key), "{}").await, &created);
    assert_eq!(handler.calls(), 3);

    handler.answer_with(409);
    let key = self::key();
    let refused = send(&app, Call::post("/orders", &key), "{}").await;
    assert_eq!((refused.status, refused.replayed()), (StatusCode::CONFLICT, false));
    handler.answer_with(201);
    assert_replay_of(&send(&app, Call::post("/orders", &key), "{}").await, &refused);
    assert_eq!(handler.calls(), 4, "a 4xx is the answer to that request, so it is stored");

    handler.answer_with(429);
    let key = self::key();
    assert_eq!(send(&app, Call::post("/orders", &key), "{}").await.status, StatusCode::TOO_MANY_REQUESTS);
    handler.answer_with(201);
    let retried = send(&app, Call::post("/orders", &key), "{}").await;
    assert_eq!((retried.status, retried.replayed()), (StatusCode::CREATED, false), "429 invites a retry");
    assert_eq!(handler.calls(), 6);
}

#[tokio::test]
async fn a_missing_or_malformed_key_is_a_400_problem() {
    let handler = Handler::new(Duration::ZERO);
    let app = handler.app(IdempotencyLayer::new(redis().await, config()));

    let missing = send(&app, Call { path: "/orders", ..Call::default() }, "{}").await;
    assert_eq!(missing.status, StatusCode::BAD_REQUEST);
    assert_eq!(missing.problem(), types::IDEMPOTENCY_KEY_MISSING);

    let too_long = "k".repeat(256);
    for bad in [too_long.as_str(), "", "has space", "\"\""] {
        let answer = send(&app, Call::post("/orders", bad), "{}").await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{bad:?}");
        assert_eq!(answer.problem(), types::IDEMPOTENCY_KEY_MISSING);
    }
    assert_eq!(handler.calls(), 0);

    let longest = format!("{}{}", key(), "k".repeat(255 - 14));
    assert_eq!(longest.len(), 255);
    assert_eq!(send(&app, Call::post("/orders", &longest), "{}").await.status, StatusCode::CREATED);
    let listed = send(&app, Call { method: Some("GET"), path: "/orders", ..Call::default() }, "").await;
    assert_eq!(listed.status, StatusCode::OK, "safe methods need no key");
    assert_eq!(handler.calls(), 1);
}

#[tokio::test]
async fn a_body_over_the_limit_is_a_413_problem() {
    let handler = Handler::new(Duration::ZERO);
    let app = handler.app(IdempotencyLayer::new(redis().await, config().max_body_bytes(64)));
    let large = json!({ "note": "x".repeat(100) }).to_string();

    let answer = send(&app, Call::post("/orders", &key()), &large).await;
    assert_eq!(answer.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(answer.problem(), types::PAYLOAD_TOO_LARGE);

    let declared = Request::post("/orders")
        .header("idempotency-key", key())
        .header("content-length", large.len())
        .body(Body::from(large.clone()))
        .expect("request");
    assert_eq!(app.clone().oneshot(declared).await.expect("infallible").status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(handler.calls(), 0);
    assert_eq!(send(&app, Call::post("/orders", &key()), r#"{"note":"small"}"#).await.status, StatusCode::CREATED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_slower_than_the_lease_keeps_its_claim_and_its_answer_is_stored() {
    let lease = Duration::from_millis(300);
    let handler = Handler::new(Duration::from_millis(1200));
    let prefix = format!("kubesaga-test-idem-{}", unique_suffix());
    let app = handler.app(IdempotencyLayer::new(redis().await, IdempotencyConfig::new(&prefix).lease(lease)));
    let key = key();

    let first = tokio::spawn({
        let (app, key) = (app.clone(), key.clone());
        async move { send(&app, Call::post("/orders", &key), "{}").await }
    });
    tokio::time::sleep(lease * 2 + Duration::from_millis(100)).await;
    let during = send(&app, Call::post("/orders", &key), "{}").await;
    assert_eq!(during.status, StatusCode::CONFLICT, "the claim outlived its first lease: {during:?}");
    assert_eq!(during.problem(), types::IDEMPOTENCY_IN_FLIGHT);

    let first = first.await.expect("first request");
    assert_eq!((first.status, first.replayed()), (StatusCode::CREATED, false));
    assert_replay_of(&send(&app, Call::post("/orders", &key), "{}").await, &first);
    assert_eq!(handler.calls(), 1);

    // The stored answer lives for the retention period, not the lease.
    let stored = format!("{prefix}:anonymous:POST:/orders:{key}");
    let ttl: i64 = redis().await.pttl(&stored).await.expect("PTTL");
    assert!(ttl > 23 * 3600 * 1000, "{stored} expires in {ttl} ms");
}

#[tokio::test]
async fn keys_are_scoped_by_caller_method_and_route() {
    let handler = Handler::new(Duration::ZERO);
    let app = handler.app(IdempotencyLayer::new(redis().await, config()));
    let key = key();
    let orders = Call::post("/orders", &key);

    let scopes = [
        Call { caller: Some("payment"), ..orders },
        Call { caller: Some("inventory"), ..orders },
        Call { saga: Some("saga-1"), ..orders },
        orders,
        Call { caller: Some("payment"), method: Some("PATCH"), ..orders },
        Call { caller: Some("payment"), path: "/payments", ..orders },
    ];
    for (i, scope) in scopes.iter().enumerate() {
        // Different bodies too: in another scope the key is simply another key, never a reuse.
        let answer = send(&app, *scope, &format!(r#"{{"n":{i}}}"#)).await;
        assert_eq!((answer.status, answer.replayed()), (StatusCode::CREATED, false), "scope {i}");
    }
    assert_eq!(handler.calls(), scopes.len());

    let again = send(&app, scopes[0], r#"{"n":0}"#).await;
    assert!(again.replayed());
    assert_eq!(again.json()["call"], 1);
    assert_eq!(handler.calls(), scopes.len());
}

#[tokio::test]
async fn redis_unreachable_from_the_start_is_a_503_and_the_handler_does_not_run() {
    // A port that was just free: connecting is refused, as when Redis is down.
    let addr = TcpListener::bind("127.0.0.1:0").await.expect("bind").local_addr().expect("addr");
    let client = redis::Client::open(format!("redis://{addr}")).expect("client");
    let manager_config = ConnectionManagerConfig::new().set_number_of_retries(1);
    let redis = ConnectionManager::new_lazy_with_config(client, manager_config).expect("lazy manager");
    let handler = Handler::new(Duration::ZERO);
    let app = handler.app(IdempotencyLayer::new(redis, config().redis_timeout(Duration::from_secs(1))));

    let started = Instant::now();
    let answer = send(&app, Call::post("/orders", &key()), "{}").await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(answer.problem(), types::UNAVAILABLE);
    assert!(answer.header("retry-after").is_some());
    assert!(started.elapsed() < Duration::from_secs(3), "bounded: {:?}", started.elapsed());
    assert_eq!(handler.calls(), 0);
}

#[tokio::test]
async fn redis_lost_after_start_is_a_503_and_the_handler_does_not_run() {
    let proxy = Proxy::to(&redis_url()).await;
    let redis = stores::redis(&format!("redis://{}", proxy.addr)).await.expect("connect through the proxy");
    let handler = Handler::new(Duration::ZERO);
    let app = handler.app(IdempotencyLayer::new(redis, config().redis_timeout(Duration::from_secs(1))));
    assert_eq!(send(&app, Call::post("/orders", &key()), "{}").await.status, StatusCode::CREATED);

    proxy.stop();
    let started = Instant::now();
    let answer = send(&app, Call::post("/orders", &key()), "{}").await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE, "{answer:?}");
    assert_eq!(answer.problem(), types::UNAVAILABLE);
    assert!(started.elapsed() < Duration::from_secs(3), "bounded: {:?}", started.elapsed());
    assert_eq!(handler.calls(), 1);
}

/// A TCP forwarder to Redis that can be cut, closing its connections and refusing new ones.
struct Proxy {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn to(redis_url: &str) -> Self {
        let authority = redis_url.trim_start_matches("redis://").split('/').next().expect("authority");
        let target = authority.rsplit('@').next().expect("host:port").to_owned();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            // Dropped with the task, which aborts every forwarding connection.
            let mut connections = JoinSet::new();
            while let Ok((mut inbound, _)) = listener.accept().await {
                let target = target.clone();
                connections.spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Self { addr, task }
    }

    fn stop(self) {
        self.task.abort();
    }
}

#[test]
fn outcomes_are_counted() {
    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        runtime.block_on(async {
            let handler = Handler::new(Duration::ZERO);
            let app = handler.app(IdempotencyLayer::new(redis().await, config()));
            let key = key();
            send(&app, Call { path: "/orders", ..Call::default() }, "{}").await;
            send(&app, Call::post("/orders", &key), "{}").await;
            send(&app, Call::post("/orders", &key), "{}").await;
            send(&app, Call::post("/orders", &key), r#"{"other":1}"#).await;
        });
    });
    let mut counts: Vec<(String, u64)> = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter(|(key, ..)| key.key().name() == METRIC)
        .filter_map(|(key, _, _, value)| {
            let outcome = key.key().labels().find(|label| label.key() == "outcome")?.value().to_owned();
            match value {
                metrics_util::debugging::DebugValue::Counter(count) => Some((outcome, count)),
                _ => None,
            }
        })
        .collect();
    counts.sort();
    let expected = [("executed", 1), ("mismatch", 1), ("missing_key", 1), ("replayed", 1)];
    assert_eq!(counts, expected.map(|(outcome, count)| (outcome.to_owned(), count)));
}
