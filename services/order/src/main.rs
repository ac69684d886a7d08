//! The order service of the checkout demo.

use std::process::ExitCode;

use clap::Parser;
use kubesaga_kit::server::ServeArgs;

/// The order service.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    #[command(flatten)]
    serve: ServeArgs,
}

#[tokio::main]
async fn main() -> ExitCode {
    let _telemetry = kubesaga_kit::telemetry::init("order");
    let args = Args::parse();
    kubesaga_kit::server::run("order", &args.serve, kubesaga_kit::health::router()).await
}
