//! Response future of the HTTP trace layer.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use pin_project_lite::pin_project;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::http::SensitiveHeaders;

pin_project! {
    /// Response future of [`TraceService`](super::TraceService): polls the
    /// inner future inside the request span and records the outcome.
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        span: tracing::Span,
        sensitive: SensitiveHeaders,
        start: Instant,
    }
}

impl<F> ResponseFuture<F> {
    pub(super) fn new(inner: F, span: tracing::Span, sensitive: SensitiveHeaders) -> Self {
        Self {
            inner,
            span,
            sensitive,
            start: Instant::now(),
        }
    }
}

impl<F> std::fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("span", &self.span)
            .finish_non_exhaustive()
    }
}

impl<F, ResBody, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<http::Response<ResBody>, E>>,
    E: std::fmt::Display,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let _entered = this.span.enter();
        let mut result = std::task::ready!(this.inner.poll(cx));
        let latency_ms = this.start.elapsed().as_secs_f64() * 1000.0;
        match &mut result {
            Ok(response) => {
                this.sensitive.mark(response.headers_mut());
                let status = response.status().as_u16();
                // Straight to the OpenTelemetry span: recording through
                // `tracing` would make the log layer re-format the span's
                // fields (expensive with JSON logs); the completion event
                // below carries the status for logs.
                this.span
                    .set_attribute("http.response.status_code", i64::from(status));
                if response.status().is_server_error() {
                    this.span
                        .set_status(opentelemetry::trace::Status::error(format!(
                            "HTTP {status}"
                        )));
                }
                tracing::debug!(status, latency_ms, "http request completed");
            }
            Err(err) => {
                this.span
                    .set_status(opentelemetry::trace::Status::error(err.to_string()));
                tracing::debug!(error = %err, latency_ms, "http request failed");
            }
        }
        Poll::Ready(result)
    }
}
