//! Test support for kubesaga's integration and end-to-end tests.
//!
//! `make test` brings up a real API server, Redis and Postgres and passes them through the environment
//! (`KUBECONFIG`, `REDIS_URL`, `DATABASE_URL`, `KUBECTL`). A test that needs one of them and does not find it
//! fails with a message saying how to provide it; it never skips silently.
//!
//! Every test that touches the API server works in a namespace of its own ([`TestNamespace`]) so tests run in
//! parallel; a failed test leaves its namespace behind as evidence.

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod kubernetes;
mod operator;
mod postgres;
mod redis;
mod target;

pub use kubernetes::{TestNamespace, client, install_crds, kubectl, kubectl_apply, wait_for};
pub use operator::OperatorProcess;
pub use postgres::TestDatabase;
pub use redis::RedisServer;
pub use target::{Behaviour, RecordedRequest, RequestOutcome, StepTarget};

/// Reads a variable `make test` sets, or fails the test saying how to run it.
pub fn required_env(name: &str) -> String {
    match std::env::var(name) {
        Ok(value) if !value.is_empty() => value,
        _ => panic!(
            "{name} is not set: this test needs the local control plane, Redis and Postgres. \
             Run it through `make test`, or `eval \"$(hack/env.sh up)\"` first and then `cargo test`."
        ),
    }
}

/// The Redis server `make test` started (or the one `REDIS_URL` named).
pub fn redis_url() -> String {
    required_env("REDIS_URL")
}

/// The Postgres server `make test` started (or the one `DATABASE_URL` named).
pub fn database_url() -> String {
    required_env("DATABASE_URL")
}

/// A short random suffix for names that must not collide between tests or runs.
pub fn unique_suffix() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..10].to_owned()
}
