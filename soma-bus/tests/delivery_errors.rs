//! The durable publisher files an error the broker reports for a record it
//! already enqueued (the delivery report) by its kind: a transient error
//! sends the message to the outbox, from where the relay delivers it in key
//! order; a permanent one (the record itself is refused) is the caller's.
//!
//! Runs on librdkafka's mock cluster, which answers the next produce
//! request with an injected error, and real PostgreSQL. A timeout or purge
//! reaches the publisher as `BusError::Timeout`, never as a Kafka error, so
//! these tests inject broker errors librdkafka does not retry and reports
//! per message as they are.

mod common;

use std::time::{Duration, Instant};

use rdkafka::message::Message;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use soma_bus::{BusConfig, BusError, BusProducer, DurablePublisher, PublishOutcome};
use soma_observability::MetricsRegistry;
use soma_observability::resilience::BreakerState;
use soma_outbox::Outbox;

use common::*;

const TOPIC: &str = "delivery-errors";

/// Well under the time bound of each test, and far above what a delivery
/// report of the mock cluster takes: a publish that returns before it did
/// not time out.
const PUBLISH_TIMEOUT_MS: u64 = 5_000;

struct Setup {
    mock: MockCluster<'static, DefaultProducerContext>,
    cfg: BusConfig,
    producer: BusProducer,
    outbox: Outbox,
    publisher: DurablePublisher,
    metrics: MetricsRegistry,
}

/// A one-broker mock cluster with [`TOPIC`] (one partition), a fresh
/// outbox, and a publisher on both.
async fn setup() -> Setup {
    let mock = MockCluster::new(1).expect("librdkafka mock cluster");
    mock.create_topic(TOPIC, 1, 1).expect("mock topic");
    let mut cfg = config(&mock.bootstrap_servers());
    cfg.publisher.timeout_ms = PUBLISH_TIMEOUT_MS;
    cfg.publisher.pending_key_poll_interval_ms = 100;
    let producer = BusProducer::new(&cfg).unwrap();
    let outbox = outbox(&require_postgres()).await;
    let metrics = MetricsRegistry::default();
    let publisher = DurablePublisher::builder(producer.clone(), outbox.clone())
        .metrics(&metrics)
        .build();
    Setup {
        mock,
        cfg,
        producer,
        outbox,
        publisher,
        metrics,
    }
}

/// The value of `soma_bus_published_total` for [`TOPIC`] and `outcome`.
fn published(metrics: &MetricsRegistry, outcome: &str) -> Option<f64> {
    let text = metrics.encode();
    text.lines()
        .find(|l| {
            l.starts_with("soma_bus_published_total{")
                && l.contains(&format!("topic=\"{TOPIC}\""))
                && l.contains(&format!("outcome=\"{outcome}\""))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// `(id, key)` of every outbox row not yet sent, in relay order.
async fn pending_rows(ob: &Outbox) -> Vec<(uuid::Uuid, Option<String>)> {
    sqlx::query_as(&format!(
        "SELECT id, key FROM \"{}\".outbox WHERE sent_at IS NULL ORDER BY txid, seq",
        ob.schema()
    ))
    .fetch_all(ob.pool())
    .await
    .unwrap()
}

async fn bounded<T>(f: impl std::future::Future<Output = T>) -> T {
    let limit = Duration::from_secs(30);
    tokio::time::timeout(limit, f)
        .await
        .unwrap_or_else(|_| panic!("exceeded the test's time bound of {limit:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transient_delivery_error_defers_the_message_and_the_relay_delivers_it_in_key_order() {
    bounded(async {
        let Setup {
            mock,
            cfg,
            producer,
            outbox,
            publisher,
            metrics,
        } = setup().await;
        let k: Vec<_> = (0..3).map(|n| envelope("k", n)).collect();
        let first = publisher.publish(TOPIC, &k[0]).await.expect("k0");
        assert!(
            matches!(first, PublishOutcome::Published { .. }),
            "{first:?}"
        );
        // The acknowledged delivery is counted as published to Kafka.
        assert_eq!(published(&metrics, "kafka"), Some(1.0));

        // The broker answers the next produce request with an error that
        // is about the broker, not the record (`is_permanent()` is false),
        // and that librdkafka does not retry: k1 is enqueued, then its
        // delivery report carries the error.
        mock.request_errors(
            RDKafkaApiKey::Produce,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_INVALID_REQUIRED_ACKS],
        );
        let started = Instant::now();
        let second = publisher.publish(TOPIC, &k[1]).await;
        assert_eq!(
            second.as_ref().ok(),
            Some(&PublishOutcome::Deferred(k[1].id)),
            "a transient delivery error sends the message to the outbox, \
             not back to the caller: {second:?}"
        );
        assert!(
            started.elapsed() < Duration::from_millis(cfg.publisher.timeout_ms),
            "deferred on the delivery report, not at the publish deadline: {:?}",
            started.elapsed()
        );
        assert_eq!(
            publisher.breaker_state(),
            BreakerState::Open,
            "the failed delivery counts against Kafka (threshold 1)"
        );
        assert_eq!(
            pending_rows(&outbox).await,
            vec![(k[1].id, Some("k".to_owned()))],
            "k1 waits in the outbox"
        );

        // k2 follows k1 to the outbox rather than overtake it.
        let third = publisher.publish(TOPIC, &k[2]).await.expect("k2");
        assert_eq!(third, PublishOutcome::Deferred(k[2].id));

        let relay = spawn_relay(&outbox, producer.clone());
        soma_testkit::wait_until(
            "the relay drains the outbox",
            Duration::from_secs(15),
            || {
                let ob = outbox.clone();
                async move { ob.stats().await.unwrap().pending == 0 }
            },
        )
        .await;
        let log = read_all(
            &mock.bootstrap_servers(),
            TOPIC,
            Duration::from_secs(10),
            |m| m.len() >= 3,
        )
        .await;
        let ids: Vec<String> = log
            .iter()
            .filter(|m| m.key() == Some(b"k".as_slice()))
            .filter_map(|m| header(m, "soma-id"))
            .collect();
        let want: Vec<String> = k.iter().map(|e| e.id.to_string()).collect();
        assert_eq!(ids, want, "k0 from Kafka, then k1 and k2 relayed, in order");

        relay.shutdown().await.unwrap();
        publisher.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_delivery_error_is_returned_to_the_caller_and_nothing_is_deferred() {
    bounded(async {
        let Setup {
            mock,
            outbox,
            publisher,
            ..
        } = setup().await;
        let first = publisher
            .publish(TOPIC, &envelope("k", 0))
            .await
            .expect("k0");
        assert!(
            matches!(first, PublishOutcome::Published { .. }),
            "{first:?}"
        );

        // The broker refuses the record for good once it was enqueued.
        mock.request_errors(
            RDKafkaApiKey::Produce,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED],
        );
        let refused = publisher.publish(TOPIC, &envelope("k", 1)).await;
        let err = refused.expect_err("a permanent delivery error is the caller's");
        assert!(
            matches!(err, BusError::Kafka(_)) && err.is_permanent(),
            "{err:?}"
        );
        assert_eq!(pending_rows(&outbox).await, vec![], "nothing deferred");
        assert_eq!(publisher.deferred_key_count(), 0);
        publisher.shutdown().await;
    })
    .await;
}
