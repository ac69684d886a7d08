//! Logging set-up shared by every binary.

use tracing_subscriber::{EnvFilter, fmt};

/// Logs as JSON lines to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // A second call (tests that start several services in one process) keeps the first subscriber.
    let _ = fmt().json().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}
