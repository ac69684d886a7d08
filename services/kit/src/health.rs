//! Liveness endpoint shared by every service.

use axum::{Router, routing::get};

/// A router serving `GET /healthz`: the process is up and serving HTTP.
pub fn router() -> Router {
    Router::new().route("/healthz", get(|| async { "ok" }))
}
