//! The far side of the relay: where messages are published.

use std::sync::Arc;

use crate::OutboxRecord;

/// Publishes batches of outbox records (soma-bus implements it for Kafka).
///
/// # Contract
///
/// * [`send_batch`](Sink::send_batch) returns exactly one outcome per record,
///   in the order of `batch`. A missing outcome counts as
///   [`SinkOutcome::Retry`]; extra outcomes are ignored.
/// * Records arrive in commit order. For each `(topic, key)` the sink must
///   publish them in that order, and once a record of a key is not delivered
///   it must not publish later records of the same key from this batch
///   (return `Retry` for them): otherwise the broker would hold them ahead
///   of the earlier record, and no relay can take that back. (A Kafka
///   producer with idempotence enabled keeps per-partition order this way.)
///   Such a `Retry` behind an earlier `Retry` of the same key does not count
///   as an attempt of the later record: it simply waits for the earlier one.
///   A sink that delivers one anyway is counted in
///   [`RelayCounters::order_violations`](crate::RelayCounters::order_violations)
///   and the record is treated as delivered (it is on the broker).
/// * `Delivered` means the broker has the message durably. The relay then
///   commits; a crash between the two is the only source of duplicates.
/// * [`SinkOutcome::Unavailable`] says the *sink* could not take the record
///   (broker down, timeout, transport error), not that the record is at
///   fault: the relay backs off as a whole and the record keeps its place
///   and its attempt count. Use `Retry` only for a failure that is about the
///   record and may pass on its own, `Reject` for one that will not.
/// * A sink should return within
///   [`RelayConfig::sink_timeout_ms`](crate::RelayConfig::sink_timeout_ms);
///   after that the relay treats every record as `Unavailable`.
/// * A panic counts as `Retry` for every record of the batch.
#[async_trait::async_trait]
pub trait Sink: Send + Sync + 'static {
    /// Publish a batch (all records of one claim, in commit order). Returns one outcome per
    /// record, same length and order as `batch`.
    async fn send_batch(&self, batch: &[OutboxRecord]) -> Vec<SinkOutcome>;
}

#[async_trait::async_trait]
impl<S: Sink + ?Sized> Sink for Arc<S> {
    async fn send_batch(&self, batch: &[OutboxRecord]) -> Vec<SinkOutcome> {
        (**self).send_batch(batch).await
    }
}

#[async_trait::async_trait]
impl<S: Sink + ?Sized> Sink for Box<S> {
    async fn send_batch(&self, batch: &[OutboxRecord]) -> Vec<SinkOutcome> {
        (**self).send_batch(batch).await
    }
}

/// What became of one record handed to a [`Sink`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SinkOutcome {
    /// The broker acknowledged it: the relay deletes it (or marks it sent).
    Delivered,
    /// Transient failure of this record: the relay retries it after an
    /// exponential backoff with full jitter, and later records of the same
    /// key wait for it. After
    /// [`max_attempts`](crate::RelayConfig::max_attempts) it is
    /// dead-lettered.
    Retry {
        /// Why it failed (kept in the record's error history).
        error: String,
    },
    /// The sink as a whole cannot take records now (broker unreachable,
    /// timed out, purged at the deadline). Not an attempt: the record stays
    /// where it is, later records of its key wait, and the relay backs off
    /// ([`RelayConfig::unavailable_backoff_initial_ms`](crate::RelayConfig::unavailable_backoff_initial_ms))
    /// before it probes again. Never dead-letters, unless the opt-in
    /// [`RelayConfig::dead_letter_after_secs`](crate::RelayConfig::dead_letter_after_secs)
    /// has passed.
    Unavailable {
        /// Why the sink could not take it (kept in the relay's log and
        /// health, not in the record's history).
        error: String,
    },
    /// Permanent failure (e.g. message too large for the broker): the relay
    /// dead-letters it now. Later records of its key wait for an operator or
    /// proceed, as [`RelayConfig::dead_letter_order`](crate::RelayConfig::dead_letter_order)
    /// says.
    Reject {
        /// Why it was rejected (kept in the dead letter's error history).
        error: String,
    },
}

impl SinkOutcome {
    /// A `Retry` outcome.
    pub fn retry(error: impl Into<String>) -> Self {
        Self::Retry {
            error: error.into(),
        }
    }
    /// An `Unavailable` outcome.
    pub fn unavailable(error: impl Into<String>) -> Self {
        Self::Unavailable {
            error: error.into(),
        }
    }
    /// A `Reject` outcome.
    pub fn reject(error: impl Into<String>) -> Self {
        Self::Reject {
            error: error.into(),
        }
    }
}
