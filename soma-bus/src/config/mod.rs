//! The `bus` configuration section.

mod renamed;
mod sections;

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::ClientConfig;
use serde::{Deserialize, Serialize};
use soma_config::{DeploymentProfile, Secret, SectionPreset};

use crate::error::BusError;
use renamed::{DeprecatedKeys, RawBusConfig};
pub use sections::{ConsumerConfig, ProducerConfig, PublisherConfig, TopicsConfig};

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
        // Heartbeats at most a third of the session, as Kafka advises: a
        // member then outlives two late heartbeats (a loaded machine, a slow
        // coordinator) before it is evicted and its group rebalances.
        // librdkafka's fixed 3 s would leave a 6 s session only one.
        if !self.librdkafka.contains_key("heartbeat.interval.ms") {
            let every = (self.consumer.session_timeout_ms / 3).clamp(1, 3_000);
            c.set("heartbeat.interval.ms", every.to_string());
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
mod tests;
