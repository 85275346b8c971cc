//! The one ordered send every batch path uses (`send_many`, the durable
//! publisher, the relay's Kafka sink): a transient failure stops the send
//! and nothing after it goes; a record refused for good fails alone.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::message::Message;
use soma_bus::{BusConfig, BusError, BusProducer, Envelope, KafkaSink};
use soma_outbox::{OutboxRecord, Sink, SinkOutcome};

use common::*;

/// An envelope of key `key` whose payload is `size` bytes (`n` first).
fn sized(key: &str, n: u8, size: usize) -> Envelope {
    let mut payload = vec![b'x'; size];
    payload[0] = n;
    Envelope::builder("test.event", "tenant-a", key)
        .payload(payload)
        .build()
        .unwrap()
}

/// librdkafka refuses a record over `message.max.bytes` when it is
/// enqueued: a permanent refusal of that record alone.
const MAX_BYTES: &str = "1000";
const TOO_LARGE: usize = 4_000;

#[tokio::test]
async fn a_transient_failure_stops_the_send_and_nothing_after_it_is_sent() {
    // No broker (nothing listens on port 1) and room for one record: the
    // first is enqueued and never acknowledged, the second waits for room
    // until the deadline (a transient failure), the third is never tried.
    let mut cfg = BusConfig::default();
    cfg.bootstrap_servers = "127.0.0.1:1".into();
    cfg.producer.queue_buffering_max_messages = 1;
    cfg.publisher.timeout_ms = 400;
    let producer = BusProducer::new(&cfg).unwrap();
    let envs = [envelope("k", 1), envelope("k", 2), envelope("k", 3)];
    let started = std::time::Instant::now();
    let r = producer.send_many("ordered-send-nowhere", &envs).await;
    assert_eq!(r.len(), 3);
    for (i, r) in r.iter().take(2).enumerate() {
        let e = r.as_ref().expect_err("nothing can be acknowledged");
        assert!(e.is_timeout() && !e.is_permanent(), "record {i}: {e}");
    }
    let third = r[2].as_ref().unwrap_err();
    assert!(
        matches!(third, BusError::NotSent(_)),
        "the record after the failed one is not sent: {third}"
    );
    assert_eq!(
        producer.purge_count(),
        1,
        "the unacknowledged one is purged"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "one deadline for the whole send: {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn send_many_refuses_a_too_large_record_alone_and_delivers_the_rest_in_order() {
    let bootstrap = soma_testkit::require_kafka();
    let mut cfg = config(&bootstrap);
    cfg.librdkafka
        .insert("message.max.bytes".into(), MAX_BYTES.into());
    let topic = new_topic(&cfg, "ordered-many", false).await;
    let producer = BusProducer::new(&cfg).unwrap();
    let envs = [
        sized("a", 1, 10),
        sized("a", 2, TOO_LARGE),
        sized("a", 3, 10),
        sized("b", 4, 10),
    ];
    let r = producer.send_many(&topic, &envs).await;
    let refused = r[1].as_ref().unwrap_err();
    assert!(refused.is_permanent(), "{refused}");
    for i in [0, 2, 3] {
        assert!(r[i].is_ok(), "record {i}: {:?}", r[i]);
    }
    let got = read_all(&bootstrap, &topic, Duration::from_secs(30), |m| {
        m.len() >= 3
    })
    .await;
    let firsts: Vec<u8> = got
        .iter()
        .filter(|m| m.key() == Some(b"a".as_slice()))
        .map(|m| m.payload().unwrap()[0])
        .collect();
    assert_eq!(firsts, vec![1, 3], "key a in order, the refused one absent");
}

#[tokio::test]
async fn the_kafka_sink_holds_back_the_rest_of_a_refused_key_and_sends_other_keys() {
    let bootstrap = soma_testkit::require_kafka();
    let mut cfg = config(&bootstrap);
    cfg.librdkafka
        .insert("message.max.bytes".into(), MAX_BYTES.into());
    let topic = new_topic(&cfg, "ordered-sink", false).await;
    let sink = KafkaSink::new(BusProducer::new(&cfg).unwrap());
    let record = |key: &str, n: u8, size: usize| {
        let mut payload = vec![b'x'; size];
        payload[0] = n;
        OutboxRecord {
            id: uuid::Uuid::new_v4(),
            topic: topic.clone(),
            key: Some(key.to_owned()),
            payload,
            headers: BTreeMap::new(),
            attempts: 0,
            created_at: chrono::Utc::now(),
        }
    };
    let batch = [
        record("a", 1, 10),
        record("a", 2, TOO_LARGE),
        record("a", 3, 10),
        record("b", 4, 10),
    ];
    let out = sink.send_batch(&batch).await;
    assert!(matches!(out[0], SinkOutcome::Delivered), "{:?}", out[0]);
    assert!(matches!(out[1], SinkOutcome::Reject { .. }), "{:?}", out[1]);
    assert!(
        matches!(out[2], SinkOutcome::Retry { .. }),
        "a later record of the refused key waits: {:?}",
        out[2]
    );
    assert!(matches!(out[3], SinkOutcome::Delivered), "{:?}", out[3]);
    let got = read_all(&bootstrap, &topic, Duration::from_secs(30), |m| {
        m.len() >= 2
    })
    .await;
    let mut firsts: Vec<u8> = got.iter().map(|m| m.payload().unwrap()[0]).collect();
    firsts.sort_unstable();
    assert_eq!(firsts, vec![1, 4]);
}

#[tokio::test]
async fn after_a_stop_the_sink_reports_every_later_record_unavailable_even_of_a_refused_key() {
    // No broker, room for one record, records over 1,000 bytes refused:
    // a1 is refused for good, b1 is enqueued (and purged at the deadline),
    // b2 waits for room until the deadline (the stop), a2 comes after the
    // stop. A record after a stop is the broker's problem, not its own: it
    // must not lose an attempt (Retry) because its key had a refusal.
    let mut cfg = BusConfig::default();
    cfg.bootstrap_servers = "127.0.0.1:1".into();
    cfg.producer.queue_buffering_max_messages = 1;
    cfg.publisher.timeout_ms = 400;
    cfg.librdkafka
        .insert("message.max.bytes".into(), MAX_BYTES.into());
    let sink = KafkaSink::new(BusProducer::new(&cfg).unwrap());
    let record = |key: &str, size: usize| OutboxRecord {
        id: uuid::Uuid::new_v4(),
        topic: "ordered-sink-nowhere".into(),
        key: Some(key.to_owned()),
        payload: vec![b'x'; size],
        headers: BTreeMap::new(),
        attempts: 0,
        created_at: chrono::Utc::now(),
    };
    let batch = [
        record("a", TOO_LARGE),
        record("b", 10),
        record("b", 10),
        record("a", 10),
    ];
    let out = sink.send_batch(&batch).await;
    assert!(matches!(out[0], SinkOutcome::Reject { .. }), "{:?}", out[0]);
    for (i, o) in out.iter().enumerate().skip(1) {
        assert!(
            matches!(o, SinkOutcome::Unavailable { .. }),
            "record {i}: {o:?}"
        );
    }
}
