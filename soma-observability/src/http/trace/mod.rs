//! HTTP server tracing that continues an incoming W3C trace context.
//!
//! For each request [`TraceLayer`]:
//!
//! 1. marks sensitive header values (see [`SensitiveHeaders`]) so nothing
//!    downstream can print them;
//! 2. opens an INFO span `HTTP {method} {route}` (`otel.kind = server`,
//!    `http.request.method`, `http.route`, `url.path`, `request_id` (the
//!    [`RequestId`](super::RequestId) extension set by
//!    [`RequestIdLayer`](super::RequestIdLayer), else the `x-request-id`
//!    header), `trace_id` so JSON logs can be joined to traces) whose parent is the context in `traceparent`/`tracestate`,
//!    when present and valid (else it starts a new trace);
//! 3. records configured request headers as `http.request.header.<name>` span
//!    attributes, sensitive ones as `[REDACTED]`;
//! 4. runs the inner service inside the span and records
//!    `http.response.status_code` on the OpenTelemetry span (and an error
//!    status for 5xx or a service error), then emits a DEBUG event with status
//!    and latency for logs.
//!
//! The query string is never recorded (it may carry tokens).

mod future;

use std::sync::Arc;
use std::task::{Context, Poll};

use http::HeaderName;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

pub use future::ResponseFuture;

use super::redact::{REDACTED, SensitiveHeaders};
use crate::config::TelemetryConfig;

#[derive(Debug, Clone)]
struct Settings {
    sensitive: SensitiveHeaders,
    record: Vec<(HeaderName, String)>,
}

/// Tower layer: a server span per request, continuing the caller's trace.
/// See the [module docs](self).
#[derive(Clone, Debug)]
pub struct TraceLayer {
    settings: Arc<Settings>,
}

impl Default for TraceLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl TraceLayer {
    /// Default sensitive headers, no recorded headers.
    pub fn new() -> Self {
        Self {
            settings: Arc::new(Settings {
                sensitive: SensitiveHeaders::default(),
                record: Vec::new(),
            }),
        }
    }

    /// Sensitive and recorded headers from `TelemetryConfig`.
    pub fn from_config(config: &TelemetryConfig) -> Self {
        config.record_headers.iter().fold(
            Self::new().sensitive_headers(SensitiveHeaders::new(&config.sensitive_headers)),
            |l, h| l.record_header(h),
        )
    }

    /// Replaces the sensitive-header set.
    pub fn sensitive_headers(mut self, set: SensitiveHeaders) -> Self {
        Arc::make_mut(&mut self.settings).sensitive = set;
        self
    }

    /// Records request header `name` as a span attribute (redacted if sensitive).
    /// Invalid names are ignored with a warning.
    pub fn record_header(mut self, name: &str) -> Self {
        match HeaderName::try_from(name.to_ascii_lowercase()) {
            Ok(header) => {
                let key = format!("http.request.header.{}", header.as_str());
                Arc::make_mut(&mut self.settings).record.push((header, key));
            }
            Err(_) => tracing::warn!(header = name, "ignoring invalid header name to record"),
        }
        self
    }
}

impl<S> tower::Layer<S> for TraceLayer {
    type Service = TraceService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TraceService {
            inner,
            settings: self.settings.clone(),
        }
    }
}

/// The service built by [`TraceLayer`].
#[derive(Clone, Debug)]
pub struct TraceService<S> {
    inner: S,
    settings: Arc<Settings>,
}

impl<S, B, ResBody> tower::Service<http::Request<B>> for TraceService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<ResBody>>,
    S::Error: std::fmt::Display,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let settings = &self.settings;
        settings.sensitive.mark(req.headers_mut());
        let method = super::method_label(req.method());
        let route = super::route_template(&req);
        let request_id = super::request_id_of(&req).or_else(|| {
            req.headers()
                .get(super::REQUEST_ID_HEADER)
                .and_then(|v| v.to_str().ok())
        });
        let span = tracing::info_span!(
            "http.server.request",
            otel.name = %format_args!("HTTP {method} {route}"),
            otel.kind = "server",
            http.request.method = method,
            http.route = %route,
            url.path = req.uri().path(),
            request_id = request_id,
            trace_id = Empty,
        );
        if !span.is_disabled() {
            crate::propagation::set_parent_from(&span, req.headers());
            crate::propagation::record_trace_id(&span);
            for (name, key) in &settings.record {
                if let Some(value) = req.headers().get(name) {
                    let shown = if settings.sensitive.is_sensitive(name) || value.is_sensitive() {
                        REDACTED.to_owned()
                    } else {
                        String::from_utf8_lossy(value.as_bytes()).into_owned()
                    };
                    span.set_attribute(key.clone(), shown);
                }
            }
        }
        let fut = {
            let _entered = span.enter();
            self.inner.call(req)
        };
        ResponseFuture::new(fut, span, settings.sensitive.clone())
    }
}
