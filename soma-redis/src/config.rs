//! [`RedisConfig`]: the `redis` section of an application's settings.

use serde::{Deserialize, Serialize};
use soma_config::{DeploymentProfile, Secret, SectionPreset};

/// Connection settings for [`RedisClient`](crate::RedisClient).
///
/// Every field has a local-development default (`redis://127.0.0.1:6379`,
/// pool of 4, 2 s connect timeout, 500 ms command timeout), so an empty
/// section works on a laptop. Keys are snake_case with unit suffixes.
///
/// ```toml
/// [redis]
/// url = "rediss://redis.internal:6380/0"
/// username = "orders-svc"
/// password = "from-a-secret-store"
/// pool_size = 8
/// command_timeout_ms = 250
/// key_prefix = "prod:"
///
/// [redis.reconnect]
/// initial_ms = 50
/// max_ms = 2000
/// jitter_ms = 100
/// ```
///
/// The URL scheme selects the deployment, exactly as fred reads it:
/// `redis://` (plain TCP), `rediss://` (TLS, rustls with the platform's root
/// certificates), `redis-sentinel://host:26379/0?sentinelServiceName=mymaster&node=h2:26379`
/// and `redis-cluster://h1:7000?node=h2:7001`. The [`topology`](Self::topology)
/// field overrides the hosts in the URL when the node list is easier to keep as
/// a list.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct RedisConfig {
    /// Server URL. Credentials may appear in it, but prefer
    /// [`username`](Self::username) / [`password`](Self::password) so the URL
    /// can be logged.
    pub url: String,
    /// ACL user name (Redis 6+). Empty means the `default` user.
    pub username: Option<String>,
    /// ACL password or `requirepass` secret. Never logged.
    pub password: Option<Secret>,
    /// Number of multiplexed connections in the pool. Each connection
    /// pipelines many concurrent commands, so a small number (2–8) is usually
    /// enough.
    pub pool_size: usize,
    /// Dedicated connections of the bulk path ([`Bulk`](crate::Bulk)),
    /// opened on first use. At most this many bulk batches are in flight at
    /// once; further callers wait for a free connection.
    pub bulk_connections: usize,
    /// Timeout for establishing a connection (TCP, TLS, AUTH, HELLO).
    pub connect_timeout_ms: u64,
    /// Timeout for one command, from the call until the reply. A command that
    /// times out returns [`RedisError::is_timeout`](crate::RedisError::is_timeout).
    pub command_timeout_ms: u64,
    /// Extra attempts for idempotent commands (GET, PING, compare-and-set
    /// scripts) after a timeout or a connection reset. Non-idempotent commands
    /// are never retried by this crate. `0` disables retries.
    pub max_retries: u32,
    /// Delay between those retries.
    pub retry_delay_ms: u64,
    /// How the connections are re-established after a failure.
    pub reconnect: ReconnectConfig,
    /// Prepended to every key this crate builds, e.g. `"prod:"` or a
    /// per-test unique prefix. See [`KeySpace`](crate::KeySpace).
    pub key_prefix: String,
    /// Sentinel or cluster node lists, overriding the hosts in [`url`](Self::url).
    pub topology: Topology,
    /// Interval of the health check PING, when a health registry is attached.
    pub health_interval_ms: u64,
    /// Timeout of that PING; a slower reply reports the component down.
    pub health_timeout_ms: u64,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".to_owned(),
            username: None,
            password: None,
            pool_size: 4,
            bulk_connections: 4,
            connect_timeout_ms: 2_000,
            command_timeout_ms: 500,
            max_retries: 2,
            retry_delay_ms: 20,
            reconnect: ReconnectConfig::default(),
            key_prefix: String::new(),
            topology: Topology::default(),
            health_interval_ms: 5_000,
            health_timeout_ms: 500,
        }
    }
}

impl RedisConfig {
    /// This section's sizes under a deployment profile, keys relative to
    /// the section; mount them where your settings mount it
    /// ([`ProfilePreset::section`](soma_config::ProfilePreset::section)).
    ///
    /// | key | `local` | `prod` |
    /// |---|---|---|
    /// | `pool_size` | 4 | 32 |
    /// | `connect_timeout_ms` | 2 000 | 5 000 |
    /// | `command_timeout_ms` | 1 000 | 2 000 |
    ///
    /// ```
    /// use soma_config::{DeploymentProfile, ProfilePreset};
    /// use soma_redis::RedisConfig;
    ///
    /// let prod = DeploymentProfile::Prod;
    /// let preset = ProfilePreset::new(prod).section("redis", RedisConfig::preset(prod))?;
    /// assert!(preset.entries().any(|entry| entry == ("redis.pool_size", 32)));
    /// # Ok::<(), soma_config::ConfigError>(())
    /// ```
    pub fn preset(profile: DeploymentProfile) -> SectionPreset {
        let (pool_size, connect_timeout_ms, command_timeout_ms) = match profile {
            DeploymentProfile::Local => (4, 2_000, 1_000),
            DeploymentProfile::Prod => (32, 5_000, 2_000),
        };
        SectionPreset::new(
            profile,
            [
                ("pool_size", pool_size),
                ("connect_timeout_ms", connect_timeout_ms),
                ("command_timeout_ms", command_timeout_ms),
            ],
        )
    }
}

/// Exponential backoff with jitter between reconnect attempts.
///
/// Attempt *n* waits `min(max_ms, initial_ms * base^(n-1)) + rand(0..jitter_ms)`.
/// `initial_ms` and `max_ms` are spelled as in the SDK's shared
/// [`BackoffConfig`](soma_observability::resilience::BackoffConfig) (the old
/// keys `min_delay_ms` / `max_delay_ms` are still read). The reconnect loop
/// itself is fred's (it owns the connections), so the jitter is fred's:
/// an *added* random delay of up to `jitter_ms`, not the shared config's
/// full/equal jitter, and `base` may differ from 2.
/// While a connection is down, commands fail immediately (see
/// [`RedisError::is_connection`](crate::RedisError::is_connection)); nothing
/// is queued behind the reconnect.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct ReconnectConfig {
    /// Give up after this many consecutive failed attempts; `0` retries
    /// forever (the default: a service should outlive a Redis restart).
    pub max_attempts: u32,
    /// First delay (old key: `min_delay_ms`).
    #[serde(alias = "min_delay_ms")]
    pub initial_ms: u32,
    /// Upper bound of the delay, before jitter (old key: `max_delay_ms`).
    #[serde(alias = "max_delay_ms")]
    pub max_ms: u32,
    /// Multiplier between consecutive delays.
    pub base: u32,
    /// Random extra delay, so a fleet does not reconnect in lockstep.
    pub jitter_ms: u32,
}

impl Default for ReconnectConfig {
    fn default() -> Self {
        Self {
            max_attempts: 0,
            initial_ms: 50,
            max_ms: 2_000,
            base: 2,
            jitter_ms: 100,
        }
    }
}

/// Deployment topology passed through to fred.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum Topology {
    /// Use the host(s) and scheme in [`RedisConfig::url`] (standalone unless
    /// the scheme says sentinel or cluster).
    #[default]
    FromUrl,
    /// A primary found through sentinels.
    Sentinel {
        /// Sentinel nodes as `host:port`.
        nodes: Vec<String>,
        /// The monitored service (master) name.
        service_name: String,
        /// ACL user for the sentinels, when it differs from the server's.
        sentinel_username: Option<String>,
        /// Password for the sentinels, when it differs from the server's.
        sentinel_password: Option<Secret>,
    },
    /// A Redis Cluster; any reachable node discovers the rest.
    Cluster {
        /// Seed nodes as `host:port`.
        nodes: Vec<String>,
    },
}

#[cfg(test)]
mod tests {
    use soma_config::DeploymentProfile;

    use super::{ReconnectConfig, RedisConfig};

    /// The preset's keys live here, so the proof that each one is a numeric
    /// setting of this section does too.
    #[test]
    fn every_preset_key_is_a_numeric_setting_of_the_section() {
        for profile in DeploymentProfile::ALL {
            RedisConfig::preset(profile)
                .check(&RedisConfig::default())
                .unwrap();
        }
    }

    #[test]
    fn reconnect_delays_use_the_shared_spelling_and_still_read_the_old_keys() {
        let new: ReconnectConfig =
            serde_json::from_str(r#"{"initial_ms": 7, "max_ms": 70}"#).unwrap();
        assert_eq!((new.initial_ms, new.max_ms, new.base), (7, 70, 2));
        let old: ReconnectConfig =
            serde_json::from_str(r#"{"min_delay_ms": 8, "max_delay_ms": 80}"#).unwrap();
        assert_eq!((old.initial_ms, old.max_ms), (8, 80));
    }
}
