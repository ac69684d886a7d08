//! The generated CRDs on a real API server: they install, `kubectl apply` of an example works, and the API
//! server itself rejects a manifest that breaks the schema, naming the field.

use std::path::Path;

use kube::api::PostParams;
use kubesaga_operator::crd::{HttpMethod, Saga};
use kubesaga_testkit::{TestNamespace, client, install_crds, kubectl_apply};

async fn setup(prefix: &str) -> TestNamespace {
    let client = client().await;
    let crds: Vec<_> = kubesaga_operator::crd::all().into_iter().map(|(_, crd)| crd).collect();
    install_crds(&client, &crds).await;
    TestNamespace::create(&client, prefix).await
}

#[tokio::test]
async fn example_saga_applies_with_kubectl_and_reads_back_through_kube_rs() {
    let ns = setup("crd-example").await;
    let example = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/saga-hello.yaml"))
        .expect("read example");

    let (ok, stderr) = kubectl_apply(&ns.name, &example);
    assert!(ok, "kubectl apply of examples/saga-hello.yaml failed: {stderr}");

    let saga = ns.api::<Saga>().get("hello").await.expect("get saga");
    let names: Vec<_> = saga.spec.steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["reserve", "notify"]);
    assert_eq!(saga.spec.steps[0].action.method, HttpMethod::Post);
    assert!(saga.spec.steps[0].compensation.is_some());
    assert!(saga.spec.steps[1].compensation.is_none());
    ns.delete().await;
}

#[tokio::test]
async fn every_kubesaga_example_is_accepted_by_the_api_server() {
    let ns = setup("crd-examples").await;
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut checked = Vec::new();
    for entry in std::fs::read_dir(&examples).expect("examples/") {
        let path = entry.expect("entry").path();
        let manifest = std::fs::read_to_string(&path).expect("read example");
        if !manifest.contains("apiVersion: kubesaga.dev/") {
            continue;
        }
        let (ok, stderr) = kubectl_apply(&ns.name, &manifest);
        assert!(ok, "kubectl apply of {} failed: {stderr}", path.display());
        checked.push(path.file_name().unwrap().to_string_lossy().into_owned());
    }
    checked.sort();
    assert_eq!(checked, ["outbox-relay.yaml", "saga-hello.yaml", "saga-in-cluster.yaml"]);
    ns.delete().await;
}

#[tokio::test]
async fn api_server_rejects_a_saga_that_breaks_the_schema_and_names_the_field() {
    let ns = setup("crd-invalid").await;
    let cases = [
        (
            "an upper-case step name",
            r#"{"name":"Reserve","action":{"method":"POST","url":"http://x"}}"#,
            "spec.steps[0].name",
        ),
        (
            "an unknown method",
            r#"{"name":"reserve","action":{"method":"FETCH","url":"http://x"}}"#,
            "spec.steps[0].action.method",
        ),
        (
            "a URL without scheme",
            r#"{"name":"reserve","action":{"method":"POST","url":"x"}}"#,
            "spec.steps[0].action.url",
        ),
        ("a step without action", r#"{"name":"reserve"}"#, "spec.steps[0].action"),
    ];
    for (what, step, field) in cases {
        let manifest = format!(
            r#"{{"apiVersion":"kubesaga.dev/v1alpha1","kind":"Saga","metadata":{{"name":"bad"}},"spec":{{"steps":[{step}]}}}}"#
        );
        let (ok, stderr) = kubectl_apply(&ns.name, &manifest);
        assert!(!ok, "the API server accepted a saga with {what}");
        assert!(stderr.contains(field), "rejection of {what} should name {field}, got: {stderr}");
    }

    // The same rule holds for typed clients: an empty step list is refused with a 422 naming spec.steps.
    let empty: Saga = serde_json::from_value(serde_json::json!({
        "apiVersion": "kubesaga.dev/v1alpha1", "kind": "Saga",
        "metadata": { "name": "empty" }, "spec": { "steps": [] }
    }))
    .expect("saga object");
    match ns.api::<Saga>().create(&PostParams::default(), &empty).await {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 422, "{status:?}");
            assert!(status.message.contains("spec.steps"), "{}", status.message);
        }
        other => panic!("an empty step list must be rejected with 422, got {other:?}"),
    }
    ns.delete().await;
}
