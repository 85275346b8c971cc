//! Configuration sections: [`OutboxConfig`] and [`RelayConfig`].

use std::time::Duration;

use serde::{Deserialize, Serialize};
use soma_config::{DeploymentProfile, SectionPreset};
use soma_observability::resilience::{Backoff, BackoffConfig, Jitter};

use crate::OutboxError;

/// The `outbox` section: where the tables live and what producers may write.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
#[non_exhaustive]
pub struct OutboxConfig {
    /// PostgreSQL schema holding the outbox, dead-letter, inbox and settings
    /// tables. Created and migrated by [`Outbox::new`](crate::Outbox::new).
    /// Lowercase ASCII letters, digits and `_`, not starting with a digit,
    /// at most 63 characters.
    pub schema: String,
    /// Largest accepted payload, in bytes. Larger payloads are rejected with
    /// [`OutboxError::PayloadTooLarge`] before anything is written.
    pub max_payload_bytes: usize,
    /// How many times one dead letter may be requeued
    /// ([`Outbox::requeue_dead_letter`](crate::Outbox::requeue_dead_letter)).
    pub max_replays: u32,
    /// The outbox health component turns degraded when the oldest pending
    /// message is older than this many seconds.
    pub health_max_pending_age_secs: u64,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self {
            schema: "soma_outbox".to_owned(),
            max_payload_bytes: 1024 * 1024,
            max_replays: 3,
            health_max_pending_age_secs: 60,
        }
    }
}

impl OutboxConfig {
    /// The defaults with the tables in `schema` (see [`schema`](Self::schema)
    /// for the accepted names).
    pub fn new(schema: impl Into<String>) -> Self {
        Self {
            schema: schema.into(),
            ..Self::default()
        }
    }

    /// Checks every value, naming the first bad one.
    pub fn validate(&self) -> Result<(), OutboxError> {
        validate_identifier(&self.schema)?;
        if self.max_payload_bytes == 0 {
            return Err(OutboxError::InvalidConfig(
                "max_payload_bytes must be > 0".into(),
            ));
        }
        if self.max_payload_bytes > 256 * 1024 * 1024 {
            return Err(OutboxError::InvalidConfig(
                "max_payload_bytes must be <= 268435456 (PostgreSQL bytea practical limit)".into(),
            ));
        }
        Ok(())
    }
}

/// Checks a schema name: `[a-z_][a-z0-9_]{0,62}`.
pub(crate) fn validate_identifier(name: &str) -> Result<(), OutboxError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !name.as_bytes()[0].is_ascii_digit()
        && !name.starts_with("pg_");
    if ok {
        Ok(())
    } else {
        Err(OutboxError::InvalidConfig(format!(
            "schema {name:?} must be 1-63 lowercase ASCII letters, digits or '_', \
             not start with a digit or 'pg_'"
        )))
    }
}

/// What a dead-lettered message does to later messages of its key
/// ([`RelayConfig::dead_letter_order`]).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DeadLetterOrder {
    /// Later messages of the key wait while any earlier message of the key
    /// is in the dead-letter table. An operator either requeues it
    /// ([`Outbox::requeue_dead_letter`](crate::Outbox::requeue_dead_letter):
    /// it is delivered first, in its original place) or purges it
    /// ([`Outbox::purge_dead_letters`](crate::Outbox::purge_dead_letters):
    /// the key continues without it). Per-key order is never broken
    /// silently; a blocked key shows as pending age and in the dead-letter
    /// gauge.
    #[default]
    BlockKey,
    /// Later messages of the key proceed at once: dead-lettering gives up the
    /// message's place in its key's order, and a requeue delivers it after
    /// whatever was delivered meanwhile. Choose this only where per-key
    /// order matters less than progress.
    ReleaseKey,
}

/// The `relay` section: how a [`Relay`](crate::Relay) claims, publishes and retries.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
#[non_exhaustive]
pub struct RelayConfig {
    /// Most messages claimed and handed to the sink in one batch.
    pub batch_size: usize,
    /// Number of shards message keys hash into. Each shard is owned by one
    /// relay at a time. Every relay of one schema must use the same value;
    /// a relay started with another value while others run fails with
    /// [`OutboxError::ShardCountMismatch`].
    pub shards: u32,
    /// Polling fallback: how often an idle relay looks for work when no
    /// notification arrives (e.g. after a retry backoff expires).
    pub poll_interval_ms: u64,
    /// Base of the exponential retry backoff.
    pub backoff_base_ms: u64,
    /// Cap of the exponential retry backoff.
    pub backoff_max_ms: u64,
    /// Failed attempts ([`SinkOutcome::Retry`](crate::SinkOutcome::Retry),
    /// a sink panic) before a message is moved to the dead-letter table.
    /// Times the sink was *unavailable*
    /// ([`SinkOutcome::Unavailable`](crate::SinkOutcome::Unavailable), a
    /// sink timeout) are not attempts: an outage of any length never
    /// dead-letters anything.
    pub max_attempts: u32,
    /// Opt-in maximum age, in seconds: a message still undelivered this long
    /// after it was enqueued is dead-lettered at its next failed or
    /// unavailable attempt, even while the sink is down. 0 (the default):
    /// no maximum age; messages wait for the broker for as long as it takes.
    pub dead_letter_after_secs: u64,
    /// What a dead letter does to later messages of its key. The default,
    /// [`DeadLetterOrder::BlockKey`], keeps them waiting until an operator
    /// requeues the dead letter (it goes back to its original place) or
    /// purges it, so a later message never overtakes a dead-lettered one.
    pub dead_letter_order: DeadLetterOrder,
    /// First wait after the sink was unavailable (the relay as a whole backs
    /// off; no message's attempts change). Doubles per consecutive
    /// unavailable batch, with full jitter, up to
    /// [`unavailable_backoff_max_ms`](Self::unavailable_backoff_max_ms).
    pub unavailable_backoff_initial_ms: u64,
    /// Longest wait between two probes of an unavailable sink: once the
    /// broker is back, delivery resumes within about this long.
    pub unavailable_backoff_max_ms: u64,
    /// 0: delete a message once delivered. Otherwise keep it, marked sent,
    /// for this many seconds (the dedupe window then covers it too); the
    /// relay purges older sent messages.
    pub retention_secs: u64,
    /// How often a relay re-reads the set of live relays and takes or gives
    /// up shards. Takeover after a relay dies happens within about this long.
    pub rebalance_interval_ms: u64,
    /// Longest time the sink may take for one batch; on expiry the sink
    /// counts as unavailable for every record of the batch (no attempt is
    /// counted) and the relay backs off.
    pub sink_timeout_ms: u64,
    /// Delay before reconnecting after the relay's database connection fails.
    pub reconnect_backoff_ms: u64,
    /// How often the pending-count and oldest-age gauges are refreshed.
    pub stats_interval_ms: u64,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            batch_size: 500,
            shards: 16,
            poll_interval_ms: 500,
            backoff_base_ms: 200,
            backoff_max_ms: 60_000,
            max_attempts: 10,
            dead_letter_after_secs: 0,
            dead_letter_order: DeadLetterOrder::BlockKey,
            unavailable_backoff_initial_ms: 250,
            unavailable_backoff_max_ms: 5_000,
            retention_secs: 0,
            rebalance_interval_ms: 1_000,
            sink_timeout_ms: 30_000,
            reconnect_backoff_ms: 1_000,
            stats_interval_ms: 5_000,
        }
    }
}

impl RelayConfig {
    /// This section's sizes under a deployment profile, keys relative to
    /// the section; mount them where your settings mount it
    /// ([`ProfilePreset::section`](soma_config::ProfilePreset::section)).
    /// Retries, dead-lettering and ordering are not sizes: they are the
    /// same in every profile.
    ///
    /// | key | `local` | `prod` |
    /// |---|---|---|
    /// | `batch_size` | 50 | 500 |
    /// | `poll_interval_ms` | 100 | 500 |
    ///
    /// ```
    /// use soma_config::{DeploymentProfile, ProfilePreset};
    /// use soma_outbox::RelayConfig;
    ///
    /// let local = DeploymentProfile::Local;
    /// let preset = ProfilePreset::new(local).section("relay", RelayConfig::preset(local))?;
    /// assert!(preset.entries().any(|entry| entry == ("relay.batch_size", 50)));
    /// # Ok::<(), soma_config::ConfigError>(())
    /// ```
    pub fn preset(profile: DeploymentProfile) -> SectionPreset {
        let (batch_size, poll_interval_ms) = match profile {
            DeploymentProfile::Local => (50, 100),
            DeploymentProfile::Prod => (500, 500),
        };
        SectionPreset::new(
            profile,
            [
                ("batch_size", batch_size),
                ("poll_interval_ms", poll_interval_ms),
            ],
        )
    }

    /// Checks every value, naming the first bad one.
    pub fn validate(&self) -> Result<(), OutboxError> {
        let bad = |m: &str| Err(OutboxError::InvalidConfig(m.to_owned()));
        if self.batch_size == 0 || self.batch_size > 10_000 {
            return bad("relay batch_size must be in 1..=10000");
        }
        if self.shards == 0 || self.shards > 4096 {
            return bad("relay shards must be in 1..=4096");
        }
        if self.max_attempts == 0 {
            return bad("relay max_attempts must be > 0");
        }
        if self.poll_interval_ms == 0 || self.rebalance_interval_ms == 0 {
            return bad("relay poll_interval_ms and rebalance_interval_ms must be > 0");
        }
        if self.backoff_base_ms > self.backoff_max_ms {
            return bad("relay backoff_base_ms must be <= backoff_max_ms");
        }
        if self.sink_timeout_ms == 0 {
            return bad("relay sink_timeout_ms must be > 0");
        }
        if self.unavailable_backoff_initial_ms == 0
            || self.unavailable_backoff_initial_ms > self.unavailable_backoff_max_ms
        {
            return bad(
                "relay unavailable_backoff_initial_ms must be > 0 and <= unavailable_backoff_max_ms",
            );
        }
        Ok(())
    }

    pub(crate) fn poll_interval(&self) -> Duration {
        Duration::from_millis(self.poll_interval_ms)
    }
    pub(crate) fn rebalance_interval(&self) -> Duration {
        Duration::from_millis(self.rebalance_interval_ms)
    }

    /// The relay's wait after `consecutive` unavailable batches in a row
    /// (1 for the first): exponential from
    /// [`unavailable_backoff_initial_ms`](Self::unavailable_backoff_initial_ms)
    /// up to [`unavailable_backoff_max_ms`](Self::unavailable_backoff_max_ms),
    /// with equal jitter (at least half of the exponential value, so probes
    /// never come back-to-back against a down broker).
    pub fn unavailable_backoff(&self, consecutive: u32) -> Duration {
        Backoff::new(
            BackoffConfig::new(
                self.unavailable_backoff_initial_ms,
                self.unavailable_backoff_max_ms,
            )
            .with_jitter(Jitter::Equal),
        )
        .delay(consecutive)
    }

    /// Exponential backoff with full jitter for a message that has now failed
    /// `attempts` times: uniform in `[0, min(max, base * 2^(attempts-1))]`.
    pub fn backoff(&self, attempts: u32) -> Duration {
        Backoff::new(
            BackoffConfig::new(self.backoff_base_ms, self.backoff_max_ms).with_jitter(Jitter::Full),
        )
        .delay(attempts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers() {
        assert!(validate_identifier("soma_outbox").is_ok());
        assert!(validate_identifier("_x1").is_ok());
        for bad in ["", "1abc", "Abc", "a-b", "a\"b", "pg_x", &"a".repeat(64)] {
            assert!(validate_identifier(bad).unwrap_err().is_config(), "{bad}");
        }
    }

    #[test]
    fn backoff_is_bounded_and_grows() {
        let c = RelayConfig {
            backoff_base_ms: 100,
            backoff_max_ms: 1_000,
            ..Default::default()
        };
        for attempt in 1..30 {
            let ceiling = (100u64 << (attempt - 1).min(40)).min(1_000);
            for _ in 0..50 {
                assert!(c.backoff(attempt).as_millis() as u64 <= ceiling);
            }
        }
        // Full jitter: over many draws the later attempts reach past the base.
        assert!((0..200).any(|_| c.backoff(5).as_millis() > 100));
    }

    #[test]
    fn unavailable_backoff_has_a_floor_grows_and_is_capped() {
        let c = RelayConfig {
            unavailable_backoff_initial_ms: 100,
            unavailable_backoff_max_ms: 1_000,
            ..Default::default()
        };
        for n in 1..40 {
            let ceiling = (100u64 << (n - 1).min(40)).min(1_000);
            for _ in 0..50 {
                let d = c.unavailable_backoff(n).as_millis() as u64;
                assert!(d >= ceiling / 2 && d <= ceiling, "{n}: {d} vs {ceiling}");
            }
        }
    }

    /// The preset's keys live here, so the proof that each one is a numeric
    /// setting of this section does too.
    #[test]
    fn every_preset_key_is_a_numeric_setting_of_the_section() {
        for profile in DeploymentProfile::ALL {
            RelayConfig::preset(profile)
                .check(&RelayConfig::default())
                .unwrap();
        }
    }

    #[test]
    fn defaults_validate() {
        OutboxConfig::default().validate().unwrap();
        RelayConfig::default().validate().unwrap();
        assert_eq!(
            RelayConfig::default().dead_letter_order,
            DeadLetterOrder::BlockKey
        );
        assert!(
            RelayConfig {
                shards: 0,
                ..Default::default()
            }
            .validate()
            .unwrap_err()
            .is_config()
        );
    }
}
