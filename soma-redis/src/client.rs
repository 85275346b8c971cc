//! [`RedisClient`]: a fred pool with timeouts, fail-fast, bounded retries,
//! metrics and health.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fred::clients::{Client, Pipeline, Pool, WithOptions};
use fred::error::Error as FredError;
use fred::interfaces::{ClientLike, EventInterface, KeysInterface, LuaInterface, PubsubInterface};
use fred::types::config::{
    ClusterDiscoveryPolicy, Config as FredConfig, Options, ReconnectPolicy, Server, ServerConfig,
};
use fred::types::{Builder, ClusterHash, CustomCommand, Expiration, FromValue, SetOptions, Value};
use soma_observability::health::{
    CheckOptions, CheckOutcome, Criticality, HealthCheck, HealthRegistry, HealthReporter,
};
use soma_observability::metrics::MetricsRegistry;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::bulk::BulkPool;
use crate::metrics::{RedisMetrics, StateLabels};
use crate::{Bulk, BulkReply};
use crate::{KeySpace, ReconnectConfig, RedisConfig, RedisError, Topology, Ttl};

/// Whether a command may be sent again after a timeout or a broken connection
/// without changing the outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandIdempotency {
    /// Repeating it is harmless (`GET`, `PING`, `SET` of a fixed value,
    /// compare-and-set scripts). Retried up to `max_retries` times.
    Idempotent,
    /// Repeating it may apply it twice (`INCR`, a rate-limit check). Never retried.
    NotIdempotent,
}

/// A resilient Redis client built on a fred connection pool.
///
/// Cheap to clone (an `Arc`); clones share the pool, metrics and background
/// tasks. The connections are closed when the last clone is dropped or on
/// [`quit`](Self::quit).
///
/// # Behaviour under failure
///
/// * **Server down**: every command returns
///   [`RedisError::is_connection`] immediately (fred's fail-fast option: the
///   command is rejected before it is queued). Nothing is buffered for later;
///   the caller decides whether to degrade, queue or fail.
/// * **Server slow**: a command with no reply after `command_timeout_ms`
///   returns [`RedisError::is_timeout`]; it may still run on the server.
/// * **Retries**: only commands sent with [`CommandIdempotency::Idempotent`] are
///   retried, at most `max_retries` times, `retry_delay_ms` apart, and only
///   while at least one pooled connection is up (so a dead server never costs
///   more than one attempt).
/// * **Reconnect**: each pooled connection reconnects in the background with
///   exponential backoff and jitter ([`ReconnectConfig`](crate::ReconnectConfig)).
///   Commands go to a connected member of the pool when there is one.
#[derive(Clone)]
pub struct RedisClient {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) pool: Pool,
    opts: Options,
    max_retries: u32,
    retry_delay: Duration,
    command_timeout: Duration,
    pub(crate) keys: KeySpace,
    pub(crate) metrics: RedisMetrics,
    pub(crate) builder: Builder,
    config: RedisConfig,
    pub(crate) bulk: BulkPool,
    tasks: parking_lot::Mutex<Vec<JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        for t in self.tasks.get_mut().drain(..) {
            t.abort();
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let pool = self.pool.clone();
            rt.spawn(async move {
                let _ = pool.quit().await;
            });
        }
    }
}

impl std::fmt::Debug for RedisClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisClient")
            .field("url", &redact_url(&self.inner.config.url))
            .field("pool_size", &self.inner.pool.size())
            .field("connected", &self.connected_count())
            .field("key_prefix", &self.inner.keys.prefix())
            .finish()
    }
}

/// Builds a [`RedisClient`]; see [`RedisClient::builder`].
#[derive(Debug)]
pub struct RedisClientBuilder {
    config: RedisConfig,
    metrics: Option<MetricsRegistry>,
    health: Option<HealthRegistry>,
}

impl RedisClientBuilder {
    /// Registers the client's metrics in `registry` (default: a private
    /// registry nobody scrapes).
    pub fn metrics(mut self, registry: &MetricsRegistry) -> Self {
        self.metrics = Some(registry.clone());
        self
    }

    /// Registers a `redis` health component ([`Criticality::Required`]) that
    /// PINGs every `health_interval_ms` with a `health_timeout_ms` timeout.
    pub fn health(mut self, registry: &HealthRegistry) -> Self {
        self.health = Some(registry.clone());
        self
    }

    /// Connects and waits until every pooled connection is up (bounded by
    /// `connect_timeout_ms` per attempt). Fails with a typed error when Redis
    /// is unreachable or rejects the credentials, so a misconfiguration shows
    /// at startup.
    pub async fn connect(self) -> Result<RedisClient, RedisError> {
        self.start(false).await
    }

    /// Starts connecting in the background and returns at once. Until Redis
    /// is reachable every command fails fast with a connection error. Use
    /// this when the service must start (degraded) without Redis.
    pub async fn connect_lazy(self) -> Result<RedisClient, RedisError> {
        self.start(true).await
    }

    async fn start(self, lazy: bool) -> Result<RedisClient, RedisError> {
        let config = self.config;
        let mut builder = fred_builder(&config)?;
        if lazy {
            builder.with_config(|c| c.fail_fast = false);
        }
        let pool = builder.build_pool(config.pool_size)?;
        if lazy {
            // The connection task runs detached; it lives until `quit`.
            drop(pool.connect());
        } else {
            let timeout =
                Duration::from_millis(config.connect_timeout_ms.saturating_mul(2).max(100));
            match tokio::time::timeout(timeout, pool.init()).await {
                Ok(Ok(_handle)) => {}
                Ok(Err(e)) => {
                    let _ = pool.quit().await;
                    return Err(e.into());
                }
                Err(_) => {
                    let _ = pool.quit().await;
                    return Err(RedisError::Connection(format!(
                        "no connection to {} within {timeout:?}",
                        redact_url(&config.url)
                    )));
                }
            }
        }
        let registry = self.metrics.unwrap_or_default();
        let metrics = RedisMetrics::new(&registry);
        let opts = Options {
            fail_fast: true,
            timeout: Some(Duration::from_millis(config.command_timeout_ms.max(1))),
            max_attempts: Some(1),
            ..Default::default()
        };
        let bulk = BulkPool::new(builder.get_config(), &config, &metrics);
        let inner = Arc::new(Inner {
            bulk,
            opts,
            max_retries: config.max_retries,
            retry_delay: Duration::from_millis(config.retry_delay_ms),
            command_timeout: Duration::from_millis(config.command_timeout_ms.max(1)),
            keys: KeySpace::new(config.key_prefix.clone()),
            metrics,
            builder,
            pool,
            config,
            tasks: parking_lot::Mutex::new(Vec::new()),
        });
        let client = RedisClient { inner };
        let reporter = self.health.map(|health| {
            let opts = CheckOptions::new(
                Duration::from_millis(client.inner.config.health_interval_ms.max(100)),
                Duration::from_millis(client.inner.config.health_timeout_ms.max(10)),
            );
            health.register_check("redis", Criticality::Required, client.health_check(), opts);
            // Connection events also set the status at once (no command is
            // sent for it), so `/ready` follows a new or lost connection
            // without waiting for the next PING.
            health.reporter("redis", Criticality::Required)
        });
        client.spawn_monitors(reporter);
        Ok(client)
    }
}

impl RedisClient {
    /// A builder for a client from `config`.
    pub fn builder(config: RedisConfig) -> RedisClientBuilder {
        RedisClientBuilder {
            config,
            metrics: None,
            health: None,
        }
    }

    /// Connects with a private metrics registry and no health component;
    /// shorthand for `RedisClient::builder(config).connect()`.
    pub async fn connect(config: RedisConfig) -> Result<Self, RedisError> {
        Self::builder(config).connect().await
    }

    /// The key space (configured prefix) every helper uses.
    pub fn keys(&self) -> &KeySpace {
        &self.inner.keys
    }

    /// The metrics registry this client reports to.
    pub fn metrics_registry(&self) -> &MetricsRegistry {
        &self.inner.metrics.registry
    }

    /// The configuration the client was built from.
    pub fn config(&self) -> &RedisConfig {
        &self.inner.config
    }

    /// `true` when at least one pooled connection is up.
    pub fn is_connected(&self) -> bool {
        self.inner.pool.clients().iter().any(|c| c.is_connected())
    }

    /// Waits until at least one pooled connection is up, for at most
    /// `timeout`: the startup step of a service that connected with
    /// [`connect_lazy`](RedisClientBuilder::connect_lazy) and wants Redis
    /// before it serves, but will start degraded without it. Returns at
    /// once when a connection is already up; otherwise a
    /// [`RedisError::Connection`] naming the (redacted) URL and the wait.
    pub async fn wait_connected(&self, timeout: Duration) -> Result<(), RedisError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.is_connected() {
                return Ok(());
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(RedisError::Connection(format!(
                    "no connection to {} within {timeout:?}",
                    redact_url(&self.inner.config.url)
                )));
            }
            tokio::time::sleep((deadline - now).min(Duration::from_millis(10))).await;
        }
    }

    /// Number of pooled connections that are up.
    pub fn connected_count(&self) -> usize {
        self.inner
            .pool
            .clients()
            .iter()
            .filter(|c| c.is_connected())
            .count()
    }

    /// The underlying fred pool, for commands this crate does not wrap.
    ///
    /// Commands sent through it bypass this crate's timeouts, fail-fast,
    /// metrics and the TTL rule: every key written through it must still get
    /// a TTL (or a comment explaining why not).
    pub fn fred_pool(&self) -> &Pool {
        &self.inner.pool
    }

    /// A health check (PING) for [`HealthRegistry::register_check`]; the
    /// builder's [`health`](RedisClientBuilder::health) registers it for you.
    pub fn health_check(&self) -> RedisHealthCheck {
        RedisHealthCheck {
            client: self.clone(),
        }
    }

    /// Runs one command with the client's options, retries and metrics.
    ///
    /// `command` is the metric label (a fixed string, never a key).
    pub async fn run<R, F, Fut>(
        &self,
        command: &'static str,
        idem: CommandIdempotency,
        f: F,
    ) -> Result<R, RedisError>
    where
        F: Fn(WithOptions<Client>) -> Fut,
        Fut: Future<Output = Result<R, FredError>>,
    {
        let start = Instant::now();
        let mut attempt = 0;
        let result = loop {
            let client = self
                .inner
                .pool
                .next_connected()
                .with_options(&self.inner.opts);
            match f(client).await {
                Ok(v) => break Ok(v),
                Err(e) => {
                    let e = RedisError::from(e);
                    if idem == CommandIdempotency::Idempotent
                        && attempt < self.inner.max_retries
                        && e.is_retryable()
                        && self.is_connected()
                    {
                        attempt += 1;
                        self.inner.metrics.retry(command);
                        tokio::time::sleep(self.inner.retry_delay).await;
                        continue;
                    }
                    break Err(e);
                }
            }
        };
        self.inner
            .metrics
            .observe(command, &result, start.elapsed());
        result
    }

    /// `PING`.
    pub async fn ping(&self) -> Result<(), RedisError> {
        self.run("ping", CommandIdempotency::Idempotent, |c| async move {
            c.ping::<()>(None).await
        })
        .await
    }

    /// `GET key`; `None` when the key does not exist.
    pub async fn get<V: FromValue>(&self, key: &str) -> Result<Option<V>, RedisError> {
        self.run("get", CommandIdempotency::Idempotent, |c| async move {
            c.get::<Option<V>, _>(key).await
        })
        .await
    }

    /// `SET key value PX ttl` (or plain `SET` for [`Ttl::NoExpiry`]).
    pub async fn set<V>(&self, key: &str, value: V, ttl: Ttl) -> Result<(), RedisError>
    where
        V: TryInto<Value> + Clone + Send,
        V::Error: Into<FredError> + Send,
    {
        let exp = ttl.as_millis()?.map(Expiration::PX);
        self.run("set", CommandIdempotency::Idempotent, |c| {
            let value = value.clone();
            let exp = exp.clone();
            async move { c.set::<(), _, _>(key, value, exp, None, false).await }
        })
        .await
    }

    /// `SET key value NX PX ttl`: `true` when the key was created.
    ///
    /// Not retried: after a lost reply a retry would find its own key and
    /// report `false`.
    pub async fn set_nx<V>(&self, key: &str, value: V, ttl: Ttl) -> Result<bool, RedisError>
    where
        V: TryInto<Value> + Clone + Send,
        V::Error: Into<FredError> + Send,
    {
        let exp = ttl.as_millis()?.map(Expiration::PX);
        self.run("set_nx", CommandIdempotency::NotIdempotent, |c| {
            let value = value.clone();
            let exp = exp.clone();
            async move {
                let r: Option<String> = c.set(key, value, exp, Some(SetOptions::NX), false).await?;
                Ok(r.is_some())
            }
        })
        .await
    }

    /// `DEL keys...`: the number of keys removed.
    pub async fn del(&self, keys: &[&str]) -> Result<u64, RedisError> {
        let keys: Vec<String> = keys.iter().map(|k| (*k).to_owned()).collect();
        self.run("del", CommandIdempotency::Idempotent, |c| {
            let keys = keys.clone();
            async move { c.del::<u64, _>(keys).await }
        })
        .await
    }

    /// `PTTL key`: `Some(ms)` for a key with a TTL, `Some(-1)` for a key
    /// without one, `None` when the key does not exist.
    pub async fn pttl(&self, key: &str) -> Result<Option<i64>, RedisError> {
        let v: i64 = self
            .run("pttl", CommandIdempotency::Idempotent, |c| async move {
                c.pttl::<i64, _>(key).await
            })
            .await?;
        Ok(if v == -2 { None } else { Some(v) })
    }

    /// `PEXPIRE key ttl`: `true` when the key exists.
    pub async fn expire(&self, key: &str, ttl: Duration) -> Result<bool, RedisError> {
        let ms = Ttl::After(ttl).as_millis()?.unwrap_or(1);
        self.run("pexpire", CommandIdempotency::Idempotent, |c| async move {
            c.pexpire::<bool, _>(key, ms, None).await
        })
        .await
    }

    /// `PUBLISH channel message`: the number of subscribers that received it.
    pub async fn publish<V>(&self, channel: &str, message: V) -> Result<u64, RedisError>
    where
        V: TryInto<Value> + Clone + Send,
        V::Error: Into<FredError> + Send,
    {
        // Not retried: a retry could deliver the message twice.
        self.run("publish", CommandIdempotency::NotIdempotent, |c| {
            let message = message.clone();
            async move { c.publish::<u64, _, _>(channel, message).await }
        })
        .await
    }

    /// Sends `bulk` on a dedicated bulk connection and returns one reply per
    /// command, in order. The outer error fails the whole batch (connection,
    /// timeout, unsupported topology); a server error for one command is that
    /// command's `Err`. See [`Bulk`] for the guarantees.
    ///
    /// Up to 1024 commands (or 1 MiB) are written per round trip;
    /// `command_timeout_ms` bounds each round trip. The batch is never
    /// retried.
    pub async fn run_bulk(&self, bulk: &Bulk) -> Result<Vec<BulkReply>, RedisError> {
        self.inner.bulk.run(bulk).await
    }

    /// Runs a Lua [`Script`] by SHA (`EVALSHA`), loading it on `NOSCRIPT`
    /// (after a server restart or failover the script cache is empty).
    pub async fn eval<R: FromValue>(
        &self,
        script: &Script,
        keys: Vec<String>,
        args: Vec<Value>,
        idem: CommandIdempotency,
    ) -> Result<R, RedisError> {
        // fred's `LuaInterface` is not implemented for `WithOptions` (a call
        // would deref to the bare client and lose fail-fast and the timeout),
        // so EVALSHA goes out as a custom command that keeps the options.
        let mut argv: Vec<Value> = Vec::with_capacity(2 + keys.len() + args.len());
        argv.push(Value::from(script.sha1()));
        argv.push(Value::from(keys.len() as i64));
        argv.extend(keys.iter().map(|k| Value::from(k.as_str())));
        argv.extend(args);
        let hash = if keys.is_empty() {
            ClusterHash::Random
        } else {
            ClusterHash::Offset(2)
        };
        let evalsha = CustomCommand::new_static("EVALSHA", hash, false);
        self.run(script.label, idem, |c| {
            let argv = argv.clone();
            let evalsha = evalsha.clone();
            async move {
                match c.custom::<R, Value>(evalsha.clone(), argv.clone()).await {
                    Err(e) if e.details().starts_with("NOSCRIPT") => {
                        let lua = script.lua.clone();
                        if c.is_clustered() {
                            c.script_load_cluster::<(), _>(lua).await?;
                        } else {
                            c.script_load::<String, _>(lua).await?;
                        }
                        c.custom::<R, Value>(evalsha, argv).await
                    }
                    other => other,
                }
            }
        })
        .await
    }

    /// Starts a pipeline: commands queued on it are sent in one write and
    /// their replies read together by [`Batch::run`].
    ///
    /// Fails fast with a connection error when no connection is up. A
    /// pipeline is never retried (it may contain non-idempotent commands).
    ///
    /// This goes through fred (any command, shared pooled connections, one
    /// future per command). For bulk `GET`/`SET`/`DEL`/`PEXPIRE` — cache
    /// warm-ups, bulk reads — [`Bulk`](crate::Bulk) +
    /// [`run_bulk`](Self::run_bulk) is several times faster and reports
    /// server errors per command.
    pub fn batch(&self) -> Result<Batch, RedisError> {
        if !self.is_connected() {
            return Err(RedisError::Connection(
                "no connected redis connection".into(),
            ));
        }
        Ok(Batch {
            pipeline: self.inner.pool.next_connected().pipeline(),
            client: self.clone(),
            len: 0,
        })
    }

    /// Closes every pooled connection (pending commands finish first).
    pub async fn quit(&self) -> Result<(), RedisError> {
        self.inner.pool.quit().await.map_err(Into::into)
    }

    fn spawn_monitors(&self, health: Option<HealthReporter>) {
        let notify = Arc::new(Notify::new());
        let mut tasks = Vec::new();
        for c in self.inner.pool.clients() {
            let mut rx = c.reconnect_rx();
            let counter = self.inner.metrics.reconnects.clone();
            let n = notify.clone();
            let up = health.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    match rx.recv().await {
                        Ok(server) => {
                            tracing::info!(server = %server, "redis connection re-established");
                            counter.inc();
                            n.notify_one();
                            if let Some(h) = &up {
                                h.set_up();
                            }
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                    }
                }
            }));
            let mut erx = c.error_rx();
            let n = notify.clone();
            let down = health.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    match erx.recv().await {
                        Ok((error, server)) => {
                            let server = server.map(|s| s.to_string()).unwrap_or_default();
                            tracing::warn!(error = %error, server = %server, "redis connection error");
                            n.notify_one();
                            if let Some(h) = &down {
                                h.set_down(format!(
                                    "connection error: {}",
                                    RedisError::from(error.clone()).kind_label()
                                ));
                            }
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                    }
                }
            }));
        }
        let pool = self.inner.pool.clone();
        let gauge = self.inner.metrics.pool.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let up = pool.clients().iter().filter(|c| c.is_connected()).count() as i64;
                gauge
                    .get_or_create(&StateLabels { state: "connected" })
                    .set(up);
                gauge
                    .get_or_create(&StateLabels {
                        state: "disconnected",
                    })
                    .set(pool.size() as i64 - up);
                tokio::select! {
                    _ = notify.notified() => {
                        // let the state settle after the event
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }));
        self.inner.tasks.lock().extend(tasks);
    }

    pub(crate) fn command_timeout(&self) -> Duration {
        self.inner.command_timeout
    }
}

/// A pipeline of commands sent in one write; see [`RedisClient::batch`].
pub struct Batch {
    pipeline: Pipeline<Client>,
    client: RedisClient,
    len: usize,
}

impl std::fmt::Debug for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch").field("len", &self.len).finish()
    }
}

impl Batch {
    /// Queues `GET key`.
    pub async fn get(&mut self, key: &str) -> Result<(), RedisError> {
        self.len += 1;
        self.pipeline.get::<(), _>(key).await.map_err(Into::into)
    }

    /// Queues `SET key value PX ttl`.
    pub async fn set<V>(&mut self, key: &str, value: V, ttl: Ttl) -> Result<(), RedisError>
    where
        V: TryInto<Value> + Send,
        V::Error: Into<FredError> + Send,
    {
        let exp = ttl.as_millis()?.map(Expiration::PX);
        self.len += 1;
        self.pipeline
            .set::<(), _, _>(key, value, exp, None, false)
            .await
            .map_err(Into::into)
    }

    /// Queues `DEL key`.
    pub async fn del(&mut self, key: &str) -> Result<(), RedisError> {
        self.len += 1;
        self.pipeline.del::<(), _>(key).await.map_err(Into::into)
    }

    /// Number of queued commands.
    pub fn len(&self) -> usize {
        self.len
    }

    /// `true` when nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Sends the queued commands and returns one reply per command (in
    /// order). A server error in any command fails the whole call; the other
    /// commands have still run.
    pub async fn run(self) -> Result<Vec<Value>, RedisError> {
        let start = Instant::now();
        let timeout = self.client.command_timeout();
        let result = match tokio::time::timeout(timeout, self.pipeline.all::<Vec<Value>>()).await {
            Ok(r) => r.map_err(RedisError::from),
            Err(_) => Err(RedisError::Timeout(format!(
                "pipeline of {} commands",
                self.len
            ))),
        };
        self.client
            .inner
            .metrics
            .observe("pipeline", &result, start.elapsed());
        result
    }
}

/// A Lua script run by SHA through [`RedisClient::eval`].
#[derive(Debug, Clone)]
pub struct Script {
    inner: fred::types::scripts::Script,
    lua: String,
    label: &'static str,
}

impl Script {
    /// A script; `label` names it in metrics (`command` label), e.g. `"rate_limit"`.
    pub fn new(label: &'static str, lua: &str) -> Self {
        Self {
            inner: fred::types::scripts::Script::from_lua(lua.to_owned()),
            lua: lua.to_owned(),
            label,
        }
    }

    /// The script's SHA-1.
    pub fn sha1(&self) -> &str {
        self.inner.sha1()
    }
}

/// PING health check for the `redis` component.
///
/// `up` when PING answers, `down` (with the error kind) otherwise; the
/// `connected_connections` gauge shows how much of the pool is up, and a
/// partially connected pool is reported `degraded`.
#[derive(Debug, Clone)]
pub struct RedisHealthCheck {
    client: RedisClient,
}

#[async_trait::async_trait]
impl HealthCheck for RedisHealthCheck {
    async fn check(&self) -> CheckOutcome {
        let size = self.client.inner.pool.size();
        let up = self.client.connected_count();
        let outcome = match self.client.ping().await {
            Ok(()) if up == size => CheckOutcome::up(),
            Ok(()) => CheckOutcome::degraded(format!("{up} of {size} connections up")),
            Err(e) => CheckOutcome::down(format!("ping failed: {}", e.kind_label())),
        };
        outcome.with_gauge("connected_connections", up as f64)
    }
}

/// `url` without its credentials, for logs and errors (the one
/// [`soma_observability::redact_url`]).
pub(crate) use soma_observability::redact_url;

fn parse_node(node: &str) -> Result<Server, RedisError> {
    let (host, port) = node
        .rsplit_once(':')
        .ok_or_else(|| RedisError::Config(format!("node {node:?} is not host:port")))?;
    let port: u16 = port
        .parse()
        .map_err(|_| RedisError::Config(format!("node {node:?} has a bad port")))?;
    Ok(Server::new(host.to_owned(), port))
}

/// The fred builder for `cfg`: its URL, credentials and topology, then the
/// connection, timeout and reconnect settings this crate relies on (fail
/// fast, no command replay, unresponsive connections torn down).
pub(crate) fn fred_builder(cfg: &RedisConfig) -> Result<Builder, RedisError> {
    if cfg.pool_size == 0 {
        return Err(RedisError::Config("pool_size must be at least 1".into()));
    }
    let mut fc = fred_config(cfg)?;
    fc.fail_fast = true;
    let connect_timeout = Duration::from_millis(cfg.connect_timeout_ms.max(1));
    let command_timeout = Duration::from_millis(cfg.command_timeout_ms.max(1));
    let mut builder = Builder::from_config(fc);
    builder.with_connection_config(|c| {
        c.connection_timeout = connect_timeout;
        c.internal_command_timeout = connect_timeout;
        // Commands are never replayed by fred after a reconnect: retries are
        // decided here, per command, by idempotency.
        c.max_command_attempts = 1;
        c.tcp.nodelay = Some(true);
        // A connection that stops answering is torn down and reconnected.
        c.unresponsive.max_timeout = Some((command_timeout * 4).max(Duration::from_secs(2)));
        c.unresponsive.interval = Duration::from_millis(500);
    });
    builder.with_performance_config(|p| {
        p.default_command_timeout = command_timeout;
    });
    builder.set_policy(reconnect_policy(&cfg.reconnect));
    Ok(builder)
}

/// fred's config from the URL (`redis://`, `rediss://`, `redis-sentinel://`,
/// `redis-cluster://`, or the `valkey` spellings), with the credentials and
/// servers of the section taking precedence over the URL's.
fn fred_config(cfg: &RedisConfig) -> Result<FredConfig, RedisError> {
    let scheme = cfg.url.split_once("://").map(|(s, _)| s).unwrap_or("");
    if !(scheme.starts_with("redis") || scheme.starts_with("valkey")) {
        return Err(RedisError::Config(format!(
            "redis url {} must use redis://, rediss://, redis-sentinel:// or redis-cluster://",
            redact_url(&cfg.url)
        )));
    }
    let mut fc = FredConfig::from_url(&cfg.url).map_err(|e| {
        RedisError::Config(format!(
            "bad redis url {}: {}",
            redact_url(&cfg.url),
            e.details()
        ))
    })?;
    if let Some(user) = cfg.username.as_ref().filter(|u| !u.is_empty()) {
        fc.username = Some(user.clone());
    }
    if let Some(pw) = cfg.password.as_ref().filter(|p| !p.is_empty()) {
        fc.password = Some(pw.expose_secret().to_owned());
    }
    if let Some(server) = topology_servers(&cfg.topology)? {
        fc.server = server;
    }
    Ok(fc)
}

/// The servers of an explicit sentinel or cluster topology; `None` for
/// [`Topology::FromUrl`], which keeps the URL's.
fn topology_servers(topology: &Topology) -> Result<Option<ServerConfig>, RedisError> {
    let hosts = |nodes: &[String]| -> Result<Vec<Server>, RedisError> {
        nodes.iter().map(|n| parse_node(n)).collect()
    };
    match topology {
        Topology::FromUrl => Ok(None),
        Topology::Sentinel {
            nodes,
            service_name,
            sentinel_username,
            sentinel_password,
        } => {
            if nodes.is_empty() || service_name.is_empty() {
                return Err(RedisError::Config(
                    "sentinel topology needs nodes and a service_name".into(),
                ));
            }
            Ok(Some(ServerConfig::Sentinel {
                hosts: hosts(nodes)?,
                service_name: service_name.clone(),
                username: sentinel_username.clone(),
                password: sentinel_password
                    .as_ref()
                    .map(|p| p.expose_secret().to_owned()),
            }))
        }
        Topology::Cluster { nodes } => {
            if nodes.is_empty() {
                return Err(RedisError::Config(
                    "cluster topology needs at least one node".into(),
                ));
            }
            Ok(Some(ServerConfig::Clustered {
                hosts: hosts(nodes)?,
                policy: ClusterDiscoveryPolicy::default(),
            }))
        }
    }
}

/// Exponential backoff with jitter between reconnect attempts (every bound
/// at least 1).
fn reconnect_policy(r: &ReconnectConfig) -> ReconnectPolicy {
    let mut policy = ReconnectPolicy::new_exponential(
        r.max_attempts,
        r.initial_ms.max(1),
        r.max_ms.max(1),
        r.base.max(1),
    );
    policy.set_jitter(r.jitter_ms);
    policy
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_config() {
        let cfg = RedisConfig {
            pool_size: 0,
            ..Default::default()
        };
        assert!(fred_builder(&cfg).unwrap_err().is_invalid());
        let cfg = RedisConfig {
            url: "nope://x".into(),
            ..Default::default()
        };
        assert!(fred_builder(&cfg).unwrap_err().is_invalid());
        let cfg = RedisConfig {
            topology: Topology::Cluster {
                nodes: vec!["h1".into()],
            },
            ..Default::default()
        };
        assert!(fred_builder(&cfg).unwrap_err().is_invalid());
    }

    #[test]
    fn password_goes_to_fred_not_to_debug() {
        let cfg = RedisConfig {
            password: Some("hunter2".into()),
            ..Default::default()
        };
        let b = fred_builder(&cfg).unwrap();
        assert_eq!(b.get_config().unwrap().password.as_deref(), Some("hunter2"));
        assert!(!format!("{cfg:?}").contains("hunter2"));
    }
}
