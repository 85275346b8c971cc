//! `soma-memory-service`: a SomaBrain-compatible local memory service (see
//! the crate README).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// A SomaBrain-compatible local memory service on PostgreSQL.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// TOML settings files, lowest precedence first; `SOMA_*` environment
    /// variables override them (`SOMA_HTTP__BIND=127.0.0.1:9797`).
    #[arg(
        long = "config",
        value_name = "FILE",
        default_value = "examples/memory-service/config/local.toml"
    )]
    config: Vec<PathBuf>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let settings = match soma_memory_service::loader(&args.config)
        .set("telemetry.service_name", "soma-memory-service")
        .set("telemetry.service_version", env!("CARGO_PKG_VERSION"))
        .load()
    {
        Ok(s) => s,
        Err(e) => {
            eprintln!("soma-memory-service: {e}");
            return ExitCode::FAILURE;
        }
    };
    match soma_memory_service::run(settings).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("soma-memory-service: {e}");
            ExitCode::FAILURE
        }
    }
}
