//! Tracing, OpenTelemetry, Prometheus metrics and one health model for Soma platform services.
//!
//! # Why
//!
//! The platform this SDK replaces had six copies of observability setup, a
//! private metrics registry that nothing scraped, an alert on a metric that did
//! not exist, health routers that always reported unhealthy, and metric name
//! clashes that raised at runtime. This crate is the one way a soma service
//! gets logs, traces, metrics and health; the other soma crates build on it.
//!
//! # Guarantees
//!
//! - **One init** ([`telemetry::init`]) from a [`TelemetryConfig`]: JSON or
//!   pretty logs carrying span fields, an OpenTelemetry tracer with resource
//!   attributes, OTLP batch export (feature `otlp`), and a guard that flushes
//!   within a deadline. It reads no environment.
//! - **One trace across hops**: W3C `traceparent`/`tracestate` continue through
//!   HTTP ([`http::TraceLayer`], [`http::client`] with feature `reqwest`) and
//!   message headers ([`propagation::HeaderCarrier`]).
//! - **Metrics never clash**: [`metrics::MetricsRegistry`] is get-or-register;
//!   the same family registered twice is shared; a clash is a typed error or a
//!   logged, detached family, never a panic. Every series carries `service`,
//!   `version`, `env`. HTTP metrics label by route template, never raw path.
//! - **Health is reported, not polled**: [`health::HealthRegistry`] caches
//!   component state pushed by reporters or produced by background checks with
//!   timeouts, so probes never wait on a dependency.
//! - **One resilience vocabulary**: [`resilience::CircuitBreaker`] (one
//!   cancellation-safe probe in half-open) and [`resilience::Backoff`], with
//!   one config spelling, named per component in metrics and health.
//! - **Secrets stay out**: `Authorization`, `Cookie`, `Set-Cookie`, `X-Api-Key`
//!   and configured headers never reach logs or span attributes
//!   ([`http::SensitiveHeaders`]); OTLP headers in the config are secrets;
//!   [`redact_url`] takes the credentials out of a connection URL.
//!
//! # Plugging a component in
//!
//! Every soma component's builder takes the same two calls:
//! `.metrics(&MetricsRegistry)` registers its families in a
//! [`MetricsRegistry`], and `.health(&HealthRegistry)` registers its health
//! component in a [`HealthRegistry`]. Both registries are re-exported here at
//! the crate root (and stay at [`metrics::MetricsRegistry`] and
//! [`health::HealthRegistry`]).
//!
//! # Features
//!
//! | feature | adds |
//! |---|---|
//! | `otlp` | OTLP span export over gRPC (tonic) or HTTP/protobuf (hyper) |
//! | `axum` | [`admin::admin_router`] (`/live`, `/ready`, `/v1/health`, `/metrics`); route templates from `MatchedPath` |
//! | `reqwest` | [`http::client`]: client spans and context injection for outgoing calls |
//!
//! None is on by default.
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(feature = "axum")]
pub mod admin;
mod config;
pub mod health;
pub mod http;
pub mod metrics;
pub mod propagation;
pub mod resilience;
mod secrets;
pub mod shutdown;
pub mod telemetry;

pub use config::{LogFormat, OtlpProtocol, TelemetryConfig};
// The two registries every soma component plugs into (see "Plugging a
// component in" above); also at their module paths.
pub use health::HealthRegistry;
pub use metrics::MetricsRegistry;
pub use prometheus_client;
pub use secrets::redact_url;
pub use telemetry::{TelemetryError, TelemetryGuard, init};

/// The README's example, compiled and run as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

#[cfg(test)]
mod tests {
    /// The root re-exports are the module types, not copies: a registry built
    /// through one path is accepted where the other is named.
    #[test]
    fn root_registries_are_the_module_types() {
        let metrics: crate::metrics::MetricsRegistry = crate::MetricsRegistry::default();
        let health: crate::health::HealthRegistry = crate::HealthRegistry::new();
        fn takes(_: &crate::MetricsRegistry, _: &crate::HealthRegistry) {}
        takes(&metrics, &health);
    }
}
