//! The circuit breaker: failsafe's state machine plus a single-probe gate.
//!
//! failsafe's [`StateMachine`](failsafe::StateMachine) does the counting
//! (consecutive failures, open timer). Two things it does not do, and this
//! wrapper adds:
//!
//! - **one probe in half-open.** failsafe permits *every* call while
//!   half-open; after a 30 s outage that would release the whole backlog of
//!   callers onto a server that may still be down. Here exactly one call
//!   (the probe) goes through; the others are refused as if the breaker were
//!   open until the probe's outcome closes or re-opens it.
//! - **a readable state.** failsafe exposes its state only through its
//!   [`Instrument`] callbacks; they are mirrored into an atomic that the
//!   health check, the gauge and [`SomabrainClient::breaker_state`] read.
//!
//! [`SomabrainClient::breaker_state`]: crate::SomabrainClient::breaker_state

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::Duration;

use failsafe::backoff::{self, Constant};
use failsafe::failure_policy::{self, ConsecutiveFailures};
use failsafe::{Instrument, StateMachine};

use crate::config::BreakerConfig;
use crate::metrics::ClientMetrics;

/// State of the client's circuit breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BreakerState {
    /// Calls go through; failures are being counted.
    Closed,
    /// Calls are refused without a request until the open period ends.
    Open,
    /// One probe call is allowed through; its outcome closes or re-opens.
    HalfOpen,
}

impl BreakerState {
    /// `"closed"`, `"open"` or `"half_open"` (the metric label values).
    pub const fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }

    fn from_u8(v: u8) -> Self {
        match v {
            1 => BreakerState::Open,
            2 => BreakerState::HalfOpen,
            _ => BreakerState::Closed,
        }
    }

    const fn as_u8(self) -> u8 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::Open => 1,
            BreakerState::HalfOpen => 2,
        }
    }
}

struct Shared {
    state: AtomicU8,
    probe_in_flight: AtomicBool,
    metrics: Option<ClientMetrics>,
}

impl Shared {
    fn transition(&self, to: BreakerState) {
        let from = BreakerState::from_u8(self.state.swap(to.as_u8(), Ordering::AcqRel));
        if from == to {
            return;
        }
        match to {
            BreakerState::Open => {
                tracing::warn!(from = from.as_str(), "somabrain circuit breaker opened")
            }
            BreakerState::HalfOpen => {
                tracing::info!("somabrain circuit breaker half-open, probing")
            }
            BreakerState::Closed => {
                tracing::info!(from = from.as_str(), "somabrain circuit breaker closed")
            }
        }
        if let Some(m) = &self.metrics {
            m.breaker_transition(from, to);
        }
    }
}

#[derive(Clone)]
struct Mirror(Arc<Shared>);

impl Instrument for Mirror {
    fn on_call_rejected(&self) {}
    fn on_open(&self) {
        self.0.transition(BreakerState::Open);
    }
    fn on_half_open(&self) {
        self.0.transition(BreakerState::HalfOpen);
    }
    fn on_closed(&self) {
        self.0.transition(BreakerState::Closed);
    }
}

type Machine = StateMachine<ConsecutiveFailures<Constant>, Mirror>;

/// The client's circuit breaker (cheap to clone; clones share state).
#[derive(Clone)]
pub(crate) struct Breaker {
    machine: Option<Machine>,
    shared: Arc<Shared>,
}

/// Permission to make one call. Report its outcome with
/// [`Permit::success`] / [`Permit::failure`]; dropping it unreported (the
/// caller's future was cancelled, or the outcome is neutral) records nothing
/// and frees the half-open probe slot.
pub(crate) struct Permit<'a> {
    breaker: &'a Breaker,
    probe: bool,
}

impl Breaker {
    pub(crate) fn new(cfg: &BreakerConfig, metrics: Option<ClientMetrics>) -> Self {
        let shared = Arc::new(Shared {
            state: AtomicU8::new(BreakerState::Closed.as_u8()),
            probe_in_flight: AtomicBool::new(false),
            metrics,
        });
        let machine = cfg.enabled.then(|| {
            let open_for = Duration::from_millis(cfg.half_open_after_ms);
            let policy = failure_policy::consecutive_failures(
                cfg.failure_threshold.max(1),
                backoff::constant(open_for),
            );
            StateMachine::new(policy, Mirror(shared.clone()))
        });
        if let Some(m) = &shared.metrics {
            m.breaker_init();
        }
        Breaker { machine, shared }
    }

    /// Asks to make a call. `None` means refused (open, or half-open with
    /// the probe already in flight). Takes one uncontended lock when closed.
    #[inline]
    pub(crate) fn try_acquire(&self) -> Option<Permit<'_>> {
        let Some(machine) = &self.machine else {
            return Some(Permit {
                breaker: self,
                probe: false,
            });
        };
        if !machine.is_call_permitted() {
            return None;
        }
        if self.state() == BreakerState::HalfOpen {
            if self.shared.probe_in_flight.swap(true, Ordering::AcqRel) {
                return None;
            }
            return Some(Permit {
                breaker: self,
                probe: true,
            });
        }
        Some(Permit {
            breaker: self,
            probe: false,
        })
    }

    pub(crate) fn state(&self) -> BreakerState {
        BreakerState::from_u8(self.shared.state.load(Ordering::Acquire))
    }
}

impl Permit<'_> {
    pub(crate) fn success(self) {
        if let Some(m) = &self.breaker.machine {
            m.on_success();
        }
    }

    pub(crate) fn failure(self) {
        if let Some(m) = &self.breaker.machine {
            m.on_error();
        }
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if self.probe {
            self.breaker
                .shared
                .probe_in_flight
                .store(false, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(threshold: u32, open_ms: u64) -> BreakerConfig {
        BreakerConfig {
            enabled: true,
            failure_threshold: threshold,
            half_open_after_ms: open_ms,
        }
    }

    #[test]
    fn opens_after_threshold_and_probes_once() {
        let b = Breaker::new(&cfg(3, 20), None);
        for _ in 0..2 {
            b.try_acquire().unwrap().failure();
            assert_eq!(b.state(), BreakerState::Closed);
        }
        b.try_acquire().unwrap().failure();
        assert_eq!(b.state(), BreakerState::Open);
        assert!(b.try_acquire().is_none());
        std::thread::sleep(Duration::from_millis(30));
        let probe = b
            .try_acquire()
            .expect("probe allowed after the open period");
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert!(b.try_acquire().is_none(), "only one probe while half-open");
        probe.success();
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(b.try_acquire().is_some());
    }

    #[test]
    fn a_failed_probe_reopens_and_a_dropped_probe_frees_the_slot() {
        let b = Breaker::new(&cfg(1, 10), None);
        b.try_acquire().unwrap().failure();
        std::thread::sleep(Duration::from_millis(15));
        drop(b.try_acquire().unwrap()); // cancelled probe: nothing recorded
        assert_eq!(b.state(), BreakerState::HalfOpen);
        b.try_acquire().expect("slot freed").failure();
        assert_eq!(b.state(), BreakerState::Open);
        assert!(b.try_acquire().is_none());
    }

    #[test]
    fn a_success_resets_the_consecutive_count() {
        let b = Breaker::new(&cfg(2, 10_000), None);
        b.try_acquire().unwrap().failure();
        b.try_acquire().unwrap().success();
        b.try_acquire().unwrap().failure();
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn disabled_breaker_always_permits() {
        let b = Breaker::new(
            &BreakerConfig {
                enabled: false,
                ..cfg(1, 10_000)
            },
            None,
        );
        for _ in 0..5 {
            b.try_acquire().unwrap().failure();
        }
        assert!(b.try_acquire().is_some());
    }
}
