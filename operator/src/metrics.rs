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
