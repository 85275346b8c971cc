//! Deployment profiles: sizing presets that can never weaken safety.

use std::collections::BTreeMap;
use std::fmt;
use std::num::NonZeroU64;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::ConfigError;

/// A deployment profile: which sizing preset applies.
///
/// Selected by the top-level key `profile` (`SOMA_PROFILE=prod`, or
/// `profile = "prod"` in a file); `local` when nothing says otherwise.
/// Include a `profile: DeploymentProfile` field in your settings type to
/// see (and, in strict mode, to accept) it.
///
/// **Sections see it too.** Every top-level section whose defaults have a
/// `deployment_profile` key (soma-bus's `BusConfig` does) receives the
/// selected profile there, above every source; a file, variable, update or
/// override that gives such a section another profile fails the load with
/// [`ConfigError::InvalidValue`]. So a crate can choose profile-dependent
/// safety defaults (soma-bus: replication factor 3 and
/// `min.insync.replicas` 2 under `prod`) without a second switch to forget.
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use soma_config::{DeploymentProfile, Loader};
/// #[derive(Debug, Default, Serialize, Deserialize)]
/// #[serde(default)]
/// struct Bus { deployment_profile: DeploymentProfile, partitions: u32 }
/// #[derive(Debug, Default, Serialize, Deserialize)]
/// #[serde(default)]
/// struct Settings { profile: DeploymentProfile, bus: Bus }
///
/// let s: Settings = Loader::new().without_env().set("profile", "prod").load().unwrap();
/// assert_eq!(s.bus.deployment_profile, DeploymentProfile::Prod);
/// let e = Loader::<Settings>::new().without_env()
///     .set("profile", "prod").set("bus.deployment_profile", "local")
///     .load().unwrap_err();
/// assert_eq!(e.key(), Some("bus.deployment_profile"));
/// ```
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum DeploymentProfile {
    /// A developer machine or CI: small pools, few partitions, short
    /// timeouts. Same authentication, policy and write acknowledgements as
    /// `prod`; topics get one replica (a local broker is one broker).
    #[default]
    Local,
    /// Production sizing.
    Prod,
}

impl DeploymentProfile {
    /// `"local"` or `"prod"`.
    pub fn as_str(self) -> &'static str {
        match self {
            DeploymentProfile::Local => "local",
            DeploymentProfile::Prod => "prod",
        }
    }

    /// The SDK's built-in preset for this profile. It sizes the standard
    /// soma sections (`redis`, `bus`, `relay`, `policy`) and an
    /// application's `postgres` pool section; entries for sections or keys your settings type does
    /// not have are skipped, so it is safe with any settings type.
    pub fn builtin_preset(self) -> ProfilePreset {
        let p = ProfilePreset::new(self);
        let table: &[(&str, u64, u64)] = &[
            // key, local, prod — keys of the soma crates' own config
            // sections (checked against them by the example platform's tests).
            ("redis.pool_size", 4, 32),
            ("redis.connect_timeout_ms", 2_000, 5_000),
            ("redis.command_timeout_ms", 1_000, 2_000),
            ("postgres.max_connections", 5, 50),
            ("postgres.connect_timeout_ms", 2_000, 5_000),
            ("bus.topic_partitions", 1, 12),
            ("bus.consumer_concurrency", 4, 16),
            ("relay.batch_size", 50, 500),
            ("relay.poll_interval_ms", 100, 500),
            ("policy.cache.capacity", 1_000, 100_000),
        ];
        table.iter().fold(p, |p, (key, local, prod)| {
            let v = if self == DeploymentProfile::Local {
                *local
            } else {
                *prod
            };
            p.size(key, v)
                .expect("built-in preset keys are sizing keys")
        })
    }
}

impl fmt::Display for DeploymentProfile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DeploymentProfile {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "local" => Ok(DeploymentProfile::Local),
            "prod" => Ok(DeploymentProfile::Prod),
            other => Err(format!(
                "unknown deployment profile `{other}` (expected `local` or `prod`)"
            )),
        }
    }
}

/// Words that mark a key as an authentication, policy or durability switch.
/// A preset may not set any key whose last segment contains one of them.
pub(crate) const PROTECTED_WORDS: &[&str] = &[
    "auth",
    "enabled",
    "enable",
    "disable",
    "enforce",
    "require",
    "durab",
    "fsync",
    "sync",
    "ack",
    "replica",
    "isr",
    "fail_open",
    "failopen",
    "bypass",
    "skip",
    "insecure",
    "verify",
    "tls",
    "mode",
    "secret",
    "password",
    "token",
    "key",
    "allow",
];

/// A sizing preset: numbers only, every one at least 1.
///
/// Safety by construction: a preset holds nothing but positive integers
/// (pool sizes, partitions, timeouts, batch sizes), so it cannot flip a
/// boolean, pick a mode or blank a string, and a value of `0` (often
/// "unlimited" or "off") is unrepresentable. Keys whose last segment names
/// an authentication, policy-enforcement or durability setting
/// (`auth*`, `*enabled`, `enforce*`, `require*`, `*fsync*`, `acks`,
/// `*replica*`, `fail_open`, `tls*`, …) are rejected with
/// [`ConfigError::ProfileViolation`]. The preset sits just above the
/// settings' defaults: files, environment, updates and overrides still win.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfilePreset {
    profile: DeploymentProfile,
    entries: BTreeMap<String, NonZeroU64>,
}

impl ProfilePreset {
    /// An empty preset for `profile`.
    pub fn new(profile: DeploymentProfile) -> Self {
        Self {
            profile,
            entries: BTreeMap::new(),
        }
    }

    /// The profile this preset is for.
    pub fn profile(&self) -> DeploymentProfile {
        self.profile
    }

    /// Sets the sizing value at `key` (dotted path, snake_case segments).
    ///
    /// # Errors
    /// [`ConfigError::ProfileViolation`] when `value` is 0, the key is not a
    /// dotted snake_case path, or its last segment names a protected
    /// (authentication, policy or durability) setting.
    pub fn size(mut self, key: &str, value: u64) -> Result<Self, ConfigError> {
        let violation = |message: String| ConfigError::ProfileViolation {
            profile: self.profile,
            key: key.to_owned(),
            message,
        };
        let value = NonZeroU64::new(value).ok_or_else(|| {
            violation("a preset value must be at least 1 (0 often means off or unlimited)".into())
        })?;
        let segments: Vec<&str> = key.split('.').collect();
        if segments.iter().any(|s| {
            s.is_empty()
                || !s
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        }) {
            return Err(violation("keys are dotted snake_case paths".into()));
        }
        let leaf = segments.last().copied().unwrap_or_default();
        if let Some(word) = PROTECTED_WORDS.iter().find(|w| leaf.contains(*w)) {
            return Err(violation(format!(
                "`{leaf}` looks like an authentication, policy or durability setting (contains `{word}`); profiles only size things"
            )));
        }
        self.entries.insert(key.to_owned(), value);
        Ok(self)
    }

    /// The entries, by key.
    pub fn entries(&self) -> impl Iterator<Item = (&str, u64)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v.get()))
    }

    /// The preset as a nested JSON object, keeping only keys that exist in
    /// `shape` (the serialized defaults of the settings type).
    pub(crate) fn to_document(&self, shape: &serde_json::Value) -> serde_json::Value {
        let mut root = serde_json::Map::new();
        for (key, value) in &self.entries {
            let segments: Vec<&str> = key.split('.').collect();
            if !path_exists(shape, &segments) {
                continue;
            }
            let mut node = &mut root;
            for seg in &segments[..segments.len() - 1] {
                node = node
                    .entry(seg.to_string())
                    .or_insert_with(|| serde_json::Value::Object(Default::default()))
                    .as_object_mut()
                    .expect("preset paths only create objects");
            }
            node.insert(
                segments[segments.len() - 1].to_owned(),
                serde_json::Value::from(value.get()),
            );
        }
        serde_json::Value::Object(root)
    }
}

fn path_exists(shape: &serde_json::Value, segments: &[&str]) -> bool {
    let mut node = shape;
    for seg in segments {
        match node.get(seg) {
            Some(next) => node = next,
            None => return false,
        }
    }
    node.is_number()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_reject_safety_switches() {
        for key in [
            "auth.required",
            "gateway.auth_enabled",
            "policy.enforce",
            "policy.fail_open",
            "outbox.fsync_interval_ms",
            "bus.acks",
            "bus.replication_factor",
            "bus.min_insync_replicas",
            "redis.tls_enabled",
            "db.synchronous_commit",
        ] {
            let err = ProfilePreset::new(DeploymentProfile::Local)
                .size(key, 1)
                .unwrap_err();
            assert!(err.is_profile_violation(), "{key}: {err}");
            assert_eq!(err.key(), Some(key));
        }
    }

    #[test]
    fn presets_reject_zero_and_bad_paths() {
        let p = ProfilePreset::new(DeploymentProfile::Prod);
        assert!(
            p.clone()
                .size("redis.pool_size", 0)
                .unwrap_err()
                .is_profile_violation()
        );
        assert!(
            p.clone()
                .size("Redis.PoolSize", 3)
                .unwrap_err()
                .is_profile_violation()
        );
        assert!(
            p.clone()
                .size("redis..pool_size", 3)
                .unwrap_err()
                .is_profile_violation()
        );
        assert!(p.size("redis.pool_size", 3).is_ok());
    }

    #[test]
    fn builtin_presets_only_size_things() {
        for profile in [DeploymentProfile::Local, DeploymentProfile::Prod] {
            let preset = profile.builtin_preset();
            assert!(preset.entries().count() >= 10);
            for (key, value) in preset.entries() {
                assert!(value >= 1);
                let leaf = key.rsplit('.').next().unwrap();
                assert!(!PROTECTED_WORDS.iter().any(|w| leaf.contains(w)), "{key}");
            }
        }
        let local: BTreeMap<_, _> = DeploymentProfile::Local
            .builtin_preset()
            .entries()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        let prod: BTreeMap<_, _> = DeploymentProfile::Prod
            .builtin_preset()
            .entries()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        assert_eq!(
            local.keys().collect::<Vec<_>>(),
            prod.keys().collect::<Vec<_>>()
        );
        assert!(local["redis.pool_size"] < prod["redis.pool_size"]);
    }

    #[test]
    fn documents_keep_only_known_numeric_keys() {
        let shape = serde_json::json!({"redis": {"pool_size": 8, "url": "x"}});
        let doc = DeploymentProfile::Prod.builtin_preset().to_document(&shape);
        assert_eq!(doc, serde_json::json!({"redis": {"pool_size": 32}}));
    }
}
