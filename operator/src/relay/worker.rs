//! One relay worker: connects to the database and Redis named by an `OutboxRelay`, then claims, publishes and
//! marks rows until it is cancelled, keeping the status and metrics current. Outages never end the worker: it
//! reports them in the status and tries again with growing waits.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::{api::core::v1::Secret, apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{Patch, PatchParams},
    runtime::events::Recorder,
};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde_json::json;
use sqlx::postgres::{PgListener, PgPool, PgPoolOptions};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{
    health::{self, Connection, Observation, reasons},
    publish::{self, Outcome},
    settings::Settings,
    store::{ClaimedRow, Failure, Stats, Store},
};
use crate::{
    crd::{OutboxRelay, OutboxRelayStatus, SecretKeyRef},
    metrics,
    recorder::{self, Notice},
};

/// Field manager of the relay's status writes.
const FIELD_MANAGER: &str = "kubesaga-operator/outbox-relay";
/// How often counts are read and the status considered for a write.
const STATS_EVERY: Duration = Duration::from_secs(1);
/// How often the Secrets are read again, so that rotated URLs are picked up without a restart.
const SECRETS_EVERY: Duration = Duration::from_secs(10);
/// Longest wait between two connection attempts or after a failed round.
const MAX_RETRY_WAIT: Duration = Duration::from_secs(30);
/// PUBLISHED rows deleted per statement, so retention never holds long locks.
const PURGE_BATCH: i64 = 1000;

/// What every worker shares.
pub struct Shared {
    /// API client.
    pub client: Client,
    /// Event recorder.
    pub recorder: Recorder,
    /// This operator replica, written into `claimed_by`.
    pub identity: String,
}

/// Runs the relay of `relay` until `cancel` fires.
pub async fn run(relay: OutboxRelay, shared: Arc<Shared>, cancel: CancellationToken) {
    let mut worker = Worker::new(relay, shared);
    worker.report(Connection::Starting, None).await;
    let mut wait = Duration::from_secs(1);
    while !cancel.is_cancelled() {
        match worker.connect().await {
            Ok(stores) => {
                wait = Duration::from_secs(1);
                worker.relay(stores, &cancel).await;
            }
            Err(down) => {
                tracing::warn!(relay = %worker.label, reason = down.0, detail = %down.1, "relay cannot start");
                worker.report(Connection::Down(down.0, down.1), None).await;
                if sleep_or_cancel(wait, &cancel).await {
                    return;
                }
                wait = (wait * 2).min(MAX_RETRY_WAIT);
            }
        }
    }
}

/// The connections a worker relays with.
struct Stores {
    store: Store,
    redis: ConnectionManager,
    listener: Option<PgListener>,
    pool: PgPool,
    /// The URLs connected to, to notice a rotated Secret.
    urls: (String, String),
}

/// Why the worker is not relaying: a reason of [`reasons`] and what to fix.
type Down = (&'static str, String);

struct Worker {
    relay: OutboxRelay,
    settings: Settings,
    shared: Arc<Shared>,
    api: Api<OutboxRelay>,
    /// `namespace/name`, for logs and metric labels.
    label: String,
    /// The status last written, and when.
    written: OutboxRelayStatus,
    written_at: Instant,
    /// Publishes since the last write.
    published: u64,
    last_published_at: Option<Time>,
    last_error: Option<String>,
}

impl Worker {
    fn new(relay: OutboxRelay, shared: Arc<Shared>) -> Self {
        let namespace = relay.namespace().unwrap_or_default();
        let label = format!("{namespace}/{}", relay.name_any());
        Self {
            settings: Settings::from_spec(&relay.spec),
            api: Api::namespaced(shared.client.clone(), &namespace),
            written: relay.status.clone().unwrap_or_default(),
            written_at: Instant::now(),
            relay,
            shared,
            label,
            published: 0,
            last_published_at: None,
            last_error: None,
        }
    }

    async fn connect(&self) -> Result<Stores, Down> {
        let spec = &self.relay.spec;
        let database_url = self.secret(&spec.database.secret_key_ref).await?;
        let redis_url = self.secret(&spec.destination.redis.secret_key_ref).await?;
        let database = &spec.database.secret_key_ref.name;
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(5))
            .connect(&database_url)
            .await
            .map_err(|e| {
                let message = format!(
                    "cannot connect to the database in Secret {database}: {}",
                    redact(&e.to_string(), &database_url)
                );
                (reasons::DATABASE_UNAVAILABLE, message)
            })?;
        for (role, table) in [("table", &spec.table), ("deadLetterTable", &spec.dead_letter_table)] {
            let exists: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
                .bind(table)
                .fetch_one(&pool)
                .await
                .map_err(|e| (reasons::DATABASE_UNAVAILABLE, format!("cannot look up {role} {table}: {e}")))?;
            if exists.is_none() {
                return Err((
                    reasons::DATABASE_UNAVAILABLE,
                    format!(
                        "{role} {table} does not exist in the database of Secret {database}; \
                         run the service's migrations (`<service> migrate`) or fix spec.{role}"
                    ),
                ));
            }
        }
        let redis_secret = &spec.destination.redis.secret_key_ref.name;
        let redis_down = |e: redis::RedisError| {
            let message =
                format!("cannot connect to Redis in Secret {redis_secret}: {}", redact(&e.to_string(), &redis_url));
            (reasons::REDIS_UNAVAILABLE, message)
        };
        let client = redis::Client::open(redis_url.as_str()).map_err(redis_down)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(Duration::from_secs(5)))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(2));
        let redis = ConnectionManager::new_with_config(client, config).await.map_err(redis_down)?;
        let listener = if self.settings.listen_notify { self.listen(&pool).await } else { None };
        Ok(Stores {
            store: Store::new(pool.clone(), &self.settings),
            redis,
            listener,
            pool,
            urls: (database_url, redis_url),
        })
    }

    /// LISTENs on the trigger's channel; without it the relay still works by polling, so a failure only logs.
    async fn listen(&self, pool: &PgPool) -> Option<PgListener> {
        let mut listener = match PgListener::connect_with(pool).await {
            Ok(listener) => listener,
            Err(err) => {
                tracing::warn!(relay = %self.label, error = %err, "cannot LISTEN; polling only");
                return None;
            }
        };
        match listener.listen(&self.settings.channel).await {
            Ok(()) => Some(listener),
            Err(err) => {
                tracing::warn!(relay = %self.label, error = %err, "cannot LISTEN; polling only");
                None
            }
        }
    }

    /// The value of a Secret key, or what to fix.
    async fn secret(&self, reference: &SecretKeyRef) -> Result<String, Down> {
        let namespace = self.relay.namespace().unwrap_or_default();
        let secrets: Api<Secret> = Api::namespaced(self.shared.client.clone(), &namespace);
        let create = format!(
            "create it with `kubectl -n {namespace} create secret generic {} --from-literal={}=<url>`",
            reference.name, reference.key
        );
        let secret = match secrets.get_opt(&reference.name).await {
            Ok(Some(secret)) => secret,
            Ok(None) => {
                return Err((
                    reasons::SECRET_NOT_FOUND,
                    format!("Secret {namespace}/{} not found; {create}", reference.name),
                ));
            }
            Err(err) => {
                return Err((
                    reasons::SECRET_NOT_FOUND,
                    format!("cannot read Secret {namespace}/{}: {err}", reference.name),
                ));
            }
        };
        // `stringData` is write-only: the API server folds it into `data`, so a read never carries it.
        let value = secret.data.as_ref().and_then(|d| d.get(&reference.key)).map(|v| v.0.clone());
        match value.map(String::from_utf8) {
            Some(Ok(url)) if !url.trim().is_empty() => Ok(url.trim().to_owned()),
            Some(_) => Err((
                reasons::SECRET_NOT_FOUND,
                format!("key {} of Secret {namespace}/{} is empty or not UTF-8", reference.key, reference.name),
            )),
            None => Err((
                reasons::SECRET_NOT_FOUND,
                format!("Secret {namespace}/{} has no key {}; {create}", reference.name, reference.key),
            )),
        }
    }

    /// Relays until cancelled or until a Secret's URL changes (the caller connects again). Failed rounds are
    /// reported and retried after a growing wait.
    async fn relay(&mut self, mut stores: Stores, cancel: &CancellationToken) {
        tracing::info!(relay = %self.label, table = %self.relay.spec.table, "relaying");
        let mut next_secrets = Instant::now() + SECRETS_EVERY;
        let mut next_housekeeping = Instant::now();
        let mut next_purge = Instant::now();
        let mut wait = Duration::from_secs(1);
        let mut connection = Connection::Up;
        let mut stats = None;
        loop {
            if Instant::now() >= next_secrets {
                next_secrets = Instant::now() + SECRETS_EVERY;
                if self.secrets_changed(&stores.urls).await {
                    tracing::info!(relay = %self.label, "a Secret's URL changed; connecting again");
                    return;
                }
            }
            if Instant::now() >= next_housekeeping {
                match self.housekeeping(&stores.store, Instant::now() >= next_purge).await {
                    Ok(fresh) => {
                        if Instant::now() >= next_purge {
                            next_purge =
                                Instant::now() + (self.settings.published_retention / 4).min(Duration::from_secs(60));
                        }
                        stats = Some(fresh);
                    }
                    Err(err) => connection = database_down(&err),
                }
                self.report(connection.clone(), stats.take()).await;
                next_housekeeping = Instant::now() + STATS_EVERY;
                if stores.listener.is_none() && self.settings.listen_notify && connection == Connection::Up {
                    stores.listener = self.listen(&stores.pool).await;
                }
            }
            match self.round(&mut stores).await {
                Ok(claimed) => {
                    connection = Connection::Up;
                    wait = Duration::from_secs(1);
                    if claimed > 0 {
                        // More may be due, or unblocked by what was just published: claim again at once.
                        if cancel.is_cancelled() {
                            return;
                        }
                        continue;
                    }
                    let until_housekeeping = next_housekeeping.saturating_duration_since(Instant::now());
                    if self.idle(&mut stores, until_housekeeping.min(self.settings.poll_interval), cancel).await {
                        return;
                    }
                }
                Err(down) => {
                    tracing::warn!(relay = %self.label, reason = down.0, detail = %down.1, "relay round failed");
                    self.last_error = Some(down.1.clone());
                    connection = Connection::Down(down.0, down.1);
                    self.report(connection.clone(), None).await;
                    if sleep_or_cancel(wait, cancel).await {
                        return;
                    }
                    wait = (wait * 2).min(MAX_RETRY_WAIT);
                }
            }
        }
    }

    /// Whether the Secrets now hold other URLs than `urls`; a Secret that cannot be read keeps the connection.
    async fn secrets_changed(&self, urls: &(String, String)) -> bool {
        let spec = &self.relay.spec;
        let database = self.secret(&spec.database.secret_key_ref).await;
        let redis = self.secret(&spec.destination.redis.secret_key_ref).await;
        database.is_ok_and(|url| url != urls.0) || redis.is_ok_and(|url| url != urls.1)
    }

    /// Zombie recovery, retention when due, and fresh counts.
    async fn housekeeping(&self, store: &Store, purge: bool) -> Result<Stats, sqlx::Error> {
        let recovered = store.recover(self.settings.processing_timeout).await?;
        if recovered > 0 {
            tracing::warn!(relay = %self.label, rows = recovered, "claims older than processingTimeout went back to PENDING");
            metrics::relay::recovered(&self.label, recovered);
        }
        if purge {
            loop {
                let purged = store.purge(self.settings.published_retention, PURGE_BATCH).await?;
                metrics::relay::purged(&self.label, purged);
                if purged < PURGE_BATCH as u64 {
                    break;
                }
            }
        }
        let stats = store.stats().await?;
        let stale = stats.oldest_pending_seconds.unwrap_or(0.0) > self.settings.stale_pending_after.as_secs_f64();
        metrics::relay::stats(&self.label, &stats, stale);
        Ok(stats)
    }

    /// One claim → publish → mark round; returns how many rows were claimed.
    async fn round(&mut self, stores: &mut Stores) -> Result<usize, Down> {
        let claim = format!("{}/{}", self.shared.identity, Uuid::new_v4());
        let rows = stores.store.claim(self.settings.batch_size, &claim).await.map_err(|e| database_down_reason(&e))?;
        if rows.is_empty() {
            return Ok(0);
        }
        let outcomes = match publish::publish(&mut stores.redis, &self.settings, &rows).await {
            Ok(outcomes) => outcomes,
            Err(err) => {
                // Nothing is known about any entry: give the rows back without spending an attempt. An entry that
                // did reach the stream is published again later, which consumers absorb by event id.
                let released = stores.store.release(&claim).await;
                if let Err(db) = released {
                    tracing::warn!(relay = %self.label, error = %db, "cannot release claimed rows; zombie recovery will");
                }
                return Err((reasons::REDIS_UNAVAILABLE, format!("cannot publish to Redis: {err}")));
            }
        };
        crate::fault::point(|| "relay-crash-after-publish".into());
        let now = Timestamp::now();
        let mut published = Vec::with_capacity(rows.len());
        let mut failures = Vec::new();
        for (row, (_, outcome)) in rows.iter().zip(&outcomes) {
            match outcome {
                Outcome::Published(_) => published.push(row),
                Outcome::Rejected(error) => {
                    let attempts = row.attempts + 1;
                    let retry_in =
                        (!self.settings.exhausted(attempts)).then(|| self.settings.retry_delay(attempts, &row.id));
                    failures.push(Failure { id: row.id, error: error.clone(), retry_in });
                }
            }
        }
        warn_if_reordered(&self.label, &rows, &outcomes);
        let ids: Vec<Uuid> = published.iter().map(|r| r.id).collect();
        let marked = stores.store.mark_published(&ids, &claim).await.map_err(|e| database_down_reason(&e))?;
        if marked < ids.len() as u64 {
            tracing::warn!(relay = %self.label, published = ids.len(), marked, "some claims were lost to zombie recovery; those rows are published again");
        }
        metrics::relay::published(
            &self.label,
            published.iter().map(|r| (now.as_millisecond() - r.created_at.timestamp_millis()).max(0) as f64 / 1000.0),
        );
        self.published += ids.len() as u64;
        if !ids.is_empty() {
            self.last_published_at = Some(Time(now));
            self.last_error = None;
        }
        if !failures.is_empty() {
            self.failed(stores, &rows, &failures, &claim).await?;
        }
        Ok(rows.len())
    }

    async fn failed(
        &mut self,
        stores: &Stores,
        rows: &[ClaimedRow],
        failures: &[Failure],
        claim: &str,
    ) -> Result<(), Down> {
        metrics::relay::publish_failures(&self.label, failures.len() as u64);
        let first = &failures[0];
        self.last_error = Some(format!("publishing event {}: {}", first.id, first.error));
        tracing::warn!(relay = %self.label, rows = failures.len(), error = %first.error, "Redis refused entries");
        let moved = stores.store.fail(failures, claim).await.map_err(|e| database_down_reason(&e))?;
        if moved == 0 {
            return Ok(());
        }
        metrics::relay::dead_lettered(&self.label, moved);
        let described: Vec<String> = failures
            .iter()
            .filter(|f| f.retry_in.is_none())
            .take(3)
            .filter_map(|f| rows.iter().find(|r| r.id == f.id).map(|r| (f, r)))
            .map(|(f, r)| {
                format!("{} ({} of {} {}): {}", r.id, r.event_type, r.aggregate_type, r.aggregate_id, f.error)
            })
            .collect();
        let message = format!(
            "moved {moved} row(s) to {} after {} failed publishes: {}",
            self.relay.spec.dead_letter_table,
            self.relay.spec.max_attempts,
            described.join("; ")
        );
        tracing::error!(relay = %self.label, rows = moved, "{message}");
        self.publish_notes(vec![Notice { warning: true, reason: reasons::DEAD_LETTERED, action: None, message }]);
        Ok(())
    }

    /// Waits for a NOTIFY, the poll interval, or cancellation (true).
    async fn idle(&self, stores: &mut Stores, timeout: Duration, cancel: &CancellationToken) -> bool {
        match stores.listener.as_mut() {
            Some(listener) => {
                tokio::select! {
                    () = cancel.cancelled() => true,
                    () = tokio::time::sleep(timeout) => false,
                    notified = listener.recv() => {
                        if let Err(err) = notified {
                            // Polling covers the gap; the listener is set up again at the next housekeeping.
                            tracing::warn!(relay = %self.label, error = %err, "LISTEN connection lost; polling until it is back");
                            stores.listener = None;
                        }
                        false
                    }
                }
            }
            None => sleep_or_cancel(timeout, cancel).await,
        }
    }

    /// Computes the status from what was observed and writes it when [`health::due`] says so.
    async fn report(&mut self, connection: Connection, stats: Option<Stats>) {
        metrics::relay::up(&self.label, connection == Connection::Up);
        let observation = Observation {
            connection,
            stats,
            published: self.published,
            last_published_at: self.last_published_at.clone(),
            last_error: self.last_error.clone(),
        };
        let now = Time(Timestamp::now());
        let generation = self.relay.meta().generation;
        let (status, notes) =
            health::next(&self.written, generation, self.settings.stale_pending_after, &observation, &now);
        if !health::due(&self.written, &status, self.written_at.elapsed()) {
            return;
        }
        let patch = json!({
            "apiVersion": "kubesaga.dev/v1alpha1",
            "kind": "OutboxRelay",
            "status": status,
        });
        let name = self.relay.name_any();
        match self.api.patch_status(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch)).await {
            Ok(_) => {
                metrics::api_write("relay_status");
                self.written = status;
                self.written_at = Instant::now();
                self.published = 0;
                self.publish_notes(notes);
            }
            Err(err) => tracing::warn!(relay = %self.label, error = %err, "cannot write the relay's status"),
        }
    }

    fn publish_notes(&self, notices: Vec<Notice>) {
        recorder::publish(&self.shared.recorder, self.relay.object_ref(&()), notices);
    }
}

/// Rows of one aggregate go to one stream, so Redis accepts or refuses them alike; should it refuse one and accept a
/// later one of the same aggregate in the same batch, that later event is out ahead of the refused one. Say so.
fn warn_if_reordered(relay: &str, rows: &[ClaimedRow], outcomes: &[(Uuid, Outcome)]) {
    let mut refused: Vec<(&str, &str)> = Vec::new();
    for (row, (_, outcome)) in rows.iter().zip(outcomes) {
        let aggregate = (row.aggregate_type.as_str(), row.aggregate_id.as_str());
        match outcome {
            Outcome::Rejected(_) => refused.push(aggregate),
            Outcome::Published(_) if refused.contains(&aggregate) => {
                tracing::warn!(
                    relay,
                    event = %row.id,
                    aggregate = %format!("{}/{}", aggregate.0, aggregate.1),
                    "Redis refused an earlier event of this aggregate and accepted this one: they are out of order"
                );
            }
            Outcome::Published(_) => {}
        }
    }
}

fn database_down_reason(err: &sqlx::Error) -> Down {
    (reasons::DATABASE_UNAVAILABLE, format!("database error: {err}"))
}

fn database_down(err: &sqlx::Error) -> Connection {
    let (reason, message) = database_down_reason(err);
    Connection::Down(reason, message)
}

/// Keeps a URL's credentials out of an error message that might quote it.
fn redact(message: &str, url: &str) -> String {
    if url.is_empty() { message.to_owned() } else { message.replace(url, "<url from the Secret>") }
}

/// Sleeps `wait`; true when cancelled first.
async fn sleep_or_cancel(wait: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        () = cancel.cancelled() => true,
        () = tokio::time::sleep(wait) => false,
    }
}
