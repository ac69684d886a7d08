//! Rendering the templates in a step's HTTP call.
//!
//! A template is `{{ expr }}` (spaces next to the braces optional) inside `url`, `service.path`, a header value or
//! any string of `body`. `expr` is one of:
//!
//! - `input.<key>`: a value of `spec.input`;
//! - `steps.<step>.output`, optionally followed by `.<field>` segments: the JSON output of an earlier step, or a
//!   part of it (a segment of digits indexes an array; on an object every segment is a key);
//! - `saga.name`, `saga.namespace`, `saga.uid`.
//!
//! There is no escaping and there are no filters. A value becomes text as-is for strings and as compact JSON for
//! everything else. In a URL's path, query and fragment the text is percent-encoded, so a value is always data and
//! never changes the URL's structure; in the scheme, host and port (before the path) a value that would change the
//! structure is refused instead, as encoding it would only produce a URL that does not work. A header value
//! refuses values with control characters (which could inject headers) or non-ASCII ones. In `body`, a string
//! that is exactly one template (nothing around the braces) takes the referenced value with its JSON type.
//!
//! Errors carry a location relative to the call (`url`, `headers.X-Tenant`, `body.items[2].sku`);
//! [`TemplateError::within`] prefixes it with the call's place in the spec, as [`check_spec`] does
//! (`steps[1].action.url`).

use std::{borrow::Cow, collections::BTreeMap};

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::Value;

use crate::crd::{HttpCall, HttpMethod, InputValue, SagaSpec};

/// Characters of a substituted value kept as they are in a URL's path, query or fragment: RFC 3986's unreserved
/// set. Encoding everything else, `/`, `?`, `&`, `=` and `#` included, keeps a value inside the component it was
/// written in.
const URL_VALUE: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// Names listed in an error message at most, so a large output does not produce a huge status message.
const MAX_LISTED_NAMES: usize = 16;

/// Longest substituted value quoted in an error message.
const MAX_QUOTED_CHARS: usize = 64;

/// What templates can refer to while a call is rendered.
#[derive(Clone, Debug)]
pub struct TemplateContext<'a> {
    /// `metadata.name` of the saga.
    pub saga_name: &'a str,
    /// `metadata.namespace` of the saga; also the namespace of a `service` that names none.
    pub saga_namespace: &'a str,
    /// `metadata.uid` of the saga.
    pub saga_uid: &'a str,
    /// `spec.input`.
    pub input: &'a BTreeMap<String, InputValue>,
    /// The recorded output of each step that has one (only steps whose action succeeded), by step name.
    pub outputs: BTreeMap<&'a str, &'a Value>,
}

/// An HTTP call with its templates rendered and its target resolved to a URL.
#[derive(Clone, Debug, PartialEq)]
pub struct RenderedRequest {
    /// HTTP method.
    pub method: HttpMethod,
    /// Absolute URL: the call's `url`, or the in-cluster URL of its `service`.
    pub url: String,
    /// The call's `headers`, in name order.
    pub headers: Vec<(String, String)>,
    /// JSON body.
    pub body: Option<Value>,
}

/// Why a call's templates cannot be rendered or checked.
///
/// Every variant carries a `location` ([`TemplateError::location`]), and its message starts with it: relative to
/// the call (`url`, `service.path`, `headers.<name>`, `body.<field>[<index>]`) as [`render`] returns it, prefixed
/// with `steps[<i>].action` or `steps[<i>].compensation` as [`check_spec`] returns it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// A `{{` without a `}}` after it.
    #[error("{location}: `{snippet}` opens a template with `{{{{` that is never closed with `}}}}`")]
    Unclosed {
        /// Where the template is.
        location: String,
        /// The text from the `{{` on, shortened.
        snippet: String,
    },
    /// A template whose expression is not one of the forms templates support.
    #[error("{location}: `{template}` is not a valid template: {reason}")]
    Malformed {
        /// Where the template is.
        location: String,
        /// The template as written, braces included.
        template: String,
        /// What is wrong and how to write it instead.
        reason: String,
    },
    /// `input.<key>` with a key that `spec.input` does not define.
    #[error("{location}: `{template}` refers to `spec.input.{key}`, which is not defined ({})", defined_keys(.known))]
    UnknownInput {
        /// Where the template is.
        location: String,
        /// The template as written, braces included.
        template: String,
        /// The key that is not defined.
        key: String,
        /// The keys `spec.input` defines.
        known: Vec<String>,
    },
    /// `steps.<step>` naming no step of the saga (found by [`check_spec`]).
    #[error("{location}: `{template}` refers to step `{step}`, which the saga does not have (its steps: {})",
        list(.known.iter().map(String::as_str)))]
    UnknownStep {
        /// Where the template is.
        location: String,
        /// The template as written, braces included.
        template: String,
        /// The step name that matches no step.
        step: String,
        /// The names of the saga's steps, in order.
        known: Vec<String>,
    },
    /// `steps.<step>` naming a step whose output cannot exist yet when the call is made (found by [`check_spec`]).
    #[error("{location}: `{template}` cannot be used here: {detail}")]
    StepOrder {
        /// Where the template is.
        location: String,
        /// The template as written, braces included.
        template: String,
        /// The step referred to.
        step: String,
        /// Why its output is not available at this point, and what is allowed.
        detail: String,
    },
    /// `steps.<step>.output` while that step has no recorded output.
    #[error(
        "{location}: `{template}` refers to the output of step `{step}`, which has none: the step has not run yet, \
         did not succeed, answered without a JSON body, or is not a step of this saga"
    )]
    NoOutput {
        /// Where the template is.
        location: String,
        /// The template as written, braces included.
        template: String,
        /// The step referred to.
        step: String,
    },
    /// A `.<field>` segment that the step's output does not have.
    #[error("{location}: `{template}`: {detail}")]
    MissingField {
        /// Where the template is.
        location: String,
        /// The template as written, braces included.
        template: String,
        /// The longest prefix of the reference that exists, e.g. `steps.reserve.output.items`.
        found: String,
        /// The segment that does not exist under `found`.
        missing: String,
        /// What `found` is and why it has no `missing`.
        detail: String,
    },
    /// A value that would change the structure of a URL where it cannot be percent-encoded.
    #[error("{location}: `{template}` cannot be placed there: {reason}")]
    UnsafeUrlValue {
        /// Where the template is.
        location: String,
        /// The template as written, braces included.
        template: String,
        /// What is wrong with the value.
        reason: String,
    },
    /// A header value that would contain a character headers cannot carry: a control character (a line break would
    /// let a value inject headers) or a non-ASCII one.
    #[error(
        "{location}: `{template}` gives a value with a line break, another control character or a non-ASCII \
         character, which an HTTP header cannot carry"
    )]
    InvalidHeaderValue {
        /// Where the template is.
        location: String,
        /// The template as written, braces included.
        template: String,
    },
    /// A call that sets both or neither of `url` and `service`.
    #[error("{location}: {reason}")]
    InvalidTarget {
        /// Where the problem is.
        location: String,
        /// What is wrong.
        reason: String,
    },
}

impl TemplateError {
    /// Where in the call (or, from [`check_spec`], in the spec) the problem is.
    pub fn location(&self) -> &str {
        match self {
            Self::Unclosed { location, .. }
            | Self::Malformed { location, .. }
            | Self::UnknownInput { location, .. }
            | Self::UnknownStep { location, .. }
            | Self::StepOrder { location, .. }
            | Self::NoOutput { location, .. }
            | Self::MissingField { location, .. }
            | Self::UnsafeUrlValue { location, .. }
            | Self::InvalidHeaderValue { location, .. }
            | Self::InvalidTarget { location, .. } => location,
        }
    }

    /// The same error with its location prefixed by `prefix`, e.g. `within("steps[1].action")` turns `url` into
    /// `steps[1].action.url`.
    pub fn within(mut self, prefix: &str) -> Self {
        let location = match &mut self {
            Self::Unclosed { location, .. }
            | Self::Malformed { location, .. }
            | Self::UnknownInput { location, .. }
            | Self::UnknownStep { location, .. }
            | Self::StepOrder { location, .. }
            | Self::NoOutput { location, .. }
            | Self::MissingField { location, .. }
            | Self::UnsafeUrlValue { location, .. }
            | Self::InvalidHeaderValue { location, .. }
            | Self::InvalidTarget { location, .. } => location,
        };
        *location = if location.is_empty() { prefix.to_owned() } else { format!("{prefix}.{location}") };
        self
    }
}

/// Renders `call`: substitutes its templates from `ctx` and resolves its target to a URL. A `service` becomes
/// `http://<name>.<namespace>.svc.<cluster_domain>:<port><path>`, the namespace defaulting to the saga's.
///
/// Errors are located relative to the call; see [`TemplateError::within`].
pub fn render(
    call: &HttpCall,
    ctx: &TemplateContext<'_>,
    cluster_domain: &str,
) -> Result<RenderedRequest, TemplateError> {
    let url = match (&call.url, &call.service) {
        (Some(url), None) => render_text(url, Field::Url(UrlStart::Scheme), ctx, "url")?,
        (None, Some(service)) => {
            let path = render_text(&service.path, Field::Url(UrlStart::Path), ctx, "service.path")?;
            // The schema requires the leading `/`; adding it when missing keeps the port from absorbing the path.
            let slash = if path.starts_with('/') { "" } else { "/" };
            let namespace = service.namespace.as_deref().unwrap_or(ctx.saga_namespace);
            format!("http://{}.{namespace}.svc.{cluster_domain}:{}{slash}{path}", service.name, service.port)
        }
        (Some(_), Some(_)) => return Err(invalid_target(BOTH_TARGETS)),
        (None, None) => return Err(invalid_target(NO_TARGET)),
    };
    let headers = call
        .headers
        .iter()
        .map(|(name, value)| {
            Ok((name.clone(), render_text(value, Field::Header, ctx, &key_location("headers", name))?))
        })
        .collect::<Result<Vec<_>, TemplateError>>()?;
    let body = call.body.as_ref().map(|body| render_json(body, ctx, "body")).transpose()?;
    Ok(RenderedRequest { method: call.method, url, headers, body })
}

/// Checks every template of every action and compensation of `spec` before the saga's first call: each parses,
/// each `input.<key>` is defined in `spec.input`, and each `steps.<step>` names a step whose output can exist when
/// the call is made (for an action: an earlier step; for a compensation: its own step or an earlier one). It also
/// checks that each call sets exactly one of `url` and `service`, since such a call could never be rendered.
///
/// Returns the first problem in spec order (steps in order, each step's action before its compensation, and in a
/// call `url`, `service.path`, headers by name, then `body`), located from the spec's root, e.g.
/// `steps[0].compensation.body.items[2].sku`. Whether a referenced field exists in an output can only be known
/// once the output does, so [`render`] reports that.
pub fn check_spec(spec: &SagaSpec) -> Result<(), TemplateError> {
    for (index, step) in spec.steps.iter().enumerate() {
        check_call(spec, &step.action, index, false)?;
        if let Some(compensation) = &step.compensation {
            check_call(spec, compensation, index, true)?;
        }
    }
    Ok(())
}

fn check_call(spec: &SagaSpec, call: &HttpCall, index: usize, compensation: bool) -> Result<(), TemplateError> {
    let prefix = format!("steps[{index}].{}", if compensation { "compensation" } else { "action" });
    if let Some(err) = target_error(call) {
        return Err(err.within(&prefix));
    }
    let check_text = |text: &str, location: &str| -> Result<(), TemplateError> {
        for piece in parse(text, location)? {
            if let Piece::Ref(reference) = piece {
                check_ref(spec, &reference, index, compensation, location)?;
            }
        }
        Ok(())
    };
    let check = || -> Result<(), TemplateError> {
        if let Some(url) = &call.url {
            check_text(url, "url")?;
        }
        if let Some(service) = &call.service {
            check_text(&service.path, "service.path")?;
        }
        for (name, value) in &call.headers {
            check_text(value, &key_location("headers", name))?;
        }
        if let Some(body) = &call.body {
            for_each_string(body, "body", &check_text)?;
        }
        Ok(())
    };
    check().map_err(|err| err.within(&prefix))
}

fn check_ref(
    spec: &SagaSpec,
    reference: &Ref<'_>,
    index: usize,
    compensation: bool,
    location: &str,
) -> Result<(), TemplateError> {
    match &reference.expr {
        Expr::Input(key) if !spec.input.contains_key(*key) => Err(TemplateError::UnknownInput {
            location: location.to_owned(),
            template: reference.raw.to_owned(),
            key: (*key).to_owned(),
            known: spec.input.keys().cloned().collect(),
        }),
        Expr::Output { step, .. } => {
            let Some(position) = spec.steps.iter().position(|s| s.name == *step) else {
                return Err(TemplateError::UnknownStep {
                    location: location.to_owned(),
                    template: reference.raw.to_owned(),
                    step: (*step).to_owned(),
                    known: spec.steps.iter().map(|s| s.name.clone()).collect(),
                });
            };
            let detail = if position == index && !compensation {
                Some(format!(
                    "an action cannot use the output of its own step `{step}`, which exists only once the action \
                     succeeded (the step's compensation can use it)"
                ))
            } else if position > index {
                let allowed = if compensation { "its own step and earlier ones" } else { "earlier steps" };
                Some(format!(
                    "step `{step}` (steps[{position}]) runs after this one, so its output does not exist yet; a{} can \
                     use the outputs of {allowed} only",
                    if compensation { " compensation" } else { "n action" }
                ))
            } else {
                None
            };
            match detail {
                Some(detail) => Err(TemplateError::StepOrder {
                    location: location.to_owned(),
                    template: reference.raw.to_owned(),
                    step: (*step).to_owned(),
                    detail,
                }),
                None => Ok(()),
            }
        }
        _ => Ok(()),
    }
}

const BOTH_TARGETS: &str = "both `url` and `service` are set; set exactly one";
const NO_TARGET: &str = "neither `url` nor `service` is set; set exactly one";

/// The error of a call that does not set exactly one of `url` and `service`, if it is one.
fn target_error(call: &HttpCall) -> Option<TemplateError> {
    match (&call.url, &call.service) {
        (Some(_), Some(_)) => Some(invalid_target(BOTH_TARGETS)),
        (None, None) => Some(invalid_target(NO_TARGET)),
        _ => None,
    }
}

fn invalid_target(reason: &str) -> TemplateError {
    TemplateError::InvalidTarget { location: "url".to_owned(), reason: reason.to_owned() }
}

/// Calls `f` with every string in `value` (object keys excluded) and its location.
fn for_each_string(
    value: &Value,
    location: &str,
    f: &dyn Fn(&str, &str) -> Result<(), TemplateError>,
) -> Result<(), TemplateError> {
    match value {
        Value::String(text) => f(text, location),
        Value::Array(items) => {
            items.iter().enumerate().try_for_each(|(i, item)| for_each_string(item, &format!("{location}[{i}]"), f))
        }
        Value::Object(map) => {
            map.iter().try_for_each(|(key, item)| for_each_string(item, &key_location(location, key), f))
        }
        Value::Null | Value::Bool(_) | Value::Number(_) => Ok(()),
    }
}

/// The location of `key` under `location`: `.key` when it reads unambiguously, `["key"]` otherwise.
fn key_location(location: &str, key: &str) -> String {
    let plain = !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if plain { format!("{location}.{key}") } else { format!("{location}[{}]", Value::from(key)) }
}

/// Where a templated string goes, which decides how substituted values are written into it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    Url(UrlStart),
    Header,
    Body,
}

/// Which part of a URL a templated string starts in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum UrlStart {
    /// A whole URL (`url`).
    Scheme,
    /// A path and query (`service.path`).
    Path,
}

/// The part of a URL a template sits in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum UrlPart {
    Scheme,
    Authority,
    Path,
    Query,
    Fragment,
}

/// The part of a URL that follows the literal text `literal`. Only the literal text matters: substituted values
/// cannot move to another part, as they are encoded or refused where they could.
fn url_part(literal: &str, start: UrlStart) -> UrlPart {
    let (mut part, rest) = match start {
        UrlStart::Path => (UrlPart::Path, literal),
        UrlStart::Scheme => match literal.find("://") {
            Some(at) => (UrlPart::Authority, &literal[at + 3..]),
            None => return UrlPart::Scheme,
        },
    };
    for c in rest.chars() {
        part = match (part, c) {
            (UrlPart::Authority, '/') => UrlPart::Path,
            (UrlPart::Authority | UrlPart::Path, '?') => UrlPart::Query,
            (UrlPart::Authority | UrlPart::Path | UrlPart::Query, '#') => UrlPart::Fragment,
            (part, _) => part,
        };
    }
    part
}

/// A character a value may contain in a URL's scheme, host or port: enough for host names, IP addresses (IPv6 in
/// brackets) and `host:port`, nothing that starts another part of the URL.
fn is_authority_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '~' | ':' | '[' | ']')
}

/// A piece of a templated string.
#[derive(Clone, Debug, PartialEq)]
enum Piece<'s> {
    Text(&'s str),
    Ref(Ref<'s>),
}

/// A template: what it refers to, and how it was written (for messages).
#[derive(Clone, Debug, PartialEq)]
struct Ref<'s> {
    raw: &'s str,
    expr: Expr<'s>,
}

/// What a template refers to.
#[derive(Clone, Debug, PartialEq)]
enum Expr<'s> {
    Input(&'s str),
    Output { step: &'s str, path: Vec<&'s str> },
    SagaName,
    SagaNamespace,
    SagaUid,
}

fn parse<'s>(text: &'s str, location: &str) -> Result<Vec<Piece<'s>>, TemplateError> {
    let mut pieces = Vec::new();
    let mut rest = text;
    while let Some(open) = rest.find("{{") {
        if open > 0 {
            pieces.push(Piece::Text(&rest[..open]));
        }
        let inner_start = open + 2;
        let Some(close) = rest[inner_start..].find("}}").map(|at| inner_start + at) else {
            return Err(TemplateError::Unclosed { location: location.to_owned(), snippet: shorten(&rest[open..]) });
        };
        let raw = &rest[open..close + 2];
        let expr = parse_expr(rest[inner_start..close].trim()).map_err(|reason| TemplateError::Malformed {
            location: location.to_owned(),
            template: raw.to_owned(),
            reason,
        })?;
        pieces.push(Piece::Ref(Ref { raw, expr }));
        rest = &rest[close + 2..];
    }
    if !rest.is_empty() {
        pieces.push(Piece::Text(rest));
    }
    Ok(pieces)
}

const FORMS: &str = "a template is `{{ input.<key> }}`, `{{ steps.<step>.output }}` (optionally followed by \
                     `.<field>`s), `{{ saga.name }}`, `{{ saga.namespace }}` or `{{ saga.uid }}`";

fn parse_expr(expr: &str) -> Result<Expr<'_>, String> {
    if expr.is_empty() {
        return Err(format!("it is empty; {FORMS}"));
    }
    if expr.contains(char::is_whitespace) {
        return Err(format!("spaces are allowed only next to the braces, not inside `{expr}`"));
    }
    let (root, rest) = expr.split_once('.').unwrap_or((expr, ""));
    match root {
        "input" if !rest.is_empty() => Ok(Expr::Input(rest)),
        "input" => Err("`input` must be followed by `.<key>`, e.g. `{{ input.orderId }}`".to_owned()),
        "steps" => {
            let mut segments = rest.split('.');
            let step = segments.next().unwrap_or_default();
            if step.is_empty() || segments.next() != Some("output") {
                return Err(format!(
                    "`{expr}` does not name a step's output; write `steps.<step>.output`, optionally followed by \
                     `.<field>`s, e.g. `{{{{ steps.reserve.output.reservationId }}}}`"
                ));
            }
            let path: Vec<&str> = segments.collect();
            if path.iter().any(|segment| segment.is_empty()) {
                return Err(format!("`{expr}` has an empty field name; separate fields with single dots"));
            }
            Ok(Expr::Output { step, path })
        }
        "saga" => match rest {
            "name" => Ok(Expr::SagaName),
            "namespace" => Ok(Expr::SagaNamespace),
            "uid" => Ok(Expr::SagaUid),
            _ => Err(format!("`{expr}` is not known; the saga offers `saga.name`, `saga.namespace` and `saga.uid`")),
        },
        _ => Err(format!("`{expr}` is not something a template can refer to; {FORMS}")),
    }
}

/// Renders a string that is not part of `body`.
fn render_text(text: &str, field: Field, ctx: &TemplateContext<'_>, location: &str) -> Result<String, TemplateError> {
    substitute(&parse(text, location)?, field, ctx, location)
}

/// Joins `pieces`, each template replaced by its value's text, written as `field` requires.
fn substitute(
    pieces: &[Piece<'_>],
    field: Field,
    ctx: &TemplateContext<'_>,
    location: &str,
) -> Result<String, TemplateError> {
    let mut out = String::new();
    let mut literal = String::new();
    for piece in pieces {
        match piece {
            Piece::Text(text) => {
                out.push_str(text);
                if matches!(field, Field::Url(_)) {
                    literal.push_str(text);
                }
            }
            Piece::Ref(reference) => {
                let value = resolve(reference, ctx, location)?;
                let text = value_text(&value);
                match field {
                    Field::Url(start) => match url_part(&literal, start) {
                        UrlPart::Scheme | UrlPart::Authority => {
                            if let Some(bad) = text.chars().find(|c| !is_authority_char(*c)) {
                                return Err(TemplateError::UnsafeUrlValue {
                                    location: location.to_owned(),
                                    template: reference.raw.to_owned(),
                                    reason: format!(
                                        "its value `{}` contains {bad:?}, which cannot appear in the scheme, host or \
                                         port of a URL; values are percent-encoded only in the path and query",
                                        shorten(&text)
                                    ),
                                });
                            }
                            out.push_str(&text);
                        }
                        UrlPart::Path | UrlPart::Query | UrlPart::Fragment => {
                            out.extend(utf8_percent_encode(&text, URL_VALUE));
                        }
                    },
                    Field::Header => {
                        if text.chars().any(|c| !c.is_ascii() || (c.is_control() && c != '\t')) {
                            return Err(TemplateError::InvalidHeaderValue {
                                location: location.to_owned(),
                                template: reference.raw.to_owned(),
                            });
                        }
                        out.push_str(&text);
                    }
                    Field::Body => out.push_str(&text),
                }
            }
        }
    }
    Ok(out)
}

fn render_json(value: &Value, ctx: &TemplateContext<'_>, location: &str) -> Result<Value, TemplateError> {
    Ok(match value {
        Value::String(text) => {
            let pieces = parse(text, location)?;
            match pieces.as_slice() {
                [Piece::Ref(reference)] => resolve(reference, ctx, location)?.into_owned(),
                [] | [Piece::Text(_)] => value.clone(),
                _ => Value::String(substitute(&pieces, Field::Body, ctx, location)?),
            }
        }
        Value::Array(items) => Value::Array(
            items
                .iter()
                .enumerate()
                .map(|(i, item)| render_json(item, ctx, &format!("{location}[{i}]")))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(key, item)| Ok((key.clone(), render_json(item, ctx, &key_location(location, key))?)))
                .collect::<Result<_, TemplateError>>()?,
        ),
        Value::Null | Value::Bool(_) | Value::Number(_) => value.clone(),
    })
}

/// The value a template refers to.
fn resolve<'v>(
    reference: &Ref<'_>,
    ctx: &'v TemplateContext<'_>,
    location: &str,
) -> Result<Cow<'v, Value>, TemplateError> {
    let (step, path) = match &reference.expr {
        Expr::Input(key) => {
            return match ctx.input.get(*key) {
                Some(value) => Ok(Cow::Owned(value.to_json())),
                None => Err(TemplateError::UnknownInput {
                    location: location.to_owned(),
                    template: reference.raw.to_owned(),
                    key: (*key).to_owned(),
                    known: ctx.input.keys().cloned().collect(),
                }),
            };
        }
        Expr::SagaName => return Ok(Cow::Owned(Value::from(ctx.saga_name))),
        Expr::SagaNamespace => return Ok(Cow::Owned(Value::from(ctx.saga_namespace))),
        Expr::SagaUid => return Ok(Cow::Owned(Value::from(ctx.saga_uid))),
        Expr::Output { step, path } => (*step, path),
    };
    let Some(&output) = ctx.outputs.get(step) else {
        return Err(TemplateError::NoOutput {
            location: location.to_owned(),
            template: reference.raw.to_owned(),
            step: step.to_owned(),
        });
    };
    let mut current = output;
    let mut found = format!("steps.{step}.output");
    for segment in path {
        let next = match current {
            Value::Object(map) => map.get(*segment).ok_or_else(|| {
                format!("`{found}` has no field `{segment}` (its fields: {})", list(map.keys().map(String::as_str)))
            }),
            Value::Array(items) if segment.bytes().all(|b| b.is_ascii_digit()) => {
                segment.parse::<usize>().ok().and_then(|i| items.get(i)).ok_or_else(|| {
                    format!("`{found}` has no element {segment}: it is an array of {} element(s)", items.len())
                })
            }
            Value::Array(_) => Err(format!("`{found}` is an array, so `{segment}` must be an index such as `0`")),
            other => Err(format!("`{found}` is {}, so it has no field `{segment}`", kind(other))),
        };
        match next {
            Ok(value) => {
                current = value;
                found.push('.');
                found.push_str(segment);
            }
            Err(detail) => {
                return Err(TemplateError::MissingField {
                    location: location.to_owned(),
                    template: reference.raw.to_owned(),
                    found,
                    missing: (*segment).to_owned(),
                    detail,
                });
            }
        }
    }
    Ok(Cow::Borrowed(current))
}

/// A value as text: strings as they are, anything else as compact JSON.
fn value_text(value: &Value) -> Cow<'_, str> {
    match value {
        Value::String(text) => Cow::Borrowed(text),
        other => Cow::Owned(other.to_string()),
    }
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn defined_keys(known: &[String]) -> String {
    if known.is_empty() {
        "spec.input is empty".to_owned()
    } else {
        format!("defined keys: {}", list(known.iter().map(String::as_str)))
    }
}

fn list<'n>(names: impl ExactSizeIterator<Item = &'n str>) -> String {
    let total = names.len();
    if total == 0 {
        return "none".to_owned();
    }
    let mut out = names.take(MAX_LISTED_NAMES).collect::<Vec<_>>().join(", ");
    if total > MAX_LISTED_NAMES {
        out.push_str(&format!(" and {} more", total - MAX_LISTED_NAMES));
    }
    out
}

fn shorten(text: &str) -> String {
    match text.char_indices().nth(MAX_QUOTED_CHARS) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const DOMAIN: &str = "cluster.local";

    fn input() -> BTreeMap<String, InputValue> {
        [
            ("orderId", InputValue::String("o-1".into())),
            ("amount", InputValue::Int(1250)),
            ("note", InputValue::String("a b&c/d?e#f=ü%-._~".into())),
            ("host", InputValue::String("payments.internal".into())),
            ("port", InputValue::Int(8080)),
            ("evil", InputValue::String("evil.example/steal?x=".into())),
            ("multiline", InputValue::String("a\r\nInjected: yes".into())),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    fn outputs() -> BTreeMap<String, Value> {
        BTreeMap::from([
            (
                "reserve".to_owned(),
                json!({
                    "reservationId": "r-1",
                    "items": [{"sku": "A-1", "qty": 2}, {"sku": "B-2", "qty": 1}],
                    "total": 12.5,
                    "confirmed": true,
                    "meta": {"zone": "eu"},
                    "nothing": null,
                    "7": "seven",
                }),
            ),
            ("charge".to_owned(), json!({"paymentId": "p-9"})),
        ])
    }

    fn with_ctx<R>(input: &BTreeMap<String, InputValue>, f: impl FnOnce(&TemplateContext<'_>) -> R) -> R {
        let outputs = outputs();
        let ctx = TemplateContext {
            saga_name: "order-42",
            saga_namespace: "shop",
            saga_uid: "5f0c-uid",
            input,
            outputs: outputs.iter().map(|(k, v)| (k.as_str(), v)).collect(),
        };
        f(&ctx)
    }

    fn call(value: Value) -> HttpCall {
        serde_json::from_value(value).expect("a valid HttpCall")
    }

    fn try_render(value: Value) -> Result<RenderedRequest, TemplateError> {
        with_ctx(&input(), |ctx| render(&call(value), ctx, DOMAIN))
    }

    fn render_ok(value: Value) -> RenderedRequest {
        try_render(value).expect("renders")
    }

    fn render_err(value: Value) -> TemplateError {
        try_render(value).expect_err("does not render")
    }

    /// Renders `text` as a header value, where values are substituted as plain text.
    fn text(text: &str) -> String {
        let rendered = render_ok(json!({"method": "GET", "url": "http://x/", "headers": {"h": text}}));
        rendered.headers[0].1.clone()
    }

    fn body(body: Value) -> Value {
        render_ok(json!({"method": "POST", "url": "http://x/", "body": body})).body.expect("a body")
    }

    fn body_err(body: Value) -> TemplateError {
        render_err(json!({"method": "POST", "url": "http://x/", "body": body}))
    }

    fn spec(value: Value) -> SagaSpec {
        serde_json::from_value(value).expect("a valid SagaSpec")
    }

    #[test]
    fn parses_every_form() {
        assert_eq!(parse_expr("input.orderId"), Ok(Expr::Input("orderId")));
        assert_eq!(parse_expr("steps.reserve.output"), Ok(Expr::Output { step: "reserve", path: vec![] }));
        assert_eq!(
            parse_expr("steps.reserve.output.items.0.sku"),
            Ok(Expr::Output { step: "reserve", path: vec!["items", "0", "sku"] })
        );
        assert_eq!(parse_expr("saga.name"), Ok(Expr::SagaName));
        assert_eq!(parse_expr("saga.namespace"), Ok(Expr::SagaNamespace));
        assert_eq!(parse_expr("saga.uid"), Ok(Expr::SagaUid));
    }

    #[test]
    fn splits_text_and_templates() {
        let pieces = parse("/a/{{ input.x }}/b{{saga.uid}}", "url").expect("parses");
        assert_eq!(
            pieces,
            vec![
                Piece::Text("/a/"),
                Piece::Ref(Ref { raw: "{{ input.x }}", expr: Expr::Input("x") }),
                Piece::Text("/b"),
                Piece::Ref(Ref { raw: "{{saga.uid}}", expr: Expr::SagaUid }),
            ]
        );
        assert_eq!(parse("", "url").expect("parses"), vec![]);
    }

    #[test]
    fn whitespace_next_to_the_braces_is_optional() {
        for written in ["{{input.orderId}}", "{{ input.orderId }}", "{{   input.orderId\t}}", "{{\ninput.orderId\n}}"] {
            assert_eq!(text(written), "o-1", "{written:?}");
        }
    }

    #[test]
    fn substitutes_every_kind_of_reference_as_text() {
        assert_eq!(text("{{ saga.name }}/{{ saga.namespace }}/{{ saga.uid }}"), "order-42/shop/5f0c-uid");
        assert_eq!(text("order {{ input.orderId }} for {{ input.amount }}"), "order o-1 for 1250");
        assert_eq!(text("{{ steps.reserve.output.reservationId }}"), "r-1");
        assert_eq!(text("{{ steps.reserve.output.items.1.sku }}x{{ steps.reserve.output.items.1.qty }}"), "B-2x1");
        assert_eq!(text("{{ steps.reserve.output.total }} {{ steps.reserve.output.confirmed }}"), "12.5 true");
        assert_eq!(text("{{ steps.reserve.output.nothing }}"), "null");
        assert_eq!(text("{{ steps.reserve.output.meta }}"), r#"{"zone":"eu"}"#);
        assert_eq!(text("{{ steps.charge.output }}"), r#"{"paymentId":"p-9"}"#);
        assert_eq!(text("{{ steps.reserve.output.items.0 }}"), r#"{"qty":2,"sku":"A-1"}"#);
    }

    #[test]
    fn a_digit_segment_is_a_key_on_an_object() {
        assert_eq!(text("{{ steps.reserve.output.7 }}"), "seven");
    }

    #[test]
    fn braces_that_open_no_template_stay_as_they_are() {
        assert_eq!(text("a { b } c }} d {x}"), "a { b } c }} d {x}");
        // A third brace belongs to the expression, which makes it malformed rather than silently literal.
        assert!(matches!(text_err("{{{ input.orderId }}"), TemplateError::Malformed { .. }));
    }

    #[test]
    fn percent_encodes_values_in_the_path_query_and_fragment() {
        let rendered = render_ok(json!({
            "method": "GET",
            "url": "https://shop.example/orders/{{ input.note }}/x?note={{ input.note }}&n={{ input.amount }}#{{ input.note }}",
        }));
        let encoded = "a%20b%26c%2Fd%3Fe%23f%3D%C3%BC%25-._~";
        assert_eq!(rendered.url, format!("https://shop.example/orders/{encoded}/x?note={encoded}&n=1250#{encoded}"));
    }

    #[test]
    fn percent_encodes_json_values_in_a_url() {
        let rendered = render_ok(json!({"method": "GET", "url": "http://x/?meta={{ steps.reserve.output.meta }}"}));
        assert_eq!(rendered.url, "http://x/?meta=%7B%22zone%22%3A%22eu%22%7D");
    }

    #[test]
    fn a_query_right_after_the_host_is_encoded_too() {
        let rendered = render_ok(json!({"method": "GET", "url": "http://x?q={{ input.note }}"}));
        assert_eq!(rendered.url, "http://x?q=a%20b%26c%2Fd%3Fe%23f%3D%C3%BC%25-._~");
    }

    #[test]
    fn host_and_port_take_values_that_keep_the_url_intact() {
        let rendered = render_ok(json!({"method": "GET", "url": "http://{{ input.host }}:{{ input.port }}/pay"}));
        assert_eq!(rendered.url, "http://payments.internal:8080/pay");
    }

    #[test]
    fn host_refuses_a_value_that_would_change_the_url() {
        let err = render_err(json!({"method": "GET", "url": "http://{{ input.evil }}/pay"}));
        assert_eq!(
            err.to_string(),
            "url: `{{ input.evil }}` cannot be placed there: its value `evil.example/steal?x=` contains '/', which \
             cannot appear in the scheme, host or port of a URL; values are percent-encoded only in the path and query"
        );
        assert_eq!(err.location(), "url");
    }

    #[test]
    fn resolves_a_service_in_the_saga_namespace() {
        let rendered = render_ok(json!({
            "method": "DELETE",
            "service": {"name": "inventory", "port": 8080,
                        "path": "/reservations/{{ steps.reserve.output.reservationId }}?note={{ input.note }}"},
        }));
        assert_eq!(rendered.method, HttpMethod::Delete);
        assert_eq!(
            rendered.url,
            "http://inventory.shop.svc.cluster.local:8080/reservations/r-1?note=a%20b%26c%2Fd%3Fe%23f%3D%C3%BC%25-._~"
        );
    }

    #[test]
    fn resolves_a_service_in_another_namespace_with_the_default_path() {
        let rendered = render_ok(json!({
            "method": "POST",
            "service": {"name": "payments", "namespace": "billing", "port": 80},
        }));
        assert_eq!(rendered.url, "http://payments.billing.svc.cluster.local:80/");
        let rendered = with_ctx(&input(), |ctx| {
            render(&call(json!({"method": "GET", "service": {"name": "a", "port": 1}})), ctx, "corp.internal")
        })
        .expect("renders");
        assert_eq!(rendered.url, "http://a.shop.svc.corp.internal:1/");
    }

    #[test]
    fn service_path_values_are_encoded() {
        let rendered = render_ok(json!({
            "method": "GET",
            "service": {"name": "a", "port": 1, "path": "/{{ input.evil }}"},
        }));
        assert_eq!(rendered.url, "http://a.shop.svc.cluster.local:1/evil.example%2Fsteal%3Fx%3D");
    }

    #[test]
    fn renders_headers_in_name_order() {
        let rendered = render_ok(json!({
            "method": "POST",
            "url": "http://x/",
            "headers": {"X-Tenant": "{{ saga.namespace }}", "X-Amount": "{{ input.amount }}",
                        "X-Order": "order {{ input.orderId }}", "Accept": "application/json"},
        }));
        let headers: Vec<(&str, &str)> = rendered.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(
            headers,
            vec![("Accept", "application/json"), ("X-Amount", "1250"), ("X-Order", "order o-1"), ("X-Tenant", "shop")]
        );
        // Header values are not URL components: nothing is encoded.
        assert_eq!(text("{{ input.evil }}"), "evil.example/steal?x=");
    }

    #[test]
    fn refuses_a_header_value_with_a_line_break() {
        let err = render_err(json!({
            "method": "GET", "url": "http://x/", "headers": {"X-Note": "n: {{ input.multiline }}"},
        }));
        assert_eq!(
            err.to_string(),
            "headers.X-Note: `{{ input.multiline }}` gives a value with a line break, another control character or \
             a non-ASCII character, which an HTTP header cannot carry"
        );
        assert!(matches!(text_err("{{ input.note }}"), TemplateError::InvalidHeaderValue { .. }), "ü");
        assert_eq!(text("tab\t{{ input.orderId }}"), "tab\to-1");
    }

    #[test]
    fn a_body_string_that_is_one_template_keeps_the_value_type() {
        let rendered = body(json!({
            "amount": "{{ input.amount }}",
            "order": "{{input.orderId}}",
            "items": "{{ steps.reserve.output.items }}",
            "confirmed": "{{ steps.reserve.output.confirmed }}",
            "total": "{{ steps.reserve.output.total }}",
            "none": "{{ steps.reserve.output.nothing }}",
            "meta": "{{ steps.reserve.output.meta }}",
            "saga": "{{ saga.uid }}",
        }));
        assert_eq!(
            rendered,
            json!({
                "amount": 1250,
                "order": "o-1",
                "items": [{"sku": "A-1", "qty": 2}, {"sku": "B-2", "qty": 1}],
                "confirmed": true,
                "total": 12.5,
                "none": null,
                "meta": {"zone": "eu"},
                "saga": "5f0c-uid",
            })
        );
    }

    #[test]
    fn a_body_string_with_text_around_templates_stays_a_string() {
        assert_eq!(
            body(
                json!({"memo": "order {{ input.orderId }}: {{ input.amount }} cents, {{ steps.reserve.output.meta }}"})
            ),
            json!({"memo": "order o-1: 1250 cents, {\"zone\":\"eu\"}"})
        );
        // Spaces outside the braces are text, so the value becomes a string.
        assert_eq!(body(json!(" {{ input.amount }}")), json!(" 1250"));
        assert_eq!(body(json!("{{ input.amount }}{{ input.amount }}")), json!("12501250"));
        // Body text is JSON, not a URL: nothing is encoded.
        assert_eq!(body(json!("n={{ input.note }}")), json!("n=a b&c/d?e#f=ü%-._~"));
    }

    #[test]
    fn walks_nested_bodies_and_arrays_but_not_keys() {
        let rendered = body(json!({
            "lines": [
                {"sku": "{{ steps.reserve.output.items.0.sku }}", "qty": "{{ steps.reserve.output.items.0.qty }}"},
                ["{{ input.amount }}", 3, null, true, "plain"],
            ],
            "{{ input.orderId }}": "keys are not templated",
            "deep": {"deeper": {"deepest": ["{{ saga.name }}"]}},
        }));
        assert_eq!(
            rendered,
            json!({
                "lines": [{"sku": "A-1", "qty": 2}, [1250, 3, null, true, "plain"]],
                "{{ input.orderId }}": "keys are not templated",
                "deep": {"deeper": {"deepest": ["order-42"]}},
            })
        );
    }

    #[test]
    fn a_call_without_templates_is_unchanged() {
        let rendered = render_ok(json!({
            "method": "PUT",
            "url": "http://x/a?b=c",
            "headers": {"A": "b"},
            "body": {"n": 1, "s": "text", "a": [1, "2"], "o": {}},
        }));
        assert_eq!(
            rendered,
            RenderedRequest {
                method: HttpMethod::Put,
                url: "http://x/a?b=c".into(),
                headers: vec![("A".into(), "b".into())],
                body: Some(json!({"n": 1, "s": "text", "a": [1, "2"], "o": {}})),
            }
        );
        assert_eq!(render_ok(json!({"method": "GET", "url": "http://x/"})).body, None);
    }

    #[test]
    fn an_unknown_input_key_lists_the_defined_ones() {
        let err = render_err(json!({"method": "GET", "url": "http://x/{{ input.amout }}"}));
        assert_eq!(
            err.to_string(),
            "url: `{{ input.amout }}` refers to `spec.input.amout`, which is not defined (defined keys: amount, \
             evil, host, multiline, note, orderId, port)"
        );
        let empty = BTreeMap::new();
        let err = with_ctx(&empty, |ctx| {
            render(&call(json!({"method": "GET", "url": "http://x/", "body": "{{ input.a }}"})), ctx, DOMAIN)
        })
        .expect_err("no input");
        assert_eq!(
            err.to_string(),
            "body: `{{ input.a }}` refers to `spec.input.a`, which is not defined (spec.input is empty)"
        );
    }

    #[test]
    fn a_step_without_output_says_why_it_may_have_none() {
        let err = body_err(json!({"id": "{{ steps.ship.output.id }}"}));
        assert_eq!(
            err.to_string(),
            "body.id: `{{ steps.ship.output.id }}` refers to the output of step `ship`, which has none: the step has \
             not run yet, did not succeed, answered without a JSON body, or is not a step of this saga"
        );
    }

    #[test]
    fn a_missing_field_names_what_was_found() {
        let err = body_err(json!({"items": [1, 2, {"sku": "{{ steps.reserve.output.items.9.sku }}"}]}));
        assert_eq!(
            err,
            TemplateError::MissingField {
                location: "body.items[2].sku".into(),
                template: "{{ steps.reserve.output.items.9.sku }}".into(),
                found: "steps.reserve.output.items".into(),
                missing: "9".into(),
                detail: "`steps.reserve.output.items` has no element 9: it is an array of 2 element(s)".into(),
            }
        );
        assert_eq!(
            err.to_string(),
            "body.items[2].sku: `{{ steps.reserve.output.items.9.sku }}`: `steps.reserve.output.items` has no \
             element 9: it is an array of 2 element(s)"
        );

        let err = body_err(json!("{{ steps.reserve.output.reservation }}"));
        assert_eq!(
            err.to_string(),
            "body: `{{ steps.reserve.output.reservation }}`: `steps.reserve.output` has no field `reservation` (its \
             fields: 7, confirmed, items, meta, nothing, reservationId, total)"
        );

        let err = body_err(json!("{{ steps.reserve.output.items.first }}"));
        assert!(
            err.to_string()
                .ends_with("`steps.reserve.output.items` is an array, so `first` must be an index such as `0`"),
            "{err}"
        );

        let err = body_err(json!("{{ steps.reserve.output.items.1.price }}"));
        assert!(matches!(&err, TemplateError::MissingField { found, missing, .. }
            if found == "steps.reserve.output.items.1" && missing == "price"));

        let err = body_err(json!("{{ steps.reserve.output.reservationId.value }}"));
        assert!(
            err.to_string().ends_with("`steps.reserve.output.reservationId` is a string, so it has no field `value`"),
            "{err}"
        );
        let err = body_err(json!("{{ steps.reserve.output.nothing.value }}"));
        assert!(
            err.to_string().ends_with("`steps.reserve.output.nothing` is null, so it has no field `value`"),
            "{err}"
        );
    }

    #[test]
    fn malformed_templates_say_how_to_write_them() {
        let cases = [
            ("{{}}", "it is empty; a template is `{{ input.<key> }}`"),
            ("{{  }}", "it is empty;"),
            ("{{ orderId }}", "`orderId` is not something a template can refer to; a template is `{{ input.<key> }}`"),
            ("{{ inputs.orderId }}", "`inputs.orderId` is not something a template can refer to"),
            ("{{ input }}", "`input` must be followed by `.<key>`, e.g. `{{ input.orderId }}`"),
            ("{{ input. }}", "`input` must be followed by `.<key>`"),
            (
                "{{ steps.reserve }}",
                "`steps.reserve` does not name a step's output; write `steps.<step>.output`, optionally followed by \
                 `.<field>`s, e.g. `{{ steps.reserve.output.reservationId }}`",
            ),
            ("{{ steps.reserve.outputs.id }}", "`steps.reserve.outputs.id` does not name a step's output"),
            ("{{ steps..output }}", "`steps..output` does not name a step's output"),
            ("{{ steps.reserve.output. }}", "`steps.reserve.output.` has an empty field name"),
            (
                "{{ steps.reserve.output..id }}",
                "`steps.reserve.output..id` has an empty field name; separate fields with single dots",
            ),
            ("{{ saga.id }}", "`saga.id` is not known; the saga offers `saga.name`, `saga.namespace` and `saga.uid`"),
            ("{{ input. orderId }}", "spaces are allowed only next to the braces, not inside `input. orderId`"),
            ("{{ input.a | upper }}", "spaces are allowed only next to the braces"),
        ];
        for (written, reason) in cases {
            let err = body_err(json!({"odd key": written}));
            let message = err.to_string();
            let expected = format!("body[\"odd key\"]: `{written}` is not a valid template: {reason}");
            assert!(message.starts_with(&expected), "{message}\ndoes not start with\n{expected}");
            assert!(matches!(err, TemplateError::Malformed { .. }), "{err:?}");
        }
    }

    #[test]
    fn an_unclosed_template_is_an_error() {
        let err = render_err(json!({"method": "GET", "url": "http://x/{{ input.orderId }}/{{ input.amount"}));
        assert_eq!(err, TemplateError::Unclosed { location: "url".into(), snippet: "{{ input.amount".into() });
        assert_eq!(err.to_string(), "url: `{{ input.amount` opens a template with `{{` that is never closed with `}}`");
        let long = format!("{{{{ {}", "x".repeat(100));
        let err = text_err(&long);
        assert!(matches!(&err, TemplateError::Unclosed { snippet, .. } if snippet.chars().count() == 65), "{err:?}");
    }

    fn text_err(text: &str) -> TemplateError {
        render_err(json!({"method": "GET", "url": "http://x/", "headers": {"H": text}}))
    }

    #[test]
    fn errors_in_the_service_path_and_headers_are_located() {
        let err = render_err(json!({
            "method": "GET", "service": {"name": "a", "port": 1, "path": "/{{ input.nope }}"},
        }));
        assert_eq!(err.location(), "service.path");
        assert_eq!(text_err("{{ nope }}").location(), "headers.H");
        let err = render_err(json!({"method": "GET", "url": "http://x/", "headers": {"X Odd": "{{ nope }}"}}));
        assert_eq!(err.location(), "headers[\"X Odd\"]");
    }

    #[test]
    fn within_prefixes_the_location() {
        let err = body_err(json!({"a": ["{{ input.nope }}"]})).within("steps[1].compensation");
        assert_eq!(err.location(), "steps[1].compensation.body.a[0]");
        assert!(err.to_string().starts_with("steps[1].compensation.body.a[0]: `{{ input.nope }}`"), "{err}");
    }

    #[test]
    fn a_call_needs_exactly_one_target() {
        let err = render_err(json!({"method": "GET"}));
        assert_eq!(err.to_string(), "url: neither `url` nor `service` is set; set exactly one");
        let err = render_err(json!({"method": "GET", "url": "http://x/", "service": {"name": "a", "port": 1}}));
        assert_eq!(err.to_string(), "url: both `url` and `service` are set; set exactly one");
    }

    fn saga(steps: Value) -> SagaSpec {
        spec(json!({"input": {"orderId": "o-1", "amount": 1250}, "steps": steps}))
    }

    #[test]
    fn check_spec_accepts_references_to_what_exists_by_then() {
        let spec = saga(json!([
            {
                "name": "reserve",
                "action": {"method": "POST", "url": "http://inventory/{{ input.orderId }}",
                           "headers": {"X-Saga": "{{ saga.name }}/{{ saga.namespace }}/{{ saga.uid }}"},
                           "body": {"amount": "{{ input.amount }}"}},
                "compensation": {"method": "DELETE",
                                 "service": {"name": "inventory", "port": 80,
                                             "path": "/r/{{ steps.reserve.output.id }}"}},
            },
            {
                "name": "charge",
                "action": {"method": "POST", "url": "http://payments/",
                           "body": {"reservation": "{{ steps.reserve.output.items.0.whatever }}"}},
                "compensation": {"method": "POST", "url": "http://payments/refund",
                                 "body": ["{{ steps.charge.output }}", "{{ steps.reserve.output }}"]},
            },
        ]));
        assert_eq!(check_spec(&spec), Ok(()));
    }

    #[test]
    fn check_spec_finds_an_unknown_input_key() {
        let spec = saga(json!([
            {"name": "a", "action": {"method": "POST", "url": "http://a/"}},
            {"name": "b", "action": {"method": "POST", "url": "http://b/", "body": {"amount": "{{ input.amout }}"}}},
        ]));
        let err = check_spec(&spec).expect_err("unknown input");
        assert_eq!(
            err.to_string(),
            "steps[1].action.body.amount: `{{ input.amout }}` refers to `spec.input.amout`, which is not defined \
             (defined keys: amount, orderId)"
        );
    }

    #[test]
    fn check_spec_finds_an_unknown_step() {
        let spec = saga(json!([
            {"name": "reserve", "action": {"method": "POST", "url": "http://a/"}},
            {"name": "charge", "action": {"method": "POST", "url": "http://b/{{ steps.reserv.output.id }}"}},
        ]));
        assert_eq!(
            check_spec(&spec).expect_err("unknown step").to_string(),
            "steps[1].action.url: `{{ steps.reserv.output.id }}` refers to step `reserv`, which the saga does not \
             have (its steps: reserve, charge)"
        );
    }

    #[test]
    fn check_spec_refuses_a_forward_reference_from_an_action() {
        let spec = saga(json!([
            {"name": "reserve", "action": {"method": "POST", "url": "http://a/",
                                           "headers": {"X-Payment": "{{ steps.charge.output.id }}"}}},
            {"name": "charge", "action": {"method": "POST", "url": "http://b/"}},
        ]));
        let err = check_spec(&spec).expect_err("forward reference");
        assert_eq!(
            err.to_string(),
            "steps[0].action.headers.X-Payment: `{{ steps.charge.output.id }}` cannot be used here: step `charge` \
             (steps[1]) runs after this one, so its output does not exist yet; an action can use the outputs of \
             earlier steps only"
        );
    }

    #[test]
    fn check_spec_refuses_an_action_using_its_own_output() {
        let spec = saga(json!([
            {"name": "reserve", "action": {"method": "POST", "url": "http://a/", "body": "{{ steps.reserve.output }}"}},
        ]));
        let err = check_spec(&spec).expect_err("self reference");
        assert_eq!(
            err.to_string(),
            "steps[0].action.body: `{{ steps.reserve.output }}` cannot be used here: an action cannot use the output \
             of its own step `reserve`, which exists only once the action succeeded (the step's compensation can use \
             it)"
        );
    }

    #[test]
    fn check_spec_refuses_a_compensation_using_a_later_step() {
        let spec = saga(json!([
            {"name": "reserve", "action": {"method": "POST", "url": "http://a/"},
             "compensation": {"method": "POST", "url": "http://a/undo",
                              "body": {"items": [1, 2, {"sku": "{{ steps.charge.output.sku }}"}]}}},
            {"name": "charge", "action": {"method": "POST", "url": "http://b/"}},
        ]));
        let err = check_spec(&spec).expect_err("later step");
        assert_eq!(err.location(), "steps[0].compensation.body.items[2].sku");
        assert_eq!(
            err.to_string(),
            "steps[0].compensation.body.items[2].sku: `{{ steps.charge.output.sku }}` cannot be used here: step \
             `charge` (steps[1]) runs after this one, so its output does not exist yet; a compensation can use the \
             outputs of its own step and earlier ones only"
        );
    }

    #[test]
    fn check_spec_finds_malformed_templates_in_compensation_bodies() {
        let spec = saga(json!([
            {"name": "reserve", "action": {"method": "POST", "url": "http://a/"},
             "compensation": {"method": "POST", "url": "http://a/undo",
                              "body": {"items": [1, 2, {"sku": "{{ step.reserve.output.sku }}"}]}}},
        ]));
        let err = check_spec(&spec).expect_err("malformed");
        assert!(
            matches!(&err, TemplateError::Malformed { location, .. }
            if location == "steps[0].compensation.body.items[2].sku"),
            "{err:?}"
        );
        let spec = saga(json!([
            {"name": "reserve", "action": {"method": "POST", "service": {"name": "a", "port": 1, "path": "/{{ x"}}},
        ]));
        assert_eq!(
            check_spec(&spec),
            Err(TemplateError::Unclosed { location: "steps[0].action.service.path".into(), snippet: "{{ x".into() })
        );
    }

    #[test]
    fn check_spec_returns_the_first_problem_in_spec_order() {
        let spec = saga(json!([
            {"name": "a", "action": {"method": "POST", "url": "http://a/{{ input.first }}",
                                     "body": "{{ input.second }}"},
             "compensation": {"method": "POST", "url": "http://a/{{ input.third }}"}},
            {"name": "b", "action": {"method": "POST", "url": "http://b/{{ input.fourth }}"}},
        ]));
        let err = check_spec(&spec).expect_err("problems");
        assert!(
            matches!(&err, TemplateError::UnknownInput { key, location, .. }
            if key == "first" && location == "steps[0].action.url"),
            "{err:?}"
        );
    }

    #[test]
    fn check_spec_checks_targets() {
        let spec = saga(json!([
            {"name": "a", "action": {"method": "POST", "url": "http://a/"},
             "compensation": {"method": "POST"}},
        ]));
        assert_eq!(
            check_spec(&spec).expect_err("no target").to_string(),
            "steps[0].compensation.url: neither `url` nor `service` is set; set exactly one"
        );
    }

    #[test]
    fn long_lists_are_cut() {
        let names: Vec<String> = (0..20).map(|i| format!("k{i}")).collect();
        let listed = list(names.iter().map(String::as_str));
        assert!(listed.ends_with("k15 and 4 more"), "{listed}");
        assert_eq!(list(std::iter::empty()), "none");
    }
}
