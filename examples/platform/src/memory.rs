//! The memory replicator: writes conversation turns to a PostgreSQL
//! replica exactly once and to SomaBrain at least once, after its own
//! authorization, waiting (never dropping) while SomaBrain is down.
//!
//! For each `memory.write.requested` envelope (group
//! `<bus.consumer.group>.memory`):
//!
//! 1. authorize `memory.write` on `memory/<conversation>` for the principal
//!    the gateway verified, with the same [`Authorizer`] and input schema as
//!    the HTTP layer. A denial dead-letters the message (fatal); a policy
//!    engine that cannot decide is retried (fail closed);
//! 2. **record** the write in the replica
//!    ([`crate::memory_replica`]: tenant, the subject's namespace,
//!    conversation, message id, texts, used memories, `written_at`) in
//!    **one PostgreSQL transaction with its inbox row** (handler
//!    [`HANDLER`], the envelope id): a redelivery (a crash or rebalance
//!    before the offset commit) writes nothing, and reads the row's state
//!    instead — already remembered: done (counted
//!    `soma_platform_memory_writes_total{outcome="duplicate"}`); still
//!    pending, or refused before and now replayed from the DLQ: go on with
//!    step 3;
//! 3. `remember` it in SomaBrain under the message id as key (a redelivery
//!    overwrites the same memory), in the subject's own namespace
//!    ([`protocol::memory_namespace`]),
//!    then send the turn's reward feedback (`context/feedback`: utility 1
//!    when the reply used recalled memories, 0 when it had none to use;
//!    the used keys in its metadata);
//! 4. mark the replica row `remembered_at`.
//!
//! **Nothing is lost, in this order.** The replica row commits first
//! (exactly once), SomaBrain is written after (idempotent by key), the mark
//! last. A crash between any two steps leaves the offset uncommitted: the
//! redelivery finds the row still pending and remembers again (same key,
//! no duplicate memory; the feedback may count that turn twice).
//!
//! **SomaBrain down.** Unavailable, timing out or rate limiting makes the
//! write **wait** ([`HandlerError::Unavailable`]: retried with backoff for as
//! long as it takes, never dead-lettered): the row stays pending, so
//! `soma_platform_memory_replica_lag_seconds` (the oldest pending row's
//! age) and `soma_platform_memory_replica_pending_count` grow, and health
//! component `memory_replica` turns **degraded** once the lag exceeds
//! `memory.replica_lag_degraded_secs` (and `somabrain` shows degraded).
//! Both return to 0 / up when SomaBrain is back and the backlog is written.
//! Writes are handled in order per conversation (the topic's key), so the
//! later writes of a conversation whose write waits stay on the topic
//! behind it (`soma_bus_consumer_lag_messages`) and enter the replica when
//! their turn comes: the replica lag is the age of the oldest write
//! already taken from the topic.
//!
//! **Dead letters.** Only a permanent refusal (a 4xx other than 429,
//! validation; a denied or undecodable write) is dead-lettered to
//! `<memory topic>.dlq`; a refused row is marked `refused_at` (it no longer
//! counts as lag; replayed from the DLQ with the same envelope id, it is
//! pending again and remembered anew). soma-bus exposes no DLQ depth, so the replicator counts
//! the writes it dead-lettered itself since it started:
//! `soma_platform_memory_dead_lettered_count` and health component
//! `memory_dlq` (degraded while it is above 0, so an operator looks at the
//! DLQ and replays it with `soma-bus-replay`; a replay does not lower it,
//! a restart resets it, and malformed records the bus dead-letters before
//! the handler are not in it).
//!
//! Guarantees: exactly once into the replica per envelope id, at least once
//! into SomaBrain (by key: no duplicate memory), the feedback at least once.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use soma_bus::{Effects, Envelope, HandlerError};
use soma_config::Live;
use soma_observability::health::{Criticality, HealthReporter};
use soma_observability::metrics::{FloatGauge, MetricsRegistry};
use soma_observability::prometheus_client::metrics::counter::Counter;
use soma_observability::prometheus_client::metrics::family::Family;
use soma_observability::prometheus_client::metrics::gauge::Gauge;
use soma_policy::{Authorizer, AuthzInput, PolicyMetrics, Resource};
use soma_somabrain::{CallOptions, FeedbackRequest, Memory, SomabrainClient};
use tokio::net::TcpListener;

use crate::PlatformError;
use crate::memory_replica::{MemoryReplica, ReplicaState, ReplicaWrite};
use crate::protocol::{self, MemoryWrite};
use crate::runtime::{KafkaRole, Runtime, Worker};
use crate::settings::PlatformSettings;

/// Consumer and inbox handler name (in DLQ headers, metrics and the inbox).
pub const HANDLER: &str = "memory-replicator";

struct Ctx {
    settings: Arc<PlatformSettings>,
    effects: Effects,
    replica: MemoryReplica,
    authz: Authorizer,
    brain: SomabrainClient,
    /// Writes this process dead-lettered since it started.
    dead_lettered: Arc<AtomicU64>,
    /// `soma_platform_memory_writes_total{outcome}`.
    writes: Family<Labels, Counter>,
}

impl Ctx {
    fn count(&self, outcome: &'static str) {
        self.writes.get_or_create(&vec![("outcome", outcome)]).inc();
    }
}

type Labels = Vec<(&'static str, &'static str)>;

/// The replica's gauges and health components.
#[derive(Clone)]
struct ReplicaTelemetry {
    /// `soma_platform_memory_replica_lag_seconds`.
    lag: Family<Labels, FloatGauge>,
    /// `soma_platform_memory_replica_pending_count`.
    pending: Family<Labels, Gauge>,
    /// `soma_platform_memory_dead_lettered_count`.
    dead_lettered: Family<Labels, Gauge>,
    /// Health component `memory_replica` (optional).
    replica_health: HealthReporter,
    /// Health component `memory_dlq` (optional).
    dlq_health: HealthReporter,
}

impl ReplicaTelemetry {
    fn new(runtime: &Runtime) -> Self {
        let m: &MetricsRegistry = &runtime.metrics;
        let t = Self {
            lag: m.float_gauge_family(
                "soma_platform_memory_replica_lag_seconds",
                "Age of the oldest memory write in the replica not yet in SomaBrain \
                 (0: SomaBrain has every write)",
            ),
            pending: m.gauge_family(
                "soma_platform_memory_replica_pending_count",
                "Memory writes in the replica not yet in SomaBrain (nor refused)",
            ),
            dead_lettered: m.gauge_family(
                "soma_platform_memory_dead_lettered_count",
                "Memory writes this replicator dead-lettered since it started (the bus \
                 exposes no DLQ depth; replays do not lower it)",
            ),
            replica_health: runtime
                .health
                .reporter("memory_replica", Criticality::Optional),
            dlq_health: runtime.health.reporter("memory_dlq", Criticality::Optional),
        };
        t.lag.get_or_create(&Vec::new()).set(0.0);
        t.pending.get_or_create(&Vec::new()).set(0);
        t.dead_lettered.get_or_create(&Vec::new()).set(0);
        t
    }
}

/// Starts a memory replicator consuming `chat.memory_topic`; admin
/// endpoints on `admin`.
pub async fn start(
    live: Live<PlatformSettings>,
    admin: TcpListener,
) -> Result<Worker, PlatformError> {
    let runtime = Runtime::start(live, admin, KafkaRole::Consumes, "memory").await?;
    let replica = runtime.session_events.memory_replica();
    replica.migrate().await?;
    let ctx = Arc::new(Ctx {
        settings: runtime.settings.clone(),
        effects: runtime.effects(),
        replica,
        authz: runtime.authorizer(PolicyMetrics::new(&runtime.metrics))?,
        // Writes wait (retried, never dead-lettered) while SomaBrain is
        // down: degraded.
        brain: runtime.somabrain()?,
        dead_lettered: Arc::new(AtomicU64::new(0)),
        writes: runtime.metrics.counter_family(
            "soma_platform_memory_writes_total",
            "Memory writes handled, by outcome: recorded (new in the replica), \
             remembered (SomaBrain has it), duplicate (remembered before: a \
             redelivery, skipped), dead_lettered (refused for good)",
        ),
    });
    spawn_lag_monitor(&ctx, &runtime);
    let topic = ctx.settings.chat.memory_topic.clone();
    runtime.into_worker(&topic, HANDLER, move |env: Envelope| {
        let ctx = ctx.clone();
        async move {
            let outcome = handle(&ctx, env).await;
            if matches!(outcome, Err(HandlerError::Fatal(_))) {
                ctx.dead_lettered.fetch_add(1, Ordering::Relaxed);
                ctx.count("dead_lettered");
            }
            outcome
        }
    })
}

/// Measures the replica lag and the DLQ count every
/// `memory.replica_lag_interval_ms` into the gauges and health components,
/// until the process starts draining. A failed measurement leaves the
/// gauges as they were and reports `memory_replica` degraded.
fn spawn_lag_monitor(ctx: &Arc<Ctx>, runtime: &Runtime) {
    let telemetry = ReplicaTelemetry::new(runtime);
    let ctx = ctx.clone();
    let draining = runtime.lifecycle.draining();
    let memory = ctx.settings.memory.clone();
    let bound = Duration::from_secs(memory.replica_lag_degraded_secs);
    tokio::spawn(async move {
        tokio::pin!(draining);
        let mut tick = tokio::time::interval(Duration::from_millis(memory.replica_lag_interval_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = &mut draining => break,
                _ = tick.tick() => {}
            }
            report_lag(&ctx, &telemetry, bound).await;
        }
    });
}

async fn report_lag(ctx: &Ctx, t: &ReplicaTelemetry, bound: Duration) {
    let dead = ctx.dead_lettered.load(Ordering::Relaxed);
    t.dead_lettered
        .get_or_create(&Vec::new())
        .set(dead.min(i64::MAX as u64) as i64);
    t.dlq_health.set_gauge("dead_lettered", dead as f64);
    if dead == 0 {
        t.dlq_health.set_up();
    } else {
        t.dlq_health.set_degraded(format!(
            "{dead} memory writes dead-lettered to {}.dlq since start",
            ctx.settings.chat.memory_topic
        ));
    }
    let lag = match ctx.replica.lag().await {
        Ok(lag) => lag,
        Err(e) => {
            tracing::warn!(event = "memory_replica_lag_failed", error = %e);
            t.replica_health
                .set_degraded("replica lag unknown: PostgreSQL query failed");
            return;
        }
    };
    let secs = lag.oldest.as_secs_f64();
    t.lag.get_or_create(&Vec::new()).set(secs);
    t.pending
        .get_or_create(&Vec::new())
        .set(lag.pending.min(i64::MAX as u64) as i64);
    t.replica_health.set_gauge("lag_seconds", secs);
    t.replica_health.set_gauge("pending", lag.pending as f64);
    if lag.oldest > bound {
        t.replica_health.set_degraded(format!(
            "{} memory writes wait for SomaBrain, the oldest {secs:.0} s (bound {} s)",
            lag.pending,
            bound.as_secs()
        ));
    } else {
        t.replica_health.set_up();
    }
}

async fn handle(ctx: &Ctx, env: Envelope) -> Result<(), HandlerError> {
    let write: MemoryWrite = env
        .json()
        .map_err(|e| HandlerError::fatal(format!("not a memory write: {e}")))?;
    authorize(ctx, &env, &write).await?;
    let tenant = write.principal.tenant.as_str();
    let namespace = protocol::memory_namespace(
        &ctx.settings.chat.memory_namespace,
        &write.principal.subject,
    );
    if record_once(ctx, &env, &write, &namespace).await? {
        ctx.count("recorded");
    } else {
        let state = ctx
            .replica
            .state(tenant, write.message_id)
            .await
            .map_err(HandlerError::retryable)?;
        match state {
            ReplicaState::Remembered => {
                tracing::debug!(event = "memory_write_duplicate", message_id = %write.message_id);
                ctx.count("duplicate");
                return Ok(());
            }
            // Replayed from the DLQ: try again, counted as lag meanwhile.
            ReplicaState::Refused => ctx
                .replica
                .mark(tenant, write.message_id, ReplicaState::Pending)
                .await
                .map_err(HandlerError::retryable)?,
            ReplicaState::Pending | ReplicaState::Missing => {}
        }
    }
    let scope = CallOptions::new().tenant(tenant).namespace(namespace);
    if let Err(e) = remember(ctx, &write, scope).await {
        if matches!(e, HandlerError::Fatal(_)) {
            // Out of the lag: it is in the DLQ now.
            let refused = ReplicaState::Refused;
            if let Err(e) = ctx.replica.mark(tenant, write.message_id, refused).await {
                // Stays pending (counted as lag) until a replay settles it.
                tracing::warn!(event = "memory_replica_mark_failed", error = %e);
            }
        }
        return Err(e);
    }
    ctx.replica
        .mark(tenant, write.message_id, ReplicaState::Remembered)
        .await
        .map_err(HandlerError::retryable)?;
    ctx.count("remembered");
    Ok(())
}

/// `memory.write` for the write's principal; a denial is fatal (DLQ), an
/// engine that cannot decide retryable.
async fn authorize(ctx: &Ctx, env: &Envelope, write: &MemoryWrite) -> Result<(), HandlerError> {
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
    Ok(())
}

/// The replica row and the inbox row of `env`, in one transaction; `false`
/// (nothing written) when this handler recorded `env` before.
async fn record_once(
    ctx: &Ctx,
    env: &Envelope,
    write: &MemoryWrite,
    namespace: &str,
) -> Result<bool, HandlerError> {
    let Some(mut tx) = ctx.effects.begin(HANDLER, env.id).await? else {
        return Ok(false);
    };
    let row = ReplicaWrite {
        tenant: &write.principal.tenant,
        namespace,
        conversation_id: &write.conversation_id,
        message_id: write.message_id,
        user_text: &write.user_text,
        reply_text: &write.reply_text,
        used_memories: &write.used_memories,
    };
    ctx.replica
        .record(tx.conn(), &row)
        .await
        .map_err(HandlerError::retryable)?;
    tx.commit().await?;
    Ok(true)
}

/// SomaBrain `remember` under the message id, then the turn's feedback.
async fn remember(ctx: &Ctx, write: &MemoryWrite, scope: CallOptions) -> Result<(), HandlerError> {
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
