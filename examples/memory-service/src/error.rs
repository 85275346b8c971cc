//! [`Error`]: why the service could not start or a storage call failed.

/// A failure of the memory service outside a single request's validation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The settings are unusable.
    #[error("configuration: {0}")]
    Config(String),
    /// PostgreSQL refused or failed a query (or could not be reached).
    #[error("postgres: {0}")]
    Postgres(#[from] sqlx::Error),
    /// A migration failed, or the schema holds a migration this build does
    /// not know / whose text changed.
    #[error("migration {version} ({name}): {reason}")]
    Migration {
        /// Migration version.
        version: i32,
        /// Migration name.
        name: &'static str,
        /// What went wrong.
        reason: String,
    },
    /// The listen address could not be bound.
    #[error("bind {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// Telemetry could not be initialised.
    #[error("telemetry: {0}")]
    Telemetry(#[from] soma_observability::TelemetryError),
    /// The HTTP server failed.
    #[error("serve: {0}")]
    Serve(std::io::Error),
}

impl Error {
    /// PostgreSQL is unreachable or failed: a request answers 503.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Error::Postgres(_))
    }

    /// The schema does not match this build's migrations.
    pub fn is_migration(&self) -> bool {
        matches!(self, Error::Migration { .. })
    }

    /// The configuration is unusable.
    pub fn is_config(&self) -> bool {
        matches!(self, Error::Config(_))
    }
}

impl From<soma_config::ConfigError> for Error {
    fn from(e: soma_config::ConfigError) -> Self {
        Error::Config(e.to_string())
    }
}
