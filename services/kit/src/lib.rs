//! What every kubesaga service shares: serving HTTP with health endpoints and graceful shutdown, logging,
//! and the Redis and Postgres connections.

pub mod error;
pub mod health;
pub mod http;
pub mod lock;
pub mod idempotency;
pub mod outbox;
pub mod problem;
pub mod semaphore;
pub mod server;
pub mod stores;

pub use error::KitError;
pub use kubesaga_telemetry as telemetry;
