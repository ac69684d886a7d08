//! The transactional outbox writer: events are inserted in the same transaction as the business change they
//! describe, so either both commit or neither does. The OutboxRelay moves them to Redis Streams afterwards.

use serde::Serialize;
use serde_json::{Map, Value, json};
use sqlx::{PgConnection, migrate::Migrator};
use uuid::Uuid;

/// The migrations that create the outbox tables; every service with an outbox applies them with its own
/// (see [`crate::stores::migrate`]). Versions start at 9001 so they never collide with a service's own.
pub static MIGRATOR: Migrator = sqlx::migrate!("../../migrations/outbox");

/// One event to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Kind of aggregate, e.g. `order`; the relay can derive the stream name from it.
    pub aggregate_type: &'static str,
    /// Id of the aggregate; events of one aggregate are published in insertion order.
    pub aggregate_id: String,
    /// What happened, e.g. `OrderApproved`.
    pub event_type: &'static str,
    /// The event's data.
    pub payload: Value,
}

impl Event {
    /// An event with a serializable payload.
    pub fn new(
        aggregate_type: &'static str,
        aggregate_id: impl Into<String>,
        event_type: &'static str,
        payload: impl Serialize,
    ) -> Self {
        Self {
            aggregate_type,
            aggregate_id: aggregate_id.into(),
            event_type,
            payload: serde_json::to_value(payload).unwrap_or(Value::Null),
        }
    }
}

/// Inserts `event` through `tx` — pass the transaction of the business change. Returns the event id. The
/// headers carry the current trace context and saga id, so the consumer's work joins the same trace.
pub async fn write(tx: &mut PgConnection, event: &Event, saga_id: Option<&str>) -> Result<Uuid, sqlx::Error> {
    let id = Uuid::new_v4();
    let mut headers = Map::new();
    if let Some(traceparent) = kubesaga_telemetry::traceparent(&tracing::Span::current()) {
        headers.insert("traceparent".into(), json!(traceparent));
    }
    if let Some(saga_id) = saga_id {
        headers.insert("saga_id".into(), json!(saga_id));
    }
    sqlx::query(
        "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload, headers) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(id)
    .bind(event.aggregate_type)
    .bind(&event.aggregate_id)
    .bind(event.event_type)
    .bind(&event.payload)
    .bind(Value::Object(headers))
    .execute(tx)
    .await?;
    Ok(id)
}
