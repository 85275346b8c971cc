//! Consumers after the broker comes back: an idle consumer's health recovers
//! without a message to prove it, a broadcast consumer keeps its position
//! (nothing published after the return is skipped), and a broadcast
//! consumer's dedupe window drops a redelivered envelope.
//!
//! Fault injection on the far side of the client: a private tansu, killed
//! and started again, or behind a loopback [`FaultProxy`] that the test
//! cuts (every connection dropped, new ones refused) and restores.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use soma_bus::{BusConfig, BusConsumer, BusProducer, Envelope, HandlerError, TopicAdmin};
use soma_observability::health::{ComponentStatus, HealthRegistry};

use common::*;

fn status(health: &HealthRegistry, name: &str) -> ComponentStatus {
    health.component(name).expect("component registered").status
}

/// A private broker behind a proxy, a config pointing at the proxy, and a
/// topic on it.
async fn broker_behind_proxy(prefix: &str) -> (OwnBroker, FaultProxy, BusConfig, String) {
    let proxy_port = soma_testkit::free_port();
    let broker = OwnBroker::behind_proxy(proxy_port);
    let proxy = FaultProxy::start(proxy_port, broker.port).await;
    let mut cfg = config(&proxy.addr());
    cfg.consumer.session_timeout_ms = 6_000;
    let topic = soma_testkit::unique_name(prefix);
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        match TopicAdmin::new(&cfg)
            .unwrap()
            .ensure_topics(&[&topic], true)
            .await
        {
            Ok(_) => break,
            Err(e) => assert!(Instant::now() < end, "private broker not reachable: {e}"),
        }
    }
    (broker, proxy, cfg, topic)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_consumer_is_up_again_once_the_broker_is_back() {
    // The broker itself goes away here (kill -9, then started again on the
    // same port and data), as in the platform's broker-kill chaos scenario.
    let mut broker = OwnBroker::start();
    let mut cfg = config(&broker.bootstrap());
    cfg.consumer.session_timeout_ms = 6_000;
    let topic = soma_testkit::unique_name("idle");
    TopicAdmin::new(&cfg)
        .unwrap()
        .ensure_topics(&[&topic], true)
        .await
        .unwrap();
    let health = HealthRegistry::new();
    let consumer = BusConsumer::builder(&cfg, &[topic.as_str()], "idle", |_env: Envelope| async {
        Ok::<(), HandlerError>(())
    })
    .health(&health)
    .spawn()
    .unwrap();
    let name = "bus_consumer.idle";
    // Joined and fetching (an empty topic: nothing will ever arrive).
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        status(&health, name).is_up(),
        "{:?}",
        health.component(name)
    );

    broker.kill9();
    wait_for(
        "the consumer degraded by the lost broker",
        Duration::from_secs(60),
        || !status(&health, name).is_up(),
    )
    .await;
    let reason = health.component(name).unwrap().reason;
    broker.restart();
    let back = Instant::now();
    // No message arrives on the idle topic; the consumer must find out by itself.
    wait_for(
        "the idle consumer up again",
        Duration::from_secs(20),
        || status(&health, name).is_up(),
    )
    .await;
    println!(
        "degraded with {reason:?}; up again {:.1} s after the broker's return",
        back.elapsed().as_secs_f64()
    );
    consumer.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broadcast_consumer_keeps_its_position_and_drops_redeliveries() {
    let (_broker, proxy, cfg, topic) = broker_behind_proxy("bcast").await;
    let seen: Arc<Mutex<Vec<u32>>> = Arc::default();
    let sink = seen.clone();
    let consumer = BusConsumer::builder(&cfg, &[topic.as_str()], "bcast", move |env: Envelope| {
        let sink = sink.clone();
        async move {
            let v: serde_json::Value = env.json().map_err(HandlerError::fatal)?;
            sink.lock().push(v["n"].as_u64().unwrap() as u32);
            Ok(())
        }
    })
    .broadcast()
    .dedupe_window(100)
    .spawn()
    .unwrap();
    let mut producer_cfg = cfg.clone();
    producer_cfg.publisher.timeout_ms = 10_000;
    let producer = BusProducer::new(&producer_cfg).unwrap();

    // Assigned once a probe reaches the end of the partition: send until the
    // consumer sees something, then count from there.
    let warm = envelope("k", 1000);
    let end = Instant::now() + Duration::from_secs(30);
    while seen.lock().is_empty() {
        assert!(
            Instant::now() < end,
            "the broadcast consumer never got a message"
        );
        producer.send(&topic, &warm).await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        seen.lock().as_slice(),
        &[1000],
        "the same envelope sent again is dropped by the dedupe window"
    );
    seen.lock().clear();

    for n in 0..5 {
        producer.send(&topic, &envelope("k", n)).await.unwrap();
    }
    proxy.cut();
    // Longer than the session timeout: a group member would have been
    // expelled and, rejoining at `latest`, would skip what follows.
    tokio::time::sleep(Duration::from_secs(10)).await;
    proxy.restore();
    let again = envelope("k", 5);
    for n in 5..10 {
        let e = if n == 5 {
            again.clone()
        } else {
            envelope("k", n)
        };
        producer
            .send(&topic, &e)
            .await
            .expect("send after the return");
    }
    // A producer's redelivery after the outage: same envelope id again.
    producer.send(&topic, &again).await.unwrap();
    wait_for("all ten messages", Duration::from_secs(30), || {
        seen.lock().len() >= 10
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        seen.lock().as_slice(),
        &(0..10).collect::<Vec<u32>>()[..],
        "every message once, in order, none skipped, the redelivery dropped"
    );
    consumer.shutdown().await;
}
