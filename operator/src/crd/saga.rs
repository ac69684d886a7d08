//! The `Saga` resource: an ordered list of HTTP steps with compensations, driven by the operator.
//!
//! The spec is what the user asks for; the status is the operator's durable memory. Everything the operator needs
//! to resume after a crash is in the status: which call of which step was about to be made (write-ahead), each
//! call's result, and when the next attempt is due.
//!
//! The API server itself rejects a spec the operator could not run: the schema carries size limits and patterns,
//! and CEL rules (`x-kubernetes-validations`, built by the `rule_*` functions below) check what a schema cannot:
//! unique step names, the pivot, exactly one target per call, headers, templates and the caps on durations.
//! docs/saga-validation.md lists every rule and its message.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, MicroTime};
use kube::{
    CustomResource, KubeSchema,
    core::{Message, Reason, Rule},
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::duration::{Duration, not_a_duration, rule_duration_cap};

/// Most steps a saga may have.
pub const MAX_STEPS: usize = 64;
/// Longest timeout of one attempt of a call.
pub const MAX_TIMEOUT: &str = "1h";
/// Longest `initialBackoff` or `maxBackoff` of a retry policy.
pub const MAX_BACKOFF: &str = "1h";
/// Longest `spec.deadline` (30 days).
pub const MAX_DEADLINE: &str = "720h";
/// Headers the operator sets on every call itself, in lower case; a spec may not set them (in any case).
pub const RESERVED_HEADERS: [&str; 4] = ["idempotency-key", "x-saga-id", "x-saga-step", "traceparent"];

/// Most templates in `url` or `service.path`.
pub const MAX_TEMPLATES_PER_FIELD: usize = 16;
/// Most templates in one header value.
pub const MAX_TEMPLATES_PER_HEADER: usize = 4;
/// Longest template, braces included, in a header value. The header check looks at no more than this many
/// characters after each `{{`, so its cost does not grow with the text around the templates.
pub const MAX_HEADER_TEMPLATE_LENGTH: usize = 128;

/// What follows the `{{` of a template: `input.<key>`, `steps.<name>.output[.<field>...]`, `saga.name`,
/// `saga.namespace` or `saga.uid`, with optional whitespace, then `}}`. RE2 syntax, written inside a CEL raw string
/// (`r'...'`) so backslashes reach the regex engine as they are.
const TEMPLATE_BODY: &str =
    r"^\s*(input\.[A-Za-z_][0-9A-Za-z_]*|steps\.[a-z0-9-]+\.output(\.[^.\s{}]+)*|saga\.(name|namespace|uid))\s*\}\}";

/// CEL: `cond` (an expression of the piece `p`) holds for every piece of `value` that follows a `{{`, where `value`
/// may hold at most `max_templates` templates.
///
/// `value.split('{{', n)` yields the text before the first `{{`, then one piece per `{{`, each starting with what
/// the template should be. Splitting with a literal limit (and mapping to a list of booleans rather than filtering)
/// keeps the API server's cost estimate small; `lastIndexOf(false) <= 0` ignores the first piece. With at most
/// `max_templates + 1` pieces, more templates leave a `{{` in the last piece: the header check rejects that, and
/// [`rule_template_count`] caps `url` and `service.path`.
fn each_template(value: &str, max_templates: usize, cond: &str) -> String {
    format!("{value}.split('{{{{', {}).map(p, {cond}).lastIndexOf(false) <= 0", max_templates + 1)
}

/// CEL condition on a piece `p`: it starts with a well-formed template (within [`MAX_HEADER_TEMPLATE_LENGTH`]
/// characters) and holds no further `{{`.
fn well_formed_template() -> String {
    format!(
        "(size(p) > {window} ? p.substring(0, {window}) : p).matches(r'{TEMPLATE_BODY}') && !p.contains('{{{{')",
        window = MAX_HEADER_TEMPLATE_LENGTH - 2
    )
}

/// CEL condition on a piece `p`: if it is an input reference, `spec.input` has the key (`self` is the spec).
const KNOWN_INPUT: &str =
    "!p.trim().startsWith('input.') || (has(self.input) && p.split('}}', 2)[0].trim().substring(6) in self.input)";

/// CEL condition on a piece `p` of the step at index `i`: if it is a step reference, it names an earlier step (or
/// step `i` itself, when `own_step`). `names` is the list of step names.
fn earlier_step(own_step: bool) -> String {
    let before = if own_step { "<=" } else { "<" };
    format!(
        "!p.trim().startsWith('steps.') || [names.indexOf(p.trim().split('.', 3)[1])].all(r, r >= 0 && r {before} i)"
    )
}

/// What a malformed template is told.
const TEMPLATE_MESSAGE: &str = "every {{ ... }} must be one of {{ input.<key> }}, {{ steps.<name>.output[.<field>...] }}, {{ saga.name }}, {{ saga.namespace }} or {{ saga.uid }}";

/// A CEL list literal `['0', '1', ...]` mapping a step index to its text. Message expressions use it instead of
/// `string(i)`, whose result the API server's cost estimator treats as unbounded.
fn index_texts() -> String {
    let texts: Vec<String> = (0..MAX_STEPS).map(|i| format!("'{i}'")).collect();
    format!("[{}]", texts.join(", "))
}

/// `initialBackoff` is not greater than `maxBackoff`.
fn rule_backoff_order() -> Rule {
    Rule::new(format!(
        "!has(self.initialBackoff) || !has(self.maxBackoff) || {} || {} || duration(self.initialBackoff) <= duration(self.maxBackoff)",
        not_a_duration("self.initialBackoff"),
        not_a_duration("self.maxBackoff")
    ))
    .message("must not be greater than maxBackoff")
    .field_path(".initialBackoff")
}

/// A string that may hold templates (`url`, `service.path`): every `{{` starts a well-formed template (a single `{`
/// is text). One regular expression over the whole string; the API server can afford it for these two fields.
fn rule_templates() -> Rule {
    let body = TEMPLATE_BODY.trim_start_matches('^');
    Rule::new(format!(r"self.matches(r'^([^{{]|\{{([^{{]|$)|\{{\{{{body})*$')")).message(TEMPLATE_MESSAGE)
}

/// At most [`MAX_TEMPLATES_PER_FIELD`] templates in `url` or `service.path`, so the reference rules, which look at
/// that many, see them all.
fn rule_template_count() -> Rule {
    Rule::new(format!("size(self.split('{{{{', {})) <= {}", MAX_TEMPLATES_PER_FIELD + 2, MAX_TEMPLATES_PER_FIELD + 1))
        .message(Message::Message(format!("may hold at most {MAX_TEMPLATES_PER_FIELD} templates")))
}

/// Header values may hold templates.
fn rule_header_templates() -> Rule {
    let ok = each_template("self[k]", MAX_TEMPLATES_PER_HEADER, &well_formed_template());
    Rule::new(format!("self.all(k, {ok})")).message(Message::Expression(format!(
        "'header \"' + self.filter(k, !({ok}))[0] + '\": at most {MAX_TEMPLATES_PER_HEADER} templates of at most {MAX_HEADER_TEMPLATE_LENGTH} characters, and {TEMPLATE_MESSAGE}'"
    )))
}

/// Header names are HTTP tokens (RFC 9110), at most 256 characters.
fn rule_header_names() -> Rule {
    const NAME: &str = r"^[-!#$%&'*+.^_`|~0-9A-Za-z]{1,256}$";
    Rule::new(format!("self.all(k, k.matches(r\"{NAME}\"))")).message(Message::Expression(format!(
        "'header name \"' + self.filter(k, !k.matches(r\"{NAME}\"))[0] + '\" is not an HTTP token (letters, digits and !#$%&*+-.^_|~, at most 256 characters)'"
    )))
}

/// The headers the operator sets may not be set by the spec.
fn rule_reserved_headers() -> Rule {
    let reserved = format!("['{}']", RESERVED_HEADERS.join("', '"));
    Rule::new(format!("self.all(k, !(k.lowerAscii() in {reserved}))"))
        .message(Message::Expression(format!(
            "'header \"' + self.filter(k, k.lowerAscii() in {reserved})[0] + '\" is set by the operator and cannot be set in the spec (reserved: Idempotency-Key, X-Saga-Id, X-Saga-Step, traceparent)'"
        )))
        .reason(Reason::FieldValueForbidden)
}

/// Input keys are identifiers of at most 63 characters, so `{{ input.<key> }}` can name them.
fn rule_input_keys() -> Rule {
    const KEY: &str = "^[A-Za-z_][A-Za-z0-9_]{0,62}$";
    Rule::new(format!("self.all(k, k.matches('{KEY}'))")).message(Message::Expression(format!(
        "'input key \"' + self.filter(k, !k.matches('{KEY}'))[0] + '\" is not an identifier ([A-Za-z_][A-Za-z0-9_]*, at most 63 characters)'"
    )))
}

/// Step names are unique.
fn rule_unique_step_names() -> Rule {
    Rule::new("self.all(s, self.exists_one(t, t.name == s.name))")
        .message(Message::Expression(
            "'step names must be unique: \"' + self.map(s, s.name).filter(n, self.filter(s, s.name == n).size() > 1)[0] + '\" is used by more than one step'".into(),
        ))
}

/// Index of the first pivot step in `self` (the step list), -1 without one.
const FIRST_PIVOT: &str = "self.map(s, has(s.pivot) && s.pivot).indexOf(true)";

/// At most one step is the pivot.
fn rule_one_pivot() -> Rule {
    const LAST_PIVOT: &str = "self.map(s, has(s.pivot) && s.pivot).lastIndexOf(true)";
    Rule::new(format!("{FIRST_PIVOT} == {LAST_PIVOT}")).message(Message::Expression(format!(
        "'at most one step may be the pivot, but \"' + self[{FIRST_PIVOT}].name + '\" and \"' + self[{LAST_PIVOT}].name + '\" both are'"
    )))
}

/// Neither the pivot nor a step after it has a compensation: the last step with a compensation comes before the
/// first pivot.
fn rule_no_compensation_from_pivot() -> Rule {
    const LAST_COMPENSATED: &str = "self.map(s, has(s.compensation)).lastIndexOf(true)";
    Rule::new(format!("{FIRST_PIVOT} < 0 || {LAST_COMPENSATED} < {FIRST_PIVOT}"))
        .message(Message::Expression(format!(
            "'spec.steps[' + {index}[{LAST_COMPENSATED}] + '].compensation is not allowed: step \"' + self[{LAST_COMPENSATED}].name + '\" is the pivot \"' + self[{FIRST_PIVOT}].name + '\" or comes after it, and steps from the pivot on are never compensated'",
            index = index_texts()
        )))
        .reason(Reason::FieldValueForbidden)
}

/// A field of a step whose templates the reference rules check.
#[derive(Clone, Copy)]
enum Referencing {
    /// `action.url`
    ActionUrl,
    /// `action.service.path`
    ActionPath,
    /// `compensation.url`
    CompensationUrl,
    /// `compensation.service.path`
    CompensationPath,
}

impl Referencing {
    /// The field's path under a step.
    fn path(self) -> &'static str {
        match self {
            Self::ActionUrl => "action.url",
            Self::ActionPath => "action.service.path",
            Self::CompensationUrl => "compensation.url",
            Self::CompensationPath => "compensation.service.path",
        }
    }

    /// Whether templates of the field may refer to the output of the step they belong to.
    fn in_compensation(self) -> bool {
        matches!(self, Self::CompensationUrl | Self::CompensationPath)
    }

    /// CEL: `cond` holds for every template of the field in step `s` (true when the field is not set).
    fn each_template(self, cond: &str) -> String {
        let call = if self.in_compensation() { "s.compensation" } else { "s.action" };
        let call_set = if self.in_compensation() { "has(s.compensation) && " } else { "" };
        match self {
            Self::ActionUrl | Self::CompensationUrl => format!(
                "!({call_set}has({call}.url)) || {}",
                each_template(&format!("{call}.url"), MAX_TEMPLATES_PER_FIELD, cond)
            ),
            Self::ActionPath | Self::CompensationPath => format!(
                "!({call_set}has({call}.service) && has({call}.service.path)) || {}",
                each_template(&format!("{call}.service.path"), MAX_TEMPLATES_PER_FIELD, cond)
            ),
        }
    }
}

/// A rule on the spec that `ok` holds for every step; the message names the first step where it does not. `ok` may
/// use the step `s`, its index `i`, the list of step names `names` and the spec `self`. `names` and `i` are bound by
/// iterating one-element lists, since kube's client-side CEL evaluator lacks `cel.bind`.
fn rule_every_step(ok: &str, problem: &str) -> Rule {
    let ok = format!("[names.indexOf(s.name)].all(i, {ok})");
    // With duplicate step names `names.indexOf(s.name)` is ambiguous; the rule on `spec.steps` reports those.
    Rule::new(format!(
        "[self.steps.map(s, s.name)].all(names, !names.all(n, names.exists_one(m, m == n)) || self.steps.all(s, {ok}))"
    ))
    .message(Message::Expression(format!(
        "'spec.steps[' + {index}[[self.steps.map(s, s.name)].map(names, self.steps.map(s, {ok}).indexOf(false))[0]] + ']{problem}'",
        index = index_texts(),
    )))
    .field_path(".steps")
}

/// `{{ input.<key> }}` in `url` or `service.path` names a key of `spec.input`.
fn rule_input_references(field: Referencing) -> Rule {
    rule_every_step(
        &field.each_template(KNOWN_INPUT),
        &format!(".{}: a template refers to an input key that is not in spec.input", field.path()),
    )
}

/// `{{ steps.<name>.output... }}` in `url` or `service.path` names an earlier step; a compensation may also name its
/// own step.
fn rule_step_references(field: Referencing) -> Rule {
    rule_every_step(
        &field.each_template(&earlier_step(field.in_compensation())),
        &format!(
            ".{}: a template refers to a step that does not come before this one{}",
            field.path(),
            if field.in_compensation() { " (a compensation may also use the output of its own step)" } else { "" }
        ),
    )
}

/// The spec cannot change once the operator started the saga.
fn rule_immutable_spec() -> Rule {
    Rule::new("!has(oldSelf.status) || !has(oldSelf.status.startedAt) || self.spec == oldSelf.spec")
        .message("spec is immutable once the saga has started; create a new Saga")
        .field_path(".spec")
        .reason(Reason::FieldValueForbidden)
}

/// A business transaction that spans services: run `steps` in order; when one fails, the deadline passes, the saga
/// is aborted or deleted, undo the completed steps by calling their compensations in reverse.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
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
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    validation = rule_immutable_spec()
)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = rule_input_references(Referencing::ActionUrl),
    validation = rule_input_references(Referencing::ActionPath),
    validation = rule_input_references(Referencing::CompensationUrl),
    validation = rule_input_references(Referencing::CompensationPath),
    validation = rule_step_references(Referencing::ActionUrl),
    validation = rule_step_references(Referencing::ActionPath),
    validation = rule_step_references(Referencing::CompensationUrl),
    validation = rule_step_references(Referencing::CompensationPath)
)]
pub struct SagaSpec {
    /// The steps, run in this order. Names are unique; at most one step is the pivot.
    #[schemars(length(min = 1, max = 64))]
    #[x_kube(
        validation = rule_unique_step_names(),
        validation = rule_one_pivot(),
        validation = rule_no_compensation_from_pivot()
    )]
    pub steps: Vec<Step>,
    /// Values the step templates can use as `{{ input.<key> }}`: a flat object of strings and integers.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 32))]
    #[x_kube(validation = rule_input_keys())]
    pub input: BTreeMap<String, InputValue>,
    /// Timeout and retry policies for calls that do not set their own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub defaults: Option<CallDefaults>,
    /// How long the saga may run, counted from its start. A saga still running after it is compensated
    /// (reason `DeadlineExceeded`), unless it is past its pivot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = rule_duration_cap(MAX_DEADLINE, false))]
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
    schemars::json_schema!({ "x-kubernetes-int-or-string": true, "maxLength": 1024 })
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
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct CallPolicy {
    /// Timeout of one attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = rule_duration_cap(MAX_TIMEOUT, false))]
    pub timeout: Option<Duration>,
    /// How failed attempts are retried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryPolicy>,
}

/// Exponential backoff between attempts of one call.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = rule_backoff_order())]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub max_attempts: Option<u32>,
    /// Wait before the second attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = rule_duration_cap(MAX_BACKOFF, true))]
    pub initial_backoff: Option<Duration>,
    /// Longest wait between two attempts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = rule_duration_cap(MAX_BACKOFF, true))]
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
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("has(self.url) || has(self.service)")
        .message("one of url and service is required")
        .reason(Reason::FieldValueRequired),
    validation = Rule::new("!has(self.url) || !has(self.service)")
        .message("url and service are mutually exclusive: set exactly one of them"),
)]
pub struct HttpCall {
    /// HTTP method of the request.
    pub method: HttpMethod,
    /// Absolute `http://` or `https://` URL. Exactly one of `url` and `service` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 2048), regex(pattern = r"^https?://"))]
    #[x_kube(validation = rule_templates(), validation = rule_template_count())]
    pub url: Option<String>,
    /// A Kubernetes Service to call, by its in-cluster DNS name. Exactly one of `url` and `service` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceRef>,
    /// Extra request headers. The operator sets `Idempotency-Key`, `X-Saga-Id`, `X-Saga-Step` and `traceparent`
    /// itself.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 32, "additionalProperties" = { "type": "string", "maxLength": 4096 }))]
    #[x_kube(validation = rule_header_names(), validation = rule_reserved_headers(), validation = rule_header_templates())]
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
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
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
    #[x_kube(validation = rule_templates(), validation = rule_template_count())]
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

#[cfg(test)]
mod tests {
    //! The CEL rules evaluated client-side by kube's CEL evaluator on the generated schema, and the schema
    //! constraints the API server checks by itself. operator/tests/saga_validation.rs runs the same cases against a
    //! real API server.

    use std::sync::LazyLock;

    use kube::{
        CustomResourceExt,
        core::cel::{CompiledSchema, ErrorKind, Validator, compile_schema},
    };
    use serde_json::{Value, json};

    use super::*;

    /// The openAPIV3Schema of the generated CRD, as the API server gets it.
    fn schema() -> Value {
        let crd = Saga::crd();
        let schema = crd.spec.versions[0].schema.as_ref().and_then(|s| s.open_api_v3_schema.as_ref());
        serde_json::to_value(schema.expect("the CRD has a schema")).expect("schema as JSON")
    }

    /// A saga that uses every feature, each at its limit where that is cheap.
    fn maximal() -> Value {
        let mut steps: Vec<Value> = (0..MAX_STEPS - 1)
            .map(|i| {
                json!({
                    "name": format!("step-{i}"),
                    "action": {
                        "method": "POST",
                        "url": format!("http://svc-{i}.example/{{{{ input.orderId }}}}"),
                        "timeout": MAX_TIMEOUT,
                    },
                    "compensation": {
                        "method": "DELETE",
                        "service": {
                            "name": "inventory",
                            "namespace": "shop",
                            "port": 8080,
                            "path": format!("/r/{{{{steps.step-{i}.output.id}}}}"),
                        },
                    },
                })
            })
            .collect();
        steps[1]["action"] = json!({
            "method": "PUT",
            "url": format!(
                "https://{{{{ input.host }}}}:8443/a{{b}}/{}?q={{{{ steps.step-0.output.items.0.sku }}}}",
                "{{saga.uid}}".repeat(MAX_TEMPLATES_PER_FIELD - 2)
            ),
            "headers": (0..32)
                .map(|i| (format!("X-H{i}"), json!(format!("{{{{ input.k{} }}}} {{{{saga.name}}}} {{{{ saga.namespace }}}} {{{{\tsteps.step-0.output }}}}", i % 30))))
                .collect::<serde_json::Map<_, _>>(),
            "body": { "order": "{{ input.orderId }}", "later": "{{ steps.nope.output }}" },
            "timeout": "1ms",
            "retry": {
                "maxAttempts": 10000,
                "initialBackoff": "1h",
                "maxBackoff": MAX_BACKOFF,
                "multiplier": 10,
                "jitter": 1,
            },
        });
        steps[1]["compensation"]["headers"] = json!({ "Authorization": "Bearer {{ steps.step-1.output.token }}" });
        steps.push(json!({
            "name": "ship",
            "action": { "method": "POST", "url": "http://ship/{{ steps.step-62.output }}" },
            "pivot": true,
        }));
        let mut input: serde_json::Map<String, Value> =
            (0..30).map(|i| (format!("k{i}"), json!("v".repeat(1024)))).collect();
        input.insert("orderId".into(), json!(42));
        input.insert("host".into(), json!("shop.example"));
        json!({
            "apiVersion": "kubesaga.dev/v1alpha1",
            "kind": "Saga",
            "metadata": { "name": "maximal" },
            "spec": {
                "steps": steps,
                "input": input,
                "deadline": MAX_DEADLINE,
                "defaults": {
                    "action": { "timeout": "30s", "retry": { "maxAttempts": 1, "initialBackoff": "0s", "maxBackoff": "0s" } },
                    "compensation": { "timeout": "1h", "retry": { "initialBackoff": "100ms" } },
                },
                "ttlSecondsAfterFinished": { "succeeded": 0, "compensated": 60, "failed": 86400 },
            },
        })
    }

    /// A small valid saga: reserve (compensated), charge (the pivot), notify.
    fn small() -> Value {
        json!({
            "apiVersion": "kubesaga.dev/v1alpha1",
            "kind": "Saga",
            "metadata": { "name": "small" },
            "spec": {
                "input": { "orderId": "o-1" },
                "steps": [
                    {
                        "name": "reserve",
                        "action": { "method": "POST", "url": "http://inventory/reservations/{{ input.orderId }}" },
                        "compensation": { "method": "DELETE", "url": "http://inventory/r/{{ steps.reserve.output.id }}" },
                    },
                    { "name": "charge", "action": { "method": "POST", "url": "http://payment/charges" }, "pivot": true },
                    { "name": "notify", "action": { "method": "POST", "url": "http://notification/{{ steps.charge.output.id }}" } },
                ],
            },
        })
    }

    /// The CEL rules of [`schema`], compiled once.
    static COMPILED: LazyLock<CompiledSchema> = LazyLock::new(|| compile_schema(&schema()));

    /// The (field path, message) of every CEL rule `object` breaks; every rule must be evaluated, not skipped.
    fn cel_errors(object: &Value, old: Option<&Value>) -> Vec<(String, String)> {
        match Validator::new().validate_compiled(&COMPILED, object, old) {
            Ok(()) => Vec::new(),
            Err(errors) => errors
                .into_vec()
                .into_iter()
                .map(|e| {
                    assert_eq!(e.kind, ErrorKind::ValidationFailure, "rule not evaluated: {e:?}");
                    // kube's evaluator writes a root rule's fieldPath as `.spec`; the API server says `spec`.
                    (e.field_path.trim_start_matches('.').to_owned(), e.message)
                })
                .collect(),
        }
    }

    /// `small()` changed by `change`, which gets the spec.
    fn small_with(change: impl FnOnce(&mut Value)) -> Value {
        let mut saga = small();
        change(&mut saga["spec"]);
        saga
    }

    #[test]
    fn valid_sagas_pass_every_rule_and_deserialize() {
        for saga in [small(), maximal()] {
            assert_eq!(cel_errors(&saga, None), Vec::<(String, String)>::new(), "{}", saga["metadata"]["name"]);
            let typed: Saga = serde_json::from_value(saga.clone()).expect("a valid saga deserializes");
            assert_eq!(typed.spec.steps.len(), saga["spec"]["steps"].as_array().map_or(0, Vec::len));
        }
    }

    #[test]
    fn every_rule_rejects_what_it_should_and_names_the_field() {
        let url = |step: usize, url: &str| {
            let url = url.to_owned();
            move |spec: &mut Value| spec["steps"][step]["action"]["url"] = json!(url)
        };
        type Change = Box<dyn FnOnce(&mut Value)>;
        let cases: Vec<(&str, Change, &str, &str)> = vec![
            (
                "duplicate step names",
                Box::new(|s| s["steps"][2]["name"] = json!("reserve")),
                "spec.steps",
                r#"step names must be unique: "reserve" is used by more than one step"#,
            ),
            (
                "two pivots",
                Box::new(|s| s["steps"][2]["pivot"] = json!(true)),
                "spec.steps",
                r#"at most one step may be the pivot, but "charge" and "notify" both are"#,
            ),
            (
                "a compensation on the pivot",
                Box::new(|s| s["steps"][1]["compensation"] = json!({"method": "POST", "url": "http://x"})),
                "spec.steps",
                r#"spec.steps[1].compensation is not allowed: step "charge" is the pivot "charge""#,
            ),
            (
                "a compensation after the pivot",
                Box::new(|s| s["steps"][2]["compensation"] = json!({"method": "POST", "url": "http://x"})),
                "spec.steps",
                "spec.steps[2].compensation is not allowed",
            ),
            (
                "url and service",
                Box::new(|s| s["steps"][1]["action"]["service"] = json!({"name": "payment", "port": 80})),
                "spec.steps[1].action",
                "url and service are mutually exclusive",
            ),
            (
                "neither url nor service",
                Box::new(|s| s["steps"][0]["compensation"] = json!({"method": "DELETE"})),
                "spec.steps[0].compensation",
                "one of url and service is required",
            ),
            ("a deadline over 30 days", Box::new(|s| s["deadline"] = json!("721h")), "spec.deadline", "at most 720h"),
            ("a zero deadline", Box::new(|s| s["deadline"] = json!("0s")), "spec.deadline", "longer than 0s"),
            (
                "a timeout over an hour",
                Box::new(|s| s["steps"][0]["compensation"]["timeout"] = json!("1h0m1s")),
                "spec.steps[0].compensation.timeout",
                "must be longer than 0s and at most 1h",
            ),
            (
                "a zero default timeout",
                Box::new(|s| s["defaults"] = json!({"action": {"timeout": "0ms"}})),
                "spec.defaults.action.timeout",
                "must be longer than 0s and at most 1h",
            ),
            (
                "an initial backoff over an hour",
                Box::new(|s| s["defaults"] = json!({"compensation": {"retry": {"initialBackoff": "61m"}}})),
                "spec.defaults.compensation.retry.initialBackoff",
                "must be at most 1h",
            ),
            (
                "a max backoff over an hour",
                Box::new(|s| s["steps"][2]["action"]["retry"] = json!({"maxBackoff": "2h"})),
                "spec.steps[2].action.retry.maxBackoff",
                "must be at most 1h",
            ),
            (
                "an initial backoff greater than the max backoff",
                Box::new(|s| s["steps"][0]["action"]["retry"] = json!({"initialBackoff": "1m", "maxBackoff": "59s"})),
                "spec.steps[0].action.retry.initialBackoff",
                "must not be greater than maxBackoff",
            ),
            (
                "an input key that is not an identifier",
                Box::new(|s| s["input"]["order-id"] = json!("x")),
                "spec.input",
                r#"input key "order-id" is not an identifier"#,
            ),
            (
                "an input key of 64 characters",
                Box::new(|s| s["input"]["k".repeat(64)] = json!(1)),
                "spec.input",
                "at most 63 characters",
            ),
            (
                "a header name that is not a token",
                Box::new(|s| s["steps"][0]["action"]["headers"] = json!({"X Tenant": "a"})),
                "spec.steps[0].action.headers",
                r#"header name "X Tenant" is not an HTTP token"#,
            ),
            (
                "a reserved header in another case",
                Box::new(|s| s["steps"][0]["compensation"]["headers"] = json!({"IDEMPOTENCY-KEY": "a"})),
                "spec.steps[0].compensation.headers",
                r#"header "IDEMPOTENCY-KEY" is set by the operator"#,
            ),
            (
                "reserved traceparent",
                Box::new(|s| s["steps"][2]["action"]["headers"] = json!({"Traceparent": "00-a-b-01"})),
                "spec.steps[2].action.headers",
                r#"header "Traceparent" is set by the operator"#,
            ),
            (
                "a malformed template in a header",
                Box::new(|s| s["steps"][0]["action"]["headers"] = json!({"X-Order": "{{ inputs.orderId }}"})),
                "spec.steps[0].action.headers",
                r#"header "X-Order": at most 4 templates of at most 128 characters, and every {{ ... }} must be one of"#,
            ),
            (
                "five templates in a header",
                Box::new(|s| s["steps"][0]["action"]["headers"] = json!({"X-Ids": "{{saga.uid}}".repeat(5)})),
                "spec.steps[0].action.headers",
                r#"header "X-Ids": at most 4 templates"#,
            ),
            (
                "an unknown template form in a url",
                Box::new(url(2, "http://x/{{ saga.id }}")),
                "spec.steps[2].action.url",
                "every {{ ... }} must be one of {{ input.<key> }}",
            ),
            (
                "an unclosed template",
                Box::new(url(2, "http://x/{{ input.orderId")),
                "spec.steps[2].action.url",
                "must be one of",
            ),
            (
                "three braces",
                Box::new(url(2, "http://x/{{{ input.orderId }}")),
                "spec.steps[2].action.url",
                "must be one of",
            ),
            (
                "spaces inside a template",
                Box::new(url(2, "http://x/{{ input. orderId }}")),
                "spec.steps[2].action.url",
                "must be one of",
            ),
            (
                "17 templates in a url",
                Box::new(url(2, &format!("http://x/{}", "{{saga.uid}}".repeat(17)))),
                "spec.steps[2].action.url",
                "may hold at most 16 templates",
            ),
            (
                "a malformed template in a service path",
                Box::new(|s| {
                    s["steps"][2]["action"] =
                        json!({"method": "GET", "service": {"name": "n", "port": 80, "path": "/{{ steps.charge }}"}})
                }),
                "spec.steps[2].action.service.path",
                "must be one of",
            ),
            (
                "an unknown input key in a url",
                Box::new(url(2, "http://x/{{ input.orderID }}")),
                "spec.steps",
                "spec.steps[2].action.url: a template refers to an input key that is not in spec.input",
            ),
            (
                "an input reference without spec.input",
                Box::new(|s| {
                    s.as_object_mut().map(|spec| spec.remove("input"));
                }),
                "spec.steps",
                "spec.steps[0].action.url: a template refers to an input key that is not in spec.input",
            ),
            (
                "an unknown input key in a service path",
                Box::new(|s| {
                    s["steps"][2]["compensation"] =
                        json!({"method": "GET", "service": {"name": "n", "port": 80, "path": "/{{input.nope}}"}})
                }),
                "spec.steps",
                "spec.steps[2].compensation.service.path: a template refers to an input key",
            ),
            (
                "an action using a later step",
                Box::new(url(0, "http://x/{{ steps.notify.output.id }}")),
                "spec.steps",
                "spec.steps[0].action.url: a template refers to a step that does not come before this one",
            ),
            (
                "an action using its own step",
                Box::new(url(1, "http://x/{{ steps.charge.output }}")),
                "spec.steps",
                "spec.steps[1].action.url: a template refers to a step that does not come before this one",
            ),
            (
                "an unknown step",
                Box::new(url(2, "http://x/{{ steps.refund.output }}")),
                "spec.steps",
                "spec.steps[2].action.url",
            ),
            (
                "a compensation using a later step",
                Box::new(|s| s["steps"][0]["compensation"]["url"] = json!("http://x/{{ steps.charge.output.id }}")),
                "spec.steps",
                "spec.steps[0].compensation.url: a template refers to a step that does not come before this one \
                 (a compensation may also use the output of its own step)",
            ),
            (
                "a template of 129 characters in a header",
                Box::new(|s| {
                    let long = format!("{{{{ steps.reserve.output.{} }}}}", "f".repeat(102));
                    s["steps"][2]["action"]["headers"] = json!({ "X-Long": long });
                }),
                "spec.steps[2].action.headers",
                "of at most 128 characters",
            ),
        ];
        for (what, change, field, message) in cases {
            let errors = cel_errors(&small_with(change), None);
            assert!(
                errors.iter().any(|(f, m)| f == field && m.contains(message)),
                "{what}: expected an error at {field} containing {message:?}, got {errors:#?}"
            );
        }
    }

    #[test]
    fn templates_accept_every_form_with_any_spacing_and_plain_braces() {
        for url in [
            "http://x/{{input.orderId}}",
            "http://x/{{   input.orderId\t}}/{{\nsaga.namespace\n}}",
            "http://x/{{ steps.reserve.output }}/{{ steps.reserve.output.items.0.sku }}/{{ steps.reserve.output.$id }}",
            "http://x/a{b}c}}d{",
            "http://x/{{ saga.uid }}}",
            "http://x/{",
        ] {
            let saga = small_with(|s| s["steps"][2]["action"]["url"] = json!(url));
            assert_eq!(cel_errors(&saga, None), Vec::<(String, String)>::new(), "{url}");
        }
    }

    #[test]
    fn a_compensation_may_use_its_own_step_and_earlier_ones() {
        let saga = small_with(|s| {
            s["steps"][0]["compensation"]["headers"] = json!({"X-Id": "{{ steps.reserve.output.id }}"});
            s["steps"][2]["action"]["headers"] =
                json!({"X-Both": "{{ steps.reserve.output.id }}-{{ steps.charge.output.id }}"});
        });
        assert_eq!(cel_errors(&saga, None), Vec::<(String, String)>::new());
    }

    #[test]
    fn templates_in_the_body_and_references_in_headers_are_left_to_the_operator() {
        let saga = small_with(|s| {
            s["steps"][0]["action"]["body"] = json!({"a": "{{ steps.nope.output }}", "b": ["{{"]});
            s["steps"][0]["action"]["headers"] = json!({"X-A": "{{ input.nope }}", "X-B": "{{ steps.notify.output }}"});
        });
        assert_eq!(cel_errors(&saga, None), Vec::<(String, String)>::new());
    }

    #[test]
    fn a_malformed_duration_is_left_to_the_schema_pattern() {
        // The pattern rejects these on the API server; the CEL rules skip them instead of failing to convert.
        let saga = small_with(|s| {
            s["deadline"] = json!("5 minutes");
            s["steps"][0]["action"]["timeout"] = json!("1d");
            s["steps"][0]["action"]["retry"] = json!({"initialBackoff": "x", "maxBackoff": "1s"});
        });
        assert_eq!(cel_errors(&saga, None), Vec::<(String, String)>::new());
    }

    #[test]
    fn the_spec_is_immutable_once_the_saga_has_started() {
        let old = small();
        let changed = small_with(|s| s["deadline"] = json!("1h"));
        assert_eq!(cel_errors(&changed, Some(&old)), Vec::<(String, String)>::new(), "not started: spec may change");

        let mut started = old.clone();
        started["status"] = json!({ "phase": "Running", "startedAt": "2026-01-01T00:00:00.000000Z" });
        let mut changed_started = changed.clone();
        changed_started["status"] = started["status"].clone();
        assert_eq!(
            cel_errors(&changed_started, Some(&started)),
            vec![("spec".to_owned(), "spec is immutable once the saga has started; create a new Saga".to_owned())]
        );

        let mut status_only = started.clone();
        status_only["status"]["phase"] = json!("Succeeded");
        assert_eq!(cel_errors(&status_only, Some(&started)), Vec::<(String, String)>::new(), "status may change");
    }

    /// Walks `schema` down `path` (property names; `[]` for array items, `{}` for map values).
    fn at<'s>(schema: &'s Value, path: &str) -> &'s Value {
        path.split('.').fold(schema, |node, key| match key {
            "[]" => &node["items"],
            "{}" => &node["additionalProperties"],
            _ => &node["properties"][key],
        })
    }

    #[test]
    fn the_schema_carries_the_limits_the_api_server_checks_itself() {
        let schema = schema();
        let spec = at(&schema, "spec");
        let steps = at(spec, "steps");
        assert_eq!((steps["minItems"].as_u64(), steps["maxItems"].as_u64()), (Some(1), Some(MAX_STEPS as u64)));
        assert_eq!(at(spec, "input")["maxProperties"], json!(32));
        assert_eq!(at(spec, "input.{}")["maxLength"], json!(1024));
        for call in ["action", "compensation"] {
            let call = at(steps, &format!("[].{call}"));
            assert_eq!(at(call, "headers")["maxProperties"], json!(32));
            assert_eq!(at(call, "headers.{}")["maxLength"], json!(4096));
            let retry = at(call, "retry");
            assert_eq!(
                (at(retry, "maxAttempts")["minimum"].as_f64(), at(retry, "maxAttempts")["maximum"].as_f64()),
                (Some(1.0), Some(10000.0))
            );
            assert_eq!(
                (at(retry, "multiplier")["minimum"].as_f64(), at(retry, "multiplier")["maximum"].as_f64()),
                (Some(1.0), Some(10.0))
            );
            assert_eq!(
                (at(retry, "jitter")["minimum"].as_f64(), at(retry, "jitter")["maximum"].as_f64()),
                (Some(0.0), Some(1.0))
            );
            for duration in [at(call, "timeout"), at(retry, "initialBackoff"), at(retry, "maxBackoff")] {
                assert_eq!(
                    duration["pattern"],
                    json!(crate::crd::duration::PATTERN),
                    "the CEL rules skip what the pattern rejects"
                );
            }
        }
        assert_eq!(at(spec, "deadline")["pattern"], json!(crate::crd::duration::PATTERN));
        let root_rules = schema["x-kubernetes-validations"].as_array().map_or(0, Vec::len);
        assert_eq!(root_rules, 1, "the immutability rule sits at the root");
    }
}
