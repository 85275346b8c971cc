//! [`Idempotency`]: claim a request key, store the first response, replay it
//! to retries; [`IdempotencyLayer`] does it for HTTP routes.

mod layer;

pub use layer::{
    IDEMPOTENCY_KEY_HEADER, IDEMPOTENT_REPLAYED_HEADER, IdempotencyFuture, IdempotencyKey,
    IdempotencyLayer, IdempotencyScope, IdempotencyService, InvalidIdempotencyKey, idempotency_key,
};

use std::sync::LazyLock;
use std::time::Duration;

use fred::types::Value;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::{CommandIdempotency, RedisClient, RedisError, Script, Ttl};

/// `SET NX PX` the in-progress marker; on conflict return the current value
/// and its remaining TTL. Re-running it with our own marker re-acquires (so a
/// retry after a lost reply is safe).
static CLAIM: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "idempotency_claim",
        r#"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return {1, '', 0} end
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[1] then return {1, '', 0} end
return {0, cur or '', redis.call('PTTL', KEYS[1])}
"#,
    )
});

/// Replace our in-progress marker with the completed record (idempotent).
static COMPLETE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "idempotency_complete",
        r#"
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[1] or cur == ARGV[2] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
"#,
    )
});

/// Delete our in-progress marker (compare-and-delete, idempotent).
static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "idempotency_release",
        r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#,
    )
});

/// Lifetimes of idempotency records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdempotencyOptions {
    /// How long a claim stays "in progress" without being completed. If the
    /// worker crashes, a retry after this can claim the key again. Set it
    /// above the longest expected handling time.
    pub in_progress_ttl: Duration,
    /// How long the stored first response is replayed to retries.
    pub completed_ttl: Duration,
}

impl Default for IdempotencyOptions {
    /// 30 s in progress, 24 h completed.
    fn default() -> Self {
        Self {
            in_progress_ttl: Duration::from_secs(30),
            completed_ttl: Duration::from_secs(86_400),
        }
    }
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
enum Record<T> {
    InProgress { token: String, fp: String },
    Done { fp: String, response: T },
}

/// The answer to [`Idempotency::claim`].
#[derive(Debug)]
#[must_use = "a claim must be completed or released"]
pub enum Claim<T> {
    /// This caller owns the key: do the work, then
    /// [`complete`](ClaimGuard::complete) (or [`release`](ClaimGuard::release)
    /// on failure so a retry can run).
    Acquired(ClaimGuard),
    /// An earlier request with this key finished; here is its response.
    Completed(T),
    /// An earlier request with this key is still running. Answer `409` (or
    /// `425`) and let the client retry after `retry_after`.
    InProgress {
        /// Time until the in-progress claim expires at the latest.
        retry_after: Duration,
    },
    /// The key was used with a different request fingerprint (a client bug
    /// or a key collision). Answer `422`; do not run the request.
    Mismatch,
}

/// Request de-duplication with stored responses (the `Idempotency-Key`
/// pattern).
///
/// Keys are `{prefix}soma:{tenant}:idem:{key}`.
///
/// # Semantics
///
/// 1. [`claim`](Self::claim) sets an in-progress marker with `SET NX PX`
///    (`in_progress_ttl`). Exactly one concurrent caller gets
///    [`Claim::Acquired`].
/// 2. The owner runs the request and stores its response with
///    [`ClaimGuard::complete`] (`completed_ttl`); every later claim of the key
///    gets [`Claim::Completed`] with that response, byte for byte.
/// 3. If the owner fails it calls [`ClaimGuard::release`]; if it crashes the
///    marker expires after `in_progress_ttl`. Either way a retry can claim again.
///
/// Effects are at-least-once across an expiry: if the owner is still
/// working when its claim expires, a retry may run the request a second time,
/// and the first owner's `complete` then fails with
/// [`RedisError::is_not_owner`]. Choose `in_progress_ttl` accordingly.
#[derive(Debug, Clone)]
pub struct Idempotency {
    client: RedisClient,
    options: IdempotencyOptions,
}

impl Idempotency {
    /// A helper with the given lifetimes.
    pub fn new(client: &RedisClient, options: IdempotencyOptions) -> Result<Self, RedisError> {
        Ttl::After(options.in_progress_ttl).as_millis()?;
        Ttl::After(options.completed_ttl).as_millis()?;
        Ok(Self {
            client: client.clone(),
            options,
        })
    }

    /// Claims `key` for `tenant`. `fingerprint` identifies the request body
    /// (e.g. a hash of method, path and body); a retry with the same key but a
    /// different fingerprint gets [`Claim::Mismatch`].
    pub async fn claim<T: DeserializeOwned>(
        &self,
        tenant: &str,
        key: &str,
        fingerprint: &str,
    ) -> Result<Claim<T>, RedisError> {
        let rkey = self.client.keys().key(tenant, "idem", key)?;
        let token = uuid::Uuid::new_v4().simple().to_string();
        let marker = serde_json::to_string(&Record::<()>::InProgress {
            token,
            fp: fingerprint.to_owned(),
        })
        .map_err(|e| RedisError::Encode(e.to_string()))?;
        let ttl = Ttl::After(self.options.in_progress_ttl)
            .as_millis()?
            .unwrap_or(1);
        let (acquired, current, pttl): (i64, String, i64) = self
            .client
            .eval(
                &CLAIM,
                vec![rkey.clone()],
                vec![Value::from(marker.as_str()), Value::from(ttl)],
                CommandIdempotency::Idempotent,
            )
            .await?;
        if acquired == 1 {
            return Ok(Claim::Acquired(ClaimGuard {
                client: self.client.clone(),
                key: rkey,
                marker,
                fingerprint: fingerprint.to_owned(),
                completed_ttl: self.options.completed_ttl,
            }));
        }
        let record: Record<T> = serde_json::from_str(&current)?;
        Ok(match record {
            Record::InProgress { fp, .. } if fp != fingerprint => Claim::Mismatch,
            Record::Done { fp, .. } if fp != fingerprint => Claim::Mismatch,
            Record::InProgress { .. } => Claim::InProgress {
                retry_after: Duration::from_millis(u64::try_from(pttl).unwrap_or(0)),
            },
            Record::Done { response, .. } => Claim::Completed(response),
        })
    }
}

/// Ownership of a claimed idempotency key; see [`Claim::Acquired`].
///
/// Dropping it without [`complete`](Self::complete) or
/// [`release`](Self::release) leaves the marker to expire after
/// `in_progress_ttl` (retries get [`Claim::InProgress`] until then).
#[derive(Debug)]
pub struct ClaimGuard {
    client: RedisClient,
    key: String,
    marker: String,
    fingerprint: String,
    completed_ttl: Duration,
}

impl ClaimGuard {
    /// The Redis key of the claim.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Stores `response` as the answer to every retry of this key. Fails with
    /// [`RedisError::is_not_owner`] when the claim expired (and maybe
    /// someone else claimed it) before completion.
    pub async fn complete<T: Serialize>(self, response: &T) -> Result<(), RedisError> {
        let done = serde_json::to_string(&Record::Done {
            fp: self.fingerprint.clone(),
            response,
        })
        .map_err(|e| RedisError::Encode(e.to_string()))?;
        let ttl = Ttl::After(self.completed_ttl).as_millis()?.unwrap_or(1);
        let ok: i64 = self
            .client
            .eval(
                &COMPLETE,
                vec![self.key.clone()],
                vec![
                    Value::from(self.marker.as_str()),
                    Value::from(done),
                    Value::from(ttl),
                ],
                CommandIdempotency::Idempotent,
            )
            .await?;
        if ok == 1 {
            Ok(())
        } else {
            Err(RedisError::NotOwner(format!(
                "idempotency claim on {} expired",
                self.key
            )))
        }
    }

    /// Gives the key up (the request failed and may be retried). `false` when
    /// the claim had already expired.
    pub async fn release(self) -> Result<bool, RedisError> {
        let n: i64 = self
            .client
            .eval(
                &RELEASE,
                vec![self.key.clone()],
                vec![Value::from(self.marker.as_str())],
                CommandIdempotency::Idempotent,
            )
            .await?;
        Ok(n == 1)
    }
}
