//! The decision at the heart of the Saga controller: given what the saga asks for (spec), what the operator has
//! recorded (status), the time, the user's requests (deletion, annotations) and the outcome of the call just made,
//! what is the next status and the next thing to do?
//!
//! [`plan`] is a pure function: no client, no clock, no randomness (jitter is drawn from a hash of the saga's uid).
//! The reconciler performs the [`Effect`] it returns and persists the [`Decision::status`]; after a call it plans
//! again with the call's [`Outcome`], so the result of step k and the write-ahead record of step k+1 reach the API
//! server in one status write.
//!
//! Crash safety rests on one rule: a call is only ever made after a status recording it as `Running` (attempt n)
//! was persisted. After a crash, a `Running` call without an outcome is repeated with the same idempotency key, and
//! a saga that must compensate treats it as possibly applied.

use std::time::Duration;

use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{MicroTime, Time},
    jiff::{SignedDuration, Timestamp},
};
use serde_json::Value;

use super::{
    policy::{CallKind, Policy},
    template::{self, RenderedRequest, TemplateContext},
};
use crate::{
    conditions::{self, Status},
    crd::{CallPhase, CallStatus, HttpCall, SagaPhase, SagaReason, SagaSpec, SagaStatus, StepStatus},
};

/// Largest JSON output kept for one step; a bigger response body fails the step (the call did happen, so the
/// step is compensated).
pub const MAX_OUTPUT_BYTES: usize = 8 * 1024;
/// Largest sum of all step outputs, which keeps the whole object far below etcd's 1.5 MB limit.
pub const MAX_TOTAL_OUTPUT_BYTES: usize = 128 * 1024;
/// Longest `lastError` kept in the status.
pub const MAX_ERROR_CHARS: usize = 512;

/// What the user asked for outside the spec.
#[derive(Clone, Debug, Default)]
pub struct Requests<'a> {
    /// The saga has a deletion timestamp.
    pub deleting: bool,
    /// The `kubesaga.dev/abort` annotation is set.
    pub abort: bool,
    /// The `kubesaga.dev/suspend` annotation is set.
    pub suspend: bool,
    /// Value of the `kubesaga.dev/retry-compensation` annotation.
    pub retry_compensation: Option<&'a str>,
}

/// Everything the decision depends on.
#[derive(Clone, Debug)]
pub struct Input<'a> {
    /// The saga's spec.
    pub spec: &'a SagaSpec,
    /// The status as last persisted (or as the previous decision left it within one reconcile).
    pub status: &'a SagaStatus,
    /// `metadata.name`.
    pub name: &'a str,
    /// `metadata.namespace`.
    pub namespace: &'a str,
    /// `metadata.uid`: part of every idempotency key, and the seed of retry jitter.
    pub uid: &'a str,
    /// `metadata.generation`.
    pub generation: Option<i64>,
    /// The current time.
    pub now: Timestamp,
    /// Deletion and annotations.
    pub requests: Requests<'a>,
    /// The outcome of the call the previous decision asked for, if one was made since.
    pub observation: Option<Observation>,
    /// DNS domain of the cluster, for calls addressed to a Service.
    pub cluster_domain: &'a str,
}

/// The outcome of one attempt of one call.
#[derive(Clone, Debug, PartialEq)]
pub struct Observation {
    /// Index of the step in the spec.
    pub step: usize,
    /// Action or compensation.
    pub kind: CallKind,
    /// The attempt number the call was made as.
    pub attempt: u32,
    /// What happened.
    pub outcome: Outcome,
}

/// How an attempt ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// A 2xx response; `output` is its JSON body, if it had one.
    Succeeded {
        /// HTTP status.
        http_status: u16,
        /// The parsed JSON body.
        output: Option<Value>,
    },
    /// Worth another attempt: 408, 425, 429, 5xx, a timeout or a connection error.
    Retryable {
        /// HTTP status, if a response came.
        http_status: Option<u16>,
        /// What went wrong.
        error: String,
        /// The server's `Retry-After`, if it sent one.
        retry_after: Option<Duration>,
    },
    /// Another attempt would fail the same way: any other 4xx, or a request the operator refused to send.
    Permanent {
        /// HTTP status, if a response came.
        http_status: Option<u16>,
        /// What went wrong.
        error: String,
    },
}

/// A call to make now.
#[derive(Clone, Debug, PartialEq)]
pub struct PlannedCall {
    /// Index of the step in the spec.
    pub step: usize,
    /// Name of the step.
    pub step_name: String,
    /// Action or compensation.
    pub kind: CallKind,
    /// Attempt number, 1-based.
    pub attempt: u32,
    /// `<saga uid>-<step>-<action|compensate>`: the same for every attempt, before and after operator restarts.
    pub idempotency_key: String,
    /// The request, templates rendered.
    pub request: RenderedRequest,
    /// Timeout of this attempt: the call's own, shortened to what is left before the deadline.
    pub timeout: Duration,
}

/// What the reconciler does after persisting the status.
#[derive(Clone, Debug, PartialEq)]
pub enum Effect {
    /// Make this call, then plan again with its outcome.
    Call(PlannedCall),
    /// Nothing to do until this time (a retry is due, the deadline passes, the TTL expires).
    RequeueAt(Timestamp),
    /// Nothing is timed: wait for the saga to change.
    AwaitChange,
    /// The finished saga outlived its TTL: delete it.
    Delete,
    /// The saga is being deleted and has finished: remove the finalizer so it goes.
    ReleaseFinalizer,
}

/// A transition worth a Kubernetes Event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    /// A Warning event rather than a Normal one.
    pub warning: bool,
    /// The event's reason, UpperCamelCase.
    pub reason: &'static str,
    /// A sentence for humans.
    pub message: String,
    /// The step the transition concerns, if any, so that events of different steps are not merged.
    pub step: Option<String>,
}

/// The result of [`plan`].
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// The status to persist before performing the effect.
    pub status: SagaStatus,
    /// What to do next.
    pub effect: Effect,
    /// Transitions made by this decision, in order.
    pub notes: Vec<Note>,
}

/// Decides the saga's next status and next effect. See the module documentation.
pub fn plan(input: Input<'_>) -> Decision {
    let mut planner = Planner { status: input.status.clone(), notes: Vec::new(), now: Time(input.now), input };
    let effect = planner.decide();
    let was_suspended = planner.progressing_reason() == Some("Suspended");
    planner.refresh_conditions();
    // Suspension is a transition users make by hand; the Progressing condition records it, and an event says so.
    match (was_suspended, planner.progressing_reason() == Some("Suspended")) {
        (false, true) if !planner.notes.iter().any(|n| n.reason == "Suspended") => {
            planner.note(
                false,
                "Suspended",
                "no further calls until the kubesaga.dev/suspend annotation is removed".into(),
            );
        }
        (true, false) => planner.note(false, "Resumed", "the kubesaga.dev/suspend annotation was removed".into()),
        _ => {}
    }
    Decision { status: planner.status, effect, notes: planner.notes }
}

struct Planner<'a> {
    input: Input<'a>,
    status: SagaStatus,
    notes: Vec<Note>,
    now: Time,
}

impl Planner<'_> {
    fn decide(&mut self) -> Effect {
        self.status.observed_generation = self.input.generation;
        if self.status.phase.is_none()
            && let Some(effect) = self.start()
        {
            return effect;
        }
        if let Some(observation) = self.input.observation.clone() {
            self.observe(observation);
        }
        match self.status.phase {
            // Through `running`, like a first start, so the deadline is checked before the first call.
            None | Some(SagaPhase::Pending) => self.start().unwrap_or_else(|| self.running()),
            Some(SagaPhase::Running) => self.running(),
            Some(SagaPhase::Compensating) => self.compensating(),
            Some(SagaPhase::Succeeded | SagaPhase::Compensated | SagaPhase::Failed) => self.finished(),
        }
    }

    /// First visit: validate what can only be checked now, then start (or stay pending while suspended).
    /// Returns the effect when the saga does not start running.
    fn start(&mut self) -> Option<Effect> {
        if self.status.phase.is_none()
            && let Err(err) = template::check_spec(self.input.spec)
        {
            self.status.phase = Some(SagaPhase::Failed);
            self.status.reason = Some(SagaReason::InvalidSpec);
            self.status.finished_at = Some(self.micro_now());
            self.note(true, "InvalidSpec", format!("the saga cannot run: {err}; fix the spec and create it again"));
            return Some(self.finished());
        }
        if self.input.requests.suspend && !self.input.requests.deleting && !self.input.requests.abort {
            if self.status.phase.is_none() {
                self.note(false, "Suspended", "suspended before its first step; remove the annotation to start".into());
            }
            self.status.phase = Some(SagaPhase::Pending);
            return Some(Effect::AwaitChange);
        }
        if self.input.requests.deleting || self.input.requests.abort {
            // Nothing ran yet, so there is nothing to undo.
            let reason = if self.input.requests.deleting { SagaReason::Deleted } else { SagaReason::Aborted };
            self.status.phase = Some(SagaPhase::Compensated);
            self.status.reason = Some(reason);
            self.status.finished_at = Some(self.micro_now());
            self.note(false, "Compensated", format!("{reason:?} before its first step; nothing to undo"));
            return Some(self.finished());
        }
        self.status.phase = Some(SagaPhase::Running);
        self.status.started_at = Some(self.micro_now());
        self.status.trace_id = Some(self.input.uid.replace('-', ""));
        self.note(false, "Started", format!("running {} steps", self.input.spec.steps.len()));
        None
    }

    fn running(&mut self) -> Effect {
        if !self.past_pivot() {
            let requests = &self.input.requests;
            let reason = if requests.deleting {
                Some(SagaReason::Deleted)
            } else if requests.abort {
                Some(SagaReason::Aborted)
            } else if self.deadline().is_some_and(|deadline| self.input.now >= deadline) && self.steps_left() {
                // A saga whose last step succeeded (its answer planned on at or after the deadline) is done, not
                // late: undoing all of it would throw away finished work.
                Some(SagaReason::DeadlineExceeded)
            } else {
                None
            };
            if let Some(reason) = reason {
                return self.begin_compensation(reason, String::new());
            }
        }
        if self.suspended() {
            return Effect::AwaitChange;
        }
        self.forward()
    }

    /// Runs the first step that has not succeeded.
    fn forward(&mut self) -> Effect {
        let Some(index) = (0..self.input.spec.steps.len())
            .find(|&i| self.step_status(i).is_none_or(|s| s.action.phase != CallPhase::Succeeded))
        else {
            self.status.phase = Some(SagaPhase::Succeeded);
            self.status.finished_at = Some(self.micro_now());
            self.status.current_step = None;
            self.status.current_attempts = None;
            self.note(false, "Succeeded", format!("all {} steps succeeded", self.input.spec.steps.len()));
            return self.finished();
        };
        let call = self.step_status(index).map(|s| s.action.clone()).unwrap_or_default();
        match call.phase {
            CallPhase::Pending => self.attempt(index, CallKind::Action, 1),
            CallPhase::Running => self.attempt(index, CallKind::Action, call.attempts.max(1)),
            CallPhase::Retrying => self.retry_when_due(index, CallKind::Action, &call),
            CallPhase::Failed => self.step_failed(index),
            CallPhase::Succeeded => unreachable_effect(),
        }
    }

    /// A step failed for good: compensate, or, past the pivot, give up for a human.
    fn step_failed(&mut self, index: usize) -> Effect {
        let name = &self.input.spec.steps[index].name;
        let error = self.step_status(index).and_then(|s| s.action.last_error.clone()).unwrap_or_default();
        if self.past_pivot() {
            self.status.phase = Some(SagaPhase::Failed);
            self.status.reason = Some(SagaReason::FailedAfterPivot);
            self.status.finished_at = Some(self.micro_now());
            let message = format!(
                "step {name} failed after the pivot step succeeded, so the saga cannot be compensated: {error}; \
                 fix the cause and finish the step by hand"
            );
            self.note(true, "FailedAfterPivot", message);
            return self.finished();
        }
        self.begin_compensation(SagaReason::StepFailed, format!("step {name} failed: {error}"))
    }

    fn begin_compensation(&mut self, reason: SagaReason, detail: String) -> Effect {
        self.status.phase = Some(SagaPhase::Compensating);
        self.status.reason = Some(reason);
        // An action cut short keeps its attempts: it may have reached the service, so it is compensated too.
        let now = self.micro_now();
        for step in &mut self.status.steps {
            if matches!(step.action.phase, CallPhase::Running | CallPhase::Retrying) {
                step.action.phase = CallPhase::Failed;
                step.action.next_attempt_at = None;
                step.action.finished_at = Some(now.clone());
                step.action.last_error = Some(truncate(format!("abandoned: the saga is compensating ({reason:?})")));
            }
        }
        let message = if detail.is_empty() {
            format!("compensating completed steps in reverse ({reason:?})")
        } else {
            format!("compensating completed steps in reverse ({reason:?}): {detail}")
        };
        self.note(true, "Compensating", message);
        self.compensating()
    }

    /// Undoes, in reverse order, every step that may have taken effect and has a compensation.
    fn compensating(&mut self) -> Effect {
        if self.suspended() {
            return Effect::AwaitChange;
        }
        let pending = (0..self.input.spec.steps.len()).rev().find(|&i| {
            let Some(step) = self.step_status(i) else { return false };
            self.input.spec.steps[i].compensation.is_some()
                && may_have_taken_effect(&step.action)
                && step.compensation.as_ref().is_none_or(|c| c.phase != CallPhase::Succeeded)
        });
        let Some(index) = pending else {
            self.status.phase = Some(SagaPhase::Compensated);
            self.status.finished_at = Some(self.micro_now());
            self.status.current_step = None;
            self.status.current_attempts = None;
            self.note(false, "Compensated", "every completed step was undone".into());
            return self.finished();
        };
        let call = self.step_status(index).and_then(|s| s.compensation.clone()).unwrap_or_default();
        match call.phase {
            CallPhase::Pending => self.attempt(index, CallKind::Compensation, 1),
            CallPhase::Running => self.attempt(index, CallKind::Compensation, call.attempts.max(1)),
            CallPhase::Retrying => self.retry_when_due(index, CallKind::Compensation, &call),
            CallPhase::Failed => {
                let name = &self.input.spec.steps[index].name;
                self.status.phase = Some(SagaPhase::Failed);
                self.status.reason = Some(SagaReason::CompensationFailed);
                self.status.finished_at = Some(self.micro_now());
                let message = format!(
                    "compensation of step {name} gave up after {} attempts: {}; fix the cause, then set the \
                     kubesaga.dev/retry-compensation annotation to a new value to try again",
                    call.attempts,
                    call.last_error.as_deref().unwrap_or("no error recorded")
                );
                self.note(true, "CompensationFailed", message);
                self.finished()
            }
            CallPhase::Succeeded => unreachable_effect(),
        }
    }

    fn finished(&mut self) -> Effect {
        let requests = &self.input.requests;
        if let Some(request) = requests.retry_compensation
            && self.status.handled_retry_request.as_deref() != Some(request)
        {
            self.status.handled_retry_request = Some(request.to_owned());
            if self.status.reason == Some(SagaReason::CompensationFailed) {
                return self.retry_compensation();
            }
            self.note(true, "RetryIgnored", "only a saga whose compensation failed can retry it".into());
        }
        if self.input.requests.deleting {
            return Effect::ReleaseFinalizer;
        }
        let ttl = self.input.spec.ttl_seconds_after_finished.as_ref().and_then(|ttl| match self.status.phase {
            Some(SagaPhase::Succeeded) => ttl.succeeded,
            Some(SagaPhase::Compensated) => ttl.compensated,
            Some(SagaPhase::Failed) => ttl.failed,
            _ => None,
        });
        match (ttl, &self.status.finished_at) {
            (Some(seconds), Some(finished)) => {
                let expiry = finished.0.checked_add(SignedDuration::from_secs(seconds)).unwrap_or(Timestamp::MAX);
                if self.input.now >= expiry { Effect::Delete } else { Effect::RequeueAt(expiry) }
            }
            _ => Effect::AwaitChange,
        }
    }

    fn retry_compensation(&mut self) -> Effect {
        for step in &mut self.status.steps {
            if let Some(comp) = step.compensation.as_mut().filter(|c| c.phase == CallPhase::Failed) {
                *comp = CallStatus { started_at: comp.started_at.clone(), ..CallStatus::default() };
            }
        }
        self.status.phase = Some(SagaPhase::Compensating);
        self.status.finished_at = None;
        self.note(false, "RetryingCompensation", "retrying the failed compensation as requested".into());
        self.compensating()
    }

    /// Makes attempt `attempt` of a call: records it as running (write-ahead), then asks for the call.
    fn attempt(&mut self, index: usize, kind: CallKind, attempt: u32) -> Effect {
        let step = &self.input.spec.steps[index];
        let Some(http) = call_spec(step, kind) else { return unreachable_effect() };
        let policy = Policy::resolve(self.input.spec, kind, &http.policy);
        let rendered = template::render(http, &self.template_context(), self.input.cluster_domain);
        let now = self.micro_now();
        let record = self.call_status_mut(index, kind);
        let first = record.phase == CallPhase::Pending;
        record.started_at.get_or_insert_with(|| now.clone());
        match rendered {
            Err(err) => {
                // Nothing was sent, so attempts stay as they are: a step that never reached its service is not
                // compensated.
                record.phase = CallPhase::Failed;
                record.finished_at = Some(now);
                record.last_error = Some(truncate(format!("cannot build the request: {err}")));
                let message = format!("step {}: cannot build the request: {err}", step.name);
                self.step_note(true, failed_reason(kind), &step.name, message);
                match kind {
                    CallKind::Action => self.step_failed(index),
                    CallKind::Compensation => self.compensating(),
                }
            }
            Ok(request) => {
                record.phase = CallPhase::Running;
                record.attempts = attempt;
                record.next_attempt_at = None;
                self.status.current_step = Some(step.name.clone());
                self.status.current_attempts = Some(attempt);
                if first {
                    let verb = if kind == CallKind::Action { "StepStarted" } else { "CompensationStarted" };
                    self.step_note(
                        false,
                        verb,
                        &step.name,
                        format!(
                            "step {}: {} {}",
                            step.name,
                            format!("{:?}", request.method).to_uppercase(),
                            request.url
                        ),
                    );
                }
                let timeout = match self.deadline().filter(|_| kind == CallKind::Action && !self.past_pivot()) {
                    Some(deadline) => policy.timeout.min(remaining(self.input.now, deadline)),
                    None => policy.timeout,
                };
                Effect::Call(PlannedCall {
                    step: index,
                    step_name: step.name.clone(),
                    kind,
                    attempt,
                    idempotency_key: format!("{}-{}-{}", self.input.uid, step.name, kind.as_str()),
                    request,
                    timeout,
                })
            }
        }
    }

    fn retry_when_due(&mut self, index: usize, kind: CallKind, call: &CallStatus) -> Effect {
        let due = call.next_attempt_at.as_ref().map_or(self.input.now, |t| t.0);
        if self.input.now >= due {
            return self.attempt(index, kind, call.attempts + 1);
        }
        self.status.current_step = Some(self.input.spec.steps[index].name.clone());
        self.status.current_attempts = Some(call.attempts);
        let wake = match self.deadline().filter(|_| kind == CallKind::Action && !self.past_pivot()) {
            Some(deadline) => due.min(deadline),
            None => due,
        };
        Effect::RequeueAt(wake)
    }

    /// Records the outcome of the call the previous decision asked for. An outcome for any other call or attempt
    /// is stale (the status moved on) and ignored.
    fn observe(&mut self, observation: Observation) {
        let Some(step) = self.input.spec.steps.get(observation.step) else { return };
        let current = self.step_status(observation.step).and_then(|s| match observation.kind {
            CallKind::Action => Some(&s.action),
            CallKind::Compensation => s.compensation.as_ref(),
        });
        if current.is_none_or(|c| c.phase != CallPhase::Running || c.attempts != observation.attempt) {
            return;
        }
        let Some(http) = call_spec(step, observation.kind) else { return };
        let policy = Policy::resolve(self.input.spec, observation.kind, &http.policy);
        let retries_forever = observation.kind == CallKind::Action && self.past_pivot();
        let name = step.name.clone();
        let kind = observation.kind;
        let seed = (self.input.uid.to_owned(), name.clone(), kind);
        let outputs_so_far = self.total_output_bytes();
        let now = self.input.now;
        let record = self.call_status_mut(observation.step, kind);
        record.finished_at = None;
        let note = match observation.outcome {
            Outcome::Succeeded { http_status, output } => {
                record.last_http_status = Some(http_status);
                let size = output.as_ref().map_or(0, |o| o.to_string().len());
                let too_big = if kind != CallKind::Action {
                    None
                } else if size > MAX_OUTPUT_BYTES {
                    Some(format!(
                        "the response body is {size} bytes; a step's output is capped at {MAX_OUTPUT_BYTES} bytes: return less, or return an id to fetch the rest"
                    ))
                } else if outputs_so_far + size > MAX_TOTAL_OUTPUT_BYTES {
                    Some(format!(
                        "the outputs of all steps would exceed {MAX_TOTAL_OUTPUT_BYTES} bytes; return smaller bodies"
                    ))
                } else {
                    None
                };
                record.finished_at = Some(MicroTime(now));
                if let Some(error) = too_big {
                    record.phase = CallPhase::Failed;
                    record.last_error = Some(truncate(error.clone()));
                    Note {
                        warning: true,
                        reason: failed_reason(kind),
                        message: format!("step {name}: {error}"),
                        step: Some(name.clone()),
                    }
                } else {
                    record.phase = CallPhase::Succeeded;
                    record.last_error = None;
                    if kind == CallKind::Action {
                        record.output = output;
                    }
                    let reason = if kind == CallKind::Action { "StepSucceeded" } else { "CompensationSucceeded" };
                    let message = format!("step {name}: HTTP {http_status} after {} attempt(s)", record.attempts);
                    Note { warning: false, reason, message, step: Some(name.clone()) }
                }
            }
            Outcome::Retryable { http_status, error, retry_after } => {
                record.last_http_status = http_status;
                record.last_error = Some(truncate(error.clone()));
                if record.attempts >= policy.max_attempts && !retries_forever {
                    record.phase = CallPhase::Failed;
                    record.finished_at = Some(MicroTime(now));
                    let message = format!("step {name}: gave up after {} attempts: {error}", record.attempts);
                    Note { warning: true, reason: failed_reason(kind), message, step: Some(name.clone()) }
                } else {
                    let wait = policy.backoff(record.attempts, &seed).max(retry_after.unwrap_or_default());
                    let next = now.checked_add(wait).unwrap_or(Timestamp::MAX);
                    record.phase = CallPhase::Retrying;
                    record.next_attempt_at = Some(MicroTime(next));
                    let message = format!(
                        "step {name}: attempt {} failed ({error}); retrying in {}ms",
                        record.attempts,
                        wait.as_millis()
                    );
                    let reason = if kind == CallKind::Action { "StepRetrying" } else { "CompensationRetrying" };
                    Note { warning: true, reason, message, step: Some(name.clone()) }
                }
            }
            Outcome::Permanent { http_status, error } => {
                record.last_http_status = http_status;
                record.last_error = Some(truncate(error.clone()));
                record.phase = CallPhase::Failed;
                record.finished_at = Some(MicroTime(now));
                Note {
                    warning: true,
                    reason: failed_reason(kind),
                    message: format!("step {name}: {error}"),
                    step: Some(name.clone()),
                }
            }
        };
        self.notes.push(note);
    }

    fn refresh_conditions(&mut self) {
        let generation = self.input.generation;
        let now = self.now.clone();
        let phase = self.status.phase.unwrap_or(SagaPhase::Pending);
        let reason = self.status.reason.map(|r| format!("{r:?}"));
        let current = self.status.current_step.clone().unwrap_or_default();
        let retrying = self.status.steps.iter().find_map(|s| {
            [Some(&s.action), s.compensation.as_ref()].into_iter().flatten().find_map(|c| {
                // A retry in flight is still a failing call: Degraded stays True until it answers instead of
                // flipping to False and back on every attempt.
                let failed = match c.phase {
                    CallPhase::Retrying => c.attempts,
                    CallPhase::Running if c.attempts > 1 => c.attempts - 1,
                    _ => return None,
                };
                Some((s.name.clone(), failed, c.last_error.clone().unwrap_or_default()))
            })
        });
        let suspended = self.suspended();
        let (succeeded, progressing, degraded) = match phase {
            SagaPhase::Pending => (
                (Status::Unknown, "Pending".to_owned(), "not started".to_owned()),
                (Status::False, "Suspended".to_owned(), "suspended by the kubesaga.dev/suspend annotation".into()),
                (Status::False, "AsExpected".to_owned(), String::new()),
            ),
            SagaPhase::Running | SagaPhase::Compensating => {
                let verb = if phase == SagaPhase::Running { "running" } else { "compensating" };
                let succeeded = if phase == SagaPhase::Running {
                    (Status::Unknown, "Running".to_owned(), format!("running step {current}"))
                } else {
                    let why = reason.clone().unwrap_or_default();
                    (Status::False, why.clone(), format!("compensating ({why})"))
                };
                let progressing = if suspended {
                    (Status::False, "Suspended".to_owned(), format!("suspended while {verb} step {current}"))
                } else {
                    (Status::True, format!("{}Step", capitalize(verb)), format!("{verb} step {current}"))
                };
                let degraded = match &retrying {
                    Some((step, attempts, error)) => (
                        Status::True,
                        "Retrying".to_owned(),
                        format!("step {step} failed {attempts} attempt(s), last: {error}"),
                    ),
                    None => (Status::False, "AsExpected".to_owned(), String::new()),
                };
                (succeeded, progressing, degraded)
            }
            SagaPhase::Succeeded => (
                (Status::True, "Succeeded".to_owned(), "all steps succeeded".to_owned()),
                (Status::False, "Finished".to_owned(), String::new()),
                (Status::False, "AsExpected".to_owned(), String::new()),
            ),
            SagaPhase::Compensated => {
                let why = reason.clone().unwrap_or_default();
                (
                    (Status::False, why.clone(), format!("compensated ({why})")),
                    (Status::False, "Finished".to_owned(), String::new()),
                    (Status::False, "AsExpected".to_owned(), String::new()),
                )
            }
            SagaPhase::Failed => {
                let why = reason.clone().unwrap_or_default();
                // The warning that explains the failure; an ignored retry request explains nothing about it.
                let detail = self
                    .notes
                    .iter()
                    .rev()
                    .find(|n| n.warning && n.reason != "RetryIgnored")
                    .map(|n| n.message.clone());
                let existing =
                    conditions::get(&self.status.conditions, conditions::saga::DEGRADED).map(|c| c.message.clone());
                (
                    (Status::False, why.clone(), format!("failed ({why})")),
                    (Status::False, "Finished".to_owned(), String::new()),
                    (Status::True, why, detail.or(existing).unwrap_or_default()),
                )
            }
        };
        for (type_, (status, reason, message)) in [
            (conditions::saga::SUCCEEDED, succeeded),
            (conditions::saga::PROGRESSING, progressing),
            (conditions::saga::DEGRADED, degraded),
        ] {
            conditions::set(&mut self.status.conditions, type_, status, &reason, message, generation, &now);
        }
    }

    fn progressing_reason(&self) -> Option<&str> {
        conditions::get(&self.status.conditions, conditions::saga::PROGRESSING).map(|c| c.reason.as_str())
    }

    fn template_context(&self) -> TemplateContext<'_> {
        TemplateContext {
            saga_name: self.input.name,
            saga_namespace: self.input.namespace,
            saga_uid: self.input.uid,
            input: &self.input.spec.input,
            outputs: self
                .status
                .steps
                .iter()
                .filter(|s| s.action.phase == CallPhase::Succeeded)
                .filter_map(|s| s.action.output.as_ref().map(|o| (s.name.as_str(), o)))
                .collect(),
        }
    }

    fn step_status(&self, index: usize) -> Option<&StepStatus> {
        let name = &self.input.spec.steps.get(index)?.name;
        self.status.steps.iter().find(|s| &s.name == name)
    }

    fn call_status_mut(&mut self, index: usize, kind: CallKind) -> &mut CallStatus {
        let name = &self.input.spec.steps[index].name;
        let position = match self.status.steps.iter().position(|s| &s.name == name) {
            Some(position) => position,
            None => {
                self.status.steps.push(StepStatus { name: name.clone(), ..StepStatus::default() });
                self.status.steps.len() - 1
            }
        };
        let step = &mut self.status.steps[position];
        match kind {
            CallKind::Action => &mut step.action,
            CallKind::Compensation => step.compensation.get_or_insert_with(CallStatus::default),
        }
    }

    /// Whether some step has not succeeded yet.
    fn steps_left(&self) -> bool {
        (0..self.input.spec.steps.len())
            .any(|i| self.step_status(i).is_none_or(|s| s.action.phase != CallPhase::Succeeded))
    }

    fn past_pivot(&self) -> bool {
        self.input
            .spec
            .steps
            .iter()
            .position(|s| s.pivot)
            .and_then(|i| self.step_status(i))
            .is_some_and(|s| s.action.phase == CallPhase::Succeeded)
    }

    fn deadline(&self) -> Option<Timestamp> {
        let started = self.status.started_at.as_ref()?.0;
        let deadline = self.input.spec.deadline.as_ref()?.get();
        Some(started.checked_add(deadline).unwrap_or(Timestamp::MAX))
    }

    /// Suspension pauses calls, but deletion and abort are explicit requests that override it.
    fn suspended(&self) -> bool {
        let requests = &self.input.requests;
        requests.suspend && !requests.deleting && !requests.abort
    }

    fn total_output_bytes(&self) -> usize {
        self.status.steps.iter().filter_map(|s| s.action.output.as_ref()).map(|o| o.to_string().len()).sum()
    }

    /// Timestamps in the status keep microseconds, so a sub-second `nextAttemptAt` survives the round trip.
    fn micro_now(&self) -> MicroTime {
        MicroTime(self.input.now)
    }

    fn step_note(&mut self, warning: bool, reason: &'static str, step: &str, message: String) {
        self.notes.push(Note { warning, reason, message, step: Some(step.to_owned()) });
    }

    fn note(&mut self, warning: bool, reason: &'static str, message: String) {
        self.notes.push(Note { warning, reason, message, step: None });
    }
}

/// Whether an action may have changed something at its service, so that undoing it is needed. Only an action
/// never sent, or one whose last answer proves it changed nothing, certainly did not.
pub fn may_have_taken_effect(action: &CallStatus) -> bool {
    action.attempts > 0 && !(action.phase == CallPhase::Failed && action.last_http_status.is_some_and(proves_no_effect))
}

/// 4xx answers other than 408 (timeout), 425 (too early) and 429 (too many requests) say the request was refused
/// and retrying it will not help.
pub fn is_permanent_rejection(http_status: u16) -> bool {
    (400..500).contains(&http_status) && !matches!(http_status, 408 | 425 | 429)
}

/// A refusal that proves the request changed nothing. 409 does not: under the Idempotency-Key draft it also
/// answers a retry while the first attempt with the same key is still running, and that one may succeed.
/// Compensating a step that did nothing is harmless, since compensations accept "nothing to undo".
pub fn proves_no_effect(http_status: u16) -> bool {
    is_permanent_rejection(http_status) && http_status != 409
}

fn call_spec(step: &crate::crd::Step, kind: CallKind) -> Option<&HttpCall> {
    match kind {
        CallKind::Action => Some(&step.action),
        CallKind::Compensation => step.compensation.as_ref(),
    }
}

fn failed_reason(kind: CallKind) -> &'static str {
    match kind {
        CallKind::Action => "StepFailed",
        CallKind::Compensation => "CompensationAttemptFailed",
    }
}

fn remaining(now: Timestamp, deadline: Timestamp) -> Duration {
    Duration::try_from(deadline.duration_since(now)).unwrap_or(Duration::ZERO)
}

fn truncate(mut text: String) -> String {
    if let Some((cut, _)) = text.char_indices().nth(MAX_ERROR_CHARS) {
        text.truncate(cut);
        text.push('…');
    }
    text
}

fn capitalize(word: &str) -> String {
    let mut chars = word.chars();
    chars.next().map(|c| c.to_uppercase().chain(chars).collect()).unwrap_or_default()
}

/// States the match arms above have already excluded; kept total so the planner never panics.
fn unreachable_effect() -> Effect {
    Effect::AwaitChange
}

#[cfg(test)]
#[path = "plan_tests.rs"]
mod tests;
