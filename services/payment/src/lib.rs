//! The payment service of the checkout demo: authorizes, captures, voids and refunds card payments through a fake
//! gateway ([`gateway`]), records them in Postgres with their outbox events ([`store`]), and serves the HTTP API
//! the checkout saga calls ([`api`]).
//!
//! Gateway calls are capped across all replicas by the kit's Redis semaphore: each call holds a permit, and a
//! request that cannot get one within a short wait is answered 429 with `Retry-After`.
//!
//! ```no_run
//! # use kubesaga_payment::PaymentError;
//! # async fn demo(pool: sqlx::PgPool, redis: redis::aio::ConnectionManager) -> Result<(), PaymentError> {
//! use std::sync::Arc;
//! use kubesaga_payment::{Settings, gateway::FakeGateway};
//!
//! kubesaga_payment::migrate(&pool).await?;
//! let settings = Settings::default();
//! let gateway = Arc::new(FakeGateway::new(pool.clone(), settings.gateway.clone())?);
//! let app = kubesaga_payment::app(pool, redis, gateway, &settings)?;
//! # let _ = app; Ok(()) }
//! ```

pub mod api;
pub mod error;
pub mod gateway;
pub mod store;

use std::{sync::Arc, time::Duration};

use axum::Router;
use kubesaga_kit::{
    http::{Limits, Readiness},
    idempotency::{IdempotencyConfig, IdempotencyLayer},
    semaphore::{DEFAULT_LIMIT, Semaphore, SemaphoreConfig},
    stores,
};
use redis::aio::ConnectionManager;
use sqlx::{PgPool, migrate::Migrator};
use utoipa::OpenApi;

pub use error::PaymentError;

use crate::gateway::{FakeGateway, GatewayConfig};

/// The service's name, in logs, metrics and Idempotency-Key storage.
pub const SERVICE: &str = "payment";

/// The service's own migrations; [`migrate`] applies them together with the outbox's.
pub static MIGRATOR: Migrator = sqlx::migrate!("../../migrations/payment");

/// Applies the service's and the outbox's migrations that the database has not seen yet.
pub async fn migrate(pool: &PgPool) -> Result<(), PaymentError> {
    stores::migrate_with_outbox(pool, &MIGRATOR).await?;
    Ok(())
}

/// How the service behaves.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The fake gateway's behaviour.
    pub gateway: GatewayConfig,
    /// Name of the Redis semaphore capping gateway calls; every replica must use the same name and limit.
    pub semaphore_name: String,
    /// Gateway calls in flight at once, across replicas.
    pub semaphore_limit: u32,
    /// How long a request waits for a gateway permit before it is answered 429.
    pub semaphore_wait: Duration,
    /// How long a permit lasts if its holder dies without returning it.
    pub semaphore_lease: Duration,
    /// A gateway call taking longer than this fails transiently (503); shorter than the lease, so a call never
    /// outlives its permit.
    pub gateway_timeout: Duration,
    /// Body size and request time limits.
    pub limits: Limits,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            gateway: GatewayConfig::default(),
            semaphore_name: "payment-gateway".to_owned(),
            semaphore_limit: DEFAULT_LIMIT,
            semaphore_wait: Duration::from_millis(250),
            semaphore_lease: Duration::from_secs(15),
            gateway_timeout: Duration::from_secs(5),
            limits: Limits::default(),
        }
    }
}

/// The OpenAPI document served at `/openapi.json`.
pub fn openapi() -> utoipa::openapi::OpenApi {
    api::ApiDoc::openapi()
}

/// The whole HTTP application: the API behind the kit's shell (request ids, tracing, metrics, timeout, body
/// limit) plus `/healthz`, `/readyz`, `/metrics` and `/openapi.json`.
pub fn app(
    pool: PgPool,
    redis: ConnectionManager,
    gateway: Arc<FakeGateway>,
    settings: &Settings,
) -> Result<Router, PaymentError> {
    if settings.gateway_timeout >= settings.semaphore_lease {
        return Err(PaymentError::Config(format!(
            "the gateway timeout ({:?}) must be shorter than the semaphore lease ({:?}), or a slow call could outlive \
             its permit",
            settings.gateway_timeout, settings.semaphore_lease
        )));
    }
    let semaphore_config = SemaphoreConfig {
        limit: settings.semaphore_limit,
        lease: settings.semaphore_lease,
        ..SemaphoreConfig::default()
    };
    let semaphore = Semaphore::with_config(redis.clone(), &settings.semaphore_name, semaphore_config)?;
    let idempotency = IdempotencyLayer::new(
        redis.clone(),
        IdempotencyConfig::new(SERVICE).max_body_bytes(settings.limits.max_body_bytes),
    );
    let state = api::AppState {
        pool: pool.clone(),
        gateway,
        semaphore,
        wait: settings.semaphore_wait,
        gateway_timeout: settings.gateway_timeout,
    };
    let openapi = serde_json::to_value(openapi()).map_err(|err| PaymentError::Config(err.to_string()))?;
    let readiness = Readiness { redis: Some(redis), postgres: Some(pool) };
    Ok(kubesaga_kit::http::app(SERVICE, api::routes(state, idempotency), readiness, openapi, &settings.limits))
}
