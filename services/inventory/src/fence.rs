//! Recovery for a fencing counter that fell behind the rows it protects.
//!
//! The kit's lock hands out fencing tokens from `fence:<key>` in Redis. When Redis loses that counter (a restart
//! without persistence, a flush), new tokens restart low and every fenced write of the key is refused for good.
//! Raising the counter to the largest token a row carries is always safe: tokens stay unique and keep growing,
//! and a holder that really is stale is still refused. So whenever a write is fenced off, the counter is raised
//! to the row's token, and the retry the client is told to make succeeds.

use std::sync::LazyLock;

use redis::Script;

use crate::{AppState, store};

/// `SET` the counter to `ARGV[1]` only if that is larger, in one step.
static RAISE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        local current = tonumber(redis.call('GET', KEYS[1]) or '0')
        local wanted = tonumber(ARGV[1])
        if current < wanted then
          redis.call('SET', KEYS[1], ARGV[1])
          return 1
        end
        return 0
        ",
    )
});

/// After a write with token `fence` under the lock `key` was refused: raise the counter if the row of `sku`
/// carries a larger token than the counter has. Failures are logged; the next fenced write tries again.
pub(crate) async fn catch_up(state: &AppState, key: &str, sku: &str, fence: i64) {
    let stored = match state.pool.acquire().await {
        Ok(mut conn) => store::product(&mut conn, sku).await.map(|row| row.map(|row| row.last_fence)),
        Err(err) => Err(err),
    };
    let stored = match stored {
        Ok(Some(stored)) if stored >= fence => stored,
        Ok(_) => return,
        Err(err) => {
            tracing::warn!(sku, error = %err, "could not read the row's fencing token");
            return;
        }
    };
    // The kit documents the counter's key as `fence:<lock key>`.
    let mut conn = state.redis.clone();
    match RAISE.key(format!("fence:{key}")).arg(stored).invoke_async::<i64>(&mut conn).await {
        Ok(1) => tracing::warn!(sku, fence, stored, "fencing counter was behind the stored token; raised it"),
        Ok(_) => {}
        Err(err) => tracing::warn!(sku, error = %err, "could not raise the fencing counter"),
    }
}
