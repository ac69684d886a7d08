//! Standard Kubernetes conditions, as both resources' statuses carry them.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// Condition types a saga carries.
pub mod saga {
    /// True once every step succeeded; False once the saga compensated or failed.
    pub const SUCCEEDED: &str = "Succeeded";
    /// True while the operator is making calls for the saga.
    pub const PROGRESSING: &str = "Progressing";
    /// True while calls fail and are retried, and when the saga needs a human.
    pub const DEGRADED: &str = "Degraded";
}

/// The three condition statuses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// The condition holds.
    True,
    /// The condition does not hold.
    False,
    /// Not known yet.
    Unknown,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Self::True => "True",
            Self::False => "False",
            Self::Unknown => "Unknown",
        }
    }
}

/// Sets condition `type_` in `conditions`. `lastTransitionTime` moves only when the status flips, so a reason or
/// message update (a retry count, say) does not look like a transition.
pub fn set(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: Status,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: &Time,
) {
    let status = status.as_str();
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(existing) => {
            if existing.status != status {
                existing.status = status.to_owned();
                existing.last_transition_time = now.clone();
            }
            existing.reason = reason.to_owned();
            existing.message = message;
            existing.observed_generation = generation;
        }
        None => conditions.push(Condition {
            type_: type_.to_owned(),
            status: status.to_owned(),
            reason: reason.to_owned(),
            message,
            observed_generation: generation,
            last_transition_time: now.clone(),
        }),
    }
}

/// The condition of type `type_`, if set.
pub fn get<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::jiff::Timestamp;

    use super::*;

    fn at(seconds: i64) -> Time {
        Time(Timestamp::from_second(seconds).expect("timestamp"))
    }

    #[test]
    fn transition_time_moves_only_when_the_status_flips() {
        let mut conditions = vec![];
        set(&mut conditions, saga::DEGRADED, Status::False, "Healthy", "ok".into(), Some(1), &at(10));
        set(&mut conditions, saga::DEGRADED, Status::True, "Retrying", "attempt 1".into(), Some(1), &at(20));
        set(&mut conditions, saga::DEGRADED, Status::True, "Retrying", "attempt 2".into(), Some(2), &at(30));
        assert_eq!(conditions.len(), 1);
        let c = &conditions[0];
        assert_eq!((c.status.as_str(), c.message.as_str()), ("True", "attempt 2"));
        assert_eq!(c.last_transition_time, at(20));
        assert_eq!(c.observed_generation, Some(2));
        assert!(get(&conditions, saga::SUCCEEDED).is_none());
    }
}
