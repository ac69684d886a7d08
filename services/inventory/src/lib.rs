//! The inventory service of the kubesaga checkout demo: products with stock, and reservations that sagas make,
//! confirm after their pivot, and cancel as compensation.
//!
//! # Consistency
//!
//! - **Stock accounting.** A product has `stock` units on hand, `reserved` of them promised to sagas; `available`
//!   is the difference. A reserve moves units from available to reserved, a confirm takes them out of both, a
//!   cancel returns them to available. `CHECK` constraints keep `0 <= reserved <= stock`.
//! - **One writer per product row.** Every change of a product row runs under a Redis lock per SKU
//!   ([`kubesaga_kit::lock::Locks`]); the lock's fencing token is written to `last_fence` with a
//!   `last_fence < token` condition (a second write in the same acquisition requires its own token to be still
//!   there), and the `UPDATE` is version-checked (optimistic locking), so a holder that lost its lock, or a writer
//!   that bypassed it, cannot overwrite a newer state. A version conflict is retried a few times, then answered
//!   409 `version-conflict`; a fenced-off write is answered 503, since the retry under a fresh lock succeeds.
//! - **Outbox.** Each change commits together with its event (`StockReserved`, `StockCommitted`,
//!   `StockReleased`) in the kit's outbox table.
//! - **Idempotency.** State-changing routes need an `Idempotency-Key` (the kit's layer replays answers). The
//!   reservation id is the backstop: a repeated reserve finds its reservation and answers it as it stands, a
//!   repeated confirm or cancel finds it settled and answers the same.
//! - **Compensations always end.** Cancelling an unknown reservation succeeds (`NOT_FOUND_TREATED_AS_CANCELLED`)
//!   and leaves a tombstone, so a reserve that arrives after its own compensation is refused instead of holding
//!   stock nobody will release.
//!
//! # The semantic lock
//!
//! A product row is locked by at most one saga at a time, and only for the **RESERVING window**: a reserve first
//! checks the stock and claims the row for its saga in a transaction of its own (`lock_state = 'RESERVING'`,
//! `locked_by_saga`, `locked_at`), then moves the units, inserts the reservation, writes the event and releases
//! the claim in a second transaction. A `RESERVED` reservation does **not** keep the row locked while it waits for
//! confirm or cancel: other sagas reserve the remaining available units meanwhile — `reserved` is what protects
//! those units — so 200 sagas competing for 50 units get exactly 50 reservations and clear 422s.
//!
//! Because the claim is committed, it outlives a crash between the two transactions. Then:
//! - another saga reserving the product gets 409 `locked-by-saga` with `heldBy` naming the holder (distinct from
//!   422 out of stock);
//! - the holder's retry goes through (the lock is re-entrant per saga) and finishes the reservation;
//! - the holder's compensation (cancel, which finds no reservation) releases the claim;
//! - otherwise the [`sweeper`] releases it once it is older than `--lock-max-age` (30 minutes by default).
//!
//! Reserves queue for the product's Redis lock, and another saga's claim is checked only under that lock: a
//! request never fails on a reserve that is merely in progress (it waits the few milliseconds that takes), only
//! on one that was abandoned. Readers (`GET /products/{sku}`) may see a claim in progress. The schema also allows `lock_state = 'RESERVED'` (a row held for a reservation's lifetime); this service never
//! writes it, but the sweeper releases such a lock and cancels the holder's RESERVED reservations of the product.

pub mod error;
mod fence;
pub mod model;
pub mod operations;
pub mod routes;
pub mod store;
pub mod sweeper;

use std::{sync::Arc, time::Duration};

use axum::{
    Router,
    routing::{post, put},
};
use kubesaga_kit::{
    http::{Limits, Readiness},
    idempotency::{IdempotencyConfig, IdempotencyLayer},
    lock::{LockConfig, Locks},
};
use redis::aio::ConnectionManager;
use sqlx::{PgPool, migrate::Migrator};
use utoipa::OpenApi;

pub use error::InventoryError;
pub use sweeper::{SweepReport, SweeperConfig, sweep_once};

/// The service's name in metrics, logs and idempotency keys.
pub const SERVICE: &str = "inventory";

/// The inventory tables; applied together with the outbox's by [`migrate`].
pub static MIGRATOR: Migrator = sqlx::migrate!("../../migrations/inventory");

/// Applies the inventory and outbox migrations the database has not seen yet.
pub async fn migrate(pool: &PgPool) -> Result<(), InventoryError> {
    kubesaga_kit::stores::migrate_with_outbox(pool, &MIGRATOR).await?;
    Ok(())
}

/// Tunables of the service.
#[derive(Debug, Clone)]
pub struct Settings {
    /// How long a request waits for the Redis lock of a product before answering 503 (retry).
    pub lock_wait: Duration,
    /// Lease and renewal of the Redis locks.
    pub lock: LockConfig,
    /// Body limit and request timeout of the HTTP shell.
    pub limits: Limits,
}

impl Default for Settings {
    fn default() -> Self {
        // Critical sections are a few milliseconds, so waiters poll more often than the kit's default (up to
        // 200 ms) would: a hot product otherwise sits unlocked while its queue sleeps.
        let lock = LockConfig {
            retry_min: Duration::from_millis(2),
            retry_max: Duration::from_millis(25),
            ..LockConfig::default()
        };
        Self { lock_wait: Duration::from_secs(5), lock, limits: Limits::default() }
    }
}

/// What the routes share. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pool: PgPool,
    redis: ConnectionManager,
    locks: Locks,
    settings: Arc<Settings>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState").field("settings", &self.settings).finish_non_exhaustive()
    }
}

impl AppState {
    /// State over a migrated database and a Redis connection.
    pub fn new(pool: PgPool, redis: ConnectionManager, settings: Settings) -> Result<Self, InventoryError> {
        let locks = Locks::with_config(redis.clone(), settings.lock)?;
        Ok(Self { pool, redis, locks, settings: Arc::new(settings) })
    }

    /// The database pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The settings in use.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }
}

/// The API routes alone (no HTTP shell), with the idempotency layer on the state-changing ones.
pub fn routes(state: AppState) -> Router {
    let idempotency = IdempotencyConfig::new(SERVICE).max_body_bytes(state.settings.limits.max_body_bytes);
    Router::new()
        .route("/products/{sku}", put(routes::put_product).get(routes::get_product))
        .route("/reservations/{id}", put(routes::reserve))
        .route("/reservations/{id}/confirm", post(routes::confirm))
        .route("/reservations/{id}/cancel", post(routes::cancel))
        // The layer lets GET through untouched, so it can cover the product route as a whole.
        .route_layer(IdempotencyLayer::new(state.redis.clone(), idempotency))
        .with_state(state)
}

/// The whole service: the API in the kit's HTTP shell (request ids, tracing, metrics, timeout, body limit,
/// `/healthz`, `/readyz`, `/metrics`, `/openapi.json`).
pub fn app(state: AppState) -> Router {
    let readiness = Readiness { redis: Some(state.redis.clone()), postgres: Some(state.pool.clone()) };
    let limits = state.settings.limits.clone();
    kubesaga_kit::http::app(SERVICE, routes(state), readiness, openapi_json(), &limits)
}

/// The OpenAPI document as JSON.
pub fn openapi_json() -> serde_json::Value {
    serde_json::to_value(routes::ApiDoc::openapi()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_openapi_document_lists_every_route() {
        let doc = openapi_json();
        for path in ["/products/{sku}", "/reservations/{id}", "/reservations/{id}/confirm", "/reservations/{id}/cancel"]
        {
            assert!(doc["paths"][path].is_object(), "{path} missing");
        }
    }
}
