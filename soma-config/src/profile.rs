//! Deployment profiles: sizing presets that can never weaken safety.
//!
//! The mechanism only. Each crate describes its own section's sizes
//! ([`SectionPreset`], keys relative to the section) next to the section's
//! type; the application mounts them where it mounts the sections
//! ([`ProfilePreset::section`]) and hands the result to the loader
//! ([`Loader::presets`](crate::Loader::presets)). This crate names no other
//! crate's keys.

use std::collections::BTreeMap;
use std::num::NonZeroU64;

use serde::Serialize;

use crate::deployment::DeploymentProfile;
use crate::error::ConfigError;

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

/// One crate's sizes for its own config section under one deployment
/// profile: keys relative to the section (`pool_size`, `cache.capacity`),
/// positive integers.
///
/// A crate offers one next to its section type (`RedisConfig::preset(profile)`
/// in soma-redis), so the keys live beside the struct they name and are
/// tested against it ([`check`](Self::check)). The application mounts it
/// where *it* mounts the section ([`ProfilePreset::section`]): soma-config
/// knows no crate's keys, and a section mounted twice (two Redis pools) is
/// sized twice.
///
/// Building one never fails; its keys and values obey the rules of
/// [`ProfilePreset::size`], checked when it is mounted or
/// [`check`](Self::check)ed.
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use soma_config::{DeploymentProfile, ProfilePreset, SectionPreset};
///
/// /// A crate's section…
/// #[derive(Debug, Serialize, Deserialize)]
/// #[serde(default)]
/// struct PoolConfig { url: String, max_connections: u32, connect_timeout_ms: u64 }
/// # impl Default for PoolConfig {
/// #     fn default() -> Self {
/// #         Self { url: "postgres://localhost/app".into(), max_connections: 10, connect_timeout_ms: 5_000 }
/// #     }
/// # }
///
/// impl PoolConfig {
///     /// …and, next to it, its sizes per profile.
///     fn preset(profile: DeploymentProfile) -> SectionPreset {
///         let (connections, timeout_ms) = match profile {
///             DeploymentProfile::Local => (5, 2_000),
///             DeploymentProfile::Prod => (50, 5_000),
///         };
///         SectionPreset::new(profile, [("max_connections", connections), ("connect_timeout_ms", timeout_ms)])
///     }
/// }
///
/// // The crate's unit test: every key is a numeric setting of the section.
/// for profile in DeploymentProfile::ALL {
///     PoolConfig::preset(profile).check(&PoolConfig::default())?;
/// }
///
/// // The application mounts it where it mounts the section.
/// let prod = DeploymentProfile::Prod;
/// let preset = ProfilePreset::new(prod).section("db", PoolConfig::preset(prod))?;
/// assert_eq!(
///     preset.entries().collect::<Vec<_>>(),
///     [("db.connect_timeout_ms", 5_000), ("db.max_connections", 50)],
/// );
/// # Ok::<(), soma_config::ConfigError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SectionPreset {
    profile: DeploymentProfile,
    entries: BTreeMap<String, u64>,
}

impl SectionPreset {
    /// The sizes `entries` (key relative to the section, value) for
    /// `profile`. A key given twice keeps its last value.
    pub fn new<K: Into<String>>(
        profile: DeploymentProfile,
        entries: impl IntoIterator<Item = (K, u64)>,
    ) -> Self {
        Self {
            profile,
            entries: entries.into_iter().map(|(k, v)| (k.into(), v)).collect(),
        }
    }

    /// The profile these sizes are for.
    pub fn profile(&self) -> DeploymentProfile {
        self.profile
    }

    /// The entries, by key (relative to the section).
    pub fn entries(&self) -> impl Iterator<Item = (&str, u64)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), *v))
    }

    /// Checks these sizes against the section they size: every key is a
    /// sizing key (the rules of [`ProfilePreset::size`]) and names a number
    /// in `section` serialized as JSON (give it the section type's
    /// `Default`). A crate calls it in a unit test next to its keys, for
    /// every profile, so a renamed field cannot leave a preset sizing
    /// nothing.
    ///
    /// # Errors
    /// [`ConfigError::ProfileViolation`] naming the first bad key (relative
    /// to the section).
    pub fn check<S: Serialize + ?Sized>(&self, section: &S) -> Result<(), ConfigError> {
        for (key, value) in self.entries() {
            if let Some(message) = sizing_problem(key, value) {
                return Err(violation(self.profile, key, message));
            }
        }
        check_shape(
            self.profile,
            self.entries(),
            &shape_of(self.profile, section)?,
        )
    }
}

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
///
/// An application composes its preset from the crates' [`SectionPreset`]s,
/// mounted at the paths of its settings type ([`section`](Self::section)),
/// plus any sizes of its own ([`size`](Self::size)). The loader refuses a
/// preset that names a key the settings do not have as a number (see
/// [`Loader::presets`](crate::Loader::presets)).
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
        if let Some(message) = sizing_problem(key, value) {
            return Err(violation(self.profile, key, message));
        }
        let value = NonZeroU64::new(value).expect("sizing_problem refuses 0");
        self.entries.insert(key.to_owned(), value);
        Ok(self)
    }

    /// Mounts a crate's section sizes at `path`, where the settings type
    /// has that section (`"redis"`, or `"cache.redis"` for a nested one):
    /// each `key` of `sizes` is set at `path.key`, by the rules of
    /// [`size`](Self::size).
    ///
    /// # Errors
    /// [`ConfigError::ProfileViolation`] when `sizes` is for another
    /// profile (at `path`), or for the first entry [`size`](Self::size)
    /// refuses (at its full key).
    pub fn section(mut self, path: &str, sizes: SectionPreset) -> Result<Self, ConfigError> {
        if sizes.profile != self.profile {
            return Err(violation(
                self.profile,
                path,
                format!(
                    "the section's sizes are for profile `{}`",
                    sizes.profile.as_str()
                ),
            ));
        }
        for (key, value) in sizes.entries() {
            self = self.size(&format!("{path}.{key}"), value)?;
        }
        Ok(self)
    }

    /// The entries, by key.
    pub fn entries(&self) -> impl Iterator<Item = (&str, u64)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v.get()))
    }

    /// Checks that every key names a number in `settings` serialized as
    /// JSON (give it the settings type's `Default`): what the loader checks
    /// on every load, for an application's test of its composition.
    ///
    /// # Errors
    /// [`ConfigError::ProfileViolation`] naming the first key that is not a
    /// numeric setting.
    pub fn check<T: Serialize + ?Sized>(&self, settings: &T) -> Result<(), ConfigError> {
        self.check_shape(&shape_of(self.profile, settings)?)
    }

    /// As [`check`](Self::check), against the settings' serialized defaults.
    pub(crate) fn check_shape(&self, shape: &serde_json::Value) -> Result<(), ConfigError> {
        check_shape(self.profile, self.entries(), shape)
    }

    /// The preset as a nested JSON object.
    pub(crate) fn to_document(&self) -> serde_json::Value {
        let mut root = serde_json::Map::new();
        for (key, value) in &self.entries {
            let segments: Vec<&str> = key.split('.').collect();
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

fn violation(profile: DeploymentProfile, key: &str, message: String) -> ConfigError {
    ConfigError::ProfileViolation {
        profile,
        key: key.to_owned(),
        message,
    }
}

/// Why `key = value` is not a sizing entry, if it is not one.
fn sizing_problem(key: &str, value: u64) -> Option<String> {
    if value == 0 {
        return Some("a preset value must be at least 1 (0 often means off or unlimited)".into());
    }
    let segments: Vec<&str> = key.split('.').collect();
    if segments.iter().any(|s| {
        s.is_empty()
            || !s
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    }) {
        return Some("keys are dotted snake_case paths".into());
    }
    let leaf = segments.last().copied().unwrap_or_default();
    PROTECTED_WORDS.iter().find(|w| leaf.contains(*w)).map(|word| {
        format!(
            "`{leaf}` looks like an authentication, policy or durability setting (contains `{word}`); profiles only size things"
        )
    })
}

/// `value` serialized as JSON, for [`check_shape`].
fn shape_of<S: Serialize + ?Sized>(
    profile: DeploymentProfile,
    value: &S,
) -> Result<serde_json::Value, ConfigError> {
    serde_json::to_value(value).map_err(|e| {
        violation(
            profile,
            "<root>",
            format!("the settings do not serialize: {e}"),
        )
    })
}

/// Every key of `entries` names a number in `shape`, or the first that
/// does not is a violation: a preset key that is not there sizes nothing.
fn check_shape<'a>(
    profile: DeploymentProfile,
    mut entries: impl Iterator<Item = (&'a str, u64)>,
    shape: &serde_json::Value,
) -> Result<(), ConfigError> {
    match entries.find(|(key, _)| !numeric_at(shape, key)) {
        None => Ok(()),
        Some((key, _)) => Err(violation(
            profile,
            key,
            "no numeric setting has this key, so the preset would size nothing".into(),
        )),
    }
}

fn numeric_at(shape: &serde_json::Value, key: &str) -> bool {
    key.split('.')
        .try_fold(shape, |node, seg| node.get(seg))
        .is_some_and(serde_json::Value::is_number)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_reject_safety_switches() {
        for key in [
            "auth.required",
            "gateway.auth_enabled",
            "authz.enforce",
            "authz.fail_open",
            "journal.fsync_interval_ms",
            "queue.acks",
            "queue.replication_factor",
            "queue.min_insync_replicas",
            "pool.tls_enabled",
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
                .size("db.pool_size", 0)
                .unwrap_err()
                .is_profile_violation()
        );
        assert!(
            p.clone()
                .size("Db.PoolSize", 3)
                .unwrap_err()
                .is_profile_violation()
        );
        assert!(
            p.clone()
                .size("db..pool_size", 3)
                .unwrap_err()
                .is_profile_violation()
        );
        assert!(p.size("db.pool_size", 3).is_ok());
    }

    #[test]
    fn sections_mount_under_their_path_by_the_same_rules() {
        let local = DeploymentProfile::Local;
        let sizes = SectionPreset::new(local, [("pool_size", 4), ("cache.capacity", 100)]);
        let preset = ProfilePreset::new(local)
            .section("pool", sizes.clone())
            .unwrap()
            .section("cache.pool", sizes.clone())
            .unwrap();
        assert_eq!(
            preset.entries().collect::<Vec<_>>(),
            [
                ("cache.pool.cache.capacity", 100),
                ("cache.pool.pool_size", 4),
                ("pool.cache.capacity", 100),
                ("pool.pool_size", 4),
            ]
        );

        // Another profile's sizes, a safety switch, a zero, a bad path:
        // refused, named by the key the settings would have seen.
        let prod = SectionPreset::new(DeploymentProfile::Prod, [("pool_size", 32)]);
        let err = ProfilePreset::new(local).section("pool", prod).unwrap_err();
        assert!(err.is_profile_violation());
        assert_eq!(err.key(), Some("pool"));
        for (entry, key) in [
            (("tls_enabled", 1), "pool.tls_enabled"),
            (("pool_size", 0), "pool.pool_size"),
        ] {
            let err = ProfilePreset::new(local)
                .section("pool", SectionPreset::new(local, [entry]))
                .unwrap_err();
            assert!(err.is_profile_violation(), "{err}");
            assert_eq!(err.key(), Some(key));
        }
        let err = ProfilePreset::new(local)
            .section("Pool", sizes)
            .unwrap_err();
        assert!(err.is_profile_violation());
    }

    #[test]
    fn checks_find_keys_that_are_not_numeric_settings() {
        let shape = serde_json::json!({"pool_size": 8, "url": "x", "cache": {"capacity": 1}});
        let local = DeploymentProfile::Local;
        let ok = SectionPreset::new(local, [("pool_size", 4), ("cache.capacity", 10)]);
        ok.check(&shape).unwrap();
        for (key, value) in [
            ("pool_sise", 4),
            ("url", 4),
            ("cache", 4),
            ("acks", 1),
            ("pool_size", 0),
        ] {
            let err = SectionPreset::new(local, [(key, value)])
                .check(&shape)
                .unwrap_err();
            assert!(err.is_profile_violation(), "{key}: {err}");
            assert_eq!(err.key(), Some(key));
        }
        let preset = ProfilePreset::new(local).section("pool", ok).unwrap();
        let settings = serde_json::json!({"pool": shape});
        preset.check(&settings).unwrap();
        let err = preset.check(&serde_json::json!({"other": {}})).unwrap_err();
        assert_eq!(err.key(), Some("pool.cache.capacity"));
    }

    #[test]
    fn documents_nest_the_keys() {
        let preset = ProfilePreset::new(DeploymentProfile::Prod)
            .size("db.pool_size", 32)
            .unwrap()
            .size("lookup.cache.capacity", 100_000)
            .unwrap();
        assert_eq!(
            preset.to_document(),
            serde_json::json!({"db": {"pool_size": 32}, "lookup": {"cache": {"capacity": 100_000}}})
        );
    }
}
