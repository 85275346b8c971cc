//! Scenario 5 — a slow broker, not a dead one: every byte between the
//! clients and the broker is held 1.5 s each way (a delaying loopback
//! proxy), above the 1 s publish timeout, for a bounded window. The
//! publisher purges and defers, yet the purged requests still reach the
//! broker and land while the relay republishes the same messages.
//!
//! Every accepted id must take effect once, first deliveries in per-key
//! order, and duplicates only with the same id.
//!
//! Answers librdkafka `0094-idempotence_msg_timeout` (messages that time
//! out locally but were persisted) and Watermill's `TestPublisherClose` /
//! slow-subscriber cases.

use std::time::Duration;

use soma_bus::{BusProducer, DurablePublisher, KafkaSink};
use soma_outbox::Relay;

use crate::common::{FaultProxy, OwnBroker, config, outbox, require_postgres};
use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_above_the_publish_timeout_defers_and_duplicates_only_with_the_same_id() {
    quiet_logs();
    bounded("slow broker", Duration::from_secs(120), async {
        let proxy_port = soma_testkit::free_port();
        let broker = OwnBroker::behind_proxy(proxy_port);
        let proxy = FaultProxy::start(proxy_port, broker.port).await;
        let mut cfg = config(&proxy.addr());
        cfg.publisher.timeout_ms = 1_000;
        cfg.publisher.breaker = soma_observability::resilience::BreakerConfig::new(1, 300);
        cfg.publisher.pending_key_poll_interval_ms = 100;
        cfg.consumer.concurrency = 4;
        let topic = topic_with(&cfg, "c5slow", 2).await;
        let ob = outbox(&require_postgres()).await;
        let ledger = Ledger::new(ob.clone(), "c5").await;
        let producer = BusProducer::new(&cfg).unwrap();
        let relay =
            Relay::new(ob.clone(), KafkaSink::new(producer.clone()), relay_config()).spawn();
        let publisher = DurablePublisher::builder(producer.clone(), ob.clone()).build();
        let consumer = ledger
            .consumer(&cfg, &[&topic], "a", Faults::default())
            .producer(producer.clone())
            .inbox(dedupe(&ledger))
            .spawn()
            .unwrap();
        let mut msgs = Msgs::new();
        for round in 0..30 {
            if round == 5 {
                proxy.set_delay(Duration::from_millis(1_500));
            }
            if round == 15 {
                proxy.set_delay(Duration::ZERO);
            }
            let envs: Vec<_> = (0..10)
                .map(|i| msgs.next(&topic, &format!("k{}", i % 5), "p"))
                .collect();
            let rs = publisher.publish_many(&topic, &envs).await;
            msgs.answers(&envs, &rs);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            msgs.refused(),
            0,
            "the outbox was up: every publish is accepted"
        );
        assert!(
            producer.purge_count() > 0,
            "the latency made publishes time out"
        );
        let v = ledger
            .verify(&msgs, Duration::from_secs(60), Duration::from_millis(500))
            .await;
        eprintln!(
            "slow broker: {v:?}, purges {}, relay {:?}",
            producer.purge_count(),
            relay.counters()
        );
        consumer.shutdown().await;
        publisher.shutdown().await;
        relay.shutdown().await.unwrap();
    })
    .await;
}
