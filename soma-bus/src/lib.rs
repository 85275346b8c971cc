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
//!   (see [`DurablePublisher`] for the one multi-process caveat), and in consumers:
//!   one key is handled one message at a time, in order.
//! - **At-least-once.** Duplicates are possible (an ack lost in a broker
//!   failure; a crash between handling and committing) and always carry the
//!   same envelope id; [`InboxDedupe`] drops them for a handler.
//! - **No silent drops in consumers.** Offsets are committed only after the
//!   handler succeeded or the message is in `<topic>.dlq` (acknowledged).
//!   Malformed records go to the DLQ instead of wedging the partition.
//!   [`replay_dlq`] (and the `soma-bus-replay` command) sends them back — only
//!   ever to the topic their DLQ belongs to, whatever a record's headers
//!   claim — with a replay count that stops loops.
//! - **One trace across hops.** `soma.publish` and `soma.consume` are
//!   OpenTelemetry spans linked through `traceparent` headers, and handlers run
//!   inside `soma.consume`, so gateway → Kafka → worker → Kafka is one trace
//!   (see [Trace context](#trace-context)).
//!
//! # Trace context
//!
//! W3C trace context on messages, through soma-observability's propagation.
//!
//! A single trace spans gateway → Kafka → worker → Kafka: every hop's spans
//! are real OpenTelemetry spans (through the `tracing-opentelemetry` layer
//! that [`soma_observability::init`] installs), linked by the `traceparent` /
//! `tracestate` headers.
//!
//! - **Publish.** [`DurablePublisher`] opens a
//!   `soma.publish` span (a child of the caller's current span) and injects its
//!   context into every message that has no trace context of its own. An
//!   explicit context ([`EnvelopeBuilder::trace`],
//!   or one inherited through
//!   [`EnvelopeBuilder::caused_by`]) is sent
//!   as it is. Messages deferred to the outbox store the same headers, so the
//!   relay delivers them with the context of the original publish.
//! - **Consume.** [`BusConsumer`] opens a `soma.consume`
//!   span whose parent is the message's context
//!   ([`set_parent_from`](soma_observability::propagation::set_parent_from)),
//!   records its `trace_id` field, and runs the handler inside it: a message
//!   published from the handler continues the same trace.
//!
//! Without a `tracing-opentelemetry` layer there are no OpenTelemetry
//! contexts: messages carry only explicitly set trace contexts, and nothing
//! is invented (a made-up `traceparent` would name spans that no tracer
//! recorded).
//!
//! [`TraceContext`] implements
//! [`HeaderCarrier`](soma_observability::propagation::HeaderCarrier), so the soma-observability
//! helpers read and write it directly:
//!
//! ```
//! use soma_bus::TraceContext;
//! use soma_observability::propagation::{extract_context, inject_context};
//!
//! let incoming = TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", None)?;
//! let cx = extract_context(&incoming);
//! let mut outgoing = TraceContext::default();
//! inject_context(&cx, &mut outgoing);
//! assert_eq!(outgoing, incoming);
//! # Ok::<(), soma_bus::EnvelopeError>(())
//! ```
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

mod admin;
mod config;
mod consumer;
mod dlq;
mod effects;
mod envelope;
mod error;
mod inbox;
mod metrics;
mod ordered;
mod producer;
mod publish;
mod publisher;
mod replay;
mod sequencer;
mod sink;
#[cfg(feature = "testkit")]
#[cfg_attr(docsrs, doc(cfg(feature = "testkit")))]
pub mod testkit;
mod trace;

pub use admin::{BrokerHealthCheck, TopicAdmin, TopicInfo};
pub use config::{BusConfig, ConsumerConfig, ProducerConfig, PublisherConfig, TopicsConfig};
pub use consumer::{
    BusConsumer, ConsumerBuilder, ConsumerHandle, DLQ_ATTEMPTS, DLQ_ERROR, DLQ_FAILED_AT,
    DLQ_GROUP, DLQ_HANDLER, DLQ_HEADER_PREFIX, DLQ_ORIGIN_OFFSET, DLQ_ORIGIN_PARTITION,
    DLQ_ORIGIN_TOPIC, Handler, HandlerError, ShutdownReport,
};
pub use dlq::{DlqPosition, DlqReader, DlqRecord};
pub use effects::{Effects, EffectsTx};
pub use envelope::{
    CONTENT_TYPE_JSON, Envelope, EnvelopeBuilder, EnvelopeError, HEADER_CAUSATION_ID,
    HEADER_CONTENT_TYPE, HEADER_CORRELATION_ID, HEADER_ID, HEADER_OCCURRED_AT, HEADER_REPLAY_COUNT,
    HEADER_SCHEMA_VERSION, HEADER_TENANT, HEADER_TRACEPARENT, HEADER_TRACESTATE, HEADER_TYPE,
    HEADER_UNKEYED, SOMA_HEADER_PREFIX, TraceContext,
};
pub use error::BusError;
pub use inbox::InboxDedupe;
pub use producer::{BusProducer, Delivery, FlushReport};
pub use publish::Publish;
pub use publisher::{DurablePublisher, DurablePublisherBuilder, PublishOutcome};
pub use replay::{MAX_REFUSALS_LISTED, ReplayOptions, ReplayRefusal, ReplayReport, replay_dlq};
pub use sink::KafkaSink;

/// The README's examples, compiled as doctests so they cannot drift.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
