//! What every kubesaga service shares:
//!
//! - [`http`]: the HTTP shell (request ids, tracing, metrics, limits, `/healthz`, `/readyz`, `/metrics`,
//!   `/openapi.json`) and [`server`]: serving it until SIGTERM;
//! - [`problem`]: RFC 9457 problem+json errors and a JSON extractor whose rejections are problems;
//! - [`idempotency`]: the Idempotency-Key layer backed by Redis;
//! - [`lock`] and [`semaphore`]: a distributed lock with fencing tokens and a counting semaphore, in Redis;
//! - [`outbox`]: the transactional outbox writer; [`stores`]: Redis and Postgres connections and migrations;
//! - [`duration`]: durations in flags; [`telemetry`]: logging and tracing set-up.

pub mod duration;
pub mod error;
pub mod http;
pub mod idempotency;
pub mod lock;
pub mod outbox;
pub mod problem;
pub mod semaphore;
pub mod server;
pub mod stores;

pub use error::KitError;
pub use kubesaga_telemetry as telemetry;
