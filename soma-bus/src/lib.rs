//! Kafka messaging for Soma services: one envelope, a durable publisher that
//! falls back to a PostgreSQL outbox, and consumers with retries, a
//! dead-letter topic and replay.
//!
//! # Why
//!
//! The platform this replaces published without message keys (a session's
//! messages could arrive out of order), raised when Kafka was down instead of
//! keeping the message, committed offsets of failed chat turns (losing them),
//! and opened two consumer groups per SSE connection. This crate makes the
//! safe behaviour the only behaviour.
//!
//! # Guarantees
//!
//! - **Nothing accepted is lost.** [`DurablePublisher::publish`] returns `Ok`
//!   only after the broker acknowledged the message (`acks=all`, idempotent
//!   producer) or PostgreSQL committed it to the soma-outbox; the outbox
//!   relay with [`KafkaSink`] delivers deferred messages when Kafka is back.
//! - **Ordered per key**, across the Kafka/outbox switch in both directions
//!   (see [`publisher`] for the one multi-process caveat), and in consumers:
//!   one key is handled one message at a time, in order.
//! - **At-least-once.** Duplicates are possible (an ack lost in a broker
//!   failure; a crash between handling and committing) and always carry the
//!   same envelope id; [`InboxDedupe`] drops them for a handler.
//! - **No silent drops in consumers.** Offsets are committed only after the
//!   handler succeeded or the message is in `<topic>.dlq` (acknowledged).
//!   Malformed records go to the DLQ instead of wedging the partition.
//!   [`replay_dlq`] (and the `soma-bus-replay` command) sends them back, with a
//!   replay count that stops loops.
//! - **One trace across hops.** `soma.publish` and `soma.consume` are
//!   OpenTelemetry spans linked through `traceparent` headers, and handlers run
//!   inside `soma.consume`, so gateway → Kafka → worker → Kafka is one trace
//!   (see [`trace`]).
//!
//! # Example
//!
//! ```no_run
//! use soma_bus::{BusConfig, BusConsumer, BusProducer, DurablePublisher, Envelope, HandlerError, KafkaSink};
//! use soma_outbox::{Outbox, OutboxConfig, Relay, RelayConfig};
//!
//! # async fn run(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
//! let config = BusConfig::default();
//! let producer = BusProducer::new(&config)?;
//! let outbox = Outbox::new(pool, OutboxConfig::default()).await?;
//! // The relay drains deferred messages to Kafka.
//! let relay = Relay::new(outbox.clone(), KafkaSink::new(producer.clone()), RelayConfig::default()).spawn();
//! let publisher = DurablePublisher::builder(producer, outbox).build();
//!
//! let env = Envelope::builder("chat.turn.created", "tenant-1", "session-42")
//!     .json(&serde_json::json!({"text": "hi"}))?
//!     .build()?;
//! let outcome = publisher.publish("chat.turns", &env).await?; // Published{..} or Deferred(id)
//! # let _ = outcome;
//!
//! let consumer = BusConsumer::builder(&config, &["chat.turns"], "turn-writer", |env: Envelope| async move {
//!     let body: serde_json::Value = env.json()?; // undecodable payload: fatal → DLQ
//!     let _ = body;
//!     Ok::<(), HandlerError>(())
//! })
//! .spawn()?;
//! consumer.shutdown().await;
//! publisher.shutdown().await;
//! relay.shutdown().await?;
//! # Ok(()) }
//! ```
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod admin;
pub mod config;
pub mod consumer;
mod effects;
pub mod envelope;
pub mod error;
pub mod inbox;
mod metrics;
pub mod producer;
mod publish;
pub mod publisher;
pub mod replay;
mod sequencer;
pub mod sink;
#[cfg(feature = "testkit")]
#[cfg_attr(docsrs, doc(cfg(feature = "testkit")))]
pub mod testkit;
pub mod trace;

pub use admin::{BrokerHealthCheck, TopicAdmin, TopicInfo};
pub use config::BusConfig;
pub use consumer::{
    BusConsumer, ConsumerBuilder, ConsumerHandle, Handler, HandlerError, ShutdownReport,
};
pub use effects::{Effects, EffectsTx};
pub use envelope::{Envelope, EnvelopeBuilder, EnvelopeError, TraceContext};
pub use error::BusError;
pub use inbox::InboxDedupe;
pub use producer::{BusProducer, Delivery, FlushReport};
pub use publish::Publish;
pub use publisher::{DurablePublisher, DurablePublisherBuilder, PublishOutcome};
pub use replay::{ReplayOptions, ReplayReport, replay_dlq};
pub use sink::KafkaSink;

/// The README's examples, compiled as doctests so they cannot drift.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
