//! Shared helpers for soma-bus integration tests (real tansu, real Postgres).
#![allow(dead_code, unreachable_pub, unused_imports)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message, OwnedMessage};
use soma_bus::{BusConfig, Envelope, TopicAdmin};
use soma_outbox::{Outbox, OutboxConfig};
use tokio_util::sync::CancellationToken;

/// A raw rdkafka producer with the producer settings `cfg` gives the bus
/// (acks=all, idempotence, linger, batching, in-flight): the baseline the
/// benchmarks compare the bus with.
pub fn raw_producer(cfg: &BusConfig) -> rdkafka::producer::FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", &cfg.bootstrap_servers)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", cfg.linger_ms.to_string())
        .set("batch.size", cfg.batch_size_bytes.to_string())
        .set("batch.num.messages", cfg.batch_num_messages.to_string())
        .set(
            "max.in.flight.requests.per.connection",
            cfg.max_in_flight.to_string(),
        )
        .create()
        .expect("raw rdkafka producer")
}

/// A keyed test envelope whose JSON payload is `{"n": n}`.
pub fn env(key: &str, n: u32) -> Envelope {
    Envelope::builder("test.event", "tenant-a", key)
        .json(&serde_json::json!({ "n": n }))
        .unwrap()
        .build()
        .unwrap()
}

/// Config for the shared broker with a unique consumer group.
pub fn config(bootstrap: &str) -> BusConfig {
    let mut c = BusConfig::default();
    c.bootstrap_servers = bootstrap.to_owned();
    c.client_id = "soma-bus-test".into();
    c.consumer_group = soma_testkit::unique_name("g");
    c.publish_timeout_ms = 3_000;
    c.retry_backoff_initial_ms = 20;
    c.retry_backoff_max_ms = 100;
    c.dlq_retry_backoff_ms = 200;
    c.commit_interval_ms = 200;
    c.lag_interval_ms = 1_000;
    c.session_timeout_ms = 6_000;
    c.shutdown_timeout_ms = 10_000;
    c
}

/// A topic (and its DLQ) created on the broker.
pub async fn topic(cfg: &BusConfig, prefix: &str) -> String {
    new_topic(cfg, prefix, true).await
}

/// A fresh topic named from `prefix`, with its `.dlq` when `with_dlq`.
pub async fn new_topic(cfg: &BusConfig, prefix: &str, with_dlq: bool) -> String {
    let t = soma_testkit::unique_name(prefix);
    TopicAdmin::new(cfg)
        .unwrap()
        .ensure_topics(&[&t], with_dlq)
        .await
        .unwrap();
    t
}

/// The median of `v` (NaN when empty), for the benchmarks' paired rounds.
pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// An outbox in a fresh schema of the `test` database.
pub async fn outbox() -> Outbox {
    outbox_with(|_| {}).await
}

/// [`outbox`] with its config changed by `tune` first.
pub async fn outbox_with(tune: impl FnOnce(&mut OutboxConfig)) -> Outbox {
    let url = soma_testkit::require_postgres();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .connect(&url)
        .await
        .unwrap();
    let mut config = OutboxConfig::new(soma_testkit::unique_name("bus"));
    tune(&mut config);
    Outbox::new(pool, config).await.unwrap()
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

pub use soma_testkit::wait_for;

/// A tansu broker owned by one test: its own port and SQLite file, so it
/// can be killed and restarted without disturbing other tests.
pub struct OwnBroker {
    pub port: u16,
    /// The port clients are told to connect to (metadata); `port` unless a
    /// [`FaultProxy`] sits in front.
    advertised_port: u16,
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
        let port = soma_testkit::free_port();
        Self::start_advertising(port, port)
    }

    /// A broker listening on a free port that tells clients (in metadata) to
    /// connect to `advertised_port` instead, where a [`FaultProxy`] forwards
    /// to it: every connection of its clients then goes through the proxy.
    pub fn behind_proxy(advertised_port: u16) -> Self {
        Self::start_advertising(soma_testkit::free_port(), advertised_port)
    }

    fn start_advertising(port: u16, advertised_port: u16) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut b = Self {
            port,
            advertised_port,
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
        let advertised = format!("tcp://127.0.0.1:{}", self.advertised_port);
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
                &advertised,
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
/// [`BOUNDED_FETCH_BYTES`].
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

/// A TCP forwarder on a loopback port in front of a broker (or any TCP
/// server), for fault injection on the far side of a client:
/// [`FaultProxy::cut`] drops every open connection and refuses new ones
/// (accepts and closes them at once) until [`FaultProxy::restore`];
/// [`FaultProxy::set_delay`] holds every forwarded chunk, in both
/// directions, for a fixed latency (order and throughput kept).
pub struct FaultProxy {
    pub port: u16,
    state: Arc<ProxyState>,
    task: tokio::task::JoinHandle<()>,
}

struct ProxyState {
    up: AtomicBool,
    /// Cancelled on `cut`; replaced on `restore`.
    conns: parking_lot::Mutex<CancellationToken>,
    forwarded: AtomicU64,
    refused: AtomicU64,
    /// Added one-way latency in milliseconds (0: none).
    delay_ms: Arc<AtomicU64>,
}

/// Copies `from` to `to`, each chunk held until `delay` after it was read
/// (the delay in force when it was read). A reader and a writer task with a
/// queue between them, so a slow link still carries many chunks at once.
async fn delayed_pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Arc<AtomicU64>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let reader = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let due = Instant::now() + Duration::from_millis(delay.load(Ordering::SeqCst));
                    if tx.send((due, buf[..n].to_vec())).is_err() {
                        return;
                    }
                }
            }
        }
    };
    let writer = async move {
        while let Some((due, bytes)) = rx.recv().await {
            tokio::time::sleep_until(due.into()).await;
            if to.write_all(&bytes).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}

impl FaultProxy {
    /// Listens on `port` (loopback) and forwards to `127.0.0.1:upstream`.
    pub async fn start(port: u16, upstream: u16) -> Self {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind proxy port");
        let state = Arc::new(ProxyState {
            up: AtomicBool::new(true),
            conns: parking_lot::Mutex::new(CancellationToken::new()),
            forwarded: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            delay_ms: Arc::new(AtomicU64::new(0)),
        });
        let st = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                if !st.up.load(Ordering::SeqCst) {
                    st.refused.fetch_add(1, Ordering::SeqCst);
                    drop(client);
                    continue;
                }
                let token = st.conns.lock().clone();
                st.forwarded.fetch_add(1, Ordering::SeqCst);
                let delay = st.delay_ms.clone();
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                    else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::select! {
                        _ = async {
                            tokio::join!(
                                delayed_pipe(cr, sw, delay.clone()),
                                delayed_pipe(sr, cw, delay),
                            )
                        } => {}
                        () = token.cancelled() => {}
                    }
                });
            }
        });
        Self { port, state, task }
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Drops every forwarded connection and refuses new ones.
    pub fn cut(&self) {
        self.state.up.store(false, Ordering::SeqCst);
        let mut conns = self.state.conns.lock();
        conns.cancel();
        *conns = CancellationToken::new();
    }

    /// Forwards new connections again.
    pub fn restore(&self) {
        self.state.up.store(true, Ordering::SeqCst);
    }

    /// Holds every chunk forwarded from now on for `delay`, each way
    /// (`Duration::ZERO` removes the latency).
    pub fn set_delay(&self, delay: Duration) {
        self.state
            .delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// Connections refused while cut.
    pub fn refused(&self) -> u64 {
        self.state.refused.load(Ordering::SeqCst)
    }

    /// Connections forwarded.
    pub fn forwarded(&self) -> u64 {
        self.state.forwarded.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
        self.state.conns.lock().cancel();
    }
}
