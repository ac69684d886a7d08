//! A step target: a small HTTP service for saga steps to call in end-to-end tests.
//!
//! [`StepTarget`] behaves like a well-behaved idempotent service and records everything, so a test can script
//! failures, slowness and outages and then assert what the operator sent and that each effect happened once.
//!
//! How it handles a request, in order:
//!
//! 1. It records the request ([`RecordedRequest`]) and wakes whoever waits for requests.
//! 2. If the request carries an `Idempotency-Key` that already *executed* (answered 2xx), it replays the stored
//!    response with `Idempotent-Replayed: true` and does not execute again. If the key executed with a different
//!    method, path or JSON body, it answers 422: reusing a key for another request is a client bug.
//! 3. If a request with the same key is still in flight (a delayed one), it waits for that one to finish and then
//!    goes on from step 2, so a retry that overtakes a slow original neither runs twice nor fails for it.
//! 4. Otherwise it takes the next scripted [`Behaviour`] for the request's path (scripts are per path, without the
//!    query, whatever the method), or the path's default, or `200 {"ok": true, "path": ..., "key": ...}`.
//!    A 2xx answer is an *execution*: it is counted per key ([`StepTarget::executions`]) and stored for replays.
//!    Any other status has no effect, so a retry with the same key executes afresh.
//!
//! A delayed behaviour executes when its delay ends, whether or not the client still waits: like a real service,
//! it finishes work it has started after the caller timed out, and a retry then gets the replay. It does not
//! execute if the target goes down first ([`RequestOutcome::Abandoned`]).
//!
//! The idempotency store and the scripts survive [`StepTarget::go_down`] and [`StepTarget::come_back`], as they
//! would for a service that keeps them in a database. Only HTTP/1.1 is served.

use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    fmt::Write as _,
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::Bytes,
    extract::State as AxumState,
    http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri},
    response::{IntoResponse, Response},
};
use hyper::server::conn::http1;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use serde_json::{Value, json};
use tokio::{
    net::{TcpListener, TcpSocket},
    sync::{oneshot, watch},
    task::{JoinHandle, JoinSet},
};

/// How long [`StepTarget::come_back`] tries to get its port back before it gives up.
const REBIND_PATIENCE: Duration = Duration::from_secs(5);

/// A request as the target received it.
#[derive(Clone, Debug, PartialEq)]
pub struct RecordedRequest {
    /// HTTP method, e.g. `POST`.
    pub method: String,
    /// Path, without the query.
    pub path: String,
    /// Query string, without the `?`.
    pub query: Option<String>,
    /// Every header, names in lower case, in the order received.
    pub headers: Vec<(String, String)>,
    /// `Idempotency-Key` header.
    pub idempotency_key: Option<String>,
    /// `X-Saga-Id` header.
    pub saga_id: Option<String>,
    /// `X-Saga-Step` header.
    pub saga_step: Option<String>,
    /// `traceparent` header.
    pub traceparent: Option<String>,
    /// The body parsed as JSON; `None` when it is empty or not JSON (see `raw_body`).
    pub body: Option<Value>,
    /// The body as received.
    pub raw_body: Vec<u8>,
    /// When the request arrived.
    pub received_at: Instant,
    /// What the target did with it.
    pub outcome: RequestOutcome,
}

impl RecordedRequest {
    /// The first value of header `name`, in any case.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// What the target did with a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestOutcome {
    /// Still being handled: delayed, or waiting for an earlier request with the same key.
    Pending,
    /// Executed and answered with this 2xx status.
    Executed(u16),
    /// Answered with this scripted non-2xx status; nothing was executed.
    Failed(u16),
    /// Answered with the stored response of the key's execution, without executing again.
    Replayed(u16),
    /// Answered 422: the key had executed for a different method, path or body.
    KeyReused,
    /// Never answered: the target went down, or the client left, before it finished.
    Abandoned,
}

/// One scripted answer: a status with a JSON body and headers, optionally after a delay.
///
/// A 2xx body that is a JSON object is merged over the default `{"ok": true, "path": ..., "key": ...}`, so a
/// test scripts only what later steps read, e.g. `Behaviour::ok(json!({"reservationId": "r-1"}))`.
#[derive(Clone, Debug)]
pub struct Behaviour {
    status: StatusCode,
    body: Option<Value>,
    headers: Vec<(HeaderName, HeaderValue)>,
    delay: Option<Duration>,
}

impl Behaviour {
    /// `200` with `body` merged into the default success body.
    pub fn ok(body: Value) -> Self {
        Self::respond(200, body)
    }

    /// `status` with the default body: the success body for 2xx, `{"error": "scripted <status>", "path": ...}`
    /// otherwise.
    pub fn status(status: u16) -> Self {
        Self { status: status_code(status), body: None, headers: Vec::new(), delay: None }
    }

    /// `status` with `body` (merged into the default success body when both are 2xx and an object).
    pub fn respond(status: u16, body: Value) -> Self {
        Self { body: Some(body), ..Self::status(status) }
    }

    /// Adds a response header, e.g. `.header("Retry-After", "1")`.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        let name = HeaderName::try_from(name).unwrap_or_else(|err| panic!("header name {name:?}: {err}"));
        let value = HeaderValue::try_from(value).unwrap_or_else(|err| panic!("header value {value:?}: {err}"));
        self.headers.push((name, value));
        self
    }

    /// Answers only after `delay`, to provoke client timeouts. The request executes (if the status is 2xx) when
    /// the delay ends, whether or not the client still waits.
    pub fn after(mut self, delay: Duration) -> Self {
        self.delay = Some(delay);
        self
    }

    fn response(&self, path: &str, key: Option<&str>) -> StoredResponse {
        let body = if self.status.is_success() {
            let mut base = json!({ "ok": true, "path": path, "key": key });
            match (&self.body, &mut base) {
                (None, _) => base,
                (Some(Value::Object(fields)), Value::Object(merged)) => {
                    merged.extend(fields.iter().map(|(k, v)| (k.clone(), v.clone())));
                    base
                }
                (Some(other), _) => other.clone(),
            }
        } else {
            self.body
                .clone()
                .unwrap_or_else(|| json!({ "error": format!("scripted {}", self.status.as_u16()), "path": path }))
        };
        StoredResponse { status: self.status, headers: self.headers.clone(), body }
    }
}

fn status_code(status: u16) -> StatusCode {
    StatusCode::from_u16(status).unwrap_or_else(|err| panic!("status {status}: {err}"))
}

/// A test HTTP service on `127.0.0.1` that saga steps call; see the [module documentation](self).
pub struct StepTarget {
    addr: SocketAddr,
    shared: Arc<Shared>,
    running: tokio::sync::Mutex<Option<Serving>>,
}

impl StepTarget {
    /// Starts serving on a free port of `127.0.0.1`.
    pub async fn start() -> Self {
        let listener = bind(SocketAddr::from(([127, 0, 0, 1], 0))).expect("bind a step target to 127.0.0.1");
        let addr = listener.local_addr().expect("local address of the step target");
        let shared = Arc::new(Shared {
            state: Mutex::new(TargetState::default()),
            changes: watch::Sender::new(0),
            started_at: Instant::now(),
        });
        let serving = Serving::start(listener, shared.clone());
        Self { addr, shared, running: tokio::sync::Mutex::new(Some(serving)) }
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        let slash = if path.starts_with('/') { "" } else { "/" };
        format!("http://{}{slash}{path}", self.addr)
    }

    /// The address served, the same across [`StepTarget::go_down`] and [`StepTarget::come_back`].
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Queues `behaviours` for `path` (any method): each answers one request that is not a replay, in order;
    /// once they are used up the path's default answers.
    pub fn script(&self, path: &str, behaviours: impl IntoIterator<Item = Behaviour>) {
        self.shared.lock().scripts.entry(path.to_owned()).or_default().extend(behaviours);
    }

    /// Makes `status` with `body` the default answer of `path` (a 2xx object body is merged into the default
    /// success body).
    pub fn default_response(&self, path: &str, status: u16, body: Value) {
        self.default_behaviour(path, Behaviour::respond(status, body));
    }

    /// Makes `behaviour` the default answer of `path`, e.g. a slow one for every request.
    pub fn default_behaviour(&self, path: &str, behaviour: Behaviour) {
        self.shared.lock().defaults.insert(path.to_owned(), behaviour);
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.lock().requests.clone()
    }

    /// The requests to `path` (without query), in arrival order.
    pub fn requests_for(&self, path: &str) -> Vec<RecordedRequest> {
        self.shared.lock().requests.iter().filter(|r| r.path == path).cloned().collect()
    }

    /// How many times a request with idempotency key `key` executed: 0 or 1 for a target that never forgets.
    pub fn executions(&self, key: &str) -> u32 {
        self.shared.lock().executions.get(key).copied().unwrap_or(0)
    }

    /// The keys that executed, sorted.
    pub fn keys_executed(&self) -> Vec<String> {
        self.shared.lock().executions.keys().cloned().collect()
    }

    /// Waits until `n` requests to `path` have arrived and returns them; panics after `timeout` with what the
    /// target saw. Requests that did not need to wait are already answered when it returns.
    pub async fn wait_for_requests(&self, path: &str, n: usize, timeout: Duration) -> Vec<RecordedRequest> {
        self.wait_until(timeout, &format!("{n} request(s) to {path}"), |state| {
            let seen: Vec<_> = state.requests.iter().filter(|r| r.path == path).cloned().collect();
            (seen.len() >= n).then_some(seen)
        })
        .await
    }

    /// Waits until key `key` has executed `n` times; panics after `timeout` with what the target saw.
    pub async fn wait_for_executions(&self, key: &str, n: u32, timeout: Duration) {
        self.wait_until(timeout, &format!("{n} execution(s) of key {key}"), |state| {
            (state.executions.get(key).copied().unwrap_or(0) >= n).then_some(())
        })
        .await;
    }

    /// Stops serving like a crashed process: the port refuses connections, open connections are cut, and delayed
    /// requests are abandoned without executing. Returns once all of that is done.
    pub async fn go_down(&self) {
        let serving = self.running.lock().await.take();
        if let Some(serving) = serving {
            serving.stop().await;
        }
    }

    /// Serves again on the same port, with the same scripts, records and idempotency store.
    pub async fn come_back(&self) {
        let mut running = self.running.lock().await;
        if running.is_some() {
            return;
        }
        let deadline = Instant::now() + REBIND_PATIENCE;
        let listener = loop {
            match bind(self.addr) {
                Ok(listener) => break listener,
                // Another socket may hold the port for a moment (the OS can hand it out as an ephemeral port);
                // there is nothing to wait on but time.
                Err(err) if Instant::now() < deadline && err.kind() == std::io::ErrorKind::AddrInUse => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(err) => panic!("step target cannot listen on {} again: {err}", self.addr),
            }
        };
        *running = Some(Serving::start(listener, self.shared.clone()));
    }

    async fn wait_until<T>(
        &self,
        timeout: Duration,
        what: &str,
        mut check: impl FnMut(&TargetState) -> Option<T>,
    ) -> T {
        let mut changes = self.shared.changes.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // Marking the current version seen before looking means no change after the look goes unnoticed.
            changes.borrow_and_update();
            if let Some(found) = check(&self.shared.lock()) {
                return found;
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => panic!("step target {} stopped while waiting for {what}", self.addr),
                Err(_) => panic!(
                    "step target {}: waited {timeout:?} for {what}; it saw:\n{}",
                    self.addr,
                    self.shared.describe()
                ),
            }
        }
    }
}

impl Drop for StepTarget {
    fn drop(&mut self) {
        if let Some(serving) = self.running.get_mut().take() {
            serving.shutdown.send_replace(true);
            // Aborting the accept loop drops its connections; delayed requests see the shutdown signal.
            serving.accept_loop.abort();
        }
    }
}

/// What the handlers and the test share.
struct Shared {
    state: Mutex<TargetState>,
    /// Bumped after every change of `state`, for waiters.
    changes: watch::Sender<u64>,
    started_at: Instant,
}

#[derive(Default)]
struct TargetState {
    requests: Vec<RecordedRequest>,
    scripts: HashMap<String, VecDeque<Behaviour>>,
    defaults: HashMap<String, Behaviour>,
    /// The stored execution of each key that executed.
    completed: HashMap<String, Execution>,
    /// Keys of delayed requests that have not finished.
    in_flight: HashSet<String>,
    executions: BTreeMap<String, u32>,
}

struct Execution {
    request: Fingerprint,
    response: StoredResponse,
}

/// What must match for a request to be a retry of an executed one.
#[derive(Clone, Debug, PartialEq)]
struct Fingerprint {
    method: String,
    path: String,
    body: Option<Value>,
}

impl Fingerprint {
    fn of(request: &RecordedRequest) -> Self {
        Self { method: request.method.clone(), path: request.path.clone(), body: request.body.clone() }
    }
}

#[derive(Clone, Debug)]
struct StoredResponse {
    status: StatusCode,
    headers: Vec<(HeaderName, HeaderValue)>,
    body: Value,
}

impl StoredResponse {
    fn into_response(self, replayed: bool) -> Response {
        let mut response = (self.status, axum::Json(self.body)).into_response();
        for (name, value) in self.headers {
            response.headers_mut().append(name, value);
        }
        if replayed {
            response.headers_mut().insert("idempotent-replayed", HeaderValue::from_static("true"));
        }
        response
    }
}

/// What to do with a request next.
enum Decision {
    Respond {
        response: StoredResponse,
        replayed: bool,
    },
    /// A request with the same key is in flight.
    Wait,
    Delay {
        delay: Duration,
        response: StoredResponse,
    },
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, TargetState> {
        // A test that panicked while holding the lock has failed already; its records are still worth reading.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn notify(&self) {
        self.changes.send_modify(|version| *version += 1);
    }

    fn record(&self, request: RecordedRequest) -> usize {
        let index = {
            let mut state = self.lock();
            state.requests.push(request);
            state.requests.len() - 1
        };
        self.notify();
        index
    }

    /// Decides what to do with request `index`; answers it right away when it can.
    fn decide(&self, index: usize) -> Decision {
        let mut guard = self.lock();
        let state = &mut *guard;
        let request = &state.requests[index];
        let key = request.idempotency_key.clone();
        let fingerprint = Fingerprint::of(request);
        let path = request.path.clone();
        if let Some(key) = &key {
            if let Some(done) = state.completed.get(key) {
                let (outcome, response, replayed) = if done.request == fingerprint {
                    (RequestOutcome::Replayed(done.response.status.as_u16()), done.response.clone(), true)
                } else {
                    (RequestOutcome::KeyReused, key_reused(key, &done.request), false)
                };
                state.requests[index].outcome = outcome;
                return Decision::Respond { response, replayed };
            }
            if state.in_flight.contains(key) {
                return Decision::Wait;
            }
        }
        let behaviour = state
            .scripts
            .get_mut(&path)
            .and_then(VecDeque::pop_front)
            .or_else(|| state.defaults.get(&path).cloned())
            .unwrap_or_else(|| Behaviour::status(200));
        let response = behaviour.response(&path, key.as_deref());
        match behaviour.delay {
            Some(delay) => {
                if let Some(key) = key {
                    state.in_flight.insert(key);
                }
                Decision::Delay { delay, response }
            }
            None => {
                state.complete(index, response.clone());
                Decision::Respond { response, replayed: false }
            }
        }
    }

    /// Ends a delayed request: executes it if it `finished`, abandons it otherwise.
    fn end_delayed(&self, index: usize, response: StoredResponse, finished: bool) -> Option<StoredResponse> {
        let mut state = self.lock();
        if let Some(key) = state.requests[index].idempotency_key.clone() {
            state.in_flight.remove(&key);
        }
        if finished {
            state.complete(index, response.clone());
            Some(response)
        } else {
            state.requests[index].outcome = RequestOutcome::Abandoned;
            None
        }
    }

    fn abandon_if_pending(&self, index: usize) {
        let mut state = self.lock();
        if state.requests[index].outcome == RequestOutcome::Pending {
            state.requests[index].outcome = RequestOutcome::Abandoned;
        }
    }

    fn describe(&self) -> String {
        let state = self.lock();
        if state.requests.is_empty() {
            return "  no requests".to_owned();
        }
        let mut out = String::new();
        for r in &state.requests {
            let at = r.received_at.saturating_duration_since(self.started_at);
            let _ = writeln!(
                out,
                "  +{:.3}s {} {}{} key={} step={} -> {:?}",
                at.as_secs_f64(),
                r.method,
                r.path,
                r.query.as_deref().map(|q| format!("?{q}")).unwrap_or_default(),
                r.idempotency_key.as_deref().unwrap_or("-"),
                r.saga_step.as_deref().unwrap_or("-"),
                r.outcome,
            );
        }
        let _ = write!(out, "  executions: {:?}", state.executions);
        out
    }
}

impl TargetState {
    /// Records the answer to request `index`; a 2xx one is an execution of its key.
    fn complete(&mut self, index: usize, response: StoredResponse) {
        let request = &mut self.requests[index];
        let code = response.status.as_u16();
        if !response.status.is_success() {
            request.outcome = RequestOutcome::Failed(code);
            return;
        }
        request.outcome = RequestOutcome::Executed(code);
        if let Some(key) = request.idempotency_key.clone() {
            let fingerprint = Fingerprint::of(request);
            *self.executions.entry(key.clone()).or_default() += 1;
            self.completed.insert(key, Execution { request: fingerprint, response });
        }
    }
}

fn key_reused(key: &str, executed: &Fingerprint) -> StoredResponse {
    StoredResponse {
        status: StatusCode::UNPROCESSABLE_ENTITY,
        headers: Vec::new(),
        body: json!({
            "error": "this Idempotency-Key already executed a different request",
            "key": key,
            "executed": { "method": executed.method, "path": executed.path, "body": executed.body },
        }),
    }
}

/// One period of serving, from [`StepTarget::start`] or [`StepTarget::come_back`] to [`StepTarget::go_down`].
struct Serving {
    shutdown: watch::Sender<bool>,
    accept_loop: JoinHandle<()>,
    delayed: Arc<Mutex<JoinSet<()>>>,
}

/// The state of the request handlers of one [`Serving`].
#[derive(Clone)]
struct Handlers {
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
    delayed: Arc<Mutex<JoinSet<()>>>,
}

impl Serving {
    fn start(listener: TcpListener, shared: Arc<Shared>) -> Self {
        let (shutdown, shutdown_rx) = watch::channel(false);
        let delayed = Arc::new(Mutex::new(JoinSet::new()));
        let handlers = Handlers { shared, shutdown: shutdown_rx.clone(), delayed: delayed.clone() };
        let router = Router::new().fallback(handle).with_state(handlers);
        let accept_loop = tokio::spawn(accept_loop(listener, router, shutdown_rx));
        Self { shutdown, accept_loop, delayed }
    }

    async fn stop(self) {
        self.shutdown.send_replace(true);
        // The accept loop has ended only once its connections are cut, so no handler can delay a request after.
        let _ = self.accept_loop.await;
        let mut delayed = std::mem::take(&mut *self.delayed.lock().unwrap_or_else(PoisonError::into_inner));
        while delayed.join_next().await.is_some() {}
    }
}

/// Binds with `SO_REUSEADDR`, so the target can come back while connections of its previous life linger in
/// `TIME_WAIT`.
fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

async fn accept_loop(listener: TcpListener, router: Router, mut shutdown: watch::Receiver<bool>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.wait_for(|down| *down) => break,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let _ = stream.set_nodelay(true);
                let service = TowerToHyperService::new(router.clone());
                connections.spawn(async move {
                    let mut builder = http1::Builder::new();
                    builder.timer(TokioTimer::new());
                    // A client hanging up mid-request is the client's business, not a failure of the target.
                    let _ = builder.serve_connection(TokioIo::new(stream), service).await;
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    connections.shutdown().await;
}

/// Marks its request abandoned if the handler is dropped before the request got an outcome.
struct AbandonOnDrop {
    shared: Arc<Shared>,
    index: usize,
    armed: bool,
}

impl Drop for AbandonOnDrop {
    fn drop(&mut self) {
        if self.armed {
            self.shared.abandon_if_pending(self.index);
            self.shared.notify();
        }
    }
}

async fn handle(
    AxumState(handlers): AxumState<Handlers>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let shared = handlers.shared.clone();
    let index = shared.record(recorded(&method, &uri, &headers, &body));
    let mut guard = AbandonOnDrop { shared: shared.clone(), index, armed: true };
    loop {
        let mut changes = shared.changes.subscribe();
        match shared.decide(index) {
            Decision::Respond { response, replayed } => {
                shared.notify();
                return response.into_response(replayed);
            }
            Decision::Wait => {
                let _ = changes.changed().await;
            }
            Decision::Delay { delay, response } => {
                guard.armed = false;
                let (answer, answered) = oneshot::channel();
                let mut shutdown = handlers.shutdown.clone();
                let task_shared = shared.clone();
                let task = async move {
                    let finished = tokio::select! {
                        () = tokio::time::sleep(delay) => true,
                        _ = shutdown.wait_for(|down| *down) => false,
                    };
                    let response = task_shared.end_delayed(index, response, finished);
                    task_shared.notify();
                    let _ = answer.send(response);
                };
                {
                    let mut delayed = handlers.delayed.lock().unwrap_or_else(PoisonError::into_inner);
                    while delayed.try_join_next().is_some() {}
                    delayed.spawn(task);
                }
                return match answered.await {
                    Ok(Some(response)) => response.into_response(false),
                    _ => StatusCode::SERVICE_UNAVAILABLE.into_response(),
                };
            }
        }
    }
}

fn recorded(method: &Method, uri: &Uri, headers: &HeaderMap, body: &Bytes) -> RecordedRequest {
    let header = |name: &str| headers.get(name).map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    RecordedRequest {
        method: method.as_str().to_owned(),
        path: uri.path().to_owned(),
        query: uri.query().map(str::to_owned),
        headers: headers
            .iter()
            .map(|(n, v)| (n.as_str().to_owned(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
            .collect(),
        idempotency_key: header("idempotency-key"),
        saga_id: header("x-saga-id"),
        saga_step: header("x-saga-step"),
        traceparent: header("traceparent"),
        body: if body.is_empty() { None } else { serde_json::from_slice(body).ok() },
        raw_body: body.to_vec(),
        received_at: Instant::now(),
        outcome: RequestOutcome::Pending,
    }
}
