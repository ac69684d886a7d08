//! The Saga reconciler: performs what [`plan`](super::plan) decides and persists the status.
//!
//! One reconcile runs a loop: plan → write the status if it changed (guarded by `resourceVersion`, so a stale
//! writer loses) → perform the effect. After a call it plans again with the call's outcome, so the result of one
//! step and the write-ahead record of the next share one status write. Waiting is never done here: a retry that is
//! not due, a deadline or a TTL becomes a requeue at that time.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use k8s_openapi::jiff::Timestamp;
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DeleteParams, Patch, PatchParams},
    runtime::{controller::Action, events::Recorder},
};
use serde_json::json;
use tracing::{Instrument, field, info_span};

use super::{
    call::{self, CallContext},
    limits::{Admission, Targets},
    plan::{self, Decision, Effect, Input, Note, Observation, Outcome, Requests},
};
use crate::{
    crd::{Saga, SagaPhase, SagaStatus},
    error::Error,
    metrics,
    recorder::{self, Notice},
};

/// The finalizer that holds a deleted saga until its completed steps are compensated.
pub const FINALIZER: &str = "kubesaga.dev/compensate";
/// Field manager of the operator's status writes.
pub const FIELD_MANAGER: &str = "kubesaga-operator/saga";

/// Annotations users set to steer a saga by hand.
pub mod annotations {
    /// Any value: compensate now.
    pub const ABORT: &str = "kubesaga.dev/abort";
    /// `"true"`: make no further calls until removed.
    pub const SUSPEND: &str = "kubesaga.dev/suspend";
    /// A new value each time: retry a compensation that gave up.
    pub const RETRY_COMPENSATION: &str = "kubesaga.dev/retry-compensation";
}

/// What every reconcile shares.
pub struct Context {
    /// The API client.
    pub client: Client,
    /// The HTTP client for step calls.
    pub http: reqwest::Client,
    /// Per-target concurrency limits and circuit breakers.
    pub targets: Targets,
    /// Publishes Kubernetes Events.
    pub recorder: Recorder,
    /// DNS domain for Service references.
    pub cluster_domain: String,
    /// Publish Normal events too, not only Warnings.
    pub normal_events: bool,
    /// The resourceVersion this process last wrote for each saga (by uid). When the watch cache hands the
    /// reconciler an older version, the saga is read afresh, so a call is never repeated from a stale status.
    written: Mutex<HashMap<String, String>>,
}

impl Context {
    /// A context with nothing written yet.
    pub fn new(
        client: Client,
        http: reqwest::Client,
        targets: Targets,
        recorder: Recorder,
        cluster_domain: String,
        normal_events: bool,
    ) -> Self {
        Self { client, http, targets, recorder, cluster_domain, normal_events, written: Mutex::default() }
    }

    fn last_written(&self, uid: &str) -> Option<String> {
        self.written.lock().unwrap_or_else(PoisonError::into_inner).get(uid).cloned()
    }

    fn remember_written(&self, uid: &str, resource_version: Option<String>) {
        let mut written = self.written.lock().unwrap_or_else(PoisonError::into_inner);
        match resource_version {
            Some(rv) => written.insert(uid.to_owned(), rv),
            None => written.remove(uid),
        };
    }
}

/// Reconciles one saga. See the module documentation.
pub async fn reconcile(saga: Arc<Saga>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let namespace = saga.namespace().ok_or(Error::MissingField("metadata.namespace"))?;
    let name = saga.name_any();
    let span = info_span!("reconcile", saga = %format!("{namespace}/{name}"), trace_id = field::Empty);
    let result = Reconciler { api: Api::namespaced(ctx.client.clone(), &namespace), ctx: &ctx, namespace, name }
        .run(saga)
        .instrument(span)
        .await;
    metrics::reconcile_duration(started.elapsed());
    result
}

/// Requeue delay after a failed reconcile: immediately after a conflict (a newer version is waiting), a few
/// seconds otherwise.
pub fn error_policy(_saga: Arc<Saga>, error: &Error, _ctx: Arc<Context>) -> Action {
    metrics::reconcile_error(error.metric_label());
    match error {
        Error::Conflict(_) => Action::requeue(Duration::from_millis(50)),
        _ => {
            tracing::warn!(%error, "reconcile failed");
            Action::requeue(Duration::from_secs(3))
        }
    }
}

struct Reconciler<'a> {
    api: Api<Saga>,
    ctx: &'a Context,
    namespace: String,
    name: String,
}

impl Reconciler<'_> {
    async fn run(&self, saga: Arc<Saga>) -> Result<Action, Error> {
        let uid = saga.uid().ok_or(Error::MissingField("metadata.uid"))?;
        let mut saga = self.fresh(saga, &uid).await?;
        let Some(mut saga) = saga.take() else {
            self.ctx.remember_written(&uid, None);
            return Ok(Action::await_change());
        };
        let deleting = saga.metadata.deletion_timestamp.is_some();
        let finished = saga.status.as_ref().and_then(|s| s.phase).is_some_and(SagaPhase::is_terminal);
        if !deleting && !finished && !saga.finalizers().iter().any(|f| f == FINALIZER) {
            saga = self.add_finalizer(&saga).await?;
        }
        if let Some(trace_id) = saga.status.as_ref().and_then(|s| s.trace_id.as_deref()) {
            let span = tracing::Span::current();
            span.record("trace_id", trace_id);
            kubesaga_telemetry::join_trace(&span, trace_id);
        }

        let annotations = saga.annotations();
        let requests = Requests {
            deleting,
            abort: annotations.contains_key(annotations::ABORT),
            suspend: annotations.get(annotations::SUSPEND).is_some_and(|v| v == "true"),
            retry_compensation: annotations.get(annotations::RETRY_COMPENSATION).map(String::as_str),
        };
        let mut persisted = saga.status.clone().unwrap_or_default();
        let mut working = persisted.clone();
        let mut resource_version = saga.resource_version();
        let mut observation: Option<Observation> = None;
        loop {
            let now = Timestamp::now();
            let decision = plan::plan(Input {
                spec: &saga.spec,
                status: &working,
                name: &self.name,
                namespace: &self.namespace,
                uid: &uid,
                generation: saga.metadata.generation,
                now,
                requests: requests.clone(),
                observation: observation.take(),
                cluster_domain: &self.ctx.cluster_domain,
            });
            let Decision { status, effect, notes } = decision;
            if status != persisted {
                resource_version = self.write_status(&status, resource_version.as_deref(), &uid).await?;
                record_finish(&persisted, &status);
                persisted = status.clone();
            }
            self.publish(&saga, notes);
            match effect {
                Effect::Call(planned) => {
                    let permit = match self.ctx.targets.admit(&planned.request.url) {
                        Admission::Go(permit) => permit,
                        Admission::Wait(wait) => {
                            // Not sent, so no attempt is used: the status still says this attempt is about to be
                            // made, and the next reconcile makes it.
                            metrics::call_held();
                            return Ok(Action::requeue(wait));
                        }
                    };
                    fault_point(FaultPoint::BeforeCall, &planned.step_name);
                    let outcome = self.call(&planned, &status).await;
                    fault_point(FaultPoint::AfterCall, &planned.step_name);
                    self.ctx.targets.record(permit, &outcome);
                    observation =
                        Some(Observation { step: planned.step, kind: planned.kind, attempt: planned.attempt, outcome });
                    working = status;
                }
                Effect::RequeueAt(at) => return Ok(Action::requeue(until(now, at))),
                Effect::AwaitChange => return Ok(Action::await_change()),
                Effect::Delete => {
                    self.delete().await?;
                    return Ok(Action::await_change());
                }
                Effect::ReleaseFinalizer => {
                    self.remove_finalizer(&saga).await?;
                    self.ctx.remember_written(&uid, None);
                    return Ok(Action::await_change());
                }
            }
        }
    }

    /// The saga as it is now: the watch cache's copy, unless this process wrote a newer one since, in which case
    /// it is read from the API server. `None` when it is gone.
    async fn fresh(&self, saga: Arc<Saga>, uid: &str) -> Result<Option<Saga>, Error> {
        match self.ctx.last_written(uid) {
            Some(rv) if saga.resource_version().as_deref() != Some(rv.as_str()) => self
                .api
                .get_opt(&self.name)
                .await
                .map_err(Error::kube(format!("reading saga {}/{}", self.namespace, self.name))),
            _ => Ok(Some(Arc::unwrap_or_clone(saga))),
        }
    }

    async fn call(&self, planned: &plan::PlannedCall, status: &SagaStatus) -> Outcome {
        let saga_id = format!("{}/{}", self.namespace, self.name);
        let span = info_span!(
            "call",
            step = %planned.step_name,
            kind = planned.kind.as_str(),
            attempt = planned.attempt,
            url = %planned.request.url,
            http.status = field::Empty,
        );
        let traceparent =
            kubesaga_telemetry::traceparent(&span).unwrap_or_else(|| synthetic_traceparent(status.trace_id.as_deref()));
        let started = Instant::now();
        let outcome =
            call::perform(&self.ctx.http, planned, &CallContext { saga_id: &saga_id, traceparent: &traceparent })
                .instrument(span.clone())
                .await;
        let result = match &outcome {
            Outcome::Succeeded { http_status, .. } => {
                span.record("http.status", http_status);
                "success"
            }
            Outcome::Retryable { .. } => {
                metrics::retry(planned.kind);
                "retryable"
            }
            Outcome::Permanent { .. } => "permanent",
        };
        metrics::call(planned.kind, result, started.elapsed());
        outcome
    }

    /// Writes the whole status by server-side apply, with the resourceVersion it was computed from as a
    /// precondition. Returns the new resourceVersion.
    async fn write_status(&self, status: &SagaStatus, rv: Option<&str>, uid: &str) -> Result<Option<String>, Error> {
        let patch = json!({
            "apiVersion": "kubesaga.dev/v1alpha1",
            "kind": "Saga",
            "metadata": { "name": self.name, "resourceVersion": rv },
            "status": status,
        });
        let written = self
            .api
            .patch_status(&self.name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch))
            .await
            .map_err(Error::kube(format!("writing the status of saga {}/{}", self.namespace, self.name)))?;
        metrics::api_write("status");
        let new_rv = written.resource_version();
        self.ctx.remember_written(uid, new_rv.clone());
        Ok(new_rv)
    }

    async fn add_finalizer(&self, saga: &Saga) -> Result<Saga, Error> {
        let mut finalizers = saga.finalizers().to_vec();
        finalizers.push(FINALIZER.to_owned());
        let updated = self.write_finalizers(saga, finalizers, "adding the finalizer to").await?;
        metrics::api_write("finalizer");
        Ok(updated)
    }

    async fn remove_finalizer(&self, saga: &Saga) -> Result<(), Error> {
        if !saga.finalizers().iter().any(|f| f == FINALIZER) {
            return Ok(());
        }
        let finalizers = saga.finalizers().iter().filter(|f| *f != FINALIZER).cloned().collect();
        match self.write_finalizers(saga, finalizers, "removing the finalizer from").await {
            Ok(_) => {
                metrics::api_write("finalizer");
                Ok(())
            }
            Err(Error::Kube { source: kube::Error::Api(status), .. }) if status.code == 404 => Ok(()),
            Err(err) => Err(err),
        }
    }

    /// Replaces the finalizer list, on the condition that the saga is still at the version it was read at, so a
    /// concurrent change to the list is never overwritten.
    async fn write_finalizers(&self, saga: &Saga, finalizers: Vec<String>, what: &str) -> Result<Saga, Error> {
        let patch = json!({
            "metadata": { "resourceVersion": saga.resource_version(), "finalizers": finalizers }
        });
        self.api
            .patch(&self.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(Error::kube(format!("{what} saga {}/{}", self.namespace, self.name)))
    }

    async fn delete(&self) -> Result<(), Error> {
        match self.api.delete(&self.name, &DeleteParams::background()).await {
            Ok(_) => {
                metrics::api_write("delete");
                Ok(())
            }
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
            Err(err) => Err(Error::kube(format!("deleting saga {}/{} after its TTL", self.namespace, self.name))(err)),
        }
    }

    /// Publishes the notes that pass the Normal-events setting.
    fn publish(&self, saga: &Saga, notes: Vec<Note>) {
        let notices = notes
            .into_iter()
            .filter(|n| n.warning || self.ctx.normal_events)
            .map(|note| Notice {
                warning: note.warning,
                reason: note.reason,
                // Naming the step keeps each step's transitions a series of their own.
                action: note.step.map(|step| format!("{}/{step}", note.reason)),
                message: note.message,
            })
            .collect();
        recorder::publish(&self.ctx.recorder, saga.object_ref(&()), notices);
    }
}

/// Counts a saga reaching a terminal phase, once: when the status written flips into it.
fn record_finish(before: &SagaStatus, after: &SagaStatus) {
    let Some(phase) = after.phase.filter(|p| p.is_terminal()) else { return };
    if before.phase == Some(phase) {
        return;
    }
    let reason = match after.reason {
        None => "None",
        Some(reason) => reason_label(reason),
    };
    metrics::finished(phase, reason);
    if phase == SagaPhase::Failed && after.reason == Some(crate::crd::SagaReason::CompensationFailed) {
        metrics::compensation_failed();
    }
}

fn reason_label(reason: crate::crd::SagaReason) -> &'static str {
    use crate::crd::SagaReason::*;
    match reason {
        StepFailed => "StepFailed",
        DeadlineExceeded => "DeadlineExceeded",
        Aborted => "Aborted",
        Deleted => "Deleted",
        InvalidSpec => "InvalidSpec",
        CompensationFailed => "CompensationFailed",
        FailedAfterPivot => "FailedAfterPivot",
    }
}

/// W3C `traceparent` for a call when spans are not exported: the saga's trace id (kept in its status, so the trace
/// survives restarts) and a fresh span id, so services still log one trace id per saga.
fn synthetic_traceparent(trace_id: Option<&str>) -> String {
    let span_id = &uuid::Uuid::new_v4().simple().to_string()[..16];
    let trace_id = trace_id
        .filter(|t| t.len() == 32 && t.bytes().all(|b| b.is_ascii_hexdigit()))
        .map_or_else(|| uuid::Uuid::new_v4().simple().to_string(), str::to_owned);
    format!("00-{trace_id}-{span_id}-01")
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum FaultPoint {
    BeforeCall,
    AfterCall,
}

/// Crash tests make the process die at an exact point of a saga: `crash-before-call:<step>` aborts after the
/// write-ahead status of a call to `<step>` is persisted and before the request is sent; `crash-after-call:<step>`
/// aborts after the response arrived and before its result is persisted.
fn fault_point(point: FaultPoint, step: &str) {
    crate::fault::point(|| match point {
        FaultPoint::BeforeCall => format!("crash-before-call:{step}"),
        FaultPoint::AfterCall => format!("crash-after-call:{step}"),
    });
}

fn until(now: Timestamp, at: Timestamp) -> Duration {
    Duration::try_from(at.duration_since(now)).unwrap_or(Duration::ZERO).max(Duration::from_millis(10))
}
