//! One health model for every soma service.
//!
//! # Why
//!
//! The platform this replaces had health routers that always reported
//! unhealthy, and probes that called slow dependencies inline. Here health is
//! *reported*, not polled by the probe (tonic-health's reporter, linkerd's
//! readiness latch):
//!
//! - Components register with a [`Criticality`] and either **push** their
//!   status through a [`HealthReporter`], or supply an async [`HealthCheck`]
//!   that runs **in the background** on an interval with a timeout.
//! - Probes ([`HealthRegistry::report`], [`HealthRegistry::readiness`]) read the
//!   cached state and never wait on a check. A check that hangs is cancelled at
//!   its timeout and the component is marked `down` ("check timed out").
//!
//! # Rules
//!
//! | component state                         | `/ready` | `/v1/health` overall |
//! |-----------------------------------------|----------|----------------------|
//! | every component `up`                    | 200      | `ok` (200)           |
//! | an optional component `degraded`/`down` | 200      | `degraded` (200)     |
//! | a required component `degraded`         | 503      | `degraded` (200)     |
//! | a required component `down`             | 503      | `down` (503)         |
//!
//! `/ready` is 200 only when every *required* component is `up`. A component
//! that has registered but not reported yet is `down` ("no status reported
//! yet"), so a service is not ready until its dependencies say so.
//!
//! # Changes
//!
//! [`HealthRegistry::subscribe`] gives a [`tokio::sync::watch::Receiver`] of the
//! latest [`HealthReport`], notified on every status, reason or membership
//! change (gauge and latency updates are visible but do not notify).
//! [`flags::DegradedFlagDriver`] uses it to drive a feature flag to *degraded*.
//!
//! ```
//! use std::time::Duration;
//! use soma_observability::health::{
//!     CheckOptions, CheckOutcome, ComponentStatus, Criticality, HealthRegistry, OverallStatus, check_fn,
//! };
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let health = HealthRegistry::new();
//! let redis = health.reporter("redis", Criticality::Required);
//! let cache = health.reporter("cache", Criticality::Optional);
//! redis.set_up();
//! cache.set_down("connection refused");
//! let report = health.report();
//! assert_eq!(report.status, OverallStatus::Degraded);
//! assert!(health.readiness().is_ready());
//!
//! // A background check: probes never wait on it.
//! health.register_check(
//!     "postgres",
//!     Criticality::Required,
//!     check_fn(|| async { CheckOutcome::up().with_gauge("replica_lag_seconds", 0.2) }),
//!     CheckOptions::new(Duration::from_secs(5), Duration::from_secs(1)),
//! );
//! # tokio::time::sleep(Duration::from_millis(50)).await;
//! # assert_eq!(health.report().components["postgres"].status, ComponentStatus::Up);
//! # }
//! ```

mod check;
pub mod flags;
mod registry;
mod report;

pub use check::{CheckOptions, CheckOutcome, FnCheck, HealthCheck, check_fn};
pub use registry::{HealthRegistry, HealthReporter};
pub use report::{
    ComponentReport, ComponentStatus, Criticality, HealthReport, OverallStatus, Readiness,
};
