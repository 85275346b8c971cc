//! [`Backoff`]: capped exponential delays with a chosen jitter.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How a [`Backoff`] spreads its delays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Jitter {
    /// Exactly the exponential value: `min(max, initial * 2^(attempt-1))`.
    None,
    /// Uniform in `[0, value]`: spreads retries the most (AWS's "full
    /// jitter"); a delay can be zero.
    #[default]
    Full,
    /// Uniform in `[value/2, value]`: at least half the value, so a retry
    /// never comes back-to-back against a dependency that is down.
    Equal,
}

/// Settings of a [`Backoff`].
///
/// ```
/// use soma_observability::resilience::{BackoffConfig, Jitter};
/// let cfg: BackoffConfig = serde_json::from_str(r#"{ "initial_ms": 50, "jitter": "equal" }"#).unwrap();
/// assert_eq!(cfg.initial_ms, 50);
/// assert_eq!(cfg.max_ms, 10_000); // untouched keys keep their defaults
/// assert_eq!(cfg.jitter, Jitter::Equal);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct BackoffConfig {
    /// The value of the first attempt, before jitter (default 100). It
    /// doubles per attempt.
    pub initial_ms: u64,
    /// The cap of the value, before jitter (default 10 000).
    pub max_ms: u64,
    /// How the value is spread (default [`Jitter::Full`]).
    pub jitter: Jitter,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        Self {
            initial_ms: 100,
            max_ms: 10_000,
            jitter: Jitter::Full,
        }
    }
}

impl BackoffConfig {
    /// A backoff from `initial_ms` doubling up to `max_ms`, with the default
    /// [`Jitter::Full`] (change it with [`with_jitter`](Self::with_jitter)).
    pub const fn new(initial_ms: u64, max_ms: u64) -> Self {
        Self {
            initial_ms,
            max_ms,
            jitter: Jitter::Full,
        }
    }

    /// The same settings with another [`Jitter`].
    pub const fn with_jitter(mut self, jitter: Jitter) -> Self {
        self.jitter = jitter;
        self
    }
}

/// Capped exponential backoff: attempt `n` (1 for the first retry) waits
/// `min(max_ms, initial_ms * 2^(n-1))`, spread by the [`Jitter`].
///
/// Stateless and `Copy`: the caller keeps its own attempt count, so one
/// `Backoff` serves any number of concurrent retry loops.
///
/// ```
/// use std::time::Duration;
/// use soma_observability::resilience::{Backoff, BackoffConfig, Jitter};
/// let b = Backoff::new(BackoffConfig::new(100, 350).with_jitter(Jitter::None));
/// assert_eq!(b.delay(1), Duration::from_millis(100));
/// assert_eq!(b.delay(2), Duration::from_millis(200));
/// assert_eq!(b.delay(3), Duration::from_millis(350));
/// // Deterministic jitter: pass the random sample yourself.
/// let full = Backoff::new(BackoffConfig::default().with_jitter(Jitter::Full));
/// assert_eq!(full.delay_from(1, 0), Duration::ZERO);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    config: BackoffConfig,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(BackoffConfig::default())
    }
}

impl Backoff {
    /// A backoff with these settings (`max_ms` below `initial_ms` caps every
    /// value at `max_ms`).
    pub const fn new(config: BackoffConfig) -> Self {
        Self { config }
    }

    /// The settings.
    pub const fn config(&self) -> &BackoffConfig {
        &self.config
    }

    /// The value of `attempt` before jitter: `min(max_ms, initial_ms *
    /// 2^(attempt-1))`; attempt 0 counts as 1.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(40);
        let ms = self
            .config
            .initial_ms
            .saturating_mul(1u64 << exp)
            .min(self.config.max_ms);
        Duration::from_millis(ms)
    }

    /// The delay before `attempt`, jittered with the thread's random source.
    pub fn delay(&self, attempt: u32) -> Duration {
        match self.config.jitter {
            Jitter::None => self.ceiling(attempt),
            _ => self.delay_from(attempt, rand::random()),
        }
    }

    /// The delay before `attempt`, jittered with `random` (a uniformly
    /// random `u64`): deterministic, for tests and for callers with their
    /// own random source.
    pub fn delay_from(&self, attempt: u32, random: u64) -> Duration {
        let ceiling = self.ceiling(attempt).as_millis() as u64;
        let pick = |span: u64| {
            if span == u64::MAX {
                random
            } else {
                random % (span + 1)
            }
        };
        let ms = match self.config.jitter {
            Jitter::None => ceiling,
            Jitter::Full => pick(ceiling),
            Jitter::Equal => {
                let half = ceiling / 2;
                half + pick(ceiling - half)
            }
        };
        Duration::from_millis(ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(jitter: Jitter) -> Backoff {
        Backoff::new(BackoffConfig {
            initial_ms: 100,
            max_ms: 1_000,
            jitter,
        })
    }

    #[test]
    fn grows_doubles_and_caps() {
        let b = b(Jitter::None);
        let ms: Vec<u64> = (0..7).map(|n| b.delay(n).as_millis() as u64).collect();
        assert_eq!(ms, [100, 100, 200, 400, 800, 1_000, 1_000]);
        assert_eq!(b.delay(u32::MAX), Duration::from_millis(1_000));
    }

    #[test]
    fn full_jitter_spans_zero_to_the_ceiling() {
        let b = b(Jitter::Full);
        assert_eq!(b.delay_from(3, 0), Duration::ZERO);
        assert_eq!(b.delay_from(3, 400), Duration::from_millis(400));
        assert_eq!(b.delay_from(3, 401), Duration::ZERO);
        for _ in 0..200 {
            assert!(b.delay(3) <= Duration::from_millis(400));
        }
    }

    #[test]
    fn equal_jitter_keeps_at_least_half() {
        let b = b(Jitter::Equal);
        assert_eq!(b.delay_from(3, 0), Duration::from_millis(200));
        assert_eq!(b.delay_from(3, 200), Duration::from_millis(400));
        for _ in 0..200 {
            let d = b.delay(4);
            assert!(d >= Duration::from_millis(400) && d <= Duration::from_millis(800));
        }
    }

    #[test]
    fn zero_initial_means_no_wait() {
        let b = Backoff::new(BackoffConfig {
            initial_ms: 0,
            ..BackoffConfig::default()
        });
        assert_eq!(b.delay(5), Duration::ZERO);
    }
}
