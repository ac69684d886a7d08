//! The HTTP shell every service's API is wrapped in: request ids, a span per request that continues the caller's
//! trace and carries the saga id, request metrics, a timeout, a body limit, panics turned into problems, and the
//! operational routes `/healthz`, `/readyz`, `/metrics` and `/openapi.json`.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{
    Router,
    extract::{DefaultBodyLimit, MatchedPath, Request},
    http::{HeaderName, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
};
use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use redis::aio::ConnectionManager;
use sqlx::PgPool;
use tower::ServiceBuilder;
use tower_http::{
    catch_panic::CatchPanicLayer,
    request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer},
    trace::TraceLayer,
};

use crate::problem::Problem;

/// Header carrying the request id, set when the caller sent none and echoed in the response.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Limits of the HTTP shell.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest request body accepted; larger ones get a 413 problem.
    pub max_body_bytes: usize,
    /// A request running longer than this is answered with a 503 problem.
    pub request_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_body_bytes: 64 * 1024, request_timeout: Duration::from_secs(15) }
    }
}

/// What `/readyz` checks.
#[derive(Clone, Default)]
pub struct Readiness {
    /// The service's Redis, if it uses one.
    pub redis: Option<ConnectionManager>,
    /// The service's Postgres, if it uses one.
    pub postgres: Option<PgPool>,
}

/// Installs the process-wide Prometheus recorder (once); `/metrics` renders it.
pub fn prometheus() -> PrometheusHandle {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| match PrometheusBuilder::new().install_recorder() {
            Ok(handle) => handle,
            // Another recorder is installed (a test process with several services): render an empty registry.
            Err(_) => PrometheusBuilder::new().build_recorder().handle(),
        })
        .clone()
}

/// Wraps a service's `api` routes in the shell and adds the operational routes. `openapi` is the service's
/// OpenAPI document, served at `/openapi.json`.
pub fn app(
    service: &'static str,
    api: Router,
    readiness: Readiness,
    openapi: serde_json::Value,
    limits: &Limits,
) -> Router {
    let metrics = prometheus();
    let openapi = Arc::new(openapi);
    let operational = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(move || ready(readiness.clone())))
        .route("/metrics", get(move || std::future::ready(metrics.render())))
        .route("/openapi.json", get(move || std::future::ready(axum::Json(openapi.as_ref().clone()))));
    let request_timeout = limits.request_timeout;
    api.layer(DefaultBodyLimit::max(limits.max_body_bytes))
        .layer(middleware::from_fn(move |request, next| record(service, request, next)))
        .merge(operational)
        .layer(
            ServiceBuilder::new()
                .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
                .layer(
                    TraceLayer::new_for_http().make_span_with(move |request: &Request| request_span(service, request)),
                )
                .layer(PropagateRequestIdLayer::new(REQUEST_ID))
                .layer(CatchPanicLayer::custom(|_| Problem::internal(&"handler panicked").into_response()))
                .layer(middleware::from_fn(move |request, next| timeout(request_timeout, request, next))),
        )
}

/// A span per request with the fields logs and traces are searched by; it continues the caller's trace.
fn request_span(service: &'static str, request: &Request) -> tracing::Span {
    let header = |name: &str| request.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| request.uri().path().to_owned(), |p| p.as_str().to_owned());
    let span = tracing::info_span!(
        "request",
        service,
        method = %request.method(),
        route,
        request_id = header("x-request-id"),
        saga_id = header("x-saga-id"),
        saga_step = header("x-saga-step"),
    );
    kubesaga_telemetry::continue_trace(&span, request.headers());
    span
}

/// Answers a request that runs too long with a 503 problem (tower-http's timeout layer answers with an empty body).
async fn timeout(limit: Duration, request: Request, next: Next) -> Response {
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            Problem::unavailable(format!("the request did not finish within {}s", limit.as_secs())).into_response()
        }
    }
}

/// Request count, latency and in-flight gauge by route; the route template keeps label values bounded.
async fn record(service: &'static str, request: Request, next: Next) -> Response {
    let route =
        request.extensions().get::<MatchedPath>().map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = request.method().to_string();
    let in_flight = gauge!("kubesaga_http_requests_in_flight", "service" => service);
    in_flight.increment(1.0);
    let started = Instant::now();
    let response = next.run(request).await;
    in_flight.decrement(1.0);
    let status = response.status().as_u16().to_string();
    let labels = [("service", service.to_owned()), ("method", method), ("route", route), ("status", status)];
    counter!("kubesaga_http_requests_total", &labels).increment(1);
    histogram!("kubesaga_http_request_duration_seconds", &labels).record(started.elapsed().as_secs_f64());
    response
}

async fn ready(readiness: Readiness) -> Response {
    const CHECK: Duration = Duration::from_secs(2);
    let mut failures = Vec::new();
    if let Some(mut redis) = readiness.redis {
        let ping = tokio::time::timeout(CHECK, redis::cmd("PING").query_async::<()>(&mut redis)).await;
        if !matches!(ping, Ok(Ok(()))) {
            failures.push("redis");
        }
    }
    if let Some(pool) = readiness.postgres {
        let ping = tokio::time::timeout(CHECK, sqlx::query("SELECT 1").execute(&pool)).await;
        if !matches!(ping, Ok(Ok(_))) {
            failures.push("postgres");
        }
    }
    if failures.is_empty() {
        (StatusCode::OK, "ok").into_response()
    } else {
        Problem::unavailable(format!("not ready: {} unreachable", failures.join(" and ")))
            .with("unavailable", &failures)
            .into_response()
    }
}
