//! The payment service of the checkout demo.
//!
//! `kubesaga-payment [serve]` applies the migrations and serves the API; `kubesaga-payment migrate` only applies
//! the migrations. See `--help` for the gateway's knobs.

use std::{process::ExitCode, sync::Arc, time::Duration};

use clap::{Args, Parser, Subcommand};
use kubesaga_kit::{server::ServeArgs, stores};
use kubesaga_payment::{PaymentError, SERVICE, Settings, gateway::FakeGateway, gateway::GatewayConfig};

/// The payment service: card payments for the checkout saga, through a fake gateway.
#[derive(Parser, Debug)]
#[command(version, about, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: Serve,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Apply the migrations and serve the API (the default).
    Serve(Serve),
    /// Apply the migrations and exit.
    Migrate(Database),
}

#[derive(Args, Debug, Clone)]
struct Database {
    /// Postgres URL of the payment database [env: PAYMENT_DATABASE_URL, else DATABASE_URL].
    #[arg(long, env = "PAYMENT_DATABASE_URL", hide_env = true)]
    database_url: Option<String>,
}

impl Database {
    fn url(&self) -> Result<String, PaymentError> {
        kubesaga_kit::stores::database_url(self.database_url.as_deref(), "PAYMENT_DATABASE_URL")
            .map_err(|e| PaymentError::Config(e.to_string()))
    }
}

#[derive(Args, Debug, Clone)]
struct Serve {
    #[command(flatten)]
    server: ServeArgs,
    #[command(flatten)]
    database: Database,
    /// Redis URL, for the gateway semaphore and Idempotency-Key answers.
    #[arg(long, env = "REDIS_URL")]
    redis_url: Option<String>,
    /// Postgres connections in the pool.
    #[arg(long, env = "PAYMENT_DB_MAX_CONNECTIONS", default_value_t = 20)]
    max_connections: u32,
    /// Do not apply migrations at start-up (run `migrate` separately).
    #[arg(long)]
    skip_migrations: bool,
    /// Fixed latency of every gateway call, in milliseconds.
    #[arg(long, env = "GATEWAY_LATENCY_MS", default_value_t = 50)]
    gateway_latency_ms: u64,
    /// Random extra latency of up to this many milliseconds.
    #[arg(long, env = "GATEWAY_JITTER_MS", default_value_t = 50)]
    gateway_jitter_ms: u64,
    /// Fraction (0 to 1) of gateway calls that fail transiently (503).
    #[arg(long, env = "GATEWAY_FAILURE_RATE", default_value_t = 0.0)]
    gateway_failure_rate: f64,
    /// Fraction (0 to 1) of authorizations declined at random.
    #[arg(long, env = "GATEWAY_DECLINE_RATE", default_value_t = 0.0)]
    gateway_decline_rate: f64,
    /// Authorizations of at least this many cents are declined.
    #[arg(long, env = "GATEWAY_DECLINE_THRESHOLD_CENTS", default_value_t = 1_000_000)]
    gateway_decline_threshold_cents: i64,
    /// Gateway calls in flight at once, across all replicas.
    #[arg(long, env = "GATEWAY_CONCURRENCY", default_value_t = kubesaga_kit::semaphore::DEFAULT_LIMIT)]
    gateway_concurrency: u32,
    /// How long a request waits for a gateway slot before it is answered 429, in milliseconds.
    #[arg(long, env = "GATEWAY_WAIT_MS", default_value_t = 250)]
    gateway_wait_ms: u64,
    /// A gateway call taking longer than this fails transiently (503), in milliseconds.
    #[arg(long, env = "GATEWAY_TIMEOUT_MS", default_value_t = 5_000)]
    gateway_timeout_ms: u64,
}

impl Serve {
    fn settings(&self) -> Settings {
        Settings {
            gateway: GatewayConfig {
                latency: Duration::from_millis(self.gateway_latency_ms),
                jitter: Duration::from_millis(self.gateway_jitter_ms),
                failure_rate: self.gateway_failure_rate,
                decline_rate: self.gateway_decline_rate,
                decline_threshold_cents: self.gateway_decline_threshold_cents,
            },
            semaphore_limit: self.gateway_concurrency,
            semaphore_wait: Duration::from_millis(self.gateway_wait_ms),
            gateway_timeout: Duration::from_millis(self.gateway_timeout_ms),
            ..Settings::default()
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let _telemetry = kubesaga_kit::telemetry::init(SERVICE);
    let cli = Cli::parse();
    let outcome = match cli.command {
        Some(Command::Migrate(database)) => migrate(&database).await,
        Some(Command::Serve(serve)) => return serve_api(&serve).await,
        None => return serve_api(&cli.serve).await,
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => fail(&err),
    }
}

async fn migrate(database: &Database) -> Result<(), PaymentError> {
    let pool = stores::postgres(&database.url()?, 1).await?;
    kubesaga_payment::migrate(&pool).await?;
    tracing::info!(service = SERVICE, "migrations applied");
    Ok(())
}

async fn serve_api(serve: &Serve) -> ExitCode {
    let app = match build(serve).await {
        Ok(app) => app,
        Err(err) => return fail(&err),
    };
    kubesaga_kit::server::run(SERVICE, &serve.server, app).await
}

async fn build(serve: &Serve) -> Result<axum::Router, PaymentError> {
    let redis_url = serve
        .redis_url
        .clone()
        .filter(|url| !url.trim().is_empty())
        .ok_or_else(|| PaymentError::Config("no Redis: pass --redis-url or set REDIS_URL".to_owned()))?;
    let settings = serve.settings();
    let pool = stores::postgres(&serve.database.url()?, serve.max_connections).await?;
    if !serve.skip_migrations {
        kubesaga_payment::migrate(&pool).await?;
    }
    let redis = stores::redis(&redis_url).await?;
    let gateway = Arc::new(FakeGateway::new(pool.clone(), settings.gateway.clone())?);
    tracing::info!(service = SERVICE, gateway = ?settings.gateway, concurrency = settings.semaphore_limit, "starting");
    kubesaga_payment::app(pool, redis, gateway, &settings)
}

fn fail(err: &PaymentError) -> ExitCode {
    tracing::error!(service = SERVICE, error = %err, "payment service failed");
    ExitCode::FAILURE
}
