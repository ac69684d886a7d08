//! The binary: `migrate`, `serve`, and the messages it fails to start with.

mod common;

use std::{
    net::TcpListener,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::create_database;
use kubesaga_testkit::redis_url;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

fn inventory() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kubesaga-inventory"));
    for name in ["INVENTORY_DATABASE_URL", "DATABASE_URL", "REDIS_URL", "LISTEN_ADDR"] {
        command.env_remove(name);
    }
    command.env("RUST_LOG", "warn").stdin(Stdio::null());
    command
}

/// Runs to completion; returns success and stderr.
#[allow(clippy::expect_used)]
fn run(command: &mut Command) -> (bool, String) {
    let output = command.output().expect("run the binary");
    (output.status.success(), String::from_utf8_lossy(&output.stderr).into_owned())
}

#[tokio::test]
async fn migrate_creates_the_tables_and_can_run_again() {
    let database = create_database().await;
    let url = database.url.clone();
    for _ in 0..2 {
        let (ok, stderr) = run(inventory().args(["migrate", "--database-url", &url]));
        assert!(ok, "{stderr}");
    }
    // The fallback variable works too.
    let (ok, stderr) = run(inventory().arg("migrate").env("DATABASE_URL", &url));
    assert!(ok, "{stderr}");
    let pool = kubesaga_kit::stores::postgres(&url, 1).await.expect("connect");
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .expect("list tables");
    for table in ["outbox", "products", "reservations"] {
        assert!(tables.iter().any(|t| t == table), "{table} missing from {tables:?}");
    }
    pool.close().await;
    database.drop_database().await;
}

#[test]
fn start_up_errors_say_what_to_fix() {
    let (ok, stderr) = run(inventory().arg("migrate"));
    assert!(!ok);
    assert!(stderr.contains("--database-url") && stderr.contains("INVENTORY_DATABASE_URL"), "{stderr}");

    let (ok, stderr) = run(inventory().args(["--database-url", "postgres://app:s3cret@127.0.0.1:1/inventory"]));
    assert!(!ok);
    assert!(stderr.contains("REDIS_URL"), "{stderr}");

    let (ok, stderr) = run(inventory().args([
        "serve",
        "--database-url",
        "postgres://app:s3cret@127.0.0.1:1/inventory",
        "--redis-url",
        "redis://127.0.0.1:1",
    ]));
    assert!(!ok);
    assert!(stderr.contains("cannot connect to Postgres") && !stderr.contains("s3cret"), "{stderr}");

    let (ok, stderr) = run(inventory().args(["--lock-max-age", "soon"]));
    assert!(!ok);
    assert!(stderr.contains("--lock-max-age"), "{stderr}");
}

#[tokio::test]
async fn serve_answers_on_its_listen_address() {
    let database = create_database().await;
    let url = database.url.clone();
    let port = TcpListener::bind("127.0.0.1:0").expect("free port").local_addr().expect("addr").port();
    let listen = format!("127.0.0.1:{port}");
    let mut child = inventory()
        .args(["--listen", &listen, "--sweep-interval", "1s"])
        .env("INVENTORY_DATABASE_URL", &url)
        .env("REDIS_URL", redis_url())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the service");

    let started = Instant::now();
    let answer = loop {
        match get(&listen, "/readyz").await {
            Some(answer) if answer.starts_with("HTTP/1.1 200") => break answer,
            _ if started.elapsed() > Duration::from_secs(20) => {
                let _ = child.kill();
                panic!("the service did not become ready on {listen}");
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    assert!(answer.ends_with("ok"), "{answer}");
    let openapi = get(&listen, "/openapi.json").await.unwrap_or_default();
    assert!(openapi.contains("/reservations/{id}/cancel"), "{openapi}");

    child.kill().expect("stop the service");
    child.wait().expect("reap the service");
    database.drop_database().await;
}

/// A plain HTTP/1.1 GET; the whole response as text, or `None` when nothing answers.
async fn get(addr: &str, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect(addr).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    Some(response)
}
