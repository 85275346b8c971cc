//! Scenario 2 — consumer per-key order at scale: 1,200 messages over 16
//! keys and 4 partitions, 8 handler lanes, a retryable error injected on
//! the first attempt of every tenth message.
//!
//! Answers Watermill's `TestConcurrentSubscribe` / `TestNoAck` /
//! `TestMessageCtx` with `GuaranteedOrder` and Dapr's pub/sub conformance
//! "ordering" and "retry" checks.
//!
//! Also multi-topic isolation: one consumer of two topics with the same key
//! names, and a consumer of a third topic in another group; each sees
//! exactly its own topics' messages (Watermill `TestTopic`,
//! `TestConsumerGroups`).

use std::time::Duration;

use soma_bus::BusProducer;

use crate::common::{config, outbox, require_postgres};
use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_messages_sixteen_keys_concurrent_lanes_with_retries_keep_key_order() {
    quiet_logs();
    bounded("order at scale", Duration::from_secs(120), async {
        // Sent with the bare producer (no outbox): a generous publish timeout,
        // so a busy shared broker does not turn sends into (ambiguous) timeouts.
        let mut cfg = config(&soma_testkit::require_kafka());
        cfg.consumer.concurrency = 8;
        cfg.publisher.timeout_ms = 30_000;
        let topic = topic_with(&cfg, "c2order", 4).await;
        let ledger = Ledger::new(outbox(&require_postgres()).await, "c2").await;
        let producer = BusProducer::new(&cfg).unwrap();
        let mut msgs = Msgs::new();
        let envs: Vec<_> = (0..1_200)
            .map(|i| msgs.next(&topic, &format!("k{}", i % 16), "p"))
            .collect();
        let consumer = ledger
            .consumer(
                &cfg,
                &[&topic],
                "a",
                Faults {
                    retry_every: Some(10),
                },
            )
            .producer(producer.clone())
            .spawn()
            .unwrap();
        for chunk in envs.chunks(200) {
            for (e, r) in chunk.iter().zip(producer.send_many(&topic, chunk).await) {
                msgs.answer(e.id, &r);
            }
        }
        assert_eq!(msgs.refused(), 0);
        let v = ledger
            .verify(&msgs, Duration::from_secs(90), Duration::from_millis(300))
            .await;
        // 75 messages per key, seqs 0, 10, ..., 70 fail once: 8 per key.
        assert_eq!(
            v.duplicates,
            16 * 8,
            "only the injected retries run a message twice"
        );
        eprintln!("order at scale: {v:?}");
        consumer.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_see_only_their_topics_and_same_keys_on_two_topics_are_independent() {
    quiet_logs();
    bounded("multi-topic isolation", Duration::from_secs(90), async {
        let cfg = config(&soma_testkit::require_kafka());
        let (t1, t2, t3) = (
            topic_with(&cfg, "c2iso1", 2).await,
            topic_with(&cfg, "c2iso2", 2).await,
            topic_with(&cfg, "c2iso3", 2).await,
        );
        let ob = outbox(&require_postgres()).await;
        let both = Ledger::new(ob.clone(), "c2both").await;
        let third = Ledger::new(ob, "c2third").await;
        let producer = BusProducer::new(&cfg).unwrap();
        let (mut m12, mut m3) = (Msgs::new(), Msgs::new());
        let mut batches = Vec::new();
        for i in 0..60 {
            let k = format!("k{}", i % 4);
            batches.push((t1.clone(), m12.next(&t1, &k, "p")));
            batches.push((t2.clone(), m12.next(&t2, &k, "p")));
            batches.push((t3.clone(), m3.next(&t3, &k, "p")));
        }
        let c12 = both
            .consumer(
                &cfg,
                &[&t1, &t2],
                "x",
                Faults {
                    retry_every: Some(7),
                },
            )
            .producer(producer.clone())
            .spawn()
            .unwrap();
        let mut cfg3 = cfg.clone();
        cfg3.consumer.group = soma_testkit::unique_name("g3");
        let c3 = third
            .consumer(&cfg3, &[&t3], "y", Faults::default())
            .producer(producer.clone())
            .spawn()
            .unwrap();
        for (t, e) in &batches {
            let r = producer.send(t, e).await;
            if *t == t3 {
                m3.answer(e.id, &r);
            } else {
                m12.answer(e.id, &r);
            }
        }
        let v12 = both
            .verify(&m12, Duration::from_secs(60), Duration::from_millis(500))
            .await;
        let v3 = third
            .verify(&m3, Duration::from_secs(60), Duration::from_millis(500))
            .await;
        assert_eq!(v12.effects, 120);
        assert_eq!(v3.effects, 60);
        c12.shutdown().await;
        c3.shutdown().await;
    })
    .await;
}
