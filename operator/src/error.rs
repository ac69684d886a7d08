//! The operator's error type.

/// Errors of the operator. Call outcomes are not errors (they are recorded in the saga's status); these are the
/// failures of the operator's own machinery.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request to the API server failed.
    #[error("{action} failed: {source}")]
    Kube {
        /// What the operator was doing, e.g. "writing the status of shop/order-42".
        action: String,
        /// The API server's answer.
        source: kube::Error,
    },
    /// Another writer changed the saga between our read and our write; the reconcile starts over from the newer
    /// version.
    #[error("{0} changed while it was being reconciled; retrying from the newer version")]
    Conflict(String),
    /// The object lacks a field the API server always sets.
    #[error("the object has no {0}; is it a Saga read from the API server?")]
    MissingField(&'static str),
    /// A start-up check failed.
    #[error("{0}")]
    Startup(String),
}

impl Error {
    /// A bounded label for the reconcile-errors metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Kube { .. } => "kube",
            Self::Conflict(_) => "conflict",
            Self::MissingField(_) => "missing_field",
            Self::Startup(_) => "startup",
        }
    }

    /// Wraps a kube error with what was being done.
    pub fn kube(action: impl Into<String>) -> impl FnOnce(kube::Error) -> Self {
        let action = action.into();
        move |source| match &source {
            kube::Error::Api(status) if status.code == 409 => Self::Conflict(action),
            _ => Self::Kube { action, source },
        }
    }
}
