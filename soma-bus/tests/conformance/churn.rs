//! Scenario 9 — lifecycle churn: eight tasks publish to the same four keys
//! at once; `DurablePublisher::shutdown` is called with publishes in
//! flight (every `Ok` must still be delivered); and the consumer is
//! stopped and started twelve times while messages flow.
//!
//! Order is per publisher task and key (concurrent publishers of one key
//! have no order between them).
//!
//! Answers Watermill's `TestPublisherClose`, `TestContinueAfterSubscribeClose`
//! and `TestSubscribeCtx` (subscribers closed and reopened mid-stream), and
//! Dapr's certification restarts.
//!
//! Stress: `churn_stress` (ignored by default) runs three copies at once:
//! `cargo nextest run -p soma-bus --test conformance --run-ignored only`.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use soma_bus::{BusProducer, DurablePublisher, KafkaSink};
use soma_outbox::Relay;

use crate::common::{config, outbox, require_postgres};
use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishers_shutdown_in_flight_and_consumer_restarts_lose_nothing() {
    quiet_logs();
    bounded("churn", Duration::from_secs(150), churn(12)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "stress mode: run with --run-ignored only"]
async fn churn_stress() {
    quiet_logs();
    bounded("churn stress", Duration::from_secs(600), async {
        tokio::join!(churn(12), churn(12), churn(12));
    })
    .await;
}

async fn churn(cycles: usize) {
    let mut cfg = config(&soma_testkit::require_kafka());
    cfg.consumer.concurrency = 4;
    cfg.publisher.pending_key_poll_interval_ms = 100;
    let topic = topic_with(&cfg, "c9churn", 2).await;
    let ob = outbox(&require_postgres()).await;
    let ledger = Ledger::new(ob.clone(), "c9").await;
    let producer = BusProducer::new(&cfg).unwrap();
    let relay = Relay::new(ob.clone(), KafkaSink::new(producer.clone()), relay_config()).spawn();
    let publisher = DurablePublisher::builder(producer.clone(), ob.clone()).build();
    let msgs = Arc::new(Mutex::new(Msgs::new()));

    // Eight tasks, the same four keys, one stream each.
    let publish_task = |p: DurablePublisher, stream: String, n: usize, pause: Duration| {
        let (m, t) = (msgs.clone(), topic.clone());
        tokio::spawn(async move {
            for i in 0..n {
                let e = m.lock().next(&t, &format!("k{}", i % 4), &stream);
                let r = p.publish(&t, &e).await;
                m.lock().answer(e.id, &r);
                tokio::time::sleep(pause).await;
            }
        })
    };
    let tasks: Vec<_> = (0..8)
        .map(|s| {
            publish_task(
                publisher.clone(),
                format!("s{s}"),
                40,
                Duration::from_millis(60),
            )
        })
        .collect();

    // Consumer stop/start cycles while the tasks publish.
    for c in 0..cycles {
        let h = ledger
            .consumer(&cfg, &[&topic], &format!("c{c}"), Faults::default())
            .producer(producer.clone())
            .inbox(dedupe(&ledger))
            .spawn()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300 + 40 * c as u64)).await;
        let report = h.shutdown().await;
        assert!(report.committed, "cycle {c}: {report:?}");
    }
    for t in tasks {
        t.await.unwrap();
    }

    // Shutdown with publishes in flight: a second publisher on the same
    // producer and outbox, shut down while four tasks use it.
    let closing = DurablePublisher::builder(producer.clone(), ob.clone()).build();
    let inflight: Vec<_> = (0..4)
        .map(|s| {
            publish_task(
                closing.clone(),
                format!("late{s}"),
                25,
                Duration::from_millis(5),
            )
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(40)).await;
    let flushed = closing.shutdown().await;
    for t in inflight {
        t.await.unwrap();
    }

    let last = ledger
        .consumer(&cfg, &[&topic], "last", Faults::default())
        .producer(producer.clone())
        .inbox(dedupe(&ledger))
        .spawn()
        .unwrap();
    let msgs = Arc::try_unwrap(msgs).unwrap().into_inner();
    let v = ledger
        .verify(&msgs, Duration::from_secs(90), Duration::from_millis(500))
        .await;
    eprintln!(
        "churn: {v:?}, accepted {}, refused {}, flush {flushed:?}",
        msgs.accepted(),
        msgs.refused()
    );
    last.shutdown().await;
    publisher.shutdown().await;
    relay.shutdown().await.unwrap();
}
