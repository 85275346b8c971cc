//! The `bus` configuration section.

use std::collections::BTreeMap;
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
/// prod.topic_replication_factor = Some(1);
/// assert!(prod.validate().unwrap_err().is_weak_durability());
/// assert_eq!(BusConfig::default().replication_factor(), 1); // local
/// ```
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
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

    /// Producer `linger.ms`.
    pub linger_ms: u64,
    /// Producer `batch.size` in bytes.
    pub batch_size_bytes: u64,
    /// Producer `batch.num.messages`.
    pub batch_num_messages: u64,
    /// Max unacknowledged requests per broker connection (1..=5 with idempotence).
    pub max_in_flight: u32,
    /// Max messages buffered in the producer before `send` reports the queue full.
    pub queue_buffering_max_messages: u64,
    /// How long a publish may wait for the broker's ack before falling back to the outbox.
    pub publish_timeout_ms: u64,
    /// Deadline for flushing the producer on shutdown.
    pub flush_timeout_ms: u64,

    /// The publisher's circuit breaker (the shared spelling, component
    /// `bus_publisher`): after `failure_threshold` consecutive failed
    /// publishes, publishes go straight to the outbox for `open_ms`; then
    /// exactly one publish probes Kafka (and alone waits up to
    /// `publish_timeout_ms`) while every other one goes to the outbox at
    /// once. Defaults here: 1 failure, 2 000 ms (keys missing from a given
    /// `breaker` section take the shared defaults, 3 and 30 000).
    pub breaker: BreakerConfig,
    /// How often keys with records waiting in the outbox are re-checked.
    pub pending_key_poll_interval_ms: u64,
    /// Ask the outbox (`pending_for_key`) on every publish, not only for keys this process deferred.
    /// Costs one Postgres round trip per publish; needed when several processes publish the same keys
    /// and one may defer while another publishes directly.
    pub check_outbox_per_message: bool,

    /// Consumer group id.
    pub consumer_group: String,
    /// Concurrent handler lanes per consumer (messages of one key always use the same lane).
    pub consumer_concurrency: usize,
    /// Messages buffered per lane before fetching pauses.
    pub consumer_lane_capacity: usize,
    /// Where a group with no committed offset starts: `earliest` or `latest`.
    pub auto_offset_reset: String,
    /// Consumer session timeout.
    pub session_timeout_ms: u64,
    /// Longest a fetch may wait at the broker for data (librdkafka
    /// `fetch.wait.max.ms`); unset: librdkafka's default (500). A Kafka
    /// broker answers a waiting fetch as soon as data arrives, so this only
    /// bounds idle polling there. tansu 0.6 sleeps after *every* fetch
    /// (half the wait, at least 250 ms of a 500 ms wait) before it answers,
    /// so on tansu every consumer hop costs up to this much latency: the
    /// example platform's local settings use 50.
    pub consumer_fetch_wait_ms: Option<u64>,
    /// How often completed offsets are committed.
    pub commit_interval_ms: u64,
    /// Attempts per message (first try included) before a retryable error dead-letters it.
    pub max_attempts: u32,
    /// First retry backoff; doubles per attempt.
    pub retry_backoff_initial_ms: u64,
    /// Retry backoff ceiling.
    pub retry_backoff_max_ms: u64,
    /// DLQ topic suffix (`<topic><suffix>`).
    pub dlq_suffix: String,
    /// Pause between attempts to write a message to the DLQ when that write fails.
    pub dlq_retry_backoff_ms: u64,
    /// How long graceful shutdown waits for in-flight handlers.
    pub shutdown_timeout_ms: u64,
    /// Consumer lag statistics interval (0 disables the lag metric).
    pub lag_interval_ms: u64,

    /// Replays after which a message is no longer republished from the DLQ.
    pub replay_max: u32,

    /// The deployment profile this section runs under. soma-config's
    /// [`Loader`](soma_config::Loader) sets it from the top-level `profile`
    /// key (and refuses a source that gives this section another one); set
    /// it yourself only when you build a `BusConfig` in code. Decides the
    /// durability defaults and floors of created topics (see the type docs).
    pub deployment_profile: DeploymentProfile,
    /// Partitions for topics created by [`crate::TopicAdmin::ensure_topics`].
    pub topic_partitions: i32,
    /// Replication factor for created topics; unset: 1 under `local`, 3
    /// under `prod`. Under `prod`, less than 2 is refused.
    pub topic_replication_factor: Option<i32>,
    /// `min.insync.replicas` of created topics; unset: the broker's default
    /// under `local`, 2 under `prod`. Under `prod`, less than 2 is refused;
    /// more than the replication factor is always refused (no write could
    /// ever be acknowledged).
    pub topic_min_insync_replicas: Option<i32>,
    /// Timeout for admin and metadata requests (also the health check timeout).
    pub admin_timeout_ms: u64,
    /// Interval of the broker health check (component `kafka`) once
    /// [`TopicAdmin::health`](crate::TopicAdmin::health) attached a health
    /// registry.
    pub health_interval_ms: u64,

    /// Extra librdkafka properties (e.g. `ssl.ca.location`). Keys controlling
    /// acks, idempotence, auto-commit or the settings above are rejected.
    pub librdkafka: BTreeMap<String, String>,
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
            linger_ms: 5,
            batch_size_bytes: 1_000_000,
            batch_num_messages: 10_000,
            max_in_flight: 5,
            queue_buffering_max_messages: 100_000,
            publish_timeout_ms: 5_000,
            flush_timeout_ms: 10_000,
            breaker: BreakerConfig::new(1, 2_000),
            pending_key_poll_interval_ms: 200,
            check_outbox_per_message: false,
            consumer_group: "soma".to_owned(),
            consumer_concurrency: 16,
            consumer_lane_capacity: 256,
            auto_offset_reset: "earliest".to_owned(),
            session_timeout_ms: 10_000,
            consumer_fetch_wait_ms: None,
            commit_interval_ms: 1_000,
            max_attempts: 5,
            retry_backoff_initial_ms: 100,
            retry_backoff_max_ms: 5_000,
            dlq_suffix: ".dlq".to_owned(),
            dlq_retry_backoff_ms: 1_000,
            shutdown_timeout_ms: 30_000,
            lag_interval_ms: 5_000,
            replay_max: 3,
            deployment_profile: DeploymentProfile::Local,
            topic_partitions: 1,
            topic_replication_factor: None,
            topic_min_insync_replicas: None,
            admin_timeout_ms: 5_000,
            health_interval_ms: 5_000,
            librdkafka: BTreeMap::new(),
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
    /// | `topic_partitions` | 1 | 12 |
    /// | `consumer_concurrency` | 4 | 16 |
    ///
    /// ```
    /// use soma_bus::BusConfig;
    /// use soma_config::{DeploymentProfile, ProfilePreset};
    ///
    /// let prod = DeploymentProfile::Prod;
    /// let preset = ProfilePreset::new(prod).section("bus", BusConfig::preset(prod))?;
    /// assert!(preset.entries().any(|entry| entry == ("bus.topic_partitions", 12)));
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
                ("topic_partitions", topic_partitions),
                ("consumer_concurrency", consumer_concurrency),
            ],
        )
    }

    /// Checks the settings; called by every constructor in this crate.
    pub fn validate(&self) -> Result<(), BusError> {
        let bad = |m: String| Err(BusError::Config(m));
        if self.bootstrap_servers.trim().is_empty() {
            return bad("bootstrap_servers is empty".into());
        }
        if !(1..=5).contains(&self.max_in_flight) {
            return bad(
                "max_in_flight must be 1..=5 (idempotence keeps order only up to 5)".into(),
            );
        }
        if self.publish_timeout_ms == 0 {
            return bad("publish_timeout_ms must be > 0".into());
        }
        if self.consumer_fetch_wait_ms.is_some_and(|ms| ms > 300_000) {
            return bad(
                "consumer_fetch_wait_ms must be at most 300000 (librdkafka's limit)".into(),
            );
        }
        if self.consumer_concurrency == 0 || self.consumer_lane_capacity == 0 {
            return bad("consumer_concurrency and consumer_lane_capacity must be > 0".into());
        }
        if self.max_attempts == 0 {
            return bad("max_attempts must be >= 1".into());
        }
        if self.dlq_suffix.is_empty() {
            return bad("dlq_suffix is empty".into());
        }
        if !matches!(self.auto_offset_reset.as_str(), "earliest" | "latest") {
            return bad("auto_offset_reset must be `earliest` or `latest`".into());
        }
        if self.topic_partitions < 1 {
            return bad("topic_partitions must be >= 1".into());
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
        self.topic_replication_factor
            .unwrap_or(match self.deployment_profile {
                DeploymentProfile::Local => 1,
                DeploymentProfile::Prod => 3,
            })
    }

    /// The `min.insync.replicas` created topics get; `None` leaves the
    /// broker's default (see the type docs).
    pub fn min_insync_replicas(&self) -> Option<i32> {
        self.topic_min_insync_replicas
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
            return weak("topic_replication_factor", rf, 1);
        }
        let min_isr = self.min_insync_replicas();
        if profile == DeploymentProfile::Prod {
            if rf < 2 {
                return weak("topic_replication_factor", rf, 2);
            }
            match min_isr {
                Some(m) if m >= 2 => {}
                m => return weak("topic_min_insync_replicas", m.unwrap_or(1), 2),
            }
        }
        if let Some(m) = min_isr {
            if m < 1 {
                return weak("topic_min_insync_replicas", m, 1);
            }
            if m > rf {
                return Err(BusError::Config(format!(
                    "topic_min_insync_replicas ({m}) exceeds the replication factor ({rf}): no write could be acknowledged"
                )));
            }
        }
        Ok(())
    }

    /// DLQ topic for `topic`.
    pub fn dlq_topic(&self, topic: &str) -> String {
        format!("{topic}{}", self.dlq_suffix)
    }

    pub(crate) fn publish_timeout(&self) -> Duration {
        Duration::from_millis(self.publish_timeout_ms)
    }

    pub(crate) fn admin_timeout(&self) -> Duration {
        Duration::from_millis(self.admin_timeout_ms)
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
        if let Some(ms) = self.consumer_fetch_wait_ms {
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
        let backstop = self
            .publish_timeout_ms
            .saturating_mul(3)
            .max(self.publish_timeout_ms + 5_000);
        c.set("acks", "all")
            .set("enable.idempotence", "true")
            .set(
                "max.in.flight.requests.per.connection",
                self.max_in_flight.to_string(),
            )
            .set("linger.ms", self.linger_ms.to_string())
            .set("batch.size", self.batch_size_bytes.to_string())
            .set("batch.num.messages", self.batch_num_messages.to_string())
            .set(
                "queue.buffering.max.messages",
                self.queue_buffering_max_messages.to_string(),
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
            serde_json::from_str(r#"{"linger_ms": 20, "sasl_password": "hunter2"}"#).unwrap();
        assert_eq!(c.linger_ms, 20);
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
            c.topic_replication_factor = rf;
            c.topic_min_insync_replicas = isr;
            let e = c.validate().unwrap_err();
            assert!(
                e.is_weak_durability() && e.is_config(),
                "{rf:?}/{isr:?}: {e}"
            );
        }
        let mut c = prod.clone();
        c.topic_replication_factor = Some(2);
        c.validate().expect("rf 2 with min.insync 2 is allowed");
        c.topic_min_insync_replicas = Some(3);
        assert!(c.validate().unwrap_err().is_config(), "min.insync > rf");

        // An explicit local setting is the operator's call.
        let mut c = BusConfig {
            topic_replication_factor: Some(3),
            topic_min_insync_replicas: Some(2),
            ..BusConfig::default()
        };
        c.validate().unwrap();
        c.topic_replication_factor = Some(0);
        assert!(c.validate().unwrap_err().is_config());
        // The key reads as before from a config file.
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
        let c = BusConfig {
            consumer_fetch_wait_ms: Some(50),
            ..BusConfig::default()
        };
        c.validate().unwrap();
        assert_eq!(
            c.consumer_client_config().get("fetch.wait.max.ms"),
            Some("50")
        );
        assert_eq!(c.producer_client_config().get("fetch.wait.max.ms"), None);
        let mut c = c;
        c.librdkafka.insert("fetch.wait.max.ms".into(), "20".into());
        assert_eq!(
            c.consumer_client_config().get("fetch.wait.max.ms"),
            Some("20"),
            "an explicit librdkafka property wins"
        );
        let c = BusConfig {
            consumer_fetch_wait_ms: Some(300_001),
            ..BusConfig::default()
        };
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("consumer_fetch_wait_ms"), "{err}");
    }
}
