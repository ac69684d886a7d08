//! The one definition of how an outbox event travels on a Redis stream. The OutboxRelay writes entries with
//! [`StreamEvent::to_fields`]; consumers read them back with [`StreamEvent::from_fields`]. Keeping both sides in
//! one place is what lets a field be renamed without silently breaking the other side.

use std::collections::BTreeMap;

/// Stream entry field holding the event id (the outbox row's uuid): consumers deduplicate on it.
pub const EVENT_ID: &str = "event_id";
/// Stream entry field holding what happened, e.g. `OrderApproved`.
pub const EVENT_TYPE: &str = "event_type";
/// Stream entry field holding the kind of aggregate, e.g. `order`.
pub const AGGREGATE_TYPE: &str = "aggregate_type";
/// Stream entry field holding the aggregate's id.
pub const AGGREGATE_ID: &str = "aggregate_id";
/// Stream entry field holding the payload as JSON text.
pub const PAYLOAD: &str = "payload";
/// Stream entry field holding when the event was committed (RFC 3339).
pub const CREATED_AT: &str = "created_at";

const RESERVED: [&str; 6] = [EVENT_ID, EVENT_TYPE, AGGREGATE_TYPE, AGGREGATE_ID, PAYLOAD, CREATED_AT];

/// An outbox event as it sits on a stream.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StreamEvent {
    /// The outbox row's id.
    pub event_id: String,
    /// What happened.
    pub event_type: String,
    /// Kind of aggregate.
    pub aggregate_type: String,
    /// Id of the aggregate.
    pub aggregate_id: String,
    /// The payload, JSON text exactly as the outbox stored it.
    pub payload: String,
    /// Commit time of the outbox row, RFC 3339.
    pub created_at: String,
    /// The outbox row's string headers (`traceparent`, `saga_id`, …), one field each. A header named like one of
    /// the fields above is not carried, so it can never shadow them.
    pub headers: BTreeMap<String, String>,
}

/// Why a stream entry is not an outbox event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// A required field is absent.
    #[error("stream entry has no `{0}` field")]
    Missing(&'static str),
    /// A field's value is not UTF-8.
    #[error("stream entry field `{0}` is not UTF-8")]
    NotUtf8(String),
}

impl StreamEvent {
    /// The entry's fields, in a fixed order, for `XADD`.
    pub fn to_fields(&self) -> Vec<(&str, &str)> {
        let mut fields = vec![
            (EVENT_ID, self.event_id.as_str()),
            (EVENT_TYPE, self.event_type.as_str()),
            (AGGREGATE_TYPE, self.aggregate_type.as_str()),
            (AGGREGATE_ID, self.aggregate_id.as_str()),
            (PAYLOAD, self.payload.as_str()),
            (CREATED_AT, self.created_at.as_str()),
        ];
        fields.extend(
            self.headers.iter().filter(|(k, _)| !RESERVED.contains(&k.as_str())).map(|(k, v)| (k.as_str(), v.as_str())),
        );
        fields
    }

    /// Reads an entry's fields back; `created_at` may be absent, every other named field is required.
    pub fn from_fields<K, V>(fields: impl IntoIterator<Item = (K, V)>) -> Result<Self, DecodeError>
    where
        K: AsRef<[u8]>,
        V: AsRef<[u8]>,
    {
        let mut all = BTreeMap::new();
        for (key, value) in fields {
            let key = String::from_utf8_lossy(key.as_ref()).into_owned();
            let value = match std::str::from_utf8(value.as_ref()) {
                Ok(value) => value.to_owned(),
                Err(_) => return Err(DecodeError::NotUtf8(key)),
            };
            all.insert(key, value);
        }
        let mut take = |name: &'static str| all.remove(name).ok_or(DecodeError::Missing(name));
        Ok(Self {
            event_id: take(EVENT_ID)?,
            event_type: take(EVENT_TYPE)?,
            aggregate_type: take(AGGREGATE_TYPE)?,
            aggregate_id: take(AGGREGATE_ID)?,
            payload: take(PAYLOAD)?,
            created_at: take(CREATED_AT).unwrap_or_default(),
            headers: all,
        })
    }
}

/// The stream an event goes to when the relay derives it from the aggregate type: `<prefix><aggregate_type>`.
pub fn stream_for(prefix: &str, aggregate_type: &str) -> String {
    format!("{prefix}{aggregate_type}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> StreamEvent {
        StreamEvent {
            event_id: "0b5c".into(),
            event_type: "OrderApproved".into(),
            aggregate_type: "order".into(),
            aggregate_id: "42".into(),
            payload: r#"{"id":"42"}"#.into(),
            created_at: "2026-11-26T05:00:00Z".into(),
            headers: BTreeMap::from([
                ("traceparent".into(), "00-abc-def-01".into()),
                ("saga_id".into(), "ns/s".into()),
            ]),
        }
    }

    #[test]
    fn round_trips_through_fields() {
        let event = event();
        let fields: Vec<(String, String)> =
            event.to_fields().into_iter().map(|(k, v)| (k.to_owned(), v.to_owned())).collect();
        assert_eq!(StreamEvent::from_fields(fields), Ok(event));
    }

    #[test]
    fn a_header_cannot_shadow_a_field() {
        let mut event = event();
        event.headers.insert(EVENT_ID.into(), "forged".into());
        let ids: Vec<&str> = event.to_fields().into_iter().filter(|(k, _)| *k == EVENT_ID).map(|(_, v)| v).collect();
        assert_eq!(ids, vec!["0b5c"]);
    }

    #[test]
    fn a_missing_field_is_named() {
        let fields = vec![("event_id", "1"), ("event_type", "X"), ("aggregate_type", "order"), ("payload", "{}")];
        assert_eq!(StreamEvent::from_fields(fields), Err(DecodeError::Missing(AGGREGATE_ID)));
    }

    #[test]
    fn non_utf8_values_are_refused_with_the_field() {
        let fields: Vec<(&[u8], &[u8])> = vec![(b"event_id", b"\xff")];
        assert_eq!(StreamEvent::from_fields(fields), Err(DecodeError::NotUtf8(EVENT_ID.into())));
    }

    #[test]
    fn derived_stream_names_join_prefix_and_aggregate_type() {
        assert_eq!(stream_for("events.", "order"), "events.order");
    }
}
