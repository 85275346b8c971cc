//! [`Lease`]: a lock with a fencing token for singleton jobs.

use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use fred::types::Value;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::{CommandIdempotency, RedisClient, RedisError, Script, Ttl};

/// Acquire: if free, take a fencing token (monotonic: `INCR`, but never below
/// server time in µs, so tokens keep growing even if Redis lost the counter),
/// then set the lease with a TTL.
static ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "lease_acquire",
        r#"
local cur = redis.call('GET', KEYS[1])
if cur then
  if string.sub(cur, 1, string.len(ARGV[1]) + 1) == ARGV[1] .. ':' then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return {1, cur}
  end
  return {0, cur}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tok = redis.call('INCR', KEYS[2])
if tok < now then
  tok = now
  redis.call('SET', KEYS[2], string.format('%.0f', tok))
end
redis.call('PEXPIRE', KEYS[2], ARGV[3])
local v = ARGV[1] .. ':' .. string.format('%.0f', tok)
redis.call('SET', KEYS[1], v, 'PX', ARGV[2])
return {1, v}
"#,
    )
});

static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "lease_renew",
        r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"#,
    )
});

static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "lease_release",
        r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#,
    )
});

/// The fencing counter outlives leases by this much (refreshed on every
/// acquisition); after that, tokens restart from server time, which is still
/// larger than any token handed out before.
const FENCE_TTL: Duration = Duration::from_secs(7 * 86_400);

/// Lease timing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseOptions {
    /// Lifetime of the lease without renewal: how long a crashed holder
    /// blocks the job.
    pub ttl: Duration,
    /// How often the holder renews (default `ttl / 3`).
    pub renew_every: Duration,
}

impl LeaseOptions {
    /// A lease of `ttl`, renewed every `ttl / 3`.
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            renew_every: ttl / 3,
        }
    }
}

/// A named singleton lease (a scheduler tick, a relay shard owner).
///
/// Keys are `{prefix}soma:{tenant}:lease:{{name}}` and
/// `{prefix}soma:{tenant}:lease-fence:{{name}}` (the braces are a Redis
/// Cluster hash tag, keeping both keys on one slot).
///
/// # Semantics
///
/// * At most one holder at a time *as far as Redis knows*. A holder that
///   stalls (GC pause, partition) past the TTL can overlap with the next
///   holder; that is what the **fencing token** is for: it increases with
///   every acquisition, so a resource that remembers the highest token it has
///   seen (a `WHERE fence < $token` guard, a Kafka producer epoch) rejects
///   the stale holder.
/// * While held, the lease is renewed in the background every
///   `renew_every`. If renewal fails (lost to another holder, or Redis
///   unreachable until the local TTL deadline passes), the guard flips to
///   lost: check [`LeaseGuard::is_held`] before each unit of work, or select on
///   [`LeaseGuard::lost`].
/// * On crash nothing is renewed and the lease expires after `ttl`.
///   Dropping the guard stops renewal and releases the lease in the
///   background; [`LeaseGuard::release`] does it synchronously.
#[derive(Debug, Clone)]
pub struct Lease {
    client: RedisClient,
    options: LeaseOptions,
}

impl Lease {
    /// A lease helper with the given timing.
    pub fn new(client: &RedisClient, options: LeaseOptions) -> Result<Self, RedisError> {
        Ttl::After(options.ttl).as_millis()?;
        if options.renew_every.is_zero() || options.renew_every >= options.ttl {
            return Err(RedisError::invalid(
                "lease renew_every must be > 0 and < ttl",
            ));
        }
        Ok(Self {
            client: client.clone(),
            options,
        })
    }

    /// Takes the lease `name` of `tenant` if it is free; `None` if someone
    /// holds it.
    pub async fn try_acquire(
        &self,
        tenant: &str,
        name: &str,
    ) -> Result<Option<LeaseGuard>, RedisError> {
        let tag = format!("{{{name}}}");
        let key = self.client.keys().key(tenant, "lease", &tag)?;
        let fence = self.client.keys().key(tenant, "lease-fence", &tag)?;
        let holder = uuid::Uuid::new_v4().simple().to_string();
        let ttl_ms = Ttl::After(self.options.ttl).as_millis()?.unwrap_or(1);
        let fence_ms = i64::try_from(FENCE_TTL.as_millis()).unwrap_or(i64::MAX);
        let sent = Instant::now();
        // Idempotent: re-running with our holder id finds our own lease.
        let (ok, value): (i64, String) = self
            .client
            .eval(
                &ACQUIRE,
                vec![key.clone(), fence],
                vec![
                    Value::from(holder.as_str()),
                    Value::from(ttl_ms),
                    Value::from(fence_ms),
                ],
                CommandIdempotency::Idempotent,
            )
            .await?;
        if ok != 1 {
            return Ok(None);
        }
        let token = value
            .rsplit_once(':')
            .and_then(|(_, t)| t.parse::<u64>().ok())
            .ok_or_else(|| RedisError::Decode(format!("bad lease value {value:?}")))?;
        let (tx, _) = watch::channel(true);
        let state = Arc::new(State {
            held: tx,
            deadline: parking_lot::Mutex::new(sent + self.options.ttl),
        });
        let task = tokio::spawn(renew_loop(
            self.client.clone(),
            key.clone(),
            value.clone(),
            self.options,
            state.clone(),
        ));
        Ok(Some(LeaseGuard {
            client: self.client.clone(),
            key,
            value,
            token,
            state,
            task: Some(task),
        }))
    }

    /// Tries to take the lease until `wait` has passed, polling every
    /// `ttl / 10` (bounded to 10 ms .. 1 s). Redis errors end the wait.
    pub async fn acquire(
        &self,
        tenant: &str,
        name: &str,
        wait: Duration,
    ) -> Result<Option<LeaseGuard>, RedisError> {
        let deadline = Instant::now() + wait;
        let step = (self.options.ttl / 10).clamp(Duration::from_millis(10), Duration::from_secs(1));
        loop {
            if let Some(g) = self.try_acquire(tenant, name).await? {
                return Ok(Some(g));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            tokio::time::sleep(step.min(deadline - now)).await;
        }
    }
}

struct State {
    held: watch::Sender<bool>,
    /// Until when the lease is certainly ours: send time of the last
    /// successful acquire/renew plus the TTL.
    deadline: parking_lot::Mutex<Instant>,
}

impl State {
    fn lose(&self, why: &str, key: &str) {
        if *self.held.borrow() {
            tracing::warn!(key = %key, reason = why, "lease lost");
        }
        self.held.send_replace(false);
    }
}

async fn renew_loop(
    client: RedisClient,
    key: String,
    value: String,
    options: LeaseOptions,
    state: Arc<State>,
) {
    let ttl_ms = i64::try_from(options.ttl.as_millis()).unwrap_or(i64::MAX);
    let mut wait = options.renew_every;
    loop {
        tokio::time::sleep(wait).await;
        let deadline = *state.deadline.lock();
        if Instant::now() >= deadline {
            state.lose("ttl passed without a successful renewal", &key);
            return;
        }
        let sent = Instant::now();
        let r: Result<i64, RedisError> = client
            .eval(
                &RENEW,
                vec![key.clone()],
                vec![Value::from(value.as_str()), Value::from(ttl_ms)],
                CommandIdempotency::Idempotent,
            )
            .await;
        match r {
            Ok(1) => {
                *state.deadline.lock() = sent + options.ttl;
                wait = options.renew_every;
            }
            Ok(_) => {
                state.lose("held by another owner or expired", &key);
                return;
            }
            Err(e) => {
                tracing::warn!(key = %key, error = %e, "lease renewal failed; retrying");
                // Retry sooner, but never past the deadline.
                let left = deadline.saturating_duration_since(Instant::now());
                wait = (options.renew_every / 4)
                    .max(Duration::from_millis(10))
                    .min(left);
            }
        }
    }
}

/// A held lease; see [`Lease`].
pub struct LeaseGuard {
    client: RedisClient,
    key: String,
    value: String,
    token: u64,
    state: Arc<State>,
    task: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for LeaseGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseGuard")
            .field("key", &self.key)
            .field("token", &self.token)
            .finish()
    }
}

impl LeaseGuard {
    /// The fencing token: strictly greater than the token of every earlier
    /// holder of this lease. Pass it to the resources you write.
    pub fn token(&self) -> u64 {
        self.token
    }

    /// The Redis key of the lease.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// `true` while the lease is certainly still ours (renewed, and the local
    /// TTL deadline not passed).
    pub fn is_held(&self) -> bool {
        *self.state.held.borrow() && Instant::now() < *self.state.deadline.lock()
    }

    /// Resolves when the lease is lost (never, while it is renewed).
    pub async fn lost(&self) {
        let mut rx = self.state.held.subscribe();
        loop {
            if !*rx.borrow_and_update() || !self.is_held() {
                return;
            }
            let deadline = tokio::time::Instant::from_std(*self.state.deadline.lock());
            tokio::select! {
                changed = rx.changed() => {
                    if changed.is_err() { return; }
                }
                // Re-checked at the top: a renewal may have moved the deadline.
                _ = tokio::time::sleep_until(deadline) => {}
            }
        }
    }

    /// Stops renewing and deletes the lease (only if still ours). `false`
    /// when it had already been lost.
    pub async fn release(mut self) -> Result<bool, RedisError> {
        if let Some(t) = self.task.take() {
            t.abort();
        }
        self.state.held.send_replace(false);
        let n: i64 = self
            .client
            .eval(
                &RELEASE,
                vec![self.key.clone()],
                vec![Value::from(self.value.as_str())],
                CommandIdempotency::Idempotent,
            )
            .await?;
        Ok(n == 1)
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        let Some(t) = self.task.take() else { return };
        t.abort();
        self.state.held.send_replace(false);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let client = self.client.clone();
            let key = std::mem::take(&mut self.key);
            let value = std::mem::take(&mut self.value);
            rt.spawn(async move {
                let _: Result<i64, _> = client
                    .eval(
                        &RELEASE,
                        vec![key],
                        vec![Value::from(value)],
                        CommandIdempotency::Idempotent,
                    )
                    .await;
            });
        }
    }
}
