//! The chat gateway: authenticated, authorized, rate-limited, idempotent
//! message intake, and an SSE stream of reply events.
//!
//! | Route | Action | What it does |
//! |---|---|---|
//! | `POST /v1/conversations/{id}/messages` | `conversation.send` | Accepts `{"text": …}`, publishes it durably (Kafka, or the outbox when Kafka is down), answers `202` with the message id. An `Idempotency-Key` header (scoped per tenant and subject) makes retries return the first answer, and derives the message id from (tenant, subject, key). |
//! | `GET /v1/conversations/{id}/events` | `conversation.read` | Server-sent events `assistant.started`, `assistant.delta`, `assistant.completed`, `error` and `tool.result` for that conversation: from the moment of connecting, or, with `Last-Event-ID`, every event after that id still kept (replayed from the session event store, then live). While a reply is generated, `assistant.preview` events without an `id:` carry the reply so far (best effort, never replayed; see [`LiveEvent`]). Heartbeat comments every `chat.sse_heartbeat_ms`. |
//!
//! Every request passes, in order: the request id (`x-request-id`: a
//! client's valid id is kept, else a new one; echoed on the response) →
//! metrics and tracing → authentication (JWT
//! or API key; `401`) → rate limit per tenant and route (`429`) →
//! authorization through the embedded Rego policy (`403`, or `503` when no
//! decision can be had) → the handler, which authorizes the action again
//! with the conversation's owner (see [`crate::conversations`]): another
//! subject or tenant gets `403`.
//!
//! The operator routes (runtime config, features, SomaBrain, DLQ) are
//! mounted from [`crate::operator`] inside the same layers, the probes
//! (`/live`, `/ready`, `/healthz`, `/v1/health`) outside authentication.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, State};
use axum::http::{HeaderMap, Request, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use soma_bus::{BusConsumer, ConsumerHandle, Envelope, HandlerError, PublishOutcome};
use soma_config::Live;
use soma_observability::http::{HttpMetricsLayer, Problem, RequestId, RequestIdLayer, TraceLayer};
use soma_observability::metrics::MetricsRegistry;
use soma_observability::prometheus_client::metrics::counter::Counter;
use soma_observability::prometheus_client::metrics::family::Family;
use soma_observability::shutdown::Shutdown;
use soma_policy::{
    ApiKeyStore, Authenticator, AuthnLayer, Authorizer, AuthzInput, AuthzLayer, PgApiKeyStore,
    PolicyMetrics, Principal, RequestInfo, Resource, RouteMap, RouteRule,
};
use soma_redis::rate_limit::{RateLimitKey, RateLimitLayer};
use soma_redis::{
    Idempotency, IdempotencyKey, IdempotencyLayer, IdempotencyOptions, IdempotencyScope, RateLimit,
    RateLimiter, RedisClient,
};
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use crate::PlatformError;
use crate::conversations::Conversations;
use crate::operator::Operator;
use crate::protocol::{self, ChatEvent, ChatRequest, LiveEvent};
use crate::runtime::{KafkaRole, Runtime};
use crate::session_events::SessionEvents;
use crate::settings::PlatformSettings;

/// Route template of message intake.
pub const MESSAGES_ROUTE: &str = "/v1/conversations/{id}/messages";
/// Route template of the SSE stream.
pub const EVENTS_ROUTE: &str = "/v1/conversations/{id}/events";
/// Header carrying a client's idempotency key.
pub const IDEMPOTENCY_KEY: &str = soma_redis::IDEMPOTENCY_KEY_HEADER;
/// Response header set when a stored response is replayed.
pub const IDEMPOTENT_REPLAYED: &str = soma_redis::IDEMPOTENT_REPLAYED_HEADER;
/// The `Idempotency-Key` rule (soma-redis's, which the layer applies).
pub use soma_redis::{InvalidIdempotencyKey, idempotency_key};

/// The routes the gateway maps to policy actions. Anything else is denied.
pub fn routes() -> Vec<RouteRule> {
    vec![
        RouteRule::new("POST", MESSAGES_ROUTE, "conversation.send", "conversation")
            .with_id_param("id"),
        RouteRule::new("GET", EVENTS_ROUTE, "conversation.read", "conversation")
            .with_id_param("id"),
    ]
}

/// `202 Accepted` body of message intake (also what an idempotent retry
/// gets back, byte for byte).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accepted {
    /// The message's id (its envelope id).
    pub message_id: Uuid,
    /// The conversation.
    pub conversation_id: String,
    /// `kafka` (acknowledged by the broker) or `deferred` (committed to the
    /// outbox; the relay delivers it when Kafka is back).
    pub delivery: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SendMessage {
    text: String,
}

/// An event as the gateway's SSE hub holds it.
#[derive(Debug)]
struct HubEvent {
    tenant: String,
    event: ChatEvent,
}

type ChannelKey = (String, String);
type Channels = HashMap<ChannelKey, broadcast::Sender<Arc<HubEvent>>>;

/// The gateway's live fan-out: one broadcast channel per `(tenant,
/// conversation)` that has subscribers, created by the first and dropped
/// with the last. A busy conversation fills only its own channel, so it
/// cannot push other conversations' streams behind.
struct Hub {
    buffer: usize,
    channels: std::sync::Mutex<Channels>,
}

impl Hub {
    fn new(buffer: usize) -> Arc<Self> {
        Arc::new(Self {
            buffer,
            channels: std::sync::Mutex::new(HashMap::new()),
        })
    }

    fn channels(&self) -> std::sync::MutexGuard<'_, Channels> {
        self.channels.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hands `event` to its conversation's subscribers, if any.
    fn publish(&self, event: HubEvent) {
        let key = (event.tenant.clone(), event.event.conversation_id.clone());
        let tx = self.channels().get(&key).cloned();
        if let Some(tx) = tx {
            // Every receiver gone since the lookup: nobody to tell.
            let _ = tx.send(Arc::new(event));
        }
    }

    fn subscribe(self: &Arc<Self>, tenant: &str, conversation_id: &str) -> Subscription {
        let key = (tenant.to_owned(), conversation_id.to_owned());
        let rx = self
            .channels()
            .entry(key.clone())
            .or_insert_with(|| broadcast::channel(self.buffer).0)
            .subscribe();
        Subscription {
            rx,
            hub: self.clone(),
            key,
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.channels().len()
    }
}

/// One stream's receiver; dropping the last one of a conversation drops
/// its channel.
struct Subscription {
    rx: broadcast::Receiver<Arc<HubEvent>>,
    hub: Arc<Hub>,
    key: ChannelKey,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut channels = self.hub.channels();
        // `self.rx` is still alive here: it is the last when the count is 1.
        if channels
            .get(&self.key)
            .is_some_and(|tx| tx.receiver_count() <= 1)
        {
            channels.remove(&self.key);
        }
    }
}

type CauseFamily = Family<Vec<(&'static str, &'static str)>, Counter>;

/// The SSE streams' metrics.
#[derive(Clone)]
struct SseMetrics {
    /// `soma_platform_sse_resumes_total{cause}`.
    resumes: CauseFamily,
    /// `soma_platform_sse_resets_total`.
    resets: Counter,
}

impl SseMetrics {
    fn new(registry: &MetricsRegistry) -> Self {
        Self {
            resumes: registry.counter_family(
                "soma_platform_sse_resumes_total",
                "SSE streams caught up from the session event store, by cause: \
                 last_event_id (a reconnect), lagged (fell behind chat.sse_buffer), \
                 gap (a live event beyond the next expected id)",
            ),
            resets: registry
                .counter_family::<Vec<(&'static str, &'static str)>>(
                    "soma_platform_sse_resets_total",
                    "event: reset sent: the events after a client's Last-Event-ID are no \
                     longer kept (retention) or never existed",
                )
                .get_or_create(&Vec::new())
                .clone(),
        }
    }

    fn resumed(&self, cause: &'static str) {
        self.resumes.get_or_create(&vec![("cause", cause)]).inc();
    }
}

struct Shared {
    settings: Arc<PlatformSettings>,
    authz: Arc<Authorizer>,
    conversations: Conversations,
    runtime_publisher: soma_bus::DurablePublisher,
    hub: Arc<Hub>,
    store: SessionEvents,
    sse_metrics: SseMetrics,
    lifecycle: Shutdown,
}

/// A running gateway.
pub struct Gateway {
    runtime: Runtime,
    addr: SocketAddr,
    events: Option<ConsumerHandle>,
    live: Option<JoinHandle<()>>,
    live_stop: CancellationToken,
    server: Option<JoinHandle<()>>,
    stop: CancellationToken,
    redis: RedisClient,
    workspace: Option<crate::workspace::Workspace>,
    operator: Operator,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("addr", &self.addr)
            .field("admin_addr", &self.runtime.admin_addr)
            .finish_non_exhaustive()
    }
}

impl Gateway {
    /// Starts the gateway: the API on `api`, admin endpoints on `admin`.
    pub async fn start(
        live: Live<PlatformSettings>,
        api: TcpListener,
        admin: TcpListener,
    ) -> Result<Self, PlatformError> {
        let runtime = Runtime::start(live, admin, KafkaRole::PublishOnly, "gateway").await?;
        let settings = runtime.settings.clone();

        let redis = connect_redis(&runtime).await?;
        let rate_limit = rate_limit_layer(&redis, &settings)?;
        let idempotency = idempotency_layer(&redis, &settings)?;
        let policy_metrics = PolicyMetrics::new(&runtime.metrics);
        let authn = authenticator(&settings, policy_metrics.clone()).await?;
        let authz = Arc::new(runtime.authorizer(policy_metrics)?);
        let routes = route_map(&settings)?;

        let hub = Hub::new(settings.chat.sse_buffer);
        let events = spawn_hub(&runtime, hub.clone())?;
        let live_stop = CancellationToken::new();
        let live = spawn_live_previews(&runtime, &redis, hub.clone(), live_stop.clone());

        let (workspace, workspace_routes) =
            crate::workspace::Workspace::start(&runtime, &redis, authz.clone()).await?;
        let shared = Arc::new(Shared {
            settings: settings.clone(),
            authz: authz.clone(),
            conversations: runtime.conversations.clone(),
            runtime_publisher: runtime.publisher.clone(),
            hub,
            store: runtime.session_events.clone(),
            sse_metrics: SseMetrics::new(&runtime.metrics),
            lifecycle: runtime.lifecycle.clone(),
        });
        let operator = Operator::start(&runtime, authz.clone()).await?;
        let guarded = Router::new()
            .route(MESSAGES_ROUTE, post(post_message).layer(idempotency))
            .route(EVENTS_ROUTE, get(events_stream))
            .merge(workspace_routes)
            .merge(operator.router())
            .route_layer(AuthzLayer::new(authz, Arc::new(routes)))
            .route_layer(rate_limit)
            .layer(AuthnLayer::new(Arc::new(authn)));
        let app = around_the_api(guarded, &runtime, &settings).with_state(shared);

        let addr = api.local_addr().map_err(|source| PlatformError::Bind {
            addr: "api".into(),
            source,
        })?;
        let (stop, server) = serve_api(api, app);
        tracing::info!(event = "gateway_started", %addr, admin = %runtime.admin_addr);
        Ok(Self {
            runtime,
            addr,
            events: Some(events),
            live,
            live_stop,
            server: Some(server),
            stop,
            redis,
            workspace: Some(workspace),
            operator,
        })
    }

    /// Where the API listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where `/live`, `/ready`, `/v1/health` and `/metrics` listen.
    pub fn admin_addr(&self) -> SocketAddr {
        self.runtime.admin_addr
    }

    /// The shared runtime (metrics, health, outbox, publisher).
    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    /// The shutdown sequence (see [`Runtime::lifecycle`]): readiness down,
    /// the drain delay, then stop accepting and finish in-flight requests
    /// (SSE streams end with a `shutdown` event telling the client to
    /// reconnect), stop the SSE hub's consumer and the live-preview
    /// subscription, close Redis, and shut the
    /// runtime down (publisher flush before the pool closes, relay, admin).
    /// Every stage shares the one `shutdown.deadline_ms`.
    pub async fn shutdown(mut self) {
        let lifecycle = self.runtime.lifecycle.clone();
        lifecycle.begin();
        lifecycle.drain_delay().await;
        self.stop.cancel();
        if let Some(server) = self.server.take() {
            let abort = server.abort_handle();
            if !lifecycle
                .stage("http", async {
                    let _ = server.await;
                })
                .await
            {
                // Requests still running past the deadline are cut: their
                // clients got no answer, so nothing they sent was accepted
                // unless its publish had already completed.
                abort.abort();
            }
        }
        if let Some(e) = self.events.take() {
            lifecycle
                .stage("sse_hub", async {
                    e.shutdown().await;
                })
                .await;
        }
        if let Some(w) = self.workspace.take() {
            lifecycle
                .stage("workspace", async {
                    w.shutdown().await;
                })
                .await;
        }
        self.operator.shutdown();
        self.live_stop.cancel();
        if let Some(l) = self.live.take() {
            lifecycle
                .stage("live_previews", async {
                    let _ = l.await;
                })
                .await;
        }
        lifecycle
            .stage("redis", async {
                let _ = self.redis.quit().await;
            })
            .await;
        self.runtime.shutdown().await;
    }
}

/// The gateway's Redis client, given its connect timeout to come up.
/// Without Redis the gateway still starts: rate-limited routes answer 503
/// (fail closed) and health shows `redis` down until it connects.
async fn connect_redis(runtime: &Runtime) -> Result<RedisClient, PlatformError> {
    let settings = &runtime.settings;
    let redis = RedisClient::builder(settings.redis.clone())
        .metrics(&runtime.metrics)
        .health(&runtime.health)
        .connect_lazy()
        .await?;
    if let Err(error) = redis
        .wait_connected(Duration::from_millis(settings.redis.connect_timeout_ms))
        .await
    {
        tracing::warn!(event = "redis_unavailable_at_start", %error);
    }
    Ok(redis)
}

/// The rate limit per tenant and route (`chat.rate_limit` per
/// `chat.rate_window_secs`), applied after authentication.
fn rate_limit_layer(
    redis: &RedisClient,
    settings: &PlatformSettings,
) -> Result<RateLimitLayer<Body>, PlatformError> {
    let limiter = RateLimiter::new(
        redis,
        RateLimit::per(
            settings.chat.rate_limit,
            Duration::from_secs(settings.chat.rate_window_secs),
        ),
    )?;
    Ok(RateLimitLayer::new(limiter, |req: &Request<Body>| {
        let principal = req.extensions().get::<Principal>()?;
        let route = req.extensions().get::<MatchedPath>()?;
        Some(RateLimitKey {
            tenant: principal.tenant.clone(),
            route: format!("{} {}", req.method(), route.as_str()),
        })
    }))
}

/// Retries with an `Idempotency-Key` get the first answer; the key belongs
/// to the caller (tenant and subject), so the layer sits inside
/// authentication and the policy, on the one route.
fn idempotency_layer(
    redis: &RedisClient,
    settings: &PlatformSettings,
) -> Result<IdempotencyLayer<Body>, PlatformError> {
    Ok(IdempotencyLayer::new(
        Idempotency::new(redis, IdempotencyOptions::default())?,
        |req: &Request<Body>| {
            let principal = req.extensions().get::<Principal>()?;
            Some(IdempotencyScope {
                tenant: principal.tenant.clone(),
                subject: principal.subject.clone(),
            })
        },
    )
    .max_body_bytes(settings.http.max_body_bytes))
}

/// Authentication from the `policy` section: JWTs of its issuers, and API
/// keys looked up in PostgreSQL (the key table is migrated here).
async fn authenticator(
    settings: &PlatformSettings,
    metrics: PolicyMetrics,
) -> Result<Authenticator, PlatformError> {
    // Its own small pool: API-key lookups (one per unknown key) must not
    // take the connections the outbox and its fallback need.
    let keys = PgApiKeyStore::from_config(&settings.postgres.url, &settings.policy.api_keys)
        .await
        .map_err(|e| PlatformError::Policy(e.to_string()))?;
    keys.migrate()
        .await
        .map_err(|e| PlatformError::Policy(e.to_string()))?;
    let keys: Arc<dyn ApiKeyStore> = Arc::new(keys);
    Authenticator::builder(&settings.policy)
        .api_key_store(keys)
        .metrics(metrics)
        .build()
        .map_err(|e| PlatformError::Policy(e.to_string()))
}

/// Every guarded route's policy action: the chat routes, the workspace's,
/// the operator's, then the ones `policy.routes` adds.
fn route_map(settings: &PlatformSettings) -> Result<RouteMap, PlatformError> {
    let mut rules = routes();
    rules.extend(crate::workspace::routes());
    rules.extend(crate::operator::routes());
    rules.extend(settings.policy.routes.iter().cloned());
    RouteMap::new(rules).map_err(|e| PlatformError::Policy(e.to_string()))
}

/// What surrounds the guarded routes: the probes (outside
/// authentication), the 404 and 405 answers, the body limit, load
/// shedding, the concurrency limit and the request timeout, then metrics,
/// traces and, outermost, the request id.
fn around_the_api(
    guarded: Router<Arc<Shared>>,
    runtime: &Runtime,
    settings: &PlatformSettings,
) -> Router<Arc<Shared>> {
    guarded
        // Outside authentication: the probes.
        .merge(crate::operator::probes(&runtime.health))
        .fallback(|| async { Problem::not_found("no such route") })
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(settings.http.max_body_bytes))
        .layer(
            tower::ServiceBuilder::new()
                .layer(axum::error_handling::HandleErrorLayer::new(overload_answer))
                .load_shed()
                .concurrency_limit(settings.http.max_concurrent_requests)
                .timeout(Duration::from_millis(settings.http.request_timeout_ms)),
        )
        .layer(HttpMetricsLayer::new(&runtime.metrics))
        .layer(TraceLayer::from_config(&settings.telemetry))
        // Outermost: one id per request, which the span, the policy
        // input and audit record, and the published message all carry.
        .layer(RequestIdLayer::new())
}

/// Serves the API on `api` in a task until the returned token is cancelled
/// (then in-flight requests finish).
fn serve_api(api: TcpListener, app: Router) -> (CancellationToken, JoinHandle<()>) {
    let stop = CancellationToken::new();
    let s = stop.clone();
    let server = tokio::spawn(async move {
        let serve =
            // With the peer address in the extensions, so soma-policy's
            // failed-API-key limiter works per client.
            axum::serve(api, app.into_make_service_with_connect_info::<SocketAddr>())
                .with_graceful_shutdown(async move { s.cancelled().await });
        if let Err(e) = serve.await {
            tracing::error!(event = "api_server_failed", error = %e);
        }
    });
    (stop, server)
}

/// Reply events reach every gateway replica (broadcast group), which fans
/// them out to its SSE clients per conversation. The gateway does not
/// write the session event store: the worker stored each event, with its
/// number, before publishing it.
fn spawn_hub(runtime: &Runtime, hub: Arc<Hub>) -> Result<ConsumerHandle, PlatformError> {
    let handler = move |env: Envelope| {
        let hub = hub.clone();
        async move {
            let event: ChatEvent = env
                .json()
                .map_err(|e| HandlerError::fatal(format!("undecodable reply event: {e}")))?;
            // No SSE client connected is not an error.
            hub.publish(HubEvent {
                tenant: env.tenant.clone(),
                event,
            });
            Ok(())
        }
    };
    let settings = &runtime.settings;
    Ok(BusConsumer::builder(
        &settings.bus,
        &[settings.chat.events_topic.as_str()],
        "sse-hub",
        handler,
    )
    .group(runtime.group("gateway-events"))
    .producer(runtime.producer.clone())
    .metrics(&runtime.metrics)
    // No `.health()`: it would make the hub a required component, and a
    // gateway whose SSE streams are quiet because Kafka is down should
    // still accept messages (into the outbox). The `kafka` component says
    // that Kafka is down.
    .broadcast()
    // At-least-once on the bus, once on SSE: a reply event redelivered
    // (same envelope id) is dropped here, before any stream sees it.
    .dedupe_window(settings.chat.sse_dedupe_window)
    .spawn()?)
}

/// Live previews (Redis pub/sub, see [`crate::live`]) go to the same
/// per-conversation channels as the stored events; `None` when
/// `chat.live_previews` is off.
fn spawn_live_previews(
    runtime: &Runtime,
    redis: &RedisClient,
    hub: Arc<Hub>,
    stop: CancellationToken,
) -> Option<JoinHandle<()>> {
    let chat = &runtime.settings.chat;
    chat.live_previews.then(|| {
        crate::live::spawn_forwarder(
            redis.clone(),
            chat,
            &runtime.metrics,
            stop,
            move |l: LiveEvent| {
                hub.publish(HubEvent {
                    tenant: l.tenant,
                    event: l.event,
                })
            },
        )
    })
}

/// What the overload layers' errors answer: `504` when a request ran past
/// `http.request_timeout_ms`, `503` when `http.max_concurrent_requests` were
/// already in flight (load is shed at once instead of queueing without
/// bound, so a stuck dependency cannot pile requests up until memory runs
/// out). Problem bodies, like every other error.
async fn overload_answer(err: tower::BoxError) -> Response {
    if err.is::<tower::timeout::error::Elapsed>() {
        problem(
            StatusCode::GATEWAY_TIMEOUT,
            "request_timeout",
            "the request did not complete in time; retry it with the same Idempotency-Key",
        )
    } else if err.is::<tower::load_shed::error::Overloaded>() {
        problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            "too many requests in flight; retry shortly",
        )
    } else {
        tracing::error!(event = "request_failed", error = %err);
        Problem::internal().into_response()
    }
}

/// The gateway's error answer: a [`Problem`] body (`title` the status's
/// reason, `code` the stable machine code).
fn problem(status: StatusCode, code: &str, detail: &str) -> Response {
    Problem::new(status, code, detail).into_response()
}

/// What a known route answers to a method it does not serve: `405`, a
/// problem body like every other error (axum's default is plain text).
async fn method_not_allowed(req: Request<Body>) -> Response {
    Problem::method_not_allowed(format!(
        "{} is not allowed on {}",
        req.method(),
        req.uri().path()
    ))
    .into_response()
}

/// A request body axum could not read: `413 body_too_large` past
/// `http.max_body_bytes` (axum answers in plain text by itself), otherwise
/// `400 invalid_body`.
fn body_rejection(e: &BytesRejection) -> Response {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        problem(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            "the request body is larger than the gateway accepts",
        )
    } else {
        problem(StatusCode::BAD_REQUEST, "invalid_body", &e.body_text())
    }
}

/// `Some(400 invalid_conversation_id)` unless `id` is a valid conversation id.
fn reject_conversation_id(id: &str) -> Option<Response> {
    (!protocol::valid_conversation_id(id)).then(|| {
        problem(
            StatusCode::BAD_REQUEST,
            "invalid_conversation_id",
            "conversation ids are 1-128 characters of [A-Za-z0-9_-]",
        )
    })
}

/// The request's one id, set by the outermost [`RequestIdLayer`] (always
/// visible ASCII, so never empty here).
fn id_str(id: &RequestId) -> &str {
    id.header_value().to_str().unwrap_or_default()
}

async fn post_message(
    State(gw): State<Arc<Shared>>,
    Extension(principal): Extension<Principal>,
    Extension(request_id): Extension<RequestId>,
    Path(conversation_id): Path<String>,
    key: Option<Extension<IdempotencyKey>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    if let Some(r) = reject_conversation_id(&conversation_id) {
        return r;
    }
    let msg = match parse_message(&gw.settings, body) {
        Ok(m) => m,
        Err(r) => return r,
    };

    if let Err(r) = authorize_owner(
        &gw,
        &principal,
        OwnerCheck::SEND,
        &conversation_id,
        &request_id,
    )
    .await
    {
        return r;
    }

    // Validated by the idempotency layer on this route (a malformed key
    // was answered 400 there).
    let key = key.map(|Extension(k)| k);
    let request = ChatRequest {
        conversation_id: conversation_id.clone(),
        text: msg.text,
        principal: principal.clone(),
        request_id: id_str(&request_id).to_owned(),
    };
    let envelope = match message_envelope(&principal, &conversation_id, &request, key.as_ref()) {
        Ok(e) => e,
        Err(r) => return r,
    };
    // The publish runs in its own task: a client that disconnects (or the
    // request timeout) drops this handler, not the publish, which completes
    // (with a key, the idempotency layer stores its answer for the
    // client's retry). It stays in the request's span, so the message
    // carries the request's trace.
    let publish = tokio::spawn(
        publish_message(
            gw.runtime_publisher.clone(),
            gw.settings.chat.requests_topic.clone(),
            envelope,
            conversation_id,
        )
        .instrument(tracing::Span::current()),
    );
    match publish.await {
        Ok(Ok(accepted)) => (StatusCode::ACCEPTED, axum::Json(accepted)).into_response(),
        Ok(Err(answer)) => answer,
        Err(e) => {
            tracing::error!(event = "publish_task_failed", error = %e);
            Problem::internal().into_response()
        }
    }
}

/// The message of a `POST`: a JSON `{"text": …}` body, not blank, of at
/// most `chat.max_message_bytes`; else the answer (400, 413).
// The Err is the handler's answer, returned as it is.
#[allow(clippy::result_large_err)]
fn parse_message(
    settings: &PlatformSettings,
    body: Result<Bytes, BytesRejection>,
) -> Result<SendMessage, Response> {
    let body = match body {
        Ok(b) => b,
        Err(e) => return Err(body_rejection(&e)),
    };
    let msg: SendMessage = match serde_json::from_slice(&body) {
        Ok(m) => m,
        Err(e) => {
            return Err(problem(
                StatusCode::BAD_REQUEST,
                "invalid_body",
                &format!("expected {{\"text\": string}}: {e}"),
            ));
        }
    };
    if msg.text.trim().is_empty() {
        return Err(problem(
            StatusCode::BAD_REQUEST,
            "empty_message",
            "text is empty",
        ));
    }
    if msg.text.len() > settings.chat.max_message_bytes {
        return Err(problem(
            StatusCode::PAYLOAD_TOO_LARGE,
            "message_too_large",
            &format!(
                "text is {} bytes; the limit is {}",
                msg.text.len(),
                settings.chat.max_message_bytes
            ),
        ));
    }
    Ok(msg)
}

/// The envelope that carries `request` to the workers; else the answer
/// (400). A retry with the same key publishes the same envelope id, so even
/// a retry the key store no longer remembers is one message to the worker's
/// inbox.
// The Err is the handler's answer, returned as it is.
#[allow(clippy::result_large_err)]
fn message_envelope(
    principal: &Principal,
    conversation_id: &str,
    request: &ChatRequest,
    key: Option<&IdempotencyKey>,
) -> Result<Envelope, Response> {
    let id = match key {
        Some(k) => message_id_for(&principal.tenant, &principal.subject, k.as_str()),
        None => Uuid::now_v7(),
    };
    Envelope::builder(
        protocol::MESSAGE_RECEIVED,
        principal.tenant.as_str(),
        conversation_id,
    )
    .id(id)
    .json(request)
    .and_then(|b| b.correlation_id(request.request_id.as_str()).build())
    .map_err(|e| problem(StatusCode::BAD_REQUEST, "invalid_message", &e.to_string()))
}

/// The envelope id of the message sent with Idempotency-Key `key` by
/// `subject` of `tenant`: the first 128 bits of a SHA-256 over the three
/// (as a version-8 UUID), so every retry of one request publishes the
/// same id, and the same key of another subject or tenant another one.
pub fn message_id_for(tenant: &str, subject: &str, key: &str) -> Uuid {
    let mut h = Sha256::new();
    for part in ["soma-platform/message", tenant, subject, key] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    let digest = h.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_custom_bytes(bytes).into_uuid()
}

/// Publishes an accepted message (Kafka, or the outbox when Kafka is
/// down). Runs to the end whatever happens to the request that started it.
async fn publish_message(
    publisher: soma_bus::DurablePublisher,
    topic: String,
    envelope: Envelope,
    conversation_id: String,
) -> Result<Accepted, Response> {
    let delivery = match publisher.publish(&topic, &envelope).await {
        Ok(PublishOutcome::Published { .. }) => "kafka",
        Ok(PublishOutcome::Deferred(_)) => "deferred",
        Err(e) => {
            // Neither Kafka nor the outbox took it: nothing was accepted.
            tracing::error!(event = "message_not_accepted", error = %e);
            return Err(problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "bus_unavailable",
                "the message was not accepted; retry later",
            ));
        }
    };
    Ok(Accepted {
        message_id: envelope.id,
        conversation_id,
        delivery: delivery.to_owned(),
    })
}

/// The action and route of an ownership check.
#[derive(Debug, Clone, Copy)]
struct OwnerCheck {
    action: &'static str,
    method: &'static str,
    route: &'static str,
}

impl OwnerCheck {
    const SEND: Self = Self {
        action: "conversation.send",
        method: "POST",
        route: MESSAGES_ROUTE,
    };
    const READ: Self = Self {
        action: "conversation.read",
        method: "GET",
        route: EVENTS_ROUTE,
    };
}

/// Authorizes `check.action` on the conversation again, now with its owner
/// (`context.owner`, `context.resource_tenant`) from the ownership store;
/// the first to use a conversation id becomes its owner (see
/// [`crate::conversations`]). `Err` is the answer: `403 forbidden` (another
/// subject or tenant), `503` when the store or the policy cannot answer.
async fn authorize_owner(
    gw: &Shared,
    principal: &Principal,
    check: OwnerCheck,
    conversation_id: &str,
    request_id: &RequestId,
) -> Result<(), Response> {
    let owner = gw
        .conversations
        .owner_or_claim(conversation_id, &principal.tenant, &principal.subject)
        .await
        .map_err(|e| {
            tracing::warn!(event = "conversation_store_unavailable", error = %e);
            problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "conversation_store_unavailable",
                "cannot check the conversation's owner right now; retry later",
            )
        })?;
    let input = AuthzInput::new(
        principal,
        check.action,
        Resource {
            kind: "conversation".into(),
            id: Some(conversation_id.to_owned()),
        },
    )
    .with_request(RequestInfo {
        method: check.method.to_owned(),
        route: check.route.to_owned(),
        request_id: Some(id_str(request_id).to_owned()),
    })
    .with_context("owner", owner.subject)
    .with_context("resource_tenant", owner.tenant);
    match gw.authz.check(&input).await {
        Ok(d) if d.allow => Ok(()),
        Ok(d) => Err(problem(
            StatusCode::FORBIDDEN,
            "forbidden",
            &format!("{} denied: {}", check.action, d.reasons.join(", ")),
        )),
        Err(e) => Err(problem(
            e.status(),
            e.code(),
            "the policy engine is unavailable",
        )),
    }
}

/// Request header with the id of the last event an SSE client saw.
pub const LAST_EVENT_ID: &str = "last-event-id";

/// Stored events read per query when a stream replays or catches up.
const REPLAY_PAGE: u32 = 500;

type SseItem = Result<Event, axum::Error>;

/// What a [`Session`] sends next.
#[derive(Debug, Clone, PartialEq)]
enum Out {
    Chat(ChatEvent),
    Reset {
        last_event_id: u64,
        resumed_after: u64,
    },
    Shutdown,
    Unavailable,
}

impl Out {
    fn into_sse(self) -> SseItem {
        match self {
            Out::Chat(e) => sse_event(&e),
            Out::Reset {
                last_event_id,
                resumed_after,
            } => reset_event(last_event_id, resumed_after),
            Out::Shutdown => Event::default()
                .event("shutdown")
                .retry(Duration::from_millis(1_000))
                .json_data(serde_json::json!({ "reconnect": true })),
            Out::Unavailable => Event::default()
                .event("unavailable")
                .retry(Duration::from_millis(1_000))
                .json_data(serde_json::json!({ "reconnect": true })),
        }
    }
}

fn sse_event(e: &ChatEvent) -> SseItem {
    let ev = Event::default().event(e.kind.sse_name());
    // An event that was not stored (`event_id` 0) has no id to resume from.
    let ev = if e.event_id > 0 {
        ev.id(e.event_id.to_string())
    } else {
        ev
    };
    ev.json_data(e)
}

/// `event: reset`: the events after `last_event_id` up to `resumed_after`
/// are no longer kept (retention) or never existed; the stream goes on
/// after `resumed_after` (also its `id`, so a reconnect resumes there).
fn reset_event(last_event_id: u64, resumed_after: u64) -> SseItem {
    Event::default()
        .event("reset")
        .id(resumed_after.to_string())
        .json_data(serde_json::json!({
            "last_event_id": last_event_id,
            "resumed_after": resumed_after,
        }))
}

/// One SSE stream: replay from the session event store after the client's
/// `Last-Event-ID`, then live from the conversation's channel. Event ids
/// are dense per conversation, so the stream tells exactly what it has
/// sent (`last`): a live event at or below it is a duplicate (dropped), one
/// beyond `last + 1` means something was missed (a lagged channel, or an
/// event that reached the channel before this stream subscribed) and the
/// stream catches up from the store first. So every event once, in order.
///
/// Live previews (no event id) pass straight through, except one of a
/// message whose final event this stream already sent (a late preview must
/// not reopen an answered message).
struct Session {
    sub: Subscription,
    store: SessionEvents,
    metrics: SseMetrics,
    lifecycle: Shutdown,
    tenant: String,
    conversation_id: String,
    last: u64,
    pending: VecDeque<Out>,
    done: bool,
    /// The messages whose final event this stream sent last.
    answered: VecDeque<Uuid>,
}

/// Answered messages a stream remembers, to drop their late previews.
const ANSWERED_KEPT: usize = 64;

impl Session {
    fn new(sub: Subscription, gw: &Shared, tenant: String, conversation_id: String) -> Self {
        Self {
            sub,
            store: gw.store.clone(),
            metrics: gw.sse_metrics.clone(),
            lifecycle: gw.lifecycle.clone(),
            tenant,
            conversation_id,
            last: 0,
            pending: VecDeque::new(),
            done: false,
            answered: VecDeque::new(),
        }
    }

    /// Positions a new stream: from now on (after the newest stored event),
    /// or after the client's `Last-Event-ID` `resume_from`, with the stored
    /// events since queued. An id this conversation never had gets an
    /// `event: reset` and the stream goes on after the newest.
    async fn start(
        &mut self,
        resume_from: Option<u64>,
    ) -> Result<(), crate::session_events::SessionEventsError> {
        let bounds = self
            .store
            .bounds(&self.tenant, &self.conversation_id)
            .await?;
        match resume_from {
            None => {
                self.last = bounds.head;
                Ok(())
            }
            Some(after) if after > bounds.head => {
                self.metrics.resets.inc();
                self.pending.push_back(Out::Reset {
                    last_event_id: after,
                    resumed_after: bounds.head,
                });
                self.last = bounds.head;
                Ok(())
            }
            Some(after) => {
                self.metrics.resumed("last_event_id");
                self.last = after;
                self.catch_up().await
            }
        }
    }

    /// Queues the stored events after `last` (with an `event: reset` first
    /// when the oldest of them is no longer kept).
    async fn catch_up(&mut self) -> Result<(), crate::session_events::SessionEventsError> {
        let bounds = self
            .store
            .bounds(&self.tenant, &self.conversation_id)
            .await?;
        let first_kept = bounds.oldest.unwrap_or(bounds.head + 1);
        if self.last + 1 < first_kept {
            self.metrics.resets.inc();
            self.pending.push_back(Out::Reset {
                last_event_id: self.last,
                resumed_after: first_kept - 1,
            });
            self.last = first_kept - 1;
        }
        loop {
            let rows = self
                .store
                .after(&self.tenant, &self.conversation_id, self.last, REPLAY_PAGE)
                .await?;
            let full = rows.len() as u32 == REPLAY_PAGE;
            for e in rows {
                if e.event_id > self.last {
                    self.last = e.event_id;
                    self.pending.push_back(Out::Chat(e));
                }
            }
            if !full {
                return Ok(());
            }
        }
    }

    /// Catches up from the store; when the store cannot be read, ends the
    /// stream with `event: unavailable` and a `retry:` so the client
    /// reconnects with `Last-Event-ID` (nothing is lost, only later).
    async fn resume(&mut self, cause: &'static str) {
        self.metrics.resumed(cause);
        if let Err(e) = self.catch_up().await {
            tracing::warn!(event = "sse_resume_failed", error = %e);
            self.done = true;
            self.pending.push_back(Out::Unavailable);
        }
    }

    /// The next thing to send; remembers the messages it answers.
    async fn next(&mut self) -> Option<Out> {
        let out = self.next_out().await?;
        if let Out::Chat(e) = &out {
            if e.kind.is_final() {
                if self.answered.len() == ANSWERED_KEPT {
                    self.answered.pop_front();
                }
                self.answered.push_back(e.message_id);
            }
        }
        Some(out)
    }

    async fn next_out(&mut self) -> Option<Out> {
        loop {
            if let Some(e) = self.pending.pop_front() {
                return Some(e);
            }
            if self.done {
                return None;
            }
            let received = tokio::select! {
                biased;
                _ = self.lifecycle.draining() => {
                    // Shutting down: end the stream telling the client to
                    // reconnect (to another replica, or this one once
                    // restarted) with `Last-Event-ID`.
                    self.done = true;
                    return Some(Out::Shutdown);
                }
                r = self.sub.rx.recv() => r,
            };
            match received {
                Ok(e) => {
                    let id = e.event.event_id;
                    if id == 0 {
                        if self.answered.contains(&e.event.message_id) {
                            continue;
                        }
                        return Some(Out::Chat(e.event.clone()));
                    }
                    if id <= self.last {
                        continue;
                    }
                    if id == self.last + 1 {
                        self.last = id;
                        return Some(Out::Chat(e.event.clone()));
                    }
                    self.resume("gap").await;
                    if !self.done && id > self.last {
                        // Live has what the store does not (yet): send it
                        // rather than hold the stream back.
                        tracing::warn!(event = "sse_gap_not_in_store", after = self.last, id);
                        self.last = id;
                        self.pending.push_back(Out::Chat(e.event.clone()));
                    }
                }
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    // Further behind than `chat.sse_buffer`: resumed from the
                    // store instead of being cut off.
                    tracing::debug!(event = "sse_lagged_resumed", missed);
                    self.resume("lagged").await;
                }
                Err(broadcast::error::RecvError::Closed) => self.done = true,
            }
        }
    }
}

/// A `Last-Event-ID` that is not an id this API sends.
#[derive(Debug, thiserror::Error)]
#[error("Last-Event-ID must be the id of an event this API sent (a decimal integer)")]
pub struct InvalidLastEventId;

impl IntoResponse for InvalidLastEventId {
    fn into_response(self) -> Response {
        problem(
            StatusCode::BAD_REQUEST,
            "invalid_last_event_id",
            &self.to_string(),
        )
    }
}

/// Parses `Last-Event-ID`: `Ok(None)` when absent or empty; ids are
/// decimal integers up to 2^63-1 (PostgreSQL `BIGINT`).
pub fn last_event_id(headers: &HeaderMap) -> Result<Option<u64>, InvalidLastEventId> {
    let Some(v) = headers.get(LAST_EVENT_ID) else {
        return Ok(None);
    };
    match v.to_str().map(str::trim) {
        Ok("") => Ok(None),
        Ok(s) if s.bytes().all(|b| b.is_ascii_digit()) => s
            .parse::<u64>()
            .ok()
            .filter(|n| *n <= i64::MAX as u64)
            .map(Some)
            .ok_or(InvalidLastEventId),
        _ => Err(InvalidLastEventId),
    }
}

async fn events_stream(
    State(gw): State<Arc<Shared>>,
    Extension(principal): Extension<Principal>,
    Extension(request_id): Extension<RequestId>,
    Path(conversation_id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(r) = reject_conversation_id(&conversation_id) {
        return r;
    }
    let resume_from = match last_event_id(&headers) {
        Ok(v) => v,
        Err(e) => return e.into_response(),
    };
    if let Err(r) = authorize_owner(
        &gw,
        &principal,
        OwnerCheck::READ,
        &conversation_id,
        &request_id,
    )
    .await
    {
        return r;
    }
    // Subscribed before the store is read: an event is in the replay, or
    // on the channel, or both (then dropped by id) — never in neither.
    let sub = gw.hub.subscribe(&principal.tenant, &conversation_id);
    let mut session = Session::new(sub, &gw, principal.tenant, conversation_id);
    if let Err(e) = session.start(resume_from).await {
        tracing::warn!(event = "sse_store_unavailable", error = %e);
        return problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "session_store_unavailable",
            "cannot read the conversation's events right now; retry later",
        );
    }
    let stream = futures::stream::unfold(session, |mut s| async move {
        s.next().await.map(|e| (e.into_sse(), s))
    });
    Sse::new(stream)
        .keep_alive(
            KeepAlive::new()
                .interval(Duration::from_millis(gw.settings.chat.sse_heartbeat_ms))
                .text("heartbeat"),
        )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(LAST_EVENT_ID, HeaderValue::from_str(v).unwrap());
        h
    }

    #[test]
    fn last_event_id_is_a_decimal_integer() {
        assert_eq!(last_event_id(&HeaderMap::new()).unwrap(), None);
        assert_eq!(last_event_id(&headers("")).unwrap(), None);
        assert_eq!(last_event_id(&headers("42")).unwrap(), Some(42));
        assert_eq!(last_event_id(&headers(" 7 ")).unwrap(), Some(7));
        for bad in [
            "-1",
            "abc",
            "1.5",
            "0x10",
            "99999999999999999999",
            "9223372036854775808",
        ] {
            let r = last_event_id(&headers(bad)).unwrap_err().into_response();
            assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{bad}");
        }
    }

    /// A stream whose conversation channel overflowed (`chat.sse_buffer` =
    /// 1, three events sent before it reads) is caught up from the store:
    /// every event once, in order, nothing cut off. Real PostgreSQL.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lagged_stream_is_resumed_from_the_store_without_a_gap() {
        soma_testkit::require_postgres();
        let pool = sqlx::PgPool::connect(&soma_testkit::postgres_url())
            .await
            .expect("PostgreSQL (start it with `cargo xtask stack up`)");
        let schema = soma_testkit::unique_name("sse_lag");
        let store = SessionEvents::new(pool.clone(), &schema).unwrap();
        store.migrate().await.unwrap();
        let mut events: Vec<ChatEvent> = protocol::reply_events(
            Uuid::now_v7(),
            "c1",
            "one two three four five six seven eight",
            protocol::MemoryStatus::None,
            &[],
        );
        let mut tx = pool.begin().await.unwrap();
        store.append(&mut tx, "t", "c1", &mut events).await.unwrap();
        tx.commit().await.unwrap();
        let ids: Vec<u64> = events.iter().map(|e| e.event_id).collect();
        assert_eq!(ids, (1..=events.len() as u64).collect::<Vec<_>>());

        let hub = Hub::new(1);
        let registry = MetricsRegistry::new(Default::default());
        let metrics = SseMetrics::new(&registry);
        let health = soma_observability::health::HealthRegistry::new();
        let mut session = Session {
            sub: hub.subscribe("t", "c1"),
            store: store.clone(),
            metrics: metrics.clone(),
            lifecycle: Shutdown::new(Default::default(), &health),
            tenant: "t".into(),
            conversation_id: "c1".into(),
            last: 0,
            pending: VecDeque::new(),
            done: false,
            answered: VecDeque::new(),
        };
        // Another conversation's traffic goes to its own channel (none: no
        // subscriber), never into this one.
        for e in &events {
            hub.publish(HubEvent {
                tenant: "t".into(),
                event: ChatEvent {
                    conversation_id: "c2".into(),
                    ..e.clone()
                },
            });
        }
        for e in &events[..3] {
            hub.publish(HubEvent {
                tenant: "t".into(),
                event: e.clone(),
            });
        }
        let mut seen = Vec::new();
        for _ in 0..events.len() {
            let next = tokio::time::timeout(Duration::from_secs(5), session.next())
                .await
                .expect("an event within 5 s")
                .expect("the stream goes on");
            let Out::Chat(e) = next else {
                panic!("expected a chat event, got {next:?}")
            };
            seen.push(e.event_id);
        }
        assert_eq!(seen, ids, "every stored event once, in order");
        assert_eq!(
            metrics
                .resumes
                .get_or_create(&vec![("cause", "lagged")])
                .get(),
            1
        );
        // Live again: the next event is delivered from the channel.
        let mut more = protocol::reply_events(
            Uuid::now_v7(),
            "c1",
            "again",
            protocol::MemoryStatus::None,
            &[],
        );
        let mut tx = pool.begin().await.unwrap();
        store.append(&mut tx, "t", "c1", &mut more).await.unwrap();
        tx.commit().await.unwrap();
        hub.publish(HubEvent {
            tenant: "t".into(),
            event: more[0].clone(),
        });
        let next = tokio::time::timeout(Duration::from_secs(5), session.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(next, Out::Chat(more[0].clone()));
        drop(session);
        assert_eq!(hub.len(), 0);
        sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
            .execute(&pool)
            .await
            .unwrap();
    }

    /// Previews pass through without an SSE id, in order, until the
    /// message's final event; a late preview of an answered message is
    /// dropped. No store is read on this path.
    #[tokio::test]
    async fn previews_pass_without_an_id_until_their_message_is_answered() {
        let pool = sqlx::PgPool::connect_lazy("postgres://127.0.0.1:1/none").unwrap();
        let hub = Hub::new(16);
        let registry = MetricsRegistry::new(Default::default());
        let health = soma_observability::health::HealthRegistry::new();
        let mut session = Session {
            sub: hub.subscribe("t", "c1"),
            store: SessionEvents::new(pool, "unused").unwrap(),
            metrics: SseMetrics::new(&registry),
            lifecycle: Shutdown::new(Default::default(), &health),
            tenant: "t".into(),
            conversation_id: "c1".into(),
            last: 0,
            pending: VecDeque::new(),
            done: false,
            answered: VecDeque::new(),
        };
        let id = Uuid::now_v7();
        let none = protocol::MemoryStatus::None;
        let mut done = protocol::reply_events(id, "c1", "Hi there", none, &[])
            .pop()
            .unwrap();
        done.event_id = 1;
        for event in [
            protocol::preview_event(id, "c1", 0, "Hi", none),
            protocol::preview_event(id, "c1", 1, "Hi the", none),
            done.clone(),
            protocol::preview_event(id, "c1", 2, "Hi there", none),
            protocol::preview_event(Uuid::now_v7(), "c1", 0, "Next", none),
        ] {
            hub.publish(HubEvent {
                tenant: "t".into(),
                event,
            });
        }
        let mut texts = Vec::new();
        for _ in 0..4 {
            let Some(Out::Chat(e)) = session.next().await else {
                panic!("a chat event")
            };
            let sse = format!("{:?}", sse_event(&e).unwrap());
            assert_eq!(sse.contains("id:"), e.event_id > 0, "{sse}");
            texts.push((e.kind, e.text));
        }
        use protocol::EventKind::{Completed, Preview};
        assert_eq!(
            texts,
            vec![
                (Preview, "Hi".to_owned()),
                (Preview, "Hi the".to_owned()),
                (Completed, "Hi there".to_owned()),
                (Preview, "Next".to_owned()),
            ],
            "the late preview of the answered message was dropped"
        );
    }

    #[test]
    fn a_conversation_channel_lives_as_long_as_its_subscribers() {
        let hub = Hub::new(4);
        let a = hub.subscribe("t", "c1");
        let b = hub.subscribe("t", "c1");
        let other = hub.subscribe("t", "c2");
        assert_eq!(hub.len(), 2);
        drop(a);
        assert_eq!(hub.len(), 2, "c1 still has a subscriber");
        drop(b);
        assert_eq!(hub.len(), 1, "c1's channel went with its last subscriber");
        drop(other);
        assert_eq!(hub.len(), 0);
    }
}
