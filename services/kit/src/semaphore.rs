//! A counting semaphore over Redis whose permits expire, capping how many holders across all replicas use a shared
//! resource at once (the payment gateway takes at most 10 calls in flight).
//!
//! # Redis layout
//!
//! `semaphore:<name>` is a sorted set of permit ids scored by their expiry in milliseconds of Redis server time,
//! so replicas' clocks never matter. Acquiring is one Lua script: drop expired permits, and if fewer than `limit`
//! remain, add a random permit id expiring one lease from now. A holder that crashes never releases its permit;
//! it simply expires after its lease and comes back. The set itself expires once its last permit would have,
//! so idle semaphores leave nothing behind.
//!
//! # Holding a permit
//!
//! Choose a lease longer than the work a permit covers (e.g. the gateway client's timeout), or
//! [`renew`](Permit::renew) it: once a permit has expired another caller may take its place, and the cap is no
//! longer enforced for the late holder. Release with [`Permit::release`]. Dropping a permit releases it on a
//! spawned task, best effort: without a Tokio runtime at hand, or if Redis fails, it expires after its lease
//! instead.
//!
//! Waiting is polling with short randomized backoff, not a queue. A caller that gives up gets
//! [`SemaphoreError::Saturated`], which [`SemaphoreError::problem`] turns into 429 with `Retry-After`.
//!
//! ```no_run
//! # async fn demo(conn: redis::aio::ConnectionManager) -> Result<(), kubesaga_kit::problem::Problem> {
//! use std::time::Duration;
//! use kubesaga_kit::semaphore::Semaphore;
//!
//! let gateway = Semaphore::new(conn, "payment-gateway");
//! let permit = gateway.acquire(Duration::from_millis(500)).await?; // 429 + Retry-After when saturated
//! // ... call the gateway ...
//! let _ = permit.release().await;
//! # Ok(()) }
//! ```

use std::{
    sync::{Arc, LazyLock},
    time::Duration,
};

use metrics::{counter, histogram};
use redis::{AsyncCommands, Script, aio::ConnectionManager};
use tokio::time::Instant;

use crate::{lock::Backoff, problem::Problem};

/// Names of the semaphore metrics, for dashboards and tests. All carry a `semaphore` label with its name.
pub mod metric_names {
    /// Counter: acquisitions that gave up because every permit stayed taken for the whole wait.
    pub const SATURATED: &str = "kubesaga_semaphore_saturated_total";
    /// Histogram: seconds from asking for a permit until it was granted or the wait gave up, by `outcome`
    /// (`acquired`, `saturated`, `error`).
    pub const WAIT_SECONDS: &str = "kubesaga_semaphore_wait_seconds";
}

/// The limit the payment gateway imposes on calls in flight, used unless configured otherwise.
pub const DEFAULT_LIMIT: u32 = 10;

/// Answers `{1, lease}` when a permit was added, `{0, ms until the earliest permit expires}` when all are taken.
static ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        local time = redis.call('TIME')
        local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
        local lease = tonumber(ARGV[2])
        redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
        if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
          redis.call('ZADD', KEYS[1], now + lease, ARGV[3])
          if redis.call('PTTL', KEYS[1]) < lease then
            redis.call('PEXPIRE', KEYS[1], lease)
          end
          return {1, lease}
        end
        local earliest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
        return {0, tonumber(earliest[2]) - now}
        ",
    )
});

/// Extends a permit that has not expired yet; an expired one may already have been replaced, so it stays lost.
static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        local time = redis.call('TIME')
        local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
        local lease = tonumber(ARGV[2])
        local expiry = redis.call('ZSCORE', KEYS[1], ARGV[1])
        if expiry and tonumber(expiry) > now then
          redis.call('ZADD', KEYS[1], 'XX', now + lease, ARGV[1])
          if redis.call('PTTL', KEYS[1]) < lease then
            redis.call('PEXPIRE', KEYS[1], lease)
          end
          return 1
        end
        return 0
        ",
    )
});

/// Limit, lease and retry timing of a [`Semaphore`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SemaphoreConfig {
    /// Permits that may be held at once. At least 1.
    pub limit: u32,
    /// How long a permit lasts unless renewed or released. At least 1 ms.
    pub lease: Duration,
    /// First backoff step while waiting for a permit.
    pub retry_min: Duration,
    /// Largest backoff step while waiting for a permit.
    pub retry_max: Duration,
}

impl Default for SemaphoreConfig {
    fn default() -> Self {
        Self {
            limit: DEFAULT_LIMIT,
            lease: Duration::from_secs(30),
            retry_min: Duration::from_millis(10),
            retry_max: Duration::from_millis(200),
        }
    }
}

impl SemaphoreConfig {
    fn validate(&self) -> Result<(), SemaphoreError> {
        if self.limit == 0 {
            return Err(SemaphoreError::Config("limit must be at least 1"));
        }
        if self.lease < Duration::from_millis(1) || i64::try_from(self.lease.as_millis()).is_err() {
            return Err(SemaphoreError::Config("lease must be between 1 ms and i64::MAX ms"));
        }
        if self.retry_min.is_zero() || self.retry_max < self.retry_min {
            return Err(SemaphoreError::Config("retry_min must be positive and no larger than retry_max"));
        }
        Ok(())
    }

    fn lease_ms(&self) -> i64 {
        // validate() bounds the lease, so saturating never changes it.
        i64::try_from(self.lease.as_millis()).unwrap_or(i64::MAX)
    }
}

/// Why a permit could not be taken or kept.
#[derive(Debug, thiserror::Error)]
pub enum SemaphoreError {
    /// Every permit stayed taken for the whole wait.
    #[error("all {limit} permits of semaphore {name:?} are taken; gave up after waiting {waited:?}")]
    Saturated {
        /// The semaphore's name.
        name: String,
        /// Its limit.
        limit: u32,
        /// How long the caller waited.
        waited: Duration,
        /// When the earliest held permit expires at the latest (sooner if it is released): an upper bound on
        /// when a permit frees up, unless it is renewed.
        retry_after: Duration,
    },
    /// The permit expired before it was renewed or released, so another caller may have taken its place.
    #[error("permit of semaphore {name:?} expired while held")]
    Lost {
        /// The semaphore's name.
        name: String,
    },
    /// Redis failed or did not answer.
    #[error("Redis failed while handling a semaphore: {0}")]
    Redis(#[from] redis::RedisError),
    /// The [`SemaphoreConfig`] is inconsistent.
    #[error("invalid semaphore configuration: {0}")]
    Config(&'static str),
}

impl SemaphoreError {
    /// The answer for an HTTP API: 429 with `Retry-After` (at least 1 s) when saturated, 503 when Redis failed or
    /// a permit was lost mid-way (retrying is the fix), 500 for a bad configuration.
    pub fn problem(&self) -> Problem {
        match self {
            Self::Saturated { retry_after, .. } => Problem::rate_limited(
                "too many requests are using this resource at once; retry later",
                (*retry_after).max(Duration::from_secs(1)),
            ),
            Self::Lost { .. } => {
                Problem::unavailable("the request held its slot too long and was interrupted; retry it")
            }
            Self::Redis(_) => Problem::unavailable("the rate limiter is unavailable; retry shortly"),
            Self::Config(_) => Problem::internal(self),
        }
    }
}

impl From<SemaphoreError> for Problem {
    fn from(err: SemaphoreError) -> Self {
        err.problem()
    }
}

/// A named semaphore on a shared Redis connection. Cheap to clone.
#[derive(Clone)]
pub struct Semaphore {
    conn: ConnectionManager,
    name: Arc<str>,
    key: Arc<str>,
    config: SemaphoreConfig,
}

impl std::fmt::Debug for Semaphore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Semaphore").field("name", &self.name).field("config", &self.config).finish_non_exhaustive()
    }
}

impl Semaphore {
    /// The semaphore `name` with the default [`SemaphoreConfig`] ([`DEFAULT_LIMIT`] permits, 30 s lease).
    pub fn new(conn: ConnectionManager, name: &str) -> Self {
        Self::build(conn, name, SemaphoreConfig::default())
    }

    /// The semaphore `name` with the given limit and timing; [`SemaphoreError::Config`] when inconsistent. Every
    /// user of one name must use the same limit: each acquisition checks against its own.
    pub fn with_config(conn: ConnectionManager, name: &str, config: SemaphoreConfig) -> Result<Self, SemaphoreError> {
        config.validate()?;
        Ok(Self::build(conn, name, config))
    }

    fn build(conn: ConnectionManager, name: &str, config: SemaphoreConfig) -> Self {
        Self { conn, name: name.into(), key: format!("semaphore:{name}").into(), config }
    }

    /// The semaphore's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The limit and timing in use.
    pub fn config(&self) -> &SemaphoreConfig {
        &self.config
    }

    /// Takes a permit if one is free, without waiting: `None` when all are taken. Use
    /// `acquire(Duration::ZERO)` to get the [`SemaphoreError::Saturated`] details instead.
    pub async fn try_acquire(&self) -> Result<Option<Permit>, SemaphoreError> {
        match self.acquire(Duration::ZERO).await {
            Ok(permit) => Ok(Some(permit)),
            Err(SemaphoreError::Saturated { .. }) => Ok(None),
            Err(err) => Err(err),
        }
    }

    /// Takes a permit, retrying with short randomized backoff for up to `wait` (`Duration::ZERO`: one attempt).
    /// [`SemaphoreError::Saturated`] when every permit stayed taken.
    pub async fn acquire(&self, wait: Duration) -> Result<Permit, SemaphoreError> {
        let started = Instant::now();
        let deadline = started + wait;
        let mut backoff = Backoff::new(self.config.retry_min, self.config.retry_max);
        let outcome = loop {
            let id = format!("{:032x}", rand::random::<u128>());
            match self.attempt(&id).await {
                Ok(None) => break Ok(Permit { semaphore: self.clone(), id, released: false }),
                Ok(Some(earliest_expiry)) => {
                    let now = Instant::now();
                    if now >= deadline {
                        break Err(SemaphoreError::Saturated {
                            name: self.name.to_string(),
                            limit: self.config.limit,
                            waited: now - started,
                            retry_after: earliest_expiry,
                        });
                    }
                    tokio::time::sleep(backoff.next_delay().min(deadline - now)).await;
                }
                Err(err) => {
                    // The script may have added the permit even though its answer was lost; take it back so it
                    // does not occupy a slot for a whole lease.
                    let _: Result<i64, _> = self.conn.clone().zrem(&*self.key, &id).await;
                    break Err(SemaphoreError::Redis(err));
                }
            }
        };
        let label = match &outcome {
            Ok(_) => "acquired",
            Err(SemaphoreError::Saturated { .. }) => "saturated",
            Err(_) => "error",
        };
        let name = self.name.to_string();
        histogram!(metric_names::WAIT_SECONDS, "semaphore" => name.clone(), "outcome" => label)
            .record(started.elapsed().as_secs_f64());
        if label == "saturated" {
            counter!(metric_names::SATURATED, "semaphore" => name).increment(1);
        }
        outcome
    }

    /// `None` when the permit was added, else how long until the earliest held permit expires.
    async fn attempt(&self, id: &str) -> Result<Option<Duration>, redis::RedisError> {
        let mut conn = self.conn.clone();
        let (acquired, value): (i64, i64) = ACQUIRE
            .key(&*self.key)
            .arg(self.config.limit)
            .arg(self.config.lease_ms())
            .arg(id)
            .invoke_async(&mut conn)
            .await?;
        Ok(if acquired == 1 { None } else { Some(Duration::from_millis(u64::try_from(value).unwrap_or(0))) })
    }
}

/// A held permit of a [`Semaphore`]. Release it with [`release`](Self::release); dropping it releases it best
/// effort on a spawned task (see the [module docs](self)).
#[derive(Debug)]
pub struct Permit {
    semaphore: Semaphore,
    id: String,
    released: bool,
}

impl Permit {
    /// The permit's random id, its member in the Redis sorted set.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Extends the permit to one full lease from now. [`SemaphoreError::Lost`] when it had already expired: its
    /// slot may be someone else's by now, so the holder should stop using the resource.
    pub async fn renew(&self) -> Result<(), SemaphoreError> {
        let mut conn = self.semaphore.conn.clone();
        let renewed: i64 = RENEW
            .key(&*self.semaphore.key)
            .arg(&self.id)
            .arg(self.semaphore.config.lease_ms())
            .invoke_async(&mut conn)
            .await?;
        if renewed == 1 { Ok(()) } else { Err(SemaphoreError::Lost { name: self.semaphore.name.to_string() }) }
    }

    /// Gives the permit back. [`SemaphoreError::Lost`] when it had already expired (the holder overran its lease,
    /// so the limit may have been exceeded meanwhile).
    pub async fn release(mut self) -> Result<(), SemaphoreError> {
        self.released = true;
        let removed: i64 = self.semaphore.conn.clone().zrem(&*self.semaphore.key, &self.id).await?;
        if removed == 1 { Ok(()) } else { Err(SemaphoreError::Lost { name: self.semaphore.name.to_string() }) }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        // Without a runtime the permit cannot be released here; its lease bounds how long the slot stays taken.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let mut conn = self.semaphore.conn.clone();
            let key = Arc::clone(&self.semaphore.key);
            let id = std::mem::take(&mut self.id);
            runtime.spawn(async move {
                if let Err(err) = conn.zrem::<_, _, i64>(&*key, &id).await {
                    tracing::warn!(key = &*key, error = %err, "dropped permit not released; it expires with its lease");
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inconsistent_configs_are_refused() {
        let base = SemaphoreConfig::default();
        assert_eq!(base.limit, 10);
        assert!(base.validate().is_ok());
        for config in [
            SemaphoreConfig { limit: 0, ..base },
            SemaphoreConfig { lease: Duration::ZERO, ..base },
            SemaphoreConfig { retry_min: Duration::ZERO, ..base },
        ] {
            assert!(matches!(config.validate(), Err(SemaphoreError::Config(_))), "{config:?}");
        }
    }

    #[test]
    fn saturation_is_429_with_at_least_a_second_to_wait() {
        use axum::http::StatusCode;
        let saturated = |retry_after| SemaphoreError::Saturated {
            name: "gateway".into(),
            limit: 10,
            waited: Duration::ZERO,
            retry_after,
        };
        let problem = saturated(Duration::from_millis(20)).problem();
        assert_eq!(problem.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(problem.retry_after, Some(Duration::from_secs(1)));
        assert_eq!(Problem::from(saturated(Duration::from_secs(7))).retry_after, Some(Duration::from_secs(7)));
    }
}
