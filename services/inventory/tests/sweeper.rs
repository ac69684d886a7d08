//! The sweeper releases semantic locks older than the maximum age, and counts them.

mod common;

use std::time::Duration;

use axum::http::StatusCode;
use common::{Service, counter_value, new_id, new_saga, new_sku, set_lock};
use kubesaga_inventory::{SweepReport, sweep_once, sweeper::SWEPT_LOCKS};

const MAX_AGE: Duration = Duration::from_secs(30 * 60);

#[tokio::test]
async fn old_locks_are_released_and_counted_and_fresh_ones_are_kept() {
    let service = Service::start().await;
    let (abandoned, busy, held) = (new_sku(), new_sku(), new_sku());
    for sku in [&abandoned, &busy, &held] {
        service.seed(sku, 10).await;
    }
    let metrics_before = service.metrics().await;

    // A claim of a reserve that never finished, two hours ago.
    set_lock(&service.pool, &abandoned, "RESERVING", &new_saga(), 2 * 3600).await;
    // A claim taken a minute ago: its saga may still come back.
    let recent = new_saga();
    set_lock(&service.pool, &busy, "RESERVING", &recent, 60).await;
    // A row held for the lifetime of a reservation whose saga vanished an hour ago.
    let (id, saga) = (new_id(), new_saga());
    assert_eq!(service.reserve(&id, &saga, &held, 4).await.status, StatusCode::OK);
    set_lock(&service.pool, &held, "RESERVED", &saga, 3600).await;

    let report = sweep_once(&service.state, MAX_AGE).await.expect("sweep");
    assert_eq!(report, SweepReport { released_locks: 2, cancelled_reservations: 1, failed: 0 });

    let product = service.product(&abandoned).await;
    assert!(product.get("lockState").is_none() && product.get("lockedBySaga").is_none(), "{product}");
    assert_eq!(product["available"], 10);
    let product = service.product(&busy).await;
    assert_eq!(
        (product["lockState"].as_str(), product["lockedBySaga"].as_str()),
        (Some("RESERVING"), Some(recent.as_str()))
    );
    let product = service.product(&held).await;
    assert!(product.get("lockState").is_none(), "{product}");
    assert_eq!((product["reserved"].as_i64(), product["available"].as_i64()), (Some(0), Some(10)));
    let status: String = sqlx::query_scalar("SELECT status FROM reservations WHERE id = $1")
        .bind(&id)
        .fetch_one(&service.pool)
        .await
        .expect("reservation");
    assert_eq!(status, "CANCELLED");
    let released: Vec<_> = service.outbox().await.into_iter().filter(|(kind, ..)| kind == "StockReleased").collect();
    assert_eq!(released.len(), 1);
    assert_eq!((released[0].2["reason"].as_str(), released[0].2["quantity"].as_i64()), (Some("swept"), Some(4)));

    let metrics = service.metrics().await;
    for state in ["RESERVING", "RESERVED"] {
        let label = format!("state=\"{state}\"");
        let delta = counter_value(&metrics, SWEPT_LOCKS, &label) - counter_value(&metrics_before, SWEPT_LOCKS, &label);
        assert_eq!(delta, 1.0, "{state}:\n{metrics}");
    }

    // Nothing is left to sweep; the compensation that finally arrives finds the reservation cancelled.
    assert_eq!(sweep_once(&service.state, MAX_AGE).await.expect("sweep"), SweepReport::default());
    let answer = service.cancel(&id, Some(&saga)).await;
    assert_eq!((answer.status, answer.body["status"].as_str()), (StatusCode::OK, Some("CANCELLED")));
    assert_eq!(service.product(&held).await["available"], 10);
    // The recent lock goes too once the age allows it.
    let report = sweep_once(&service.state, Duration::from_secs(30)).await.expect("sweep");
    assert_eq!(report.released_locks, 1);
    assert!(service.product(&busy).await.get("lockState").is_none());
    service.stop().await;
}
