//! Ground truth after a scenario, read behind the client's back: the
//! platform's topics on the private broker (from the beginning, with an
//! rdkafka consumer of its own) and the outbox tables in the private
//! PostgreSQL.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::Value;

use super::deps::Postgres;

/// One record of a topic.
#[derive(Debug, Clone)]
pub(crate) struct Record {
    pub(crate) partition: i32,
    /// The envelope id (`soma-id` header).
    pub(crate) id: Option<String>,
    /// The value, when it is JSON.
    pub(crate) value: Value,
}

/// Every record of `topic` from the beginning, partition by partition in
/// offset order. A topic that does not exist has no records.
pub(crate) fn read_topic(bootstrap: &str, topic: &str) -> Result<Vec<Record>, String> {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("chaos-truth-{nanos}"))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "earliest")
        // tansu 0.6.0 on PostgreSQL 15 fails ListOffsets at read_committed
        // (its query needs PostgreSQL 16); the platform's consumers read
        // uncommitted too (soma-bus's consumer config).
        .set("isolation.level", "read_uncommitted")
        .set("log_level", "3")
        // tansu's SQLite storage scans its header table per record served:
        // small fetches keep each answer well inside the socket timeout
        // (README: Known limits of the local broker).
        .set("message.max.bytes", "65536")
        .set("fetch.max.bytes", "65536")
        .set("max.partition.fetch.bytes", "16384")
        .create()
        .map_err(|e| format!("Kafka reader: {e}"))?;
    let timeout = Duration::from_secs(10);
    let metadata = consumer
        .fetch_metadata(Some(topic), timeout)
        .map_err(|e| format!("metadata of {topic}: {e}"))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    let mut high: HashMap<i32, i64> = HashMap::new();
    let mut tpl = TopicPartitionList::new();
    for &p in &partitions {
        let (_, h) = consumer
            .fetch_watermarks(topic, p, timeout)
            .map_err(|e| format!("watermarks of {topic}/{p}: {e}"))?;
        if h > 0 {
            high.insert(p, h);
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .map_err(|e| e.to_string())?;
        }
    }
    let mut records = Vec::new();
    if high.is_empty() {
        return Ok(records);
    }
    consumer.assign(&tpl).map_err(|e| e.to_string())?;
    let mut pending: HashSet<i32> = high.keys().copied().collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !pending.is_empty() {
        if Instant::now() > deadline {
            return Err(format!(
                "reading {topic}: partitions {pending:?} not read to their end within 60 s"
            ));
        }
        match consumer.poll(Duration::from_millis(500)) {
            None => {}
            Some(Err(KafkaError::PartitionEOF(p))) => {
                pending.remove(&p);
            }
            Some(Err(e)) => return Err(format!("reading {topic}: {e}")),
            Some(Ok(m)) => {
                let id = m.headers().and_then(|hs| {
                    hs.iter()
                        .find(|h| h.key == "soma-id")
                        .and_then(|h| h.value)
                        .map(|v| String::from_utf8_lossy(v).into_owned())
                });
                let value = m
                    .payload()
                    .and_then(|p| serde_json::from_slice(p).ok())
                    .unwrap_or_default();
                if high
                    .get(&m.partition())
                    .is_some_and(|h| m.offset() + 1 >= *h)
                {
                    pending.remove(&m.partition());
                }
                records.push(Record {
                    partition: m.partition(),
                    id,
                    value,
                });
            }
        }
    }
    Ok(records)
}

/// What the replies topic says about the accepted messages.
#[derive(Debug, Default, Clone)]
pub(crate) struct Replies {
    /// Message id → envelope ids of its `completed` reply events, in topic order.
    pub(crate) completed: HashMap<String, Vec<String>>,
    /// Per conversation, message ids in the order their first completion
    /// sits in the topic (one conversation is one key, so one partition).
    pub(crate) completion_order: HashMap<String, Vec<String>>,
    /// Reply events present more than once with the same envelope id
    /// (a redelivery: an SSE client attached at the time sees it twice).
    pub(crate) same_id_again: u64,
    /// Records in the topic.
    pub(crate) records: u64,
}

/// Reads the replies from the events topic.
pub(crate) fn replies(bootstrap: &str, topic: &str) -> Result<Replies, String> {
    let mut r = Replies::default();
    let mut seen = HashSet::new();
    let mut records = read_topic(bootstrap, topic)?;
    records.sort_by_key(|rec| rec.partition); // stable: offset order within a partition
    r.records = records.len() as u64;
    for rec in records {
        if let Some(id) = &rec.id {
            if !seen.insert(id.clone()) {
                r.same_id_again += 1;
                continue;
            }
        }
        if rec.value["kind"] != "completed" {
            continue;
        }
        let (Some(message), Some(conv)) = (
            rec.value["message_id"].as_str(),
            rec.value["conversation_id"].as_str(),
        ) else {
            continue;
        };
        let ids = r.completed.entry(message.to_owned()).or_default();
        if ids.is_empty() {
            r.completion_order
                .entry(conv.to_owned())
                .or_default()
                .push(message.to_owned());
        }
        ids.push(rec.id.clone().unwrap_or_default());
    }
    Ok(r)
}

/// Envelope ids present in `topic` (e.g. which accepted messages reached
/// the requests topic).
pub(crate) fn ids_in(bootstrap: &str, topic: &str) -> Result<HashSet<String>, String> {
    Ok(read_topic(bootstrap, topic)?
        .into_iter()
        .filter_map(|r| r.id)
        .collect())
}

/// Records in each dead-letter topic that has any.
pub(crate) fn dlq_counts(
    bootstrap: &str,
    topics: &[String],
) -> Result<BTreeMap<String, u64>, String> {
    let mut out = BTreeMap::new();
    for t in topics {
        let n = read_topic(bootstrap, t)?.len() as u64;
        if n > 0 {
            out.insert(t.clone(), n);
        }
    }
    Ok(out)
}

/// Outbox state per schema: (dead letters, pending rows).
pub(crate) fn outbox_counts(
    pg: &Postgres,
    db: &str,
) -> Result<BTreeMap<String, (u64, u64)>, String> {
    let schemas = pg.psql(
        db,
        "SELECT table_schema FROM information_schema.tables \
         WHERE table_name = 'dead_letters' ORDER BY 1",
    )?;
    let mut out = BTreeMap::new();
    for schema in schemas.lines().filter(|l| !l.is_empty()) {
        let q = format!("\"{}\"", schema.replace('"', "\"\""));
        let row = pg.psql(
            db,
            &format!(
                "SELECT (SELECT count(*) FROM {q}.dead_letters) || ',' || \
                 (SELECT count(*) FROM {q}.outbox WHERE sent_at IS NULL)"
            ),
        )?;
        let (dead, pending) = row.split_once(',').unwrap_or(("0", "0"));
        out.insert(
            schema.to_owned(),
            (dead.parse().unwrap_or(0), pending.parse().unwrap_or(0)),
        );
    }
    Ok(out)
}

/// Pending outbox rows over all schemas (`None` when PostgreSQL does not answer).
pub(crate) fn outbox_pending(pg: &Postgres, db: &str) -> Option<u64> {
    outbox_counts(pg, db)
        .ok()
        .map(|m| m.values().map(|(_, p)| p).sum())
}

/// The keys of the memories the memory service stores (the memory
/// replicator writes each chat message under its message id).
pub(crate) fn memory_keys(pg: &Postgres, db: &str) -> Result<HashSet<String>, String> {
    let out = pg.psql(db, "SELECT key FROM soma_memory.memories")?;
    Ok(out
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect())
}
