//! Live previews: a reply's text reaches SSE clients **while** it is
//! generated, without giving up the exactly-once stored reply.
//!
//! The conversation worker stores and publishes a reply's events in one
//! transaction once the whole reply exists (see [`crate::conversation`]):
//! that is what makes them exactly-once, and it means the first stored
//! event reaches a client only after the last token. So, alongside, the
//! worker publishes **previews** ([`EventKind::Preview`])
//! on a second, non-durable path, and every gateway forwards them to the
//! SSE streams of their conversation (the client contract is on
//! [`LiveEvent`]).
//!
//! **Why Redis pub/sub, not a Kafka topic.** A preview is worthless a
//! second later, so it needs no log, no offsets, no retention and no
//! consumer group: Redis `PUBLISH` keeps nothing and costs one round trip
//! of an in-memory server, while each record on the broker is stored and
//! replicated (one record per word was already what made the broker the
//! platform's bottleneck, see [`STORED_EVENTS`](crate::protocol::STORED_EVENTS)).
//! Every service already has a Redis client configuration, the gateway a
//! connection.
//!
//! **One channel**, `<redis.key_prefix>soma:platform:ch:<chat.live_channel>`
//! (soma-redis [`PubSub`]'s naming), for all tenants: every gateway
//! subscribes once and fans each preview out by `(tenant, conversation)` to
//! the streams it holds (none: dropped at once), like the stored events.
//!
//! **Trust.** Whoever may `PUBLISH` on that Redis may put previews in any
//! conversation's streams, as whoever may write the Kafka topics may put
//! stored events there: Redis is inside the platform's trust boundary, like
//! the broker. A preview can never pass for a stored event (the gateway
//! rejects anything but a preview without an event id), and the stored
//! events replace it.
//!
//! **Delivery: at most once, may be lost, never in the way.**
//! - per reply, the first preview goes as soon as there is text and the
//!   generator makes the worker wait for more, then at most one per
//!   `chat.live_interval_ms` (flushed on that timer while the model is
//!   silent), at most `chat.live_max_previews` per reply; beyond that,
//!   clients wait for the stored events. A generator that has its whole
//!   answer at once (the built-in responder) previews nothing: its stored
//!   events follow within milliseconds anyway;
//! - the worker hands previews to one background task through a queue of
//!   [`QUEUE`] previews; when it is full (Redis slow) a preview is
//!   **dropped** (the next one carries the text anyway: previews carry the
//!   reply so far), so generation never waits on Redis;
//! - Redis down, a gateway restarting or resubscribing, a lagging stream:
//!   previews are lost, nothing else is. Counted as
//!   `soma_platform_live_previews_total{outcome}` — on the worker
//!   `published`, `dropped` (queue full), `failed` (Redis refused or is
//!   down); on the gateway `received`, `rejected` (not a preview).

use std::sync::Arc;
use std::time::Duration;

use soma_observability::metrics::MetricsRegistry;
use soma_observability::prometheus_client::metrics::counter::Counter;
use soma_observability::prometheus_client::metrics::family::Family;
use soma_redis::{PubSub, PubSubEvent, RedisClient, RedisError};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::protocol::{self, EventKind, LiveEvent, MemoryStatus};
use crate::settings::ChatSettings;

/// The soma-redis tenant part of the live channel's name: one channel for
/// every tenant (the tenant travels in each [`LiveEvent`]).
pub const CHANNEL_SCOPE: &str = "platform";

/// Previews the worker queues for Redis before it drops new ones.
pub const QUEUE: usize = 256;

/// How long the gateway waits before it tries the live channel again
/// after Redis refused or dropped the subscription.
const RESUBSCRIBE_DELAY: Duration = Duration::from_secs(1);

/// `soma_platform_live_previews_total{outcome}`.
#[derive(Clone)]
struct LiveMetrics(Family<Vec<(&'static str, &'static str)>, Counter>);

/// The outcomes a worker counts.
const PUBLISHER_OUTCOMES: [&str; 3] = ["published", "dropped", "failed"];
/// The outcomes a gateway counts.
const FORWARDER_OUTCOMES: [&str; 2] = ["received", "rejected"];

impl LiveMetrics {
    /// The family, with a zero series per outcome of this side (so
    /// dashboards see them before the first preview).
    fn new(registry: &MetricsRegistry, outcomes: &[&'static str]) -> Self {
        let m = Self(registry.counter_family(
            "soma_platform_live_previews_total",
            "Live reply previews, by outcome: published, dropped (queue full), failed \
             (Redis down or refusing) on the conversation worker; received, rejected \
             (not a preview) on the gateway",
        ));
        for o in outcomes {
            let _ = m.0.get_or_create(&vec![("outcome", *o)]);
        }
        m
    }

    fn count(&self, outcome: &'static str) {
        self.0.get_or_create(&vec![("outcome", outcome)]).inc();
    }
}

/// The full Redis channel name of the live path (see the module docs).
pub fn channel(redis: &RedisClient, name: &str) -> Result<String, RedisError> {
    redis.keys().key(CHANNEL_SCOPE, "ch", name)
}

/// The worker's side: queues previews for one background task that
/// publishes them, in order, on the live channel.
#[derive(Clone)]
pub struct LivePublisher {
    tx: Option<mpsc::Sender<LiveEvent>>,
    interval: Duration,
    max: u32,
    metrics: LiveMetrics,
}

impl std::fmt::Debug for LivePublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LivePublisher")
            .field("enabled", &self.tx.is_some())
            .field("interval", &self.interval)
            .field("max", &self.max)
            .finish()
    }
}

impl LivePublisher {
    /// A publisher on `redis` per `chat` (`live_previews`, `live_channel`,
    /// `live_interval_ms`, `live_max_previews`); a disabled one (every
    /// preview discarded at once) when `chat.live_previews` is off or
    /// `redis` is `None`. The background task ends when the last clone is
    /// dropped.
    pub fn start(
        chat: &ChatSettings,
        redis: Option<RedisClient>,
        registry: &MetricsRegistry,
    ) -> Result<Self, RedisError> {
        let metrics = LiveMetrics::new(registry, &PUBLISHER_OUTCOMES);
        let tx = match redis.filter(|_| chat.live_previews) {
            None => None,
            Some(redis) => {
                let channel = channel(&redis, &chat.live_channel)?;
                let (tx, rx) = mpsc::channel(QUEUE);
                tokio::spawn(publish_loop(redis, channel, rx, metrics.clone()));
                Some(tx)
            }
        };
        Ok(Self {
            tx,
            interval: Duration::from_millis(chat.live_interval_ms),
            max: chat.live_max_previews,
            metrics,
        })
    }

    /// The previews of one reply (to `message_id`, answered with `memory`).
    pub fn reply(
        &self,
        tenant: &str,
        conversation_id: &str,
        message_id: Uuid,
        memory: MemoryStatus,
    ) -> ReplyPreviews<'_> {
        ReplyPreviews {
            publisher: self,
            tenant: tenant.to_owned(),
            conversation_id: conversation_id.to_owned(),
            message_id,
            memory,
            sent: 0,
            last: None,
            pending: false,
        }
    }

    fn offer(&self, event: LiveEvent) {
        let Some(tx) = &self.tx else { return };
        if tx.try_send(event).is_err() {
            self.metrics.count("dropped");
        }
    }
}

async fn publish_loop(
    redis: RedisClient,
    channel: String,
    mut rx: mpsc::Receiver<LiveEvent>,
    metrics: LiveMetrics,
) {
    while let Some(event) = rx.recv().await {
        let Ok(payload) = serde_json::to_vec(&event) else {
            continue;
        };
        match redis.publish(&channel, bytes::Bytes::from(payload)).await {
            Ok(_) => metrics.count("published"),
            Err(e) => {
                metrics.count("failed");
                tracing::debug!(event = "live_preview_failed", error = %e);
            }
        }
    }
    let _ = redis.quit().await;
}

/// The coalescing of one reply's previews (see the module docs): call
/// [`grew`](Self::grew) after each token, and [`flush`](Self::flush) with
/// the reply so far when [`due_at`](Self::due_at) has passed **and the
/// generator has no token ready** — so a generator that has its whole
/// answer at once (the built-in responder) previews nothing, and a model
/// that makes the client wait previews what it has at once.
#[derive(Debug)]
pub struct ReplyPreviews<'a> {
    publisher: &'a LivePublisher,
    tenant: String,
    conversation_id: String,
    message_id: Uuid,
    memory: MemoryStatus,
    sent: u32,
    last: Option<Instant>,
    pending: bool,
}

impl ReplyPreviews<'_> {
    /// The reply grew: there is text to preview.
    pub fn grew(&mut self) {
        self.pending = true;
    }

    /// When the text not yet previewed may go: at once for the first
    /// preview, else `chat.live_interval_ms` after the previous one. `None`
    /// when everything is previewed, the reply has had its
    /// `chat.live_max_previews`, or previews are off.
    pub fn due_at(&self) -> Option<Instant> {
        if !self.pending || self.sent >= self.publisher.max || self.publisher.tx.is_none() {
            return None;
        }
        Some(match self.last {
            None => Instant::now(),
            Some(last) => last + self.publisher.interval,
        })
    }

    /// Previews `so_far` now (unless nothing is pending or the reply has
    /// had its maximum).
    pub fn flush(&mut self, so_far: &str) {
        if self.due_at().is_none() {
            return;
        }
        let event = protocol::preview_event(
            self.message_id,
            &self.conversation_id,
            self.sent,
            so_far,
            self.memory,
        );
        self.publisher.offer(LiveEvent {
            tenant: self.tenant.clone(),
            event,
        });
        self.sent += 1;
        self.last = Some(Instant::now());
        self.pending = false;
    }

    /// How many previews this reply has had.
    pub fn sent(&self) -> u32 {
        self.sent
    }
}

/// The gateway's side: subscribes to the live channel (again after every
/// loss, until `stop`) and hands each preview to `deliver`. Anything on
/// the channel that is not a preview without an event id is rejected, so
/// this path can never pass for a stored event.
pub fn spawn_forwarder(
    redis: RedisClient,
    chat: &ChatSettings,
    registry: &MetricsRegistry,
    stop: CancellationToken,
    deliver: impl Fn(LiveEvent) + Send + Sync + 'static,
) -> JoinHandle<()> {
    let metrics = LiveMetrics::new(registry, &FORWARDER_OUTCOMES);
    let name = chat.live_channel.clone();
    let deliver = Arc::new(deliver);
    tokio::spawn(async move {
        while !stop.is_cancelled() {
            let forwarded = tokio::select! {
                _ = stop.cancelled() => return,
                r = forward(&redis, &name, &metrics, deliver.as_ref()) => r,
            };
            if let Err(e) = forwarded {
                tracing::warn!(event = "live_channel_unavailable", error = %e);
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(RESUBSCRIBE_DELAY) => {}
            }
        }
    })
}

/// One subscription's life: until the subscriber goes away.
async fn forward(
    redis: &RedisClient,
    name: &str,
    metrics: &LiveMetrics,
    deliver: &(dyn Fn(LiveEvent) + Send + Sync),
) -> Result<(), RedisError> {
    let pubsub = PubSub::connect(redis).await?;
    let mut sub = pubsub.subscribe(CHANNEL_SCOPE, name).await?;
    tracing::info!(event = "live_channel_subscribed", channel = sub.channel());
    while let Some(ev) = sub.recv().await {
        match ev {
            PubSubEvent::Message(bytes) => match serde_json::from_slice::<LiveEvent>(&bytes) {
                Ok(live) if live.event.kind == EventKind::Preview && live.event.event_id == 0 => {
                    metrics.count("received");
                    deliver(live);
                }
                _ => metrics.count("rejected"),
            },
            // Previews published meanwhile are lost; the stored events
            // follow on their own path.
            PubSubEvent::Resubscribed | PubSubEvent::Lagged(_) => {
                tracing::debug!(event = "live_previews_lost", ?ev);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publisher(interval_ms: u64, max: u32) -> (LivePublisher, mpsc::Receiver<LiveEvent>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let p = LivePublisher {
            tx: Some(tx),
            interval: Duration::from_millis(interval_ms),
            max,
            metrics: LiveMetrics::new(&MetricsRegistry::new(Default::default()), &[]),
        };
        (p, rx)
    }

    /// Moves `r`'s previous preview `by` into the past.
    fn age(r: &mut ReplyPreviews<'_>, by: Duration) {
        r.last = r.last.map(|l| l - by);
    }

    #[tokio::test]
    async fn previews_are_coalesced_bounded_and_carry_the_reply_so_far() {
        let (p, mut rx) = publisher(60_000, 3);
        let mut r = p.reply("t", "c1", Uuid::nil(), MemoryStatus::None);
        assert_eq!(r.due_at(), None, "nothing to preview yet");
        r.flush("");
        assert!(rx.try_recv().is_err());
        // The first preview may go at once.
        r.grew();
        assert!(r.due_at().unwrap() <= Instant::now());
        r.flush("Hel");
        let first = rx.try_recv().expect("first preview");
        assert_eq!(first.event.text, "Hel");
        assert_eq!(first.event.seq, 0);
        assert_eq!(first.event.kind, EventKind::Preview);
        assert_eq!(first.event.event_id, 0);
        assert_eq!(first.tenant, "t");
        assert_eq!(r.due_at(), None, "nothing pending");
        // The next one an interval later.
        r.grew();
        let due = r.due_at().expect("pending text is due");
        assert!(
            due > Instant::now() + Duration::from_secs(59),
            "an interval later"
        );
        age(&mut r, Duration::from_secs(60));
        assert!(r.due_at().unwrap() <= Instant::now());
        r.flush("Hello wor");
        assert_eq!(rx.try_recv().unwrap().event.text, "Hello wor");
        age(&mut r, Duration::from_secs(60));
        r.grew();
        r.flush("Hello world");
        assert_eq!(rx.try_recv().unwrap().event.seq, 2);
        // At most `max` per reply.
        age(&mut r, Duration::from_secs(60));
        r.grew();
        assert_eq!(r.due_at(), None);
        r.flush("Hello world!");
        assert!(rx.try_recv().is_err());
        assert_eq!(r.sent(), 3);
    }

    #[tokio::test]
    async fn a_full_queue_drops_previews_instead_of_waiting() {
        let (p, rx) = publisher(0, u32::MAX);
        for i in 0..QUEUE + 10 {
            let mut r = p.reply("t", "c1", Uuid::nil(), MemoryStatus::None);
            r.grew();
            r.flush(&i.to_string());
        }
        let dropped = p
            .metrics
            .0
            .get_or_create(&vec![("outcome", "dropped")])
            .get();
        assert_eq!(dropped, 10);
        drop(rx);
        let disabled = LivePublisher { tx: None, ..p };
        let mut r = disabled.reply("t", "c1", Uuid::nil(), MemoryStatus::None);
        r.grew();
        assert_eq!(r.due_at(), None);
        r.flush("x");
        assert_eq!(r.sent(), 0);
    }
}
