//! The relay with `batch_size = 1`: every record is its own claim
//! transaction; keyed order and exactly-once effects still hold end to end
//! (outbox → relay → Kafka → consumer with inbox).
//!
//! Answers Watermill-sql's `TestPublishSubscribe` with a batch size of one.

use std::time::Duration;

use soma_bus::{BusProducer, KafkaSink};
use soma_outbox::{NewMessage, Relay};

use crate::common::{config, outbox, require_postgres};
use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_with_batch_size_one_delivers_everything_in_key_order() {
    quiet_logs();
    bounded("relay batch size 1", Duration::from_secs(90), async {
        let cfg = config(&soma_testkit::require_kafka());
        let topic = topic_with(&cfg, "c11one", 2).await;
        let ob = outbox(&require_postgres()).await;
        let ledger = Ledger::new(ob.clone(), "c11").await;
        let producer = BusProducer::new(&cfg).unwrap();
        let mut one = relay_config();
        one.batch_size = 1;
        let relay = Relay::new(ob.clone(), KafkaSink::new(producer.clone()), one).spawn();
        let consumer = ledger
            .consumer(&cfg, &[&topic], "a", Faults::default())
            .producer(producer.clone())
            .spawn()
            .unwrap();
        let mut msgs = Msgs::new();
        for _ in 0..10 {
            let envs: Vec<_> = (0..12)
                .map(|i| msgs.next(&topic, &format!("k{}", i % 4), "p"))
                .collect();
            let rows: Vec<NewMessage> = envs
                .iter()
                .map(|e| NewMessage {
                    id: e.id,
                    topic: topic.clone(),
                    key: e.key.clone(),
                    payload: e.payload.clone(),
                    headers: e.header_map(),
                    dedupe_key: None,
                })
                .collect();
            ob.enqueue_standalone(&rows).await.unwrap();
            for e in &envs {
                msgs.accept(e.id);
            }
        }
        let v = ledger
            .verify(&msgs, Duration::from_secs(60), Duration::from_millis(300))
            .await;
        let c = relay.counters();
        assert_eq!(c.published, 120);
        assert!(c.batches >= 120, "one record per batch: {c:?}");
        eprintln!("batch size 1: {v:?}, {c:?}");
        consumer.shutdown().await;
        relay.shutdown().await.unwrap();
    })
    .await;
}
