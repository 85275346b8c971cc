//! [`Live`]: the current config, read lock-free, versioned, reloadable.

use std::collections::BTreeMap;
use std::ops::Deref;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use arc_swap::{ArcSwap, Cache, Guard};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::document;
use crate::error::{ConfigError, Origin};
use crate::loader::{Loaded, Loader, Settings, UpdateLayer};
use crate::profile::DeploymentProfile;

/// One version of the config: the typed value plus its version, checksum
/// and provenance. Dereferences to `T`.
#[derive(Debug)]
pub struct Versioned<T> {
    value: T,
    version: u64,
    checksum: String,
    sources: BTreeMap<String, Origin>,
    update_version: Option<u64>,
    profile: DeploymentProfile,
    loaded_at: SystemTime,
}

impl<T> Versioned<T> {
    /// The typed settings.
    pub fn value(&self) -> &T {
        &self.value
    }

    /// Local version: 1 for the first load, +1 on every change. Never goes
    /// down, never repeats.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// SHA-256 (hex) over the canonical JSON of the effective document
    /// (defaults merged with every source). Replicas with the same inputs
    /// report the same checksum.
    pub fn checksum(&self) -> &str {
        &self.checksum
    }

    /// The last applied remote update's version, if any.
    pub fn update_version(&self) -> Option<u64> {
        self.update_version
    }

    /// The active deployment profile.
    pub fn profile(&self) -> DeploymentProfile {
        self.profile
    }

    /// Which source each top-level key's effective value came from (the
    /// highest-precedence layer that set anything under it).
    pub fn sources(&self) -> &BTreeMap<String, Origin> {
        &self.sources
    }

    /// When this version was built.
    pub fn loaded_at(&self) -> SystemTime {
        self.loaded_at
    }
}

impl<T> Deref for Versioned<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.value
    }
}

/// A remote config document, as a `config_updates` topic or an etcd watch
/// would carry it.
///
/// `checksum` is [`checksum`](crate::checksum) of `document`: SHA-256 over
/// its canonical JSON (keys sorted, no whitespace), lowercase hex.
/// `document` is a full table of settings; it replaces the previously
/// applied update as one layer, above files and environment and below
/// programmatic overrides.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigUpdate {
    /// Strictly increasing per publisher.
    pub version: u64,
    /// SHA-256 hex over the canonical JSON of `document`.
    pub checksum: String,
    /// The settings document.
    pub document: serde_json::Value,
}

impl ConfigUpdate {
    /// Builds an update, computing its checksum (publisher side).
    pub fn new(version: u64, document: serde_json::Value) -> Self {
        let checksum = document::checksum(&document);
        Self {
            version,
            checksum,
            document,
        }
    }

    /// Does the checksum match the document?
    pub fn verify(&self) -> Result<(), ConfigError> {
        let computed = document::checksum(&self.document);
        if computed.eq_ignore_ascii_case(&self.checksum) {
            Ok(())
        } else {
            Err(ConfigError::ChecksumMismatch {
                version: self.version,
                declared: self.checksum.clone(),
                computed,
            })
        }
    }
}

/// What a successful [`Live::reload`] or [`Live::apply`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// A new version was published to readers and subscribers.
    Updated {
        /// The new local version.
        version: u64,
    },
    /// The effective config is byte-for-byte the same; nothing was
    /// published and the version did not move.
    Unchanged,
    /// This exact update (same version and checksum) was already applied:
    /// a redelivery, ignored.
    AlreadyApplied,
}

struct WriteState {
    update: Option<(UpdateLayer, String)>,
}

struct Inner<T> {
    current: Arc<ArcSwap<Versioned<T>>>,
    tx: watch::Sender<Arc<Versioned<T>>>,
    loader: Loader<T>,
    write: Mutex<WriteState>,
}

/// The live config registry.
///
/// Readers call [`load`](Live::load) (lock-free, a few nanoseconds) or
/// [`subscribe`](Live::subscribe). Writers — [`reload`](Live::reload),
/// [`apply`](Live::apply) and the optional file watcher — are serialized,
/// and each either publishes a complete, validated new version or changes
/// nothing: on any error the last good value keeps being served.
/// Cloning is cheap and shares the registry.
pub struct Live<T> {
    inner: Arc<Inner<T>>,
}

impl<T> Clone for Live<T> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<T> std::fmt::Debug for Live<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let cur = self.inner.current.load();
        f.debug_struct("Live")
            .field("version", &cur.version)
            .field("checksum", &cur.checksum)
            .finish_non_exhaustive()
    }
}

impl<T: Settings> Live<T> {
    /// Loads once with `loader`; the result is version 1.
    ///
    /// # Errors
    /// Any load error: there is no last good value yet.
    pub fn new(loader: Loader<T>) -> Result<Self, ConfigError> {
        let loaded = loader.load_full(None)?;
        let first = Arc::new(versioned(loaded, 1, None));
        let (tx, _) = watch::channel(first.clone());
        Ok(Self {
            inner: Arc::new(Inner {
                current: Arc::new(ArcSwap::new(first)),
                tx,
                loader,
                write: Mutex::new(WriteState { update: None }),
            }),
        })
    }

    /// The current version, lock-free. Hold the guard briefly (it pins this
    /// version); use [`get`](Live::get) to keep it.
    #[inline]
    pub fn load(&self) -> Guard<Arc<Versioned<T>>> {
        self.inner.current.load()
    }

    /// A per-thread (or per-task) reader handle for hot paths: its
    /// [`load`](Reader::load) is one relaxed pointer comparison when nothing
    /// changed. See [`Reader`].
    pub fn reader(&self) -> Reader<T> {
        Reader {
            cache: Cache::new(self.inner.current.clone()),
        }
    }

    /// The current version as an owned `Arc`.
    pub fn get(&self) -> Arc<Versioned<T>> {
        self.inner.current.load_full()
    }

    /// A receiver that sees every published version (the latest one
    /// immediately, then each change; a slow receiver skips to the newest).
    pub fn subscribe(&self) -> watch::Receiver<Arc<Versioned<T>>> {
        self.inner.tx.subscribe()
    }

    /// Re-reads files and environment (keeping the applied update and the
    /// overrides), validates, and publishes if anything changed.
    ///
    /// # Errors
    /// Any load error, naming source and key; the current value stays.
    pub fn reload(&self) -> Result<Change, ConfigError> {
        let state = self.lock();
        let update = state.update.as_ref().map(|(u, _)| u);
        match self.inner.loader.load_full(update) {
            Ok(loaded) => Ok(self.publish(loaded, update.map(|u| u.version))),
            Err(err) => {
                let cur = self.inner.current.load();
                tracing::warn!(error = %err, version = cur.version, "config reload rejected; keeping last good config");
                Err(err)
            }
        }
    }

    /// Applies a remote update: verifies its checksum, rejects a version
    /// that is not above the last applied one (an exact redelivery is
    /// [`Change::AlreadyApplied`]), then loads with the update as a layer,
    /// runs strict mode and validation, and publishes.
    ///
    /// # Errors
    /// [`ConfigError::ChecksumMismatch`], [`ConfigError::VersionRegression`],
    /// or any parse, unknown-key or validation error naming
    /// `update version N`. The current value stays.
    pub fn apply(&self, update: &ConfigUpdate) -> Result<Change, ConfigError> {
        let result = self.apply_inner(update);
        if let Err(err) = &result {
            tracing::warn!(error = %err, update_version = update.version, "config update rejected; keeping last good config");
        }
        result
    }

    fn apply_inner(&self, update: &ConfigUpdate) -> Result<Change, ConfigError> {
        update.verify()?;
        let mut state = self.lock();
        if let Some((applied, checksum)) = &state.update {
            if update.version == applied.version && update.checksum.eq_ignore_ascii_case(checksum) {
                return Ok(Change::AlreadyApplied);
            }
            if update.version <= applied.version {
                return Err(ConfigError::VersionRegression {
                    version: update.version,
                    current: applied.version,
                });
            }
        }
        let origin = Origin::Update {
            version: update.version,
        };
        let layer = UpdateLayer {
            version: update.version,
            dict: document::json_to_dict(&update.document, &origin)?,
        };
        let loaded = self.inner.loader.load_full(Some(&layer))?;
        state.update = Some((layer, update.checksum.to_ascii_lowercase()));
        Ok(self.publish(loaded, Some(update.version)))
    }

    /// The effective config as JSON, secrets redacted, with provenance:
    ///
    /// ```json
    /// { "version": 3, "checksum": "…", "profile": "local", "update_version": null,
    ///   "config": { … },
    ///   "sources": { "redis": { "kind": "env", "detail": "SOMA_REDIS__URL" }, … } }
    /// ```
    ///
    /// [`Secret`](crate::Secret) values serialize as `[REDACTED]`; values
    /// under keys that look secret (`password`, `token`, `api_key`, …) are
    /// redacted too, in case a settings type used a plain `String`.
    pub fn snapshot(&self) -> serde_json::Value {
        let cur = self.get();
        let mut config = serde_json::to_value(&cur.value).unwrap_or(serde_json::Value::Null);
        document::redact(&mut config);
        let sources: serde_json::Map<String, serde_json::Value> = cur
            .sources
            .iter()
            .map(|(k, o)| {
                (
                    k.clone(),
                    serde_json::json!({ "kind": o.kind(), "detail": o.detail() }),
                )
            })
            .collect();
        serde_json::json!({
            "version": cur.version,
            "checksum": cur.checksum,
            "profile": cur.profile.as_str(),
            "update_version": cur.update_version,
            "config": config,
            "sources": sources,
        })
    }

    /// The loader this registry reloads with.
    pub fn loader(&self) -> &Loader<T> {
        &self.inner.loader
    }

    fn lock(&self) -> MutexGuard<'_, WriteState> {
        // A panic inside a validation hook poisons the lock; the state it
        // guards is still consistent (it is only replaced on success).
        self.inner.write.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish(&self, loaded: Loaded<T>, update_version: Option<u64>) -> Change {
        let cur = self.inner.current.load();
        if loaded.checksum == cur.checksum && update_version == cur.update_version {
            return Change::Unchanged;
        }
        let version = cur.version + 1;
        drop(cur);
        let next = Arc::new(versioned(loaded, version, update_version));
        self.inner.current.store(next.clone());
        self.inner.tx.send_replace(next);
        tracing::info!(version, "config updated");
        Change::Updated { version }
    }
}

/// A caching reader of a [`Live`] config, for hot paths.
///
/// Each reader keeps an `Arc` of the version it last saw; [`load`](Reader::load)
/// checks (one relaxed atomic load, no reference counting, no lock) whether a
/// newer version was published and only then fetches it. Keep one per
/// thread or per task (`load` takes `&mut self`); a reader pins the last
/// version it saw until its next `load`, so an idle reader holds one old
/// config in memory at most.
pub struct Reader<T> {
    cache: Cache<Arc<ArcSwap<Versioned<T>>>, Arc<Versioned<T>>>,
}

impl<T> Clone for Reader<T> {
    fn clone(&self) -> Self {
        Self {
            cache: self.cache.clone(),
        }
    }
}

impl<T> std::fmt::Debug for Reader<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader").finish_non_exhaustive()
    }
}

impl<T> Reader<T> {
    /// The current version.
    #[inline]
    pub fn load(&mut self) -> &Arc<Versioned<T>> {
        self.cache.load()
    }
}

fn versioned<T>(loaded: Loaded<T>, version: u64, update_version: Option<u64>) -> Versioned<T> {
    Versioned {
        value: loaded.value,
        version,
        checksum: loaded.checksum,
        sources: loaded.sources,
        update_version,
        profile: loaded.profile,
        loaded_at: SystemTime::now(),
    }
}
