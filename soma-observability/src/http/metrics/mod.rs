//! HTTP server metrics: requests, durations and in-flight requests by route template.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `soma_http_server_requests_total` | counter | `method`, `route`, `status` |
//! | `soma_http_server_request_duration_seconds` | histogram | `method`, `route`, `status` |
//! | `soma_http_server_requests_in_flight` | gauge | `method`, `route` |
//!
//! (The issue's `http_server_requests_total` carries the `soma_` prefix of the
//! house naming rule.) `status` is the numeric status code, `error` when the
//! inner service failed, or `cancelled` when the response future was dropped
//! before completing (client went away, timeout layer). Duration is measured
//! until the response head is ready (body streaming is not included).
//! `route` is the route template (see [`route_template`](super::route_template)),
//! `method` is bounded by [`method_label`](super::method_label).

mod future;

use std::borrow::Cow;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

pub use future::ResponseFuture;

use crate::metrics::{DEFAULT_LATENCY_BUCKETS, HistogramFamily, MetricsRegistry};

/// Labels of the request counter and duration histogram.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Bounded HTTP method.
    pub method: Cow<'static, str>,
    /// Route template.
    pub route: Cow<'static, str>,
    /// Status code, `error` or `cancelled`.
    pub status: Cow<'static, str>,
}

/// Labels of the in-flight gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InFlightLabels {
    /// Bounded HTTP method.
    pub method: Cow<'static, str>,
    /// Route template.
    pub route: Cow<'static, str>,
}

#[derive(Debug)]
pub(crate) struct HttpMetrics {
    pub(crate) requests: Family<RequestLabels, Counter>,
    pub(crate) duration: HistogramFamily<RequestLabels>,
    pub(crate) in_flight: Family<InFlightLabels, Gauge>,
}

/// Tower layer recording HTTP server metrics. See the [module docs](self).
///
/// Several layers built from the same registry share the same families.
#[derive(Clone, Debug)]
pub struct HttpMetricsLayer {
    metrics: Arc<HttpMetrics>,
}

impl HttpMetricsLayer {
    /// Registers (or reuses) the HTTP families in `registry`, with
    /// [`DEFAULT_LATENCY_BUCKETS`].
    pub fn new(registry: &MetricsRegistry) -> Self {
        Self::with_buckets(registry, DEFAULT_LATENCY_BUCKETS)
    }

    /// Like [`new`](Self::new) with custom duration buckets (seconds).
    pub fn with_buckets(registry: &MetricsRegistry, buckets: &[f64]) -> Self {
        Self {
            metrics: Arc::new(HttpMetrics {
                requests: registry.counter_family(
                    "soma_http_server_requests_total",
                    "HTTP requests served, by method, route template and status",
                ),
                duration: registry.histogram_family(
                    "soma_http_server_request_duration_seconds",
                    "Time until the response head was ready, in seconds",
                    buckets,
                ),
                in_flight: registry.gauge_family(
                    "soma_http_server_requests_in_flight",
                    "HTTP requests being served",
                ),
            }),
        }
    }
}

impl<S> tower::Layer<S> for HttpMetricsLayer {
    type Service = HttpMetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        HttpMetricsService {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// The service built by [`HttpMetricsLayer`].
#[derive(Clone, Debug)]
pub struct HttpMetricsService<S> {
    inner: S,
    metrics: Arc<HttpMetrics>,
}

impl<S, B, ResBody> tower::Service<http::Request<B>> for HttpMetricsService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<ResBody>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let labels = InFlightLabels {
            method: Cow::Borrowed(super::method_label(req.method())),
            route: super::route_template(&req),
        };
        self.metrics.in_flight.get_or_create(&labels).inc();
        let guard = future::Recorder {
            metrics: self.metrics.clone(),
            labels: Some(labels),
            start: Instant::now(),
        };
        ResponseFuture::new(self.inner.call(req), guard)
    }
}

pub(crate) fn status_label(status: http::StatusCode) -> Cow<'static, str> {
    Cow::Borrowed(match status.as_u16() {
        200 => "200",
        201 => "201",
        202 => "202",
        204 => "204",
        301 => "301",
        302 => "302",
        304 => "304",
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        405 => "405",
        409 => "409",
        422 => "422",
        429 => "429",
        500 => "500",
        502 => "502",
        503 => "503",
        504 => "504",
        other => return Cow::Owned(other.to_string()),
    })
}
