//! Side-by-side throughput: raw rdkafka vs the durable publisher (Kafka up),
//! the outbox fallback (broker down), and a consumer with a no-op handler.
//!
//! Starts a private tansu broker (so load never disturbs the shared one) and
//! needs Postgres on 127.0.0.1:5432:
//! `cargo bench -p soma-bus --bench throughput -- --warm-up-time 1 --measurement-time 3`

#![allow(missing_docs)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use soma_bus::{BusConfig, BusConsumer, BusProducer, DurablePublisher, Envelope, TopicAdmin};
use soma_outbox::{Outbox, OutboxConfig};

const BATCH: usize = 1_000;
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
    BusConfig {
        bootstrap_servers: bootstrap.to_owned(),
        consumer_group: soma_testkit::unique_name("bench"),
        lag_interval_ms: 0,
        ..BusConfig::default()
    }
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
        OutboxConfig {
            schema: soma_testkit::unique_name("busbench"),
            ..Default::default()
        },
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
    let broker = common::OwnBroker::start();
    let bootstrap = broker.bootstrap();
    let cfg = base_config(&bootstrap);
    // The durable publisher runs before raw rdkafka (tansu's single SQLite
    // file slows as it grows, which favours whichever runs first; this order
    // was measured both ways, see the README).
    // Separate, equally fresh topics: tansu slows down as a partition grows,
    // so sharing one topic would favour whichever ran first.
    let topic = soma_testkit::unique_name("bench");
    let dtopic = soma_testkit::unique_name("benchd");
    rt.block_on(async {
        TopicAdmin::new(&cfg)
            .unwrap()
            .ensure_topics(&[&topic, &dtopic], false)
            .await
            .unwrap()
    });
    let messages = envs(BATCH);

    // Raw rdkafka with the same producer settings, keys, payloads and headers.
    let raw: FutureProducer = {
        let mut cc = rdkafka::ClientConfig::new();
        cc.set("bootstrap.servers", &bootstrap)
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("linger.ms", cfg.linger_ms.to_string())
            .set("batch.size", cfg.batch_size_bytes.to_string())
            .set("batch.num.messages", cfg.batch_num_messages.to_string())
            .set(
                "max.in.flight.requests.per.connection",
                cfg.max_in_flight.to_string(),
            );
        cc.create().unwrap()
    };
    let raw_headers: Vec<OwnedHeaders> = messages
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
        .collect();
    let (publisher, down) = rt.block_on(async {
        let up = DurablePublisher::builder(BusProducer::new(&cfg).unwrap(), outbox().await).build();
        // Broker down: nothing listens on this port; the first publish opens the breaker.
        let dead = BusConfig {
            bootstrap_servers: format!("127.0.0.1:{}", soma_testkit::free_port()),
            publish_timeout_ms: 500,
            breaker_reset_timeout_ms: 3_600_000,
            ..cfg.clone()
        };
        let down =
            DurablePublisher::builder(BusProducer::new(&dead).unwrap(), outbox().await).build();
        for r in down.publish_many(&topic, &messages[..1]).await {
            assert!(r.unwrap().is_deferred());
        }
        (up, down)
    });

    // Consumer: fill a topic once, then each sample consumes all of it in a new group.
    let ctopic = soma_testkit::unique_name("benchc");
    rt.block_on(async {
        TopicAdmin::new(&cfg)
            .unwrap()
            .ensure_topics(&[&ctopic], false)
            .await
            .unwrap();
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
        b.to_async(&rt).iter_custom(|iters| {
            let cfg = cfg.clone();
            let ctopic = ctopic.clone();
            async move {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let count = Arc::new(AtomicU64::new(0));
                    let first = Arc::new(parking_lot::Mutex::new(None::<Instant>));
                    let (n, f) = (count.clone(), first.clone());
                    let cfg = BusConfig {
                        consumer_group: soma_testkit::unique_name("benchg"),
                        ..cfg.clone()
                    };
                    let consumer =
                        BusConsumer::builder(&cfg, &[&ctopic], "noop", move |_e: Envelope| {
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
                    // Measured from the first handled message (group join excluded).
                    total += first.lock().unwrap().elapsed();
                    consumer.shutdown().await;
                }
                total
            }
        })
    });
    g.finish();
    let mut g = c.benchmark_group("publish_1KiB_keyed");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.sample_size(10);
    g.bench_function(BenchmarkId::new("durable_publisher_kafka_up", BATCH), |b| {
        b.to_async(&rt).iter(|| async {
            for r in publisher.publish_many(&dtopic, &messages).await {
                assert!(!r.unwrap().is_deferred());
            }
        })
    });
    g.bench_function(BenchmarkId::new("raw_rdkafka", BATCH), |b| {
        b.to_async(&rt).iter(|| async {
            let mut futs = Vec::with_capacity(BATCH);
            for (e, h) in messages.iter().zip(&raw_headers) {
                let rec = FutureRecord::to(&topic)
                    .key(e.key.as_deref().unwrap())
                    .payload(&e.payload)
                    .headers(h.clone());
                futs.push(raw.send_result(rec).map_err(|(e, _)| e).unwrap());
            }
            for f in futures::future::join_all(futs).await {
                f.unwrap().unwrap();
            }
        })
    });
    g.bench_function(
        BenchmarkId::new("durable_publisher_broker_down_outbox", BATCH),
        |b| {
            b.to_async(&rt).iter(|| async {
                // Fresh ids each time (the outbox rejects a repeated id in one call only; ids stay unique anyway).
                let batch = envs(BATCH);
                for r in down.publish_many(&topic, &batch).await {
                    assert!(r.unwrap().is_deferred());
                }
            })
        },
    );
    g.finish();

    rt.block_on(async {
        publisher.shutdown().await;
    });
    drop(broker);
}

criterion_group!(benches, bench);
criterion_main!(benches);
