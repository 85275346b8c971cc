//! The four nested sections of [`BusConfig`](super::BusConfig).

use serde::{Deserialize, Serialize};
use soma_observability::resilience::BreakerConfig;

/// Declares a nested section of [`BusConfig`]: the public type (documented,
/// `Default`, `#[serde(default)]`, `#[non_exhaustive]`) and a private twin
/// whose fields are all optional, so that a key set explicitly in the
/// nested section can be told apart from a default and win over its flat
/// alias.
macro_rules! section {
    (
        $(#[$meta:meta])*
        pub struct $name:ident via $raw:ident {
            $( $(#[$fmeta:meta])* $field:ident : $ty:ty = $default:expr, )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Serialize, Deserialize)]
        #[serde(default)]
        #[non_exhaustive]
        pub struct $name {
            $( $(#[$fmeta])* pub $field: $ty, )*
        }

        impl Default for $name {
            fn default() -> Self {
                Self { $( $field: $default, )* }
            }
        }

        #[derive(Default, Deserialize)]
        #[serde(default)]
        pub(super) struct $raw {
            $( pub(super) $field: Option<$ty>, )*
        }

        impl $raw {
            pub(super) fn finish(self) -> $name {
                let defaults = $name::default();
                $name { $( $field: self.$field.unwrap_or(defaults.$field), )* }
            }
        }
    };
}

section! {
    /// The Kafka producer (`bus.producer`). `acks=all` and idempotence are
    /// always on.
    pub struct ProducerConfig via RawProducer {
        /// Producer `linger.ms`.
        linger_ms: u64 = 5,
        /// Producer `batch.size` in bytes.
        batch_size_bytes: u64 = 1_000_000,
        /// Producer `batch.num.messages`.
        batch_num_messages: u64 = 10_000,
        /// Max unacknowledged requests per broker connection (1..=5 with idempotence).
        max_in_flight: u32 = 5,
        /// Max messages buffered in the producer before `send` reports the queue full.
        queue_buffering_max_messages: u64 = 100_000,
        /// Deadline for flushing the producer on shutdown.
        flush_timeout_ms: u64 = 10_000,
    }
}

section! {
    /// The publisher (`bus.publisher`): how long a publish waits for Kafka
    /// and when it falls back to the outbox instead.
    pub struct PublisherConfig via RawPublisher {
        /// How long a publish may wait for the broker's ack before falling back to the outbox.
        timeout_ms: u64 = 5_000,
        /// The publisher's circuit breaker (the shared spelling, component
        /// `bus_publisher`): after `failure_threshold` consecutive failed
        /// publishes, publishes go straight to the outbox for `open_ms`; then
        /// exactly one publish probes Kafka (and alone waits up to
        /// `timeout_ms`) while every other one goes to the outbox at
        /// once. Defaults here: 1 failure, 2 000 ms (keys missing from a given
        /// `breaker` section take the shared defaults, 3 and 30 000).
        breaker: BreakerConfig = BreakerConfig::new(1, 2_000),
        /// How often keys with records waiting in the outbox are re-checked.
        pending_key_poll_interval_ms: u64 = 200,
        /// Ask the outbox (`pending_for_key`) on every publish, not only for keys this process deferred.
        /// Costs one Postgres round trip per publish; needed when several processes publish the same keys
        /// and one may defer while another publishes directly.
        check_outbox_per_message: bool = false,
    }
}

section! {
    /// Subscribers (`bus.consumer`): the group, its lanes, retries, DLQ and
    /// replay.
    pub struct ConsumerConfig via RawConsumer {
        /// Consumer group id.
        group: String = "soma".to_owned(),
        /// Concurrent handler lanes per consumer (messages of one key always use the same lane).
        concurrency: usize = 16,
        /// Messages buffered per lane before fetching pauses.
        lane_capacity: usize = 256,
        /// Where a group with no committed offset starts: `earliest` or `latest`.
        auto_offset_reset: String = "earliest".to_owned(),
        /// Consumer session timeout. Consumers heartbeat every third of it
        /// (at most every 3 s) unless `librdkafka` sets
        /// `heartbeat.interval.ms`.
        session_timeout_ms: u64 = 10_000,
        /// Longest a fetch may wait at the broker for data (librdkafka
        /// `fetch.wait.max.ms`); unset: librdkafka's default (500). A Kafka
        /// broker answers a waiting fetch as soon as data arrives, so this only
        /// bounds idle polling there. tansu 0.6 sleeps after *every* fetch
        /// (half the wait, at least 250 ms of a 500 ms wait) before it answers,
        /// so on tansu every consumer hop costs up to this much latency: the
        /// example platform's local settings use 50.
        fetch_wait_ms: Option<u64> = None,
        /// How often completed offsets are committed.
        commit_interval_ms: u64 = 1_000,
        /// Attempts per message (first try included) before a retryable error dead-letters it.
        max_attempts: u32 = 5,
        /// First retry backoff; doubles per attempt.
        retry_backoff_initial_ms: u64 = 100,
        /// Retry backoff ceiling.
        retry_backoff_max_ms: u64 = 5_000,
        /// DLQ topic suffix (`<topic><suffix>`).
        dlq_suffix: String = ".dlq".to_owned(),
        /// Pause between attempts to write a message to the DLQ when that write fails.
        dlq_retry_backoff_ms: u64 = 1_000,
        /// How long graceful shutdown waits for in-flight handlers.
        shutdown_timeout_ms: u64 = 30_000,
        /// Consumer lag statistics interval (0 disables the lag metric).
        lag_interval_ms: u64 = 5_000,
        /// Replays after which a message is no longer republished from the DLQ.
        replay_max: u32 = 3,
    }
}

section! {
    /// Topics created by [`crate::TopicAdmin::ensure_topics`] (`bus.topics`)
    /// and the timeout of admin requests. Durability defaults follow
    /// [`BusConfig::deployment_profile`](crate::BusConfig::deployment_profile) (see [`BusConfig`](crate::BusConfig)).
    pub struct TopicsConfig via RawTopics {
        /// Partitions for created topics.
        partitions: i32 = 1,
        /// Replication factor for created topics; unset: 1 under `local`, 3
        /// under `prod`. Under `prod`, less than 2 is refused.
        replication_factor: Option<i32> = None,
        /// `min.insync.replicas` of created topics; unset: the broker's default
        /// under `local`, 2 under `prod`. Under `prod`, less than 2 is refused;
        /// more than the replication factor is always refused (no write could
        /// ever be acknowledged).
        min_insync_replicas: Option<i32> = None,
        /// Timeout for admin and metadata requests (also the health check timeout).
        admin_timeout_ms: u64 = 5_000,
    }
}
