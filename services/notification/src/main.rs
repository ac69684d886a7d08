//! The notification service of the checkout demo: the API, and beside it the consumer of the order events.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kubesaga_kit::{
    http::{self, Limits, Readiness},
    server::{self, ServeArgs},
    stores,
};
use kubesaga_notification::{
    MIGRATOR,
    api::{self, ApiDoc},
    consumer::{self, ConsumerArgs},
};
use tokio_util::sync::CancellationToken;
use utoipa::OpenApi;

/// The notification service: fake e-mail and SMS senders, and the consumer of the order events that e-mails the
/// customer how a checkout ended.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
    /// Postgres URL of the notification database.
    #[arg(long, env = "NOTIFICATION_DATABASE_URL", global = true)]
    database_url: Option<String>,
    /// Redis URL (idempotency keys and the order event stream).
    #[arg(long, env = "REDIS_URL")]
    redis_url: Option<String>,
    #[command(flatten)]
    consumer: ConsumerArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the API (the default).
    Serve,
    /// Apply the database migrations and exit.
    Migrate,
}

#[tokio::main]
async fn main() -> ExitCode {
    let _telemetry = kubesaga_kit::telemetry::init("notification");
    match run(Args::parse()).await {
        Ok(code) => code,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<ExitCode, String> {
    // Before the consumer starts: a SIGTERM from then on stops both gracefully.
    let stop = server::shutdown_signal();
    let serving = !matches!(args.command, Some(Command::Migrate));
    // Checked before connecting to anything, so a bad setting is reported at once.
    let consumer_config = if serving && !args.consumer.disable_consumer {
        Some(args.consumer.into_config(|var| std::env::var(var).ok()).map_err(|e| e.to_string())?)
    } else {
        None
    };
    let database_url =
        stores::database_url(args.database_url.as_deref(), "NOTIFICATION_DATABASE_URL").map_err(|e| e.to_string())?;
    let db = stores::postgres(&database_url, 8).await.map_err(|e| e.to_string())?;
    MIGRATOR.run(&db).await.map_err(|e| format!("database migration failed: {e}"))?;
    if !serving {
        return Ok(ExitCode::SUCCESS);
    }
    let redis_url = args.redis_url.ok_or("no Redis: set --redis-url or REDIS_URL")?;
    let redis = stores::redis(&redis_url).await.map_err(|e| e.to_string())?;
    let shutdown = CancellationToken::new();
    let consumer = match consumer_config {
        Some(config) => {
            // The consumer opens a connection of its own from the client; the API keeps the shared one.
            let client = redis::Client::open(redis_url.as_str()).map_err(|e| format!("invalid REDIS_URL: {e}"))?;
            Some(tokio::spawn(consumer::run(config, db.clone(), client, shutdown.clone())))
        }
        None => {
            tracing::info!("order event consumer disabled");
            None
        }
    };
    let openapi = serde_json::to_value(ApiDoc::openapi()).map_err(|e| e.to_string())?;
    let readiness = Readiness { redis: Some(redis.clone()), postgres: Some(db.clone()) };
    let app = http::app("notification", api::routes(db, redis), readiness, openapi, &Limits::default());
    let code = server::run_until("notification", &args.serve, app, stop).await;
    // The server returns on SIGTERM (or when it cannot serve): the consumer stops with it.
    shutdown.cancel();
    if let Some(consumer) = consumer
        && let Err(err) = consumer.await
    {
        tracing::error!(error = %err, "the order event consumer panicked");
        return Ok(ExitCode::FAILURE);
    }
    Ok(code)
}
