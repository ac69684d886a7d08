//! What every kubesaga service shares: serving HTTP with health endpoints and graceful shutdown, logging,
//! and the Redis and Postgres connections.

pub mod error;
pub mod health;
pub mod server;
pub mod stores;
pub mod telemetry;

pub use error::KitError;
