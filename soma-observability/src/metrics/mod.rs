//! Prometheus metrics on [`prometheus_client`], shared by every soma crate.
//!
//! # Why
//!
//! Each crate used to keep its own registry that nothing scraped, and a second
//! registration of the same name raised at runtime. [`MetricsRegistry`] is one
//! cheap-to-clone handle per process (or per test) that every crate registers
//! into, and that `/metrics` encodes.
//!
//! # Guarantees
//!
//! - **Get-or-register.** Registering a family twice under the same name, metric
//!   type, label type (and, for histograms, buckets) returns the *same* family:
//!   two clients, or a test that initialises twice, share one series set.
//! - **Never panics on a clash.** The same name with a different type is a typed
//!   [`MetricsError`] from the `try_*` variants. The infallible variants log the
//!   error, count it in `soma_observability_metric_conflicts_total`, and hand
//!   back a *detached* family: it works, but it is not exported. Callers that
//!   must know use `try_*`.
//! - **Constant labels.** Every series carries `service`, `version` and `env`
//!   from [`ConstLabels`].
//! - **Naming.** Names follow `soma_<crate>_<noun>_<unit>[_total]`. Counters may
//!   be named with or without the `_total` suffix; the exposition always ends
//!   counters in `_total` exactly once.
//!
//! ```
//! use soma_observability::metrics::{ConstLabels, MetricsRegistry};
//! use soma_observability::prometheus_client::encoding::EncodeLabelSet;
//!
//! #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
//! struct OpLabels { op: &'static str }
//!
//! let metrics = MetricsRegistry::new(ConstLabels::new("gateway", "1.2.0", "prod"));
//! let ops = metrics.counter_family::<OpLabels>("soma_example_ops_total", "Operations run");
//! ops.get_or_create(&OpLabels { op: "get" }).inc();
//! // Registered again (say, by a second client): the same family comes back.
//! let again = metrics.counter_family::<OpLabels>("soma_example_ops_total", "Operations run");
//! again.get_or_create(&OpLabels { op: "get" }).inc();
//!
//! let text = metrics.encode();
//! assert!(text.contains(
//!     r#"soma_example_ops_total{service="gateway",version="1.2.0",env="prod",op="get"} 2"#
//! ));
//! assert!(text.ends_with("# EOF\n"));
//! ```

mod error;

use std::any::Any;
use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt::Debug;
use std::hash::Hash;
use std::sync::Arc;

use parking_lot::Mutex;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};

pub use error::MetricsError;

/// The `Content-Type` of [`MetricsRegistry::encode`]'s output.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The `Content-Type` of [`MetricsRegistry::encode_prometheus`]'s output.
pub const PROMETHEUS_TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Default latency buckets in seconds (1 ms .. 10 s), for request durations.
pub const DEFAULT_LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Bounds a label-set type must meet to be used in a family.
///
/// Implemented for every type that derives
/// `Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet` (and `()`/`Vec<(String, String)>`).
pub trait LabelSet: EncodeLabelSet + Clone + Debug + Hash + Eq + Send + Sync + 'static {}

impl<T> LabelSet for T where T: EncodeLabelSet + Clone + Debug + Hash + Eq + Send + Sync + 'static {}

/// A family of float gauges (`f64` values).
pub type FloatGauge = Gauge<f64, std::sync::atomic::AtomicU64>;

/// The family type returned by [`MetricsRegistry::histogram_family`].
pub type HistogramFamily<L> = Family<L, Histogram, HistogramBuckets>;

/// Builds histograms with a fixed set of bucket bounds (the constructor of a
/// [`HistogramFamily`]).
#[derive(Clone, Debug)]
pub struct HistogramBuckets(Arc<[f64]>);

impl HistogramBuckets {
    /// Bucket upper bounds (ascending, finite; `+Inf` is implicit).
    pub fn bounds(&self) -> &[f64] {
        &self.0
    }

    fn new(buckets: &[f64]) -> Self {
        let mut b: Vec<f64> = buckets.iter().copied().filter(|v| v.is_finite()).collect();
        b.sort_by(f64::total_cmp);
        b.dedup();
        Self(b.into())
    }
}

impl MetricConstructor<Histogram> for HistogramBuckets {
    fn new_metric(&self) -> Histogram {
        Histogram::new(self.0.iter().copied())
    }
}

/// Constant labels put on every series of a [`MetricsRegistry`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ConstLabels {
    /// Logical service name (`service` label), e.g. `gateway`.
    pub service: String,
    /// Service version (`version` label).
    pub version: String,
    /// Deployment environment (`env` label), e.g. `prod`, `staging`, `local`.
    pub env: String,
}

impl ConstLabels {
    /// Builds constant labels.
    pub fn new(
        service: impl Into<String>,
        version: impl Into<String>,
        env: impl Into<String>,
    ) -> Self {
        Self {
            service: service.into(),
            version: version.into(),
            env: env.into(),
        }
    }
}

impl Default for ConstLabels {
    fn default() -> Self {
        Self::new("unknown_service", "0.0.0", "local")
    }
}

/// What kind of metric a name is registered as (used in [`MetricsError`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    /// A monotonically increasing counter.
    Counter,
    /// An `i64` gauge.
    Gauge,
    /// An `f64` gauge.
    FloatGauge,
    /// A histogram.
    Histogram,
}

impl std::fmt::Display for MetricKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MetricKind::Counter => "counter",
            MetricKind::Gauge => "gauge",
            MetricKind::FloatGauge => "float gauge",
            MetricKind::Histogram => "histogram",
        })
    }
}

struct Entry {
    kind: MetricKind,
    label_type: &'static str,
    buckets: Option<HistogramBuckets>,
    family: Box<dyn Any + Send + Sync>,
}

struct Inner {
    const_labels: ConstLabels,
    registry: Mutex<Registry>,
    entries: Mutex<HashMap<String, Entry>>,
    conflicts: Counter,
    last_encoded_len: std::sync::atomic::AtomicUsize,
}

/// A shared, cheap-to-clone Prometheus registry with get-or-register helpers.
///
/// See the [module docs](self) for the guarantees.
#[derive(Clone)]
pub struct MetricsRegistry {
    inner: Arc<Inner>,
}

impl Debug for MetricsRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsRegistry")
            .field("const_labels", &self.inner.const_labels)
            .field("families", &self.inner.entries.lock().len())
            .finish()
    }
}

impl Default for MetricsRegistry {
    /// A registry with [`ConstLabels::default`]; handy in tests.
    fn default() -> Self {
        Self::new(ConstLabels::default())
    }
}

impl MetricsRegistry {
    /// Creates a registry whose every series carries `labels`.
    pub fn new(labels: ConstLabels) -> Self {
        let mut registry = Registry::with_labels(
            [
                (Cow::Borrowed("service"), Cow::Owned(labels.service.clone())),
                (Cow::Borrowed("version"), Cow::Owned(labels.version.clone())),
                (Cow::Borrowed("env"), Cow::Owned(labels.env.clone())),
            ]
            .into_iter(),
        );
        let conflicts = Counter::default();
        registry.register(
            "soma_observability_metric_conflicts",
            "Metric registrations refused because the name was taken by another type",
            conflicts.clone(),
        );
        Self {
            inner: Arc::new(Inner {
                const_labels: labels,
                registry: Mutex::new(registry),
                entries: Mutex::new(HashMap::new()),
                conflicts,
                last_encoded_len: std::sync::atomic::AtomicUsize::new(0),
            }),
        }
    }

    /// The constant labels of this registry.
    pub fn const_labels(&self) -> &ConstLabels {
        &self.inner.const_labels
    }

    /// Gets or registers a counter family. See [`try_counter_family`](Self::try_counter_family).
    ///
    /// On a clash this logs the error and returns a detached (unexported) family.
    pub fn counter_family<L: LabelSet>(&self, name: &str, help: &str) -> Family<L, Counter> {
        self.try_counter_family(name, help)
            .unwrap_or_else(|err| self.detached(err))
    }

    /// Gets or registers a counter family; a trailing `_total` in `name` is optional.
    pub fn try_counter_family<L: LabelSet>(
        &self,
        name: &str,
        help: &str,
    ) -> Result<Family<L, Counter>, MetricsError> {
        let base = name.strip_suffix("_total").unwrap_or(name);
        self.get_or_register(
            base,
            help,
            MetricKind::Counter,
            None,
            Family::<L, Counter>::default,
        )
    }

    /// Gets or registers an `i64` gauge family. On a clash: logs, returns a detached family.
    pub fn gauge_family<L: LabelSet>(&self, name: &str, help: &str) -> Family<L, Gauge> {
        self.try_gauge_family(name, help)
            .unwrap_or_else(|err| self.detached(err))
    }

    /// Gets or registers an `i64` gauge family.
    pub fn try_gauge_family<L: LabelSet>(
        &self,
        name: &str,
        help: &str,
    ) -> Result<Family<L, Gauge>, MetricsError> {
        self.get_or_register(
            name,
            help,
            MetricKind::Gauge,
            None,
            Family::<L, Gauge>::default,
        )
    }

    /// Gets or registers an `f64` gauge family. On a clash: logs, returns a detached family.
    pub fn float_gauge_family<L: LabelSet>(&self, name: &str, help: &str) -> Family<L, FloatGauge> {
        self.try_float_gauge_family(name, help)
            .unwrap_or_else(|err| self.detached(err))
    }

    /// Gets or registers an `f64` gauge family.
    pub fn try_float_gauge_family<L: LabelSet>(
        &self,
        name: &str,
        help: &str,
    ) -> Result<Family<L, FloatGauge>, MetricsError> {
        self.get_or_register(
            name,
            help,
            MetricKind::FloatGauge,
            None,
            Family::<L, FloatGauge>::default,
        )
    }

    /// Gets or registers a histogram family with the given bucket upper bounds
    /// (non-finite bounds are dropped; `+Inf` is implicit).
    ///
    /// On a clash (including the same name with different buckets): logs the
    /// error and returns a detached family using `buckets`.
    pub fn histogram_family<L: LabelSet>(
        &self,
        name: &str,
        help: &str,
        buckets: &[f64],
    ) -> HistogramFamily<L> {
        self.try_histogram_family(name, help, buckets)
            .unwrap_or_else(|err| {
                self.log_conflict(&err);
                Family::new_with_constructor(HistogramBuckets::new(buckets))
            })
    }

    /// Gets or registers a histogram family.
    pub fn try_histogram_family<L: LabelSet>(
        &self,
        name: &str,
        help: &str,
        buckets: &[f64],
    ) -> Result<HistogramFamily<L>, MetricsError> {
        let ctor = HistogramBuckets::new(buckets);
        let ctor2 = ctor.clone();
        self.get_or_register(name, help, MetricKind::Histogram, Some(ctor), move || {
            Family::new_with_constructor(ctor2)
        })
    }

    /// Registers a custom [`Collector`] (for metrics computed at scrape time).
    ///
    /// Collectors are not deduplicated: register each once.
    pub fn register_collector(&self, collector: Box<dyn Collector>) {
        self.inner.registry.lock().register_collector(collector);
    }

    /// Encodes every series in the OpenMetrics text format (ends in `# EOF`).
    pub fn encode(&self) -> String {
        // Size the buffer from the previous scrape to avoid regrowing it.
        let hint = self
            .inner
            .last_encoded_len
            .load(std::sync::atomic::Ordering::Relaxed);
        let mut out = String::with_capacity(hint + hint / 8 + 1024);
        // Writing into a String cannot fail; the metric encoders only fail on
        // writer errors.
        if let Err(err) = self.encode_to(&mut out) {
            tracing::error!(error = %err, "encoding metrics failed");
        }
        self.inner
            .last_encoded_len
            .store(out.len(), std::sync::atomic::Ordering::Relaxed);
        out
    }

    /// Encodes into `writer` (OpenMetrics text, ends in `# EOF`).
    pub fn encode_to<W: std::fmt::Write>(&self, writer: &mut W) -> std::fmt::Result {
        let registry = self.inner.registry.lock();
        prometheus_client::encoding::text::encode(writer, &registry)
    }

    /// Encodes every series in the Prometheus text format 0.0.4, for scrapers
    /// that do not accept OpenMetrics (and for `promtool check metrics`).
    ///
    /// Same series as [`encode`](Self::encode); counters' `HELP`/`TYPE` lines
    /// carry the `_total` name, `unknown` becomes `untyped`, and the `# UNIT`
    /// and `# EOF` lines are left out. (Exemplars are not used by this crate's
    /// families; a custom collector emitting them should be scraped as OpenMetrics.)
    pub fn encode_prometheus(&self) -> String {
        openmetrics_to_prometheus(&self.encode())
    }

    /// Number of families registered through this handle (excluding collectors
    /// and the registry's own conflict counter).
    pub fn family_count(&self) -> usize {
        self.inner.entries.lock().len()
    }

    fn detached<F: Default>(&self, err: MetricsError) -> F {
        self.log_conflict(&err);
        F::default()
    }

    fn log_conflict(&self, err: &MetricsError) {
        self.inner.conflicts.inc();
        tracing::error!(
            error = %err,
            "metric registration refused; returning a detached family that is not exported"
        );
    }

    fn get_or_register<F, M>(
        &self,
        name: &str,
        help: &str,
        kind: MetricKind,
        buckets: Option<HistogramBuckets>,
        make: M,
    ) -> Result<F, MetricsError>
    where
        F: prometheus_client::registry::Metric + Clone + Any + Send + Sync,
        M: FnOnce() -> F,
    {
        validate_name(name)?;
        let label_type = std::any::type_name::<F>();
        let mut entries = self.inner.entries.lock();
        if let Some(entry) = entries.get(name) {
            if entry.kind != kind {
                return Err(MetricsError::Conflict {
                    name: name.to_owned(),
                    existing: entry.kind.to_string(),
                    requested: kind.to_string(),
                });
            }
            let Some(family) = entry.family.downcast_ref::<F>() else {
                return Err(MetricsError::Conflict {
                    name: name.to_owned(),
                    existing: format!("{} ({})", entry.kind, entry.label_type),
                    requested: format!("{kind} ({label_type})"),
                });
            };
            if let (Some(have), Some(want)) = (&entry.buckets, &buckets) {
                if have.bounds() != want.bounds() {
                    return Err(MetricsError::BucketsMismatch {
                        name: name.to_owned(),
                        existing: have.bounds().to_vec(),
                        requested: want.bounds().to_vec(),
                    });
                }
            }
            return Ok(family.clone());
        }
        let family = make();
        self.inner
            .registry
            .lock()
            .register(name, help, family.clone());
        entries.insert(
            name.to_owned(),
            Entry {
                kind,
                label_type,
                buckets,
                family: Box::new(family.clone()),
            },
        );
        Ok(family)
    }
}

fn openmetrics_to_prometheus(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut pending_help: Option<&str> = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            if let Some(help) = pending_help.replace(rest) {
                out.push_str("# HELP ");
                out.push_str(help);
                out.push('\n');
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "unknown"));
            let (name, kind) = match kind {
                "counter" => (format!("{name}_total"), "counter"),
                "unknown" => (name.to_owned(), "untyped"),
                "info" | "stateset" => (name.to_owned(), "gauge"),
                other => (name.to_owned(), other),
            };
            if let Some(help) = pending_help.take() {
                let text = help.split_once(' ').map(|(_, t)| t).unwrap_or("");
                out.push_str(&format!("# HELP {name} {text}\n"));
            }
            out.push_str(&format!("# TYPE {name} {kind}\n"));
            continue;
        }
        if let Some(help) = pending_help.take() {
            out.push_str("# HELP ");
            out.push_str(help);
            out.push('\n');
        }
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

fn validate_name(name: &str) -> Result<(), MetricsError> {
    let invalid = |reason: &str| MetricsError::InvalidName {
        name: name.to_owned(),
        reason: reason.to_owned(),
    };
    let mut chars = name.chars();
    match chars.next() {
        None => return Err(invalid("empty")),
        Some(c) if !(c.is_ascii_alphabetic() || c == '_') => {
            return Err(invalid("must start with an ASCII letter or `_`"));
        }
        _ => {}
    }
    if !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(invalid("only ASCII letters, digits and `_` are allowed"));
    }
    if name.starts_with("__") {
        return Err(invalid("names starting with `__` are reserved"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::encoding::EncodeLabelSet;

    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    struct L {
        op: String,
    }

    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    struct Other {
        kind: String,
    }

    fn l(op: &str) -> L {
        L { op: op.into() }
    }

    #[test]
    fn same_family_is_shared() {
        let m = MetricsRegistry::default();
        let a = m.counter_family::<L>("soma_test_ops_total", "ops");
        let b = m.counter_family::<L>("soma_test_ops", "ops");
        a.get_or_create(&l("x")).inc();
        b.get_or_create(&l("x")).inc();
        assert_eq!(a.get_or_create(&l("x")).get(), 2);
        let text = m.encode();
        assert_eq!(
            text.matches("# TYPE soma_test_ops counter").count(),
            1,
            "{text}"
        );
        assert!(
            text.contains("soma_test_ops_total{service=\"unknown_service\""),
            "{text}"
        );
        assert!(!text.contains("_total_total"), "{text}");
    }

    #[test]
    fn kind_clash_is_typed_error_and_detached() {
        let m = MetricsRegistry::default();
        let c = m.counter_family::<L>("soma_test_clash", "c");
        c.get_or_create(&l("a")).inc();
        let err = m.try_gauge_family::<L>("soma_test_clash", "g").unwrap_err();
        assert!(err.is_conflict(), "{err}");
        // The infallible variant never panics and returns a working, detached family.
        let g = m.gauge_family::<L>("soma_test_clash", "g");
        g.get_or_create(&l("a")).set(42);
        let text = m.encode();
        assert!(
            !text.contains(" 42\n"),
            "detached family must not be exported: {text}"
        );
        assert!(
            text.contains("soma_observability_metric_conflicts_total{"),
            "{text}"
        );
        assert!(text.contains("} 1\n"), "{text}");
    }

    #[test]
    fn label_type_clash_is_error() {
        let m = MetricsRegistry::default();
        let _ = m.counter_family::<L>("soma_test_lbl", "c");
        let err = m
            .try_counter_family::<Other>("soma_test_lbl", "c")
            .unwrap_err();
        assert!(err.is_conflict());
    }

    #[test]
    fn histogram_buckets_must_match() {
        let m = MetricsRegistry::default();
        let h1 = m.histogram_family::<L>("soma_test_seconds", "h", &[0.1, 1.0]);
        let h2 = m.histogram_family::<L>("soma_test_seconds", "h", &[1.0, 0.1, f64::INFINITY]);
        h1.get_or_create(&l("a")).observe(0.5);
        h2.get_or_create(&l("a")).observe(0.05);
        let text = m.encode();
        assert!(text.contains("soma_test_seconds_count{service=\"unknown_service\",version=\"0.0.0\",env=\"local\",op=\"a\"} 2"), "{text}");
        let err = m
            .try_histogram_family::<L>("soma_test_seconds", "h", &[0.2])
            .unwrap_err();
        assert!(err.is_conflict());
    }

    #[test]
    fn invalid_names_rejected() {
        let m = MetricsRegistry::default();
        for bad in ["", "1abc", "a-b", "__x", "a.b"] {
            let err = m.try_gauge_family::<L>(bad, "x").unwrap_err();
            assert!(err.is_invalid_name(), "{bad}: {err}");
        }
    }
}
