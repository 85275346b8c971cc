//! [`Cache`]: typed JSON values with a TTL, single-flight loading and
//! optional negative caching.

use std::any::Any;
use std::collections::HashMap;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fred::interfaces::KeysInterface;
use prometheus_client::metrics::counter::Counter;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::keys::validate_part;
use crate::metrics::{CacheLabels, CacheLoadLabels};
use crate::{CommandIdempotency, RedisClient, RedisError, Ttl};

/// Stored in place of a value to remember "the source has nothing here".
/// JSON text never starts with a NUL byte, so it cannot collide with a value.
const ABSENT: &[u8] = b"\0";

/// Settings of one [`Cache`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheOptions {
    /// Lifetime of a cached value.
    pub ttl: Duration,
    /// When set, a loader answer of "not found" is remembered for this long,
    /// so a hot missing id does not hit the source on every request.
    pub negative_ttl: Option<Duration>,
}

impl CacheOptions {
    /// Values live `ttl`; no negative caching.
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            negative_ttl: None,
        }
    }

    /// Also remember "not found" for `ttl`.
    pub fn with_negative_ttl(mut self, ttl: Duration) -> Self {
        self.negative_ttl = Some(ttl);
        self
    }
}

/// The result of [`Cache::get`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup<T> {
    /// A cached value.
    Hit(T),
    /// A cached "not found" (negative caching).
    Absent,
    /// Nothing cached.
    Miss,
}

/// Why [`Cache::get_or_load`] failed. Redis failures are *not* among them:
/// the cache then degrades to calling the loader.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError<E> {
    /// The loader failed. Concurrent callers that waited on the same load
    /// share this error (hence the `Arc`).
    #[error("cache loader failed: {0}")]
    Loader(Arc<E>),
    /// The tenant or id was invalid.
    #[error(transparent)]
    Invalid(RedisError),
}

impl<E> LoadError<E> {
    /// The loader's error, if that is what failed.
    pub fn loader_error(&self) -> Option<&E> {
        match self {
            Self::Loader(e) => Some(e),
            Self::Invalid(_) => None,
        }
    }
}

type Slot<T, E> = tokio::sync::OnceCell<Result<Option<T>, Arc<E>>>;

/// One key's load in progress: the shared slot and how many callers hold it.
struct InFlight {
    slot: Arc<dyn Any + Send + Sync>,
    waiters: usize,
}

type InFlightMap = Arc<parking_lot::Mutex<HashMap<String, InFlight>>>;

/// A caller's hold on an [`InFlight`] slot. Dropped when the caller is done
/// *or cancelled*; the last one out removes the slot, so a load whose every
/// caller went away leaves nothing behind (and the next caller loads anew).
struct SlotGuard {
    map: InFlightMap,
    key: String,
    slot: Arc<dyn Any + Send + Sync>,
}

impl SlotGuard {
    /// Joins the load of `key` (or starts one), counted as one waiter.
    fn join<T, E>(map: &InFlightMap, key: &str) -> (Self, Arc<Slot<T, E>>)
    where
        T: Send + Sync + 'static,
        E: Send + Sync + 'static,
    {
        let mut m = map.lock();
        let entry = m.entry(key.to_owned()).or_insert_with(|| InFlight {
            slot: Arc::new(Slot::<T, E>::new()),
            waiters: 0,
        });
        let slot = match entry.slot.clone().downcast::<Slot<T, E>>() {
            Ok(slot) => slot,
            // Another loader error type for the same key: a load of its own.
            Err(_) => {
                *entry = InFlight {
                    slot: Arc::new(Slot::<T, E>::new()),
                    waiters: 0,
                };
                entry
                    .slot
                    .clone()
                    .downcast::<Slot<T, E>>()
                    .unwrap_or_else(|_| Arc::new(Slot::new()))
            }
        };
        entry.waiters += 1;
        let guard = Self {
            map: map.clone(),
            key: key.to_owned(),
            slot: entry.slot.clone(),
        };
        (guard, slot)
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        let mut m = self.map.lock();
        if let Some(entry) = m.get_mut(&self.key) {
            if Arc::ptr_eq(&entry.slot, &self.slot) {
                entry.waiters -= 1;
                if entry.waiters == 0 {
                    m.remove(&self.key);
                }
            }
        }
    }
}

struct CacheMetrics {
    hit: Counter,
    miss: Counter,
    absent: Counter,
    error: Counter,
    load_ok: Counter,
    load_err: Counter,
}

/// A typed cache of JSON values in Redis, namespaced per tenant.
///
/// Keys are `{prefix}soma:{tenant}:cache.{name}:{id}`, every one written
/// with the cache's TTL (there is no way to write a cache entry without one).
///
/// # Guarantees
///
/// * **Single flight per key per process**: concurrent
///   [`get_or_load`](Self::get_or_load) calls for the same tenant and id run
///   the loader once; the others wait for and share its result (value or
///   error). Across processes, each process may load once. Cancelled callers
///   release their hold: a load nobody waits for any more leaves no slot
///   behind, and a later caller runs the loader again.
/// * **Degrades, never fails, when Redis is down**: a Redis error during a
///   lookup counts as a miss (`result="error"` in
///   `soma_redis_cache_requests_total`) and the loader runs; a failed write-back
///   is logged and dropped. Callers see the loader's answer.
/// * **Staleness** is bounded by the TTL; [`invalidate`](Self::invalidate)
///   deletes an entry now (broadcast invalidations with
///   [`PubSub`](crate::PubSub) to drop in-process copies elsewhere).
///
/// ```no_run
/// # async fn demo(client: soma_redis::RedisClient) -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use soma_redis::{Cache, CacheOptions};
/// #[derive(Clone, serde::Serialize, serde::Deserialize)]
/// struct Profile { name: String }
///
/// let profiles: Cache<Profile> = Cache::new(&client, "profile",
///     CacheOptions::new(Duration::from_secs(300)).with_negative_ttl(Duration::from_secs(30)))?;
/// let p = profiles
///     .get_or_load("acme", "user-42", || async {
///         Ok::<_, std::io::Error>(Some(Profile { name: "Ada".into() })) // the database query
///     })
///     .await?;
/// # Ok(()) }
/// ```
pub struct Cache<T> {
    client: RedisClient,
    name: String,
    kind: String,
    options: CacheOptions,
    inflight: InFlightMap,
    metrics: Arc<CacheMetrics>,
    _t: PhantomData<fn() -> T>,
}

impl<T> Clone for Cache<T> {
    fn clone(&self) -> Self {
        Self {
            client: self.client.clone(),
            name: self.name.clone(),
            kind: self.kind.clone(),
            options: self.options,
            inflight: self.inflight.clone(),
            metrics: self.metrics.clone(),
            _t: PhantomData,
        }
    }
}

impl<T> std::fmt::Debug for Cache<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("name", &self.name)
            .field("options", &self.options)
            .finish()
    }
}

impl<T> Cache<T>
where
    T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
{
    /// A cache named `name` (a metric label and part of the key; same rules as
    /// a tenant: no `:`, spaces or braces).
    pub fn new(
        client: &RedisClient,
        name: &str,
        options: CacheOptions,
    ) -> Result<Self, RedisError> {
        validate_part("cache name", name)?;
        Ttl::After(options.ttl).as_millis()?;
        if let Some(n) = options.negative_ttl {
            Ttl::After(n).as_millis()?;
        }
        let m = &client.inner.metrics;
        let req = |result| {
            m.cache_requests
                .get_or_create(&CacheLabels {
                    cache: name.to_owned(),
                    result,
                })
                .clone()
        };
        let load = |outcome| {
            m.cache_loads
                .get_or_create(&CacheLoadLabels {
                    cache: name.to_owned(),
                    outcome,
                })
                .clone()
        };
        let metrics = CacheMetrics {
            hit: req("hit"),
            miss: req("miss"),
            absent: req("negative_hit"),
            error: req("error"),
            load_ok: load("ok"),
            load_err: load("error"),
        };
        Ok(Self {
            client: client.clone(),
            name: name.to_owned(),
            kind: format!("cache.{name}"),
            options,
            inflight: Arc::default(),
            metrics: Arc::new(metrics),
            _t: PhantomData,
        })
    }

    /// Keys of this cache (and its clones) with a load in progress in this
    /// process: `0` when no [`get_or_load`](Self::get_or_load) is running,
    /// including after every caller of a load was cancelled.
    pub fn loads_in_flight(&self) -> usize {
        self.inflight.lock().len()
    }

    /// The Redis key of `tenant`'s entry `id`.
    pub fn key(&self, tenant: &str, id: &str) -> Result<String, RedisError> {
        self.client.keys().key(tenant, &self.kind, id)
    }

    /// Looks `id` up. Errors are Redis errors (connection, timeout) or a
    /// stored value that no longer decodes as `T`.
    pub async fn get(&self, tenant: &str, id: &str) -> Result<Lookup<T>, RedisError> {
        let key = self.key(tenant, id)?;
        let r = self.get_key(&key).await;
        self.count(&r);
        r
    }

    /// Counts one lookup by its outcome.
    fn count(&self, r: &Result<Lookup<T>, RedisError>) {
        let counter = match r {
            Ok(Lookup::Hit(_)) => &self.metrics.hit,
            Ok(Lookup::Absent) => &self.metrics.absent,
            Ok(Lookup::Miss) => &self.metrics.miss,
            Err(_) => &self.metrics.error,
        };
        counter.inc();
    }

    /// What a stored value (or its absence) means.
    fn decode(raw: Option<&[u8]>) -> Result<Lookup<T>, RedisError> {
        match raw {
            None => Ok(Lookup::Miss),
            Some(ABSENT) => Ok(Lookup::Absent),
            Some(b) => Ok(Lookup::Hit(serde_json::from_slice(b)?)),
        }
    }

    async fn get_key(&self, key: &str) -> Result<Lookup<T>, RedisError> {
        let raw: Option<Bytes> = self
            .client
            .run("get", CommandIdempotency::Idempotent, |c| async move {
                c.get::<Option<Bytes>, _>(key).await
            })
            .await?;
        Self::decode(raw.as_deref())
    }

    /// Stores `value` with the cache's TTL.
    pub async fn set(&self, tenant: &str, id: &str, value: &T) -> Result<(), RedisError> {
        self.set_with_ttl(tenant, id, value, self.options.ttl).await
    }

    /// Stores `value` with a specific TTL.
    pub async fn set_with_ttl(
        &self,
        tenant: &str,
        id: &str,
        value: &T,
        ttl: Duration,
    ) -> Result<(), RedisError> {
        let key = self.key(tenant, id)?;
        let json = serde_json::to_vec(value).map_err(|e| RedisError::Encode(e.to_string()))?;
        self.client
            .set(&key, Bytes::from(json), Ttl::After(ttl))
            .await
    }

    /// Warms the cache: stores every `(id, value)` of `tenant` with the
    /// cache's TTL in one [`Bulk`](crate::Bulk) batch on the bulk path
    /// (several times the throughput of one [`set`](Self::set) per entry).
    ///
    /// Returns the number of entries written. Fails on an invalid id or a
    /// value that does not encode (before anything is sent), on a batch
    /// error (connection, timeout), or with the first per-entry server
    /// error; in the last two cases some entries may have been written.
    pub async fn set_many<'a, I>(&self, tenant: &str, entries: I) -> Result<usize, RedisError>
    where
        I: IntoIterator<Item = (&'a str, &'a T)>,
        T: 'a,
    {
        let ttl = Ttl::After(self.options.ttl);
        let mut bulk = crate::Bulk::new();
        let mut json = Vec::new();
        for (id, value) in entries {
            json.clear();
            serde_json::to_writer(&mut json, value)
                .map_err(|e| RedisError::Encode(e.to_string()))?;
            bulk.set(&self.key(tenant, id)?, &json, ttl)?;
        }
        let replies = self.client.run_bulk(&bulk).await?;
        let written = replies.len();
        replies
            .into_iter()
            .find_map(Result::err)
            .map_or(Ok(written), Err)
    }

    /// Looks many ids of `tenant` up in one [`Bulk`](crate::Bulk) batch;
    /// one result per id, in order. The outer error fails the whole lookup
    /// (connection, timeout, an invalid id); an entry's own error is a
    /// server error or a stored value that no longer decodes as `T`. Each
    /// entry counts in `soma_redis_cache_requests_total` like a
    /// [`get`](Self::get).
    pub async fn get_many(
        &self,
        tenant: &str,
        ids: &[&str],
    ) -> Result<Vec<Result<Lookup<T>, RedisError>>, RedisError> {
        let mut bulk = crate::Bulk::with_capacity(ids.len());
        for id in ids {
            bulk.get(&self.key(tenant, id)?);
        }
        let replies = match self.client.run_bulk(&bulk).await {
            Ok(r) => r,
            Err(e) => {
                self.metrics.error.inc_by(ids.len() as u64);
                return Err(e);
            }
        };
        Ok(replies
            .into_iter()
            .map(|reply| {
                let r = match reply {
                    Ok(fred::types::Value::Null) => Self::decode(None),
                    Ok(fred::types::Value::Bytes(b)) => Self::decode(Some(&b)),
                    Ok(other) => Err(RedisError::Decode(format!(
                        "unexpected reply to GET: {:?}",
                        other.kind()
                    ))),
                    Err(e) => Err(e),
                };
                self.count(&r);
                r
            })
            .collect())
    }

    /// Remembers "not found" for `negative_ttl` (an error when the cache has
    /// no negative TTL).
    pub async fn set_absent(&self, tenant: &str, id: &str) -> Result<(), RedisError> {
        let ttl = self.options.negative_ttl.ok_or_else(|| {
            RedisError::invalid(format!("cache {} has no negative_ttl", self.name))
        })?;
        let key = self.key(tenant, id)?;
        self.client
            .set(&key, Bytes::from_static(ABSENT), Ttl::After(ttl))
            .await
    }

    /// Deletes the entry (value or negative). `true` when one existed.
    pub async fn invalidate(&self, tenant: &str, id: &str) -> Result<bool, RedisError> {
        let key = self.key(tenant, id)?;
        Ok(self.client.del(&[&key]).await? > 0)
    }

    /// Returns the cached value, or runs `loader` once (per key, per process,
    /// however many callers ask concurrently), caches its answer and returns
    /// it. `Ok(None)` from the loader means "not found" and is cached when a
    /// negative TTL is configured. See the type docs for the failure behaviour.
    ///
    /// **Cancellation.** Dropping this future (a timeout, a client that went
    /// away) is safe: if it was running the loader, the next waiting caller
    /// runs its own; when every caller of a key is gone the key's slot is
    /// released, and the next caller loads anew
    /// ([`loads_in_flight`](Self::loads_in_flight) counts the slots held).
    pub async fn get_or_load<F, Fut, E>(
        &self,
        tenant: &str,
        id: &str,
        loader: F,
    ) -> Result<Option<T>, LoadError<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<T>, E>>,
        E: Send + Sync + 'static,
    {
        let key = self.key(tenant, id).map_err(LoadError::Invalid)?;
        match self.get_key(&key).await {
            Ok(Lookup::Hit(v)) => {
                self.metrics.hit.inc();
                return Ok(Some(v));
            }
            Ok(Lookup::Absent) => {
                self.metrics.absent.inc();
                return Ok(None);
            }
            Ok(Lookup::Miss) => {
                self.metrics.miss.inc();
            }
            Err(e) => {
                self.metrics.error.inc();
                tracing::debug!(cache = %self.name, error = %e, "cache lookup failed, loading from source");
            }
        }

        // Held until this caller returns or is cancelled (dropped): the last
        // holder releases the slot.
        let (_guard, slot) = SlotGuard::join::<T, E>(&self.inflight, &key);
        let out = slot
            .get_or_init(|| async {
                let r = loader().await;
                match &r {
                    Ok(v) => {
                        self.metrics.load_ok.inc();
                        self.store(&key, v.as_ref()).await;
                    }
                    Err(_) => {
                        self.metrics.load_err.inc();
                    }
                }
                r.map_err(Arc::new)
            })
            .await
            .clone();
        out.map_err(LoadError::Loader)
    }

    /// Writes a loaded answer back; failures are logged, not returned.
    async fn store(&self, key: &str, value: Option<&T>) {
        let (payload, ttl) = match value {
            Some(v) => match serde_json::to_vec(v) {
                Ok(json) => (Bytes::from(json), self.options.ttl),
                Err(e) => {
                    tracing::warn!(cache = %self.name, error = %e, "cannot encode loaded value; not cached");
                    return;
                }
            },
            None => match self.options.negative_ttl {
                Some(n) => (Bytes::from_static(ABSENT), n),
                None => return,
            },
        };
        if let Err(e) = self.client.set(key, payload, Ttl::After(ttl)).await {
            tracing::debug!(cache = %self.name, error = %e, "cache write-back failed");
        }
    }
}
