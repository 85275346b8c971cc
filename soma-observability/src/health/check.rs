//! Background health checks.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;

use super::ComponentStatus;

/// The result of one health check.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckOutcome {
    /// The component's status.
    pub status: ComponentStatus,
    /// Why (recommended whenever the status is not `up`).
    pub reason: Option<String>,
    /// Gauges to publish with the component (replace the previous check's gauges).
    pub gauges: BTreeMap<String, f64>,
}

impl CheckOutcome {
    /// The component is up.
    pub fn up() -> Self {
        Self {
            status: ComponentStatus::Up,
            reason: None,
            gauges: BTreeMap::new(),
        }
    }

    /// The component works with reduced capacity.
    pub fn degraded(reason: impl Into<String>) -> Self {
        Self {
            status: ComponentStatus::Degraded,
            reason: Some(reason.into()),
            gauges: BTreeMap::new(),
        }
    }

    /// The component does not work.
    pub fn down(reason: impl Into<String>) -> Self {
        Self {
            status: ComponentStatus::Down,
            reason: Some(reason.into()),
            gauges: BTreeMap::new(),
        }
    }

    /// Adds a gauge (e.g. `dlq_depth`, `replica_lag_seconds`).
    pub fn with_gauge(mut self, name: impl Into<String>, value: f64) -> Self {
        self.gauges.insert(name.into(), value);
        self
    }
}

/// An async health check run in the background by [`HealthRegistry::register_check`].
///
/// A check should be quick and must be cancel-safe: it is dropped at its
/// timeout. A check that *blocks a thread* (synchronous I/O) cannot be
/// cancelled; do blocking work in `spawn_blocking`.
///
/// [`HealthRegistry::register_check`]: super::HealthRegistry::register_check
#[async_trait]
pub trait HealthCheck: Send + Sync + 'static {
    /// Checks the component once.
    async fn check(&self) -> CheckOutcome;
}

/// A [`HealthCheck`] made from a closure returning a future; see [`check_fn`].
#[derive(Clone)]
pub struct FnCheck<F>(F);

impl<F> std::fmt::Debug for FnCheck<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FnCheck")
    }
}

/// Makes a [`HealthCheck`] from `|| async { CheckOutcome::up() }`.
pub fn check_fn<F, Fut>(f: F) -> FnCheck<F>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = CheckOutcome> + Send + 'static,
{
    FnCheck(f)
}

#[async_trait]
impl<F, Fut> HealthCheck for FnCheck<F>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = CheckOutcome> + Send + 'static,
{
    async fn check(&self) -> CheckOutcome {
        (self.0)().await
    }
}

/// How often a background check runs and how long it may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckOptions {
    /// Time between the starts of two checks (the first runs at once).
    pub interval: Duration,
    /// A check still running after this is cancelled and the component marked `down`.
    pub timeout: Duration,
    /// Consecutive failed (`down`) outcomes needed before the component is
    /// reported `down`; until then the component is reported `degraded`.
    /// `1` (the default) reports the first failure.
    pub failure_threshold: u32,
}

impl CheckOptions {
    /// Options with the given interval and timeout, and a failure threshold of 1.
    pub fn new(interval: Duration, timeout: Duration) -> Self {
        Self {
            interval,
            timeout,
            failure_threshold: 1,
        }
    }

    /// Sets [`failure_threshold`](Self::failure_threshold) (values below 1 count as 1).
    pub fn with_failure_threshold(mut self, n: u32) -> Self {
        self.failure_threshold = n.max(1);
        self
    }
}

impl Default for CheckOptions {
    /// Every 10 s, 2 s timeout, failure threshold 1.
    fn default() -> Self {
        Self::new(Duration::from_secs(10), Duration::from_secs(2))
    }
}
