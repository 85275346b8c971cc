//! Metric families of soma-bus (registered through soma-observability).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use soma_observability::metrics::{HistogramFamily, MetricsRegistry};

/// Labels of publish metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct PublishLabels {
    pub(crate) topic: String,
    /// `kafka | deferred | failed`
    pub(crate) outcome: &'static str,
}

/// Labels of consumer metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ConsumeLabels {
    pub(crate) topic: String,
    /// `handled | retried | dead_lettered | duplicate | malformed`
    pub(crate) outcome: &'static str,
}

/// Labels of the lag gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct LagLabels {
    pub(crate) topic: String,
    pub(crate) partition: String,
    pub(crate) group: String,
}

/// Labels of replay metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ReplayLabels {
    pub(crate) topic: String,
    /// `replayed | exceeded | malformed | refused`
    pub(crate) outcome: &'static str,
}

/// Label set of unlabelled gauges.
pub(crate) type NoLabels = Vec<(String, String)>;

/// All soma-bus metric families; cheap to clone.
#[derive(Clone)]
pub(crate) struct BusMetrics {
    pub(crate) published: Family<PublishLabels, Counter>,
    pub(crate) publish_seconds: HistogramFamily<PublishLabels>,
    pub(crate) consumed: Family<ConsumeLabels, Counter>,
    pub(crate) handle_seconds: HistogramFamily<ConsumeLabels>,
    pub(crate) lag: Family<LagLabels, Gauge>,
    pub(crate) replayed: Family<ReplayLabels, Counter>,
    pub(crate) breaker_open: Family<NoLabels, Gauge>,
    pub(crate) deferred_keys: Family<NoLabels, Gauge>,
}

const LATENCY: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

impl BusMetrics {
    pub(crate) fn new(m: &MetricsRegistry) -> Self {
        Self {
            published: m.counter_family(
                "soma_bus_published_total",
                "Messages published, by topic and outcome (kafka | deferred | failed)",
            ),
            publish_seconds: m.histogram_family(
                "soma_bus_publish_duration_seconds",
                "Time from publish call to Kafka ack or outbox commit",
                LATENCY,
            ),
            consumed: m.counter_family(
                "soma_bus_consumed_total",
                "Consumer outcomes (handled | retried | dead_lettered | duplicate | malformed)",
            ),
            handle_seconds: m.histogram_family(
                "soma_bus_handle_duration_seconds",
                "Handler run time per attempt",
                LATENCY,
            ),
            lag: m.gauge_family(
                "soma_bus_consumer_lag_messages",
                "Messages between the committed/consumed position and the partition end",
            ),
            replayed: m.counter_family(
                "soma_bus_dlq_replayed_total",
                "DLQ replay outcomes (replayed | exceeded | malformed | refused)",
            ),
            breaker_open: m.gauge_family(
                "soma_bus_breaker_open_state",
                "1 while the publisher's breaker routes publishes to the outbox",
            ),
            deferred_keys: m.gauge_family(
                "soma_bus_deferred_keys_count",
                "Keys with messages waiting in the outbox (tracked by this process)",
            ),
        }
    }

    pub(crate) fn publish(&self, topic: &str, outcome: &'static str, n: u64, seconds: f64) {
        let l = PublishLabels {
            topic: topic.to_owned(),
            outcome,
        };
        self.published.get_or_create(&l).inc_by(n);
        self.publish_seconds.get_or_create(&l).observe(seconds);
    }

    pub(crate) fn consumed(&self, topic: &str, outcome: &'static str) {
        self.consumed
            .get_or_create(&ConsumeLabels {
                topic: topic.to_owned(),
                outcome,
            })
            .inc();
    }
}
