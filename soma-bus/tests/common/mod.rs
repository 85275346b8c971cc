//! Shared helpers for soma-bus integration tests (real tansu, real Postgres).
#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message, OwnedMessage};
use soma_bus::{BusConfig, TopicAdmin};
use soma_outbox::{Outbox, OutboxConfig};

/// Config for the shared broker with a unique consumer group.
pub fn config(bootstrap: &str) -> BusConfig {
    BusConfig {
        bootstrap_servers: bootstrap.to_owned(),
        client_id: "soma-bus-test".into(),
        consumer_group: soma_testkit::unique_name("g"),
        publish_timeout_ms: 3_000,
        retry_backoff_initial_ms: 20,
        retry_backoff_max_ms: 100,
        dlq_retry_backoff_ms: 200,
        commit_interval_ms: 200,
        lag_interval_ms: 1_000,
        session_timeout_ms: 6_000,
        shutdown_timeout_ms: 10_000,
        ..BusConfig::default()
    }
}

/// A topic (and its DLQ) created on the broker.
pub async fn topic(cfg: &BusConfig, prefix: &str) -> String {
    let t = soma_testkit::unique_name(prefix);
    TopicAdmin::new(cfg)
        .unwrap()
        .ensure_topics(&[&t], true)
        .await
        .unwrap();
    t
}

/// An outbox in a fresh schema of the `test` database.
pub async fn outbox() -> Outbox {
    let url = soma_testkit::require_postgres();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .connect(&url)
        .await
        .unwrap();
    let schema = soma_testkit::unique_name("bus");
    Outbox::new(
        pool,
        OutboxConfig {
            schema,
            ..OutboxConfig::default()
        },
    )
    .await
    .unwrap()
}

/// Reads every record of `topic` from the beginning until `done` says stop
/// or `timeout` passes.
pub async fn read_all(
    bootstrap: &str,
    topic: &str,
    timeout: Duration,
    done: impl FnMut(&[OwnedMessage]) -> bool,
) -> Vec<OwnedMessage> {
    read_all_with(bootstrap, &[], topic, timeout, done).await
}

/// [`read_all`] with extra consumer properties.
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
        .set("group.id", soma_testkit::unique_name("reader"))
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

/// Header value as a string.
pub fn header(m: &OwnedMessage, name: &str) -> Option<String> {
    m.headers()?
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// Waits until `f` is true or panics after `timeout` with `what`.
pub async fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A tansu broker owned by one test: its own port and SQLite file, so it
/// can be killed and restarted without disturbing other tests.
pub struct OwnBroker {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

fn tansu_binary() -> PathBuf {
    for c in ["tansu", "/root/.cargo/bin/tansu", "/usr/local/bin/tansu"] {
        if Command::new(c)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok()
        {
            return PathBuf::from(c);
        }
    }
    panic!(
        "the tansu broker binary is not installed (needed to start a private broker); {}",
        soma_testkit::HOW_TO_START
    );
}

impl OwnBroker {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut b = Self {
            port: soma_testkit::free_port(),
            dir,
            child: None,
        };
        b.spawn();
        b
    }

    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let log = std::fs::File::create(self.dir.path().join("tansu.log")).unwrap();
        let child = Command::new(tansu_binary())
            .current_dir(self.dir.path())
            .env_remove("LISTENER_URL")
            .env_remove("ADVERTISED_LISTENER_URL")
            .env_remove("STORAGE_ENGINE")
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "sqlite://tansu.db"])
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start tansu");
        self.child = Some(child);
        let end = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < end,
                "private tansu did not start; log in {}",
                self.log_path().display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("tansu.log")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// SIGKILL, no shutdown.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill(); // SIGKILL on Unix
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Counts occurrences of each value.
pub fn counts<T: std::hash::Hash + Eq + Clone>(
    items: impl IntoIterator<Item = T>,
) -> HashMap<T, usize> {
    let mut m = HashMap::new();
    for i in items {
        *m.entry(i).or_insert(0) += 1;
    }
    m
}

/// Reads each partition of `topic` separately (one consumer per partition,
/// up to its high watermark), in partition order.
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
            .set("group.id", soma_testkit::unique_name("reader"))
            .set("isolation.level", "read_uncommitted")
            .set("enable.auto.commit", "false")
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
