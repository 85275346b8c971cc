//! [`KafkaSink`]: the soma-outbox relay's way to Kafka.

use std::collections::HashSet;
use std::time::Instant;

use rdkafka::message::{Header, OwnedHeaders};
use soma_outbox::{OutboxRecord, Sink, SinkOutcome};

use crate::error::BusError;
use crate::producer::{BusProducer, RawRecord};

/// Delivers outbox records to Kafka with the idempotent `acks=all` producer.
///
/// A batch is enqueued in order and acknowledgements awaited together (within
/// `publish_timeout_ms`). On timeout the producer purges everything
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
        let deadline = Instant::now() + self.producer.config().publish_timeout();
        let handle = self.producer.handle();
        let mut futs = Vec::with_capacity(batch.len());
        let mut sent = Vec::with_capacity(batch.len());
        let mut out: Vec<Option<SinkOutcome>> = (0..batch.len()).map(|_| None).collect();
        let mut stopped: Option<String> = None;
        // Keys with a record rejected in this batch: their later records wait.
        let mut rejected: HashSet<(&str, &str)> = HashSet::new();
        for (i, r) in batch.iter().enumerate() {
            if let Some(e) = &stopped {
                out[i] = Some(SinkOutcome::unavailable(e.clone()));
                continue;
            }
            let group = r.key.as_deref().map(|k| (r.topic.as_str(), k));
            if group.is_some_and(|g| rejected.contains(&g)) {
                out[i] = Some(SinkOutcome::retry(
                    "not sent: an earlier record of its key was rejected",
                ));
                continue;
            }
            let mut headers = OwnedHeaders::new_with_capacity(r.headers.len());
            for (k, v) in &r.headers {
                headers = headers.insert(Header {
                    key: k.as_str(),
                    value: Some(v.as_bytes()),
                });
            }
            let rec = RawRecord {
                topic: &r.topic,
                key: r.key.as_deref().map(str::as_bytes),
                payload: &r.payload,
                headers,
            };
            match self.producer.enqueue_on(&handle, rec, deadline).await {
                Ok(f) => {
                    futs.push(f);
                    sent.push(i);
                }
                Err(e) if e.is_permanent() => {
                    if let Some(g) = group {
                        rejected.insert(g);
                    }
                    out[i] = Some(outcome(&e));
                }
                Err(e) => {
                    // Stop here: nothing after a failed record may be sent ahead of it.
                    stopped = Some(e.to_string());
                    out[i] = Some(outcome(&e));
                }
            }
        }
        for (i, r) in sent.into_iter().zip(
            self.producer
                .await_deliveries_on(&handle, futs, deadline)
                .await,
        ) {
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
