//! The kit's error type.

use std::net::SocketAddr;

/// Everything that can go wrong in the shared service plumbing, with what the operator of the service can do.
#[derive(Debug, thiserror::Error)]
pub enum KitError {
    /// The listen address is taken or not ours to bind.
    #[error("cannot listen on {addr}: {source} (is another process using the port? choose another with --listen)")]
    Bind {
        /// The address that could not be bound.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The HTTP server stopped with an I/O error.
    #[error("HTTP server failed: {0}")]
    Serve(#[source] std::io::Error),
    /// Redis refused the URL or the connection.
    #[error("cannot connect to Redis at {url}: {source} (check REDIS_URL and that the server is running)")]
    Redis {
        /// The URL, without credentials.
        url: String,
        /// Why.
        source: redis::RedisError,
    },
    /// Postgres refused the URL or the connection.
    #[error("cannot connect to Postgres at {url}: {source} (check DATABASE_URL and that the server is running)")]
    Postgres {
        /// The URL, without credentials.
        url: String,
        /// Why.
        source: sqlx::Error,
    },
    /// No database URL was given.
    #[error("no database: pass --database-url or set {service_var} (or DATABASE_URL)")]
    NoDatabase {
        /// The service's own variable, e.g. `ORDER_DATABASE_URL`.
        service_var: &'static str,
    },
    /// A migration set could not be read or applied.
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}
