//! The notification service's error type.

use kubesaga_events::DecodeError;

use crate::senders::Invalid;

/// What can go wrong while consuming order events. Some variants are the fault of one stream entry
/// ([`NotificationError::rejects_entry`]): such an entry goes to the dead-letter stream with the error as its
/// reason. The others are the fault of the surroundings, and the entry is tried again.
#[derive(Debug, thiserror::Error)]
pub enum NotificationError {
    /// The consumer's settings do not work together.
    #[error("invalid consumer setting: {0}")]
    Config(String),
    /// A Redis command failed.
    #[error("Redis failed to {doing}: {source} (check REDIS_URL and that the server is running)")]
    Redis {
        /// What the consumer was doing, e.g. "read new entries".
        doing: &'static str,
        /// Why.
        source: redis::RedisError,
    },
    /// Redis answered in a shape the consumer does not understand.
    #[error("unexpected reply from Redis to {command}: {detail}")]
    Reply {
        /// The command, e.g. `XREADGROUP`.
        command: &'static str,
        /// What was wrong with it.
        detail: String,
    },
    /// The notification database failed.
    #[error("notification database error: {0} (check NOTIFICATION_DATABASE_URL and that Postgres is running)")]
    Database(#[from] sqlx::Error),
    /// The entry is not an outbox event.
    #[error("the entry is not an outbox event: {0}")]
    Undecodable(#[from] DecodeError),
    /// The event's payload is not the order it should carry.
    #[error("the payload of {event_type} is not an order: {source}")]
    Payload {
        /// The event type.
        event_type: String,
        /// What the JSON parser objected to.
        source: serde_json::Error,
    },
    /// The order's message breaks the sender's rules, e.g. a customer e-mail that is no address.
    #[error("the order's message cannot be sent: {0}")]
    Message(#[from] Invalid),
    /// The entry was delivered more often than allowed, so processing it keeps failing (or crashing).
    #[error("delivered {deliveries} times, more than the limit of {max} (--max-deliveries)")]
    TooManyDeliveries {
        /// How often it was delivered, this time included.
        deliveries: u64,
        /// The limit.
        max: u64,
    },
    /// The entry was removed from the stream (XDEL or trimming) while it was still pending.
    #[error("the entry was deleted from the stream before it was processed")]
    Deleted,
}

impl NotificationError {
    /// Whether the entry itself is at fault, so trying it again cannot help.
    pub fn rejects_entry(&self) -> bool {
        match self {
            Self::Undecodable(_)
            | Self::Payload { .. }
            | Self::Message(_)
            | Self::TooManyDeliveries { .. }
            | Self::Deleted => true,
            Self::Config(_) | Self::Redis { .. } | Self::Reply { .. } | Self::Database(_) => false,
        }
    }

    /// A Redis error while doing `doing`.
    pub(crate) fn redis(doing: &'static str) -> impl FnOnce(redis::RedisError) -> Self {
        move |source| Self::Redis { doing, source }
    }
}
