//! Reading a topic back with a plain rdkafka consumer (no consumer group
//! coordination, no commits): what a test publishes, as the broker stored
//! it, headers included.
//!
//! ```no_run
//! use std::time::Duration;
//!
//! # async fn f() {
//! let bootstrap = soma_testkit::require_kafka();
//! let records = soma_testkit::kafka::read_all(&bootstrap, "orders", Duration::from_secs(10), |got| {
//!     got.len() >= 3
//! })
//! .await;
//! let ids: Vec<_> = records.iter().map(|m| soma_testkit::kafka::header(m, "soma-id")).collect();
//! # let _ = ids;
//! # }
//! ```

use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message, OwnedMessage};

/// Reads every record of `topic` from the beginning until `done` says stop
/// or `timeout` passes; `done` sees the records read so far.
///
/// Every partition is assigned from its beginning (no consumer group
/// coordination, nothing committed), and uncommitted transactional records
/// are read too (`read_uncommitted`).
///
/// # Panics
///
/// If the consumer cannot be created, or `topic` has no metadata (no
/// partitions) before `timeout`.
pub async fn read_all(
    bootstrap: &str,
    topic: &str,
    timeout: Duration,
    done: impl FnMut(&[OwnedMessage]) -> bool,
) -> Vec<OwnedMessage> {
    read_all_with(bootstrap, &[], topic, timeout, done).await
}

/// [`read_all`] with extra consumer properties: `props` are set first, so
/// the ones `read_all` relies on (bootstrap servers, a fresh group id,
/// `read_uncommitted`, no auto-commit) win.
///
/// # Panics
///
/// As [`read_all`].
pub async fn read_all_with(
    bootstrap: &str,
    props: &[(&str, &str)],
    topic: &str,
    timeout: Duration,
    mut done: impl FnMut(&[OwnedMessage]) -> bool,
) -> Vec<OwnedMessage> {
    let mut cc = ClientConfig::new();
    for (k, v) in props {
        cc.set(*k, *v);
    }
    let c: StreamConsumer = cc
        .set("bootstrap.servers", bootstrap)
        .set("group.id", crate::unique_name("reader"))
        .set("isolation.level", "read_uncommitted")
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    // Assign every partition from the beginning: no group coordination needed.
    let end = Instant::now() + timeout;
    let parts = loop {
        let md = c.fetch_metadata(Some(topic), Duration::from_secs(5));
        if let Ok(md) = md {
            let n = md
                .topics()
                .iter()
                .find(|t| t.name() == topic)
                .map_or(0, |t| t.partitions().len());
            if n > 0 {
                break n;
            }
        }
        assert!(Instant::now() < end, "no metadata for {topic}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..parts {
        tpl.add_partition_offset(topic, p as i32, rdkafka::Offset::Beginning)
            .unwrap();
    }
    c.assign(&tpl).unwrap();
    let mut out = Vec::new();
    while !done(&out) && Instant::now() < end {
        if let Ok(Ok(m)) = tokio::time::timeout(Duration::from_millis(500), c.recv()).await {
            out.push(m.detach());
        }
    }
    out
}

/// The value of header `name` of `m`, as (lossy) UTF-8; `None` when absent
/// or valueless.
pub fn header(m: &OwnedMessage, name: &str) -> Option<String> {
    m.headers()?
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// Upper bound of one fetch response in [`read_partitionwise`].
///
/// tansu 0.6.0 (SQLite storage) answers a Fetch by reading every record from
/// the fetch offset to the high watermark whose key + value bytes fit in the
/// request's `max_bytes` (headers are not counted), and then runs one header
/// query per record that scans the whole `header` table (it has no index).
/// With librdkafka's default `fetch.max.bytes` (50 MB) a partition of small
/// records is answered in one response costing records x all headers in the
/// database: 5,000 records over 60,000 header rows took 14 s on the quiet
/// 2-core machine, and under load longer than librdkafka's 60 s socket
/// timeout, after which the client re-sends the fetch while tansu (which
/// serves storage requests one at a time) is still working on the old one,
/// and Metadata queues behind both: the broker looks wedged. Small fetches
/// keep each request well under a second; the total work is the same.
pub const BOUNDED_FETCH_BYTES: &str = "4096";

/// Reads each partition of `topic` separately (one consumer per partition,
/// up to its high watermark), in partition order, in fetches of at most
/// [`BOUNDED_FETCH_BYTES`]: the way to read back a large topic from tansu.
///
/// # Panics
///
/// If a consumer cannot be created or the topic's metadata or watermarks
/// cannot be fetched (10 s each).
pub async fn read_partitionwise(
    bootstrap: &str,
    topic: &str,
    timeout: Duration,
) -> Vec<OwnedMessage> {
    let end = Instant::now() + timeout;
    let probe: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .unwrap();
    let md = probe
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let parts = md
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .map_or(0, |t| t.partitions().len());
    let mut out = Vec::new();
    for p in 0..parts as i32 {
        let (_, high) = probe
            .fetch_watermarks(topic, p, Duration::from_secs(10))
            .unwrap();
        let c: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", crate::unique_name("reader"))
            .set("isolation.level", "read_uncommitted")
            .set("enable.auto.commit", "false")
            .set("fetch.max.bytes", BOUNDED_FETCH_BYTES)
            .set("max.partition.fetch.bytes", BOUNDED_FETCH_BYTES)
            .set("message.max.bytes", "1000")
            .create()
            .unwrap();
        let mut tpl = rdkafka::TopicPartitionList::new();
        tpl.add_partition_offset(topic, p, rdkafka::Offset::Beginning)
            .unwrap();
        c.assign(&tpl).unwrap();
        let mut last = -1;
        while last + 1 < high && Instant::now() < end {
            if let Ok(Ok(m)) = tokio::time::timeout(Duration::from_millis(500), c.recv()).await {
                last = m.offset();
                out.push(m.detach());
            }
        }
    }
    out
}
