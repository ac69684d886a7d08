//! The order service of the checkout demo.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kubesaga_kit::{
    http::{self, Limits, Readiness},
    server::{self, ServeArgs},
    stores,
};
use kubesaga_order::{
    MIGRATOR,
    api::{self, ApiDoc, AppState},
    checkout::{self, Endpoints, SagaStarter},
};
use utoipa::OpenApi;

/// The order service: orders and the checkout that starts a saga.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
    /// Postgres URL of the order database.
    #[arg(long, env = "ORDER_DATABASE_URL", global = true)]
    database_url: Option<String>,
    /// Redis URL (idempotency keys).
    #[arg(long, env = "REDIS_URL")]
    redis_url: Option<String>,
    /// Namespace the checkout sagas are created in.
    #[arg(long, env = "SAGA_NAMESPACE", default_value = "default")]
    saga_namespace: String,
    /// A SagaSpec YAML file to use instead of the built-in checkout template.
    #[arg(long, env = "SAGA_TEMPLATE")]
    saga_template: Option<std::path::PathBuf>,
    /// Base URL of this service, as the operator reaches it.
    #[arg(long, env = "ORDER_URL", default_value = "http://order")]
    order_url: String,
    /// Base URL of the inventory service, as the operator reaches it.
    #[arg(long, env = "INVENTORY_URL", default_value = "http://inventory")]
    inventory_url: String,
    /// Base URL of the payment service, as the operator reaches it.
    #[arg(long, env = "PAYMENT_URL", default_value = "http://payment")]
    payment_url: String,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the API (the default).
    Serve,
    /// Apply the database migrations and exit (the Helm pre-install hook runs this).
    Migrate,
}

#[tokio::main]
async fn main() -> ExitCode {
    let _telemetry = kubesaga_kit::telemetry::init("order");
    let args = Args::parse();
    match run(args).await {
        Ok(code) => code,
        Err(message) => {
            tracing::error!(%message, "order service failed to start");
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<ExitCode, String> {
    let database_url =
        stores::database_url(args.database_url.as_deref(), "ORDER_DATABASE_URL").map_err(|e| e.to_string())?;
    let db = stores::postgres(&database_url, 16).await.map_err(|e| e.to_string())?;
    stores::migrate_with_outbox(&db, &MIGRATOR).await.map_err(|e| e.to_string())?;
    if matches!(args.command, Some(Command::Migrate)) {
        tracing::info!("migrations applied");
        return Ok(ExitCode::SUCCESS);
    }
    let redis_url = args.redis_url.ok_or("no Redis: set --redis-url or REDIS_URL")?;
    let redis = stores::redis(&redis_url).await.map_err(|e| e.to_string())?;
    let template_text = match &args.saga_template {
        Some(path) => std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?,
        None => checkout::DEFAULT_TEMPLATE.to_owned(),
    };
    let endpoints = Endpoints { order: args.order_url, inventory: args.inventory_url, payment: args.payment_url };
    let template = checkout::load_template(&template_text, &endpoints).map_err(|e| e.to_string())?;
    let client = kube::Client::try_default().await.map_err(|e| {
        format!("cannot reach the Kubernetes API to create sagas: {e}; set KUBECONFIG or run in a cluster")
    })?;
    let state = AppState { db: db.clone(), sagas: SagaStarter::new(client, &args.saga_namespace, template) };
    let openapi = serde_json::to_value(ApiDoc::openapi()).map_err(|e| e.to_string())?;
    let readiness = Readiness { redis: Some(redis.clone()), postgres: Some(db) };
    let app = http::app("order", api::routes(state, redis), readiness, openapi, &Limits::default());
    Ok(server::run("order", &args.serve, app).await)
}
