//! The distributed lock against the real Redis and Postgres that `make test` provides.

// Helpers outside the test functions fail the test just as loudly as the tests themselves.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering::SeqCst},
    },
    time::{Duration, Instant},
};

use kubesaga_kit::{
    lock::{LockConfig, LockError, Locks, fenced_rows},
    stores,
};
use kubesaga_testkit::{database_url, redis_url, unique_suffix};
use redis::AsyncCommands;
use sqlx::PgPool;

/// Short leases so expiry and renewal happen within a test's time.
const LEASE: Duration = Duration::from_millis(300);
const RENEW: Duration = Duration::from_millis(100);

async fn new_locks(lease: Duration, renew_every: Duration) -> Locks {
    let conn = stores::redis(&redis_url()).await.expect("connect to Redis");
    let config =
        LockConfig { lease, renew_every, retry_min: Duration::from_millis(5), retry_max: Duration::from_millis(50) };
    Locks::with_config(conn, config).expect("valid config")
}

fn new_key() -> String {
    format!("kubesaga:test:{}", unique_suffix())
}

async fn remove_keys(key: &str) {
    let mut conn = stores::redis(&redis_url()).await.expect("connect to Redis");
    let _: () = conn.del(&[format!("lock:{key}"), format!("fence:{key}")]).await.expect("DEL");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn contenders_never_overlap_and_fences_grow_with_each_acquisition() {
    let locks = new_locks(Duration::from_secs(5), Duration::from_secs(1)).await;
    let key = new_key();
    let inside = Arc::new(AtomicUsize::new(0));
    let most_inside = Arc::new(AtomicUsize::new(0));
    let counter = Arc::new(AtomicUsize::new(0));
    let fences = Arc::new(Mutex::new(Vec::new()));

    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let (locks, key) = (locks.clone(), key.clone());
            let (inside, most_inside, counter, fences) =
                (inside.clone(), most_inside.clone(), counter.clone(), fences.clone());
            tokio::spawn(async move {
                locks
                    .run(&key, Duration::from_secs(30), |held| async move {
                        let now = inside.fetch_add(1, SeqCst) + 1;
                        most_inside.fetch_max(now, SeqCst);
                        fences.lock().unwrap().push(held.fence());
                        // Read, yield, write: overlapping holders would lose increments.
                        let seen = counter.load(SeqCst);
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        counter.store(seen + 1, SeqCst);
                        inside.fetch_sub(1, SeqCst);
                    })
                    .await
                    .expect("every contender gets the lock within the wait")
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("contender task");
    }

    assert_eq!(most_inside.load(SeqCst), 1, "two holders were inside at once");
    assert_eq!(counter.load(SeqCst), 20);
    let fences = fences.lock().unwrap().clone();
    assert_eq!(fences.len(), 20);
    assert!(fences.windows(2).all(|pair| pair[0] < pair[1]), "fences in acquisition order: {fences:?}");
    remove_keys(&key).await;
}

#[tokio::test]
async fn the_watchdog_keeps_a_long_holder_alive_and_nobody_else_gets_in() {
    let locks = new_locks(LEASE, RENEW).await;
    let key = new_key();
    let guard = locks.acquire(&key, Duration::ZERO).await.expect("free lock");

    let rival = tokio::spawn({
        let (locks, key) = (locks.clone(), key.clone());
        async move {
            let mut got_in = 0;
            let until = Instant::now() + 5 * LEASE;
            while Instant::now() < until {
                if let Some(guard) = locks.try_acquire(&key).await.expect("try_acquire") {
                    got_in += 1;
                    guard.release().await.expect("release");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            got_in
        }
    });
    assert_eq!(rival.await.expect("rival task"), 0, "someone acquired the lock while its holder was working");

    assert!(!guard.is_lost(), "the holder lost its lock despite the watchdog");
    guard.release().await.expect("still ours after five leases");
    let next = locks.try_acquire(&key).await.expect("try_acquire").expect("free once released");
    next.release().await.expect("release");
    remove_keys(&key).await;
}

#[tokio::test]
async fn a_crashed_holders_lock_expires_and_the_next_holder_gets_a_higher_fence() {
    let locks = new_locks(LEASE, RENEW).await;
    let key = new_key();
    let crashed = locks.acquire(&key, Duration::ZERO).await.expect("free lock");
    let crashed_fence = crashed.fence();
    // Dropping without release stops the watchdog and leaves the key in Redis, as a crash would.
    drop(crashed);
    assert!(locks.try_acquire(&key).await.expect("try_acquire").is_none(), "a dropped guard must not release");

    let waiting = Instant::now();
    let next = locks.acquire(&key, Duration::from_secs(3)).await.expect("the lease runs out");
    assert!(waiting.elapsed() >= LEASE / 2, "got in after {:?}, before the lease ran out", waiting.elapsed());
    assert!(next.fence() > crashed_fence, "{} after {crashed_fence}", next.fence());
    next.release().await.expect("release");
    remove_keys(&key).await;
}

#[tokio::test]
async fn losing_the_lock_cancels_the_work() {
    let locks = new_locks(LEASE, RENEW).await;
    let key = new_key();
    let redis = stores::redis(&redis_url()).await.expect("connect to Redis");

    let started = Instant::now();
    let outcome = locks
        .run(&key, Duration::ZERO, |_held| {
            let (mut redis, key) = (redis.clone(), key.clone());
            async move {
                let _: () = redis.del(format!("lock:{key}")).await.expect("DEL behind the holder's back");
                tokio::time::sleep(Duration::from_secs(10)).await;
                "finished"
            }
        })
        .await;
    assert!(matches!(outcome, Err(LockError::Lost { .. })), "{outcome:?}");
    assert!(started.elapsed() < Duration::from_secs(2), "cancelled only after {:?}", started.elapsed());

    // The same through a guard: the holder's cancellation fires, and releasing never frees a newer holder's lock.
    let guard = locks.acquire(&key, Duration::ZERO).await.expect("free lock");
    let work = tokio::spawn({
        let cancelled = guard.held().cancellation_token();
        async move {
            tokio::select! {
                () = cancelled.cancelled() => "cancelled",
                () = tokio::time::sleep(Duration::from_secs(10)) => "finished",
            }
        }
    });
    let _: () = redis.clone().del(format!("lock:{key}")).await.expect("DEL behind the holder's back");
    let ended = tokio::time::timeout(Duration::from_secs(2), work).await.expect("work ends").expect("work task");
    assert_eq!(ended, "cancelled");
    assert!(guard.is_lost());

    let newer = locks.acquire(&key, Duration::ZERO).await.expect("free after the delete");
    assert!(matches!(guard.release().await, Err(LockError::Lost { .. })));
    assert!(locks.try_acquire(&key).await.expect("try_acquire").is_none(), "the stale release freed the newer lock");
    newer.release().await.expect("the newer holder releases");
    remove_keys(&key).await;
}

async fn fenced_update(pool: &PgPool, table: &str, writer: &str, fence: i64) -> Result<u64, LockError> {
    let sql = format!("UPDATE {table} SET written_by = $1, last_fence = $2 WHERE id = 1 AND last_fence <= $2");
    let result =
        sqlx::query(sqlx::AssertSqlSafe(sql)).bind(writer).bind(fence).execute(pool).await.expect("UPDATE runs");
    fenced_rows(result, fence)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_holders_write_is_rejected_by_the_fence() {
    let pool = stores::postgres(&database_url(), 2).await.expect("connect to Postgres");
    let table = format!("kubesaga_lock_fence_{}", unique_suffix());
    for sql in [
        format!(
            "CREATE TABLE {table} (id INT PRIMARY KEY, written_by TEXT NOT NULL, last_fence BIGINT NOT NULL DEFAULT 0)"
        ),
        format!("INSERT INTO {table} (id, written_by) VALUES (1, 'nobody')"),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&pool).await.expect("set up the table");
    }
    let key = new_key();

    // Holder A runs alone on a single-threaded runtime, so blocking its thread freezes it whole, watchdog included,
    // as a stop-the-world pause or a stalled node would.
    let (fence_tx, fence_rx) = tokio::sync::oneshot::channel();
    let (resume_tx, resume_rx) = std::sync::mpsc::channel::<()>();
    let holder_a = std::thread::spawn({
        let (key, table) = (key.clone(), table.clone());
        move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            runtime.block_on(async move {
                let locks = new_locks(LEASE, RENEW).await;
                let pool = stores::postgres(&database_url(), 1).await.expect("connect to Postgres");
                let guard = locks.acquire(&key, Duration::ZERO).await.expect("A takes the free lock");
                fence_tx.send(guard.fence()).expect("send A's fence");
                resume_rx.recv().expect("resume A");
                let written = fenced_update(&pool, &table, "A", guard.fence()).await;
                let told_lost = tokio::time::timeout(Duration::from_secs(2), guard.lost()).await.is_ok();
                (written, told_lost)
            })
        }
    });
    let fence_a = fence_rx.await.expect("A's fence");

    let locks = new_locks(LEASE, RENEW).await;
    let guard_b = locks.acquire(&key, Duration::from_secs(5)).await.expect("B gets in once A's lease runs out");
    assert_eq!(guard_b.fence(), fence_a + 1);
    assert_eq!(fenced_update(&pool, &table, "B", guard_b.fence()).await.expect("B's write is current"), 1);
    assert_eq!(fenced_update(&pool, &table, "B", guard_b.fence()).await.expect("B may write again"), 1);
    guard_b.release().await.expect("B releases");

    resume_tx.send(()).expect("wake A");
    let (written_a, told_lost) =
        tokio::task::spawn_blocking(move || holder_a.join().expect("A's thread")).await.expect("join A");
    assert!(matches!(written_a, Err(LockError::Fenced { fence }) if fence == fence_a), "{written_a:?}");
    assert!(told_lost, "A's watchdog did not report the lost lock after the pause");

    let sql = format!("SELECT written_by, last_fence FROM {table} WHERE id = 1");
    let row: (String, i64) = sqlx::query_as(sqlx::AssertSqlSafe(sql)).fetch_one(&pool).await.expect("read the row");
    assert_eq!(row, ("B".to_owned(), fence_a + 1));

    sqlx::query(sqlx::AssertSqlSafe(format!("DROP TABLE {table}"))).execute(&pool).await.expect("drop the table");
    remove_keys(&key).await;
}
