//! The client's Prometheus metrics.
//!
//! | name | type | labels |
//! |---|---|---|
//! | `soma_somabrain_requests_total` | counter | `endpoint` (route template), `status` (HTTP code, or `circuit_open`, `timeout`, `transport`, `decode_error`, `invalid_request`) |
//! | `soma_somabrain_request_duration_seconds` | histogram | `endpoint` |
//! | `soma_somabrain_retries_total` | counter | `endpoint` |
//! | `soma_circuit_breaker_state` | gauge (0 closed, 1 open, 2 half-open) | `component` (one per [`EndpointGroup`](crate::EndpointGroup): `somabrain.memory_write`, `somabrain.memory_read`, `somabrain.context`, `somabrain.operator`) |
//! | `soma_circuit_breaker_transitions_total` | counter | `component`, `to` |
//!
//! The two breaker metrics are the shared ones of
//! [`soma_observability::resilience`] (the bus publisher and the OPA
//! engine export the same names under their own components).
//!
//! One sample per *call* (retries included) in `requests_total` and the
//! duration histogram; each retry also counts in `retries_total`.

use std::borrow::Cow;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use soma_observability::metrics::{HistogramFamily, MetricsRegistry};

use crate::Endpoint;

/// Name of the requests counter.
pub const REQUESTS_TOTAL: &str = "soma_somabrain_requests_total";
/// Name of the call duration histogram.
pub const REQUEST_DURATION_SECONDS: &str = "soma_somabrain_request_duration_seconds";
/// Name of the retries counter.
pub const RETRIES_TOTAL: &str = "soma_somabrain_retries_total";

const DURATION_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    endpoint: &'static str,
    status: Cow<'static, str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabels {
    endpoint: &'static str,
}

const N: usize = Endpoint::ALL.len();

/// Metric handles, resolved once per endpoint so the hot path does not hash
/// label sets for the common outcomes.
#[derive(Clone)]
pub(crate) struct ClientMetrics {
    requests: Family<RequestLabels, Counter>,
    ok: [Counter; N],
    circuit_open: [Counter; N],
    duration: [Histogram; N],
    retries: [Counter; N],
}

impl ClientMetrics {
    pub(crate) fn new(registry: &MetricsRegistry) -> Self {
        let requests = registry.counter_family::<RequestLabels>(
            REQUESTS_TOTAL,
            "SomaBrain calls by route template and outcome (HTTP status or failure kind)",
        );
        let duration: HistogramFamily<EndpointLabels> = registry.histogram_family(
            REQUEST_DURATION_SECONDS,
            "Duration of SomaBrain calls, retries and backoff included",
            DURATION_BUCKETS,
        );
        let retries = registry.counter_family::<EndpointLabels>(
            RETRIES_TOTAL,
            "SomaBrain call attempts beyond the first",
        );
        let req = |ep: Endpoint, status: &'static str| {
            requests.get_or_create_owned(&RequestLabels {
                endpoint: ep.path(),
                status: Cow::Borrowed(status),
            })
        };
        let ep = |ep: Endpoint| EndpointLabels {
            endpoint: ep.path(),
        };
        ClientMetrics {
            ok: Endpoint::ALL.map(|e| req(e, "200")),
            circuit_open: Endpoint::ALL.map(|e| req(e, "circuit_open")),
            duration: Endpoint::ALL.map(|e| duration.get_or_create_owned(&ep(e))),
            retries: Endpoint::ALL.map(|e| retries.get_or_create_owned(&ep(e))),
            requests,
        }
    }

    #[inline]
    pub(crate) fn circuit_open(&self, endpoint: Endpoint) {
        self.circuit_open[endpoint.index()].inc();
    }

    pub(crate) fn retry(&self, endpoint: Endpoint) {
        self.retries[endpoint.index()].inc();
    }

    pub(crate) fn call(&self, endpoint: Endpoint, status: Cow<'static, str>, elapsed: Duration) {
        if status == "200" {
            self.ok[endpoint.index()].inc();
        } else {
            self.requests
                .get_or_create(&RequestLabels {
                    endpoint: endpoint.path(),
                    status,
                })
                .inc();
        }
        self.duration[endpoint.index()].observe(elapsed.as_secs_f64());
    }
}
