//! Running the operator: start-up checks, the health and metrics endpoints, leader election, the Saga controller
//! and the OutboxRelay workers.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use axum::{Router, http::StatusCode, routing::get};
use futures::StreamExt as _;
use kube::{
    Api, Client,
    api::ListParams,
    runtime::{
        Controller,
        controller::Config as ControllerConfig,
        events::{Recorder, Reporter},
        reflector::Store,
        watcher,
    },
};
use kube_lease_manager::LeaseManagerBuilder;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    crd::{OutboxRelay, Saga, SagaPhase},
    error::Error,
    metrics,
    relay::{supervisor, worker::Shared},
    saga::{
        limits::{LimitsConfig, Targets},
        reconcile::{self, Context},
    },
};

/// How the operator runs.
#[derive(Clone, Debug)]
pub struct Config {
    /// Watch only this namespace; all namespaces when unset.
    pub namespace: Option<String>,
    /// DNS domain of the cluster, for calls addressed to a Service.
    pub cluster_domain: String,
    /// Sagas reconciled at once.
    pub concurrency: u16,
    /// Address of `/metrics`, `/healthz` and `/readyz`.
    pub listen: SocketAddr,
    /// Take part in leader election, so that only one replica drives sagas.
    pub leader_election: Option<LeaderElection>,
    /// Publish Normal events for every transition, not only Warnings.
    pub normal_events: bool,
    /// Per-target limits.
    pub limits: LimitsConfig,
}

/// Where the leader Lease lives and who this replica is.
#[derive(Clone, Debug)]
pub struct LeaderElection {
    /// Namespace of the Lease.
    pub namespace: String,
    /// Name of the Lease.
    pub lease_name: String,
    /// This replica's identity in the Lease.
    pub identity: String,
    /// Seconds a Lease is valid without renewal.
    pub lease_seconds: u64,
}

/// Runs until SIGINT/SIGTERM (Ok) or until leadership is lost or start-up fails (Err).
pub async fn run(config: Config) -> Result<(), Error> {
    let prometheus = PrometheusBuilder::new()
        .install_recorder()
        .map_err(|e| Error::Startup(format!("cannot install the Prometheus recorder: {e}")))?;
    let client = Client::try_default().await.map_err(|e| {
        Error::Startup(format!(
            "cannot reach the Kubernetes API: {e}; set KUBECONFIG, or run inside a cluster with a service account"
        ))
    })?;
    check_crd_installed(&client, config.namespace.as_deref()).await?;

    let ready = Arc::new(AtomicBool::new(false));
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|e| Error::Startup(format!("cannot listen on {}: {e}; choose another --listen", config.listen)))?;
    tracing::info!(listen = %config.listen, "serving /metrics, /healthz and /readyz");
    tokio::spawn(serve_endpoints(listener, prometheus, Arc::clone(&ready)));

    let mut leadership = match &config.leader_election {
        Some(election) => Some(acquire_leadership(&client, election).await?),
        None => None,
    };

    let sagas: Api<Saga> = match &config.namespace {
        Some(namespace) => Api::namespaced(client.clone(), namespace),
        None => Api::all(client.clone()),
    };
    let http = reqwest::Client::builder()
        .user_agent(concat!("kubesaga-operator/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| Error::Startup(format!("cannot build the HTTP client: {e}")))?;
    let identity = config.leader_election.as_ref().map(|e| e.identity.clone());
    let recorder =
        Recorder::new(client.clone(), Reporter { controller: "kubesaga-operator".into(), instance: identity.clone() });
    let relays: Api<OutboxRelay> = match &config.namespace {
        Some(namespace) => Api::namespaced(client.clone(), namespace),
        None => Api::all(client.clone()),
    };
    let relay_shared = Arc::new(Shared {
        client: client.clone(),
        recorder: recorder.clone(),
        identity: identity.unwrap_or_else(|| format!("kubesaga-operator-{}", std::process::id())),
    });
    let stop_relays = CancellationToken::new();
    let relays_done = tokio::spawn(supervisor::supervise(relays, relay_shared, stop_relays.clone()));
    let context = Arc::new(Context::new(
        client.clone(),
        http,
        Targets::new(config.limits.clone()),
        recorder,
        config.cluster_domain.clone(),
        config.normal_events,
    ));

    let controller = Controller::new(sagas, watcher::Config::default().any_semantic())
        .with_config(ControllerConfig::default().concurrency(config.concurrency));
    tokio::spawn(publish_phase_counts(controller.store()));
    ready.store(true, Ordering::Relaxed);
    tracing::info!(
        namespace = config.namespace.as_deref().unwrap_or("<all>"),
        "Saga and OutboxRelay controllers started"
    );

    let driven = controller.shutdown_on_signal().run(reconcile::reconcile, reconcile::error_policy, context).for_each(
        |result| async move {
            if let Err(err) = result {
                tracing::debug!(error = %err, "reconcile did not complete");
            }
        },
    );
    let result = match leadership.as_mut() {
        None => {
            driven.await;
            Ok(())
        }
        Some(leader) => {
            tokio::select! {
                () = driven => Ok(()),
                () = leader.lost() => Err(Error::Startup(
                    "lost the leader Lease; exiting so a fresh process can compete for it".into(),
                )),
            }
        }
    };
    // Relays finish their round, so no claim is left for zombie recovery.
    stop_relays.cancel();
    if let Err(err) = relays_done.await {
        tracing::warn!(error = %err, "the relay supervisor did not stop cleanly");
    }
    result
}

/// Refuses to start when a CRD is missing, saying what to run.
async fn check_crd_installed(client: &Client, namespace: Option<&str>) -> Result<(), Error> {
    check_listable::<Saga>(client, namespace, "Saga", "sagas").await?;
    check_listable::<OutboxRelay>(client, namespace, "OutboxRelay", "outboxrelays").await
}

async fn check_listable<K>(client: &Client, namespace: Option<&str>, kind: &str, plural: &str) -> Result<(), Error>
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    let api: Api<K> = match namespace {
        Some(namespace) => Api::namespaced(client.clone(), namespace),
        None => Api::all(client.clone()),
    };
    match api.list(&ListParams::default().limit(1)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Err(Error::Startup(format!(
            "the {kind} CRD is not installed: run `kubectl apply --server-side -f crds/` \
             (or `kubesaga-operator crd | kubectl apply --server-side -f -`)"
        ))),
        Err(kube::Error::Api(status)) if status.code == 403 => Err(Error::Startup(format!(
            "not allowed to list {plural}: {}; grant the operator's service account the RBAC in charts/kubesaga",
            status.message
        ))),
        Err(e) => Err(Error::Startup(format!("cannot list {plural}: {e}"))),
    }
}

/// Holds the leader Lease; [`Leadership::lost`] resolves when another replica takes it.
struct Leadership {
    changes: tokio::sync::watch::Receiver<bool>,
}

impl Leadership {
    async fn lost(&mut self) {
        while *self.changes.borrow_and_update() {
            if self.changes.changed().await.is_err() {
                return;
            }
        }
    }
}

async fn acquire_leadership(client: &Client, election: &LeaderElection) -> Result<Leadership, Error> {
    let manager = LeaseManagerBuilder::new(client.clone(), election.lease_name.clone())
        .with_namespace(election.namespace.clone())
        .with_identity(election.identity.clone())
        .with_duration(election.lease_seconds)
        .with_grace(election.lease_seconds.div_ceil(3).max(1))
        .with_field_manager("kubesaga-operator/leader-election")
        .build()
        .await
        .map_err(|e| Error::Startup(format!("cannot use Lease {}/{}: {e}", election.namespace, election.lease_name)))?;
    let (mut changes, _task) = manager.watch().await;
    tracing::info!(identity = %election.identity, lease = %election.lease_name, "waiting to become the leader");
    while !*changes.borrow_and_update() {
        changes
            .changed()
            .await
            .map_err(|_| Error::Startup("leader election stopped before this replica became the leader".into()))?;
    }
    tracing::info!(identity = %election.identity, "became the leader");
    Ok(Leadership { changes })
}

async fn serve_endpoints(listener: TcpListener, prometheus: PrometheusHandle, ready: Arc<AtomicBool>) {
    let router = Router::new()
        .route("/metrics", get(move || std::future::ready(prometheus.render())))
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let ready = ready.load(Ordering::Relaxed);
                async move {
                    if ready { (StatusCode::OK, "ok") } else { (StatusCode::SERVICE_UNAVAILABLE, "starting") }
                }
            }),
        );
    if let Err(err) = axum::serve(listener, router).await {
        tracing::error!(error = %err, "health and metrics endpoint stopped");
    }
}

/// Keeps the sagas-by-phase gauge current from the controller's cache.
async fn publish_phase_counts(store: Store<Saga>) {
    const PHASES: [SagaPhase; 6] = [
        SagaPhase::Pending,
        SagaPhase::Running,
        SagaPhase::Compensating,
        SagaPhase::Succeeded,
        SagaPhase::Compensated,
        SagaPhase::Failed,
    ];
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tick.tick().await;
        let sagas = store.state();
        let counts: Vec<_> = PHASES
            .iter()
            .map(|phase| {
                let count = sagas
                    .iter()
                    .filter(|s| s.status.as_ref().and_then(|st| st.phase).unwrap_or(SagaPhase::Pending) == *phase)
                    .count();
                (*phase, count)
            })
            .collect();
        metrics::sagas_by_phase(&counts);
    }
}
