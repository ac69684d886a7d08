//! The relay's status, computed without I/O from what the worker observed: conditions, counts, and the Events a
//! change deserves. The worker decides with [`due`] whether a new status is worth a write, which bounds the write
//! rate however busy the relay is.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use super::store::Stats;
use crate::{
    conditions::{self, Status},
    crd::OutboxRelayStatus,
    recorder::Notice,
};

/// Condition types of a relay.
pub mod types {
    /// True while the relay reaches its database and Redis and relays rows.
    pub const READY: &str = "Ready";
    /// True while rows wait longer than `stalePendingAfter`.
    pub const DEGRADED: &str = "Degraded";
}

/// Reasons of the conditions; also the reasons of the Events of their transitions.
pub mod reasons {
    /// Connected and relaying.
    pub const RELAYING: &str = "Relaying";
    /// Not connected yet.
    pub const STARTING: &str = "Starting";
    /// A Secret or key the spec names does not exist.
    pub const SECRET_NOT_FOUND: &str = "SecretNotFound";
    /// Postgres cannot be reached or the table is missing.
    pub const DATABASE_UNAVAILABLE: &str = "DatabaseUnavailable";
    /// Redis cannot be reached or cannot take writes.
    pub const REDIS_UNAVAILABLE: &str = "RedisUnavailable";
    /// The oldest PENDING row is older than `stalePendingAfter`.
    pub const STALE_PENDING: &str = "StalePending";
    /// Nothing waits too long.
    pub const AS_EXPECTED: &str = "AsExpected";
    /// Rows moved to the dead-letter table (an Event reason only).
    pub const DEAD_LETTERED: &str = "DeadLettered";
}

/// Longest a changed count waits before it is written; condition changes are written at once.
pub const STATUS_PERIOD: Duration = Duration::from_secs(10);

/// Whether the relay is connected, as the worker last saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Connection {
    /// Not tried yet.
    Starting,
    /// Both stores answer.
    Up,
    /// One does not: the reason (one of [`reasons`]) and what to fix.
    Down(&'static str, String),
}

/// What the worker saw since the last status.
#[derive(Clone, Debug, PartialEq)]
pub struct Observation {
    /// Connection state.
    pub connection: Connection,
    /// Counts, when the database answered.
    pub stats: Option<Stats>,
    /// Events published since the status in `before` (added to its total).
    pub published: u64,
    /// When the last one was.
    pub last_published_at: Option<Time>,
    /// The latest error, if the latest attempt failed.
    pub last_error: Option<String>,
}

/// The status after `observation`, and the Events of the condition changes.
pub fn next(
    before: &OutboxRelayStatus,
    generation: Option<i64>,
    stale_after: Duration,
    observation: &Observation,
    now: &Time,
) -> (OutboxRelayStatus, Vec<Notice>) {
    let mut status = before.clone();
    status.observed_generation = generation;
    let mut notes = Vec::new();

    let (ready, ready_reason, ready_message) = match &observation.connection {
        Connection::Starting => (Status::Unknown, reasons::STARTING, "connecting to the database and Redis".to_owned()),
        Connection::Up => (Status::True, reasons::RELAYING, "relaying rows to Redis".to_owned()),
        Connection::Down(reason, message) => (Status::False, *reason, message.clone()),
    };
    let was_ready = conditions::get(&before.conditions, types::READY).map(|c| (c.status.clone(), c.reason.clone()));
    match &observation.connection {
        Connection::Down(reason, message) if was_ready.as_ref().is_none_or(|(_, r)| r != reason) => {
            notes.push(Notice { warning: true, reason, action: None, message: message.clone() })
        }
        Connection::Up if was_ready.as_ref().is_none_or(|(s, _)| s != "True") => notes.push(Notice {
            warning: false,
            reason: reasons::RELAYING,
            action: None,
            message: ready_message.clone(),
        }),
        _ => {}
    }
    conditions::set(&mut status.conditions, types::READY, ready, ready_reason, ready_message, generation, now);

    if let Some(stats) = &observation.stats {
        status.pending = Some(stats.pending);
        status.processing = Some(stats.processing);
        status.dead_lettered = Some(stats.dead_lettered);
        status.oldest_pending_age = stats.oldest_pending_seconds.map(age_text);
        let oldest = stats.oldest_pending_seconds.unwrap_or(0.0);
        let stale = oldest > stale_after.as_secs_f64();
        let was_stale = conditions::get(&before.conditions, types::DEGRADED).is_some_and(|c| c.status == "True");
        let (degraded, reason, message) = if stale {
            let message = format!(
                "the oldest of {} PENDING rows is {} old, more than stalePendingAfter ({}); \
                 check Ready and lastError, and the rows' next_attempt_at",
                stats.pending,
                age_text(oldest),
                age_text(stale_after.as_secs_f64())
            );
            (Status::True, reasons::STALE_PENDING, message)
        } else {
            (Status::False, reasons::AS_EXPECTED, "no row waits longer than stalePendingAfter".to_owned())
        };
        if stale && !was_stale {
            notes.push(Notice {
                warning: true,
                reason: reasons::STALE_PENDING,
                action: None,
                message: message.clone(),
            });
        } else if !stale && was_stale {
            notes.push(Notice {
                warning: false,
                reason: reasons::AS_EXPECTED,
                action: None,
                message: "the stale rows were published".into(),
            });
        }
        conditions::set(&mut status.conditions, types::DEGRADED, degraded, reason, message, generation, now);
    } else if conditions::get(&status.conditions, types::DEGRADED).is_none() {
        let message = "not measured yet".to_owned();
        conditions::set(
            &mut status.conditions,
            types::DEGRADED,
            Status::Unknown,
            reasons::STARTING,
            message,
            generation,
            now,
        );
    }

    if observation.published > 0 {
        let total = before
            .published_total
            .unwrap_or(0)
            .saturating_add(i64::try_from(observation.published).unwrap_or(i64::MAX));
        status.published_total = Some(total);
    } else if status.published_total.is_none() {
        status.published_total = Some(0);
    }
    if observation.last_published_at.is_some() {
        status.last_published_at = observation.last_published_at.clone();
    }
    if let Some(error) = &observation.last_error {
        status.last_error = Some(error.chars().take(512).collect());
    } else if observation.connection == Connection::Up {
        status.last_error = None;
    }
    (status, notes)
}

/// Whether `after` should be written now, `since_write` after the last write of `before`: at once when a condition
/// changed status or reason or the spec generation moved, otherwise at most once per [`STATUS_PERIOD`] and only
/// when something changed.
pub fn due(before: &OutboxRelayStatus, after: &OutboxRelayStatus, since_write: Duration) -> bool {
    let key = |c: &Condition| (c.type_.clone(), c.status.clone(), c.reason.clone());
    let conditions_before: Vec<_> = before.conditions.iter().map(key).collect();
    let conditions_after: Vec<_> = after.conditions.iter().map(key).collect();
    if conditions_before != conditions_after || before.observed_generation != after.observed_generation {
        return true;
    }
    since_write >= STATUS_PERIOD && before != after
}

/// `3725.4` → `1h2m5s`; ages under a minute keep whole seconds.
fn age_text(seconds: f64) -> String {
    let total = seconds.max(0.0) as u64;
    let (h, m, s) = (total / 3600, total / 60 % 60, total % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m{s}s"),
        _ => format!("{h}h{m}m{s}s"),
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::jiff::Timestamp;

    use super::*;

    const STALE: Duration = Duration::from_secs(60);

    fn at(seconds: i64) -> Time {
        Time(Timestamp::from_second(seconds).expect("timestamp"))
    }

    fn stats(pending: i64, oldest: Option<f64>) -> Stats {
        Stats { pending, processing: 0, oldest_pending_seconds: oldest, dead_lettered: 0 }
    }

    fn up(stats: Stats) -> Observation {
        Observation {
            connection: Connection::Up,
            stats: Some(stats),
            published: 0,
            last_published_at: None,
            last_error: None,
        }
    }

    fn condition<'a>(status: &'a OutboxRelayStatus, type_: &str) -> (&'a str, &'a str) {
        let c = conditions::get(&status.conditions, type_).expect("condition");
        (c.status.as_str(), c.reason.as_str())
    }

    #[test]
    fn the_first_status_sets_both_conditions_even_before_connecting() {
        let starting = Observation {
            connection: Connection::Starting,
            stats: None,
            published: 0,
            last_published_at: None,
            last_error: None,
        };
        let (status, notes) = next(&OutboxRelayStatus::default(), Some(1), STALE, &starting, &at(0));
        assert_eq!(condition(&status, types::READY), ("Unknown", reasons::STARTING));
        assert_eq!(condition(&status, types::DEGRADED), ("Unknown", reasons::STARTING));
        assert_eq!(status.observed_generation, Some(1));
        assert_eq!(status.published_total, Some(0));
        assert!(notes.is_empty());
    }

    #[test]
    fn connecting_is_announced_once() {
        let (status, notes) = next(&OutboxRelayStatus::default(), Some(1), STALE, &up(stats(0, None)), &at(0));
        assert_eq!(condition(&status, types::READY), ("True", reasons::RELAYING));
        assert_eq!(notes.iter().map(|n| (n.warning, n.reason)).collect::<Vec<_>>(), [(false, reasons::RELAYING)]);
        let (_, again) = next(&status, Some(1), STALE, &up(stats(0, None)), &at(1));
        assert!(again.is_empty());
    }

    #[test]
    fn an_outage_is_a_warning_per_reason_and_keeps_the_counts() {
        let (ready, _) = next(&OutboxRelayStatus::default(), Some(1), STALE, &up(stats(3, Some(1.0))), &at(0));
        let down = Observation {
            connection: Connection::Down(reasons::REDIS_UNAVAILABLE, "cannot reach Redis".into()),
            stats: None,
            published: 0,
            last_published_at: None,
            last_error: Some("connection refused".into()),
        };
        let (status, notes) = next(&ready, Some(1), STALE, &down, &at(5));
        assert_eq!(condition(&status, types::READY), ("False", reasons::REDIS_UNAVAILABLE));
        assert_eq!(
            notes,
            [Notice {
                warning: true,
                reason: reasons::REDIS_UNAVAILABLE,
                action: None,
                message: "cannot reach Redis".into()
            }]
        );
        assert_eq!(status.pending, Some(3), "counts survive an observation without them");
        assert_eq!(status.last_error.as_deref(), Some("connection refused"));
        let (still, notes) = next(&status, Some(1), STALE, &down, &at(6));
        assert!(notes.is_empty(), "the same outage is not announced again");
        let (back, notes) = next(&still, Some(1), STALE, &up(stats(0, None)), &at(7));
        assert_eq!(condition(&back, types::READY), ("True", reasons::RELAYING));
        assert_eq!(back.last_error, None, "a success clears the error");
        assert_eq!(notes.len(), 1);
    }

    #[test]
    fn stale_pending_degrades_and_clears_when_drained() {
        let (fresh, _) = next(&OutboxRelayStatus::default(), Some(1), STALE, &up(stats(2, Some(59.0))), &at(0));
        assert_eq!(condition(&fresh, types::DEGRADED), ("False", reasons::AS_EXPECTED));
        let (stale, notes) = next(&fresh, Some(1), STALE, &up(stats(2, Some(61.0))), &at(2));
        assert_eq!(condition(&stale, types::DEGRADED), ("True", reasons::STALE_PENDING));
        assert_eq!(stale.oldest_pending_age.as_deref(), Some("1m1s"));
        assert!(notes.iter().any(|n| n.warning && n.reason == reasons::STALE_PENDING), "{notes:?}");
        let (_, notes) = next(&stale, Some(1), STALE, &up(stats(2, Some(90.0))), &at(30));
        assert!(notes.is_empty(), "staying stale is not announced again");
        let (drained, notes) = next(&stale, Some(1), STALE, &up(stats(0, None)), &at(31));
        assert_eq!(condition(&drained, types::DEGRADED), ("False", reasons::AS_EXPECTED));
        assert_eq!(drained.oldest_pending_age, None);
        assert!(notes.iter().any(|n| !n.warning && n.reason == reasons::AS_EXPECTED));
    }

    #[test]
    fn published_counts_accumulate_across_statuses() {
        let mut observation = up(stats(0, None));
        observation.published = 5;
        observation.last_published_at = Some(at(3));
        let (first, _) = next(&OutboxRelayStatus::default(), Some(1), STALE, &observation, &at(3));
        observation.published = 7;
        let (second, _) = next(&first, Some(1), STALE, &observation, &at(4));
        assert_eq!(second.published_total, Some(12));
        assert_eq!(second.last_published_at, Some(at(3)));
    }

    #[test]
    fn writes_are_immediate_for_conditions_and_periodic_for_counts() {
        let (before, _) = next(&OutboxRelayStatus::default(), Some(1), STALE, &up(stats(0, None)), &at(0));
        let (busier, _) = next(&before, Some(1), STALE, &up(stats(50, Some(1.0))), &at(1));
        assert!(!due(&before, &busier, Duration::from_secs(1)), "counts wait for the period");
        assert!(due(&before, &busier, STATUS_PERIOD));
        assert!(!due(&before, &before, STATUS_PERIOD), "nothing changed, nothing written");
        let (stale, _) = next(&before, Some(1), STALE, &up(stats(50, Some(120.0))), &at(1));
        assert!(due(&before, &stale, Duration::ZERO), "a condition change is written at once");
        let (respecified, _) = next(&before, Some(2), STALE, &up(stats(0, None)), &at(1));
        assert!(due(&before, &respecified, Duration::ZERO), "a new generation is acknowledged at once");
    }

    #[test]
    fn ages_read_like_durations() {
        assert_eq!(age_text(0.4), "0s");
        assert_eq!(age_text(59.9), "59s");
        assert_eq!(age_text(61.0), "1m1s");
        assert_eq!(age_text(3725.4), "1h2m5s");
        assert_eq!(age_text(-3.0), "0s");
    }
}
