//! Metrics registered through soma-observability's `MetricsRegistry`.

use prometheus_client::encoding::EncodeLabelSet;
use soma_observability::metrics::{HistogramFamily, MetricsRegistry};
use soma_observability::prometheus_client::metrics::counter::Counter;
use soma_observability::prometheus_client::metrics::family::Family;
use soma_observability::prometheus_client::metrics::histogram::Histogram;
use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::RwLock;

/// Handles to every soma-policy metric. Cheap to clone; label values are
/// bounded (actions come from the route mapping or the worker's fixed set,
/// results and reasons are fixed strings).
///
/// | metric | labels |
/// |---|---|
/// | `soma_policy_auth_decisions_total` | `action`, `result` (`allow`, `deny`, `error`, `fail_open`) |
/// | `soma_policy_auth_duration_seconds` | `engine` |
/// | `soma_policy_cache_lookups_total` | `result` (`hit`, `miss`) — hit ratio = hit / (hit + miss) |
/// | `soma_policy_authn_failures_total` | `reason` ([`crate::AuthError::code`]) |
/// | `soma_policy_fail_open_total` | `action` |
/// | `soma_policy_reloads_total` | `result` (`ok`, `error`) |
/// | `soma_policy_jwks_fetches_total` | `result` (`ok`, `error`) |
/// | `soma_policy_token_cache_lookups_total` | `result` (`hit`, `miss`) — verified-JWT cache |
#[derive(Clone, Debug)]
pub struct PolicyMetrics {
    decisions: Family<ActionResult, Counter>,
    duration: HistogramFamily<EngineLabel>,
    cache: Family<ResultLabel, Counter>,
    authn_failures: Family<ReasonLabel, Counter>,
    fail_open: Family<ActionLabel, Counter>,
    reloads: Family<ResultLabel, Counter>,
    jwks: Family<ResultLabel, Counter>,
    token_cache: Family<ResultLabel, Counter>,
    hot: Arc<Hot>,
}

/// Handles for the series every request touches, resolved once: a family
/// lookup builds a label set (for `decisions`, an owned action string) and
/// hashes it under a lock on every call.
#[derive(Debug)]
struct Hot {
    cache: [Counter; 2],
    token_cache: [Counter; 2],
    /// `duration` for the engine names this crate uses.
    duration: [(&'static str, Histogram); 4],
    /// `decisions` per action, one counter per result in [`RESULTS`] order.
    decisions: RwLock<HashMap<Box<str>, [Counter; 4]>>,
}

/// The `result` values of `soma_policy_auth_decisions_total`.
const RESULTS: [&str; 4] = ["allow", "deny", "error", "fail_open"];

/// Index of a hit (`0`) or a miss (`1`) in [`Hot`]'s pairs.
fn hit_index(hit: bool) -> usize {
    usize::from(!hit)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionResult {
    action: String,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EngineLabel {
    engine: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionLabel {
    action: String,
}

impl Default for PolicyMetrics {
    /// Metrics on a private registry (for tests and benches).
    fn default() -> Self {
        Self::new(&MetricsRegistry::default())
    }
}

impl From<&MetricsRegistry> for PolicyMetrics {
    /// [`PolicyMetrics::new`]: what `.metrics(&registry)` on the
    /// authenticator, authorizer and embedded engine builds. Handles built
    /// twice on one registry share their series.
    fn from(registry: &MetricsRegistry) -> Self {
        Self::new(registry)
    }
}

impl PolicyMetrics {
    /// Registers (or re-uses) the families on `registry`.
    pub fn new(registry: &MetricsRegistry) -> Self {
        let duration: HistogramFamily<EngineLabel> = registry.histogram_family(
            "soma_policy_auth_duration_seconds",
            "Time to reach an authorization decision, cache lookups included",
            &[
                0.000_01, 0.000_05, 0.000_1, 0.000_5, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0,
            ],
        );
        let cache =
            registry.counter_family("soma_policy_cache_lookups_total", "Decision cache lookups");
        let token_cache = registry.counter_family(
            "soma_policy_token_cache_lookups_total",
            "Verified-JWT cache lookups",
        );
        let pair = |family: &Family<ResultLabel, Counter>| {
            ["hit", "miss"].map(|result| family.get_or_create(&ResultLabel { result }).clone())
        };
        let hot = Hot {
            cache: pair(&cache),
            token_cache: pair(&token_cache),
            duration: ["embedded", "remote", "cache", "router"].map(|engine| {
                let h = duration.get_or_create(&EngineLabel { engine }).clone();
                (engine, h)
            }),
            decisions: RwLock::default(),
        };
        Self {
            hot: Arc::new(hot),
            decisions: registry.counter_family(
                "soma_policy_auth_decisions_total",
                "Authorization decisions",
            ),
            duration,
            cache,
            authn_failures: registry.counter_family(
                "soma_policy_authn_failures_total",
                "Authentication failures by reason",
            ),
            fail_open: registry.counter_family(
                "soma_policy_fail_open_total",
                "Requests let through without a decision because fail_mode = open",
            ),
            reloads: registry
                .counter_family("soma_policy_reloads_total", "Embedded policy reloads"),
            jwks: registry
                .counter_family("soma_policy_jwks_fetches_total", "JWKS document fetches"),
            token_cache,
        }
    }

    pub(crate) fn decision(
        &self,
        action: &str,
        result: &'static str,
        engine: &'static str,
        secs: f64,
    ) {
        let counter = |result| {
            self.decisions
                .get_or_create(&ActionResult {
                    action: action.to_owned(),
                    result,
                })
                .clone()
        };
        match RESULTS.iter().position(|r| *r == result) {
            Some(i) => {
                let known = self.hot.decisions.read().get(action).map(|c| c[i].inc());
                if known.is_none() {
                    // First decision for this action: resolve its four series.
                    let counters = RESULTS.map(counter);
                    counters[i].inc();
                    self.hot.decisions.write().insert(action.into(), counters);
                }
            }
            None => {
                counter(result).inc();
            }
        }
        match self.hot.duration.iter().find(|(e, _)| *e == engine) {
            Some((_, h)) => h.observe(secs),
            None => self
                .duration
                .get_or_create(&EngineLabel { engine })
                .observe(secs),
        }
    }

    pub(crate) fn cache(&self, hit: bool) {
        self.hot.cache[hit_index(hit)].inc();
    }

    pub(crate) fn authn_failure(&self, reason: &'static str) {
        self.authn_failures
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    pub(crate) fn fail_open(&self, action: &str) {
        self.fail_open
            .get_or_create(&ActionLabel {
                action: action.to_owned(),
            })
            .inc();
    }

    #[cfg_attr(not(feature = "rego"), allow(dead_code))]
    pub(crate) fn reload(&self, ok: bool) {
        self.reloads
            .get_or_create(&ResultLabel {
                result: if ok { "ok" } else { "error" },
            })
            .inc();
    }

    pub(crate) fn jwks_fetch(&self, result: &'static str) {
        self.jwks.get_or_create(&ResultLabel { result }).inc();
    }

    pub(crate) fn token_cache(&self, hit: bool) {
        self.hot.token_cache[hit_index(hit)].inc();
    }

    /// Verified-JWT cache hits and misses so far.
    pub fn token_cache_counts(&self) -> (u64, u64) {
        let get = |r| {
            self.token_cache
                .get_or_create(&ResultLabel { result: r })
                .get()
        };
        (get("hit"), get("miss"))
    }

    /// Decision-cache hits and misses so far.
    pub fn cache_counts(&self) -> (u64, u64) {
        let get = |r| self.cache.get_or_create(&ResultLabel { result: r }).get();
        (get("hit"), get("miss"))
    }

    /// Count of decisions for `action` with `result` so far.
    pub fn decisions_count(&self, action: &str, result: &'static str) -> u64 {
        self.decisions
            .get_or_create(&ActionResult {
                action: action.to_owned(),
                result,
            })
            .get()
    }

    /// Count of requests let through in fail-open mode for `action`.
    pub fn fail_open_count(&self, action: &str) -> u64 {
        self.fail_open
            .get_or_create(&ActionLabel {
                action: action.to_owned(),
            })
            .get()
    }

    /// JWKS fetches with `result` (`ok` or `error`) so far.
    pub fn jwks_fetch_count(&self, result: &'static str) -> u64 {
        self.jwks.get_or_create(&ResultLabel { result }).get()
    }

    /// Embedded policy reloads with the given outcome so far.
    pub fn reload_count(&self, ok: bool) -> u64 {
        self.reloads
            .get_or_create(&ResultLabel {
                result: if ok { "ok" } else { "error" },
            })
            .get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolved_handles_count_into_the_registered_series() {
        let registry = MetricsRegistry::default();
        let a = PolicyMetrics::new(&registry);
        // A second set of handles on the same registry shares the series.
        let b = PolicyMetrics::new(&registry);
        a.decision("tool.execute", "allow", "embedded", 0.001);
        a.decision("tool.execute", "allow", "embedded", 0.001);
        b.decision("tool.execute", "deny", "cache", 0.001);
        a.decision("memory.write", "error", "custom-engine", 0.001);
        a.decision("memory.write", "not-a-result", "remote", 0.001);
        assert_eq!(b.decisions_count("tool.execute", "allow"), 2);
        assert_eq!(a.decisions_count("tool.execute", "deny"), 1);
        assert_eq!(a.decisions_count("memory.write", "error"), 1);
        assert_eq!(a.decisions_count("memory.write", "not-a-result"), 1);
        assert_eq!(a.decisions_count("memory.write", "allow"), 0);
        a.cache(true);
        b.cache(false);
        b.cache(false);
        a.token_cache(false);
        assert_eq!(b.cache_counts(), (1, 2));
        assert_eq!(b.token_cache_counts(), (0, 1));
        let text = registry.encode();
        for (engine, n) in [
            ("embedded", 2),
            ("cache", 1),
            ("custom-engine", 1),
            ("remote", 1),
        ] {
            let count = text
                .lines()
                .find(|l| {
                    l.starts_with("soma_policy_auth_duration_seconds_count{")
                        && l.contains(&format!("engine=\"{engine}\""))
                })
                .and_then(|l| l.rsplit(' ').next())
                .unwrap_or_else(|| panic!("no duration series for {engine} in\n{text}"));
            assert_eq!(count, n.to_string(), "{engine}");
        }
    }
}
