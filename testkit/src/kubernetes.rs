//! The real API server: clients, CRDs and per-test namespaces.

use std::{
    io::Write,
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use k8s_openapi::{
    api::core::v1::Namespace, apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api, Client, ResourceExt,
    api::{ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams},
    runtime::{conditions, wait::await_condition},
};

use crate::required_env;

/// A client for the API server named by `KUBECONFIG`.
pub async fn client() -> Client {
    required_env("KUBECONFIG");
    Client::try_default().await.expect("a kube client from KUBECONFIG")
}

/// The `kubectl` built for this control plane (`KUBECTL`), so tests exercise what users run.
pub fn kubectl() -> Command {
    let mut cmd = Command::new(PathBuf::from(required_env("KUBECTL")));
    cmd.env("KUBECONFIG", required_env("KUBECONFIG"));
    cmd
}

/// Runs `kubectl apply -f -` in `namespace` with `manifest` on stdin; returns whether it succeeded, and its stderr.
pub fn kubectl_apply(namespace: &str, manifest: &str) -> (bool, String) {
    let mut child = kubectl()
        .args(["apply", "--namespace", namespace, "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run kubectl");
    child.stdin.take().expect("stdin").write_all(manifest.as_bytes()).expect("write manifest");
    let out = child.wait_with_output().expect("wait for kubectl");
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Installs (or updates) CRDs by server-side apply and waits until the API server serves them.
pub async fn install_crds(client: &Client, crds: &[CustomResourceDefinition]) {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let params = PatchParams::apply("kubesaga-tests").force();
    for crd in crds {
        let name = crd.name_any();
        api.patch(&name, &params, &Patch::Apply(crd)).await.expect("apply CRD");
        tokio::time::timeout(
            Duration::from_secs(30),
            await_condition(api.clone(), &name, conditions::is_crd_established()),
        )
        .await
        .unwrap_or_else(|_| panic!("CRD {name} not established within 30s"))
        .expect("watch CRD");
    }
}

/// Waits up to `timeout` until the object named `name` satisfies `condition`; on timeout the test fails showing
/// the object as it was last seen.
pub async fn wait_for<K>(api: &Api<K>, name: &str, timeout: Duration, condition: impl Fn(&K) -> bool) -> K
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + serde::Serialize + Send + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let cond = |object: Option<&K>| object.is_some_and(&condition);
    match tokio::time::timeout(timeout, await_condition(api.clone(), name, cond)).await {
        Ok(Ok(Some(object))) => object,
        Ok(Ok(None)) => panic!("{name} is gone"),
        Ok(Err(err)) => panic!("watching {name} failed: {err}"),
        Err(_) => {
            let last = api.get_opt(name).await.ok().flatten();
            let shown = last.map(|o| pretty_json(&o)).unwrap_or_else(|| "<gone>".into());
            panic!("{name} did not reach the expected state within {timeout:?}; last seen:\n{shown}")
        }
    }
}

fn pretty_json<K: serde::Serialize>(object: &K) -> String {
    serde_json::to_string_pretty(object).unwrap_or_default()
}

/// A namespace for one test. [`TestNamespace::delete`] removes it when the test passed; a failing test never
/// reaches that call, so its objects stay for inspection. `KUBESAGA_KEEP_NAMESPACES=1` keeps every one.
pub struct TestNamespace {
    /// The namespace's name.
    pub name: String,
    client: Client,
}

impl TestNamespace {
    /// Creates `<prefix>-<random>`.
    pub async fn create(client: &Client, prefix: &str) -> Self {
        let name = format!("{prefix}-{}", crate::unique_suffix());
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": { "name": name, "labels": { "kubesaga.dev/test": "true" } }
        }))
        .expect("namespace object");
        Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &ns).await.expect("create test namespace");
        Self { name, client: client.clone() }
    }

    /// An API of namespaced objects in this namespace.
    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.name)
    }

    /// Deletes the namespace, unless `KUBESAGA_KEEP_NAMESPACES` asks to keep it.
    pub async fn delete(self) {
        if std::env::var_os("KUBESAGA_KEEP_NAMESPACES").is_some() {
            eprintln!("keeping namespace {}", self.name);
            return;
        }
        Api::<Namespace>::all(self.client.clone())
            .delete(&self.name, &DeleteParams::background())
            .await
            .expect("delete test namespace");
        self.release_sagas().await;
    }

    /// Removes the operator's finalizer from the namespace's sagas. The test's operator is gone by now or about to
    /// be, and a saga keeping its finalizer would keep the namespace Terminating for good, piling up work for the
    /// API server across runs.
    async fn release_sagas(&self) {
        let gvk = GroupVersionKind::gvk("kubesaga.dev", "v1alpha1", "Saga");
        let sagas: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), &self.name, &ApiResource::from_gvk_with_plural(&gvk, "sagas"));
        let Ok(list) = sagas.list(&ListParams::default()).await else { return };
        let patch = Patch::Merge(serde_json::json!({"metadata": {"finalizers": null}}));
        for saga in list.items.iter().filter(|s| !s.finalizers().is_empty()) {
            let _ = sagas.patch(&saga.name_any(), &PatchParams::default(), &patch).await;
        }
    }
}
