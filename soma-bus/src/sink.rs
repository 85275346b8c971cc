//! [`KafkaSink`]: the soma-outbox relay's way to Kafka.

use std::collections::HashSet;

use rdkafka::message::{Header, OwnedHeaders};
use soma_outbox::{OutboxRecord, Sink, SinkOutcome};

use crate::error::BusError;
use crate::ordered::{OrderedSend, Pushed};
use crate::producer::{BusProducer, RawRecord};

/// Delivers outbox records to Kafka with the idempotent `acks=all` producer.
///
/// A batch is enqueued in order and acknowledgements awaited together (within
/// `publisher.timeout_ms`). On timeout the producer purges everything
/// unacknowledged, so within a partition a failed record is never followed by
/// a delivered one of the same batch: the relay keeps per-key order.
///
/// Outcomes: records the broker refuses for what they are (too large,
/// invalid, not authorized) are [`Reject`](SinkOutcome::Reject)ed, and
/// later records of the same key in the batch are not sent (they wait for
/// the operator's decision, see
/// [`RelayConfig::dead_letter_order`](soma_outbox::RelayConfig::dead_letter_order)).
/// Every other failure (broker unreachable, timeout, purge, transport) means
/// the broker is unavailable, not that the record is at fault:
/// [`Unavailable`](SinkOutcome::Unavailable). The relay then backs off and
/// no record loses an attempt, so an outage of any length dead-letters
/// nothing.
#[derive(Debug, Clone)]
pub struct KafkaSink {
    producer: BusProducer,
}

impl KafkaSink {
    /// A sink sending through `producer`.
    pub fn new(producer: BusProducer) -> Self {
        Self { producer }
    }
}

fn outcome(e: &BusError) -> SinkOutcome {
    if e.is_permanent() {
        SinkOutcome::reject(e.to_string())
    } else {
        SinkOutcome::unavailable(e.to_string())
    }
}

#[async_trait::async_trait]
impl Sink for KafkaSink {
    async fn send_batch(&self, batch: &[OutboxRecord]) -> Vec<SinkOutcome> {
        let mut send = OrderedSend::new(&self.producer);
        let mut out: Vec<Option<SinkOutcome>> = (0..batch.len()).map(|_| None).collect();
        // Keys with a record rejected in this batch: their later records wait.
        let mut rejected: HashSet<(&str, &str)> = HashSet::new();
        for (i, r) in batch.iter().enumerate() {
            let group = r.key.as_deref().map(|k| (r.topic.as_str(), k));
            if send.stopped().is_none() && group.is_some_and(|g| rejected.contains(&g)) {
                out[i] = Some(SinkOutcome::retry(
                    "not sent: an earlier record of its key was rejected",
                ));
                continue;
            }
            out[i] = match send.push(i, raw_record(r)).await {
                Pushed::Enqueued => None,
                Pushed::Refused(e) => {
                    if let Some(g) = group {
                        rejected.insert(g);
                    }
                    Some(outcome(&e))
                }
                Pushed::NotSent { first, .. } => Some(SinkOutcome::unavailable(first)),
            };
        }
        for (i, r) in send.finish().await {
            out[i] = Some(match r {
                Ok(_) => SinkOutcome::Delivered,
                Err(e) => outcome(&e),
            });
        }
        out.into_iter()
            .map(|o| o.unwrap_or_else(|| SinkOutcome::unavailable("not attempted")))
            .collect()
    }
}

/// The Kafka record of an outbox record (its stored headers as they are).
fn raw_record(r: &OutboxRecord) -> RawRecord<'_> {
    let mut headers = OwnedHeaders::new_with_capacity(r.headers.len());
    for (k, v) in &r.headers {
        headers = headers.insert(Header {
            key: k.as_str(),
            value: Some(v.as_bytes()),
        });
    }
    RawRecord {
        topic: &r.topic,
        key: r.key.as_deref().map(str::as_bytes),
        payload: &r.payload,
        headers,
    }
}
