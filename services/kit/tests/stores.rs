//! The kit's store connections against the real Redis and Postgres that `make test` provides.

use kubesaga_kit::{KitError, stores};
use kubesaga_testkit::{database_url, redis_url, unique_suffix};
use redis::AsyncCommands;

#[tokio::test]
async fn redis_round_trip() {
    let mut conn = stores::redis(&redis_url()).await.expect("connect to Redis");
    let key = format!("kubesaga:test:{}", unique_suffix());
    let _: () = conn.set_ex(&key, "value", 60).await.expect("SET");
    let read: Option<String> = conn.get(&key).await.expect("GET");
    assert_eq!(read.as_deref(), Some("value"));
    let _: () = conn.del(&key).await.expect("DEL");
}

#[tokio::test]
async fn postgres_migrates_an_empty_set_and_round_trips() {
    let pool = stores::postgres(&database_url(), 2).await.expect("connect to Postgres");
    let empty = std::env::temp_dir().join(format!("kubesaga-empty-migrations-{}", unique_suffix()));
    std::fs::create_dir_all(&empty).expect("create empty migration dir");
    stores::migrate(&pool, &empty).await.expect("an empty migration set applies");
    std::fs::remove_dir(&empty).expect("remove empty migration dir");

    let (echo,): (String,) =
        sqlx::query_as("SELECT $1::text").bind("round trip").fetch_one(&pool).await.expect("query");
    assert_eq!(echo, "round trip");
}

#[tokio::test]
async fn unreachable_servers_are_reported_with_what_to_check() {
    // Port 1 is reserved and never served on loopback here, so the connection is refused at once.
    let err = stores::redis("redis://127.0.0.1:1").await.expect_err("no Redis on port 1");
    assert!(matches!(err, KitError::Redis { .. }));
    assert!(err.to_string().contains("check REDIS_URL"), "{err}");

    let err = stores::postgres("postgres://app:secret@127.0.0.1:1/db", 1).await.expect_err("no Postgres on port 1");
    let message = err.to_string();
    assert!(message.contains("check DATABASE_URL") && !message.contains("secret"), "{message}");
}
