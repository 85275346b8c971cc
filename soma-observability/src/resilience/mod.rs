//! One resilience vocabulary: a [`CircuitBreaker`] and a [`Backoff`], with
//! one config spelling ([`BreakerConfig`], [`BackoffConfig`]) that every soma
//! crate uses for its `breaker` and backoff sections.
//!
//! # Why
//!
//! The bus publisher, the remote OPA engine and the SomaBrain client each
//! had their own breaker, with three config spellings and three different
//! half-open rules (one admitted everyone, one could stay open forever when
//! the trial call was cancelled); the consumer, the outbox relay and the
//! Redis bulk path each had their own backoff arithmetic. These are the one
//! copy.
//!
//! # Guarantees
//!
//! - **One probe.** A half-open breaker admits exactly one caller; every
//!   other caller is refused at once ([`CircuitOpen`]) and goes to its
//!   fallback, so during an outage only the probe pays the dependency's
//!   timeout.
//! - **Cancellation-safe.** A [`Permit`] dropped without an outcome records
//!   nothing and frees the probe slot: a cancelled probe never leaves the
//!   breaker stuck.
//! - **Named per component** in metrics (`soma_circuit_breaker_state`
//!   `{component}`) and, optionally, in health ([`OpenHealth`]).
//! - **Deterministic in tests.** The breaker reads `tokio::time::Instant`
//!   (a paused tokio clock drives it); [`Backoff::delay_from`] takes the
//!   random sample from the caller.
//!
//! [`FailMode`] names the choice a component makes when such a dependency is
//! down: reject (closed) or let through unchecked (open).
//!
//! The breaker keeps nothing: a refused call is the caller's to route to
//! its fallback or to return as an error.

mod backoff;
mod breaker;
mod fail_mode;

pub use backoff::{Backoff, BackoffConfig, Jitter};
pub use breaker::{
    BREAKER_STATE, BREAKER_TRANSITIONS_TOTAL, BreakerConfig, BreakerState, CircuitBreaker,
    CircuitOpen, OpenHealth, Permit,
};
pub use fail_mode::FailMode;
