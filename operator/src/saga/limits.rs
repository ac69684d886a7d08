//! Per-target protection: a concurrency limit and a circuit breaker for each service the operator calls, so one
//! slow or dead service cannot occupy every worker or burn the retries of every saga.
//!
//! A target is the scheme and authority of a URL (`http://inventory.shop.svc.cluster.local:80`). A call that is
//! not admitted is not made and not counted as an attempt: the reconciler requeues the saga instead.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::plan::Outcome;

/// Tuning of [`Targets`].
#[derive(Clone, Debug)]
pub struct LimitsConfig {
    /// Calls in flight to one target at most.
    pub max_concurrency: usize,
    /// Consecutive failures (connection errors, timeouts, 5xx) that open a target's circuit.
    pub failure_threshold: u32,
    /// How long an open circuit refuses calls before one probe call is let through.
    pub open_for: Duration,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self { max_concurrency: 32, failure_threshold: 5, open_for: Duration::from_secs(5) }
    }
}

/// Whether a call may go now.
#[derive(Debug)]
pub enum Admission {
    /// Go ahead; hand the permit back to [`Targets::record`] with the outcome.
    Go(Permit),
    /// Do not call now; try again after this long.
    Wait(Duration),
}

/// Held while a call is in flight.
#[derive(Debug)]
pub struct Permit {
    target: String,
    probe: bool,
    _slot: OwnedSemaphorePermit,
}

/// The state of every target the operator has called.
#[derive(Debug)]
pub struct Targets {
    config: LimitsConfig,
    targets: Mutex<HashMap<String, Target>>,
}

#[derive(Debug)]
struct Target {
    slots: Arc<Semaphore>,
    consecutive_failures: u32,
    circuit: Circuit,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Circuit {
    Closed,
    Open {
        until: Instant,
    },
    /// One probe call is in flight; everything else waits for its outcome.
    Probing,
}

/// How long a refused call waits before it asks again when the target is only busy, not failing.
const BUSY_WAIT: Duration = Duration::from_millis(200);

impl Targets {
    /// No target known yet.
    pub fn new(config: LimitsConfig) -> Self {
        Self { config, targets: Mutex::new(HashMap::new()) }
    }

    /// Asks to call `url` now.
    pub fn admit(&self, url: &str) -> Admission {
        self.admit_at(url, Instant::now())
    }

    fn admit_at(&self, url: &str, now: Instant) -> Admission {
        let key = target_of(url);
        let mut targets = self.targets.lock().unwrap_or_else(PoisonError::into_inner);
        let target = targets.entry(key.clone()).or_insert_with(|| Target {
            slots: Arc::new(Semaphore::new(self.config.max_concurrency.max(1))),
            consecutive_failures: 0,
            circuit: Circuit::Closed,
        });
        let probe = match target.circuit {
            Circuit::Closed => false,
            Circuit::Open { until } if now < until => return Admission::Wait(until - now),
            Circuit::Open { .. } => true,
            Circuit::Probing => return Admission::Wait(BUSY_WAIT),
        };
        match Arc::clone(&target.slots).try_acquire_owned() {
            Ok(slot) => {
                if probe {
                    target.circuit = Circuit::Probing;
                }
                Admission::Go(Permit { target: key, probe, _slot: slot })
            }
            Err(_) => Admission::Wait(BUSY_WAIT),
        }
    }

    /// Returns the permit with the call's outcome, which closes or opens the circuit.
    pub fn record(&self, permit: Permit, outcome: &Outcome) {
        self.record_at(permit, outcome, Instant::now());
    }

    fn record_at(&self, permit: Permit, outcome: &Outcome, now: Instant) {
        let mut targets = self.targets.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(target) = targets.get_mut(&permit.target) else { return };
        if is_target_failure(outcome) {
            target.consecutive_failures = target.consecutive_failures.saturating_add(1);
            if permit.probe || target.consecutive_failures >= self.config.failure_threshold {
                target.circuit = Circuit::Open { until: now + self.config.open_for };
            }
        } else {
            target.consecutive_failures = 0;
            target.circuit = Circuit::Closed;
        }
    }

    /// Whether the circuit of `url`'s target is open (for metrics and tests).
    pub fn is_open(&self, url: &str) -> bool {
        let targets = self.targets.lock().unwrap_or_else(PoisonError::into_inner);
        targets.get(&target_of(url)).is_some_and(|t| !matches!(t.circuit, Circuit::Closed))
    }
}

/// Failures that say the service is unwell: no connection, no answer in time, or a 5xx. Throttling (429) and
/// rejections (4xx) are answers from a healthy service.
fn is_target_failure(outcome: &Outcome) -> bool {
    match outcome {
        Outcome::Retryable { http_status, .. } => http_status.is_none_or(|s| s >= 500),
        Outcome::Succeeded { .. } | Outcome::Permanent { .. } => false,
    }
}

/// `scheme://authority` of a URL; the whole string when it does not parse, so it still gets a bucket.
fn target_of(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let authority = rest.split(['/', '?', '#']).next().unwrap_or(rest);
            format!("{}://{}", scheme.to_ascii_lowercase(), authority.to_ascii_lowercase())
        }
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure() -> Outcome {
        Outcome::Retryable { http_status: None, error: "refused".into(), retry_after: None }
    }

    fn success() -> Outcome {
        Outcome::Succeeded { http_status: 200, output: None }
    }

    fn go(admission: Admission) -> Permit {
        match admission {
            Admission::Go(permit) => permit,
            Admission::Wait(d) => panic!("expected to go, told to wait {d:?}"),
        }
    }

    fn config() -> LimitsConfig {
        LimitsConfig { max_concurrency: 2, failure_threshold: 3, open_for: Duration::from_secs(5) }
    }

    #[test]
    fn targets_are_scheme_and_authority() {
        assert_eq!(target_of("http://Inv.shop.svc:80/reserve?x=1"), "http://inv.shop.svc:80");
        assert_eq!(target_of("https://pay.example/a#b"), "https://pay.example");
    }

    #[test]
    fn concurrency_is_limited_per_target() {
        let targets = Targets::new(config());
        let a = go(targets.admit("http://a/x"));
        let _b = go(targets.admit("http://a/y"));
        assert!(matches!(targets.admit("http://a/z"), Admission::Wait(BUSY_WAIT)));
        let _other = go(targets.admit("http://b/x"));
        targets.record(a, &success());
        let _c = go(targets.admit("http://a/z"));
    }

    #[test]
    fn consecutive_failures_open_the_circuit_then_one_probe_decides() {
        let targets = Targets::new(config());
        let t0 = Instant::now();
        for _ in 0..3 {
            let permit = go(targets.admit_at("http://a/", t0));
            targets.record_at(permit, &failure(), t0);
        }
        assert!(targets.is_open("http://a/"));
        match targets.admit_at("http://a/", t0 + Duration::from_secs(1)) {
            Admission::Wait(wait) => assert_eq!(wait, Duration::from_secs(4)),
            Admission::Go(_) => panic!("an open circuit admits nothing"),
        }
        // After the open period one probe goes; the others wait for its outcome.
        let later = t0 + Duration::from_secs(6);
        let probe = go(targets.admit_at("http://a/", later));
        assert!(matches!(targets.admit_at("http://a/", later), Admission::Wait(_)));
        // A failed probe opens the circuit again at once.
        targets.record_at(probe, &failure(), later);
        assert!(matches!(targets.admit_at("http://a/", later), Admission::Wait(_)));
        // A successful probe closes it.
        let probe = go(targets.admit_at("http://a/", later + Duration::from_secs(6)));
        targets.record_at(probe, &success(), later);
        assert!(!targets.is_open("http://a/"));
        let _ = go(targets.admit_at("http://a/", later));
    }

    #[test]
    fn rejections_and_throttling_do_not_count_as_failures() {
        let targets = Targets::new(config());
        for outcome in [
            Outcome::Permanent { http_status: Some(400), error: String::new() },
            Outcome::Retryable { http_status: Some(429), error: String::new(), retry_after: None },
        ] {
            for _ in 0..5 {
                let permit = go(targets.admit("http://a/"));
                targets.record(permit, &outcome);
            }
        }
        assert!(!targets.is_open("http://a/"));
    }
}
