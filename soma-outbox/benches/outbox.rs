//! soma-outbox benchmarks against the real PostgreSQL on 127.0.0.1:5432.
//!
//! `cargo bench -p soma-outbox --bench outbox -- --warm-up-time 1 --measurement-time 3`
//!
//! 1. criterion: batched enqueue of 1,000 rows with `UNNEST` arrays (the crate's
//!    path) vs the same rows as one multi-row `VALUES` insert, same table, same
//!    run, and the server-side floor (`INSERT ... SELECT` from rows already on
//!    the server), which bounds what any way of sending the rows can gain.
//! 2. a timed drain of 50,000 messages through a relay into a sink that does no I/O.
//! 3. commit-to-publish latency at a steady 1,000 msg/s (p50/p99/max).
//!
//! Figures and ratios are printed at the end.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use soma_outbox::{
    NewMessage, Outbox, OutboxConfig, OutboxRecord, Relay, RelayConfig, Sink, SinkOutcome,
};
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgPool, QueryBuilder};
use uuid::Uuid;

const BATCH: usize = 1_000;

fn batch(n: usize) -> Vec<NewMessage> {
    (0..n)
        .map(|i| {
            NewMessage::new("bench.events", vec![b'x'; 200])
                .with_key(format!("key-{}", i % 100))
                .with_header("content-type", "application/json")
        })
        .collect()
}

async fn enqueue_values(pool: &PgPool, schema: &str, msgs: &[NewMessage]) {
    enqueue_values_with(pool, schema, msgs, true).await
}

/// `persistent = false`: the statement is parsed and planned on every call,
/// as happens when batch sizes vary (each size is a different statement
/// text, and a 7,000-parameter statement is not worth caching per size).
async fn enqueue_values_with(pool: &PgPool, schema: &str, msgs: &[NewMessage], persistent: bool) {
    let mut qb = QueryBuilder::new(format!(
        "INSERT INTO \"{schema}\".outbox (id, topic, key, key_hash, payload, headers, dedupe_key) "
    ));
    qb.push_values(msgs, |mut b, m| {
        b.push_bind(m.id)
            .push_bind(&m.topic)
            .push_bind(&m.key)
            .push_bind(7_i32)
            .push_bind(&m.payload)
            .push_bind(serde_json::to_value(&m.headers).unwrap())
            .push_bind(&m.dedupe_key);
    });
    qb.push(" ON CONFLICT (dedupe_key) WHERE dedupe_key IS NOT NULL DO NOTHING RETURNING id");
    let mut tx = pool.begin().await.unwrap();
    let ids: Vec<Uuid> = qb
        .build_query_scalar()
        .persistent(persistent)
        .fetch_all(&mut *tx)
        .await
        .unwrap();
    assert_eq!(ids.len(), msgs.len());
    tx.commit().await.unwrap();
}

/// The server's share alone: the same rows inserted by `INSERT ... SELECT`
/// from a table already on the server (same columns, same table, same
/// indexes, same ON CONFLICT and RETURNING, one transaction), so nothing is
/// sent or decoded per row. No way of sending the rows can be faster than
/// this, which bounds any method's speed-up over `VALUES`.
async fn enqueue_server_floor(pool: &PgPool, schema: &str) {
    let mut tx = pool.begin().await.unwrap();
    let ids: Vec<Uuid> = sqlx::query_scalar(&format!(
        "INSERT INTO \"{schema}\".outbox (id, topic, key, key_hash, payload, headers, dedupe_key)
         SELECT ('01900000-0000-7000-8000-' ||
                 lpad(to_hex(nextval('\"{schema}\".floor_ids')), 12, '0'))::uuid,
                topic, key, key_hash, payload, headers, dedupe_key
         FROM \"{schema}\".floor_rows ORDER BY ord
         ON CONFLICT (dedupe_key) WHERE dedupe_key IS NOT NULL DO NOTHING RETURNING id"
    ))
    .fetch_all(&mut *tx)
    .await
    .unwrap();
    assert_eq!(ids.len(), BATCH);
    tx.commit().await.unwrap();
}

/// Fills the staging table `enqueue_server_floor` copies from with `BATCH`
/// rows like `batch()`'s. Its ids come from a sequence, ascending like the
/// UUIDv7 ids `NewMessage` makes (random ones would cost the primary key
/// index more).
async fn create_floor_rows(pool: &PgPool, schema: &str) {
    sqlx::query(&format!("CREATE SEQUENCE \"{schema}\".floor_ids"))
        .execute(pool)
        .await
        .unwrap();
    sqlx::query(&format!(
        "CREATE TABLE \"{schema}\".floor_rows AS
         SELECT i AS ord, 'bench.events'::text AS topic, 'key-' || (i % 100) AS key,
                7 AS key_hash, convert_to(repeat('x', 200), 'UTF8') AS payload,
                '{{\"content-type\": \"application/json\"}}'::jsonb AS headers,
                NULL::text AS dedupe_key
         FROM generate_series(0, {}) AS i",
        BATCH - 1
    ))
    .execute(pool)
    .await
    .unwrap();
}

/// Empties the outbox table, so each measurement starts from the same size.
async fn truncate(pool: &PgPool, schema: &str) {
    sqlx::query(&format!("TRUNCATE \"{schema}\".outbox"))
        .execute(pool)
        .await
        .unwrap();
}

async fn setup(rt_pool: &PgPool, name: &str) -> Outbox {
    let schema = soma_testkit::unique_name(name);
    Outbox::new(rt_pool.clone(), OutboxConfig::new(schema))
        .await
        .unwrap()
}

async fn drop_schema(pool: &PgPool, outbox: &Outbox) {
    sqlx::query(&format!("DROP SCHEMA \"{}\" CASCADE", outbox.schema()))
        .execute(pool)
        .await
        .unwrap();
}

async fn timed_rows_per_sec(f: impl AsyncFn() -> (), rounds: usize) -> f64 {
    let start = Instant::now();
    for _ in 0..rounds {
        f().await;
    }
    (rounds * BATCH) as f64 / start.elapsed().as_secs_f64()
}

/// A sink that does no I/O.
struct NullSink(Arc<std::sync::atomic::AtomicU64>);

#[async_trait::async_trait]
impl Sink for NullSink {
    async fn send_batch(&self, batch: &[OutboxRecord]) -> Vec<SinkOutcome> {
        self.0
            .fetch_add(batch.len() as u64, std::sync::atomic::Ordering::Relaxed);
        vec![SinkOutcome::Delivered; batch.len()]
    }
}

/// Records when each id was published.
struct StampSink(Arc<Mutex<HashMap<Uuid, Instant>>>);

#[async_trait::async_trait]
impl Sink for StampSink {
    async fn send_batch(&self, batch: &[OutboxRecord]) -> Vec<SinkOutcome> {
        let now = Instant::now();
        let mut m = self.0.lock().unwrap();
        for r in batch {
            m.insert(r.id, now);
        }
        vec![SinkOutcome::Delivered; batch.len()]
    }
}

/// Stage 1, enqueue: UNNEST vs multi-row VALUES (criterion, then interleaved
/// timed runs); rows per second of UNNEST, VALUES and the server-side floor.
fn enqueue(c: &mut Criterion, rt: &tokio::runtime::Runtime, pool: &PgPool) -> (f64, f64, f64) {
    let ob = rt.block_on(setup(pool, "bench_enq"));
    rt.block_on(create_floor_rows(pool, ob.schema()));
    {
        let mut g = c.benchmark_group("enqueue_1000_rows");
        g.throughput(Throughput::Elements(BATCH as u64));
        rt.block_on(truncate(pool, ob.schema()));
        g.bench_function("unnest", |b| {
            b.to_async(rt).iter(|| async {
                ob.enqueue_standalone(&batch(BATCH)).await.unwrap();
            })
        });
        rt.block_on(truncate(pool, ob.schema()));
        g.bench_function("multi_row_values", |b| {
            b.to_async(rt).iter(|| async {
                enqueue_values(pool, ob.schema(), &batch(BATCH)).await;
            })
        });
        rt.block_on(truncate(pool, ob.schema()));
        g.bench_function("multi_row_values_unprepared", |b| {
            b.to_async(rt).iter(|| async {
                enqueue_values_with(pool, ob.schema(), &batch(BATCH), false).await;
            })
        });
        rt.block_on(truncate(pool, ob.schema()));
        g.bench_function("server_floor_insert_select", |b| {
            b.to_async(rt)
                .iter(|| async { enqueue_server_floor(pool, ob.schema()).await })
        });
        g.finish();
    }
    let (unnest, values, floor) = rt.block_on(async {
        // Interleave the three to share the machine's noise fairly, each
        // segment starting from an empty table.
        let (mut u, mut v, mut f) = (0.0, 0.0, 0.0);
        for _ in 0..3 {
            truncate(pool, ob.schema()).await;
            u += timed_rows_per_sec(
                async || {
                    ob.enqueue_standalone(&batch(BATCH)).await.unwrap();
                },
                10,
            )
            .await;
            truncate(pool, ob.schema()).await;
            v += timed_rows_per_sec(
                async || enqueue_values(pool, ob.schema(), &batch(BATCH)).await,
                10,
            )
            .await;
            truncate(pool, ob.schema()).await;
            f += timed_rows_per_sec(async || enqueue_server_floor(pool, ob.schema()).await, 10)
                .await;
        }
        (u / 3.0, v / 3.0, f / 3.0)
    });
    rt.block_on(drop_schema(pool, &ob));
    (unnest, values, floor)
}

/// Stage 2, relay drain into a no-I/O sink: messages per second over 50,000.
async fn drain_rate(pool: &PgPool) -> f64 {
    let ob = setup(pool, "bench_drain").await;
    let total = 50_000usize;
    for _ in 0..total / 5_000 {
        ob.enqueue_standalone(&batch(5_000)).await.unwrap();
    }
    let seen = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut cfg = RelayConfig::default();
    cfg.batch_size = 2_000;
    cfg.shards = 16;
    let start = Instant::now();
    let relay = Relay::new(ob.clone(), NullSink(seen.clone()), cfg).spawn();
    loop {
        if seen.load(std::sync::atomic::Ordering::Relaxed) >= total as u64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let rate = total as f64 / start.elapsed().as_secs_f64();
    relay.shutdown().await.unwrap();
    assert_eq!(ob.stats().await.unwrap().pending, 0);
    drop_schema(pool, &ob).await;
    rate
}

/// Stage 3, commit-to-publish latency at a steady 1,000 msg/s (4 producers
/// x 250 tx/s, 1 msg per tx): p50, p99 and max in ms, and the message count.
async fn commit_to_publish_latency(pool: &PgPool) -> (f64, f64, f64, usize) {
    let ob = setup(pool, "bench_lat").await;
    let stamps = Arc::new(Mutex::new(HashMap::new()));
    let mut cfg = RelayConfig::default();
    cfg.batch_size = 500;
    let relay = Relay::new(ob.clone(), StampSink(stamps.clone()), cfg).spawn();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let secs = 5u64;
    let producers = (0..4).map(|p| {
        let ob = ob.clone();
        tokio::spawn(async move {
            let mut commits = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_millis(4));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            for i in 0..(secs * 250) {
                tick.tick().await;
                let m = NewMessage::new("bench.lat", vec![b'x'; 200])
                    .with_key(format!("p{p}-{}", i % 10));
                ob.enqueue_standalone(std::slice::from_ref(&m))
                    .await
                    .unwrap();
                commits.push((m.id, Instant::now()));
            }
            commits
        })
    });
    let mut commits = Vec::new();
    for p in futures::future::join_all(producers).await {
        commits.extend(p.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    relay.shutdown().await.unwrap();
    let stamps = stamps.lock().unwrap().clone();
    let mut lat: Vec<f64> = commits
        .iter()
        .map(|(id, at)| stamps[id].saturating_duration_since(*at).as_secs_f64() * 1000.0)
        .collect();
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let q = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    let r = (q(0.5), q(0.99), *lat.last().unwrap(), lat.len());
    drop_schema(pool, &ob).await;
    r
}

fn main() {
    let url = soma_testkit::require_postgres();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let pool = rt.block_on(async {
        PgPoolOptions::new()
            .max_connections(8)
            .connect(&url)
            .await
            .unwrap()
    });
    let mut c = Criterion::default().configure_from_args();

    let (unnest, values, floor) = enqueue(&mut c, &rt, &pool);
    let drain = rt.block_on(drain_rate(&pool));
    let (p50, p99, max, n) = rt.block_on(commit_to_publish_latency(&pool));

    c.final_summary();
    println!();
    println!("soma-outbox figures");
    println!("  enqueue UNNEST           {unnest:>10.0} rows/s   (goal >= 30,000)");
    println!("  enqueue multi-row VALUES {values:>10.0} rows/s");
    println!(
        "  UNNEST / VALUES          {:>10.2}x         (goal >= 2x)",
        unnest / values
    );
    println!("  server-side floor        {floor:>10.0} rows/s   (INSERT ... SELECT, nothing sent)");
    println!(
        "  floor / VALUES           {:>10.2}x         (the most any way of sending rows can gain)",
        floor / values
    );
    println!("  relay drain, no-I/O sink {drain:>10.0} msg/s    (goal >= 20,000)");
    println!(
        "  commit-to-publish at 1,000 msg/s over {n} msgs: p50 {p50:.1} ms, p99 {p99:.1} ms (goal <= 50 ms), max {max:.1} ms"
    );
}
