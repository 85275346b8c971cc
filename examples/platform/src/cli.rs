//! The command line shared by the three service binaries.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tokio::net::TcpListener;

use crate::{Gateway, PlatformError, Worker, conversation, memory, tools};

/// Which service a binary runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    /// `soma-gateway`.
    Gateway,
    /// `soma-conversation-worker`.
    ConversationWorker,
    /// `soma-memory-replicator`.
    MemoryReplicator,
    /// `soma-tool-executor`.
    ToolExecutor,
}

impl Service {
    /// The binary and `telemetry.service_name`.
    pub fn name(self) -> &'static str {
        match self {
            Service::Gateway => "soma-gateway",
            Service::ConversationWorker => "soma-conversation-worker",
            Service::MemoryReplicator => "soma-memory-replicator",
            Service::ToolExecutor => "soma-tool-executor",
        }
    }
}

/// Arguments of every service binary.
#[derive(Debug, Parser)]
pub struct Args {
    /// TOML settings files, lowest precedence first; `SOMA_*` environment
    /// variables override them.
    #[arg(
        long = "config",
        value_name = "FILE",
        default_value = "examples/platform/config/local.toml"
    )]
    pub config: Vec<PathBuf>,
}

/// Runs `service` until Ctrl-C or SIGTERM, then shuts down gracefully.
pub async fn main(service: Service) -> ExitCode {
    let args = Args::parse();
    match run(service, &args.config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{}: {e}", service.name());
            ExitCode::FAILURE
        }
    }
}

async fn bind(addr: &str) -> Result<TcpListener, PlatformError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| PlatformError::Bind {
            addr: addr.to_owned(),
            source,
        })
}

async fn run(service: Service, files: &[PathBuf]) -> Result<(), PlatformError> {
    let live = crate::settings::loader(files)
        .set("telemetry.service_name", service.name())
        .into_live()?;
    let settings = live.load().value().clone();
    let telemetry = soma_observability::init(&settings.telemetry)?;
    let http = &settings.http;
    let worker: Option<Worker> = match service {
        Service::Gateway => {
            let gw = Gateway::start(
                live,
                bind(&http.gateway_bind).await?,
                bind(&http.gateway_admin_bind).await?,
            )
            .await?;
            let lifecycle = gw.runtime().lifecycle.clone();
            lifecycle.listen_for_signals();
            lifecycle.requested().await;
            gw.shutdown().await;
            None
        }
        Service::ConversationWorker => {
            Some(conversation::start(live, bind(&http.conversation_admin_bind).await?).await?)
        }
        Service::MemoryReplicator => {
            Some(memory::start(live, bind(&http.memory_admin_bind).await?).await?)
        }
        Service::ToolExecutor => {
            Some(tools::start(live, bind(&http.tools_admin_bind).await?).await?)
        }
    };
    if let Some(w) = worker {
        let lifecycle = w.runtime().lifecycle.clone();
        lifecycle.listen_for_signals();
        lifecycle.requested().await;
        w.shutdown().await;
    }
    tracing::info!(event = "stopped", service = service.name());
    if let Err(e) = telemetry.shutdown_async().await {
        eprintln!("{}: telemetry flush: {e}", service.name());
    }
    Ok(())
}
