//! Serving a router until the process is asked to stop.

use std::{net::SocketAddr, process::ExitCode};

use axum::Router;
use tokio::net::TcpListener;

use crate::KitError;

/// Command-line options every service takes.
#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// Address to serve HTTP on.
    #[arg(long, env = "LISTEN_ADDR", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
}

/// Runs a service's router to completion and turns the outcome into the process exit code, logging why it failed.
pub async fn run(service: &str, args: &ServeArgs, router: Router) -> ExitCode {
    match serve(service, args.listen, router).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(service, error = %err, "service stopped");
            ExitCode::FAILURE
        }
    }
}

/// Binds `addr` and serves `router` until SIGINT or SIGTERM, letting in-flight requests finish.
pub async fn serve(service: &str, addr: SocketAddr, router: Router) -> Result<(), KitError> {
    let listener = TcpListener::bind(addr).await.map_err(|source| KitError::Bind { addr, source })?;
    let local = listener.local_addr().map_err(KitError::Serve)?;
    tracing::info!(service, %local, "listening");
    axum::serve(listener, router).with_graceful_shutdown(shutdown_signal()).await.map_err(KitError::Serve)
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut stream) => {
                stream.recv().await;
            }
            // Without a SIGTERM handler the default action still stops the process.
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = interrupt => {},
        _ = terminate => {},
    }
    tracing::info!("shutting down: finishing in-flight requests");
}
