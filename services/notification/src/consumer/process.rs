//! Handling one entry: its notification and its event id commit in one transaction, then the entry is
//! acknowledged; an entry at fault goes to the dead-letter stream instead.

use std::collections::BTreeMap;

use http::{HeaderMap, HeaderName, HeaderValue};
use kubesaga_events::StreamEvent;
use metrics::counter;
use sqlx::PgPool;
use tracing::{Instrument, field::Empty};

use super::group::{Entry, Group};
use crate::{NotificationError, events, senders};

/// Counter of handled entries, by `event_type` and `outcome`.
pub const EVENTS_TOTAL: &str = "notification_events_total";

/// What became of an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Its notification (if it calls for one) was recorded.
    Processed,
    /// Its event had been processed before; nothing was recorded again.
    Duplicate,
    /// It went to the dead-letter stream.
    DeadLettered,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Self::Processed => "processed",
            Self::Duplicate => "duplicate",
            Self::DeadLettered => "dead_lettered",
        }
    }
}

/// Handles `entry`, delivered `deliveries` times so far, and acknowledges it. An error means the entry stays
/// pending: Redis or Postgres failed, and the entry is tried again.
pub async fn handle(
    group: &mut Group<'_>,
    db: &PgPool,
    entry: &Entry,
    deliveries: u64,
    max_deliveries: u64,
) -> Result<(), NotificationError> {
    let span = tracing::info_span!(
        "notification.event",
        stream_id = %entry.id,
        deliveries,
        event_id = Empty,
        event_type = Empty,
        aggregate_id = Empty,
        saga_id = Empty,
    );
    let event = decode(entry);
    if let Ok(event) = &event {
        span.record("event_id", &event.event_id);
        span.record("event_type", &event.event_type);
        span.record("aggregate_id", &event.aggregate_id);
        span.record("saga_id", event.headers.get("saga_id").map_or("", String::as_str));
        kubesaga_kit::telemetry::continue_trace(&span, &trace_context(&event.headers));
    }
    let event_type = event.as_ref().map_or("unknown", |event| events::type_label(&event.event_type));
    async {
        let outcome = async {
            let event = event?;
            within_deliveries(deliveries, max_deliveries)?;
            record(db, &event).await
        };
        let outcome = match outcome.await {
            Ok(outcome) => {
                if outcome == Outcome::Processed {
                    crash_point_before_ack();
                }
                group.ack(&entry.id).await?;
                tracing::info!(outcome = outcome.label(), "order event handled");
                outcome
            }
            Err(err) if err.rejects_entry() => {
                group.dead_letter(entry, deliveries, &err.to_string()).await?;
                tracing::warn!(reason = %err, "order event sent to the dead-letter stream");
                Outcome::DeadLettered
            }
            Err(err) => return Err(err),
        };
        counter!(EVENTS_TOTAL, "event_type" => event_type, "outcome" => outcome.label()).increment(1);
        Ok(())
    }
    .instrument(span)
    .await
}

/// The event in `entry`, unless the entry was deleted or is not an event.
fn decode(entry: &Entry) -> Result<StreamEvent, NotificationError> {
    let fields = entry.fields.as_ref().ok_or(NotificationError::Deleted)?;
    Ok(StreamEvent::from_fields(fields.iter().map(|(name, value)| (name, value)))?)
}

/// An entry delivered more often than `max` keeps failing, or crashing its consumer: it is not processed again.
fn within_deliveries(deliveries: u64, max: u64) -> Result<(), NotificationError> {
    if deliveries > max { Err(NotificationError::TooManyDeliveries { deliveries, max }) } else { Ok(()) }
}

/// Records the event as processed and its notification, in one transaction, so an event delivered again (a crash
/// before the acknowledgement, a claim by another consumer, a duplicate on the stream) notifies once.
async fn record(db: &PgPool, event: &StreamEvent) -> Result<Outcome, NotificationError> {
    let message = events::message(event)?;
    let mut tx = db.begin().await?;
    // A concurrent transaction with the same id makes this wait for its outcome instead of both committing.
    let first = sqlx::query("INSERT INTO processed_events (event_id) VALUES ($1) ON CONFLICT (event_id) DO NOTHING")
        .bind(&event.event_id)
        .execute(&mut *tx)
        .await?
        .rows_affected()
        == 1;
    if !first {
        tx.rollback().await?;
        return Ok(Outcome::Duplicate);
    }
    if let Some(message) = &message {
        senders::send(&mut tx, message).await?;
    }
    tx.commit().await?;
    Ok(Outcome::Processed)
}

/// The W3C trace context among an event's headers, as the HTTP headers the telemetry crate reads it from.
fn trace_context(headers: &BTreeMap<String, String>) -> HeaderMap {
    ["traceparent", "tracestate"]
        .into_iter()
        .filter_map(|name| Some((HeaderName::from_static(name), HeaderValue::from_str(headers.get(name)?).ok()?)))
        .collect()
}

/// Crash tests make the process die at an exact point: `KUBESAGA_FAULT_INJECTION=crash-before-ack` aborts after
/// an event's transaction committed and before its entry is acknowledged. Unset in production, where this is one
/// environment lookup per processed event.
fn crash_point_before_ack() {
    if std::env::var("KUBESAGA_FAULT_INJECTION").is_ok_and(|spec| spec == "crash-before-ack") {
        eprintln!("fault injection: crash-before-ack: aborting");
        std::process::abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_is_processed_up_to_the_limit_of_deliveries_and_dead_lettered_after() {
        for max in 1..=10 {
            for deliveries in 1..=12 {
                let result = within_deliveries(deliveries, max);
                assert_eq!(result.is_ok(), deliveries <= max, "delivery {deliveries} of at most {max}");
                if let Err(err) = result {
                    assert!(err.rejects_entry());
                    assert_eq!(
                        err.to_string(),
                        format!("delivered {deliveries} times, more than the limit of {max} (--max-deliveries)")
                    );
                }
            }
        }
        assert!(within_deliveries(u64::MAX, u64::MAX).is_ok());
    }

    fn entry(fields: Option<&[(&str, &str)]>) -> Entry {
        Entry {
            id: "1-0".into(),
            fields: fields.map(|f| f.iter().map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec())).collect()),
        }
    }

    const EVENT: &[(&str, &str)] = &[
        ("event_id", "e"),
        ("event_type", "OrderApproved"),
        ("aggregate_type", "order"),
        ("aggregate_id", "o"),
        ("payload", "{}"),
        ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
    ];

    #[test]
    fn decoding_refuses_deleted_entries_and_entries_that_are_no_event() {
        let event = decode(&entry(Some(EVENT))).expect("an event");
        assert_eq!((event.event_id.as_str(), event.event_type.as_str()), ("e", "OrderApproved"));
        assert_eq!(event.headers["traceparent"], "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
        assert!(matches!(decode(&entry(None)), Err(NotificationError::Deleted)));
        let err = decode(&entry(Some(&[("hello", "world")]))).expect_err("not an event");
        assert_eq!(err.to_string(), "the entry is not an outbox event: stream entry has no `event_id` field");
        assert!(err.rejects_entry());
    }

    #[test]
    fn the_trace_context_is_taken_from_the_event_headers() {
        let headers = BTreeMap::from([
            ("traceparent".to_owned(), "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_owned()),
            ("tracestate".to_owned(), "vendor=1".to_owned()),
            ("saga_id".to_owned(), "shop/order-1".to_owned()),
        ]);
        let context = trace_context(&headers);
        assert_eq!(context.len(), 2);
        assert_eq!(context["traceparent"], "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
        assert_eq!(context["tracestate"], "vendor=1");
        let unusable = BTreeMap::from([("traceparent".to_owned(), "line\nbreak".to_owned())]);
        assert!(trace_context(&unusable).is_empty());
    }

    #[test]
    fn outcomes_have_the_documented_labels() {
        let labels = [Outcome::Processed, Outcome::Duplicate, Outcome::DeadLettered].map(Outcome::label);
        assert_eq!(labels, ["processed", "duplicate", "dead_lettered"]);
    }
}
