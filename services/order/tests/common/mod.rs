//! The order service on a database, Redis and namespace of its own, for the tests that call its API. Each test
//! binary that includes it uses a different part.

#![allow(dead_code, clippy::expect_used, clippy::unwrap_used)]

use axum::{
    Router,
    body::Body,
    http::{Request, StatusCode},
};
use kubesaga_kit::{
    http::{self, Limits, Readiness},
    stores,
};
use kubesaga_order::{
    MIGRATOR,
    api::{self, AppState},
    checkout::{self, Endpoints, SagaStarter},
};
use kubesaga_testkit::{TestDatabase, TestNamespace, client, install_crds, redis_url, unique_suffix};
use serde_json::{Value, json};
use sqlx::PgPool;
use tower::ServiceExt;

/// The service's router and what it runs on.
pub struct Service {
    /// Unique per run, appended to idempotency keys: Redis keeps keys for a day.
    pub run: String,
    pub app: Router,
    pub db: PgPool,
    pub database: TestDatabase,
    pub ns: TestNamespace,
}

/// Migrates a new database and serves the order API on it, starting sagas in a new namespace `<prefix>-…`.
pub async fn service(prefix: &str) -> Service {
    let database = TestDatabase::create(&prefix.replace('-', "_")).await;
    let db = database.pool().await;
    stores::migrate_with_outbox(&db, &MIGRATOR).await.expect("migrate");
    let redis = stores::redis(&redis_url()).await.expect("redis");
    let kube = client().await;
    let crds: Vec<_> = kubesaga_operator::crd::all().into_iter().map(|(_, crd)| crd).collect();
    install_crds(&kube, &crds).await;
    let ns = TestNamespace::create(&kube, prefix).await;
    let endpoints = Endpoints {
        order: "http://order".into(),
        inventory: "http://inventory".into(),
        payment: "http://payment".into(),
    };
    let template = checkout::load_template(checkout::DEFAULT_TEMPLATE, &endpoints).expect("template");
    let state = AppState { db: db.clone(), sagas: SagaStarter::new(kube, &ns.name, template) };
    let readiness = Readiness { redis: Some(redis.clone()), postgres: Some(db.clone()) };
    let app = http::app("order", api::routes(state, redis), readiness, json!({}), &Limits::default());
    Service { run: unique_suffix(), app, db, database, ns }
}

impl Service {
    /// Calls the service; `key` is made unique per run, since Redis keeps keys for a day.
    pub async fn call(&self, method: &str, path: &str, key: Option<&str>, body: Option<&str>) -> (StatusCode, Value) {
        let mut request = Request::builder().method(method).uri(path).header("content-type", "application/json");
        if let Some(key) = key {
            request = request.header("idempotency-key", format!("{key}-{}", self.run));
        }
        let response = self
            .app
            .clone()
            .oneshot(request.body(body.map_or_else(Body::empty, |b| Body::from(b.to_owned()))).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
        (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    pub async fn count(&self, sql: &'static str) -> i64 {
        sqlx::query_scalar::<_, i64>(sql).fetch_one(&self.db).await.expect("count")
    }

    pub async fn done(self) {
        self.db.close().await;
        self.database.drop_database().await;
        self.ns.delete().await;
    }
}
