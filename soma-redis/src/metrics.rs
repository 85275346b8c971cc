//! Metric families of this crate, registered in a shared [`MetricsRegistry`].
//!
//! | name | type | labels |
//! |---|---|---|
//! | `soma_redis_commands_total` | counter | `command`, `outcome` (`ok`, `connection`, `timeout`, `server`, ...) |
//! | `soma_redis_command_duration_seconds` | histogram | `command` |
//! | (bulk path) `soma_redis_commands_total` | counter | `command` = `bulk_get`, `bulk_set`, `bulk_del`, `bulk_expire`; one count per command |
//! | (bulk path) `soma_redis_command_duration_seconds` | histogram | `command="bulk"`; one observation per batch |
//! | `soma_redis_retries_total` | counter | `command` |
//! | `soma_redis_reconnects_total` | counter | — |
//! | `soma_redis_pool_connections` | gauge | `state` (`connected`, `disconnected`) |
//! | `soma_redis_cache_requests_total` | counter | `cache`, `result` (`hit`, `miss`, `negative_hit`, `error`) |
//! | `soma_redis_cache_loads_total` | counter | `cache`, `outcome` (`ok`, `error`) |
//! | `soma_redis_rate_limit_decisions_total` | counter | `decision` (`allowed`, `limited`, `error`) |
//!
//! `command` values are fixed strings chosen in this crate (`get`, `set`,
//! `evalsha:rate_limit`, ...), never keys, so cardinality stays bounded.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use soma_observability::metrics::{HistogramFamily, MetricsRegistry};

use crate::RedisError;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct CommandLabels {
    pub(crate) command: &'static str,
    pub(crate) outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct CommandOnly {
    pub(crate) command: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct StateLabels {
    pub(crate) state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct CacheLabels {
    pub(crate) cache: String,
    pub(crate) result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct CacheLoadLabels {
    pub(crate) cache: String,
    pub(crate) outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct DecisionLabels {
    pub(crate) decision: &'static str,
}

/// Latency buckets for Redis commands: 50 µs .. 2.5 s.
const COMMAND_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 2.5,
];

#[derive(Clone)]
pub(crate) struct RedisMetrics {
    pub(crate) registry: MetricsRegistry,
    pub(crate) commands: Family<CommandLabels, Counter>,
    pub(crate) duration: HistogramFamily<CommandOnly>,
    retries: Family<CommandOnly, Counter>,
    pub(crate) reconnects: Counter,
    pub(crate) pool: Family<StateLabels, Gauge>,
    pub(crate) cache_requests: Family<CacheLabels, Counter>,
    pub(crate) cache_loads: Family<CacheLoadLabels, Counter>,
    pub(crate) rate_limit: Family<DecisionLabels, Counter>,
    /// Handles for the hottest commands' success path, resolved once, so a
    /// cache hit does not pay two label-map lookups.
    hot: Vec<(&'static str, Counter, Histogram)>,
}

const HOT_COMMANDS: [&str; 4] = ["get", "set", "rate_limit", "pipeline"];

impl RedisMetrics {
    pub(crate) fn new(registry: &MetricsRegistry) -> Self {
        let reconnects = registry
            .counter_family::<Vec<(String, String)>>(
                "soma_redis_reconnects_total",
                "Connections re-established after a failure",
            )
            .get_or_create(&Vec::new())
            .clone();
        let commands: Family<CommandLabels, Counter> = registry.counter_family(
            "soma_redis_commands_total",
            "Redis commands by command and outcome",
        );
        let duration: HistogramFamily<CommandOnly> = registry.histogram_family(
            "soma_redis_command_duration_seconds",
            "Redis command latency, including retries",
            COMMAND_BUCKETS,
        );
        let hot = HOT_COMMANDS
            .iter()
            .map(|&command| {
                (
                    command,
                    commands
                        .get_or_create(&CommandLabels {
                            command,
                            outcome: "ok",
                        })
                        .clone(),
                    duration.get_or_create(&CommandOnly { command }).clone(),
                )
            })
            .collect();
        Self {
            hot,
            commands,
            duration,
            retries: registry.counter_family(
                "soma_redis_retries_total",
                "Retries of idempotent Redis commands",
            ),
            reconnects,
            pool: registry.gauge_family(
                "soma_redis_pool_connections",
                "Pooled Redis connections by state",
            ),
            cache_requests: registry.counter_family(
                "soma_redis_cache_requests_total",
                "Cache lookups by cache and result",
            ),
            cache_loads: registry.counter_family(
                "soma_redis_cache_loads_total",
                "Cache loader runs (after single-flight) by cache and outcome",
            ),
            rate_limit: registry.counter_family(
                "soma_redis_rate_limit_decisions_total",
                "Rate-limit checks by decision",
            ),
            registry: registry.clone(),
        }
    }

    pub(crate) fn observe<T>(
        &self,
        command: &'static str,
        result: &Result<T, RedisError>,
        elapsed: Duration,
    ) {
        let outcome = match result {
            Ok(_) => {
                if let Some((_, ok, hist)) = self.hot.iter().find(|(c, _, _)| *c == command) {
                    ok.inc();
                    hist.observe(elapsed.as_secs_f64());
                    return;
                }
                "ok"
            }
            Err(e) => e.kind_label(),
        };
        self.commands
            .get_or_create(&CommandLabels { command, outcome })
            .inc();
        self.duration
            .get_or_create(&CommandOnly { command })
            .observe(elapsed.as_secs_f64());
    }

    pub(crate) fn retry(&self, command: &'static str) {
        self.retries.get_or_create(&CommandOnly { command }).inc();
    }
}
