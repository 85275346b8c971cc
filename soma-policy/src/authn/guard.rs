//! What stands between a guessed API key and the key store: a negative cache
//! of unknown lookup ids and a per-client limiter on failed attempts.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::config::ApiKeyConfig;

/// Both guards, built from the `api_keys` section.
pub(crate) struct KeyGuard {
    unknown: Option<moka::sync::Cache<String, ()>>,
    limiter: Option<FailureLimiter>,
}

impl KeyGuard {
    pub(crate) fn new(config: &ApiKeyConfig) -> Self {
        let unknown = (config.negative_cache_ttl_secs > 0 && config.negative_cache_capacity > 0)
            .then(|| {
                moka::sync::Cache::builder()
                    .max_capacity(config.negative_cache_capacity)
                    .time_to_live(Duration::from_secs(config.negative_cache_ttl_secs))
                    .build()
            });
        let limiter = (config.client_failure_burst > 0).then(|| {
            FailureLimiter::new(
                config.client_failure_burst,
                config.client_failures_per_sec,
                config.client_limiter_capacity,
            )
        });
        Self { unknown, limiter }
    }

    /// True when `lookup_id` was recently found not to exist.
    pub(crate) fn known_unknown(&self, lookup_id: &str) -> bool {
        self.unknown
            .as_ref()
            .is_some_and(|c| c.contains_key(lookup_id))
    }

    /// Remembers that `lookup_id` does not exist.
    pub(crate) fn remember_unknown(&self, lookup_id: &str) {
        if let Some(c) = &self.unknown {
            c.insert(lookup_id.to_owned(), ());
        }
    }

    /// True when `peer` has no failed attempt left: it must not reach the store.
    pub(crate) fn exhausted(&self, peer: Option<IpAddr>) -> bool {
        self.limiter.as_ref().is_some_and(|l| l.exhausted(peer))
    }

    /// Charges one failed attempt to `peer`.
    pub(crate) fn failed(&self, peer: Option<IpAddr>) {
        if let Some(l) = &self.limiter {
            l.charge(peer);
        }
    }
}

/// A token bucket of failed attempts per client: `burst` failures, refilled
/// at `per_sec`. Clients are keyed by IPv4 address or IPv6 /64 (one host
/// usually holds a whole /64); requests without a peer address share one
/// bucket.
struct FailureLimiter {
    burst: f64,
    per_sec: f64,
    buckets: moka::sync::Cache<Option<IpAddr>, Arc<Mutex<Bucket>>>,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

impl FailureLimiter {
    fn new(burst: u32, per_sec: u32, capacity: u64) -> Self {
        let burst = f64::from(burst);
        let per_sec = f64::from(per_sec.max(1));
        // An idle bucket has refilled by then: forgetting it loses nothing.
        let refill = Duration::from_secs_f64((burst / per_sec).max(1.0));
        Self {
            burst,
            per_sec,
            buckets: moka::sync::Cache::builder()
                .max_capacity(capacity.max(1))
                .time_to_idle(refill)
                .build(),
        }
    }

    fn key(peer: Option<IpAddr>) -> Option<IpAddr> {
        peer.map(|ip| match ip {
            IpAddr::V4(_) => ip,
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => {
                    let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                    IpAddr::V6(prefix.into())
                }
            },
        })
    }

    fn refilled(&self, b: &mut Bucket) {
        let now = Instant::now();
        let gained = now.duration_since(b.at).as_secs_f64() * self.per_sec;
        b.tokens = (b.tokens + gained).min(self.burst);
        b.at = now;
    }

    fn exhausted(&self, peer: Option<IpAddr>) -> bool {
        let Some(bucket) = self.buckets.get(&Self::key(peer)) else {
            return false;
        };
        let mut b = bucket.lock();
        self.refilled(&mut b);
        b.tokens < 1.0
    }

    fn charge(&self, peer: Option<IpAddr>) {
        let bucket = self.buckets.get_with(Self::key(peer), || {
            Arc::new(Mutex::new(Bucket {
                tokens: self.burst,
                at: Instant::now(),
            }))
        });
        let mut b = bucket.lock();
        self.refilled(&mut b);
        b.tokens = (b.tokens - 1.0).max(0.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_gets_burst_failures_then_waits_and_others_are_unaffected() {
        let l = FailureLimiter::new(3, 1, 100);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        for _ in 0..3 {
            assert!(!l.exhausted(Some(a)));
            l.charge(Some(a));
        }
        assert!(l.exhausted(Some(a)));
        assert!(!l.exhausted(Some(b)));
        assert!(!l.exhausted(None));
    }

    #[test]
    fn an_exhausted_client_regains_attempts_as_its_bucket_refills() {
        // 1,000 a second: a few milliseconds give the burst back.
        let l = FailureLimiter::new(2, 1_000, 100);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..20 {
            l.charge(Some(a));
        }
        std::thread::sleep(Duration::from_millis(20));
        assert!(!l.exhausted(Some(a)), "refilled after 20 ms at 1,000/s");
    }

    #[test]
    fn ipv6_clients_are_keyed_by_their_64() {
        let x: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let y: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let z: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(FailureLimiter::key(Some(x)), FailureLimiter::key(Some(y)));
        assert_ne!(FailureLimiter::key(Some(x)), FailureLimiter::key(Some(z)));
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert_eq!(
            FailureLimiter::key(Some(mapped)),
            Some("192.0.2.1".parse().unwrap())
        );
    }
}
