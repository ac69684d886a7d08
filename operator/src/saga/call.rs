//! Performing one planned HTTP call and classifying what came back.

use std::time::Duration;

use reqwest::{
    Method, StatusCode,
    header::{HeaderMap, RETRY_AFTER},
};
use serde_json::Value;

use super::plan::{MAX_OUTPUT_BYTES, Outcome, PlannedCall, is_permanent_rejection};
use crate::crd::HttpMethod;

/// Headers the operator sets on every call.
pub mod headers {
    /// Stable across retries and restarts: `<saga uid>-<step>-<action|compensate>`.
    pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
    /// `<namespace>/<name>` of the saga.
    pub const SAGA_ID: &str = "x-saga-id";
    /// Name of the step.
    pub const SAGA_STEP: &str = "x-saga-step";
    /// W3C trace context.
    pub const TRACEPARENT: &str = "traceparent";
}

/// Bodies larger than this are not read to the end: they could not be kept as an output anyway.
const MAX_BODY_BYTES: usize = MAX_OUTPUT_BYTES * 4;

/// Who the call is made for, for the headers.
pub struct CallContext<'a> {
    /// `<namespace>/<name>` of the saga.
    pub saga_id: &'a str,
    /// `traceparent` header value for this call.
    pub traceparent: &'a str,
}

/// Makes the call and turns whatever happens into an [`Outcome`]; it never fails, since every failure is an
/// outcome the planner must weigh.
pub async fn perform(client: &reqwest::Client, call: &PlannedCall, context: &CallContext<'_>) -> Outcome {
    let request = &call.request;
    let mut builder = client.request(method(request.method), &request.url).timeout(call.timeout);
    // The operator's own headers win; admission refuses them in the spec, this keeps it so for old objects.
    for (name, value) in request.headers.iter().filter(|(name, _)| !is_reserved(name)) {
        builder = builder.header(name, value);
    }
    builder = builder
        .header(headers::IDEMPOTENCY_KEY, &call.idempotency_key)
        .header(headers::SAGA_ID, context.saga_id)
        .header(headers::SAGA_STEP, &call.step_name)
        .header(headers::TRACEPARENT, context.traceparent);
    if let Some(body) = &request.body {
        builder = builder.json(body);
    }
    let response = match builder.send().await {
        Ok(response) => response,
        Err(err) => return transport_failure(&err, call.timeout),
    };
    let status = response.status();
    let retry_after = retry_after(response.headers());
    let body = match read_capped(response).await {
        Ok(body) => body,
        Err(err) => return transport_failure(&err, call.timeout),
    };
    classify(status, retry_after, &body)
}

/// Classifies a response: 2xx succeeds (a JSON body becomes the output), 408/425/429/5xx are retried, any other
/// status is a permanent failure.
pub fn classify(status: StatusCode, retry_after: Option<Duration>, body: &[u8]) -> Outcome {
    let code = status.as_u16();
    if status.is_success() {
        let output = if body.is_empty() {
            None
        } else {
            match serde_json::from_slice::<Value>(body) {
                Ok(value) => Some(value),
                // A non-JSON body cannot feed templates; keep it as text so it is still visible.
                Err(_) => Some(Value::String(String::from_utf8_lossy(body).into_owned())),
            }
        };
        return Outcome::Succeeded { http_status: code, output };
    }
    let error = format!("HTTP {code}{}", summary(body));
    // A 409 with Retry-After is the Idempotency-Key draft's "the first request with this key is still running".
    let in_flight = code == 409 && retry_after.is_some();
    if (is_permanent_rejection(code) && !in_flight) || !(status.is_server_error() || status.is_client_error()) {
        Outcome::Permanent { http_status: Some(code), error }
    } else {
        Outcome::Retryable { http_status: Some(code), error, retry_after }
    }
}

/// A short, single-line excerpt of an error body (problem+json `detail`/`title` when there is one).
fn summary(body: &[u8]) -> String {
    if body.is_empty() {
        return String::new();
    }
    if let Ok(Value::Object(problem)) = serde_json::from_slice::<Value>(body) {
        for field in ["detail", "title", "message", "error"] {
            if let Some(Value::String(text)) = problem.get(field) {
                return format!(": {text}");
            }
        }
    }
    let text: String = String::from_utf8_lossy(body).chars().take(200).collect();
    format!(": {}", text.split_whitespace().collect::<Vec<_>>().join(" "))
}

fn transport_failure(err: &reqwest::Error, timeout: Duration) -> Outcome {
    let error = if err.is_timeout() {
        format!("no response within {}ms", timeout.as_millis())
    } else if err.is_connect() {
        format!("cannot connect: {}", root_cause(err))
    } else if err.is_builder() {
        // The request could not even be built (a rendered URL that does not parse): nothing was sent.
        return Outcome::Permanent { http_status: None, error: format!("invalid request: {}", root_cause(err)) };
    } else {
        format!("request failed: {}", root_cause(err))
    };
    Outcome::Retryable { http_status: None, error, retry_after: None }
}

fn root_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut current = err;
    while let Some(source) = current.source() {
        current = source;
    }
    current.to_string()
}

/// `Retry-After` in its delay-seconds form; the HTTP-date form is rare for APIs and is ignored.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?;
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

async fn read_capped(mut response: reqwest::Response) -> Result<Vec<u8>, reqwest::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        let room = MAX_BODY_BYTES.saturating_sub(body.len());
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if room <= chunk.len() {
            break;
        }
    }
    Ok(body)
}

fn method(method: HttpMethod) -> Method {
    match method {
        HttpMethod::Get => Method::GET,
        HttpMethod::Post => Method::POST,
        HttpMethod::Put => Method::PUT,
        HttpMethod::Patch => Method::PATCH,
        HttpMethod::Delete => Method::DELETE,
    }
}

/// Whether a header is one the operator sets itself.
pub fn is_reserved(name: &str) -> bool {
    [headers::IDEMPOTENCY_KEY, headers::SAGA_ID, headers::SAGA_STEP, headers::TRACEPARENT]
        .iter()
        .any(|reserved| name.eq_ignore_ascii_case(reserved))
}

#[cfg(test)]
mod tests {
    use reqwest::header::HeaderValue;

    use super::*;

    #[test]
    fn success_keeps_the_json_body_as_output() {
        let outcome = classify(StatusCode::CREATED, None, br#"{"reservationId":"r-1"}"#);
        assert_eq!(
            outcome,
            Outcome::Succeeded { http_status: 201, output: Some(serde_json::json!({"reservationId": "r-1"})) }
        );
        assert_eq!(classify(StatusCode::NO_CONTENT, None, b""), Outcome::Succeeded { http_status: 204, output: None });
        assert_eq!(
            classify(StatusCode::OK, None, b"plain"),
            Outcome::Succeeded { http_status: 200, output: Some(Value::String("plain".into())) }
        );
    }

    #[test]
    fn throttling_timeouts_and_server_errors_are_retried_with_retry_after() {
        for code in [408u16, 425, 429, 500, 502, 503, 504] {
            let status = StatusCode::from_u16(code).expect("status");
            match classify(status, Some(Duration::from_secs(2)), b"") {
                Outcome::Retryable { http_status, retry_after, .. } => {
                    assert_eq!(http_status, Some(code));
                    assert_eq!(retry_after, Some(Duration::from_secs(2)));
                }
                other => panic!("{code}: {other:?}"),
            }
        }
    }

    #[test]
    fn other_client_errors_are_permanent_and_carry_the_problem_detail() {
        let body = br#"{"type":"https://kubesaga.dev/problems/out-of-stock","title":"Out of stock","detail":"sku A has 0 left"}"#;
        for code in [400u16, 404, 409, 422] {
            let status = StatusCode::from_u16(code).expect("status");
            assert_eq!(
                classify(status, None, body),
                Outcome::Permanent { http_status: Some(code), error: format!("HTTP {code}: sku A has 0 left") }
            );
        }
        // A redirect that was not followed cannot be retried into success either.
        assert!(matches!(classify(StatusCode::SEE_OTHER, None, b""), Outcome::Permanent { .. }));
    }

    #[test]
    fn a_conflict_with_retry_after_is_a_request_still_in_flight_and_is_retried() {
        let in_flight = classify(StatusCode::CONFLICT, Some(Duration::from_secs(1)), b"");
        assert!(matches!(in_flight, Outcome::Retryable { http_status: Some(409), .. }), "{in_flight:?}");
        assert!(matches!(classify(StatusCode::CONFLICT, None, b""), Outcome::Permanent { .. }));
    }

    #[test]
    fn retry_after_takes_delay_seconds() {
        let mut map = HeaderMap::new();
        map.insert(RETRY_AFTER, HeaderValue::from_static(" 7 "));
        assert_eq!(retry_after(&map), Some(Duration::from_secs(7)));
        map.insert(RETRY_AFTER, HeaderValue::from_static("Wed, 21 Oct 2026 07:28:00 GMT"));
        assert_eq!(retry_after(&map), None);
    }

    #[test]
    fn reserved_headers_are_recognised_in_any_case() {
        assert!(is_reserved("Idempotency-Key") && is_reserved("TRACEPARENT") && is_reserved("x-saga-step"));
        assert!(!is_reserved("x-request-id"));
    }
}
