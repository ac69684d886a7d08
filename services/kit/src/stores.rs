//! Connections to the Redis and Postgres servers a service uses.

use std::{path::Path, time::Duration};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use sqlx::{PgPool, migrate::Migrator, postgres::PgPoolOptions};

use crate::KitError;

/// How long start-up waits for a store before it reports the store as unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Opens a reconnecting Redis connection and checks it with a `PING`.
pub async fn redis(url: &str) -> Result<ConnectionManager, KitError> {
    let err = |source| KitError::Redis { url: redact(url), source };
    let client = redis::Client::open(url).map_err(err)?;
    let config = ConnectionManagerConfig::new().set_connection_timeout(Some(CONNECT_TIMEOUT)).set_number_of_retries(2);
    let mut conn = ConnectionManager::new_with_config(client, config).await.map_err(err)?;
    redis::cmd("PING").query_async::<()>(&mut conn).await.map_err(err)?;
    Ok(conn)
}

/// The database URL of a service: `--database-url` or the service's own variable (clap reads both into
/// `explicit`), else the shared `DATABASE_URL`.
pub fn database_url(explicit: Option<&str>, service_var: &'static str) -> Result<String, KitError> {
    explicit
        .map(str::to_owned)
        .or_else(|| std::env::var("DATABASE_URL").ok())
        .filter(|url| !url.is_empty())
        .ok_or(KitError::NoDatabase { service_var })
}

/// Opens a Postgres pool and checks that the server answers.
pub async fn postgres(url: &str, max_connections: u32) -> Result<PgPool, KitError> {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(CONNECT_TIMEOUT)
        .connect(url)
        .await
        .map_err(|source| KitError::Postgres { url: redact(url), source })
}

/// Applies the migrations in `dir` (one `migrations/<service>` folder) that the database has not seen yet.
pub async fn migrate(pool: &PgPool, dir: &Path) -> Result<(), KitError> {
    Migrator::new(dir).await?.run(pool).await?;
    Ok(())
}

/// Applies a service's embedded migrations together with the outbox's, as one ordered set (so neither sees the
/// other's applied versions as unknown).
pub async fn migrate_with_outbox(pool: &PgPool, service: &Migrator) -> Result<(), KitError> {
    let mut migrations: Vec<_> = service.iter().chain(crate::outbox::MIGRATOR.iter()).cloned().collect();
    migrations.sort_by_key(|m| m.version);
    Migrator::with_migrations(migrations).run(pool).await?;
    Ok(())
}

/// The URL with any password replaced, so it can go into logs and error messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme_end + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn redact_hides_only_the_password() {
        assert_eq!(redact("postgres://app:s3cret@db:5432/order"), "postgres://app:***@db:5432/order");
        assert_eq!(redact("redis://:pw@127.0.0.1:6379/0"), "redis://:***@127.0.0.1:6379/0");
        assert_eq!(redact("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
        assert_eq!(redact("postgres://app@db/order"), "postgres://app@db/order");
    }
}
