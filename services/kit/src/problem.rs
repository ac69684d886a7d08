//! Errors as RFC 9457 `application/problem+json`, with stable `type` URIs clients can branch on, and a JSON body
//! extractor whose rejections are problems too, so bad input never yields a 500 or a plain-text error.

use std::{fmt, marker::PhantomData, time::Duration};

use axum::{
    extract::{FromRequest, Request, rejection::JsonRejection},
    http::{HeaderValue, StatusCode, header::RETRY_AFTER},
    response::{IntoResponse, Response},
};
use problem_details::ProblemDetails;
use serde::{
    Deserialize, Deserializer, Serialize,
    de::{DeserializeOwned, MapAccess, Visitor, value::MapAccessDeserializer},
};
use serde_json::{Map, Value};

/// The `type` URIs of the problems kubesaga services answer with. They are identifiers, stable across releases.
pub mod types {
    /// 400: the body or a parameter is malformed or violates a rule; `field` names which.
    pub const VALIDATION: &str = "https://kubesaga.dev/problems/validation";
    /// 400: a route that needs an `Idempotency-Key` header got none (or an invalid one).
    pub const IDEMPOTENCY_KEY_MISSING: &str = "https://kubesaga.dev/problems/idempotency-key-missing";
    /// 404: no such resource.
    pub const NOT_FOUND: &str = "https://kubesaga.dev/problems/not-found";
    /// 409: the resource changed since it was read (optimistic locking).
    pub const VERSION_CONFLICT: &str = "https://kubesaga.dev/problems/version-conflict";
    /// 409: another saga holds a semantic lock on the resource; `heldBy` names it.
    pub const LOCKED_BY_SAGA: &str = "https://kubesaga.dev/problems/locked-by-saga";
    /// 409: the request is not allowed in the resource's current state.
    pub const INVALID_STATE: &str = "https://kubesaga.dev/problems/invalid-state";
    /// 409: a request with the same idempotency key is still being processed.
    pub const IDEMPOTENCY_IN_FLIGHT: &str = "https://kubesaga.dev/problems/idempotency-key-in-flight";
    /// 413: the body is larger than the route accepts.
    pub const PAYLOAD_TOO_LARGE: &str = "https://kubesaga.dev/problems/payload-too-large";
    /// 415: the body is not `application/json`.
    pub const UNSUPPORTED_MEDIA_TYPE: &str = "https://kubesaga.dev/problems/unsupported-media-type";
    /// 422: the idempotency key was used before for a different request.
    pub const IDEMPOTENCY_KEY_REUSED: &str = "https://kubesaga.dev/problems/idempotency-key-reused";
    /// 422: the request is well-formed but cannot be honoured (e.g. not enough stock, payment declined).
    pub const UNPROCESSABLE: &str = "https://kubesaga.dev/problems/unprocessable";
    /// 429: too many requests in flight for a shared resource; retry after `Retry-After`.
    pub const RATE_LIMITED: &str = "https://kubesaga.dev/problems/rate-limited";
    /// 503: a dependency (Redis, Postgres, a gateway) is unavailable; retry later.
    pub const UNAVAILABLE: &str = "https://kubesaga.dev/problems/unavailable";
    /// 500: a bug; the detail is logged, not shown.
    pub const INTERNAL: &str = "https://kubesaga.dev/problems/internal";
}

/// A problem to answer with.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    /// HTTP status.
    pub status: StatusCode,
    /// One of [`types`].
    pub type_: &'static str,
    /// Short, fixed summary of the type.
    pub title: &'static str,
    /// What happened in this instance, for humans.
    pub detail: String,
    /// Extra members, e.g. `field`, `heldBy`.
    pub extensions: Map<String, Value>,
    /// Sent as `Retry-After` (seconds, rounded up).
    pub retry_after: Option<Duration>,
}

impl Problem {
    fn new(status: StatusCode, type_: &'static str, title: &'static str, detail: impl Into<String>) -> Self {
        Self { status, type_, title, detail: detail.into(), extensions: Map::new(), retry_after: None }
    }

    /// 400: `field` is invalid; `detail` says why.
    pub fn validation(field: &str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, types::VALIDATION, "Invalid request", detail).with("field", field)
    }

    /// 404.
    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, types::NOT_FOUND, "Not found", detail)
    }

    /// 409: optimistic-locking conflict.
    pub fn version_conflict(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, types::VERSION_CONFLICT, "Version conflict", detail)
    }

    /// 409: semantic lock held by another saga.
    pub fn locked_by_saga(holder: &str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, types::LOCKED_BY_SAGA, "Held by another saga", detail).with("heldBy", holder)
    }

    /// 409: not allowed in the current state.
    pub fn invalid_state(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, types::INVALID_STATE, "Invalid state", detail)
    }

    /// 422: well-formed but cannot be honoured.
    pub fn unprocessable(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, types::UNPROCESSABLE, "Cannot be processed", detail)
    }

    /// 429 with `Retry-After`.
    pub fn rate_limited(detail: impl Into<String>, retry_after: Duration) -> Self {
        Self {
            retry_after: Some(retry_after),
            ..Self::new(StatusCode::TOO_MANY_REQUESTS, types::RATE_LIMITED, "Too many requests", detail)
        }
    }

    /// 503: a dependency is down.
    pub fn unavailable(detail: impl Into<String>) -> Self {
        Self {
            retry_after: Some(Duration::from_secs(1)),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, types::UNAVAILABLE, "Temporarily unavailable", detail)
        }
    }

    /// 500: logs `cause` and answers without it, so internals do not leak.
    pub fn internal(cause: &dyn std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            types::INTERNAL,
            "Internal error",
            "an unexpected error occurred; it has been logged",
        )
    }

    /// Any other problem type.
    pub fn custom(status: StatusCode, type_: &'static str, title: &'static str, detail: impl Into<String>) -> Self {
        Self::new(status, type_, title, detail)
    }

    /// Adds an extension member.
    pub fn with(mut self, name: &str, value: impl Serialize) -> Self {
        self.extensions.insert(name.to_owned(), serde_json::to_value(value).unwrap_or(Value::Null));
        self
    }

    /// Sets `Retry-After`.
    pub fn retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status.as_u16(), self.title, self.detail)
    }
}

impl std::error::Error for Problem {}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let body = ProblemDetails::from_status_code(self.status)
            .with_type(self.type_.parse::<axum::http::Uri>().unwrap_or_default())
            .with_title(self.title)
            .with_detail(self.detail)
            .with_extensions(self.extensions);
        let mut response = body.into_response();
        if let Some(after) = self.retry_after {
            let seconds = after.as_secs() + u64::from(after.subsec_nanos() > 0);
            if let Ok(value) = HeaderValue::from_str(&seconds.max(1).to_string()) {
                response.headers_mut().insert(RETRY_AFTER, value);
            }
        }
        response
    }
}

/// `axum::Json` whose rejections are [`Problem`]s naming the offending field where serde can tell.
#[derive(Debug, Clone, Copy, Default)]
pub struct Json<T>(pub T);

impl<T, S> FromRequest<S> for Json<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(value)) => Ok(Self(value)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

impl<T: Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

/// [`Json`] for a body that must be a JSON object: derived struct deserializers also accept an array of the
/// fields in order (`["A-1", 2]`), which no client means. Other errors keep serde's field paths.
#[derive(Debug, Clone, Copy, Default)]
pub struct JsonObject<T>(pub T);

impl<T, S> FromRequest<S> for JsonObject<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let Json(Object(value)) = Json::<Object<T>>::from_request(req, state).await?;
        Ok(Self(value))
    }
}

/// Deserializes `T` only from a JSON object.
struct Object<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ObjectVisitor<T>(PhantomData<T>);

        impl<'de, T: Deserialize<'de>> Visitor<'de> for ObjectVisitor<T> {
            type Value = T;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(MapAccessDeserializer::new(map))
            }
        }

        deserializer.deserialize_map(ObjectVisitor(PhantomData)).map(Object)
    }
}

fn json_rejection(rejection: JsonRejection) -> Problem {
    match rejection {
        JsonRejection::MissingJsonContentType(_) => Problem::custom(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            types::UNSUPPORTED_MEDIA_TYPE,
            "Unsupported media type",
            "send the body as JSON with `Content-Type: application/json`",
        ),
        JsonRejection::JsonSyntaxError(err) => {
            Problem::validation("body", format!("the body is not valid JSON: {}", source_text(&err)))
        }
        JsonRejection::JsonDataError(err) => {
            // serde_path_to_error gives "path: message"; the path is the field to fix.
            let text = source_text(&err);
            let (path, why) = match text.split_once(": ") {
                Some((path, why)) if !path.contains(' ') => (Some(path), why),
                _ => (None, text.as_str()),
            };
            // A missing or unknown member is reported at its parent's path; name the member itself.
            let member = ["missing field `", "unknown field `"]
                .iter()
                .find_map(|prefix| why.strip_prefix(prefix))
                .and_then(|rest| rest.split('`').next());
            let field = match (path.filter(|p| *p != "."), member) {
                (Some(path), Some(member)) => format!("{path}.{member}"),
                (Some(path), None) => path.to_owned(),
                (None, Some(member)) => member.to_owned(),
                (None, None) => "body".to_owned(),
            };
            Problem::validation(&field, format!("{field}: {why}"))
        }
        JsonRejection::BytesRejection(err) if err.status() == StatusCode::PAYLOAD_TOO_LARGE => Problem::custom(
            StatusCode::PAYLOAD_TOO_LARGE,
            types::PAYLOAD_TOO_LARGE,
            "Payload too large",
            "the body is larger than this route accepts",
        ),
        other => Problem::validation("body", other.body_text()),
    }
}

fn source_text(err: &(dyn std::error::Error + 'static)) -> String {
    let mut current = err;
    while let Some(source) = current.source() {
        current = source;
    }
    current.to_string()
}

#[cfg(test)]
mod tests {
    use axum::{Router, body::Body, http::Request as HttpRequest, routing::post};
    use serde::Deserialize;
    use tower::ServiceExt;

    use super::*;

    #[derive(Deserialize, Serialize)]
    struct Order {
        #[allow(dead_code)]
        sku: String,
        #[allow(dead_code)]
        quantity: u32,
    }

    async fn call(content_type: Option<&str>, body: &'static str) -> (StatusCode, Value) {
        let app = Router::new().route("/", post(|Json(order): Json<Order>| async move { Json(order) }));
        let mut request = HttpRequest::post("/");
        if let Some(ct) = content_type {
            request = request.header("content-type", ct);
        }
        let response = app.oneshot(request.body(Body::from(body)).expect("request")).await.expect("response");
        let status = response.status();
        assert_eq!(response.headers()["content-type"], "application/problem+json");
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20).await.expect("body");
        (status, serde_json::from_slice(&bytes).expect("problem json"))
    }

    #[tokio::test]
    async fn wrong_types_and_missing_fields_name_the_field() {
        let (status, problem) = call(Some("application/json"), r#"{"sku":"A","quantity":"two"}"#).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(problem["type"], types::VALIDATION);
        assert_eq!(problem["field"], "quantity");
        let (_, problem) = call(Some("application/json"), r#"{"quantity":2}"#).await;
        assert_eq!(problem["field"], "sku", "{problem}");
        let (_, problem) = call(Some("application/json"), r#"{"sku":"A","quantity":-1}"#).await;
        assert_eq!(problem["field"], "quantity");
    }

    #[tokio::test]
    async fn malformed_json_and_wrong_media_type_are_problems_too() {
        let (status, problem) = call(Some("application/json"), "{not json").await;
        assert_eq!((status, problem["type"].as_str()), (StatusCode::BAD_REQUEST, Some(types::VALIDATION)));
        let (status, problem) = call(None, "{}").await;
        assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        assert_eq!(problem["type"], types::UNSUPPORTED_MEDIA_TYPE);
    }

    #[tokio::test]
    async fn a_json_object_body_refuses_an_array_of_the_fields() {
        let app = Router::new().route("/", post(|JsonObject(order): JsonObject<Order>| async move { Json(order) }));
        let request = |body: &'static str| {
            HttpRequest::post("/").header("content-type", "application/json").body(Body::from(body)).expect("request")
        };
        let response = app.clone().oneshot(request(r#"["A", 2]"#)).await.expect("response");
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20).await.expect("body");
        let problem: Value = serde_json::from_slice(&bytes).expect("problem json");
        assert!(problem["detail"].as_str().is_some_and(|d| d.contains("a JSON object")), "{problem}");
        let response = app.oneshot(request(r#"{"sku":"A","quantity":2}"#)).await.expect("response");
        assert_eq!(response.status(), StatusCode::OK);
    }

    #[test]
    fn retry_after_is_sent_in_whole_seconds_rounded_up() {
        let response = Problem::rate_limited("gateway busy", Duration::from_millis(1500)).into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[RETRY_AFTER], "2");
    }
}
