//! Scenario 1 — exactly-once under a broker kill: the broker is SIGKILLed
//! in the middle of `publish_many` while a `BusConsumer` with inbox dedupe
//! consumes the same topic, then restarted on the same storage.
//!
//! Answers Watermill's `TestPublishSubscribe` / `TestResendOnError` with
//! `ExactlyOnceDelivery`, Kafka's replication system tests
//! (`replication_test.py`: hard broker failure while producing, with
//! `acks=all`, nothing acknowledged is lost) and librdkafka `0076-produce_retry`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use soma_bus::{BusProducer, DurablePublisher, KafkaSink};
use soma_outbox::Relay;

use crate::common::{OwnBroker, config, outbox, require_postgres, wait_for};
use crate::harness::*;

const KEYS: usize = 12;
const BATCH: usize = 20;
const TOTAL: usize = 600;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_killed_mid_publish_many_every_accepted_message_takes_effect_once() {
    quiet_logs();
    bounded("broker kill", Duration::from_secs(150), async {
        let mut broker = OwnBroker::start();
        let mut cfg = config(&broker.bootstrap());
        cfg.publisher.timeout_ms = 2_000;
        cfg.publisher.breaker = soma_observability::resilience::BreakerConfig::new(1, 500);
        cfg.publisher.pending_key_poll_interval_ms = 100;
        cfg.consumer.concurrency = 4;
        let topic = topic_with(&cfg, "c1kill", 2).await;
        let ob = outbox(&require_postgres()).await;
        let ledger = Ledger::new(ob.clone(), "c1").await;
        let producer = BusProducer::new(&cfg).unwrap();
        let relay = Relay::new(ob.clone(), KafkaSink::new(producer.clone()), relay_config()).spawn();
        let publisher = DurablePublisher::builder(producer.clone(), ob.clone()).build();
        let consumer = ledger
            .consumer(&cfg, &[&topic], "a", Faults::default())
            .producer(producer.clone())
            .inbox(dedupe(&ledger))
            .spawn()
            .unwrap();

        let mut msgs = Msgs::new();
        let envs: Vec<_> = (0..TOTAL)
            .map(|i| msgs.next(&topic, &format!("k{}", i % KEYS), "p"))
            .collect();
        let done = Arc::new(AtomicUsize::new(0));
        let (p, d, t, batch) = (publisher.clone(), done.clone(), topic.clone(), envs.clone());
        let publishing = tokio::spawn(async move {
            let mut out = Vec::with_capacity(TOTAL);
            for chunk in batch.chunks(BATCH) {
                out.extend(p.publish_many(&t, chunk).await);
                d.fetch_add(chunk.len(), Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            out
        });
        wait_for("a third published", Duration::from_secs(60), || {
            done.load(Ordering::SeqCst) >= TOTAL / 3
        })
        .await;
        broker.kill9();
        let killed_at = done.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let broker = tokio::task::spawn_blocking(move || {
            broker.restart();
            broker
        })
        .await
        .unwrap();
        let results = publishing.await.unwrap();
        msgs.answers(&envs, &results);
        assert!(killed_at < TOTAL, "killed mid-publish ({killed_at} done)");
        assert_eq!(msgs.refused(), 0, "the outbox was up: every publish is accepted");
        let deferred = results.iter().filter(|r| matches!(r, Ok(o) if o.is_deferred())).count();
        assert!(deferred > 0, "the kill sent messages to the outbox");

        let v = ledger.verify(&msgs, Duration::from_secs(90), Duration::from_millis(500)).await;
        eprintln!(
            "broker kill: killed after {killed_at}, deferred {deferred}, {v:?}, purges {}, heals {}",
            producer.purge_count(),
            producer.heal_count()
        );
        consumer.shutdown().await;
        publisher.shutdown().await;
        relay.shutdown().await.unwrap();
        drop(broker);
    })
    .await;
}
