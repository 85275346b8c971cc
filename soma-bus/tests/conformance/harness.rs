//! The conformance suite's ledger: an inbox-deduplicating handler whose
//! effects are rows in PostgreSQL, and the checks every scenario ends with.
//!
//! Every scenario asserts the same three things about what the consumer
//! side saw, against what the publishing side was told:
//!
//! 1. **Exactly-once effects**: each accepted envelope id has exactly one
//!    effect row. The handler records the id with [`Inbox::record`] in the
//!    same transaction as the effect row, so a redelivery finds the inbox
//!    row and writes nothing.
//! 2. **Per-key order**: effects of one `(topic, key, stream)` commit in
//!    publish order, and the first delivery of each id arrives in publish
//!    order (duplicates may repeat an earlier id, never skip ahead).
//! 3. **Nothing un-accepted appears**: no delivery and no effect carries an
//!    id the publisher refused (`Err`) or never sent.

#![allow(dead_code, unreachable_pub)]

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use soma_bus::{
    BusConfig, BusConsumer, BusError, ConsumerBuilder, Envelope, HandlerError, PublishOutcome,
};
use soma_outbox::{Inbox, Outbox};
use uuid::Uuid;

/// Where a message belongs for the order check: one publisher's sequence
/// of one key on one topic.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Stream {
    pub topic: String,
    pub key: String,
    pub stream: String,
}

/// A message built by [`Msgs::next`]: its id and where it sits in its stream.
#[derive(Debug, Clone)]
pub struct Sent {
    pub stream: Stream,
    pub seq: u64,
}

/// Builds numbered envelopes and remembers what the publisher said about each.
#[derive(Debug, Default)]
pub struct Msgs {
    next_seq: HashMap<Stream, u64>,
    sent: HashMap<Uuid, Sent>,
    accepted: Vec<Uuid>,
    refused: HashSet<Uuid>,
}

impl Msgs {
    pub fn new() -> Self {
        Self::default()
    }

    /// The next envelope of `(topic, key, stream)`; payload `{"stream", "seq"}`.
    pub fn next(&mut self, topic: &str, key: &str, stream: &str) -> Envelope {
        let s = Stream {
            topic: topic.to_owned(),
            key: key.to_owned(),
            stream: stream.to_owned(),
        };
        let seq = self.next_seq.entry(s.clone()).or_insert(0);
        let env = Envelope::builder("conformance.event", "tenant-c", key)
            .json(&serde_json::json!({ "stream": stream, "seq": *seq }))
            .unwrap()
            .build()
            .unwrap();
        self.sent.insert(
            env.id,
            Sent {
                stream: s,
                seq: *seq,
            },
        );
        *seq += 1;
        env
    }

    /// Records the publisher's answer for `id`.
    pub fn answer<T: std::fmt::Debug>(&mut self, id: Uuid, r: &Result<T, BusError>) {
        match r {
            Ok(_) => self.accepted.push(id),
            Err(_) => {
                self.refused.insert(id);
            }
        }
    }

    /// Records answers for `envs` (same order as the results).
    pub fn answers(&mut self, envs: &[Envelope], rs: &[Result<PublishOutcome, BusError>]) {
        assert_eq!(envs.len(), rs.len(), "one result per message");
        for (e, r) in envs.iter().zip(rs) {
            self.answer(e.id, r);
        }
    }

    /// Marks `id` accepted (a write the test made durable itself, e.g. an
    /// outbox enqueue that committed).
    pub fn accept(&mut self, id: Uuid) {
        self.accepted.push(id);
    }

    pub fn accepted(&self) -> usize {
        self.accepted.len()
    }

    pub fn refused(&self) -> usize {
        self.refused.len()
    }
}

/// One handler invocation as the ledger saw it.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub id: Uuid,
    pub member: String,
    pub at: Instant,
}

/// Injected handler failures.
#[derive(Debug, Clone, Copy, Default)]
pub struct Faults {
    /// Fail the first attempt of every message whose seq is a multiple of
    /// this with a retryable error.
    pub retry_every: Option<u64>,
}

/// The exactly-once ledger: an effects table next to the outbox's inbox.
#[derive(Debug)]
pub struct Ledger {
    pub outbox: Outbox,
    /// The ledger's own pool: sessions end a transaction left idle for 3 s,
    /// as a crashed consumer's connection would (see [`Freezable`]).
    pool: sqlx::PgPool,
    pub name: String,
    inbox: Inbox,
    insert_sql: String,
    select_sql: String,
    count_sql: String,
    deliveries: Arc<Mutex<Vec<Delivery>>>,
    failed_once: Arc<Mutex<HashSet<Uuid>>>,
}

/// One effect row.
#[derive(Debug, Clone)]
pub struct Effect {
    pub id: Uuid,
    pub member: String,
}

/// What [`Ledger::verify`] found besides the asserted properties.
#[derive(Debug, Clone, Copy)]
pub struct Verdict {
    pub effects: usize,
    pub deliveries: usize,
    pub duplicates: usize,
}

impl Ledger {
    /// A ledger for handler `name` in `outbox`'s schema.
    pub async fn new(outbox: Outbox, name: &str) -> Arc<Self> {
        let q = format!("\"{}\"", outbox.schema());
        sqlx::query(&format!(
            "CREATE TABLE IF NOT EXISTS {q}.effects (
                 n bigserial PRIMARY KEY, handler text NOT NULL, message_id uuid NOT NULL,
                 member text NOT NULL)"
        ))
        .execute(outbox.pool())
        .await
        .unwrap();
        let pool = ledger_pool();
        Arc::new(Self {
            pool,
            inbox: outbox.inbox(),
            insert_sql: format!(
                "INSERT INTO {q}.effects (handler, message_id, member) VALUES ($1, $2, $3)"
            ),
            select_sql: format!(
                "SELECT message_id, member FROM {q}.effects WHERE handler = $1 ORDER BY n"
            ),
            count_sql: format!("SELECT count(*) FROM {q}.effects WHERE handler = $1"),
            outbox,
            name: name.to_owned(),
            deliveries: Arc::new(Mutex::new(Vec::new())),
            failed_once: Arc::new(Mutex::new(HashSet::new())),
        })
    }

    /// The same ledger (table, handler name, delivery log) on a pool of its
    /// own, for a consumer on another runtime ([`Freezable`]): a connection
    /// is bound to the runtime that opened it, and one opened on a frozen
    /// runtime would hang whoever the shared pool handed it to next.
    pub fn fork(&self) -> Arc<Self> {
        Arc::new(Self {
            outbox: self.outbox.clone(),
            pool: ledger_pool(),
            name: self.name.clone(),
            inbox: self.inbox.clone(),
            insert_sql: self.insert_sql.clone(),
            select_sql: self.select_sql.clone(),
            count_sql: self.count_sql.clone(),
            deliveries: self.deliveries.clone(),
            failed_once: self.failed_once.clone(),
        })
    }

    /// Applies `env`'s effect once: inbox record + effect row in one
    /// transaction. Returns whether this delivery wrote the effect.
    pub async fn apply(&self, env: &Envelope, member: &str) -> Result<bool, HandlerError> {
        let mut tx = self.pool.begin().await.map_err(HandlerError::retryable)?;
        let first = self
            .inbox
            .record(&mut tx, &self.name, env.id)
            .await
            .map_err(HandlerError::retryable)?;
        if first {
            sqlx::query(&self.insert_sql)
                .bind(&self.name)
                .bind(env.id)
                .bind(member)
                .execute(&mut *tx)
                .await
                .map_err(HandlerError::retryable)?;
        }
        tx.commit().await.map_err(HandlerError::retryable)?;
        Ok(first)
    }

    /// Notes a handler invocation (before its effect).
    pub fn delivered(&self, env: &Envelope, member: &str) {
        self.deliveries.lock().push(Delivery {
            id: env.id,
            member: member.to_owned(),
            at: Instant::now(),
        });
    }

    /// The handler: note the delivery, inject `faults`, apply the effect.
    pub async fn handle(
        &self,
        env: Envelope,
        member: &str,
        faults: Faults,
    ) -> Result<(), HandlerError> {
        self.delivered(&env, member);
        if let Some(n) = faults.retry_every {
            let seq = env.json::<serde_json::Value>()?["seq"]
                .as_u64()
                .unwrap_or(0);
            if seq % n == 0 && self.failed_once.lock().insert(env.id) {
                return Err(HandlerError::retryable("injected failure"));
            }
        }
        self.apply(&env, member).await.map(|_| ())
    }

    /// A consumer builder on `topics` running [`handle`](Self::handle) as `member`.
    pub fn consumer(
        self: &Arc<Self>,
        cfg: &BusConfig,
        topics: &[&str],
        member: &str,
        faults: Faults,
    ) -> ConsumerBuilder {
        self.consumer_with(cfg, topics, member, faults, |_, _| {})
    }

    /// [`consumer`](Self::consumer) with `after(env, wrote_effect)` called
    /// once the handler's effect transaction committed (e.g. to freeze the
    /// consumer right there).
    pub fn consumer_with(
        self: &Arc<Self>,
        cfg: &BusConfig,
        topics: &[&str],
        member: &str,
        faults: Faults,
        after: impl Fn(&Envelope, &str) + Send + Sync + 'static,
    ) -> ConsumerBuilder {
        let me = self.clone();
        let member = member.to_owned();
        let after = Arc::new(after);
        BusConsumer::builder(cfg, topics, self.name.clone(), move |env: Envelope| {
            let me = me.clone();
            let member = member.clone();
            let after = after.clone();
            async move {
                let id = env.clone();
                me.handle(env, &member, faults).await?;
                after(&id, &member);
                Ok(())
            }
        })
    }

    pub async fn effect_count(&self) -> usize {
        let n: i64 = sqlx::query_scalar(&self.count_sql)
            .bind(&self.name)
            .fetch_one(&self.pool)
            .await
            .unwrap();
        n as usize
    }

    pub async fn effects(&self) -> Vec<Effect> {
        let rows: Vec<(Uuid, String)> = sqlx::query_as(&self.select_sql)
            .bind(&self.name)
            .fetch_all(&self.pool)
            .await
            .unwrap();
        rows.into_iter()
            .map(|(id, member)| Effect { id, member })
            .collect()
    }

    pub fn deliveries(&self) -> Vec<Delivery> {
        self.deliveries.lock().clone()
    }

    /// Waits until at least `n` effects are recorded; panics after `timeout`.
    pub async fn wait_effects(&self, n: usize, timeout: Duration) {
        let end = Instant::now() + timeout;
        loop {
            let got = self.effect_count().await;
            if got >= n {
                return;
            }
            assert!(
                Instant::now() < end,
                "timed out after {timeout:?}: {got} of {n} effects ({} deliveries)",
                self.deliveries.lock().len()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits for every accepted message's effect (plus `settle` for late
    /// extras), then asserts the three properties of the module docs.
    pub async fn verify(&self, msgs: &Msgs, timeout: Duration, settle: Duration) -> Verdict {
        self.wait_effects(msgs.accepted.len(), timeout).await;
        tokio::time::sleep(settle).await;
        let effects = self.effects().await;
        let accepted: HashSet<Uuid> = msgs.accepted.iter().copied().collect();
        assert_eq!(
            accepted.len(),
            msgs.accepted.len(),
            "an id was accepted twice"
        );
        // 1. Exactly once, and nothing un-accepted.
        let mut seen = HashSet::new();
        for e in &effects {
            assert!(
                !msgs.refused.contains(&e.id),
                "refused message {} has an effect (a phantom)",
                e.id
            );
            assert!(
                accepted.contains(&e.id),
                "effect of an id that was never accepted: {}",
                e.id
            );
            assert!(seen.insert(e.id), "two effects for {}", e.id);
        }
        let missing: Vec<_> = accepted.difference(&seen).collect();
        assert!(
            missing.is_empty(),
            "{} accepted messages have no effect, e.g. {:?}",
            missing.len(),
            missing.iter().take(3).collect::<Vec<_>>()
        );
        // 2. Per-stream order of effects.
        check_order(msgs, effects.iter().map(|e| e.id), "effects");
        // 3. Deliveries: only accepted ids; first deliveries in order.
        let deliveries = self.deliveries();
        let mut first = HashSet::new();
        let mut firsts = Vec::new();
        for d in &deliveries {
            assert!(
                !msgs.refused.contains(&d.id),
                "refused message {} was delivered",
                d.id
            );
            assert!(
                msgs.sent.contains_key(&d.id),
                "delivered an id this test never built: {}",
                d.id
            );
            if first.insert(d.id) {
                firsts.push(d.id);
            }
        }
        check_order(msgs, firsts.into_iter(), "first deliveries");
        Verdict {
            effects: effects.len(),
            deliveries: deliveries.len(),
            duplicates: deliveries.len() - first.len(),
        }
    }
}

/// A lazily connecting pool whose sessions end a transaction left idle for
/// 3 s (as the server does for a crashed client's connection).
fn ledger_pool() -> sqlx::PgPool {
    let opts = soma_testkit::require_postgres()
        .parse::<sqlx::postgres::PgConnectOptions>()
        .unwrap()
        .options([("idle_in_transaction_session_timeout", "3000")]);
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(12)
        .connect_lazy_with(opts)
}

/// Asserts that `ids` visit each stream in increasing seq order.
fn check_order(msgs: &Msgs, ids: impl Iterator<Item = Uuid>, what: &str) {
    let mut last: HashMap<&Stream, u64> = HashMap::new();
    for id in ids {
        let s = &msgs.sent[&id];
        if let Some(prev) = last.insert(&s.stream, s.seq) {
            assert!(
                s.seq > prev,
                "{what} out of order for {:?}: seq {} after {prev}",
                s.stream,
                s.seq
            );
        }
    }
}

/// Installs a quiet test subscriber once (warnings of the crates under test).
pub fn quiet_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            "soma_bus=warn,soma_outbox=warn,rdkafka=off",
        ))
        .with_test_writer()
        .try_init();
}

/// Bounds a scenario: panics with `what` if `f` takes longer than `limit`.
pub async fn bounded<T>(what: &str, limit: Duration, f: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(limit, f).await {
        Ok(t) => t,
        Err(_) => panic!("scenario `{what}` exceeded its time bound of {limit:?}"),
    }
}

/// A fresh topic (with its DLQ) of `partitions` partitions on `cfg`'s broker.
pub async fn topic_with(cfg: &BusConfig, prefix: &str, partitions: i32) -> String {
    let t = soma_testkit::unique_name(prefix);
    let mut admin_cfg = cfg.clone();
    admin_cfg.topics.partitions = partitions;
    soma_bus::TopicAdmin::new(&admin_cfg)
        .unwrap()
        .ensure_topics(&[&t], true)
        .await
        .unwrap();
    t
}

/// A relay configuration for the suite: quick polls and probes, no
/// dead-lettering by attempts (an outage must not dead-letter anything).
pub fn relay_config() -> soma_outbox::RelayConfig {
    let mut c = soma_outbox::RelayConfig::default();
    c.poll_interval_ms = 100;
    c.backoff_base_ms = 50;
    c.backoff_max_ms = 500;
    c.max_attempts = 10_000;
    c.unavailable_backoff_initial_ms = 100;
    c.unavailable_backoff_max_ms = 1_000;
    c.sink_timeout_ms = 15_000;
    c.reconnect_backoff_ms = 200;
    c
}

/// The consumer-side inbox dedupe on `ledger`'s outbox (same inbox table
/// and handler name as the ledger's own records).
pub fn dedupe(ledger: &Ledger) -> soma_bus::InboxDedupe {
    soma_bus::InboxDedupe::new(ledger.outbox.inbox(), ledger.outbox.pool().clone())
}

/// Runs a consumer on a runtime of its own, so a test can *freeze* it: a
/// frozen consumer runs no task again (no poll, no commit, no rebalance
/// callback) while librdkafka's threads stay alive, which is what a hung or
/// crashed process looks like to the broker. With `max.poll.interval.ms`
/// set, librdkafka leaves the group after that long without a poll, and
/// the partitions move on with nothing committed.
pub struct Freezable {
    rt: Option<tokio::runtime::Runtime>,
    handle: Option<soma_bus::ConsumerHandle>,
}

impl Freezable {
    pub fn spawn(builder: ConsumerBuilder) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let handle = {
            let _g = rt.enter();
            builder.spawn().unwrap()
        };
        Self {
            rt: Some(rt),
            handle: Some(handle),
        }
    }

    /// Blocks the runtime's only worker thread for good.
    pub fn freeze(&mut self) {
        if let Some(rt) = &self.rt {
            rt.spawn(async { std::thread::sleep(Duration::from_secs(3_600)) });
        }
    }
}

impl Drop for Freezable {
    fn drop(&mut self) {
        // The handle's drop only cancels tokens; the frozen runtime never
        // acts on them. Leak the runtime's threads rather than block on them.
        std::mem::forget(self.handle.take());
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}
