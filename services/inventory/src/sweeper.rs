//! The sweeper: releases semantic locks older than a maximum age, whose saga evidently will not come back to
//! finish or cancel its reserve (the instance crashed and the saga gave up, or the saga was deleted).

use std::time::Duration;

use metrics::counter;
use tokio::task::JoinHandle;

use crate::{
    AppState, InventoryError,
    operations::{return_units, under_lock},
    store::{self, Fence, RESERVED},
};

/// Counter of released semantic locks, labelled `state` (`RESERVING` or `RESERVED`).
pub const SWEPT_LOCKS: &str = "kubesaga_inventory_swept_locks_total";

/// Most locks one sweep looks at; the next sweep takes the rest.
const BATCH: i64 = 500;

/// When and what the sweeper sweeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SweeperConfig {
    /// Time between sweeps.
    pub interval: Duration,
    /// Locks older than this are released.
    pub max_age: Duration,
}

impl Default for SweeperConfig {
    fn default() -> Self {
        Self { interval: Duration::from_secs(60), max_age: Duration::from_secs(30 * 60) }
    }
}

/// What one sweep did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Semantic locks released.
    pub released_locks: u64,
    /// RESERVED reservations cancelled along with their lock.
    pub cancelled_reservations: u64,
    /// Locks that could not be released this time (busy, or an error; logged).
    pub failed: u64,
}

/// Runs one sweep: every lock older than `max_age` is released under its SKU's Redis lock, after checking again
/// that it is still the same old lock. A `RESERVED` lock (the row held for a reservation's lifetime) also cancels
/// the holder's RESERVED reservations of that product, returning their units; a `RESERVING` lock has no
/// reservation to cancel, because the transaction that makes a reservation also releases the claim.
pub async fn sweep_once(state: &AppState, max_age: Duration) -> Result<SweepReport, InventoryError> {
    let seconds = max_age.as_secs_f64();
    let stale: Vec<String> = sqlx::query_scalar(
        "SELECT sku FROM products WHERE lock_state IS NOT NULL AND locked_at < now() - make_interval(secs => $1) \
         ORDER BY locked_at LIMIT $2",
    )
    .bind(seconds)
    .bind(BATCH)
    .fetch_all(&state.pool)
    .await?;
    let mut report = SweepReport::default();
    for sku in &stale {
        let outcome = under_lock(state, sku, |held| async move {
            let mut fence = Fence::new(held.fence());
            let mut tx = state.pool.begin().await?;
            let product: Option<store::ProductRow> = sqlx::query_as(
                "SELECT sku, name, stock, reserved, version, last_fence, lock_state, locked_by_saga, locked_at, \
                   updated_at \
                 FROM products WHERE sku = $1 AND lock_state IS NOT NULL AND locked_at < now() - make_interval(secs => $2)",
            )
            .bind(sku)
            .bind(seconds)
            .fetch_optional(&mut *tx)
            .await?;
            // Released or retaken since the query above.
            let Some(product) = product else { return Ok(None) };
            let state_name = product.lock_state.clone().unwrap_or_default();
            let holder = product.locked_by_saga.clone().unwrap_or_default();
            let mut next = product.next();
            next.lock = None;
            let mut cancelled = 0;
            if state_name == RESERVED {
                for reservation in store::reserved_by_saga(&mut tx, &holder, sku).await? {
                    return_units(&mut tx, &reservation, &mut next, "swept").await?;
                    cancelled += 1;
                }
            }
            store::write_product(&mut tx, &product, &next, &mut fence).await?;
            tx.commit().await?;
            tracing::warn!(sku, saga = holder, lock_state = state_name, cancelled, "released an expired semantic lock");
            Ok(Some((state_name, cancelled)))
        })
        .await;
        match outcome {
            Ok(Some((state_name, cancelled))) => {
                counter!(SWEPT_LOCKS, "state" => state_name).increment(1);
                report.released_locks += 1;
                report.cancelled_reservations += cancelled;
            }
            Ok(None) => {}
            Err(err) => {
                tracing::warn!(sku, error = %err, "could not release an expired semantic lock; the next sweep retries");
                report.failed += 1;
            }
        }
    }
    Ok(report)
}

/// Sweeps every `config.interval` until the task is aborted (a zero interval starts no task).
pub fn spawn(state: AppState, config: SweeperConfig) -> Option<JoinHandle<()>> {
    if config.interval.is_zero() {
        return None;
    }
    Some(tokio::spawn(async move {
        let mut ticks = tokio::time::interval(config.interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            match sweep_once(&state, config.max_age).await {
                Ok(report) if report != SweepReport::default() => tracing::info!(?report, "sweep finished"),
                Ok(_) => {}
                Err(err) => tracing::warn!(error = %err, "sweep failed; retrying at the next interval"),
            }
        }
    }))
}
