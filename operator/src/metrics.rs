//! Prometheus metrics of the operator, through the `metrics` facade (a no-op until a recorder is installed, so
//! library users and tests pay nothing).

use std::time::Duration;

use metrics::{counter, gauge, histogram};

use crate::{crd::SagaPhase, saga::policy::CallKind};

/// Names of the metrics, for dashboards and tests.
pub mod names {
    /// Gauge: sagas by phase.
    pub const SAGAS: &str = "kubesaga_sagas";
    /// Counter: calls made, by kind and result.
    pub const CALLS: &str = "kubesaga_step_calls_total";
    /// Histogram: duration of one call attempt in seconds, by kind and result.
    pub const CALL_DURATION: &str = "kubesaga_step_duration_seconds";
    /// Counter: retries scheduled, by kind.
    pub const RETRIES: &str = "kubesaga_step_retries_total";
    /// Counter: sagas that finished, by phase and reason.
    pub const FINISHED: &str = "kubesaga_sagas_finished_total";
    /// Counter: compensations that gave up.
    pub const COMPENSATION_FAILURES: &str = "kubesaga_compensation_failures_total";
    /// Counter: reconcile errors, by error label.
    pub const RECONCILE_ERRORS: &str = "kubesaga_reconcile_errors_total";
    /// Histogram: reconcile duration in seconds.
    pub const RECONCILE_DURATION: &str = "kubesaga_reconcile_duration_seconds";
    /// Counter: writes to the API server, by kind (status, finalizer, delete, event).
    pub const API_WRITES: &str = "kubesaga_api_writes_total";
    /// Counter: calls held back by a target's concurrency limit or open circuit.
    pub const CALLS_HELD: &str = "kubesaga_calls_held_total";
}

/// Records one call attempt.
pub fn call(kind: CallKind, result: &'static str, took: Duration) {
    counter!(names::CALLS, "kind" => kind.as_str(), "result" => result).increment(1);
    histogram!(names::CALL_DURATION, "kind" => kind.as_str(), "result" => result).record(took.as_secs_f64());
}

/// Records a retry being scheduled.
pub fn retry(kind: CallKind) {
    counter!(names::RETRIES, "kind" => kind.as_str()).increment(1);
}

/// Records a saga reaching a terminal phase.
pub fn finished(phase: SagaPhase, reason: &'static str) {
    counter!(names::FINISHED, "phase" => phase_label(phase), "reason" => reason).increment(1);
}

/// Records a compensation that exhausted its retries.
pub fn compensation_failed() {
    counter!(names::COMPENSATION_FAILURES).increment(1);
}

/// Records a failed reconcile.
pub fn reconcile_error(label: &'static str) {
    counter!(names::RECONCILE_ERRORS, "error" => label).increment(1);
}

/// Records how long a reconcile took.
pub fn reconcile_duration(took: Duration) {
    histogram!(names::RECONCILE_DURATION).record(took.as_secs_f64());
}

/// Records a write to the API server.
pub fn api_write(kind: &'static str) {
    counter!(names::API_WRITES, "kind" => kind).increment(1);
}

/// Records a call held back by a target's limit.
pub fn call_held() {
    counter!(names::CALLS_HELD).increment(1);
}

/// Sets the number of sagas in each phase.
pub fn sagas_by_phase(counts: &[(SagaPhase, usize)]) {
    for (phase, count) in counts {
        gauge!(names::SAGAS, "phase" => phase_label(*phase)).set(*count as f64);
    }
}

fn phase_label(phase: SagaPhase) -> &'static str {
    match phase {
        SagaPhase::Pending => "Pending",
        SagaPhase::Running => "Running",
        SagaPhase::Compensating => "Compensating",
        SagaPhase::Succeeded => "Succeeded",
        SagaPhase::Compensated => "Compensated",
        SagaPhase::Failed => "Failed",
    }
}

/// Metrics of the outbox relays, labelled `relay="<namespace>/<name>"`.
pub mod relay {
    use metrics::{counter, gauge, histogram};

    use crate::relay::store::Stats;

    /// Counter: events published.
    pub const PUBLISHED: &str = "kubesaga_outbox_published_total";
    /// Counter: publishes Redis refused for the entry (the row is retried or dead-lettered).
    pub const PUBLISH_FAILURES: &str = "kubesaga_outbox_publish_failures_total";
    /// Counter: rows moved to the dead-letter table.
    pub const DEAD_LETTERED: &str = "kubesaga_outbox_dead_lettered_total";
    /// Counter: claims given back because their relay took longer than `processingTimeout` (zombie recovery).
    pub const RECOVERED: &str = "kubesaga_outbox_recovered_total";
    /// Counter: PUBLISHED rows deleted after `publishedRetention`.
    pub const PURGED: &str = "kubesaga_outbox_purged_total";
    /// Gauge: PENDING rows.
    pub const PENDING: &str = "kubesaga_outbox_pending";
    /// Gauge: PROCESSING rows.
    pub const PROCESSING: &str = "kubesaga_outbox_processing";
    /// Gauge: age of the oldest PENDING row in seconds (0 when none).
    pub const OLDEST_PENDING: &str = "kubesaga_outbox_oldest_pending_seconds";
    /// Gauge: 1 while the oldest PENDING row is older than `stalePendingAfter` (the stale-pending alert).
    pub const STALE: &str = "kubesaga_outbox_stale";
    /// Gauge: 1 while the relay reaches its database and Redis.
    pub const UP: &str = "kubesaga_outbox_up";
    /// Histogram: seconds from an event's commit to its entry on the stream.
    pub const LAG: &str = "kubesaga_outbox_publish_lag_seconds";

    /// Records published events and their commit-to-stream lags.
    pub fn published(relay: &str, lags: impl Iterator<Item = f64>) {
        let lag = histogram!(LAG, "relay" => relay.to_owned());
        let mut n = 0;
        for seconds in lags {
            lag.record(seconds);
            n += 1;
        }
        counter!(PUBLISHED, "relay" => relay.to_owned()).increment(n);
    }

    /// Records publishes refused for their entry.
    pub fn publish_failures(relay: &str, n: u64) {
        counter!(PUBLISH_FAILURES, "relay" => relay.to_owned()).increment(n);
    }

    /// Records rows dead-lettered.
    pub fn dead_lettered(relay: &str, n: u64) {
        counter!(DEAD_LETTERED, "relay" => relay.to_owned()).increment(n);
    }

    /// Records zombie claims given back.
    pub fn recovered(relay: &str, n: u64) {
        counter!(RECOVERED, "relay" => relay.to_owned()).increment(n);
    }

    /// Records PUBLISHED rows deleted.
    pub fn purged(relay: &str, n: u64) {
        counter!(PURGED, "relay" => relay.to_owned()).increment(n);
    }

    /// Sets the gauges from fresh counts.
    pub fn stats(relay: &str, stats: &Stats, stale: bool) {
        gauge!(PENDING, "relay" => relay.to_owned()).set(stats.pending as f64);
        gauge!(PROCESSING, "relay" => relay.to_owned()).set(stats.processing as f64);
        gauge!(OLDEST_PENDING, "relay" => relay.to_owned()).set(stats.oldest_pending_seconds.unwrap_or(0.0));
        gauge!(STALE, "relay" => relay.to_owned()).set(if stale { 1.0 } else { 0.0 });
    }

    /// Sets whether the relay is connected.
    pub fn up(relay: &str, up: bool) {
        gauge!(UP, "relay" => relay.to_owned()).set(if up { 1.0 } else { 0.0 });
    }
}
