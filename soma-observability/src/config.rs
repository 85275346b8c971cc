//! `TelemetryConfig`: the `telemetry` section of a soma service's settings.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use soma_config::Secret;

use crate::metrics::ConstLabels;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// One JSON object per line, carrying the current span and its parents' fields.
    Json,
    /// Human-readable multi-line output for local development.
    #[default]
    Pretty,
}

/// OTLP transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OtlpProtocol {
    /// OTLP/gRPC (collector port 4317). Endpoint e.g. `http://127.0.0.1:4317`.
    #[default]
    Grpc,
    /// OTLP/HTTP with protobuf bodies (collector port 4318). Endpoint e.g.
    /// `http://127.0.0.1:4318/v1/traces` (the full traces URL).
    Http,
}

/// Telemetry settings (`telemetry` section). Every field has a local-dev default.
///
/// Nothing here is read from the environment by this crate: soma-config
/// composes the section (from files and `SOMA__TELEMETRY__*` variables) and
/// hands it over.
///
/// Note: the OpenTelemetry SDK and OTLP exporter themselves honour a few
/// standard `OTEL_*` variables for settings that have no field here (extra
/// exporter headers, compression); every setting that *has* a field here is
/// set explicitly and wins.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct TelemetryConfig {
    /// `service.name` resource attribute and `service` metric label.
    pub service_name: String,
    /// `service.version` resource attribute and `version` metric label.
    pub service_version: String,
    /// `deployment.environment` resource attribute and `env` metric label.
    pub environment: String,
    /// Log filter in `tracing_subscriber::EnvFilter` directive syntax, e.g.
    /// `info,soma_bus=debug`. Also the span filter unless `trace_filter` is set.
    /// The HTTP layers' spans are at INFO: a filter above INFO turns request
    /// spans, and so trace propagation, off.
    pub log_filter: String,
    /// Filter for spans handed to OpenTelemetry (same syntax as `log_filter`).
    /// Empty: the same as `log_filter`. E.g. logs at `warn` while tracing at `info`.
    pub trace_filter: Option<String>,
    /// `json` or `pretty`.
    pub log_format: LogFormat,
    /// OTLP endpoint. Empty: no export (trace context is still created and propagated).
    pub otlp_endpoint: Option<String>,
    /// `grpc` or `http`.
    pub otlp_protocol: OtlpProtocol,
    /// Timeout of one export request, in milliseconds.
    pub otlp_timeout_ms: u64,
    /// Extra headers (gRPC metadata) sent with every export, e.g. a collector
    /// API key. Values are secrets: never logged or serialized in clear.
    pub otlp_headers: BTreeMap<String, Secret>,
    /// Fraction of new (root) traces sampled, `0.0..=1.0`. Child spans follow
    /// their parent's decision (parent-based sampling).
    pub sampling_ratio: f64,
    /// Spans buffered for export; when full, new spans are **dropped** (counted
    /// by the SDK's internal logs), the request path never blocks.
    pub batch_max_queue_size: usize,
    /// Spans per export request.
    pub batch_max_export_batch_size: usize,
    /// Delay between two scheduled exports, in milliseconds.
    pub batch_scheduled_delay_ms: u64,
    /// Deadline for flushing buffered spans at shutdown, in milliseconds.
    /// Spans still buffered after it are lost.
    pub shutdown_timeout_ms: u64,
    /// Extra header names (case-insensitive) never printed or recorded, on top
    /// of `authorization`, `proxy-authorization`, `cookie`, `set-cookie`, `x-api-key`.
    pub sensitive_headers: Vec<String>,
    /// Request headers recorded as `http.request.header.<name>` span
    /// attributes by the HTTP trace layer (sensitive ones as `[REDACTED]`).
    pub record_headers: Vec<String>,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            service_name: "unknown_service".into(),
            service_version: "0.0.0".into(),
            environment: "local".into(),
            log_filter: "info".into(),
            trace_filter: None,
            log_format: LogFormat::Pretty,
            otlp_endpoint: None,
            otlp_protocol: OtlpProtocol::Grpc,
            otlp_timeout_ms: 10_000,
            otlp_headers: BTreeMap::new(),
            sampling_ratio: 1.0,
            batch_max_queue_size: 2048,
            batch_max_export_batch_size: 512,
            batch_scheduled_delay_ms: 5_000,
            shutdown_timeout_ms: 5_000,
            sensitive_headers: Vec::new(),
            record_headers: Vec::new(),
        }
    }
}

impl TelemetryConfig {
    /// The defaults for one service: its name, version and deployment
    /// environment (the `service`, `version` and `env` labels). Set other
    /// fields on the result.
    ///
    /// ```
    /// use soma_observability::{LogFormat, TelemetryConfig};
    /// let mut config = TelemetryConfig::new("gateway", "1.4.0", "staging");
    /// config.log_format = LogFormat::Json;
    /// assert_eq!(config.const_labels().service, "gateway");
    /// ```
    pub fn new(
        service_name: impl Into<String>,
        service_version: impl Into<String>,
        environment: impl Into<String>,
    ) -> Self {
        Self {
            service_name: service_name.into(),
            service_version: service_version.into(),
            environment: environment.into(),
            ..Self::default()
        }
    }

    /// Metric constant labels matching this config (`service`, `version`, `env`).
    pub fn const_labels(&self) -> ConstLabels {
        ConstLabels::new(&self.service_name, &self.service_version, &self.environment)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_serialize() {
        let mut c = TelemetryConfig::default();
        c.otlp_headers
            .insert("x-api-key".into(), Secret::new("s3cr3t-key"));
        let json = serde_json::to_string(&c).unwrap();
        assert!(!json.contains("s3cr3t-key"), "{json}");
        assert!(!format!("{c:?}").contains("s3cr3t-key"));
        let back: TelemetryConfig = serde_json::from_str(
            r#"{"service_name":"gw","otlp_headers":{"x-api-key":"k"},"log_format":"json"}"#,
        )
        .unwrap();
        assert_eq!(back.otlp_headers["x-api-key"].expose_secret(), "k");
        assert_eq!(back.log_format, LogFormat::Json);
        assert_eq!(back.sampling_ratio, 1.0);
    }
}
