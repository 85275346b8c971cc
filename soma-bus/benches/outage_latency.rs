//! Publish latency during a broker outage: the shared circuit breaker on
//! (the default) versus off (`bus.publisher.breaker.enabled = false`), in one run.
//!
//! `cargo bench -p soma-bus --bench outage_latency`
//!
//! The broker is a **black hole**: a loopback listener that accepts every
//! connection and never answers, the realistic outage (a partitioned or
//! hung broker: connections hang rather than refuse). [`PUBLISHERS`]
//! concurrent publishers each publish [`ROUNDS`] messages (each under a key
//! of its own) in sequence on one
//! `DurablePublisher` (real PostgreSQL outbox, fresh schema per mode). Every
//! publish must come back deferred, and the outbox must hold exactly
//! `PUBLISHERS * ROUNDS` pending messages afterwards (asserted).
//!
//! Breaker on: the first wave (admitted while the breaker is still closed)
//! waits the publish timeout; then publishes go to the outbox at once, and
//! every `open_ms` one probe waits again. Breaker off: every publish waits
//! the timeout. Prints p50 / p99 / mean per mode and the off / on ratios.
//! Bounded: about `ROUNDS * PUBLISH_TIMEOUT_MS` for the breaker-off mode
//! plus a few seconds (≈ 15 s). Needs PostgreSQL on 127.0.0.1:5432.

#![allow(missing_docs)]

use std::time::{Duration, Instant};

use soma_bus::{BusConfig, BusProducer, DurablePublisher, testkit};
use soma_observability::resilience::BreakerConfig;

/// Concurrent publishers.
const PUBLISHERS: usize = 50;
/// Publishes per publisher, one after another.
const ROUNDS: usize = 10;
/// How long a publish waits for the broker before deferring to the outbox.
const PUBLISH_TIMEOUT_MS: u64 = 1_000;

/// A listener that accepts connections and holds them open without ever
/// reading or answering.
async fn black_hole() -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().unwrap().to_string();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    (addr, task)
}

struct Figures {
    p50: Duration,
    p99: Duration,
    mean: Duration,
    wall: Duration,
}

async fn run(breaker: BreakerConfig) -> Figures {
    let (bootstrap, hole) = black_hole().await;
    let mut cfg = testkit::config(&bootstrap);
    cfg.publisher.timeout_ms = PUBLISH_TIMEOUT_MS;
    cfg.publisher.breaker = breaker;
    let outbox = testkit::outbox(&soma_testkit::require_postgres()).await;
    let publisher =
        DurablePublisher::builder(BusProducer::new(&cfg).unwrap(), outbox.clone()).build();
    let topic = soma_testkit::unique_name("outage.latency");
    let started = Instant::now();
    let tasks = (0..PUBLISHERS).map(|p| {
        let publisher = publisher.clone();
        let topic = topic.clone();
        tokio::spawn(async move {
            let mut took = Vec::with_capacity(ROUNDS);
            for r in 0..ROUNDS {
                // A fresh key per publish: a key that already has a message
                // waiting in the outbox goes there directly (per-key order),
                // which would hide what the breaker does.
                let env = testkit::envelope(&format!("key-{p}-{r}"), r as u32);
                let t = Instant::now();
                let out = publisher
                    .publish(&topic, &env)
                    .await
                    .expect("publish must end in Kafka or the outbox");
                took.push(t.elapsed());
                assert!(out.is_deferred(), "the broker is a black hole: {out:?}");
            }
            took
        })
    });
    let mut all: Vec<Duration> = Vec::with_capacity(PUBLISHERS * ROUNDS);
    for t in futures::future::join_all(tasks).await {
        all.extend(t.expect("publisher task"));
    }
    let wall = started.elapsed();
    let pending = outbox.stats().await.expect("outbox stats").pending;
    assert_eq!(
        pending,
        (PUBLISHERS * ROUNDS) as u64,
        "everything published lands in the outbox"
    );
    hole.abort();
    all.sort();
    let at = |q: f64| all[((all.len() as f64 * q).ceil() as usize).clamp(1, all.len()) - 1];
    Figures {
        p50: at(0.50),
        p99: at(0.99),
        mean: all.iter().sum::<Duration>() / all.len() as u32,
        wall,
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let on = run(BusConfig::default().publisher.breaker).await;
        let off = run(BreakerConfig::disabled()).await;
        println!(
            "outage_latency: {PUBLISHERS} publishers x {ROUNDS} publishes, black-holed broker, publish_timeout_ms {PUBLISH_TIMEOUT_MS}"
        );
        for (name, f) in [("breaker on (default)", &on), ("breaker off", &off)] {
            println!(
                "  {name:<21} p50 {:>8.2} ms  p99 {:>8.2} ms  mean {:>8.2} ms  wall {:>6.2} s",
                ms(f.p50),
                ms(f.p99),
                ms(f.mean),
                f.wall.as_secs_f64()
            );
        }
        let ratio = |a: Duration, b: Duration| ms(a) / ms(b).max(1e-3);
        println!(
            "  off / on: p50 {:.1}x  p99 {:.1}x  mean {:.1}x  wall {:.1}x",
            ratio(off.p50, on.p50),
            ratio(off.p99, on.p99),
            ratio(off.mean, on.mean),
            ratio(off.wall, on.wall)
        );
    });
}
