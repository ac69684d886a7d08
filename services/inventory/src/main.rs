//! The inventory service of the checkout demo: `serve` (the default) runs the API and the lock sweeper,
//! `migrate` applies the database migrations and exits.

use std::{process::ExitCode, time::Duration};

use clap::{Args, Parser, Subcommand};
use kubesaga_inventory::{AppState, InventoryError, Settings, SweeperConfig};
use kubesaga_kit::duration::parse as parse_duration;
use kubesaga_kit::server::ServeArgs;

/// The inventory service: products, stock and the reservations sagas make.
#[derive(Parser, Debug)]
#[command(version, about, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Options of `serve`, which runs when no subcommand is given.
    #[command(flatten)]
    serve: Serve,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the API (the default).
    Serve(Serve),
    /// Apply the database migrations and exit.
    Migrate(Database),
}

#[derive(Args, Debug, Clone)]
struct Database {
    /// Postgres URL of the inventory database [env: INVENTORY_DATABASE_URL, else DATABASE_URL].
    #[arg(long, env = "INVENTORY_DATABASE_URL", hide_env = true, hide_env_values = true)]
    database_url: Option<String>,
}

impl Database {
    fn url(&self) -> Result<String, InventoryError> {
        kubesaga_kit::stores::database_url(self.database_url.as_deref(), "INVENTORY_DATABASE_URL")
            .map_err(|e| InventoryError::Config(e.to_string()))
    }
}

#[derive(Args, Debug, Clone)]
struct Serve {
    #[command(flatten)]
    http: ServeArgs,
    #[command(flatten)]
    database: Database,
    /// Redis URL (locks and idempotency keys).
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    redis_url: Option<String>,
    /// Most Postgres connections.
    #[arg(long, env = "INVENTORY_DB_MAX_CONNECTIONS", default_value_t = 20)]
    db_max_connections: u32,
    /// How long a request waits for a product's Redis lock before answering 503.
    #[arg(long, env = "INVENTORY_LOCK_WAIT", default_value = "5s", value_parser = parse_duration)]
    lock_wait: Duration,
    /// Semantic locks older than this are released by the sweeper.
    #[arg(long, env = "INVENTORY_LOCK_MAX_AGE", default_value = "30m", value_parser = parse_duration)]
    lock_max_age: Duration,
    /// Time between sweeps; 0 turns the sweeper off.
    #[arg(long, env = "INVENTORY_SWEEP_INTERVAL", default_value = "1m", value_parser = parse_duration)]
    sweep_interval: Duration,
    /// Do not apply migrations at start-up (run `migrate` separately instead).
    #[arg(long, env = "INVENTORY_SKIP_MIGRATIONS")]
    skip_migrations: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let _telemetry = kubesaga_kit::telemetry::init(kubesaga_inventory::SERVICE);
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Migrate(database)) => migrate(&database).await,
        Some(Command::Serve(serve)) => serve_api(serve).await,
        None => serve_api(cli.serve).await,
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            tracing::error!(error = %err, "inventory failed to start");
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn migrate(database: &Database) -> Result<ExitCode, InventoryError> {
    let pool = kubesaga_kit::stores::postgres(&database.url()?, 2).await?;
    kubesaga_inventory::migrate(&pool).await?;
    tracing::info!("migrations applied");
    Ok(ExitCode::SUCCESS)
}

async fn serve_api(args: Serve) -> Result<ExitCode, InventoryError> {
    let redis_url = args
        .redis_url
        .clone()
        .filter(|url| !url.is_empty())
        .ok_or_else(|| InventoryError::Config("no Redis: pass --redis-url or set REDIS_URL".into()))?;
    if args.lock_max_age.is_zero() {
        return Err(InventoryError::Config("--lock-max-age must be positive".into()));
    }
    let pool = kubesaga_kit::stores::postgres(&args.database.url()?, args.db_max_connections).await?;
    if !args.skip_migrations {
        kubesaga_inventory::migrate(&pool).await?;
    }
    let redis = kubesaga_kit::stores::redis(&redis_url).await?;
    let settings = Settings { lock_wait: args.lock_wait, ..Settings::default() };
    let state = AppState::new(pool, redis, settings)?;
    let sweeper = kubesaga_inventory::sweeper::spawn(
        state.clone(),
        SweeperConfig { interval: args.sweep_interval, max_age: args.lock_max_age },
    );
    let code = kubesaga_kit::server::run(kubesaga_inventory::SERVICE, &args.http, kubesaga_inventory::app(state)).await;
    if let Some(sweeper) = sweeper {
        sweeper.abort();
    }
    Ok(code)
}
