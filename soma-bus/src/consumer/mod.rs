//! Consumers; the guarantee and the failure handling are documented on [`BusConsumer`].

mod dlq;
mod fetch;
mod lanes;
mod progress;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::Mutex;
use rdkafka::ClientConfig;
use rdkafka::client::ClientContext;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer as _, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::statistics::Statistics;
use soma_observability::health::{Criticality, HealthRegistry, HealthReporter};
use soma_observability::metrics::MetricsRegistry;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use dlq::{
    DLQ_ATTEMPTS, DLQ_ERROR, DLQ_FAILED_AT, DLQ_GROUP, DLQ_HANDLER, DLQ_HEADER_PREFIX,
    DLQ_ORIGIN_OFFSET, DLQ_ORIGIN_PARTITION, DLQ_ORIGIN_TOPIC,
};
use lanes::RecentIds;
use progress::Progress;

use crate::config::BusConfig;
use crate::envelope::{Envelope, EnvelopeError};
use crate::error::BusError;
use crate::metrics::{BusMetrics, LagLabels};
use crate::producer::BusProducer;

/// What a handler reports when it cannot process a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HandlerError {
    /// A transient failure (dependency down, timeout): retry with backoff.
    #[error("retryable: {0}")]
    Retryable(String),
    /// The message can never be processed (invalid payload, violated
    /// invariant): dead-letter it now.
    #[error("fatal: {0}")]
    Fatal(String),
    /// A dependency the handler needs is down (its service unreachable, its
    /// breaker open): the message **waits**. It is retried with the retry
    /// backoff (capped at `consumer.retry_backoff_max_ms`) for as long as it takes,
    /// its attempts are not counted and it is never dead-lettered; later
    /// messages of its key wait behind it. A shutdown abandons the wait and
    /// the message is redelivered after the restart.
    #[error("unavailable: {0}")]
    Unavailable(String),
}

impl HandlerError {
    /// A retryable error.
    pub fn retryable(e: impl std::fmt::Display) -> Self {
        Self::Retryable(e.to_string())
    }
    /// A fatal error.
    pub fn fatal(e: impl std::fmt::Display) -> Self {
        Self::Fatal(e.to_string())
    }
    /// A dependency is down: wait, never dead-letter.
    pub fn unavailable(e: impl std::fmt::Display) -> Self {
        Self::Unavailable(e.to_string())
    }
    /// True for retryable errors.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Retryable(_))
    }
    /// True when a dependency is down and the message waits.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }
}

/// A payload that does not decode is fatal: retrying cannot fix it.
impl From<EnvelopeError> for HandlerError {
    fn from(e: EnvelopeError) -> Self {
        Self::Fatal(e.to_string())
    }
}

/// Processes one message. Implemented for every
/// `Fn(Envelope) -> impl Future<Output = Result<(), HandlerError>>`.
#[async_trait::async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Handles `env`; the offset is committed only after `Ok` (or a confirmed DLQ write).
    async fn handle(&self, env: Envelope) -> Result<(), HandlerError>;
}

#[async_trait::async_trait]
impl<F, Fut> Handler for F
where
    F: Fn(Envelope) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    async fn handle(&self, env: Envelope) -> Result<(), HandlerError> {
        (self)(env).await
    }
}

struct Ctx {
    progress: Arc<Mutex<Progress>>,
    commits: bool,
    metrics: BusMetrics,
    group: String,
}

impl ClientContext for Ctx {
    fn stats(&self, stats: Statistics) {
        for (topic, t) in &stats.topics {
            for (partition, p) in &t.partitions {
                if *partition < 0 || p.consumer_lag < 0 {
                    continue;
                }
                self.metrics
                    .lag
                    .get_or_create(&LagLabels {
                        topic: topic.clone(),
                        partition: partition.to_string(),
                        group: self.group.clone(),
                    })
                    .set(p.consumer_lag);
            }
        }
    }
}

impl ConsumerContext for Ctx {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if !matches!(rebalance, Rebalance::Assign(_)) {
            log_rebalance(&self.group, rebalance);
        }
        if let Rebalance::Revoke(tpl) = rebalance {
            let mut progress = self.progress.lock();
            if self.commits {
                let offsets = progress.committable(Some(tpl));
                if offsets.count() > 0 {
                    if let Err(error) = consumer.commit(&offsets, CommitMode::Sync) {
                        tracing::warn!(event = "commit_on_revoke_failed", %error);
                    }
                }
            }
            progress.forget(tpl);
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if matches!(rebalance, Rebalance::Assign(_)) {
            log_rebalance(&self.group, rebalance);
        }
    }
}

/// A group's rebalance, as an operator follows it: partitions revoked
/// (before the new assignment) and assigned (after it) at `info`, a failed
/// rebalance at `warn`. A member evicted for missed heartbeats shows as a
/// revoke and an assignment it did not ask for.
fn log_rebalance(group: &str, rebalance: &Rebalance<'_>) {
    match rebalance {
        Rebalance::Assign(tpl) => {
            tracing::info!(
                event = "partitions_assigned",
                group,
                partitions = tpl.count()
            );
        }
        Rebalance::Revoke(tpl) => {
            tracing::info!(
                event = "partitions_revoked",
                group,
                partitions = tpl.count()
            );
        }
        Rebalance::Error(error) => {
            tracing::warn!(event = "rebalance_failed", group, %error);
        }
    }
}

/// Builder for a running consumer; see [`BusConsumer`].
pub struct ConsumerBuilder {
    config: BusConfig,
    topics: Vec<String>,
    handler_name: String,
    handler: Arc<dyn Handler>,
    producer: Option<BusProducer>,
    group: Option<String>,
    metrics: Option<MetricsRegistry>,
    health: Option<HealthRegistry>,
    inbox: Option<crate::inbox::InboxDedupe>,
    broadcast: bool,
    from_beginning: bool,
    dedupe_window: usize,
}

/// Consumers: consumer groups, bounded retries, a dead-letter topic, ordered
/// concurrency, graceful shutdown.
///
/// # Guarantee
///
/// **At-least-once, ordered per key.** A message's offset is committed only
/// after its handler succeeded or the message was written to `<topic>.dlq`
/// and the broker acknowledged that write. A failed DLQ write is retried
/// (every `consumer.dlq_retry_backoff_ms`) while the lane holding it — and, once its
/// queue fills, fetching — waits; it is never skipped. Meanwhile the health
/// component is degraded. A graceful shutdown that runs out of
/// `consumer.shutdown_timeout_ms` gives up on the write and commits only below the
/// message, so the next consumer of the group receives it again. Messages
/// of one key are handled one at a time, in offset order, on one lane;
/// different keys run concurrently on `consumer.concurrency` lanes.
///
/// Duplicates happen when the process stops (or loses a partition in a
/// rebalance) after a handler ran but before the offset was committed; the
/// message is then handled again, with the same envelope id. Enable inbox
/// dedupe ([`ConsumerBuilder::inbox`]) to drop those.
///
/// # Failures
///
/// - `HandlerError::Retryable`: retried up to `max_attempts` (first try
///   included) with exponential backoff, then dead-lettered.
/// - `HandlerError::Fatal`: dead-lettered at once.
/// - A record that is not a valid envelope (missing / malformed headers) is
///   dead-lettered at once without calling the handler, so it cannot wedge
///   the partition.
///
/// DLQ records keep the original key, payload and headers and add
/// `soma-dlq-origin-topic`, `-origin-partition`, `-origin-offset`,
/// `-attempts`, `-error`, `-handler`, `-group` and `-failed-at`.
///
/// # Broadcast
///
/// [`ConsumerBuilder::broadcast`] assigns itself every partition of its
/// topics, starting at the end of each, without joining a consumer group:
/// every replica sees every message published while it runs and nothing
/// from before ([`ConsumerBuilder::broadcast_from_beginning`] also reads
/// what the topics already hold, for state a starting replica must catch up
/// on). No group coordinator is involved, so a broker restart or a
/// lost session never resets the position: the consumer keeps fetching from
/// where it was once the broker is back (a subscribed group member that had
/// to rejoin would start again at the end and skip what was published
/// meanwhile). Partitions added to a topic later are picked up within
/// 30 seconds, from their beginning. Offsets are not committed and failed
/// messages are not dead-lettered (every replica would write its own copy):
/// after the retries they are logged and counted as `dropped`.
///
/// # Health
///
/// With [`ConsumerBuilder::health`], a consume error (the broker
/// unreachable) degrades the component `bus_consumer.<handler>`. It is up
/// again as soon as a message arrives **or** a metadata request for the
/// consumed topics succeeds (tried every second while degraded), so a
/// consumer of an idle topic recovers as well as a busy one.
///
/// # Duplicates seen by this process
///
/// [`ConsumerBuilder::dedupe_window`] drops a message whose envelope id this
/// consumer handled among its last `n` handled messages, without a database:
/// the defence of a broadcast consumer (which has no inbox) against a
/// producer's redelivered duplicates. It does not survive a restart; the
/// inbox does.
#[derive(Debug)]
pub struct BusConsumer;

impl BusConsumer {
    /// A consumer of `topics` in group `config.consumer.group` (or the one
    /// given to [`group`](ConsumerBuilder::group)), calling `handler`
    /// (named `handler_name` in DLQ headers, logs and metrics).
    pub fn builder(
        config: &BusConfig,
        topics: &[&str],
        handler_name: impl Into<String>,
        handler: impl Handler,
    ) -> ConsumerBuilder {
        ConsumerBuilder {
            config: config.clone(),
            topics: topics.iter().map(|t| (*t).to_owned()).collect(),
            handler_name: handler_name.into(),
            handler: Arc::new(handler),
            producer: None,
            group: None,
            metrics: None,
            health: None,
            inbox: None,
            broadcast: false,
            from_beginning: false,
            dedupe_window: 0,
        }
    }
}

impl ConsumerBuilder {
    /// Producer used for DLQ writes (default: a new one from the config).
    pub fn producer(mut self, producer: BusProducer) -> Self {
        self.producer = Some(producer);
        self
    }
    /// Joins consumer group `group` instead of `config.consumer.group`:
    /// one service's consumers of different topics (or of one topic for
    /// different purposes) each in their own group, from one shared
    /// [`BusConfig`]. In broadcast mode it is the prefix of the
    /// per-instance group. An empty name is refused by
    /// [`spawn`](Self::spawn).
    pub fn group(mut self, group: impl Into<String>) -> Self {
        self.group = Some(group.into());
        self
    }
    /// Registers metrics in `registry`.
    pub fn metrics(mut self, registry: &MetricsRegistry) -> Self {
        self.metrics = Some(registry.clone());
        self
    }
    /// Reports the component `bus_consumer.<handler>`.
    pub fn health(mut self, registry: &HealthRegistry) -> Self {
        self.health = Some(registry.clone());
        self
    }
    /// Drops messages whose envelope id the inbox already recorded for this
    /// handler, and records each handled one.
    pub fn inbox(mut self, inbox: crate::inbox::InboxDedupe) -> Self {
        self.inbox = Some(inbox);
        self
    }
    /// Broadcast mode: every instance sees every message (see [`BusConsumer`]).
    pub fn broadcast(mut self) -> Self {
        self.broadcast = true;
        self
    }
    /// Broadcast mode that first reads what its topics already hold: each
    /// partition from its beginning (what retention or compaction kept),
    /// then everything published while it runs. For state that a starting
    /// replica must catch up on, such as remote config updates (with a
    /// compacted topic, the latest per key). The handler sees old messages
    /// again on every start.
    pub fn broadcast_from_beginning(mut self) -> Self {
        self.broadcast = true;
        self.from_beginning = true;
        self
    }
    /// Drops a message whose envelope id was among the last `n` this
    /// consumer handled (in memory; see [`BusConsumer`]). `0` (the default)
    /// turns it off.
    pub fn dedupe_window(mut self, n: usize) -> Self {
        self.dedupe_window = n;
        self
    }

    /// Subscribes and starts consuming in background tasks.
    pub fn spawn(self) -> Result<ConsumerHandle, BusError> {
        let cfg = checked_config(self.config, self.group, &self.topics)?;
        let metrics = BusMetrics::new(&self.metrics.unwrap_or_default());
        let producer = match self.producer {
            Some(p) => p,
            None => BusProducer::new(&cfg)?,
        };
        let group = group_id(&cfg, self.broadcast);
        let progress = Arc::new(Mutex::new(Progress::default()));
        let ctx = Ctx {
            progress: progress.clone(),
            commits: !self.broadcast,
            metrics: metrics.clone(),
            group: group.clone(),
        };
        let consumer: StreamConsumer<Ctx> =
            client_config(&cfg, &group, self.broadcast).create_with_context(ctx)?;
        if !self.broadcast {
            // Broadcast consumers assign themselves in `run` (no group).
            let topics: Vec<&str> = self.topics.iter().map(String::as_str).collect();
            consumer.subscribe(&topics)?;
        }
        let health = self.health.map(|h| health_reporter(&h, &self.handler_name));
        let stop = CancellationToken::new();
        let hard = CancellationToken::new();
        let shared = Arc::new(Shared {
            cfg,
            handler: self.handler,
            handler_name: self.handler_name,
            group,
            producer,
            metrics,
            progress,
            inbox: self.inbox,
            recent: (self.dedupe_window > 0)
                .then(|| Mutex::new(RecentIds::new(self.dedupe_window))),
            broadcast: self.broadcast,
            from_beginning: self.from_beginning,
            topics: self.topics,
            health,
            hard: hard.clone(),
            stop: stop.clone(),
            dlq_blocked: AtomicUsize::new(0),
        });
        let task = tokio::spawn(fetch::run(Arc::new(consumer), shared));
        Ok(ConsumerHandle {
            stop,
            hard,
            task: Some(task),
        })
    }
}

/// `config` with its consumer group replaced by `group` when given, after
/// checking what [`ConsumerBuilder::spawn`] refuses: an empty group name,
/// an invalid config, no topics.
fn checked_config(
    mut config: BusConfig,
    group: Option<String>,
    topics: &[String],
) -> Result<BusConfig, BusError> {
    if let Some(group) = group {
        if group.trim().is_empty() {
            return Err(BusError::Config("consumer group name is empty".into()));
        }
        config.consumer.group = group;
    }
    config.validate()?;
    config.warn_deprecated_keys();
    if topics.is_empty() {
        return Err(BusError::Config("no topics to consume".into()));
    }
    Ok(config)
}

/// The consumer group the client joins: `consumer.group`, or in broadcast
/// mode a group of this instance alone, `<consumer.group>.broadcast.<uuid>`
/// (never coordinated, never committed to).
fn group_id(cfg: &BusConfig, broadcast: bool) -> String {
    if broadcast {
        format!(
            "{}.broadcast.{}",
            cfg.consumer.group,
            uuid::Uuid::now_v7().simple()
        )
    } else {
        cfg.consumer.group.clone()
    }
}

/// The rdkafka consumer settings: `group`, offsets stored and committed by
/// this crate only (never automatically), no partition-EOF events, the
/// session timeout, where a group without a position starts (`latest` in
/// broadcast mode) and, with `consumer.lag_interval_ms`, statistics for the lag
/// gauge.
fn client_config(cfg: &BusConfig, group: &str, broadcast: bool) -> ClientConfig {
    let mut cc = cfg.consumer_client_config();
    cc.set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        .set(
            "session.timeout.ms",
            cfg.consumer.session_timeout_ms.to_string(),
        )
        .set(
            "auto.offset.reset",
            if broadcast {
                "latest"
            } else {
                cfg.consumer.auto_offset_reset.as_str()
            },
        );
    if cfg.consumer.lag_interval_ms > 0 {
        cc.set(
            "statistics.interval.ms",
            cfg.consumer.lag_interval_ms.to_string(),
        );
    }
    cc
}

/// The health component `bus_consumer.<handler_name>`, reported up.
fn health_reporter(health: &HealthRegistry, handler_name: &str) -> HealthReporter {
    let r = health.reporter(
        format!("bus_consumer.{handler_name}"),
        Criticality::Required,
    );
    r.set_up();
    r
}

struct Shared {
    cfg: BusConfig,
    handler: Arc<dyn Handler>,
    handler_name: String,
    group: String,
    producer: BusProducer,
    metrics: BusMetrics,
    progress: Arc<Mutex<Progress>>,
    inbox: Option<crate::inbox::InboxDedupe>,
    /// Envelope ids handled lately (`dedupe_window`).
    recent: Option<Mutex<RecentIds>>,
    broadcast: bool,
    /// Broadcast: the first assignment starts at the beginning, not the end.
    from_beginning: bool,
    topics: Vec<String>,
    health: Option<HealthReporter>,
    hard: CancellationToken,
    stop: CancellationToken,
    /// Lanes currently retrying a failed DLQ write (health stays degraded while > 0).
    dlq_blocked: AtomicUsize,
}

impl Shared {
    /// A lane stopped retrying a DLQ write (written, or abandoned at shutdown).
    fn dlq_write_recovered(&self) {
        if self.dlq_blocked.fetch_sub(1, Ordering::AcqRel) == 1 {
            if let Some(h) = &self.health {
                h.set_up();
            }
        }
    }
}

/// A running consumer. Dropping it without [`ConsumerHandle::shutdown`]
/// stops fetching at once (uncommitted work is redelivered later).
#[derive(Debug)]
pub struct ConsumerHandle {
    stop: CancellationToken,
    hard: CancellationToken,
    task: Option<JoinHandle<ShutdownReport>>,
}

/// What graceful shutdown achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownReport {
    /// True when every in-flight message finished before `consumer.shutdown_timeout_ms`.
    pub drained: bool,
    /// True when the final offset commit succeeded (always true in broadcast mode).
    pub committed: bool,
}

impl ConsumerHandle {
    /// Graceful shutdown: stop fetching, finish in-flight messages (within
    /// `consumer.shutdown_timeout_ms`; retries waiting for backoff are abandoned and
    /// redelivered later), commit, leave the group.
    pub async fn shutdown(mut self) -> ShutdownReport {
        self.stop.cancel();
        match self.task.take() {
            Some(task) => task.await.unwrap_or(ShutdownReport {
                drained: false,
                committed: false,
            }),
            None => ShutdownReport {
                drained: false,
                committed: false,
            },
        }
    }

    /// True once the consumer loop has ended (e.g. after a fatal error).
    pub fn is_finished(&self) -> bool {
        self.task.as_ref().is_none_or(JoinHandle::is_finished)
    }
}

impl Drop for ConsumerHandle {
    fn drop(&mut self) {
        self.stop.cancel();
        self.hard.cancel();
    }
}
