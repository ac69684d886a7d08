//! `kubesaga-operator`: the operator binary.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Args, Parser, Subcommand};
use kubesaga_operator::{
    crd,
    run::{self, LeaderElection},
    saga::limits::LimitsConfig,
};

/// Kubernetes-native saga orchestrator.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the controllers.
    Run(RunArgs),
    /// Print the CustomResourceDefinitions as YAML (`kubectl apply -f -` takes it), or write one file per CRD.
    Crd {
        /// Write `<plural>.yaml` for each CRD into this directory instead of printing them.
        #[arg(long)]
        out_dir: Option<PathBuf>,
    },
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "WATCH_NAMESPACE")]
    namespace: Option<String>,
    /// DNS domain of the cluster, for steps that call a Service by reference.
    #[arg(long, env = "CLUSTER_DOMAIN", default_value = "cluster.local")]
    cluster_domain: String,
    /// Sagas reconciled at once.
    #[arg(long, env = "CONCURRENCY", default_value_t = 64)]
    concurrency: u16,
    /// Address for /metrics, /healthz and /readyz.
    #[arg(long, env = "LISTEN_ADDR", default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
    /// Do not take part in leader election (only one replica may run then).
    #[arg(long, env = "NO_LEADER_ELECTION")]
    no_leader_election: bool,
    /// Namespace of the leader Lease (in a cluster: the operator's own namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// Name of the leader Lease.
    #[arg(long, env = "LEASE_NAME", default_value = "kubesaga-operator")]
    lease_name: String,
    /// Seconds the leader Lease is valid without renewal; a standby takes over after that.
    #[arg(long, env = "LEASE_SECONDS", default_value_t = 15)]
    lease_seconds: u64,
    /// This replica's identity in the Lease (in a cluster: the pod name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Publish Normal events for every transition, not only Warnings.
    #[arg(long, env = "NORMAL_EVENTS", default_value_t = true, action = clap::ArgAction::Set)]
    normal_events: bool,
    /// Calls in flight to one target at most.
    #[arg(long, env = "TARGET_CONCURRENCY", default_value_t = 32)]
    target_concurrency: usize,
    /// Consecutive failures that open a target's circuit breaker.
    #[arg(long, env = "CIRCUIT_FAILURES", default_value_t = 5)]
    circuit_failures: u32,
    /// Seconds an open circuit refuses calls before probing the target again.
    #[arg(long, env = "CIRCUIT_OPEN_SECONDS", default_value_t = 5)]
    circuit_open_seconds: u64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Crd { out_dir } => write_crds(out_dir),
        Command::Run(args) => run_operator(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run_operator(args: RunArgs) -> Result<(), String> {
    let _telemetry = kubesaga_telemetry::init("kubesaga-operator");
    let identity = args.identity.unwrap_or_else(|| {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "local".into());
        format!("{host}-{}", std::process::id())
    });
    let config = run::Config {
        namespace: args.namespace,
        cluster_domain: args.cluster_domain,
        concurrency: args.concurrency,
        listen: args.listen,
        leader_election: (!args.no_leader_election).then_some(LeaderElection {
            namespace: args.lease_namespace,
            lease_name: args.lease_name,
            identity,
            lease_seconds: args.lease_seconds,
        }),
        normal_events: args.normal_events,
        limits: LimitsConfig {
            max_concurrency: args.target_concurrency,
            failure_threshold: args.circuit_failures,
            open_for: Duration::from_secs(args.circuit_open_seconds),
        },
    };
    let runtime = tokio::runtime::Runtime::new().map_err(|e| format!("cannot start the async runtime: {e}"))?;
    runtime.block_on(run::run(config)).map_err(|e| e.to_string())
}

fn write_crds(out_dir: Option<PathBuf>) -> Result<(), String> {
    for (name, definition) in crd::all() {
        let yaml = crd::to_yaml(&definition).map_err(|e| format!("cannot render the {name} CRD as YAML: {e}"))?;
        match &out_dir {
            None => print!("{yaml}"),
            Some(dir) => {
                let path = dir.join(format!("{name}.yaml"));
                std::fs::write(&path, yaml).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            }
        }
    }
    Ok(())
}
