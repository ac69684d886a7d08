//! The `OutboxRelay` resource: moves the rows of a service's transactional outbox table to Redis Streams.
//!
//! The operator runs one relay worker per resource (only on the leader replica). The spec names where the rows
//! are (a Postgres URL in a Secret, the table and its dead-letter table), where they go (a Redis URL in a Secret and
//! a stream, fixed or derived from each row's aggregate type) and how hard to try. Defaults come from the schema, so
//! `kubectl get -o yaml` shows the values in force. docs/outbox-relay.md describes the semantics.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{
    CustomResource, KubeSchema,
    core::{Reason, Rule},
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::duration::{Duration, not_a_duration, rule_duration_cap};

/// Longest `pollInterval`.
pub const MAX_POLL_INTERVAL: &str = "1h";
/// Longest `processingTimeout`.
pub const MAX_PROCESSING_TIMEOUT: &str = "24h";
/// Longest backoff between two attempts of a row.
pub const MAX_BACKOFF: &str = "24h";
/// Longest `publishedRetention` and `stalePendingAfter` (30 days).
pub const MAX_RETENTION: &str = "720h";

/// A Postgres or Redis table/stream name pattern: an optionally schema-qualified SQL identifier in lower case.
const TABLE_PATTERN: &str = r"^[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)?$";

/// Dead-lettered rows move to another table than the one they leave.
fn rule_distinct_tables() -> Rule {
    Rule::new("self.table != self.deadLetterTable")
        .message("must differ from table: dead-lettered rows are moved out of the outbox")
        .field_path(".deadLetterTable")
        .reason(Reason::FieldValueInvalid)
}

/// A relay that polls less often than the staleness threshold would report every quiet interval as stale.
fn rule_stale_after_poll() -> Rule {
    Rule::new(format!(
        "{} || {} || duration(self.stalePendingAfter) > duration(self.pollInterval)",
        not_a_duration("self.stalePendingAfter"),
        not_a_duration("self.pollInterval")
    ))
    .message("must be longer than pollInterval, or every quiet poll would look stale")
    .field_path(".stalePendingAfter")
}

/// Exactly one way to name the stream.
fn rule_one_stream() -> Rule {
    Rule::new("has(self.stream) != has(self.streamPrefix)")
        .message(
            "set exactly one of stream (every event to one stream) or streamPrefix (stream = prefix + the row's aggregate_type)",
        )
        .reason(Reason::FieldValueRequired)
}

/// `initial` is not greater than `max`.
fn rule_backoff_order() -> Rule {
    Rule::new(format!(
        "{} || {} || duration(self.initial) <= duration(self.max)",
        not_a_duration("self.initial"),
        not_a_duration("self.max")
    ))
    .message("must not be greater than max")
    .field_path(".initial")
}

/// Relays the outbox table of one service database to Redis Streams.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "kubesaga.dev",
    version = "v1alpha1",
    kind = "OutboxRelay",
    plural = "outboxrelays",
    shortname = "relay",
    namespaced,
    status = "OutboxRelayStatus",
    printcolumn = r#"{"name":"Table","type":"string","jsonPath":".spec.table"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Degraded","type":"string","jsonPath":".status.conditions[?(@.type==\"Degraded\")].status"}"#,
    printcolumn = r#"{"name":"Pending","type":"integer","jsonPath":".status.pending"}"#,
    printcolumn = r#"{"name":"Oldest","type":"string","jsonPath":".status.oldestPendingAge"}"#,
    printcolumn = r#"{"name":"Published","type":"integer","jsonPath":".status.publishedTotal"}"#,
    printcolumn = r#"{"name":"Dead","type":"integer","jsonPath":".status.deadLettered"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = rule_distinct_tables(), validation = rule_stale_after_poll())]
pub struct OutboxRelaySpec {
    /// The Postgres database holding the outbox table.
    pub database: DatabaseRef,
    /// Outbox table to read, optionally schema-qualified (`public.outbox`). It must have the columns of the
    /// kubesaga outbox migration.
    #[serde(default = "default_table")]
    #[schemars(length(min = 1, max = 127), regex(pattern = TABLE_PATTERN))]
    pub table: String,
    /// Table that rows move to after `maxAttempts` failed publishes, in the same database.
    #[serde(default = "default_dead_letter_table")]
    #[schemars(length(min = 1, max = 127), regex(pattern = TABLE_PATTERN))]
    pub dead_letter_table: String,
    /// Where the events go.
    pub destination: Destination,
    /// Rows claimed and published per round trip.
    #[serde(default = "default_batch_size")]
    #[schemars(range(min = 1, max = 10000))]
    pub batch_size: u32,
    /// How often the table is polled when no notification arrives.
    #[serde(default = "default_poll_interval")]
    #[x_kube(validation = rule_duration_cap(MAX_POLL_INTERVAL, false))]
    pub poll_interval: Duration,
    /// Wake up on the NOTIFY the outbox migration's insert trigger sends, instead of waiting for the next poll.
    /// Polling stays on as the fallback: a notification sent while the relay is disconnected is lost.
    #[serde(default = "default_true")]
    pub listen_notify: bool,
    /// A claimed row not published within this time goes back to PENDING (its relay is presumed dead).
    #[serde(default = "default_processing_timeout")]
    #[x_kube(validation = rule_duration_cap(MAX_PROCESSING_TIMEOUT, false))]
    pub processing_timeout: Duration,
    /// Publishes of one row, the first included, before it moves to the dead-letter table.
    #[serde(default = "default_max_attempts")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_attempts: u32,
    /// Wait between two publish attempts of a row: doubles from `initial` up to `max`, with jitter.
    #[serde(default)]
    pub backoff: Backoff,
    /// PUBLISHED rows older than this are deleted.
    #[serde(default = "default_published_retention")]
    #[x_kube(validation = rule_duration_cap(MAX_RETENTION, false))]
    pub published_retention: Duration,
    /// When the oldest PENDING row is older than this, the relay is `Degraded` (reason `StalePending`).
    #[serde(default = "default_stale_pending_after")]
    #[x_kube(validation = rule_duration_cap(MAX_RETENTION, false))]
    pub stale_pending_after: Duration,
}

/// The database: a Secret key holding a Postgres URL (`postgres://user:password@host:5432/db`).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DatabaseRef {
    /// The Secret, in the relay's namespace, and its key.
    pub secret_key_ref: SecretKeyRef,
}

/// A key of a Secret in the relay's namespace.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"))]
    pub name: String,
    /// Key within the Secret.
    #[serde(default = "default_secret_key")]
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub key: String,
}

/// Where events go: a Redis server and a stream.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = rule_one_stream())]
pub struct Destination {
    /// The Redis server.
    pub redis: RedisRef,
    /// Every event goes to this stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 200), regex(pattern = r"^[^\s]+$"))]
    pub stream: Option<String>,
    /// Each event goes to the stream `<streamPrefix><aggregate_type>`, e.g. `events.` → `events.order`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 200), regex(pattern = r"^[^\s]+$"))]
    pub stream_prefix: Option<String>,
    /// Trim each stream to about this many entries (`XADD MAXLEN ~`); unset keeps every entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_len: Option<i64>,
}

/// The Redis server: a Secret key holding a Redis URL (`redis://:password@host:6379/0`).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RedisRef {
    /// The Secret, in the relay's namespace, and its key.
    pub secret_key_ref: SecretKeyRef,
}

/// Exponential backoff between publish attempts of one row.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = rule_backoff_order())]
pub struct Backoff {
    /// Wait after the first failed attempt.
    #[serde(default = "default_backoff_initial")]
    #[x_kube(validation = rule_duration_cap(MAX_BACKOFF, false))]
    pub initial: Duration,
    /// Longest wait.
    #[serde(default = "default_backoff_max")]
    #[x_kube(validation = rule_duration_cap(MAX_BACKOFF, false))]
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { initial: default_backoff_initial(), max: default_backoff_max() }
    }
}

/// What the relay has done, written by the operator to the status subresource at a bounded rate.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OutboxRelayStatus {
    /// The `metadata.generation` this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Standard conditions: `Ready` (connected and relaying), `Degraded` (relaying, but something needs a look).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Rows waiting to be published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<i64>,
    /// Rows claimed by a relay and not yet published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub processing: Option<i64>,
    /// Rows in the dead-letter table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_lettered: Option<i64>,
    /// Age of the oldest PENDING row, e.g. `2s`; absent when nothing is pending.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_pending_age: Option<String>,
    /// Events this resource's relays have published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub published_total: Option<i64>,
    /// When the last event was published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_published_at: Option<Time>,
    /// The last publish or connection error, kept until the next success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

fn default_table() -> String {
    "outbox".into()
}

fn default_dead_letter_table() -> String {
    "outbox_dead_letter".into()
}

fn default_secret_key() -> String {
    "url".into()
}

fn default_batch_size() -> u32 {
    100
}

fn default_true() -> bool {
    true
}

fn default_max_attempts() -> u32 {
    10
}

/// A default duration; the literals below are valid, which the schema tests check.
fn duration(text: &str) -> Duration {
    text.parse().unwrap_or_else(|_| unreachable!("default duration {text} is valid"))
}

fn default_poll_interval() -> Duration {
    duration("1s")
}

fn default_processing_timeout() -> Duration {
    duration("30s")
}

fn default_backoff_initial() -> Duration {
    duration("1s")
}

fn default_backoff_max() -> Duration {
    duration("5m")
}

fn default_published_retention() -> Duration {
    duration("24h")
}

fn default_stale_pending_after() -> Duration {
    duration("5m")
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_minimal_spec_takes_every_default() {
        let spec: OutboxRelaySpec = serde_json::from_value(json!({
            "database": {"secretKeyRef": {"name": "order-db"}},
            "destination": {"redis": {"secretKeyRef": {"name": "redis"}}, "streamPrefix": "events."}
        }))
        .expect("minimal spec");
        assert_eq!((spec.table.as_str(), spec.dead_letter_table.as_str()), ("outbox", "outbox_dead_letter"));
        assert_eq!(spec.database.secret_key_ref.key, "url");
        assert_eq!((spec.batch_size, spec.max_attempts, spec.listen_notify), (100, 10, true));
        let texts = [
            &spec.poll_interval,
            &spec.processing_timeout,
            &spec.backoff.initial,
            &spec.backoff.max,
            &spec.published_retention,
            &spec.stale_pending_after,
        ]
        .map(|d| d.to_string());
        assert_eq!(texts, ["1s", "30s", "1s", "5m", "24h", "5m"]);
    }

    #[test]
    fn schema_defaults_match_serde_defaults() {
        let crd = serde_json::to_value(<OutboxRelay as kube::CustomResourceExt>::crd()).expect("crd");
        let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
        assert_eq!(spec["table"]["default"], json!("outbox"));
        assert_eq!(spec["pollInterval"]["default"], json!("1s"));
        assert_eq!(spec["stalePendingAfter"]["default"], json!("5m"));
        assert_eq!(spec["batchSize"]["default"], json!(100));
    }
}
