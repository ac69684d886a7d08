//! Durations in the services' flags and environment variables, written the way Kubernetes writes them.

use std::time::Duration;

/// Parses `500ms`, `30s`, `5m`, `1h30m` (Go/Kubernetes style) or bare seconds (`45`); a clap `value_parser`.
pub fn parse(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if let Ok(seconds) = text.parse::<u64>() {
        return Ok(Duration::from_secs(seconds));
    }
    let invalid = || format!("{text:?} is not a duration: write it like 500ms, 30s, 5m or 1h30m, or as seconds");
    let parsed: jiff::SignedDuration = text.parse().map_err(|_| invalid())?;
    Duration::try_from(parsed).map_err(|_| invalid())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubernetes_style_or_seconds() {
        for (text, expected) in [
            ("500ms", Duration::from_millis(500)),
            ("30s", Duration::from_secs(30)),
            ("1.5s", Duration::from_millis(1500)),
            ("1m30s250ms", Duration::from_millis(90_250)),
            ("30m", Duration::from_secs(1800)),
            ("1h30m", Duration::from_secs(5400)),
            ("45", Duration::from_secs(45)),
            ("0s", Duration::ZERO),
            (" 2h ", Duration::from_secs(7200)),
        ] {
            assert_eq!(parse(text), Ok(expected), "{text}");
        }
        for text in ["", "s", "5 days", "-1s", "-5", "1x", "soon"] {
            assert!(parse(text).is_err_and(|e| e.contains("500ms")), "{text}");
        }
    }
}
