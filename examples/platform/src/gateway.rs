//! The chat gateway: authenticated, authorized, rate-limited, idempotent
//! message intake, and an SSE stream of reply events.
//!
//! | Route | Action | What it does |
//! |---|---|---|
//! | `POST /v1/conversations/{id}/messages` | `conversation.send` | Accepts `{"text": …}`, publishes it durably (Kafka, or the outbox when Kafka is down), answers `202` with the message id. An `Idempotency-Key` header makes retries return the first answer. |
//! | `GET /v1/conversations/{id}/events` | `conversation.read` | Server-sent events `reply.started`, `reply.delta`, `reply.completed` for that conversation of the caller's tenant, from the moment of connecting. |
//!
//! Every request passes, in order: metrics and tracing → authentication (JWT
//! or API key; `401`) → rate limit per tenant and route (`429`) →
//! authorization through the embedded Rego policy (`403`, or `503` when no
//! decision can be had) → the handler.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, State};
use axum::http::{HeaderMap, HeaderValue, Request, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use soma_bus::{BusConsumer, ConsumerHandle, Envelope, HandlerError, PublishOutcome};
use soma_config::Live;
use soma_observability::http::{HttpMetricsLayer, TraceLayer};
use soma_observability::shutdown::Shutdown;
use soma_policy::{
    ApiKeyStore, Authenticator, AuthnLayer, AuthzLayer, PgApiKeyStore, PolicyMetrics, Principal,
    RouteMap, RouteRule,
};
use soma_redis::rate_limit::{RateLimitKey, RateLimitLayer};
use soma_redis::{Claim, Idempotency, IdempotencyOptions, RateLimit, RateLimiter, RedisClient};
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::PlatformError;
use crate::protocol::{self, ChatEvent, ChatRequest};
use crate::runtime::{KafkaRole, Runtime};
use crate::settings::PlatformSettings;

/// Route template of message intake.
pub const MESSAGES_ROUTE: &str = "/v1/conversations/{id}/messages";
/// Route template of the SSE stream.
pub const EVENTS_ROUTE: &str = "/v1/conversations/{id}/events";
/// Header carrying a client's idempotency key.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// Response header set when a stored response is replayed.
pub const IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";

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
    envelope_id: Uuid,
    event: ChatEvent,
}

struct Shared {
    settings: Arc<PlatformSettings>,
    runtime_publisher: soma_bus::DurablePublisher,
    idempotency: Idempotency,
    hub: broadcast::Sender<Arc<HubEvent>>,
    lifecycle: Shutdown,
}

/// A running gateway.
pub struct Gateway {
    runtime: Runtime,
    addr: SocketAddr,
    events: Option<ConsumerHandle>,
    server: Option<JoinHandle<()>>,
    stop: CancellationToken,
    redis: RedisClient,
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

        let redis = RedisClient::builder(settings.redis.clone())
            .metrics(&runtime.metrics)
            .health(&runtime.health)
            .connect_lazy()
            .await?;
        // Give the first connection its connect timeout. Without Redis the
        // gateway still starts: rate-limited routes answer 503 (fail
        // closed) and health shows `redis` down until it connects.
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(settings.redis.connect_timeout_ms);
        while !redis.is_connected() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if !redis.is_connected() {
            tracing::warn!(event = "redis_unavailable_at_start");
        }
        let limiter = RateLimiter::new(
            &redis,
            RateLimit::per(
                settings.chat.rate_limit,
                Duration::from_secs(settings.chat.rate_window_secs),
            ),
        )?;
        let idempotency = Idempotency::new(&redis, IdempotencyOptions::default())?;

        let policy_metrics = PolicyMetrics::new(&runtime.metrics);
        // Its own small pool: API-key lookups (one per unknown key) must not
        // take the connections the outbox and its fallback need.
        let keys = PgApiKeyStore::connect(
            &settings.postgres.url,
            &settings.postgres.api_keys_schema,
            settings.postgres.api_keys_max_connections,
        )
        .await
        .map_err(|e| PlatformError::Policy(e.to_string()))?;
        keys.migrate()
            .await
            .map_err(|e| PlatformError::Policy(e.to_string()))?;
        let keys: Arc<dyn ApiKeyStore> = Arc::new(keys);
        let authn = Authenticator::builder(&settings.policy)
            .api_key_store(keys)
            .metrics(policy_metrics.clone())
            .build()
            .map_err(|e| PlatformError::Policy(e.to_string()))?;
        let authz = runtime.authorizer(policy_metrics)?;
        let mut rules = routes();
        rules.extend(settings.policy.routes.iter().cloned());
        let routes = RouteMap::new(rules).map_err(|e| PlatformError::Policy(e.to_string()))?;

        let (hub, _) = broadcast::channel(settings.chat.sse_buffer);
        let events = spawn_hub(&runtime, hub.clone())?;

        let shared = Arc::new(Shared {
            settings: settings.clone(),
            runtime_publisher: runtime.publisher.clone(),
            idempotency,
            hub,
            lifecycle: runtime.lifecycle.clone(),
        });
        let rate_limit = RateLimitLayer::new(limiter, |req: &Request<Body>| {
            let principal = req.extensions().get::<Principal>()?;
            let route = req.extensions().get::<MatchedPath>()?;
            Some(RateLimitKey {
                tenant: principal.tenant.clone(),
                route: format!("{} {}", req.method(), route.as_str()),
            })
        });
        let app = Router::new()
            .route(MESSAGES_ROUTE, post(post_message))
            .route(EVENTS_ROUTE, get(events_stream))
            .route_layer(AuthzLayer::new(Arc::new(authz), Arc::new(routes)))
            .route_layer(rate_limit)
            .layer(AuthnLayer::new(Arc::new(authn)))
            .fallback(|| async { problem(StatusCode::NOT_FOUND, "not_found", "no such route") })
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
            .with_state(shared);

        let addr = api.local_addr().map_err(|source| PlatformError::Bind {
            addr: "api".into(),
            source,
        })?;
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
        tracing::info!(event = "gateway_started", %addr, admin = %runtime.admin_addr);
        Ok(Self {
            runtime,
            addr,
            events: Some(events),
            server: Some(server),
            stop,
            redis,
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
    /// reconnect), stop the SSE hub's consumer, close Redis, and shut the
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
        lifecycle
            .stage("redis", async {
                let _ = self.redis.quit().await;
            })
            .await;
        self.runtime.shutdown().await;
    }
}

/// Reply events reach every gateway replica (broadcast group), which fans
/// them out to its SSE clients.
fn spawn_hub(
    runtime: &Runtime,
    hub: broadcast::Sender<Arc<HubEvent>>,
) -> Result<ConsumerHandle, PlatformError> {
    let handler = move |env: Envelope| {
        let hub = hub.clone();
        async move {
            let event: ChatEvent = env
                .json()
                .map_err(|e| HandlerError::fatal(format!("undecodable reply event: {e}")))?;
            // No SSE client connected is not an error.
            let _ = hub.send(Arc::new(HubEvent {
                tenant: env.tenant.clone(),
                envelope_id: env.id,
                event,
            }));
            Ok(())
        }
    };
    let settings = &runtime.settings;
    Ok(BusConsumer::builder(
        &runtime.bus("gateway-events"),
        &[settings.chat.events_topic.as_str()],
        "sse-hub",
        handler,
    )
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
        problem(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error",
        )
    }
}

fn problem(status: StatusCode, kind: &str, detail: &str) -> Response {
    let body = serde_json::json!({
        "type": format!("https://soma.dev/problems/{kind}"),
        "title": kind,
        "status": status.as_u16(),
        "detail": detail,
    });
    (
        status,
        [(header::CONTENT_TYPE, soma_policy::PROBLEM_CONTENT_TYPE)],
        body.to_string(),
    )
        .into_response()
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

fn request_id(headers: &HeaderMap) -> String {
    headers
        .get(soma_policy::REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .map(str::to_owned)
        .unwrap_or_else(|| Uuid::now_v7().to_string())
}

async fn post_message(
    State(gw): State<Arc<Shared>>,
    Extension(principal): Extension<Principal>,
    Path(conversation_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(r) = reject_conversation_id(&conversation_id) {
        return r;
    }
    let msg: SendMessage = match serde_json::from_slice(&body) {
        Ok(m) => m,
        Err(e) => {
            return problem(
                StatusCode::BAD_REQUEST,
                "invalid_body",
                &format!("expected {{\"text\": string}}: {e}"),
            );
        }
    };
    if msg.text.trim().is_empty() {
        return problem(StatusCode::BAD_REQUEST, "empty_message", "text is empty");
    }
    if msg.text.len() > gw.settings.chat.max_message_bytes {
        return problem(
            StatusCode::PAYLOAD_TOO_LARGE,
            "message_too_large",
            &format!(
                "text is {} bytes; the limit is {}",
                msg.text.len(),
                gw.settings.chat.max_message_bytes
            ),
        );
    }

    let claim = match headers.get(IDEMPOTENCY_KEY) {
        None => None,
        Some(v) => {
            let Some(key) = v.to_str().ok().filter(|k| !k.is_empty() && k.len() <= 128) else {
                return problem(
                    StatusCode::BAD_REQUEST,
                    "invalid_idempotency_key",
                    "Idempotency-Key must be 1-128 visible ASCII characters",
                );
            };
            let key = hex::encode(Sha256::digest(key.as_bytes()));
            let mut fp = Sha256::new();
            fp.update(conversation_id.as_bytes());
            fp.update([0]);
            fp.update(&body);
            let fingerprint = hex::encode(fp.finalize());
            match gw
                .idempotency
                .claim::<Accepted>(&principal.tenant, &key, &fingerprint)
                .await
            {
                Ok(Claim::Acquired(guard)) => Some(guard),
                Ok(Claim::Completed(first)) => {
                    let mut r = (StatusCode::ACCEPTED, axum::Json(first)).into_response();
                    r.headers_mut()
                        .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
                    return r;
                }
                Ok(Claim::InProgress { retry_after }) => {
                    let mut r = problem(
                        StatusCode::CONFLICT,
                        "request_in_progress",
                        "a request with this Idempotency-Key is still being handled",
                    );
                    let secs = retry_after.as_secs().max(1).to_string();
                    if let Ok(v) = HeaderValue::from_str(&secs) {
                        r.headers_mut().insert(header::RETRY_AFTER, v);
                    }
                    return r;
                }
                Ok(Claim::Mismatch) => {
                    return problem(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "idempotency_key_reused",
                        "this Idempotency-Key was used for a different request",
                    );
                }
                Err(e) => {
                    tracing::warn!(event = "idempotency_unavailable", error = %e);
                    return problem(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "idempotency_unavailable",
                        "cannot check the Idempotency-Key right now; retry later",
                    );
                }
            }
        }
    };

    let request = ChatRequest {
        conversation_id: conversation_id.clone(),
        text: msg.text,
        principal: principal.clone(),
        request_id: request_id(&headers),
    };
    let envelope = Envelope::builder(
        protocol::MESSAGE_RECEIVED,
        principal.tenant.as_str(),
        conversation_id.as_str(),
    )
    .json(&request)
    .and_then(|b| b.correlation_id(request.request_id.as_str()).build());
    let envelope = match envelope {
        Ok(e) => e,
        Err(e) => {
            if let Some(g) = claim {
                let _ = g.release().await;
            }
            return problem(StatusCode::BAD_REQUEST, "invalid_message", &e.to_string());
        }
    };
    let outcome = gw
        .runtime_publisher
        .publish(&gw.settings.chat.requests_topic, &envelope)
        .await;
    let delivery = match outcome {
        Ok(PublishOutcome::Published { .. }) => "kafka",
        Ok(PublishOutcome::Deferred(_)) => "deferred",
        Err(e) => {
            // Neither Kafka nor the outbox took it: nothing was accepted.
            tracing::error!(event = "message_not_accepted", error = %e);
            if let Some(g) = claim {
                let _ = g.release().await;
            }
            return problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "bus_unavailable",
                "the message was not accepted; retry later",
            );
        }
    };
    let accepted = Accepted {
        message_id: envelope.id,
        conversation_id,
        delivery: delivery.to_owned(),
    };
    if let Some(g) = claim {
        if let Err(e) = g.complete(&accepted).await {
            // The message is accepted, but the stored answer is not: a
            // retry after the in-progress claim expires is accepted again,
            // as a new message. Say so in the logs.
            tracing::warn!(event = "idempotency_complete_failed", error = %e);
        }
    }
    (StatusCode::ACCEPTED, axum::Json(accepted)).into_response()
}

enum Item {
    Event(Arc<HubEvent>),
    Lagged(u64),
}

async fn events_stream(
    State(gw): State<Arc<Shared>>,
    Extension(principal): Extension<Principal>,
    Path(conversation_id): Path<String>,
) -> Response {
    if let Some(r) = reject_conversation_id(&conversation_id) {
        return r;
    }
    // Subscribed before the response starts: everything the hub receives
    // from now on is seen.
    let rx = gw.hub.subscribe();
    let tenant = principal.tenant;
    let stream = BroadcastStream::new(rx)
        .map(|r| match r {
            Ok(e) => Item::Event(e),
            Err(BroadcastStreamRecvError::Lagged(n)) => Item::Lagged(n),
        })
        .filter(move |item| {
            let keep = match item {
                Item::Event(e) => e.tenant == tenant && e.event.conversation_id == conversation_id,
                Item::Lagged(_) => true,
            };
            futures::future::ready(keep)
        })
        .scan(false, |ended, item| {
            if *ended {
                return futures::future::ready(None);
            }
            let event = match item {
                Item::Event(e) => Event::default()
                    .event(e.event.kind.sse_name())
                    .id(e.envelope_id.to_string())
                    .json_data(&e.event),
                Item::Lagged(n) => {
                    // The client fell further behind than `chat.sse_buffer`:
                    // say how much it missed and end the stream.
                    *ended = true;
                    Event::default()
                        .event("lagged")
                        .json_data(serde_json::json!({ "missed": n }))
                }
            };
            futures::future::ready(Some(event))
        })
        // Shutting down: end the stream with an event telling the client to
        // reconnect (to another replica, or this one once restarted).
        .take_until(gw.lifecycle.draining())
        .chain(futures::stream::once(async {
            Event::default()
                .event("shutdown")
                .retry(Duration::from_millis(1_000))
                .json_data(serde_json::json!({ "reconnect": true }))
        }));
    Sse::new(stream)
        .keep_alive(
            KeepAlive::new().interval(Duration::from_secs(gw.settings.chat.sse_keepalive_secs)),
        )
        .into_response()
}
