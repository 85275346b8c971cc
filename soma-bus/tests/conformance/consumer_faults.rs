//! Scenario 7 — the consumer (not only the publisher) through a network
//! cut and a broker restart: it resumes, its commits land, nothing is lost
//! and key order holds.
//!
//! Answers Watermill's `TestReconnect` (the `pubsub/tests` reconnect test
//! with a broker restart), Kafka's replication system tests (clean and hard
//! broker bounce with a live consumer) and Dapr's certification "network
//! interruption" pub/sub test.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use soma_bus::{BusProducer, DurablePublisher, KafkaSink};
use soma_outbox::Relay;

use crate::common::{FaultProxy, OwnBroker, config, outbox, require_postgres};
use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_resumes_after_a_network_cut_and_a_broker_restart_and_commits_land() {
    quiet_logs();
    bounded("consumer faults", Duration::from_secs(150), async {
        let proxy_port = soma_testkit::free_port();
        let mut broker = OwnBroker::behind_proxy(proxy_port);
        let proxy = FaultProxy::start(proxy_port, broker.port).await;
        let mut cfg = config(&proxy.addr());
        cfg.publisher.timeout_ms = 1_500;
        cfg.publisher.breaker = soma_observability::resilience::BreakerConfig::new(1, 300);
        cfg.publisher.pending_key_poll_interval_ms = 100;
        cfg.consumer.concurrency = 4;
        let topic = topic_with(&cfg, "c7cons", 2).await;
        let ob = outbox(&require_postgres()).await;
        let ledger = Ledger::new(ob.clone(), "c7").await;
        let producer = BusProducer::new(&cfg).unwrap();
        let relay =
            Relay::new(ob.clone(), KafkaSink::new(producer.clone()), relay_config()).spawn();
        let publisher = DurablePublisher::builder(producer.clone(), ob.clone()).build();
        let consumer = ledger
            .consumer(&cfg, &[&topic], "a", Faults::default())
            .producer(producer.clone())
            .spawn()
            .unwrap();
        let mut msgs = Msgs::new();
        let round = |msgs: &mut Msgs| {
            (0..8)
                .map(|i| msgs.next(&topic, &format!("k{i}"), "p"))
                .collect::<Vec<_>>()
        };
        for r in 0..45 {
            if r == 10 {
                proxy.cut();
            }
            if r == 18 {
                proxy.restore();
            }
            if r == 28 {
                let b = broker;
                broker = tokio::task::spawn_blocking(move || {
                    let mut b = b;
                    b.restart();
                    b
                })
                .await
                .unwrap();
            }
            let envs = round(&mut msgs);
            let rs = publisher.publish_many(&topic, &envs).await;
            msgs.answers(&envs, &rs);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(msgs.refused(), 0);
        let v = ledger
            .verify(&msgs, Duration::from_secs(90), Duration::from_millis(500))
            .await;

        // The group's commits land: committed offsets reach the end of
        // each partition (through the proxy, like the consumer).
        let probe: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", proxy.addr())
            .set("group.id", &cfg.consumer.group)
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let (t, end) = (topic.clone(), Instant::now() + Duration::from_secs(30));
        let lag = tokio::task::spawn_blocking(move || {
            loop {
                let mut lag = 0;
                let mut tpl = TopicPartitionList::new();
                for p in 0..2 {
                    tpl.add_partition(&t, p);
                }
                if let Ok(c) = probe.committed_offsets(tpl, Duration::from_secs(5)) {
                    for p in 0..2 {
                        let high = probe
                            .fetch_watermarks(&t, p, Duration::from_secs(5))
                            .map_or(i64::MAX, |w| w.1);
                        let done = match c.find_partition(&t, p).map(|e| e.offset()) {
                            Some(Offset::Offset(o)) => o,
                            _ => 0,
                        };
                        lag += (high - done).max(0);
                    }
                    if lag == 0 || Instant::now() > end {
                        return lag;
                    }
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        })
        .await
        .unwrap();
        assert_eq!(
            lag, 0,
            "the consumer's commits reached the end of the topic"
        );
        eprintln!(
            "consumer faults: {v:?}, refused by proxy {}",
            proxy.refused()
        );
        consumer.shutdown().await;
        publisher.shutdown().await;
        relay.shutdown().await.unwrap();
    })
    .await;
}
