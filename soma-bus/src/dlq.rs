//! Reading a DLQ and replaying chosen records of it: [`DlqReader`].

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use soma_observability::metrics::MetricsRegistry;

use crate::config::BusConfig;
use crate::consumer::{
    DLQ_ATTEMPTS, DLQ_ERROR, DLQ_FAILED_AT, DLQ_HANDLER, DLQ_ORIGIN_OFFSET, DLQ_ORIGIN_PARTITION,
    DLQ_ORIGIN_TOPIC,
};
use crate::envelope::{HEADER_ID, HEADER_REPLAY_COUNT, HEADER_TYPE};
use crate::error::BusError;
use crate::metrics::BusMetrics;
use crate::producer::BusProducer;
use crate::replay::{ReplayContext, ReplayReport, origin_of, partitions_of};

/// Where a record sits in its DLQ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DlqPosition {
    /// The DLQ partition.
    pub partition: i32,
    /// The record's offset in it.
    pub offset: i64,
}

/// One dead-lettered record, as read from its DLQ: where it is, where it
/// came from, why it failed, and its payload.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct DlqRecord {
    /// The DLQ topic.
    pub dlq_topic: String,
    /// Where it sits in the DLQ.
    pub position: DlqPosition,
    /// The broker's timestamp of the DLQ write (milliseconds since the
    /// epoch), when the broker gave one.
    pub timestamp_ms: Option<i64>,
    /// The record key (the envelope's key), when UTF-8.
    pub key: Option<String>,
    /// The envelope id (`soma-id`), when present.
    pub envelope_id: Option<String>,
    /// The envelope type (`soma-type`), when present.
    pub envelope_type: Option<String>,
    /// The topic it claims to come from (`soma-dlq-origin-topic`).
    pub origin_topic: Option<String>,
    /// Its partition there.
    pub origin_partition: Option<i32>,
    /// Its offset there.
    pub origin_offset: Option<i64>,
    /// Handler attempts made.
    pub attempts: Option<u32>,
    /// The last error.
    pub error: Option<String>,
    /// The handler that gave up.
    pub handler: Option<String>,
    /// When it was dead-lettered (RFC 3339).
    pub failed_at: Option<String>,
    /// How often it was replayed before (`soma-replay-count`).
    pub replay_count: u32,
    /// The payload (the envelope), bytes as they are.
    #[serde(skip)]
    pub payload: Vec<u8>,
}

impl DlqRecord {
    fn from_message(m: &OwnedMessage) -> Self {
        let header = |name: &str| {
            m.headers()
                .and_then(|h| h.iter().find(|x| x.key == name))
                .and_then(|x| x.value)
                .and_then(|v| std::str::from_utf8(v).ok())
                .map(str::to_owned)
        };
        Self {
            dlq_topic: m.topic().to_owned(),
            position: DlqPosition {
                partition: m.partition(),
                offset: m.offset(),
            },
            timestamp_ms: m.timestamp().to_millis(),
            key: m
                .key()
                .and_then(|k| std::str::from_utf8(k).ok())
                .map(str::to_owned),
            envelope_id: header(HEADER_ID),
            envelope_type: header(HEADER_TYPE),
            origin_topic: header(DLQ_ORIGIN_TOPIC),
            origin_partition: header(DLQ_ORIGIN_PARTITION).and_then(|v| v.parse().ok()),
            origin_offset: header(DLQ_ORIGIN_OFFSET).and_then(|v| v.parse().ok()),
            attempts: header(DLQ_ATTEMPTS).and_then(|v| v.parse().ok()),
            error: header(DLQ_ERROR),
            handler: header(DLQ_HANDLER),
            failed_at: header(DLQ_FAILED_AT),
            replay_count: header(HEADER_REPLAY_COUNT)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            payload: m.payload().unwrap_or_default().to_vec(),
        }
    }
}

/// Reading a DLQ and replaying chosen records of it, for operator tools
/// (an admin route, a console) that list dead letters, inspect one and
/// replay a selection — [`replay_dlq`](crate::replay_dlq) replays a whole
/// DLQ from a group's position instead.
///
/// Reads never join or commit a consumer group: they assign the DLQ's
/// partitions directly, so listing a DLQ moves nobody's position.
/// [`replay`](Self::replay) applies the same rules as `replay_dlq`: a record is
/// republished only to the topic its DLQ belongs to (`orders.dlq` →
/// `orders`), a record claiming another origin is refused, one replayed
/// `consumer.replay_max` times already is skipped. It is at-least-once like every
/// republish: the record keeps its envelope id, so a consumer's inbox drops
/// a second copy. Which records were replayed is the caller's to remember
/// (the platform example keeps a ledger in PostgreSQL).
#[derive(Clone)]
pub struct DlqReader {
    config: BusConfig,
}

impl std::fmt::Debug for DlqReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DlqReader").finish_non_exhaustive()
    }
}

/// How long a read waits for the next record before it stops short.
const READ_IDLE: Duration = Duration::from_secs(5);

impl DlqReader {
    /// A reader on `config`'s brokers.
    ///
    /// # Errors
    /// [`BusError::Config`] when the config is invalid.
    pub fn new(config: &BusConfig) -> Result<Self, BusError> {
        config.validate()?;
        config.warn_deprecated_keys();
        Ok(Self {
            config: config.clone(),
        })
    }

    /// The topic `dlq_topic` belongs to (its name without `consumer.dlq_suffix`).
    ///
    /// # Errors
    /// [`BusError::Config`] when `dlq_topic` is not a DLQ name.
    pub fn origin_of(&self, dlq_topic: &str) -> Result<String, BusError> {
        origin_of(&self.config, dlq_topic)
    }

    /// The DLQ of `topic` (`<topic><dlq_suffix>`).
    pub fn dlq_of(&self, topic: &str) -> String {
        self.config.dlq_topic(topic)
    }

    fn consumer(&self) -> Result<BaseConsumer, BusError> {
        let mut cc = self.config.consumer_client_config();
        // Assigned, never subscribed or committed: a group id only because
        // the client wants one.
        cc.set(
            "group.id",
            format!("{}.dlq-reader", self.config.consumer.group),
        )
        // As the consumers set it, so a `max.poll.interval.ms` in
        // `librdkafka` sized for them is valid here too.
        .set(
            "session.timeout.ms",
            self.config.consumer.session_timeout_ms.to_string(),
        )
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false");
        Ok(cc.create()?)
    }

    /// The newest `max` records of `dlq_topic` per partition, oldest first
    /// within each partition. A DLQ that does not exist reads as empty.
    ///
    /// # Errors
    /// [`BusError::Config`] for a name that is not a DLQ's; Kafka errors
    /// when the broker cannot be read.
    pub async fn read(&self, dlq_topic: &str, max: usize) -> Result<Vec<DlqRecord>, BusError> {
        origin_of(&self.config, dlq_topic)?;
        let consumer = self.consumer()?;
        let topic = dlq_topic.to_owned();
        let timeout = self.config.admin_timeout();
        tokio::task::spawn_blocking(move || -> Result<Vec<DlqRecord>, BusError> {
            let parts = partitions_of(&consumer, &topic, timeout)?;
            let mut ends = HashMap::new();
            let mut tpl = TopicPartitionList::new();
            for p in parts {
                let (low, high) = consumer.fetch_watermarks(&topic, p, timeout)?;
                let start = low.max(high - i64::try_from(max).unwrap_or(i64::MAX));
                if start < high {
                    ends.insert(p, high);
                    tpl.add_partition_offset(&topic, p, Offset::Offset(start))?;
                }
            }
            let mut out = Vec::new();
            if ends.is_empty() {
                return Ok(out);
            }
            consumer.assign(&tpl)?;
            while !ends.is_empty() {
                let Some(m) = consumer.poll(READ_IDLE) else {
                    break;
                };
                let m = m?.detach();
                let Some(end) = ends.get(&m.partition()).copied() else {
                    continue;
                };
                if m.offset() < end {
                    out.push(DlqRecord::from_message(&m));
                }
                if m.offset() + 1 >= end {
                    ends.remove(&m.partition());
                }
            }
            Ok(out)
        })
        .await
        .map_err(|_| BusError::Shutdown)?
    }

    /// The record at `position` of `dlq_topic`, `None` when there is none
    /// (never written, or removed by retention).
    ///
    /// # Errors
    /// As [`read`](Self::read).
    pub async fn get(
        &self,
        dlq_topic: &str,
        position: DlqPosition,
    ) -> Result<Option<DlqRecord>, BusError> {
        Ok(self
            .fetch(dlq_topic, &[position])
            .await?
            .into_iter()
            .next()
            .map(|m| DlqRecord::from_message(&m)))
    }

    /// The raw records at `positions` (those that exist).
    async fn fetch(
        &self,
        dlq_topic: &str,
        positions: &[DlqPosition],
    ) -> Result<Vec<OwnedMessage>, BusError> {
        origin_of(&self.config, dlq_topic)?;
        let consumer = self.consumer()?;
        let topic = dlq_topic.to_owned();
        let timeout = self.config.admin_timeout();
        let positions = positions.to_vec();
        tokio::task::spawn_blocking(move || -> Result<Vec<OwnedMessage>, BusError> {
            let mut out = Vec::new();
            for pos in positions {
                let (low, high) = match consumer.fetch_watermarks(&topic, pos.partition, timeout) {
                    Ok(w) => w,
                    // An unknown topic or partition: nothing there.
                    Err(e) if crate::error::is_permanent_kafka(&e) => continue,
                    Err(e) => return Err(e.into()),
                };
                if pos.offset < low || pos.offset >= high {
                    continue;
                }
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition_offset(&topic, pos.partition, Offset::Offset(pos.offset))?;
                consumer.assign(&tpl)?;
                let deadline = std::time::Instant::now() + READ_IDLE;
                while std::time::Instant::now() < deadline {
                    let Some(m) = consumer.poll(Duration::from_millis(200)) else {
                        continue;
                    };
                    let m = m?.detach();
                    if m.partition() == pos.partition && m.offset() == pos.offset {
                        out.push(m);
                        break;
                    }
                    if m.offset() > pos.offset {
                        break;
                    }
                }
            }
            Ok(out)
        })
        .await
        .map_err(|_| BusError::Shutdown)?
    }

    /// Replays the records of `dlq_topic` at `positions` to the topic the
    /// DLQ belongs to, by the rules of [`replay_dlq`](crate::replay_dlq)
    /// (foreign origins refused, `consumer.replay_max` honoured). Returns the
    /// report and each position's outcome: `replayed`, `refused`,
    /// `exceeded`, `malformed` or `missing` (no such record).
    ///
    /// # Errors
    /// [`BusError::Config`] for a name that is not a DLQ's; a republish
    /// that was not acknowledged stops the run with its error (the records
    /// before it were replayed).
    pub async fn replay(
        &self,
        producer: &BusProducer,
        dlq_topic: &str,
        positions: &[DlqPosition],
        metrics: Option<&MetricsRegistry>,
    ) -> Result<(ReplayReport, Vec<(DlqPosition, &'static str)>), BusError> {
        let target = origin_of(&self.config, dlq_topic)?;
        let metrics = BusMetrics::new(&metrics.cloned().unwrap_or_default());
        let ctx = ReplayContext {
            config: &self.config,
            producer,
            metrics: &metrics,
            dlq_topic,
            target: &target,
            replay_max: self.config.consumer.replay_max,
        };
        let found = self.fetch(dlq_topic, positions).await?;
        let mut report = ReplayReport::default();
        let mut outcomes = Vec::with_capacity(positions.len());
        for pos in positions {
            let msg = found
                .iter()
                .find(|m| m.partition() == pos.partition && m.offset() == pos.offset);
            let outcome = match msg {
                None => "missing",
                Some(m) => ctx.replay_one(m, &mut report).await?.as_str(),
            };
            outcomes.push((*pos, outcome));
        }
        report.complete = true;
        Ok((report, outcomes))
    }
}
