#![doc = include_str!("../README.md")]

pub mod cli;
pub mod conversation;
pub mod conversations;
pub mod gateway;
pub mod live;
pub mod memory;
pub mod memory_replica;
pub mod operator;
pub mod protocol;
pub mod reply;
pub mod runtime;
pub mod schema;
pub mod session_events;
pub mod settings;
pub mod tools;
pub mod workspace;

pub use gateway::Gateway;
pub use runtime::Worker;
pub use settings::PlatformSettings;

/// Why a platform service could not start.
#[derive(Debug, thiserror::Error)]
pub enum PlatformError {
    /// The settings did not load or validate (names the source and key).
    #[error("configuration: {0}")]
    Config(#[from] soma_config::ConfigError),
    /// PostgreSQL is unreachable or refused the connection.
    #[error("PostgreSQL at {url}: {source}")]
    Postgres {
        /// The URL, without its password.
        url: String,
        /// The driver's error.
        source: sqlx::Error,
    },
    /// The outbox could not be set up.
    #[error(transparent)]
    Outbox(#[from] soma_outbox::OutboxError),
    /// Kafka client set-up failed (bad settings; a down broker is not an
    /// error at start).
    #[error(transparent)]
    Bus(#[from] soma_bus::BusError),
    /// Redis client set-up failed.
    #[error(transparent)]
    Redis(#[from] soma_redis::RedisError),
    /// Authentication or authorization set-up failed (issuers, policy
    /// files, routes).
    #[error("policy: {0}")]
    Policy(String),
    /// The SomaBrain client could not be built.
    #[error(transparent)]
    Somabrain(#[from] soma_somabrain::Error),
    /// A listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address (or which listener).
        addr: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The session event store could not be set up.
    #[error(transparent)]
    SessionEvents(#[from] session_events::SessionEventsError),
    /// Telemetry could not be initialised.
    #[error(transparent)]
    Telemetry(#[from] soma_observability::TelemetryError),
}

impl PlatformError {
    /// Whether the error is bad configuration (fix the settings, don't retry).
    pub fn is_config(&self) -> bool {
        match self {
            PlatformError::Config(_) | PlatformError::Policy(_) => true,
            PlatformError::SessionEvents(e) => e.is_config(),
            _ => false,
        }
    }

    /// Whether a dependency was unreachable (retrying later may work).
    pub fn is_unavailable(&self) -> bool {
        match self {
            PlatformError::Postgres { .. } | PlatformError::Bind { .. } => true,
            PlatformError::SessionEvents(e) => e.is_unavailable(),
            _ => false,
        }
    }
}
