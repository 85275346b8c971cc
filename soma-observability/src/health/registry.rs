//! The health registry, reporters and background check tasks.

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures_util::FutureExt as _;
use parking_lot::Mutex;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::watch;
use tokio::task::AbortHandle;

use super::check::{CheckOptions, CheckOutcome, HealthCheck};
use crate::metrics::MetricsRegistry;

use super::report::{ComponentReport, ComponentStatus, Criticality, HealthReport, Readiness};

const NOT_REPORTED: &str = "no status reported yet";

struct Component {
    criticality: Criticality,
    status: ComponentStatus,
    reason: Option<String>,
    last_change: DateTime<Utc>,
    last_check: Option<DateTime<Utc>>,
    check_latency: Option<Duration>,
    gauges: BTreeMap<String, f64>,
    consecutive_failures: u32,
    check_task: Option<AbortHandle>,
}

impl Component {
    fn new(criticality: Criticality) -> Self {
        Self {
            criticality,
            status: ComponentStatus::Down,
            reason: Some(NOT_REPORTED.to_owned()),
            last_change: Utc::now(),
            last_check: None,
            check_latency: None,
            gauges: BTreeMap::new(),
            consecutive_failures: 0,
            check_task: None,
        }
    }

    fn report(&self) -> ComponentReport {
        ComponentReport {
            status: self.status,
            criticality: self.criticality,
            reason: self.reason.clone(),
            last_change: self.last_change,
            last_check: self.last_check,
            check_latency_ms: self.check_latency.map(|d| d.as_secs_f64() * 1000.0),
            gauges: self.gauges.clone(),
        }
    }

    /// Sets status and reason; returns whether anything changed.
    fn set(&mut self, status: ComponentStatus, reason: Option<String>) -> bool {
        if self.status == status && self.reason == reason {
            return false;
        }
        self.status = status;
        self.reason = reason;
        self.last_change = Utc::now();
        true
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ComponentLabels {
    component: String,
    criticality: &'static str,
}

struct Inner {
    components: Mutex<BTreeMap<String, Component>>,
    tx: watch::Sender<HealthReport>,
    status_gauge: Mutex<Option<Family<ComponentLabels, Gauge>>>,
}

fn status_value(status: ComponentStatus) -> i64 {
    match status {
        ComponentStatus::Up => 2,
        ComponentStatus::Degraded => 1,
        ComponentStatus::Down => 0,
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        for c in self.components.get_mut().values_mut() {
            if let Some(task) = c.check_task.take() {
                task.abort();
            }
        }
    }
}

impl Inner {
    /// Runs `f` on the component map under the lock, then republishes the
    /// report; subscribers are notified when `f` returns `true`.
    fn update(&self, f: impl FnOnce(&mut BTreeMap<String, Component>) -> bool) {
        let mut components = self.components.lock();
        let notify = f(&mut components);
        let report = HealthReport::from_components(
            components
                .iter()
                .map(|(k, c)| (k.clone(), c.report()))
                .collect(),
        );
        if notify {
            if let Some(gauge) = self.status_gauge.lock().as_ref() {
                gauge.clear();
                for (name, c) in components.iter() {
                    let labels = ComponentLabels {
                        component: name.clone(),
                        criticality: c.criticality.as_str(),
                    };
                    gauge.get_or_create(&labels).set(status_value(c.status));
                }
            }
        }
        self.tx.send_if_modified(|current| {
            *current = report;
            notify
        });
    }

    fn with_component(&self, name: &str, f: impl FnOnce(&mut Component) -> bool) {
        self.update(|components| match components.get_mut(name) {
            Some(c) => f(c),
            // Removed while a reporter or check was still around: ignore.
            None => false,
        });
    }

    fn apply_check(&self, name: &str, outcome: CheckOutcome, latency: Duration, threshold: u32) {
        self.with_component(name, |c| {
            c.last_check = Some(Utc::now());
            c.check_latency = Some(latency);
            c.gauges = outcome.gauges;
            let (status, reason) = if outcome.status == ComponentStatus::Down {
                c.consecutive_failures = c.consecutive_failures.saturating_add(1);
                if c.consecutive_failures >= threshold {
                    (ComponentStatus::Down, outcome.reason)
                } else {
                    let why = outcome.reason.unwrap_or_else(|| "check failed".to_owned());
                    (
                        ComponentStatus::Degraded,
                        Some(format!(
                            "check failing ({}/{threshold}): {why}",
                            c.consecutive_failures
                        )),
                    )
                }
            } else {
                c.consecutive_failures = 0;
                (outcome.status, outcome.reason)
            };
            c.set(status, reason)
        });
    }
}

/// The registry of components and their health. Cheap to clone; all clones
/// share state.
///
/// See the [module docs](super) for the rules.
#[derive(Clone)]
pub struct HealthRegistry {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for HealthRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HealthRegistry")
            .field("status", &self.report().status)
            .finish()
    }
}

impl Default for HealthRegistry {
    fn default() -> Self {
        Self::new()
    }
}

impl HealthRegistry {
    /// An empty registry (overall `ok`, ready).
    pub fn new() -> Self {
        let (tx, _) = watch::channel(HealthReport::from_components(BTreeMap::new()));
        Self {
            inner: Arc::new(Inner {
                components: Mutex::new(BTreeMap::new()),
                tx,
                status_gauge: Mutex::new(None),
            }),
        }
    }

    /// Exports component health as the gauge
    /// `soma_observability_health_component_status{component, criticality}`:
    /// 2 = up, 1 = degraded, 0 = down (so `< 2` alerts on anything not up).
    /// Kept current on every status or membership change.
    pub fn export_metrics(&self, metrics: &MetricsRegistry) {
        let family = metrics.gauge_family::<ComponentLabels>(
            "soma_observability_health_component_status",
            "Component health: 2 up, 1 degraded, 0 down",
        );
        *self.inner.status_gauge.lock() = Some(family);
        self.inner.update(|_| true);
    }

    /// Registers (or gets) a push-style component and returns its reporter.
    ///
    /// A new component starts `down` ("no status reported yet"). Registering an
    /// existing name returns a reporter for the same component; if the
    /// criticalities differ, the stricter (`required`) is kept.
    pub fn reporter(&self, name: impl Into<String>, criticality: Criticality) -> HealthReporter {
        let name: String = name.into();
        self.ensure(&name, criticality);
        HealthReporter {
            inner: self.inner.clone(),
            name: name.into(),
        }
    }

    /// Registers a component whose status comes from `check`, run in the
    /// background every `options.interval` (first run at once) and cancelled
    /// after `options.timeout`, which marks the component `down`.
    ///
    /// Replaces a check previously registered under the same name. The task
    /// stops when the component is [removed](Self::remove) or the last clone
    /// of the registry is dropped. Must be called within a tokio runtime; if
    /// there is none, the component is marked `down` with that reason and an
    /// error is logged (it never panics).
    pub fn register_check(
        &self,
        name: impl Into<String>,
        criticality: Criticality,
        check: impl HealthCheck,
        options: CheckOptions,
    ) {
        let name: String = name.into();
        self.ensure(&name, criticality);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::error!(component = %name, "health check not started: no tokio runtime");
            self.inner.with_component(&name, |c| {
                c.set(
                    ComponentStatus::Down,
                    Some("health check not running: registered outside a tokio runtime".into()),
                )
            });
            return;
        };
        let task = runtime.spawn(run_check(
            Arc::downgrade(&self.inner),
            name.clone(),
            Arc::new(check),
            options,
        ));
        let handle = task.abort_handle();
        self.inner.with_component(&name, move |c| {
            if let Some(old) = c.check_task.replace(handle) {
                old.abort();
            }
            false
        });
    }

    /// Removes a component (and stops its check). Returns whether it existed.
    pub fn remove(&self, name: &str) -> bool {
        let mut existed = false;
        self.inner.update(|components| {
            if let Some(mut c) = components.remove(name) {
                existed = true;
                if let Some(task) = c.check_task.take() {
                    task.abort();
                }
                true
            } else {
                false
            }
        });
        existed
    }

    /// The current report (cached; never waits on a check).
    pub fn report(&self) -> HealthReport {
        self.inner.tx.borrow().clone()
    }

    /// Readiness: ready when every required component is `up`.
    pub fn readiness(&self) -> Readiness {
        self.inner.tx.borrow().readiness()
    }

    /// The status of one component, if registered.
    pub fn component(&self, name: &str) -> Option<ComponentReport> {
        self.inner.tx.borrow().components.get(name).cloned()
    }

    /// A receiver of the latest report, notified on every status, reason or
    /// membership change.
    pub fn subscribe(&self) -> watch::Receiver<HealthReport> {
        self.inner.tx.subscribe()
    }

    fn ensure(&self, name: &str, criticality: Criticality) {
        self.inner
            .update(|components| match components.get_mut(name) {
                Some(c) => {
                    if c.criticality != criticality && criticality == Criticality::Required {
                        tracing::warn!(component = %name, "component re-registered as required");
                        c.criticality = Criticality::Required;
                        true
                    } else {
                        false
                    }
                }
                None => {
                    components.insert(name.to_owned(), Component::new(criticality));
                    true
                }
            });
    }
}

async fn run_check(
    inner: Weak<Inner>,
    name: String,
    check: Arc<dyn HealthCheck>,
    options: CheckOptions,
) {
    let mut ticker = tokio::time::interval(options.interval.max(Duration::from_millis(1)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let started = Instant::now();
        let run = AssertUnwindSafe(check.check()).catch_unwind();
        let outcome = match tokio::time::timeout(options.timeout, run).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_panic)) => CheckOutcome::down("health check panicked"),
            Err(_elapsed) => CheckOutcome::down(format!(
                "health check timed out after {} ms",
                options.timeout.as_millis()
            )),
        };
        let latency = started.elapsed();
        let Some(inner) = inner.upgrade() else { return };
        if outcome.status != ComponentStatus::Up {
            tracing::debug!(
                component = %name,
                status = outcome.status.as_str(),
                reason = outcome.reason.as_deref().unwrap_or(""),
                "health check not up"
            );
        }
        inner.apply_check(&name, outcome, latency, options.failure_threshold.max(1));
    }
}

/// Pushes the status of one component. Cheap to clone.
#[derive(Clone)]
pub struct HealthReporter {
    inner: Arc<Inner>,
    name: Arc<str>,
}

impl std::fmt::Debug for HealthReporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HealthReporter")
            .field("component", &self.name)
            .finish()
    }
}

impl HealthReporter {
    /// The component name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Marks the component up (clears the reason).
    pub fn set_up(&self) {
        self.set_status(ComponentStatus::Up, None::<String>);
    }

    /// Marks the component degraded.
    pub fn set_degraded(&self, reason: impl Into<String>) {
        self.set_status(ComponentStatus::Degraded, Some(reason));
    }

    /// Marks the component down.
    pub fn set_down(&self, reason: impl Into<String>) {
        self.set_status(ComponentStatus::Down, Some(reason));
    }

    /// Sets status and reason. Subscribers are notified only if either changed.
    pub fn set_status(&self, status: ComponentStatus, reason: Option<impl Into<String>>) {
        let reason = reason.map(Into::into);
        self.inner
            .with_component(&self.name, |c| c.set(status, reason));
    }

    /// Sets a gauge (e.g. `outbox_backlog`). Does not notify subscribers.
    pub fn set_gauge(&self, name: impl Into<String>, value: f64) {
        let name = name.into();
        self.inner.with_component(&self.name, |c| {
            c.gauges.insert(name, value);
            false
        });
    }

    /// Removes a gauge.
    pub fn clear_gauge(&self, name: &str) {
        self.inner.with_component(&self.name, |c| {
            c.gauges.remove(name);
            false
        });
    }

    /// The component's current status (`None` if it was removed).
    pub fn status(&self) -> Option<ComponentStatus> {
        self.inner
            .tx
            .borrow()
            .components
            .get(&*self.name)
            .map(|c| c.status)
    }
}

#[cfg(test)]
mod tests {
    use super::super::{OverallStatus, check_fn};
    use super::*;

    #[test]
    fn transitions_and_readiness() {
        let h = HealthRegistry::new();
        assert_eq!(h.report().status, OverallStatus::Ok);
        let db = h.reporter("db", Criticality::Required);
        let cache = h.reporter("cache", Criticality::Optional);
        let r = h.readiness();
        assert_eq!(
            r.failing,
            vec!["db".to_string()],
            "unreported required is not ready"
        );
        db.set_up();
        cache.set_up();
        assert_eq!(h.report().status, OverallStatus::Ok);
        cache.set_down("refused");
        assert_eq!(h.report().status, OverallStatus::Degraded);
        assert!(h.readiness().is_ready());
        db.set_degraded("slow");
        assert_eq!(h.report().status, OverallStatus::Degraded);
        assert!(!h.readiness().is_ready());
        db.set_down("gone");
        assert_eq!(h.report().status, OverallStatus::Down);
        assert_eq!(h.report().http_status(), 503);
        db.set_up();
        cache.set_up();
        assert_eq!(h.report().status, OverallStatus::Ok);
    }

    #[test]
    fn exports_status_gauge() {
        let m = MetricsRegistry::default();
        let h = HealthRegistry::new();
        let db = h.reporter("db", Criticality::Required);
        h.export_metrics(&m);
        let line = |v: i64| {
            format!(
                "soma_observability_health_component_status{{service=\"unknown_service\",version=\"0.0.0\",env=\"local\",component=\"db\",criticality=\"required\"}} {v}\n"
            )
        };
        assert!(m.encode().contains(&line(0)), "{}", m.encode());
        db.set_degraded("slow");
        assert!(m.encode().contains(&line(1)));
        db.set_up();
        assert!(m.encode().contains(&line(2)));
        h.remove("db");
        assert!(!m.encode().contains("component=\"db\""));
    }

    #[test]
    fn reregistration_shares_and_upgrades() {
        let h = HealthRegistry::new();
        let a = h.reporter("x", Criticality::Optional);
        let b = h.reporter("x", Criticality::Required);
        a.set_up();
        assert_eq!(b.status(), Some(ComponentStatus::Up));
        assert_eq!(h.component("x").unwrap().criticality, Criticality::Required);
        assert!(h.remove("x"));
        assert_eq!(a.status(), None);
        a.set_down("after removal is ignored");
        assert!(h.report().components.is_empty());
    }

    #[test]
    fn check_without_runtime_marks_down() {
        let h = HealthRegistry::new();
        h.register_check(
            "db",
            Criticality::Required,
            check_fn(|| async { CheckOutcome::up() }),
            CheckOptions::default(),
        );
        let c = h.component("db").unwrap();
        assert_eq!(c.status, ComponentStatus::Down);
        assert!(c.reason.unwrap().contains("tokio runtime"));
    }

    #[tokio::test(start_paused = true)]
    async fn failure_threshold_degrades_first() {
        let h = HealthRegistry::new();
        h.register_check(
            "db",
            Criticality::Required,
            check_fn(|| async { CheckOutcome::down("refused") }),
            CheckOptions::new(Duration::from_secs(1), Duration::from_millis(100))
                .with_failure_threshold(2),
        );
        let mut rx = h.subscribe();
        rx.wait_for(|r| r.components["db"].status == ComponentStatus::Degraded)
            .await
            .unwrap();
        assert!(
            h.component("db")
                .unwrap()
                .reason
                .unwrap()
                .contains("(1/2): refused")
        );
        rx.wait_for(|r| r.components["db"].status == ComponentStatus::Down)
            .await
            .unwrap();
        assert_eq!(
            h.component("db").unwrap().reason.as_deref(),
            Some("refused")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn panicking_check_is_down() {
        let h = HealthRegistry::new();
        h.register_check(
            "p",
            Criticality::Optional,
            check_fn(|| async {
                if true {
                    panic!("boom");
                }
                CheckOutcome::up()
            }),
            CheckOptions::default(),
        );
        let mut rx = h.subscribe();
        rx.wait_for(|r| r.components["p"].reason.as_deref() == Some("health check panicked"))
            .await
            .unwrap();
    }
}
