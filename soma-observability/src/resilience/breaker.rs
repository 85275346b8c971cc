//! [`CircuitBreaker`]: closed / open / half-open with one cancellation-safe probe.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::health::HealthReporter;
use crate::metrics::MetricsRegistry;

/// Name of the state gauge: 0 closed, 1 open, 2 half-open, per `component`.
pub const BREAKER_STATE: &str = "soma_circuit_breaker_state";
/// Name of the transitions counter, per `component` and `to` state.
pub const BREAKER_TRANSITIONS_TOTAL: &str = "soma_circuit_breaker_transitions_total";

/// Settings of a [`CircuitBreaker`]; the one spelling every soma crate uses
/// for its `breaker` section.
///
/// ```
/// use soma_observability::resilience::BreakerConfig;
/// let cfg: BreakerConfig = serde_json::from_str(r#"{ "failure_threshold": 5 }"#).unwrap();
/// assert_eq!(cfg.failure_threshold, 5);
/// assert_eq!(cfg.open_ms, 30_000); // untouched keys keep their defaults
/// assert!(cfg.enabled);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct BreakerConfig {
    /// `false` turns the breaker off: every call is admitted and nothing is
    /// counted (default `true`).
    pub enabled: bool,
    /// Consecutive failed calls that open the breaker (default 3; 0 counts
    /// as 1).
    pub failure_threshold: u32,
    /// How long the breaker stays open before it admits one probe call
    /// (default 30 000).
    pub open_ms: u64,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            failure_threshold: 3,
            open_ms: 30_000,
        }
    }
}

impl BreakerConfig {
    /// An enabled breaker that opens after `failure_threshold` consecutive
    /// failed calls and stays open for `open_ms`.
    pub const fn new(failure_threshold: u32, open_ms: u64) -> Self {
        Self {
            enabled: true,
            failure_threshold,
            open_ms,
        }
    }

    /// A breaker that is off: every call is admitted, nothing is counted.
    pub fn disabled() -> Self {
        Self {
            enabled: false,
            ..Self::default()
        }
    }
}

/// State of a [`CircuitBreaker`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BreakerState {
    /// Calls are admitted; consecutive failures are counted.
    Closed,
    /// Calls are refused at once until the open period ends.
    Open,
    /// The open period ended: the next caller is admitted as the one probe;
    /// everyone else is refused until its outcome closes or re-opens the
    /// breaker.
    HalfOpen,
}

impl BreakerState {
    /// `"closed"`, `"open"` or `"half_open"` (log and label values).
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }

    /// The value of the [`BREAKER_STATE`] gauge: 0 closed, 1 open, 2 half-open.
    pub const fn gauge_value(self) -> i64 {
        match self {
            Self::Closed => 0,
            Self::Open => 1,
            Self::HalfOpen => 2,
        }
    }
}

/// A call the breaker refused: no request was made; the caller should use
/// its fallback at once.
#[derive(Debug, Clone, thiserror::Error)]
#[error("circuit breaker `{component}` is {}: call refused", state.as_str())]
pub struct CircuitOpen {
    component: Arc<str>,
    state: BreakerState,
}

impl CircuitOpen {
    /// The breaker's component name.
    pub fn component(&self) -> &str {
        &self.component
    }

    /// The state that refused the call (open, or half-open with the probe out).
    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// True when the breaker was half-open and another caller holds the probe.
    pub fn is_probe_in_flight(&self) -> bool {
        self.state == BreakerState::HalfOpen
    }
}

/// How the breaker's health reporter shows the component while the breaker
/// is open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenHealth {
    /// `degraded`: the component still serves through a fallback.
    Degraded,
    /// `down`: the component cannot serve without the dependency.
    Down,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ComponentLabels {
    component: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransitionLabels {
    component: String,
    to: &'static str,
}

struct Machine {
    state: BreakerState,
    failures: u32,
    open_until: Instant,
    probe_in_flight: bool,
    /// Bumped every time a probe is handed out, so a late report or drop of
    /// an older probe cannot touch a newer one's slot.
    probe_epoch: u64,
}

struct Inner {
    component: Arc<str>,
    config: BreakerConfig,
    machine: Mutex<Machine>,
    gauge: Option<Gauge>,
    transitions: Option<Family<TransitionLabels, Counter>>,
    health: Option<(HealthReporter, OpenHealth)>,
}

/// A circuit breaker for one named component. Cheap to clone; clones share
/// state.
///
/// # Behaviour
///
/// - **Closed**: every call is admitted. After
///   [`failure_threshold`](BreakerConfig::failure_threshold) consecutive
///   failures the breaker opens; a success resets the count.
/// - **Open**: [`try_acquire`](Self::try_acquire) refuses at once with
///   [`CircuitOpen`]; no request is made, the caller goes to its fallback.
/// - **Half-open** (after [`open_ms`](BreakerConfig::open_ms)): exactly
///   **one** caller gets a probe [`Permit`]; every other caller is refused
///   at once. The probe's success closes the breaker; its failure re-opens
///   it for another `open_ms`.
/// - **Cancellation-safe**: a permit dropped without a report (the caller's
///   future was cancelled, or the outcome says nothing about the
///   dependency) records nothing; a dropped probe frees the half-open slot,
///   so the next caller probes. A breaker can never stay stuck behind a
///   probe that no longer exists.
/// - Outcomes of calls admitted *before* the breaker opened that finish
///   later: a success closes it (the dependency answered); a failure is
///   not counted again.
///
/// # Why not `failsafe`
///
/// `failsafe` (1.x) counts failures well, but its `StateMachine` admits
/// *every* call while half-open (after an outage the whole backlog goes to
/// a dependency that may still be down, each waiting its timeout), and its
/// permission is a `bool` from `is_call_permitted()`: there is no permit
/// whose drop could free a probe slot, so a single-probe gate built on it
/// needs a second state machine beside it. Its state is also readable only
/// through `Instrument` callbacks. This type is that state machine, once.
///
/// # Observed
///
/// With [`metrics`](Self::metrics): the gauge [`BREAKER_STATE`]
/// (`soma_circuit_breaker_state{component}`, 0 closed, 1 open, 2 half-open)
/// and the counter [`BREAKER_TRANSITIONS_TOTAL`]
/// (`{component, to}`). With [`health`](Self::health): the reporter goes
/// degraded or down (see [`OpenHealth`]) when the breaker opens and up when
/// it closes. Transitions are logged as events `circuit_open`,
/// `circuit_half_open`, `circuit_closed` with field `component`.
///
/// ```
/// use soma_observability::resilience::{BreakerConfig, BreakerState, CircuitBreaker};
/// let breaker = CircuitBreaker::new("opa", BreakerConfig::new(1, 30_000));
/// let permit = breaker.try_acquire().expect("closed: admitted");
/// permit.failure();
/// assert_eq!(breaker.state(), BreakerState::Open);
/// assert!(breaker.try_acquire().is_err()); // fall back at once
/// ```
#[derive(Clone)]
pub struct CircuitBreaker {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for CircuitBreaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("component", &self.inner.component)
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

impl CircuitBreaker {
    /// A closed breaker for `component` (the label of its metrics and the
    /// field of its logs: a fixed name, never an id).
    pub fn new(component: impl Into<Arc<str>>, config: BreakerConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                component: component.into(),
                config,
                machine: Mutex::new(Machine {
                    state: BreakerState::Closed,
                    failures: 0,
                    open_until: Instant::now(),
                    probe_in_flight: false,
                    probe_epoch: 0,
                }),
                gauge: None,
                transitions: None,
                health: None,
            }),
        }
    }

    fn inner_mut(&mut self) -> &mut Inner {
        Arc::get_mut(&mut self.inner).expect("configure a CircuitBreaker before cloning it")
    }

    /// Exports the state gauge and the transitions counter in `registry`.
    ///
    /// # Panics
    ///
    /// If the breaker was already cloned (configure it first).
    pub fn metrics(mut self, registry: &MetricsRegistry) -> Self {
        let gauges = registry.gauge_family::<ComponentLabels>(
            BREAKER_STATE,
            "Circuit breaker state: 0 closed, 1 open, 2 half-open",
        );
        let transitions = registry.counter_family::<TransitionLabels>(
            BREAKER_TRANSITIONS_TOTAL,
            "Circuit breaker state changes",
        );
        let inner = self.inner_mut();
        let gauge = gauges
            .get_or_create(&ComponentLabels {
                component: inner.component.to_string(),
            })
            .clone();
        gauge.set(BreakerState::Closed.gauge_value());
        inner.gauge = Some(gauge);
        inner.transitions = Some(transitions);
        self
    }

    /// Reports the component through `reporter`: `on_open` while the
    /// breaker is open, up when it closes. The reporter's current status is
    /// left alone until the first transition.
    ///
    /// # Panics
    ///
    /// If the breaker was already cloned (configure it first).
    pub fn health(mut self, reporter: HealthReporter, on_open: OpenHealth) -> Self {
        self.inner_mut().health = Some((reporter, on_open));
        self
    }

    /// The component name.
    pub fn component(&self) -> &str {
        &self.inner.component
    }

    /// The settings.
    pub fn config(&self) -> &BreakerConfig {
        &self.inner.config
    }

    /// The current state. An open breaker whose open period has ended reads
    /// as half-open (the next caller would probe).
    pub fn state(&self) -> BreakerState {
        let m = self.inner.machine.lock();
        match m.state {
            BreakerState::Open if Instant::now() >= m.open_until => BreakerState::HalfOpen,
            s => s,
        }
    }

    /// Asks to make one call. `Err` means refused: open, or half-open with
    /// the probe already out. Takes one uncontended lock.
    pub fn try_acquire(&self) -> Result<Permit, CircuitOpen> {
        if !self.inner.config.enabled {
            return Ok(self.permit(None));
        }
        let mut m = self.inner.machine.lock();
        match m.state {
            BreakerState::Closed => Ok(self.permit(None)),
            BreakerState::Open if Instant::now() < m.open_until => Err(self.refused(m.state)),
            BreakerState::HalfOpen if m.probe_in_flight => Err(self.refused(m.state)),
            BreakerState::Open | BreakerState::HalfOpen => {
                self.set_state(&mut m, BreakerState::HalfOpen);
                m.probe_in_flight = true;
                m.probe_epoch += 1;
                Ok(self.permit(Some(m.probe_epoch)))
            }
        }
    }

    /// Records a success observed outside a permit (e.g. a health check
    /// that reached the dependency): closes the breaker from any state.
    pub fn record_success(&self) {
        self.report(None, true);
    }

    /// Records a failure observed outside a permit: counts towards the
    /// threshold while closed; changes nothing while open or half-open.
    pub fn record_failure(&self) {
        self.report(None, false);
    }

    fn permit(&self, probe: Option<u64>) -> Permit {
        Permit {
            breaker: self.clone(),
            probe,
            reported: false,
        }
    }

    fn refused(&self, state: BreakerState) -> CircuitOpen {
        CircuitOpen {
            component: self.inner.component.clone(),
            state,
        }
    }

    fn report(&self, probe: Option<u64>, success: bool) {
        if !self.inner.config.enabled {
            return;
        }
        let mut m = self.inner.machine.lock();
        let is_current_probe =
            probe.is_some_and(|e| e == m.probe_epoch) && m.state == BreakerState::HalfOpen;
        if is_current_probe {
            m.probe_in_flight = false;
        }
        if success {
            m.failures = 0;
            m.probe_in_flight = false;
            self.set_state(&mut m, BreakerState::Closed);
            return;
        }
        match m.state {
            BreakerState::Closed => {
                m.failures = m.failures.saturating_add(1);
                if m.failures >= self.inner.config.failure_threshold.max(1) {
                    self.open(&mut m);
                }
            }
            BreakerState::HalfOpen if is_current_probe => self.open(&mut m),
            // A late failure of a call admitted earlier: already accounted for.
            BreakerState::HalfOpen | BreakerState::Open => {}
        }
    }

    fn open(&self, m: &mut Machine) {
        m.open_until = Instant::now() + Duration::from_millis(self.inner.config.open_ms);
        m.probe_in_flight = false;
        self.set_state(m, BreakerState::Open);
    }

    fn release_probe(&self, epoch: u64) {
        let mut m = self.inner.machine.lock();
        if m.state == BreakerState::HalfOpen && m.probe_epoch == epoch {
            m.probe_in_flight = false;
            tracing::debug!(
                event = "circuit_probe_abandoned",
                component = %self.inner.component
            );
        }
    }

    fn set_state(&self, m: &mut Machine, to: BreakerState) {
        let from = m.state;
        if from == to {
            return;
        }
        m.state = to;
        let inner = &*self.inner;
        let component = &*inner.component;
        match to {
            BreakerState::Open => tracing::warn!(
                event = "circuit_open",
                component,
                from = from.as_str(),
                failures = m.failures,
                open_ms = inner.config.open_ms
            ),
            BreakerState::HalfOpen => tracing::info!(event = "circuit_half_open", component),
            BreakerState::Closed => {
                tracing::info!(event = "circuit_closed", component, from = from.as_str())
            }
        }
        if let Some(g) = &inner.gauge {
            g.set(to.gauge_value());
        }
        if let Some(t) = &inner.transitions {
            t.get_or_create(&TransitionLabels {
                component: component.to_owned(),
                to: to.as_str(),
            })
            .inc();
        }
        if let Some((reporter, on_open)) = &inner.health {
            match (to, on_open) {
                (BreakerState::Open, OpenHealth::Degraded) => {
                    reporter.set_degraded(format!("circuit breaker `{component}` open"))
                }
                (BreakerState::Open, OpenHealth::Down) => {
                    reporter.set_down(format!("circuit breaker `{component}` open"))
                }
                (BreakerState::Closed, _) => reporter.set_up(),
                (BreakerState::HalfOpen, _) => {}
            }
        }
    }
}

/// Permission to make one call, from [`CircuitBreaker::try_acquire`].
///
/// Report the outcome with [`success`](Self::success) or
/// [`failure`](Self::failure). Dropping it unreported records nothing; if
/// it was the half-open probe, the slot is freed for the next caller (this
/// is what happens when the caller's future is cancelled mid-call).
#[must_use = "report the outcome with success() or failure(); dropping records nothing"]
pub struct Permit {
    breaker: CircuitBreaker,
    probe: Option<u64>,
    reported: bool,
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Permit")
            .field("component", &self.breaker.inner.component)
            .field("probe", &self.probe.is_some())
            .finish()
    }
}

impl Permit {
    /// True when this is the half-open probe.
    pub fn is_probe(&self) -> bool {
        self.probe.is_some()
    }

    /// The call succeeded (or proved the dependency up, e.g. a 4xx).
    pub fn success(mut self) {
        self.reported = true;
        self.breaker.report(self.probe, true);
    }

    /// The call failed because of the dependency (timeout, transport, 5xx).
    pub fn failure(mut self) {
        self.reported = true;
        self.breaker.report(self.probe, false);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let (false, Some(epoch)) = (self.reported, self.probe) {
            self.breaker.release_probe(epoch);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::{ComponentStatus, Criticality, HealthRegistry};

    fn breaker(threshold: u32, open_ms: u64) -> CircuitBreaker {
        CircuitBreaker::new(
            "dep",
            BreakerConfig {
                enabled: true,
                failure_threshold: threshold,
                open_ms,
            },
        )
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_threshold_then_admits_exactly_one_probe() {
        let b = breaker(3, 1_000);
        for _ in 0..2 {
            b.try_acquire().unwrap().failure();
            assert_eq!(b.state(), BreakerState::Closed);
        }
        b.try_acquire().unwrap().failure();
        assert_eq!(b.state(), BreakerState::Open);
        assert!(!b.try_acquire().unwrap_err().is_probe_in_flight());

        tokio::time::advance(Duration::from_millis(1_001)).await;
        let probe = b.try_acquire().expect("probe after the open period");
        assert!(probe.is_probe());
        for _ in 0..50 {
            let refused = b.try_acquire().unwrap_err();
            assert!(refused.is_probe_in_flight());
        }
        probe.success();
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(!b.try_acquire().unwrap().is_probe());
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_reopens_for_another_period() {
        let b = breaker(1, 1_000);
        b.try_acquire().unwrap().failure();
        tokio::time::advance(Duration::from_millis(1_000)).await;
        b.try_acquire().unwrap().failure();
        assert_eq!(b.state(), BreakerState::Open);
        tokio::time::advance(Duration::from_millis(999)).await;
        assert!(b.try_acquire().is_err());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(b.try_acquire().unwrap().is_probe());
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_probe_frees_the_half_open_slot() {
        let b = breaker(1, 100);
        b.try_acquire().unwrap().failure();
        tokio::time::advance(Duration::from_millis(100)).await;

        // The probe's caller is cancelled mid-call: its future (holding the
        // permit) is dropped before it reports.
        let held = b.clone();
        let call = tokio::spawn(async move {
            let _permit = held.try_acquire().expect("probe");
            std::future::pending::<()>().await;
        });
        tokio::task::yield_now().await;
        assert!(b.try_acquire().unwrap_err().is_probe_in_flight());
        call.abort();
        let _ = call.await;

        assert_eq!(b.state(), BreakerState::HalfOpen);
        let next = b.try_acquire().expect("the slot was freed");
        assert!(next.is_probe());
        next.success();
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn an_old_probe_dropped_late_does_not_free_a_newer_one() {
        let b = breaker(1, 100);
        b.try_acquire().unwrap().failure();
        tokio::time::advance(Duration::from_millis(100)).await;
        let first = b.try_acquire().unwrap();
        // Closed and re-opened by others meanwhile.
        b.record_success();
        b.try_acquire().unwrap().failure();
        tokio::time::advance(Duration::from_millis(100)).await;
        let second = b.try_acquire().unwrap();
        drop(first);
        assert!(b.try_acquire().unwrap_err().is_probe_in_flight());
        drop(second);
        assert!(b.try_acquire().is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn late_outcomes_of_earlier_calls() {
        let b = breaker(1, 1_000);
        let early_fail = b.try_acquire().unwrap();
        let early_ok = b.try_acquire().unwrap();
        b.try_acquire().unwrap().failure();
        early_fail.failure(); // not counted again, timer not extended
        assert_eq!(b.state(), BreakerState::Open);
        early_ok.success(); // the dependency answered: close
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn a_success_resets_the_count_and_disabled_admits_all() {
        let b = breaker(2, 10_000);
        b.try_acquire().unwrap().failure();
        b.try_acquire().unwrap().success();
        b.try_acquire().unwrap().failure();
        assert_eq!(b.state(), BreakerState::Closed);

        let off = CircuitBreaker::new(
            "off",
            BreakerConfig {
                enabled: false,
                failure_threshold: 1,
                open_ms: 10_000,
            },
        );
        for _ in 0..5 {
            off.try_acquire().unwrap().failure();
        }
        assert_eq!(off.state(), BreakerState::Closed);
    }

    #[test]
    fn gauge_and_health_follow_transitions() {
        let metrics = MetricsRegistry::default();
        let health = HealthRegistry::new();
        let reporter = health.reporter("kafka", Criticality::Optional);
        reporter.set_up();
        let b = breaker(1, 0)
            .metrics(&metrics)
            .health(reporter, OpenHealth::Degraded);
        assert!(
            metrics.encode().contains(r#"component="dep"} 0"#),
            "{}",
            metrics.encode()
        );
        b.try_acquire().unwrap().failure();
        let text = metrics.encode();
        assert!(text.contains(r#"component="dep"} 1"#));
        assert!(text.contains(r#"component="dep",to="open"} 1"#));
        assert_eq!(
            health.component("kafka").unwrap().status,
            ComponentStatus::Degraded
        );
        b.record_success();
        assert!(metrics.encode().contains(r#"component="dep"} 0"#));
        assert_eq!(
            health.component("kafka").unwrap().status,
            ComponentStatus::Up
        );
    }
}
