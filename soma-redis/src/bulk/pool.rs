//! The dedicated bulk connections of one client: a slot per connection,
//! opened on first use, and one connect backoff shared by all of them.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use fred::types::config::Config as FredConfig;
use tokio::sync::{Mutex, MutexGuard};

use super::conn::{Conn, Target, open};
use super::metrics::BulkMetrics;
use super::{Bulk, BulkReply};
use crate::metrics::RedisMetrics;
use crate::{ReconnectConfig, RedisConfig, RedisError};

/// A connection idle for longer than this is checked for a server-side close
/// before it is reused.
const IDLE_CHECK_AFTER: Duration = Duration::from_millis(500);

#[derive(Default)]
struct Slot {
    conn: Option<Conn>,
    /// This slot had a connection before, so the next one is a reconnect.
    had_connection: bool,
}

#[derive(Default)]
struct Backoff {
    failures: u32,
    retry_at: Option<Instant>,
}

/// The dedicated bulk connections of one client.
pub(crate) struct BulkPool {
    target: Result<Arc<Target>, String>,
    slots: Box<[Mutex<Slot>]>,
    next: AtomicUsize,
    backoff: parking_lot::Mutex<Backoff>,
    reconnect: ReconnectConfig,
    connect_timeout: Duration,
    command_timeout: Duration,
    metrics: BulkMetrics,
}

impl BulkPool {
    pub(crate) fn new(
        fc: Option<&FredConfig>,
        config: &RedisConfig,
        metrics: &RedisMetrics,
    ) -> Self {
        let target = match fc {
            Some(fc) => Target::from_config(fc, &config.url).map(Arc::new),
            None => Err("no redis configuration".to_owned()),
        };
        Self {
            target,
            slots: (0..config.bulk_connections.max(1))
                .map(|_| Mutex::new(Slot::default()))
                .collect(),
            next: AtomicUsize::new(0),
            backoff: parking_lot::Mutex::new(Backoff::default()),
            reconnect: config.reconnect.clone(),
            connect_timeout: Duration::from_millis(config.connect_timeout_ms.max(1)),
            command_timeout: Duration::from_millis(config.command_timeout_ms.max(1)),
            metrics: BulkMetrics::new(metrics),
        }
    }

    /// Runs `bulk` on one of the connections and records it in the metrics.
    pub(crate) async fn run(&self, bulk: &Bulk) -> Result<Vec<BulkReply>, RedisError> {
        if bulk.is_empty() {
            return Ok(Vec::new());
        }
        let start = Instant::now();
        let result = self.round_trips(bulk).await;
        self.metrics.observe(bulk, &result, start.elapsed());
        result
    }

    /// A free slot if there is one, else the next one in turn (FIFO wait).
    async fn checkout(&self) -> MutexGuard<'_, Slot> {
        let n = self.slots.len();
        let first = self.next.fetch_add(1, Ordering::Relaxed);
        for i in 0..n {
            if let Ok(g) = self.slots[(first + i) % n].try_lock() {
                return g;
            }
        }
        self.slots[first % n].lock().await
    }

    /// Sends `bulk` on a checked-out connection (opening one if needed).
    async fn round_trips(&self, bulk: &Bulk) -> Result<Vec<BulkReply>, RedisError> {
        let target = self
            .target
            .as_ref()
            .map_err(|e| RedisError::Config(e.clone()))?;
        let mut slot = self.checkout().await;
        // The connection is taken out of its slot for the round trips: if
        // anything fails, or the caller drops this future, it is closed and
        // the slot is left empty for the next batch to reconnect.
        let mut conn = match slot.conn.take() {
            Some(c) if c.last_used.elapsed() < IDLE_CHECK_AFTER || c.idle_ok() => c,
            stale => {
                let reconnect = slot.had_connection || stale.is_some();
                drop(stale);
                let c = self.connect(target).await?;
                slot.had_connection = true;
                if reconnect {
                    self.metrics.reconnects.inc();
                }
                c
            }
        };
        let mut out = Vec::with_capacity(bulk.len());
        for (first, end, range) in bulk.round_trips() {
            let trip = conn.round_trip(&bulk.buf[range], end - first, &mut out);
            match tokio::time::timeout(self.command_timeout, trip).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, server = %target.display, "redis bulk connection failed");
                    return Err(e);
                }
                Err(_) => {
                    return Err(RedisError::Timeout(format!(
                        "bulk round trip of {} commands after {:?}",
                        end - first,
                        self.command_timeout
                    )));
                }
            }
        }
        conn.last_used = Instant::now();
        slot.conn = Some(conn);
        Ok(out)
    }

    async fn connect(&self, target: &Target) -> Result<Conn, RedisError> {
        if let Some(at) = self.backoff.lock().retry_at {
            let now = Instant::now();
            if now < at {
                return Err(RedisError::Connection(format!(
                    "bulk connection to {} down; next attempt in {:?}",
                    target.display,
                    at - now
                )));
            }
        }
        let attempt = tokio::time::timeout(self.connect_timeout, open(target)).await;
        let result = match attempt {
            Ok(r) => r,
            Err(_) => Err(RedisError::Connection(format!(
                "no bulk connection to {} within {:?}",
                target.display, self.connect_timeout
            ))),
        };
        let mut b = self.backoff.lock();
        match &result {
            Ok(_) => *b = Backoff::default(),
            Err(e) if e.is_connection() || e.is_timeout() => {
                b.failures = b.failures.saturating_add(1);
                b.retry_at = Some(Instant::now() + backoff_delay(&self.reconnect, b.failures));
            }
            Err(_) => {}
        }
        result
    }
}

/// `min(max_delay, min_delay * base^(n-1)) + rand(0..jitter)`.
fn backoff_delay(r: &ReconnectConfig, failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(30);
    let base = u64::from(r.base.max(1));
    let delay = u64::from(r.initial_ms.max(1))
        .saturating_mul(base.saturating_pow(exp))
        .min(u64::from(r.max_ms.max(1)));
    let jitter = if r.jitter_ms > 0 {
        rand::random_range(0..u64::from(r.jitter_ms))
    } else {
        0
    };
    Duration::from_millis(delay + jitter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let r = ReconnectConfig {
            max_attempts: 0,
            initial_ms: 10,
            max_ms: 100,
            base: 2,
            jitter_ms: 0,
        };
        assert_eq!(backoff_delay(&r, 1), Duration::from_millis(10));
        assert_eq!(backoff_delay(&r, 3), Duration::from_millis(40));
        assert_eq!(backoff_delay(&r, 50), Duration::from_millis(100));
    }
}
