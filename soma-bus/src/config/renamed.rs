//! The flat keys of the `bus` section of before its nesting: read for a
//! deprecation period, remembered, and reported once.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::Deserialize;
use soma_config::{DeploymentProfile, Secret};
use soma_observability::resilience::BreakerConfig;

use super::BusConfig;
use super::sections::{RawConsumer, RawProducer, RawPublisher, RawTopics};

/// The flat keys a `BusConfig` was read with, and whether they were
/// reported yet (shared by clones, so one config warns once).
#[derive(Debug, Clone, Default)]
pub(crate) struct DeprecatedKeys {
    used: Vec<(&'static str, &'static str)>,
    pub(super) reported: Arc<AtomicBool>,
}

/// Declares the private representation `BusConfig` deserializes through:
/// the top-level keys, the four nested sections, and every flat key of
/// before the nesting, with the table of renames.
macro_rules! flat_keys {
    ( $( $old:ident => $section:ident . $new:ident : $ty:ty, )* ) => {
        impl BusConfig {
            /// Every flat key of the `bus` section that moved into a nested
            /// section, as `(old, new)` relative to the section: read
            /// for a deprecation period (a nested key set as well wins) and
            /// listed by [`deprecated_keys_used`](Self::deprecated_keys_used).
            /// An application can hand them, prefixed with where it mounts
            /// the section, to soma-config's
            /// [`Loader::deprecated_key`](soma_config::Loader::deprecated_key).
            pub const RENAMED: &'static [(&'static str, &'static str)] = &[
                $( (stringify!($old), concat!(stringify!($section), ".", stringify!($new))), )*
            ];
        }

        #[derive(Default, Deserialize)]
        #[serde(default)]
        pub(super) struct RawBusConfig {
            bootstrap_servers: Option<String>,
            client_id: Option<String>,
            security_protocol: Option<String>,
            sasl_mechanism: Option<String>,
            sasl_username: Option<String>,
            sasl_password: Option<Secret>,
            deployment_profile: Option<DeploymentProfile>,
            health_interval_ms: Option<u64>,
            librdkafka: Option<BTreeMap<String, String>>,
            producer: RawProducer,
            publisher: RawPublisher,
            consumer: RawConsumer,
            topics: RawTopics,
            $( $old: Option<$ty>, )*
        }

        impl From<RawBusConfig> for BusConfig {
            fn from(mut raw: RawBusConfig) -> Self {
                let mut used = Vec::new();
                $(
                    if let Some(value) = raw.$old.take() {
                        used.push((
                            stringify!($old),
                            concat!(stringify!($section), ".", stringify!($new)),
                        ));
                        raw.$section.$new.get_or_insert(value);
                    }
                )*
                let defaults = BusConfig::default();
                BusConfig {
                    bootstrap_servers: raw.bootstrap_servers.unwrap_or(defaults.bootstrap_servers),
                    client_id: raw.client_id.unwrap_or(defaults.client_id),
                    security_protocol: raw.security_protocol.unwrap_or(defaults.security_protocol),
                    sasl_mechanism: raw.sasl_mechanism,
                    sasl_username: raw.sasl_username,
                    sasl_password: raw.sasl_password,
                    deployment_profile: raw.deployment_profile.unwrap_or(defaults.deployment_profile),
                    health_interval_ms: raw.health_interval_ms.unwrap_or(defaults.health_interval_ms),
                    librdkafka: raw.librdkafka.unwrap_or(defaults.librdkafka),
                    producer: raw.producer.finish(),
                    publisher: raw.publisher.finish(),
                    consumer: raw.consumer.finish(),
                    topics: raw.topics.finish(),
                    deprecated: DeprecatedKeys {
                        used,
                        reported: Arc::default(),
                    },
                }
            }
        }
    };
}

flat_keys! {
    linger_ms => producer.linger_ms: u64,
    batch_size_bytes => producer.batch_size_bytes: u64,
    batch_num_messages => producer.batch_num_messages: u64,
    max_in_flight => producer.max_in_flight: u32,
    queue_buffering_max_messages => producer.queue_buffering_max_messages: u64,
    flush_timeout_ms => producer.flush_timeout_ms: u64,
    publish_timeout_ms => publisher.timeout_ms: u64,
    breaker => publisher.breaker: BreakerConfig,
    pending_key_poll_interval_ms => publisher.pending_key_poll_interval_ms: u64,
    check_outbox_per_message => publisher.check_outbox_per_message: bool,
    consumer_group => consumer.group: String,
    consumer_concurrency => consumer.concurrency: usize,
    consumer_lane_capacity => consumer.lane_capacity: usize,
    auto_offset_reset => consumer.auto_offset_reset: String,
    session_timeout_ms => consumer.session_timeout_ms: u64,
    consumer_fetch_wait_ms => consumer.fetch_wait_ms: Option<u64>,
    commit_interval_ms => consumer.commit_interval_ms: u64,
    max_attempts => consumer.max_attempts: u32,
    retry_backoff_initial_ms => consumer.retry_backoff_initial_ms: u64,
    retry_backoff_max_ms => consumer.retry_backoff_max_ms: u64,
    dlq_suffix => consumer.dlq_suffix: String,
    dlq_retry_backoff_ms => consumer.dlq_retry_backoff_ms: u64,
    shutdown_timeout_ms => consumer.shutdown_timeout_ms: u64,
    lag_interval_ms => consumer.lag_interval_ms: u64,
    replay_max => consumer.replay_max: u32,
    topic_partitions => topics.partitions: i32,
    topic_replication_factor => topics.replication_factor: Option<i32>,
    topic_min_insync_replicas => topics.min_insync_replicas: Option<i32>,
    admin_timeout_ms => topics.admin_timeout_ms: u64,
}

impl BusConfig {
    /// The deprecated flat keys this config was read with, as `(old, new)`
    /// relative to the section (see [`RENAMED`](Self::RENAMED)); empty for a
    /// config built in code or read with nested keys only.
    ///
    /// ```
    /// # #[derive(serde::Deserialize)] struct S { bus: soma_bus::BusConfig }
    /// let s: S = serde_json::from_str(r#"{"bus": {"linger_ms": 20}}"#)?;
    /// assert_eq!(s.bus.producer.linger_ms, 20);
    /// assert_eq!(s.bus.deprecated_keys_used(), [("linger_ms", "producer.linger_ms")]);
    /// # Ok::<(), serde_json::Error>(())
    /// ```
    pub fn deprecated_keys_used(&self) -> &[(&'static str, &'static str)] {
        &self.deprecated.used
    }

    /// Logs each deprecated flat key this config was read with, once per
    /// config (and its clones): called when a producer, publisher, consumer
    /// or admin client is built from it.
    pub(crate) fn warn_deprecated_keys(&self) {
        if self.deprecated.used.is_empty() || self.deprecated.reported.swap(true, Ordering::Relaxed)
        {
            return;
        }
        for (old, new) in &self.deprecated.used {
            tracing::warn!(
                event = "deprecated_config_key",
                key = %format_args!("bus.{old}"),
                replacement = %format_args!("bus.{new}"),
            );
        }
    }
}
