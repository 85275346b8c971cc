//! [`Live`]: the current config, read lock-free, versioned, reloadable.

use std::collections::BTreeMap;
use std::ops::Deref;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use arc_swap::{ArcSwap, Cache, Guard};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::deployment::DeploymentProfile;
use crate::document;
use crate::error::{ConfigError, Origin, SignatureProblem};
use crate::loader::{Loaded, Loader, Settings, UpdateLayer};
use crate::secret::Secret;

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
///
/// **Authenticity.** A checksum only detects corruption: anyone who can
/// publish to the updates topic can compute one. `signature` is
/// HMAC-SHA256, keyed with a secret shared by publisher and replicas, over
/// `soma-config-update/v1\n<version>\n<checksum>` (lowercase hex; the
/// checksum binds the document). A [`Live`] that
/// [requires signed updates](Live::require_signed_updates) rejects unsigned
/// and badly signed ones before looking at their version, so a forged
/// `version = u64::MAX` cannot freeze it.
///
/// ```
/// use soma_config::{ConfigUpdate, Secret};
/// let key = Secret::new("0123456789abcdef0123456789abcdef");
/// let u = ConfigUpdate::new(7, serde_json::json!({"redis": {"pool_size": 8}})).sign(&key);
/// u.verify_signature(&key).unwrap();
/// let forged = ConfigUpdate { version: u64::MAX, ..u.clone() };
/// assert!(forged.verify_signature(&key).unwrap_err().is_update_signature());
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigUpdate {
    /// Strictly increasing per publisher.
    pub version: u64,
    /// SHA-256 hex over the canonical JSON of `document`.
    pub checksum: String,
    /// The settings document.
    pub document: serde_json::Value,
    /// Hex HMAC-SHA256 over version and checksum (see the type docs);
    /// `None` for an unsigned update.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

type HmacSha256 = Hmac<sha2::Sha256>;

/// The shortest accepted update signing key, in bytes.
pub const MIN_UPDATE_KEY_BYTES: usize = 32;

impl ConfigUpdate {
    /// Builds an update, computing its checksum (publisher side).
    pub fn new(version: u64, document: serde_json::Value) -> Self {
        let checksum = document::checksum(&document);
        Self {
            version,
            checksum,
            document,
            signature: None,
        }
    }

    /// The same update signed with `key` (publisher side).
    pub fn sign(mut self, key: &Secret) -> Self {
        let mac = self.mac(key).finalize().into_bytes();
        self.signature = Some(hex::encode(mac));
        self
    }

    fn mac(&self, key: &Secret) -> HmacSha256 {
        // HMAC takes keys of any length; `new_from_slice` cannot fail.
        let mut mac = HmacSha256::new_from_slice(key.expose_secret().as_bytes())
            .unwrap_or_else(|_| unreachable_hmac());
        mac.update(b"soma-config-update/v1\n");
        mac.update(self.version.to_string().as_bytes());
        mac.update(b"\n");
        mac.update(self.checksum.to_ascii_lowercase().as_bytes());
        mac
    }

    /// Checks the checksum, then that `signature` is `key`'s HMAC over this
    /// version and checksum (in constant time).
    ///
    /// # Errors
    /// [`ConfigError::ChecksumMismatch`], or [`ConfigError::UpdateSignature`]
    /// saying whether the signature is missing, malformed or wrong.
    pub fn verify_signature(&self, key: &Secret) -> Result<(), ConfigError> {
        self.verify()?;
        let bad = |problem| ConfigError::UpdateSignature {
            version: self.version,
            problem,
        };
        let sig = self
            .signature
            .as_deref()
            .ok_or(bad(SignatureProblem::Missing))?;
        let sig = hex::decode(sig).map_err(|_| bad(SignatureProblem::Malformed))?;
        if sig.len() != 32 {
            return Err(bad(SignatureProblem::Malformed));
        }
        self.mac(key)
            .verify_slice(&sig)
            .map_err(|_| bad(SignatureProblem::Mismatch))
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

fn unreachable_hmac() -> HmacSha256 {
    unreachable!("HMAC accepts keys of every length")
}

/// Counts of remote updates offered to [`Live::apply`], by outcome.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct UpdateStats {
    /// Applied (published a new version, or changed nothing effective).
    pub applied: u64,
    /// Exact redeliveries of the applied update, ignored.
    pub redelivered: u64,
    /// Rejected: not signed while signatures are required.
    pub rejected_unsigned: u64,
    /// Rejected: signature malformed or not matching.
    pub rejected_bad_signature: u64,
    /// Rejected for anything else (checksum, version regression,
    /// validation).
    pub rejected_other: u64,
}

#[derive(Default)]
struct UpdateCounters {
    applied: AtomicU64,
    redelivered: AtomicU64,
    unsigned: AtomicU64,
    bad_signature: AtomicU64,
    other: AtomicU64,
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
    /// When set, remote updates must be signed with this key.
    update_key: Option<Secret>,
}

struct Inner<T> {
    current: Arc<ArcSwap<Versioned<T>>>,
    tx: watch::Sender<Arc<Versioned<T>>>,
    loader: Loader<T>,
    write: Mutex<WriteState>,
    counters: UpdateCounters,
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
                write: Mutex::new(WriteState {
                    update: None,
                    update_key: None,
                }),
                counters: UpdateCounters::default(),
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

    /// A receiver of one part of the settings: `f` of the current version
    /// at once, then a change only when a published version gives a
    /// *different* `f` — so a component that takes its own section (say,
    /// the embedded policy engine's inputs) is not woken by a change to
    /// another (a rate limit). Slow receivers skip to the newest value.
    ///
    /// Spawns one task on the current tokio runtime (it panics outside
    /// one), which ends when every receiver of the section is dropped.
    ///
    /// ```
    /// # #[derive(Default, serde::Serialize, serde::Deserialize)]
    /// # #[serde(default)]
    /// # struct App { redis: Redis, limit: u32 }
    /// # #[derive(Clone, PartialEq, Default, serde::Serialize, serde::Deserialize)]
    /// # #[serde(default)]
    /// # struct Redis { pool_size: u32 }
    /// # #[tokio::main] async fn main() {
    /// let live = soma_config::Loader::<App>::new().into_live().unwrap();
    /// let mut redis = live.map(|s| s.redis.clone());
    /// live.apply(&soma_config::ConfigUpdate::new(1, serde_json::json!({"limit": 7}))).unwrap();
    /// tokio::task::yield_now().await;
    /// assert!(!redis.has_changed().unwrap(), "another section changed");
    /// # }
    /// ```
    pub fn map<S, F>(&self, f: F) -> watch::Receiver<S>
    where
        S: PartialEq + Send + Sync + 'static,
        F: Fn(&T) -> S + Send + Sync + 'static,
    {
        let mut whole = self.subscribe();
        let (tx, rx) = watch::channel(f(&whole.borrow_and_update()));
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    changed = whole.changed() => {
                        if changed.is_err() {
                            return;
                        }
                    }
                    () = tx.closed() => return,
                }
                let mut next = Some(f(&whole.borrow_and_update()));
                tx.send_if_modified(|current| match next.take() {
                    Some(n) if n != *current => {
                        *current = n;
                        true
                    }
                    _ => false,
                });
            }
        });
        rx
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
    ///
    /// After [`require_signed_updates`](Self::require_signed_updates), an
    /// unsigned or badly signed update is rejected first
    /// ([`ConfigError::UpdateSignature`]), whatever its version. Every
    /// outcome is counted ([`update_stats`](Self::update_stats)).
    pub fn apply(&self, update: &ConfigUpdate) -> Result<Change, ConfigError> {
        let result = self.apply_inner(update);
        let c = &self.inner.counters;
        let counter = match &result {
            Ok(Change::AlreadyApplied) => &c.redelivered,
            Ok(_) => &c.applied,
            Err(ConfigError::UpdateSignature { problem, .. }) if problem.is_missing() => {
                &c.unsigned
            }
            Err(ConfigError::UpdateSignature { .. }) => &c.bad_signature,
            Err(_) => &c.other,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if let Err(err) = &result {
            tracing::warn!(error = %err, update_version = update.version, "config update rejected; keeping last good config");
        }
        result
    }

    /// From now on, [`apply`](Self::apply) accepts only updates signed with
    /// `key` (see [`ConfigUpdate`]). Take the key from your settings (a
    /// [`Secret`]); publishers sign with [`ConfigUpdate::sign`]. Calling it
    /// again replaces the key (rotation).
    ///
    /// # Errors
    /// [`ConfigError::InvalidValue`] (key `update_signing_key`) when the key
    /// is shorter than [`MIN_UPDATE_KEY_BYTES`]; the previous setting stays.
    pub fn require_signed_updates(&self, key: Secret) -> Result<(), ConfigError> {
        if key.expose_secret().len() < MIN_UPDATE_KEY_BYTES {
            return Err(ConfigError::InvalidValue {
                origin: Origin::Override,
                key: "update_signing_key".into(),
                message: format!(
                    "an update signing key needs at least {MIN_UPDATE_KEY_BYTES} bytes"
                ),
            });
        }
        self.lock().update_key = Some(key);
        Ok(())
    }

    /// Remote updates offered to [`apply`](Self::apply) so far, by outcome.
    pub fn update_stats(&self) -> UpdateStats {
        let c = &self.inner.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        UpdateStats {
            applied: get(&c.applied),
            redelivered: get(&c.redelivered),
            rejected_unsigned: get(&c.unsigned),
            rejected_bad_signature: get(&c.bad_signature),
            rejected_other: get(&c.other),
        }
    }

    fn apply_inner(&self, update: &ConfigUpdate) -> Result<Change, ConfigError> {
        let mut state = self.lock();
        match &state.update_key {
            Some(key) => update.verify_signature(key)?,
            None => update.verify()?,
        }
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
    /// redacted too, in case a settings type used a plain `String`; and
    /// every other string that is a URL loses its credentials (user
    /// information and secret-looking query parameters, see
    /// [`redact_url`](crate::redact_url)), so `postgres.url` or `redis.url`
    /// with a password shows `postgres://***@host/db`. What the snapshot
    /// shows is safe to serve to an operator; `checksum` is that of the
    /// unredacted config (it changes when a secret is rotated).
    pub fn snapshot(&self) -> serde_json::Value {
        let cur = self.get();
        let mut config = serde_json::to_value(&cur.value).unwrap_or(serde_json::Value::Null);
        crate::redact::redact(&mut config);
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
