//! A distributed lock over Redis whose every acquisition carries a fencing token, so a holder that lost its lock
//! without noticing cannot overwrite what the next holder wrote.
//!
//! # Redis layout
//!
//! - `lock:<key>` holds a random token of the current holder and expires after the lease. Only a holder that
//!   knows the token can renew (`PEXPIRE`) or release (`DEL`) it; both are compare-and-act Lua scripts.
//! - `fence:<key>` counts acquisitions. It is incremented in the same script that takes the lock and never
//!   expires, so fencing tokens of one key only ever grow. It is one small integer per key name.
//!
//! # Leases and the watchdog
//!
//! A lock is taken for a lease (default 30 s). While the guard lives, a watchdog task renews the lease (default
//! every 10 s). If a renewal says the lock is no longer ours, fails, or cannot be confirmed before the previous
//! lease runs out, the watchdog signals the holder: [`LockGuard::lost`] / [`Held::lost`] complete and
//! [`Locks::run`] abandons the work. The holder must stop and must not commit anything it has not already.
//!
//! # Fencing
//!
//! Mutual exclusion alone does not protect data: a holder can be paused (a stalled network, an overloaded node,
//! a Redis failover that lost the key) for longer than its lease, and wake up still believing it holds the lock
//! while someone else does. Fencing closes that gap on the database side. Protected rows carry
//! `last_fence BIGINT NOT NULL DEFAULT 0`, and every write made under the lock is conditional on it:
//!
//! ```sql
//! UPDATE stock SET reserved = $1, last_fence = $2 WHERE sku = $3 AND last_fence <= $2
//! -- upserts:
//! INSERT INTO stock AS s (sku, reserved, last_fence) VALUES ($3, $1, $2)
//!   ON CONFLICT (sku) DO UPDATE SET reserved = EXCLUDED.reserved, last_fence = EXCLUDED.last_fence
//!   WHERE s.last_fence <= EXCLUDED.last_fence
//! ```
//!
//! Once a newer holder has written a row, a stale holder's write matches no row, and [`fenced_rows`] turns that
//! into [`LockError::Fenced`]. The comparison is `<=`, not `<`: fencing tokens are unique per acquisition, so
//! `<=` admits only the current holder writing the same row again, which `<` would wrongly reject as stale.
//! A write that matches no row because the row does not exist looks the same; check existence first where that
//! can happen.
//!
//! Fencing is as durable as `fence:<key>`: if Redis loses it (no persistence, a flushed database), new tokens
//! restart low and every fenced write of that key is rejected, which is safe but stuck until the counter is set
//! above the largest `last_fence` stored.
//!
//! # Commit, then release
//!
//! Committing is the holder's job and must happen before the lock is released: release first and another
//! holder may read the old state. [`Locks::run`] releases after the work future has completed, so commit inside
//! it. Dropping a [`LockGuard`] without [`LockGuard::release`] (a panic, a cancelled request) stops the renewals
//! but leaves the lock in Redis until its lease runs out: the holder's writes may still be in flight, and keeping
//! others out for one more lease is the cautious choice.
//!
//! Waiting is polling with short randomized backoff, not a queue: under sustained contention a waiter can lose
//! repeatedly, and its wait is bounded by the timeout it passed.
//!
//! ```no_run
//! # async fn demo(conn: redis::aio::ConnectionManager, pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use kubesaga_kit::lock::{Locks, fenced_rows};
//!
//! let locks = Locks::new(conn);
//! let outcome = locks
//!     .run("sku:42", Duration::from_secs(2), |held| async move {
//!         let mut tx = pool.begin().await?;
//!         let sql = "UPDATE stock SET reserved = reserved + 1, last_fence = $1 WHERE sku = $2 AND last_fence <= $1";
//!         let result = sqlx::query(sql)
//!             .bind(held.fence())
//!             .bind("42")
//!             .execute(&mut *tx)
//!             .await?;
//!         fenced_rows(result, held.fence())?;
//!         tx.commit().await?;
//!         Ok::<_, Box<dyn std::error::Error>>(())
//!     })
//!     .await?;
//! outcome?;
//! # Ok(()) }
//! ```

use std::{
    future::Future,
    sync::{Arc, LazyLock},
    time::Duration,
};

use metrics::{counter, histogram};
use redis::{Script, aio::ConnectionManager};
use sqlx::postgres::PgQueryResult;
use tokio::{task::JoinHandle, time::Instant};
use tokio_util::sync::CancellationToken;

use crate::problem::Problem;

/// Names of the lock metrics, for dashboards and tests.
pub mod metric_names {
    /// Histogram: seconds from asking for a lock until it was acquired or the wait gave up, by `outcome`
    /// (`acquired`, `timeout`, `error`).
    pub const WAIT_SECONDS: &str = "kubesaga_lock_wait_seconds";
    /// Counter: locks acquired.
    pub const ACQUIRED: &str = "kubesaga_lock_acquired_total";
    /// Counter: locks lost while held, by `reason` (`taken`: the key expired or holds another token,
    /// `redis_error`, `unconfirmed`: no renewal answer before the lease ran out).
    pub const LOST: &str = "kubesaga_lock_lost_total";
}

/// `SET NX PX` and, only when that took the lock, `INCR` of the fence: one round trip, and no fencing token is
/// ever handed out for an acquisition that did not happen. Answers `{1, fence}`, or `{0, pttl}` when held.
static ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
          return {1, redis.call('INCR', KEYS[2])}
        end
        return {0, redis.call('PTTL', KEYS[1])}
        ",
    )
});

static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        if redis.call('GET', KEYS[1]) == ARGV[1] then
          return redis.call('PEXPIRE', KEYS[1], ARGV[2])
        end
        return 0
        ",
    )
});

static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        if redis.call('GET', KEYS[1]) == ARGV[1] then
          return redis.call('DEL', KEYS[1])
        end
        return 0
        ",
    )
});

/// Lease, renewal and retry timing of [`Locks`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockConfig {
    /// How long a lock outlives its holder's last renewal. At least 1 ms.
    pub lease: Duration,
    /// How often the watchdog renews the lease. Shorter than `lease`, so one slow renewal does not lose it.
    pub renew_every: Duration,
    /// First backoff step while waiting for a held lock.
    pub retry_min: Duration,
    /// Largest backoff step while waiting for a held lock.
    pub retry_max: Duration,
}

impl Default for LockConfig {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(30),
            renew_every: Duration::from_secs(10),
            retry_min: Duration::from_millis(10),
            retry_max: Duration::from_millis(200),
        }
    }
}

impl LockConfig {
    fn validate(&self) -> Result<(), LockError> {
        if self.lease < Duration::from_millis(1) || i64::try_from(self.lease.as_millis()).is_err() {
            return Err(LockError::Config("lease must be between 1 ms and i64::MAX ms"));
        }
        if self.renew_every.is_zero() || self.renew_every >= self.lease {
            return Err(LockError::Config("renew_every must be positive and shorter than lease"));
        }
        if self.retry_min.is_zero() || self.retry_max < self.retry_min {
            return Err(LockError::Config("retry_min must be positive and no larger than retry_max"));
        }
        Ok(())
    }

    fn lease_ms(&self) -> i64 {
        // validate() bounds the lease, so saturating never changes it.
        i64::try_from(self.lease.as_millis()).unwrap_or(i64::MAX)
    }
}

/// Why taking, keeping or using a lock failed.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Someone else held the lock for the whole wait.
    #[error("lock {key:?} is held by someone else; gave up after waiting {waited:?}")]
    Timeout {
        /// The lock's key.
        key: String,
        /// How long the caller waited.
        waited: Duration,
        /// How long the current holder's lease still ran when the wait gave up, if Redis said.
        holder_lease_left: Option<Duration>,
    },
    /// The lock was lost while held (lease ran out, renewal failed, or it was released by someone else), or was
    /// no longer ours at release. Work done under it after that point is not protected by the lock.
    #[error("lock {key:?} was lost while held (its lease ran out or could not be renewed)")]
    Lost {
        /// The lock's key.
        key: String,
    },
    /// A fenced write matched no row: a holder with a newer fencing token has written since.
    #[error("write with fencing token {fence} was rejected: a newer lock holder has written since")]
    Fenced {
        /// The stale token.
        fence: i64,
    },
    /// Redis failed or did not answer.
    #[error("Redis failed while handling a lock: {0}")]
    Redis(#[from] redis::RedisError),
    /// The [`LockConfig`] is inconsistent.
    #[error("invalid lock configuration: {0}")]
    Config(&'static str),
}

impl LockError {
    /// A default answer for an HTTP API: 503 with `Retry-After` for a busy or lost lock and for Redis trouble
    /// (retrying soon is the fix), 409 for a fenced write (the resource changed under the caller). A service
    /// with a more precise answer maps the variants itself.
    pub fn problem(&self) -> Problem {
        match self {
            Self::Timeout { .. } => Problem::unavailable("the resource is busy with another request; retry shortly"),
            Self::Lost { .. } => Problem::unavailable("the request was interrupted before it finished; retry it"),
            Self::Fenced { .. } => {
                Problem::version_conflict("the resource was changed by a newer request; read it again and retry")
            }
            Self::Redis(_) => Problem::unavailable("the lock service is unavailable; retry shortly"),
            Self::Config(_) => Problem::internal(self),
        }
    }
}

impl From<LockError> for Problem {
    fn from(err: LockError) -> Self {
        err.problem()
    }
}

/// Checks the result of a fenced write (see the [module docs](self)): `Ok(rows)` when it matched at least one
/// row, [`LockError::Fenced`] when it matched none because a newer holder had written.
pub fn fenced_rows(result: PgQueryResult, fence: i64) -> Result<u64, LockError> {
    match result.rows_affected() {
        0 => Err(LockError::Fenced { fence }),
        rows => Ok(rows),
    }
}

/// Takes locks on a shared Redis connection. Cheap to clone.
#[derive(Clone)]
pub struct Locks {
    conn: ConnectionManager,
    config: LockConfig,
}

impl std::fmt::Debug for Locks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Locks").field("config", &self.config).finish_non_exhaustive()
    }
}

impl Locks {
    /// Locks with the default [`LockConfig`] (30 s lease, renewed every 10 s).
    pub fn new(conn: ConnectionManager) -> Self {
        Self { conn, config: LockConfig::default() }
    }

    /// Locks with the given timing; [`LockError::Config`] when it is inconsistent.
    pub fn with_config(conn: ConnectionManager, config: LockConfig) -> Result<Self, LockError> {
        config.validate()?;
        Ok(Self { conn, config })
    }

    /// The timing in use.
    pub fn config(&self) -> &LockConfig {
        &self.config
    }

    /// Takes the lock if it is free, without waiting: `None` when someone else holds it.
    pub async fn try_acquire(&self, key: &str) -> Result<Option<LockGuard>, LockError> {
        match self.acquire(key, Duration::ZERO).await {
            Ok(guard) => Ok(Some(guard)),
            Err(LockError::Timeout { .. }) => Ok(None),
            Err(err) => Err(err),
        }
    }

    /// Takes the lock, retrying with short randomized backoff for up to `wait` (`Duration::ZERO`: one attempt).
    /// [`LockError::Timeout`] when it stayed held. The returned guard is renewed by a watchdog until released or
    /// dropped.
    pub async fn acquire(&self, key: &str, wait: Duration) -> Result<LockGuard, LockError> {
        let started = Instant::now();
        let deadline = started + wait;
        let mut backoff = Backoff::new(self.config.retry_min, self.config.retry_max);
        let outcome = loop {
            let token = format!("{:032x}", rand::random::<u128>());
            let sent = Instant::now();
            match self.attempt(key, &token).await {
                Ok(Attempt::Acquired(fence)) => break Ok(self.guard(key, token, fence, sent)),
                Ok(Attempt::Held(lease_left)) => {
                    let now = Instant::now();
                    if now >= deadline {
                        let waited = now - started;
                        break Err(LockError::Timeout { key: key.to_owned(), waited, holder_lease_left: lease_left });
                    }
                    tokio::time::sleep(backoff.next_delay().min(deadline - now)).await;
                }
                Err(err) => {
                    // The script may have run even though its answer was lost; free the lock if it did, so it
                    // does not sit taken for a whole lease.
                    let _ = self.release_token(key, &token).await;
                    break Err(LockError::Redis(err));
                }
            }
        };
        let label = match &outcome {
            Ok(_) => "acquired",
            Err(LockError::Timeout { .. }) => "timeout",
            Err(_) => "error",
        };
        histogram!(metric_names::WAIT_SECONDS, "outcome" => label).record(started.elapsed().as_secs_f64());
        if outcome.is_ok() {
            counter!(metric_names::ACQUIRED).increment(1);
        }
        outcome
    }

    /// Runs `work` under the lock: acquires it (waiting up to `wait`), runs `work` with the [`Held`] lock, and
    /// releases it once `work` has completed, so `work` must commit what it writes before it returns.
    ///
    /// If the lock is lost while `work` runs, `work` is dropped at its next await point (an open transaction is
    /// rolled back) and [`LockError::Lost`] is returned. If `work` completed but the lock turns out to be gone at
    /// release, the result stands (its fenced writes were checked) and the anomaly is logged.
    pub async fn run<F, Fut, T>(&self, key: &str, wait: Duration, work: F) -> Result<T, LockError>
    where
        F: FnOnce(Held) -> Fut,
        Fut: Future<Output = T>,
    {
        let guard = self.acquire(key, wait).await?;
        let work = work(guard.held());
        let output = tokio::select! {
            biased;
            output = work => output,
            () = guard.lost() => return Err(LockError::Lost { key: key.to_owned() }),
        };
        if let Err(err) = guard.release().await {
            tracing::warn!(key, error = %err, "lock could not be released cleanly after the work completed");
        }
        Ok(output)
    }

    async fn attempt(&self, key: &str, token: &str) -> Result<Attempt, redis::RedisError> {
        let mut conn = self.conn.clone();
        let (acquired, value): (i64, i64) = ACQUIRE
            .key(lock_key(key))
            .key(fence_key(key))
            .arg(token)
            .arg(self.config.lease_ms())
            .invoke_async(&mut conn)
            .await?;
        Ok(if acquired == 1 {
            Attempt::Acquired(value)
        } else {
            // PTTL is negative when the key has no expiry (set by hand) or vanished meanwhile.
            Attempt::Held(u64::try_from(value).ok().map(Duration::from_millis))
        })
    }

    async fn release_token(&self, key: &str, token: &str) -> Result<bool, redis::RedisError> {
        release_token(&mut self.conn.clone(), key, token).await
    }

    fn guard(&self, key: &str, token: String, fence: i64, sent: Instant) -> LockGuard {
        let held = Held { inner: Arc::new(HeldInner { key: key.to_owned(), fence, lost: CancellationToken::new() }) };
        let watchdog = tokio::spawn(watchdog(
            self.conn.clone(),
            key.to_owned(),
            token.clone(),
            self.config,
            sent,
            held.inner.lost.clone(),
        ));
        LockGuard { conn: self.conn.clone(), token, held, watchdog }
    }
}

enum Attempt {
    Acquired(i64),
    Held(Option<Duration>),
}

/// What work running under a lock needs: its fencing token and the signal that the lock was lost. Cheap to clone,
/// so it can move into spawned tasks.
#[derive(Clone, Debug)]
pub struct Held {
    inner: Arc<HeldInner>,
}

#[derive(Debug)]
struct HeldInner {
    key: String,
    fence: i64,
    lost: CancellationToken,
}

impl Held {
    /// The lock's key.
    pub fn key(&self) -> &str {
        &self.inner.key
    }

    /// The fencing token of this acquisition: larger than that of every earlier acquisition of the key. Stamp it on
    /// every write the lock protects (see the [module docs](self)); `i64` because it binds to `BIGINT`.
    pub fn fence(&self) -> i64 {
        self.inner.fence
    }

    /// Whether the lock is known to be lost (or was released or dropped).
    pub fn is_lost(&self) -> bool {
        self.inner.lost.is_cancelled()
    }

    /// Completes when the lock is lost (or released or dropped); select on it to stop work that must not go on
    /// without the lock.
    pub async fn lost(&self) {
        self.inner.lost.cancelled().await;
    }

    /// A token cancelled when the lock is lost, for APIs that take a [`CancellationToken`]. It is a child token:
    /// cancelling it does not affect the lock.
    pub fn cancellation_token(&self) -> CancellationToken {
        self.inner.lost.child_token()
    }
}

/// A held lock. Renewed by a watchdog task until [`release`](Self::release)d or dropped; dropping it without
/// release stops the renewals and leaves the lock to expire after its lease (see the [module docs](self)).
#[derive(Debug)]
pub struct LockGuard {
    conn: ConnectionManager,
    token: String,
    held: Held,
    watchdog: JoinHandle<()>,
}

impl LockGuard {
    /// The lock's key.
    pub fn key(&self) -> &str {
        self.held.key()
    }

    /// The fencing token of this acquisition; see [`Held::fence`].
    pub fn fence(&self) -> i64 {
        self.held.fence()
    }

    /// Whether the lock is known to be lost.
    pub fn is_lost(&self) -> bool {
        self.held.is_lost()
    }

    /// Completes when the lock is lost; see [`Held::lost`].
    pub async fn lost(&self) {
        self.held.lost().await;
    }

    /// A cloneable view for work running under this lock.
    pub fn held(&self) -> Held {
        self.held.clone()
    }

    /// Releases the lock if it is still ours. Commit what the lock protects first. [`LockError::Lost`] when it was
    /// no longer ours (it expired, maybe taken by someone else, whose lock stays untouched).
    pub async fn release(self) -> Result<(), LockError> {
        // Stop renewing before deleting, so the watchdog cannot act on a lock that is gone.
        self.watchdog.abort();
        self.held.inner.lost.cancel();
        let mut conn = self.conn.clone();
        if release_token(&mut conn, self.key(), &self.token).await? {
            Ok(())
        } else {
            Err(LockError::Lost { key: self.key().to_owned() })
        }
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        self.watchdog.abort();
        self.held.inner.lost.cancel();
    }
}

/// Renews the lease every `renew_every` until aborted. Each renewal must be confirmed before the previous lease
/// (counted from when its request was sent, which is no later than Redis started it) runs out; otherwise the
/// holder cannot know it still holds the lock and is told it lost it.
async fn watchdog(
    mut conn: ConnectionManager,
    key: String,
    token: String,
    config: LockConfig,
    acquired_sent: Instant,
    lost: CancellationToken,
) {
    let lock_key = lock_key(&key);
    let mut last_sent = acquired_sent;
    let reason = loop {
        tokio::time::sleep_until(last_sent + config.renew_every).await;
        let sent = Instant::now();
        let mut renewal = RENEW.key(&lock_key);
        renewal.arg(&token).arg(config.lease_ms());
        match tokio::time::timeout_at(last_sent + config.lease, renewal.invoke_async::<i64>(&mut conn)).await {
            Ok(Ok(1)) => last_sent = sent,
            Ok(Ok(_)) => break "taken",
            Ok(Err(err)) => {
                tracing::warn!(key, error = %err, "lock renewal failed; cancelling the holder's work");
                break "redis_error";
            }
            Err(_) => break "unconfirmed",
        }
    };
    tracing::warn!(key, reason, "lock lost while held");
    counter!(metric_names::LOST, "reason" => reason).increment(1);
    lost.cancel();
}

async fn release_token(conn: &mut ConnectionManager, key: &str, token: &str) -> Result<bool, redis::RedisError> {
    let deleted: i64 = RELEASE.key(lock_key(key)).arg(token).invoke_async(conn).await?;
    Ok(deleted == 1)
}

fn lock_key(key: &str) -> String {
    format!("lock:{key}")
}

fn fence_key(key: &str) -> String {
    format!("fence:{key}")
}

/// Exponential backoff with "equal jitter": half of each step is fixed, so waiters never spin, and half is random,
/// so waiters that collided spread out.
#[derive(Debug)]
pub(crate) struct Backoff {
    step: Duration,
    max: Duration,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration) -> Self {
        Self { step: min, max }
    }

    pub(crate) fn next_delay(&mut self) -> Duration {
        let half = self.step / 2;
        self.step = (self.step * 2).min(self.max);
        let jitter_us = u64::try_from(half.as_micros()).unwrap_or(u64::MAX);
        half + Duration::from_micros(rand::random_range(0..=jitter_us))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_stays_within_its_bounds_and_grows() {
        let mut backoff = Backoff::new(Duration::from_millis(10), Duration::from_millis(80));
        let delays: Vec<_> = (0..8).map(|_| backoff.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(5) && delays[0] <= Duration::from_millis(10), "{delays:?}");
        assert!(delays.iter().all(|d| *d <= Duration::from_millis(80)), "{delays:?}");
        assert!(delays[7] >= Duration::from_millis(40), "{delays:?}");
    }

    #[test]
    fn inconsistent_configs_are_refused() {
        let base = LockConfig::default();
        assert!(base.validate().is_ok());
        let bad = [
            LockConfig { lease: Duration::ZERO, ..base },
            LockConfig { renew_every: base.lease, ..base },
            LockConfig { renew_every: Duration::ZERO, ..base },
            LockConfig { retry_min: Duration::ZERO, ..base },
            LockConfig { retry_max: Duration::from_millis(1), ..base },
        ];
        for config in bad {
            assert!(matches!(config.validate(), Err(LockError::Config(_))), "{config:?}");
        }
    }

    #[test]
    fn problems_for_lock_errors() {
        use axum::http::StatusCode;
        let timeout = LockError::Timeout { key: "k".into(), waited: Duration::ZERO, holder_lease_left: None };
        assert_eq!(timeout.problem().status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(LockError::Fenced { fence: 3 }.problem().status, StatusCode::CONFLICT);
        assert_eq!(Problem::from(LockError::Lost { key: "k".into() }).status, StatusCode::SERVICE_UNAVAILABLE);
    }
}
