//! Scenario 4 — a consumer dies between its handler and the offset commit
//! (not `shutdown()`): the messages are redelivered with the same ids and
//! the inbox drops them; effects recorded in the handler's own transaction
//! happen once.
//!
//! The "crash" freezes the consumer's runtime inside the handler, right
//! after its effect transaction committed (see `harness::Freezable`): no
//! commit, no rebalance callback, no leave — librdkafka leaves the group
//! after `max.poll.interval.ms` without a poll, like a hung process.
//!
//! Answers Watermill's `TestContinueAfterSubscribeClose` /
//! `TestSubscribeCtx` with `ExactlyOnceDelivery` and Dapr's certification
//! test "app crashes mid-processing, message redelivered".

use std::collections::HashSet;
use std::time::Duration;

use soma_bus::BusProducer;

use crate::common::{config, outbox, require_postgres};
use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_between_handler_and_commit_redelivers_same_ids_and_effects_happen_once() {
    quiet_logs();
    bounded("consumer crash", Duration::from_secs(90), async {
        let base = config(&soma_testkit::require_kafka());
        let topic = topic_with(&base, "c4crash", 1).await;
        let ledger = Ledger::new(outbox(&require_postgres()).await, "c4").await;
        let producer = BusProducer::new(&base).unwrap();
        let mut msgs = Msgs::new();
        let envs: Vec<_> = (0..20).map(|_| msgs.next(&topic, "k", "p")).collect();
        for (e, r) in envs.iter().zip(producer.send_many(&topic, &envs).await) {
            msgs.answer(e.id, &r);
        }
        let mut crashy_cfg = base.clone();
        crashy_cfg.consumer.concurrency = 1;
        crashy_cfg.consumer.commit_interval_ms = 60_000;
        crashy_cfg
            .librdkafka
            .insert("max.poll.interval.ms".into(), "7000".into());
        let crash_at = envs[10].id;
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let tx = parking_lot::Mutex::new(tx);
        let crashy = Freezable::spawn(
            ledger
                .fork()
                .consumer_with(
                    &crashy_cfg,
                    &[&topic],
                    "crashy",
                    Faults::default(),
                    move |e, _| {
                        if e.id == crash_at {
                            let _ = tx.lock().send(());
                            // Freeze: the effect committed, the offset never will.
                            std::thread::sleep(Duration::from_secs(3_600));
                        }
                    },
                )
                .producer(producer.clone()),
        );
        tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(30)))
            .await
            .unwrap()
            .expect("the crashy consumer reached message 10");
        assert_eq!(ledger.effect_count().await, 11);

        // No consumer-side inbox check here: the redeliveries must reach the
        // handler, whose own transaction turns them into no-ops.
        let second = ledger
            .consumer(&base, &[&topic], "second", Faults::default())
            .producer(producer.clone())
            .spawn()
            .unwrap();
        let l = ledger.clone();
        let progress = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                let d = l.deliveries();
                eprintln!(
                    "consumer crash: {} deliveries, {} by second, {} effects",
                    d.len(),
                    d.iter().filter(|d| d.member == "second").count(),
                    l.effect_count().await
                );
            }
        });
        let v = ledger
            .verify(&msgs, Duration::from_secs(45), Duration::from_millis(500))
            .await;
        progress.abort();
        let effects = ledger.effects().await;
        let by_crashy: HashSet<_> = effects
            .iter()
            .filter(|e| e.member == "crashy")
            .map(|e| e.id)
            .collect();
        assert_eq!(
            by_crashy.len(),
            11,
            "messages 0..=10 took effect before the crash"
        );
        let redelivered: HashSet<_> = ledger
            .deliveries()
            .iter()
            .filter(|d| d.member == "second" && by_crashy.contains(&d.id))
            .map(|d| d.id)
            .collect();
        // Nothing was committed, so the whole handled prefix comes again
        // (same ids) and the inbox turns every one of them into a no-op.
        assert_eq!(
            redelivered, by_crashy,
            "handled-but-uncommitted messages are redelivered"
        );
        assert!(v.duplicates >= 11, "{v:?}");
        eprintln!("consumer crash: {v:?}");
        second.shutdown().await;
        drop(crashy);
    })
    .await;
}
