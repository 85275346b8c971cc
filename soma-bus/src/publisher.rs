//! The durable publisher; its guarantee is documented on [`DurablePublisher`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use soma_observability::health::{Criticality, HealthRegistry};
use soma_observability::metrics::MetricsRegistry;
use soma_observability::propagation::{current_trace_id, record_trace_id, set_parent_from};
use soma_observability::resilience::{BreakerState, CircuitBreaker, OpenHealth, Permit};
use soma_outbox::{NewMessage, Outbox};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use crate::envelope::{Envelope, TraceContext};
use crate::error::{BusError, is_permanent_kafka};
use crate::metrics::BusMetrics;
use crate::ordered::{OrderedSend, Pushed};
use crate::producer::{BusProducer, Delivery, FlushReport, RawRecord, envelope_headers};
use crate::sequencer::{Lane, Sequencer, Tickets};
use crate::trace;

/// How long a key written with [`DurablePublisher::publish_in_tx`] is treated as
/// pending even if the outbox does not show it yet (its transaction may not have committed).
const TX_HOLD: Duration = Duration::from_secs(30);

/// Deferred keys asked about in one query of the pending-key poller.
const PENDING_POLL_CHUNK: usize = 1_000;

/// Where an accepted message went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishOutcome {
    /// Acknowledged by the broker (`acks=all`).
    Published {
        /// Partition.
        partition: i32,
        /// Offset.
        offset: i64,
    },
    /// Committed to the outbox; the relay will deliver it. Carries the envelope id.
    Deferred(Uuid),
}

impl PublishOutcome {
    /// True when the message went to the outbox.
    pub fn is_deferred(&self) -> bool {
        matches!(self, Self::Deferred(_))
    }
}

#[derive(Debug)]
struct PendingKey {
    generation: u64,
    hold_until: Option<Instant>,
}

/// Keys with messages waiting in the outbox, as far as this process knows.
#[derive(Default)]
struct KeyTracker {
    keys: Mutex<HashMap<String, HashMap<String, PendingKey>>>,
    len: std::sync::atomic::AtomicUsize,
    generation: std::sync::atomic::AtomicU64,
}

impl KeyTracker {
    fn is_pending(&self, topic: &str, key: &str) -> bool {
        if self.len.load(std::sync::atomic::Ordering::Acquire) == 0 {
            return false;
        }
        self.keys
            .lock()
            .get(topic)
            .is_some_and(|m| m.contains_key(key))
    }

    fn add(&self, topic: &str, key: &str, hold: Option<Instant>) {
        let generation = self
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        let mut keys = self.keys.lock();
        let m = keys.entry(topic.to_owned()).or_default();
        match m.get_mut(key) {
            Some(e) => {
                e.generation = generation;
                e.hold_until = e.hold_until.max(hold);
            }
            None => {
                m.insert(
                    key.to_owned(),
                    PendingKey {
                        generation,
                        hold_until: hold,
                    },
                );
                self.len.fetch_add(1, std::sync::atomic::Ordering::Release);
            }
        }
    }

    fn snapshot(&self) -> Vec<(String, String, u64)> {
        let keys = self.keys.lock();
        keys.iter()
            .flat_map(|(t, m)| m.iter().map(|(k, e)| (t.clone(), k.clone(), e.generation)))
            .collect()
    }

    /// Applies a poll result taken at `generation`.
    fn observed(&self, topic: &str, key: &str, generation: u64, pending: u64) {
        let mut keys = self.keys.lock();
        let Some(m) = keys.get_mut(topic) else { return };
        let Some(e) = m.get_mut(key) else { return };
        if pending > 0 {
            e.hold_until = None; // the write is visible: normal rules from now on
            return;
        }
        if e.generation != generation || e.hold_until.is_some_and(|t| Instant::now() < t) {
            return;
        }
        m.remove(key);
        self.len.fetch_sub(1, std::sync::atomic::Ordering::Release);
        if m.is_empty() {
            keys.remove(topic);
        }
    }

    fn count(&self) -> usize {
        self.len.load(std::sync::atomic::Ordering::Acquire)
    }
}

struct Inner {
    producer: BusProducer,
    outbox: Outbox,
    metrics: BusMetrics,
    breaker: CircuitBreaker,
    tracker: KeyTracker,
    sequencer: Sequencer,
    check_outbox_per_message: bool,
    cancel: CancellationToken,
}

/// The durable publisher: Kafka first, the outbox when Kafka cannot take it.
///
/// # Guarantee
///
/// [`DurablePublisher::publish`] returns `Ok` only when the message is durable:
/// either the broker acknowledged it with `acks=all`
/// ([`PublishOutcome::Published`]) or PostgreSQL committed it to the outbox
/// ([`PublishOutcome::Deferred`]); the soma-outbox relay, with [`KafkaSink`](crate::KafkaSink),
/// delivers deferred messages when the broker is back. If both fail the call
/// returns [`BusError::Unavailable`]: the message was not accepted, and the
/// caller should retry it **with the same envelope** (same id). One edge
/// remains: a Kafka send that timed out and was purged may still have been
/// written by the broker just before the purge, so a message the call
/// refused can appear on the topic; a retry with the same id is then a
/// duplicate the consumers' inbox drops, never a second message.
///
/// Delivery is **at-least-once**. A message can reach Kafka twice (same
/// envelope id) when the broker wrote it but the ack was lost (the publish
/// timed out, so it was also written to the outbox), or when the relay
/// re-sends a message it had already delivered but not yet marked.
///
/// # Per-key order across the switch
///
/// A message goes to the outbox when the breaker is open, when Kafka fails or
/// times out, or when its `(topic, key)` already has messages waiting in the
/// outbox. Keys this process deferred are remembered in memory and released
/// only once the outbox reports no pending message for that key
/// (`Outbox::pending_for_keys`, one query for up to 1,000 keys, polled every
/// `publisher.pending_key_poll_interval_ms`),
/// so a later message never overtakes an earlier deferred one. Failures are
/// ordered too: on a publish timeout the producer purges everything
/// unacknowledged, so each partition has an acknowledged prefix and a
/// deferred suffix.
///
/// **Concurrent callers of one key** keep call order as well: each keyed
/// message draws a ticket when it is routed, and a message that goes to the
/// outbox is written only after every earlier message of its key (from any
/// caller of this publisher) was acknowledged, written to the outbox, or
/// failed. While an earlier message of a key is on its way to the outbox, or
/// in flight on a producer handle that has since been purged, later messages
/// of the key follow it to the outbox rather than overtake it on a fresh
/// handle. A caller whose future is dropped releases its tickets.
///
/// **Multi-process caveat:** the memory of deferred keys is per process. If
/// another process (or this one before a restart) deferred a key, this
/// process does not know, and a direct publish of that key may overtake the
/// waiting messages. Set `publisher.check_outbox_per_message = true` to ask the outbox
/// on every publish (one Postgres round trip each) when several processes
/// publish the same keys, or route all publishers of a key through one process.
///
/// Cheap to clone.
#[derive(Clone)]
pub struct DurablePublisher {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for DurablePublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DurablePublisher")
            .field("breaker", &self.inner.breaker.state())
            .field("deferred_keys", &self.inner.tracker.count())
            .finish_non_exhaustive()
    }
}

/// Builder for [`DurablePublisher`].
pub struct DurablePublisherBuilder {
    producer: BusProducer,
    outbox: Outbox,
    metrics: Option<MetricsRegistry>,
    health: Option<HealthRegistry>,
}

impl DurablePublisherBuilder {
    /// Registers metrics in `registry` (default: a private registry).
    pub fn metrics(mut self, registry: &MetricsRegistry) -> Self {
        self.metrics = Some(registry.clone());
        self
    }

    /// Reports the component `bus_publisher` (degraded while publishing to the outbox).
    pub fn health(mut self, registry: &HealthRegistry) -> Self {
        self.health = Some(registry.clone());
        self
    }

    /// Builds the publisher and starts the pending-key poller (needs a tokio runtime).
    pub fn build(self) -> DurablePublisher {
        let cfg = self.producer.config().clone();
        let metrics = BusMetrics::new(&self.metrics.clone().unwrap_or_default());
        let health = self.health.map(|h| {
            let r = h.reporter("bus_publisher", Criticality::Optional);
            r.set_up();
            r
        });
        metrics.breaker_open.get_or_create(&Vec::new()).set(0);
        let mut breaker = CircuitBreaker::new("bus_publisher", cfg.publisher.breaker);
        if let Some(registry) = &self.metrics {
            breaker = breaker.metrics(registry);
        }
        if let Some(h) = &health {
            breaker = breaker.health(h.clone(), OpenHealth::Degraded);
        }
        let inner = Arc::new(Inner {
            producer: self.producer,
            outbox: self.outbox,
            metrics,
            breaker,
            tracker: KeyTracker::default(),
            sequencer: Sequencer::default(),
            check_outbox_per_message: cfg.publisher.check_outbox_per_message,
            cancel: CancellationToken::new(),
        });
        let poll = Duration::from_millis(cfg.publisher.pending_key_poll_interval_ms.max(10));
        tokio::spawn(poll_pending_keys(
            Arc::downgrade(&inner),
            poll,
            inner.cancel.clone(),
        ));
        DurablePublisher { inner }
    }
}

async fn poll_pending_keys(
    inner: std::sync::Weak<Inner>,
    every: Duration,
    cancel: CancellationToken,
) {
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        let Some(inner) = inner.upgrade() else { return };
        let snapshot = inner.tracker.snapshot();
        // One query per poll for every deferred key, in chunks.
        for chunk in snapshot.chunks(PENDING_POLL_CHUNK) {
            let keys: Vec<(&str, &str)> = chunk
                .iter()
                .map(|(t, k, _)| (t.as_str(), k.as_str()))
                .collect();
            match inner.outbox.pending_for_keys(&keys).await {
                Ok(counts) => {
                    for ((topic, key, generation), n) in chunk.iter().zip(counts) {
                        inner.tracker.observed(topic, key, *generation, n);
                    }
                }
                Err(error) => {
                    tracing::warn!(event = "pending_key_poll_failed", %error);
                    break;
                }
            }
        }
        inner
            .metrics
            .deferred_keys
            .get_or_create(&Vec::new())
            .set(inner.tracker.count() as i64);
    }
}

enum Route {
    Kafka,
    Outbox(String),
}

impl DurablePublisher {
    /// Starts a builder from a producer and an outbox.
    pub fn builder(producer: BusProducer, outbox: Outbox) -> DurablePublisherBuilder {
        DurablePublisherBuilder {
            producer,
            outbox,
            metrics: None,
            health: None,
        }
    }

    /// The underlying producer.
    pub fn producer(&self) -> &BusProducer {
        &self.inner.producer
    }

    /// Current breaker state (the shared
    /// [`BreakerState`]; half-open means the next publish probes Kafka).
    pub fn breaker_state(&self) -> BreakerState {
        self.inner.breaker.state()
    }

    /// Keys this process currently routes to the outbox because messages are waiting there.
    pub fn deferred_key_count(&self) -> usize {
        self.inner.tracker.count()
    }

    async fn route(&self, topic: &str, env: &Envelope, breaker_open: bool) -> Route {
        if breaker_open {
            return Route::Outbox("breaker open".into());
        }
        if let Some(key) = env.key.as_deref() {
            if self.inner.tracker.is_pending(topic, key) {
                return Route::Outbox("key has messages waiting in the outbox".into());
            }
            if self.inner.check_outbox_per_message {
                match self.inner.outbox.pending_for_key(topic, key).await {
                    Ok(0) => {}
                    Ok(_) => return Route::Outbox("key has messages waiting in the outbox".into()),
                    // Unknown: be safe and keep order by using the outbox.
                    Err(e) => return Route::Outbox(format!("outbox pending check failed: {e}")),
                }
            }
        }
        Route::Kafka
    }

    /// Publishes one envelope. See [`DurablePublisher`] for the guarantee.
    ///
    /// Runs in a `soma.publish` span (a child of the current span) whose
    /// context the message carries unless it has its own (see [trace context](crate#trace-context)).
    pub async fn publish(&self, topic: &str, env: &Envelope) -> Result<PublishOutcome, BusError> {
        let span = tracing::info_span!(
            "soma.publish",
            otel.kind = "producer",
            topic,
            message_id = %env.id,
            tenant = %env.tenant,
            message_type = %env.message_type,
            outcome = tracing::field::Empty,
            trace_id = tracing::field::Empty,
        );
        if let Some(t) = &env.trace {
            // An explicit context is sent as it is; with no trace in scope the
            // publish span joins it rather than starting an unrelated one.
            if current_trace_id().is_none() {
                set_parent_from(&span, t);
            }
        }
        record_trace_id(&span);
        let mut out = self
            .publish_batch(topic, std::slice::from_ref(env), &span)
            .instrument(span.clone())
            .await;
        let result = out.pop().unwrap_or(Err(BusError::Shutdown));
        span.record(
            "outcome",
            match &result {
                Ok(PublishOutcome::Published { .. }) => "kafka",
                Ok(PublishOutcome::Deferred(_)) => "deferred",
                Err(_) => "failed",
            },
        );
        result
    }

    /// Publishes many envelopes to one topic; results are per message, in order.
    ///
    /// Kafka-bound messages are all enqueued before any acknowledgement is
    /// awaited; failed and outbox-bound ones are written to the outbox in one
    /// transaction, in input order. Runs in one `soma.publish` span (field
    /// `count`) whose context every message without its own carries.
    pub async fn publish_many(
        &self,
        topic: &str,
        envs: &[Envelope],
    ) -> Vec<Result<PublishOutcome, BusError>> {
        let span = tracing::info_span!(
            "soma.publish",
            otel.kind = "producer",
            topic,
            count = envs.len(),
            trace_id = tracing::field::Empty,
        );
        record_trace_id(&span);
        self.publish_batch(topic, envs, &span)
            .instrument(span.clone())
            .await
    }

    /// route → send in order → defer. Every keyed message holds a ticket of
    /// the [`Sequencer`] from routing until it is acknowledged, written to
    /// the outbox, or failed, so concurrent publishes of one key keep call
    /// order across the switch to the outbox.
    async fn publish_batch(
        &self,
        topic: &str,
        envs: &[Envelope],
        span: &tracing::Span,
    ) -> Vec<Result<PublishOutcome, BusError>> {
        let started = Instant::now();
        // Injected into messages without a context of their own (the
        // caller's, when a filter disabled the publish span).
        let trace = if span.is_disabled() {
            TraceContext::current()
        } else {
            TraceContext::of_span(span)
        };
        let mut results: Vec<Option<Result<PublishOutcome, BusError>>> =
            (0..envs.len()).map(|_| None).collect();
        // One permit per call: while open every call goes to the outbox at
        // once; half-open admits exactly one probe call. The permit is
        // dropped unreported if this future is cancelled, which frees the
        // probe slot.
        let permit = self.inner.breaker.try_acquire().ok();
        let (mut to_outbox, mut kafka_idx) = self.route_all(topic, envs, permit.is_none()).await;

        let handle = self.inner.producer.handle();
        let mut tickets = self.draw_tickets(topic, envs, &handle, &mut kafka_idx, &mut to_outbox);

        if let (false, Some(permit)) = (kafka_idx.is_empty(), permit) {
            self.send_in_order(
                topic,
                permit,
                envs,
                &kafka_idx,
                handle,
                trace.as_ref(),
                started,
                &mut tickets,
                &mut results,
                &mut to_outbox,
            )
            .await;
        }
        if !to_outbox.is_empty() {
            self.defer(
                topic,
                envs,
                to_outbox,
                trace.as_ref(),
                started,
                &tickets,
                &mut results,
            )
            .await;
        }
        drop(tickets);
        let failed = results
            .iter()
            .filter(|r| matches!(r, Some(Err(_)) | None))
            .count() as u64;
        if failed > 0 {
            self.inner
                .metrics
                .publish(topic, "failed", failed, started.elapsed().as_secs_f64());
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or(Err(BusError::Shutdown)))
            .collect()
    }

    /// Draws a [`Sequencer`] ticket for every envelope on the lane it was
    /// routed to; a Kafka-bound message whose key has an earlier message
    /// still being deferred (by another call) moves to the outbox behind it.
    fn draw_tickets(
        &self,
        topic: &str,
        envs: &[Envelope],
        handle: &Arc<crate::producer::Handle>,
        kafka_idx: &mut Vec<usize>,
        to_outbox: &mut Vec<(usize, String)>,
    ) -> Tickets {
        let keys: Vec<Option<(&str, &str)>> = envs
            .iter()
            .map(|e| e.key.as_deref().map(|k| (topic, k)))
            .collect();
        let mut lanes = vec![Lane::Outbox; envs.len()];
        for &i in kafka_idx.iter() {
            lanes[i] = Lane::Kafka(handle.generation());
        }
        let (tickets, forced) = self
            .inner
            .sequencer
            .draw(&keys, &lanes, handle.generation());
        kafka_idx.retain(|&i| {
            if forced[i] {
                to_outbox.push((i, "an earlier message of the key is being deferred".into()));
            }
            !forced[i]
        });
        tickets
    }

    /// Routes each envelope: `(outbox-bound with the reason, Kafka-bound)`.
    /// A key routed to the outbox takes its later messages in the batch
    /// with it.
    async fn route_all(
        &self,
        topic: &str,
        envs: &[Envelope],
        breaker_open: bool,
    ) -> (Vec<(usize, String)>, Vec<usize>) {
        let mut to_outbox: Vec<(usize, String)> = Vec::new();
        let mut batch_deferred: std::collections::HashSet<&str> = std::collections::HashSet::new();
        let mut kafka_idx = Vec::with_capacity(envs.len());
        for (i, env) in envs.iter().enumerate() {
            let in_batch = env
                .key
                .as_deref()
                .is_some_and(|k| batch_deferred.contains(k));
            let route = if in_batch {
                Route::Outbox("earlier message of the key deferred".into())
            } else {
                self.route(topic, env, breaker_open).await
            };
            match route {
                Route::Kafka => kafka_idx.push(i),
                Route::Outbox(reason) => {
                    if let Some(k) = env.key.as_deref() {
                        batch_deferred.insert(k);
                    }
                    to_outbox.push((i, reason));
                }
            }
        }
        (to_outbox, kafka_idx)
    }

    /// Sends the Kafka-bound envelopes on `handle` as one [`OrderedSend`]
    /// (a transient failure sends that one and every later one to the
    /// outbox), files each outcome, and updates the breaker.
    #[allow(clippy::too_many_arguments)]
    async fn send_in_order(
        &self,
        topic: &str,
        permit: Permit,
        envs: &[Envelope],
        kafka_idx: &[usize],
        handle: Arc<crate::producer::Handle>,
        trace: Option<&TraceContext>,
        started: Instant,
        tickets: &mut Tickets,
        results: &mut [Option<Result<PublishOutcome, BusError>>],
        to_outbox: &mut Vec<(usize, String)>,
    ) {
        let inner = &*self.inner;
        let deadline = Instant::now() + inner.producer.config().publish_timeout();
        let mut send = OrderedSend::on(&inner.producer, handle, deadline);
        for &i in kafka_idx {
            let rec = RawRecord {
                topic,
                key: envs[i].kafka_key(),
                payload: &envs[i].payload,
                headers: with_trace(&envs[i], trace),
            };
            match send.push(i, rec).await {
                Pushed::Enqueued => {}
                Pushed::Refused(e) => {
                    tickets.settle(i);
                    results[i] = Some(Err(e));
                }
                Pushed::NotSent { first, .. } => {
                    tickets.to_outbox(i);
                    to_outbox.push((i, first));
                }
            }
        }
        let stopped = send.stopped().is_some();
        let deliveries = send.finish().await;
        let (acked, failed) = settle_deliveries(deliveries, tickets, results, to_outbox);
        if acked > 0 {
            inner
                .metrics
                .publish(topic, "kafka", acked, started.elapsed().as_secs_f64());
        }
        self.report_to_breaker(topic, permit, stopped || failed, acked);
    }

    /// Tells the breaker how the call went (a failure, some acks, or
    /// nothing that says anything about Kafka) and reports a state change.
    fn report_to_breaker(&self, topic: &str, permit: Permit, failed: bool, acked: u64) {
        let inner = &*self.inner;
        let before = inner.breaker.state();
        if failed {
            permit.failure();
        } else if acked > 0 {
            permit.success();
        } else {
            drop(permit);
        }
        let after = inner.breaker.state();
        if before != after {
            let open = i64::from(after == BreakerState::Open);
            inner
                .metrics
                .breaker_open
                .get_or_create(&Vec::new())
                .set(open);
            tracing::info!(event = "publisher_breaker", topic, state = after.as_str());
        }
    }

    /// Writes the outbox-bound envelopes in one transaction, in input order,
    /// once every earlier publish of their keys (by other callers) settled.
    #[allow(clippy::too_many_arguments)]
    async fn defer(
        &self,
        topic: &str,
        envs: &[Envelope],
        mut to_outbox: Vec<(usize, String)>,
        trace: Option<&TraceContext>,
        started: Instant,
        tickets: &Tickets,
        results: &mut [Option<Result<PublishOutcome, BusError>>],
    ) {
        let inner = &*self.inner;
        to_outbox.sort_by_key(|(i, _)| *i);
        let indexes: Vec<usize> = to_outbox.iter().map(|(i, _)| *i).collect();
        tickets.wait_turn(&indexes).await;
        let msgs: Vec<NewMessage> = to_outbox
            .iter()
            .map(|(i, _)| outbox_message(topic, &envs[*i], trace))
            .collect();
        let reason = to_outbox[0].1.clone();
        match inner.outbox.enqueue_standalone(&msgs).await {
            Ok(_) => {
                for (i, _) in &to_outbox {
                    let env = &envs[*i];
                    if let Some(k) = env.key.as_deref() {
                        inner.tracker.add(topic, k, None);
                    }
                    results[*i] = Some(Ok(PublishOutcome::Deferred(env.id)));
                }
                inner
                    .metrics
                    .deferred_keys
                    .get_or_create(&Vec::new())
                    .set(inner.tracker.count() as i64);
                inner.metrics.publish(
                    topic,
                    "deferred",
                    msgs.len() as u64,
                    started.elapsed().as_secs_f64(),
                );
                tracing::debug!(event = "deferred", topic, count = msgs.len(), reason = %reason);
            }
            Err(outbox) => {
                tracing::error!(event = "publish_failed", topic, count = msgs.len(), kafka = %reason, error = %outbox);
                let text = outbox.to_string();
                let mut first = Some(outbox);
                for (i, why) in &to_outbox {
                    let err = match first.take() {
                        Some(o) => BusError::Unavailable {
                            kafka: why.clone(),
                            outbox: o,
                        },
                        None => BusError::NotSent(format!("outbox write failed: {text}")),
                    };
                    results[*i] = Some(Err(err));
                }
            }
        }
    }

    /// Writes the envelope to the outbox inside the caller's transaction
    /// (transactional outbox): it is delivered only if `conn`'s transaction
    /// commits. Later direct publishes of the same key from this process wait
    /// behind it (the key is held for up to 30 s until the outbox shows it).
    pub async fn publish_in_tx(
        &self,
        conn: &mut sqlx::PgConnection,
        topic: &str,
        env: &Envelope,
    ) -> Result<Uuid, BusError> {
        self.publish_many_in_tx(conn, &[(topic, env)])
            .await
            .map(|_| env.id)
    }

    /// Writes every `(topic, envelope)` of `out` to the outbox inside the
    /// caller's transaction with **one** statement, in order: what
    /// [`publish_in_tx`](Self::publish_in_tx) does for one, without a round
    /// trip per message. The relay delivers them in this order per key
    /// after commit. Validation covers the whole batch first: on an error
    /// nothing is written and the transaction stays usable.
    pub async fn publish_many_in_tx(
        &self,
        conn: &mut sqlx::PgConnection,
        out: &[(&str, &Envelope)],
    ) -> Result<Vec<Uuid>, BusError> {
        if out.is_empty() {
            return Ok(Vec::new());
        }
        // The caller's span: the write happens in its transaction.
        let trace = TraceContext::current();
        let msgs: Vec<NewMessage> = out
            .iter()
            .map(|(topic, env)| outbox_message(topic, env, trace.as_ref()))
            .collect();
        self.inner.outbox.enqueue(conn, &msgs).await?;
        let hold = Instant::now() + TX_HOLD;
        for (topic, env) in out {
            if let Some(k) = env.key.as_deref() {
                self.inner.tracker.add(topic, k, Some(hold));
            }
        }
        Ok(out.iter().map(|(_, env)| env.id).collect())
    }

    /// Stops the key poller and flushes the producer within `producer.flush_timeout_ms`.
    pub async fn shutdown(&self) -> FlushReport {
        self.inner.cancel.cancel();
        let timeout = Duration::from_millis(self.inner.producer.config().producer.flush_timeout_ms);
        self.inner.producer.flush(timeout).await
    }
}

/// Files each acknowledgement (input index, result; in send order):
/// acked → `Published`; a permanent error → that error; anything else →
/// the outbox. Returns (acked, whether any went to the outbox).
fn settle_deliveries(
    deliveries: Vec<(usize, Result<Delivery, BusError>)>,
    tickets: &mut Tickets,
    results: &mut [Option<Result<PublishOutcome, BusError>>],
    to_outbox: &mut Vec<(usize, String)>,
) -> (u64, bool) {
    let mut acked = 0u64;
    let mut failed = false;
    for (i, r) in deliveries {
        match r {
            Ok(Delivery { partition, offset }) => {
                acked += 1;
                tickets.settle(i);
                results[i] = Some(Ok(PublishOutcome::Published { partition, offset }));
            }
            Err(BusError::Kafka(e)) if is_permanent_kafka(&e) => {
                tickets.settle(i);
                results[i] = Some(Err(BusError::Kafka(e)));
            }
            Err(e) => {
                failed = true;
                tickets.to_outbox(i);
                to_outbox.push((i, e.to_string()));
            }
        }
    }
    (acked, failed)
}

/// The Kafka headers of `env`, carrying `trace` unless the envelope has
/// its own trace context (as [`outbox_message`] does for the outbox).
fn with_trace(env: &Envelope, trace: Option<&TraceContext>) -> rdkafka::message::OwnedHeaders {
    let headers = envelope_headers(env);
    match (env.trace.is_none(), trace) {
        (true, Some(t)) => trace::add_trace_headers(headers, t),
        _ => headers,
    }
}

/// The outbox message for `env` on `topic`, carrying `trace` unless the
/// envelope has its own trace context (the one Envelope → outbox
/// conversion).
fn outbox_message(topic: &str, env: &Envelope, trace: Option<&TraceContext>) -> NewMessage {
    let mut headers = env.header_map();
    if env.trace.is_none() {
        if let Some(t) = trace {
            trace::add_trace_map(&mut headers, t);
        }
    }
    NewMessage {
        id: env.id,
        topic: topic.to_owned(),
        key: env.key.clone(),
        payload: env.payload.clone(),
        headers,
        dedupe_key: None,
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}
