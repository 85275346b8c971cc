//! The `bus` configuration section.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rdkafka::ClientConfig;
use serde::{Deserialize, Serialize};
use soma_config::{DeploymentProfile, Secret, SectionPreset};
use soma_observability::resilience::BreakerConfig;

use crate::error::BusError;

/// Settings for soma-bus (the `bus` section of an application's settings).
///
/// `acks=all` and idempotence are always on; they are not settings. Keys in
/// [`BusConfig::librdkafka`] that would weaken them are rejected by
/// [`BusConfig::validate`].
///
/// **Durability of created topics follows the deployment profile**
/// ([`deployment_profile`](Self::deployment_profile), set by soma-config's
/// loader from the top-level `profile`):
///
/// | profile | replication factor | `min.insync.replicas` | refused |
/// |---|---|---|---|
/// | `local` | 1 | broker default | — |
/// | `prod` | 3 | 2 | replication factor < 2, `min.insync.replicas` < 2 or > replication factor |
///
/// With `acks=all`, `min.insync.replicas = 2` means an acknowledged message
/// is on at least two brokers, so losing one broker loses no acknowledged
/// message; replication factor 3 keeps the topic writable while one broker
/// is down.
///
/// ```
/// use soma_bus::BusConfig;
/// use soma_config::DeploymentProfile;
/// let mut prod = BusConfig::default();
/// prod.deployment_profile = DeploymentProfile::Prod;
/// assert_eq!(prod.replication_factor(), 3);
/// assert_eq!(prod.min_insync_replicas(), Some(2));
/// prod.topics.replication_factor = Some(1);
/// assert!(prod.validate().unwrap_err().is_weak_durability());
/// assert_eq!(BusConfig::default().replication_factor(), 1); // local
/// ```
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, from = "RawBusConfig")]
#[non_exhaustive]
pub struct BusConfig {
    /// Comma-separated `host:port` list.
    pub bootstrap_servers: String,
    /// Kafka client id.
    pub client_id: String,
    /// `security.protocol` (`plaintext`, `ssl`, `sasl_plaintext`, `sasl_ssl`).
    pub security_protocol: String,
    /// SASL mechanism (e.g. `SCRAM-SHA-512`), when SASL is used.
    pub sasl_mechanism: Option<String>,
    /// SASL username.
    pub sasl_username: Option<String>,
    /// SASL password (never logged).
    pub sasl_password: Option<Secret>,
    /// The deployment profile this section runs under. soma-config's
    /// [`Loader`](soma_config::Loader) sets it from the top-level `profile`
    /// key (and refuses a source that gives this section another one); set
    /// it yourself only when you build a `BusConfig` in code. Decides the
    /// durability defaults and floors of created topics (see the type docs).
    pub deployment_profile: DeploymentProfile,
    /// Interval of the broker health check (component `kafka`) once
    /// [`TopicAdmin::health`](crate::TopicAdmin::health) attached a health
    /// registry.
    pub health_interval_ms: u64,
    /// Extra librdkafka properties (e.g. `ssl.ca.location`). Keys controlling
    /// acks, idempotence, auto-commit or the settings above are rejected.
    pub librdkafka: BTreeMap<String, String>,

    /// The Kafka producer (`bus.producer`).
    pub producer: ProducerConfig,
    /// The publisher in front of the producer: its deadline, breaker and
    /// outbox fallback (`bus.publisher`).
    pub publisher: PublisherConfig,
    /// Subscribers, their retries, DLQ and replay (`bus.consumer`).
    pub consumer: ConsumerConfig,
    /// Topics created by [`crate::TopicAdmin::ensure_topics`] and admin
    /// requests (`bus.topics`).
    pub topics: TopicsConfig,

    /// The deprecated flat keys this value was read with (not serialized).
    #[serde(skip)]
    pub(crate) deprecated: DeprecatedKeys,
}

/// Declares a nested section of [`BusConfig`]: the public type (documented,
/// `Default`, `#[serde(default)]`, `#[non_exhaustive]`) and a private twin
/// whose fields are all optional, so that a key set explicitly in the
/// nested section can be told apart from a default and win over its flat
/// alias.
macro_rules! section {
    (
        $(#[$meta:meta])*
        pub struct $name:ident via $raw:ident {
            $( $(#[$fmeta:meta])* $field:ident : $ty:ty = $default:expr, )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Serialize, Deserialize)]
        #[serde(default)]
        #[non_exhaustive]
        pub struct $name {
            $( $(#[$fmeta])* pub $field: $ty, )*
        }

        impl Default for $name {
            fn default() -> Self {
                Self { $( $field: $default, )* }
            }
        }

        #[derive(Default, Deserialize)]
        #[serde(default)]
        struct $raw {
            $( $field: Option<$ty>, )*
        }

        impl $raw {
            fn finish(self) -> $name {
                let defaults = $name::default();
                $name { $( $field: self.$field.unwrap_or(defaults.$field), )* }
            }
        }
    };
}

section! {
    /// The Kafka producer (`bus.producer`). `acks=all` and idempotence are
    /// always on.
    pub struct ProducerConfig via RawProducer {
        /// Producer `linger.ms`.
        linger_ms: u64 = 5,
        /// Producer `batch.size` in bytes.
        batch_size_bytes: u64 = 1_000_000,
        /// Producer `batch.num.messages`.
        batch_num_messages: u64 = 10_000,
        /// Max unacknowledged requests per broker connection (1..=5 with idempotence).
        max_in_flight: u32 = 5,
        /// Max messages buffered in the producer before `send` reports the queue full.
        queue_buffering_max_messages: u64 = 100_000,
        /// Deadline for flushing the producer on shutdown.
        flush_timeout_ms: u64 = 10_000,
    }
}

section! {
    /// The publisher (`bus.publisher`): how long a publish waits for Kafka
    /// and when it falls back to the outbox instead.
    pub struct PublisherConfig via RawPublisher {
        /// How long a publish may wait for the broker's ack before falling back to the outbox.
        timeout_ms: u64 = 5_000,
        /// The publisher's circuit breaker (the shared spelling, component
        /// `bus_publisher`): after `failure_threshold` consecutive failed
        /// publishes, publishes go straight to the outbox for `open_ms`; then
        /// exactly one publish probes Kafka (and alone waits up to
        /// `timeout_ms`) while every other one goes to the outbox at
        /// once. Defaults here: 1 failure, 2 000 ms (keys missing from a given
        /// `breaker` section take the shared defaults, 3 and 30 000).
        breaker: BreakerConfig = BreakerConfig::new(1, 2_000),
        /// How often keys with records waiting in the outbox are re-checked.
        pending_key_poll_interval_ms: u64 = 200,
        /// Ask the outbox (`pending_for_key`) on every publish, not only for keys this process deferred.
        /// Costs one Postgres round trip per publish; needed when several processes publish the same keys
        /// and one may defer while another publishes directly.
        check_outbox_per_message: bool = false,
    }
}

section! {
    /// Subscribers (`bus.consumer`): the group, its lanes, retries, DLQ and
    /// replay.
    pub struct ConsumerConfig via RawConsumer {
        /// Consumer group id.
        group: String = "soma".to_owned(),
        /// Concurrent handler lanes per consumer (messages of one key always use the same lane).
        concurrency: usize = 16,
        /// Messages buffered per lane before fetching pauses.
        lane_capacity: usize = 256,
        /// Where a group with no committed offset starts: `earliest` or `latest`.
        auto_offset_reset: String = "earliest".to_owned(),
        /// Consumer session timeout.
        session_timeout_ms: u64 = 10_000,
        /// Longest a fetch may wait at the broker for data (librdkafka
        /// `fetch.wait.max.ms`); unset: librdkafka's default (500). A Kafka
        /// broker answers a waiting fetch as soon as data arrives, so this only
        /// bounds idle polling there. tansu 0.6 sleeps after *every* fetch
        /// (half the wait, at least 250 ms of a 500 ms wait) before it answers,
        /// so on tansu every consumer hop costs up to this much latency: the
        /// example platform's local settings use 50.
        fetch_wait_ms: Option<u64> = None,
        /// How often completed offsets are committed.
        commit_interval_ms: u64 = 1_000,
        /// Attempts per message (first try included) before a retryable error dead-letters it.
        max_attempts: u32 = 5,
        /// First retry backoff; doubles per attempt.
        retry_backoff_initial_ms: u64 = 100,
        /// Retry backoff ceiling.
        retry_backoff_max_ms: u64 = 5_000,
        /// DLQ topic suffix (`<topic><suffix>`).
        dlq_suffix: String = ".dlq".to_owned(),
        /// Pause between attempts to write a message to the DLQ when that write fails.
        dlq_retry_backoff_ms: u64 = 1_000,
        /// How long graceful shutdown waits for in-flight handlers.
        shutdown_timeout_ms: u64 = 30_000,
        /// Consumer lag statistics interval (0 disables the lag metric).
        lag_interval_ms: u64 = 5_000,
        /// Replays after which a message is no longer republished from the DLQ.
        replay_max: u32 = 3,
    }
}

section! {
    /// Topics created by [`crate::TopicAdmin::ensure_topics`] (`bus.topics`)
    /// and the timeout of admin requests. Durability defaults follow
    /// [`BusConfig::deployment_profile`] (see [`BusConfig`]).
    pub struct TopicsConfig via RawTopics {
        /// Partitions for created topics.
        partitions: i32 = 1,
        /// Replication factor for created topics; unset: 1 under `local`, 3
        /// under `prod`. Under `prod`, less than 2 is refused.
        replication_factor: Option<i32> = None,
        /// `min.insync.replicas` of created topics; unset: the broker's default
        /// under `local`, 2 under `prod`. Under `prod`, less than 2 is refused;
        /// more than the replication factor is always refused (no write could
        /// ever be acknowledged).
        min_insync_replicas: Option<i32> = None,
        /// Timeout for admin and metadata requests (also the health check timeout).
        admin_timeout_ms: u64 = 5_000,
    }
}

impl Default for BusConfig {
    fn default() -> Self {
        Self {
            bootstrap_servers: "127.0.0.1:9092".to_owned(),
            client_id: "soma".to_owned(),
            security_protocol: "plaintext".to_owned(),
            sasl_mechanism: None,
            sasl_username: None,
            sasl_password: None,
            deployment_profile: DeploymentProfile::Local,
            health_interval_ms: 5_000,
            librdkafka: BTreeMap::new(),
            producer: ProducerConfig::default(),
            publisher: PublisherConfig::default(),
            consumer: ConsumerConfig::default(),
            topics: TopicsConfig::default(),
            deprecated: DeprecatedKeys::default(),
        }
    }
}

/// The flat keys a `BusConfig` was read with, and whether they were
/// reported yet (shared by clones, so one config warns once).
#[derive(Debug, Clone, Default)]
pub(crate) struct DeprecatedKeys {
    used: Vec<(&'static str, &'static str)>,
    reported: Arc<AtomicBool>,
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
        struct RawBusConfig {
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

const RESERVED_KEYS: &[&str] = &[
    "acks",
    "request.required.acks",
    "enable.idempotence",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "bootstrap.servers",
    "sasl.password",
    "group.id",
    "transactional.id",
];

impl BusConfig {
    /// This section's sizes under a deployment profile, keys relative to
    /// the section; mount them where your settings mount it
    /// ([`ProfilePreset::section`](soma_config::ProfilePreset::section)).
    /// Durability is not a size: it follows
    /// [`deployment_profile`](Self::deployment_profile) (see the type docs).
    ///
    /// | key | `local` | `prod` |
    /// |---|---|---|
    /// | `topics.partitions` | 1 | 12 |
    /// | `consumer.concurrency` | 4 | 16 |
    ///
    /// ```
    /// use soma_bus::BusConfig;
    /// use soma_config::{DeploymentProfile, ProfilePreset};
    ///
    /// let prod = DeploymentProfile::Prod;
    /// let preset = ProfilePreset::new(prod).section("bus", BusConfig::preset(prod))?;
    /// assert!(preset.entries().any(|entry| entry == ("bus.topics.partitions", 12)));
    /// # Ok::<(), soma_config::ConfigError>(())
    /// ```
    pub fn preset(profile: DeploymentProfile) -> SectionPreset {
        let (topic_partitions, consumer_concurrency) = match profile {
            DeploymentProfile::Local => (1, 4),
            DeploymentProfile::Prod => (12, 16),
        };
        SectionPreset::new(
            profile,
            [
                ("topics.partitions", topic_partitions),
                ("consumer.concurrency", consumer_concurrency),
            ],
        )
    }

    /// Checks the settings; called by every constructor in this crate.
    pub fn validate(&self) -> Result<(), BusError> {
        let bad = |m: String| Err(BusError::Config(m));
        if self.bootstrap_servers.trim().is_empty() {
            return bad("bootstrap_servers is empty".into());
        }
        if !(1..=5).contains(&self.producer.max_in_flight) {
            return bad(
                "producer.max_in_flight must be 1..=5 (idempotence keeps order only up to 5)"
                    .into(),
            );
        }
        if self.publisher.timeout_ms == 0 {
            return bad("publisher.timeout_ms must be > 0".into());
        }
        if self.consumer.fetch_wait_ms.is_some_and(|ms| ms > 300_000) {
            return bad(
                "consumer.fetch_wait_ms must be at most 300000 (librdkafka's limit)".into(),
            );
        }
        if self.consumer.concurrency == 0 || self.consumer.lane_capacity == 0 {
            return bad("consumer.concurrency and consumer.lane_capacity must be > 0".into());
        }
        if self.consumer.max_attempts == 0 {
            return bad("consumer.max_attempts must be >= 1".into());
        }
        if self.consumer.dlq_suffix.is_empty() {
            return bad("consumer.dlq_suffix is empty".into());
        }
        if !matches!(
            self.consumer.auto_offset_reset.as_str(),
            "earliest" | "latest"
        ) {
            return bad("consumer.auto_offset_reset must be `earliest` or `latest`".into());
        }
        if self.topics.partitions < 1 {
            return bad("topics.partitions must be >= 1".into());
        }
        self.validate_durability()?;
        if let Some(k) = self
            .librdkafka
            .keys()
            .find(|k| RESERVED_KEYS.contains(&k.as_str()))
        {
            return bad(format!(
                "librdkafka key `{k}` is managed by soma-bus and may not be overridden"
            ));
        }
        Ok(())
    }

    /// The replication factor created topics get (see the type docs).
    pub fn replication_factor(&self) -> i32 {
        self.topics
            .replication_factor
            .unwrap_or(match self.deployment_profile {
                DeploymentProfile::Local => 1,
                DeploymentProfile::Prod => 3,
            })
    }

    /// The `min.insync.replicas` created topics get; `None` leaves the
    /// broker's default (see the type docs).
    pub fn min_insync_replicas(&self) -> Option<i32> {
        self.topics
            .min_insync_replicas
            .or(match self.deployment_profile {
                DeploymentProfile::Local => None,
                DeploymentProfile::Prod => Some(2),
            })
    }

    fn validate_durability(&self) -> Result<(), BusError> {
        let profile = self.deployment_profile;
        let rf = self.replication_factor();
        let weak = |setting: &'static str, value: i32, minimum: i32| {
            Err(BusError::WeakDurability {
                profile,
                setting,
                value,
                minimum,
            })
        };
        if rf < 1 {
            return weak("topics.replication_factor", rf, 1);
        }
        let min_isr = self.min_insync_replicas();
        if profile == DeploymentProfile::Prod {
            if rf < 2 {
                return weak("topics.replication_factor", rf, 2);
            }
            match min_isr {
                Some(m) if m >= 2 => {}
                m => return weak("topics.min_insync_replicas", m.unwrap_or(1), 2),
            }
        }
        if let Some(m) = min_isr {
            if m < 1 {
                return weak("topics.min_insync_replicas", m, 1);
            }
            if m > rf {
                return Err(BusError::Config(format!(
                    "topics.min_insync_replicas ({m}) exceeds the replication factor ({rf}): no write could be acknowledged"
                )));
            }
        }
        Ok(())
    }

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

    /// DLQ topic for `topic`.
    pub fn dlq_topic(&self, topic: &str) -> String {
        format!("{topic}{}", self.consumer.dlq_suffix)
    }

    pub(crate) fn publish_timeout(&self) -> Duration {
        Duration::from_millis(self.publisher.timeout_ms)
    }

    pub(crate) fn admin_timeout(&self) -> Duration {
        Duration::from_millis(self.topics.admin_timeout_ms)
    }

    /// Connection and security properties shared by producers, consumers and admin clients.
    pub(crate) fn base_client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.bootstrap_servers)
            .set("client.id", &self.client_id)
            .set("security.protocol", &self.security_protocol);
        if let Some(m) = &self.sasl_mechanism {
            c.set("sasl.mechanism", m);
        }
        if let Some(u) = &self.sasl_username {
            c.set("sasl.username", u);
        }
        if let Some(p) = &self.sasl_password {
            c.set("sasl.password", p.expose_secret());
        }
        for (k, v) in &self.librdkafka {
            c.set(k, v);
        }
        c
    }

    /// Properties every soma-bus consumer shares (the subscriber, broadcast
    /// and DLQ replay consumers).
    ///
    /// soma-bus writes no Kafka transactions, so `read_committed` (librdkafka's
    /// default) buys nothing over `read_uncommitted`; reading uncommitted also
    /// keeps consumers that start at the end of a partition (broadcast) or ask
    /// for its watermarks (replay) working on brokers whose read_committed
    /// ListOffsets is broken: tansu 0.6.0 with PostgreSQL 15 storage answers it
    /// with a syntax error (see "Known limits of the local broker" in the
    /// workspace README). An `isolation.level` in
    /// [`librdkafka`](Self::librdkafka) wins.
    pub(crate) fn consumer_client_config(&self) -> ClientConfig {
        let mut c = self.base_client_config();
        if !self.librdkafka.contains_key("isolation.level") {
            c.set("isolation.level", "read_uncommitted");
        }
        if let Some(ms) = self.consumer.fetch_wait_ms {
            if !self.librdkafka.contains_key("fetch.wait.max.ms") {
                c.set("fetch.wait.max.ms", ms.to_string());
            }
        }
        c
    }

    pub(crate) fn producer_client_config(&self) -> ClientConfig {
        let mut c = self.base_client_config();
        // librdkafka's own delivery timeout is a backstop well beyond ours:
        // the publisher purges on its own deadline so failures are ordered.
        let timeout_ms = self.publisher.timeout_ms;
        let backstop = timeout_ms.saturating_mul(3).max(timeout_ms + 5_000);
        let producer = &self.producer;
        c.set("acks", "all")
            .set("enable.idempotence", "true")
            .set(
                "max.in.flight.requests.per.connection",
                producer.max_in_flight.to_string(),
            )
            .set("linger.ms", producer.linger_ms.to_string())
            .set("batch.size", producer.batch_size_bytes.to_string())
            .set(
                "batch.num.messages",
                producer.batch_num_messages.to_string(),
            )
            .set(
                "queue.buffering.max.messages",
                producer.queue_buffering_max_messages.to_string(),
            )
            .set("message.timeout.ms", backstop.to_string())
            .set("reconnect.backoff.ms", "50")
            .set("reconnect.backoff.max.ms", "1000");
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_overrides_are_guarded() {
        BusConfig::default().validate().unwrap();
        let mut c = BusConfig::default();
        c.librdkafka
            .insert("enable.idempotence".into(), "false".into());
        let err = c.validate().unwrap_err();
        assert!(err.is_config());
        let c: BusConfig =
            serde_json::from_str(r#"{"producer": {"linger_ms": 20}, "sasl_password": "hunter2"}"#)
                .unwrap();
        assert_eq!(c.producer.linger_ms, 20);
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    /// The preset's keys live here, so the proof that each one is a numeric
    /// setting of this section does too.
    #[test]
    fn every_preset_key_is_a_numeric_setting_of_the_section() {
        for profile in DeploymentProfile::ALL {
            BusConfig::preset(profile)
                .check(&BusConfig::default())
                .unwrap();
        }
    }

    #[test]
    fn durability_follows_the_deployment_profile() {
        let local = BusConfig::default();
        local.validate().unwrap();
        assert_eq!(
            (local.replication_factor(), local.min_insync_replicas()),
            (1, None)
        );

        let prod = BusConfig {
            deployment_profile: DeploymentProfile::Prod,
            ..BusConfig::default()
        };
        prod.validate().unwrap();
        assert_eq!(
            (prod.replication_factor(), prod.min_insync_replicas()),
            (3, Some(2))
        );
        for (rf, isr) in [(Some(1), None), (Some(1), Some(1)), (None, Some(1))] {
            let mut c = prod.clone();
            c.topics.replication_factor = rf;
            c.topics.min_insync_replicas = isr;
            let e = c.validate().unwrap_err();
            assert!(
                e.is_weak_durability() && e.is_config(),
                "{rf:?}/{isr:?}: {e}"
            );
        }
        let mut c = prod.clone();
        c.topics.replication_factor = Some(2);
        c.validate().expect("rf 2 with min.insync 2 is allowed");
        c.topics.min_insync_replicas = Some(3);
        assert!(c.validate().unwrap_err().is_config(), "min.insync > rf");

        // An explicit local setting is the operator's call.
        let mut c = BusConfig::default();
        c.topics.replication_factor = Some(3);
        c.topics.min_insync_replicas = Some(2);
        c.validate().unwrap();
        c.topics.replication_factor = Some(0);
        assert!(c.validate().unwrap_err().is_config());
        // The key reads from a config file, nested or by its old flat name.
        let c: BusConfig =
            serde_json::from_str(r#"{"topics": {"replication_factor": 3}}"#).unwrap();
        assert_eq!(c.replication_factor(), 3);
        let c: BusConfig = serde_json::from_str(r#"{"topic_replication_factor": 3}"#).unwrap();
        assert_eq!(c.replication_factor(), 3);
    }

    #[test]
    fn consumers_read_uncommitted_unless_overridden() {
        let c = BusConfig::default();
        assert_eq!(
            c.consumer_client_config().get("isolation.level"),
            Some("read_uncommitted")
        );
        let mut c = BusConfig::default();
        c.librdkafka
            .insert("isolation.level".into(), "read_committed".into());
        c.validate().unwrap();
        assert_eq!(
            c.consumer_client_config().get("isolation.level"),
            Some("read_committed")
        );
    }

    #[test]
    fn consumer_fetch_wait_reaches_consumers_only_and_is_bounded() {
        let c = BusConfig::default();
        assert_eq!(c.consumer_client_config().get("fetch.wait.max.ms"), None);
        let mut c = BusConfig::default();
        c.consumer.fetch_wait_ms = Some(50);
        c.validate().unwrap();
        assert_eq!(
            c.consumer_client_config().get("fetch.wait.max.ms"),
            Some("50")
        );
        assert_eq!(c.producer_client_config().get("fetch.wait.max.ms"), None);
        c.librdkafka.insert("fetch.wait.max.ms".into(), "20".into());
        assert_eq!(
            c.consumer_client_config().get("fetch.wait.max.ms"),
            Some("20"),
            "an explicit librdkafka property wins"
        );
        let mut c = BusConfig::default();
        c.consumer.fetch_wait_ms = Some(300_001);
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("consumer.fetch_wait_ms"), "{err}");
    }

    /// Every flat key of before the nesting, with a value unlike its default.
    const FLAT: &str = r#"
        linger_ms = 11
        batch_size_bytes = 12
        batch_num_messages = 13
        max_in_flight = 4
        queue_buffering_max_messages = 15
        flush_timeout_ms = 16
        publish_timeout_ms = 17
        pending_key_poll_interval_ms = 18
        check_outbox_per_message = true
        consumer_group = "flat"
        consumer_concurrency = 3
        consumer_lane_capacity = 19
        auto_offset_reset = "latest"
        session_timeout_ms = 20
        consumer_fetch_wait_ms = 21
        commit_interval_ms = 22
        max_attempts = 23
        retry_backoff_initial_ms = 24
        retry_backoff_max_ms = 25
        dlq_suffix = ".dead"
        dlq_retry_backoff_ms = 26
        shutdown_timeout_ms = 27
        lag_interval_ms = 28
        replay_max = 29
        topic_partitions = 30
        topic_replication_factor = 2
        topic_min_insync_replicas = 2
        admin_timeout_ms = 31

        [breaker]
        failure_threshold = 7
        open_ms = 32
    "#;

    /// The same values under the nested keys.
    const NESTED: &str = r#"
        [producer]
        linger_ms = 11
        batch_size_bytes = 12
        batch_num_messages = 13
        max_in_flight = 4
        queue_buffering_max_messages = 15
        flush_timeout_ms = 16

        [publisher]
        timeout_ms = 17
        pending_key_poll_interval_ms = 18
        check_outbox_per_message = true
        breaker = { failure_threshold = 7, open_ms = 32 }

        [consumer]
        group = "flat"
        concurrency = 3
        lane_capacity = 19
        auto_offset_reset = "latest"
        session_timeout_ms = 20
        fetch_wait_ms = 21
        commit_interval_ms = 22
        max_attempts = 23
        retry_backoff_initial_ms = 24
        retry_backoff_max_ms = 25
        dlq_suffix = ".dead"
        dlq_retry_backoff_ms = 26
        shutdown_timeout_ms = 27
        lag_interval_ms = 28
        replay_max = 29

        [topics]
        partitions = 30
        replication_factor = 2
        min_insync_replicas = 2
        admin_timeout_ms = 31
    "#;

    fn shape(c: &BusConfig) -> serde_json::Value {
        serde_json::to_value(c).unwrap()
    }

    #[test]
    fn flat_keys_load_to_the_same_values_as_nested_ones() {
        let flat: BusConfig = toml::from_str(FLAT).unwrap();
        let nested: BusConfig = toml::from_str(NESTED).unwrap();
        assert_eq!(shape(&flat), shape(&nested));
        assert_ne!(shape(&nested), shape(&BusConfig::default()));
        flat.validate().unwrap();
        assert_eq!(flat.publisher.breaker, BreakerConfig::new(7, 32));
        assert_eq!(flat.consumer.fetch_wait_ms, Some(21));

        // Every old key is listed, once, in the table's order.
        assert_eq!(flat.deprecated_keys_used(), BusConfig::RENAMED);
        assert!(nested.deprecated_keys_used().is_empty());
        assert!(BusConfig::default().deprecated_keys_used().is_empty());
        // The table names each nested key of the serialized shape.
        let nested_shape = shape(&nested);
        for (old, new) in BusConfig::RENAMED {
            assert!(nested_shape.get(old).is_none(), "{old} is not serialized");
            let value = new
                .split('.')
                .try_fold(&nested_shape, |node, seg| node.get(seg));
            assert!(value.is_some(), "{new} is not a key of the section");
        }
    }

    #[test]
    fn a_nested_key_wins_over_its_flat_alias() {
        let c: BusConfig = toml::from_str(
            r#"
            linger_ms = 1
            consumer_group = "old"
            topic_partitions = 2
            [producer]
            linger_ms = 9
            [consumer]
            group = "new"
            "#,
        )
        .unwrap();
        assert_eq!(c.producer.linger_ms, 9);
        assert_eq!(c.consumer.group, "new");
        assert_eq!(c.topics.partitions, 2, "a flat key alone still applies");
        assert_eq!(
            c.deprecated_keys_used(),
            [
                ("linger_ms", "producer.linger_ms"),
                ("consumer_group", "consumer.group"),
                ("topic_partitions", "topics.partitions"),
            ]
        );
    }

    #[test]
    fn serialization_is_nested_and_round_trips() {
        let flat: BusConfig = toml::from_str(FLAT).unwrap();
        let text = toml::to_string(&flat).unwrap();
        assert!(
            text.contains("[producer]") && !text.contains("consumer_group"),
            "{text}"
        );
        let back: BusConfig = toml::from_str(&text).unwrap();
        assert_eq!(shape(&back), shape(&flat));
        assert!(back.deprecated_keys_used().is_empty());
        let json: BusConfig = serde_json::from_value(shape(&flat)).unwrap();
        assert_eq!(shape(&json), shape(&flat));
    }

    #[test]
    fn validation_rejects_bad_values_under_either_spelling() {
        for bad in [
            "max_in_flight = 6",
            "[producer]\nmax_in_flight = 0",
            "publish_timeout_ms = 0",
            "[publisher]\ntimeout_ms = 0",
            "consumer_concurrency = 0",
            "[consumer]\nlane_capacity = 0",
            "max_attempts = 0",
            "[consumer]\ndlq_suffix = \"\"",
            "auto_offset_reset = \"newest\"",
            "[consumer]\nfetch_wait_ms = 300001",
            "topic_partitions = 0",
            "[topics]\nreplication_factor = 1\nmin_insync_replicas = 2",
        ] {
            let c: BusConfig = toml::from_str(bad).unwrap();
            assert!(c.validate().unwrap_err().is_config(), "{bad}");
        }
    }

    #[test]
    fn deprecated_keys_are_reported_once_per_config_and_its_clones() {
        let c: BusConfig = toml::from_str("linger_ms = 1").unwrap();
        let clone = c.clone();
        assert!(!clone.deprecated.reported.load(Ordering::Relaxed));
        c.warn_deprecated_keys();
        assert!(clone.deprecated.reported.load(Ordering::Relaxed));
        let nested = BusConfig::default();
        nested.warn_deprecated_keys();
        assert!(!nested.deprecated.reported.load(Ordering::Relaxed));
    }
}
