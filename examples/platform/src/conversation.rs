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
//!    (a redelivered message is skipped), number and store the reply
//!    events in the session event store (what SSE clients resume from,
//!    see [`session_events`]), write them and the memory-write request
//!    to the outbox (`publish_in_tx`), commit;
//! 3. the relay delivers those records to Kafka in commit order.
//!
//! So the reply is produced exactly once per message id, even across
//! crashes and redeliveries, and nothing is lost while Kafka is down (the
//! outbox holds it).

use std::sync::Arc;
use std::time::Duration;

use soma_bus::{Envelope, HandlerError};
use soma_config::Live;
use soma_somabrain::{CallOptions, RecallRequest, SomabrainClient};
use tokio::net::TcpListener;

use crate::PlatformError;
use crate::protocol::{self, ChatRequest, MemoryStatus, MemoryWrite, ToolCall};
use soma_bus::Effects;

use crate::runtime::{KafkaRole, Runtime, Worker};
use crate::session_events::{self, SessionEvents};
use crate::settings::PlatformSettings;

/// Inbox handler name (one inbox row per message id and handler).
pub const HANDLER: &str = "conversation-worker";

struct Ctx {
    settings: Arc<PlatformSettings>,
    effects: Effects,
    store: SessionEvents,
    brain: SomabrainClient,
}

/// Starts a conversation worker consuming `chat.requests_topic`; admin
/// endpoints on `admin`.
pub async fn start(
    live: Live<PlatformSettings>,
    admin: TcpListener,
) -> Result<Worker, PlatformError> {
    let runtime = Runtime::start(live, admin, KafkaRole::Consumes, "conversation").await?;
    let ctx = Arc::new(Ctx {
        settings: runtime.settings.clone(),
        effects: runtime.effects(),
        store: runtime.session_events.clone(),
        // Without SomaBrain the worker answers without memory.
        brain: runtime.somabrain()?,
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
        return ctx
            .effects
            .commit_once(HANDLER, env.id, &[(&chat.tools_topic, &call_env)])
            .await
            .map(|_| ());
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
    let events = protocol::reply_events(env.id, &req.conversation_id, &reply, memory);
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
    session_events::commit_reply(
        &ctx.effects,
        &ctx.store,
        HANDLER,
        &env,
        &chat.events_topic,
        events,
        &[(&chat.memory_topic, &memory_env)],
    )
    .await
    .map(|_| ())
}
