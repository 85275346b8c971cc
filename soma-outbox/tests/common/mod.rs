//! Shared helpers for soma-outbox integration tests (real PostgreSQL).
#![allow(dead_code, unreachable_pub, unused_imports)]

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use soma_outbox::{Outbox, OutboxConfig, OutboxRecord, RelayConfig, Sink, SinkOutcome};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

/// A fresh schema on the test database, dropped by [`TestDb::drop_schema`].
pub struct TestDb {
    pub pool: PgPool,
    pub outbox: Outbox,
    pub schema: String,
}

pub async fn setup(prefix: &str) -> TestDb {
    setup_with(prefix, |_| {}).await
}

pub async fn setup_with(prefix: &str, tweak: impl FnOnce(&mut OutboxConfig)) -> TestDb {
    let url = soma_testkit::require_postgres();
    let pool = PgPoolOptions::new()
        .max_connections(12)
        .acquire_timeout(Duration::from_secs(30))
        .connect(&url)
        .await
        .expect("connect to PostgreSQL");
    let schema = soma_testkit::unique_name(&format!("ob_{prefix}"));
    let mut config = OutboxConfig::default();
    config.schema = schema.clone();
    tweak(&mut config);
    let outbox = Outbox::new(pool.clone(), config)
        .await
        .expect("create outbox");
    TestDb {
        pool,
        outbox,
        schema,
    }
}

impl TestDb {
    pub async fn drop_schema(self) {
        let _ = sqlx::query(&format!(
            "DROP SCHEMA IF EXISTS \"{}\" CASCADE",
            self.schema
        ))
        .execute(&self.pool)
        .await;
        self.pool.close().await;
    }

    pub async fn pending(&self) -> u64 {
        self.outbox.stats().await.unwrap().pending
    }
}

/// Relay settings for tests: fast polling, fast rebalance, short backoff.
pub fn fast_relay() -> RelayConfig {
    let mut c = RelayConfig::default();
    c.batch_size = 100;
    c.shards = 8;
    c.poll_interval_ms = 50;
    c.backoff_base_ms = 10;
    c.backoff_max_ms = 100;
    c.max_attempts = 5;
    c.rebalance_interval_ms = 200;
    c.reconnect_backoff_ms = 100;
    c.stats_interval_ms = 200;
    c
}

type Rule = Box<dyn Fn(&OutboxRecord) -> Option<SinkOutcome> + Send + Sync>;

/// The far side of the relay: records what it "publishes" (as a broker
/// would), and can be told to fail records or to hang after publishing.
///
/// It follows the `Sink` contract: once a record of a key is not delivered
/// (retried, unavailable or rejected), later records of that key in the same
/// batch are not published either.
#[derive(Clone, Default)]
pub struct RecordingSink {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Records published to the "broker", in publish order (tagged by relay).
    published: Mutex<Vec<(String, OutboxRecord)>>,
    /// Every record offered, with the outcome returned.
    offered: Mutex<Vec<(OutboxRecord, SinkOutcome)>>,
    rule: Mutex<Option<Rule>>,
    /// When set, the next batch is published and then the call never returns
    /// (the relay dies before committing).
    hang_next: Mutex<Option<tokio::sync::oneshot::Sender<usize>>>,
    calls: Mutex<usize>,
}

impl RecordingSink {
    pub fn new() -> Self {
        Self::default()
    }

    /// A handle publishing under another relay's name, sharing the broker log.
    pub fn tagged(&self, tag: &str) -> TaggedSink {
        TaggedSink {
            sink: self.clone(),
            tag: tag.to_owned(),
        }
    }

    pub fn set_rule(
        &self,
        rule: impl Fn(&OutboxRecord) -> Option<SinkOutcome> + Send + Sync + 'static,
    ) {
        *self.inner.rule.lock().unwrap() = Some(Box::new(rule));
    }

    pub fn clear_rule(&self) {
        *self.inner.rule.lock().unwrap() = None;
    }

    /// The next batch is published, then the sink hangs forever; the receiver
    /// gets the batch size once it is published.
    pub fn hang_after_next_publish(&self) -> tokio::sync::oneshot::Receiver<usize> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        *self.inner.hang_next.lock().unwrap() = Some(tx);
        rx
    }

    pub fn published(&self) -> Vec<OutboxRecord> {
        self.inner
            .published
            .lock()
            .unwrap()
            .iter()
            .map(|(_, r)| r.clone())
            .collect()
    }

    pub fn published_tagged(&self) -> Vec<(String, OutboxRecord)> {
        self.inner.published.lock().unwrap().clone()
    }

    pub fn offered(&self) -> Vec<(OutboxRecord, SinkOutcome)> {
        self.inner.offered.lock().unwrap().clone()
    }

    pub fn calls(&self) -> usize {
        *self.inner.calls.lock().unwrap()
    }

    async fn send(&self, tag: &str, batch: &[OutboxRecord]) -> Vec<SinkOutcome> {
        *self.inner.calls.lock().unwrap() += 1;
        let mut out = Vec::with_capacity(batch.len());
        let mut stopped: HashSet<(String, String)> = HashSet::new();
        {
            let rule = self.inner.rule.lock().unwrap();
            let mut published = self.inner.published.lock().unwrap();
            let mut offered = self.inner.offered.lock().unwrap();
            for r in batch {
                let group = r.key.clone().map(|k| (r.topic.clone(), k));
                let outcome = if group.as_ref().is_some_and(|g| stopped.contains(g)) {
                    SinkOutcome::retry("earlier record of the key was not delivered")
                } else {
                    rule.as_ref()
                        .and_then(|f| f(r))
                        .unwrap_or(SinkOutcome::Delivered)
                };
                if outcome != SinkOutcome::Delivered {
                    if let Some(g) = group {
                        stopped.insert(g);
                    }
                }
                if outcome == SinkOutcome::Delivered {
                    published.push((tag.to_owned(), r.clone()));
                }
                offered.push((r.clone(), outcome.clone()));
                out.push(outcome);
            }
        }
        let hang = self.inner.hang_next.lock().unwrap().take();
        if let Some(tx) = hang {
            let _ = tx.send(batch.len());
            std::future::pending::<()>().await;
        }
        out
    }
}

#[async_trait::async_trait]
impl Sink for RecordingSink {
    async fn send_batch(&self, batch: &[OutboxRecord]) -> Vec<SinkOutcome> {
        self.send("relay", batch).await
    }
}

/// A [`RecordingSink`] view that tags what it publishes.
#[derive(Clone)]
pub struct TaggedSink {
    pub sink: RecordingSink,
    tag: String,
}

#[async_trait::async_trait]
impl Sink for TaggedSink {
    async fn send_batch(&self, batch: &[OutboxRecord]) -> Vec<SinkOutcome> {
        self.sink.send(&self.tag, batch).await
    }
}

pub use soma_testkit::wait_until;

/// Checks per-key order: for each key, the sequence numbers (payload as
/// decimal text) of the *first* publication of each id are increasing, and
/// every later occurrence (a duplicate) does not come before... Returns the
/// first-publication order per key.
pub fn first_publications(records: &[OutboxRecord]) -> HashMap<String, Vec<u64>> {
    let mut seen = HashSet::new();
    let mut per_key: HashMap<String, Vec<u64>> = HashMap::new();
    for r in records {
        if seen.insert(r.id) {
            let seq: u64 = String::from_utf8_lossy(&r.payload)
                .parse()
                .expect("numeric payload");
            per_key
                .entry(r.key.clone().unwrap_or_default())
                .or_default()
                .push(seq);
        }
    }
    per_key
}

/// Asserts every key's sequence is strictly increasing.
pub fn assert_ordered(per_key: &HashMap<String, Vec<u64>>) {
    for (k, seqs) in per_key {
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "key {k} delivered out of order: {seqs:?}"
        );
    }
}
