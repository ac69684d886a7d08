//! The notification service: fake e-mail and SMS senders that record what they "sent". Consuming the order
//! events from Redis Streams arrives with the OutboxRelay.

pub mod api;
pub mod senders;

/// The service's migrations.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/notification");
