//! Test support: the inventory service mounted in-process over a throwaway database of its own (so tests run
//! in parallel) and the real Redis, plus request and inspection helpers.

#![allow(dead_code, clippy::expect_used, clippy::unwrap_used)]

use axum::{
    Router,
    body::Body,
    http::{HeaderMap, Method, Request, StatusCode},
};
use kubesaga_inventory::{AppState, Settings};
use kubesaga_kit::stores;
use kubesaga_testkit::{TestDatabase, redis_url, unique_suffix};
use serde_json::{Value, json};
use sqlx::PgPool;
use tower::ServiceExt;

/// A running service over its own database.
pub struct Service {
    pub app: Router,
    pub state: AppState,
    pub pool: PgPool,
    pub database: TestDatabase,
}

/// Creates an empty database of its own for one test.
pub async fn create_database() -> TestDatabase {
    TestDatabase::create("inventory_test").await
}

impl Service {
    pub async fn start() -> Self {
        Self::start_with(Settings::default()).await
    }

    pub async fn start_with(settings: Settings) -> Self {
        let database = create_database().await;
        let pool = stores::postgres(&database.url, 20).await.expect("connect to the test database");
        kubesaga_inventory::migrate(&pool).await.expect("migrate");
        let redis = stores::redis(&redis_url()).await.expect("connect to Redis");
        let state = AppState::new(pool.clone(), redis, settings).expect("state");
        let app = kubesaga_inventory::app(state.clone());
        Self { app, state, pool, database }
    }

    /// Drops the database; call at the end of a passing test (a failing one leaves it for inspection).
    pub async fn stop(self) {
        self.pool.close().await;
        self.database.drop_database().await;
    }

    pub async fn send(&self, request: Request<Body>) -> Answer {
        send(&self.app, request).await
    }

    /// `PUT /products/{sku}` with a fresh idempotency key; asserts success.
    pub async fn seed(&self, sku: &str, stock: i64) {
        let answer =
            self.send(put_json(&format!("/products/{sku}"), &json!({"name": "Widget", "stock": stock}), None)).await;
        assert!(answer.status.is_success(), "seeding {sku}: {answer:?}");
    }

    pub async fn product(&self, sku: &str) -> Value {
        let answer = self.send(get(&format!("/products/{sku}"))).await;
        assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
        answer.body
    }

    /// `PUT /reservations/{id}` for `saga`.
    pub async fn reserve(&self, id: &str, saga: &str, sku: &str, quantity: i64) -> Answer {
        self.send(put_json(&format!("/reservations/{id}"), &json!({"sku": sku, "quantity": quantity}), Some(saga)))
            .await
    }

    pub async fn confirm(&self, id: &str) -> Answer {
        self.send(post_empty(&format!("/reservations/{id}/confirm"), None)).await
    }

    pub async fn cancel(&self, id: &str, saga: Option<&str>) -> Answer {
        self.send(post_empty(&format!("/reservations/{id}/cancel"), saga)).await
    }

    /// Outbox rows as `(event_type, aggregate_id, payload, headers)`, oldest first.
    pub async fn outbox(&self) -> Vec<(String, String, Value, Value)> {
        sqlx::query_as("SELECT event_type, aggregate_id, payload, headers FROM outbox ORDER BY seq")
            .fetch_all(&self.pool)
            .await
            .expect("read outbox")
    }

    /// Everything the service stores, as text, to compare before and after a request.
    pub async fn snapshot(&self) -> Vec<String> {
        let mut rows: Vec<String> = Vec::new();
        for table in ["products", "reservations", "outbox"] {
            let sql = format!("SELECT row_to_json(t)::text FROM {table} t ORDER BY 1");
            let mut table_rows: Vec<String> =
                sqlx::query_scalar(sqlx::AssertSqlSafe(sql)).fetch_all(&self.pool).await.expect("snapshot");
            rows.push(format!("-- {table}: {}", table_rows.len()));
            rows.append(&mut table_rows);
        }
        rows
    }

    /// The rendered Prometheus metrics.
    pub async fn metrics(&self) -> String {
        let answer = self.send(get("/metrics")).await;
        answer.text
    }
}

/// A response, with its body parsed as JSON when it is JSON.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
    pub text: String,
}

impl Answer {
    pub fn content_type(&self) -> &str {
        self.headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default()
    }

    /// The problem `type` with its common prefix cut off, e.g. `locked-by-saga`.
    pub fn problem_type(&self) -> &str {
        self.body["type"].as_str().unwrap_or_default().trim_start_matches("https://kubesaga.dev/problems/")
    }
}

pub async fn send(app: &Router, request: Request<Body>) -> Answer {
    let response = app.clone().oneshot(request).await.expect("infallible");
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 22).await.expect("body");
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Answer { status, headers, body, text }
}

pub fn new_key() -> String {
    format!("key-{}", unique_suffix())
}

pub fn new_sku() -> String {
    format!("SKU-{}", unique_suffix())
}

pub fn new_id() -> String {
    format!("res-{}", unique_suffix())
}

pub fn new_saga() -> String {
    format!("shop/order-{}", unique_suffix())
}

pub fn get(path: &str) -> Request<Body> {
    Request::get(path).body(Body::empty()).expect("request")
}

/// A request with a JSON body, a fresh idempotency key and, if given, `X-Saga-Id`.
pub fn put_json(path: &str, body: &Value, saga: Option<&str>) -> Request<Body> {
    raw(Method::PUT, path, Some("application/json"), body.to_string(), saga, Some(&new_key()))
}

pub fn post_empty(path: &str, saga: Option<&str>) -> Request<Body> {
    raw(Method::POST, path, None, String::new(), saga, Some(&new_key()))
}

/// Any request: content type, body, saga and idempotency key as given.
pub fn raw(
    method: Method,
    path: &str,
    content_type: Option<&str>,
    body: impl Into<Body>,
    saga: Option<&str>,
    key: Option<&str>,
) -> Request<Body> {
    let mut request = Request::builder().method(method).uri(path);
    if let Some(content_type) = content_type {
        request = request.header("content-type", content_type);
    }
    if let Some(saga) = saga {
        request = request.header("x-saga-id", saga);
    }
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    request.body(body.into()).expect("request")
}

/// Sets a semantic lock directly, as an interrupted reserve or another tool would leave it.
pub async fn set_lock(pool: &PgPool, sku: &str, state: &str, saga: &str, age_seconds: i64) {
    sqlx::query(
        "UPDATE products SET lock_state = $2, locked_by_saga = $3, locked_at = now() - make_interval(secs => $4) \
         WHERE sku = $1",
    )
    .bind(sku)
    .bind(state)
    .bind(saga)
    .bind(age_seconds as f64)
    .execute(pool)
    .await
    .expect("set lock");
}

/// The sum of a Prometheus counter's samples whose labels contain `labels`.
pub fn counter_value(metrics: &str, name: &str, labels: &str) -> f64 {
    metrics
        .lines()
        .filter(|line| line.starts_with(name) && line[name.len()..].starts_with(['{', ' ']) && line.contains(labels))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
