//! The notification service's API against real Postgres and Redis.

#![allow(clippy::expect_used, clippy::unwrap_used)] // test code: a panic is the failure report

use axum::{
    body::Body,
    http::{Request, StatusCode},
};
use kubesaga_kit::stores;
use kubesaga_notification::{MIGRATOR, api};
use kubesaga_testkit::{TestDatabase, redis_url, unique_suffix};
use serde_json::Value;
use tower::ServiceExt;

#[tokio::test]
async fn fake_senders_record_what_they_send_and_refuse_bad_messages() {
    let database = TestDatabase::create("notification").await;
    let db = database.pool().await;
    MIGRATOR.run(&db).await.expect("migrate");
    let redis = stores::redis(&redis_url()).await.expect("redis");
    let app = api::routes(db.clone(), redis);
    let run = unique_suffix();
    let call = |method: &'static str, uri: String, key: Option<String>, body: Option<&'static str>| {
        let app = app.clone();
        async move {
            let mut request = Request::builder().method(method).uri(uri).header("content-type", "application/json");
            if let Some(key) = key {
                request = request.header("idempotency-key", key);
            }
            let response = app.oneshot(request.body(body.map_or_else(Body::empty, Body::from)).unwrap()).await.unwrap();
            let status = response.status();
            let bytes = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
            (status, serde_json::from_slice::<Value>(&bytes).unwrap_or(Value::Null))
        }
    };

    let email = r#"{"channel":"EMAIL","recipient":"ada@example.com","subject":"Order approved","body":"Thanks!","orderId":"o-1"}"#;
    let (status, sent) = call("POST", "/notifications".into(), Some(format!("e-{run}")), Some(email)).await;
    assert_eq!(status, StatusCode::CREATED, "{sent}");
    let (status, again) = call("POST", "/notifications".into(), Some(format!("e-{run}")), Some(email)).await;
    assert_eq!((status, &again), (StatusCode::CREATED, &sent), "a repeat is replayed, not sent twice");

    for (body, field) in [
        (r#"{"channel":"SMS","recipient":"ada@example.com","body":"x"}"#, "recipient"),
        (r#"{"channel":"EMAIL","recipient":"ada@example.com","body":"x"}"#, "subject"),
        (r#"{"channel":"FAX","recipient":"ada@example.com","body":"x"}"#, "channel"),
        (r#"{"channel":"SMS","recipient":"+4915112345678"}"#, "body"),
    ] {
        let (status, problem) = call("POST", "/notifications".into(), Some(format!("{field}-{run}")), Some(body)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{problem}");
        assert_eq!(problem["field"], field, "{problem}");
    }

    let (status, listed) = call("GET", "/notifications?orderId=o-1".into(), None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM notifications").fetch_one(&db).await.expect("count");
    assert_eq!(rows, 1);
    db.close().await;
    database.drop_database().await;
}
