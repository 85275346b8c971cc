//! DLQ replay: [`replay_dlq`].

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;
use soma_observability::metrics::MetricsRegistry;

use crate::config::BusConfig;
use crate::consumer::{DLQ_HEADER_PREFIX, DLQ_ORIGIN_TOPIC};
use crate::envelope::HEADER_REPLAY_COUNT;
use crate::error::BusError;
use crate::metrics::{BusMetrics, ReplayLabels};
use crate::producer::{BusProducer, RawRecord};

/// What to replay.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    /// The DLQ topic to read (e.g. `orders.dlq`).
    pub dlq_topic: String,
    /// Consumer group remembering how far replay got (default `<consumer.group>.replay`).
    pub group: Option<String>,
    /// Stop after this many records (default: up to the end seen at start).
    pub max_messages: Option<u64>,
    /// Override of `bus.consumer.replay_max`.
    pub replay_max: Option<u32>,
    /// How long to wait for the next record before giving up (default 10 s).
    pub idle_timeout: Duration,
}

impl ReplayOptions {
    /// Replays everything currently in `dlq_topic`.
    pub fn new(dlq_topic: impl Into<String>) -> Self {
        Self {
            dlq_topic: dlq_topic.into(),
            group: None,
            max_messages: None,
            replay_max: None,
            idle_timeout: Duration::from_secs(10),
        }
    }
}

/// Outcome of a replay run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ReplayReport {
    /// Records republished to their origin topic.
    pub replayed: u64,
    /// Records skipped because they reached `consumer.replay_max`.
    pub exceeded: u64,
    /// Records skipped because they have no origin topic header.
    pub malformed: u64,
    /// Records refused because their origin header names a topic other than
    /// the one the DLQ belongs to (they stay in the DLQ).
    pub refused: u64,
    /// Why each refused record was refused: the first
    /// [`MAX_REFUSALS_LISTED`] of them (`refused` counts them all).
    pub refusals: Vec<ReplayRefusal>,
    /// True when replay reached the end seen at start (false: stopped by `max_messages` or idle timeout).
    pub complete: bool,
}

/// How many refusals a [`ReplayReport`] lists (it counts every one).
pub const MAX_REFUSALS_LISTED: usize = 100;

/// Why [`replay_dlq`] did not republish a DLQ record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[non_exhaustive]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum ReplayRefusal {
    /// The record's `soma-dlq-origin-topic` names another topic than the one
    /// its DLQ belongs to. Replaying it would inject it into that topic.
    #[error(
        "DLQ record {dlq_topic}[{partition}]@{offset} claims origin `{claimed}`, but the DLQ belongs to `{expected}`: not replayed"
    )]
    ForeignOrigin {
        /// The DLQ read.
        dlq_topic: String,
        /// The record's partition.
        partition: i32,
        /// The record's offset.
        offset: i64,
        /// The topic the DLQ belongs to (the only replay target).
        expected: String,
        /// The origin the record claims (at most 249 characters, the
        /// longest legal topic name, kept).
        claimed: String,
    },
}

impl ReplayRefusal {
    /// True when the record claimed an origin other than its DLQ's topic.
    pub fn is_foreign_origin(&self) -> bool {
        matches!(self, Self::ForeignOrigin { .. })
    }
}

/// The topic `dlq_topic` belongs to: its name without `config.consumer.dlq_suffix`.
pub(crate) fn origin_of(config: &BusConfig, dlq_topic: &str) -> Result<String, BusError> {
    match dlq_topic.strip_suffix(config.consumer.dlq_suffix.as_str()) {
        Some(origin) if !origin.is_empty() => Ok(origin.to_owned()),
        _ => Err(BusError::Config(format!(
            "`{dlq_topic}` is not a DLQ topic: its name must be `<topic>{}` (dlq_suffix)",
            config.consumer.dlq_suffix
        ))),
    }
}

/// Replays `opts.dlq_topic`: republishes its dead-lettered messages to the
/// topic their DLQ belongs to.
///
/// A DLQ belongs to exactly one topic: `<topic><dlq_suffix>` (`orders.dlq`
/// belongs to `orders`). It derives that topic from the DLQ's
/// name — a name without the configured suffix is a
/// [`BusError::Config`] before anything is read — and never republishes
/// anywhere else, whatever a record's headers say. It reads the DLQ from the
/// replay group's committed position up to the end it sees at start, and for
/// each record:
///
/// - republishes it to the DLQ's topic with the original key, payload and
///   headers (the `soma-dlq-*` headers removed) and `soma-replay-count`
///   incremented, waiting for the broker's ack; or
/// - refuses it when its `soma-dlq-origin-topic` names another topic: anyone
///   who can write to a DLQ could otherwise inject messages into any topic
///   the replay tool can write to. It stays in the DLQ, is counted as
///   `refused` and listed in [`ReplayReport::refusals`] as a
///   [`ReplayRefusal::ForeignOrigin`]; or
/// - skips it when it was already replayed `consumer.replay_max` times (it stays in the
///   DLQ; counted as `exceeded`) — this stops a poison message from looping; or
/// - skips it when it has no origin header (counted as `malformed`).
///
/// The replay group's offset is committed only after the republish was
/// acknowledged, so an interrupted replay resumes where it stopped
/// (at-least-once: a message republished just before a crash may be
/// republished again, with the same envelope id).
pub async fn replay_dlq(
    config: &BusConfig,
    producer: &BusProducer,
    opts: &ReplayOptions,
    metrics: Option<&MetricsRegistry>,
) -> Result<ReplayReport, BusError> {
    config.validate()?;
    config.warn_deprecated_keys();
    let target = origin_of(config, &opts.dlq_topic)?;
    let metrics = BusMetrics::new(&metrics.cloned().unwrap_or_default());
    let consumer = replay_consumer(config, opts)?;
    let (consumer, range) =
        replay_range(consumer, opts.dlq_topic.clone(), config.admin_timeout()).await?;
    let mut report = ReplayReport::default();
    if range.ends.is_empty() {
        report.complete = true;
        return Ok(report);
    }
    consumer.assign(&range.assignment)?;
    let ctx = ReplayContext {
        config,
        producer,
        metrics: &metrics,
        dlq_topic: &opts.dlq_topic,
        target: &target,
        replay_max: opts.replay_max.unwrap_or(config.consumer.replay_max),
    };
    report.complete = ctx
        .replay_to_ends(&consumer, range.ends, opts, &mut report)
        .await?;
    Ok(report)
}

/// The consumer of the replay group (`opts.group`, default
/// `<consumer.group>.replay`): manual commits only, from the beginning when
/// the group has no position yet.
fn replay_consumer(config: &BusConfig, opts: &ReplayOptions) -> Result<StreamConsumer, BusError> {
    let group = opts
        .group
        .clone()
        .unwrap_or_else(|| format!("{}.replay", config.consumer.group));
    let mut cc = config.consumer_client_config();
    cc.set("group.id", &group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest");
    Ok(cc.create()?)
}

/// What a replay run reads: per partition of the DLQ, from the replay
/// group's committed position up to the end seen at start.
struct ReplayRange {
    /// The end (high watermark at start) of each partition with records to
    /// replay; partitions already replayed to their end are absent.
    ends: HashMap<i32, i64>,
    /// Those partitions, each from where replay starts.
    assignment: TopicPartitionList,
}

/// Finds [`ReplayRange`] of `topic` (blocking metadata, committed-offset
/// and watermark requests, on the blocking pool) and hands the consumer
/// back.
async fn replay_range(
    consumer: StreamConsumer,
    topic: String,
    timeout: Duration,
) -> Result<(StreamConsumer, ReplayRange), BusError> {
    tokio::task::spawn_blocking(move || -> Result<_, BusError> {
        let parts = partitions_of(&consumer, &topic, timeout)?;
        let mut tpl = TopicPartitionList::new();
        for p in &parts {
            tpl.add_partition(&topic, *p);
        }
        let committed = if parts.is_empty() {
            TopicPartitionList::new()
        } else {
            consumer.committed_offsets(tpl, timeout)?
        };
        let mut range = ReplayRange {
            ends: HashMap::new(),
            assignment: TopicPartitionList::new(),
        };
        for p in parts {
            let (low, high) = consumer.fetch_watermarks(&topic, p, timeout)?;
            let start = match committed.find_partition(&topic, p).map(|e| e.offset()) {
                Some(Offset::Offset(o)) if o >= low => o,
                _ => low,
            };
            if start < high {
                range.ends.insert(p, high);
                range
                    .assignment
                    .add_partition_offset(&topic, p, Offset::Offset(start))?;
            }
        }
        Ok((consumer, range))
    })
    .await
    .map_err(|_| BusError::Shutdown)?
}

/// What deciding on and republishing one DLQ record needs.
pub(crate) struct ReplayContext<'a> {
    pub(crate) config: &'a BusConfig,
    pub(crate) producer: &'a BusProducer,
    pub(crate) metrics: &'a BusMetrics,
    pub(crate) dlq_topic: &'a str,
    /// The topic the DLQ belongs to: the only replay target.
    pub(crate) target: &'a str,
    pub(crate) replay_max: u32,
}

/// What [`ReplayContext::replay_one`] did with a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Replayed,
    Exceeded,
    Malformed,
    Refused,
}

impl Outcome {
    /// The `outcome` label of `soma_bus_dlq_replayed_total` (and the outcome
    /// [`DlqReader::replay`](crate::DlqReader::replay) reports).
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Replayed => "replayed",
            Self::Exceeded => "exceeded",
            Self::Malformed => "malformed",
            Self::Refused => "refused",
        }
    }
}

impl ReplayContext<'_> {
    /// Replays what `consumer` (assigned to the range) reads until every
    /// partition reached its end in `remaining`, `opts.max_messages` records
    /// were processed, or nothing arrived for `opts.idle_timeout`. Each
    /// record's offset is committed after [`replay_one`](Self::replay_one)
    /// decided on it. True when every partition reached its end.
    async fn replay_to_ends(
        &self,
        consumer: &StreamConsumer,
        mut remaining: HashMap<i32, i64>,
        opts: &ReplayOptions,
        report: &mut ReplayReport,
    ) -> Result<bool, BusError> {
        let mut processed = 0u64;
        while !remaining.is_empty() {
            if opts.max_messages.is_some_and(|m| processed >= m) {
                break;
            }
            let msg = match tokio::time::timeout(opts.idle_timeout, consumer.recv()).await {
                Err(_) => break,
                Ok(r) => r?,
            };
            let (partition, offset) = (msg.partition(), msg.offset());
            let Some(end) = remaining.get(&partition).copied() else {
                continue;
            };
            if offset >= end {
                remaining.remove(&partition);
                continue;
            }
            processed += 1;
            self.replay_one(&msg, report).await?;
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(self.dlq_topic, partition, Offset::Offset(offset + 1))?;
            consumer.commit(&tpl, CommitMode::Sync)?;
            if offset + 1 >= end {
                remaining.remove(&partition);
            }
        }
        Ok(remaining.is_empty())
    }

    /// Republishes `msg` to the DLQ's topic, or refuses or skips it (see
    /// [`replay_dlq`]), counting it in `report` and the metrics.
    /// `Err` only when the republish was not acknowledged.
    pub(crate) async fn replay_one<M: Message>(
        &self,
        msg: &M,
        report: &mut ReplayReport,
    ) -> Result<Outcome, BusError> {
        let (partition, offset) = (msg.partition(), msg.offset());
        let replay_max = self.replay_max;
        let headers = msg.headers();
        let origin = header_str(headers, DLQ_ORIGIN_TOPIC).filter(|t| !t.is_empty());
        let count: u32 = header_str(headers, HEADER_REPLAY_COUNT)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let outcome = match origin {
            None => {
                tracing::warn!(event = "replay_malformed", partition, offset);
                Outcome::Malformed
            }
            Some(claimed) if claimed != self.target => {
                let refusal = self.refusal(partition, offset, &claimed);
                tracing::warn!(event = "replay_refused", error = %refusal);
                if report.refusals.len() < MAX_REFUSALS_LISTED {
                    report.refusals.push(refusal);
                }
                Outcome::Refused
            }
            Some(_) if count >= replay_max => {
                tracing::warn!(
                    event = "replay_max_exceeded",
                    partition,
                    offset,
                    count,
                    replay_max
                );
                Outcome::Exceeded
            }
            Some(_) => {
                self.republish(msg, count).await?;
                Outcome::Replayed
            }
        };
        self.count(outcome, report);
        Ok(outcome)
    }

    /// Why the record at `partition`/`offset`, claiming origin `claimed`, is
    /// not replayed.
    fn refusal(&self, partition: i32, offset: i64, claimed: &str) -> ReplayRefusal {
        ReplayRefusal::ForeignOrigin {
            dlq_topic: self.dlq_topic.to_owned(),
            partition,
            offset,
            expected: self.target.to_owned(),
            claimed: claimed.chars().take(249).collect(),
        }
    }

    /// Sends `msg` to the DLQ's topic with its key and payload, and its
    /// headers without the `soma-dlq-*` ones and with the replay count
    /// `count + 1`, waiting (up to the publish timeout) for the broker's ack.
    async fn republish<M: Message>(&self, msg: &M, count: u32) -> Result<(), BusError> {
        let deadline = Instant::now() + self.config.publish_timeout();
        let rec = RawRecord {
            topic: self.target,
            key: msg.key(),
            payload: msg.payload().unwrap_or_default(),
            headers: replayed_headers(msg.headers(), count + 1),
        };
        self.producer.send_raw(rec, deadline).await?;
        Ok(())
    }

    /// Counts `outcome` in `report` and in `soma_bus_dlq_replayed_total`.
    fn count(&self, outcome: Outcome, report: &mut ReplayReport) {
        let counter = match outcome {
            Outcome::Replayed => &mut report.replayed,
            Outcome::Exceeded => &mut report.exceeded,
            Outcome::Malformed => &mut report.malformed,
            Outcome::Refused => &mut report.refused,
        };
        *counter += 1;
        self.metrics
            .replayed
            .get_or_create(&ReplayLabels {
                topic: self.dlq_topic.to_owned(),
                outcome: outcome.as_str(),
            })
            .inc();
    }
}

/// The value of header `name`, when present and UTF-8.
fn header_str<H: Headers>(headers: Option<&H>, name: &str) -> Option<String> {
    headers
        .and_then(|h| h.iter().find(|x| x.key == name))
        .and_then(|x| x.value)
        .and_then(|v| std::str::from_utf8(v).ok())
        .map(str::to_owned)
}

/// `headers` without the `soma-dlq-*` ones and the replay count, then
/// `soma-replay-count: <replay_count>`.
fn replayed_headers<H: Headers>(headers: Option<&H>, replay_count: u32) -> OwnedHeaders {
    let mut h = OwnedHeaders::new();
    if let Some(orig) = headers {
        for x in orig.iter() {
            if !x.key.starts_with(DLQ_HEADER_PREFIX) && x.key != HEADER_REPLAY_COUNT {
                h = h.insert(Header {
                    key: x.key,
                    value: x.value,
                });
            }
        }
    }
    let next = replay_count.to_string();
    h.insert(Header {
        key: HEADER_REPLAY_COUNT,
        value: Some(next.as_bytes()),
    })
}

/// The partitions of `topic` (none when it does not exist).
pub(crate) fn partitions_of<C: Consumer>(
    consumer: &C,
    topic: &str,
    timeout: Duration,
) -> Result<Vec<i32>, BusError> {
    let md = consumer.fetch_metadata(Some(topic), timeout)?;
    Ok(md
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect())
}
