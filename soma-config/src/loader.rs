//! [`Loader`]: typed, layered loading.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::fmt;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use figment::Profile;
use figment::providers::{Format, Toml};
use figment::value::{Dict, Tag, Value};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::deployment::DeploymentProfile;
use crate::document::{self, Layer, Layers};
use crate::env::{self, EnvSource};
use crate::error::{ConfigError, Origin, Violation};
use crate::profile::ProfilePreset;

/// What a settings type needs to be loaded: `Deserialize` (with
/// `#[serde(default)]` on every struct), `Serialize` (for snapshots and
/// checksums) and `Default`.
pub trait Settings: DeserializeOwned + Serialize + Default + Send + Sync + 'static {}
impl<T: DeserializeOwned + Serialize + Default + Send + Sync + 'static> Settings for T {}

/// Collects validation failures; handed to every validation hook.
#[derive(Debug, Default)]
pub struct Checks {
    failures: Vec<(String, String)>,
}

impl Checks {
    /// Records that the setting at `key` (dotted path) is invalid.
    pub fn fail(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.failures.push((key.into(), message.into()));
    }

    /// Records a failure at `key` unless `ok`.
    pub fn ensure(&mut self, ok: bool, key: impl Into<String>, message: impl Into<String>) {
        if !ok {
            self.fail(key, message);
        }
    }
}

type Validator<T> = Arc<dyn Fn(&T, &mut Checks) + Send + Sync>;
type PresetFn = Arc<dyn Fn(DeploymentProfile) -> Result<ProfilePreset, ConfigError> + Send + Sync>;

#[derive(Debug, Clone)]
struct FileSource {
    path: PathBuf,
    required: bool,
}

/// Builds a settings value of type `T` from layered sources.
///
/// Precedence, lowest first: `T::default()` < the deployment profile's
/// preset (only when [`presets`](Loader::presets) or
/// [`profile_preset`](Loader::profile_preset) was called) < TOML files in
/// the order added < `SOMA_*` environment variables < an applied remote
/// update (see [`Live::apply`](crate::Live::apply)) < programmatic
/// overrides ([`set`](Loader::set)).
///
/// Every load runs the validation hooks; every error names its source and
/// key path.
pub struct Loader<T> {
    files: Vec<FileSource>,
    env: EnvSource,
    overrides: serde_json::Value,
    override_error: Option<(String, String)>,
    strict: bool,
    validators: Vec<Validator<T>>,
    presets: BTreeMap<DeploymentProfile, ProfilePreset>,
    preset_fn: Option<PresetFn>,
    renamed: Vec<RenamedKey>,
    _settings: PhantomData<fn() -> T>,
}

/// A deprecated key and the key that replaces it (dotted paths, split).
#[derive(Debug, Clone)]
struct RenamedKey {
    old: Vec<String>,
    new: Vec<String>,
}

impl<T> Clone for Loader<T> {
    fn clone(&self) -> Self {
        Self {
            files: self.files.clone(),
            env: self.env.clone(),
            overrides: self.overrides.clone(),
            override_error: self.override_error.clone(),
            strict: self.strict,
            validators: self.validators.clone(),
            presets: self.presets.clone(),
            preset_fn: self.preset_fn.clone(),
            renamed: self.renamed.clone(),
            _settings: PhantomData,
        }
    }
}

impl<T> fmt::Debug for Loader<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Loader")
            .field("files", &self.files)
            .field("env", &matches!(self.env, EnvSource::Process))
            .field("strict", &self.strict)
            .field("validators", &self.validators.len())
            .field("presets", &self.preset_fn.is_some())
            .field("profile_presets", &self.presets.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl<T: Settings> Default for Loader<T> {
    fn default() -> Self {
        Self::new()
    }
}

/// The result of one successful load: the typed value plus what
/// [`Live`](crate::Live) needs to version and explain it.
#[derive(Debug)]
pub(crate) struct Loaded<T> {
    pub(crate) value: T,
    pub(crate) checksum: String,
    pub(crate) sources: BTreeMap<String, Origin>,
    pub(crate) profile: DeploymentProfile,
}

/// A remote update's layer, kept across reloads.
#[derive(Debug, Clone)]
pub(crate) struct UpdateLayer {
    pub(crate) version: u64,
    pub(crate) dict: Dict,
}

impl<T: Settings> Loader<T> {
    /// A loader reading the process environment (`SOMA_*`), no files, not
    /// strict, no validation hooks.
    pub fn new() -> Self {
        Self {
            files: Vec::new(),
            env: EnvSource::Process,
            overrides: serde_json::Value::Object(Default::default()),
            override_error: None,
            strict: false,
            validators: Vec::new(),
            presets: BTreeMap::new(),
            preset_fn: None,
            renamed: Vec::new(),
            _settings: PhantomData,
        }
    }

    /// Adds a TOML file that must exist. Later files override earlier ones.
    pub fn file(mut self, path: impl AsRef<Path>) -> Self {
        self.files.push(FileSource {
            path: path.as_ref().to_owned(),
            required: true,
        });
        self
    }

    /// Adds a TOML file that is skipped when it does not exist.
    pub fn file_optional(mut self, path: impl AsRef<Path>) -> Self {
        self.files.push(FileSource {
            path: path.as_ref().to_owned(),
            required: false,
        });
        self
    }

    /// Reads the environment from `vars` instead of the process: the
    /// injectable source for tests and embedders. Non-UTF-8 names and values
    /// are handled exactly as for the process environment.
    pub fn env_from<I, K, V>(mut self, vars: I) -> Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<OsString>,
        V: Into<OsString>,
    {
        self.env = EnvSource::Fixed(
            vars.into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        );
        self
    }

    /// Reads no environment variables at all.
    pub fn without_env(mut self) -> Self {
        self.env = EnvSource::Disabled;
        self
    }

    /// Strict mode: a key that no setting has (a typo such as
    /// `redis.pool_sise`) is a [`ConfigError::UnknownKey`] naming the key
    /// and its source. Off by default: unknown keys are logged at `warn`.
    pub fn strict(mut self, strict: bool) -> Self {
        self.strict = strict;
        self
    }

    /// Sets `key` (dotted path) to `value`, above every other source.
    /// A value that cannot be serialized is reported by the next load.
    pub fn set(mut self, key: &str, value: impl Serialize) -> Self {
        match serde_json::to_value(value) {
            Ok(v) => {
                let segments: Vec<&str> = key.split('.').collect();
                let mut node = &mut self.overrides;
                for seg in &segments[..segments.len() - 1] {
                    if !node.get(*seg).is_some_and(serde_json::Value::is_object) {
                        node[*seg] = serde_json::Value::Object(Default::default());
                    }
                    node = &mut node[*seg];
                }
                node[segments[segments.len() - 1]] = v;
            }
            Err(e) => self.override_error = Some((key.to_owned(), e.to_string())),
        }
        self
    }

    /// Keeps a renamed setting loading under its old name `old` (dotted
    /// path) for a deprecation period: wherever a source (file, environment
    /// variable, remote update, override) sets `old`, the value is read as
    /// `new` and a warning naming both keys and the source is logged on
    /// every load. When any source sets `new`, `new` wins: every value of
    /// `old` is ignored (with a warning), whatever the sources' precedence.
    /// Strict mode does not reject `old`.
    ///
    /// ```
    /// # #[derive(serde::Deserialize, serde::Serialize, Default)]
    /// # #[serde(default)] struct Db { pool_size: u32 }
    /// # #[derive(serde::Deserialize, serde::Serialize, Default)]
    /// # #[serde(default)] struct S { db: Db }
    /// let s: S = soma_config::Loader::new()
    ///     .without_env()
    ///     .strict(true)
    ///     .deprecated_key("db.connections", "db.pool_size")
    ///     .set("db.connections", 7)
    ///     .load()?;
    /// assert_eq!(s.db.pool_size, 7);
    /// # Ok::<(), soma_config::ConfigError>(())
    /// ```
    pub fn deprecated_key(mut self, old: &str, new: &str) -> Self {
        let split = |k: &str| k.split('.').map(str::to_owned).collect::<Vec<_>>();
        self.renamed.push(RenamedKey {
            old: split(old),
            new: split(new),
        });
        self
    }

    /// Adds a validation hook, run after every successful parse on load,
    /// reload and update. Record failures with [`Checks::fail`] naming the
    /// key path; the loader adds the source of the offending value.
    pub fn validate<F>(mut self, hook: F) -> Self
    where
        F: Fn(&T, &mut Checks) + Send + Sync + 'static,
    {
        self.validators.push(Arc::new(hook));
        self
    }

    /// Sizes the settings per deployment profile with `preset`: the
    /// application's one function that mounts each crate's section preset
    /// where it mounts the section (see [`ProfilePreset::section`]). The
    /// active profile, chosen by the top-level key `profile`, selects
    /// whose preset applies.
    ///
    /// Every load builds the preset of every profile and checks each
    /// against the settings' defaults, so a preset that cannot be built,
    /// is for another profile, or names a key that is not a numeric
    /// setting fails the load with its [`ConfigError`] (typically
    /// [`ConfigError::ProfileViolation`]) — under `local` too, long before
    /// `prod` would have sized nothing.
    ///
    /// ```
    /// # use serde::{Deserialize, Serialize};
    /// use soma_config::{ConfigError, DeploymentProfile, Loader, ProfilePreset, SectionPreset};
    /// # #[derive(Serialize, Deserialize)] #[serde(default)]
    /// # struct Pool { max_connections: u32 }
    /// # impl Default for Pool { fn default() -> Self { Self { max_connections: 10 } } }
    /// # #[derive(Default, Serialize, Deserialize)] #[serde(default)]
    /// # struct Settings { profile: DeploymentProfile, db: Pool }
    /// fn preset(profile: DeploymentProfile) -> Result<ProfilePreset, ConfigError> {
    ///     let connections = match profile {
    ///         DeploymentProfile::Local => 5,
    ///         DeploymentProfile::Prod => 50,
    ///     };
    ///     ProfilePreset::new(profile)
    ///         .section("db", SectionPreset::new(profile, [("max_connections", connections)]))
    /// }
    ///
    /// let loader = Loader::<Settings>::new().without_env().presets(preset);
    /// assert_eq!(loader.load()?.db.max_connections, 5);
    /// assert_eq!(loader.set("profile", "prod").load()?.db.max_connections, 50);
    /// # Ok::<(), ConfigError>(())
    /// ```
    pub fn presets<F>(mut self, preset: F) -> Self
    where
        F: Fn(DeploymentProfile) -> Result<ProfilePreset, ConfigError> + Send + Sync + 'static,
    {
        self.preset_fn = Some(Arc::new(preset));
        self
    }

    /// Registers (or replaces) the preset for its profile; for that profile
    /// it takes the place of what [`presets`](Loader::presets) builds. It
    /// is checked on every load as `presets`' are.
    pub fn profile_preset(mut self, preset: ProfilePreset) -> Self {
        self.presets.insert(preset.profile(), preset);
        self
    }

    /// Loads once and returns the typed value.
    ///
    /// # Errors
    /// Any [`ConfigError`] from reading, parsing, strict mode or validation.
    pub fn load(&self) -> Result<T, ConfigError> {
        self.load_full(None).map(|l| l.value)
    }

    /// Loads and wraps the result in a [`Live`](crate::Live) registry.
    ///
    /// # Errors
    /// As [`load`](Loader::load).
    pub fn into_live(self) -> Result<crate::Live<T>, ConfigError> {
        crate::Live::new(self)
    }

    /// The files this loader reads, for the watcher.
    #[cfg_attr(not(feature = "watch"), allow(dead_code))]
    pub(crate) fn file_paths(&self) -> Vec<PathBuf> {
        self.files.iter().map(|f| f.path.clone()).collect()
    }

    /// defaults < profile preset < files < environment < live update <
    /// overrides < profile sections, merged, deserialized, checked.
    pub(crate) fn load_full(&self, update: Option<&UpdateLayer>) -> Result<Loaded<T>, ConfigError> {
        let defaults = serde_json::to_value(T::default()).map_err(|e| ConfigError::Parse {
            origin: Origin::Default,
            key: None,
            message: format!("the settings' defaults do not serialize: {e}"),
        })?;
        let mut layers = self.source_layers(&defaults, update)?;
        self.apply_renames(&mut layers);
        let profile = self.apply_profile(&defaults, &mut layers)?;
        let merged = layers.merged()?;
        let value = self.deserialize(&merged, &layers)?;
        self.run_validators(&value, &layers)?;

        let mut effective = defaults;
        document::merge_json(&mut effective, &document::dict_to_json(&merged));
        let checksum = document::checksum(&effective);
        let sources = effective
            .as_object()
            .map(|m| {
                m.keys()
                    .map(|k| (k.clone(), layers.origin_of(std::slice::from_ref(k))))
                    .collect()
            })
            .unwrap_or_default();
        Ok(Loaded {
            value,
            checksum,
            sources,
            profile,
        })
    }

    /// The layers of the sources, lowest first: files, the environment (only
    /// keys of the settings' sections), the live update, the overrides.
    fn source_layers(
        &self,
        defaults: &serde_json::Value,
        update: Option<&UpdateLayer>,
    ) -> Result<Layers, ConfigError> {
        let sections: BTreeSet<String> = defaults
            .as_object()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        let mut layers = Layers::default();
        for file in &self.files {
            if let Some(layer) = read_file(file)? {
                layers.0.push(layer);
            }
        }
        if let Some(pairs) = self.env.pairs() {
            let layer = env::env_layer(pairs, &sections)?;
            if !layer.dict.is_empty() {
                layers.0.push(layer);
            }
        }
        if let Some(update) = update {
            layers.0.push(Layer::new(
                Origin::Update {
                    version: update.version,
                },
                update.dict.clone(),
            ));
        }
        if let Some((key, message)) = &self.override_error {
            return Err(ConfigError::InvalidValue {
                origin: Origin::Override,
                key: key.clone(),
                message: message.clone(),
            });
        }
        let overrides = document::json_to_dict(&self.overrides, &Origin::Override)?;
        if !overrides.is_empty() {
            layers.0.push(Layer::new(Origin::Override, overrides));
        }
        Ok(layers)
    }

    /// Chooses the deployment profile (from the sources above the preset),
    /// puts its preset under every source and its profile sections over
    /// them.
    fn apply_profile(
        &self,
        defaults: &serde_json::Value,
        layers: &mut Layers,
    ) -> Result<DeploymentProfile, ConfigError> {
        let profile = self.select_profile(layers)?;
        if let Some(preset) = self.checked_presets(defaults)?.remove(&profile) {
            let doc = preset.to_document();
            let dict = document::json_to_dict(&doc, &Origin::Profile(profile))?;
            if !dict.is_empty() {
                layers
                    .0
                    .insert(0, Layer::new(Origin::Profile(profile), dict));
            }
        }
        if let Some(layer) = profile_layer(defaults, layers, profile)? {
            layers.0.push(layer);
        }
        Ok(profile)
    }

    /// The preset of every profile that has one, each built and checked
    /// against the settings' defaults.
    fn checked_presets(
        &self,
        defaults: &serde_json::Value,
    ) -> Result<BTreeMap<DeploymentProfile, ProfilePreset>, ConfigError> {
        let mut presets = BTreeMap::new();
        for profile in DeploymentProfile::ALL {
            let preset = match (self.presets.get(&profile), &self.preset_fn) {
                (Some(preset), _) => preset.clone(),
                (None, Some(build)) => build(profile)?,
                (None, None) => continue,
            };
            if preset.profile() != profile {
                return Err(ConfigError::ProfileViolation {
                    profile,
                    key: "profile".into(),
                    message: format!(
                        "the preset built for `{profile}` is for `{}`",
                        preset.profile()
                    ),
                });
            }
            preset.check_shape(defaults)?;
            presets.insert(profile, preset);
        }
        Ok(presets)
    }

    /// The settings from the merged layers; a key no field takes is an
    /// error when strict, a warning naming its source otherwise.
    fn deserialize(&self, merged: &Dict, layers: &Layers) -> Result<T, ConfigError> {
        let merged_value = Value::Dict(Tag::Default, merged.clone());
        let mut ignored: Vec<Vec<String>> = Vec::new();
        let mut on_ignored = |path: serde_ignored::Path<'_>| ignored.push(path_segments(&path));
        let de = serde_ignored::Deserializer::new(&merged_value, &mut on_ignored);
        let value = T::deserialize(de).map_err(|e| map_figment_error(e, layers))?;
        for path in &ignored {
            let origin = layers.origin_of(path);
            let key = path.join(".");
            if self.strict {
                return Err(ConfigError::UnknownKey { origin, key });
            }
            tracing::warn!(key = %key, source = %origin, "ignoring unknown config key");
        }
        Ok(value)
    }

    /// Runs the validators; every failure, with the source of its key.
    fn run_validators(&self, value: &T, layers: &Layers) -> Result<(), ConfigError> {
        let mut checks = Checks::default();
        for hook in &self.validators {
            hook(value, &mut checks);
        }
        if checks.failures.is_empty() {
            return Ok(());
        }
        let violations = checks
            .failures
            .into_iter()
            .map(|(key, message)| {
                let path: Vec<String> = key.split('.').map(str::to_owned).collect();
                Violation {
                    origin: layers.origin_of(&path),
                    key,
                    message,
                }
            })
            .collect();
        Err(ConfigError::Validation { violations })
    }

    /// Moves every deprecated key to its replacement, layer by layer (or
    /// drops it when some layer sets the replacement).
    fn apply_renames(&self, layers: &mut Layers) {
        for rename in &self.renamed {
            let (old, new) = (rename.old.join("."), rename.new.join("."));
            let new_set = layers.0.iter().any(|l| l.sets(&rename.new));
            for layer in &mut layers.0 {
                let Some((value, var)) = layer.take(&rename.old) else {
                    continue;
                };
                let source = match &var {
                    Some(var) => Origin::Env { var: var.clone() },
                    None => layer.origin.clone(),
                };
                if new_set {
                    tracing::warn!(
                        key = %old, replacement = %new, source = %source,
                        "ignoring deprecated config key: its replacement is set"
                    );
                } else {
                    tracing::warn!(
                        key = %old, replacement = %new, source = %source,
                        "deprecated config key: set its replacement instead"
                    );
                    layer.put(&rename.new, value, var);
                }
            }
        }
    }

    fn select_profile(&self, layers: &Layers) -> Result<DeploymentProfile, ConfigError> {
        let key = vec!["profile".to_owned()];
        for layer in layers.0.iter().rev() {
            if let Some(v) = layer.dict.get("profile") {
                let origin = layers.origin_of(&key);
                return match v.as_str().map(str::parse::<DeploymentProfile>) {
                    Some(Ok(p)) => Ok(p),
                    Some(Err(message)) => Err(ConfigError::InvalidValue {
                        origin,
                        key: "profile".into(),
                        message,
                    }),
                    None => Err(ConfigError::InvalidValue {
                        origin,
                        key: "profile".into(),
                        message: "expected `local` or `prod`".into(),
                    }),
                };
            }
        }
        Ok(DeploymentProfile::default())
    }
}

/// The key through which a section learns the deployment profile.
pub(crate) const SECTION_PROFILE_KEY: &str = "deployment_profile";

/// The selected profile for every section that declares
/// `deployment_profile`, as a layer above every source. A source that gives
/// such a section another profile is an error: a section must never run
/// with `local` durability while the deployment says `prod`.
fn profile_layer(
    defaults: &serde_json::Value,
    layers: &Layers,
    profile: DeploymentProfile,
) -> Result<Option<Layer>, ConfigError> {
    let Some(sections) = defaults.as_object() else {
        return Ok(None);
    };
    let mut doc = serde_json::Map::new();
    for (section, shape) in sections {
        if shape.get(SECTION_PROFILE_KEY).is_none() {
            continue;
        }
        let path = vec![section.clone(), SECTION_PROFILE_KEY.to_owned()];
        for layer in &layers.0 {
            let given = match layer.dict.get(section) {
                Some(Value::Dict(_, d)) => d.get(SECTION_PROFILE_KEY),
                _ => None,
            };
            if let Some(v) = given {
                if v.as_str() != Some(profile.as_str()) {
                    return Err(ConfigError::InvalidValue {
                        origin: Layers(vec![layer.clone()]).origin_of(&path),
                        key: path.join("."),
                        message: format!(
                            "follows the top-level `profile` (`{profile}`); set that instead of giving one section another profile"
                        ),
                    });
                }
            }
        }
        doc.insert(
            section.clone(),
            serde_json::json!({ SECTION_PROFILE_KEY: profile.as_str() }),
        );
    }
    if doc.is_empty() {
        return Ok(None);
    }
    let origin = Origin::Profile(profile);
    let dict = document::json_to_dict(&serde_json::Value::Object(doc), &origin)?;
    Ok(Some(Layer::new(origin, dict)))
}

fn read_file(file: &FileSource) -> Result<Option<Layer>, ConfigError> {
    let text = match std::fs::read_to_string(&file.path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !file.required => return Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
            return Err(ConfigError::Parse {
                origin: Origin::File(file.path.clone()),
                key: None,
                message: "the file is not valid UTF-8".into(),
            });
        }
        Err(source) => {
            return Err(ConfigError::Io {
                path: file.path.clone(),
                source,
            });
        }
    };
    let origin = Origin::File(file.path.clone());
    let mut data =
        figment::Provider::data(&Toml::string(&text)).map_err(|e| ConfigError::Parse {
            origin: origin.clone(),
            key: (!e.path.is_empty()).then(|| e.path.join(".")),
            message: e.kind.to_string(),
        })?;
    let dict = data.remove(&Profile::Default).unwrap_or_default();
    Ok(Some(Layer::new(origin, dict)))
}

fn path_segments(path: &serde_ignored::Path<'_>) -> Vec<String> {
    use serde_ignored::Path as P;
    match path {
        P::Root => Vec::new(),
        P::Seq { parent, index } => {
            let mut v = path_segments(parent);
            v.push(index.to_string());
            v
        }
        P::Map { parent, key } => {
            let mut v = path_segments(parent);
            v.push(key.clone());
            v
        }
        P::Some { parent } | P::NewtypeStruct { parent } | P::NewtypeVariant { parent } => {
            path_segments(parent)
        }
    }
}

fn map_figment_error(err: figment::Error, layers: &Layers) -> ConfigError {
    use figment::error::Kind;
    let mut path = err.path.clone();
    let origin = layers.origin_of(&path);
    match &err.kind {
        Kind::UnknownField(field, _) => {
            // `deny_unknown_fields` on the settings type: the path stops at
            // the struct; add the field.
            if path.last() != Some(field) {
                path.push(field.clone());
            }
            let origin = layers.origin_of(&path);
            ConfigError::UnknownKey {
                origin,
                key: path.join("."),
            }
        }
        Kind::MissingField(field) => {
            path.push(field.to_string());
            ConfigError::InvalidValue {
                origin,
                key: path.join("."),
                message: "missing (add `#[serde(default)]` to the settings struct or set the key)"
                    .into(),
            }
        }
        kind => ConfigError::InvalidValue {
            origin,
            key: if path.is_empty() {
                "<root>".into()
            } else {
                path.join(".")
            },
            message: kind.to_string(),
        },
    }
}
