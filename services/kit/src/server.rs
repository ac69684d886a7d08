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
    run_until(service, args, router, shutdown_signal()).await
}

/// Like [`run`], stopping when `shutdown` resolves; a service with work of its own beside the HTTP server takes
/// [`shutdown_signal`] before it starts that work.
pub async fn run_until(
    service: &str,
    args: &ServeArgs,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> ExitCode {
    match serve(service, args.listen, router, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(service, error = %err, "service stopped");
            ExitCode::FAILURE
        }
    }
}

/// Binds `addr` and serves `router` until `shutdown` resolves, letting in-flight requests finish.
pub async fn serve(
    service: &str,
    addr: SocketAddr,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), KitError> {
    let listener = TcpListener::bind(addr).await.map_err(|source| KitError::Bind { addr, source })?;
    let local = listener.local_addr().map_err(KitError::Serve)?;
    tracing::info!(service, %local, "listening");
    axum::serve(listener, router).with_graceful_shutdown(shutdown).await.map_err(KitError::Serve)
}

/// Resolves on SIGINT or SIGTERM. The handlers are installed when this is called, not when the future is first
/// polled, so a SIGTERM that arrives while the service is still starting (Kubernetes may send one at any time)
/// stops it gracefully instead of killing it. Call it inside the runtime.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    // Without a handler the signal's default action still stops the process.
    let mut terminate = signal(SignalKind::terminate()).ok();
    let mut interrupt = signal(SignalKind::interrupt()).ok();
    async move {
        tokio::select! {
            () = received(terminate.as_mut()) => {},
            () = received(interrupt.as_mut()) => {},
        }
        tracing::info!("shutting down: finishing in-flight requests");
    }
}

/// Resolves when `stream` delivers a signal; never when there is no stream.
async fn received(stream: Option<&mut tokio::signal::unix::Signal>) {
    match stream {
        Some(stream) => {
            stream.recv().await;
        }
        None => std::future::pending::<()>().await,
    }
}
