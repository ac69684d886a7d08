//! The crate's error type and how each error is answered over HTTP.

use std::time::Duration;

use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use kubesaga_kit::{KitError, lock::LockError, problem::Problem};

/// Everything that can go wrong in the inventory service, from bad input to unreachable stores.
#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    /// A request field is malformed or out of range.
    #[error("{field}: {detail}")]
    Invalid {
        /// The field, as the client spells it.
        field: &'static str,
        /// What is wrong and what is accepted.
        detail: String,
    },
    /// `GET`/`PUT` of a product that does not exist.
    #[error("there is no product with SKU {sku:?}")]
    ProductNotFound {
        /// The SKU asked for.
        sku: String,
    },
    /// A reservation names a product that does not exist.
    #[error("there is no product with SKU {sku:?} to reserve")]
    UnknownSku {
        /// The SKU in the request.
        sku: String,
    },
    /// Confirming a reservation that was never made.
    #[error("there is no reservation {id:?}")]
    ReservationNotFound {
        /// The reservation id.
        id: String,
    },
    /// Fewer units are available than requested.
    #[error("only {available} unit(s) of {sku:?} are available; {requested} were requested")]
    OutOfStock {
        /// The product.
        sku: String,
        /// Units on hand and not reserved.
        available: i64,
        /// Units asked for.
        requested: i64,
    },
    /// Another saga holds the product's semantic lock.
    #[error("product {sku:?} is held by saga {holder:?} ({state} since {since})")]
    HeldBySaga {
        /// The product.
        sku: String,
        /// The saga holding the lock.
        holder: String,
        /// `RESERVING` or `RESERVED`.
        state: String,
        /// When the lock was taken.
        since: DateTime<Utc>,
    },
    /// A row changed between read and write more often than the retries allow.
    #[error("{what} changed concurrently; read it again and retry")]
    VersionConflict {
        /// The row, e.g. `product "A-1"`.
        what: String,
    },
    /// The request is not allowed in the resource's current state.
    #[error("{detail}")]
    InvalidState {
        /// Why, for humans.
        detail: String,
        /// The current status, when there is one.
        status: Option<String>,
    },
    /// Postgres failed.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// The per-SKU Redis lock could not be taken, was lost, or a write under it was fenced off.
    #[error(transparent)]
    Lock(#[from] LockError),
    /// Redis failed outside the lock itself.
    #[error("Redis error: {0}")]
    Redis(#[from] redis::RedisError),
    /// Connecting or migrating at start-up failed.
    #[error(transparent)]
    Startup(#[from] KitError),
    /// The configuration is unusable.
    #[error("invalid configuration: {0}")]
    Config(String),
}

impl InventoryError {
    /// Shorthand for [`InventoryError::Invalid`].
    pub fn invalid(field: &'static str, detail: impl Into<String>) -> Self {
        Self::Invalid { field, detail: detail.into() }
    }

    /// The problem a client gets. Saga callers retry 5xx and 429 and treat other 4xx as final, so only conditions
    /// a retry can fix are 5xx here.
    pub fn problem(&self) -> Problem {
        match self {
            Self::Invalid { field, detail } => Problem::validation(field, format!("{field}: {detail}")),
            Self::ProductNotFound { sku } => Problem::not_found(self.to_string()).with("sku", sku),
            Self::UnknownSku { sku } => Problem::unprocessable(self.to_string()).with("sku", sku).with("field", "sku"),
            Self::ReservationNotFound { id } => Problem::not_found(self.to_string()).with("reservationId", id),
            Self::OutOfStock { sku, available, requested } => Problem::unprocessable(self.to_string())
                .with("sku", sku)
                .with("available", available)
                .with("requested", requested),
            Self::HeldBySaga { sku, holder, state, since } => Problem::locked_by_saga(holder, self.to_string())
                .with("sku", sku)
                .with("lockState", state)
                .with("lockedAt", since),
            Self::VersionConflict { .. } => Problem::version_conflict(self.to_string()),
            Self::InvalidState { detail, status } => match status {
                Some(status) => Problem::invalid_state(detail).with("status", status),
                None => Problem::invalid_state(detail),
            },
            Self::Database(err) if is_transient(err) => {
                tracing::warn!(error = %err, "database unavailable");
                Problem::unavailable("the database is unavailable; retry shortly")
            }
            // Nothing was committed, and a retry takes a fresh lock (with a newer fencing token), so each of these
            // is worth retrying; LockError::problem answers a fenced write with 409, which sagas would not retry.
            Self::Lock(LockError::Timeout { .. }) => {
                Problem::unavailable("the product is busy with other requests; retry shortly")
            }
            Self::Lock(LockError::Lost { .. } | LockError::Fenced { .. }) => {
                tracing::warn!(error = %self, "lock lost or fenced off; nothing was committed");
                Problem::unavailable("the request was interrupted before it took effect; retry it")
                    .retry_after(Duration::from_secs(1))
            }
            Self::Lock(LockError::Redis(err)) | Self::Redis(err) => {
                tracing::warn!(error = %err, "Redis unavailable");
                Problem::unavailable("the lock service is unavailable; retry shortly")
            }
            Self::Lock(LockError::Config(_)) | Self::Database(_) | Self::Startup(_) | Self::Config(_) => {
                Problem::internal(self)
            }
        }
    }
}

/// Errors that say the database is unreachable or overloaded rather than that the request is wrong.
fn is_transient(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) | sqlx::Error::Tls(_))
}

impl From<InventoryError> for Problem {
    fn from(err: InventoryError) -> Self {
        err.problem()
    }
}

impl IntoResponse for InventoryError {
    fn into_response(self) -> Response {
        self.problem().into_response()
    }
}
