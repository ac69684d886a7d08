//! The notification service of the checkout demo.

use std::process::ExitCode;

use clap::Parser;
use kubesaga_kit::server::ServeArgs;

/// The notification service.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    #[command(flatten)]
    serve: ServeArgs,
}

#[tokio::main]
async fn main() -> ExitCode {
    let _telemetry = kubesaga_kit::telemetry::init("notification");
    let args = Args::parse();
    kubesaga_kit::server::run("notification", &args.serve, kubesaga_kit::health::router()).await
}
