//! The order service's error type.

use kubesaga_kit::problem::Problem;

/// What can go wrong in the order service, each mapped to a problem a client can act on.
#[derive(Debug, thiserror::Error)]
pub enum OrderError {
    /// No order with that id.
    #[error("order {0} does not exist")]
    NotFound(uuid::Uuid),
    /// The order changed between read and write.
    #[error("order {0} was changed concurrently; retry the request")]
    VersionConflict(uuid::Uuid),
    /// The transition is not allowed from the order's status.
    #[error("order {id} is {status}; it cannot be {verb}")]
    InvalidState {
        /// The order.
        id: uuid::Uuid,
        /// Its status.
        status: String,
        /// The attempted transition, e.g. "approved".
        verb: &'static str,
    },
    /// The same order id was created before with other content.
    #[error("order {0} already exists with different content")]
    Mismatch(uuid::Uuid),
    /// The database failed.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// The Kubernetes API refused or failed to create the saga.
    #[error("cannot start the checkout saga: {0}")]
    Saga(String),
    /// The saga template cannot be used.
    #[error("the checkout saga template is invalid: {0}")]
    Template(String),
}

impl From<OrderError> for Problem {
    fn from(err: OrderError) -> Self {
        match &err {
            OrderError::NotFound(_) => Problem::not_found(err.to_string()),
            OrderError::VersionConflict(_) => Problem::version_conflict(err.to_string()),
            OrderError::InvalidState { .. } => Problem::invalid_state(err.to_string()),
            OrderError::Mismatch(_) => Problem::unprocessable(err.to_string()),
            OrderError::Database(db) if is_unavailable(db) => Problem::unavailable("the order database is unavailable"),
            OrderError::Saga(_) => Problem::unavailable(err.to_string()),
            OrderError::Database(_) | OrderError::Template(_) => Problem::internal(&err),
        }
    }
}

fn is_unavailable(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed)
}
