//! The `Saga` resource: an ordered list of HTTP steps with compensations, driven by the operator.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A business transaction that spans services: run `steps` in order; when one fails, undo the completed
/// ones by calling their compensations in reverse.
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
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct SagaSpec {
    /// The steps, run in this order.
    #[schemars(length(min = 1, max = 64))]
    pub steps: Vec<Step>,
}

/// One step of a saga: the call that does the work and the call that undoes it.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Step {
    /// Name of the step, unique in the saga; it is part of the idempotency key of every call the step makes.
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub name: String,
    /// The call that performs the step.
    pub action: HttpCall,
    /// The call that undoes the step after a later step failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compensation: Option<HttpCall>,
}

/// An HTTP request a step makes.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpCall {
    /// HTTP method of the request.
    pub method: HttpMethod,
    /// Absolute `http://` or `https://` URL of the request.
    #[schemars(length(min = 1, max = 2048), regex(pattern = r"^https?://"))]
    pub url: String,
}

/// The HTTP methods a step may use.
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

/// Where a saga stands, written by the operator to the status subresource.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SagaStatus {
    /// The `metadata.generation` this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Summary of the saga's state, for humans; conditions carry the detail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<SagaPhase>,
    /// Name of the step being run or compensated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_step: Option<String>,
    /// Standard conditions: `Succeeded`, `Progressing`, `Degraded`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// The phases of a saga.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[allow(missing_docs)]
pub enum SagaPhase {
    Pending,
    Running,
    Compensating,
    Succeeded,
    Compensated,
    Failed,
}
