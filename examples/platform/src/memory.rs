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
//!    overwrites the same memory). SomaBrain unavailable, timing out or
//!    rate limiting makes the write **wait** ([`HandlerError::Unavailable`]:
//!    retried with backoff for as long as it takes, never dead-lettered; the
//!    consumer lag grows and health shows `somabrain` degraded). Only a
//!    permanent refusal (a 4xx other than 429, validation) is dead-lettered
//!    to `<memory topic>.dlq`.

use std::sync::Arc;

use soma_bus::{Envelope, HandlerError};
use soma_config::Live;
use soma_policy::{Authorizer, AuthzInput, PolicyMetrics, Resource};
use soma_somabrain::{CallOptions, Memory, SomabrainClient};
use tokio::net::TcpListener;

use crate::PlatformError;
use crate::protocol::MemoryWrite;
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
    let decision = ctx
        .authz
        .check(&input)
        .await
        .map_err(|e| HandlerError::retryable(format!("policy unavailable: {e}")))?;
    if !decision.allow {
        return Err(HandlerError::fatal(format!(
            "memory.write denied: {}",
            decision.reasons.join(",")
        )));
    }
    let memory = Memory::from_json(
        write.message_id.to_string(),
        serde_json::json!({
            "conversation_id": write.conversation_id,
            "subject": write.principal.subject,
            "user_text": write.user_text,
            "reply_text": write.reply_text,
        }),
    )
    .map_err(HandlerError::fatal)?;
    let scope = CallOptions::new()
        .tenant(write.principal.tenant.as_str())
        .namespace(ctx.settings.chat.memory_namespace.as_str());
    match ctx.brain.remember(&memory, scope).await {
        Ok(ack) => {
            if !ack.is_confirmed() {
                tracing::warn!(event = "memory_stored_with_warnings", warnings = ?ack.warnings);
            }
            Ok(())
        }
        // SomaBrain down, overloaded or its breaker open: the write waits
        // (backoff, never dead-lettered) until it is back.
        Err(e) if e.is_retryable() || e.is_unavailable() => Err(HandlerError::unavailable(e)),
        Err(e) => Err(HandlerError::fatal(e)),
    }
}
