//! The gateway semaphore: at most `limit` gateway calls at once across the service, 429 + Retry-After past a short
//! wait, and permits of crashed holders coming back. Real Redis and Postgres.

mod common;

use std::{collections::BTreeMap, time::Duration};

use axum::http::{Method, StatusCode};
use common::{Settings, TestApp, authorize_body, new_id, new_key, settings};
use kubesaga_kit::semaphore::{Semaphore, SemaphoreConfig};
use kubesaga_payment::gateway::GatewayConfig;

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn the_gateway_never_sees_more_calls_than_the_limit_and_the_rest_get_429() {
    let app = TestApp::with(Settings {
        gateway: GatewayConfig { latency: Duration::from_millis(20), ..GatewayConfig::instant() },
        semaphore_limit: 10,
        semaphore_wait: Duration::from_millis(100),
        ..settings()
    })
    .await;

    let requests: Vec<_> = (0..200)
        .map(|_| {
            let (router, id, key) = (app.router.clone(), new_id(), new_key());
            tokio::spawn(async move {
                let request = common::json_request(
                    Method::PUT,
                    &format!("/payments/{id}"),
                    &key,
                    Some(authorize_body(100, "tok_ok")),
                );
                (id, key, common::send(&router, request).await)
            })
        })
        .collect();
    let mut by_status = BTreeMap::<u16, usize>::new();
    let mut rejected = Vec::new();
    for request in requests {
        let (id, key, reply) = request.await.expect("request task");
        *by_status.entry(reply.status.as_u16()).or_default() += 1;
        match reply.status {
            StatusCode::CREATED => assert_eq!(reply.body["status"], "AUTHORIZED"),
            StatusCode::TOO_MANY_REQUESTS => {
                reply.problem(StatusCode::TOO_MANY_REQUESTS, "rate-limited");
                let retry_after: u64 = reply.header("retry-after").and_then(|v| v.parse().ok()).expect("Retry-After");
                assert!((1..=5).contains(&retry_after), "Retry-After {retry_after}");
                rejected.push((id, key));
            }
            other => panic!("unexpected {other}: {}", reply.body),
        }
    }

    assert_eq!(app.gateway.most_in_flight(), 10, "the gateway saw {} calls at once", app.gateway.most_in_flight());
    assert_eq!(app.gateway.in_flight(), 0);
    assert!(!rejected.is_empty(), "with a 100 ms wait some requests must be turned away: {by_status:?}");
    let authorized = by_status.get(&201).copied().unwrap_or_default();
    assert!(authorized >= 10, "{by_status:?}");
    // A 429 changes nothing: only the authorized payments were charged and recorded.
    assert_eq!(app.count("SELECT count(*) FROM payments").await, authorized as i64);
    assert_eq!(app.count("SELECT count(*) FROM gateway_ledger").await, authorized as i64);

    // A 429 is not stored as the key's answer, so the retry the caller makes after Retry-After goes through.
    let (id, key) = &rejected[0];
    let retry =
        app.call_with_key(Method::PUT, &format!("/payments/{id}"), key, Some(authorize_body(100, "tok_ok"))).await;
    assert_eq!(retry.status, StatusCode::CREATED, "{}", retry.body);
    app.finish().await;
}

#[tokio::test]
async fn a_crashed_holders_permit_comes_back_after_its_lease() {
    let app =
        TestApp::with(Settings { semaphore_limit: 2, semaphore_wait: Duration::from_millis(50), ..settings() }).await;
    let lease = Duration::from_millis(600);
    let holder = Semaphore::with_config(
        app.redis.clone(),
        &app.settings.semaphore_name,
        SemaphoreConfig { limit: 2, lease, ..SemaphoreConfig::default() },
    )
    .expect("semaphore");
    for _ in 0..2 {
        let permit = holder.acquire(Duration::ZERO).await.expect("a free permit");
        // A crash: never released, not even by the best-effort release on drop.
        std::mem::forget(permit);
    }

    let (id, key) = (new_id(), new_key());
    let path = format!("/payments/{id}");
    let busy = app.call_with_key(Method::PUT, &path, &key, Some(authorize_body(100, "tok_ok"))).await;
    busy.problem(StatusCode::TOO_MANY_REQUESTS, "rate-limited");
    assert!(busy.header("retry-after").is_some());
    assert_eq!(app.get(&path).await.status, StatusCode::NOT_FOUND, "a 429 records nothing");

    common::sleep(lease + Duration::from_millis(100)).await;
    let after_lease = app.call_with_key(Method::PUT, &path, &key, Some(authorize_body(100, "tok_ok"))).await;
    assert_eq!(after_lease.status, StatusCode::CREATED, "{}", after_lease.body);
    app.finish().await;
}
