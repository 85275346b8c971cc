//! A DLQ write that fails pauses the lane and is retried; the origin offset
//! is never committed past the message until the DLQ acknowledged it.
//!
//! Fault injection on the far side of the client: the DLQ topic lives on a
//! private tansu that advertises a loopback [`FaultProxy`] port, so every
//! connection of the DLQ producer goes through the proxy, which the test cuts
//! and restores. The origin topic and the consumer group live on the shared
//! broker, untouched by the fault, so the consumer *could* commit — the test
//! checks that it does not.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use soma_bus::{BusConsumer, BusProducer, Envelope, HandlerError, TopicAdmin};
use soma_bus::{
    DLQ_ATTEMPTS, DLQ_ERROR, DLQ_GROUP, DLQ_HANDLER, DLQ_ORIGIN_OFFSET, DLQ_ORIGIN_PARTITION,
    DLQ_ORIGIN_TOPIC,
};
use soma_observability::health::{ComponentStatus, HealthRegistry};
use uuid::Uuid;

use common::*;

/// Reads the group's committed offset of partition 0 (OffsetFetch; does not join the group).
struct CommittedProbe {
    consumer: Arc<BaseConsumer>,
    topic: String,
}

impl CommittedProbe {
    fn new(bootstrap: &str, group: &str, topic: &str) -> Self {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        Self {
            consumer: Arc::new(consumer),
            topic: topic.to_owned(),
        }
    }

    /// The committed offset, or -1 when the group has none.
    async fn get(&self) -> i64 {
        let (c, t) = (self.consumer.clone(), self.topic.clone());
        tokio::task::spawn_blocking(move || {
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition(&t, 0);
            let got = c
                .committed_offsets(tpl, Duration::from_secs(10))
                .expect("OffsetFetch");
            match got.find_partition(&t, 0).map(|e| e.offset()) {
                Some(Offset::Offset(o)) => o,
                _ => -1,
            }
        })
        .await
        .unwrap()
    }

    async fn wait_for(&self, offset: i64, timeout: Duration) {
        let end = Instant::now() + timeout;
        loop {
            let now = self.get().await;
            if now == offset {
                return;
            }
            assert!(
                Instant::now() < end,
                "committed offset is {now}, expected {offset}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn status(health: &HealthRegistry, name: &str) -> ComponentStatus {
    health.component(name).expect("component registered").status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_dlq_write_pauses_retries_and_never_commits() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            "soma_bus=info,rdkafka=off",
        ))
        .with_test_writer()
        .try_init();
    let bootstrap = soma_testkit::require_kafka();
    let mut cfg = config(&bootstrap);
    cfg.publisher.timeout_ms = 1_000;
    cfg.consumer.dlq_retry_backoff_ms = 200;
    cfg.consumer.shutdown_timeout_ms = 2_000;
    // Origin topic on the shared broker (no DLQ there: it lives behind the proxy).
    let topic = soma_testkit::unique_name("dlqcut");
    TopicAdmin::new(&cfg)
        .unwrap()
        .ensure_topics(&[&topic], false)
        .await
        .unwrap();
    let dlq = cfg.dlq_topic(&topic);

    let proxy_port = soma_testkit::free_port();
    let dlq_broker = OwnBroker::behind_proxy(proxy_port);
    let proxy = FaultProxy::start(proxy_port, dlq_broker.port).await;
    let mut dlq_cfg = cfg.clone();
    dlq_cfg.bootstrap_servers = proxy.addr();
    let warm_topic = soma_testkit::unique_name("warm");
    TopicAdmin::new(&dlq_cfg)
        .unwrap()
        .ensure_topics(&[&dlq, &warm_topic], false)
        .await
        .unwrap();
    let dlq_producer = BusProducer::new(&dlq_cfg).unwrap();
    // Warm the DLQ producer's connections through the proxy, so the cut
    // below drops live ones.
    let end = Instant::now() + Duration::from_secs(30);
    while let Err(e) = dlq_producer.send(&warm_topic, &envelope("warm", 0)).await {
        assert!(
            Instant::now() < end,
            "DLQ broker not reachable through the proxy: {e}"
        );
    }

    // The origin producer talks to the shared broker, which the rest of the
    // suite loads too: the short timeout is for the DLQ producer only.
    let mut producer_cfg = cfg.clone();
    producer_cfg.publisher.timeout_ms = 10_000;
    let producer = BusProducer::new(&producer_cfg).unwrap();
    let before = envelope("k", 0);
    let poison = envelope("k", 1);
    let after = envelope("k", 2);
    let calls = Arc::new(Mutex::new(Vec::<(u8, Uuid)>::new()));
    let health = HealthRegistry::new();
    let component = "bus_consumer.ledger";
    let start = |run: u8| {
        let (c, poison_id) = (calls.clone(), poison.id);
        BusConsumer::builder(&cfg, &[&topic], "ledger", move |e: Envelope| {
            let c = c.clone();
            async move {
                c.lock().push((run, e.id));
                if e.id == poison_id {
                    return Err(HandlerError::fatal("ledger entry refers to no account"));
                }
                Ok(())
            }
        })
        .producer(dlq_producer.clone())
        .health(&health)
        .spawn()
        .unwrap()
    };
    let handled = |id: Uuid| calls.lock().iter().any(|(_, i)| *i == id);
    let calls_of = |id: Uuid| calls.lock().iter().filter(|(_, i)| *i == id).count();
    let probe = CommittedProbe::new(&bootstrap, &cfg.consumer.group, &topic);

    // Healthy first: offset 0 handled and committed.
    assert_eq!(producer.send(&topic, &before).await.unwrap().offset, 0);
    let first = start(1);
    wait_for("first message handled", Duration::from_secs(60), || {
        handled(before.id)
    })
    .await;
    probe.wait_for(1, Duration::from_secs(20)).await;

    // The DLQ becomes unreachable; then a message fails fatally.
    proxy.cut();
    let refused_at_cut = proxy.refused();
    assert_eq!(producer.send(&topic, &poison).await.unwrap().offset, 1);
    assert_eq!(producer.send(&topic, &after).await.unwrap().offset, 2);
    wait_for("poison handled once", Duration::from_secs(30), || {
        calls_of(poison.id) == 1
    })
    .await;
    wait_for("health degraded", Duration::from_secs(10), || {
        status(&health, component) == ComponentStatus::Degraded
    })
    .await;
    // Several DLQ attempts (1 s timeout + 200 ms pause each): the offset
    // stays at the poison message, the lane stays paused, health degraded.
    let window = Instant::now() + Duration::from_secs(4);
    while Instant::now() < window {
        let committed = probe.get().await;
        assert!(
            committed <= 1,
            "offset committed past a message the DLQ never acknowledged: {committed}"
        );
        assert!(!handled(after.id), "a later message of the key overtook it");
        assert_eq!(status(&health, component), ComponentStatus::Degraded);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(calls_of(poison.id), 1, "fatal errors are not retried");
    assert!(
        proxy.refused() > refused_at_cut,
        "the DLQ producer kept trying through the cut proxy"
    );

    // Shut down while the write still fails: the message is abandoned
    // uncommitted (shutdown gives up after shutdown_timeout_ms).
    let report = first.shutdown().await;
    assert!(
        !report.drained && report.committed,
        "the paused lane cannot drain; the final commit still runs: {report:?}"
    );
    assert_eq!(
        probe.get().await,
        1,
        "shutdown did not commit the poison offset"
    );

    // A restarted consumer in the same group gets the message again.
    let second = start(2);
    wait_for("poison redelivered", Duration::from_secs(60), || {
        calls.lock().contains(&(2, poison.id))
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(probe.get().await, 1);
    assert!(!handled(after.id));

    // DLQ reachable again: the pending write lands, the lane resumes, the offset moves on.
    proxy.restore();
    wait_for(
        "next message of the key handled",
        Duration::from_secs(30),
        || handled(after.id),
    )
    .await;
    probe.wait_for(3, Duration::from_secs(20)).await;
    wait_for("health up again", Duration::from_secs(10), || {
        status(&health, component) == ComponentStatus::Up
    })
    .await;
    let report = second.shutdown().await;
    assert!(report.drained && report.committed, "{report:?}");

    let recs = read_all(&proxy.addr(), &dlq, Duration::from_secs(30), |v| {
        !v.is_empty()
    })
    .await;
    // Give a stray second copy a chance to show up before counting.
    let recs = if recs.len() == 1 {
        read_all(&proxy.addr(), &dlq, Duration::from_secs(3), |_| false).await
    } else {
        recs
    };
    assert_eq!(
        recs.len(),
        1,
        "exactly one DLQ record for the poison message"
    );
    let r = &recs[0];
    assert_eq!(header(r, "soma-id"), Some(poison.id.to_string()));
    assert_eq!(r.key(), Some(&b"k"[..]));
    assert_eq!(header(r, DLQ_ORIGIN_TOPIC).as_deref(), Some(topic.as_str()));
    assert_eq!(header(r, DLQ_ORIGIN_PARTITION).as_deref(), Some("0"));
    assert_eq!(header(r, DLQ_ORIGIN_OFFSET).as_deref(), Some("1"));
    assert_eq!(header(r, DLQ_ATTEMPTS).as_deref(), Some("1"));
    assert_eq!(header(r, DLQ_HANDLER).as_deref(), Some("ledger"));
    assert_eq!(
        header(r, DLQ_GROUP).as_deref(),
        Some(cfg.consumer.group.as_str())
    );
    assert!(
        header(r, DLQ_ERROR)
            .unwrap()
            .contains("ledger entry refers to no account")
    );
    // Handled in order: before (run 1), poison (run 1, then again in run 2), after (run 2).
    let ids: Vec<Uuid> = calls.lock().iter().map(|(_, i)| *i).collect();
    assert_eq!(ids, vec![before.id, poison.id, poison.id, after.id]);
    drop(dlq_broker);
}
