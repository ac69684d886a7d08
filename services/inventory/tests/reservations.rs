//! The reservation life cycle: reserve, confirm, cancel, their repeats, and the outbox rows they commit.

mod common;

use axum::http::{Method, StatusCode};
use common::{Service, new_id, new_key, new_saga, new_sku, raw};
use serde_json::json;

#[tokio::test]
async fn products_are_seeded_and_read() {
    let service = Service::start().await;
    let sku = new_sku();
    let path = format!("/products/{sku}");
    let answer = service.send(common::put_json(&path, &json!({"name": "Blue widget", "stock": 7}), None)).await;
    assert_eq!(answer.status, StatusCode::CREATED, "{answer:?}");
    assert_eq!((answer.body["stock"].as_i64(), answer.body["available"].as_i64()), (Some(7), Some(7)));
    let answer = service.send(common::put_json(&path, &json!({"name": "Blue widget", "stock": 9}), None)).await;
    assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
    let product = service.product(&sku).await;
    assert_eq!(product["name"], "Blue widget");
    assert_eq!(
        (product["stock"].as_i64(), product["reserved"].as_i64(), product["available"].as_i64()),
        (Some(9), Some(0), Some(9))
    );

    // Units that are promised cannot disappear from stock.
    assert_eq!(service.reserve(&new_id(), &new_saga(), &sku, 5).await.status, StatusCode::OK);
    let answer = service.send(common::put_json(&path, &json!({"name": "Blue widget", "stock": 4}), None)).await;
    assert_eq!((answer.status, answer.problem_type()), (StatusCode::CONFLICT, "invalid-state"), "{answer:?}");
    assert_eq!(service.product(&sku).await["stock"], 9);

    let answer = service.send(common::get(&format!("/products/{}", new_sku()))).await;
    assert_eq!((answer.status, answer.problem_type()), (StatusCode::NOT_FOUND, "not-found"));
    let answer = service.reserve(&new_id(), &new_saga(), &new_sku(), 1).await;
    assert_eq!(
        (answer.status, answer.problem_type()),
        (StatusCode::UNPROCESSABLE_ENTITY, "unprocessable"),
        "{answer:?}"
    );
    service.stop().await;
}

#[tokio::test]
async fn a_repeated_reserve_gets_the_same_answer_and_reserves_once() {
    let service = Service::start().await;
    let sku = new_sku();
    service.seed(&sku, 10).await;
    let (id, saga, key) = (new_id(), new_saga(), new_key());
    let body = json!({"sku": sku, "quantity": 4}).to_string();
    let request = || {
        raw(
            Method::PUT,
            &format!("/reservations/{id}"),
            Some("application/json"),
            body.clone(),
            Some(&saga),
            Some(&key),
        )
    };

    let first = service.send(request()).await;
    assert_eq!(first.status, StatusCode::OK, "{first:?}");
    assert_eq!(first.body, json!({"reservationId": id, "sku": sku, "quantity": 4, "status": "RESERVED"}));

    // The same call again (the saga's retry): replayed by the idempotency layer.
    let replay = service.send(request()).await;
    assert_eq!((replay.status, &replay.body), (StatusCode::OK, &first.body));
    assert_eq!(replay.headers.get("idempotent-replayed").map(|v| v.as_bytes()), Some(&b"true"[..]));

    // The same reserve under a new key (the idempotency store forgot it): the reservation id is the backstop.
    let again = service.reserve(&id, &saga, &sku, 4).await;
    assert_eq!((again.status, &again.body), (StatusCode::OK, &first.body));
    assert!(again.headers.get("idempotent-replayed").is_none());

    let product = service.product(&sku).await;
    assert_eq!((product["reserved"].as_i64(), product["available"].as_i64()), (Some(4), Some(6)));
    let reserved = service.outbox().await.into_iter().filter(|(kind, ..)| kind == "StockReserved").count();
    assert_eq!(reserved, 1);

    // The same id with other content is not a repeat.
    for (other_saga, quantity) in [(saga.as_str(), 5), ("shop/someone-else", 4)] {
        let answer = service.reserve(&id, other_saga, &sku, quantity).await;
        assert_eq!((answer.status, answer.problem_type()), (StatusCode::CONFLICT, "invalid-state"), "{answer:?}");
    }
    assert_eq!(service.product(&sku).await["reserved"], 4);
    service.stop().await;
}

#[tokio::test]
async fn cancel_is_idempotent_and_returns_the_units_once() {
    let service = Service::start().await;
    let sku = new_sku();
    service.seed(&sku, 10).await;
    let (id, saga) = (new_id(), new_saga());
    assert_eq!(service.reserve(&id, &saga, &sku, 3).await.status, StatusCode::OK);
    assert_eq!(service.product(&sku).await["available"], 7);

    let first = service.cancel(&id, Some(&saga)).await;
    assert_eq!(first.status, StatusCode::OK, "{first:?}");
    assert_eq!(first.body, json!({"reservationId": id, "sku": sku, "quantity": 3, "status": "CANCELLED"}));
    // Compensations are retried until they succeed, with the same key and, after a lost store, without it.
    let second = service.cancel(&id, Some(&saga)).await;
    assert_eq!((second.status, &second.body), (StatusCode::OK, &first.body));
    let third = service.cancel(&id, None).await;
    assert_eq!((third.status, &third.body), (StatusCode::OK, &first.body));

    let product = service.product(&sku).await;
    assert_eq!((product["reserved"].as_i64(), product["available"].as_i64()), (Some(0), Some(10)));
    let released: Vec<_> = service.outbox().await.into_iter().filter(|(kind, ..)| kind == "StockReleased").collect();
    assert_eq!(released.len(), 1, "{released:?}");
    assert_eq!(released[0].2["quantity"], 3);

    // A cancelled reservation is not brought back by a late repeat of its reserve, nor confirmed.
    let answer = service.reserve(&id, &saga, &sku, 3).await;
    assert_eq!((answer.status, answer.problem_type()), (StatusCode::CONFLICT, "invalid-state"), "{answer:?}");
    let answer = service.confirm(&id).await;
    assert_eq!((answer.status, answer.problem_type()), (StatusCode::CONFLICT, "invalid-state"), "{answer:?}");
    assert_eq!(service.product(&sku).await["available"], 10);
    service.stop().await;
}

#[tokio::test]
async fn cancelling_an_unknown_reservation_succeeds_and_stops_a_late_reserve() {
    let service = Service::start().await;
    let sku = new_sku();
    service.seed(&sku, 10).await;
    let (id, saga) = (new_id(), new_saga());
    let expected = json!({"reservationId": id, "status": "NOT_FOUND_TREATED_AS_CANCELLED"});
    for _ in 0..2 {
        let answer = service.cancel(&id, Some(&saga)).await;
        assert_eq!((answer.status, &answer.body), (StatusCode::OK, &expected), "{answer:?}");
    }
    let before = service.snapshot().await;
    // The reserve the compensation overtook arrives after all: it must not take stock nobody will release.
    let answer = service.reserve(&id, &saga, &sku, 2).await;
    assert_eq!((answer.status, answer.problem_type()), (StatusCode::CONFLICT, "invalid-state"), "{answer:?}");
    assert_eq!(service.snapshot().await, before);
    let answer = service.confirm(&new_id()).await;
    assert_eq!((answer.status, answer.problem_type()), (StatusCode::NOT_FOUND, "not-found"), "{answer:?}");
    service.stop().await;
}

#[tokio::test]
async fn confirm_takes_the_units_for_good_and_a_later_cancel_is_refused() {
    let service = Service::start().await;
    let sku = new_sku();
    service.seed(&sku, 10).await;
    let (id, saga) = (new_id(), new_saga());
    assert_eq!(service.reserve(&id, &saga, &sku, 2).await.status, StatusCode::OK);

    let first = service.confirm(&id).await;
    assert_eq!(first.status, StatusCode::OK, "{first:?}");
    assert_eq!(first.body, json!({"reservationId": id, "sku": sku, "quantity": 2, "status": "CONFIRMED"}));
    let second = service.confirm(&id).await;
    assert_eq!((second.status, &second.body), (StatusCode::OK, &first.body));
    let product = service.product(&sku).await;
    assert_eq!(
        (product["stock"].as_i64(), product["reserved"].as_i64(), product["available"].as_i64()),
        (Some(8), Some(0), Some(8))
    );

    let answer = service.cancel(&id, Some(&saga)).await;
    assert_eq!((answer.status, answer.problem_type()), (StatusCode::CONFLICT, "invalid-state"), "{answer:?}");
    assert_eq!(answer.body["status"], "CONFIRMED");
    assert_eq!(service.product(&sku).await["stock"], 8);
    // A repeat of the reserve after the confirm answers the reservation as it stands.
    let answer = service.reserve(&id, &saga, &sku, 2).await;
    assert_eq!((answer.status, answer.body["status"].as_str()), (StatusCode::OK, Some("CONFIRMED")));

    let kinds: Vec<String> = service.outbox().await.into_iter().map(|(kind, ..)| kind).collect();
    assert_eq!(kinds, ["StockReserved", "StockCommitted"]);
    service.stop().await;
}

#[tokio::test]
async fn the_outbox_row_commits_with_the_reservation_and_not_without_it() {
    let service = Service::start().await;
    let sku = new_sku();
    service.seed(&sku, 5).await;
    let (id, saga) = (new_id(), new_saga());
    assert_eq!(service.reserve(&id, &saga, &sku, 5).await.status, StatusCode::OK);

    let events = service.outbox().await;
    assert_eq!(events.len(), 1);
    let (kind, aggregate, payload, headers) = &events[0];
    assert_eq!((kind.as_str(), aggregate.as_str()), ("StockReserved", id.as_str()));
    assert_eq!(payload, &json!({"reservationId": id, "sagaId": saga, "sku": sku, "quantity": 5, "available": 0}));
    assert_eq!(headers["saga_id"], saga.as_str());
    let (status, reserved_at): (String, bool) = sqlx::query_as(
        "SELECT r.status, o.created_at = r.created_at FROM reservations r, outbox o WHERE r.id = $1 AND o.aggregate_id = r.id",
    )
    .bind(&id)
    .fetch_one(&service.pool)
    .await
    .expect("reservation and event");
    assert_eq!(status, "RESERVED");
    assert!(reserved_at, "same transaction, same now()");

    // Out of stock: the transaction is not committed, so neither a reservation nor an event exists.
    let before = service.snapshot().await;
    let failed = new_id();
    let answer = service.reserve(&failed, &new_saga(), &sku, 1).await;
    assert_eq!(answer.status, StatusCode::UNPROCESSABLE_ENTITY, "{answer:?}");
    assert_eq!((answer.body["available"].as_i64(), answer.body["requested"].as_i64()), (Some(0), Some(1)));
    assert_eq!(service.snapshot().await, before);
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE aggregate_id = $1")
        .bind(&failed)
        .fetch_one(&service.pool)
        .await
        .expect("count");
    assert_eq!(rows, 0);
    service.stop().await;
}
