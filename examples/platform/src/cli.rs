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
        default_value = "examples/platform/config/local.toml",
        global = true
    )]
    pub config: Vec<PathBuf>,
    /// A one-off command instead of running the service.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// One-off commands of a service binary.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Issues an API key into the gateway's API-key store
    /// (`policy.api_keys.schema`, soma-policy's `PgApiKeyStore`) and
    /// prints it once: only its hash is stored.
    IssueApiKey {
        /// The subject the key acts as.
        #[arg(long, default_value = "dev-operator")]
        subject: String,
        /// Its tenant.
        #[arg(long, default_value = "acme")]
        tenant: String,
        /// A role (repeatable).
        #[arg(long = "role", default_value = "user")]
        roles: Vec<String>,
        /// A scope (repeatable).
        #[arg(long = "scope")]
        scopes: Vec<String>,
    },
}

/// Runs `service` until Ctrl-C or SIGTERM, then shuts down gracefully.
pub async fn main(service: Service) -> ExitCode {
    let args = Args::parse();
    let result = match args.command {
        None => run(service, &args.config).await,
        Some(Command::IssueApiKey {
            subject,
            tenant,
            roles,
            scopes,
        }) => issue_api_key(&args.config, subject, tenant, roles, scopes).await,
    };
    match result {
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

/// Issues an API key through soma-policy's store and prints it.
async fn issue_api_key(
    files: &[PathBuf],
    subject: String,
    tenant: String,
    roles: Vec<String>,
    scopes: Vec<String>,
) -> Result<(), PlatformError> {
    let settings = crate::settings::loader(files).load()?;
    let policy = |e: soma_policy::StoreError| PlatformError::Policy(e.to_string());
    let mut keys = settings.policy.api_keys.clone();
    keys.max_connections = 1;
    let store = soma_policy::PgApiKeyStore::from_config(&settings.postgres.url, &keys)
        .await
        .map_err(policy)?;
    store.migrate().await.map_err(policy)?;
    let issued = soma_policy::generate_key(
        &settings.policy.api_keys.prefix,
        subject,
        tenant,
        roles,
        scopes,
    );
    soma_policy::ApiKeyStore::insert(&store, issued.record)
        .await
        .map_err(policy)?;
    // The one place the key is shown: stdout of this command.
    println!("{}", issued.key.expose_secret());
    Ok(())
}
