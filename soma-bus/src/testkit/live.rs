//! Helpers for tests and benchmarks against a real broker and PostgreSQL:
//! a config tuned for tests, fresh topics and outboxes, test envelopes, and
//! the raw rdkafka producer the benchmarks compare the bus with.

use rdkafka::ClientConfig;
use rdkafka::producer::FutureProducer;
use soma_outbox::{Outbox, OutboxConfig};

use crate::admin::TopicAdmin;
use crate::config::BusConfig;
use crate::envelope::Envelope;

/// A name unique to this process and call, `<prefix>_<pid>_<uuid>`: lowercase
/// ASCII, digits and `_`, valid as a Kafka topic, consumer group or Postgres
/// schema name.
fn unique_name(prefix: &str) -> String {
    let clean: String = prefix
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    format!(
        "{clean}_{}_{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    )
}

/// A [`BusConfig`] for tests on the broker at `bootstrap`: a fresh consumer
/// group (so every call consumes from the beginning of its own offsets), and
/// short timeouts, backoffs and intervals (publish timeout 3 s, retry
/// backoff 20–100 ms, DLQ retry backoff 200 ms, commit every 200 ms, lag
/// every 1 s, session timeout 6 s, shutdown 10 s), so failures show within
/// a test's time.
pub fn config(bootstrap: &str) -> BusConfig {
    let mut config = BusConfig {
        bootstrap_servers: bootstrap.to_owned(),
        client_id: "soma-bus-test".into(),
        ..BusConfig::default()
    };
    config.publisher.timeout_ms = 3_000;
    let consumer = &mut config.consumer;
    consumer.group = unique_name("g");
    consumer.retry_backoff_initial_ms = 20;
    consumer.retry_backoff_max_ms = 100;
    consumer.dlq_retry_backoff_ms = 200;
    consumer.commit_interval_ms = 200;
    consumer.lag_interval_ms = 1_000;
    consumer.session_timeout_ms = 6_000;
    consumer.shutdown_timeout_ms = 10_000;
    config
}

/// A test envelope of type `test.event` in tenant `tenant-a`, keyed `key`,
/// whose JSON payload is `{"n": n}`.
///
/// # Panics
///
/// If `key` is empty (an envelope built with a key needs a non-empty one).
pub fn envelope(key: &str, n: u32) -> Envelope {
    Envelope::builder("test.event", "tenant-a", key)
        .json(&serde_json::json!({ "n": n }))
        .unwrap()
        .build()
        .unwrap()
}

/// A fresh topic named from `prefix`, and its `.dlq`, created on `cfg`'s
/// broker: [`new_topic`] with the dead-letter topic.
///
/// # Panics
///
/// As [`new_topic`].
pub async fn topic(cfg: &BusConfig, prefix: &str) -> String {
    new_topic(cfg, prefix, true).await
}

/// A fresh topic named `<prefix>_<pid>_<uuid>` (`prefix` lowercased, other
/// characters than ASCII letters and digits made `_`), created on `cfg`'s
/// broker with its `<topic>.dlq` when `with_dlq`.
///
/// # Panics
///
/// If the topics cannot be created ([`TopicAdmin::ensure_topics`] fails).
pub async fn new_topic(cfg: &BusConfig, prefix: &str, with_dlq: bool) -> String {
    let t = unique_name(prefix);
    TopicAdmin::new(cfg)
        .unwrap()
        .ensure_topics(&[&t], with_dlq)
        .await
        .unwrap();
    t
}

/// An outbox in a fresh schema (`bus_<pid>_<uuid>`) of the PostgreSQL
/// database at `postgres_url`, on a pool of up to 8 connections.
///
/// # Panics
///
/// If PostgreSQL cannot be reached or the schema cannot be created.
pub async fn outbox(postgres_url: &str) -> Outbox {
    outbox_with(postgres_url, |_| {}).await
}

/// [`outbox`] with its config changed by `tune` first.
///
/// # Panics
///
/// As [`outbox`].
pub async fn outbox_with(postgres_url: &str, tune: impl FnOnce(&mut OutboxConfig)) -> Outbox {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .connect(postgres_url)
        .await
        .unwrap();
    let mut config = OutboxConfig::new(unique_name("bus"));
    tune(&mut config);
    Outbox::new(pool, config).await.unwrap()
}

/// A raw rdkafka producer with the producer settings `cfg` gives the bus
/// (`acks=all`, idempotence, linger, batch size and count, in-flight
/// requests): the baseline the benchmarks compare the bus with.
///
/// # Panics
///
/// If rdkafka refuses the settings.
pub fn raw_producer(cfg: &BusConfig) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", &cfg.bootstrap_servers)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", cfg.producer.linger_ms.to_string())
        .set("batch.size", cfg.producer.batch_size_bytes.to_string())
        .set(
            "batch.num.messages",
            cfg.producer.batch_num_messages.to_string(),
        )
        .set(
            "max.in.flight.requests.per.connection",
            cfg.producer.max_in_flight.to_string(),
        )
        .create()
        .expect("raw rdkafka producer")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_names_differ_and_are_identifier_safe() {
        let (a, b) = (unique_name("My-Topic"), unique_name("My-Topic"));
        assert_ne!(a, b);
        assert!(a.starts_with("my_topic_"), "{a}");
        assert!(
            a.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
            "{a}"
        );
        assert!(a.len() < 63, "fits a Postgres identifier: {a}");
    }

    #[test]
    fn config_gives_each_call_its_own_group() {
        let (a, b) = (config("127.0.0.1:9092"), config("127.0.0.1:9092"));
        assert_eq!(a.bootstrap_servers, "127.0.0.1:9092");
        assert_ne!(a.consumer.group, b.consumer.group);
    }
}
