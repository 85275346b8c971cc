//! [`RateLimiter`]: GCRA rate limiting in one Redis round trip, and
//! [`RateLimitLayer`], its tower middleware.
//!
//! # Semantics
//!
//! A [`RateLimit`] of `limit` per `period` is a GCRA (generic cell rate
//! algorithm, the "leaky bucket as a meter"): a key may spend `limit`
//! requests at once (the burst), then regains one request every
//! `period / limit`. Over *any* interval of length `d` a key is admitted at
//! most `limit + d * limit / period` requests. State is one integer per key
//! (the theoretical arrival time), set with a TTL equal to the time until the
//! bucket is full again, so idle keys cost nothing.
//!
//! The decision is one `EVALSHA` (one round trip; the script is reloaded
//! automatically after a restart). Time is Redis server time, so clients with
//! skewed clocks agree.
//!
//! # Under failure
//!
//! * **Redis down**: [`RateLimiter::check`] returns the [`RedisError`] at once;
//!   the layer then rejects (`503`, [`FailMode::Closed`], the default) or
//!   admits ([`FailMode::Open`]) — your choice, stated in code.
//! * **Redis lost the key** (restart without persistence, failover to a
//!   lagging replica, eviction): each limiter remembers the latest bucket
//!   state it saw per key and sends it with every check, so a process never
//!   admits more than the limit because Redis forgot. Several processes
//!   converge to the combined state after each has checked the key once.
//! * A check is never retried (it consumes quota).

mod future;
mod layer;

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fred::types::Value;
use http::{HeaderMap, HeaderName, HeaderValue};
use prometheus_client::metrics::counter::Counter;

use crate::metrics::DecisionLabels;
use crate::{CommandIdempotency, RedisClient, RedisError, Script};

#[allow(deprecated)]
pub use layer::FailureMode;
pub use layer::{FailMode, RateLimitKey, RateLimitLayer, RateLimitService, ResponseFuture};

static GCRA: LazyLock<Script> =
    LazyLock::new(|| Script::new("rate_limit", include_str!("gcra.lua")));

/// Entries in the per-limiter memory of bucket states before stale ones are
/// pruned.
const FLOOR_PRUNE_AT: usize = 10_000;

/// `limit` requests per `period`, with bursts up to `limit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Requests admitted per period (and the burst size). At least 1.
    pub limit: u32,
    /// The period. At least 1 ms, and `period / limit` at least 1 µs.
    pub period: Duration,
}

impl RateLimit {
    /// `limit` requests per `period`.
    pub const fn per(limit: u32, period: Duration) -> Self {
        Self { limit, period }
    }

    fn validate(&self) -> Result<(i64, i64), RedisError> {
        if self.limit == 0 {
            return Err(RedisError::invalid("rate limit must be at least 1"));
        }
        let period_us = i64::try_from(self.period.as_micros()).unwrap_or(i64::MAX);
        if period_us < 1_000 {
            return Err(RedisError::invalid(
                "rate limit period must be at least 1 ms",
            ));
        }
        let t = period_us / i64::from(self.limit);
        if t < 1 {
            return Err(RedisError::invalid(
                "rate limit finer than 1 request per µs",
            ));
        }
        Ok((t, period_us))
    }
}

/// The outcome of one check, with everything the `X-RateLimit-*` headers need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimitDecision {
    /// Whether the request is admitted (and quota was consumed).
    pub allowed: bool,
    /// The configured limit (burst size).
    pub limit: u32,
    /// Requests that would still be admitted right now.
    pub remaining: u32,
    /// Time until the bucket is full again (all `limit` available).
    pub reset_after: Duration,
    /// When denied: time until one request would be admitted.
    pub retry_after: Option<Duration>,
}

impl RateLimitDecision {
    /// `X-RateLimit-Limit`, `X-RateLimit-Remaining`, `X-RateLimit-Reset`
    /// (seconds until full, rounded up) and, when denied, `Retry-After`
    /// (seconds, rounded up, at least 1).
    pub fn headers(&self) -> HeaderMap {
        let mut h = HeaderMap::with_capacity(4);
        self.write_headers(&mut h);
        h
    }

    /// Writes [`headers`](Self::headers) into `headers`.
    pub fn write_headers(&self, headers: &mut HeaderMap) {
        static LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
        static REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
        static RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");
        headers.insert(LIMIT.clone(), HeaderValue::from(self.limit));
        headers.insert(REMAINING.clone(), HeaderValue::from(self.remaining));
        headers.insert(
            RESET.clone(),
            HeaderValue::from(ceil_secs(self.reset_after)),
        );
        if let Some(r) = self.retry_after {
            headers.insert(
                http::header::RETRY_AFTER,
                HeaderValue::from(ceil_secs(r).max(1)),
            );
        }
    }
}

fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// A distributed GCRA rate limiter; see the [module docs](self).
///
/// Keys are `{prefix}soma:{tenant}:rl:{id}` (for the layer, `id` is the route).
///
/// ```no_run
/// # async fn demo(client: soma_redis::RedisClient) -> Result<(), soma_redis::RedisError> {
/// use std::time::Duration;
/// use soma_redis::{RateLimit, RateLimiter};
/// let limiter = RateLimiter::new(&client, RateLimit::per(10, Duration::from_secs(1)))?;
/// let d = limiter.check("acme", "GET /v1/items").await?;
/// assert!(d.remaining <= 10);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RateLimiter {
    client: RedisClient,
    default: RateLimit,
    floors: Arc<parking_lot::Mutex<HashMap<String, i64>>>,
    allowed: Counter,
    limited: Counter,
    errors: Counter,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("limit", &self.default)
            .finish()
    }
}

impl RateLimiter {
    /// A limiter applying `limit` to every key checked with [`check`](Self::check).
    pub fn new(client: &RedisClient, limit: RateLimit) -> Result<Self, RedisError> {
        limit.validate()?;
        let m = &client.inner.metrics.rate_limit;
        let c = |decision| m.get_or_create(&DecisionLabels { decision }).clone();
        Ok(Self {
            client: client.clone(),
            default: limit,
            floors: Arc::default(),
            allowed: c("allowed"),
            limited: c("limited"),
            errors: c("error"),
        })
    }

    /// The default limit.
    pub fn limit(&self) -> RateLimit {
        self.default
    }

    /// Checks (and on success consumes) one request for `tenant`'s key `id`.
    pub async fn check(&self, tenant: &str, id: &str) -> Result<RateLimitDecision, RedisError> {
        self.check_with(tenant, id, self.default, 1).await
    }

    /// Checks `cost` requests against an explicit `limit` (e.g. a per-plan
    /// limit). Use one limit per key: mixing limits on a key mixes their state.
    pub async fn check_with(
        &self,
        tenant: &str,
        id: &str,
        limit: RateLimit,
        cost: u32,
    ) -> Result<RateLimitDecision, RedisError> {
        let (t, period) = limit.validate()?;
        if cost == 0 || cost > limit.limit {
            return Err(RedisError::invalid(format!(
                "cost must be between 1 and {}",
                limit.limit
            )));
        }
        let key = self.client.keys().key(tenant, "rl", id)?;
        let floor = self.floors.lock().get(&key).copied().unwrap_or(0);
        let args = vec![
            Value::from(t),
            Value::from(period),
            Value::from(i64::from(cost)),
            Value::from(floor),
        ];
        let r: Result<Vec<i64>, RedisError> = self
            .client
            .eval(
                &GCRA,
                vec![key.clone()],
                args,
                CommandIdempotency::NotIdempotent,
            )
            .await;
        let r = match r {
            Ok(v) if v.len() == 5 => v,
            Ok(v) => {
                self.errors.inc();
                return Err(RedisError::Decode(format!(
                    "rate limit script returned {} values",
                    v.len()
                )));
            }
            Err(e) => {
                self.errors.inc();
                return Err(e);
            }
        };
        self.remember(key, r[4]);
        let us = |v: i64| Duration::from_micros(u64::try_from(v).unwrap_or(0));
        let allowed = r[0] == 1;
        if allowed {
            self.allowed.inc();
        } else {
            self.limited.inc();
        }
        Ok(RateLimitDecision {
            allowed,
            limit: limit.limit,
            remaining: u32::try_from(r[1].max(0))
                .unwrap_or(u32::MAX)
                .min(limit.limit),
            reset_after: us(r[2]),
            retry_after: if allowed { None } else { Some(us(r[3])) },
        })
    }

    fn remember(&self, key: String, tat: i64) {
        let mut floors = self.floors.lock();
        if floors.len() >= FLOOR_PRUNE_AT {
            // A TAT in the past carries no information (the bucket is full);
            // keep a minute of margin for clock skew between us and Redis.
            let now_us = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_micros() as i64)
                .unwrap_or(0);
            floors.retain(|_, v| *v > now_us - 60_000_000);
        }
        let e = floors.entry(key).or_insert(0);
        if tat > *e {
            *e = tat;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validates_limits() {
        assert!(
            RateLimit::per(0, Duration::from_secs(1))
                .validate()
                .is_err()
        );
        assert!(
            RateLimit::per(1, Duration::from_micros(10))
                .validate()
                .is_err()
        );
        assert_eq!(
            RateLimit::per(10, Duration::from_secs(1))
                .validate()
                .unwrap(),
            (100_000, 1_000_000)
        );
        // The documented bounds are inclusive: 1 ms, and 1 µs per request.
        assert_eq!(
            RateLimit::per(1, Duration::from_millis(1))
                .validate()
                .unwrap(),
            (1_000, 1_000)
        );
        assert!(
            RateLimit::per(1, Duration::from_micros(999))
                .validate()
                .is_err()
        );
        assert_eq!(
            RateLimit::per(1_000, Duration::from_millis(1))
                .validate()
                .unwrap(),
            (1, 1_000)
        );
        assert!(
            RateLimit::per(1_001, Duration::from_millis(1))
                .validate()
                .is_err()
        );
    }

    #[test]
    fn headers_round_up() {
        let d = RateLimitDecision {
            allowed: false,
            limit: 5,
            remaining: 0,
            reset_after: Duration::from_millis(1500),
            retry_after: Some(Duration::from_millis(10)),
        };
        let h = d.headers();
        assert_eq!(h["x-ratelimit-limit"], "5");
        assert_eq!(h["x-ratelimit-remaining"], "0");
        assert_eq!(h["x-ratelimit-reset"], "2");
        assert_eq!(h["retry-after"], "1");
        // Whole seconds are not rounded up.
        let d = RateLimitDecision {
            reset_after: Duration::from_secs(2),
            retry_after: Some(Duration::from_secs(3)),
            ..d
        };
        let h = d.headers();
        assert_eq!(h["x-ratelimit-reset"], "2");
        assert_eq!(h["retry-after"], "3");
    }
}
