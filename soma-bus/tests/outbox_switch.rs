//! `check_outbox_per_message`: a publisher asks the outbox on every publish
//! whether the key has records waiting there, so it keeps per-key order even
//! when *another* process (or itself before a restart) deferred the key.
//! Real Postgres and the shared tansu broker.

mod common;

use std::time::{Duration, Instant};

use soma_bus::{BusProducer, DurablePublisher, Envelope, PublishOutcome};

use common::*;

fn is_kafka(o: &PublishOutcome) -> bool {
    matches!(o, PublishOutcome::Published { .. })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_message_outbox_check_keeps_key_order_across_processes() {
    let bootstrap = soma_testkit::require_kafka();
    let mut base = config(&bootstrap);
    base.publisher.pending_key_poll_interval_ms = 100;
    let topic = topic(&base, "switch").await;
    let ob = outbox(&require_postgres()).await;

    // "Process B": Kafka is up; asks the outbox on every publish.
    let mut checked_cfg = base.clone();
    checked_cfg.publisher.check_outbox_per_message = true;
    let producer = BusProducer::new(&checked_cfg).unwrap();
    let b = DurablePublisher::builder(producer.clone(), ob.clone()).build();
    // "Process A": same outbox, but its broker connection is down, so it defers.
    let mut dead_cfg = base.clone();
    dead_cfg.bootstrap_servers = format!("127.0.0.1:{}", soma_testkit::free_port());
    dead_cfg.publisher.timeout_ms = 500;
    dead_cfg.publisher.breaker = soma_observability::resilience::BreakerConfig::new(1, 3_600_000);
    let a = DurablePublisher::builder(BusProducer::new(&dead_cfg).unwrap(), ob.clone()).build();
    // "Process C": Kafka up, default settings (only its own deferrals count).
    let c = DurablePublisher::builder(BusProducer::new(&base).unwrap(), ob.clone()).build();

    let k: Vec<Envelope> = (0..6).map(|n| envelope("k", n)).collect();
    let other = envelope("j", 0);

    // Kafka: nothing waits for k.
    assert!(is_kafka(&b.publish(&topic, &k[0]).await.unwrap()));
    // A defers k1 (its Kafka is down). B knows nothing about it in memory...
    assert!(a.publish(&topic, &k[1]).await.unwrap().is_deferred());
    assert_eq!(b.deferred_key_count(), 0);
    // ...but asks the outbox, so k2 and later follow k1 there: outbox.
    let o2 = b.publish(&topic, &k[2]).await.unwrap();
    assert_eq!(
        o2,
        PublishOutcome::Deferred(k[2].id),
        "k2 must queue behind k1"
    );
    assert!(b.publish(&topic, &k[3]).await.unwrap().is_deferred());
    let batch = b.publish_many(&topic, &[k[4].clone(), other.clone()]).await;
    assert!(batch[0].as_ref().unwrap().is_deferred(), "{batch:?}");
    assert!(
        is_kafka(batch[1].as_ref().unwrap()),
        "another key is not held back: {batch:?}"
    );
    assert_eq!(ob.pending_for_key(&topic, "k").await.unwrap(), 4);

    // Control: without the per-message check, C publishes a key A deferred
    // straight to Kafka, ahead of A's message (the documented caveat).
    let c0 = envelope("c", 0);
    let c1 = envelope("c", 1);
    assert!(a.publish(&topic, &c0).await.unwrap().is_deferred());
    assert!(
        is_kafka(&c.publish(&topic, &c1).await.unwrap()),
        "without the check a process does not see another's deferred keys"
    );

    // The relay drains the outbox; then B goes back to Kafka for k.
    let relay = spawn_relay(&ob, producer.clone());
    let end = Instant::now() + Duration::from_secs(30);
    while ob.stats().await.unwrap().pending > 0 {
        assert!(Instant::now() < end, "outbox not drained");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_for("B releases k", Duration::from_secs(10), || {
        b.deferred_key_count() == 0
    })
    .await;
    assert!(
        is_kafka(&b.publish(&topic, &k[5]).await.unwrap()),
        "k5 goes to Kafka once nothing of k waits"
    );

    let recs = read_all(&bootstrap, &topic, Duration::from_secs(30), |v| {
        v.len() >= 9
    })
    .await;
    let ids_of = |key: &str| -> Vec<String> {
        recs.iter()
            .filter(|m| rdkafka::message::Message::key(*m) == Some(key.as_bytes()))
            .filter_map(|m| header(m, "soma-id"))
            .collect()
    };
    let want: Vec<String> = k.iter().map(|e| e.id.to_string()).collect();
    assert_eq!(ids_of("k"), want, "Kafka -> outbox -> Kafka kept k's order");
    assert_eq!(ids_of("j"), vec![other.id.to_string()]);
    // The control key arrived out of order, as documented for the default.
    assert_eq!(ids_of("c"), vec![c1.id.to_string(), c0.id.to_string()]);
    assert_eq!(recs.len(), 9, "no duplicates without failures");

    b.shutdown().await;
    c.shutdown().await;
    relay.shutdown().await.unwrap();
}

/// Many callers publish one key at once while Kafka fails under them: their
/// messages fall back to the outbox in call order, not in the order their
/// outbox transactions happen to commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_fallbacks_of_one_key_reach_the_outbox_in_call_order() {
    soma_testkit::require_kafka();
    let ob = outbox(&require_postgres()).await;
    let mut cfg = config("unused");
    cfg.bootstrap_servers = format!("127.0.0.1:{}", soma_testkit::free_port());
    cfg.publisher.timeout_ms = 400;
    // Every call tries Kafka first, so every one falls back itself.
    cfg.publisher.breaker = soma_observability::resilience::BreakerConfig::new(1_000_000, 2_000);
    let publisher = DurablePublisher::builder(BusProducer::new(&cfg).unwrap(), ob.clone()).build();
    let envs: Vec<Envelope> = (0..40).map(|n| envelope("k", n)).collect();
    // Call order is the order in which the calls are first polled (a call
    // takes its place in the key's sequence there). `join_all` polls its
    // futures in vector order, so the call order is `envs`' order however
    // busy the machine is; spawned tasks with a stagger only usually were.
    let calls = envs.iter().map(|e| publisher.publish("conc", e));
    for outcome in futures::future::join_all(calls).await {
        assert!(outcome.unwrap().is_deferred());
    }
    let rows: Vec<(uuid::Uuid,)> = sqlx::query_as(&format!(
        "SELECT id FROM \"{}\".outbox WHERE key = 'k' ORDER BY txid, seq",
        ob.schema()
    ))
    .fetch_all(ob.pool())
    .await
    .unwrap();
    let stored: Vec<uuid::Uuid> = rows.into_iter().map(|r| r.0).collect();
    let called: Vec<uuid::Uuid> = envs.iter().map(|e| e.id).collect();
    assert_eq!(stored, called, "outbox order is call order");
}
