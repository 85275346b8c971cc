//! Scenario 6 — the idempotent producer's error paths, on librdkafka's mock
//! cluster. tansu does not enforce producer sequence numbers (it accepts
//! any sequence), so it cannot say `OUT_OF_ORDER_SEQUENCE_NUMBER` or
//! `DUPLICATE_SEQUENCE_NUMBER`; the mock cluster implements the broker's
//! idempotence checks and injects request errors.
//!
//! Each case sends 200 keyed messages in chunks through `BusProducer` with
//! the fault injected from the third chunk on, reads the topic back, and
//! asserts: every message acknowledged `Ok` is in the log, at the offset
//! the acknowledgement named (never `Ok` for a lost message); no message is
//! in the log twice (one producer, idempotence on); and each key's records
//! are in send order (no reordering).
//!
//! "Lost responses inside and outside the in-flight window": the mock
//! broker delays its responses past `request.timeout.ms`, so requests it
//! already persisted are retried. With one request in flight the retry is
//! the only outstanding batch; with the full window (five, the most
//! idempotence allows, one message per request) every retried batch is
//! inside the broker's five-batch deduplication window — a window of more
//! than five unacknowledged batches cannot arise, which is why soma-bus
//! caps `max_in_flight` at 5.
//!
//! Answers librdkafka `0090-idempotence`, `0094-idempotence_msg_timeout`,
//! `0144-idempotence_mock` and `0076-produce_retry`.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use rdkafka::message::Message;
use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use soma_bus::{BusProducer, Delivery, Envelope};

use crate::common::{config, header, read_all};
use crate::harness::{Msgs, bounded, quiet_logs};

enum Fault {
    /// Responses delayed by this much during chunks 3 and 4.
    SlowResponses(Duration),
    /// These errors answer the next produce requests.
    Errors(Vec<RDKafkaRespErr>),
}

struct Case {
    max_in_flight: u32,
    one_message_per_request: bool,
    librdkafka: &'static [(&'static str, &'static str)],
    fault: Fault,
}

#[derive(Debug)]
struct Outcome {
    ok: usize,
    err: usize,
    in_log: usize,
    purges: u64,
    heals: u64,
    ok_after_fault: usize,
}

const KEYS: usize = 4;

async fn run(case: Case) -> Outcome {
    quiet_logs();
    let mock = MockCluster::new(1).expect("librdkafka mock cluster");
    let topic = "idem";
    mock.create_topic(topic, 2, 1).unwrap();
    let mut cfg = config(&mock.bootstrap_servers());
    cfg.publisher.timeout_ms = 10_000;
    cfg.producer.max_in_flight = case.max_in_flight;
    if case.one_message_per_request {
        cfg.producer.batch_num_messages = 1;
        cfg.producer.linger_ms = 0;
    }
    for (k, v) in case.librdkafka {
        cfg.librdkafka.insert((*k).into(), (*v).into());
    }
    let producer = BusProducer::new(&cfg).unwrap();
    let mut msgs = Msgs::new();
    let mut sent: Vec<(Envelope, Result<Delivery, soma_bus::BusError>)> = Vec::new();
    let mut ok_after_fault = 0;
    for chunk in 0..10 {
        if chunk == 2 {
            match &case.fault {
                Fault::SlowResponses(rtt) => mock.broker_round_trip_time(1, *rtt).unwrap(),
                Fault::Errors(errs) => mock.request_errors(RDKafkaApiKey::Produce, errs),
            }
        }
        if chunk == 4 {
            if let Fault::SlowResponses(..) = case.fault {
                mock.broker_round_trip_time(1, Duration::ZERO).unwrap();
            }
        }
        let envs: Vec<_> = (0..20)
            .map(|i| msgs.next(topic, &format!("k{}", i % KEYS), "p"))
            .collect();
        let rs = producer.send_many(topic, &envs).await;
        for (e, r) in envs.into_iter().zip(rs) {
            if chunk >= 6 && r.is_ok() {
                ok_after_fault += 1;
            }
            sent.push((e, r));
        }
    }
    let total = sent.len();
    let log = read_all(
        &mock.bootstrap_servers(),
        topic,
        Duration::from_secs(8),
        |out| out.len() >= total,
    )
    .await;

    let mut at: HashMap<String, (i32, i64)> = HashMap::new();
    for m in &log {
        let id = header(m, "soma-id").expect("soma-id header");
        assert!(
            at.insert(id.clone(), (m.partition(), m.offset())).is_none(),
            "{id} is in the log twice"
        );
    }
    let mut ok = 0;
    for (e, r) in &sent {
        if let Ok(d) = r {
            ok += 1;
            let got = at.get(&e.id.to_string());
            assert!(
                got.is_some(),
                "Ok for a message that is not in the log: {d:?}"
            );
            if d.offset >= 0 {
                assert_eq!(got, Some(&(d.partition, d.offset)), "acknowledged offset");
            }
        }
    }
    // Per key, the log holds the sent order (a subsequence of it).
    let seq_of: HashMap<String, (String, usize)> = sent
        .iter()
        .enumerate()
        .map(|(i, (e, _))| (e.id.to_string(), (e.key.clone().unwrap(), i)))
        .collect();
    let mut last: HashMap<&str, usize> = HashMap::new();
    let mut seen_keys = HashSet::new();
    for m in &log {
        let (key, i) = &seq_of[&header(m, "soma-id").unwrap()];
        seen_keys.insert(key.clone());
        if let Some(prev) = last.insert(key, *i) {
            assert!(*i > prev, "key {key} reordered: message {i} after {prev}");
        }
    }
    Outcome {
        ok,
        err: total - ok,
        in_log: log.len(),
        purges: producer.purge_count(),
        heals: producer.heal_count(),
        ok_after_fault,
    }
}

fn check(name: &str, o: &Outcome) {
    eprintln!("{name}: {o:?}");
    assert!(o.in_log >= o.ok, "every Ok is in the log: {o:?}");
    assert_eq!(
        o.ok_after_fault, 80,
        "the producer sends again after the fault: {o:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_responses_with_one_request_in_flight() {
    let o = bounded(
        "lost responses, 1 in flight",
        Duration::from_secs(60),
        run(Case {
            max_in_flight: 1,
            one_message_per_request: false,
            librdkafka: &[("request.timeout.ms", "1000")],
            fault: Fault::SlowResponses(Duration::from_millis(1_500)),
        }),
    )
    .await;
    check("lost responses, 1 in flight", &o);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_responses_with_the_full_in_flight_window() {
    let o = bounded(
        "lost responses, window",
        Duration::from_secs(60),
        run(Case {
            max_in_flight: 5,
            one_message_per_request: true,
            librdkafka: &[("request.timeout.ms", "1000")],
            fault: Fault::SlowResponses(Duration::from_millis(1_500)),
        }),
    )
    .await;
    check("lost responses, window", &o);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_order_sequence_number() {
    let o = bounded(
        "out of order sequence",
        Duration::from_secs(60),
        run(Case {
            max_in_flight: 5,
            one_message_per_request: true,
            librdkafka: &[],
            fault: Fault::Errors(vec![
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER;
            2
        ]),
        }),
    )
    .await;
    check("out of order sequence", &o);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_enough_replicas_after_append() {
    let o = bounded(
        "not enough replicas after append",
        Duration::from_secs(60),
        run(Case {
            max_in_flight: 5,
            one_message_per_request: false,
            librdkafka: &[],
            fault: Fault::Errors(vec![
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS_AFTER_APPEND;
            3
        ]),
        }),
    )
    .await;
    check("not enough replicas after append", &o);
}

/// A fatal idempotence error (`enable.gapless.guarantee` turns a sequence
/// error into one) drives the purge + new-handle path: what was in flight
/// fails, the fresh handle sends again, nothing is reordered, and nothing
/// lost is reported `Ok`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fatal_error_purges_and_continues_on_a_new_handle() {
    let o = bounded(
        "fatal error",
        Duration::from_secs(60),
        run(Case {
            max_in_flight: 5,
            one_message_per_request: true,
            librdkafka: &[("enable.gapless.guarantee", "true")],
            fault: Fault::Errors(vec![
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER;
            1
        ]),
        }),
    )
    .await;
    check("fatal error", &o);
    assert!(
        o.purges + o.heals >= 1,
        "a fresh handle after the fatal error: {o:?}"
    );
    assert!(
        o.err > 0,
        "the fatal error failed what was in flight: {o:?}"
    );
}
