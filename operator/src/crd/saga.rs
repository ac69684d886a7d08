//! The `Saga` resource: an ordered list of HTTP steps with compensations, driven by the operator.
//!
//! The spec is what the user asks for; the status is the operator's durable memory. Everything the operator needs
//! to resume after a crash is in the status: which call of which step was about to be made (write-ahead), each
//! call's result, and when the next attempt is due.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, MicroTime};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::duration::Duration;

/// A business transaction that spans services: run `steps` in order; when one fails, the deadline passes, the saga
/// is aborted or deleted, undo the completed steps by calling their compensations in reverse.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "kubesaga.dev",
    version = "v1alpha1",
    kind = "Saga",
    plural = "sagas",
    shortname = "saga",
    namespaced,
    status = "SagaStatus",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Step","type":"string","jsonPath":".status.currentStep"}"#,
    printcolumn = r#"{"name":"Attempts","type":"integer","jsonPath":".status.currentAttempts"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.reason"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct SagaSpec {
    /// The steps, run in this order. Names are unique; at most one step is the pivot.
    #[schemars(length(min = 1, max = 64))]
    pub steps: Vec<Step>,
    /// Values the step templates can use as `{{ input.<key> }}`: a flat object of strings and integers.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 32))]
    pub input: BTreeMap<String, InputValue>,
    /// Timeout and retry policies for calls that do not set their own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub defaults: Option<CallDefaults>,
    /// How long the saga may run, counted from its start. A saga still running after it is compensated
    /// (reason `DeadlineExceeded`), unless it is past its pivot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<Duration>,
    /// Delete the saga this long after it finished; unset keeps it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds_after_finished: Option<FinishedTtl>,
}

/// A value of `spec.input`.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(untagged)]
#[schemars(schema_with = "int_or_string_schema")]
pub enum InputValue {
    /// An integer, e.g. an amount in cents.
    Int(i64),
    /// A string of at most 1024 characters.
    String(String),
}

fn int_or_string_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({ "x-kubernetes-int-or-string": true })
}

impl InputValue {
    /// The value as JSON, as templates substitute it.
    pub fn to_json(&self) -> Value {
        match self {
            Self::Int(i) => Value::from(*i),
            Self::String(s) => Value::from(s.as_str()),
        }
    }
}

/// Time-to-live of a finished saga, by how it finished.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FinishedTtl {
    /// Seconds to keep a `Succeeded` saga.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub succeeded: Option<i64>,
    /// Seconds to keep a `Compensated` saga.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub compensated: Option<i64>,
    /// Seconds to keep a `Failed` saga (one whose compensation gave up and needs a human).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub failed: Option<i64>,
}

/// Saga-wide defaults for calls.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CallDefaults {
    /// Defaults for the calls that perform steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<CallPolicy>,
    /// Defaults for the calls that undo steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compensation: Option<CallPolicy>,
}

/// Timeout and retry policy of a call; unset fields fall back to the saga's defaults, then to built-in ones.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CallPolicy {
    /// Timeout of one attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    /// How failed attempts are retried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryPolicy>,
}

/// Exponential backoff between attempts of one call.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub max_attempts: Option<u32>,
    /// Wait before the second attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_backoff: Option<Duration>,
    /// Longest wait between two attempts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_backoff: Option<Duration>,
    /// Factor by which the wait grows after each attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1.0, max = 10.0))]
    pub multiplier: Option<f64>,
    /// Fraction of each wait drawn at random (0 to 1), so retries of many sagas spread out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub jitter: Option<f64>,
}

/// One step of a saga: the call that does the work and the call that undoes it.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Step {
    /// Name of the step, a DNS label unique in the saga; it is part of the idempotency key of every call the step
    /// makes, and templates of later steps refer to its output as `{{ steps.<name>.output.<field> }}`.
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub name: String,
    /// The call that performs the step.
    pub action: HttpCall,
    /// The call that undoes the step after a later step failed. A step without one needs no undoing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compensation: Option<HttpCall>,
    /// Once this step succeeded the saga can no longer be compensated: the steps after it are retried until they
    /// succeed. At most one step is the pivot; neither it nor the steps after it have compensations.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pivot: bool,
}

/// An HTTP request a step makes. Strings in `url`, `service.path`, `headers` and `body` may hold templates:
/// `{{ input.<key> }}`, `{{ steps.<name>.output.<field>[.<field>...] }}`, `{{ saga.name }}`, `{{ saga.namespace }}`,
/// `{{ saga.uid }}`. A JSON string that is exactly one template takes the referenced value with its JSON type.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpCall {
    /// HTTP method of the request.
    pub method: HttpMethod,
    /// Absolute `http://` or `https://` URL. Exactly one of `url` and `service` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 2048), regex(pattern = r"^https?://"))]
    pub url: Option<String>,
    /// A Kubernetes Service to call, by its in-cluster DNS name. Exactly one of `url` and `service` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceRef>,
    /// Extra request headers. The operator sets `Idempotency-Key`, `X-Saga-Id`, `X-Saga-Step` and `traceparent`
    /// itself.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 32))]
    pub headers: BTreeMap<String, String>,
    /// JSON request body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
    pub body: Option<Value>,
    /// Timeout and retries of this call.
    #[serde(default, flatten)]
    pub policy: CallPolicy,
}

/// A Service the call goes to: `http://<name>.<namespace>.svc.<cluster domain>:<port><path>`.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceRef {
    /// Name of the Service.
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub name: String,
    /// Namespace of the Service; the saga's own when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub namespace: Option<String>,
    /// Port of the Service.
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,
    /// Path (and query) of the request, starting with `/`.
    #[serde(default = "root_path")]
    #[schemars(length(min = 1, max = 2048), regex(pattern = r"^/"))]
    pub path: String,
}

fn root_path() -> String {
    "/".to_owned()
}

/// The HTTP methods a call may use.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
#[allow(missing_docs)]
pub enum HttpMethod {
    Get,
    Post,
    Put,
    Patch,
    Delete,
}

/// Where a saga stands, written by the operator to the status subresource only.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SagaStatus {
    /// The `metadata.generation` this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Summary of the saga's state, for humans; conditions carry the detail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<SagaPhase>,
    /// Standard conditions: `Succeeded`, `Progressing`, `Degraded`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// When the operator first acted on the saga; the deadline counts from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<MicroTime>,
    /// When the saga reached `Succeeded`, `Compensated` or `Failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<MicroTime>,
    /// Name of the step being run or compensated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_step: Option<String>,
    /// Attempts made so far by the current call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_attempts: Option<u32>,
    /// Why the saga is compensating or did not succeed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<SagaReason>,
    /// W3C trace id of the saga's trace, so spans after an operator restart join the same trace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// Value of the `kubesaga.dev/retry-compensation` annotation last acted on, so each request is acted on once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handled_retry_request: Option<String>,
    /// One record per step of the spec that has been reached, in spec order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub steps: Vec<StepStatus>,
}

/// The phases of a saga.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum SagaPhase {
    /// Not started yet (or suspended before its first call).
    Pending,
    /// Running its steps forward.
    Running,
    /// Undoing its completed steps in reverse.
    Compensating,
    /// Every step succeeded.
    Succeeded,
    /// A step failed, or the saga was aborted, deleted or ran past its deadline, and every completed step was undone.
    Compensated,
    /// A compensation gave up, or a step after the pivot failed for good: a human must look.
    Failed,
}

impl SagaPhase {
    /// Whether the saga has finished and the operator will make no more calls for it.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Compensated | Self::Failed)
    }
}

/// Why a saga compensates or failed.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum SagaReason {
    /// A step failed for good.
    StepFailed,
    /// The saga ran past `spec.deadline`.
    DeadlineExceeded,
    /// The `kubesaga.dev/abort` annotation asked for it.
    Aborted,
    /// The saga was deleted while it ran.
    Deleted,
    /// The spec cannot be executed (a template refers to something that does not exist, the input is too large).
    InvalidSpec,
    /// A compensation exhausted its retries.
    CompensationFailed,
    /// A step after the pivot failed for good; the saga can no longer be compensated.
    FailedAfterPivot,
}

/// The record of one step.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StepStatus {
    /// Name of the step.
    pub name: String,
    /// The step's action call.
    pub action: CallStatus,
    /// The step's compensation call, once compensation of this step began.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compensation: Option<CallStatus>,
}

/// The record of one call (an action or a compensation) across its attempts.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CallStatus {
    /// Where the call stands.
    pub phase: CallPhase,
    /// Attempts started so far. Written before each attempt, so after a crash the operator knows one may have
    /// reached the service and repeats it with the same idempotency key.
    #[serde(default)]
    pub attempts: u32,
    /// When the first attempt started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<MicroTime>,
    /// When the call succeeded or gave up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<MicroTime>,
    /// When the next attempt is due, while the call waits to retry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<MicroTime>,
    /// HTTP status of the last response, if one came.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_http_status: Option<u16>,
    /// What went wrong in the last attempt, truncated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The JSON body of the successful response (actions only), capped in size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
    pub output: Option<Value>,
}

/// Where one call stands.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum CallPhase {
    /// Not attempted yet.
    #[default]
    Pending,
    /// An attempt is about to be made or in flight; its outcome is unknown until the next status write.
    Running,
    /// The last attempt failed in a way worth retrying; the next one is due at `nextAttemptAt`.
    Retrying,
    /// The call succeeded.
    Succeeded,
    /// The call failed for good (a permanent error, or its retries are exhausted).
    Failed,
}
