//! What the Saga end-to-end tests share: a namespace with its own operator process and step target.

#![allow(dead_code, clippy::expect_used, clippy::unwrap_used)]

use std::time::Duration;

use kube::{Api, api::PostParams};
use kubesaga_operator::crd::{Saga, SagaPhase};
use kubesaga_testkit::{OperatorProcess, StepTarget, TestNamespace, client, install_crds, wait_for};
use serde_json::{Value, json};

/// Time a saga in these tests may take to finish; generous because the machine may be busy.
pub const FINISH_WITHIN: Duration = Duration::from_secs(60);

/// One test's world: a namespace, a step target, and an operator process watching that namespace.
pub struct World {
    pub ns: TestNamespace,
    pub api: Api<Saga>,
    pub target: StepTarget,
    pub operator: OperatorProcess,
}

impl World {
    pub async fn new(prefix: &str) -> Self {
        Self::with_operator_env(prefix, &[]).await
    }

    pub async fn with_operator_env(prefix: &str, env: &[(&str, &str)]) -> Self {
        let client = client().await;
        let crds: Vec<_> = kubesaga_operator::crd::all().into_iter().map(|(_, crd)| crd).collect();
        install_crds(&client, &crds).await;
        let ns = TestNamespace::create(&client, prefix).await;
        let target = StepTarget::start().await;
        let operator = OperatorProcess::start_with_env(operator_binary(), &ns.name, &[], env);
        Self { api: ns.api(), ns, target, operator }
    }

    /// Creates a saga from its JSON spec.
    pub async fn create(&self, name: &str, spec: Value) -> Saga {
        let saga: Saga = serde_json::from_value(json!({
            "apiVersion": "kubesaga.dev/v1alpha1", "kind": "Saga",
            "metadata": { "name": name }, "spec": spec,
        }))
        .expect("saga object");
        self.api.create(&PostParams::default(), &saga).await.expect("create saga")
    }

    /// Waits until the saga reaches a terminal phase and returns it.
    pub async fn finished(&self, name: &str) -> Saga {
        wait_for(&self.api, name, FINISH_WITHIN, |s: &Saga| {
            s.status.as_ref().and_then(|st| st.phase).is_some_and(SagaPhase::is_terminal)
        })
        .await
    }

    /// A step calling `POST /<saga>/<step>` with an optional compensation `POST /<saga>/<step>/undo`.
    pub fn step(&self, saga: &str, name: &str, compensate: bool) -> Value {
        let mut step = json!({
            "name": name,
            "action": { "method": "POST", "url": self.target.url(&format!("/{saga}/{name}")) },
        });
        if compensate {
            step["compensation"] = json!({ "method": "POST", "url": self.target.url(&format!("/{saga}/{name}/undo")) });
        }
        step
    }

    /// Paths the target received for `saga`, in arrival order, without the `/<saga>` prefix.
    pub fn calls(&self, saga: &str) -> Vec<String> {
        let prefix = format!("/{saga}/");
        self.target.requests().into_iter().filter_map(|r| r.path.strip_prefix(&prefix).map(str::to_owned)).collect()
    }

    /// Fails unless every idempotency key of `saga` executed exactly once at the target.
    pub fn assert_each_effect_once(&self, uid: &str) {
        let keys: Vec<_> = self.target.keys_executed().into_iter().filter(|k| k.starts_with(uid)).collect();
        for key in &keys {
            assert_eq!(self.target.executions(key), 1, "effect of {key} happened more than once");
        }
    }

    /// Reads the operator's log (for assertion messages).
    pub fn log(&self) -> String {
        self.operator.log()
    }

    pub async fn done(self) {
        self.ns.delete().await;
    }
}

pub fn operator_binary() -> &'static str {
    env!("CARGO_BIN_EXE_kubesaga-operator")
}

pub fn phase(saga: &Saga) -> Option<SagaPhase> {
    saga.status.as_ref().and_then(|s| s.phase)
}

pub fn uid(saga: &Saga) -> String {
    saga.metadata.uid.clone().expect("uid")
}
