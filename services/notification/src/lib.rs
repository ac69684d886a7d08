//! The notification service: fake e-mail and SMS senders that record what they "sent", and the consumer that
//! turns the order service's events into messages to the customer.
//!
//! - [`api`]: `POST /notifications` (idempotent) and `GET /notifications`;
//! - [`consumer`]: reads the order events the OutboxRelay publishes on a Redis stream (`events.order`) in a
//!   consumer group, records each event's notification exactly once in effect, and dead-letters what it cannot
//!   process;
//! - [`events`]: which message an order event calls for ([`events::message`]);
//! - [`senders`]: the fake senders, which record a message inside the caller's transaction.

pub mod api;
pub mod consumer;
pub mod error;
pub mod events;
pub mod senders;

pub use error::NotificationError;

/// The service's migrations.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/notification");
