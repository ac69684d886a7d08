//! Kubernetes-style duration strings (`500ms`, `30s`, `5m`, `1h30m`) as they appear in specs.

use std::{fmt, str::FromStr};

use kube::core::{Message, Rule};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A duration written the way Kubernetes and Go write them: one or more `<number><unit>` parts with unit `ms`,
/// `s`, `m` or `h`, e.g. `500ms`, `1.5s`, `1h30m`. It keeps the text it was written as, so a spec reads back
/// unchanged.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Duration {
    text: String,
    value: std::time::Duration,
}

/// The schema pattern; parsing below accepts exactly the same language.
pub(crate) const PATTERN: &str = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$";

/// A string that is not a duration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{text:?} is not a duration: write it like 500ms, 30s, 5m or 1h30m (units ms, s, m, h)")]
pub struct DurationError {
    text: String,
}

impl Duration {
    /// The duration as a [`std::time::Duration`].
    pub fn get(&self) -> std::time::Duration {
        self.value
    }
}

impl FromStr for Duration {
    type Err = DurationError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let err = || DurationError { text: text.to_owned() };
        let mut rest = text;
        let mut total = 0f64;
        if rest.is_empty() {
            return Err(err());
        }
        while !rest.is_empty() {
            let number_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).ok_or_else(err)?;
            let (number, tail) = rest.split_at(number_len);
            if number.is_empty() || number.starts_with('.') || number.ends_with('.') || number.matches('.').count() > 1
            {
                return Err(err());
            }
            let number: f64 = number.parse().map_err(|_| err())?;
            let (seconds_per_unit, unit_len) = if tail.starts_with("ms") {
                (0.001, 2)
            } else if tail.starts_with('s') {
                (1.0, 1)
            } else if tail.starts_with('m') {
                (60.0, 1)
            } else if tail.starts_with('h') {
                (3600.0, 1)
            } else {
                return Err(err());
            };
            total += number * seconds_per_unit;
            rest = &tail[unit_len..];
        }
        let value = std::time::Duration::try_from_secs_f64(total).map_err(|_| err())?;
        Ok(Self { text: text.to_owned(), value })
    }
}

impl TryFrom<String> for Duration {
    type Error = DurationError;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        text.parse()
    }
}

impl From<Duration> for String {
    fn from(duration: Duration) -> Self {
        duration.text
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl JsonSchema for Duration {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Duration".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "pattern": PATTERN,
            "maxLength": 32,
            "description": "A duration such as 500ms, 30s, 5m or 1h30m.",
        })
    }
}

/// CEL: `expr` (a string) is not a well-formed duration, so a rule about its value has nothing to check.
pub(crate) fn not_a_duration(expr: &str) -> String {
    format!("!{expr}.matches(r'{PATTERN}')")
}

/// A `Duration` field at most `max` long, and longer than zero unless `zero_ok`.
pub(crate) fn rule_duration_cap(max: &str, zero_ok: bool) -> Rule {
    let not_a_duration = not_a_duration("self");
    if zero_ok {
        Rule::new(format!("{not_a_duration} || duration(self) <= duration('{max}')"))
            .message(Message::Message(format!("must be at most {max}")))
    } else {
        Rule::new(format!(
            "{not_a_duration} || (duration(self) > duration('0s') && duration(self) <= duration('{max}'))"
        ))
        .message(Message::Message(format!("must be longer than 0s and at most {max}")))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration as Std;

    use super::*;

    #[test]
    fn parses_kubernetes_style_durations() {
        for (text, expected) in [
            ("500ms", Std::from_millis(500)),
            ("30s", Std::from_secs(30)),
            ("1.5s", Std::from_millis(1500)),
            ("5m", Std::from_secs(300)),
            ("1h30m", Std::from_secs(5400)),
            ("1m30s250ms", Std::from_millis(90_250)),
            ("0s", Std::ZERO),
        ] {
            let parsed: Duration = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(parsed.get(), expected, "{text}");
            assert_eq!(parsed.to_string(), text);
        }
    }

    #[test]
    fn rejects_what_the_schema_pattern_rejects() {
        for text in ["", "5", "s", "1d", "-1s", "1.s", ".5s", "1..5s", "1 s", "5sec", "1h 30m", "1e3s"] {
            let err = text.parse::<Duration>().expect_err(text);
            assert!(err.to_string().contains("500ms, 30s"), "{err}");
        }
    }

    #[test]
    fn round_trips_through_json_as_the_string_it_was_written_as() {
        let d: Duration = serde_json::from_str("\"2m\"").expect("parse");
        assert_eq!(serde_json::to_string(&d).expect("serialize"), "\"2m\"");
        assert!(serde_json::from_str::<Duration>("\"2 minutes\"").is_err());
    }
}
