//! The dead-letter topic: a message that failed for good (or is not a valid
//! envelope) is written to `<topic>.dlq` with its key, payload and headers
//! plus the `soma-dlq-*` headers below, retried until the broker
//! acknowledges it; only then is its offset committed.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};

use super::Shared;
use crate::producer::RawRecord;

/// DLQ header: topic the message was consumed from.
pub const DLQ_ORIGIN_TOPIC: &str = "soma-dlq-origin-topic";
/// DLQ header: partition the message was consumed from.
pub const DLQ_ORIGIN_PARTITION: &str = "soma-dlq-origin-partition";
/// DLQ header: offset the message was consumed from.
pub const DLQ_ORIGIN_OFFSET: &str = "soma-dlq-origin-offset";
/// DLQ header: handler attempts made (0 when the record was malformed).
pub const DLQ_ATTEMPTS: &str = "soma-dlq-attempts";
/// DLQ header: the last error.
pub const DLQ_ERROR: &str = "soma-dlq-error";
/// DLQ header: the handler name.
pub const DLQ_HANDLER: &str = "soma-dlq-handler";
/// DLQ header: the consumer group.
pub const DLQ_GROUP: &str = "soma-dlq-group";
/// DLQ header: when the message was dead-lettered (RFC 3339).
pub const DLQ_FAILED_AT: &str = "soma-dlq-failed-at";
/// Prefix of all DLQ headers (stripped on replay).
pub const DLQ_HEADER_PREFIX: &str = "soma-dlq-";

/// Longest error text stored in a DLQ header.
const MAX_ERROR_BYTES: usize = 2048;

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Writes `msg` to the DLQ, retrying until acknowledged (or hard shutdown).
pub(super) async fn dead_letter(
    msg: &OwnedMessage,
    s: &Shared,
    attempts: u32,
    error: &str,
) -> bool {
    if s.broadcast {
        s.metrics.consumed(msg.topic(), "dropped");
        return true;
    }
    let dlq = s.cfg.dlq_topic(msg.topic());
    let stamp = DlqStamp::new(msg, s, attempts, error);
    // True once a write failed: this lane counts in `dlq_blocked` until it ends.
    let mut failing = false;
    loop {
        let deadline = Instant::now() + s.cfg.publish_timeout();
        let rec = RawRecord {
            topic: &dlq,
            key: msg.key(),
            payload: msg.payload().unwrap_or_default(),
            headers: stamp.headers(msg),
        };
        match s.producer.send_raw(rec, deadline).await {
            Ok(_) => {
                if failing {
                    s.dlq_write_recovered();
                }
                s.metrics.consumed(msg.topic(), "dead_lettered");
                tracing::warn!(event = "dead_lettered", topic = msg.topic(), dlq = %dlq, partition = msg.partition(), offset = msg.offset(), attempts);
                return true;
            }
            Err(e) => {
                tracing::error!(event = "dlq_write_failed", dlq = %dlq, error = %e);
                lane_blocked(s, &dlq, &mut failing);
                if !backed_off(s).await {
                    // Abandoned uncommitted: redelivered after a restart.
                    s.dlq_write_recovered();
                    return false;
                }
            }
        }
    }
}

/// The `soma-dlq-*` header values of one dead-lettered message, the same
/// for every attempt at writing it.
struct DlqStamp<'a> {
    origin_topic: &'a str,
    partition: String,
    offset: String,
    attempts: String,
    /// At most [`MAX_ERROR_BYTES`].
    error: &'a str,
    handler: &'a str,
    group: &'a str,
    failed_at: String,
}

impl<'a> DlqStamp<'a> {
    fn new(msg: &'a OwnedMessage, s: &'a Shared, attempts: u32, error: &'a str) -> Self {
        Self {
            origin_topic: msg.topic(),
            partition: msg.partition().to_string(),
            offset: msg.offset().to_string(),
            attempts: attempts.to_string(),
            error: truncate(error, MAX_ERROR_BYTES),
            handler: s.handler_name.as_str(),
            group: s.group.as_str(),
            failed_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        }
    }

    /// `msg`'s headers without any `soma-dlq-*` it already carried, then
    /// this stamp's.
    fn headers(&self, msg: &OwnedMessage) -> OwnedHeaders {
        let mut h = OwnedHeaders::new();
        if let Some(orig) = msg.headers() {
            for x in orig.iter() {
                if !x.key.starts_with(DLQ_HEADER_PREFIX) {
                    h = h.insert(Header {
                        key: x.key,
                        value: x.value,
                    });
                }
            }
        }
        for (k, v) in [
            (DLQ_ORIGIN_TOPIC, self.origin_topic),
            (DLQ_ORIGIN_PARTITION, self.partition.as_str()),
            (DLQ_ORIGIN_OFFSET, self.offset.as_str()),
            (DLQ_ATTEMPTS, self.attempts.as_str()),
            (DLQ_ERROR, self.error),
            (DLQ_HANDLER, self.handler),
            (DLQ_GROUP, self.group),
            (DLQ_FAILED_AT, self.failed_at.as_str()),
        ] {
            h = h.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            });
        }
        h
    }
}

/// A DLQ write failed: the lane counts in `dlq_blocked` from its first
/// failure (`failing`), and the health component is degraded.
fn lane_blocked(s: &Shared, dlq: &str, failing: &mut bool) {
    if !*failing {
        *failing = true;
        s.dlq_blocked.fetch_add(1, Ordering::AcqRel);
    }
    if let Some(hr) = &s.health {
        hr.set_degraded(format!("DLQ write to {dlq} failing; lane paused"));
    }
}

/// Waits `consumer.dlq_retry_backoff_ms` before the next attempt; false when a hard
/// shutdown came first.
async fn backed_off(s: &Shared) -> bool {
    tokio::select! {
        () = tokio::time::sleep(Duration::from_millis(s.cfg.consumer.dlq_retry_backoff_ms)) => true,
        () = s.hard.cancelled() => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("abc", 10), "abc");
    }
}
