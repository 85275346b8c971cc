//! [`SomabrainConfig`]: the client's section of the application settings.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use soma_config::Secret;
use soma_observability::resilience::BreakerConfig;

/// Settings for a [`SomabrainClient`](crate::SomabrainClient).
///
/// Defaults are for local development: a SomaBrain on `127.0.0.1:30101`,
/// tenant `public`, namespace `default`, a 500 ms connect timeout, a 2 s
/// per-attempt timeout inside a 5 s per-call deadline, two retries, and a
/// breaker per [endpoint group](crate::EndpointGroup) that opens after 3
/// consecutive failed calls of its group and lets one probe through after
/// 30 s.
///
/// ```
/// let cfg: soma_somabrain::SomabrainConfig = serde_json::from_str(r#"{
///     "base_url": "http://somabrain:30101",
///     "path_prefix": "/api",
///     "token": "s3cr3t",
///     "breaker": { "failure_threshold": 5 }
/// }"#).unwrap();
/// assert_eq!(cfg.breaker.failure_threshold, 5);
/// assert_eq!(cfg.breaker.open_ms, 30_000); // untouched keys keep defaults
/// assert!(!format!("{cfg:?}").contains("s3cr3t"));
/// ```
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct SomabrainConfig {
    /// Scheme, host and port of the SomaBrain server, without a path
    /// (`http://127.0.0.1:30101`). A URL with a path (`http://h/api`) is
    /// refused at build time with [`ErrorKind::Config`](crate::ErrorKind::Config):
    /// put the mount point in [`path_prefix`](Self::path_prefix) (probes
    /// stay at the server root).
    pub base_url: String,
    /// Where the API is mounted: `""` (root) or `"/api"`. SomaBrain serves
    /// its routes under both.
    pub path_prefix: String,
    /// Bearer token sent as `Authorization: Bearer <token>`. Empty means no
    /// `Authorization` header (the server then answers 401 on memory and
    /// context routes).
    pub token: Secret,
    /// Tenant used when a call does not name one.
    pub default_tenant: String,
    /// Namespace used when a call does not name one.
    pub default_namespace: String,
    /// TCP connect timeout.
    pub connect_timeout_ms: u64,
    /// Timeout of one attempt (connect, send, and read the whole response).
    pub request_timeout_ms: u64,
    /// Deadline of a whole call, retries and backoff included. A per-call
    /// deadline ([`CallOptions::deadline`](crate::CallOptions::deadline))
    /// overrides it.
    pub call_deadline_ms: u64,
    /// Idle keep-alive connections kept per host.
    pub pool_max_idle_per_host: usize,
    /// How long an idle pooled connection is kept.
    pub pool_idle_timeout_ms: u64,
    /// Retry settings.
    pub retry: RetryConfig,
    /// Circuit-breaker settings (the shared spelling: `enabled`,
    /// `failure_threshold`, `open_ms`), applied to each
    /// [endpoint group](crate::EndpointGroup)'s own breaker. The breakers
    /// count *calls*, not attempts: a call whose three attempts all failed
    /// is one failure; one that succeeded after two retries is a success.
    pub breaker: BreakerConfig,
    /// Interval of the background health check (component
    /// [`somabrain`](crate::COMPONENT)) once
    /// [`SomabrainClientBuilder::health`](crate::SomabrainClientBuilder::health)
    /// attached a health registry; also how soon a healed server closes an
    /// open breaker without traffic (at most `open_ms` + one interval).
    pub health_interval_ms: u64,
    /// Timeout of one health check run.
    pub health_timeout_ms: u64,
}

impl Default for SomabrainConfig {
    fn default() -> Self {
        Self {
            base_url: "http://127.0.0.1:30101".to_owned(),
            path_prefix: String::new(),
            token: Secret::default(),
            default_tenant: "public".to_owned(),
            default_namespace: "default".to_owned(),
            connect_timeout_ms: 500,
            request_timeout_ms: 2_000,
            call_deadline_ms: 5_000,
            pool_max_idle_per_host: 32,
            pool_idle_timeout_ms: 90_000,
            retry: RetryConfig::default(),
            breaker: BreakerConfig::default(),
            health_interval_ms: 10_000,
            health_timeout_ms: 2_000,
        }
    }
}

impl SomabrainConfig {
    /// The defaults with the server at `base_url` (scheme, host and port;
    /// see [`base_url`](Self::base_url)).
    ///
    /// ```
    /// let cfg = soma_somabrain::SomabrainConfig::new("http://somabrain:30101").with_token("s3cr3t");
    /// assert_eq!(cfg.base_url, "http://somabrain:30101");
    /// assert_eq!(cfg.token.expose_secret(), "s3cr3t");
    /// ```
    pub fn new(base_url: impl Into<String>) -> Self {
        Self {
            base_url: base_url.into(),
            ..Self::default()
        }
    }

    /// The same settings with the bearer [`token`](Self::token).
    pub fn with_token(mut self, token: impl Into<Secret>) -> Self {
        self.token = token.into();
        self
    }

    pub(crate) fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }
    pub(crate) fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }
    pub(crate) fn call_deadline(&self) -> Duration {
        Duration::from_millis(self.call_deadline_ms)
    }
}

/// Retry settings.
///
/// Only calls that are safe to repeat are retried: reads (recall, metrics,
/// feature flags, probes, adaptation state) and keyed writes (remember and
/// batch remember: the same `key` + `universe` lands on the same coordinate,
/// so a repeated write overwrites instead of duplicating). Context evaluate
/// and feedback are retried only when the connection was refused, i.e. the
/// request provably never reached the server.
///
/// Retried outcomes: transport errors, attempt timeouts, 408, 429, 502, 503
/// and 504. Never retried: other 4xx (the request is wrong and stays wrong),
/// 500 (an unhandled server exception, usually deterministic) and responses
/// whose body does not parse.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct RetryConfig {
    /// Retries after the first attempt (so at most `max_retries + 1`
    /// attempts per call). `0` disables retries.
    pub max_retries: u32,
    /// Backoff cap of the first retry; it doubles per retry (old key:
    /// `initial_backoff_ms`). Spelled, and computed, as the SDK's shared
    /// [`BackoffConfig`](soma_observability::resilience::BackoffConfig)
    /// with full jitter: each retry waits uniformly in `[0, cap]`.
    #[serde(alias = "initial_backoff_ms")]
    pub initial_ms: u64,
    /// Upper bound of any backoff cap (old key: `max_backoff_ms`).
    #[serde(alias = "max_backoff_ms")]
    pub max_ms: u64,
    /// The longest `Retry-After` the client will wait. A server asking for
    /// longer (or longer than the call's remaining deadline) gets no retry:
    /// the caller sees the 429/503 at once.
    pub max_retry_after_ms: u64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_retries: 2,
            initial_ms: 50,
            max_ms: 1_000,
            max_retry_after_ms: 2_000,
        }
    }
}
