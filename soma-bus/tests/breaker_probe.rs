//! The publisher's breaker during a Kafka outage: while half-open exactly
//! one publish probes Kafka (and alone waits the publish timeout); every
//! other publish goes to the outbox at once. A probe whose caller is
//! cancelled frees the slot. Real Postgres; Kafka is an unreachable port.

mod common;

use std::time::{Duration, Instant};

use soma_bus::{BusProducer, DurablePublisher};
use soma_observability::resilience::{BreakerConfig, BreakerState};

use common::*;

const PUBLISH_TIMEOUT_MS: u64 = 800;
/// Long enough that a loaded machine (CI runs the suite on two cores) reads
/// the state before a re-opened breaker turns half-open again by itself.
const OPEN_MS: u64 = 1_000;

async fn dead_publisher() -> DurablePublisher {
    let mut cfg = config("unused");
    cfg.bootstrap_servers = format!("127.0.0.1:{}", soma_testkit::free_port());
    cfg.publisher.timeout_ms = PUBLISH_TIMEOUT_MS;
    cfg.publisher.breaker = BreakerConfig::new(1, OPEN_MS);
    DurablePublisher::builder(
        BusProducer::new(&cfg).unwrap(),
        outbox(&require_postgres()).await,
    )
    .build()
}

/// Opens the breaker with one publish that waits the timeout, then waits
/// until the breaker is half-open.
async fn open_then_half_open(p: &DurablePublisher, topic: &str, key: &str) {
    assert!(
        p.publish(topic, &envelope(key, 0))
            .await
            .unwrap()
            .is_deferred()
    );
    assert_eq!(p.breaker_state(), BreakerState::Open);
    tokio::time::sleep(Duration::from_millis(OPEN_MS + 50)).await;
    assert_eq!(p.breaker_state(), BreakerState::HalfOpen);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_publishers_in_an_outage_only_the_probe_waits() {
    let p = dead_publisher().await;
    let topic = "outage.fifty";
    open_then_half_open(&p, topic, "opener").await;

    let calls = (0..50).map(|n| {
        let p = p.clone();
        async move {
            let t = Instant::now();
            let out = p.publish(topic, &envelope(&format!("k{n}"), n)).await;
            // Read as the call returns: join_all ends only after the
            // slowest outbox write, by when an open breaker may have
            // turned half-open again.
            (t.elapsed(), out, p.breaker_state())
        }
    });
    let results = futures::future::join_all(calls).await;
    let slow = Duration::from_millis(PUBLISH_TIMEOUT_MS / 2);
    let waited: Vec<_> = results.iter().filter(|(d, ..)| *d >= slow).collect();
    assert_eq!(
        waited.len(),
        1,
        "only the probe waits for Kafka: {results:?}"
    );
    for (_, out, _) in &results {
        assert!(out.as_ref().unwrap().is_deferred());
    }
    assert_eq!(
        waited[0].2,
        BreakerState::Open,
        "the failed probe re-opened it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_probe_frees_the_breaker() {
    let p = dead_publisher().await;
    let topic = "outage.cancel";
    open_then_half_open(&p, topic, "opener").await;

    // The probe's caller gives up long before the publish timeout.
    let cancelled = tokio::time::timeout(
        Duration::from_millis(100),
        p.publish(topic, &envelope("probe-1", 1)),
    )
    .await;
    assert!(cancelled.is_err());
    assert_eq!(p.breaker_state(), BreakerState::HalfOpen);

    // The next publish is the new probe: it tries Kafka (and waits the
    // timeout) instead of being refused by a breaker stuck behind a probe
    // that no longer exists.
    let t = Instant::now();
    assert!(
        p.publish(topic, &envelope("probe-2", 2))
            .await
            .unwrap()
            .is_deferred()
    );
    assert!(
        t.elapsed() >= Duration::from_millis(PUBLISH_TIMEOUT_MS / 2),
        "probe-2 went to Kafka: {:?}",
        t.elapsed()
    );
    assert_eq!(p.breaker_state(), BreakerState::Open);
}
