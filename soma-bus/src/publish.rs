//! The [`Publish`] trait: what code that only *sends* envelopes needs.

use crate::envelope::Envelope;
use crate::error::BusError;
use crate::publisher::{DurablePublisher, PublishOutcome};

/// Sends envelopes to a topic with the [`DurablePublisher`] contract.
///
/// Take `Arc<dyn Publish>` (or a generic `P: Publish`) instead of a concrete
/// [`DurablePublisher`] where code only publishes, and tests can hand it
/// [`testkit::MemoryPublisher`](crate::testkit::MemoryPublisher) (feature
/// `testkit`) instead of a Kafka broker and a PostgreSQL outbox.
///
/// The trait is object-safe (`#[async_trait]` boxes the futures), so one
/// `Arc<dyn Publish>` can be stored in an axum state without a type
/// parameter; the cost is one allocation per call, small next to a broker
/// round trip.
///
/// # Contract
///
/// - `publish` returns `Ok` only when the message was accepted: acknowledged
///   by the broker ([`PublishOutcome::Published`]) or kept for later
///   delivery ([`PublishOutcome::Deferred`] with the envelope id).
/// - `Err` means the message was **not** accepted. Branch on
///   [`BusError::is_permanent`] (the message itself was refused: do not
///   retry it) and [`BusError::is_unavailable`] (retry later).
/// - `publish_many` returns one result per envelope, in input order.
/// - Delivery is at-least-once and ordered per key.
///
/// ```
/// use std::sync::Arc;
/// use soma_bus::{Envelope, Publish, PublishOutcome};
///
/// async fn announce(bus: &dyn Publish, session: &str) -> Result<PublishOutcome, Box<dyn std::error::Error>> {
///     let env = Envelope::builder("session.opened", "tenant-1", session).build()?;
///     Ok(bus.publish("sessions", &env).await?)
/// }
/// # fn _object_safe(p: soma_bus::DurablePublisher) -> Arc<dyn Publish> { Arc::new(p) }
/// ```
#[async_trait::async_trait]
pub trait Publish: Send + Sync {
    /// Publishes one envelope to `topic`.
    async fn publish(&self, topic: &str, env: &Envelope) -> Result<PublishOutcome, BusError>;

    /// Publishes many envelopes to `topic`; one result per envelope, in order.
    async fn publish_many(
        &self,
        topic: &str,
        envs: &[Envelope],
    ) -> Vec<Result<PublishOutcome, BusError>>;
}

#[async_trait::async_trait]
impl Publish for DurablePublisher {
    async fn publish(&self, topic: &str, env: &Envelope) -> Result<PublishOutcome, BusError> {
        DurablePublisher::publish(self, topic, env).await
    }

    async fn publish_many(
        &self,
        topic: &str,
        envs: &[Envelope],
    ) -> Vec<Result<PublishOutcome, BusError>> {
        DurablePublisher::publish_many(self, topic, envs).await
    }
}

#[async_trait::async_trait]
impl<P: Publish + ?Sized> Publish for std::sync::Arc<P> {
    async fn publish(&self, topic: &str, env: &Envelope) -> Result<PublishOutcome, BusError> {
        (**self).publish(topic, env).await
    }

    async fn publish_many(
        &self,
        topic: &str,
        envs: &[Envelope],
    ) -> Vec<Result<PublishOutcome, BusError>> {
        (**self).publish_many(topic, envs).await
    }
}
