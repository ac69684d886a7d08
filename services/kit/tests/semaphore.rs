//! The Redis semaphore against the real Redis that `make test` provides.

// Helpers outside the test functions fail the test just as loudly as the tests themselves.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering::SeqCst},
    },
    time::{Duration, Instant},
};

use axum::{http::StatusCode, response::IntoResponse};
use kubesaga_kit::{
    semaphore::{Semaphore, SemaphoreConfig, SemaphoreError},
    stores,
};
use kubesaga_testkit::{redis_url, unique_suffix};
use redis::AsyncCommands;

async fn semaphore(limit: u32, lease: Duration) -> Semaphore {
    let conn = stores::redis(&redis_url()).await.expect("connect to Redis");
    let name = format!("kubesaga-test-{}", unique_suffix());
    let config =
        SemaphoreConfig { limit, lease, retry_min: Duration::from_millis(5), retry_max: Duration::from_millis(50) };
    Semaphore::with_config(conn, &name, config).expect("valid config")
}

async fn remove_key(semaphore: &Semaphore) {
    let mut conn = stores::redis(&redis_url()).await.expect("connect to Redis");
    let _: () = conn.del(format!("semaphore:{}", semaphore.name())).await.expect("DEL");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn never_more_holders_than_the_limit() {
    let semaphore = semaphore(10, Duration::from_secs(30)).await;
    let in_use = Arc::new(AtomicUsize::new(0));
    let most_in_use = Arc::new(AtomicUsize::new(0));

    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let (semaphore, in_use, most_in_use) = (semaphore.clone(), in_use.clone(), most_in_use.clone());
            tokio::spawn(async move {
                let permit = semaphore.acquire(Duration::from_secs(60)).await.expect("a permit within the wait");
                let now = in_use.fetch_add(1, SeqCst) + 1;
                most_in_use.fetch_max(now, SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
                in_use.fetch_sub(1, SeqCst);
                permit.release().await.expect("release a permit held within its lease");
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("acquirer task");
    }

    // Reaching the limit shows the semaphore admits holders concurrently rather than one at a time.
    assert_eq!(most_in_use.load(SeqCst), 10);
    remove_key(&semaphore).await;
}

#[tokio::test]
async fn a_crashed_holders_permit_comes_back_after_its_lease() {
    let lease = Duration::from_millis(300);
    let semaphore = semaphore(1, lease).await;
    let permit = semaphore.acquire(Duration::ZERO).await.expect("a free permit");
    // A crash: no release, not even the best-effort one on drop.
    std::mem::forget(permit);
    assert!(semaphore.try_acquire().await.expect("try_acquire").is_none());

    let waiting = Instant::now();
    let permit = semaphore.acquire(Duration::from_secs(3)).await.expect("the permit expires");
    assert!(waiting.elapsed() >= lease / 2, "got in after {:?}, before the lease ran out", waiting.elapsed());
    permit.release().await.expect("release");
    remove_key(&semaphore).await;
}

#[tokio::test]
async fn saturation_past_the_wait_answers_429_with_retry_after() {
    let lease = Duration::from_secs(5);
    let semaphore = semaphore(2, lease).await;
    let held = [
        semaphore.acquire(Duration::ZERO).await.expect("first permit"),
        semaphore.acquire(Duration::ZERO).await.expect("second permit"),
    ];

    let waiting = Instant::now();
    let err = semaphore.acquire(Duration::from_millis(200)).await.expect_err("all permits are taken");
    assert!(waiting.elapsed() >= Duration::from_millis(200), "gave up after {:?}", waiting.elapsed());
    let SemaphoreError::Saturated { limit, retry_after, .. } = &err else { panic!("not saturated: {err:?}") };
    assert_eq!(*limit, 2);
    assert!(*retry_after > Duration::from_secs(4) && *retry_after <= lease, "{retry_after:?}");

    let response = err.problem().into_response();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    let seconds: u64 = response.headers()["retry-after"].to_str().expect("ASCII").parse().expect("whole seconds");
    assert!(seconds >= 1, "Retry-After {seconds}");

    for permit in held {
        permit.release().await.expect("release");
    }
    remove_key(&semaphore).await;
}

#[tokio::test]
async fn renewal_keeps_a_permit_and_an_expired_one_stays_lost() {
    let lease = Duration::from_millis(300);
    let semaphore = semaphore(1, lease).await;
    let permit = semaphore.acquire(Duration::ZERO).await.expect("a free permit");
    for _ in 0..8 {
        tokio::time::sleep(lease / 3).await;
        permit.renew().await.expect("renewed within its lease");
    }
    assert!(semaphore.try_acquire().await.expect("try_acquire").is_none(), "a renewed permit was given away");
    permit.release().await.expect("release");

    let permit = semaphore.try_acquire().await.expect("try_acquire").expect("free after release");
    tokio::time::sleep(lease + Duration::from_millis(100)).await;
    assert!(matches!(permit.renew().await, Err(SemaphoreError::Lost { .. })));
    assert!(matches!(permit.release().await, Err(SemaphoreError::Lost { .. })));
    remove_key(&semaphore).await;
}

#[tokio::test]
async fn dropping_a_permit_gives_it_back_without_waiting_for_the_lease() {
    let semaphore = semaphore(1, Duration::from_secs(30)).await;
    drop(semaphore.acquire(Duration::ZERO).await.expect("a free permit"));
    let waiting = Instant::now();
    let permit = semaphore.acquire(Duration::from_secs(2)).await.expect("released on drop");
    assert!(waiting.elapsed() < Duration::from_secs(2));
    permit.release().await.expect("release");
    remove_key(&semaphore).await;
}
