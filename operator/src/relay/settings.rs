//! What one relay worker runs with, derived from an `OutboxRelay` spec without any I/O: quoted table names, the
//! NOTIFY channel, the stream of each row, and the wait before a row's next attempt.

use std::time::Duration;

use crate::crd::OutboxRelaySpec;

/// A relay's settings.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// The outbox table, quoted for SQL (`"public"."outbox"`).
    pub table: String,
    /// The dead-letter table, quoted for SQL.
    pub dead_letter_table: String,
    /// The channel the outbox migration's trigger notifies: `outbox_<table name without schema>`.
    pub channel: String,
    /// Where each row goes.
    pub route: Route,
    /// `XADD MAXLEN ~` bound, if any.
    pub max_len: Option<i64>,
    /// Rows per claim.
    pub batch_size: i64,
    /// Longest sleep without a notification.
    pub poll_interval: Duration,
    /// Whether to LISTEN for the trigger's notifications.
    pub listen_notify: bool,
    /// Age at which a claim is presumed dead.
    pub processing_timeout: Duration,
    /// Attempts before a row is dead-lettered.
    pub max_attempts: i32,
    /// First wait after a failed attempt.
    pub backoff_initial: Duration,
    /// Longest wait after a failed attempt.
    pub backoff_max: Duration,
    /// Age at which PUBLISHED rows are deleted.
    pub published_retention: Duration,
    /// Age of the oldest PENDING row that makes the relay Degraded.
    pub stale_pending_after: Duration,
}

/// How a row's stream is chosen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// Every row to this stream.
    Fixed(String),
    /// `<prefix><aggregate_type>`.
    Prefix(String),
}

impl Route {
    /// The stream of a row with this aggregate type.
    pub fn stream(&self, aggregate_type: &str) -> String {
        match self {
            Self::Fixed(stream) => stream.clone(),
            Self::Prefix(prefix) => kubesaga_events::stream_for(prefix, aggregate_type),
        }
    }
}

impl Settings {
    /// The settings of `spec`. The API server's schema already holds the table names to lower-case identifiers and
    /// requires exactly one stream field; quoting here keeps the SQL safe even for an object that skipped it.
    pub fn from_spec(spec: &OutboxRelaySpec) -> Self {
        let route = match (&spec.destination.stream, &spec.destination.stream_prefix) {
            (Some(stream), _) => Route::Fixed(stream.clone()),
            (None, Some(prefix)) => Route::Prefix(prefix.clone()),
            (None, None) => Route::Prefix(String::new()),
        };
        let unqualified = spec.table.rsplit('.').next().unwrap_or(&spec.table);
        Self {
            table: quote_table(&spec.table),
            dead_letter_table: quote_table(&spec.dead_letter_table),
            channel: format!("outbox_{unqualified}"),
            route,
            max_len: spec.destination.max_len,
            batch_size: i64::from(spec.batch_size),
            poll_interval: spec.poll_interval.get(),
            listen_notify: spec.listen_notify,
            processing_timeout: spec.processing_timeout.get(),
            max_attempts: i32::try_from(spec.max_attempts).unwrap_or(i32::MAX),
            backoff_initial: spec.backoff.initial.get(),
            backoff_max: spec.backoff.max.get(),
            published_retention: spec.published_retention.get(),
            stale_pending_after: spec.stale_pending_after.get(),
        }
    }

    /// The wait before the next attempt of row `id` after its `attempts`-th failure: `initial · 2^(attempts-1)`, at
    /// most `max`, minus up to a quarter drawn from the row id. Deterministic per row, so a test can predict it, and
    /// spread across rows, so a burst of failures does not retry in lockstep.
    pub fn retry_delay(&self, attempts: i32, id: &uuid::Uuid) -> Duration {
        let doublings = attempts.saturating_sub(1).clamp(0, 32) as u32;
        let full = self.backoff_initial.saturating_mul(2u32.saturating_pow(doublings)).min(self.backoff_max);
        let fraction = f64::from(id.as_bytes()[15]) / 255.0 * 0.25;
        full.mul_f64(1.0 - fraction)
    }

    /// Whether a row that has failed `attempts` times is out of attempts.
    pub fn exhausted(&self, attempts: i32) -> bool {
        attempts >= self.max_attempts
    }
}

/// `a.b` → `"a"."b"`, doubling any quote inside a part.
fn quote_table(name: &str) -> String {
    name.split('.').map(|part| format!("\"{}\"", part.replace('"', "\"\""))).collect::<Vec<_>>().join(".")
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use uuid::Uuid;

    use super::*;

    fn spec(extra: serde_json::Value) -> OutboxRelaySpec {
        let mut spec = json!({
            "database": {"secretKeyRef": {"name": "db"}},
            "destination": {"redis": {"secretKeyRef": {"name": "redis"}}, "streamPrefix": "events."}
        });
        if let (Some(base), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
            for (k, v) in extra {
                base.insert(k.clone(), v.clone());
            }
        }
        serde_json::from_value(spec).expect("spec")
    }

    #[test]
    fn tables_are_quoted_and_the_channel_follows_the_trigger() {
        let settings = Settings::from_spec(&spec(json!({"table": "shop.outbox", "deadLetterTable": "dead"})));
        assert_eq!(settings.table, r#""shop"."outbox""#);
        assert_eq!(settings.dead_letter_table, r#""dead""#);
        assert_eq!(settings.channel, "outbox_outbox");
        assert_eq!(quote_table(r#"we"ird"#), r#""we""ird""#);
    }

    #[test]
    fn streams_are_fixed_or_derived_from_the_aggregate_type() {
        let derived = Settings::from_spec(&spec(json!({})));
        assert_eq!(derived.route.stream("order"), "events.order");
        let fixed = Settings::from_spec(&spec(json!({
            "destination": {"redis": {"secretKeyRef": {"name": "redis"}}, "stream": "all-events"}
        })));
        assert_eq!(fixed.route.stream("order"), "all-events");
        assert_eq!(fixed.route.stream("payment"), "all-events");
    }

    #[test]
    fn retry_delay_doubles_up_to_the_cap_with_at_most_a_quarter_of_jitter() {
        let settings = Settings::from_spec(&spec(json!({"backoff": {"initial": "1s", "max": "10s"}})));
        let steady = Uuid::from_bytes([0; 16]);
        let expected = [1, 2, 4, 8, 10, 10, 10].map(Duration::from_secs);
        for (attempts, want) in (1..).zip(expected) {
            assert_eq!(settings.retry_delay(attempts, &steady), want, "attempt {attempts}");
        }
        let jittered = Uuid::from_bytes([255; 16]);
        assert_eq!(settings.retry_delay(1, &jittered), Duration::from_millis(750));
        for attempts in [0, 1, 5, 40, i32::MAX] {
            let delay = settings.retry_delay(attempts, &Uuid::new_v4());
            assert!(delay >= Duration::from_millis(750) && delay <= Duration::from_secs(10), "{attempts}: {delay:?}");
        }
    }

    #[test]
    fn a_row_is_exhausted_at_max_attempts() {
        let settings = Settings::from_spec(&spec(json!({"maxAttempts": 3})));
        assert!(!settings.exhausted(2));
        assert!(settings.exhausted(3));
    }
}
