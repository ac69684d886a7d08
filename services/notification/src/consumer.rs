//! The consumer of the order events the OutboxRelay publishes on a Redis stream, in a consumer group.
//!
//! A session of the consumer:
//! 1. opens a Redis connection of its own (its blocking reads must not hold up the API's commands) and creates the
//!    group if it is missing, from the start of the stream;
//! 2. handles its own pending entries first: those it read before a crash or restart and never acknowledged;
//! 3. then reads new entries, blocking up to `--block`, and every half `--claim-min-idle` takes over the entries
//!    other consumers left pending longer than `--claim-min-idle` (they are presumed dead).
//!
//! Each entry is handled on its own: the notification and the event id commit together in Postgres, then the
//! entry is acknowledged, so redelivery never notifies twice. An entry delivered more than `--max-deliveries`
//! times, or one that is no valid order event, goes to the dead-letter stream with the reason, then is
//! acknowledged. When Redis or Postgres fails, the session ends and a new one starts after an exponential backoff.
//!
//! Metrics: [`EVENTS_TOTAL`] by `event_type` (`other` for types this service does not know, `unknown` when the
//! entry is no event) and `outcome` (`processed`, `duplicate`, `dead_lettered`); [`CLAIMED_TOTAL`];
//! [`ERRORS_TOTAL`]; the gauges [`PENDING`] and [`LAG`], refreshed at every claim round.

mod config;
mod group;
mod process;

use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use metrics::{counter, gauge};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

pub use config::{Config, ConsumerArgs};
pub use group::{DEAD_LETTER_DELIVERIES, DEAD_LETTER_ORIGINAL_ID, DEAD_LETTER_ORIGINAL_STREAM, DEAD_LETTER_REASON};
use group::{Entry, Group};
pub use process::EVENTS_TOTAL;

use crate::NotificationError;

/// Counter of entries taken over from other consumers.
pub const CLAIMED_TOTAL: &str = "notification_events_claimed_total";
/// Counter of sessions that ended in an error (and were started again).
pub const ERRORS_TOTAL: &str = "notification_consumer_errors_total";
/// Gauge of the group's entries delivered but not acknowledged, by `stream` and `group`.
pub const PENDING: &str = "notification_consumer_pending";
/// Gauge of the group's entries not yet delivered, by `stream` and `group`.
pub const LAG: &str = "notification_consumer_lag";

/// A session that ran this long before failing was healthy: the next one starts after the shortest backoff.
const HEALTHY_SESSION: Duration = Duration::from_secs(60);

/// Consumes until `shutdown` is cancelled, starting a new session whenever one fails. `config` should be
/// [validated](Config::validate).
pub async fn run(config: Config, db: PgPool, redis: redis::Client, shutdown: CancellationToken) {
    tracing::info!(stream = config.stream, group = config.group, consumer = config.consumer, "consuming order events");
    let mut backoff = new_backoff();
    loop {
        let started = Instant::now();
        let Err(err) = session(&config, &db, &redis, &shutdown).await else { break };
        counter!(ERRORS_TOTAL).increment(1);
        if started.elapsed() >= HEALTHY_SESSION {
            backoff = new_backoff();
        }
        let delay = backoff.next().unwrap_or(MAX_BACKOFF);
        tracing::warn!(error = %err, retry_in_ms = delay.as_millis(), "order event consumer failed; starting over");
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(delay) => {}
        }
    }
    tracing::info!("order event consumer stopped");
}

const MAX_BACKOFF: Duration = Duration::from_secs(30);

fn new_backoff() -> ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(MAX_BACKOFF)
        .with_jitter()
        .without_max_times()
        .build()
}

/// One session: own pending entries, then new ones and periodic claims, until shutdown or a failure.
async fn session(
    config: &Config,
    db: &PgPool,
    redis: &redis::Client,
    shutdown: &CancellationToken,
) -> Result<(), NotificationError> {
    // Reading the pending entries counts as a delivery of each. Without this check every new session during a
    // database outage would count one more, and healthy entries would reach --max-deliveries.
    sqlx::query("SELECT 1").execute(db).await?;
    let mut group = Group::join(redis, config).await?;
    let mut after = "0".to_owned();
    loop {
        let pending = group.read_pending(&after).await?;
        let Some(last) = pending.last() else { break };
        after = last.id.clone();
        if !handle_redelivered(&mut group, config, db, &pending, shutdown).await? {
            return Ok(());
        }
    }
    let claim_every = (config.claim_min_idle / 2).max(Duration::from_millis(1));
    // Right away first: a replica that died while this one was down left its entries waiting.
    let mut next_claim = Instant::now();
    loop {
        if Instant::now() >= next_claim {
            if !claim_idle(&mut group, config, db, shutdown).await? {
                return Ok(());
            }
            next_claim = Instant::now() + claim_every;
        }
        let block =
            config.block.min(next_claim.saturating_duration_since(Instant::now())).max(Duration::from_millis(1));
        // A read dropped at shutdown may have delivered entries; they stay pending and the next start drains them.
        let entries = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            entries = group.read_new(block) => entries?,
        };
        for entry in &entries {
            // A first delivery by definition; entries left unhandled at shutdown are this consumer's pending ones.
            process::handle(&mut group, db, entry, 1, config.max_deliveries).await?;
            if shutdown.is_cancelled() {
                return Ok(());
            }
        }
    }
}

/// Handles entries delivered before (own pending or claimed ones), with their delivery counts. Returns whether to
/// go on (false on shutdown).
async fn handle_redelivered(
    group: &mut Group<'_>,
    config: &Config,
    db: &PgPool,
    entries: &[Entry],
    shutdown: &CancellationToken,
) -> Result<bool, NotificationError> {
    let deliveries = group.deliveries(entries).await?;
    for entry in entries {
        // An entry missing from the pending list was deleted from the stream or acknowledged meanwhile; either is
        // handled safely as if delivered once.
        let delivered = deliveries.get(&entry.id).copied().unwrap_or(1);
        process::handle(group, db, entry, delivered, config.max_deliveries).await?;
        if shutdown.is_cancelled() {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Takes over and handles every entry left idle too long, then records the group's backlog. Returns whether to go
/// on (false on shutdown).
async fn claim_idle(
    group: &mut Group<'_>,
    config: &Config,
    db: &PgPool,
    shutdown: &CancellationToken,
) -> Result<bool, NotificationError> {
    let mut cursor = "0-0".to_owned();
    loop {
        let (next, claimed) = group.claim(&cursor).await?;
        if !claimed.is_empty() {
            tracing::info!(entries = claimed.len(), "took over entries left idle by other consumers");
            counter!(CLAIMED_TOTAL).increment(claimed.len() as u64);
            if !handle_redelivered(group, config, db, &claimed, shutdown).await? {
                return Ok(false);
            }
        }
        if next == "0-0" {
            break;
        }
        cursor = next;
    }
    let (pending, lag) = group.backlog().await?;
    let labels = [("stream", config.stream.clone()), ("group", config.group.clone())];
    gauge!(PENDING, &labels).set(pending as f64);
    if let Some(lag) = lag {
        gauge!(LAG, &labels).set(lag as f64);
    }
    Ok(true)
}
