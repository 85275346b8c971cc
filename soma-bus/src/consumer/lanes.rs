//! Lanes: ordered concurrency. Messages of one key go to one lane and are
//! handled one at a time, in offset order; different keys run on
//! `consumer.concurrency` lanes at once. A lane retries a failed handler
//! with backoff, then dead-letters the message.

use std::collections::{HashSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::message::{Headers, Message, OwnedMessage};
use soma_observability::propagation::{record_trace_id, set_parent_from};
use tokio::sync::mpsc;
use tracing::Instrument;

use super::dlq::dead_letter;
use super::{HandlerError, Shared};
use crate::config::BusConfig;
use crate::envelope::{Envelope, EnvelopeError};
use crate::trace;

pub(super) struct Work {
    pub(super) msg: OwnedMessage,
}

pub(super) fn lane_of(msg: &OwnedMessage, lanes: usize) -> usize {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    match msg.key() {
        Some(k) => {
            msg.topic().hash(&mut h);
            k.hash(&mut h);
        }
        None => {
            msg.partition().hash(&mut h);
            msg.offset().hash(&mut h);
        }
    }
    (h.finish() % lanes as u64) as usize
}

/// The envelope ids a consumer handled lately, oldest first out.
pub(super) struct RecentIds {
    ids: HashSet<uuid::Uuid>,
    order: VecDeque<uuid::Uuid>,
    capacity: usize,
}

impl RecentIds {
    pub(super) fn new(capacity: usize) -> Self {
        Self {
            ids: HashSet::with_capacity(capacity.min(1 << 16)),
            order: VecDeque::with_capacity(capacity.min(1 << 16)),
            capacity,
        }
    }

    fn contains(&self, id: &uuid::Uuid) -> bool {
        self.ids.contains(id)
    }

    fn insert(&mut self, id: uuid::Uuid) {
        if !self.ids.insert(id) {
            return;
        }
        self.order.push_back(id);
        if self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.ids.remove(&old);
            }
        }
    }
}

pub(super) async fn lane(mut rx: mpsc::Receiver<Work>, s: Arc<Shared>) {
    while let Some(Work { msg }) = rx.recv().await {
        let finished = process(&msg, &s).await;
        if !finished {
            // Abandoned during shutdown: later messages of this lane may share
            // its key, so none of them may run before it is redelivered.
            return;
        }
        if !s.broadcast {
            s.progress
                .lock()
                .done(msg.topic(), msg.partition(), msg.offset());
        }
        if s.hard.is_cancelled() {
            return;
        }
    }
}

fn decode(msg: &OwnedMessage) -> Result<Envelope, EnvelopeError> {
    let headers = msg.headers();
    let iter = headers
        .into_iter()
        .flat_map(|h| h.iter())
        .map(|h| (h.key, h.value));
    Envelope::from_kafka(msg.key(), msg.payload(), iter)
}

/// The retry delay before `attempt` (1 for the first retry): the shared
/// [`Backoff`](soma_observability::resilience::Backoff) without jitter,
/// `min(retry_backoff_max_ms, retry_backoff_initial_ms * 2^(attempt-1))`.
fn backoff(cfg: &BusConfig, attempt: u32) -> Duration {
    use soma_observability::resilience::{Backoff, BackoffConfig, Jitter};
    Backoff::new(
        BackoffConfig::new(
            cfg.consumer.retry_backoff_initial_ms,
            cfg.consumer.retry_backoff_max_ms,
        )
        .with_jitter(Jitter::None),
    )
    .delay(attempt)
}

/// Handles one message to completion. Returns true when its offset may be committed.
///
/// Everything, handler and DLQ write included, runs in a `soma.consume` span
/// whose parent is the record's trace context (see [trace context](crate#trace-context)).
async fn process(msg: &OwnedMessage, s: &Shared) -> bool {
    let topic = msg.topic();
    let span = tracing::info_span!(
        "soma.consume",
        otel.kind = "consumer",
        topic,
        partition = msg.partition(),
        offset = msg.offset(),
        handler = %s.handler_name,
        message_id = tracing::field::Empty,
        tenant = tracing::field::Empty,
        message_type = tracing::field::Empty,
        trace_id = tracing::field::Empty,
    );
    // Read from the raw headers, so a malformed record's DLQ write keeps its trace.
    set_parent_from(&span, &trace::record_trace_headers(msg.headers()));
    record_trace_id(&span);
    async {
        let env = match decode(msg) {
            Ok(env) => env,
            Err(err) => {
                s.metrics.consumed(topic, "malformed");
                tracing::warn!(event = "malformed_message", topic, partition = msg.partition(), offset = msg.offset(), error = %err);
                return dead_letter(msg, s, 0, &format!("malformed envelope: {err}")).await;
            }
        };
        let span = tracing::Span::current();
        span.record("message_id", tracing::field::display(env.id));
        span.record("tenant", env.tenant.as_str());
        span.record("message_type", env.message_type.as_str());
        process_envelope(msg, env, s).await
    }
    .instrument(span)
    .await
}

/// Whether this handler already handled the envelope: among the recent ids
/// (`dedupe_window`), or recorded in the inbox.
async fn already_handled(env: &Envelope, s: &Shared) -> bool {
    if let Some(recent) = &s.recent {
        if recent.lock().contains(&env.id) {
            return true;
        }
    }
    if let Some(inbox) = &s.inbox {
        match inbox.seen(&s.handler_name, env.id).await {
            Ok(seen) => return seen,
            Err(error) => {
                // Without the inbox we cannot tell; handling again is the at-least-once choice.
                tracing::warn!(event = "inbox_check_failed", %error);
            }
        }
    }
    false
}

/// Remembers a handled envelope (recent ids, inbox) and counts it.
async fn record_handled(topic: &str, env: &Envelope, s: &Shared) {
    if let Some(recent) = &s.recent {
        recent.lock().insert(env.id);
    }
    if let Some(inbox) = &s.inbox {
        if let Err(error) = inbox.record(&s.handler_name, env.id).await {
            tracing::warn!(event = "inbox_record_failed", %error);
        }
    }
    s.metrics.consumed(topic, "handled");
}

/// Runs the handler on `env` until it succeeds, fails for good (dead-lettered,
/// or dropped in broadcast mode) or shutdown abandons it; true when the
/// offset may be committed.
async fn process_envelope(msg: &OwnedMessage, env: Envelope, s: &Shared) -> bool {
    let topic = msg.topic();
    if already_handled(&env, s).await {
        s.metrics.consumed(topic, "duplicate");
        return true;
    }
    let mut attempt = 0u32;
    let mut waits = 0u32;
    loop {
        attempt += 1;
        let started = Instant::now();
        let result = s.handler.handle(env.clone()).await;
        let labels_outcome = if result.is_ok() { "handled" } else { "error" };
        s.metrics
            .handle_seconds
            .get_or_create(&crate::metrics::ConsumeLabels {
                topic: topic.to_owned(),
                outcome: labels_outcome,
            })
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(()) => {
                record_handled(topic, &env, s).await;
                return true;
            }
            Err(HandlerError::Unavailable(e)) => {
                // Not an attempt: the dependency is down, the message waits.
                waits += 1;
                s.metrics.consumed(topic, "waiting");
                if waits == 1 || waits.is_multiple_of(20) {
                    tracing::warn!(event = "handler_waiting", waits, error = %e);
                }
                attempt -= 1;
                tokio::select! {
                    () = tokio::time::sleep(backoff(&s.cfg, waits.min(16))) => {}
                    // Shutting down: abandon; the message is redelivered after restart.
                    () = s.stop.cancelled() => return false,
                }
            }
            Err(HandlerError::Retryable(e)) if attempt < s.cfg.consumer.max_attempts => {
                s.metrics.consumed(topic, "retried");
                tracing::info!(event = "handler_retry", attempt, error = %e);
                tokio::select! {
                    () = tokio::time::sleep(backoff(&s.cfg, attempt)) => {}
                    // Shutting down: abandon; the message is redelivered after restart.
                    () = s.stop.cancelled() => return false,
                }
            }
            Err(e) => {
                tracing::warn!(event = "handler_failed", attempt, error = %e);
                if s.broadcast {
                    s.metrics.consumed(topic, "dropped");
                    return true;
                }
                // Not recorded in the inbox: a replay from the DLQ must be handled.
                return dead_letter(msg, s, attempt, &e.to_string()).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_ids_forget_the_oldest_beyond_capacity() {
        let ids: Vec<uuid::Uuid> = (0..4).map(|_| uuid::Uuid::now_v7()).collect();
        let mut r = RecentIds::new(3);
        for id in &ids[..3] {
            r.insert(*id);
        }
        r.insert(ids[0]); // already there: not a second entry
        assert!(ids[..3].iter().all(|id| r.contains(id)));
        r.insert(ids[3]);
        assert!(!r.contains(&ids[0]), "the oldest is forgotten");
        assert!(ids[1..].iter().all(|id| r.contains(id)));
        assert_eq!(r.order.len(), 3);
        assert_eq!(r.ids.len(), 3);
    }

    #[test]
    fn backoff_grows_and_caps() {
        let mut cfg = BusConfig::default();
        cfg.consumer.retry_backoff_initial_ms = 100;
        cfg.consumer.retry_backoff_max_ms = 350;
        assert_eq!(backoff(&cfg, 1), Duration::from_millis(100));
        assert_eq!(backoff(&cfg, 2), Duration::from_millis(200));
        assert_eq!(backoff(&cfg, 3), Duration::from_millis(350));
    }
}
