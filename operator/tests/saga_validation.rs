//! The API server itself rejects every invalid Saga, with a message naming the field: one manifest per rule
//! (docs/saga-validation.md lists them), applied with `kubectl` as a user would. Valid sagas at the limits are
//! accepted, including ones built to make the CEL rules as expensive as possible, and the spec cannot change once
//! the saga has started.

#![allow(clippy::expect_used, clippy::unwrap_used)] // test code: a panic is the failure report

use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
};
use kubesaga_operator::crd::{
    MAX_BACKOFF, MAX_DEADLINE, MAX_STEPS, MAX_TEMPLATES_PER_FIELD, MAX_TEMPLATES_PER_HEADER, MAX_TIMEOUT, Saga,
};
use kubesaga_testkit::{TestNamespace, client, install_crds, kubectl_apply};
use serde_json::{Map, Value, json};

async fn setup(prefix: &str) -> TestNamespace {
    let client = client().await;
    let crds: Vec<_> = kubesaga_operator::crd::all().into_iter().map(|(_, crd)| crd).collect();
    install_crds(&client, &crds).await;
    TestNamespace::create(&client, prefix).await
}

/// A Saga object with `spec`.
fn saga(name: &str, spec: Value) -> Value {
    json!({ "apiVersion": "kubesaga.dev/v1alpha1", "kind": "Saga", "metadata": { "name": name }, "spec": spec })
}

/// A small valid spec: reserve (compensated), charge (the pivot), notify.
fn small() -> Value {
    json!({
        "input": { "orderId": "o-1", "amount": 1250 },
        "deadline": "10m",
        "steps": [
            {
                "name": "reserve",
                "action": {
                    "method": "POST",
                    "url": "http://inventory.shop/reservations/{{ input.orderId }}",
                    "headers": { "X-Tenant": "{{ saga.namespace }}" },
                    "retry": { "maxAttempts": 5, "initialBackoff": "100ms", "maxBackoff": "2s" },
                },
                "compensation": {
                    "method": "DELETE",
                    "service": { "name": "inventory", "port": 8080, "path": "/r/{{ steps.reserve.output.id }}" },
                },
            },
            { "name": "charge", "action": { "method": "POST", "url": "http://payment.shop/charges" }, "pivot": true },
            {
                "name": "notify",
                "action": { "method": "POST", "url": "http://notification.shop/{{ steps.charge.output.id }}" },
            },
        ],
    })
}

/// One step for the cost tests: an action on `url`, a compensation on a Service `path`.
fn step(i: usize, url: String, path: String) -> Value {
    json!({
        "name": format!("step-{i}"),
        "action": { "method": "POST", "url": url },
        "compensation": { "method": "DELETE", "service": { "name": "svc", "port": 80, "path": path } },
    })
}

/// A valid saga that uses every field, each at its limit where the request size allows.
fn maximal() -> Value {
    let mut steps: Vec<Value> = (0..MAX_STEPS - 1)
        .map(|i| {
            let mut step = step(
                i,
                format!("http://svc-{i}.example/{{{{ input.k0 }}}}"),
                format!("/r/{{{{steps.step-{i}.output.id}}}}"),
            );
            step["action"]["timeout"] = json!(MAX_TIMEOUT);
            step
        })
        .collect();
    let header = "{{ input.k1 }}|{{saga.name}}|{{ saga.namespace }}|{{\tsteps.step-0.output.a.0 }}";
    let headers: Map<String, Value> = (0..32).map(|i| (format!("X-H{i}"), json!(header))).collect();
    steps[1]["action"] = json!({
        "method": "PUT",
        "url": format!(
            "https://{{{{ input.host }}}}:8443/a{{b}}/{}?q={{{{ steps.step-0.output.items.0.sku }}}}",
            "{{saga.uid}}".repeat(MAX_TEMPLATES_PER_FIELD - 2)
        ),
        "headers": headers,
        "body": { "order": "{{ input.k0 }}", "checkedAtRunTime": "{{ steps.nope.output }}" },
        "timeout": "1ms",
        "retry": { "maxAttempts": 10000, "initialBackoff": MAX_BACKOFF, "maxBackoff": MAX_BACKOFF, "multiplier": 10, "jitter": 1 },
    });
    steps[1]["compensation"]["headers"] = json!({ "Authorization": format!("Bearer {}", "t".repeat(4089)) });
    steps.push(json!({
        "name": "ship",
        "action": { "method": "POST", "url": "http://ship/{{ steps.step-62.output }}" },
        "pivot": true,
    }));
    let mut input: Map<String, Value> = (0..31).map(|i| (format!("k{i}"), json!("v".repeat(1024)))).collect();
    input.insert("host".into(), json!("shop.example"));
    json!({
        "steps": steps,
        "input": input,
        "deadline": MAX_DEADLINE,
        "defaults": {
            "action": { "timeout": "30s", "retry": { "maxAttempts": 1, "initialBackoff": "0s", "maxBackoff": "0s" } },
            "compensation": { "timeout": MAX_TIMEOUT, "retry": { "initialBackoff": "100ms" } },
        },
        "ttlSecondsAfterFinished": { "succeeded": 0, "compensated": 60, "failed": 86400 },
    })
}

/// Changes a spec.
type Change = Box<dyn FnOnce(&mut Value)>;

/// Sets `value` at `path` (object keys, or indexes into arrays) in the spec.
fn set(path: &str, value: Value) -> Change {
    let path = path.to_owned();
    Box::new(move |spec| {
        let target = path.split('.').fold(spec, |node, key| match key.parse::<usize>() {
            Ok(index) => &mut node[index],
            Err(_) => &mut node[key],
        });
        *target = value;
    })
}

/// Every rule, broken once: what is wrong, the change to `small()`, the field the API server must name, and a part
/// of its message.
fn invalid_cases() -> Vec<(&'static str, Change, &'static str, &'static str)> {
    let compensation = json!({ "method": "POST", "url": "http://x" });
    vec![
        // Steps.
        ("no steps", set("steps", json!([])), "spec.steps", "should have at least 1 items"),
        (
            "65 steps",
            set("steps", Value::Array((0..65).map(|i| step(i, "http://x".into(), "/".into())).collect())),
            "spec.steps",
            "must have at most 64 items",
        ),
        (
            "duplicate step names",
            set("steps.2.name", json!("reserve")),
            "spec.steps",
            r#"step names must be unique: "reserve" is used by more than one step"#,
        ),
        // Durations: the pattern everywhere, then the caps.
        (
            "a malformed timeout",
            set("steps.0.action.timeout", json!("5 sec")),
            "spec.steps[0].action.timeout",
            "should match",
        ),
        (
            "a malformed initial backoff",
            set("steps.0.action.retry.initialBackoff", json!("1d")),
            "spec.steps[0].action.retry.initialBackoff",
            "should match",
        ),
        (
            "a malformed max backoff",
            set("defaults", json!({ "compensation": { "retry": { "maxBackoff": "-1s" } } })),
            "spec.defaults.compensation.retry.maxBackoff",
            "should match",
        ),
        ("a malformed deadline", set("deadline", json!("1 hour")), "spec.deadline", "should match"),
        (
            "an initial backoff greater than the max backoff",
            set("steps.0.action.retry.initialBackoff", json!("3s")),
            "spec.steps[0].action.retry.initialBackoff",
            "must not be greater than maxBackoff",
        ),
        (
            "a timeout over an hour",
            set("steps.2.action.timeout", json!("61m")),
            "spec.steps[2].action.timeout",
            "must be longer than 0s and at most 1h",
        ),
        (
            "a zero timeout",
            set("steps.1.action.timeout", json!("0s")),
            "spec.steps[1].action.timeout",
            "longer than 0s",
        ),
        (
            "a backoff over an hour",
            set("steps.0.action.retry.maxBackoff", json!("2h")),
            "spec.steps[0].action.retry.maxBackoff",
            "must be at most 1h",
        ),
        ("a deadline over 30 days", set("deadline", json!("720h1s")), "spec.deadline", "at most 720h"),
        // Retry numbers.
        (
            "zero attempts",
            set("steps.0.action.retry.maxAttempts", json!(0)),
            "spec.steps[0].action.retry.maxAttempts",
            "greater than or equal to 1",
        ),
        (
            "too many attempts",
            set("steps.0.action.retry.maxAttempts", json!(10001)),
            "spec.steps[0].action.retry.maxAttempts",
            "less than or equal to 10000",
        ),
        (
            "a multiplier below 1",
            set("steps.0.action.retry.multiplier", json!(0.5)),
            "spec.steps[0].action.retry.multiplier",
            "greater than or equal to 1",
        ),
        (
            "a negative jitter",
            set("steps.0.action.retry.jitter", json!(-0.1)),
            "spec.steps[0].action.retry.jitter",
            "greater than or equal to 0",
        ),
        (
            "a jitter above 1",
            set("steps.0.action.retry.jitter", json!(1.5)),
            "spec.steps[0].action.retry.jitter",
            "less than or equal to 1",
        ),
        // Targets.
        (
            "url and service",
            set("steps.1.action.service", json!({ "name": "payment", "port": 80 })),
            "spec.steps[1].action",
            "url and service are mutually exclusive",
        ),
        (
            "a compensation with neither url nor service",
            set("steps.0.compensation", json!({ "method": "DELETE" })),
            "spec.steps[0].compensation",
            "one of url and service is required",
        ),
        // The pivot.
        (
            "two pivots",
            set("steps.2.pivot", json!(true)),
            "spec.steps",
            r#"at most one step may be the pivot, but "charge" and "notify" both are"#,
        ),
        (
            "a compensation on the pivot",
            set("steps.1.compensation", compensation.clone()),
            "spec.steps[1].compensation",
            r#"is not allowed: step "charge" is the pivot "charge" or comes after it"#,
        ),
        (
            "a compensation after the pivot",
            set("steps.2.compensation", compensation),
            "spec.steps[2].compensation",
            "steps from the pivot on are never compensated",
        ),
        // Input.
        (
            "an input key that is not an identifier",
            set("input.order-id", json!("x")),
            "spec.input",
            r#"input key "order-id" is not an identifier"#,
        ),
        (
            "an input key of 64 characters",
            set(&format!("input.{}", "k".repeat(64)), json!(1)),
            "spec.input",
            "at most 63",
        ),
        (
            "a string input of 1025 characters",
            set("input.note", json!("n".repeat(1025))),
            "spec.input.note",
            "Too long",
        ),
        (
            "33 input keys",
            set("input", Value::Object((0..33).map(|i| (format!("k{i}"), json!(i))).collect())),
            "spec.input",
            "must have at most 32 items",
        ),
        // Headers.
        (
            "a header name that is not a token",
            set("steps.0.action.headers.X Tenant", json!("a")),
            "spec.steps[0].action.headers",
            r#"header name "X Tenant" is not an HTTP token"#,
        ),
        (
            "a reserved header",
            set("steps.0.compensation.headers", json!({ "idempotency-KEY": "k" })),
            "spec.steps[0].compensation.headers",
            r#"header "idempotency-KEY" is set by the operator"#,
        ),
        (
            "reserved X-Saga-Id",
            set("steps.2.action.headers", json!({ "X-SAGA-ID": "s" })),
            "spec.steps[2].action.headers",
            "is set by the operator",
        ),
        (
            "reserved X-Saga-Step",
            set("steps.2.action.headers", json!({ "x-saga-step": "s" })),
            "spec.steps[2].action.headers",
            "is set by the operator",
        ),
        (
            "reserved traceparent",
            set("steps.2.action.headers", json!({ "Traceparent": "00-0-0-00" })),
            "spec.steps[2].action.headers",
            "is set by the operator",
        ),
        (
            "33 headers",
            set("steps.2.action.headers", Value::Object((0..33).map(|i| (format!("X-{i}"), json!("v"))).collect())),
            "spec.steps[2].action.headers",
            "must have at most 32 items",
        ),
        (
            "a header value of 4097 characters",
            set("steps.2.action.headers", json!({ "X-Big": "b".repeat(4097) })),
            "spec.steps[2].action.headers.X-Big",
            "Too long",
        ),
        // Templates.
        (
            "an unknown template form in a url",
            set("steps.2.action.url", json!("http://x/{{ saga.id }}")),
            "spec.steps[2].action.url",
            "every {{ ... }} must be one of",
        ),
        (
            "an unclosed template in a service path",
            set("steps.0.compensation.service.path", json!("/r/{{ steps.reserve.output.id")),
            "spec.steps[0].compensation.service.path",
            "every {{ ... }} must be one of",
        ),
        (
            "a malformed template in a header",
            set("steps.0.action.headers.X-Tenant", json!("{{ saga.namespace }}/{{ inputs.orderId }}")),
            "spec.steps[0].action.headers",
            r#"header "X-Tenant": at most 4 templates of at most 128 characters, and every {{ ... }} must be one of"#,
        ),
        (
            "too many templates in a header",
            set("steps.0.action.headers.X-Tenant", json!("{{saga.uid}}".repeat(MAX_TEMPLATES_PER_HEADER + 1))),
            "spec.steps[0].action.headers",
            "at most 4 templates",
        ),
        (
            "too many templates in a url",
            set(
                "steps.2.action.url",
                json!(format!("http://x/{}", "{{saga.uid}}".repeat(MAX_TEMPLATES_PER_FIELD + 1))),
            ),
            "spec.steps[2].action.url",
            "may hold at most 16 templates",
        ),
        (
            "an unknown input key in a url",
            set("steps.0.action.url", json!("http://x/{{ input.orderID }}")),
            "spec.steps[0].action.url",
            "a template refers to an input key that is not in spec.input",
        ),
        (
            "an unknown input key in a service path",
            set("steps.0.compensation.service.path", json!("/{{input.nope}}")),
            "spec.steps[0].compensation.service.path",
            "a template refers to an input key that is not in spec.input",
        ),
        (
            "an action using a later step",
            set("steps.0.action.url", json!("http://x/{{ steps.notify.output.id }}")),
            "spec.steps[0].action.url",
            "a template refers to a step that does not come before this one",
        ),
        (
            "an action using its own step",
            set("steps.1.action.url", json!("http://x/{{ steps.charge.output.id }}")),
            "spec.steps[1].action.url",
            "a template refers to a step that does not come before this one",
        ),
        (
            "an unknown step",
            set("steps.2.action.url", json!("http://x/{{ steps.refund.output }}")),
            "spec.steps[2].action.url",
            "a template refers to a step that does not come before this one",
        ),
        (
            "a compensation using a later step",
            set("steps.0.compensation.service.path", json!("/{{ steps.charge.output.id }}")),
            "spec.steps[0].compensation.service.path",
            "(a compensation may also use the output of its own step)",
        ),
    ]
}

#[tokio::test]
async fn the_api_server_rejects_every_invalid_saga_and_names_the_field() {
    let ns = setup("saga-invalid").await;
    for (i, (what, change, field, message)) in invalid_cases().into_iter().enumerate() {
        let mut spec = small();
        change(&mut spec);
        let manifest = saga(&format!("invalid-{i}"), spec).to_string();
        let (ok, stderr) = kubectl_apply(&ns.name, &manifest);
        assert!(!ok, "the API server accepted a saga with {what}");
        assert!(stderr.contains(field), "the rejection of {what} should name {field}, got: {stderr}");
        assert!(stderr.contains(message), "the rejection of {what} should say {message:?}, got: {stderr}");
    }
    ns.delete().await;
}

#[tokio::test]
async fn valid_sagas_at_the_limits_are_accepted() {
    let ns = setup("saga-valid").await;
    for (name, spec) in [("small", small()), ("maximal", maximal())] {
        let (ok, stderr) = kubectl_apply(&ns.name, &saga(name, spec.clone()).to_string());
        assert!(ok, "kubectl apply of the {name} saga failed: {stderr}");
        let stored = ns.api::<Saga>().get(name).await.expect("get saga");
        assert_eq!(stored.spec.steps.len(), spec["steps"].as_array().map_or(0, Vec::len), "{name}");
    }
    ns.delete().await;
}

/// Sagas built to make the CEL rules as expensive as the schema allows still fit the API server's runtime cost
/// budget, so no valid saga is refused for cost.
#[tokio::test]
async fn valid_sagas_that_maximise_the_rules_cost_are_accepted() {
    let ns = setup("saga-costly").await;
    let api: Api<Saga> = ns.api();

    // Every url and Service path holds the most templates, all of them references that the rules resolve.
    let input: Map<String, Value> = (0..32).map(|i| (format!("k{i}"), json!(i))).collect();
    let references = |i: usize, from: usize| -> String {
        (0..MAX_TEMPLATES_PER_FIELD)
            .map(|t| {
                if t % 2 == 0 {
                    format!("{{{{ steps.step-{from}.output.x }}}}")
                } else {
                    format!("{{{{ input.k{t} }}}}")
                }
            })
            .collect::<String>()
            + &format!("/{i}")
    };
    let header = "{{saga.uid}}{{ input.k1 }}{{saga.name}}{{ saga.namespace }}";
    let headers: Map<String, Value> = (0..32).map(|i| (format!("X-H{i}"), json!(header))).collect();
    let steps: Vec<Value> = (0..MAX_STEPS)
        .map(|i| {
            let mut step =
                step(i, format!("http://x/{}", references(i, i.saturating_sub(1))), format!("/{}", references(i, i)));
            if i == 0 {
                step["action"]["url"] = json!("http://x/{{ input.k0 }}");
            }
            step["action"]["headers"] = json!(headers);
            step["compensation"]["headers"] = json!(headers);
            step
        })
        .collect();
    let many_templates: Saga =
        serde_json::from_value(saga("many-templates", json!({ "steps": steps, "input": input }))).expect("saga");
    api.create(&PostParams::default(), &many_templates).await.expect("a saga with every template slot used");

    // Close to the API server's request size limit (3 MiB), in long header values with templates. A dry run: the
    // API server validates it in full, but etcd would not store an object this large.
    let long = format!("{}{}", "x".repeat(3990), "{{ input.k1 }}{{saga.name}}{{saga.uid}}{{saga.namespace}}");
    let long_headers: Map<String, Value> = (0..32).map(|i| (format!("X-H{i}"), json!(long))).collect();
    let steps: Vec<Value> = (0..MAX_STEPS)
        .map(|i| {
            let mut step = step(i, format!("http://x/{}", "a".repeat(2000)), "/".into());
            if i < 11 {
                step["action"]["headers"] = json!(long_headers);
                step["compensation"]["headers"] = json!(long_headers);
            }
            step
        })
        .collect();
    let input: Map<String, Value> = [("k1".to_owned(), json!(1))].into_iter().collect();
    let large: Saga = serde_json::from_value(saga("large", json!({ "steps": steps, "input": input }))).expect("saga");
    let dry_run = PostParams { dry_run: true, ..PostParams::default() };
    api.create(&dry_run, &large).await.expect("a saga close to the request size limit");
    ns.delete().await;
}

#[tokio::test]
async fn the_spec_is_immutable_once_the_saga_has_started() {
    let ns = setup("saga-immutable").await;
    let api: Api<Saga> = ns.api();
    let created: Saga = serde_json::from_value(saga("order", small())).expect("saga");
    api.create(&PostParams::default(), &created).await.expect("create");

    // Before the operator started it, the spec may change.
    let deadline = |d: &str| json!({ "spec": { "deadline": d } });
    api.patch("order", &PatchParams::default(), &Patch::Merge(deadline("20m"))).await.expect("change before start");

    // The operator records the start through the status subresource.
    let started = json!({ "status": { "phase": "Running", "startedAt": "2026-01-02T03:04:05.000000Z" } });
    api.patch_status("order", &PatchParams::default(), &Patch::Merge(&started)).await.expect("write status");

    match api.patch("order", &PatchParams::default(), &Patch::Merge(deadline("30m"))).await {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 422, "{status:?}");
            assert!(
                status
                    .message
                    .contains("spec: Forbidden: spec is immutable once the saga has started; create a new Saga"),
                "{}",
                status.message
            );
        }
        other => panic!("changing the spec of a started saga must be refused, got {other:?}"),
    }
    let mut changed = small();
    changed["deadline"] = json!("20m");
    changed["steps"][2]["action"]["url"] = json!("http://notification.shop/v2");
    let (ok, stderr) = kubectl_apply(&ns.name, &saga("order", changed).to_string());
    assert!(!ok, "kubectl apply changed the spec of a started saga");
    assert!(stderr.contains("spec: Forbidden: spec is immutable once the saga has started"), "{stderr}");

    // Metadata and status stay writable, and the same spec may be applied again.
    let label = json!({ "metadata": { "labels": { "team": "shop" } } });
    api.patch("order", &PatchParams::default(), &Patch::Merge(&label)).await.expect("label a started saga");
    let finished = json!({ "status": { "phase": "Succeeded" } });
    api.patch_status("order", &PatchParams::default(), &Patch::Merge(&finished)).await.expect("finish");
    let mut same = small();
    same["deadline"] = json!("20m");
    let (ok, stderr) = kubectl_apply(&ns.name, &saga("order", same).to_string());
    assert!(ok, "re-applying the unchanged spec failed: {stderr}");
    let stored = api.get("order").await.expect("get");
    assert_eq!(stored.spec.deadline.map(|d| d.to_string()).as_deref(), Some("20m"));
    ns.delete().await;
}
