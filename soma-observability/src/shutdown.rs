//! One shutdown sequence for every service: drain first, then stop in
//! order, within one deadline.
//!
//! A deploy stops each process with `SIGTERM` while traffic flows. What a
//! service must then do, in this order:
//!
//! 1. **Stop being ready.** [`Shutdown::begin`] turns the health component
//!    `shutdown` (required) `down`, so `/ready` answers 503 and a load
//!    balancer stops sending new work, while `/live` stays 200. Optionally
//!    wait [`ShutdownConfig::drain_delay_ms`] for the balancer to notice.
//! 2. **Stop accepting and finish what is in flight**: the HTTP server's
//!    graceful shutdown (in-flight requests complete; streams end with a
//!    final event telling clients to reconnect — watch
//!    [`Shutdown::draining`]).
//! 3. **Flush what was accepted**: the durable publisher (every accepted
//!    message acknowledged by Kafka or committed to the outbox).
//! 4. **Stop consumers** after committing what was handled, **then relays**
//!    after their in-flight batch.
//! 5. **Flush telemetry, then close pools.**
//!
//! Each step is a [`stage`](Shutdown::stage): it runs with whatever is left
//! of the one overall deadline ([`ShutdownConfig::deadline_ms`]) and is
//! abandoned (logged, counted in the [`ShutdownReport`]) when the deadline
//! passes or a second signal forces the exit. Stages after an abandoned one
//! still run, each given a short grace period, so a forced exit still
//! flushes what it can. Nothing *accepted* is lost by a forced exit either:
//! a message is accepted only once Kafka acknowledged it or PostgreSQL
//! committed it, and a consumer commits an offset only after its handler
//! finished; what was cut short is redelivered or was never acknowledged to
//! its client.
//!
//! ```no_run
//! # async fn run(health: soma_observability::health::HealthRegistry) {
//! use soma_observability::shutdown::{Shutdown, ShutdownConfig};
//!
//! let shutdown = Shutdown::new(ShutdownConfig::default(), &health);
//! shutdown.listen_for_signals(); // SIGTERM / Ctrl-C: begin; a second one: force
//! shutdown.requested().await;    // ... serve until then ...
//! shutdown.drain_delay().await;
//! shutdown.stage("http", async { /* graceful server shutdown */ }).await;
//! shutdown.stage("publisher", async { /* flush */ }).await;
//! let report = shutdown.finish();
//! assert!(report.completed() || !report.abandoned.is_empty());
//! # }
//! ```

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::health::{Criticality, HealthRegistry, HealthReporter};

/// The `shutdown` section of a service's settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct ShutdownConfig {
    /// The whole shutdown, from the first signal to exit, in milliseconds.
    pub deadline_ms: u64,
    /// How long to keep serving after readiness went down, so a load
    /// balancer stops routing here before the listener closes (0 locally).
    pub drain_delay_ms: u64,
    /// Time each remaining stage still gets once the deadline has passed or
    /// the exit was forced (a last chance to flush), in milliseconds.
    pub forced_stage_grace_ms: u64,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            deadline_ms: 25_000,
            drain_delay_ms: 0,
            forced_stage_grace_ms: 500,
        }
    }
}

/// What happened during a shutdown.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Stages that finished, with how long each took.
    pub finished: Vec<(String, Duration)>,
    /// Stages abandoned at the deadline or by a forced exit.
    pub abandoned: Vec<String>,
    /// True when a second signal (or [`Shutdown::force`]) forced the exit.
    pub forced: bool,
}

impl ShutdownReport {
    /// True when every stage finished in time.
    pub fn completed(&self) -> bool {
        self.abandoned.is_empty()
    }
}

#[derive(Debug)]
struct Inner {
    config: ShutdownConfig,
    state: watch::Sender<Phase>,
    started: Mutex<Option<Instant>>,
    report: Mutex<ShutdownReport>,
    ready: HealthReporter,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    Running,
    Draining,
    Forced,
}

/// A service's shutdown: the signal, the readiness latch, the deadline and
/// the ordered stages. Cheap to clone; every clone is the same shutdown.
#[derive(Debug, Clone)]
pub struct Shutdown {
    inner: Arc<Inner>,
}

impl Shutdown {
    /// A shutdown with `config`, reporting the required health component
    /// `shutdown` in `health` (`up` now, `down` from [`begin`](Self::begin)).
    pub fn new(config: ShutdownConfig, health: &HealthRegistry) -> Self {
        let ready = health.reporter("shutdown", Criticality::Required);
        ready.set_up();
        let (state, _) = watch::channel(Phase::Running);
        Self {
            inner: Arc::new(Inner {
                config,
                state,
                started: Mutex::new(None),
                report: Mutex::new(ShutdownReport::default()),
                ready,
            }),
        }
    }

    /// Starts draining: readiness goes down, [`draining`](Self::draining)
    /// resolves, the deadline starts. Idempotent.
    pub fn begin(&self) {
        let mut started = self.inner.started.lock();
        if started.is_some() {
            return;
        }
        *started = Some(Instant::now());
        self.inner.ready.set_down("shutting down");
        self.inner.state.send_if_modified(|p| {
            let changed = *p < Phase::Draining;
            if changed {
                *p = Phase::Draining;
            }
            changed
        });
        tracing::info!(
            event = "shutdown_started",
            deadline_ms = self.inner.config.deadline_ms,
            "readiness down; draining"
        );
    }

    /// Forces the exit: the current stage is abandoned and the remaining
    /// ones get only [`ShutdownConfig::forced_stage_grace_ms`] each.
    pub fn force(&self) {
        self.begin();
        if self.inner.state.send_if_modified(|p| {
            let changed = *p < Phase::Forced;
            *p = Phase::Forced;
            changed
        }) {
            tracing::warn!(event = "shutdown_forced");
        }
    }

    /// True once shutdown began.
    pub fn is_draining(&self) -> bool {
        *self.inner.state.borrow() >= Phase::Draining
    }

    /// Resolves once shutdown began (for servers and streams to stop on).
    pub fn draining(&self) -> impl Future<Output = ()> + Send + 'static {
        self.wait_for(Phase::Draining)
    }

    /// Resolves once the exit was forced.
    pub fn forced(&self) -> impl Future<Output = ()> + Send + 'static {
        self.wait_for(Phase::Forced)
    }

    /// Same as [`draining`](Self::draining), by another name for the
    /// service's main task: "serve until shutdown is requested".
    pub async fn requested(&self) {
        self.draining().await;
    }

    fn wait_for(&self, phase: Phase) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.inner.state.subscribe();
        async move {
            let _ = rx.wait_for(|p| *p >= phase).await;
        }
    }

    /// Listens for `SIGTERM` and Ctrl-C on a task of its own: the first
    /// begins the shutdown, the second forces it.
    pub fn listen_for_signals(&self) {
        let this = self.clone();
        tokio::spawn(async move {
            signal().await;
            this.begin();
            signal().await;
            this.force();
        });
    }

    /// Waits [`ShutdownConfig::drain_delay_ms`] (cut short by a forced exit).
    pub async fn drain_delay(&self) {
        let delay = Duration::from_millis(self.inner.config.drain_delay_ms);
        if delay.is_zero() {
            return;
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = self.forced() => {}
        }
    }

    /// Time left before the deadline (the whole deadline before
    /// [`begin`](Self::begin)).
    pub fn remaining(&self) -> Duration {
        let deadline = Duration::from_millis(self.inner.config.deadline_ms);
        match *self.inner.started.lock() {
            Some(t) => deadline.saturating_sub(t.elapsed()),
            None => deadline,
        }
    }

    /// Runs one stage of the sequence: `work` gets the time left before the
    /// deadline (at least the forced-stage grace), and is abandoned when
    /// that runs out or the exit is forced. Returns whether it finished.
    /// Calling a stage begins the shutdown if it has not begun.
    pub async fn stage<F: Future<Output = ()>>(&self, name: &str, work: F) -> bool {
        self.begin();
        let grace = Duration::from_millis(self.inner.config.forced_stage_grace_ms);
        let forced_already = *self.inner.state.borrow() == Phase::Forced;
        let budget = if forced_already {
            grace
        } else {
            self.remaining().max(grace)
        };
        let started = Instant::now();
        let forced = self.forced();
        let finished = tokio::select! {
            () = work => true,
            () = tokio::time::sleep(budget) => false,
            () = forced, if !forced_already => {
                // Forced mid-stage: a last short grace period.
                false
            }
        };
        let took = started.elapsed();
        let mut report = self.inner.report.lock();
        if finished {
            tracing::info!(
                event = "shutdown_stage",
                stage = name,
                took_ms = took.as_millis() as u64
            );
            report.finished.push((name.to_owned(), took));
        } else {
            tracing::warn!(
                event = "shutdown_stage_abandoned",
                stage = name,
                took_ms = took.as_millis() as u64,
                "stage did not finish before the shutdown deadline or a forced exit"
            );
            report.abandoned.push(name.to_owned());
        }
        finished
    }

    /// The report of the stages run so far.
    pub fn finish(&self) -> ShutdownReport {
        let mut r = self.inner.report.lock().clone();
        r.forced = *self.inner.state.borrow() == Phase::Forced;
        r
    }
}

async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(deadline_ms: u64) -> ShutdownConfig {
        ShutdownConfig {
            deadline_ms,
            drain_delay_ms: 0,
            forced_stage_grace_ms: 50,
        }
    }

    #[tokio::test]
    async fn begin_turns_readiness_down_and_wakes_the_drainers() {
        let health = HealthRegistry::new();
        let s = Shutdown::new(config(1_000), &health);
        assert!(health.readiness().is_ready());
        let drained = tokio::spawn(s.draining());
        tokio::task::yield_now().await;
        assert!(!drained.is_finished());
        s.begin();
        tokio::time::timeout(Duration::from_secs(1), drained)
            .await
            .expect("draining resolves")
            .unwrap();
        assert!(s.is_draining());
        assert!(!health.readiness().is_ready(), "readiness goes down first");
    }

    #[tokio::test(start_paused = true)]
    async fn stages_share_one_deadline_and_a_late_one_is_abandoned() {
        let health = HealthRegistry::new();
        let s = Shutdown::new(config(1_000), &health);
        s.begin();
        assert!(
            s.stage("quick", tokio::time::sleep(Duration::from_millis(600)))
                .await
        );
        // 400 ms left: a 600 ms stage is cut at the deadline.
        let started = Instant::now();
        assert!(
            !s.stage("slow", tokio::time::sleep(Duration::from_millis(600)))
                .await
        );
        assert_eq!(started.elapsed(), Duration::from_millis(400));
        // Past the deadline, a stage still gets the grace period.
        assert!(
            s.stage("flush", tokio::time::sleep(Duration::from_millis(10)))
                .await
        );
        let r = s.finish();
        assert_eq!(r.abandoned, vec!["slow".to_owned()]);
        assert_eq!(
            r.finished
                .iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>(),
            ["quick", "flush"]
        );
        assert!(!r.completed());
        assert!(!r.forced);
    }

    #[tokio::test(start_paused = true)]
    async fn force_abandons_the_current_stage_and_shortens_the_rest() {
        let health = HealthRegistry::new();
        let s = Shutdown::new(config(60_000), &health);
        let s2 = s.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            s2.force();
        });
        let started = Instant::now();
        assert!(!s.stage("stuck", std::future::pending::<()>()).await);
        assert_eq!(started.elapsed(), Duration::from_millis(100));
        let started = Instant::now();
        assert!(!s.stage("also stuck", std::future::pending::<()>()).await);
        assert_eq!(started.elapsed(), Duration::from_millis(50), "grace only");
        assert!(s.finish().forced);
    }
}
