//! Publishing claimed rows to Redis Streams: one pipelined `XADD` per row, each row's answer read on its own, so
//! one rejected entry fails only its row.

use redis::{RedisError, aio::ConnectionManager};
use uuid::Uuid;

use super::{settings::Settings, store::ClaimedRow};

/// What became of one row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// On the stream under this entry id.
    Published(String),
    /// Redis refused this entry (e.g. `WRONGTYPE`: the stream's key holds something else); the row is retried and
    /// eventually dead-lettered.
    Rejected(String),
}

/// Error codes that say Redis as a whole cannot take writes right now, whatever the entry: a row is not to blame
/// for them, so they cost no attempt.
const SERVER_UNAVAILABLE: [&str; 8] =
    ["OOM", "LOADING", "READONLY", "MASTERDOWN", "BUSY", "TRYAGAIN", "CLUSTERDOWN", "NOREPLICAS"];

/// Whether a per-entry error is about Redis rather than the entry.
pub fn server_unavailable(error: &RedisError) -> bool {
    error.code().is_some_and(|code| SERVER_UNAVAILABLE.contains(&code))
}

/// XADDs every row; `Err` when the pipeline as a whole failed or Redis cannot take writes, so nothing can be
/// said about any row.
pub async fn publish(
    redis: &mut ConnectionManager,
    settings: &Settings,
    rows: &[ClaimedRow],
) -> Result<Vec<(Uuid, Outcome)>, RedisError> {
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    for row in rows {
        let event = stream_event(row);
        let cmd = pipe.cmd("XADD").arg(settings.route.stream(&row.aggregate_type));
        if let Some(max_len) = settings.max_len {
            cmd.arg("MAXLEN").arg("~").arg(max_len);
        }
        cmd.arg("*");
        for (field, value) in event.to_fields() {
            cmd.arg(field).arg(value);
        }
    }
    let answers: Vec<Result<String, RedisError>> = pipe.query_async(redis).await?;
    let mut outcomes = Vec::with_capacity(rows.len());
    for (row, answer) in rows.iter().zip(answers) {
        match answer {
            Ok(entry) => outcomes.push((row.id, Outcome::Published(entry))),
            Err(err) if server_unavailable(&err) || err.is_io_error() || err.is_connection_dropped() => {
                return Err(err);
            }
            Err(err) => outcomes.push((row.id, Outcome::Rejected(err.to_string()))),
        }
    }
    Ok(outcomes)
}

/// The stream entry of a row; string headers travel as fields, others are left out.
fn stream_event(row: &ClaimedRow) -> kubesaga_events::StreamEvent {
    let headers = row
        .headers
        .as_object()
        .map(|h| h.iter().filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_owned()))).collect())
        .unwrap_or_default();
    kubesaga_events::StreamEvent {
        event_id: row.id.to_string(),
        event_type: row.event_type.clone(),
        aggregate_type: row.aggregate_type.clone(),
        aggregate_id: row.aggregate_id.clone(),
        payload: row.payload.clone(),
        created_at: row.created_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        headers,
    }
}

#[cfg(test)]
mod tests {
    use chrono::{TimeZone, Utc};
    use serde_json::json;

    use super::*;

    #[test]
    fn a_row_becomes_an_entry_with_its_string_headers() {
        let row = ClaimedRow {
            id: Uuid::from_u128(7),
            seq: 1,
            aggregate_type: "order".into(),
            aggregate_id: "42".into(),
            event_type: "OrderApproved".into(),
            payload: r#"{"id":"42"}"#.into(),
            headers: json!({"traceparent": "00-a-b-01", "saga_id": "shop/s", "retries": 3}),
            created_at: Utc.with_ymd_and_hms(2026, 11, 26, 5, 0, 0).single().expect("time"),
            attempts: 0,
        };
        let event = stream_event(&row);
        assert_eq!(event.event_id, "00000000-0000-0000-0000-000000000007");
        assert_eq!(event.created_at, "2026-11-26T05:00:00.000000Z");
        assert_eq!(event.headers.keys().collect::<Vec<_>>(), ["saga_id", "traceparent"]);
        assert_eq!(event.payload, r#"{"id":"42"}"#);
    }
}
