//! A resilient Redis client (fred) with cache, rate limiter, idempotency,
//! lease and pub/sub helpers.
//!
//! # Why
//!
//! The platform this SDK replaces wrapped Redis once per service: session
//! caches, rate limits, idempotency keys and notifications each had their own
//! client and conventions. Budget keys never expired, and scheduler entries
//! silently vanished after 15 minutes because they inherited a session-cache
//! TTL. Here there is one client, one set of helpers, and every key has an
//! owner (a tenant and a kind in its name) and a lifetime (a TTL chosen in
//! code).
//!
//! # Guarantees
//!
//! * **Typed failures, fast.** Every error is a [`RedisError`] with
//!   [`is_connection`](RedisError::is_connection),
//!   [`is_timeout`](RedisError::is_timeout) and
//!   [`is_retryable`](RedisError::is_retryable). While Redis is down, calls
//!   fail immediately instead of queueing, so callers degrade in microseconds.
//!   Only idempotent commands are retried, a bounded number of times.
//! * **Every key has a TTL** unless the code says [`Ttl::NoExpiry`]. Keys are
//!   named `{prefix}soma:{tenant}:{kind}:{id}` ([`KeySpace`]).
//! * **Observable.** Commands by command and outcome, latency, retries,
//!   reconnects and pool state are metrics in a shared
//!   [`MetricsRegistry`](soma_observability::metrics::MetricsRegistry); a
//!   `redis` health component PINGs with a timeout.
//! * **Recovers by itself.** Connections reconnect with exponential backoff and
//!   jitter; Lua scripts reload after a restart; pub/sub resubscribes.
//!
//! # Helpers
//!
//! | helper | what | key kind |
//! |---|---|---|
//! | [`Cache`] | typed JSON, TTL, single-flight `get_or_load`, negative caching | `cache.{name}` |
//! | [`RateLimiter`] | GCRA in one Lua call; [`RateLimitLayer`] for tower | `rl` |
//! | [`Idempotency`] | `SET NX PX` claim, stored first response, replay | `idem` |
//! | [`Lease`] | singleton lock with fencing token, auto-renewed | `lease` |
//! | [`PubSub`] | broadcast with resubscribe and a reconnect signal | `ch` |
//!
//! # Bulk reads and writes
//!
//! For cache warm-ups and other bulk work, [`Bulk`] +
//! [`RedisClient::run_bulk`] encode a whole batch into one buffer and send it
//! on dedicated connections, several times faster than fred's per-command
//! pipelines; per-command server errors, typed batch errors, the same TTL
//! rule and metrics. [`Cache::set_many`] and [`Cache::get_many`] use it for
//! typed cache warm-ups and lookups. See [`Bulk`].
//!
//! # Example
//!
//! ```no_run
//! use std::time::Duration;
//! use soma_redis::{RedisClient, RedisConfig, RateLimiter, RateLimit, Ttl};
//!
//! # async fn demo() -> Result<(), soma_redis::RedisError> {
//! let client = RedisClient::connect(RedisConfig::default()).await?;
//! client.set("soma:_:demo:greeting", "hello", Ttl::secs(60)).await?;
//!
//! let limiter = RateLimiter::new(&client, RateLimit::per(100, Duration::from_secs(60)))?;
//! let d = limiter.check("acme", "POST /v1/orders").await?;
//! if !d.allowed {
//!     println!("retry after {:?}", d.retry_after);
//! }
//! # Ok(()) }
//! ```
#![cfg_attr(docsrs, feature(doc_cfg))]

mod bulk;
mod cache;
mod client;
mod config;
mod error;
mod idempotency;
mod keys;
mod lease;
mod metrics;
mod pubsub;
pub mod rate_limit;

pub use bulk::{Bulk, BulkReply};
pub use cache::{Cache, CacheOptions, LoadError, Lookup};
pub use client::{
    Batch, CommandIdempotency, RedisClient, RedisClientBuilder, RedisHealthCheck, Script,
};
pub use config::{ReconnectConfig, RedisConfig, Topology};
pub use error::RedisError;
pub use idempotency::{
    Claim, ClaimGuard, IDEMPOTENCY_KEY_HEADER, IDEMPOTENT_REPLAYED_HEADER, Idempotency,
    IdempotencyFuture, IdempotencyKey, IdempotencyLayer, IdempotencyOptions, IdempotencyScope,
    IdempotencyService, InvalidIdempotencyKey, idempotency_key,
};
pub use keys::{KeySpace, Ttl};
pub use lease::{Lease, LeaseGuard, LeaseOptions};
pub use pubsub::{PubSub, PubSubEvent, Subscription};
pub use rate_limit::{RateLimit, RateLimitDecision, RateLimitLayer, RateLimiter};

/// The fred crate this client is built on, for types such as
/// [`fred::types::Value`] used by [`RedisClient::eval`] and [`Batch::run`].
pub use fred;

/// The README's examples, compiled as doctests so they cannot drift.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
