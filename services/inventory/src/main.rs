//! The inventory service of the checkout demo.

use std::process::ExitCode;

use clap::Parser;
use kubesaga_kit::server::ServeArgs;

/// The inventory service.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    #[command(flatten)]
    serve: ServeArgs,
}

#[tokio::main]
async fn main() -> ExitCode {
    let _telemetry = kubesaga_kit::telemetry::init("inventory");
    let args = Args::parse();
    kubesaga_kit::server::run("inventory", &args.serve, kubesaga_kit::health::router()).await
}
