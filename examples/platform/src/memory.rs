//! The memory replicator: writes conversation turns to SomaBrain, after its
//! own authorization.
//!
//! For each `memory.write.requested` envelope (group
//! `<bus.consumer_group>.memory`):
//!
//! 1. authorize `memory.write` on `memory/<conversation>` for the principal
//!    the gateway verified, with the same [`Authorizer`] and input schema as
//!    the HTTP layer. A denial dead-letters the message (fatal); a policy
//!    engine that cannot decide is retried (fail closed);
//! 2. `remember` it in SomaBrain under the message id as key (a redelivery
//!    overwrites the same memory), in the subject's own namespace
//!    ([`protocol::memory_namespace`](crate::protocol::memory_namespace)),
//!    then send the turn's reward feedback (`context/feedback`: utility 1
//!    when the reply used recalled memories, 0 when it had none to use;
//!    the used keys in its metadata). SomaBrain unavailable, timing out or
//!    rate limiting makes the write **wait** ([`HandlerError::Unavailable`]:
//!    retried with backoff for as long as it takes, never dead-lettered; the
//!    consumer lag grows and health shows `somabrain` degraded). Only a
//!    permanent refusal (a 4xx other than 429, validation) is dead-lettered
//!    to `<memory topic>.dlq`.
//!
//! At-least-once towards SomaBrain: a redelivered write stores the same
//! keyed memory again (no duplicate) and sends its feedback again (the
//! feedback history may count a turn twice).

use std::sync::Arc;

use soma_bus::{Envelope, HandlerError};
use soma_config::Live;
use soma_policy::{Authorizer, AuthzInput, PolicyMetrics, Resource};
use soma_somabrain::{CallOptions, FeedbackRequest, Memory, SomabrainClient};
use tokio::net::TcpListener;

use crate::PlatformError;
use crate::protocol::{self, MemoryWrite};
use crate::runtime::{KafkaRole, Runtime, Worker};
use crate::settings::PlatformSettings;

/// Consumer handler name (in DLQ headers and metrics).
pub const HANDLER: &str = "memory-replicator";

struct Ctx {
    settings: Arc<PlatformSettings>,
    authz: Authorizer,
    brain: SomabrainClient,
}

/// Starts a memory replicator consuming `chat.memory_topic`; admin
/// endpoints on `admin`.
pub async fn start(
    live: Live<PlatformSettings>,
    admin: TcpListener,
) -> Result<Worker, PlatformError> {
    let runtime = Runtime::start(live, admin, KafkaRole::Consumes, "memory").await?;
    let ctx = Arc::new(Ctx {
        settings: runtime.settings.clone(),
        authz: runtime.authorizer(PolicyMetrics::new(&runtime.metrics))?,
        // Writes wait (retry, then DLQ) while SomaBrain is down: degraded.
        brain: runtime.somabrain()?,
    });
    let topic = ctx.settings.chat.memory_topic.clone();
    runtime.into_worker(&topic, HANDLER, move |env: Envelope| {
        let ctx = ctx.clone();
        async move { handle(&ctx, env).await }
    })
}

async fn handle(ctx: &Ctx, env: Envelope) -> Result<(), HandlerError> {
    let write: MemoryWrite = env
        .json()
        .map_err(|e| HandlerError::fatal(format!("not a memory write: {e}")))?;
    let input = AuthzInput::new(
        &write.principal,
        "memory.write",
        Resource {
            kind: "memory".into(),
            id: Some(write.conversation_id.clone()),
        },
    )
    .with_context("resource_tenant", env.tenant.clone());
    let decision = crate::runtime::decide(&ctx.authz, &input).await?;
    if !decision.allow {
        return Err(HandlerError::fatal(format!(
            "memory.write denied: {}",
            decision.reasons.join(",")
        )));
    }
    let memory = Memory::from_json(
        write.message_id.to_string(),
        serde_json::json!({
            "message_id": write.message_id.to_string(),
            "conversation_id": write.conversation_id,
            "subject": write.principal.subject,
            "user_text": write.user_text,
            "reply_text": write.reply_text,
        }),
    )
    .map_err(HandlerError::fatal)?;
    let scope = CallOptions::new()
        .tenant(write.principal.tenant.as_str())
        .namespace(protocol::memory_namespace(
            &ctx.settings.chat.memory_namespace,
            &write.principal.subject,
        ));
    let ack = ctx
        .brain
        .remember(&memory, scope.clone())
        .await
        .map_err(wait_or_fail)?;
    if !ack.is_confirmed() {
        tracing::warn!(event = "memory_stored_with_warnings", warnings = ?ack.warnings);
    }
    let mut metadata = serde_json::Map::new();
    metadata.insert("message_id".into(), write.message_id.to_string().into());
    metadata.insert("used_memories".into(), write.used_memories.clone().into());
    let feedback = FeedbackRequest {
        session_id: write.conversation_id.clone(),
        query: write.user_text.clone(),
        prompt: String::new(),
        response_text: write.reply_text.clone(),
        utility: if write.used_memories.is_empty() {
            0.0
        } else {
            1.0
        },
        reward: None,
        metadata: Some(metadata),
    };
    ctx.brain
        .context_feedback(&feedback, scope)
        .await
        .map_err(wait_or_fail)?;
    Ok(())
}

/// SomaBrain down, overloaded or its breaker open: the write waits
/// (backoff, never dead-lettered) until it is back; anything else is a
/// permanent refusal (dead-lettered).
fn wait_or_fail(e: soma_somabrain::Error) -> HandlerError {
    if e.is_retryable() || e.is_unavailable() {
        HandlerError::unavailable(e)
    } else {
        HandlerError::fatal(e)
    }
}
