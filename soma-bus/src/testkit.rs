//! Test helpers (feature `testkit`): an in-memory [`Publish`] for code that
//! publishes, and helpers for tests and benchmarks against a real broker
//! and PostgreSQL.
//!
//! # Without a broker
//!
//! [`MemoryPublisher`] records every accepted envelope in call order and can
//! be told to fail the way [`DurablePublisher`](crate::DurablePublisher)
//! fails, with the same typed [`BusError`]s, so the caller's error branches
//! ([`BusError::is_unavailable`], [`BusError::is_permanent`]) are testable.
//!
//! ```
//! use soma_bus::testkit::{Fault, MemoryPublisher};
//! use soma_bus::{Envelope, Publish};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let bus = MemoryPublisher::new();
//! let env = Envelope::builder("chat.turn.created", "tenant-1", "session-42").build()?;
//! bus.publish("chat.turns", &env).await?;
//! assert_eq!(bus.on_topic("chat.turns"), vec![env.clone()]);
//!
//! bus.fail_next(1, Fault::Unavailable);
//! let err = bus.publish("chat.turns", &env).await.unwrap_err();
//! assert!(err.is_unavailable());
//! assert_eq!(bus.len(), 1, "a failed publish records nothing");
//! # Ok(()) }
//! ```
//!
//! # Against a broker and PostgreSQL
//!
//! [`config`] is a [`BusConfig`](crate::BusConfig) for tests (a fresh
//! consumer group, short timeouts); [`topic`] and [`new_topic`] create fresh
//! topics, [`outbox`] a fresh outbox schema, [`envelope()`] a small keyed envelope,
//! and [`raw_producer`] the plain rdkafka producer the benchmarks compare
//! the bus with. They panic on failure, as test helpers do. This crate's
//! integration tests and benchmarks use them; the service addresses come
//! from the caller.
//!
//! ```no_run
//! use soma_bus::testkit::{config, envelope, outbox, topic};
//! use soma_bus::{BusProducer, DurablePublisher, Publish};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let cfg = config("127.0.0.1:9092");
//! let topic = topic(&cfg, "orders").await; // and `<topic>.dlq`
//! let outbox = outbox("postgres://postgres@127.0.0.1:5432/test").await;
//! let publisher = DurablePublisher::builder(BusProducer::new(&cfg)?, outbox).build();
//! publisher.publish(&topic, &envelope("order-1", 1)).await?;
//! publisher.shutdown().await;
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use crate::envelope::Envelope;
use crate::error::BusError;
use crate::publish::Publish;
use crate::publisher::PublishOutcome;

mod live;

pub use live::{config, envelope, new_topic, outbox, outbox_with, raw_producer, topic};

/// How a [`MemoryPublisher`] fails a message it was told to fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fault {
    /// Kafka and the outbox are both down: [`BusError::Unavailable`]
    /// (`is_unavailable()` is true). Retrying later may succeed.
    Unavailable,
    /// The broker refused the message itself (too large):
    /// [`BusError::Kafka`] with `MessageSizeTooLarge` (`is_permanent()` is
    /// true). Retrying the same message fails again.
    Refused,
}

impl Fault {
    /// The error [`DurablePublisher`](crate::DurablePublisher) returns in this case.
    pub fn to_error(self) -> BusError {
        match self {
            Fault::Unavailable => BusError::Unavailable {
                kafka: "testkit: kafka unavailable".to_owned(),
                outbox: soma_outbox::OutboxError::Database(sqlx::Error::PoolTimedOut),
            },
            Fault::Refused => BusError::Kafka(KafkaError::MessageProduction(
                RDKafkaErrorCode::MessageSizeTooLarge,
            )),
        }
    }
}

/// One accepted message, as [`MemoryPublisher`] recorded it.
#[derive(Debug, Clone, PartialEq)]
pub struct Recorded {
    /// The topic it was published to.
    pub topic: String,
    /// The envelope as given.
    pub envelope: Envelope,
    /// The outcome returned to the caller.
    pub outcome: PublishOutcome,
}

#[derive(Debug, Default)]
struct State {
    recorded: Vec<Recorded>,
    next_offset: HashMap<String, i64>,
    /// Fail this many more messages with the fault.
    fail_count: usize,
    /// Fail every message until [`MemoryPublisher::reset`].
    fail_always: bool,
    fault: Option<Fault>,
    /// Accept this many more messages as deferred (outbox) instead of published.
    defer_count: usize,
}

/// An in-memory [`Publish`] that records envelopes and can be told to fail.
///
/// Accepted messages get [`PublishOutcome::Published`] on partition 0 with
/// per-topic offsets counting from 0, or [`PublishOutcome::Deferred`] with
/// the envelope id after [`defer_next`](Self::defer_next) (what the durable
/// publisher returns when Kafka is down and the outbox kept the message).
/// Faults count **per envelope**: a
/// `publish_many` of three envelopes after `fail_next(2, ..)` fails the first
/// two and accepts the third, as the real publisher reports per-message
/// results. Failed envelopes are not recorded (they were not accepted).
/// Clones share the same record.
#[derive(Debug, Clone, Default)]
pub struct MemoryPublisher {
    state: Arc<Mutex<State>>,
}

impl MemoryPublisher {
    /// An empty publisher that accepts everything.
    pub fn new() -> Self {
        Self::default()
    }

    /// Fails the next `n` envelopes with `fault`, then accepts again.
    pub fn fail_next(&self, n: usize, fault: Fault) {
        let mut s = self.state.lock();
        s.fail_count = n;
        s.fail_always = false;
        s.fault = Some(fault);
    }

    /// Accepts the next `n` envelopes as [`PublishOutcome::Deferred`] (kept in
    /// the outbox, as while Kafka is down); they are recorded like published
    /// ones. A pending fault is applied first.
    pub fn defer_next(&self, n: usize) {
        self.state.lock().defer_count = n;
    }

    /// Fails every envelope with `fault` until [`reset`](Self::reset).
    pub fn fail_until_reset(&self, fault: Fault) {
        let mut s = self.state.lock();
        s.fail_always = true;
        s.fault = Some(fault);
    }

    /// Stops failing and deferring. Keeps what was recorded.
    pub fn reset(&self) {
        let mut s = self.state.lock();
        s.defer_count = 0;
        s.fail_count = 0;
        s.fail_always = false;
        s.fault = None;
    }

    /// Forgets every recorded message (offsets restart at 0). Faults stay.
    pub fn clear(&self) {
        let mut s = self.state.lock();
        s.recorded.clear();
        s.next_offset.clear();
    }

    /// Every accepted message, in call order.
    pub fn recorded(&self) -> Vec<Recorded> {
        self.state.lock().recorded.clone()
    }

    /// The envelopes accepted on `topic`, in call order.
    pub fn on_topic(&self, topic: &str) -> Vec<Envelope> {
        self.filtered(|r| r.topic == topic)
    }

    /// The envelopes accepted with ordering key `key` (any topic), in call order.
    pub fn with_key(&self, key: &str) -> Vec<Envelope> {
        self.filtered(|r| r.envelope.key.as_deref() == Some(key))
    }

    /// How many messages were accepted.
    pub fn len(&self) -> usize {
        self.state.lock().recorded.len()
    }

    /// True when nothing was accepted.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn filtered(&self, f: impl Fn(&Recorded) -> bool) -> Vec<Envelope> {
        self.state
            .lock()
            .recorded
            .iter()
            .filter(|r| f(r))
            .map(|r| r.envelope.clone())
            .collect()
    }

    fn one(&self, topic: &str, env: &Envelope) -> Result<PublishOutcome, BusError> {
        let mut s = self.state.lock();
        if let Some(fault) = s.fault {
            if s.fail_always {
                return Err(fault.to_error());
            }
            if s.fail_count > 0 {
                s.fail_count -= 1;
                if s.fail_count == 0 {
                    s.fault = None;
                }
                return Err(fault.to_error());
            }
        }
        let outcome = if s.defer_count > 0 {
            s.defer_count -= 1;
            PublishOutcome::Deferred(env.id)
        } else {
            let offset = s.next_offset.entry(topic.to_owned()).or_insert(0);
            let outcome = PublishOutcome::Published {
                partition: 0,
                offset: *offset,
            };
            *offset += 1;
            outcome
        };
        s.recorded.push(Recorded {
            topic: topic.to_owned(),
            envelope: env.clone(),
            outcome,
        });
        Ok(outcome)
    }
}

#[async_trait::async_trait]
impl Publish for MemoryPublisher {
    async fn publish(&self, topic: &str, env: &Envelope) -> Result<PublishOutcome, BusError> {
        self.one(topic, env)
    }

    async fn publish_many(
        &self,
        topic: &str,
        envs: &[Envelope],
    ) -> Vec<Result<PublishOutcome, BusError>> {
        envs.iter().map(|e| self.one(topic, e)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(key: &str) -> Envelope {
        Envelope::builder("t.created", "tenant-1", key)
            .build()
            .unwrap()
    }

    #[tokio::test]
    async fn records_in_call_order_per_topic_and_key() {
        let bus = MemoryPublisher::new();
        let (a1, b1, a2) = (env("a"), env("b"), env("a"));
        assert_eq!(
            bus.publish("one", &a1).await.unwrap(),
            PublishOutcome::Published {
                partition: 0,
                offset: 0
            }
        );
        let many = bus.publish_many("two", &[b1.clone(), a2.clone()]).await;
        assert_eq!(many.len(), 2);
        assert_eq!(
            *many[1].as_ref().unwrap(),
            PublishOutcome::Published {
                partition: 0,
                offset: 1
            }
        );
        let all: Vec<_> = bus
            .recorded()
            .into_iter()
            .map(|r| (r.topic, r.envelope.id))
            .collect();
        assert_eq!(
            all,
            vec![
                ("one".into(), a1.id),
                ("two".into(), b1.id),
                ("two".into(), a2.id)
            ]
        );
        assert_eq!(bus.on_topic("two"), vec![b1.clone(), a2.clone()]);
        assert_eq!(bus.with_key("a"), vec![a1, a2]);
        assert!(bus.on_topic("three").is_empty());
        bus.clear();
        assert!(bus.is_empty());
    }

    #[tokio::test]
    async fn fail_next_counts_envelopes_then_accepts() {
        let bus = MemoryPublisher::new();
        bus.fail_next(2, Fault::Refused);
        let out = bus.publish_many("t", &[env("a"), env("b"), env("c")]).await;
        assert!(out[0].as_ref().unwrap_err().is_permanent());
        assert!(out[1].as_ref().unwrap_err().is_permanent());
        assert!(out[2].is_ok());
        assert!(bus.publish("t", &env("d")).await.is_ok());
        assert_eq!(bus.len(), 2, "only accepted envelopes are recorded");
    }

    #[tokio::test]
    async fn fail_until_reset_fails_every_call() {
        let bus = MemoryPublisher::new();
        bus.fail_until_reset(Fault::Unavailable);
        for _ in 0..3 {
            let err = bus.publish("t", &env("a")).await.unwrap_err();
            assert!(err.is_unavailable() && !err.is_permanent(), "{err}");
            assert!(matches!(err, BusError::Unavailable { .. }));
        }
        bus.reset();
        assert!(bus.publish("t", &env("a")).await.is_ok());
        assert_eq!(bus.len(), 1);
    }

    #[tokio::test]
    async fn defer_next_returns_deferred_with_the_envelope_id_and_records() {
        let bus = MemoryPublisher::new();
        bus.defer_next(1);
        let (a, b) = (env("a"), env("b"));
        assert_eq!(
            bus.publish("t", &a).await.unwrap(),
            PublishOutcome::Deferred(a.id)
        );
        assert_eq!(
            bus.publish("t", &b).await.unwrap(),
            PublishOutcome::Published {
                partition: 0,
                offset: 0
            }
        );
        assert_eq!(bus.on_topic("t"), vec![a, b]);
    }

    #[tokio::test]
    async fn usable_as_dyn_publish_and_clones_share_the_record() {
        let bus = MemoryPublisher::new();
        let dynbus: Arc<dyn Publish> = Arc::new(bus.clone());
        dynbus.publish("t", &env("k")).await.unwrap();
        assert_eq!(bus.with_key("k").len(), 1);
    }
}
