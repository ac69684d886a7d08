//! Throwaway Postgres databases, one per test, so tests that migrate and write run in parallel.

use sqlx::{AssertSqlSafe, Connection, PgConnection, PgPool, postgres::PgPoolOptions};

use crate::{database_url, unique_suffix};

/// A database created for one test on the server `DATABASE_URL` names. [`TestDatabase::drop_database`] removes
/// it when the test passed; a failing test leaves it for inspection.
pub struct TestDatabase {
    /// URL of the new database.
    pub url: String,
    /// Its name.
    pub name: String,
}

impl TestDatabase {
    /// Creates `<prefix>_<random>`.
    pub async fn create(prefix: &str) -> Self {
        let admin = database_url();
        let name = format!("{prefix}_{}", unique_suffix());
        assert!(name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'), "bad name {name}");
        let mut conn = PgConnection::connect(&admin).await.expect("connect to DATABASE_URL");
        // The name was checked above to be a plain identifier.
        sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .expect("create database");
        let base = admin.rsplit_once('/').map_or(admin.as_str(), |(base, _)| base);
        Self { url: format!("{base}/{name}"), name }
    }

    /// A pool on the database.
    pub async fn pool(&self) -> PgPool {
        PgPoolOptions::new().max_connections(20).connect(&self.url).await.expect("connect to the test database")
    }

    /// Drops the database, closing what is still connected to it.
    pub async fn drop_database(self) {
        let mut conn = PgConnection::connect(&database_url()).await.expect("connect to DATABASE_URL");
        sqlx::query(AssertSqlSafe(format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)))
            .execute(&mut conn)
            .await
            .expect("drop database");
    }
}
