//! `make bench`: throughput and latency of the Saga controller on the local control plane, next to the raw
//! status-patch rate of the same API server, so the result can be read against the physical limit (`saga`);
//! the cost of the services' idempotent write path against a bare handler (`services`, see [`services`]); and the
//! outbox relay's throughput and commit → stream latency (`relay`, see [`relay`]).
//!
//! Saga method: a no-op step target answers every call with `200 {}`; the release operator runs as its own process
//! watching one namespace; the bench creates N three-step sagas (32 creates in flight) and watches them, timing
//! each from its create call to the watch event that shows a terminal phase. API writes per saga are read from
//! the operator's own `/metrics`. The raw rate is measured before, in another namespace, by C concurrent clients
//! server-side-applying a status of the same shape to sagas no operator watches.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use clap::Parser;
use futures::{StreamExt, TryStreamExt, stream};
use kube::{
    Api, Client, ResourceExt,
    api::{Patch, PatchParams, PostParams},
    runtime::{WatchStreamExt, watcher},
};
use kubesaga_operator::crd::{Saga, SagaPhase};
use kubesaga_testkit::{OperatorProcess, StepTarget, TestNamespace, install_crds};
use serde_json::json;
use tokio::sync::Mutex;

mod relay;
mod services;

/// kubesaga benchmarks.
#[derive(Parser, Debug)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// The Saga controller against a no-op target.
    Saga(Args),
    /// The services' idempotent write and replay paths against a bare handler, loaded with wrk.
    Services(services::Args),
    /// The outbox relay: throughput at several batch sizes, commit → stream latency with LISTEN/NOTIFY and polling.
    Relay(relay::Args),
}

/// Saga controller benchmark.
#[derive(clap::Args, Debug)]
struct Args {
    /// Sagas to run.
    #[arg(long, default_value_t = 500)]
    sagas: usize,
    /// Steps per saga.
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// Seconds to measure the raw status-patch rate.
    #[arg(long, default_value_t = 10)]
    raw_seconds: u64,
    /// Concurrent clients for the raw status-patch rate.
    #[arg(long, default_value_t = 32)]
    raw_clients: usize,
    /// The operator binary (a release build).
    #[arg(long, env = "KUBESAGA_OPERATOR_BIN", default_value = "target/release/kubesaga-operator")]
    operator: String,
    /// Operator reconcile concurrency.
    #[arg(long, default_value_t = 64)]
    concurrency: u16,
    /// Whether the operator publishes Normal events (Warnings are always published).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    normal_events: bool,
}

#[tokio::main]
async fn main() {
    match Cli::parse().command {
        Command::Saga(args) => saga_bench(args).await,
        Command::Services(args) => services::run(args).await,
        Command::Relay(args) => relay::run(args).await,
    }
}

async fn saga_bench(args: Args) {
    let client = kubesaga_testkit::client().await;
    let crds: Vec<_> = kubesaga_operator::crd::all().into_iter().map(|(_, crd)| crd).collect();
    install_crds(&client, &crds).await;

    let raw = raw_patch_rate(&client, &args, RawPatch::ServerSideApply).await;
    println!(
        "raw status patches (server-side apply): {raw:.0}/s ({} clients, {}s)",
        args.raw_clients, args.raw_seconds
    );
    let raw_merge = raw_patch_rate(&client, &args, RawPatch::Merge).await;
    println!("raw status patches (merge patch, for comparison): {raw_merge:.0}/s");

    let run = saga_run(&client, &args).await;
    let writes_per_saga = run.status_writes / args.sagas as f64;
    let all_writes_per_saga = run.all_writes / args.sagas as f64;
    let achieved_patch_rate = run.status_writes / run.elapsed.as_secs_f64();
    println!("sagas: {} x {} steps in {:.2}s", args.sagas, args.steps, run.elapsed.as_secs_f64());
    println!("throughput: {:.1} sagas/s", args.sagas as f64 / run.elapsed.as_secs_f64());
    println!("latency create->terminal: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms", run.p50, run.p99, run.max);
    println!(
        "API writes per saga: {writes_per_saga:.2} status+finalizer ({all_writes_per_saga:.2} with events); by kind: {:?}",
        run.writes_by_kind
    );
    println!(
        "status-class writes during the run: {achieved_patch_rate:.0}/s = {:.0}% of the raw patch rate",
        100.0 * achieved_patch_rate / raw
    );
}

#[derive(Clone, Copy)]
enum RawPatch {
    ServerSideApply,
    Merge,
}

/// Status patches/s the API server sustains for sagas.
async fn raw_patch_rate(client: &Client, args: &Args, kind: RawPatch) -> f64 {
    let ns = TestNamespace::create(client, "bench-raw").await;
    let api: Api<Saga> = ns.api();
    let names: Vec<String> = (0..args.raw_clients).map(|i| format!("raw-{i}")).collect();
    for name in &names {
        api.create(&PostParams::default(), &saga(name, "http://127.0.0.1:1/", args.steps)).await.expect("create");
    }
    let stop = Instant::now() + Duration::from_secs(args.raw_seconds);
    let counts = futures::future::join_all(names.iter().map(|name| {
        let api = api.clone();
        async move {
            let mut count = 0u64;
            while Instant::now() < stop {
                let status = json!({
                    "apiVersion": "kubesaga.dev/v1alpha1", "kind": "Saga", "metadata": { "name": name },
                    "status": { "phase": "Running", "currentStep": format!("s{}", count % 3), "currentAttempts": count,
                                "steps": [{ "name": "s0", "action": { "phase": "Running", "attempts": count } }] },
                });
                let result = match kind {
                    RawPatch::ServerSideApply => {
                        api.patch_status(name, &PatchParams::apply("bench").force(), &Patch::Apply(&status)).await
                    }
                    RawPatch::Merge => api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status)).await,
                };
                result.expect("raw status patch");
                count += 1;
            }
            count
        }
    }))
    .await;
    ns.delete().await;
    counts.iter().sum::<u64>() as f64 / args.raw_seconds as f64
}

struct RunResult {
    elapsed: Duration,
    p50: f64,
    p99: f64,
    max: f64,
    status_writes: f64,
    all_writes: f64,
    writes_by_kind: HashMap<String, f64>,
}

async fn saga_run(client: &Client, args: &Args) -> RunResult {
    let ns = TestNamespace::create(client, "bench-run").await;
    let api: Api<Saga> = ns.api();
    let target = StepTarget::start().await;
    let metrics_port = free_port();
    let listen = format!("127.0.0.1:{metrics_port}");
    let concurrency = args.concurrency.to_string();
    let normal_events = args.normal_events.to_string();
    let operator = OperatorProcess::start(
        &args.operator,
        &ns.name,
        &["--listen", &listen, "--concurrency", &concurrency, "--normal-events", &normal_events],
    );
    wait_ready(&listen).await;

    // Watch first, so no terminal transition is missed.
    let finished: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let watch = {
        let finished = Arc::clone(&finished);
        let api = api.clone();
        let total = args.sagas;
        tokio::spawn(async move {
            let mut events = watcher(api, watcher::Config::default()).applied_objects().boxed();
            while let Some(saga) = events.try_next().await.expect("watch") {
                if saga.status.as_ref().and_then(|s| s.phase).is_some_and(SagaPhase::is_terminal) {
                    let mut done = finished.lock().await;
                    done.entry(saga.name_any()).or_insert_with(Instant::now);
                    if done.len() == total {
                        return;
                    }
                }
            }
        })
    };

    let url = target.url("/noop");
    let started = Instant::now();
    let created: HashMap<String, Instant> = stream::iter(0..args.sagas)
        .map(|i| {
            let api = api.clone();
            let saga = saga(&format!("s-{i}"), &url, args.steps);
            async move {
                let at = Instant::now();
                api.create(&PostParams::default(), &saga).await.expect("create saga");
                (saga.name_any(), at)
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    tokio::time::timeout(Duration::from_secs(600), watch).await.expect("all sagas finish in 10 min").expect("watch");
    let finished = finished.lock().await;
    let end = finished.values().max().copied().unwrap_or(started);
    let mut latencies: Vec<f64> =
        created.iter().map(|(name, at)| (finished[name] - *at).as_secs_f64() * 1000.0).collect();
    latencies.sort_by(f64::total_cmp);
    let quantile = |q: f64| latencies[((latencies.len() as f64 * q).ceil() as usize).clamp(1, latencies.len()) - 1];

    // Events are published off the saga's path; give the last ones a moment to land before counting.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let writes_by_kind = scrape_writes(&listen).await;
    let status_writes = writes_by_kind.iter().filter(|(k, _)| *k != "event").map(|(_, v)| v).sum();
    let all_writes = writes_by_kind.values().sum();
    drop(operator);
    ns.delete().await;
    RunResult {
        elapsed: end - started,
        p50: quantile(0.50),
        p99: quantile(0.99),
        max: *latencies.last().unwrap_or(&0.0),
        status_writes,
        all_writes,
        writes_by_kind,
    }
}

fn saga(name: &str, url: &str, steps: usize) -> Saga {
    let steps: Vec<_> = (0..steps)
        .map(|i| {
            json!({ "name": format!("s{i}"), "action": { "method": "POST", "url": url },
                          "compensation": { "method": "POST", "url": url } })
        })
        .collect();
    serde_json::from_value(json!({
        "apiVersion": "kubesaga.dev/v1alpha1", "kind": "Saga", "metadata": { "name": name }, "spec": { "steps": steps },
    }))
    .expect("saga")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

async fn wait_ready(listen: &str) {
    let url = format!("http://{listen}/readyz");
    for _ in 0..600 {
        if reqwest::get(&url).await.is_ok_and(|r| r.status().is_success()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the operator did not become ready at {url}");
}

/// `kubesaga_api_writes_total` by kind from the operator's Prometheus endpoint.
async fn scrape_writes(listen: &str) -> HashMap<String, f64> {
    let text = reqwest::get(format!("http://{listen}/metrics")).await.expect("metrics").text().await.expect("body");
    text.lines()
        .filter_map(|line| line.strip_prefix("kubesaga_api_writes_total{kind=\""))
        .filter_map(|rest| {
            let (kind, value) = rest.split_once("\"} ")?;
            Some((kind.to_owned(), value.trim().parse().ok()?))
        })
        .collect()
}
