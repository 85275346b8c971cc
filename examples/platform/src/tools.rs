//! The tool executor: runs the tools users call with `/<tool> <input>`,
//! each after its own `tool.execute` authorization.
//!
//! For each `tool.call.requested` envelope (group
//! `<bus.consumer_group>.tools`):
//!
//! 1. look the tool up in the executor's registry, which — not the client
//!    — knows each tool's risk;
//! 2. authorize `tool.execute` on `tool/<name>` for the principal the
//!    gateway verified, with `context.tool_risk` from the registry. The
//!    reference policy lets agents and admins with the `tool:execute` scope
//!    run low-risk tools, and only admins run high-risk ones. A denial is
//!    an answer ("not run: missing_role"), not an error; a policy engine
//!    that cannot decide is retried (fail closed);
//! 3. in one Postgres transaction: record the call in the inbox and write
//!    the reply events to the outbox, so each call runs and answers once.
//!
//! | Tool | Risk | What it does |
//! |---|---|---|
//! | `time` | low | the current UTC time |
//! | `wordcount` | low | counts the words of its input |
//! | `outbox` | high | reports the platform's outbox backlog and dead letters (operational data) |

use std::sync::Arc;

use soma_bus::{Envelope, HandlerError};
use soma_config::Live;
use soma_outbox::Outbox;
use soma_policy::{Authorizer, AuthzInput, PolicyMetrics, Resource};
use tokio::net::TcpListener;

use crate::PlatformError;
use crate::protocol::{self, MemoryStatus, ToolCall};
use soma_bus::Effects;

use crate::runtime::{KafkaRole, Runtime, Worker};
use crate::session_events::{self, SessionEvents};
use crate::settings::PlatformSettings;

/// Consumer and inbox handler name.
pub const HANDLER: &str = "tool-executor";

/// How dangerous a tool is; the policy decides who may run which.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Risk {
    /// Reads nothing private, changes nothing.
    Low,
    /// Exposes operational data or changes state: administrators only.
    High,
}

impl Risk {
    /// The value of `context.tool_risk` in the policy input.
    pub fn as_str(self) -> &'static str {
        match self {
            Risk::Low => "low",
            Risk::High => "high",
        }
    }
}

/// The tools this executor knows, with their risk.
pub const TOOLS: &[(&str, Risk)] = &[
    ("time", Risk::Low),
    ("wordcount", Risk::Low),
    ("outbox", Risk::High),
];

struct Ctx {
    settings: Arc<PlatformSettings>,
    authz: Authorizer,
    outbox: Outbox,
    effects: Effects,
    store: SessionEvents,
}

/// Starts a tool executor consuming `chat.tools_topic`; admin endpoints on
/// `admin`.
pub async fn start(
    live: Live<PlatformSettings>,
    admin: TcpListener,
) -> Result<Worker, PlatformError> {
    let runtime = Runtime::start(live, admin, KafkaRole::Consumes, "tools").await?;
    let ctx = Arc::new(Ctx {
        settings: runtime.settings.clone(),
        authz: runtime.authorizer(PolicyMetrics::new(&runtime.metrics))?,
        outbox: runtime.outbox.clone(),
        effects: runtime.effects(),
        store: runtime.session_events.clone(),
    });
    let topic = ctx.settings.chat.tools_topic.clone();
    runtime.into_worker(&topic, HANDLER, move |env: Envelope| {
        let ctx = ctx.clone();
        async move { handle(&ctx, env).await }
    })
}

async fn handle(ctx: &Ctx, env: Envelope) -> Result<(), HandlerError> {
    let call: ToolCall = env
        .json()
        .map_err(|e| HandlerError::fatal(format!("not a tool call: {e}")))?;
    if call.principal.tenant != env.tenant {
        return Err(HandlerError::fatal(
            "envelope tenant and principal tenant differ",
        ));
    }
    let reply = match TOOLS.iter().find(|(name, _)| *name == call.tool) {
        None => format!(
            "There is no tool `{}`. Tools: {}.",
            call.tool,
            TOOLS.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
        ),
        Some((name, risk)) => {
            let input = AuthzInput::new(
                &call.principal,
                "tool.execute",
                Resource {
                    kind: "tool".into(),
                    id: Some((*name).to_owned()),
                },
            )
            .with_context("tool_risk", risk.as_str())
            .with_context("resource_tenant", env.tenant.clone());
            let decision = ctx
                .authz
                .check(&input)
                .await
                .map_err(|e| HandlerError::retryable(format!("policy unavailable: {e}")))?;
            if decision.allow {
                run(ctx, name, &call.input).await?
            } else {
                format!(
                    "Tool `{name}` was not run: {}.",
                    decision.reasons.join(", ")
                )
            }
        }
    };
    // The reply answers the user's message, not this envelope.
    let events = protocol::reply_events(
        call.message_id,
        &call.conversation_id,
        &reply,
        MemoryStatus::None,
    );
    session_events::commit_reply(
        &ctx.effects,
        &ctx.store,
        HANDLER,
        &env,
        &ctx.settings.chat.events_topic,
        events,
        &[],
    )
    .await
    .map(|_| ())
}

async fn run(ctx: &Ctx, tool: &str, input: &str) -> Result<String, HandlerError> {
    Ok(match tool {
        "time" => format!(
            "It is {} UTC.",
            chrono::Utc::now().format("%Y-%m-%d %H:%M:%S")
        ),
        "wordcount" => {
            let n = input.split_whitespace().count();
            format!("{n} word{}.", if n == 1 { "" } else { "s" })
        }
        "outbox" => {
            let stats = ctx.outbox.stats().await.map_err(HandlerError::retryable)?;
            format!(
                "Outbox: {} pending, {} dead-lettered.",
                stats.pending, stats.dead_letters
            )
        }
        other => format!("Tool `{other}` has no implementation."),
    })
}
