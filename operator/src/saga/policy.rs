//! Effective timeout and retry policy of a call: the call's own settings, else the saga's defaults, else the
//! built-in ones; and the wait before each retry.

use std::{
    hash::{DefaultHasher, Hash, Hasher},
    time::Duration,
};

use crate::crd::{CallPolicy, Duration as SpecDuration, RetryPolicy, SagaSpec};

/// Whether a call performs a step or undoes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CallKind {
    /// The step's action.
    Action,
    /// The step's compensation.
    Compensation,
}

impl CallKind {
    /// The word used in idempotency keys, events and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Action => "action",
            Self::Compensation => "compensate",
        }
    }
}

/// A fully resolved policy.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    /// Timeout of one attempt.
    pub timeout: Duration,
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// Wait before the second attempt.
    pub initial_backoff: Duration,
    /// Longest wait between attempts.
    pub max_backoff: Duration,
    /// Growth factor of the wait.
    pub multiplier: f64,
    /// Fraction of each wait drawn at random.
    pub jitter: f64,
}

impl Policy {
    /// Built-in policy of actions: a few quick retries, since a step that keeps failing should compensate soon.
    pub fn action_default() -> Self {
        Self {
            timeout: Duration::from_secs(10),
            max_attempts: 3,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(10),
            multiplier: 2.0,
            jitter: 0.2,
        }
    }

    /// Built-in policy of compensations: many attempts with a capped wait, because giving up leaves the system
    /// inconsistent until a human steps in.
    pub fn compensation_default() -> Self {
        Self {
            timeout: Duration::from_secs(10),
            max_attempts: 50,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
            multiplier: 2.0,
            jitter: 0.2,
        }
    }

    /// The policy of a call: its own fields over the saga's defaults over the built-in ones.
    pub fn resolve(spec: &SagaSpec, kind: CallKind, own: &CallPolicy) -> Self {
        let (builtin, defaults) = match kind {
            CallKind::Action => (Self::action_default(), spec.defaults.as_ref().and_then(|d| d.action.as_ref())),
            CallKind::Compensation => {
                (Self::compensation_default(), spec.defaults.as_ref().and_then(|d| d.compensation.as_ref()))
            }
        };
        let layers = [Some(own), defaults];
        let retry = |pick: fn(&RetryPolicy) -> Option<f64>| first_retry_field(&layers, pick);
        let duration = |pick: fn(&RetryPolicy) -> Option<&SpecDuration>| {
            layers.iter().flatten().filter_map(|p| p.retry.as_ref()).find_map(pick).map(SpecDuration::get)
        };
        Self {
            timeout: layers
                .iter()
                .flatten()
                .find_map(|p| p.timeout.as_ref())
                .map_or(builtin.timeout, SpecDuration::get),
            max_attempts: first_retry_field(&layers, |r| r.max_attempts).unwrap_or(builtin.max_attempts).max(1),
            initial_backoff: duration(|r| r.initial_backoff.as_ref()).unwrap_or(builtin.initial_backoff),
            max_backoff: duration(|r| r.max_backoff.as_ref()).unwrap_or(builtin.max_backoff),
            multiplier: retry(|r| r.multiplier).unwrap_or(builtin.multiplier).max(1.0),
            jitter: retry(|r| r.jitter).unwrap_or(builtin.jitter).clamp(0.0, 1.0),
        }
    }

    /// The wait after failed attempt number `attempt` (1-based): exponential, capped at `max_backoff`, shortened by
    /// up to `jitter` of itself. The random part is drawn from `seed` so the same saga, call and attempt always wait
    /// the same — the decision stays a pure function and tests can predict it.
    pub fn backoff(&self, attempt: u32, seed: impl Hash) -> Duration {
        let exponent = i32::try_from(attempt.saturating_sub(1)).unwrap_or(i32::MAX);
        let base = self.initial_backoff.as_secs_f64() * self.multiplier.powi(exponent);
        let capped = base.min(self.max_backoff.as_secs_f64());
        let mut hasher = DefaultHasher::new();
        (seed, attempt).hash(&mut hasher);
        // 53 random bits give a uniform fraction in [0, 1).
        let fraction = (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64;
        Duration::from_secs_f64(capped * (1.0 - self.jitter * fraction))
    }
}

/// The first layer's setting of a retry field, the call's own before the saga's defaults.
fn first_retry_field<T>(layers: &[Option<&CallPolicy>], pick: impl Fn(&RetryPolicy) -> Option<T>) -> Option<T> {
    layers.iter().flatten().filter_map(|p| p.retry.as_ref()).find_map(pick)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::CallDefaults;

    fn spec_with_defaults(defaults: Option<CallDefaults>) -> SagaSpec {
        SagaSpec {
            steps: vec![],
            input: Default::default(),
            defaults,
            deadline: None,
            ttl_seconds_after_finished: None,
        }
    }

    fn d(text: &str) -> Option<SpecDuration> {
        Some(text.parse().expect("duration"))
    }

    #[test]
    fn built_in_policies_apply_when_nothing_is_set() {
        let spec = spec_with_defaults(None);
        assert_eq!(Policy::resolve(&spec, CallKind::Action, &CallPolicy::default()), Policy::action_default());
        assert_eq!(
            Policy::resolve(&spec, CallKind::Compensation, &CallPolicy::default()),
            Policy::compensation_default()
        );
    }

    #[test]
    fn call_fields_override_saga_defaults_field_by_field() {
        let spec = spec_with_defaults(Some(CallDefaults {
            action: Some(CallPolicy {
                timeout: d("3s"),
                retry: Some(RetryPolicy { max_attempts: Some(7), max_backoff: d("1m"), ..Default::default() }),
            }),
            compensation: None,
        }));
        let own = CallPolicy {
            timeout: None,
            retry: Some(RetryPolicy { max_attempts: Some(2), initial_backoff: d("50ms"), ..Default::default() }),
        };
        let policy = Policy::resolve(&spec, CallKind::Action, &own);
        assert_eq!(policy.timeout, Duration::from_secs(3));
        assert_eq!(policy.max_attempts, 2);
        assert_eq!(policy.initial_backoff, Duration::from_millis(50));
        assert_eq!(policy.max_backoff, Duration::from_secs(60));
        assert_eq!(policy.multiplier, 2.0);
        // Action defaults never leak into compensations.
        assert_eq!(
            Policy::resolve(&spec, CallKind::Compensation, &CallPolicy::default()),
            Policy::compensation_default()
        );
    }

    #[test]
    fn backoff_grows_exponentially_up_to_the_cap_without_jitter() {
        let policy = Policy { jitter: 0.0, ..Policy::action_default() };
        let waits: Vec<_> = (1..=8).map(|a| policy.backoff(a, "seed").as_millis()).collect();
        assert_eq!(waits, [200, 400, 800, 1600, 3200, 6400, 10_000, 10_000]);
        assert_eq!(policy.backoff(u32::MAX, "seed"), Duration::from_secs(10));
    }

    #[test]
    fn jitter_shortens_the_wait_by_at_most_its_fraction_and_is_deterministic() {
        let policy = Policy { jitter: 0.5, ..Policy::action_default() };
        for attempt in 1..50 {
            let full = Policy { jitter: 0.0, ..policy.clone() }.backoff(attempt, "s");
            let wait = policy.backoff(attempt, "s");
            assert!(wait <= full && wait >= full / 2, "attempt {attempt}: {wait:?} vs {full:?}");
            assert_eq!(wait, policy.backoff(attempt, "s"));
        }
        let spread: std::collections::HashSet<_> = (0..20).map(|i| policy.backoff(3, i)).collect();
        assert!(spread.len() > 10, "different sagas should not retry in lockstep");
    }
}
