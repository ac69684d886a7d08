//! `Idempotency-Key` for the routes that change state, after the IETF httpapi draft and Stripe's practice: a
//! retried request with the same key gets the first answer replayed instead of running the handler again.
//!
//! The first request with a key claims it in Redis with a short lease that is renewed while the handler runs;
//! the handler's answer then replaces the claim and is kept for the retention period. A repeat of a finished
//! request is answered from Redis with `Idempotent-Replayed: true`; a repeat of one still running gets 409 with
//! `Retry-After`; the same key with a different request gets 422.
//!
//! ```no_run
//! use axum::{Router, routing::post};
//! use kubesaga_kit::idempotency::{IdempotencyConfig, IdempotencyLayer};
//!
//! # async fn orders(redis: redis::aio::ConnectionManager) -> Router {
//! let idempotent = IdempotencyLayer::new(redis, IdempotencyConfig::new("order"));
//! Router::new()
//!     .route("/orders", post(|| async { "created" }))
//!     .route("/orders/{id}/cancel", post(|| async { "cancelled" }))
//!     .route_layer(idempotent)
//! # }
//! ```

use std::{
    borrow::Cow,
    convert::Infallible,
    fmt,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use axum::{
    body::{Body, Bytes},
    extract::{MatchedPath, Request},
    http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, header::CONTENT_TYPE, request::Parts},
    response::{IntoResponse, Response},
};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use percent_encoding::{AsciiSet, CONTROLS, percent_encode};
use redis::{RedisError, Script, aio::ConnectionManager};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tower::{Layer, Service};

use crate::problem::{Problem, types};

/// The request header that carries the key.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
/// Set to `true` on an answer replayed from the store rather than produced by the handler.
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");
/// The header services set to name the calling service; first choice of [`caller_from_headers`].
pub const CALLER: HeaderName = HeaderName::from_static("x-caller");
/// The header the orchestrator sets to name the saga a step runs for; second choice of [`caller_from_headers`].
pub const SAGA_ID: HeaderName = HeaderName::from_static("x-saga-id");
/// The longest key accepted, in bytes.
pub const MAX_KEY_LEN: usize = 255;

/// How long a finished answer is kept for replay unless configured otherwise.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(24 * 60 * 60);
/// How long a claim lives without renewal unless configured otherwise.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);
/// The largest request body fingerprinted and response body stored unless configured otherwise.
pub const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024;
/// The bound on any one Redis call unless configured otherwise.
pub const DEFAULT_REDIS_TIMEOUT: Duration = Duration::from_secs(2);
/// The response headers stored and replayed unless configured otherwise; a trailing `*` matches a prefix.
pub const DEFAULT_STORED_HEADERS: [&str; 3] = ["content-type", "location", "x-*"];

/// The counter, labelled `outcome`, that counts every request the layer saw by what became of it.
pub const METRIC: &str = "kubesaga_idempotency_total";

/// Renews a claim only while it is still ours: the claim record carries a random owner token, so comparing the
/// whole value compares owners.
const RENEW: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
";

/// Replaces our claim with the finished answer; a claim that expired and was taken over is left alone.
const COMPLETE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
";

/// Drops our claim so that a retry runs the handler again.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// `:` separates the parts of a stored key, so a caller or route containing one is escaped; `%` too, so the
/// escaping cannot itself collide.
const KEY_PART: &AsciiSet = &CONTROLS.add(b':').add(b'%').add(b' ');

/// Picks the caller a key is scoped to from the request head.
pub type CallerFn = Arc<dyn Fn(&Parts) -> String + Send + Sync>;

/// The documented default caller rule: the `X-Caller` header, else `X-Saga-Id`, else `anonymous`.
///
/// These headers are set by kubesaga's own callers (services and the orchestrator); a service exposed to
/// untrusted clients should configure a rule that uses the authenticated identity instead.
pub fn caller_from_headers(parts: &Parts) -> String {
    [CALLER, SAGA_ID]
        .iter()
        .filter_map(|name| parts.headers.get(name))
        .map(|value| String::from_utf8_lossy(value.as_bytes()).trim().to_owned())
        .find(|caller| !caller.is_empty())
        .unwrap_or_else(|| "anonymous".to_owned())
}

/// How the layer scopes, keeps and bounds what it stores. Build with [`IdempotencyConfig::new`] and the setters.
#[derive(Clone)]
pub struct IdempotencyConfig {
    prefix: String,
    retention: Duration,
    lease: Duration,
    max_body_bytes: usize,
    stored_headers: Vec<String>,
    redis_timeout: Duration,
    caller: CallerFn,
}

impl IdempotencyConfig {
    /// The defaults, with stored keys under `prefix` (one per service, e.g. `order`, so services sharing a
    /// Redis do not collide).
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
            retention: DEFAULT_RETENTION,
            lease: DEFAULT_LEASE,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            stored_headers: DEFAULT_STORED_HEADERS.iter().map(|&pattern| pattern.to_owned()).collect(),
            redis_timeout: DEFAULT_REDIS_TIMEOUT,
            caller: Arc::new(caller_from_headers),
        }
    }

    /// How long a finished answer is replayed (default 24 h).
    pub fn retention(mut self, retention: Duration) -> Self {
        self.retention = retention.max(Duration::from_millis(1));
        self
    }

    /// How long a claim lives without renewal (default 30 s); it is renewed every third of that while the
    /// handler runs, so it only runs out when the instance holding it died.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease.max(Duration::from_millis(3));
        self
    }

    /// The largest request body accepted (larger ones get 413) and the largest response body stored (larger
    /// ones are returned but not stored, so a retry runs the handler again). Default 1 MiB.
    pub fn max_body_bytes(mut self, max: usize) -> Self {
        self.max_body_bytes = max;
        self
    }

    /// The response headers stored and replayed, by case-insensitive name; a trailing `*` matches every name
    /// with that prefix. Replaces the default [`DEFAULT_STORED_HEADERS`].
    pub fn stored_headers<I, S>(mut self, patterns: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.stored_headers = patterns.into_iter().map(|pattern| pattern.into().to_ascii_lowercase()).collect();
        self
    }

    /// The bound on any one Redis call (default 2 s), on top of the connection's own response timeout, which
    /// does not cover waiting for a reconnect.
    pub fn redis_timeout(mut self, timeout: Duration) -> Self {
        self.redis_timeout = timeout;
        self
    }

    /// Replaces the caller rule ([`caller_from_headers`]).
    pub fn caller<F>(mut self, caller: F) -> Self
    where
        F: Fn(&Parts) -> String + Send + Sync + 'static,
    {
        self.caller = Arc::new(caller);
        self
    }

    fn stores_header(&self, name: &HeaderName) -> bool {
        let name = name.as_str();
        self.stored_headers.iter().any(|pattern| match pattern.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix),
            None => name == pattern,
        })
    }
}

impl fmt::Debug for IdempotencyConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyConfig")
            .field("prefix", &self.prefix)
            .field("retention", &self.retention)
            .field("lease", &self.lease)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("stored_headers", &self.stored_headers)
            .field("redis_timeout", &self.redis_timeout)
            .finish_non_exhaustive()
    }
}

/// The layer to put on the routes that need an `Idempotency-Key` (with `route_layer`, or `.layer` on one
/// method router). Requests with a safe method (GET, HEAD, OPTIONS, TRACE) pass through untouched, so a path
/// serving both GET and POST can be layered as a whole.
#[derive(Clone)]
pub struct IdempotencyLayer {
    shared: Arc<Shared>,
}

impl IdempotencyLayer {
    /// A layer storing in `redis` (see [`crate::stores::redis`]).
    pub fn new(redis: ConnectionManager, config: IdempotencyConfig) -> Self {
        let shared = Shared {
            redis,
            config,
            renew: Script::new(RENEW),
            complete: Script::new(COMPLETE),
            release: Script::new(RELEASE),
        };
        Self { shared: Arc::new(shared) }
    }
}

impl fmt::Debug for IdempotencyLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyLayer").field("config", &self.shared.config).finish_non_exhaustive()
    }
}

impl<S> Layer<S> for IdempotencyLayer {
    type Service = IdempotencyService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        IdempotencyService { inner, shared: self.shared.clone() }
    }
}

/// The service [`IdempotencyLayer`] wraps a route in.
#[derive(Clone)]
pub struct IdempotencyService<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> fmt::Debug for IdempotencyService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyService").field("config", &self.shared.config).finish_non_exhaustive()
    }
}

impl<S> Service<Request> for IdempotencyService<S>
where
    S: Service<Request> + Clone + Send + 'static,
    S::Response: IntoResponse + Send,
    S::Error: Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        // The instance polled ready is the one that must be called; leave a fresh clone behind.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let shared = self.shared.clone();
        Box::pin(shared.handle(inner, request))
    }
}

/// What became of a request, as the `outcome` label of [`METRIC`].
#[derive(Debug, Clone, Copy)]
enum Outcome {
    /// The handler ran.
    Executed,
    /// A finished answer was replayed.
    Replayed,
    /// The first request with the key is still running.
    InFlight,
    /// The key was used for a different request.
    Mismatch,
    /// Redis failed or held an unreadable record; the handler did not run.
    Unavailable,
    /// No key, or an invalid one.
    MissingKey,
    /// The request body was over the limit, or could not be read.
    BadBody,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Self::Executed => "executed",
            Self::Replayed => "replayed",
            Self::InFlight => "in_flight",
            Self::Mismatch => "mismatch",
            Self::Unavailable => "unavailable",
            Self::MissingKey => "missing_key",
            Self::BadBody => "bad_body",
        }
    }

    fn count(self) {
        metrics::counter!(METRIC, "outcome" => self.as_str()).increment(1);
    }
}

fn reject(outcome: Outcome, problem: Problem) -> Response {
    outcome.count();
    problem.into_response()
}

#[derive(Debug, thiserror::Error)]
enum StoreError {
    #[error(transparent)]
    Redis(#[from] RedisError),
    #[error("Redis did not answer within {0:?}")]
    Timeout(Duration),
}

struct Shared {
    redis: ConnectionManager,
    config: IdempotencyConfig,
    renew: Script,
    complete: Script,
    release: Script,
}

/// One claimed key, identified by the exact claim record we wrote.
struct Claim {
    key: String,
    fingerprint: String,
    record: Vec<u8>,
}

impl Shared {
    async fn handle<S>(self: Arc<Self>, mut inner: S, request: Request) -> Result<Response, S::Error>
    where
        S: Service<Request>,
        S::Response: IntoResponse,
    {
        if is_safe(request.method()) {
            return inner.call(request).await.map(IntoResponse::into_response);
        }
        let (parts, body) = request.into_parts();
        let key = match idempotency_key(&parts.headers) {
            Ok(key) => key,
            Err(why) => {
                let problem = Problem::custom(
                    StatusCode::BAD_REQUEST,
                    types::IDEMPOTENCY_KEY_MISSING,
                    "Idempotency key missing or invalid",
                    why,
                );
                return Ok(reject(Outcome::MissingKey, problem));
            }
        };
        let body = match read_body(&parts.headers, body, self.config.max_body_bytes).await {
            Ok(body) => body,
            Err(problem) => return Ok(reject(Outcome::BadBody, problem)),
        };
        let route = match parts.extensions.get::<MatchedPath>() {
            Some(matched) => matched.as_str().to_owned(),
            None => parts.uri.path().to_owned(),
        };
        let caller = (self.config.caller)(&parts);
        let store_key = scoped_key(&self.config.prefix, &caller, &parts.method, &route, &key);
        let fingerprint = fingerprint(&parts.method, &parts.uri, parts.headers.get(CONTENT_TYPE), &body);

        let claim = Record {
            v: Record::VERSION,
            fingerprint: fingerprint.clone(),
            state: State::InFlight { owner: uuid::Uuid::new_v4().simple().to_string(), claimed_at_ms: now_ms() },
        };
        let claim = Claim { key: store_key, fingerprint, record: claim.encode(&[]) };
        match self.claim(&claim).await {
            Ok(None) => {}
            Ok(Some(existing)) => return Ok(self.answer_repeat(&claim.key, existing, &claim.fingerprint)),
            Err(err) => {
                tracing::warn!(key = %claim.key, error = %err, "idempotency store unavailable; request refused");
                let problem = Problem::unavailable("the idempotency store is unavailable; retry the request later");
                return Ok(reject(Outcome::Unavailable, problem));
            }
        }

        Outcome::Executed.count();
        let guard = ClaimGuard { shared: Some(self.clone()), claim };
        let request = Request::from_parts(parts, Body::from(body));
        let result = {
            let handler = inner.call(request);
            let renewal = self.keep_claimed(guard.claim());
            tokio::select! {
                result = handler => result,
                never = renewal => match never {},
            }
        };
        let response = match result {
            Ok(response) => response.into_response(),
            Err(err) => {
                guard.release().await;
                return Err(err);
            }
        };
        Ok(self.finish(guard, response).await)
    }

    /// Stores the handler's answer if it is final, else releases the key; answers with the handler's response
    /// either way.
    async fn finish(&self, guard: ClaimGuard, response: Response) -> Response {
        let status = response.status();
        // These statuses tell the client to retry, so storing them would turn every retry into the same failure.
        if status.is_server_error() || status == StatusCode::REQUEST_TIMEOUT || status == StatusCode::TOO_MANY_REQUESTS
        {
            guard.release().await;
            return response;
        }
        let (parts, body) = response.into_parts();
        let body = match body.collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(err) => {
                guard.release().await;
                return Problem::internal(&format_args!("reading the handler's response body failed: {err}"))
                    .into_response();
            }
        };
        if body.len() > self.config.max_body_bytes {
            tracing::warn!(
                key = %guard.claim().key,
                bytes = body.len(),
                max = self.config.max_body_bytes,
                "response too large to store for idempotent replay; a retry will run the handler again"
            );
            guard.release().await;
            return Response::from_parts(parts, Body::from(body));
        }
        let headers = parts
            .headers
            .iter()
            .filter(|(name, _)| self.config.stores_header(name))
            .map(|(name, value)| (name.as_str().to_owned(), StoredValue::from(value)))
            .collect();
        let record = Record {
            v: Record::VERSION,
            fingerprint: guard.claim().fingerprint.clone(),
            state: State::Completed { status: status.as_u16(), headers, completed_at_ms: now_ms() },
        };
        // The store is not atomic with the handler's own commit, so a failure here cannot be undone: the answer
        // still goes out, and a retry that runs the handler again is stopped by the business table's unique
        // constraint, which is the real guarantee; this store only spares the work and keeps answers identical.
        match self.complete(guard.claim(), &record.encode(&body)).await {
            Ok(true) => guard.disarm(),
            Ok(false) => {
                tracing::warn!(key = %guard.claim().key, "idempotency claim lost before the answer was stored");
                guard.disarm();
            }
            Err(err) => {
                tracing::error!(key = %guard.claim().key, error = %err, "storing the idempotent answer failed");
                guard.release().await;
            }
        }
        Response::from_parts(parts, Body::from(body))
    }

    fn answer_repeat(&self, key: &str, existing: Vec<u8>, fingerprint: &str) -> Response {
        let (record, body) = match Record::decode(&existing) {
            Ok(decoded) => decoded,
            Err(err) => {
                tracing::error!(key, error = %err, "unreadable idempotency record");
                let problem = Problem::unavailable("the stored idempotency record is unreadable");
                return reject(Outcome::Unavailable, problem);
            }
        };
        if record.fingerprint != fingerprint {
            let problem = Problem::custom(
                StatusCode::UNPROCESSABLE_ENTITY,
                types::IDEMPOTENCY_KEY_REUSED,
                "Idempotency key reused",
                "this Idempotency-Key was already used for a different request; use a new key for a new request",
            );
            return reject(Outcome::Mismatch, problem);
        }
        match record.state {
            State::InFlight { .. } => {
                let problem = Problem::custom(
                    StatusCode::CONFLICT,
                    types::IDEMPOTENCY_IN_FLIGHT,
                    "Request in progress",
                    "a request with this Idempotency-Key is still being processed; retry shortly",
                )
                .retry_after(Duration::from_secs(1));
                reject(Outcome::InFlight, problem)
            }
            State::Completed { status, headers, .. } => {
                let start = existing.len() - body.len();
                match replay(status, headers, Bytes::from(existing).slice(start..)) {
                    Ok(response) => {
                        Outcome::Replayed.count();
                        response
                    }
                    Err(err) => {
                        tracing::error!(key, error = %err, "unreplayable idempotency record");
                        let problem = Problem::unavailable("the stored idempotency record is unreadable");
                        reject(Outcome::Unavailable, problem)
                    }
                }
            }
        }
    }

    async fn bounded<T>(&self, call: impl Future<Output = redis::RedisResult<T>>) -> Result<T, StoreError> {
        match tokio::time::timeout(self.config.redis_timeout, call).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(StoreError::Timeout(self.config.redis_timeout)),
        }
    }

    /// Claims the key, or returns what is stored under it. `SET NX GET` (Redis 7.0) does both in one step, so
    /// no claim can slip in between a failed claim and the read.
    async fn claim(&self, claim: &Claim) -> Result<Option<Vec<u8>>, StoreError> {
        let mut conn = self.redis.clone();
        let mut cmd = redis::cmd("SET");
        cmd.arg(&claim.key).arg(&claim.record).arg("NX").arg("GET").arg("PX").arg(millis(self.config.lease));
        self.bounded(cmd.query_async(&mut conn)).await
    }

    async fn renew(&self, claim: &Claim) -> Result<bool, StoreError> {
        let mut conn = self.redis.clone();
        let mut invocation = self.renew.key(&claim.key);
        invocation.arg(&claim.record).arg(millis(self.config.lease));
        Ok(self.bounded(invocation.invoke_async::<i64>(&mut conn)).await? == 1)
    }

    async fn complete(&self, claim: &Claim, record: &[u8]) -> Result<bool, StoreError> {
        let mut conn = self.redis.clone();
        let mut invocation = self.complete.key(&claim.key);
        invocation.arg(&claim.record).arg(record).arg(millis(self.config.retention));
        Ok(self.bounded(invocation.invoke_async::<i64>(&mut conn)).await? == 1)
    }

    async fn release(&self, claim: &Claim) {
        let mut conn = self.redis.clone();
        let mut invocation = self.release.key(&claim.key);
        invocation.arg(&claim.record);
        if let Err(err) = self.bounded(invocation.invoke_async::<i64>(&mut conn)).await {
            tracing::warn!(key = %claim.key, error = %err, "releasing an idempotency claim failed; it expires with its lease");
        }
    }

    /// Renews the claim every third of the lease, forever: it ends by being dropped when the handler finishes.
    async fn keep_claimed(&self, claim: &Claim) -> Infallible {
        let period = self.config.lease / 3;
        loop {
            tokio::time::sleep(period).await;
            match self.renew(claim).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!(key = %claim.key, "idempotency claim expired while the handler ran; a retry may run it again");
                    return std::future::pending().await;
                }
                // The next attempt may succeed before the lease runs out; if none does, the claim lapses, which
                // is the same as the instance having died.
                Err(err) => tracing::warn!(key = %claim.key, error = %err, "renewing an idempotency claim failed"),
            }
        }
    }
}

/// Releases a claim that was neither stored nor explicitly released, e.g. because the client went away and the
/// request future was dropped mid-handler: otherwise retries would get 409 until the lease ran out.
struct ClaimGuard {
    shared: Option<Arc<Shared>>,
    claim: Claim,
}

impl ClaimGuard {
    fn claim(&self) -> &Claim {
        &self.claim
    }

    fn disarm(mut self) {
        self.shared = None;
    }

    async fn release(mut self) {
        if let Some(shared) = self.shared.take() {
            shared.release(&self.claim).await;
        }
    }
}

impl Drop for ClaimGuard {
    fn drop(&mut self) {
        let Some(shared) = self.shared.take() else { return };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let claim = std::mem::replace(
                &mut self.claim,
                Claim { key: String::new(), fingerprint: String::new(), record: Vec::new() },
            );
            runtime.spawn(async move { shared.release(&claim).await });
        }
    }
}

/// What is stored under a key: a JSON line, then (for a finished answer) the raw response body, so bodies need
/// no encoding.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Record {
    v: u32,
    fingerprint: String,
    #[serde(flatten)]
    state: State,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
enum State {
    InFlight { owner: String, claimed_at_ms: u64 },
    Completed { status: u16, headers: Vec<(String, StoredValue)>, completed_at_ms: u64 },
}

/// A header value: text when it is UTF-8 (nearly always), else its bytes, so replay is byte-exact.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
enum StoredValue {
    Text(String),
    Bytes(Vec<u8>),
}

impl From<&HeaderValue> for StoredValue {
    fn from(value: &HeaderValue) -> Self {
        match std::str::from_utf8(value.as_bytes()) {
            Ok(text) => Self::Text(text.to_owned()),
            Err(_) => Self::Bytes(value.as_bytes().to_vec()),
        }
    }
}

impl StoredValue {
    fn as_bytes(&self) -> &[u8] {
        match self {
            Self::Text(text) => text.as_bytes(),
            Self::Bytes(bytes) => bytes,
        }
    }
}

impl Record {
    const VERSION: u32 = 1;

    /// Compact JSON escapes control characters inside strings, so the first newline ends the JSON line.
    fn encode(&self, body: &[u8]) -> Vec<u8> {
        let mut out = serde_json::to_vec(self).unwrap_or_default();
        out.push(b'\n');
        out.extend_from_slice(body);
        out
    }

    fn decode(stored: &[u8]) -> Result<(Self, &[u8]), String> {
        let split = stored.iter().position(|&byte| byte == b'\n').unwrap_or(stored.len());
        let record: Self = serde_json::from_slice(&stored[..split]).map_err(|err| err.to_string())?;
        if record.v != Self::VERSION {
            return Err(format!("record version {} is not {}", record.v, Self::VERSION));
        }
        Ok((record, stored.get(split + 1..).unwrap_or_default()))
    }
}

fn replay(status: u16, headers: Vec<(String, StoredValue)>, body: Bytes) -> Result<Response, String> {
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = StatusCode::from_u16(status).map_err(|err| err.to_string())?;
    for (name, value) in headers {
        let name = HeaderName::from_bytes(name.as_bytes()).map_err(|err| err.to_string())?;
        let value = HeaderValue::from_bytes(value.as_bytes()).map_err(|err| err.to_string())?;
        response.headers_mut().append(name, value);
    }
    response.headers_mut().insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    Ok(response)
}

fn is_safe(method: &Method) -> bool {
    [Method::GET, Method::HEAD, Method::OPTIONS, Method::TRACE].contains(method)
}

/// The key from the single `Idempotency-Key` header, or why there is none usable.
fn idempotency_key(headers: &HeaderMap) -> Result<String, &'static str> {
    let mut values = headers.get_all(IDEMPOTENCY_KEY).iter();
    let Some(value) = values.next() else {
        return Err("this request needs an `Idempotency-Key` header: a unique value per operation, reused on retries");
    };
    if values.next().is_some() {
        return Err("send exactly one `Idempotency-Key` header");
    }
    parse_key(value.as_bytes())
}

/// Accepts the key bare (Stripe) or as a structured-field string (the IETF draft: `"..."`); both forms of the
/// same text are the same key. The text must be 1 to [`MAX_KEY_LEN`] visible ASCII characters.
fn parse_key(raw: &[u8]) -> Result<String, &'static str> {
    const INVALID: &str = "the `Idempotency-Key` must be 1 to 255 visible ASCII characters";
    let key: Cow<'_, [u8]> = match raw {
        [b'"', quoted @ .., b'"'] => {
            let mut key = Vec::with_capacity(quoted.len());
            let mut bytes = quoted.iter();
            while let Some(&byte) = bytes.next() {
                match byte {
                    b'\\' => match bytes.next() {
                        Some(&escaped @ (b'"' | b'\\')) => key.push(escaped),
                        _ => return Err(INVALID),
                    },
                    b'"' => return Err(INVALID),
                    _ => key.push(byte),
                }
            }
            Cow::Owned(key)
        }
        _ => Cow::Borrowed(raw),
    };
    if key.is_empty() || key.len() > MAX_KEY_LEN || !key.iter().all(u8::is_ascii_graphic) {
        return Err(INVALID);
    }
    Ok(key.iter().copied().map(char::from).collect())
}

/// `<prefix>:<caller>:<METHOD>:<route>:<key>`, with `:` escaped in caller and route so that the parts cannot
/// run into each other; the key comes last, so its own colons are harmless.
fn scoped_key(prefix: &str, caller: &str, method: &Method, route: &str, key: &str) -> String {
    let caller = percent_encode(caller.as_bytes(), KEY_PART);
    let route = percent_encode(route.as_bytes(), KEY_PART);
    format!("{prefix}:{caller}:{method}:{route}:{key}")
}

/// SHA-256 of the method, the concrete path and query (two paths of one route template with the same key are
/// different requests), and the body: canonical JSON when the body is JSON (no or a JSON content type, and it
/// parses), else its raw bytes. Each part is length-prefixed so no two requests hash the same input.
fn fingerprint(method: &Method, uri: &Uri, content_type: Option<&HeaderValue>, body: &[u8]) -> String {
    let target = uri.path_and_query().map_or(uri.path(), |target| target.as_str());
    let canonical = if is_json(content_type) { canonical_json(body) } else { None };
    let (kind, body): (&[u8], &[u8]) = match &canonical {
        Some(canonical) => (b"json", canonical),
        None => (b"raw", body),
    };
    let mut hasher = Sha256::new();
    for part in [b"kubesaga-idempotency-v1".as_slice(), method.as_str().as_bytes(), target.as_bytes(), kind, body] {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part);
    }
    hasher.finalize().iter().map(|byte| format!("{byte:02x}")).collect()
}

fn is_json(content_type: Option<&HeaderValue>) -> bool {
    let Some(content_type) = content_type else { return true };
    let Ok(content_type) = content_type.to_str() else { return false };
    let essence = content_type.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// The body re-serialized compactly with object keys sorted (by UTF-8 bytes), or `None` if it is not JSON.
/// Sorting is done here rather than left to `serde_json::Map`, whose order follows a crate feature that any
/// dependency can switch on.
fn canonical_json(body: &[u8]) -> Option<Vec<u8>> {
    let value: Value = serde_json::from_slice(body).ok()?;
    let mut out = Vec::with_capacity(body.len());
    write_canonical(&value, &mut out).ok()?;
    Some(out)
}

fn write_canonical(value: &Value, out: &mut Vec<u8>) -> serde_json::Result<()> {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_unstable_by_key(|(name, _)| *name);
            out.push(b'{');
            for (i, (name, value)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                serde_json::to_writer(&mut *out, name)?;
                out.push(b':');
                write_canonical(value, out)?;
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(item, out)?;
            }
            out.push(b']');
        }
        scalar => serde_json::to_writer(&mut *out, scalar)?,
    }
    Ok(())
}

/// The request body, bounded by `max` (413 over it).
async fn read_body(headers: &HeaderMap, body: Body, max: usize) -> Result<Bytes, Problem> {
    let too_large = || {
        Problem::custom(
            StatusCode::PAYLOAD_TOO_LARGE,
            types::PAYLOAD_TOO_LARGE,
            "Payload too large",
            format!("the body is larger than the {max} bytes this route accepts"),
        )
    };
    let declared = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared.is_some_and(|declared| declared > max as u64) {
        return Err(too_large());
    }
    match Limited::new(body, max).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(err) if err.is::<LengthLimitError>() => Err(too_large()),
        Err(err) => Err(Problem::validation("body", format!("the body could not be read: {err}"))),
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX).max(1)
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, millis)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canonical(text: &str) -> String {
        String::from_utf8(canonical_json(text.as_bytes()).expect("JSON")).expect("UTF-8")
    }

    #[test]
    fn canonical_json_sorts_keys_at_every_depth_and_drops_whitespace() {
        assert_eq!(
            canonical(r#" { "b": [ {"z": 1, "a": null} , 2 ], "a": {"y": "x", "x": true}, "é": 1, "Z": 0 } "#),
            r#"{"Z":0,"a":{"x":true,"y":"x"},"b":[{"a":null,"z":1},2],"é":1}"#
        );
        assert_eq!(canonical(r#""a\"b\u0001""#), r#""a\"b\u0001""#);
        assert_eq!(canonical("[3,1,2]"), "[3,1,2]", "array order is meaningful");
        assert_eq!(canonical_json(b"{not json"), None);
        assert_eq!(canonical_json(b""), None);
    }

    #[test]
    fn fingerprint_ignores_key_order_and_whitespace_but_not_content() {
        let post = Method::POST;
        let uri: Uri = "/orders".parse().expect("uri");
        let json = HeaderValue::from_static("application/json; charset=utf-8");
        let a = fingerprint(&post, &uri, Some(&json), br#"{"sku":"A","qty":1}"#);
        assert_eq!(a, fingerprint(&post, &uri, Some(&json), br#"{ "qty": 1, "sku": "A" }"#));
        assert_eq!(a, fingerprint(&post, &uri, None, br#"{"qty":1,"sku":"A"}"#));
        assert_ne!(a, fingerprint(&post, &uri, Some(&json), br#"{"sku":"A","qty":2}"#));
        assert_ne!(a, fingerprint(&Method::PATCH, &uri, Some(&json), br#"{"sku":"A","qty":1}"#));
        let other: Uri = "/orders?dryRun=true".parse().expect("uri");
        assert_ne!(a, fingerprint(&post, &other, Some(&json), br#"{"sku":"A","qty":1}"#));
        let text = HeaderValue::from_static("text/plain");
        assert_ne!(
            fingerprint(&post, &uri, Some(&text), b"{\"a\":1, \"b\":2}"),
            fingerprint(&post, &uri, Some(&text), b"{\"b\":2, \"a\":1}"),
            "non-JSON bodies are hashed as sent"
        );
        assert_eq!(a.len(), 64);
    }

    #[test]
    fn keys_are_visible_ascii_of_bounded_length_bare_or_quoted() {
        assert_eq!(
            parse_key(b"8e03978e-40d5-43e8-bc93-6894a57f9324"),
            Ok("8e03978e-40d5-43e8-bc93-6894a57f9324".into())
        );
        assert_eq!(parse_key(b"\"8e03978e\""), Ok("8e03978e".into()));
        assert_eq!(parse_key(br#""a\"b\\c""#), Ok(r#"a"b\c"#.into()));
        assert_eq!(parse_key(b"a:b"), Ok("a:b".into()));
        assert_eq!(parse_key(&[b'k'; MAX_KEY_LEN]).map(|key| key.len()), Ok(MAX_KEY_LEN));
        for bad in [&b""[..], b"\"\"", &[b'k'; MAX_KEY_LEN + 1], b"has space", b"tab\t", "ünï".as_bytes(), b"\"a\\b\""]
        {
            assert!(parse_key(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn missing_and_repeated_headers_are_rejected() {
        let mut headers = HeaderMap::new();
        assert!(idempotency_key(&headers).is_err());
        headers.append(IDEMPOTENCY_KEY, HeaderValue::from_static("one"));
        assert_eq!(idempotency_key(&headers), Ok("one".into()));
        headers.append(IDEMPOTENCY_KEY, HeaderValue::from_static("two"));
        assert!(idempotency_key(&headers).is_err());
    }

    #[test]
    fn scoped_keys_escape_separators_in_caller_and_route() {
        assert_eq!(
            scoped_key("order", "payment", &Method::POST, "/orders/{id}", "k:1"),
            "order:payment:POST:/orders/{id}:k:1"
        );
        assert_ne!(
            scoped_key("p", "a:POST:/x", &Method::POST, "/y", "k"),
            scoped_key("p", "a", &Method::POST, "/x:POST:/y", "k")
        );
        assert_eq!(scoped_key("p", "a b:%", &Method::PATCH, "/r", "k"), "p:a%20b%3A%25:PATCH:/r:k");
    }

    #[test]
    fn default_caller_prefers_x_caller_then_saga_id() {
        let parts = |headers: &[(&str, &str)]| {
            let mut request = axum::http::Request::post("/");
            for (name, value) in headers {
                request = request.header(*name, *value);
            }
            request.body(()).expect("request").into_parts().0
        };
        assert_eq!(caller_from_headers(&parts(&[("x-saga-id", "s1"), ("x-caller", "payment")])), "payment");
        assert_eq!(caller_from_headers(&parts(&[("x-saga-id", "s1"), ("x-caller", " ")])), "s1");
        assert_eq!(caller_from_headers(&parts(&[])), "anonymous");
    }

    #[test]
    fn header_patterns_match_names_and_prefixes() {
        let config = IdempotencyConfig::new("p");
        let stores = |name: &'static str| config.stores_header(&HeaderName::from_static(name));
        assert!(stores("content-type") && stores("location") && stores("x-order-id"));
        assert!(!stores("cache-control") && !stores("set-cookie") && !stores("content-length"));
        let config = config.stored_headers(["ETag", "x-saga-*"]);
        assert!(config.stores_header(&HeaderName::from_static("etag")));
        assert!(config.stores_header(&HeaderName::from_static("x-saga-step")));
        assert!(!config.stores_header(&HeaderName::from_static("x-order-id")));
    }

    #[test]
    fn records_round_trip_with_binary_bodies_and_headers() {
        let record = Record {
            v: Record::VERSION,
            fingerprint: "f".repeat(64),
            state: State::Completed {
                status: 201,
                headers: vec![
                    ("location".into(), StoredValue::Text("/orders/1".into())),
                    ("x-raw".into(), StoredValue::Bytes(vec![0xff, b'a'])),
                ],
                completed_at_ms: 1,
            },
        };
        let body = b"\n\x00binary\nbody";
        let encoded = record.encode(body);
        let (decoded, decoded_body) = Record::decode(&encoded).expect("decodes");
        assert_eq!((decoded, decoded_body), (record, &body[..]));

        let claim = Record {
            v: Record::VERSION,
            fingerprint: "f".into(),
            state: State::InFlight { owner: "o".into(), claimed_at_ms: 2 },
        };
        let encoded = claim.encode(&[]);
        let (decoded, decoded_body) = Record::decode(&encoded).expect("decodes");
        assert_eq!((decoded, decoded_body), (claim, &b""[..]));
        assert!(Record::decode(b"{\"v\":2,\"fingerprint\":\"f\",\"state\":\"in_flight\"}").is_err());
        assert!(Record::decode(b"garbage").is_err());
    }
}
