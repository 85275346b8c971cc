//! The producer; documented on [`BusProducer`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::future::join_all;
use parking_lot::RwLock;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer, PurgeConfig};

use crate::config::BusConfig;
use crate::envelope::Envelope;
use crate::error::BusError;

/// Where the broker stored an acknowledged message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    /// Partition.
    pub partition: i32,
    /// Offset within the partition.
    pub offset: i64,
}

/// What [`BusProducer::flush`] could not deliver before its deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlushReport {
    /// Messages still queued or unacknowledged at the deadline (0 = everything flushed).
    pub unflushed: i32,
}

impl FlushReport {
    /// True when everything was delivered.
    pub fn is_complete(&self) -> bool {
        self.unflushed == 0
    }
}

/// A record to send: the parts of a Kafka message soma-bus produces.
pub(crate) struct RawRecord<'a> {
    pub(crate) topic: &'a str,
    pub(crate) key: Option<&'a [u8]>,
    pub(crate) payload: &'a [u8],
    pub(crate) headers: OwnedHeaders,
}

/// One librdkafka handle. `purged` is set (under the write lock) when the
/// handle is purged; enqueueing holds the read lock, so nothing can be
/// enqueued into a handle after its purge.
pub(crate) struct Handle {
    producer: FutureProducer,
    purged: RwLock<bool>,
    /// Distinguishes handles: a later handle has a larger generation.
    generation: u64,
}

/// Generations of librdkafka handles in this process.
static HANDLE_GENERATION: AtomicU64 = AtomicU64::new(1);

impl Handle {
    fn new(config: &BusConfig) -> Result<Self, BusError> {
        Ok(Self {
            producer: config.producer_client_config().create()?,
            purged: RwLock::new(false),
            generation: HANDLE_GENERATION.fetch_add(1, Ordering::Relaxed),
        })
    }

    /// This handle's generation (unique in the process).
    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }
}

struct Inner {
    handle: RwLock<Arc<Handle>>,
    config: BusConfig,
    purges: AtomicU64,
    /// Sends (or batches) in a row that failed with a non-permanent error
    /// other than a timeout, with no acknowledgement in between.
    failed_in_a_row: AtomicU32,
    /// Handles replaced because the producer kept failing (healed).
    heals: AtomicU64,
}

/// Consecutive failed sends (no acknowledgement in between) after which the
/// librdkafka handle is replaced by a fresh one: a producer that sees the
/// broker answer but keeps failing (after a broker restart with lost state,
/// unknown broker errors) heals without a restart of the service.
const HEAL_AFTER_FAILURES: u32 = 3;

/// Errors that mean the broker no longer accepts this producer's identity or
/// sequence state: only a new producer id can continue.
fn is_identity_error(e: &KafkaError) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        e.rdkafka_error_code(),
        Some(
            C::UnknownProducerId
                | C::OutOfOrderSequenceNumber
                | C::InvalidProducerEpoch
                | C::InvalidProducerIdMapping
                | C::ProducerFenced
        )
    )
}

/// The Kafka producer: `acks=all`, idempotent, ordered failure on timeout.
///
/// [`BusProducer`] wraps an rdkafka `FutureProducer`. Sending enqueues into
/// librdkafka and returns a delivery future; bulk sends enqueue everything
/// first and then wait for all delivery reports together, so there is no
/// per-message round trip.
///
/// **Ordered failure.** When a send is not acknowledged within
/// `publisher.timeout_ms`, the producer *purges* everything queued or in flight
/// (librdkafka reports those messages as failed). Within a partition
/// acknowledgements arrive in order, so after a purge every partition has an
/// acknowledged prefix and a failed suffix: a caller that moves failed
/// messages to the outbox keeps per-key order. A purged message that was
/// already in flight may still have been written by the broker; it is then
/// delivered twice (same envelope id).
///
/// **Acknowledged means stored at an offset.** A delivery report without
/// an offset (librdkafka's answer to some idempotence paths, e.g. a
/// `DUPLICATE_SEQUENCE_NUMBER`) is returned as [`BusError::Unconfirmed`],
/// never as `Ok`.
///
/// **Healing.** Every user of the producer (the durable publisher, the
/// outbox relay's [`KafkaSink`](crate::KafkaSink), DLQ writes, replay)
/// sends through the same handle, so they heal together: when the broker
/// refuses the producer's identity (unknown producer id, out-of-order
/// sequence, fenced or invalid epoch), or three sends in a row fail with
/// non-permanent errors and no acknowledgement in between, the handle is
/// replaced by a fresh one (a new idempotent producer id) exactly as after a
/// purge: what was queued on the old one fails in order and is retried by
/// its caller. A timeout purges and replaces the handle too. No service
/// restart is needed after a broker restart.
///
/// Idempotent `acks=all` Kafka producer shared by the publisher, the outbox
/// sink, the consumer's DLQ writer and replay. Cheap to clone.
#[derive(Clone)]
pub struct BusProducer {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for BusProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BusProducer")
            .field("bootstrap_servers", &self.inner.config.bootstrap_servers)
            .field("purges", &self.inner.purges.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// Encodes envelope headers for Kafka.
pub(crate) fn envelope_headers(env: &Envelope) -> OwnedHeaders {
    let mut h = OwnedHeaders::new_with_capacity(12 + env.attributes.len());
    for (k, v) in env.to_headers() {
        h = h.insert(Header {
            key: k,
            value: Some(v.as_bytes()),
        });
    }
    for (k, v) in &env.attributes {
        h = h.insert(Header {
            key: k,
            value: Some(v.as_bytes()),
        });
    }
    h
}

impl BusProducer {
    /// Creates the producer (no network round trip; librdkafka connects lazily).
    pub fn new(config: &BusConfig) -> Result<Self, BusError> {
        config.validate()?;
        config.warn_deprecated_keys();
        let handle = Handle::new(config)?;
        Ok(Self {
            inner: Arc::new(Inner {
                handle: RwLock::new(Arc::new(handle)),
                config: config.clone(),
                purges: AtomicU64::new(0),
                failed_in_a_row: AtomicU32::new(0),
                heals: AtomicU64::new(0),
            }),
        })
    }

    /// The configuration this producer was built with.
    pub fn config(&self) -> &BusConfig {
        &self.inner.config
    }

    /// The current librdkafka handle. A batch enqueues all its records into
    /// one handle so a purge cannot split it across handles.
    pub(crate) fn handle(&self) -> Arc<Handle> {
        self.inner.handle.read().clone()
    }

    /// Messages queued or awaiting acknowledgement.
    pub fn in_flight(&self) -> i32 {
        self.handle().producer.in_flight_count()
    }

    /// How many times the producer purged unacknowledged messages after a timeout.
    pub fn purge_count(&self) -> u64 {
        self.inner.purges.load(Ordering::Relaxed)
    }

    /// How many times the producer replaced its librdkafka handle because
    /// it kept failing while the broker answered (see [`BusProducer`]'s
    /// "Healing").
    pub fn heal_count(&self) -> u64 {
        self.inner.heals.load(Ordering::Relaxed)
    }

    /// Counts a send that failed with `e` on `handle`; replaces the handle
    /// when the broker refuses the producer's identity, or after
    /// [`HEAL_AFTER_FAILURES`] failures in a row.
    fn note_failure(&self, handle: &Arc<Handle>, e: &KafkaError) {
        let n = self.inner.failed_in_a_row.fetch_add(1, Ordering::AcqRel) + 1;
        let identity = is_identity_error(e);
        if identity || n >= HEAL_AFTER_FAILURES {
            self.inner.failed_in_a_row.store(0, Ordering::Release);
            if self.retire(handle) {
                self.inner.heals.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    event = "producer_healed",
                    error = %e,
                    failures_in_a_row = n,
                    identity,
                    "producer kept failing; continuing on a fresh producer (new producer id)"
                );
            }
        }
    }

    fn note_success(&self) {
        if self.inner.failed_in_a_row.load(Ordering::Relaxed) != 0 {
            self.inner.failed_in_a_row.store(0, Ordering::Release);
        }
    }

    /// Enqueues one record into `handle`, waiting (until `deadline`) while
    /// the local queue is full. Fails once `handle` was purged.
    pub(crate) async fn enqueue_on(
        &self,
        handle: &Arc<Handle>,
        rec: RawRecord<'_>,
        deadline: Instant,
    ) -> Result<DeliveryFuture, BusError> {
        let mut record = FutureRecord::<[u8], [u8]>::to(rec.topic)
            .payload(rec.payload)
            .headers(rec.headers);
        if let Some(k) = rec.key {
            record = record.key(k);
        }
        loop {
            let sent = {
                let purged = handle.purged.read();
                if *purged {
                    return Err(BusError::Timeout(self.inner.config.publisher.timeout_ms));
                }
                handle.producer.send_result(record)
            };
            match sent {
                Ok(f) => return Ok(f),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    if Instant::now() >= deadline {
                        return Err(BusError::Timeout(self.inner.config.publisher.timeout_ms));
                    }
                    record = r;
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                Err((e, _)) => {
                    if handle.producer.client().fatal_error().is_some() {
                        self.purge_handle(handle);
                    } else if !crate::error::is_permanent_kafka(&e) {
                        self.note_failure(handle, &e);
                    }
                    return Err(e.into());
                }
            }
        }
    }

    /// Waits for delivery reports of records enqueued into `handle` until
    /// `deadline`; if some are still missing then, purges `handle` (ordered
    /// failure) and collects the rest.
    pub(crate) async fn await_deliveries_on(
        &self,
        handle: &Arc<Handle>,
        futs: Vec<DeliveryFuture>,
        deadline: Instant,
    ) -> Vec<Result<Delivery, BusError>> {
        let mut all = std::pin::pin!(join_all(futs));
        let raw = match tokio::time::timeout_at(deadline.into(), &mut all).await {
            Ok(r) => r,
            Err(_) => {
                self.purge_handle(handle);
                all.await
            }
        };
        let timeout_ms = self.inner.config.publisher.timeout_ms;
        let mut fatal_checked = false;
        let mut acked = false;
        let mut unhealthy: Option<KafkaError> = None;
        let out = raw
            .into_iter()
            .map(|r| match r {
                // Not proof of storage: see `BusError::Unconfirmed`.
                Ok(Ok(d)) if d.offset < 0 => Err(BusError::Unconfirmed {
                    partition: d.partition,
                }),
                Ok(Ok(d)) => {
                    acked = true;
                    Ok(Delivery {
                        partition: d.partition,
                        offset: d.offset,
                    })
                }
                Ok(Err((e, _))) => {
                    if !fatal_checked {
                        fatal_checked = true;
                        if handle.producer.client().fatal_error().is_some() {
                            tracing::warn!(event = "producer_fatal_error", error = %e);
                            self.purge_handle(handle);
                        }
                    }
                    let mapped = map_delivery_error(e, timeout_ms);
                    if let BusError::Kafka(k) = &mapped {
                        if unhealthy.is_none() && !crate::error::is_permanent_kafka(k) {
                            unhealthy = Some(k.clone());
                        }
                    }
                    Err(mapped)
                }
                Err(_canceled) => Err(BusError::Timeout(timeout_ms)),
            })
            .collect();
        if acked {
            self.note_success();
        } else if let Some(e) = unhealthy {
            self.note_failure(handle, &e);
        }
        out
    }

    /// Purges everything queued or in flight (those messages fail now, in
    /// order) and continues on a fresh librdkafka handle.
    ///
    /// A fresh handle gets a new idempotent producer id, so no sequence state
    /// from before the failure has to be reconciled with a restarted broker.
    pub fn purge(&self) {
        let h = self.handle();
        self.purge_handle(&h);
    }

    fn purge_handle(&self, handle: &Arc<Handle>) {
        if self.retire(handle) {
            self.inner.purges.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                event = "producer_purge",
                "publish deadline passed; failing unacknowledged messages"
            );
        }
    }

    /// Marks `handle` purged, installs a fresh handle in its place, fails
    /// everything still queued or in flight on it (in order), and retires it
    /// off the async workers. Returns false when `handle` was retired
    /// already (by another caller).
    fn retire(&self, handle: &Arc<Handle>) -> bool {
        {
            let mut purged = handle.purged.write();
            if *purged {
                return false;
            }
            *purged = true;
        }
        {
            let mut current = self.inner.handle.write();
            if Arc::ptr_eq(&current, handle) {
                match Handle::new(&self.inner.config) {
                    Ok(h) => *current = Arc::new(h),
                    Err(error) => tracing::error!(event = "producer_recreate_failed", %error),
                }
            }
        }
        handle
            .producer
            .purge(PurgeConfig::default().queue().inflight());
        // Destroying a librdkafka handle blocks: let the last reference go on
        // a blocking thread, not on an async worker.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let retired = handle.clone();
            rt.spawn_blocking(move || {
                let until = Instant::now() + Duration::from_secs(120);
                while Arc::strong_count(&retired) > 1 && Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(50));
                }
                drop(retired);
            });
        }
        true
    }

    /// Flushes queued messages, waiting at most `timeout`; reports what is left.
    pub async fn flush(&self, timeout: Duration) -> FlushReport {
        let h = self.handle();
        let unflushed = tokio::task::spawn_blocking(move || {
            let _ = h.producer.flush(timeout);
            h.producer.in_flight_count()
        })
        .await
        .unwrap_or(-1);
        if unflushed != 0 {
            tracing::warn!(event = "flush_incomplete", unflushed);
        }
        FlushReport { unflushed }
    }
}

fn map_delivery_error(e: KafkaError, timeout_ms: u64) -> BusError {
    match e.rdkafka_error_code() {
        Some(
            RDKafkaErrorCode::PurgeQueue
            | RDKafkaErrorCode::PurgeInflight
            | RDKafkaErrorCode::MessageTimedOut,
        ) => BusError::Timeout(timeout_ms),
        _ => BusError::Kafka(e),
    }
}
