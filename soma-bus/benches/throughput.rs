//! Side-by-side throughput: raw rdkafka vs the durable publisher (Kafka up),
//! the outbox fallback (broker down), and a consumer with a no-op handler.
//!
//! Starts private tansu brokers (so load never disturbs the shared one; the
//! two publish cases get one each, because tansu slows as its SQLite file
//! grows) and needs Postgres on 127.0.0.1:5432. After the criterion groups a
//! paired phase runs the durable publisher and raw rdkafka back to back for
//! `ROUNDS` rounds, alternating which goes first, each sample on a fresh
//! topic, and prints the median of the per-round ratios:
//! `cargo bench -p soma-bus --bench throughput -- --warm-up-time 1 --measurement-time 3`

#![allow(missing_docs)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use soma_bus::{
    BusConfig, BusConsumer, BusProducer, DurablePublisher, Envelope, TopicAdmin, testkit,
};
use soma_outbox::{Outbox, OutboxConfig};
use soma_testkit::{OwnBroker, median};

const BATCH: usize = 1_000;
/// Paired rounds for the durable / raw ratio.
const ROUNDS: usize = 8;
/// Messages per consumer sample: small (64-byte payloads, 2,000 records)
/// because tansu 0.6.0 stalls serving Fetch for multi-MB partitions.
const CONSUME: u64 = 2_000;

fn envs(n: usize) -> Vec<Envelope> {
    let payload = vec![b'x'; 1024];
    (0..n)
        .map(|i| {
            Envelope::builder("bench.event", "tenant-a", format!("key-{}", i % 64))
                .payload(payload.clone())
                .build()
                .unwrap()
        })
        .collect()
}

fn base_config(bootstrap: &str) -> BusConfig {
    let mut c = BusConfig::default();
    c.bootstrap_servers = bootstrap.to_owned();
    c.consumer.group = soma_testkit::unique_name("bench");
    c.consumer.lag_interval_ms = 0;
    c
}

async fn outbox() -> Outbox {
    let url = soma_testkit::require_postgres();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect(&url)
        .await
        .unwrap();
    Outbox::new(
        pool,
        OutboxConfig::new(soma_testkit::unique_name("busbench")),
    )
    .await
    .unwrap()
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let broker = OwnBroker::start();
    let cfg = base_config(&broker.bootstrap());
    // The raw producer gets a broker of its own, equally fresh.
    let raw_broker = OwnBroker::start();
    let raw_cfg = base_config(&raw_broker.bootstrap());
    let topic = soma_testkit::unique_name("bench");
    rt.block_on(ensure_topic(&cfg, &topic));
    let messages = envs(BATCH);

    // Raw rdkafka with the same producer settings, keys, payloads and headers.
    // (`raw_cfg` differs from `cfg` only in the broker and consumer group.)
    let raw = testkit::raw_producer(&raw_cfg);
    let raw_headers = kafka_headers(&messages);
    let (publisher, down) = rt.block_on(publishers(&cfg, &topic, &messages));
    let durable = DurableCase {
        publisher: &publisher,
        cfg: &cfg,
        messages: &messages,
    };
    let raw_case = RawCase {
        raw: &raw,
        cfg: &raw_cfg,
        messages: &messages,
        headers: &raw_headers,
    };

    bench_consume(c, &rt, &cfg, &publisher);
    bench_publish(c, &rt, durable, raw_case, &down, &topic);
    paired(&rt, durable, raw_case);

    rt.block_on(async {
        publisher.shutdown().await;
    });
    drop(broker);
    drop(raw_broker);
}

async fn ensure_topic(cfg: &BusConfig, topic: &str) {
    TopicAdmin::new(cfg)
        .unwrap()
        .ensure_topics(&[topic], false)
        .await
        .unwrap();
}

/// Each envelope's headers as rdkafka headers (what the raw case sends).
fn kafka_headers(messages: &[Envelope]) -> Vec<OwnedHeaders> {
    messages
        .iter()
        .map(|e| {
            let mut h = OwnedHeaders::new();
            for (k, v) in e.header_map() {
                h = h.insert(Header {
                    key: &k,
                    value: Some(v.as_bytes()),
                });
            }
            h
        })
        .collect()
}

/// The durable publisher with Kafka up, and one whose broker is down (its
/// breaker already open, so every publish goes to the outbox).
async fn publishers(
    cfg: &BusConfig,
    topic: &str,
    messages: &[Envelope],
) -> (DurablePublisher, DurablePublisher) {
    let up = DurablePublisher::builder(BusProducer::new(cfg).unwrap(), outbox().await).build();
    // Broker down: nothing listens on this port; the first publish opens the breaker.
    let mut dead = cfg.clone();
    dead.bootstrap_servers = format!("127.0.0.1:{}", soma_testkit::free_port());
    dead.publisher.timeout_ms = 500;
    dead.publisher.breaker = soma_observability::resilience::BreakerConfig::new(1, 3_600_000);
    let down = DurablePublisher::builder(BusProducer::new(&dead).unwrap(), outbox().await).build();
    for r in down.publish_many(topic, &messages[..1]).await {
        assert!(r.unwrap().is_deferred());
    }
    (up, down)
}

/// `consume_noop`: a topic filled once; each sample consumes all of it in a
/// new group, timed from the first handled message (group join excluded).
fn bench_consume(
    c: &mut Criterion,
    rt: &tokio::runtime::Runtime,
    cfg: &BusConfig,
    publisher: &DurablePublisher,
) {
    let ctopic = soma_testkit::unique_name("benchc");
    rt.block_on(async {
        ensure_topic(cfg, &ctopic).await;
        let small: Vec<Envelope> = (0..CONSUME as usize)
            .map(|i| {
                Envelope::builder("bench.event", "tenant-a", format!("key-{}", i % 64))
                    .payload(vec![b'x'; 64])
                    .build()
                    .unwrap()
            })
            .collect();
        for r in publisher.publish_many(&ctopic, &small).await {
            r.unwrap();
        }
    });
    let mut g = c.benchmark_group("consume_noop");
    g.throughput(Throughput::Elements(CONSUME));
    g.sample_size(10);
    g.bench_function(BenchmarkId::new("bus_consumer", CONSUME), |b| {
        b.to_async(rt).iter_custom(|iters| {
            let (cfg, ctopic) = (cfg.clone(), ctopic.clone());
            async move {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    total += consume_all(&cfg, &ctopic).await;
                }
                total
            }
        })
    });
    g.finish();
}

/// One `consume_noop` sample: a new group reads `ctopic` to its end.
async fn consume_all(cfg: &BusConfig, ctopic: &str) -> Duration {
    let count = Arc::new(AtomicU64::new(0));
    let first = Arc::new(parking_lot::Mutex::new(None::<Instant>));
    let (n, f) = (count.clone(), first.clone());
    let mut cfg = cfg.clone();
    cfg.consumer.group = soma_testkit::unique_name("benchg");
    let consumer = BusConsumer::builder(&cfg, &[ctopic], "noop", move |_e: Envelope| {
        let (n, f) = (n.clone(), f.clone());
        async move {
            if n.fetch_add(1, Ordering::Relaxed) == 0 {
                *f.lock() = Some(Instant::now());
            }
            Ok(())
        }
    })
    .spawn()
    .unwrap();
    let give_up = Instant::now() + Duration::from_secs(120);
    while count.load(Ordering::Relaxed) < CONSUME {
        assert!(
            Instant::now() < give_up,
            "consumer stalled at {}",
            count.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let elapsed = first.lock().unwrap().elapsed();
    consumer.shutdown().await;
    elapsed
}

/// `publish_1KiB_keyed`: the durable publisher with Kafka up, raw rdkafka,
/// and the durable publisher with the broker down (to the outbox).
fn bench_publish(
    c: &mut Criterion,
    rt: &tokio::runtime::Runtime,
    durable: DurableCase<'_>,
    raw_case: RawCase<'_>,
    down: &DurablePublisher,
    topic: &str,
) {
    let mut g = c.benchmark_group("publish_1KiB_keyed");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.sample_size(10);
    g.bench_function(BenchmarkId::new("durable_publisher_kafka_up", BATCH), |b| {
        b.to_async(rt).iter_custom(|iters| async move {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                total += durable.sample().await;
            }
            total
        })
    });
    g.bench_function(BenchmarkId::new("raw_rdkafka", BATCH), |b| {
        b.to_async(rt).iter_custom(|iters| async move {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                total += raw_case.sample().await;
            }
            total
        })
    });
    g.bench_function(
        BenchmarkId::new("durable_publisher_broker_down_outbox", BATCH),
        |b| {
            b.to_async(rt).iter(|| async {
                // Fresh ids each time (the outbox rejects a repeated id in one call only; ids stay unique anyway).
                let batch = envs(BATCH);
                for r in down.publish_many(topic, &batch).await {
                    assert!(r.unwrap().is_deferred());
                }
            })
        },
    );
    g.finish();
}

/// The paired phase: load on a shared machine drifts over minutes, so the
/// ratio is taken per round from samples run back to back (order
/// alternated), and its median printed.
fn paired(rt: &tokio::runtime::Runtime, durable: DurableCase<'_>, raw_case: RawCase<'_>) {
    let (mut d_rates, mut r_rates, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    rt.block_on(async {
        for round in 0..ROUNDS {
            let (d, r) = if round % 2 == 0 {
                let d = durable.sample().await;
                (d, raw_case.sample().await)
            } else {
                let r = raw_case.sample().await;
                (durable.sample().await, r)
            };
            let (d, r) = (
                BATCH as f64 / d.as_secs_f64(),
                BATCH as f64 / r.as_secs_f64(),
            );
            d_rates.push(d);
            r_rates.push(r);
            ratios.push(d / r);
        }
    });
    println!(
        "\ndurable publisher (Kafka up) vs raw rdkafka: {BATCH} x 1 KiB keyed messages per sample, \
         {ROUNDS} rounds, order alternated, one broker per case, fresh topic per sample"
    );
    println!(
        "  raw rdkafka FutureProducer      median {:>7.0} msg/s",
        median(&r_rates)
    );
    println!(
        "  DurablePublisher::publish_many  median {:>7.0} msg/s   durable / raw: median {:.2}x (min {:.2}x, max {:.2}x; goal >= 0.85x)",
        median(&d_rates),
        median(&ratios),
        ratios.iter().copied().fold(f64::INFINITY, f64::min),
        ratios.iter().copied().fold(0.0, f64::max),
    );
}

/// The durable publisher (Kafka up) sending `messages` to a fresh topic.
#[derive(Clone, Copy)]
struct DurableCase<'a> {
    publisher: &'a DurablePublisher,
    cfg: &'a BusConfig,
    messages: &'a [Envelope],
}

impl DurableCase<'_> {
    async fn sample(&self) -> Duration {
        let topic = testkit::new_topic(self.cfg, "benchp", false).await;
        let started = Instant::now();
        for r in self.publisher.publish_many(&topic, self.messages).await {
            assert!(!r.unwrap().is_deferred());
        }
        started.elapsed()
    }
}

/// Raw rdkafka sending the same messages (all enqueued, then every delivery
/// report awaited) to a fresh topic on its own broker.
#[derive(Clone, Copy)]
struct RawCase<'a> {
    raw: &'a FutureProducer,
    cfg: &'a BusConfig,
    messages: &'a [Envelope],
    headers: &'a [OwnedHeaders],
}

impl RawCase<'_> {
    async fn sample(&self) -> Duration {
        let topic = testkit::new_topic(self.cfg, "benchp", false).await;
        let started = Instant::now();
        let mut futs = Vec::with_capacity(self.messages.len());
        for (e, h) in self.messages.iter().zip(self.headers) {
            let rec = FutureRecord::to(&topic)
                .key(e.key.as_deref().unwrap())
                .payload(&e.payload)
                .headers(h.clone());
            futs.push(self.raw.send_result(rec).map_err(|(e, _)| e).unwrap());
        }
        for f in futures::future::join_all(futs).await {
            f.unwrap().unwrap();
        }
        started.elapsed()
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
