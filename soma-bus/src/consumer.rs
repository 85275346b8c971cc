//! Consumers: consumer groups, bounded retries, a dead-letter topic, ordered
//! concurrency, graceful shutdown.
//!
//! # Guarantee
//!
//! **At-least-once, ordered per key.** A message's offset is committed only
//! after its handler succeeded or the message was written to `<topic>.dlq`
//! and the broker acknowledged that write. A failed DLQ write is retried
//! (every `dlq_retry_backoff_ms`) while the lane holding it — and, once its
//! queue fills, fetching — waits; it is never skipped. Meanwhile the health
//! component is degraded. A graceful shutdown that runs out of
//! `shutdown_timeout_ms` gives up on the write and commits only below the
//! message, so the next consumer of the group receives it again. Messages
//! of one key are handled one at a time, in offset order, on one lane;
//! different keys run concurrently on `consumer_concurrency` lanes.
//!
//! Duplicates happen when the process stops (or loses a partition in a
//! rebalance) after a handler ran but before the offset was committed; the
//! message is then handled again, with the same envelope id. Enable inbox
//! dedupe ([`ConsumerBuilder::inbox`]) to drop those.
//!
//! # Failures
//!
//! - `HandlerError::Retryable`: retried up to `max_attempts` (first try
//!   included) with exponential backoff, then dead-lettered.
//! - `HandlerError::Fatal`: dead-lettered at once.
//! - A record that is not a valid envelope (missing / malformed headers) is
//!   dead-lettered at once without calling the handler, so it cannot wedge
//!   the partition.
//!
//! DLQ records keep the original key, payload and headers and add
//! `soma-dlq-origin-topic`, `-origin-partition`, `-origin-offset`,
//! `-attempts`, `-error`, `-handler`, `-group` and `-failed-at`.
//!
//! # Broadcast
//!
//! [`ConsumerBuilder::broadcast`] assigns itself every partition of its
//! topics, starting at the end of each, without joining a consumer group:
//! every replica sees every message published while it runs and nothing
//! from before. No group coordinator is involved, so a broker restart or a
//! lost session never resets the position: the consumer keeps fetching from
//! where it was once the broker is back (a subscribed group member that had
//! to rejoin would start again at the end and skip what was published
//! meanwhile). Partitions added to a topic later are picked up within
//! 30 seconds, from their beginning. Offsets are not committed and failed
//! messages are not dead-lettered (every replica would write its own copy):
//! after the retries they are logged and counted as `dropped`.
//!
//! # Health
//!
//! With [`ConsumerBuilder::health`], a consume error (the broker
//! unreachable) degrades the component `bus_consumer.<handler>`. It is up
//! again as soon as a message arrives **or** a metadata request for the
//! consumed topics succeeds (tried every second while degraded), so a
//! consumer of an idle topic recovers as well as a busy one.
//!
//! # Duplicates seen by this process
//!
//! [`ConsumerBuilder::dedupe_window`] drops a message whose envelope id this
//! consumer handled among its last `n` handled messages, without a database:
//! the defence of a broadcast consumer (which has no inbox) against a
//! producer's redelivered duplicates. It does not survive a restart; the
//! inbox does.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use parking_lot::Mutex;
use rdkafka::client::ClientContext;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer as _, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::statistics::Statistics;
use rdkafka::{Offset, TopicPartitionList};
use soma_observability::health::{Criticality, HealthRegistry, HealthReporter};
use soma_observability::metrics::MetricsRegistry;
use soma_observability::propagation::{record_trace_id, set_parent_from};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::BusConfig;
use crate::envelope::{Envelope, EnvelopeError};
use crate::error::BusError;
use crate::metrics::{BusMetrics, LagLabels};
use crate::producer::{BusProducer, RawRecord};
use crate::trace;

/// DLQ header: topic the message was consumed from.
pub const DLQ_ORIGIN_TOPIC: &str = "soma-dlq-origin-topic";
/// DLQ header: partition the message was consumed from.
pub const DLQ_ORIGIN_PARTITION: &str = "soma-dlq-origin-partition";
/// DLQ header: offset the message was consumed from.
pub const DLQ_ORIGIN_OFFSET: &str = "soma-dlq-origin-offset";
/// DLQ header: handler attempts made (0 when the record was malformed).
pub const DLQ_ATTEMPTS: &str = "soma-dlq-attempts";
/// DLQ header: the last error.
pub const DLQ_ERROR: &str = "soma-dlq-error";
/// DLQ header: the handler name.
pub const DLQ_HANDLER: &str = "soma-dlq-handler";
/// DLQ header: the consumer group.
pub const DLQ_GROUP: &str = "soma-dlq-group";
/// DLQ header: when the message was dead-lettered (RFC 3339).
pub const DLQ_FAILED_AT: &str = "soma-dlq-failed-at";
/// Prefix of all DLQ headers (stripped on replay).
pub const DLQ_HEADER_PREFIX: &str = "soma-dlq-";

/// Longest error text stored in a DLQ header.
const MAX_ERROR_BYTES: usize = 2048;

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
    /// backoff (capped at `retry_backoff_max_ms`) for as long as it takes,
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

/// Per-partition progress: the committable offset is the lowest one still in
/// flight (or one past the highest seen).
#[derive(Default)]
struct PartitionProgress {
    in_flight: BTreeSet<i64>,
    next: i64,
    committed: i64,
}

#[derive(Default)]
struct Progress {
    parts: HashMap<(String, i32), PartitionProgress>,
}

impl Progress {
    fn start(&mut self, topic: &str, partition: i32, offset: i64) {
        let p = self
            .parts
            .entry((topic.to_owned(), partition))
            .or_insert_with(|| PartitionProgress {
                in_flight: BTreeSet::new(),
                next: offset,
                committed: -1,
            });
        p.in_flight.insert(offset);
        p.next = p.next.max(offset + 1);
    }

    fn done(&mut self, topic: &str, partition: i32, offset: i64) {
        if let Some(p) = self.parts.get_mut(&(topic.to_owned(), partition)) {
            p.in_flight.remove(&offset);
        }
    }

    /// Offsets to commit for partitions that advanced; marks them committed.
    fn committable(&mut self, only: Option<&TopicPartitionList>) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        for ((t, part), p) in &mut self.parts {
            if let Some(only) = only {
                if only.find_partition(t, *part).is_none() {
                    continue;
                }
            }
            let pos = p.in_flight.first().copied().unwrap_or(p.next);
            if pos > p.committed
                && tpl
                    .add_partition_offset(t, *part, Offset::Offset(pos))
                    .is_ok()
            {
                p.committed = pos;
            }
        }
        tpl
    }

    fn forget(&mut self, tpl: &TopicPartitionList) {
        for e in tpl.elements() {
            self.parts.remove(&(e.topic().to_owned(), e.partition()));
        }
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
}

/// Builder for a running consumer; see the [module docs](self).
pub struct ConsumerBuilder {
    config: BusConfig,
    topics: Vec<String>,
    handler_name: String,
    handler: Arc<dyn Handler>,
    producer: Option<BusProducer>,
    metrics: Option<MetricsRegistry>,
    health: Option<HealthRegistry>,
    inbox: Option<crate::inbox::InboxDedupe>,
    broadcast: bool,
    dedupe_window: usize,
}

/// Entry point for consumers.
#[derive(Debug)]
pub struct BusConsumer;

impl BusConsumer {
    /// A consumer of `topics` in group `config.consumer_group`, calling `handler`
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
            metrics: None,
            health: None,
            inbox: None,
            broadcast: false,
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
    /// Broadcast mode: every instance sees every message (see the module docs).
    pub fn broadcast(mut self) -> Self {
        self.broadcast = true;
        self
    }
    /// Drops a message whose envelope id was among the last `n` this
    /// consumer handled (in memory; see the module docs). `0` (the default)
    /// turns it off.
    pub fn dedupe_window(mut self, n: usize) -> Self {
        self.dedupe_window = n;
        self
    }

    /// Subscribes and starts consuming in background tasks.
    pub fn spawn(self) -> Result<ConsumerHandle, BusError> {
        let cfg = self.config;
        cfg.validate()?;
        if self.topics.is_empty() {
            return Err(BusError::Config("no topics to consume".into()));
        }
        let metrics = BusMetrics::new(&self.metrics.unwrap_or_default());
        let producer = match self.producer {
            Some(p) => p,
            None => BusProducer::new(&cfg)?,
        };
        let group = if self.broadcast {
            format!(
                "{}.broadcast.{}",
                cfg.consumer_group,
                uuid::Uuid::now_v7().simple()
            )
        } else {
            cfg.consumer_group.clone()
        };
        let progress = Arc::new(Mutex::new(Progress::default()));
        let mut cc = cfg.consumer_client_config();
        cc.set("group.id", &group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            .set("session.timeout.ms", cfg.session_timeout_ms.to_string())
            .set(
                "auto.offset.reset",
                if self.broadcast {
                    "latest"
                } else {
                    cfg.auto_offset_reset.as_str()
                },
            );
        if cfg.lag_interval_ms > 0 {
            cc.set("statistics.interval.ms", cfg.lag_interval_ms.to_string());
        }
        let ctx = Ctx {
            progress: progress.clone(),
            commits: !self.broadcast,
            metrics: metrics.clone(),
            group: group.clone(),
        };
        let consumer: StreamConsumer<Ctx> = cc.create_with_context(ctx)?;
        if !self.broadcast {
            // Broadcast consumers assign themselves in `run` (no group).
            let topics: Vec<&str> = self.topics.iter().map(String::as_str).collect();
            consumer.subscribe(&topics)?;
        }
        let health = self.health.map(|h| {
            let r = h.reporter(
                format!("bus_consumer.{}", self.handler_name),
                Criticality::Required,
            );
            r.set_up();
            r
        });
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
            topics: self.topics,
            health,
            hard: hard.clone(),
            stop: stop.clone(),
            dlq_blocked: AtomicUsize::new(0),
        });
        let task = tokio::spawn(run(Arc::new(consumer), shared));
        Ok(ConsumerHandle {
            stop,
            hard,
            task: Some(task),
        })
    }
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
    /// True when every in-flight message finished before `shutdown_timeout_ms`.
    pub drained: bool,
    /// True when the final offset commit succeeded (always true in broadcast mode).
    pub committed: bool,
}

impl ConsumerHandle {
    /// Graceful shutdown: stop fetching, finish in-flight messages (within
    /// `shutdown_timeout_ms`; retries waiting for backoff are abandoned and
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

struct Work {
    msg: OwnedMessage,
}

fn lane_of(msg: &OwnedMessage, lanes: usize) -> usize {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    match msg.key() {
        Some(k) => {
            msg.topic().hash(&mut h);
            k.hash(&mut h);
        }
        None => {
            msg.partition().hash(&mut h);
            msg.offset().hash(&mut h);
        }
    }
    (h.finish() % lanes as u64) as usize
}

async fn run(consumer: Arc<StreamConsumer<Ctx>>, s: Arc<Shared>) -> ShutdownReport {
    let lanes = s.cfg.consumer_concurrency;
    let mut senders = Vec::with_capacity(lanes);
    let mut workers = Vec::with_capacity(lanes);
    for _ in 0..lanes {
        let (tx, rx) = mpsc::channel::<Work>(s.cfg.consumer_lane_capacity);
        senders.push(tx);
        workers.push(tokio::spawn(lane(rx, s.clone())));
    }
    let mut commit_tick =
        tokio::time::interval(Duration::from_millis(s.cfg.commit_interval_ms.max(10)));
    commit_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut probe_tick = tokio::time::interval(PROBE_INTERVAL);
    probe_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut partitions_tick = tokio::time::interval(PARTITIONS_INTERVAL);
    partitions_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Broadcast: the partitions assigned so far (none until the first
    // metadata answer; retried every probe tick until then).
    let mut assigned: Option<HashSet<(String, i32)>> = None;
    let mut errors_in_row = 0u32;
    loop {
        tokio::select! {
            biased;
            () = s.stop.cancelled() => break,
            _ = commit_tick.tick() => {
                commit(&consumer, &s, CommitMode::Async);
            }
            // Unassigned broadcast consumer, or degraded by a consume error:
            // ask the broker for the topics' metadata. An answer clears the
            // error (an idle topic brings no message that would).
            _ = probe_tick.tick(), if errors_in_row > 0 || (s.broadcast && assigned.is_none()) => {
                match topic_partitions(&consumer, &s.topics).await {
                    Ok(parts) => {
                        errors_in_row = 0;
                        if s.broadcast {
                            assign_new(&consumer, &s, &mut assigned, parts);
                        }
                    }
                    Err(error) => {
                        tracing::debug!(event = "consumer_probe_failed", %error, group = %s.group);
                    }
                }
            }
            _ = partitions_tick.tick(), if s.broadcast && assigned.is_some() => {
                if let Ok(parts) = topic_partitions(&consumer, &s.topics).await {
                    assign_new(&consumer, &s, &mut assigned, parts);
                }
            }
            msg = consumer.recv() => match msg {
                Ok(m) => {
                    errors_in_row = 0;
                    let owned = detach(&m);
                    if !s.broadcast {
                        s.progress.lock().start(owned.topic(), owned.partition(), owned.offset());
                    }
                    let lane = lane_of(&owned, lanes);
                    tokio::select! {
                        () = s.stop.cancelled() => {
                            // Not handed to a lane: leave it uncommitted (redelivered later).
                            break;
                        }
                        r = senders[lane].send(Work { msg: owned }) => if r.is_err() { break },
                    }
                }
                Err(error) => {
                    errors_in_row += 1;
                    tracing::warn!(event = "consume_error", %error, group = %s.group);
                    if let Some(h) = &s.health {
                        h.set_degraded(format!("consume error: {error}"));
                    }
                    tokio::time::sleep(Duration::from_millis(100 * u64::from(errors_in_row.min(20)))).await;
                }
            }
        }
        // A paused lane (failing DLQ write) keeps the component degraded.
        if errors_in_row == 0 && s.dlq_blocked.load(Ordering::Acquire) == 0 {
            if let Some(h) = &s.health {
                if h.status().is_some_and(|st| !st.is_up()) {
                    h.set_up();
                }
            }
        }
    }
    drop(senders);
    // A set that forgets finished lanes: a JoinHandle must not be polled
    // again after it completed, which a second `join_all` over the same
    // handles (after the deadline) would do.
    let aborts: Vec<_> = workers.iter().map(JoinHandle::abort_handle).collect();
    let mut running: FuturesUnordered<JoinHandle<()>> = workers.into_iter().collect();
    let deadline = Instant::now() + Duration::from_millis(s.cfg.shutdown_timeout_ms);
    let drained = tokio::time::timeout_at(deadline.into(), drain_lanes(&mut running))
        .await
        .is_ok();
    if !drained {
        // Stop DLQ retries; give running handlers a moment, then abort them.
        s.hard.cancel();
        let grace = tokio::time::timeout(Duration::from_secs(1), drain_lanes(&mut running));
        if grace.await.is_err() {
            for a in &aborts {
                a.abort();
            }
        }
    }
    let committed = commit(&consumer, &s, CommitMode::Sync);
    if s.broadcast {
        let _ = consumer.unassign();
    } else {
        consumer.unsubscribe();
    }
    if let Some(h) = &s.health {
        h.set_down("consumer stopped");
    }
    ShutdownReport { drained, committed }
}

/// How often a degraded (or not yet assigned broadcast) consumer asks the
/// broker for metadata.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// How often a broadcast consumer looks for partitions added to its topics.
const PARTITIONS_INTERVAL: Duration = Duration::from_secs(30);
/// The longest one metadata request may take.
const METADATA_TIMEOUT: Duration = Duration::from_secs(5);

/// Every partition of `topics`, as the broker reports them now (a blocking
/// librdkafka call, run off the async workers). A topic the broker does not
/// know is an error.
async fn topic_partitions(
    consumer: &Arc<StreamConsumer<Ctx>>,
    topics: &[String],
) -> Result<Vec<(String, i32)>, BusError> {
    let consumer = consumer.clone();
    let topics = topics.to_vec();
    tokio::task::spawn_blocking(move || {
        let mut parts = Vec::new();
        for topic in &topics {
            let md = consumer.fetch_metadata(Some(topic), METADATA_TIMEOUT)?;
            for t in md.topics().iter().filter(|t| t.name() == topic) {
                if let Some(err) = t.error() {
                    return Err(BusError::Kafka(rdkafka::error::KafkaError::MetadataFetch(
                        err.into(),
                    )));
                }
                if t.partitions().is_empty() {
                    return Err(BusError::Config(format!("topic {topic} has no partitions")));
                }
                parts.extend(t.partitions().iter().map(|p| (topic.clone(), p.id())));
            }
        }
        Ok(parts)
    })
    .await
    .map_err(|e| BusError::Config(format!("metadata task failed: {e}")))?
}

/// Broadcast: adds the partitions in `parts` not yet assigned. The first
/// assignment starts at the end of each partition (messages from before the
/// consumer started are not its business); partitions that appear later
/// start at their beginning (all they hold was published while it ran).
fn assign_new(
    consumer: &StreamConsumer<Ctx>,
    s: &Shared,
    assigned: &mut Option<HashSet<(String, i32)>>,
    parts: Vec<(String, i32)>,
) {
    let first = assigned.is_none();
    let known = assigned.get_or_insert_with(HashSet::new);
    let mut tpl = TopicPartitionList::new();
    let mut added = Vec::new();
    for (topic, partition) in parts {
        if known.contains(&(topic.clone(), partition)) {
            continue;
        }
        let at = if first {
            Offset::End
        } else {
            Offset::Beginning
        };
        if tpl.add_partition_offset(&topic, partition, at).is_ok() {
            added.push((topic, partition));
        }
    }
    if added.is_empty() {
        return;
    }
    match consumer.incremental_assign(&tpl) {
        Ok(()) => {
            tracing::info!(event = "broadcast_assigned", partitions = added.len(), group = %s.group);
            known.extend(added);
        }
        Err(error) => {
            tracing::warn!(event = "broadcast_assign_failed", %error, group = %s.group);
            if first && known.is_empty() {
                *assigned = None;
            }
        }
    }
}

/// The envelope ids a consumer handled lately, oldest first out.
struct RecentIds {
    ids: HashSet<uuid::Uuid>,
    order: VecDeque<uuid::Uuid>,
    capacity: usize,
}

impl RecentIds {
    fn new(capacity: usize) -> Self {
        Self {
            ids: HashSet::with_capacity(capacity.min(1 << 16)),
            order: VecDeque::with_capacity(capacity.min(1 << 16)),
            capacity,
        }
    }

    fn contains(&self, id: &uuid::Uuid) -> bool {
        self.ids.contains(id)
    }

    fn insert(&mut self, id: uuid::Uuid) {
        if !self.ids.insert(id) {
            return;
        }
        self.order.push_back(id);
        if self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.ids.remove(&old);
            }
        }
    }
}

/// Waits until every lane task in `running` has ended.
async fn drain_lanes(running: &mut FuturesUnordered<JoinHandle<()>>) {
    while running.next().await.is_some() {}
}

/// Keeps the message's topic/partition/offset/key/payload/headers.
fn detach(m: &BorrowedMessage<'_>) -> OwnedMessage {
    m.detach()
}

fn commit(consumer: &StreamConsumer<Ctx>, s: &Shared, mode: CommitMode) -> bool {
    if s.broadcast {
        return true;
    }
    let offsets = s.progress.lock().committable(None);
    if offsets.count() == 0 {
        return true;
    }
    match consumer.commit(&offsets, mode) {
        Ok(()) => true,
        Err(error) => {
            tracing::warn!(event = "commit_failed", %error, group = %s.group);
            false
        }
    }
}

async fn lane(mut rx: mpsc::Receiver<Work>, s: Arc<Shared>) {
    while let Some(Work { msg }) = rx.recv().await {
        let finished = process(&msg, &s).await;
        if !finished {
            // Abandoned during shutdown: later messages of this lane may share
            // its key, so none of them may run before it is redelivered.
            return;
        }
        if !s.broadcast {
            s.progress
                .lock()
                .done(msg.topic(), msg.partition(), msg.offset());
        }
        if s.hard.is_cancelled() {
            return;
        }
    }
}

fn decode(msg: &OwnedMessage) -> Result<Envelope, EnvelopeError> {
    let headers = msg.headers();
    let iter = headers
        .into_iter()
        .flat_map(|h| h.iter())
        .map(|h| (h.key, h.value));
    Envelope::from_kafka(msg.key(), msg.payload(), iter)
}

/// The retry delay before `attempt` (1 for the first retry): the shared
/// [`Backoff`](soma_observability::resilience::Backoff) without jitter,
/// `min(retry_backoff_max_ms, retry_backoff_initial_ms * 2^(attempt-1))`.
fn backoff(cfg: &BusConfig, attempt: u32) -> Duration {
    use soma_observability::resilience::{Backoff, BackoffConfig, Jitter};
    Backoff::new(
        BackoffConfig::new(cfg.retry_backoff_initial_ms, cfg.retry_backoff_max_ms)
            .with_jitter(Jitter::None),
    )
    .delay(attempt)
}

/// Handles one message to completion. Returns true when its offset may be committed.
///
/// Everything, handler and DLQ write included, runs in a `soma.consume` span
/// whose parent is the record's trace context (see [`crate::trace`]).
async fn process(msg: &OwnedMessage, s: &Shared) -> bool {
    let topic = msg.topic();
    let span = tracing::info_span!(
        "soma.consume",
        otel.kind = "consumer",
        topic,
        partition = msg.partition(),
        offset = msg.offset(),
        handler = %s.handler_name,
        message_id = tracing::field::Empty,
        tenant = tracing::field::Empty,
        message_type = tracing::field::Empty,
        trace_id = tracing::field::Empty,
    );
    // Read from the raw headers, so a malformed record's DLQ write keeps its trace.
    set_parent_from(&span, &trace::record_trace_headers(msg.headers()));
    record_trace_id(&span);
    async {
        let env = match decode(msg) {
            Ok(env) => env,
            Err(err) => {
                s.metrics.consumed(topic, "malformed");
                tracing::warn!(event = "malformed_message", topic, partition = msg.partition(), offset = msg.offset(), error = %err);
                return dead_letter(msg, s, 0, &format!("malformed envelope: {err}")).await;
            }
        };
        let span = tracing::Span::current();
        span.record("message_id", tracing::field::display(env.id));
        span.record("tenant", env.tenant.as_str());
        span.record("message_type", env.message_type.as_str());
        process_envelope(msg, env, s).await
    }
    .instrument(span)
    .await
}

async fn process_envelope(msg: &OwnedMessage, env: Envelope, s: &Shared) -> bool {
    let topic = msg.topic();
    if let Some(recent) = &s.recent {
        if recent.lock().contains(&env.id) {
            s.metrics.consumed(topic, "duplicate");
            return true;
        }
    }
    if let Some(inbox) = &s.inbox {
        match inbox.seen(&s.handler_name, env.id).await {
            Ok(true) => {
                s.metrics.consumed(topic, "duplicate");
                return true;
            }
            Ok(false) => {}
            Err(error) => {
                // Without the inbox we cannot tell; handling again is the at-least-once choice.
                tracing::warn!(event = "inbox_check_failed", %error);
            }
        }
    }
    let mut attempt = 0u32;
    let mut waits = 0u32;
    loop {
        attempt += 1;
        let started = Instant::now();
        let result = s.handler.handle(env.clone()).await;
        let labels_outcome = if result.is_ok() { "handled" } else { "error" };
        s.metrics
            .handle_seconds
            .get_or_create(&crate::metrics::ConsumeLabels {
                topic: topic.to_owned(),
                outcome: labels_outcome,
            })
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(()) => {
                if let Some(recent) = &s.recent {
                    recent.lock().insert(env.id);
                }
                if let Some(inbox) = &s.inbox {
                    if let Err(error) = inbox.record(&s.handler_name, env.id).await {
                        tracing::warn!(event = "inbox_record_failed", %error);
                    }
                }
                s.metrics.consumed(topic, "handled");
                return true;
            }
            Err(HandlerError::Unavailable(e)) => {
                // Not an attempt: the dependency is down, the message waits.
                waits += 1;
                s.metrics.consumed(topic, "waiting");
                if waits == 1 || waits.is_multiple_of(20) {
                    tracing::warn!(event = "handler_waiting", waits, error = %e);
                }
                attempt -= 1;
                tokio::select! {
                    () = tokio::time::sleep(backoff(&s.cfg, waits.min(16))) => {}
                    // Shutting down: abandon; the message is redelivered after restart.
                    () = s.stop.cancelled() => return false,
                }
            }
            Err(HandlerError::Retryable(e)) if attempt < s.cfg.max_attempts => {
                s.metrics.consumed(topic, "retried");
                tracing::info!(event = "handler_retry", attempt, error = %e);
                tokio::select! {
                    () = tokio::time::sleep(backoff(&s.cfg, attempt)) => {}
                    // Shutting down: abandon; the message is redelivered after restart.
                    () = s.stop.cancelled() => return false,
                }
            }
            Err(e) => {
                tracing::warn!(event = "handler_failed", attempt, error = %e);
                if s.broadcast {
                    s.metrics.consumed(topic, "dropped");
                    return true;
                }
                // Not recorded in the inbox: a replay from the DLQ must be handled.
                return dead_letter(msg, s, attempt, &e.to_string()).await;
            }
        }
    }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Writes `msg` to the DLQ, retrying until acknowledged (or hard shutdown).
async fn dead_letter(msg: &OwnedMessage, s: &Shared, attempts: u32, error: &str) -> bool {
    if s.broadcast {
        s.metrics.consumed(msg.topic(), "dropped");
        return true;
    }
    let dlq = s.cfg.dlq_topic(msg.topic());
    let partition = msg.partition().to_string();
    let offset = msg.offset().to_string();
    let attempts_s = attempts.to_string();
    let failed_at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let error = truncate(error, MAX_ERROR_BYTES);
    // True once a write failed: this lane counts in `dlq_blocked` until it ends.
    let mut failing = false;
    loop {
        let mut h = OwnedHeaders::new();
        if let Some(orig) = msg.headers() {
            for x in orig.iter() {
                if !x.key.starts_with(DLQ_HEADER_PREFIX) {
                    h = h.insert(Header {
                        key: x.key,
                        value: x.value,
                    });
                }
            }
        }
        for (k, v) in [
            (DLQ_ORIGIN_TOPIC, msg.topic()),
            (DLQ_ORIGIN_PARTITION, partition.as_str()),
            (DLQ_ORIGIN_OFFSET, offset.as_str()),
            (DLQ_ATTEMPTS, attempts_s.as_str()),
            (DLQ_ERROR, error),
            (DLQ_HANDLER, s.handler_name.as_str()),
            (DLQ_GROUP, s.group.as_str()),
            (DLQ_FAILED_AT, failed_at.as_str()),
        ] {
            h = h.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            });
        }
        let deadline = Instant::now() + s.cfg.publish_timeout();
        let rec = RawRecord {
            topic: &dlq,
            key: msg.key(),
            payload: msg.payload().unwrap_or_default(),
            headers: h,
        };
        match s.producer.send_raw(rec, deadline).await {
            Ok(_) => {
                if failing {
                    s.dlq_write_recovered();
                }
                s.metrics.consumed(msg.topic(), "dead_lettered");
                tracing::warn!(event = "dead_lettered", topic = msg.topic(), dlq = %dlq, partition = msg.partition(), offset = msg.offset(), attempts);
                return true;
            }
            Err(e) => {
                tracing::error!(event = "dlq_write_failed", dlq = %dlq, error = %e);
                if !failing {
                    failing = true;
                    s.dlq_blocked.fetch_add(1, Ordering::AcqRel);
                }
                if let Some(hr) = &s.health {
                    hr.set_degraded(format!("DLQ write to {dlq} failing; lane paused"));
                }
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(s.cfg.dlq_retry_backoff_ms)) => {}
                    () = s.hard.cancelled() => {
                        // Abandoned uncommitted: redelivered after a restart.
                        s.dlq_write_recovered();
                        return false;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_ids_forget_the_oldest_beyond_capacity() {
        let ids: Vec<uuid::Uuid> = (0..4).map(|_| uuid::Uuid::now_v7()).collect();
        let mut r = RecentIds::new(3);
        for id in &ids[..3] {
            r.insert(*id);
        }
        r.insert(ids[0]); // already there: not a second entry
        assert!(ids[..3].iter().all(|id| r.contains(id)));
        r.insert(ids[3]);
        assert!(!r.contains(&ids[0]), "the oldest is forgotten");
        assert!(ids[1..].iter().all(|id| r.contains(id)));
        assert_eq!(r.order.len(), 3);
        assert_eq!(r.ids.len(), 3);
    }

    #[test]
    fn progress_commits_lowest_in_flight() {
        let mut p = Progress::default();
        for o in 10..15 {
            p.start("t", 0, o);
        }
        p.done("t", 0, 11);
        p.done("t", 0, 12);
        let tpl = p.committable(None);
        assert_eq!(tpl.count(), 1); // nothing done below 10, but first commit records position 10
        assert_eq!(
            tpl.find_partition("t", 0).unwrap().offset(),
            Offset::Offset(10)
        );
        p.done("t", 0, 10);
        assert_eq!(
            p.committable(None).find_partition("t", 0).unwrap().offset(),
            Offset::Offset(13)
        );
        assert_eq!(p.committable(None).count(), 0, "no advance, no commit");
        p.done("t", 0, 13);
        p.done("t", 0, 14);
        assert_eq!(
            p.committable(None).find_partition("t", 0).unwrap().offset(),
            Offset::Offset(15)
        );
    }

    #[test]
    fn backoff_grows_and_caps() {
        let cfg = BusConfig {
            retry_backoff_initial_ms: 100,
            retry_backoff_max_ms: 350,
            ..Default::default()
        };
        assert_eq!(backoff(&cfg, 1), Duration::from_millis(100));
        assert_eq!(backoff(&cfg, 2), Duration::from_millis(200));
        assert_eq!(backoff(&cfg, 3), Duration::from_millis(350));
    }

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("abc", 10), "abc");
    }
}
