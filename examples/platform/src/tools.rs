//! The tool executor: runs the tools users call with `/<tool> <input>`,
//! each after its own `tool.execute` authorization, within its time and
//! output limits.
//!
//! For each `tool.call.requested` envelope (group
//! `<bus.consumer.group>.tools`):
//!
//! 1. look the tool up in the executor's registry, which — not the client
//!    — knows each tool's risk;
//! 2. authorize `tool.execute` on `tool/<name>` for the principal the
//!    gateway verified, with `context.tool_risk` from the registry. The
//!    reference policy lets agents and admins with the `tool:execute` scope
//!    run low-risk tools, and only admins run high-risk ones. A denial is
//!    an answer ("not run: missing_role"), not an error; a policy engine
//!    that cannot decide is retried (fail closed);
//! 3. run it under its timeout (`tools.timeout_ms`, or the tool's entry in
//!    `tools.limits`): a tool still running then is stopped and answers
//!    `timed_out`. Its output is cut at `tools.max_output_bytes` (or the
//!    tool's own limit, at a character boundary; `truncated: true`);
//! 4. in one Postgres transaction: record the call in the inbox, publish
//!    the [`ToolResult`] on `chat.tool_results_topic` (correlated by the
//!    message's request id and message id) and relay it to the session
//!    stream as a `tool.result` event followed by the reply events — so
//!    each call runs and answers once (a redelivered call that was
//!    answered is skipped before it runs, and its commit would find the
//!    inbox row anyway; a crash before the commit runs the tool again, so
//!    tools must be safe to repeat).
//!
//! | Tool | Risk | What it does |
//! |---|---|---|
//! | `time` | low | the current UTC time |
//! | `wordcount` | low | counts the words of its input |
//! | `echo` | low | repeats its input (shows the output limit) |
//! | `sleep` | low | waits its input in milliseconds, at most 60 000 (shows the timeout) |
//! | `outbox` | high | reports the platform's outbox backlog and dead letters (operational data) |

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use soma_bus::{Envelope, HandlerError};
use soma_config::Live;
use soma_outbox::Outbox;
use soma_policy::{Authorizer, AuthzInput, PolicyMetrics, Resource};
use tokio::net::TcpListener;

use crate::PlatformError;
use crate::protocol::{self, ChatEvent, EventKind, MemoryStatus, ToolCall, ToolResult, ToolStatus};
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
    ("echo", Risk::Low),
    ("sleep", Risk::Low),
    ("outbox", Risk::High),
];

/// Longest `/sleep` waits, in milliseconds.
pub const MAX_SLEEP_MS: u64 = 60_000;

/// The `tools` settings section: how long a tool may run and how much it
/// may say.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct ToolSettings {
    /// Longest a tool runs before it is stopped (`timed_out`).
    pub timeout_ms: u64,
    /// Longest output kept, in bytes; the rest is cut (`truncated`).
    pub max_output_bytes: usize,
    /// Per-tool overrides, by tool name.
    pub limits: BTreeMap<String, ToolLimits>,
}

impl Default for ToolSettings {
    fn default() -> Self {
        Self {
            timeout_ms: 5_000,
            max_output_bytes: 2_048,
            limits: BTreeMap::new(),
        }
    }
}

/// One tool's overrides of [`ToolSettings`].
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct ToolLimits {
    /// This tool's timeout.
    pub timeout_ms: Option<u64>,
    /// This tool's output limit.
    pub max_output_bytes: Option<usize>,
}

impl ToolSettings {
    /// `tool`'s timeout and output limit.
    pub fn limits_of(&self, tool: &str) -> (Duration, usize) {
        let own = self.limits.get(tool);
        (
            Duration::from_millis(own.and_then(|l| l.timeout_ms).unwrap_or(self.timeout_ms)),
            own.and_then(|l| l.max_output_bytes)
                .unwrap_or(self.max_output_bytes),
        )
    }
}

/// `text` cut to at most `max` bytes at a character boundary, and whether
/// it was cut.
pub fn truncate(text: &str, max: usize) -> (String, bool) {
    if text.len() <= max {
        return (text.to_owned(), false);
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    (text[..end].to_owned(), true)
}

struct Ctx {
    settings: Arc<PlatformSettings>,
    authz: Authorizer,
    outbox: Outbox,
    effects: Effects,
    pool: sqlx::PgPool,
    inbox: soma_outbox::Inbox,
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
        pool: runtime.pool.clone(),
        inbox: runtime.outbox.inbox(),
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
    if crate::runtime::handled_before(&ctx.pool, &ctx.inbox, HANDLER, env.id).await {
        tracing::debug!(event = "tool_call_answered_before", message_id = %env.id);
        return Ok(());
    }
    let started = Instant::now();
    let (status, output) = run_tool(ctx, &call, &env).await?;
    let (_, max_output) = ctx.settings.tools.limits_of(&call.tool);
    let (output, truncated) = truncate(&output, max_output);
    let result = ToolResult {
        conversation_id: call.conversation_id.clone(),
        message_id: call.message_id,
        request_id: call.request_id.clone(),
        tool: call.tool.clone(),
        status,
        output,
        truncated,
        elapsed_ms: started.elapsed().as_millis() as u64,
    };
    let result_env = Envelope::builder(
        protocol::TOOL_RESULT,
        env.tenant.as_str(),
        call.conversation_id.as_str(),
    )
    .json(&result)
    .map_err(HandlerError::fatal)?
    .caused_by(&env)
    .correlation_id(call.request_id.as_str())
    .build()
    .map_err(HandlerError::fatal)?;
    let events = result_events(&call, &result, truncated);
    session_events::commit_reply(
        &ctx.effects,
        &ctx.store,
        HANDLER,
        &env,
        &ctx.settings.chat.events_topic,
        events,
        &[(&ctx.settings.chat.tool_results_topic, &result_env)],
    )
    .await
    .map(|_| ())
}

/// Runs the tool `call` names if the policy allows it. An unknown tool and
/// a denied call are answers (status and a sentence saying why), not
/// errors.
async fn run_tool(
    ctx: &Ctx,
    call: &ToolCall,
    env: &Envelope,
) -> Result<(ToolStatus, String), HandlerError> {
    Ok(match TOOLS.iter().find(|(name, _)| *name == call.tool) {
        None => (
            ToolStatus::Unknown,
            format!(
                "There is no tool `{}`. Tools: {}.",
                call.tool,
                TOOLS.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
            ),
        ),
        Some((name, risk)) => match authorize(ctx, call, env, name, *risk).await? {
            Some(reasons) => (
                ToolStatus::Denied,
                format!("Tool `{name}` was not run: {}.", reasons.join(", ")),
            ),
            None => run_limited(ctx, name, &call.input).await?,
        },
    })
}

/// What the session stream gets for a tool call, numbered from 0: the
/// result, then the reply (which answers the user's message, not the tool
/// call's envelope; `…` marks a truncated output).
fn result_events(call: &ToolCall, result: &ToolResult, truncated: bool) -> Vec<ChatEvent> {
    let mut events = vec![ChatEvent {
        conversation_id: call.conversation_id.clone(),
        message_id: call.message_id,
        seq: 0,
        kind: EventKind::ToolResult,
        text: result.output.clone(),
        memory: MemoryStatus::None,
        event_id: 0,
        memories: Vec::new(),
    }];
    let reply = if truncated {
        format!("{}…", result.output)
    } else {
        result.output.clone()
    };
    events.extend(protocol::reply_events(
        call.message_id,
        &call.conversation_id,
        &reply,
        MemoryStatus::None,
        &[],
    ));
    for (seq, e) in events.iter_mut().enumerate() {
        e.seq = seq as u32;
    }
    events
}

/// `tool.execute` on `tool/<name>` with the tool's risk. `Some(reasons)`
/// when denied; an engine that cannot decide is retried.
async fn authorize(
    ctx: &Ctx,
    call: &ToolCall,
    env: &Envelope,
    name: &str,
    risk: Risk,
) -> Result<Option<Vec<String>>, HandlerError> {
    let input = AuthzInput::new(
        &call.principal,
        "tool.execute",
        Resource {
            kind: "tool".into(),
            id: Some(name.to_owned()),
        },
    )
    .with_context("tool_risk", risk.as_str())
    .with_context("resource_tenant", env.tenant.clone());
    let decision = crate::runtime::decide(&ctx.authz, &input).await?;
    Ok((!decision.allow).then_some(decision.reasons))
}

/// Runs `tool` under its timeout.
async fn run_limited(
    ctx: &Ctx,
    tool: &str,
    input: &str,
) -> Result<(ToolStatus, String), HandlerError> {
    let (timeout, _) = ctx.settings.tools.limits_of(tool);
    match tokio::time::timeout(timeout, run(ctx, tool, input)).await {
        Ok(Ok(output)) => Ok((ToolStatus::Ok, output)),
        Ok(Err(failed)) => Ok((ToolStatus::Failed, failed)),
        Err(_) => Ok((
            ToolStatus::TimedOut,
            format!("Tool `{tool}` timed out after {} ms.", timeout.as_millis()),
        )),
    }
}

/// One tool's work: `Ok(output)`, or `Err(what failed)`.
async fn run(ctx: &Ctx, tool: &str, input: &str) -> Result<String, String> {
    Ok(match tool {
        "time" => format!(
            "It is {} UTC.",
            chrono::Utc::now().format("%Y-%m-%d %H:%M:%S")
        ),
        "wordcount" => {
            let n = input.split_whitespace().count();
            format!("{n} word{}.", if n == 1 { "" } else { "s" })
        }
        "echo" => input.to_owned(),
        "sleep" => {
            let ms = input
                .trim()
                .parse::<u64>()
                .map_err(|_| format!("`sleep` takes milliseconds, not {input:?}."))?
                .min(MAX_SLEEP_MS);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            format!("Slept {ms} ms.")
        }
        "outbox" => {
            let stats = ctx
                .outbox
                .stats()
                .await
                .map_err(|e| format!("Outbox statistics unavailable: {e}."))?;
            format!(
                "Outbox: {} pending, {} dead-lettered.",
                stats.pending, stats.dead_letters
            )
        }
        other => format!("Tool `{other}` has no implementation."),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_is_cut_at_a_character_boundary() {
        assert_eq!(truncate("hello", 10), ("hello".to_owned(), false));
        assert_eq!(truncate("hello", 3), ("hel".to_owned(), true));
        // 'é' is two bytes: a cut inside it moves back before it.
        assert_eq!(truncate("héllo", 2), ("h".to_owned(), true));
    }

    #[test]
    fn per_tool_limits_override_the_defaults() {
        let mut s = ToolSettings::default();
        s.limits.insert(
            "sleep".into(),
            ToolLimits {
                timeout_ms: Some(100),
                max_output_bytes: None,
            },
        );
        assert_eq!(s.limits_of("sleep"), (Duration::from_millis(100), 2_048));
        assert_eq!(s.limits_of("echo"), (Duration::from_millis(5_000), 2_048));
    }
}
