//! `kubesaga-operator`: the operator binary.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use kubesaga_operator::crd;

/// Kubernetes-native saga orchestrator.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the CustomResourceDefinitions as YAML (`kubectl apply -f -` takes it), or write one file per CRD.
    Crd {
        /// Write `<plural>.yaml` for each CRD into this directory instead of printing them.
        #[arg(long)]
        out_dir: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Crd { out_dir } => write_crds(out_dir),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn write_crds(out_dir: Option<PathBuf>) -> Result<(), String> {
    for (name, definition) in crd::all() {
        let yaml = crd::to_yaml(&definition).map_err(|e| format!("cannot render the {name} CRD as YAML: {e}"))?;
        match &out_dir {
            None => print!("{yaml}"),
            Some(dir) => {
                let path = dir.join(format!("{name}.yaml"));
                std::fs::write(&path, yaml).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            }
        }
    }
    Ok(())
}
