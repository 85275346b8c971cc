//! Shared helpers for soma-bus integration tests (real tansu, real Postgres);
//! the private brokers, the fault proxy, the Kafka readers and `median` are
//! soma-testkit's.
#![allow(dead_code, unreachable_pub, unused_imports)]

use std::collections::HashMap;

use rdkafka::ClientConfig;
use soma_bus::{BusConfig, Envelope, TopicAdmin};
use soma_outbox::{Outbox, OutboxConfig};

pub use soma_testkit::kafka::{
    BOUNDED_FETCH_BYTES, header, read_all, read_all_with, read_partitionwise,
};
pub use soma_testkit::{FaultProxy, OwnBroker, median, wait_for};

/// A raw rdkafka producer with the producer settings `cfg` gives the bus
/// (acks=all, idempotence, linger, batching, in-flight): the baseline the
/// benchmarks compare the bus with.
pub fn raw_producer(cfg: &BusConfig) -> rdkafka::producer::FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", &cfg.bootstrap_servers)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", cfg.linger_ms.to_string())
        .set("batch.size", cfg.batch_size_bytes.to_string())
        .set("batch.num.messages", cfg.batch_num_messages.to_string())
        .set(
            "max.in.flight.requests.per.connection",
            cfg.max_in_flight.to_string(),
        )
        .create()
        .expect("raw rdkafka producer")
}

/// A keyed test envelope whose JSON payload is `{"n": n}`.
pub fn env(key: &str, n: u32) -> Envelope {
    Envelope::builder("test.event", "tenant-a", key)
        .json(&serde_json::json!({ "n": n }))
        .unwrap()
        .build()
        .unwrap()
}

/// Config for the shared broker with a unique consumer group.
pub fn config(bootstrap: &str) -> BusConfig {
    let mut c = BusConfig::default();
    c.bootstrap_servers = bootstrap.to_owned();
    c.client_id = "soma-bus-test".into();
    c.consumer_group = soma_testkit::unique_name("g");
    c.publish_timeout_ms = 3_000;
    c.retry_backoff_initial_ms = 20;
    c.retry_backoff_max_ms = 100;
    c.dlq_retry_backoff_ms = 200;
    c.commit_interval_ms = 200;
    c.lag_interval_ms = 1_000;
    c.session_timeout_ms = 6_000;
    c.shutdown_timeout_ms = 10_000;
    c
}

/// A topic (and its DLQ) created on the broker.
pub async fn topic(cfg: &BusConfig, prefix: &str) -> String {
    new_topic(cfg, prefix, true).await
}

/// A fresh topic named from `prefix`, with its `.dlq` when `with_dlq`.
pub async fn new_topic(cfg: &BusConfig, prefix: &str, with_dlq: bool) -> String {
    let t = soma_testkit::unique_name(prefix);
    TopicAdmin::new(cfg)
        .unwrap()
        .ensure_topics(&[&t], with_dlq)
        .await
        .unwrap();
    t
}

/// An outbox in a fresh schema of the `test` database.
pub async fn outbox() -> Outbox {
    outbox_with(|_| {}).await
}

/// [`outbox`] with its config changed by `tune` first.
pub async fn outbox_with(tune: impl FnOnce(&mut OutboxConfig)) -> Outbox {
    let url = soma_testkit::require_postgres();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .connect(&url)
        .await
        .unwrap();
    let mut config = OutboxConfig::new(soma_testkit::unique_name("bus"));
    tune(&mut config);
    Outbox::new(pool, config).await.unwrap()
}

/// Counts occurrences of each value.
pub fn counts<T: std::hash::Hash + Eq + Clone>(
    items: impl IntoIterator<Item = T>,
) -> HashMap<T, usize> {
    let mut m = HashMap::new();
    for i in items {
        *m.entry(i).or_insert(0) += 1;
    }
    m
}
