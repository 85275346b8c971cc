//! [`SomabrainClient`]: calls, retries, breaker, metrics and spans.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::Rng;
use reqwest::StatusCode;
use reqwest::header::{
    AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, RETRY_AFTER,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use soma_observability::health::{CheckOptions, Criticality};
use soma_observability::http::REQUEST_ID_HEADER;
use soma_observability::resilience::{
    Backoff, BackoffConfig, BreakerState, CircuitBreaker, Jitter, Permit,
};
use soma_observability::{HealthRegistry, MetricsRegistry};
use tracing::Instrument;

use crate::Endpoint;
use crate::config::{RetryConfig, SomabrainConfig};
use crate::endpoint::EndpointGroup;
use crate::endpoint::Idempotency;
use crate::error::{Error, ErrorKind};
use crate::health::{COMPONENT, SomabrainHealthCheck};
use crate::metrics::ClientMetrics;
use crate::model::{
    AdaptationState, AggregateHealth, ContextRequest, ContextResponse, FeatureFlags,
    FeedbackRequest, FeedbackResponse, Liveness, Memory, MemoryMetrics, Readiness, RecallRequest,
    RecallResponse, RememberBatch, RememberBatchResponse, RememberResponse, WithNamespace,
    WithScope, WithTenantId,
};

/// `X-Tenant-ID`.
pub const TENANT_HEADER: HeaderName = HeaderName::from_static("x-tenant-id");
/// `X-Namespace`.
pub const NAMESPACE_HEADER: HeaderName = HeaderName::from_static("x-namespace");
/// `X-Soma-Fast-Ack`.
pub const FAST_ACK_HEADER: HeaderName = HeaderName::from_static("x-soma-fast-ack");

/// Adds headers to every outgoing request, e.g. the W3C `traceparent` of
/// the current trace. Called once per attempt.
pub type HeaderInjector = Arc<dyn Fn(&mut HeaderMap) + Send + Sync>;

/// Per-call options: scope, request id, deadline.
///
/// ```
/// use std::time::Duration;
/// use soma_somabrain::CallOptions;
/// let opts = CallOptions::new()
///     .tenant("acme")
///     .namespace("agent")
///     .request_id("turn-42")
///     .deadline(Duration::from_millis(300));
/// # let _ = opts;
/// ```
#[derive(Debug, Clone, Default)]
pub struct CallOptions {
    tenant: Option<String>,
    namespace: Option<String>,
    request_id: Option<String>,
    deadline: Option<Duration>,
    fast_ack: bool,
}

impl CallOptions {
    /// Defaults: the client's tenant and namespace, a fresh request id, the
    /// configured deadline.
    pub fn new() -> Self {
        Self::default()
    }

    /// The tenant of this call. It is sent as `X-Tenant-ID` *and* wherever
    /// the body or query names a tenant, so the two never disagree.
    pub fn tenant(mut self, tenant: impl Into<String>) -> Self {
        self.tenant = Some(tenant.into());
        self
    }

    /// The namespace of this call.
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = Some(namespace.into());
        self
    }

    /// The `X-Request-ID` (the same on every retry). Default: a new UUID.
    pub fn request_id(mut self, request_id: impl Into<String>) -> Self {
        self.request_id = Some(request_id.into());
        self
    }

    /// Deadline of the whole call, retries included.
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// Asks `remember` for an early acknowledgement (`X-Soma-Fast-Ack:
    /// true`): the server acks after the working-memory admit and queues the
    /// long-term persist (the response then says `queued_for_ltm` and warns
    /// `ltm-persist:queued-async`). Ignored by other calls.
    pub fn fast_ack(mut self, fast_ack: bool) -> Self {
        self.fast_ack = fast_ack;
        self
    }
}

/// Builds a [`SomabrainClient`].
pub struct SomabrainClientBuilder {
    config: SomabrainConfig,
    metrics: Option<MetricsRegistry>,
    health: Option<HealthRegistry>,
    injector: Option<HeaderInjector>,
}

impl fmt::Debug for SomabrainClientBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SomabrainClientBuilder")
            .field("config", &self.config)
            .field("metrics", &self.metrics.is_some())
            .field("health", &self.health.is_some())
            .field("injector", &self.injector.is_some())
            .finish()
    }
}

impl SomabrainClientBuilder {
    /// Registers the client's metrics in `registry`.
    pub fn metrics(mut self, registry: &MetricsRegistry) -> Self {
        self.metrics = Some(registry.clone());
        self
    }

    /// Reports the component [`somabrain`](crate::COMPONENT) in `registry`
    /// as [`Criticality::Optional`] (SomaBrain down makes the service
    /// degraded, not unready): [`SomabrainHealthCheck`] runs in the
    /// background every [`health_interval_ms`](SomabrainConfig::health_interval_ms)
    /// with a [`health_timeout_ms`](SomabrainConfig::health_timeout_ms)
    /// timeout. [`build`](Self::build) then needs a tokio runtime. To
    /// register it as required, register a [`SomabrainHealthCheck`] yourself.
    pub fn health(mut self, registry: &HealthRegistry) -> Self {
        self.health = Some(registry.clone());
        self
    }

    /// Adds headers to every request (trace context propagation).
    pub fn header_injector(
        mut self,
        injector: impl Fn(&mut HeaderMap) + Send + Sync + 'static,
    ) -> Self {
        self.injector = Some(Arc::new(injector));
        self
    }

    /// Builds the client. Fails on an unusable configuration (bad URL,
    /// prefix, token or scope). With [`health`](Self::health), registers
    /// the health check (within a tokio runtime).
    pub fn build(self) -> Result<SomabrainClient, Error> {
        let cfg = self.config;
        let urls = endpoint_urls(&cfg)?;
        let auth = auth_header(&cfg)?;
        check_default_scope(&cfg)?;
        let http = http_client(&cfg)?;
        let metrics = self.metrics.as_ref().map(ClientMetrics::new);
        let breakers = EndpointGroup::ALL.map(|group| {
            let breaker = CircuitBreaker::new(group.component(), cfg.breaker);
            match &self.metrics {
                Some(registry) => breaker.metrics(registry),
                None => breaker,
            }
        });
        let client = SomabrainClient {
            inner: Arc::new(Inner {
                http,
                urls,
                auth,
                default_tenant: cfg.default_tenant.clone(),
                default_namespace: cfg.default_namespace.clone(),
                retry: cfg.retry.clone(),
                request_timeout: cfg.request_timeout(),
                call_deadline: cfg.call_deadline(),
                breakers,
                memory_backend: AtomicU8::new(BACKEND_UNKNOWN),
                metrics,
                injector: self.injector,
            }),
        };
        if let Some(registry) = &self.health {
            let options = CheckOptions::new(
                Duration::from_millis(cfg.health_interval_ms.max(10)),
                Duration::from_millis(cfg.health_timeout_ms.max(10)),
            );
            registry.register_check(
                COMPONENT,
                Criticality::Optional,
                SomabrainHealthCheck::new(client.clone()),
                options,
            );
        }
        Ok(client)
    }
}

/// The URL of every endpoint: `base_url`, then `path_prefix` (API routes
/// only; probes live at the server root), then the endpoint's path. Fails
/// on a `base_url` that is not `http(s)://host[:port]` or a malformed
/// `path_prefix`.
fn endpoint_urls(cfg: &SomabrainConfig) -> Result<[String; Endpoint::ALL.len()], Error> {
    let base = cfg.base_url.trim_end_matches('/');
    let parsed = reqwest::Url::parse(base)
        .map_err(|e| Error::config(format!("base_url {base:?} is not a URL: {e}")))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
        return Err(Error::config(format!(
            "base_url {base:?} must be http(s)://host[:port]"
        )));
    }
    // A path in base_url would apply to some routes and not others
    // (probes live at the server root): refuse it, point at path_prefix.
    if parsed.path() != "/" || parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(Error::config(format!(
            "base_url {base:?} must not have a path, query or fragment; \
             put the API mount point in path_prefix (e.g. \"/api\")"
        )));
    }
    let prefix = cfg.path_prefix.trim_end_matches('/');
    if !(prefix.is_empty() || prefix.starts_with('/')) || prefix.contains(['?', '#']) {
        return Err(Error::config(format!(
            "path_prefix {:?} must be empty or start with '/' (e.g. \"/api\")",
            cfg.path_prefix
        )));
    }
    Ok(Endpoint::ALL.map(|ep| {
        let p = if ep.is_probe() { "" } else { prefix };
        format!("{base}{p}{}", ep.path())
    }))
}

/// `Authorization: Bearer <token>`, marked sensitive; `None` without a token.
fn auth_header(cfg: &SomabrainConfig) -> Result<Option<HeaderValue>, Error> {
    if cfg.token.is_empty() {
        return Ok(None);
    }
    let mut v = HeaderValue::from_str(&format!("Bearer {}", cfg.token.expose_secret()))
        .map_err(|_| Error::config("token contains characters not allowed in a header"))?;
    v.set_sensitive(true);
    Ok(Some(v))
}

/// The default tenant and namespace must be usable as header values.
fn check_default_scope(cfg: &SomabrainConfig) -> Result<(), Error> {
    for (what, v) in [
        ("default_tenant", &cfg.default_tenant),
        ("default_namespace", &cfg.default_namespace),
    ] {
        header_value(None, what, v).map_err(|_| {
            Error::config(format!(
                "{what} must be a non-empty header-safe string, got {v:?}"
            ))
        })?;
    }
    Ok(())
}

/// The connection pool, with the section's timeouts and pool sizes.
fn http_client(cfg: &SomabrainConfig) -> Result<reqwest::Client, Error> {
    reqwest::Client::builder()
        .connect_timeout(cfg.connect_timeout())
        .pool_max_idle_per_host(cfg.pool_max_idle_per_host)
        .pool_idle_timeout(Duration::from_millis(cfg.pool_idle_timeout_ms))
        .tcp_nodelay(true)
        // Settings come from the config section only, never from
        // HTTP(S)_PROXY in the environment.
        .no_proxy()
        .build()
        .map_err(|e| Error::config("HTTP client could not be built").with_source(e))
}

/// A SomaBrain client. Cheap to clone (clones share the connection pool,
/// breaker and metrics); use one per process and call it concurrently —
/// nothing serializes calls.
///
/// See the [crate docs](crate) for the guarantees.
#[derive(Clone)]
pub struct SomabrainClient {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    urls: [String; Endpoint::ALL.len()],
    auth: Option<HeaderValue>,
    default_tenant: String,
    default_namespace: String,
    retry: RetryConfig,
    request_timeout: Duration,
    call_deadline: Duration,
    breakers: [CircuitBreaker; EndpointGroup::ALL.len()],
    /// What the last `/health` this client read said about the server's
    /// memory backend (`BACKEND_*`).
    memory_backend: AtomicU8,
    metrics: Option<ClientMetrics>,
    injector: Option<HeaderInjector>,
}

const BACKEND_UNKNOWN: u8 = 0;
const BACKEND_OK: u8 = 1;
const BACKEND_DOWN: u8 = 2;

impl fmt::Debug for SomabrainClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SomabrainClient")
            .field("api", &self.inner.urls[0])
            .field("default_tenant", &self.inner.default_tenant)
            .field("default_namespace", &self.inner.default_namespace)
            .field("breakers", &self.inner.breakers)
            .finish_non_exhaustive()
    }
}

/// A request ready to send (everything but per-attempt headers).
struct Call {
    endpoint: Endpoint,
    tenant: Option<HeaderValue>,
    namespace: Option<HeaderValue>,
    query: Vec<(&'static str, String)>,
    body: Option<Bytes>,
    fast_ack: bool,
    /// A non-2xx status whose body is still the answer (readyz's 503).
    also_ok: Option<StatusCode>,
}

fn header_value(endpoint: Option<Endpoint>, what: &str, v: &str) -> Result<HeaderValue, Error> {
    if v.is_empty() {
        return Err(Error::invalid(
            endpoint,
            format!("{what} must not be empty"),
        ));
    }
    HeaderValue::from_str(v).map_err(|_| {
        Error::invalid(
            endpoint,
            format!("{what} {v:?} is not a valid header value"),
        )
    })
}

impl SomabrainClient {
    /// A client from its configuration section, without metrics.
    pub fn new(config: SomabrainConfig) -> Result<Self, Error> {
        Self::builder(config).build()
    }

    /// A builder, to add metrics or a trace-context injector.
    pub fn builder(config: SomabrainConfig) -> SomabrainClientBuilder {
        SomabrainClientBuilder {
            config,
            metrics: None,
            health: None,
            injector: None,
        }
    }

    /// The current state of `group`'s circuit breaker.
    pub fn breaker_state(&self, group: EndpointGroup) -> BreakerState {
        self.breaker(group).state()
    }

    /// The circuit breaker guarding `group` (component
    /// [`EndpointGroup::component`]).
    pub fn breaker(&self, group: EndpointGroup) -> &CircuitBreaker {
        &self.inner.breakers[group.index()]
    }

    /// The tenant a call with `opts` uses.
    pub fn tenant_of<'a>(&'a self, opts: &'a CallOptions) -> &'a str {
        opts.tenant.as_deref().unwrap_or(&self.inner.default_tenant)
    }

    /// The namespace a call with `opts` uses.
    pub fn namespace_of<'a>(&'a self, opts: &'a CallOptions) -> &'a str {
        opts.namespace
            .as_deref()
            .unwrap_or(&self.inner.default_namespace)
    }

    // ---- memory -------------------------------------------------------

    /// `POST /memory/remember`: stores one memory under the call's tenant
    /// and namespace. Retried on transient failures (the write is keyed, so
    /// a repeat overwrites). Check the response's `warnings`.
    pub async fn remember(
        &self,
        memory: &Memory,
        opts: CallOptions,
    ) -> Result<RememberResponse, Error> {
        let ep = Endpoint::Remember;
        let permit = self.admit(ep, &opts)?;
        memory.validate().map_err(|m| Error::invalid(Some(ep), m))?;
        let (tenant, namespace) = (self.tenant_of(&opts), self.namespace_of(&opts));
        let body = json(
            ep,
            &WithScope {
                tenant,
                namespace,
                body: memory,
            },
        )?;
        let call = self.call(ep, &opts, true, true, body)?;
        let fast_ack = opts.fast_ack;
        let mut resp: RememberResponse = self
            .execute(Call { fast_ack, ..call }, permit, &opts)
            .await?;
        resp.memory_backend_down = self.memory_backend_down() == Some(true);
        if resp.memory_backend_down {
            tracing::warn!(key = %memory.key, "somabrain acknowledged remember while its /health reports memory_ok: false; the write is not confirmed");
        }
        if !resp.warnings.is_empty() {
            tracing::warn!(key = %memory.key, warnings = ?resp.warnings, "somabrain remember answered with warnings");
        }
        Ok(resp)
    }

    /// `POST /memory/remember/batch`: stores several memories in one call.
    pub async fn remember_batch(
        &self,
        batch: &RememberBatch,
        opts: CallOptions,
    ) -> Result<RememberBatchResponse, Error> {
        let ep = Endpoint::RememberBatch;
        let permit = self.admit(ep, &opts)?;
        if batch.items.is_empty() {
            return Err(Error::invalid(Some(ep), "a batch needs at least one item"));
        }
        for (i, m) in batch.items.iter().enumerate() {
            m.validate()
                .map_err(|e| Error::invalid(Some(ep), format!("item {i}: {e}")))?;
        }
        let (tenant, namespace) = (self.tenant_of(&opts), self.namespace_of(&opts));
        let body = json(
            ep,
            &WithScope {
                tenant,
                namespace,
                body: batch,
            },
        )?;
        let call = self.call(ep, &opts, true, true, body)?;
        let mut resp: RememberBatchResponse = self.execute(call, permit, &opts).await?;
        resp.memory_backend_down = self.memory_backend_down() == Some(true);
        if resp.memory_backend_down {
            tracing::warn!(
                items = resp.results.len(),
                "somabrain acknowledged a batch remember while its /health reports memory_ok: false; the writes are not confirmed"
            );
        }
        if resp.warnings().next().is_some() {
            tracing::warn!(warnings = ?resp.warnings().collect::<Vec<_>>(), "somabrain batch remember answered with warnings");
        }
        Ok(resp)
    }

    /// `POST /memory/recall`. The server reads the tenant from
    /// `X-Tenant-ID` (set to the call's tenant) and the namespace from the
    /// body. See [`RecallResponse`] for the working-memory quirks.
    pub async fn recall(
        &self,
        request: &RecallRequest,
        opts: CallOptions,
    ) -> Result<RecallResponse, Error> {
        let ep = Endpoint::Recall;
        let permit = self.admit(ep, &opts)?;
        if request.query.is_empty() {
            return Err(Error::invalid(Some(ep), "recall query must not be empty"));
        }
        // The server silently answers top_k 0 as 1: refuse it here instead.
        if request.top_k == 0 {
            return Err(Error::invalid(Some(ep), "recall top_k must be at least 1"));
        }
        let namespace = self.namespace_of(&opts);
        let body = json(
            ep,
            &WithNamespace {
                body: request,
                namespace,
            },
        )?;
        let call = self.call(ep, &opts, true, true, body)?;
        self.execute(call, permit, &opts).await
    }

    /// `GET /memory/metrics?tenant=&namespace=`.
    pub async fn memory_metrics(&self, opts: CallOptions) -> Result<MemoryMetrics, Error> {
        let ep = Endpoint::MemoryMetrics;
        let permit = self.admit(ep, &opts)?;
        let mut call = self.call(ep, &opts, true, true, None)?;
        call.query = vec![
            ("tenant", self.tenant_of(&opts).to_owned()),
            ("namespace", self.namespace_of(&opts).to_owned()),
        ];
        self.execute(call, permit, &opts).await
    }

    // ---- context ------------------------------------------------------

    /// `POST /context/evaluate` (the platform's "context build"). Not
    /// retried except when the connection was refused.
    pub async fn context_evaluate(
        &self,
        request: &ContextRequest,
        opts: CallOptions,
    ) -> Result<ContextResponse, Error> {
        let ep = Endpoint::ContextEvaluate;
        let permit = self.admit(ep, &opts)?;
        let body = json(
            ep,
            &WithTenantId {
                body: request,
                tenant_id: self.tenant_of(&opts),
            },
        )?;
        let call = self.call(ep, &opts, true, false, body)?;
        self.execute(call, permit, &opts).await
    }

    /// `POST /context/feedback` (the platform's "reward update"). Not
    /// retried except when the connection was refused (a reward applied
    /// twice would skew the weights).
    pub async fn context_feedback(
        &self,
        request: &FeedbackRequest,
        opts: CallOptions,
    ) -> Result<FeedbackResponse, Error> {
        let ep = Endpoint::ContextFeedback;
        let permit = self.admit(ep, &opts)?;
        if !request.utility.is_finite() || request.reward.is_some_and(|r| !r.is_finite()) {
            return Err(Error::invalid(
                Some(ep),
                "utility and reward must be finite numbers",
            ));
        }
        let body = json(
            ep,
            &WithTenantId {
                body: request,
                tenant_id: self.tenant_of(&opts),
            },
        )?;
        let call = self.call(ep, &opts, true, false, body)?;
        self.execute(call, permit, &opts).await
    }

    /// `GET /context/adaptation/state?tenant_id=` (the platform's "weights").
    pub async fn adaptation_state(&self, opts: CallOptions) -> Result<AdaptationState, Error> {
        let ep = Endpoint::AdaptationState;
        let permit = self.admit(ep, &opts)?;
        let mut call = self.call(ep, &opts, true, false, None)?;
        call.query = vec![("tenant_id", self.tenant_of(&opts).to_owned())];
        self.execute(call, permit, &opts).await
    }

    /// `GET /context/feature-flags` (no auth, no tenant).
    pub async fn feature_flags(&self, opts: CallOptions) -> Result<FeatureFlags, Error> {
        let permit = self.admit(Endpoint::FeatureFlags, &opts)?;
        let call = self.call(Endpoint::FeatureFlags, &opts, false, false, None)?;
        self.execute(call, permit, &opts).await
    }

    // ---- probes -------------------------------------------------------

    /// `GET /healthz`. Probes are never refused by a breaker (they are how
    /// recovery is noticed) and are always sent to the server root; their
    /// outcomes move the [`EndpointGroup::Operator`] breaker.
    pub async fn healthz(&self) -> Result<Liveness, Error> {
        let opts = CallOptions::default();
        let call = self.call(Endpoint::Healthz, &opts, false, false, None)?;
        self.execute(call, None, &opts).await
    }

    /// `GET /readyz`. A 503 carrying a readiness body is an answer
    /// (`status: degraded`), not an error.
    pub async fn readyz(&self) -> Result<Readiness, Error> {
        let opts = CallOptions::default();
        let mut call = self.call(Endpoint::Readyz, &opts, false, false, None)?;
        call.also_ok = Some(StatusCode::SERVICE_UNAVAILABLE);
        self.execute(call, None, &opts).await
    }

    /// `GET /health` (aggregate; always 200, read `status`).
    ///
    /// The answer's [`memory_ok`](AggregateHealth::memory_ok) is also kept
    /// by the client ([`memory_backend_down`](Self::memory_backend_down)):
    /// while the last `/health` read said `memory_ok: false`, remember
    /// results are marked unconfirmed
    /// ([`RememberResponse::memory_backend_down`]).
    pub async fn health(&self) -> Result<AggregateHealth, Error> {
        let opts = CallOptions::default();
        let call = self.call(Endpoint::Health, &opts, false, false, None)?;
        let health: AggregateHealth = self.execute(call, None, &opts).await?;
        let state = match health.memory_ok() {
            Some(true) => BACKEND_OK,
            Some(false) => BACKEND_DOWN,
            None => BACKEND_UNKNOWN,
        };
        self.inner.memory_backend.store(state, Ordering::Relaxed);
        Ok(health)
    }

    /// What the last `/health` this client read (through
    /// [`health`](Self::health), which the registered
    /// [health check](crate::SomabrainHealthCheck) calls on its schedule)
    /// said about SomaBrain's own memory backend: `Some(true)` when it
    /// reported `memory_ok: false`, `Some(false)` when `memory_ok: true`,
    /// `None` before any read or when the field was absent.
    ///
    /// The real server keeps acknowledging remember with
    /// `persisted_to_ltm: true` while its backend is down, so this is the
    /// only signal; it is as fresh as the last health check.
    pub fn memory_backend_down(&self) -> Option<bool> {
        match self.inner.memory_backend.load(Ordering::Relaxed) {
            BACKEND_OK => Some(false),
            BACKEND_DOWN => Some(true),
            _ => None,
        }
    }

    // ---- machinery ----------------------------------------------------

    fn call(
        &self,
        endpoint: Endpoint,
        opts: &CallOptions,
        tenant: bool,
        namespace: bool,
        body: Option<Bytes>,
    ) -> Result<Call, Error> {
        let ep = Some(endpoint);
        let tenant = tenant
            .then(|| header_value(ep, "tenant", self.tenant_of(opts)))
            .transpose()?;
        let namespace = namespace
            .then(|| header_value(ep, "namespace", self.namespace_of(opts)))
            .transpose()?;
        Ok(Call {
            endpoint,
            tenant,
            namespace,
            query: Vec::new(),
            body,
            fast_ack: false,
            also_ok: None,
        })
    }

    /// Asks the breaker for permission, before any work is done for the
    /// call (so a refused call costs one lock and a counter increment).
    #[inline]
    fn admit(&self, ep: Endpoint, opts: &CallOptions) -> Result<Option<Permit>, Error> {
        match self.breaker(ep.group()).try_acquire() {
            Ok(p) => Ok(Some(p)),
            Err(_) => {
                if let Some(m) = &self.inner.metrics {
                    m.circuit_open(ep);
                }
                Err(Error::circuit_open(ep).with_request_id(opts.request_id.as_deref()))
            }
        }
    }

    async fn execute<T: DeserializeOwned>(
        &self,
        call: Call,
        permit: Option<Permit>,
        opts: &CallOptions,
    ) -> Result<T, Error> {
        let ep = call.endpoint;
        let request_id = match &opts.request_id {
            Some(id) => header_value(Some(ep), "request id", id)?,
            // A v4 UUID from the thread-local RNG (no syscall per call).
            None => {
                let id = uuid::Builder::from_random_bytes(rand::rng().random()).into_uuid();
                let mut buf = uuid::Uuid::encode_buffer();
                HeaderValue::from_str(id.hyphenated().encode_lower(&mut buf))
                    .unwrap_or_else(|_| HeaderValue::from_static("invalid"))
            }
        };
        let span = tracing::info_span!(
            "somabrain.call",
            otel.kind = "client",
            endpoint = ep.path(),
            tenant = call.tenant.as_ref().and_then(|t| t.to_str().ok()),
            request_id = request_id.to_str().unwrap_or_default(),
            http.status_code = tracing::field::Empty,
            attempts = tracing::field::Empty,
        );
        let started = Instant::now();
        let deadline = opts.deadline.unwrap_or(self.inner.call_deadline);
        let result = self
            .attempts::<T>(&call, &request_id, started, deadline)
            .instrument(span.clone())
            .await;
        let (status, attempts): (Cow<'static, str>, u32) = match &result {
            Ok((_, status, n)) => (status_label(*status), *n),
            Err(e) => (
                match e.status() {
                    Some(s) => status_label(s),
                    None => Cow::Borrowed(match e.kind() {
                        ErrorKind::Timeout => "timeout",
                        ErrorKind::Decode => "decode_error",
                        ErrorKind::InvalidRequest => "invalid_request",
                        _ => "transport",
                    }),
                },
                e.attempts(),
            ),
        };
        span.record("http.status_code", &*status);
        span.record("attempts", attempts);
        if let Some(m) = &self.inner.metrics {
            m.call(ep, status, started.elapsed());
        }
        // Probes hold no permit (never refused); their outcome is recorded
        // on the operator group's breaker all the same.
        let failed = result
            .as_ref()
            .err()
            .is_some_and(Error::counts_as_breaker_failure);
        match permit {
            Some(p) if failed => p.failure(),
            Some(p) => p.success(),
            None if ep.is_probe() && failed => self.breaker(ep.group()).record_failure(),
            None if ep.is_probe() => self.breaker(ep.group()).record_success(),
            None => {}
        }
        result
            .map(|(value, _, _)| value)
            .map_err(|e| e.with_request_id(request_id.to_str().ok()))
    }

    async fn attempts<T: DeserializeOwned>(
        &self,
        call: &Call,
        request_id: &HeaderValue,
        started: Instant,
        deadline: Duration,
    ) -> Result<(T, StatusCode, u32), Error> {
        let ep = call.endpoint;
        let retry = &self.inner.retry;
        let mut attempt: u32 = 0;
        loop {
            attempt += 1;
            let remaining = deadline.saturating_sub(started.elapsed());
            if remaining.is_zero() {
                let mut e = Error::new(ErrorKind::Timeout, Some(ep))
                    .with_message(format!("call deadline of {deadline:?} expired"));
                e.set_attempts(attempt - 1);
                return Err(e);
            }
            let (err, connect_refused) = match self.attempt::<T>(call, request_id, remaining).await
            {
                Ok((v, status)) => return Ok((v, status, attempt)),
                Err(e) => e,
            };
            let mut err = err;
            err.set_attempts(attempt);
            let retryable = match call.endpoint.idempotency() {
                _ if connect_refused => true,
                Idempotency::Safe => is_transient(&err),
                Idempotency::Unsafe => false,
            };
            if !retryable || attempt > retry.max_retries {
                return Err(err);
            }
            let delay = match err.retry_after() {
                Some(ra) if ra > Duration::from_millis(retry.max_retry_after_ms) => {
                    tracing::debug!(retry_after = ?ra, "server asked to wait longer than allowed; not retrying");
                    return Err(err);
                }
                Some(ra) => ra.max(full_jitter(retry, attempt)),
                None => full_jitter(retry, attempt),
            };
            if started.elapsed() + delay >= deadline {
                return Err(err);
            }
            tracing::debug!(error = %err, attempt, delay_ms = delay.as_millis() as u64, "retrying somabrain call");
            if let Some(m) = &self.inner.metrics {
                m.retry(ep);
            }
            tokio::time::sleep(delay).await;
        }
    }

    /// One attempt. The error side says whether the connection was refused
    /// (the request never reached the server).
    async fn attempt<T: DeserializeOwned>(
        &self,
        call: &Call,
        request_id: &HeaderValue,
        remaining: Duration,
    ) -> Result<(T, StatusCode), (Error, bool)> {
        let ep = call.endpoint;
        let inner = &*self.inner;
        let mut req = inner
            .http
            .request(ep.method(), &inner.urls[ep.index()])
            .timeout(inner.request_timeout.min(remaining));
        let mut headers = HeaderMap::with_capacity(8);
        if ep.needs_auth() {
            if let Some(auth) = &inner.auth {
                headers.insert(AUTHORIZATION, auth.clone());
            }
        }
        if let Some(t) = &call.tenant {
            headers.insert(TENANT_HEADER, t.clone());
        }
        if let Some(n) = &call.namespace {
            headers.insert(NAMESPACE_HEADER, n.clone());
        }
        headers.insert(REQUEST_ID_HEADER, request_id.clone());
        if call.fast_ack {
            headers.insert(FAST_ACK_HEADER, HeaderValue::from_static("true"));
        }
        // W3C trace context of the current span (the call's span, whose
        // parent is the caller's): nothing is written without telemetry.
        soma_observability::propagation::inject_current(&mut headers);
        if let Some(inject) = &inner.injector {
            inject(&mut headers);
        }
        if let Some(body) = &call.body {
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            req = req.body(body.clone());
        }
        if !call.query.is_empty() {
            req = req.query(&call.query);
        }
        let resp = match req.headers(headers).send().await {
            Ok(r) => r,
            Err(e) => return Err(transport_error(ep, e)),
        };
        let status = resp.status();
        let retry_after = resp.headers().get(RETRY_AFTER).and_then(parse_retry_after);
        let body = match resp.bytes().await {
            Ok(b) => b,
            Err(e) => return Err(transport_error(ep, e)),
        };
        if status.is_success() || call.also_ok == Some(status) {
            return match serde_json::from_slice::<T>(&body) {
                Ok(v) => Ok((v, status)),
                Err(e) if status.is_success() => Err((Error::decode(ep, status, e), false)),
                Err(_) => Err((Error::from_status(ep, status, &body, retry_after), false)),
            };
        }
        Err((Error::from_status(ep, status, &body, retry_after), false))
    }
}

fn transport_error(ep: Endpoint, e: reqwest::Error) -> (Error, bool) {
    if e.is_timeout() {
        return (
            Error::new(ErrorKind::Timeout, Some(ep)).with_source(e),
            false,
        );
    }
    let refused = e.is_connect() && !e.is_timeout();
    let msg = if refused {
        "connection failed"
    } else {
        "request failed"
    };
    (
        Error::new(ErrorKind::Transport, Some(ep))
            .with_message(msg)
            .with_source(e),
        refused,
    )
}

/// Outcomes worth another attempt for a safe call.
fn is_transient(e: &Error) -> bool {
    match e.kind() {
        ErrorKind::Transport | ErrorKind::Timeout => true,
        ErrorKind::Server | ErrorKind::Rejected => matches!(
            e.status(),
            Some(
                StatusCode::REQUEST_TIMEOUT
                    | StatusCode::TOO_MANY_REQUESTS
                    | StatusCode::BAD_GATEWAY
                    | StatusCode::SERVICE_UNAVAILABLE
                    | StatusCode::GATEWAY_TIMEOUT
            )
        ),
        _ => false,
    }
}

/// Full jitter: uniform in `[0, min(max, initial * 2^(attempt-1))]` — the
/// shared [`Backoff`] with [`Jitter::Full`].
fn full_jitter(retry: &RetryConfig, attempt: u32) -> Duration {
    Backoff::new(BackoffConfig::new(retry.initial_ms, retry.max_ms).with_jitter(Jitter::Full))
        .delay(attempt)
}

/// `Retry-After`: delay-seconds or an HTTP date.
pub(crate) fn parse_retry_after(v: &HeaderValue) -> Option<Duration> {
    let s = v.to_str().ok()?.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let secs: f64 = s
        .parse()
        .ok()
        .filter(|f: &f64| f.is_finite() && *f >= 0.0)
        .map_or_else(
            || {
                let at = chrono::DateTime::parse_from_rfc2822(s).ok()?;
                let ms = (at.with_timezone(&chrono::Utc) - chrono::Utc::now()).num_milliseconds();
                Some(ms.max(0) as f64 / 1000.0)
            },
            Some,
        )?;
    Some(Duration::from_secs_f64(secs))
}

fn status_label(s: StatusCode) -> Cow<'static, str> {
    match s.as_u16() {
        200 => Cow::Borrowed("200"),
        n => Cow::Owned(n.to_string()),
    }
}

fn json<T: Serialize>(ep: Endpoint, body: &T) -> Result<Option<Bytes>, Error> {
    serde_json::to_vec(body)
        .map(|v| Some(Bytes::from(v)))
        .map_err(|e| Error::invalid(Some(ep), "request body did not serialize").with_source(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_forms() {
        assert_eq!(
            parse_retry_after(&HeaderValue::from_static("2")),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            parse_retry_after(&HeaderValue::from_static("0.25")),
            Some(Duration::from_millis(250))
        );
        assert_eq!(
            parse_retry_after(&HeaderValue::from_static("Sun, 06 Nov 1994 08:49:37 GMT")),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after(&HeaderValue::from_static("soon")), None);
    }

    #[test]
    fn jitter_stays_under_the_cap() {
        let r = RetryConfig {
            initial_ms: 10,
            max_ms: 25,
            ..RetryConfig::default()
        };
        for attempt in 1..10 {
            let cap = Duration::from_millis((10u64 << (attempt - 1)).min(25));
            let delays: Vec<Duration> = (0..200).map(|_| full_jitter(&r, attempt)).collect();
            assert!(delays.iter().all(|d| *d <= cap));
            // Spread over the whole range, not stuck at zero or the cap:
            // the chance that 200 uniform draws all miss a half is 2^-200.
            assert!(delays.iter().any(|d| *d * 2 > cap), "{delays:?}");
            assert!(delays.iter().any(|d| *d * 2 < cap), "{delays:?}");
        }
    }

    #[test]
    fn retry_backoff_keys_are_the_shared_spelling_and_old_keys_still_read() {
        let new: RetryConfig =
            serde_json::from_str(r#"{ "initial_ms": 7, "max_ms": 70 }"#).unwrap();
        let old: RetryConfig =
            serde_json::from_str(r#"{ "initial_backoff_ms": 7, "max_backoff_ms": 70 }"#).unwrap();
        for c in [new, old] {
            assert_eq!((c.initial_ms, c.max_ms), (7, 70));
            assert_eq!(c.max_retries, RetryConfig::default().max_retries);
        }
    }

    #[test]
    fn config_errors_are_typed() {
        let bad = |f: fn(&mut SomabrainConfig)| {
            let mut c = SomabrainConfig::default();
            f(&mut c);
            SomabrainClient::new(c).unwrap_err()
        };
        assert_eq!(
            bad(|c| c.base_url = "not a url".into()).kind(),
            ErrorKind::Config
        );
        assert_eq!(
            bad(|c| c.path_prefix = "api".into()).kind(),
            ErrorKind::Config
        );
        assert_eq!(
            bad(|c| c.default_tenant = String::new()).kind(),
            ErrorKind::Config
        );
        assert_eq!(bad(|c| c.token = "a\nb".into()).kind(), ErrorKind::Config);
        for with_path in [
            "http://127.0.0.1:30101/api",
            "http://127.0.0.1:30101/api/",
            "http://127.0.0.1:30101/?x=1",
        ] {
            let e = SomabrainClient::new(SomabrainConfig {
                base_url: with_path.into(),
                ..SomabrainConfig::default()
            })
            .unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Config, "{with_path}");
            assert!(e.to_string().contains("path_prefix"), "{e}");
        }
        // A trailing slash alone is not a path.
        SomabrainClient::new(SomabrainConfig {
            base_url: "http://127.0.0.1:30101/".into(),
            ..SomabrainConfig::default()
        })
        .expect("trailing slash accepted");
    }
}
