//! The relay: claims pending messages in commit order, publishes them through
//! a [`Sink`], and records the outcome, shard by shard.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt;
use sqlx::postgres::{PgListener, PgRow};
use sqlx::{ConnectOptions, Connection, PgConnection, Row};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use soma_observability::health::{Criticality, HealthReporter};
use soma_observability::{HealthRegistry, MetricsRegistry};

use crate::metrics::OutboxMetrics;
use crate::schema::{channel_name, lock_namespace};
use crate::{DeadLetterOrder, Outbox, OutboxError, OutboxRecord, RelayConfig, Sink, SinkOutcome};

/// Longest error text kept per attempt.
const MAX_ERROR_CHARS: usize = 2_000;

/// Drains an [`Outbox`] into a [`Sink`]. Build with [`Relay::new`], plug in
/// with [`Relay::metrics`] and [`Relay::health`], start with [`Relay::spawn`].
///
/// Several relays (in one or many processes) may run against one schema:
/// they split the shards between them, see the [crate docs](crate).
///
/// Connections: a running relay opens one dedicated connection (with the
/// pool's connect options, outside the pool) for its shard locks and batch
/// transactions, holds one pool connection for `LISTEN`, and briefly uses the
/// pool for the statistics query. Size the pool accordingly.
///
/// Under pressure: the relay keeps nothing in memory beyond the batch in
/// flight. When the sink is unavailable, messages stay in the outbox table
/// (growing without bound; watch `soma_outbox_pending` and the health
/// component) with their attempts untouched while the relay backs off and
/// probes; a record the sink fails on its own is retried with backoff; when
/// PostgreSQL is unreachable, the relay
/// reconnects every [`RelayConfig::reconnect_backoff_ms`], counting
/// `soma_outbox_relay_errors_total`.
pub struct Relay {
    outbox: Outbox,
    sink: Arc<dyn Sink>,
    config: RelayConfig,
    metrics: OutboxMetrics,
    health: Option<HealthReporter>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("schema", &self.outbox.schema())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Running relay. Dropping it leaves the relay running; call
/// [`shutdown`](RelayHandle::shutdown).
#[derive(Debug)]
pub struct RelayHandle {
    cancel: CancellationToken,
    main: JoinHandle<Result<(), OutboxError>>,
    aux: Vec<JoinHandle<()>>,
    shared: Arc<Shared>,
}

/// Counters of one relay since it started (also exported as metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayCounters {
    /// Messages the sink delivered and the relay committed as delivered.
    pub published: u64,
    /// Failed attempts that will be retried.
    pub failed: u64,
    /// Messages moved to the dead-letter table.
    pub dead_lettered: u64,
    /// Batches committed.
    pub batches: u64,
    /// Times the sink delivered a record after an undelivered earlier record
    /// of the same key in one batch (a [`Sink`] contract violation).
    pub order_violations: u64,
    /// Shards this relay gave up or took over (joins, leaves, takeovers,
    /// reconnects). Flat while the set of relays is stable: a count that
    /// keeps rising means shards are flapping between relays.
    pub shard_moves: u64,
}

#[derive(Debug, Default)]
struct Shared {
    owned: Mutex<Vec<u32>>,
    published: AtomicU64,
    failed: AtomicU64,
    dead_lettered: AtomicU64,
    batches: AtomicU64,
    order_violations: AtomicU64,
    shard_moves: AtomicU64,
    sink_unavailable: AtomicBool,
}

impl RelayHandle {
    /// Stops the relay: the in-flight batch is published and committed, then
    /// the relay's connection is closed, releasing its shards to other
    /// relays. Returns the error that stopped the relay early, if any.
    pub async fn shutdown(self) -> Result<(), OutboxError> {
        self.cancel.cancel();
        let res = match self.main.await {
            Ok(r) => r,
            Err(e) => Err(OutboxError::Relay(e.to_string())),
        };
        for t in self.aux {
            t.abort();
            let _ = t.await;
        }
        res
    }

    /// Stops the relay at once, without finishing the in-flight batch: its
    /// transaction rolls back when the connection drops, so the batch is
    /// published again by whichever relay takes the shards over (the
    /// duplicate case of the guarantees). This is what a crash looks like to
    /// the database.
    pub fn abort(self) {
        self.main.abort();
        for t in &self.aux {
            t.abort();
        }
    }

    /// Whether the relay task has ended (after an error or shutdown).
    pub fn is_finished(&self) -> bool {
        self.main.is_finished()
    }

    /// True while the relay is backing off because its sink is unavailable.
    pub fn sink_unavailable(&self) -> bool {
        self.shared.sink_unavailable.load(Ordering::Relaxed)
    }

    /// Shards this relay owns right now.
    pub fn owned_shards(&self) -> Vec<u32> {
        self.shared
            .owned
            .lock()
            .map(|o| o.clone())
            .unwrap_or_default()
    }

    /// Counters since the relay started.
    pub fn counters(&self) -> RelayCounters {
        let s = &self.shared;
        RelayCounters {
            published: s.published.load(Ordering::Relaxed),
            failed: s.failed.load(Ordering::Relaxed),
            dead_lettered: s.dead_lettered.load(Ordering::Relaxed),
            batches: s.batches.load(Ordering::Relaxed),
            order_violations: s.order_violations.load(Ordering::Relaxed),
            shard_moves: s.shard_moves.load(Ordering::Relaxed),
        }
    }
}

impl Relay {
    /// A relay draining `outbox` into `sink`. The configuration is checked
    /// when the relay starts: an invalid one ends the relay at once, and
    /// [`RelayHandle::shutdown`] returns the error (check early with
    /// [`RelayConfig::validate`]).
    pub fn new<S: Sink>(outbox: Outbox, sink: S, config: RelayConfig) -> Self {
        Self {
            outbox,
            sink: Arc::new(sink),
            config,
            metrics: OutboxMetrics::detached(),
            health: None,
        }
    }

    /// Exports the relay's metrics (the families listed at [`OutboxMetrics`],
    /// labelled with this outbox's schema) through `registry`.
    pub fn metrics(mut self, registry: &MetricsRegistry) -> Self {
        self.metrics = OutboxMetrics::new(registry, &self.outbox);
        self
    }

    /// Reports the health component `outbox_relay` (optional) in `registry`:
    /// `up` while the sink takes records, `degraded` while it is unavailable
    /// and the relay is backing off (messages wait in the outbox).
    pub fn health(mut self, registry: &HealthRegistry) -> Self {
        let r = registry.reporter("outbox_relay", Criticality::Optional);
        r.set_up();
        self.health = Some(r);
        self
    }

    /// Reports the health component `outbox_relay`; same as
    /// [`health`](Relay::health).
    #[deprecated(since = "0.2.0", note = "use `Relay::health(&HealthRegistry)`")]
    pub fn with_health(self, health: &HealthRegistry) -> Self {
        self.health(health)
    }

    /// Exports the relay's metrics through `metrics`.
    #[deprecated(
        since = "0.2.0",
        note = "use `Relay::metrics(&MetricsRegistry)`, which registers the outbox's families itself"
    )]
    pub fn with_metrics(mut self, metrics: OutboxMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// Starts the relay on the current tokio runtime.
    pub fn spawn(self) -> RelayHandle {
        let cancel = CancellationToken::new();
        let shared = Arc::new(Shared::default());
        let wake = Arc::new(Notify::new());
        let mut aux = Vec::new();
        if self.config.validate().is_ok() {
            aux.push(tokio::spawn(listen(
                self.outbox.clone(),
                wake.clone(),
                cancel.clone(),
            )));
            aux.push(tokio::spawn(monitor(
                self.outbox.clone(),
                self.config.clone(),
                self.metrics.clone(),
                cancel.clone(),
            )));
        }
        let worker = Worker::new(self, shared.clone(), wake, cancel.clone());
        let main = tokio::spawn(worker.run());
        RelayHandle {
            cancel,
            main,
            aux,
            shared,
        }
    }
}

/// Wakes the worker on NOTIFY. Lost notifications (reconnects) are covered
/// by the worker's polling.
async fn listen(outbox: Outbox, wake: Arc<Notify>, cancel: CancellationToken) {
    let channel = channel_name(outbox.schema());
    let schema = outbox.schema().to_owned();
    loop {
        let attempt = async {
            let mut l = PgListener::connect_with(outbox.pool()).await?;
            l.listen(&channel).await?;
            wake.notify_one();
            loop {
                l.recv().await?;
                wake.notify_one();
            }
            #[allow(unreachable_code)]
            Ok::<(), sqlx::Error>(())
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            r = attempt => if let Err(e) = r {
                tracing::warn!(schema = %schema, error = %e, "outbox listener failed; polling until it reconnects");
            },
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Refreshes the pending gauges and purges retained sent messages.
async fn monitor(
    outbox: Outbox,
    config: RelayConfig,
    metrics: OutboxMetrics,
    cancel: CancellationToken,
) {
    let every = Duration::from_millis(config.stats_interval_ms.max(100));
    loop {
        match outbox.stats().await {
            Ok(s) => metrics.observe_stats(&s),
            Err(e) => {
                tracing::warn!(schema = outbox.schema(), error = %e, "outbox stats query failed")
            }
        }
        if config.retention_secs > 0 {
            if let Err(e) = outbox
                .purge_sent(Duration::from_secs(config.retention_secs), 10_000)
                .await
            {
                tracing::warn!(schema = outbox.schema(), error = %e, "purging sent outbox messages failed");
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// Planner settings of the relay's session: the claim must walk the
/// `(txid, seq)` index and stop at the batch size (see `session_setup`).
const CLAIM_SESSION_SETTINGS: &[&str] = &["SET jit = off", "SET enable_sort = off"];

/// The statements a relay's session starts with. Keepalives and the
/// idle-in-transaction timeout let the server drop a vanished relay's
/// session (and its locks) fast. The claim must walk the (txid, seq) index
/// and stop at the batch size; with a large backlog the planner's row
/// estimates otherwise favour sorting every pending row, so sorting is
/// disabled on this (claim-only) session, and JIT is useless here.
fn session_setup(config: &RelayConfig) -> Vec<String> {
    let idle_in_transaction_ms = config.sink_timeout_ms.saturating_mul(2).max(10_000);
    [
        "SET tcp_keepalives_idle = 5".to_owned(),
        "SET tcp_keepalives_interval = 2".to_owned(),
        "SET tcp_keepalives_count = 3".to_owned(),
        format!("SET idle_in_transaction_session_timeout = {idle_in_transaction_ms}"),
    ]
    .into_iter()
    .chain(CLAIM_SESSION_SETTINGS.iter().map(|s| (*s).to_owned()))
    .collect()
}

impl Relay {
    /// The relay's claim query for `outbox` and the planner settings its
    /// session runs it under, for plan regression tests. Parameters: `$1`
    /// shard count (int4), `$2` owned shards (int4[]), `$3` batch size
    /// (int8), `$4` block keys behind dead letters (bool). Not a stable API.
    #[doc(hidden)]
    pub fn claim_query_for_tests(outbox: &Outbox) -> (String, &'static [&'static str]) {
        (
            RelaySql::new(outbox.quoted_schema(), false).claim,
            CLAIM_SESSION_SETTINGS,
        )
    }
}

/// SQL text for one schema.
struct RelaySql {
    claim: String,
    delivered: String,
    retry: String,
    dead_letter: String,
    settings_get: String,
    settings_put: String,
}

impl RelaySql {
    fn new(q: &str, retain: bool) -> Self {
        Self {
            // Commit order = (txid, seq), restricted to transactions below the
            // snapshot's xmin (finished ones), to the shards we own, to
            // records whose backoff expired, to keys with no earlier
            // record still waiting for a retry, and (with
            // `DeadLetterOrder::BlockKey`, $4) to keys with no earlier
            // record in the dead-letter table.
            claim: format!(
                "SELECT o.id, o.topic, o.key, o.payload, o.headers, o.attempts, o.created_at
                 FROM {q}.outbox o
                 WHERE o.sent_at IS NULL
                   AND o.txid < (SELECT pg_snapshot_xmin(pg_current_snapshot()))
                   AND o.key_hash % $1 = ANY($2)
                   AND o.available_at <= now()
                   AND (o.key IS NULL OR NOT EXISTS (
                        SELECT 1 FROM {q}.outbox p
                        WHERE p.topic = o.topic AND p.key = o.key AND p.sent_at IS NULL
                          AND p.attempts > 0
                          AND (p.txid, p.seq) < (o.txid, o.seq)
                          AND p.available_at > now()))
                   AND (o.key IS NULL OR NOT $4 OR NOT EXISTS (
                        SELECT 1 FROM {q}.dead_letters d
                        WHERE d.topic = o.topic AND d.key = o.key
                          AND (d.txid IS NULL OR (d.txid, d.seq) < (o.txid, o.seq))))
                 ORDER BY o.txid, o.seq
                 LIMIT $3
                 FOR UPDATE OF o"
            ),
            delivered: if retain {
                format!("UPDATE {q}.outbox SET sent_at = clock_timestamp() WHERE id = ANY($1)")
            } else {
                format!("DELETE FROM {q}.outbox WHERE id = ANY($1)")
            },
            retry: format!(
                "UPDATE {q}.outbox o
                 SET attempts = o.attempts + 1,
                     last_error = f.err,
                     available_at = clock_timestamp() + f.delay_ms * interval '1 millisecond',
                     errors = o.errors || jsonb_build_array(jsonb_build_object(
                         'at', clock_timestamp(), 'attempt', o.attempts + 1, 'error', f.err))
                 FROM UNNEST($1::uuid[], $2::text[], $3::int8[]) AS f(id, err, delay_ms)
                 WHERE o.id = f.id"
            ),
            dead_letter: format!(
                "WITH f AS (SELECT * FROM UNNEST($1::uuid[], $2::text[]) AS f(id, err)),
                 moved AS (
                     DELETE FROM {q}.outbox o USING f WHERE o.id = f.id
                     RETURNING o.id, o.topic, o.key, o.key_hash, o.payload, o.headers,
                               o.dedupe_key, o.created_at, o.attempts, o.replays, o.errors,
                               o.txid, o.seq, f.err)
                 INSERT INTO {q}.dead_letters (id, topic, key, key_hash, payload, headers,
                     dedupe_key, created_at, attempts, replays, last_error, errors, txid, seq)
                 SELECT id, topic, key, key_hash, payload, headers, dedupe_key, created_at,
                        attempts + 1, replays, err,
                        errors || jsonb_build_array(jsonb_build_object(
                            'at', clock_timestamp(), 'attempt', attempts + 1, 'error', err)),
                        txid, seq
                 FROM moved"
            ),
            settings_get: format!("SELECT shards FROM {q}.relay_settings"),
            settings_put: format!(
                "INSERT INTO {q}.relay_settings (singleton, shards) VALUES (true, $1)
                 ON CONFLICT (singleton) DO UPDATE SET shards = EXCLUDED.shards, updated_at = now()"
            ),
        }
    }
}

/// The relay's main task. It owns ONE connection: the session-level advisory
/// locks that make it the owner of its shards and every claim transaction
/// live on it, so a relay can only ever claim rows of shards it holds, and
/// losing the connection loses locks and the open transaction together.
struct Worker {
    outbox: Outbox,
    sink: Arc<dyn Sink>,
    config: RelayConfig,
    metrics: OutboxMetrics,
    sql: RelaySql,
    shared: Arc<Shared>,
    wake: Arc<Notify>,
    cancel: CancellationToken,
    conn: Option<PgConnection>,
    owned: BTreeSet<u32>,
    /// `ns|1`: shard locks; `ns|2`: membership locks; `ns|3`: settings/migrations.
    ns: i32,
    next_rebalance: Instant,
    reported_owned: i64,
    unavailable: Unavailable,
    health: Option<HealthReporter>,
}

/// The relay's view of an unavailable sink.
#[derive(Debug, Default)]
struct Unavailable {
    /// Unavailable batches in a row (0: the sink is available).
    streak: u32,
    /// When the current unavailability started.
    since: Option<Instant>,
}

struct Claimed {
    id: Uuid,
    attempts: i32,
    record: OutboxRecord,
}

impl Worker {
    fn new(
        relay: Relay,
        shared: Arc<Shared>,
        wake: Arc<Notify>,
        cancel: CancellationToken,
    ) -> Self {
        let sql = RelaySql::new(
            relay.outbox.quoted_schema(),
            relay.config.retention_secs > 0,
        );
        let ns = lock_namespace(relay.outbox.schema());
        Self {
            outbox: relay.outbox,
            sink: relay.sink,
            config: relay.config,
            metrics: relay.metrics,
            sql,
            shared,
            wake,
            cancel,
            conn: None,
            owned: BTreeSet::new(),
            ns,
            next_rebalance: Instant::now(),
            reported_owned: 0,
            unavailable: Unavailable::default(),
            health: relay.health,
        }
    }

    async fn run(mut self) -> Result<(), OutboxError> {
        self.config.validate()?;
        let schema = self.outbox.schema().to_owned();
        let mut idle_hot = 0u32;
        let mut result = Ok(());
        while !self.cancel.is_cancelled() {
            let step = self.step().boxed().await;
            match step {
                Ok(b) if b.unavailable.is_some() => {
                    let wait = self.sink_unavailable(b.unavailable.unwrap_or_default());
                    let waited = Instant::now();
                    tokio::select! {
                        _ = self.cancel.cancelled() => break,
                        _ = tokio::time::sleep(wait) => {}
                    }
                    self.metrics.sink_wait(waited.elapsed());
                    continue;
                }
                Ok(b) if b.handled > 0 => {
                    // The sink answered for every record (delivered,
                    // retry later or refused): it is reachable again.
                    self.sink_available();
                    idle_hot = 0;
                    continue;
                }
                Ok(_) => {}
                Err(e) if e.is_shard_count_mismatch() => {
                    tracing::error!(schema = %schema, error = %e, "relay stopped");
                    result = Err(e);
                    break;
                }
                Err(e) => {
                    tracing::warn!(schema = %schema, error = %e, "relay connection failed; reconnecting");
                    self.metrics.relay_error();
                    self.drop_connection();
                    tokio::select! {
                        _ = self.cancel.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(self.config.reconnect_backoff_ms)) => {}
                    }
                    continue;
                }
            }
            // Idle. A notification may arrive while an older transaction is
            // still open (its rows are not claimable yet); poll quickly for a
            // short while after a wake-up, then fall back to the slow poll.
            let until_rebalance = self
                .next_rebalance
                .saturating_duration_since(Instant::now());
            let wait = if idle_hot > 0 {
                idle_hot -= 1;
                Duration::from_millis(5)
            } else {
                self.config.poll_interval()
            }
            .min(until_rebalance);
            tokio::select! {
                _ = self.cancel.cancelled() => break,
                _ = self.wake.notified() => idle_hot = 40,
                _ = tokio::time::sleep(wait) => {}
            }
        }
        if let Some(conn) = self.conn.take() {
            let _ = conn.close().await;
        }
        // Closing the session released every shard lock.
        self.owned.clear();
        self.set_owned();
        result
    }

    /// Records an unavailable batch; returns how long to wait before the
    /// next probe.
    fn sink_unavailable(&mut self, error: String) -> Duration {
        let u = &mut self.unavailable;
        u.streak = u.streak.saturating_add(1);
        let since = *u.since.get_or_insert_with(Instant::now);
        let wait = self.config.unavailable_backoff(u.streak);
        if u.streak == 1 {
            tracing::warn!(
                schema = self.outbox.schema(),
                error = %error,
                "sink unavailable; relay backing off (no message loses its place or an attempt)"
            );
            self.metrics.sink_unavailable(true);
        }
        if let Some(h) = &self.health {
            h.set_degraded(format!(
                "sink unavailable for {:.0}s ({} probes): {error}",
                since.elapsed().as_secs_f64(),
                u.streak
            ));
        }
        self.shared.sink_unavailable.store(true, Ordering::Relaxed);
        wait
    }

    /// The sink answered again (a delivery, or a retry or refusal of one
    /// record): leave the backoff.
    fn sink_available(&mut self) {
        let u = &mut self.unavailable;
        if let Some(since) = u.since.take() {
            tracing::info!(
                schema = self.outbox.schema(),
                unavailable_secs = since.elapsed().as_secs_f64(),
                probes = u.streak,
                "sink available again; relay resumes full batches"
            );
            self.metrics.sink_unavailable(false);
        }
        u.streak = 0;
        if let Some(h) = &self.health {
            h.set_up();
        }
        self.shared.sink_unavailable.store(false, Ordering::Relaxed);
    }

    fn drop_connection(&mut self) {
        self.conn = None;
        self.owned.clear();
        self.set_owned();
    }

    fn set_owned(&mut self) {
        if let Ok(mut o) = self.shared.owned.lock() {
            *o = self.owned.iter().copied().collect();
        }
        let now = self.owned.len() as i64;
        self.metrics.shards_delta(now - self.reported_owned);
        self.reported_owned = now;
    }

    /// Connects and rebalances if due, then runs one batch.
    async fn step(&mut self) -> Result<Batch, OutboxError> {
        if self.conn.is_none() {
            self.connect().boxed().await?;
            self.next_rebalance = Instant::now();
        }
        if Instant::now() >= self.next_rebalance {
            self.rebalance().boxed().await?;
            self.next_rebalance = Instant::now() + self.config.rebalance_interval();
        }
        if self.owned.is_empty() {
            return Ok(Batch::default());
        }
        self.batch().boxed().await
    }

    async fn connect(&mut self) -> Result<(), OutboxError> {
        let opts = (*self.outbox.pool().connect_options())
            .clone()
            .application_name(&format!("soma-outbox-relay {}", self.outbox.schema()));
        let mut conn = opts.connect().await?;
        for stmt in session_setup(&self.config) {
            sqlx::query(&stmt).execute(&mut conn).await?;
        }
        // Membership: one session lock per live relay, counted to share shards.
        loop {
            let id: i32 = rand::random_range(1..i32::MAX);
            let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, $2)")
                .bind(self.ns | 2)
                .bind(id)
                .fetch_one(&mut conn)
                .await?;
            if got {
                break;
            }
        }
        self.check_settings(&mut conn).boxed().await?;
        self.conn = Some(conn);
        tracing::info!(schema = self.outbox.schema(), "relay connected");
        Ok(())
    }

    /// Every relay of a schema must agree on the shard count, or two relays
    /// could own the same key.
    async fn check_settings(&self, conn: &mut PgConnection) -> Result<(), OutboxError> {
        let mut tx = conn.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1, 1)")
            .bind(self.ns | 3)
            .execute(&mut *tx)
            .await?;
        let current: Option<i32> = sqlx::query_scalar(&self.sql.settings_get)
            .fetch_optional(&mut *tx)
            .await?;
        let want = self.config.shards as i32;
        match current {
            Some(s) if s == want => {}
            Some(s) => {
                let members = count_members(&mut tx, self.ns).await?;
                if members > 1 {
                    return Err(OutboxError::ShardCountMismatch {
                        configured: self.config.shards,
                        active: s as u32,
                    });
                }
                sqlx::query(&self.sql.settings_put)
                    .bind(want)
                    .execute(&mut *tx)
                    .await?;
                tracing::info!(
                    schema = self.outbox.schema(),
                    from = s,
                    to = want,
                    "relay shard count changed"
                );
            }
            None => {
                sqlx::query(&self.sql.settings_put)
                    .bind(want)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }

    /// Takes or gives up shards so each live relay owns about
    /// `ceil(shards / relays)`.
    async fn rebalance(&mut self) -> Result<(), OutboxError> {
        let ns = self.ns;
        let conn = self.conn.as_mut().expect("connected");
        let members = count_members(conn, ns).await?.max(1) as u32;
        let fair = self.config.shards.div_ceil(members) as usize;
        let mut moves = 0u64;
        while self.owned.len() > fair {
            let shard = *self.owned.iter().next_back().expect("non-empty");
            sqlx::query("SELECT pg_advisory_unlock($1, $2)")
                .bind(ns | 1)
                .bind(shard as i32)
                .execute(&mut *conn)
                .await?;
            self.owned.remove(&shard);
            moves += 1;
        }
        if self.owned.len() < fair {
            let held: Vec<i64> = sqlx::query_scalar(
                "SELECT objid::int8 FROM pg_locks
                 WHERE locktype = 'advisory' AND objsubid = 2 AND granted
                   AND classid = $1::int4::oid
                   AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            )
            .bind(ns | 1)
            .fetch_all(&mut *conn)
            .await?;
            let held: HashSet<u32> = held.into_iter().map(|s| s as u32).collect();
            let start = rand::random_range(0..self.config.shards);
            for i in 0..self.config.shards {
                if self.owned.len() >= fair {
                    break;
                }
                let shard = (start + i) % self.config.shards;
                if held.contains(&shard) {
                    continue;
                }
                let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, $2)")
                    .bind(ns | 1)
                    .bind(shard as i32)
                    .fetch_one(&mut *conn)
                    .await?;
                if got {
                    self.owned.insert(shard);
                    moves += 1;
                }
            }
        }
        self.moved(moves, members);
        Ok(())
    }

    /// Publishes a rebalance that gave up or took over `moves` shards:
    /// counters, metrics, the shared view of the owned shards, and a log
    /// line. Nothing when nothing moved.
    fn moved(&mut self, moves: u64, members: u32) {
        if moves == 0 {
            return;
        }
        self.shared.shard_moves.fetch_add(moves, Ordering::Relaxed);
        self.metrics.shard_moves(moves);
        tracing::info!(
            schema = self.outbox.schema(),
            relays = members,
            owned = ?self.owned,
            "relay shards rebalanced"
        );
        self.set_owned();
    }

    /// Claims, publishes and settles one batch in one transaction. While
    /// the sink is unavailable the batch is a probe of one record: the
    /// oldest claimable one, so nothing else is handed to a sink that
    /// cannot take it.
    async fn batch(&mut self) -> Result<Batch, OutboxError> {
        let started = Instant::now();
        let owned: Vec<i32> = self.owned.iter().map(|s| *s as i32).collect();
        let limit = if self.unavailable.streak > 0 {
            1
        } else {
            self.config.batch_size
        };
        let block_on_dead = self.config.dead_letter_order == DeadLetterOrder::BlockKey;
        let conn = self.conn.as_mut().expect("connected");
        let mut tx = conn.begin().await?;
        let rows: Vec<PgRow> = sqlx::query(&self.sql.claim)
            .bind(self.config.shards as i32)
            .bind(&owned)
            .bind(limit as i64)
            .bind(block_on_dead)
            .fetch_all(&mut *tx)
            .await?;
        if rows.is_empty() {
            tx.commit().await?;
            return Ok(Batch::default());
        }
        let claimed = rows
            .iter()
            .map(parse_row)
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
        let batch: Vec<OutboxRecord> = claimed.iter().map(|c| c.record.clone()).collect();
        let outcomes = publish(&*self.sink, &self.config, self.outbox.schema(), &batch).await;
        let settled = settle(&self.config, &claimed, outcomes, chrono::Utc::now());

        if !settled.delivered.is_empty() {
            sqlx::query(&self.sql.delivered)
                .bind(&settled.delivered)
                .execute(&mut *tx)
                .await?;
        }
        if !settled.retry_ids.is_empty() {
            sqlx::query(&self.sql.retry)
                .bind(&settled.retry_ids)
                .bind(&settled.retry_errs)
                .bind(&settled.retry_delays)
                .execute(&mut *tx)
                .await?;
        }
        if !settled.dead_ids.is_empty() {
            sqlx::query(&self.sql.dead_letter)
                .bind(&settled.dead_ids)
                .bind(&settled.dead_errs)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;

        let s = &self.shared;
        s.published
            .fetch_add(settled.delivered.len() as u64, Ordering::Relaxed);
        s.failed
            .fetch_add(settled.failed_attempts, Ordering::Relaxed);
        s.dead_lettered
            .fetch_add(settled.dead_ids.len() as u64, Ordering::Relaxed);
        s.batches.fetch_add(1, Ordering::Relaxed);
        s.order_violations
            .fetch_add(settled.violations, Ordering::Relaxed);
        self.metrics.observe_batch(
            settled.delivered.len() as u64,
            settled.failed_attempts,
            settled.dead_ids.len() as u64,
            started.elapsed(),
        );
        self.metrics.order_violations(settled.violations);
        log_order_violations(self.outbox.schema(), settled.violations);
        for (id, err) in settled.dead_ids.iter().zip(&settled.dead_errs) {
            tracing::warn!(schema = self.outbox.schema(), message_id = %id, error = %err, "message dead-lettered");
        }
        Ok(Batch {
            handled: claimed.len(),
            unavailable: settled.unavailable,
        })
    }
}

/// Warns about `n` sink contract violations of one batch (log only: the
/// counters and metrics are kept by the caller).
fn log_order_violations(schema: &str, n: u64) {
    if n > 0 {
        tracing::warn!(
            schema,
            count = n,
            "sink delivered records after an undelivered earlier record of the same key"
        );
    }
}

/// What one batch did, for the run loop.
#[derive(Debug, Default)]
struct Batch {
    /// Records claimed.
    handled: usize,
    /// Set when the sink was unavailable for some record: why.
    unavailable: Option<String>,
}

/// The database changes one batch's outcomes call for.
#[derive(Debug, Default)]
struct Settled {
    delivered: Vec<Uuid>,
    retry_ids: Vec<Uuid>,
    retry_errs: Vec<String>,
    retry_delays: Vec<i64>,
    dead_ids: Vec<Uuid>,
    dead_errs: Vec<String>,
    violations: u64,
    failed_attempts: u64,
    unavailable: Option<String>,
}

/// Turns the sink's outcomes for `claimed` into database changes.
///
/// Per key, the first record that is not delivered holds back every later
/// record of its key in the batch: those stay exactly as they are (not an
/// attempt of their own) and wait for it. A later record the sink delivered
/// anyway is a contract violation, counted (it is on the broker, so it is
/// marked delivered). `Unavailable` changes nothing but the relay's backoff,
/// unless the opt-in maximum age has passed.
fn settle(
    config: &RelayConfig,
    claimed: &[Claimed],
    outcomes: Vec<SinkOutcome>,
    now: chrono::DateTime<chrono::Utc>,
) -> Settled {
    let mut out = Settled::default();
    let mut blocked: HashSet<(&str, &str)> = HashSet::new();
    let max_age = (config.dead_letter_after_secs != 0).then(|| {
        chrono::Duration::seconds(config.dead_letter_after_secs.min(i64::MAX as u64) as i64)
    });
    let too_old = |c: &Claimed| max_age.is_some_and(|m| now - c.record.created_at > m);
    let mut outcomes = outcomes.into_iter();
    for c in claimed {
        let outcome = outcomes.next().unwrap_or_else(|| {
            SinkOutcome::retry(format!(
                "sink returned fewer outcomes than the {} records of the batch",
                claimed.len()
            ))
        });
        let group = c
            .record
            .key
            .as_deref()
            .map(|k| (c.record.topic.as_str(), k));
        // True when an earlier record of this key was not delivered.
        let held = group.is_some_and(|g| !blocked.insert(g));
        match outcome {
            SinkOutcome::Delivered => {
                if held {
                    out.violations += 1;
                } else if let Some(g) = group {
                    blocked.remove(&g);
                }
                out.delivered.push(c.id);
            }
            SinkOutcome::Reject { error } => {
                out.dead_ids.push(c.id);
                out.dead_errs.push(truncate(error));
            }
            SinkOutcome::Retry { .. } | SinkOutcome::Unavailable { .. } if held => {}
            SinkOutcome::Unavailable { error } => {
                if too_old(c) {
                    out.dead_ids.push(c.id);
                    out.dead_errs.push(truncate(format!(
                        "older than dead_letter_after_secs ({} s); sink unavailable: {error}",
                        config.dead_letter_after_secs
                    )));
                }
                out.unavailable.get_or_insert(error);
            }
            SinkOutcome::Retry { error } => {
                out.failed_attempts += 1;
                let error = truncate(error);
                let attempts = (c.attempts + 1) as u32;
                if attempts >= config.max_attempts || too_old(c) {
                    out.dead_ids.push(c.id);
                    out.dead_errs.push(error);
                } else {
                    out.retry_ids.push(c.id);
                    out.retry_errs.push(error);
                    out.retry_delays
                        .push(config.backoff(attempts).as_millis() as i64);
                }
            }
        }
    }
    out
}

/// Calls the sink with a timeout, turning a panic into `Retry` and a timeout
/// into `Unavailable` for every record.
async fn publish(
    sink: &dyn Sink,
    config: &RelayConfig,
    schema: &str,
    batch: &[OutboxRecord],
) -> Vec<SinkOutcome> {
    let timeout = Duration::from_millis(config.sink_timeout_ms);
    let call = AssertUnwindSafe(sink.send_batch(batch)).catch_unwind();
    match tokio::time::timeout(timeout, call).await {
        Ok(Ok(outcomes)) => outcomes,
        Ok(Err(_)) => {
            tracing::error!(schema, "sink panicked; retrying the batch");
            vec![SinkOutcome::retry("sink panicked"); batch.len()]
        }
        Err(_) => vec![
            SinkOutcome::unavailable(format!(
                "sink did not answer within {} ms",
                config.sink_timeout_ms
            ));
            batch.len()
        ],
    }
}

async fn count_members(conn: &mut PgConnection, ns: i32) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_locks
         WHERE locktype = 'advisory' AND objsubid = 2 AND granted
           AND classid = $1::int4::oid
           AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .bind(ns | 2)
    .fetch_one(&mut *conn)
    .await
}

fn parse_row(r: &PgRow) -> Result<Claimed, sqlx::Error> {
    let id: Uuid = r.try_get("id")?;
    let attempts: i32 = r.try_get("attempts")?;
    let headers: serde_json::Value = r.try_get("headers")?;
    let headers: BTreeMap<String, String> = serde_json::from_value(headers).unwrap_or_default();
    Ok(Claimed {
        id,
        attempts,
        record: OutboxRecord {
            id,
            topic: r.try_get("topic")?,
            key: r.try_get("key")?,
            payload: r.try_get("payload")?,
            headers,
            attempts,
            created_at: r.try_get("created_at")?,
        },
    })
}

fn truncate(mut s: String) -> String {
    if s.chars().count() > MAX_ERROR_CHARS {
        s = s.chars().take(MAX_ERROR_CHARS).collect();
    }
    s.replace('\0', "")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink's error is stored with at most `MAX_ERROR_CHARS` characters
    /// (characters, not bytes: never cut inside one) and without NULs,
    /// which PostgreSQL's text refuses.
    #[test]
    fn stored_errors_are_bounded_in_characters_and_free_of_nul() {
        let long = "é".repeat(MAX_ERROR_CHARS + 500);
        let cut = truncate(long.clone());
        assert_eq!(cut.chars().count(), MAX_ERROR_CHARS);
        assert!(long.starts_with(&cut));
        assert_eq!(truncate("short".into()), "short");
        assert_eq!(truncate("a\0b".into()), "ab");
    }

    /// A session set up as a relay's has the keepalives, the
    /// idle-in-transaction backstop (twice the sink timeout, at least 10 s)
    /// and the claim's planner settings.
    #[tokio::test]
    async fn a_relay_session_is_set_up_for_fast_failure_and_index_walking_claims() {
        let url = soma_testkit::require_postgres();
        for (sink_timeout_ms, want) in [(30_000, "1min"), (2_000, "10s")] {
            let config = RelayConfig {
                sink_timeout_ms,
                ..RelayConfig::default()
            };
            let mut conn = PgConnection::connect(&url).await.expect("connect");
            for stmt in session_setup(&config) {
                sqlx::query(&stmt).execute(&mut conn).await.unwrap();
            }
            let show = async |conn: &mut PgConnection, name: &str| -> String {
                sqlx::query_scalar(&format!("SHOW {name}"))
                    .fetch_one(conn)
                    .await
                    .unwrap()
            };
            assert_eq!(
                show(&mut conn, "idle_in_transaction_session_timeout").await,
                want
            );
            assert_eq!(show(&mut conn, "tcp_keepalives_idle").await, "5");
            assert_eq!(show(&mut conn, "tcp_keepalives_interval").await, "2");
            assert_eq!(show(&mut conn, "tcp_keepalives_count").await, "3");
            assert_eq!(show(&mut conn, "enable_sort").await, "off");
            assert_eq!(show(&mut conn, "jit").await, "off");
        }
    }
}
