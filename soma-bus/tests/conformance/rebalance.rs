//! Scenario 3 — group rebalance under keyed traffic: member B joins, leaves
//! gracefully; member C joins and is aborted (frozen, see
//! `harness::Freezable`); A stays throughout.
//!
//! Duplicates are allowed only where the consumer docs predict them: a
//! message handled but not yet committed when its partition moved. So none
//! before the first membership change, and the inbox absorbs every one.
//!
//! Answers Watermill's `TestConsumerGroups` / `TestReconnect`, Kafka's
//! consumer rolling-bounce system tests (`consumer_test.py`) and Dapr's
//! certification "scale out / scale in" pub/sub tests.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use soma_bus::BusProducer;

use crate::common::{config, outbox, require_postgres, wait_for};
use crate::harness::*;

const KEYS: usize = 16;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_join_leave_and_abort_while_keyed_traffic_flows() {
    quiet_logs();
    bounded("rebalance", Duration::from_secs(150), async {
        let mut cfg = config(&soma_testkit::require_kafka());
        cfg.consumer.concurrency = 4;
        let topic = topic_with(&cfg, "c3rebal", 4).await;
        let ledger = Ledger::new(outbox(&require_postgres()).await, "c3").await;
        let producer = BusProducer::new(&cfg).unwrap();
        let msgs = Arc::new(Mutex::new(Msgs::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, m, s, t) = (producer.clone(), msgs.clone(), stop.clone(), topic.clone());
        let traffic = tokio::spawn(async move {
            while !s.load(Ordering::SeqCst) {
                let envs: Vec<_> = {
                    let mut m = m.lock();
                    (0..KEYS)
                        .map(|k| m.next(&t, &format!("k{k}"), "p"))
                        .collect()
                };
                let rs = p.send_many(&t, &envs).await;
                {
                    let mut m = m.lock();
                    for (e, r) in envs.iter().zip(rs) {
                        m.answer(e.id, &r);
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        let handled_by = |who: &'static str| {
            let l = ledger.clone();
            move || l.deliveries().iter().any(|d| d.member == who)
        };
        let a = ledger
            .consumer(&cfg, &[&topic], "a", Faults::default())
            .producer(producer.clone())
            .spawn()
            .unwrap();
        wait_for("A handles", Duration::from_secs(30), handled_by("a")).await;

        let first_change = Instant::now();
        let b = ledger
            .consumer(&cfg, &[&topic], "b", Faults::default())
            .producer(producer.clone())
            .spawn()
            .unwrap();
        wait_for("B handles", Duration::from_secs(40), handled_by("b")).await;
        let report = b.shutdown().await;
        assert!(report.drained && report.committed, "{report:?}");

        let mut c_cfg = cfg.clone();
        c_cfg
            .librdkafka
            .insert("max.poll.interval.ms".into(), "7000".into());
        let freeze = Arc::new(AtomicBool::new(false));
        let f = freeze.clone();
        let c = Freezable::spawn(
            ledger
                .fork()
                .consumer_with(&c_cfg, &[&topic], "c", Faults::default(), move |_, _| {
                    if f.load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_secs(3_600));
                    }
                })
                .producer(producer.clone()),
        );
        wait_for("C handles", Duration::from_secs(40), handled_by("c")).await;
        freeze.store(true, Ordering::SeqCst);
        // C's partitions come back to A once librdkafka gives C up.
        let aborted = Instant::now();
        let l = ledger.clone();
        wait_for(
            "A handles after C's abort",
            Duration::from_secs(40),
            move || {
                l.deliveries()
                    .iter()
                    .any(|d| d.member == "a" && d.at > aborted + Duration::from_secs(7))
            },
        )
        .await;
        stop.store(true, Ordering::SeqCst);
        traffic.await.unwrap();

        let msgs = Arc::try_unwrap(msgs).unwrap().into_inner();
        assert_eq!(msgs.refused(), 0);
        let v = ledger
            .verify(&msgs, Duration::from_secs(60), Duration::from_millis(500))
            .await;
        // No duplicate before the group first changed.
        let mut seen = std::collections::HashSet::new();
        for d in ledger.deliveries() {
            if !seen.insert(d.id) {
                assert!(
                    d.at >= first_change,
                    "a duplicate before any membership change: {d:?}"
                );
            }
        }
        eprintln!("rebalance: {v:?}, {} accepted", msgs.accepted());
        a.shutdown().await;
        drop(c);
    })
    .await;
}
