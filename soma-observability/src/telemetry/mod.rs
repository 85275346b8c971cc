//! Telemetry init: one call installs logs, spans and trace export.
//!
//! [`init`] (or [`TelemetryBuilder`]) builds, from a [`TelemetryConfig`]:
//!
//! - a `tracing` subscriber with the configured filter, writing JSON lines
//!   (with the current span and its parents' fields) or pretty logs;
//! - an OpenTelemetry tracer provider with parent-based ratio sampling and the
//!   resource attributes `service.name`, `service.version`,
//!   `deployment.environment`, bridged to `tracing` spans. It is installed even
//!   without an exporter, so trace context is created and propagated through a
//!   service that exports nothing;
//! - with `otlp_endpoint` set (feature `otlp`), a batch OTLP exporter (gRPC or
//!   HTTP/protobuf). Export runs on a background thread; when its queue is full,
//!   new spans are dropped, never blocking a request.
//!
//! It returns a [`TelemetryGuard`]: shutting it down (or dropping it) flushes
//! buffered spans within `shutdown_timeout_ms`.

mod error;
#[cfg(feature = "otlp")]
mod otlp;

use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider, SpanLimits};
use tracing::Dispatch;
use tracing_subscriber::fmt::writer::BoxMakeWriter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::{EnvFilter, Layer, Registry};

pub use error::TelemetryError;

use crate::config::{LogFormat, TelemetryConfig};

/// Instrumentation scope name of the spans this crate creates.
pub const INSTRUMENTATION_SCOPE: &str = "soma-observability";

/// Installs telemetry globally from `config`. See the [module docs](self).
///
/// With an OTLP endpoint this must run inside a tokio runtime.
pub fn init(config: &TelemetryConfig) -> Result<TelemetryGuard, TelemetryError> {
    TelemetryBuilder::new(config).init()
}

/// Builds telemetry with optional overrides (log writer) for tests and tools.
pub struct TelemetryBuilder {
    config: TelemetryConfig,
    writer: Option<BoxMakeWriter>,
}

impl std::fmt::Debug for TelemetryBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TelemetryBuilder")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl TelemetryBuilder {
    /// Starts from `config`.
    pub fn new(config: &TelemetryConfig) -> Self {
        Self {
            config: config.clone(),
            writer: None,
        }
    }

    /// Writes logs to `writer` instead of stdout (e.g. a capture buffer in tests).
    pub fn with_writer<W>(mut self, writer: W) -> Self
    where
        W: for<'a> tracing_subscriber::fmt::MakeWriter<'a> + Send + Sync + 'static,
    {
        self.writer = Some(BoxMakeWriter::new(writer));
        self
    }

    /// Builds the subscriber without installing it (use with
    /// `tracing::dispatcher::with_default`), plus the guard.
    pub fn build(self) -> Result<(Dispatch, TelemetryGuard), TelemetryError> {
        let config = &self.config;
        validate(config)?;
        let provider = build_provider(config)?;
        let tracer = provider.tracer(INSTRUMENTATION_SCOPE);
        let filter = |c: &TelemetryConfig| {
            EnvFilter::builder()
                .parse(&c.log_filter)
                .map_err(|e| TelemetryError::InvalidConfig {
                    field: "log_filter",
                    reason: e.to_string(),
                })
        };
        let writer = self
            .writer
            .unwrap_or_else(|| BoxMakeWriter::new(std::io::stdout));
        let fmt_layer: Box<dyn Layer<Registry> + Send + Sync> = match config.log_format {
            LogFormat::Json => tracing_subscriber::fmt::layer()
                .json()
                .with_current_span(true)
                .with_span_list(true)
                .with_writer(writer)
                .with_filter(filter(config)?)
                .boxed(),
            LogFormat::Pretty => tracing_subscriber::fmt::layer()
                .pretty()
                .with_writer(writer)
                .with_filter(filter(config)?)
                .boxed(),
        };
        // Per-request cost matters (budget: 2 µs per request with export):
        // no code-location or thread attributes, no idle/busy timings, and no
        // activation of the OpenTelemetry context on every span entry (this
        // crate's propagation reads the context from the `tracing` span).
        let otel_layer = tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_location(false)
            .with_threads(false)
            .with_tracked_inactivity(false)
            .with_context_activation(false)
            .with_filter(filter(config)?)
            .boxed();
        let subscriber = Registry::default().with(fmt_layer).with(otel_layer);
        let guard = TelemetryGuard {
            provider,
            shutdown_timeout: Duration::from_millis(config.shutdown_timeout_ms),
            done: false,
        };
        Ok((Dispatch::new(subscriber), guard))
    }

    /// Builds and installs globally: the `tracing` default subscriber, the
    /// OpenTelemetry global tracer provider, and the W3C trace-context
    /// propagator as the global text-map propagator.
    pub fn init(self) -> Result<TelemetryGuard, TelemetryError> {
        let (dispatch, guard) = self.build()?;
        tracing::dispatcher::set_global_default(dispatch)
            .map_err(|_| TelemetryError::AlreadyInitialized)?;
        opentelemetry::global::set_tracer_provider(guard.provider.clone());
        opentelemetry::global::set_text_map_propagator(
            opentelemetry_sdk::propagation::TraceContextPropagator::new(),
        );
        Ok(guard)
    }
}

fn validate(config: &TelemetryConfig) -> Result<(), TelemetryError> {
    let invalid = |field, reason: &str| TelemetryError::InvalidConfig {
        field,
        reason: reason.into(),
    };
    if !(0.0..=1.0).contains(&config.sampling_ratio) || config.sampling_ratio.is_nan() {
        return Err(invalid("sampling_ratio", "must be between 0.0 and 1.0"));
    }
    if config.batch_max_export_batch_size == 0 || config.batch_max_queue_size == 0 {
        return Err(invalid(
            "batch_max_export_batch_size",
            "batch and queue sizes must be > 0",
        ));
    }
    if config.batch_max_export_batch_size > config.batch_max_queue_size {
        return Err(invalid(
            "batch_max_export_batch_size",
            "must not exceed batch_max_queue_size",
        ));
    }
    if config.service_name.trim().is_empty() {
        return Err(invalid("service_name", "must not be empty"));
    }
    Ok(())
}

/// The OpenTelemetry resource for `config`.
pub fn resource(config: &TelemetryConfig) -> Resource {
    // `builder_empty`: no detectors, so nothing is read from the environment.
    Resource::builder_empty()
        .with_service_name(config.service_name.clone())
        .with_attributes([
            KeyValue::new("service.version", config.service_version.clone()),
            KeyValue::new("deployment.environment", config.environment.clone()),
            KeyValue::new("deployment.environment.name", config.environment.clone()),
        ])
        .build()
}

fn build_provider(config: &TelemetryConfig) -> Result<SdkTracerProvider, TelemetryError> {
    let builder = SdkTracerProvider::builder()
        .with_resource(resource(config))
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            config.sampling_ratio,
        ))))
        .with_span_limits(SpanLimits::default());
    match config.otlp_endpoint.as_deref().map(str::trim) {
        None | Some("") => Ok(builder.build()),
        #[cfg(feature = "otlp")]
        Some(endpoint) => {
            let processor = otlp::batch_processor(config, endpoint)?;
            Ok(builder.with_span_processor(processor).build())
        }
        #[cfg(not(feature = "otlp"))]
        Some(_) => Err(TelemetryError::OtlpNotEnabled),
    }
}

/// Keeps the tracer provider alive; flushes buffered spans on shutdown.
///
/// Dropping the guard shuts down like [`shutdown`](Self::shutdown) (errors are
/// logged). Shutdown blocks the calling thread for up to `shutdown_timeout_ms`;
/// from async code prefer [`shutdown_async`](Self::shutdown_async), which does
/// the blocking part on tokio's blocking pool.
#[must_use = "dropping the guard shuts telemetry export down"]
pub struct TelemetryGuard {
    provider: SdkTracerProvider,
    shutdown_timeout: Duration,
    done: bool,
}

impl std::fmt::Debug for TelemetryGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TelemetryGuard")
            .field("shutdown_timeout", &self.shutdown_timeout)
            .finish()
    }
}

impl TelemetryGuard {
    /// The tracer provider (e.g. to build extra tracers).
    pub fn tracer_provider(&self) -> &SdkTracerProvider {
        &self.provider
    }

    /// Exports every buffered span now (blocks until done or failed).
    pub fn flush(&self) -> Result<(), TelemetryError> {
        self.provider
            .force_flush()
            .map_err(|e| TelemetryError::Export(e.to_string()))
    }

    /// Flushes buffered spans and stops export, within the shutdown deadline.
    pub fn shutdown(mut self) -> Result<(), TelemetryError> {
        self.done = true;
        shutdown_provider(&self.provider, self.shutdown_timeout)
    }

    /// [`shutdown`](Self::shutdown) on tokio's blocking pool.
    pub async fn shutdown_async(mut self) -> Result<(), TelemetryError> {
        self.done = true;
        let provider = self.provider.clone();
        let timeout = self.shutdown_timeout;
        tokio::task::spawn_blocking(move || shutdown_provider(&provider, timeout))
            .await
            .map_err(|e| TelemetryError::Export(format!("shutdown task failed: {e}")))?
    }
}

fn shutdown_provider(
    provider: &SdkTracerProvider,
    timeout: Duration,
) -> Result<(), TelemetryError> {
    use opentelemetry_sdk::error::OTelSdkError;
    match provider.shutdown_with_timeout(timeout) {
        Ok(()) | Err(OTelSdkError::AlreadyShutdown) => Ok(()),
        Err(OTelSdkError::Timeout(t)) => Err(TelemetryError::ShutdownTimeout(t)),
        Err(e) => Err(TelemetryError::Export(e.to_string())),
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if !self.done {
            if let Err(err) = shutdown_provider(&self.provider, self.shutdown_timeout) {
                tracing::warn!(error = %err, "telemetry shutdown incomplete");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_config() {
        let mut c = TelemetryConfig {
            sampling_ratio: 1.5,
            ..Default::default()
        };
        assert!(
            TelemetryBuilder::new(&c)
                .build()
                .unwrap_err()
                .is_invalid_config()
        );
        c.sampling_ratio = 0.5;
        c.log_filter = "info,[[[".into();
        let err = TelemetryBuilder::new(&c).build().unwrap_err();
        assert!(err.is_invalid_config(), "{err}");
        c.log_filter = "info".into();
        c.batch_max_export_batch_size = 10_000;
        assert!(
            TelemetryBuilder::new(&c)
                .build()
                .unwrap_err()
                .is_invalid_config()
        );
    }
}
