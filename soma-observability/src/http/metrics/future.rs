//! Response future of the HTTP metrics layer.

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use pin_project_lite::pin_project;

use super::{HttpMetrics, InFlightLabels, RequestLabels, status_label};

/// Records one request exactly once: on completion, or as `cancelled` when dropped.
pub(super) struct Recorder {
    pub(super) metrics: Arc<HttpMetrics>,
    pub(super) labels: Option<InFlightLabels>,
    pub(super) start: Instant,
}

impl Recorder {
    fn finish(&mut self, status: Cow<'static, str>) {
        let Some(InFlightLabels { method, route }) = self.labels.take() else {
            return;
        };
        let elapsed = self.start.elapsed().as_secs_f64();
        self.metrics
            .in_flight
            .get_or_create(&InFlightLabels {
                method: method.clone(),
                route: route.clone(),
            })
            .dec();
        let labels = RequestLabels {
            method,
            route,
            status,
        };
        self.metrics.requests.get_or_create(&labels).inc();
        self.metrics
            .duration
            .get_or_create(&labels)
            .observe(elapsed);
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.finish(Cow::Borrowed("cancelled"));
    }
}

pin_project! {
    /// Response future of [`HttpMetricsService`](super::HttpMetricsService).
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        recorder: Recorder,
    }
}

impl<F> ResponseFuture<F> {
    pub(super) fn new(inner: F, recorder: Recorder) -> Self {
        Self { inner, recorder }
    }
}

impl<F> std::fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F, ResBody, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<http::Response<ResBody>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = std::task::ready!(this.inner.poll(cx));
        let status = match &result {
            Ok(response) => status_label(response.status()),
            Err(_) => Cow::Borrowed("error"),
        };
        this.recorder.finish(status);
        Poll::Ready(result)
    }
}
