//! What the payment service's tests share: a throwaway database per test (left behind when a test fails), the
//! service mounted in-process on the real Redis and Postgres that `make test` provides, and request helpers.

#![allow(dead_code, clippy::expect_used, clippy::unwrap_used)]

use std::{sync::Arc, time::Duration};

use axum::{
    Router,
    body::Body,
    http::{HeaderMap, Method, Request, StatusCode},
};
use kubesaga_kit::stores;
pub use kubesaga_payment::Settings;
use kubesaga_payment::{gateway::FakeGateway, gateway::GatewayConfig};
use kubesaga_testkit::{TestDatabase, redis_url, unique_suffix};
use redis::aio::ConnectionManager;
use serde_json::Value;
use sqlx::PgPool;
use tower::ServiceExt;

/// Settings for tests: an instant gateway and a semaphore name of the test's own, so tests running at once do not
/// share permits.
pub fn settings() -> Settings {
    Settings {
        gateway: GatewayConfig::instant(),
        semaphore_name: format!("payment-gateway-test-{}", unique_suffix()),
        ..Settings::default()
    }
}

/// The service in-process on a fresh, migrated database.
pub struct TestApp {
    pub router: Router,
    pub pool: PgPool,
    pub redis: ConnectionManager,
    pub gateway: Arc<FakeGateway>,
    pub settings: Settings,
    db: TestDatabase,
}

impl TestApp {
    pub async fn start() -> Self {
        Self::with(settings()).await
    }

    pub async fn with(settings: Settings) -> Self {
        let db = TestDatabase::create("payment_test").await;
        let pool = stores::postgres(&db.url, 40).await.expect("connect to the test database");
        kubesaga_payment::migrate(&pool).await.expect("migrate");
        let redis = stores::redis(&redis_url()).await.expect("connect to Redis");
        let gateway = Arc::new(FakeGateway::new(pool.clone(), settings.gateway.clone()).expect("gateway"));
        let router = kubesaga_payment::app(pool.clone(), redis.clone(), gateway.clone(), &settings).expect("app");
        Self { router, pool, redis, gateway, settings, db }
    }

    /// A second instance of the service on the same database, as after a restart: a new gateway client and
    /// router, nothing kept in memory.
    pub fn restarted(&self) -> (Router, Arc<FakeGateway>) {
        let gateway = Arc::new(FakeGateway::new(self.pool.clone(), self.settings.gateway.clone()).expect("gateway"));
        let router =
            kubesaga_payment::app(self.pool.clone(), self.redis.clone(), gateway.clone(), &self.settings).expect("app");
        (router, gateway)
    }

    pub async fn finish(self) {
        self.pool.close().await;
        self.db.drop_database().await;
    }

    /// Sends `request` to the service.
    pub async fn send(&self, request: Request<Body>) -> Reply {
        send(&self.router, request).await
    }

    /// A JSON request with a fresh Idempotency-Key.
    pub async fn call(&self, method: Method, path: &str, body: Option<Value>) -> Reply {
        self.send(json_request(method, path, &new_key(), body)).await
    }

    /// A JSON request with the given Idempotency-Key.
    pub async fn call_with_key(&self, method: Method, path: &str, key: &str, body: Option<Value>) -> Reply {
        self.send(json_request(method, path, key, body)).await
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.send(Request::get(path).body(Body::empty()).expect("request")).await
    }

    /// Authorizes `id` for `amount` cents with card token `token`.
    pub async fn authorize(&self, id: &str, amount: i64, token: &str) -> Reply {
        self.call(Method::PUT, &format!("/payments/{id}"), Some(authorize_body(amount, token))).await
    }

    /// The outbox rows of payment `id`: (event type, payload, headers), in insertion order.
    pub async fn events(&self, id: &str) -> Vec<(String, Value, Value)> {
        sqlx::query_as("SELECT event_type, payload, headers FROM outbox WHERE aggregate_id = $1 ORDER BY seq")
            .bind(id)
            .fetch_all(&self.pool)
            .await
            .expect("read outbox")
    }

    pub async fn count(&self, sql: &'static str) -> i64 {
        let (count,): (i64,) = sqlx::query_as(sql).fetch_one(&self.pool).await.expect("count");
        count
    }
}

pub async fn send(router: &Router, request: Request<Body>) -> Reply {
    let response = router.clone().oneshot(request).await.expect("the router answers");
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20).await.expect("body");
    let body = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap_or(Value::Null) };
    Reply { status, headers, body, raw: bytes.to_vec() }
}

pub fn new_key() -> String {
    uuid::Uuid::new_v4().to_string()
}

pub fn new_id() -> String {
    format!("pay-{}", uuid::Uuid::new_v4())
}

pub fn authorize_body(amount: i64, token: &str) -> Value {
    serde_json::json!({"orderId": "order-1", "amountCents": amount, "currency": "EUR", "cardToken": token})
}

pub fn json_request(method: Method, path: &str, key: &str, body: Option<Value>) -> Request<Body> {
    let builder = Request::builder()
        .method(method)
        .uri(path)
        .header("idempotency-key", key)
        .header("x-saga-id", "shop/checkout-test");
    match body {
        Some(body) => builder
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(&body).expect("JSON")))
            .expect("request"),
        None => builder.body(Body::empty()).expect("request"),
    }
}

/// A request with a raw body and content type.
pub fn raw_request(method: Method, path: &str, content_type: Option<&str>, body: impl Into<Body>) -> Request<Body> {
    let mut builder = Request::builder().method(method).uri(path).header("idempotency-key", new_key());
    if let Some(content_type) = content_type {
        builder = builder.header("content-type", content_type);
    }
    builder.body(body.into()).expect("request")
}

/// What the service answered.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
    pub raw: Vec<u8>,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|value| value.to_str().ok())
    }

    /// Asserts a problem+json answer with `status` and `type` ending in `kind`; returns the problem.
    pub fn problem(&self, status: StatusCode, kind: &str) -> &Value {
        assert_eq!(self.status, status, "{}", self.body);
        assert_eq!(self.header("content-type"), Some("application/problem+json"), "{}", self.body);
        let type_ = self.body["type"].as_str().unwrap_or_default();
        assert!(type_.ends_with(&format!("/{kind}")), "type {type_:?} is not {kind}: {}", self.body);
        &self.body
    }
}

/// Waits `duration`; named so tests read as what they wait for.
pub async fn sleep(duration: Duration) {
    tokio::time::sleep(duration).await;
}
