//! The notification service of the checkout demo.

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
};
use utoipa::OpenApi;

/// The notification service: fake e-mail and SMS senders.
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
    /// Redis URL (idempotency keys).
    #[arg(long, env = "REDIS_URL")]
    redis_url: Option<String>,
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
    let database_url =
        stores::database_url(args.database_url.as_deref(), "NOTIFICATION_DATABASE_URL").map_err(|e| e.to_string())?;
    let db = stores::postgres(&database_url, 8).await.map_err(|e| e.to_string())?;
    MIGRATOR.run(&db).await.map_err(|e| format!("database migration failed: {e}"))?;
    if matches!(args.command, Some(Command::Migrate)) {
        return Ok(ExitCode::SUCCESS);
    }
    let redis_url = args.redis_url.ok_or("no Redis: set --redis-url or REDIS_URL")?;
    let redis = stores::redis(&redis_url).await.map_err(|e| e.to_string())?;
    let openapi = serde_json::to_value(ApiDoc::openapi()).map_err(|e| e.to_string())?;
    let readiness = Readiness { redis: Some(redis.clone()), postgres: Some(db.clone()) };
    let app = http::app("notification", api::routes(db, redis), readiness, openapi, &Limits::default());
    Ok(server::run("notification", &args.serve, app).await)
}
