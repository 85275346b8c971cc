//! The conversation worker: answers each accepted message exactly once,
//! with SomaBrain memory in the loop.
//!
//! For each `chat.message.received` envelope (consumer group
//! `<bus.consumer.group>.conversation`, per-conversation order):
//!
//! 0. a message this worker already answered (a redelivery after a crash
//!    or a rebalance, before its offset was committed) is skipped at once,
//!    before the model is asked again (an inbox read; the inbox record in
//!    step 4 stays the guarantee); a message `/<tool> <input>` becomes a
//!    tool call for the tool
//!    executor (same transaction pattern as below, no reply from here);
//! 1. **authorize the turn**: `conversation.send` for the message's
//!    principal with the conversation's owner (`context.owner`,
//!    `context.resource_tenant`, see [`crate::conversations`]) — the
//!    gateway checked the same at intake, the worker checks again with
//!    the policy in force now. A denial answers with one `error` event;
//!    a policy engine that cannot decide is retried (fail closed);
//! 2. **recall**: the subject's own memories (`recall` in the subject's
//!    namespace, [`protocol::memory_namespace`]), or — when the policy
//!    grants `memory.read_tenant` — the tenant's, through SomaBrain's
//!    context route. SomaBrain down: the reply says so (`memory:
//!    "unavailable"`) instead of failing;
//! 3. **generate** the reply with the configured [`ReplyGenerator`]
//!    (an OpenAI-compatible model, or the built-in responder), measuring
//!    time to first token and counting tokens, and publishing **live
//!    previews** of the reply so far as it grows (best effort, coalesced
//!    and bounded per reply, on Redis pub/sub; see [`crate::live`]), so
//!    SSE clients see tokens while the model is still writing. A model
//!    failure answers with one `error` event, and nothing is remembered;
//! 4. in **one Postgres transaction**: record the message id in the inbox
//!    (a redelivered message is skipped), number and store the reply
//!    events in the session event store (what SSE clients resume from,
//!    see [`session_events`]), write them and the memory-write request
//!    (the turn, with the memories the reply used, for the memory
//!    replicator's remember and reward feedback) to the outbox, commit;
//! 5. the relay delivers those records to Kafka in commit order.
//!
//! So the reply is produced exactly once per message id, even across
//! crashes and redeliveries, and nothing is lost while Kafka is down (the
//! outbox holds it). The reply's stored events are published when the
//! whole reply is generated (that is what makes them exactly-once):
//! `assistant.started`, one `assistant.delta` with the reply and
//! `assistant.completed` ([`protocol::STORED_EVENTS`]). The live previews before them
//! are at most once and carry no event id: a client that missed them (or
//! a preview path that is down) changes nothing but how early the text
//! shows.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use soma_bus::{Effects, Envelope, HandlerError};
use soma_config::Live;
use soma_observability::metrics::{HistogramFamily, MetricsRegistry};
use soma_observability::prometheus_client::metrics::counter::Counter;
use soma_observability::prometheus_client::metrics::family::Family;
use soma_policy::{Authorizer, AuthzInput, PolicyMetrics, RequestInfo, Resource};
use soma_somabrain::{CallOptions, ContextRequest, RecallRequest, SomabrainClient};
use tokio::net::TcpListener;

use crate::PlatformError;
use crate::conversations::Conversations;
use crate::live::{LivePublisher, ReplyPreviews};
use crate::protocol::{self, ChatRequest, MemoryStatus, MemoryWrite, ToolCall};
use crate::reply::{self, RecalledMemory, ReplyGenerator, Turn};
use crate::runtime::{KafkaRole, Runtime, Worker};
use crate::session_events::{self, SessionEvents};
use crate::settings::PlatformSettings;

/// Inbox handler name (one inbox row per message id and handler).
pub const HANDLER: &str = "conversation-worker";

struct Ctx {
    settings: Arc<PlatformSettings>,
    effects: Effects,
    pool: sqlx::PgPool,
    inbox: soma_outbox::Inbox,
    store: SessionEvents,
    conversations: Conversations,
    authz: Authorizer,
    brain: SomabrainClient,
    generator: Box<dyn ReplyGenerator>,
    live: LivePublisher,
    metrics: AssistantMetrics,
}

type Labels = Vec<(&'static str, &'static str)>;

/// The assistant's metrics.
#[derive(Clone)]
struct AssistantMetrics {
    /// `soma_platform_assistant_time_to_first_token_seconds{generator}`.
    ttft: HistogramFamily<Labels>,
    /// `soma_platform_assistant_tokens_total{generator}`.
    tokens: Family<Labels, Counter>,
    /// `soma_platform_assistant_turns_total{outcome}`.
    turns: Family<Labels, Counter>,
}

impl AssistantMetrics {
    fn new(registry: &MetricsRegistry) -> Self {
        Self {
            ttft: registry.histogram_family(
                "soma_platform_assistant_time_to_first_token_seconds",
                "From the start of handling a message to the reply generator's first \
                 token (authorization and recall included), by generator",
                &[
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                ],
            ),
            tokens: registry.counter_family(
                "soma_platform_assistant_tokens_total",
                "Text pieces (tokens as the model streams them; words for the built-in \
                 responder) generated for replies, by generator",
            ),
            turns: registry.counter_family(
                "soma_platform_assistant_turns_total",
                "Messages handled, by outcome: completed, denied (policy), model_failed, \
                 duplicate (answered before: a redelivery, skipped before the model)",
            ),
        }
    }

    fn turn(&self, outcome: &'static str) {
        self.turns.get_or_create(&vec![("outcome", outcome)]).inc();
    }
}

/// Starts a conversation worker consuming `chat.requests_topic`; admin
/// endpoints on `admin`.
pub async fn start(
    live: Live<PlatformSettings>,
    admin: TcpListener,
) -> Result<Worker, PlatformError> {
    let runtime = Runtime::start(live, admin, KafkaRole::Consumes, "conversation").await?;
    let generator = reply::from_settings(&runtime.settings.llm)
        .map_err(|e| PlatformError::Policy(format!("llm: {e}")))?;
    tracing::info!(event = "reply_generator", generator = generator.name());
    let live = live_publisher(&runtime).await?;
    let ctx = Arc::new(Ctx {
        settings: runtime.settings.clone(),
        effects: runtime.effects(),
        pool: runtime.pool.clone(),
        inbox: runtime.outbox.inbox(),
        store: runtime.session_events.clone(),
        conversations: runtime.conversations.clone(),
        authz: runtime.authorizer(PolicyMetrics::new(&runtime.metrics))?,
        // Without SomaBrain the worker answers without memory.
        brain: runtime.somabrain()?,
        generator,
        live,
        metrics: AssistantMetrics::new(&runtime.metrics),
    });
    let chat = &ctx.settings.chat;
    // Retention of the session event store, off the handling path.
    runtime.session_events.clone().spawn_pruner(
        &runtime.lifecycle,
        Duration::from_millis(chat.session_events_prune_interval_ms),
        chat.session_events_max_per_conversation,
        Duration::from_secs(chat.session_events_max_age_secs),
    );
    let topic = chat.requests_topic.clone();
    runtime.into_worker(&topic, HANDLER, move |env: Envelope| {
        let ctx = ctx.clone();
        async move { handle(&ctx, env).await }
    })
}

/// The live-preview publisher: on its own Redis client of one connection
/// (one task publishes, in order), connected in the background and with no
/// health component (previews are best effort: a worker without Redis
/// answers as before, only later).
async fn live_publisher(runtime: &Runtime) -> Result<LivePublisher, PlatformError> {
    let chat = &runtime.settings.chat;
    let redis = if chat.live_previews {
        let mut config = runtime.settings.redis.clone();
        config.pool_size = 1;
        let client = soma_redis::RedisClient::builder(config)
            .metrics(&runtime.metrics)
            .connect_lazy()
            .await?;
        Some(client)
    } else {
        None
    };
    Ok(LivePublisher::start(chat, redis, &runtime.metrics)?)
}

async fn handle(ctx: &Ctx, env: Envelope) -> Result<(), HandlerError> {
    let started = Instant::now();
    let req: ChatRequest = env
        .json()
        .map_err(|e| HandlerError::fatal(format!("not a chat request: {e}")))?;
    if req.principal.tenant != env.tenant {
        return Err(HandlerError::fatal(
            "envelope tenant and principal tenant differ",
        ));
    }
    let chat = &ctx.settings.chat;
    if crate::runtime::handled_before(&ctx.pool, &ctx.inbox, HANDLER, env.id).await {
        ctx.metrics.turn("duplicate");
        return Ok(());
    }

    // `/<tool> <input>`: the tool executor answers (after its own
    // authorization); nothing is recalled or remembered.
    if let Some((tool, input)) = protocol::parse_tool_call(&req.text) {
        return hand_to_tools(ctx, &env, &req, tool, input).await;
    }

    if let Some(reasons) = authorize_turn(ctx, &req).await? {
        ctx.metrics.turn("denied");
        let text = format!("conversation.send denied: {}", reasons.join(", "));
        let event = protocol::error_event(env.id, &req.conversation_id, &text, MemoryStatus::None);
        return commit(ctx, &env, vec![event], &[]).await;
    }

    let (memory, memories) = recall(ctx, &req).await;
    let turn = Turn {
        subject: req.principal.subject.clone(),
        text: req.text.clone(),
        memory,
        memories,
    };
    let mut previews = ctx
        .live
        .reply(env.tenant.as_str(), &req.conversation_id, env.id, memory);
    let reply = match generate(ctx, &turn, started, &mut previews).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(event = "reply_generation_failed", generator = ctx.generator.name(), error = %e);
            ctx.metrics.turn("model_failed");
            let text = format!("No reply: {e}.");
            let event = protocol::error_event(env.id, &req.conversation_id, &text, memory);
            return commit(ctx, &env, vec![event], &[]).await;
        }
    };
    let used: Vec<String> = turn.memories.iter().map(|m| m.key.clone()).collect();
    let events = protocol::reply_events(env.id, &req.conversation_id, &reply, memory, &used);
    let write = MemoryWrite {
        conversation_id: req.conversation_id.clone(),
        message_id: env.id,
        principal: req.principal.clone(),
        user_text: req.text.clone(),
        reply_text: reply,
        used_memories: used,
    };
    let memory_env = Envelope::builder(
        protocol::MEMORY_WRITE,
        env.tenant.as_str(),
        req.conversation_id.as_str(),
    )
    .json(&write)
    .map_err(HandlerError::fatal)?
    .caused_by(&env)
    .build()
    .map_err(HandlerError::fatal)?;
    ctx.metrics.turn("completed");
    commit(ctx, &env, events, &[(&chat.memory_topic, &memory_env)]).await
}

/// Hands `/<tool> <input>` to the tool executor: the call, in the same
/// exactly-once transaction as the inbox record.
async fn hand_to_tools(
    ctx: &Ctx,
    env: &Envelope,
    req: &ChatRequest,
    tool: String,
    input: String,
) -> Result<(), HandlerError> {
    let call = ToolCall {
        conversation_id: req.conversation_id.clone(),
        message_id: env.id,
        principal: req.principal.clone(),
        tool,
        input,
        request_id: req.request_id.clone(),
    };
    let call_env = Envelope::builder(
        protocol::TOOL_CALL,
        env.tenant.as_str(),
        req.conversation_id.as_str(),
    )
    .json(&call)
    .map_err(HandlerError::fatal)?
    .caused_by(env)
    .build()
    .map_err(HandlerError::fatal)?;
    let topic = ctx.settings.chat.tools_topic.as_str();
    ctx.effects
        .commit_once(HANDLER, env.id, &[(topic, &call_env)])
        .await
        .map(|_| ())
}

async fn commit(
    ctx: &Ctx,
    env: &Envelope,
    events: Vec<protocol::ChatEvent>,
    also: &[(&str, &Envelope)],
) -> Result<(), HandlerError> {
    session_events::commit_reply(
        &ctx.effects,
        &ctx.store,
        HANDLER,
        env,
        &ctx.settings.chat.events_topic,
        events,
        also,
    )
    .await
    .map(|_| ())
}

/// `conversation.send` for the message's principal, with the
/// conversation's owner. `Some(reasons)` when denied; an engine that
/// cannot decide, or an unreachable ownership store, is retried.
async fn authorize_turn(ctx: &Ctx, req: &ChatRequest) -> Result<Option<Vec<String>>, HandlerError> {
    let p = &req.principal;
    let owner = ctx
        .conversations
        .owner_or_claim(&req.conversation_id, &p.tenant, &p.subject)
        .await
        .map_err(HandlerError::retryable)?;
    let input = AuthzInput::new(
        p,
        "conversation.send",
        Resource {
            kind: "conversation".into(),
            id: Some(req.conversation_id.clone()),
        },
    )
    .with_request(RequestInfo {
        method: "TURN".into(),
        route: ctx.settings.chat.requests_topic.clone(),
        request_id: Some(req.request_id.clone()),
    })
    .with_context("owner", owner.subject)
    .with_context("resource_tenant", owner.tenant);
    let decision = crate::runtime::decide(&ctx.authz, &input).await?;
    Ok((!decision.allow).then_some(decision.reasons))
}

/// Whether the policy lets the principal recall the whole tenant's
/// memories (`memory.read_tenant`); when it cannot decide, no (the
/// narrower scope).
async fn tenant_wide(ctx: &Ctx, req: &ChatRequest) -> bool {
    let input = AuthzInput::new(
        &req.principal,
        "memory.read_tenant",
        Resource {
            kind: "memory".into(),
            id: Some(req.principal.tenant.clone()),
        },
    )
    .with_context("resource_tenant", req.principal.tenant.clone());
    match ctx.authz.check(&input).await {
        Ok(d) => d.allow,
        Err(e) => {
            tracing::warn!(event = "recall_scope_undecided", error = %e);
            false
        }
    }
}

/// The memories for this turn: the subject's own (their namespace), or
/// the tenant's when the policy grants it (the context route, which ranks
/// across the tenant's namespaces). SomaBrain failing is `Unavailable`.
async fn recall(ctx: &Ctx, req: &ChatRequest) -> (MemoryStatus, Vec<RecalledMemory>) {
    let chat = &ctx.settings.chat;
    let scope = CallOptions::new()
        .tenant(req.principal.tenant.as_str())
        .request_id(req.request_id.as_str());
    let found: Result<Vec<RecalledMemory>, soma_somabrain::Error> = if tenant_wide(ctx, req).await {
        let request = ContextRequest {
            session_id: req.conversation_id.clone(),
            query: req.text.clone(),
            top_k: chat.recall_top_k as u32,
        };
        ctx.brain.context_evaluate(&request, scope).await.map(|c| {
            c.memories
                .iter()
                .filter_map(|m| memory_of(m.get("message_id"), m.get("user_text")))
                .collect()
        })
    } else {
        let scope = scope.namespace(protocol::memory_namespace(
            &chat.memory_namespace,
            &req.principal.subject,
        ));
        let request = RecallRequest::new(req.text.as_str()).top_k(chat.recall_top_k as u32);
        ctx.brain.recall(&request, scope).await.map(|r| {
            r.hits_in_namespace()
                .filter_map(|h| {
                    Some(RecalledMemory {
                        key: h.key()?.to_owned(),
                        text: h.content.get("user_text")?.as_str()?.to_owned(),
                    })
                })
                .collect()
        })
    };
    match found {
        Ok(m) if m.is_empty() => (MemoryStatus::None, m),
        Ok(m) => (MemoryStatus::Recalled, m),
        Err(e) => {
            // Explicit, measured degradation: the client counts it and the
            // health check reports it; the user still gets an answer.
            tracing::warn!(event = "recall_unavailable", error = %e);
            (MemoryStatus::Unavailable, Vec::new())
        }
    }
}

fn memory_of(
    key: Option<&serde_json::Value>,
    text: Option<&serde_json::Value>,
) -> Option<RecalledMemory> {
    Some(RecalledMemory {
        key: key?.as_str()?.to_owned(),
        text: text?.as_str()?.to_owned(),
    })
}

/// Runs the generator to the end, recording time to first token and the
/// token count, and previewing the reply as it grows: whenever the
/// generator makes us wait and a preview is due (see
/// [`ReplyPreviews`]).
async fn generate(
    ctx: &Ctx,
    turn: &Turn,
    started: Instant,
    previews: &mut ReplyPreviews<'_>,
) -> Result<String, reply::GenerateError> {
    let labels = vec![("generator", ctx.generator.name())];
    let mut stream = ctx.generator.generate(turn);
    let mut reply = String::new();
    let mut tokens = 0u64;
    loop {
        let next = match previews.due_at() {
            // Biased: a ready token first, the preview only while waiting.
            // `next()` is cancel-safe: no token is lost to the timer.
            Some(at) => tokio::select! {
                biased;
                piece = stream.next() => piece,
                _ = tokio::time::sleep_until(at) => {
                    previews.flush(&reply);
                    continue;
                }
            },
            None => stream.next().await,
        };
        let Some(piece) = next else { break };
        let piece = piece?;
        if tokens == 0 {
            ctx.metrics
                .ttft
                .get_or_create(&labels)
                .observe(started.elapsed().as_secs_f64());
        }
        tokens += 1;
        reply.push_str(&piece);
        previews.grew();
    }
    ctx.metrics.tokens.get_or_create(&labels).inc_by(tokens);
    if reply.trim().is_empty() {
        return Err(reply::GenerateError::Malformed("the reply is empty".into()));
    }
    Ok(reply)
}
