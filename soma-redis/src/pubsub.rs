//! [`PubSub`]: broadcast notifications (invalidations) that survive reconnects.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fred::clients::SubscriberClient;
use fred::interfaces::{ClientLike, EventInterface, PubsubInterface};
use fred::types::config::Server;
use fred::types::{Message, Value};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

use crate::keys::validate_part;
use crate::{RedisClient, RedisError};

/// Per-channel buffer of undelivered events per subscriber; a slower
/// subscriber gets [`PubSubEvent::Lagged`].
const CHANNEL_CAPACITY: usize = 1024;

/// What a [`Subscription`] yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PubSubEvent {
    /// A published payload.
    Message(Bytes),
    /// The connection was lost and the subscription re-established. Messages
    /// published in between are lost: treat everything derived from this
    /// channel as stale (e.g. drop the local cache).
    Resubscribed,
    /// This subscriber fell behind and missed this many events: same remedy
    /// as [`Resubscribed`](Self::Resubscribed).
    Lagged(u64),
}

/// Publish/subscribe for invalidation broadcasts (feature flags, config,
/// cache entries).
///
/// Channels are `{prefix}soma:{tenant}:ch:{name}`.
///
/// # Delivery
///
/// **At most once**, ordered per channel per publisher. Redis pub/sub keeps
/// nothing: a message published while a subscriber is disconnected is lost.
/// To make that safe for invalidations, every subscription receives
/// [`PubSubEvent::Resubscribed`] after the dedicated subscriber connection
/// comes back (fred reconnects it with the client's backoff policy and this
/// type resubscribes every channel), so consumers can drop their local state
/// and reload. Use a durable log (soma-bus) when every message matters.
pub struct PubSub {
    client: RedisClient,
    subscriber: SubscriberClient,
    channels: Channels,
    tasks: Vec<JoinHandle<()>>,
}

/// Each subscribed channel's sender, by full channel name.
type Channels = Arc<parking_lot::Mutex<HashMap<String, broadcast::Sender<PubSubEvent>>>>;

impl std::fmt::Debug for PubSub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PubSub")
            .field("channels", &self.channels.lock().len())
            .finish()
    }
}

impl Drop for PubSub {
    fn drop(&mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let sub = self.subscriber.clone();
            rt.spawn(async move {
                let _ = sub.quit().await;
            });
        }
    }
}

/// A stream of events on one channel; see [`PubSub::subscribe`].
#[derive(Debug)]
pub struct Subscription {
    channel: String,
    rx: broadcast::Receiver<PubSubEvent>,
}

impl Subscription {
    /// The full Redis channel name.
    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// The next event; `None` once the [`PubSub`] is dropped.
    pub async fn recv(&mut self) -> Option<PubSubEvent> {
        match self.rx.recv().await {
            Ok(ev) => Some(ev),
            Err(broadcast::error::RecvError::Lagged(n)) => Some(PubSubEvent::Lagged(n)),
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }
}

impl PubSub {
    /// Opens a dedicated subscriber connection with the client's settings
    /// and waits until it is up.
    pub async fn connect(client: &RedisClient) -> Result<Self, RedisError> {
        let subscriber = client.inner.builder.build_subscriber_client()?;
        let timeout = Duration::from_millis(
            client
                .config()
                .connect_timeout_ms
                .saturating_mul(2)
                .max(100),
        );
        match tokio::time::timeout(timeout, subscriber.init()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => {
                return Err(RedisError::Connection(
                    "pub/sub connection not established in time".into(),
                ));
            }
        }
        let channels = Channels::default();
        let dispatch = tokio::spawn(dispatch(subscriber.message_rx(), channels.clone()));
        let resubscribe = tokio::spawn(resubscribe_after_reconnects(
            subscriber.reconnect_rx(),
            subscriber.clone(),
            channels.clone(),
        ));
        Ok(Self {
            client: client.clone(),
            subscriber,
            channels,
            tasks: vec![dispatch, resubscribe],
        })
    }

    /// The full channel name for `tenant`'s channel `name`.
    pub fn channel(&self, tenant: &str, name: &str) -> Result<String, RedisError> {
        validate_part("channel", name)?;
        self.client.keys().key(tenant, "ch", name)
    }

    /// Subscribes to `tenant`'s channel `name`. Several subscriptions to one
    /// channel share one Redis subscription.
    pub async fn subscribe(&self, tenant: &str, name: &str) -> Result<Subscription, RedisError> {
        let channel = self.channel(tenant, name)?;
        let (rx, new) = {
            let mut map = self.channels.lock();
            match map.get(&channel) {
                Some(tx) => (tx.subscribe(), false),
                None => {
                    let (tx, rx) = broadcast::channel(CHANNEL_CAPACITY);
                    map.insert(channel.clone(), tx);
                    (rx, true)
                }
            }
        };
        if new {
            if let Err(e) = self.subscriber.subscribe(channel.clone()).await {
                self.channels.lock().remove(&channel);
                return Err(e.into());
            }
        }
        Ok(Subscription { channel, rx })
    }

    /// Publishes `payload` on `tenant`'s channel `name` through the main
    /// client; returns how many subscriber connections received it (not
    /// retried: a retry could deliver twice).
    pub async fn publish(
        &self,
        tenant: &str,
        name: &str,
        payload: impl Into<Bytes>,
    ) -> Result<u64, RedisError> {
        let channel = self.channel(tenant, name)?;
        self.client.publish(&channel, payload.into()).await
    }

    /// `true` while the subscriber connection is up.
    pub fn is_connected(&self) -> bool {
        self.subscriber.is_connected()
    }
}

/// Forwards each message of the subscriber connection to its channel's
/// subscriptions, until the connection is dropped. When this task falls
/// behind the connection, every subscription gets [`PubSubEvent::Lagged`].
async fn dispatch(mut rx: broadcast::Receiver<Message>, channels: Channels) {
    loop {
        match rx.recv().await {
            Ok(msg) => {
                let Some(payload) = payload(msg.value) else {
                    continue;
                };
                if let Some(tx) = channels.lock().get(&*msg.channel) {
                    let _ = tx.send(PubSubEvent::Message(payload));
                }
            }
            Err(broadcast::error::RecvError::Lagged(n)) => {
                for tx in channels.lock().values() {
                    let _ = tx.send(PubSubEvent::Lagged(n));
                }
            }
            Err(broadcast::error::RecvError::Closed) => break,
        }
    }
}

/// A message's payload as bytes; `None` for a value that has none.
fn payload(value: Value) -> Option<Bytes> {
    match value {
        Value::Bytes(b) => Some(b),
        Value::String(s) => Some(s.into_inner()),
        other => other.into_bytes(),
    }
}

/// After every reconnect of the subscriber connection, resubscribes every
/// channel, until the connection is dropped.
async fn resubscribe_after_reconnects(
    mut reconnects: broadcast::Receiver<Server>,
    sub: SubscriberClient,
    channels: Channels,
) {
    loop {
        match reconnects.recv().await {
            Ok(_) => {}
            Err(broadcast::error::RecvError::Lagged(_)) => {}
            Err(broadcast::error::RecvError::Closed) => break,
        }
        resubscribe(&sub, &channels).await;
    }
}

/// Resubscribes every channel until it works (or the connection drops
/// again, which brings another reconnect event), then tells every
/// subscription [`PubSubEvent::Resubscribed`].
async fn resubscribe(sub: &SubscriberClient, channels: &Channels) {
    loop {
        let names: Vec<String> = channels.lock().keys().cloned().collect();
        if names.is_empty() {
            break;
        }
        match sub.subscribe(names).await {
            Ok(()) => {
                tracing::info!("redis pub/sub resubscribed after reconnect");
                for tx in channels.lock().values() {
                    let _ = tx.send(PubSubEvent::Resubscribed);
                }
                break;
            }
            Err(e) if sub.is_connected() => {
                tracing::warn!(error = %e, "redis pub/sub resubscribe failed; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(_) => break,
        }
    }
}
