//! The one ordered send: records enqueued in order on one librdkafka
//! handle under one deadline, stopping at the first transient failure.
//!
//! Every path that sends several records whose order matters uses it: the
//! producer's own `send`/`send_many` (defined here, at the end), the
//! durable publisher, the relay's Kafka sink.
//! The rules live here once:
//!
//! - records go into **one handle**, so a purge (the deadline passing, a
//!   fatal error) fails all of them in order instead of splitting the
//!   batch across an old and a new handle;
//! - a **transient** enqueue failure stops the send: that record and every
//!   later one are reported not sent (`BusError::NotSent` after the first),
//!   because nothing may overtake a record that failed;
//! - a **permanent** refusal (a record the broker will never take, e.g.
//!   too large) concerns that record only; whether later records of its key
//!   may still go is the caller's rule (the sink holds them back, a
//!   publisher caller sees the error for that message);
//! - acknowledgements are awaited together until the deadline; what is
//!   still missing then is purged, so it fails in order and the caller can
//!   send it elsewhere (the outbox) without a late duplicate overtaking it.

use std::sync::Arc;
use std::time::Instant;

use rdkafka::producer::DeliveryFuture;

use crate::envelope::Envelope;
use crate::error::BusError;
use crate::producer::{BusProducer, Delivery, Handle, RawRecord, envelope_headers};

/// What happened to one record [`OrderedSend::push`] was given.
#[derive(Debug)]
pub(crate) enum Pushed {
    /// Enqueued; its acknowledgement comes from [`OrderedSend::finish`].
    Enqueued,
    /// Refused for good (`BusError::is_permanent`): this record only.
    Refused(BusError),
    /// Not sent because of a transient failure, this record's or an
    /// earlier one's: the send stopped. `error` is this record's (the
    /// failure itself, or `BusError::NotSent`); `first` is the text of the
    /// failure that stopped the send.
    NotSent { error: BusError, first: String },
}

/// An ordered send in progress; see the module docs.
pub(crate) struct OrderedSend<'p> {
    producer: &'p BusProducer,
    handle: Arc<Handle>,
    deadline: Instant,
    /// Caller's index of each enqueued record, with its delivery future.
    enqueued: Vec<(usize, DeliveryFuture)>,
    /// The first transient failure, once the send stopped.
    stopped: Option<String>,
}

impl<'p> OrderedSend<'p> {
    /// A send on `producer`'s current handle, due by `publisher.timeout_ms`
    /// from now.
    pub(crate) fn new(producer: &'p BusProducer) -> Self {
        Self::until(
            producer,
            Instant::now() + producer.config().publish_timeout(),
        )
    }

    /// A send on `producer`'s current handle, due by `deadline`.
    pub(crate) fn until(producer: &'p BusProducer, deadline: Instant) -> Self {
        Self::on(producer, producer.handle(), deadline)
    }

    /// A send on `handle` (one the caller already tied other state to, e.g.
    /// the publisher's sequencer lanes), due by `deadline`.
    pub(crate) fn on(producer: &'p BusProducer, handle: Arc<Handle>, deadline: Instant) -> Self {
        Self {
            deadline,
            handle,
            producer,
            enqueued: Vec::new(),
            stopped: None,
        }
    }

    /// Enqueues `rec` as the caller's record `index` (any numbering the
    /// caller wants back from [`finish`](Self::finish)), unless the send has
    /// stopped.
    pub(crate) async fn push(&mut self, index: usize, rec: RawRecord<'_>) -> Pushed {
        if let Some(first) = &self.stopped {
            return Pushed::NotSent {
                error: BusError::NotSent(first.clone()),
                first: first.clone(),
            };
        }
        match self
            .producer
            .enqueue_on(&self.handle, rec, self.deadline)
            .await
        {
            Ok(f) => {
                self.enqueued.push((index, f));
                Pushed::Enqueued
            }
            Err(e) if e.is_permanent() => Pushed::Refused(e),
            Err(error) => {
                let first = error.to_string();
                self.stopped = Some(first.clone());
                Pushed::NotSent { error, first }
            }
        }
    }

    /// The first transient failure, if the send stopped.
    pub(crate) fn stopped(&self) -> Option<&str> {
        self.stopped.as_deref()
    }

    /// Awaits the acknowledgements of every enqueued record (purging the
    /// handle at the deadline): `(index, result)` in the order pushed.
    pub(crate) async fn finish(self) -> Vec<(usize, Result<Delivery, BusError>)> {
        let (indexes, futs): (Vec<usize>, Vec<DeliveryFuture>) = self.enqueued.into_iter().unzip();
        let results = self
            .producer
            .await_deliveries_on(&self.handle, futs, self.deadline)
            .await;
        indexes.into_iter().zip(results).collect()
    }
}

/// `BusProducer`'s own sends are ordered sends (of one, or of a slice).
impl BusProducer {
    /// Sends one envelope and waits for the ack (or `publisher.timeout_ms`).
    pub async fn send(&self, topic: &str, env: &Envelope) -> Result<Delivery, BusError> {
        self.send_many(topic, std::slice::from_ref(env))
            .await
            .pop()
            .unwrap_or(Err(BusError::Shutdown))
    }

    /// Sends many envelopes in order on one librdkafka handle: all are
    /// enqueued first, then acknowledgements are awaited together (until
    /// `publisher.timeout_ms`; what is missing then is purged and fails).
    /// Results are in input order.
    ///
    /// A record the broker refuses for good ([`BusError::is_permanent`])
    /// fails alone; a transient failure stops the send, and every later
    /// envelope fails with [`BusError::NotSent`] without being sent, so
    /// nothing overtakes a failed message.
    pub async fn send_many(
        &self,
        topic: &str,
        envs: &[Envelope],
    ) -> Vec<Result<Delivery, BusError>> {
        let mut send = OrderedSend::new(self);
        let mut out: Vec<Option<Result<Delivery, BusError>>> = Vec::with_capacity(envs.len());
        for (i, env) in envs.iter().enumerate() {
            let rec = RawRecord {
                topic,
                key: env.kafka_key(),
                payload: &env.payload,
                headers: envelope_headers(env),
            };
            out.push(match send.push(i, rec).await {
                Pushed::Enqueued => None,
                Pushed::Refused(e) | Pushed::NotSent { error: e, .. } => Some(Err(e)),
            });
        }
        if let Some(first) = send.stopped() {
            tracing::debug!(event = "send_many_stopped", error = %first);
        }
        for (i, r) in send.finish().await {
            out[i] = Some(r);
        }
        out.into_iter()
            .map(|r| r.unwrap_or(Err(BusError::Shutdown)))
            .collect()
    }

    /// Sends one record and waits for its acknowledgement until `deadline`
    /// (an [`OrderedSend`] of one).
    pub(crate) async fn send_raw(
        &self,
        rec: RawRecord<'_>,
        deadline: Instant,
    ) -> Result<Delivery, BusError> {
        let mut send = OrderedSend::until(self, deadline);
        match send.push(0, rec).await {
            Pushed::Enqueued => {}
            Pushed::Refused(e) | Pushed::NotSent { error: e, .. } => return Err(e),
        }
        send.finish()
            .await
            .pop()
            .map_or(Err(BusError::Shutdown), |(_, r)| r)
    }
}
