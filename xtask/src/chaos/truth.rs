//! Ground truth after a scenario, read behind the client's back: the
//! platform's topics on the private broker (from the beginning, with an
//! `soma-topic-dump` consumer of its own) and the outbox tables in the private
//! PostgreSQL.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use serde_json::Value;

use super::deps::Postgres;

/// The topic reader binary (`soma-topic-dump`, built with the platform's
/// binaries): librdkafka lives there, not in xtask, so xtask builds on a
/// machine without cmake.
static READER: OnceLock<PathBuf> = OnceLock::new();

/// Names the topic reader binary; called once before any topic is read.
pub(crate) fn set_reader(path: PathBuf) {
    let _ = READER.set(path);
}

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
    let reader = READER
        .get()
        .ok_or("the topic reader (soma-topic-dump) was not set")?;
    let out = Command::new(reader)
        .args([bootstrap, topic])
        .output()
        .map_err(|e| format!("run {}: {e}", reader.display()))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
    }
    let mut records = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let v: Value =
            serde_json::from_str(line).map_err(|e| format!("topic reader output: {e}"))?;
        records.push(Record {
            partition: v["partition"].as_i64().unwrap_or(-1) as i32,
            id: v["id"].as_str().map(str::to_owned),
            value: v["value"].clone(),
        });
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
