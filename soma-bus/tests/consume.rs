//! Publisher + consumer against the shared tansu broker and Postgres.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use rdkafka::ClientConfig;
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use soma_bus::{
    BusConsumer, BusProducer, DurablePublisher, Envelope, HandlerError, PublishOutcome,
    ReplayOptions, TraceContext, replay_dlq,
};
use soma_bus::{
    DLQ_ATTEMPTS, DLQ_ERROR, DLQ_HANDLER, DLQ_ORIGIN_OFFSET, DLQ_ORIGIN_PARTITION, DLQ_ORIGIN_TOPIC,
};
use soma_observability::metrics::MetricsRegistry;

use common::*;

#[tokio::test]
async fn round_trip_keeps_headers_and_trace_context() {
    let bootstrap = soma_testkit::require_kafka();
    let cfg = config(&bootstrap);
    let topic = topic(&cfg, "rt").await;
    let producer = BusProducer::new(&cfg).unwrap();
    let publisher =
        DurablePublisher::builder(producer.clone(), outbox(&require_postgres()).await).build();

    let trace = TraceContext::parse(
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        Some("v=1"),
    )
    .unwrap();
    let sent = Envelope::builder("chat.turn", "tenant-a", "session-1")
        .json(&serde_json::json!({"text": "hello"}))
        .unwrap()
        .correlation_id("corr-1")
        .causation_id("cause-1")
        .schema_version(3)
        .attribute("x-origin", "test")
        .trace(trace.clone())
        .build()
        .unwrap();
    let outcome = publisher.publish(&topic, &sent).await.unwrap();
    assert!(
        matches!(outcome, PublishOutcome::Published { offset: 0, .. }),
        "{outcome:?}"
    );
    // No tracing-opentelemetry layer in this test binary: no context to
    // inject, and none is invented (tests/trace_propagation.rs has the layer).
    let bare = envelope("session-1", 2);
    publisher.publish(&topic, &bare).await.unwrap();

    let got = Arc::new(Mutex::new(Vec::<Envelope>::new()));
    let g = got.clone();
    let consumer = BusConsumer::builder(&cfg, &[&topic], "rt", move |e: Envelope| {
        let g = g.clone();
        async move {
            g.lock().push(e);
            Ok(())
        }
    })
    .producer(producer)
    .spawn()
    .unwrap();
    wait_for("two messages", Duration::from_secs(30), || {
        got.lock().len() == 2
    })
    .await;
    consumer.shutdown().await;

    let got = got.lock();
    let first = &got[0];
    let mut expect = sent.clone();
    expect.occurred_at = first.occurred_at;
    assert_eq!(first, &expect);
    assert_eq!(
        first.occurred_at.timestamp_micros(),
        sent.occurred_at.timestamp_micros()
    );
    // The explicit context arrives exactly as set (strictly decoded).
    assert_eq!(first.trace.as_ref(), Some(&trace));
    let second = &got[1];
    assert_eq!(second.id, bare.id);
    assert_eq!(second.trace, None);
    // A reply built with caused_by (outside any span of the trace) carries the
    // cause's context as it is, and its correlation.
    let reply = Envelope::builder("chat.reply", "tenant-a", "session-1")
        .caused_by(first)
        .build()
        .unwrap();
    assert_eq!(reply.trace.as_ref(), Some(&trace));
    assert_eq!(reply.correlation_id.as_deref(), Some("corr-1"));
    assert_eq!(reply.causation_id, Some(first.id.to_string()));
}

#[tokio::test]
async fn fatal_error_goes_to_dlq_with_metadata_then_replay_is_handled() {
    let bootstrap = soma_testkit::require_kafka();
    let cfg = config(&bootstrap);
    let topic = topic(&cfg, "dlq").await;
    let producer = BusProducer::new(&cfg).unwrap();
    let metrics = MetricsRegistry::default();

    let poison = envelope("k1", 1);
    let fine = envelope("k1", 2);
    producer.send(&topic, &poison).await.unwrap();
    producer.send(&topic, &fine).await.unwrap();

    let handled = Arc::new(Mutex::new(Vec::<Envelope>::new()));
    let fail_ids = Arc::new(Mutex::new(HashSet::from([poison.id])));
    let attempts = Arc::new(Mutex::new(0u32));
    let (h, f, a) = (handled.clone(), fail_ids.clone(), attempts.clone());
    let consumer = BusConsumer::builder(&cfg, &[&topic], "billing", move |e: Envelope| {
        let (h, f, a) = (h.clone(), f.clone(), a.clone());
        async move {
            if f.lock().contains(&e.id) {
                *a.lock() += 1;
                return Err(HandlerError::fatal("invoice total negative"));
            }
            h.lock().push(e);
            Ok(())
        }
    })
    .producer(producer.clone())
    .metrics(&metrics)
    .spawn()
    .unwrap();
    // The poison message does not block the next one of the same key.
    wait_for("second message handled", Duration::from_secs(30), || {
        handled.lock().iter().any(|e| e.id == fine.id)
    })
    .await;
    assert_eq!(*attempts.lock(), 1, "fatal errors are not retried");

    let dlq = cfg.dlq_topic(&topic);
    let recs = read_all(&bootstrap, &dlq, Duration::from_secs(20), |v| !v.is_empty()).await;
    assert_eq!(recs.len(), 1);
    let r = &recs[0];
    assert_eq!(header(r, DLQ_ORIGIN_TOPIC).as_deref(), Some(topic.as_str()));
    assert_eq!(header(r, DLQ_ORIGIN_PARTITION).as_deref(), Some("0"));
    assert_eq!(header(r, DLQ_ORIGIN_OFFSET).as_deref(), Some("0"));
    assert_eq!(header(r, DLQ_ATTEMPTS).as_deref(), Some("1"));
    assert_eq!(header(r, DLQ_HANDLER).as_deref(), Some("billing"));
    assert!(
        header(r, DLQ_ERROR)
            .unwrap()
            .contains("invoice total negative")
    );
    assert_eq!(r.key(), Some(&b"k1"[..]));
    assert_eq!(header(r, "soma-id"), Some(poison.id.to_string()));
    assert!(metrics.encode().contains("outcome=\"dead_lettered\""));

    // Fixed: replay sends it back to the origin, where it is handled.
    fail_ids.lock().clear();
    let report = replay_dlq(&cfg, &producer, &ReplayOptions::new(&dlq), Some(&metrics))
        .await
        .unwrap();
    assert_eq!(
        (report.replayed, report.exceeded, report.complete),
        (1, 0, true)
    );
    wait_for("replayed message handled", Duration::from_secs(30), || {
        handled.lock().iter().any(|e| e.id == poison.id)
    })
    .await;
    let replayed = handled
        .lock()
        .iter()
        .find(|e| e.id == poison.id)
        .cloned()
        .unwrap();
    assert_eq!(replayed.replay_count, 1);
    // A second replay run finds nothing new (progress is committed).
    let again = replay_dlq(&cfg, &producer, &ReplayOptions::new(&dlq), None)
        .await
        .unwrap();
    assert_eq!(again.replayed, 0);
    consumer.shutdown().await;
}

#[tokio::test]
async fn replay_stops_at_replay_max() {
    let bootstrap = soma_testkit::require_kafka();
    let cfg = config(&bootstrap);
    let topic = topic(&cfg, "loop").await;
    let producer = BusProducer::new(&cfg).unwrap();
    let mut e = envelope("k", 1);
    e.replay_count = cfg.consumer.replay_max; // already replayed the maximum number of times
    producer.send(&topic, &e).await.unwrap();
    let consumer = BusConsumer::builder(&cfg, &[&topic], "always-fails", |_e: Envelope| async {
        Err(HandlerError::fatal("still broken"))
    })
    .producer(producer.clone())
    .spawn()
    .unwrap();
    let dlq = cfg.dlq_topic(&topic);
    let recs = read_all(&bootstrap, &dlq, Duration::from_secs(30), |v| !v.is_empty()).await;
    assert_eq!(recs.len(), 1);
    let report = replay_dlq(&cfg, &producer, &ReplayOptions::new(&dlq), None)
        .await
        .unwrap();
    assert_eq!((report.replayed, report.exceeded), (0, 1));
    consumer.shutdown().await;
}

#[tokio::test]
async fn replay_republishes_only_to_the_topic_its_dlq_belongs_to() {
    let bootstrap = soma_testkit::require_kafka();
    let cfg = config(&bootstrap);
    let topic = topic(&cfg, "own").await;
    // Another topic the replay tool could write to, and must not.
    let victim = new_topic(&cfg, "victim", false).await;
    let dlq = cfg.dlq_topic(&topic);
    let raw: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()
        .unwrap();
    for (key, origin) in [("forged", victim.as_str()), ("genuine", topic.as_str())] {
        let e = envelope(key, 1);
        let mut headers = OwnedHeaders::new();
        for (k, v) in e.to_headers() {
            headers = headers.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            });
        }
        headers = headers.insert(Header {
            key: DLQ_ORIGIN_TOPIC,
            value: Some(origin.as_bytes()),
        });
        raw.send(
            FutureRecord::to(&dlq)
                .key(key)
                .payload(&e.payload[..])
                .headers(headers),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();
    }
    let producer = BusProducer::new(&cfg).unwrap();
    let metrics = MetricsRegistry::default();
    let report = replay_dlq(&cfg, &producer, &ReplayOptions::new(&dlq), Some(&metrics))
        .await
        .unwrap();
    assert_eq!(report.replayed, 1, "only the genuine record: {report:?}");
    let in_victim = read_all(&bootstrap, &victim, Duration::from_secs(3), |_| false).await;
    assert!(
        in_victim.is_empty(),
        "replay wrote {} record(s) into a topic the DLQ does not belong to",
        in_victim.len()
    );
    let in_topic = read_all(&bootstrap, &topic, Duration::from_secs(20), |v| {
        !v.is_empty()
    })
    .await;
    assert_eq!(in_topic.len(), 1);
    assert_eq!(in_topic[0].key(), Some(&b"genuine"[..]));

    assert_eq!(report.refused, 1, "{report:?}");
    assert_eq!(report.refusals.len(), 1);
    let refusal = &report.refusals[0];
    assert!(refusal.is_foreign_origin(), "{refusal}");
    assert!(refusal.to_string().contains(&victim), "{refusal}");
    let text = metrics.encode();
    assert!(
        text.lines()
            .any(|l| l.starts_with("soma_bus_dlq_replayed_total{")
                && l.contains(&format!("topic=\"{dlq}\""))
                && l.contains("outcome=\"refused\"")
                && l.ends_with(" 1")),
        "{text}"
    );

    // A topic that is not a DLQ is refused before anything is read.
    let e = replay_dlq(&cfg, &producer, &ReplayOptions::new(&topic), None)
        .await
        .unwrap_err();
    assert!(e.is_config(), "{e}");
}

#[tokio::test]
async fn retryable_errors_are_retried_then_dead_lettered() {
    let bootstrap = soma_testkit::require_kafka();
    let mut cfg = config(&bootstrap);
    cfg.consumer.max_attempts = 3;
    let topic = topic(&cfg, "retry").await;
    let producer = BusProducer::new(&cfg).unwrap();
    let flaky = envelope("k", 1);
    let doomed = envelope("k", 2);
    producer
        .send_many(&topic, &[flaky.clone(), doomed.clone()])
        .await
        .into_iter()
        .for_each(|r| {
            r.unwrap();
        });
    let calls = Arc::new(Mutex::new(Vec::<uuid::Uuid>::new()));
    let c = calls.clone();
    let flaky_id = flaky.id;
    let consumer = BusConsumer::builder(&cfg, &[&topic], "flaky", move |e: Envelope| {
        let c = c.clone();
        async move {
            let n = {
                let mut c = c.lock();
                c.push(e.id);
                c.iter().filter(|i| **i == e.id).count()
            };
            if e.id == flaky_id && n >= 2 {
                Ok(())
            } else {
                Err(HandlerError::retryable("db busy"))
            }
        }
    })
    .producer(producer)
    .spawn()
    .unwrap();
    let dlq = cfg.dlq_topic(&topic);
    let recs = read_all(&bootstrap, &dlq, Duration::from_secs(30), |v| !v.is_empty()).await;
    consumer.shutdown().await;
    assert_eq!(recs.len(), 1);
    assert_eq!(header(&recs[0], "soma-id"), Some(doomed.id.to_string()));
    assert_eq!(header(&recs[0], DLQ_ATTEMPTS).as_deref(), Some("3"));
    let calls = calls.lock();
    // Per-key order: the flaky message finished (2 calls) before the next started.
    assert_eq!(&calls[..2], &[flaky.id, flaky.id]);
    assert_eq!(calls.iter().filter(|i| **i == doomed.id).count(), 3);
}

/// A handler whose dependency is down reports `Unavailable`: the message
/// waits far beyond `max_attempts` and is never dead-lettered; the next
/// message of its key waits behind it; both are handled once it is back.
#[tokio::test]
async fn unavailable_dependencies_make_messages_wait_never_dead_letter() {
    let bootstrap = soma_testkit::require_kafka();
    let mut cfg = config(&bootstrap);
    cfg.consumer.max_attempts = 2;
    cfg.consumer.retry_backoff_initial_ms = 10;
    cfg.consumer.retry_backoff_max_ms = 40;
    let topic = topic(&cfg, "wait").await;
    let producer = BusProducer::new(&cfg).unwrap();
    let first = envelope("k", 1);
    let second = envelope("k", 2);
    for e in [&first, &second] {
        producer.send(&topic, e).await.unwrap();
    }
    let calls = Arc::new(Mutex::new(Vec::<uuid::Uuid>::new()));
    let down = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let (c, d) = (calls.clone(), down.clone());
    let consumer = BusConsumer::builder(&cfg, &[&topic], "waiter", move |e: Envelope| {
        let (c, d) = (c.clone(), d.clone());
        async move {
            c.lock().push(e.id);
            if d.load(std::sync::atomic::Ordering::SeqCst) {
                Err(HandlerError::unavailable("somabrain unreachable"))
            } else {
                Ok(())
            }
        }
    })
    .producer(producer)
    .spawn()
    .unwrap();
    wait_for("many waits", Duration::from_secs(30), || {
        calls.lock().len() >= 10
    })
    .await;
    assert!(
        calls.lock().iter().all(|i| *i == first.id),
        "the key's next message waits behind the first"
    );
    down.store(false, std::sync::atomic::Ordering::SeqCst);
    wait_for("both handled", Duration::from_secs(30), || {
        calls.lock().contains(&second.id)
    })
    .await;
    consumer.shutdown().await;
    let dlq = cfg.dlq_topic(&topic);
    let recs = read_all(&bootstrap, &dlq, Duration::from_secs(3), |v| !v.is_empty()).await;
    assert!(recs.is_empty(), "nothing dead-lettered: {}", recs.len());
}

#[tokio::test]
async fn malformed_records_go_to_dlq_without_wedging_the_partition() {
    let bootstrap = soma_testkit::require_kafka();
    let cfg = config(&bootstrap);
    let topic = topic(&cfg, "bad").await;
    let raw: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()
        .unwrap();
    // 1: no soma headers at all.
    raw.send(
        FutureRecord::<str, str>::to(&topic).key("k").payload("x"),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    // 2: a malformed schema version.
    let good = envelope("k", 1);
    let mut h = OwnedHeaders::new();
    for (k, v) in good.header_map() {
        let v = if k == "soma-schema-version" {
            "two".to_owned()
        } else {
            v
        };
        h = h.insert(Header {
            key: &k,
            value: Some(v.as_bytes()),
        });
    }
    raw.send(
        FutureRecord::<str, str>::to(&topic)
            .key("k")
            .payload("{}")
            .headers(h),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    // 3: valid headers, payload that is not the JSON the handler expects.
    let undecodable = Envelope::builder("test.event", "tenant-a", "k")
        .payload(b"not json".to_vec())
        .build()
        .unwrap();
    let producer = BusProducer::new(&cfg).unwrap();
    producer.send(&topic, &undecodable).await.unwrap();
    // 4: fine.
    producer.send(&topic, &good).await.unwrap();

    #[derive(serde::Deserialize)]
    struct Body {
        #[allow(dead_code)]
        n: u32,
    }
    let handled = Arc::new(Mutex::new(Vec::new()));
    let h2 = handled.clone();
    let consumer = BusConsumer::builder(&cfg, &[&topic], "strict", move |e: Envelope| {
        let h = h2.clone();
        async move {
            let _body: Body = e.json()?; // undecodable → fatal → DLQ
            h.lock().push(e.id);
            Ok(())
        }
    })
    .producer(producer)
    .spawn()
    .unwrap();
    wait_for("good message handled", Duration::from_secs(30), || {
        handled.lock().contains(&good.id)
    })
    .await;
    let recs = read_all(
        &bootstrap,
        &cfg.dlq_topic(&topic),
        Duration::from_secs(20),
        |v| v.len() >= 3,
    )
    .await;
    consumer.shutdown().await;
    assert_eq!(recs.len(), 3, "three bad records dead-lettered");
    let errors: Vec<String> = recs.iter().map(|r| header(r, DLQ_ERROR).unwrap()).collect();
    assert!(errors[0].contains("soma-id"), "{}", errors[0]);
    assert!(errors[1].contains("soma-schema-version"), "{}", errors[1]);
    assert!(errors[2].contains("JSON"), "{}", errors[2]);
    assert_eq!(header(&recs[0], DLQ_ATTEMPTS).as_deref(), Some("0"));
    assert_eq!(header(&recs[2], DLQ_ATTEMPTS).as_deref(), Some("1"));
    assert_eq!(recs[0].payload(), Some(&b"x"[..]), "original payload kept");
}

#[tokio::test]
async fn restarted_consumer_resumes_from_committed_offsets() {
    let bootstrap = soma_testkit::require_kafka();
    // Small lanes so shutdown has little buffered work to finish.
    let mut cfg = config(&bootstrap);
    cfg.consumer.concurrency = 4;
    cfg.consumer.lane_capacity = 4;
    let topic = topic(&cfg, "resume").await;
    let producer = BusProducer::new(&cfg).unwrap();
    let envs: Vec<Envelope> = (0..300)
        .map(|i| envelope(&format!("k{}", i % 7), i))
        .collect();
    for r in producer.send_many(&topic, &envs).await {
        r.unwrap();
    }
    let seen = Arc::new(Mutex::new(Vec::<(u8, uuid::Uuid)>::new()));
    let start = |run: u8| {
        let s = seen.clone();
        BusConsumer::builder(&cfg, &[&topic], "resume", move |e: Envelope| {
            let s = s.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(5)).await;
                s.lock().push((run, e.id));
                Ok(())
            }
        })
        .producer(producer.clone())
        .spawn()
        .unwrap()
    };
    let first = start(1);
    wait_for("first run progress", Duration::from_secs(30), || {
        seen.lock().len() >= 100
    })
    .await;
    let report = first.shutdown().await;
    assert!(report.drained && report.committed, "{report:?}");
    let after_first = seen.lock().len();
    assert!(after_first < 300, "first run should stop mid-stream");

    let second = start(2);
    wait_for("all messages", Duration::from_secs(60), || {
        seen.lock()
            .iter()
            .map(|(_, id)| *id)
            .collect::<HashSet<_>>()
            .len()
            == 300
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    second.shutdown().await;
    let seen = seen.lock();
    let ids: HashSet<_> = seen.iter().map(|(_, id)| *id).collect();
    assert_eq!(ids.len(), 300, "no message lost");
    // Graceful shutdown committed everything the first run handled: no redelivery.
    let dup = counts(seen.iter().map(|(_, id)| *id))
        .into_values()
        .filter(|n| *n > 1)
        .count();
    assert_eq!(
        dup, 0,
        "second run re-handled messages the first had committed"
    );
    assert!(seen.iter().any(|(r, _)| *r == 2));
}

#[tokio::test]
async fn consumers_named_into_different_groups_each_receive_every_message() {
    let bootstrap = soma_testkit::require_kafka();
    let cfg = config(&bootstrap);
    let topic = topic(&cfg, "groups").await;
    let producer = BusProducer::new(&cfg).unwrap();
    let envs: Vec<Envelope> = (0..20)
        .map(|i| envelope(&format!("k{}", i % 3), i))
        .collect();
    for r in producer.send_many(&topic, &envs).await {
        r.unwrap();
    }
    // One BusConfig, two groups named on the builder.
    let seen = Arc::new(Mutex::new(Vec::<(&'static str, uuid::Uuid)>::new()));
    let start = |group: &'static str| {
        let s = seen.clone();
        BusConsumer::builder(&cfg, &[&topic], "groups", move |e: Envelope| {
            let s = s.clone();
            async move {
                s.lock().push((group, e.id));
                Ok(())
            }
        })
        .group(format!("{}.{group}", cfg.consumer.group))
        .producer(producer.clone())
        .spawn()
        .unwrap()
    };
    let (a, b) = (start("a"), start("b"));
    wait_for("both groups", Duration::from_secs(60), || {
        let seen = seen.lock();
        ["a", "b"].iter().all(|g| {
            seen.iter()
                .filter(|(s, _)| s == g)
                .map(|(_, id)| *id)
                .collect::<HashSet<_>>()
                .len()
                == 20
        })
    })
    .await;
    a.shutdown().await;
    b.shutdown().await;

    // An empty group name is a configuration error, not a random group.
    let err = BusConsumer::builder(&cfg, &[&topic], "groups", |_e: Envelope| async { Ok(()) })
        .group("  ")
        .producer(producer.clone())
        .spawn()
        .expect_err("an empty group is refused");
    assert!(err.is_config(), "{err:?}");
}

#[tokio::test]
async fn a_broadcast_consumer_from_the_beginning_catches_up_on_what_the_topic_holds() {
    let bootstrap = soma_testkit::require_kafka();
    let cfg = config(&bootstrap);
    let topic = topic(&cfg, "catchup").await;
    let producer = BusProducer::new(&cfg).unwrap();
    // Published before the replica starts (e.g. earlier config updates).
    let before: Vec<Envelope> = (0..3).map(|i| envelope("cfg", i)).collect();
    for e in &before {
        producer.send(&topic, e).await.unwrap();
    }
    let seen = Arc::new(Mutex::new(Vec::<uuid::Uuid>::new()));
    let s = seen.clone();
    let consumer = BusConsumer::builder(&cfg, &[&topic], "config-updates", move |e: Envelope| {
        let s = s.clone();
        async move {
            s.lock().push(e.id);
            Ok(())
        }
    })
    .producer(producer.clone())
    .broadcast_from_beginning()
    .spawn()
    .unwrap();
    wait_for("earlier messages seen", Duration::from_secs(30), || {
        seen.lock().len() >= before.len()
    })
    .await;
    let later = envelope("cfg", 9);
    producer.send(&topic, &later).await.unwrap();
    wait_for("later message seen", Duration::from_secs(30), || {
        seen.lock().contains(&later.id)
    })
    .await;
    let order: Vec<uuid::Uuid> = before.iter().map(|e| e.id).chain([later.id]).collect();
    assert_eq!(*seen.lock(), order, "in publish order, each once");
    consumer.shutdown().await;
}

#[tokio::test]
async fn broadcast_subscribers_each_see_every_message() {
    let bootstrap = soma_testkit::require_kafka();
    let cfg = config(&bootstrap);
    let topic = topic(&cfg, "bcast").await;
    let producer = BusProducer::new(&cfg).unwrap();
    let a = Arc::new(Mutex::new(HashSet::new()));
    let b = Arc::new(Mutex::new(HashSet::new()));
    let mk = |set: Arc<Mutex<HashSet<uuid::Uuid>>>| {
        BusConsumer::builder(&cfg, &[&topic], "config-updates", move |e: Envelope| {
            let set = set.clone();
            async move {
                set.lock().insert(e.id);
                Ok(())
            }
        })
        .producer(producer.clone())
        .broadcast()
        .spawn()
        .unwrap()
    };
    let (ca, cb) = (mk(a.clone()), mk(b.clone()));
    // Both join from the end; publish until each has seen the same message.
    let mut common = None;
    for i in 0..60 {
        let e = envelope("cfg", i);
        producer.send(&topic, &e).await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        if a.lock().contains(&e.id) && b.lock().contains(&e.id) {
            common = Some(e.id);
            break;
        }
    }
    assert!(
        common.is_some(),
        "both broadcast subscribers received a message"
    );
    // After both are live, every later message reaches both.
    let later: Vec<Envelope> = (0..20).map(|i| envelope("cfg", 100 + i)).collect();
    for r in producer.send_many(&topic, &later).await {
        r.unwrap();
    }
    wait_for(
        "both see all later messages",
        Duration::from_secs(30),
        || {
            later
                .iter()
                .all(|e| a.lock().contains(&e.id) && b.lock().contains(&e.id))
        },
    )
    .await;
    ca.shutdown().await;
    cb.shutdown().await;
}

#[tokio::test]
async fn inbox_dedupe_drops_redelivered_messages() {
    let bootstrap = soma_testkit::require_kafka();
    let cfg = config(&bootstrap);
    let topic = topic(&cfg, "inbox").await;
    let producer = BusProducer::new(&cfg).unwrap();
    let ob = outbox(&require_postgres()).await;
    let e = envelope("k", 1);
    // The same message delivered twice (e.g. an ack lost during a broker failure).
    producer.send(&topic, &e).await.unwrap();
    producer.send(&topic, &e).await.unwrap();
    let marker = envelope("k", 2);
    producer.send(&topic, &marker).await.unwrap();
    let calls = Arc::new(Mutex::new(Vec::new()));
    let c = calls.clone();
    let consumer = BusConsumer::builder(&cfg, &[&topic], "ledger", move |e: Envelope| {
        let c = c.clone();
        async move {
            c.lock().push(e.id);
            Ok(())
        }
    })
    .producer(producer)
    .inbox(soma_bus::InboxDedupe::new(ob.inbox(), ob.pool().clone()))
    .spawn()
    .unwrap();
    wait_for("marker handled", Duration::from_secs(30), || {
        calls.lock().contains(&marker.id)
    })
    .await;
    consumer.shutdown().await;
    assert_eq!(*calls.lock(), vec![e.id, marker.id]);
}

/// While a handler runs (and retries), the inbox holds no transaction with
/// an assigned id: rows other sessions commit meanwhile stay claimable by an
/// outbox relay (`txid < pg_snapshot_xmin`). Before, the inbox record was
/// inserted in a transaction kept open across the handler, and every relay
/// of the database stalled behind it.
#[tokio::test]
async fn inbox_dedupe_holds_no_transaction_across_the_handler() {
    let bootstrap = soma_testkit::require_kafka();
    let cfg = config(&bootstrap);
    let topic = topic(&cfg, "inboxtx").await;
    let producer = BusProducer::new(&cfg).unwrap();
    let ob = outbox(&require_postgres()).await;
    let e = envelope("k", 1);
    producer.send(&topic, &e).await.unwrap();
    let (entered_tx, mut entered) = tokio::sync::mpsc::unbounded_channel();
    let release = Arc::new(tokio::sync::Notify::new());
    let r = release.clone();
    let consumer = BusConsumer::builder(&cfg, &[&topic], "slow", move |e: Envelope| {
        let entered_tx = entered_tx.clone();
        let r = r.clone();
        async move {
            let _ = entered_tx.send(e.id);
            r.notified().await;
            Ok(())
        }
    })
    .producer(producer)
    .inbox(soma_bus::InboxDedupe::new(ob.inbox(), ob.pool().clone()))
    .spawn()
    .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(30), entered.recv())
        .await
        .expect("handler entered")
        .unwrap();
    assert_eq!(got, e.id);
    // The handler is now blocked. A row committed now must become claimable.
    ob.enqueue_standalone(&[soma_outbox::NewMessage::new("other", b"x".to_vec()).with_key("k")])
        .await
        .unwrap();
    let claimable = format!(
        "SELECT bool_and(txid < pg_snapshot_xmin(pg_current_snapshot())) FROM \"{}\".outbox",
        ob.schema()
    );
    let mut ok = false;
    for _ in 0..100 {
        let all: Option<bool> = sqlx::query_scalar(&claimable)
            .fetch_one(ob.pool())
            .await
            .unwrap();
        if all == Some(true) {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        ok,
        "a row committed while the handler ran stayed behind an open inbox transaction"
    );
    release.notify_one();
    consumer.shutdown().await;
    // Recorded after the handler succeeded.
    let mut conn = ob.pool().acquire().await.unwrap();
    assert!(ob.inbox().contains(&mut conn, "slow", e.id).await.unwrap());
}

/// `Effects`: the inbox record and the outgoing messages commit together,
/// once per message id; a duplicate writes nothing.
#[tokio::test]
async fn effects_commit_once_per_message_id() {
    let bootstrap = soma_testkit::require_kafka();
    let cfg = config(&bootstrap);
    let ob = outbox(&require_postgres()).await;
    let publisher = DurablePublisher::builder(BusProducer::new(&cfg).unwrap(), ob.clone()).build();
    let effects = soma_bus::Effects::new(ob.pool().clone(), ob.inbox(), publisher);
    let cause = uuid::Uuid::now_v7();
    let out = envelope("conv-1", 1);
    assert!(
        effects
            .commit_once("worker", cause, &[("replies", &out)])
            .await
            .unwrap()
    );
    assert!(
        !effects
            .commit_once("worker", cause, &[("replies", &out)])
            .await
            .unwrap(),
        "a duplicate writes nothing"
    );
    // A rolled-back attempt records nothing: the message is handled later.
    let other = uuid::Uuid::now_v7();
    let mut tx = effects.begin("worker", other).await.unwrap().unwrap();
    tx.publish("replies", &envelope("conv-2", 1)).await.unwrap();
    drop(tx);
    assert!(effects.begin("worker", other).await.unwrap().is_some());
    let rows: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM \"{}\".outbox WHERE topic = 'replies'",
        ob.schema()
    ))
    .fetch_one(ob.pool())
    .await
    .unwrap();
    assert_eq!(rows, 1);
}

#[tokio::test]
async fn publish_in_tx_is_delivered_only_after_commit() {
    use sqlx::Connection;
    let bootstrap = soma_testkit::require_kafka();
    let cfg = config(&bootstrap);
    let topic = topic(&cfg, "tx").await;
    let producer = BusProducer::new(&cfg).unwrap();
    let ob = outbox(&require_postgres()).await;
    let relay = spawn_relay(&ob, producer.clone());
    let publisher = DurablePublisher::builder(producer, ob.clone()).build();
    let rolled_back = envelope("order-1", 1);
    let committed = envelope("order-1", 2);
    let mut conn = ob.pool().acquire().await.unwrap();
    let mut tx = conn.begin().await.unwrap();
    publisher
        .publish_in_tx(&mut tx, &topic, &rolled_back)
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    let mut tx = conn.begin().await.unwrap();
    publisher
        .publish_in_tx(&mut tx, &topic, &committed)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    // A direct publish of the same key right after must not overtake it.
    let direct = envelope("order-1", 3);
    let outcome = publisher.publish(&topic, &direct).await.unwrap();
    assert!(
        outcome.is_deferred(),
        "key still pending in the outbox: {outcome:?}"
    );
    let recs = read_all(&bootstrap, &topic, Duration::from_secs(30), |v| {
        v.len() >= 2
    })
    .await;
    let ids: Vec<String> = recs.iter().filter_map(|r| header(r, "soma-id")).collect();
    assert_eq!(ids, vec![committed.id.to_string(), direct.id.to_string()]);
    publisher.shutdown().await;
    relay.shutdown().await.unwrap();
}

/// `publish_many_in_tx`: one statement for a batch, delivered after commit
/// in input order; a batch with one invalid envelope writes nothing and
/// leaves the transaction usable.
#[tokio::test]
async fn publish_many_in_tx_writes_a_batch_in_order_or_nothing() {
    use sqlx::Connection;
    let bootstrap = soma_testkit::require_kafka();
    let cfg = config(&bootstrap);
    let topic = topic(&cfg, "txmany").await;
    let producer = BusProducer::new(&cfg).unwrap();
    let ob = outbox_with(&require_postgres(), |c| c.max_payload_bytes = 64).await;
    let publisher = DurablePublisher::builder(producer.clone(), ob.clone()).build();
    let mut conn = ob.pool().acquire().await.unwrap();

    let batch: Vec<Envelope> = (1..=4)
        .map(|i| envelope(if i % 2 == 0 { "b" } else { "a" }, i))
        .collect();
    let too_big = Envelope::builder("order.created", "t1", "a")
        .payload(vec![b'x'; 65])
        .build()
        .unwrap();
    let mut tx = conn.begin().await.unwrap();
    let mut refused: Vec<(&str, &Envelope)> = batch.iter().map(|e| (topic.as_str(), e)).collect();
    refused.push((topic.as_str(), &too_big));
    let err = publisher
        .publish_many_in_tx(&mut tx, &refused)
        .await
        .expect_err("one payload over the limit refuses the batch");
    assert!(err.to_string().contains("64"), "{err}");
    // Nothing written, and the transaction still takes the valid batch.
    let out: Vec<(&str, &Envelope)> = batch.iter().map(|e| (topic.as_str(), e)).collect();
    let ids = publisher.publish_many_in_tx(&mut tx, &out).await.unwrap();
    assert_eq!(ids, batch.iter().map(|e| e.id).collect::<Vec<_>>());
    let staged: i64 =
        sqlx::query_scalar(&format!("SELECT count(*) FROM \"{}\".outbox", ob.schema()))
            .fetch_one(&mut *tx)
            .await
            .unwrap();
    assert_eq!(staged, 4, "the refused batch left no row");
    tx.commit().await.unwrap();
    assert!(
        publisher
            .publish_many_in_tx(&mut conn, &[])
            .await
            .unwrap()
            .is_empty(),
        "an empty batch is no statement"
    );

    let relay = spawn_relay(&ob, producer);
    let recs = read_all(&bootstrap, &topic, Duration::from_secs(30), |v| {
        v.len() >= 4
    })
    .await;
    let got: Vec<String> = recs.iter().filter_map(|r| header(r, "soma-id")).collect();
    let of_key = |k: &str| -> Vec<String> {
        batch
            .iter()
            .filter(|e| e.key.as_deref() == Some(k))
            .map(|e| e.id.to_string())
            .collect()
    };
    for k in ["a", "b"] {
        let want = of_key(k);
        let seen: Vec<String> = got.iter().filter(|id| want.contains(id)).cloned().collect();
        assert_eq!(seen, want, "key {k} in input order: {got:?}");
    }
    assert_eq!(got.len(), 4, "each once: {got:?}");
    relay.shutdown().await.unwrap();
}

#[tokio::test]
async fn broker_health_check_reports_up_and_down() {
    use soma_observability::health::{ComponentStatus, HealthCheck};
    let bootstrap = soma_testkit::require_kafka();
    let up = soma_bus::TopicAdmin::new(&config(&bootstrap))
        .unwrap()
        .health_check()
        .check()
        .await;
    assert_eq!(up.status, ComponentStatus::Up, "{up:?}");
    let mut dead = config(&format!("127.0.0.1:{}", soma_testkit::free_port()));
    dead.topics.admin_timeout_ms = 500;
    let down = soma_bus::TopicAdmin::new(&dead)
        .unwrap()
        .health_check()
        .check()
        .await;
    assert_eq!(down.status, ComponentStatus::Down, "{down:?}");
    assert!(down.reason.unwrap().contains("metadata"));
}

/// While the transaction that wrote a key with `publish_many_in_tx` is still
/// open (the outbox cannot show the row yet), a direct publish of that key
/// is held back to the outbox, and the relay delivers the transaction's
/// message first once it commits.
#[tokio::test]
async fn a_key_written_in_an_open_transaction_holds_direct_publishes_back() {
    use sqlx::Connection;
    let bootstrap = soma_testkit::require_kafka();
    let mut cfg = config(&bootstrap);
    cfg.publisher.pending_key_poll_interval_ms = 50;
    let topic = topic(&cfg, "txhold").await;
    let producer = BusProducer::new(&cfg).unwrap();
    let ob = outbox(&require_postgres()).await;
    let publisher = DurablePublisher::builder(producer.clone(), ob.clone()).build();
    let in_tx = envelope("order-9", 1);
    let direct = envelope("order-9", 2);
    let mut conn = ob.pool().acquire().await.unwrap();
    let mut tx = conn.begin().await.unwrap();
    publisher
        .publish_many_in_tx(&mut tx, &[(topic.as_str(), &in_tx)])
        .await
        .unwrap();
    // Long enough for the pending-key poller to look several times: the
    // outbox shows nothing for the key (the row is not committed), and the
    // key must stay held anyway.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let outcome = publisher.publish(&topic, &direct).await.unwrap();
    assert!(
        outcome.is_deferred(),
        "the key is held while its transaction is open: {outcome:?}"
    );
    tx.commit().await.unwrap();
    let relay = spawn_relay(&ob, producer);
    let recs = read_all(&bootstrap, &topic, Duration::from_secs(30), |v| {
        v.len() >= 2
    })
    .await;
    let ids: Vec<String> = recs.iter().filter_map(|r| header(r, "soma-id")).collect();
    assert_eq!(ids, vec![in_tx.id.to_string(), direct.id.to_string()]);
    publisher.shutdown().await;
    relay.shutdown().await.unwrap();
}
