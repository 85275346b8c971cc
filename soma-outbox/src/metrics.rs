//! Metrics and the health component.

use std::time::Duration;

use soma_observability::health::{
    CheckOptions, CheckOutcome, Criticality, HealthCheck, HealthRegistry,
};
use soma_observability::metrics::{FloatGauge, HistogramFamily, MetricsRegistry};
use soma_observability::prometheus_client::encoding::EncodeLabelSet;
use soma_observability::prometheus_client::metrics::counter::Counter;
use soma_observability::prometheus_client::metrics::family::Family;
use soma_observability::prometheus_client::metrics::gauge::Gauge;

use crate::{Outbox, OutboxStats};

/// Label set of every soma-outbox series: the outbox schema (bounded: one
/// value per configured outbox).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SchemaLabel {
    schema: String,
}

/// The outbox's metrics, registered in a soma-observability
/// [`MetricsRegistry`]:
///
/// | name | type | meaning |
/// |---|---|---|
/// | `soma_outbox_pending` | gauge | messages neither delivered nor dead-lettered |
/// | `soma_outbox_oldest_pending_age_seconds` | gauge | age of the oldest pending message |
/// | `soma_outbox_dead_letters` | gauge | messages in the dead-letter table |
/// | `soma_outbox_published_total` | counter | messages delivered by the sink and committed |
/// | `soma_outbox_failed_total` | counter | failed delivery attempts (sink `Retry`, timeout, panic) |
/// | `soma_outbox_dead_lettered_total` | counter | messages moved to the dead-letter table |
/// | `soma_outbox_relay_batch_duration_seconds` | histogram | claim → publish → commit of one batch |
/// | `soma_outbox_relay_shards_owned` | gauge | shards this process's relays own |
/// | `soma_outbox_relay_errors_total` | counter | relay database failures (reconnects) |
/// | `soma_outbox_relay_sink_unavailable` | gauge | relays in this process backing off because the sink is unavailable |
/// | `soma_outbox_relay_sink_wait_milliseconds_total` | counter | time relays spent waiting for an unavailable sink |
/// | `soma_outbox_relay_order_violations_total` | counter | records a sink delivered after an undelivered earlier record of their key (a [`Sink`](crate::Sink) contract violation; should stay 0) |
/// | `soma_outbox_relay_shard_moves_total` | counter | shards relays gave up or took over (flat while the set of relays is stable; a steady rise means shards flap) |
///
/// Every series has the label `schema`. The gauges are refreshed by each
/// running relay every [`RelayConfig::stats_interval_ms`](crate::RelayConfig::stats_interval_ms).
#[derive(Clone, Debug)]
pub struct OutboxMetrics {
    label: SchemaLabel,
    pending: Family<SchemaLabel, Gauge>,
    oldest_age: Family<SchemaLabel, FloatGauge>,
    dead_letters: Family<SchemaLabel, Gauge>,
    published: Family<SchemaLabel, Counter>,
    failed: Family<SchemaLabel, Counter>,
    dead_lettered: Family<SchemaLabel, Counter>,
    batch_duration: HistogramFamily<SchemaLabel>,
    shards_owned: Family<SchemaLabel, Gauge>,
    errors: Family<SchemaLabel, Counter>,
    sink_unavailable: Family<SchemaLabel, Gauge>,
    sink_wait: Family<SchemaLabel, Counter>,
    order_violations: Family<SchemaLabel, Counter>,
    shard_moves: Family<SchemaLabel, Counter>,
}

const BATCH_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

impl OutboxMetrics {
    /// Registers (or gets) the outbox families in `registry` for `outbox`.
    pub fn new(registry: &MetricsRegistry, outbox: &Outbox) -> Self {
        Self::build(registry, outbox.schema())
    }

    /// Metrics that are counted but not exported anywhere.
    pub(crate) fn detached() -> Self {
        Self::build(&MetricsRegistry::default(), "detached")
    }

    fn build(r: &MetricsRegistry, schema: &str) -> Self {
        Self {
            label: SchemaLabel {
                schema: schema.to_owned(),
            },
            pending: r.gauge_family(
                "soma_outbox_pending",
                "Outbox messages neither delivered nor dead-lettered",
            ),
            oldest_age: r.float_gauge_family(
                "soma_outbox_oldest_pending_age_seconds",
                "Age of the oldest pending outbox message",
            ),
            dead_letters: r.gauge_family(
                "soma_outbox_dead_letters",
                "Messages in the outbox dead-letter table",
            ),
            published: r.counter_family(
                "soma_outbox_published_total",
                "Outbox messages delivered by the sink and committed",
            ),
            failed: r.counter_family(
                "soma_outbox_failed_total",
                "Failed outbox delivery attempts",
            ),
            dead_lettered: r.counter_family(
                "soma_outbox_dead_lettered_total",
                "Outbox messages moved to the dead-letter table",
            ),
            batch_duration: r.histogram_family(
                "soma_outbox_relay_batch_duration_seconds",
                "Duration of one relay batch: claim, publish, commit",
                BATCH_BUCKETS,
            ),
            shards_owned: r.gauge_family(
                "soma_outbox_relay_shards_owned",
                "Outbox shards owned by relays in this process",
            ),
            errors: r.counter_family(
                "soma_outbox_relay_errors_total",
                "Outbox relay database failures",
            ),
            sink_unavailable: r.gauge_family(
                "soma_outbox_relay_sink_unavailable",
                "Outbox relays backing off because their sink is unavailable",
            ),
            sink_wait: r.counter_family(
                "soma_outbox_relay_sink_wait_milliseconds_total",
                "Time outbox relays spent waiting for an unavailable sink",
            ),
            order_violations: r.counter_family(
                "soma_outbox_relay_order_violations_total",
                "Records a sink delivered after an undelivered earlier record of their key",
            ),
            shard_moves: r.counter_family(
                "soma_outbox_relay_shard_moves_total",
                "Shards relays gave up or took over",
            ),
        }
    }

    pub(crate) fn observe_stats(&self, s: &OutboxStats) {
        self.pending
            .get_or_create(&self.label)
            .set(s.pending as i64);
        self.dead_letters
            .get_or_create(&self.label)
            .set(s.dead_letters as i64);
        self.oldest_age
            .get_or_create(&self.label)
            .set(s.oldest_pending_age.map_or(0.0, |d| d.as_secs_f64()));
    }

    pub(crate) fn observe_batch(&self, published: u64, failed: u64, dead: u64, took: Duration) {
        self.published.get_or_create(&self.label).inc_by(published);
        self.failed.get_or_create(&self.label).inc_by(failed);
        self.dead_lettered.get_or_create(&self.label).inc_by(dead);
        self.batch_duration
            .get_or_create(&self.label)
            .observe(took.as_secs_f64());
    }

    /// Relays in one process add up: each reports its own change.
    pub(crate) fn shards_delta(&self, delta: i64) {
        self.shards_owned.get_or_create(&self.label).inc_by(delta);
    }

    /// A relay entered (`true`) or left (`false`) its unavailable backoff.
    pub(crate) fn sink_unavailable(&self, unavailable: bool) {
        self.sink_unavailable
            .get_or_create(&self.label)
            .inc_by(if unavailable { 1 } else { -1 });
    }

    pub(crate) fn sink_wait(&self, waited: Duration) {
        self.sink_wait
            .get_or_create(&self.label)
            .inc_by(waited.as_millis() as u64);
    }

    pub(crate) fn order_violations(&self, n: u64) {
        if n > 0 {
            self.order_violations.get_or_create(&self.label).inc_by(n);
        }
    }

    pub(crate) fn shard_moves(&self, n: u64) {
        self.shard_moves.get_or_create(&self.label).inc_by(n);
    }

    pub(crate) fn relay_error(&self) {
        self.errors.get_or_create(&self.label).inc();
    }
}

/// Health check of an outbox: `up` while the oldest pending message is
/// younger than [`OutboxConfig::health_max_pending_age_secs`](crate::OutboxConfig::health_max_pending_age_secs),
/// `degraded` when it is older (the relay is down, slow, or stuck behind a
/// long transaction), `down` when the database cannot be queried. Publishes
/// the gauges `pending`, `oldest_pending_age_seconds` and `dead_letters`.
#[derive(Debug, Clone)]
pub struct OutboxHealthCheck {
    outbox: Outbox,
    threshold: Duration,
}

impl OutboxHealthCheck {
    /// A check for `outbox` with the threshold from its configuration.
    pub fn new(outbox: Outbox) -> Self {
        let threshold = Duration::from_secs(outbox.config().health_max_pending_age_secs);
        Self { outbox, threshold }
    }

    /// Overrides the age threshold.
    pub fn with_threshold(mut self, threshold: Duration) -> Self {
        self.threshold = threshold;
        self
    }

    /// Registers this check as component `outbox` (optional: the service
    /// still accepts messages while the relay lags) in `health`.
    pub fn register(self, health: &HealthRegistry, options: CheckOptions) {
        health.register_check("outbox", Criticality::Optional, self, options);
    }
}

#[async_trait::async_trait]
impl HealthCheck for OutboxHealthCheck {
    async fn check(&self) -> CheckOutcome {
        match self.outbox.stats().await {
            Err(e) => CheckOutcome::down(format!("outbox stats query failed: {e}")),
            Ok(s) => {
                let age = s.oldest_pending_age.unwrap_or_default();
                let outcome = if age > self.threshold {
                    CheckOutcome::degraded(format!(
                        "oldest pending message is {:.1}s old (threshold {:.1}s)",
                        age.as_secs_f64(),
                        self.threshold.as_secs_f64()
                    ))
                } else {
                    CheckOutcome::up()
                };
                outcome
                    .with_gauge("pending", s.pending as f64)
                    .with_gauge("oldest_pending_age_seconds", age.as_secs_f64())
                    .with_gauge("dead_letters", s.dead_letters as f64)
            }
        }
    }
}
