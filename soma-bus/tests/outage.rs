//! The broker is killed (SIGKILL) while 10,000 keyed messages are being
//! published, then restarted: every message must arrive, in order per key.
//! Uses a private tansu instance (own port and SQLite file).

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use soma_bus::{BusProducer, DurablePublisher, Envelope, KafkaSink, PublishOutcome, TopicAdmin};
use soma_outbox::{Relay, RelayConfig};

use common::*;

const KEYS: usize = 50;
const BATCH: usize = 100;

// 10,000 keyed messages, two partitions. The read-back uses small fetches
// (`read_partitionwise`, see `BOUNDED_FETCH_BYTES`): tansu 0.6.0 scans its
// whole SQLite header table once per record it serves, and answers an
// unbounded fetch with the whole partition, so one fetch costs records x all
// header rows (5,000 x 60,000: 14-17 s). Once that passes librdkafka's 60 s
// socket timeout the client re-sends it while tansu is still busy and the
// broker looks wedged (20,000 records: no record in 5 minutes). Bounded
// fetches read this test's 10,000 records in 39-63 s on the 2-core machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_killed_mid_publish_loses_nothing_and_keeps_key_order() {
    outage(10_000).await;
}

async fn outage(total: usize) {
    assert_eq!(total % KEYS, 0);
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            "soma_bus=warn,soma_outbox=warn,rdkafka=off",
        ))
        .with_test_writer()
        .try_init();
    let mut broker = OwnBroker::start();
    let bootstrap = broker.bootstrap();
    let mut cfg = config(&bootstrap);
    cfg.publisher.timeout_ms = 2_000;
    cfg.publisher.breaker = soma_observability::resilience::BreakerConfig::new(1, 500);
    cfg.publisher.pending_key_poll_interval_ms = 100;
    let topic = soma_testkit::unique_name("outage");
    let mut admin_cfg = cfg.clone();
    admin_cfg.topics.partitions = 2;
    let admin = TopicAdmin::new(&admin_cfg).unwrap();
    admin.ensure_topics(&[&topic], false).await.unwrap();
    let ob = outbox(&require_postgres()).await;
    let producer = BusProducer::new(&cfg).unwrap();
    let mut relay_config = RelayConfig::default();
    relay_config.poll_interval_ms = 100;
    relay_config.backoff_base_ms = 100;
    relay_config.backoff_max_ms = 1_000;
    relay_config.max_attempts = 10_000;
    relay_config.sink_timeout_ms = 10_000;
    let relay = Relay::new(ob.clone(), KafkaSink::new(producer.clone()), relay_config).spawn();
    let publisher = DurablePublisher::builder(producer.clone(), ob.clone()).build();

    let envs: Vec<Envelope> = (0..total)
        .map(|i| {
            Envelope::builder("load.event", "tenant-a", format!("key-{}", i % KEYS))
                .json(&serde_json::json!({ "seq": i / KEYS }))
                .unwrap()
                .build()
                .unwrap()
        })
        .collect();
    let done = Arc::new(AtomicUsize::new(0));
    let (p, d, batch_envs) = (publisher.clone(), done.clone(), envs.clone());
    let t = topic.clone();
    let publishing = tokio::spawn(async move {
        let mut outcomes = Vec::with_capacity(total);
        for chunk in batch_envs.chunks(BATCH) {
            for r in p.publish_many(&t, chunk).await {
                outcomes.push(r.expect("publish must succeed: Kafka ack or outbox commit"));
            }
            d.fetch_add(chunk.len(), Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        outcomes
    });

    wait_for("a fifth published", Duration::from_secs(120), || {
        done.load(Ordering::SeqCst) >= total / 5
    })
    .await;
    broker.kill9();
    let killed_at = done.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Restarted on the same port and SQLite file; dropped (killed) at the end of the test.
    let broker = tokio::task::spawn_blocking(move || {
        broker.restart();
        broker
    })
    .await
    .unwrap();
    let outcomes = publishing.await.unwrap();
    assert!(
        killed_at < total,
        "broker was killed mid-publish ({killed_at} done)"
    );
    assert_eq!(outcomes.len(), total);
    let deferred = outcomes.iter().filter(|o| o.is_deferred()).count();
    let direct = outcomes
        .iter()
        .filter(|o| matches!(o, PublishOutcome::Published { .. }))
        .count();
    assert!(deferred > 0, "the outage sent some messages to the outbox");
    assert!(direct > 0);

    // The relay drains the outbox once the broker is back.
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let s = ob.stats().await.unwrap();
        assert_eq!(s.dead_letters, 0, "nothing dead-lettered by the relay");
        if s.pending == 0 {
            break;
        }
        assert!(
            Instant::now() < end,
            "outbox not drained: {} pending",
            s.pending
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Restart once more with nothing in flight, so the read-back comes from
    // what tansu persisted in its SQLite file.
    let mut broker = broker;
    let broker = tokio::task::spawn_blocking(move || {
        broker.restart();
        broker
    })
    .await
    .unwrap();
    let wanted: HashSet<String> = envs.iter().map(|e| e.id.to_string()).collect();
    let read_started = Instant::now();
    let recs = read_partitionwise(&bootstrap, &topic, Duration::from_secs(240)).await;
    let read_took = read_started.elapsed();
    let by_id: HashMap<String, &Envelope> = envs.iter().map(|e| (e.id.to_string(), e)).collect();
    let mut first_seen = HashSet::new();
    let mut per_key: HashMap<String, Vec<u64>> = HashMap::new();
    let mut duplicates = 0usize;
    for m in &recs {
        let id = header(m, "soma-id").expect("every record carries soma-id");
        assert!(wanted.contains(&id), "unexpected record {id}");
        if !first_seen.insert(id.clone()) {
            duplicates += 1;
            continue;
        }
        let e = by_id[&id];
        let seq = e.json::<serde_json::Value>().unwrap()["seq"]
            .as_u64()
            .unwrap();
        per_key.entry(e.key.clone().unwrap()).or_default().push(seq);
    }
    let diag = {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        use rdkafka::message::Message;
        let c: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .create()
            .unwrap();
        let mut d = String::new();
        for p in 0..2 {
            let wm = c.fetch_watermarks(&topic, p, Duration::from_secs(5));
            let read: Vec<i64> = recs
                .iter()
                .filter(|m| m.partition() == p)
                .map(|m| m.offset())
                .collect();
            d.push_str(&format!(
                "p{p}: watermarks {wm:?}, read {} max offset {:?}\n",
                read.len(),
                read.iter().max()
            ));
        }
        d
    };
    assert_eq!(
        first_seen.len(),
        total,
        "every message delivered ({} records read) {diag}; broker log tail:\n{}",
        recs.len(),
        std::fs::read_to_string(broker.log_path())
            .unwrap_or_default()
            .lines()
            .rev()
            .take(30)
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(
        recs.len(),
        total + duplicates,
        "count reconciles: unique + duplicates"
    );
    for (key, seqs) in &per_key {
        let expected: Vec<u64> = (0..(total / KEYS) as u64).collect();
        assert_eq!(seqs, &expected, "order of first deliveries for {key}");
    }
    eprintln!(
        "outage: killed after {killed_at}, kafka={direct} deferred={deferred} duplicates={duplicates} purges={}, read back {} records in {read_took:?}",
        producer.purge_count(),
        recs.len()
    );
    publisher.shutdown().await;
    relay.shutdown().await.unwrap();
}
