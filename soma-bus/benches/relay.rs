//! soma-outbox's relay into Kafka (through soma-bus's [`KafkaSink`]) vs a raw
//! rdkafka `FutureProducer` sending the same messages to the same kind of
//! broker, side by side in one criterion run (issue #4's last speed goal:
//! relay >= 0.8x raw).
//!
//! `cargo bench -p soma-bus --bench relay -- --warm-up-time 1 --measurement-time 3`
//!
//! Each sample moves [`N`] keyed 1 KiB messages with envelope headers to a
//! fresh topic:
//! - `relay_kafka_sink_batch<B>`: a relay with `batch_size` B is running and
//!   idle (it holds all 16 shards); the `N` messages are committed to the
//!   outbox in one transaction (untimed) and the sample times from that
//!   commit until the relay reports all `N` published — a drain of `N`
//!   pre-enqueued messages, woken by NOTIFY. B = 500 (soma-outbox's default)
//!   and 2,000.
//! - `raw_rdkafka`: the same topic/key/payload/headers enqueued into a
//!   `FutureProducer` with the same settings (acks=all, idempotence, linger,
//!   batch), then every delivery report awaited.
//!
//! tansu 0.6.0 slows down as its SQLite file grows, which would favour
//! whichever case runs first. Each case therefore gets its own freshly
//! started private tansu (own port, own SQLite file) and a fresh topic per
//! sample; every case sends the same number of messages per sample. After the
//! criterion groups, a paired phase runs every case once per round for
//! [`ROUNDS`] rounds, rotating the order, and prints per-case medians and the
//! per-round relay / raw ratios (robust to load drifting on a shared
//! machine). Needs tansu installed and PostgreSQL on 127.0.0.1:5432.

#![allow(missing_docs)]

use std::time::{Duration, Instant};

use criterion::{
    BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group, criterion_main,
};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use soma_bus::{BusConfig, BusProducer, Envelope, KafkaSink, testkit};
use soma_outbox::{NewMessage, Outbox, OutboxConfig, Relay, RelayConfig, RelayHandle};
use soma_testkit::{OwnBroker, median};

/// Messages per sample.
const N: usize = 5_000;
/// Relay batch sizes measured: soma-outbox's default (500) and a larger one.
const RELAY_BATCH_SIZES: [usize; 2] = [500, 2_000];
const KEYS: usize = 64;

fn messages(topic: &str) -> Vec<NewMessage> {
    let payload = vec![b'x'; 1024];
    (0..N)
        .map(|i| {
            let env = Envelope::builder("bench.event", "tenant-a", format!("key-{}", i % KEYS))
                .payload(payload.clone())
                .build()
                .unwrap();
            NewMessage {
                id: env.id,
                topic: topic.to_owned(),
                key: env.key.clone(),
                payload: env.payload.clone(),
                headers: env.header_map(),
                dedupe_key: None,
            }
        })
        .collect()
}

fn bus_config(bootstrap: &str) -> BusConfig {
    let mut c = BusConfig::default();
    c.bootstrap_servers = bootstrap.to_owned();
    c.consumer.lag_interval_ms = 0;
    c.publisher.timeout_ms = 30_000;
    c
}

/// Timed drain: `N` messages committed to the outbox in one transaction
/// while an idle relay (already holding its shards) waits; timed from the
/// commit until the relay reports all `N` published.
async fn relay_sample(ob: &Outbox, cfg: &BusConfig, relay: &RelayHandle) -> Duration {
    let topic = testkit::new_topic(cfg, "relaybench", false).await;
    let msgs = messages(&topic);
    let before = relay.counters();
    ob.enqueue_standalone(&msgs).await.unwrap();
    let start = Instant::now();
    let give_up = start + Duration::from_secs(300);
    while relay.counters().published < before.published + N as u64 {
        assert!(
            Instant::now() < give_up,
            "relay stalled: {:?}",
            relay.counters()
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let took = start.elapsed();
    let after = relay.counters();
    assert_eq!(after.published, before.published + N as u64);
    assert_eq!(after.failed, before.failed, "relay retried: {after:?}");
    assert_eq!(ob.stats().await.unwrap().pending, 0);
    took
}

/// Timed raw send of the same `N` messages: enqueued `chunk` at a time,
/// each chunk's delivery reports awaited before the next (`chunk` = `N`: all
/// enqueued at once, then every report awaited).
async fn raw_sample(raw: &FutureProducer, cfg: &BusConfig, chunk: usize) -> Duration {
    let topic = testkit::new_topic(cfg, "relaybench", false).await;
    let msgs = messages(&topic);
    let headers: Vec<OwnedHeaders> = msgs
        .iter()
        .map(|m| {
            let mut h = OwnedHeaders::new_with_capacity(m.headers.len());
            for (k, v) in &m.headers {
                h = h.insert(Header {
                    key: k.as_str(),
                    value: Some(v.as_bytes()),
                });
            }
            h
        })
        .collect();
    let start = Instant::now();
    let mut headers = headers.into_iter();
    for part in msgs.chunks(chunk) {
        let mut futs = Vec::with_capacity(part.len());
        for m in part {
            let rec = FutureRecord::to(&topic)
                .key(m.key.as_deref().unwrap())
                .payload(&m.payload)
                .headers(headers.next().unwrap());
            futs.push(raw.send_result(rec).map_err(|(e, _)| e).unwrap());
        }
        for f in futures::future::join_all(futs).await {
            f.unwrap().unwrap();
        }
    }
    start.elapsed()
}

/// One relay case: its own broker, producer, outbox schema and running relay.
struct RelayCase {
    name: String,
    broker: OwnBroker,
    cfg: BusConfig,
    producer: BusProducer,
    ob: Outbox,
    relay: RelayHandle,
}

/// The raw case: its own broker and a `FutureProducer` with soma-bus's settings.
struct RawCase {
    broker: OwnBroker,
    cfg: BusConfig,
    raw: FutureProducer,
}

async fn relay_case(batch_size: usize) -> RelayCase {
    let broker = OwnBroker::start();
    let cfg = bus_config(&broker.bootstrap());
    let producer = BusProducer::new(&cfg).unwrap();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect(&soma_testkit::require_postgres())
        .await
        .unwrap();
    let ob = Outbox::new(
        pool,
        OutboxConfig::new(soma_testkit::unique_name("relaybench")),
    )
    .await
    .unwrap();
    let mut relay_cfg = RelayConfig::default();
    relay_cfg.batch_size = batch_size;
    relay_cfg.poll_interval_ms = 50;
    relay_cfg.stats_interval_ms = 60_000;
    let shards = relay_cfg.shards as usize;
    let relay = Relay::new(ob.clone(), KafkaSink::new(producer.clone()), relay_cfg).spawn();
    let end = Instant::now() + Duration::from_secs(30);
    while relay.owned_shards().len() < shards {
        assert!(Instant::now() < end, "relay did not take its shards");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    RelayCase {
        name: format!("relay_kafka_sink_batch{batch_size}"),
        broker,
        cfg,
        producer,
        ob,
        relay,
    }
}

fn raw_case() -> RawCase {
    let broker = OwnBroker::start();
    let cfg = bus_config(&broker.bootstrap());
    let raw = testkit::raw_producer(&cfg);
    RawCase { broker, cfg, raw }
}

/// Raw cases: all `N` enqueued at once (the baseline of the goal), and in
/// chunks of 500 awaited one after the other (the relay's default batch flow
/// without PostgreSQL, to separate the broker's share from the relay's).
const RAW_CASES: [(&str, usize); 2] = [
    ("raw_rdkafka_future_producer", N),
    ("raw_rdkafka_chunks_of_500", 500),
];

/// Rounds of the paired phase: every case once per round, order rotated.
const ROUNDS: usize = 8;

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // Every case on its own fresh broker, all started up front.
    let raw = raw_case();
    let relays: Vec<RelayCase> = rt.block_on(async {
        let mut v = Vec::new();
        for b in RELAY_BATCH_SIZES {
            v.push(relay_case(b).await);
        }
        v
    });
    bench_cases(c, &rt, &raw, &relays);
    let rates = paired(&rt, &raw, &relays);
    print_paired(&rates, &relays);
    rt.block_on(teardown(relays));
    drop(raw.raw);
    drop(raw.broker);
}

/// The criterion group: every raw case, then every relay case.
fn bench_cases(
    c: &mut Criterion,
    rt: &tokio::runtime::Runtime,
    raw: &RawCase,
    relays: &[RelayCase],
) {
    let mut g = c.benchmark_group("relay_vs_raw_1KiB_keyed");
    g.throughput(Throughput::Elements(N as u64));
    g.sample_size(10);
    g.sampling_mode(SamplingMode::Flat);
    for (name, chunk) in RAW_CASES {
        g.bench_function(BenchmarkId::new(name, N), |b| {
            b.to_async(rt).iter_custom(|iters| async move {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    total += raw_sample(&raw.raw, &raw.cfg, chunk).await;
                }
                total
            })
        });
    }
    for case in relays {
        g.bench_function(BenchmarkId::new(&case.name, N), |b| {
            b.to_async(rt).iter_custom(|iters| async move {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    total += relay_sample(&case.ob, &case.cfg, &case.relay).await;
                }
                total
            })
        });
    }
    g.finish();
}

/// The paired phase: load on a shared machine drifts over minutes, so the
/// ratio is taken per round, from samples run back to back (order rotated
/// each round). Returns the rates (msg/s) of each case: the raw cases
/// first, then the relays.
fn paired(rt: &tokio::runtime::Runtime, raw: &RawCase, relays: &[RelayCase]) -> Vec<Vec<f64>> {
    let raws = RAW_CASES.len();
    let cases = raws + relays.len();
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); cases];
    rt.block_on(async {
        for round in 0..ROUNDS {
            for k in 0..cases {
                let i = (round + k) % cases;
                let took = if i < raws {
                    raw_sample(&raw.raw, &raw.cfg, RAW_CASES[i].1).await
                } else {
                    let r = &relays[i - raws];
                    relay_sample(&r.ob, &r.cfg, &r.relay).await
                };
                rates[i].push(N as f64 / took.as_secs_f64());
            }
        }
    });
    rates
}

/// Medians of the paired rates and each relay's per-round ratios to the
/// raw cases.
fn print_paired(rates: &[Vec<f64>], relays: &[RelayCase]) {
    let raws = RAW_CASES.len();
    println!();
    println!(
        "relay into Kafka vs raw rdkafka: {N} x 1 KiB keyed messages per sample, {ROUNDS} rounds, order rotated each round"
    );
    for (i, (name, _)) in RAW_CASES.iter().enumerate() {
        println!("  {name:<36} median {:>7.0} msg/s", median(&rates[i]));
    }
    for (i, case) in relays.iter().enumerate() {
        let own = &rates[raws + i];
        let ratio = |base: &[f64]| -> (f64, f64, f64) {
            let r: Vec<f64> = own.iter().zip(base).map(|(a, b)| a / b).collect();
            (
                median(&r),
                r.iter().copied().fold(f64::INFINITY, f64::min),
                r.iter().copied().fold(0.0, f64::max),
            )
        };
        let (m, lo, hi) = ratio(&rates[0]);
        let (mc, _, _) = ratio(&rates[1]);
        println!(
            "  {:<36} median {:>7.0} msg/s   relay / raw: median {m:.2}x (min {lo:.2}x, max {hi:.2}x; goal >= 0.8x)   relay / raw in chunks of 500: {mc:.2}x",
            case.name,
            median(own),
        );
    }
}

/// Stops every relay, flushes its producer and drops its outbox schema.
async fn teardown(relays: Vec<RelayCase>) {
    for case in relays {
        case.relay.shutdown().await.unwrap();
        case.producer.flush(Duration::from_secs(10)).await;
        let _ = sqlx::query(&format!("DROP SCHEMA \"{}\" CASCADE", case.ob.schema()))
            .execute(case.ob.pool())
            .await;
        drop(case.broker);
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
