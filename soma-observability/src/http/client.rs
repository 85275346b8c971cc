//! Outgoing reqwest calls (feature `reqwest`): client spans and W3C injection.
//!
//! [`send_traced`] opens a client span (`otel.kind = client`) as a child of the
//! current span, injects *its* context into `traceparent`/`tracestate`, sends,
//! and records the status, so the callee's server span becomes a child of the
//! client span. [`RequestBuilderExt::with_trace_context`] only injects the
//! current span's context, for callers that make their own span.
//!
//! ```no_run
//! # async fn run() -> Result<(), reqwest::Error> {
//! let client = reqwest::Client::new();
//! let response = soma_observability::http::client::send_traced(
//!     client.get("http://127.0.0.1:8080/v1/brain/recall"),
//! )
//! .await?;
//! # let _ = response; Ok(()) }
//! ```

use tracing::Instrument as _;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::http::SensitiveHeaders;

/// Adds trace-context injection to [`reqwest::RequestBuilder`].
pub trait RequestBuilderExt {
    /// Injects the current span's context as `traceparent`/`tracestate`.
    fn with_trace_context(self) -> Self;
}

impl RequestBuilderExt for reqwest::RequestBuilder {
    fn with_trace_context(self) -> Self {
        let mut headers = http::HeaderMap::new();
        crate::propagation::inject_current(&mut headers);
        self.headers(headers)
    }
}

/// Sends `builder` inside a client span, injecting the span's context.
///
/// The span records `http.request.method`, `server.address`, `server.port`,
/// `url.path` (never the query) and `http.response.status_code`; a transport
/// error or a 5xx sets `otel.status_code = ERROR`. Sensitive request headers
/// are marked so they cannot be printed.
pub async fn send_traced(builder: reqwest::RequestBuilder) -> reqwest::Result<reqwest::Response> {
    let (client, request) = builder.build_split();
    let mut request = request?;
    let method = crate::http::method_label(request.method());
    let url = request.url();
    let span = tracing::info_span!(
        "http.client.request",
        otel.name = %format_args!("HTTP {method}"),
        otel.kind = "client",
        http.request.method = method,
        server.address = url.host_str().unwrap_or(""),
        server.port = url.port_or_known_default(),
        url.path = url.path(),
        http.response.status_code = Empty,
        otel.status_code = Empty,
    );
    SensitiveHeaders::default().mark(request.headers_mut());
    crate::propagation::inject_context(&span.context(), request.headers_mut());
    let result = client.execute(request).instrument(span.clone()).await;
    match &result {
        Ok(response) => {
            span.record("http.response.status_code", response.status().as_u16());
            if response.status().is_server_error() {
                span.record("otel.status_code", "ERROR");
            }
        }
        Err(err) => {
            span.record("otel.status_code", "ERROR");
            span.in_scope(|| tracing::debug!(error = %err, "http call failed"));
        }
    }
    result
}
