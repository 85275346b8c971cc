//! Telemetry errors.

use std::time::Duration;

/// Why telemetry could not be set up or shut down.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TelemetryError {
    /// A config field is invalid.
    #[error("invalid telemetry config `{field}`: {reason}")]
    InvalidConfig {
        /// The field.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// `otlp_endpoint` is set but the crate was built without the `otlp` feature.
    #[error("otlp_endpoint is set but soma-observability was built without the `otlp` feature")]
    OtlpNotEnabled,
    /// OTLP export needs a tokio runtime (call init inside one).
    #[error("OTLP export needs a tokio runtime: call telemetry init from within one")]
    NoRuntime,
    /// The exporter could not be built, or an export/flush failed.
    #[error("telemetry export: {0}")]
    Export(String),
    /// A global subscriber was already installed.
    #[error("a global tracing subscriber is already installed")]
    AlreadyInitialized,
    /// Shutdown did not finish flushing within its deadline; remaining spans are lost.
    #[error("telemetry shutdown did not finish within {0:?}")]
    ShutdownTimeout(Duration),
}

impl TelemetryError {
    /// The configuration is invalid (fix the config, retrying will not help).
    pub fn is_invalid_config(&self) -> bool {
        matches!(self, Self::InvalidConfig { .. } | Self::OtlpNotEnabled)
    }

    /// A global subscriber is already installed (e.g. a second init in tests).
    pub fn is_already_initialized(&self) -> bool {
        matches!(self, Self::AlreadyInitialized)
    }

    /// Export, flush or shutdown failed or timed out.
    pub fn is_export(&self) -> bool {
        matches!(
            self,
            Self::Export(_) | Self::ShutdownTimeout(_) | Self::NoRuntime
        )
    }
}
