//! The payment service's error type.

use kubesaga_kit::{KitError, problem::Problem, semaphore::SemaphoreError};

use crate::gateway::Operation;

/// Everything that can go wrong in the payment service outside of the answers the API gives on purpose.
#[derive(Debug, thiserror::Error)]
pub enum PaymentError {
    /// Connecting to or migrating a store failed (start-up).
    #[error(transparent)]
    Kit(#[from] KitError),
    /// A database query failed.
    #[error("database query failed: {0}")]
    Database(#[from] sqlx::Error),
    /// The gateway semaphore is saturated, or Redis failed while handling it.
    #[error(transparent)]
    Semaphore(#[from] SemaphoreError),
    /// The gateway failed transiently (its 5xx, or no answer in time); a retry with the same gateway key either
    /// runs again or gets the answer the gateway recorded.
    #[error("the payment gateway could not {operation}: {reason}")]
    GatewayUnavailable {
        /// What was asked of the gateway.
        operation: Operation,
        /// Why it failed.
        reason: String,
    },
    /// The gateway already answered this idempotency key for a call with different details.
    #[error("gateway idempotency key {key:?} was already used for a call with different details")]
    GatewayKeyReused {
        /// The key.
        key: String,
    },
    /// The configuration is inconsistent.
    #[error("invalid configuration: {0}")]
    Config(String),
}

impl PaymentError {
    /// The answer for the HTTP API: transient failures are 503 or 429 (the caller retries), a reused gateway key
    /// is 409, and everything else is a logged 500.
    pub fn problem(&self) -> Problem {
        match self {
            Self::Database(sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_)) => {
                tracing::warn!(error = %self, "database unavailable");
                Problem::unavailable("the payment database is temporarily unavailable; retry shortly")
            }
            Self::Semaphore(err) => err.problem(),
            Self::GatewayUnavailable { .. } => {
                tracing::warn!(error = %self, "gateway call failed transiently");
                Problem::unavailable(format!("{self}; retry the request (a retry is never charged twice)"))
            }
            Self::GatewayKeyReused { .. } => Problem::invalid_state(
                "this payment was already submitted to the gateway with different details; use a new payment id",
            ),
            Self::Kit(_) | Self::Database(_) | Self::Config(_) => Problem::internal(self),
        }
    }
}

impl From<PaymentError> for Problem {
    fn from(err: PaymentError) -> Self {
        err.problem()
    }
}
