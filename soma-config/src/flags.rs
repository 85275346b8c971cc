//! Feature flags: descriptors, profiles, runtime degradation and per-tenant
//! overrides with a bounded TTL cache.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::error::ConfigError;

/// Feature profiles, smallest first. A flag's descriptor lists the profiles
/// it is on in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FeatureProfile {
    /// Only what the service cannot run without.
    Minimal,
    /// The usual set.
    Standard,
    /// Standard plus the heavier optional features.
    Enhanced,
    /// Everything.
    Max,
}

impl FeatureProfile {
    /// All profiles, smallest first.
    pub const ALL: [FeatureProfile; 4] = [
        FeatureProfile::Minimal,
        FeatureProfile::Standard,
        FeatureProfile::Enhanced,
        FeatureProfile::Max,
    ];
}

/// An on/off setting for a flag (config overrides and tenant overrides).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FlagSetting {
    /// Switch the flag on.
    On,
    /// Switch the flag off.
    Off,
}

/// The effective state of a flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FlagState {
    /// On and healthy.
    On,
    /// On, but running degraded (health said so, or a dependency is
    /// degraded): callers should use a cheaper or safer path.
    Degraded,
    /// Off.
    Off,
}

impl FlagState {
    /// Fully on.
    pub fn is_on(self) -> bool {
        self == FlagState::On
    }

    /// On or degraded: the feature may be used, perhaps in a reduced way.
    pub fn is_available(self) -> bool {
        self != FlagState::Off
    }
}

/// Where a flag's answer came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FlagSource {
    /// The descriptor's default.
    Default,
    /// Membership in the active feature profile.
    Profile {
        /// The active profile.
        profile: FeatureProfile,
    },
    /// An override in [`FlagsConfig::overrides`].
    Config,
    /// The tenant override resolver (possibly from its cache).
    Tenant {
        /// The tenant.
        tenant: String,
        /// Served from the TTL cache.
        cached: bool,
    },
    /// A dependency is off or degraded.
    Dependency {
        /// The dependency that decided.
        flag: String,
    },
    /// Marked degraded at runtime ([`FeatureFlags::set_degraded`]).
    Runtime,
}

/// The answer to a flag lookup, with its provenance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FlagLookup {
    /// The flag.
    pub name: String,
    /// Its effective state.
    pub state: FlagState,
    /// Where the state came from.
    pub source: FlagSource,
    /// Why it is degraded, when it is.
    pub reason: Option<String>,
    /// Set when the tenant resolver failed and the tenant-less answer was
    /// used instead (failures are not cached).
    pub tenant_error: Option<String>,
}

/// Declares a flag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlagDescriptor {
    name: String,
    description: String,
    default: bool,
    dependencies: Vec<String>,
    profiles: Vec<FeatureProfile>,
}

impl FlagDescriptor {
    /// A flag that is off by default, in no profile, with no dependencies.
    pub fn new(name: impl Into<String>, description: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            description: description.into(),
            default: false,
            dependencies: Vec::new(),
            profiles: Vec::new(),
        }
    }

    /// The state when no profile is active and nothing overrides it.
    pub fn default_on(mut self, on: bool) -> Self {
        self.default = on;
        self
    }

    /// This flag is on only while `flag` is (off if it is off, degraded if
    /// it is degraded).
    pub fn depends_on(mut self, flag: impl Into<String>) -> Self {
        self.dependencies.push(flag.into());
        self
    }

    /// Member of exactly these profiles.
    pub fn in_profiles(mut self, profiles: &[FeatureProfile]) -> Self {
        self.profiles = profiles.to_vec();
        self
    }

    /// Member of `smallest` and every larger profile.
    pub fn from_profile(mut self, smallest: FeatureProfile) -> Self {
        self.profiles = FeatureProfile::ALL
            .into_iter()
            .filter(|p| *p >= smallest)
            .collect();
        self
    }

    /// The flag's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// What the flag does.
    pub fn description(&self) -> &str {
        &self.description
    }

    /// The default state.
    pub fn default(&self) -> bool {
        self.default
    }

    /// Flags this one needs.
    pub fn dependencies(&self) -> &[String] {
        &self.dependencies
    }

    /// Profiles the flag is on in.
    pub fn profiles(&self) -> &[FeatureProfile] {
        &self.profiles
    }
}

/// The `flags` config section: which feature profile is active and
/// per-flag overrides (`SOMA_FLAGS__PROFILE=standard`,
/// `SOMA_FLAGS__OVERRIDES__SEMANTIC_CACHE=off`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct FlagsConfig {
    /// The active feature profile; `None` uses each flag's default.
    pub profile: Option<FeatureProfile>,
    /// Overrides by flag name, above the profile and the default.
    pub overrides: BTreeMap<String, FlagSetting>,
    /// Tenant override cache: entries kept at most this long (default
    /// 30 000; 0 also means the default).
    pub tenant_cache_ttl_ms: u64,
    /// Tenant override cache: at most this many (tenant, flag) entries
    /// (default 10 000; 0 also means the default).
    pub tenant_cache_capacity: usize,
}

impl Default for FlagsConfig {
    fn default() -> Self {
        Self {
            profile: None,
            overrides: BTreeMap::new(),
            tenant_cache_ttl_ms: 30_000,
            tenant_cache_capacity: 10_000,
        }
    }
}

impl FlagsConfig {
    /// The same settings with `profile` active.
    pub fn with_profile(mut self, profile: FeatureProfile) -> Self {
        self.profile = Some(profile);
        self
    }

    /// The same settings with `flag` overridden to `setting`.
    pub fn with_override(mut self, flag: impl Into<String>, setting: FlagSetting) -> Self {
        self.overrides.insert(flag.into(), setting);
        self
    }

    fn cache_ttl(&self) -> Duration {
        Duration::from_millis(if self.tenant_cache_ttl_ms == 0 {
            30_000
        } else {
            self.tenant_cache_ttl_ms
        })
    }

    fn cache_capacity(&self) -> usize {
        if self.tenant_cache_capacity == 0 {
            10_000
        } else {
            self.tenant_cache_capacity
        }
    }
}

/// The error a tenant resolver returns when it cannot answer.
#[derive(Debug, thiserror::Error)]
#[error("tenant flag resolver failed: {0}")]
pub struct ResolverError(pub String);

/// Per-tenant overrides (a database table, a control-plane API).
#[async_trait]
pub trait TenantFlagResolver: Send + Sync {
    /// The tenant's setting for `flag`, `None` for no override.
    async fn resolve(&self, tenant: &str, flag: &str)
    -> Result<Option<FlagSetting>, ResolverError>;
}

/// (tenant, flag).
type CacheKey = (String, String);

/// A bounded TTL cache of tenant answers (including "no override").
/// Full: expired entries are dropped first, then the oldest.
struct TtlCache {
    entries: Mutex<HashMap<CacheKey, (Option<FlagSetting>, Instant)>>,
    capacity: usize,
    ttl: Duration,
}

impl TtlCache {
    fn get(&self, tenant: &str, flag: &str) -> Option<Option<FlagSetting>> {
        let mut map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let key = (tenant.to_owned(), flag.to_owned());
        match map.get(&key) {
            Some((v, at)) if at.elapsed() < self.ttl => Some(*v),
            Some(_) => {
                map.remove(&key);
                None
            }
            None => None,
        }
    }

    fn insert(&self, tenant: &str, flag: &str, value: Option<FlagSetting>) {
        let mut map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= self.capacity {
            let ttl = self.ttl;
            map.retain(|_, (_, at)| at.elapsed() < ttl);
        }
        if map.len() >= self.capacity {
            if let Some(oldest) = map
                .iter()
                .min_by_key(|(_, (_, at))| *at)
                .map(|(k, _)| k.clone())
            {
                map.remove(&oldest);
            }
        }
        map.insert(
            (tenant.to_owned(), flag.to_owned()),
            (value, Instant::now()),
        );
    }

    fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    fn invalidate_tenant(&self, tenant: &str) {
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(t, _), _| t != tenant);
    }
}

/// The feature-flag registry. Cheap to clone (shared).
///
/// An unknown flag name is always [`ConfigError::UnknownFlag`], never a
/// silent `false`.
#[derive(Clone)]
pub struct FeatureFlags {
    inner: Arc<FlagsInner>,
}

struct FlagsInner {
    descriptors: BTreeMap<String, FlagDescriptor>,
    /// Dependency order: every flag after the flags it depends on.
    order: Vec<String>,
    config: ArcSwap<FlagsConfig>,
    degraded: RwLock<HashMap<String, String>>,
    resolver: Option<Arc<dyn TenantFlagResolver>>,
    cache: TtlCache,
}

impl fmt::Debug for FeatureFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FeatureFlags")
            .field("flags", &self.inner.descriptors.keys().collect::<Vec<_>>())
            .field("config", &**self.inner.config.load())
            .finish_non_exhaustive()
    }
}

impl FeatureFlags {
    /// Builds a registry.
    ///
    /// # Errors
    /// [`ConfigError::InvalidFlag`] for a duplicate name, an unknown or
    /// cyclic dependency; [`ConfigError::UnknownFlag`] for an override of an
    /// undeclared flag.
    pub fn new(
        descriptors: impl IntoIterator<Item = FlagDescriptor>,
        config: FlagsConfig,
        resolver: Option<Arc<dyn TenantFlagResolver>>,
    ) -> Result<Self, ConfigError> {
        let mut map = BTreeMap::new();
        for d in descriptors {
            if d.name.is_empty() {
                return Err(ConfigError::InvalidFlag {
                    name: d.name,
                    message: "empty name".into(),
                });
            }
            if map.contains_key(&d.name) {
                return Err(ConfigError::InvalidFlag {
                    name: d.name,
                    message: "declared twice".into(),
                });
            }
            map.insert(d.name.clone(), d);
        }
        let order = dependency_order(&map)?;
        check_overrides(&map, &config)?;
        let cache = TtlCache {
            entries: Mutex::new(HashMap::new()),
            capacity: config.cache_capacity(),
            ttl: config.cache_ttl(),
        };
        Ok(Self {
            inner: Arc::new(FlagsInner {
                descriptors: map,
                order,
                config: ArcSwap::from_pointee(config),
                degraded: RwLock::new(HashMap::new()),
                resolver,
                cache,
            }),
        })
    }

    /// Replaces the profile and overrides (e.g. from a new
    /// [`Live`](crate::Live) version). Cache size and TTL stay as built.
    ///
    /// # Errors
    /// [`ConfigError::UnknownFlag`] for an override of an undeclared flag;
    /// the previous config stays.
    pub fn set_config(&self, config: FlagsConfig) -> Result<(), ConfigError> {
        check_overrides(&self.inner.descriptors, &config)?;
        self.inner.config.store(Arc::new(config));
        Ok(())
    }

    /// The descriptors, by name.
    pub fn descriptors(&self) -> impl Iterator<Item = &FlagDescriptor> {
        self.inner.descriptors.values()
    }

    /// Marks `name` degraded (health calls this when a dependency of the
    /// feature is unhealthy). Only a flag that would be on shows as
    /// degraded; flags depending on it become degraded too.
    ///
    /// # Errors
    /// [`ConfigError::UnknownFlag`].
    pub fn set_degraded(&self, name: &str, reason: impl Into<String>) -> Result<(), ConfigError> {
        self.descriptor(name)?;
        self.inner
            .degraded
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_owned(), reason.into());
        Ok(())
    }

    /// Clears a runtime degradation. Returns whether it was set.
    ///
    /// # Errors
    /// [`ConfigError::UnknownFlag`].
    pub fn clear_degraded(&self, name: &str) -> Result<bool, ConfigError> {
        self.descriptor(name)?;
        Ok(self
            .inner
            .degraded
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name)
            .is_some())
    }

    /// The flag's state for no particular tenant.
    ///
    /// # Errors
    /// [`ConfigError::UnknownFlag`].
    pub fn lookup(&self, name: &str) -> Result<FlagLookup, ConfigError> {
        self.descriptor(name)?;
        let config = self.inner.config.load();
        let mut resolved: HashMap<&str, FlagLookup> = HashMap::new();
        for flag in self.closure(name) {
            let (setting, source) = self.base(flag, &config);
            let answer = self.combine(flag, setting, source, None, &resolved);
            resolved.insert(flag, answer);
        }
        Ok(resolved
            .remove(name)
            .expect("the flag is in its own closure"))
    }

    /// `true` when the flag is fully [`On`](FlagState::On).
    ///
    /// # Errors
    /// [`ConfigError::UnknownFlag`].
    pub fn is_on(&self, name: &str) -> Result<bool, ConfigError> {
        Ok(self.lookup(name)?.state.is_on())
    }

    /// The flag's state for `tenant`: the tenant resolver's override (cached
    /// for the TTL, bounded in size) wins over config, profile and default;
    /// dependencies and runtime degradation then apply. If the resolver
    /// fails, the tenant-less answer is returned with
    /// [`FlagLookup::tenant_error`] set.
    ///
    /// # Errors
    /// [`ConfigError::UnknownFlag`].
    pub async fn lookup_for(&self, name: &str, tenant: &str) -> Result<FlagLookup, ConfigError> {
        self.descriptor(name)?;
        let config = self.inner.config.load_full();
        let mut resolved: HashMap<&str, FlagLookup> = HashMap::new();
        for flag in self.closure(name) {
            let (mut setting, mut source) = self.base(flag, &config);
            let mut tenant_error = None;
            match self.tenant_setting(tenant, flag).await {
                Ok(Some((s, cached))) => {
                    setting = s;
                    source = FlagSource::Tenant {
                        tenant: tenant.to_owned(),
                        cached,
                    };
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, flag, tenant, "tenant flag resolver failed; using the tenant-less answer");
                    tenant_error = Some(e.to_string());
                }
            }
            let answer = self.combine(flag, setting, source, tenant_error, &resolved);
            resolved.insert(flag, answer);
        }
        Ok(resolved
            .remove(name)
            .expect("the flag is in its own closure"))
    }

    /// Drops a tenant's cached answers (call after changing its overrides).
    pub fn invalidate_tenant(&self, tenant: &str) {
        self.inner.cache.invalidate_tenant(tenant);
    }

    /// Cached (tenant, flag) entries, expired ones included until evicted.
    pub fn tenant_cache_len(&self) -> usize {
        self.inner.cache.len()
    }

    fn descriptor(&self, name: &str) -> Result<&FlagDescriptor, ConfigError> {
        self.inner
            .descriptors
            .get(name)
            .ok_or_else(|| ConfigError::UnknownFlag {
                name: name.to_owned(),
            })
    }

    /// `name` and everything it depends on, dependencies first.
    fn closure(&self, name: &str) -> Vec<&str> {
        let mut needed: HashSet<&str> = HashSet::new();
        let mut stack = vec![name];
        while let Some(f) = stack.pop() {
            if needed.insert(f) {
                stack.extend(
                    self.inner.descriptors[f]
                        .dependencies
                        .iter()
                        .map(String::as_str),
                );
            }
        }
        self.inner
            .order
            .iter()
            .map(String::as_str)
            .filter(|f| needed.contains(f))
            .collect()
    }

    fn base(&self, flag: &str, config: &FlagsConfig) -> (FlagSetting, FlagSource) {
        let d = &self.inner.descriptors[flag];
        if let Some(s) = config.overrides.get(flag) {
            return (*s, FlagSource::Config);
        }
        if let Some(profile) = config.profile {
            let on = d.profiles.contains(&profile);
            return (
                if on {
                    FlagSetting::On
                } else {
                    FlagSetting::Off
                },
                FlagSource::Profile { profile },
            );
        }
        (
            if d.default {
                FlagSetting::On
            } else {
                FlagSetting::Off
            },
            FlagSource::Default,
        )
    }

    fn combine(
        &self,
        flag: &str,
        setting: FlagSetting,
        source: FlagSource,
        tenant_error: Option<String>,
        resolved: &HashMap<&str, FlagLookup>,
    ) -> FlagLookup {
        let mut answer = FlagLookup {
            name: flag.to_owned(),
            state: if setting == FlagSetting::On {
                FlagState::On
            } else {
                FlagState::Off
            },
            source,
            reason: None,
            tenant_error,
        };
        if answer.state == FlagState::Off {
            return answer;
        }
        let deps = &self.inner.descriptors[flag].dependencies;
        if let Some(dep) = deps
            .iter()
            .find(|d| resolved[d.as_str()].state == FlagState::Off)
        {
            answer.state = FlagState::Off;
            answer.source = FlagSource::Dependency { flag: dep.clone() };
            answer.reason = Some(format!("depends on `{dep}`, which is off"));
            return answer;
        }
        if let Some(reason) = self
            .inner
            .degraded
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(flag)
        {
            answer.state = FlagState::Degraded;
            answer.source = FlagSource::Runtime;
            answer.reason = Some(reason.clone());
            return answer;
        }
        if let Some(dep) = deps
            .iter()
            .find(|d| resolved[d.as_str()].state == FlagState::Degraded)
        {
            answer.state = FlagState::Degraded;
            answer.source = FlagSource::Dependency { flag: dep.clone() };
            answer.reason = Some(format!("depends on `{dep}`, which is degraded"));
        }
        answer
    }

    async fn tenant_setting(
        &self,
        tenant: &str,
        flag: &str,
    ) -> Result<Option<(FlagSetting, bool)>, ResolverError> {
        let Some(resolver) = &self.inner.resolver else {
            return Ok(None);
        };
        if let Some(hit) = self.inner.cache.get(tenant, flag) {
            return Ok(hit.map(|s| (s, true)));
        }
        let answer = resolver.resolve(tenant, flag).await?;
        self.inner.cache.insert(tenant, flag, answer);
        Ok(answer.map(|s| (s, false)))
    }
}

fn check_overrides(
    map: &BTreeMap<String, FlagDescriptor>,
    config: &FlagsConfig,
) -> Result<(), ConfigError> {
    match config.overrides.keys().find(|k| !map.contains_key(*k)) {
        Some(name) => Err(ConfigError::UnknownFlag { name: name.clone() }),
        None => Ok(()),
    }
}

fn dependency_order(map: &BTreeMap<String, FlagDescriptor>) -> Result<Vec<String>, ConfigError> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Visiting,
        Done,
    }
    fn visit(
        name: &str,
        map: &BTreeMap<String, FlagDescriptor>,
        marks: &mut HashMap<String, Mark>,
        order: &mut Vec<String>,
    ) -> Result<(), ConfigError> {
        match marks.get(name) {
            Some(Mark::Done) => return Ok(()),
            Some(Mark::Visiting) => {
                return Err(ConfigError::InvalidFlag {
                    name: name.to_owned(),
                    message: "dependency cycle".into(),
                });
            }
            None => {}
        }
        marks.insert(name.to_owned(), Mark::Visiting);
        for dep in &map[name].dependencies {
            if !map.contains_key(dep) {
                return Err(ConfigError::InvalidFlag {
                    name: name.to_owned(),
                    message: format!("depends on undeclared flag `{dep}`"),
                });
            }
            visit(dep, map, marks, order)?;
        }
        marks.insert(name.to_owned(), Mark::Done);
        order.push(name.to_owned());
        Ok(())
    }
    let mut marks = HashMap::new();
    let mut order = Vec::new();
    for name in map.keys() {
        visit(name, map, &mut marks, &mut order)?;
    }
    Ok(order)
}
