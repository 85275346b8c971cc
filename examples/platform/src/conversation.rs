//! The conversation worker: answers each accepted message exactly once.
//!
//! For each `chat.message.received` envelope (consumer group
//! `<bus.consumer_group>.conversation`, per-conversation order):
//!
//! 0. a message `/<tool> <input>` becomes a tool call for the tool
//!    executor (same transaction pattern as below, no reply from here);
//! 1. recall related memories from SomaBrain — when SomaBrain is down the
//!    reply says so (`memory: "unavailable"`) instead of failing;
//! 2. in **one Postgres transaction**: record the message id in the inbox
//!    (a redelivered message is skipped), write the reply events and the
//!    memory-write request to the outbox (`publish_in_tx`), commit;
//! 3. the relay delivers those records to Kafka in commit order.
//!
//! So the reply is produced exactly once per message id, even across
//! crashes and redeliveries, and nothing is lost while Kafka is down (the
//! outbox holds it).

use std::sync::Arc;

use soma_bus::{ConsumerHandle, Envelope, HandlerError};
use soma_config::Live;
use soma_observability::health::{CheckOptions, Criticality};
use soma_outbox::Inbox;
use soma_somabrain::{CallOptions, RecallRequest, SomabrainClient};
use tokio::net::TcpListener;

use crate::PlatformError;
use crate::protocol::{self, ChatRequest, MemoryStatus, MemoryWrite, ToolCall};
use crate::runtime::{KafkaRole, Runtime};
use crate::settings::PlatformSettings;

/// Inbox handler name (one inbox row per message id and handler).
pub const HANDLER: &str = "conversation-worker";

struct Ctx {
    settings: Arc<PlatformSettings>,
    pool: sqlx::PgPool,
    inbox: Inbox,
    publisher: soma_bus::DurablePublisher,
    brain: SomabrainClient,
}

/// A running conversation worker.
pub struct ConversationWorker {
    runtime: Runtime,
    consumer: Option<ConsumerHandle>,
}

impl std::fmt::Debug for ConversationWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConversationWorker")
            .field("admin_addr", &self.runtime.admin_addr)
            .finish_non_exhaustive()
    }
}

impl ConversationWorker {
    /// Starts consuming `chat.requests_topic`; admin endpoints on `admin`.
    pub async fn start(
        live: Live<PlatformSettings>,
        admin: TcpListener,
    ) -> Result<Self, PlatformError> {
        let runtime = Runtime::start(live, admin, KafkaRole::Consumes, "conversation").await?;
        let settings = runtime.settings.clone();
        let brain = SomabrainClient::builder(settings.somabrain.clone())
            .metrics(&runtime.metrics)
            .build()?;
        // SomaBrain down makes the worker degraded, not down: it answers
        // without memory.
        brain.register_health(
            &runtime.health,
            Criticality::Optional,
            CheckOptions::default(),
        );
        let ctx = Arc::new(Ctx {
            settings: settings.clone(),
            pool: runtime.pool.clone(),
            inbox: runtime.outbox.inbox(),
            publisher: runtime.publisher.clone(),
            brain,
        });
        let handler = move |env: Envelope| {
            let ctx = ctx.clone();
            async move { handle(&ctx, env).await }
        };
        let consumer = soma_bus::BusConsumer::builder(
            &runtime.bus("conversation"),
            &[settings.chat.requests_topic.as_str()],
            HANDLER,
            handler,
        )
        .producer(runtime.producer.clone())
        .metrics(&runtime.metrics)
        .health(&runtime.health)
        .spawn()?;
        tracing::info!(event = "conversation_worker_started", admin = %runtime.admin_addr);
        Ok(Self {
            runtime,
            consumer: Some(consumer),
        })
    }

    /// Where `/live`, `/ready`, `/v1/health` and `/metrics` listen.
    pub fn admin_addr(&self) -> std::net::SocketAddr {
        self.runtime.admin_addr
    }

    /// The shared runtime.
    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    /// Stops fetching, finishes in-flight messages, commits, then shuts the
    /// runtime down.
    pub async fn shutdown(mut self) {
        if let Some(c) = self.consumer.take() {
            c.shutdown().await;
        }
        self.runtime.shutdown().await;
    }
}

async fn handle(ctx: &Ctx, env: Envelope) -> Result<(), HandlerError> {
    let req: ChatRequest = env
        .json()
        .map_err(|e| HandlerError::fatal(format!("not a chat request: {e}")))?;
    if req.principal.tenant != env.tenant {
        return Err(HandlerError::fatal(
            "envelope tenant and principal tenant differ",
        ));
    }
    let chat = &ctx.settings.chat;

    // `/<tool> <input>`: the tool executor answers (after its own
    // authorization); nothing is recalled or remembered.
    if let Some((tool, input)) = protocol::parse_tool_call(&req.text) {
        let call = ToolCall {
            conversation_id: req.conversation_id.clone(),
            message_id: env.id,
            principal: req.principal.clone(),
            tool,
            input,
        };
        let call_env = Envelope::builder(
            protocol::TOOL_CALL,
            env.tenant.as_str(),
            req.conversation_id.as_str(),
        )
        .json(&call)
        .map_err(HandlerError::fatal)?
        .caused_by(&env)
        .build()
        .map_err(HandlerError::fatal)?;
        return commit_once(ctx, &env, &[(&chat.tools_topic, &call_env)]).await;
    }

    let scope = CallOptions::new()
        .tenant(req.principal.tenant.as_str())
        .namespace(chat.memory_namespace.as_str())
        .request_id(req.request_id.as_str());
    let recall = RecallRequest::new(req.text.as_str()).top_k(chat.recall_top_k as u32);
    let (memory, recalled) = match ctx.brain.recall(&recall, scope).await {
        Ok(found) => {
            let texts: Vec<String> = found
                .hits_in_namespace()
                .filter_map(|h| h.content.get("user_text").and_then(|v| v.as_str()))
                .map(str::to_owned)
                .collect();
            if texts.is_empty() {
                (MemoryStatus::None, texts)
            } else {
                (MemoryStatus::Recalled, texts)
            }
        }
        Err(e) => {
            // Explicit, measured degradation: the client counts it and the
            // health check reports it; the user still gets an answer.
            tracing::warn!(event = "recall_unavailable", error = %e);
            (MemoryStatus::Unavailable, Vec::new())
        }
    };
    let reply = protocol::compose_reply(&req, memory, &recalled);
    let events = protocol::reply_envelopes(&env, env.id, &req.conversation_id, &reply, memory)
        .map_err(HandlerError::fatal)?;
    let write = MemoryWrite {
        conversation_id: req.conversation_id.clone(),
        message_id: env.id,
        principal: req.principal.clone(),
        user_text: req.text.clone(),
        reply_text: reply,
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
    let mut out: Vec<(&str, &Envelope)> = events
        .iter()
        .map(|e| (chat.events_topic.as_str(), e))
        .collect();
    out.push((&chat.memory_topic, &memory_env));
    commit_once(ctx, &env, &out).await
}

/// In one transaction: record `cause` in the inbox and write `out` to the
/// outbox — or do nothing when `cause` was already handled.
async fn commit_once(
    ctx: &Ctx,
    cause: &Envelope,
    out: &[(&str, &Envelope)],
) -> Result<(), HandlerError> {
    let mut tx = ctx.pool.begin().await.map_err(HandlerError::retryable)?;
    let first = ctx
        .inbox
        .record(&mut tx, HANDLER, cause.id)
        .await
        .map_err(HandlerError::retryable)?;
    if !first {
        tracing::debug!(event = "duplicate_skipped", message_id = %cause.id);
        return Ok(());
    }
    for (topic, e) in out {
        ctx.publisher
            .publish_in_tx(&mut tx, topic, e)
            .await
            .map_err(HandlerError::retryable)?;
    }
    tx.commit().await.map_err(HandlerError::retryable)?;
    Ok(())
}
