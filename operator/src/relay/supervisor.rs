//! Keeps one worker running per `OutboxRelay`: started when the resource appears, restarted when its spec changes
//! (a new generation), stopped when it is deleted. Only the leader replica runs a supervisor.

use std::{collections::HashMap, sync::Arc, time::Duration};

use futures::{StreamExt as _, TryStreamExt as _};
use kube::{
    Api, ResourceExt,
    runtime::{WatchStreamExt as _, watcher},
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::worker::{self, Shared};
use crate::crd::OutboxRelay;

/// Longest a stopping worker may take to finish its round before it is aborted; its claimed rows then go back to
/// PENDING through zombie recovery.
const STOP_GRACE: Duration = Duration::from_secs(10);

struct Running {
    uid: String,
    generation: Option<i64>,
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

impl Running {
    async fn stop(self) {
        self.cancel.cancel();
        let abort = self.task.abort_handle();
        if tokio::time::timeout(STOP_GRACE, self.task).await.is_err() {
            abort.abort();
        }
    }
}

/// Watches the relays in `api` and runs their workers until `shutdown` fires.
pub async fn supervise(api: Api<OutboxRelay>, shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut running: HashMap<(String, String), Running> = HashMap::new();
    let mut seen_during_init = Vec::new();
    let events = watcher(api, watcher::Config::default()).default_backoff();
    futures::pin_mut!(events);
    loop {
        let event = tokio::select! {
            () = shutdown.cancelled() => break,
            event = events.try_next() => event,
        };
        match event {
            Ok(Some(watcher::Event::Init)) => seen_during_init.clear(),
            Ok(Some(watcher::Event::InitApply(relay))) => {
                seen_during_init.push(key(&relay));
                ensure(&mut running, relay, &shared).await;
            }
            Ok(Some(watcher::Event::InitDone)) => {
                let gone: Vec<_> = running.keys().filter(|k| !seen_during_init.contains(k)).cloned().collect();
                for k in gone {
                    stop(&mut running, &k).await;
                }
            }
            Ok(Some(watcher::Event::Apply(relay))) => ensure(&mut running, relay, &shared).await,
            Ok(Some(watcher::Event::Delete(relay))) => stop(&mut running, &key(&relay)).await,
            Ok(None) => break,
            Err(err) => tracing::warn!(error = %err, "watching OutboxRelays failed; retrying"),
        }
    }
    futures::stream::iter(running.into_values()).for_each_concurrent(None, Running::stop).await;
}

fn key(relay: &OutboxRelay) -> (String, String) {
    (relay.namespace().unwrap_or_default(), relay.name_any())
}

/// Starts the worker of `relay` unless one for the same object and generation runs; restarts it after a spec change.
async fn ensure(running: &mut HashMap<(String, String), Running>, relay: OutboxRelay, shared: &Arc<Shared>) {
    let k = key(&relay);
    if relay.metadata.deletion_timestamp.is_some() {
        stop(running, &k).await;
        return;
    }
    let uid = relay.uid().unwrap_or_default();
    let generation = relay.metadata.generation;
    if running.get(&k).is_some_and(|r| r.uid == uid && r.generation == generation) {
        return;
    }
    if let Some(old) = running.remove(&k) {
        tracing::info!(relay = %format!("{}/{}", k.0, k.1), "spec changed; restarting the relay");
        old.stop().await;
    }
    tracing::info!(relay = %format!("{}/{}", k.0, k.1), "starting the relay");
    let cancel = CancellationToken::new();
    let task = tokio::spawn(worker::run(relay, Arc::clone(shared), cancel.clone()));
    running.insert(k, Running { uid, generation, cancel, task });
}

async fn stop(running: &mut HashMap<(String, String), Running>, k: &(String, String)) {
    if let Some(old) = running.remove(k) {
        old.stop().await;
        tracing::info!(relay = %format!("{}/{}", k.0, k.1), "relay stopped");
    }
}
