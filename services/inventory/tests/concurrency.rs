//! Many sagas competing for one product, and the semantic lock an interrupted reserve leaves behind.

mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use axum::http::StatusCode;
use common::{Service, new_id, new_saga, new_sku, put_json, send, set_lock};
use kubesaga_inventory::Settings;
use serde_json::json;
use tokio::task::JoinSet;

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn two_hundred_sagas_compete_for_fifty_units_and_exactly_fifty_are_reserved() {
    // All 200 queue for the product's Redis lock at once; the wait allows for a slow, busy test machine (with
    // the default 5 s the last in the queue could get a retryable 503 there).
    let service = Service::start_with(Settings { lock_wait: Duration::from_secs(12), ..Settings::default() }).await;
    let sku = new_sku();
    service.seed(&sku, 50).await;

    // Watch the row while the reservations run: it must never leave 0 <= reserved <= stock.
    let watching = Arc::new(AtomicBool::new(true));
    let watcher = {
        let (pool, sku, watching) = (service.pool.clone(), sku.clone(), watching.clone());
        tokio::spawn(async move {
            let mut samples = 0;
            while watching.load(Ordering::SeqCst) {
                let (stock, reserved): (i32, i32) =
                    sqlx::query_as("SELECT stock, reserved FROM products WHERE sku = $1")
                        .bind(&sku)
                        .fetch_one(&pool)
                        .await
                        .expect("sample the row");
                assert!(stock == 50 && (0..=stock).contains(&reserved), "stock {stock}, reserved {reserved}");
                samples += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            samples
        })
    };

    let started = std::time::Instant::now();
    let mut calls = JoinSet::new();
    for _ in 0..200 {
        let (app, sku) = (service.app.clone(), sku.clone());
        calls.spawn(async move {
            let id = new_id();
            let request =
                put_json(&format!("/reservations/{id}"), &json!({"sku": sku, "quantity": 1}), Some(&new_saga()));
            let sent = std::time::Instant::now();
            let answer = send(&app, request).await;
            (id, answer, sent.elapsed())
        });
    }
    let mut reserved_ids = Vec::new();
    let mut reserved_units = 0;
    let mut out_of_stock = 0;
    let mut conflicts = 0;
    let mut slowest = Duration::ZERO;
    while let Some(joined) = calls.join_next().await {
        let (id, answer, took) = joined.expect("call task");
        slowest = slowest.max(took);
        match answer.status {
            StatusCode::OK => {
                assert_eq!(answer.body["status"], "RESERVED", "{answer:?}");
                assert_eq!(answer.body["reservationId"], id.as_str());
                reserved_units += answer.body["quantity"].as_i64().expect("quantity");
                reserved_ids.push(id);
            }
            StatusCode::UNPROCESSABLE_ENTITY => {
                assert_eq!(answer.problem_type(), "unprocessable", "{answer:?}");
                assert_eq!(answer.content_type(), "application/problem+json");
                assert_eq!(answer.body["requested"], 1);
                out_of_stock += 1;
            }
            StatusCode::CONFLICT => {
                assert!(matches!(answer.problem_type(), "locked-by-saga" | "version-conflict"), "{answer:?}");
                if answer.problem_type() == "locked-by-saga" {
                    assert!(answer.body["heldBy"].is_string(), "{answer:?}");
                }
                conflicts += 1;
            }
            other => panic!("unexpected answer {other}: {answer:?}"),
        }
    }
    eprintln!(
        "200 reservations in {:?} (slowest {slowest:?}): {} reserved, {out_of_stock} out of stock, {conflicts} conflicts",
        started.elapsed(),
        reserved_ids.len()
    );
    watching.store(false, Ordering::SeqCst);
    let samples = watcher.await.expect("the row stayed within bounds");
    assert!(samples > 0);

    assert_eq!(reserved_units, 50, "{out_of_stock} out of stock, {conflicts} conflicts");
    assert_eq!(reserved_ids.len() + out_of_stock + conflicts, 200);
    let product = service.product(&sku).await;
    assert_eq!(
        (product["stock"].as_i64(), product["reserved"].as_i64(), product["available"].as_i64()),
        (Some(50), Some(50), Some(0))
    );
    assert!(product.get("lockState").is_none(), "no lock is left behind: {product}");

    let (count, units): (i64, Option<i64>) =
        sqlx::query_as("SELECT count(*), sum(quantity) FROM reservations WHERE sku = $1 AND status = 'RESERVED'")
            .bind(&sku)
            .fetch_one(&service.pool)
            .await
            .expect("count reservations");
    assert_eq!((count, units), (50, Some(50)));
    let events = service.outbox().await;
    assert_eq!(events.iter().filter(|(kind, ..)| kind == "StockReserved").count(), 50);

    // The database refuses what the service must never write, whoever tries.
    for sql in [
        "UPDATE products SET reserved = stock + 1 WHERE sku = $1",
        "UPDATE products SET stock = -1, reserved = 0 WHERE sku = $1",
        "UPDATE products SET reserved = -1 WHERE sku = $1",
    ] {
        let err = sqlx::query(sql).bind(&sku).execute(&service.pool).await.expect_err(sql);
        let db = err.as_database_error().expect("a database error");
        assert!(db.is_check_violation(), "{sql}: {db}");
    }
    service.stop().await;
}

#[tokio::test]
async fn a_claim_left_by_an_interrupted_reserve_holds_the_product_for_its_saga() {
    let service = Service::start().await;
    let sku = new_sku();
    service.seed(&sku, 10).await;
    let (holder, other) = (new_saga(), new_saga());
    // What a reserve that crashed between its claim and its commit leaves behind.
    set_lock(&service.pool, &sku, "RESERVING", &holder, 5).await;
    let before = service.snapshot().await;

    let answer = service.reserve(&new_id(), &other, &sku, 1).await;
    assert_eq!(answer.status, StatusCode::CONFLICT, "{answer:?}");
    assert_eq!(answer.problem_type(), "locked-by-saga");
    assert_eq!(answer.body["heldBy"], holder.as_str());
    assert_eq!(answer.body["lockState"], "RESERVING");
    assert_eq!(service.snapshot().await, before, "a refused reserve changes nothing");
    assert_eq!(service.product(&sku).await["lockedBySaga"], holder.as_str());

    // Out of stock is a different answer, even while the product is held: it is checked by the holder only.
    let answer = service.reserve(&new_id(), &holder, &sku, 11).await;
    assert_eq!(
        (answer.status, answer.problem_type()),
        (StatusCode::UNPROCESSABLE_ENTITY, "unprocessable"),
        "{answer:?}"
    );
    assert!(service.product(&sku).await.get("lockState").is_none(), "the holder's failed attempt released its claim");

    // The holder's retry goes through and releases the claim when it commits.
    set_lock(&service.pool, &sku, "RESERVING", &holder, 5).await;
    let id = new_id();
    let answer = service.reserve(&id, &holder, &sku, 3).await;
    assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
    let product = service.product(&sku).await;
    assert_eq!((product["reserved"].as_i64(), product.get("lockState")), (Some(3), None));

    // A saga that gives up after an interrupted reserve cancels a reservation that was never made: its claim goes.
    set_lock(&service.pool, &sku, "RESERVING", &other, 5).await;
    let answer = service.cancel(&new_id(), Some(&other)).await;
    assert_eq!(
        (answer.status, answer.body["status"].as_str()),
        (StatusCode::OK, Some("NOT_FOUND_TREATED_AS_CANCELLED"))
    );
    let product = service.product(&sku).await;
    assert_eq!((product["reserved"].as_i64(), product.get("lockState")), (Some(3), None));
    assert_eq!(service.reserve(&new_id(), &new_saga(), &sku, 1).await.status, StatusCode::OK);
    service.stop().await;
}
