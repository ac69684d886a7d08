//! The order service's RBAC (examples/order-rbac.yaml) on the real API server: enough to start sagas, no more.

#![allow(clippy::expect_used, clippy::unwrap_used)] // test code: a panic is the failure report

use std::path::Path;

use kubesaga_testkit::{TestNamespace, client, install_crds, kubectl, kubectl_apply};

#[tokio::test]
async fn the_order_service_account_may_create_and_read_sagas_in_its_namespace_only() {
    let kube = client().await;
    let crds: Vec<_> = kubesaga_operator::crd::all().into_iter().map(|(_, crd)| crd).collect();
    install_crds(&kube, &crds).await;
    let ns = TestNamespace::create(&kube, "order-rbac").await;
    let manifest =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/order-rbac.yaml"))
            .expect("read the RBAC example")
            .replace("namespace: shop", &format!("namespace: {}", ns.name));
    let (ok, stderr) = kubectl_apply(&ns.name, &manifest);
    assert!(ok, "{stderr}");

    let service_account = format!("system:serviceaccount:{}:kubesaga-order", ns.name);
    let can = |verb: &str, resource: &str, namespace: &str| {
        let out = kubectl()
            .args(["auth", "can-i", verb, resource, "--namespace", namespace, "--as", &service_account])
            .output()
            .expect("kubectl auth can-i");
        String::from_utf8_lossy(&out.stdout).trim() == "yes"
    };
    assert!(can("create", "sagas.kubesaga.dev", &ns.name));
    assert!(can("get", "sagas.kubesaga.dev", &ns.name));
    for verb in ["delete", "update", "patch"] {
        assert!(!can(verb, "sagas.kubesaga.dev", &ns.name), "{verb} must not be allowed");
    }
    assert!(!can("patch", "sagas.kubesaga.dev/status", &ns.name), "only the operator writes status");
    assert!(!can("create", "sagas.kubesaga.dev", "default"), "other namespaces are out of reach");
    assert!(!can("get", "secrets", &ns.name));
    ns.delete().await;
}
