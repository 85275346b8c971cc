//! The producer heals: a broker that answers but keeps failing the
//! producer's sends gets a fresh producer (new producer id) after three
//! failures in a row, without a restart. Runs on librdkafka's mock cluster,
//! which can inject produce errors a real broker only shows when it is
//! broken (as tansu's storage did after a restart).

mod common;

use std::time::Duration;

use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use soma_bus::BusProducer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_that_keeps_failing_is_replaced_and_sends_again() {
    let mock = MockCluster::new(1).expect("librdkafka mock cluster");
    mock.create_topic("heal", 1, 1).expect("mock topic");
    let mut cfg = common::config(&mock.bootstrap_servers());
    cfg.publisher.timeout_ms = 10_000;
    let producer = BusProducer::new(&cfg).unwrap();
    producer
        .send("heal", &common::envelope("k", 0))
        .await
        .expect("first send");
    assert_eq!(producer.heal_count(), 0);

    // The broker now refuses every produce request with an error that is
    // neither about the record nor retried by librdkafka.
    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_INVALID_REQUIRED_ACKS; 3],
    );
    let mut failures = 0;
    for n in 1..=3 {
        let r = producer.send("heal", &common::envelope("k", n)).await;
        let e = r.expect_err("the broker refuses the produce request");
        assert!(!e.is_permanent(), "{e}");
        failures += 1;
    }
    assert_eq!(failures, 3);
    assert_eq!(
        producer.heal_count(),
        1,
        "three failures in a row heal once"
    );

    // The fresh producer sends; the broker answers again.
    let d = tokio::time::timeout(
        Duration::from_secs(10),
        producer.send("heal", &common::envelope("k", 4)),
    )
    .await
    .expect("send after healing returns")
    .expect("send after healing succeeds");
    assert!(d.offset >= 1, "{d:?}");
    assert_eq!(producer.heal_count(), 1);
}
