//! `soma-topic-dump BOOTSTRAP TOPIC`: every record of `TOPIC` from the
//! beginning, partition by partition in offset order, one JSON object per
//! line: `{"partition": p, "offset": o, "id": "<soma-id header>"|null,
//! "value": <payload as JSON>|null}`. A topic that does not exist prints
//! nothing. Errors go to stderr with exit status 1.
//!
//! `cargo xtask chaos` reads its ground truth with it, behind the client's
//! back. It lives in its own binary so that `xtask` itself (lint-env, the
//! stack, the test pipeline) builds without librdkafka, which needs cmake:
//! on a fresh machine `cargo xtask stack up` is what installs cmake.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::{Value, json};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [bootstrap, topic] = args.as_slice() else {
        eprintln!("usage: soma-topic-dump BOOTSTRAP TOPIC");
        return ExitCode::from(2);
    };
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let result = dump(bootstrap, topic, |line| {
        writeln!(out, "{line}").map_err(|e| format!("stdout: {e}"))
    })
    .and_then(|()| out.flush().map_err(|e| format!("stdout: {e}")));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("soma-topic-dump: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Reads `topic` from its beginning to the high watermarks seen at the
/// start, emitting one JSON object per record.
fn dump(
    bootstrap: &str,
    topic: &str,
    emit: impl FnMut(Value) -> Result<(), String>,
) -> Result<(), String> {
    let consumer = reader(bootstrap)?;
    let high = assign_from_beginning(&consumer, topic)?;
    if high.is_empty() {
        return Ok(());
    }
    read_to_ends(&consumer, topic, &high, emit)
}

/// A consumer of a group of its own that reads from the earliest offset,
/// commits nothing and reports each partition's end.
fn reader(bootstrap: &str) -> Result<BaseConsumer, String> {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    ClientConfig::new()
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
        // Small fetches keep each answer of a slow broker storage well
        // inside the socket timeout (README: Known limits of the local broker).
        .set("message.max.bytes", "65536")
        .set("fetch.max.bytes", "65536")
        .set("max.partition.fetch.bytes", "16384")
        .create()
        .map_err(|e| format!("Kafka reader: {e}"))
}

/// The high watermark of each non-empty partition of `topic`, with those
/// partitions assigned to `consumer` from their beginning (nothing is
/// assigned when every partition is empty or the topic does not exist).
fn assign_from_beginning(
    consumer: &BaseConsumer,
    topic: &str,
) -> Result<HashMap<i32, i64>, String> {
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
    if !high.is_empty() {
        consumer.assign(&tpl).map_err(|e| e.to_string())?;
    }
    Ok(high)
}

/// Polls until every partition in `high` is read to its watermark (or its
/// end is reported), within 60 s.
fn read_to_ends(
    consumer: &BaseConsumer,
    topic: &str,
    high: &HashMap<i32, i64>,
    mut emit: impl FnMut(Value) -> Result<(), String>,
) -> Result<(), String> {
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
                if high
                    .get(&m.partition())
                    .is_some_and(|h| m.offset() + 1 >= *h)
                {
                    pending.remove(&m.partition());
                }
                emit(record(&m))?;
            }
        }
    }
    Ok(())
}

/// One record as printed: partition, offset, `soma-id` header and the
/// payload parsed as JSON (`null` for either when absent or not JSON).
fn record(m: &BorrowedMessage<'_>) -> Value {
    let id = m.headers().and_then(|hs| {
        hs.iter()
            .find(|h| h.key == "soma-id")
            .and_then(|h| h.value)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    });
    let value: Value = m
        .payload()
        .and_then(|p| serde_json::from_slice(p).ok())
        .unwrap_or_default();
    json!({
        "partition": m.partition(),
        "offset": m.offset(),
        "id": id,
        "value": value,
    })
}
