//! The crate rows: the existing criterion benches, each "ours" paired with
//! the baseline the same bench measured in the same run, read from
//! criterion's `target/criterion/**/new/{benchmark,estimates}.json`.

use std::collections::HashMap;
use std::fs;
use std::path::Path;

use serde_json::Value;

use super::table::{Goal, Row};

/// How a criterion median (ns per iteration) is shown.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Show {
    /// Time per iteration in this unit (`ns`, `µs`, `ms`).
    Time(&'static str),
    /// Elements per second, `n` elements per iteration.
    Rate(u64, &'static str),
}

impl Show {
    /// The figure from a median in nanoseconds per iteration.
    pub(crate) fn figure(self, ns: f64) -> f64 {
        match self {
            Show::Time("ns") => ns,
            Show::Time("µs") => ns / 1e3,
            Show::Time(_) => ns / 1e6,
            Show::Rate(n, _) => n as f64 / (ns / 1e9),
        }
    }

    fn unit(self) -> &'static str {
        match self {
            Show::Time(u) | Show::Rate(_, u) => u,
        }
    }
}

/// One row: criterion ids of ours and of the baseline (`full_id` as
/// criterion writes it in `benchmark.json`).
pub(crate) struct Pair {
    pub(crate) what: &'static str,
    pub(crate) ours: &'static str,
    pub(crate) baseline: Option<(&'static str, &'static str)>,
    pub(crate) show: Show,
    pub(crate) goal: Goal,
}

/// One `cargo bench -p <package> --bench <bench>` and its rows.
pub(crate) struct Bench {
    pub(crate) group: &'static str,
    pub(crate) package: &'static str,
    pub(crate) bench: &'static str,
    pub(crate) pairs: Vec<Pair>,
}

const fn pair(
    what: &'static str,
    ours: &'static str,
    baseline: Option<(&'static str, &'static str)>,
    show: Show,
    goal: Goal,
) -> Pair {
    Pair {
        what,
        ours,
        baseline,
        show,
        goal,
    }
}

/// Every crate bench with the goals its crate's README states, in the
/// order the table shows them.
pub(crate) fn benches() -> Vec<Bench> {
    vec![
        bus_throughput(),
        bus_relay(),
        outbox(),
        policy(),
        redis(),
        somabrain_resilience(),
        memory_recall(),
        config_live(),
        observability_http_layers(),
        observability_metrics(),
    ]
}

/// `soma-bus`'s `throughput` bench.
fn bus_throughput() -> Bench {
    use Show::*;
    Bench {
        group: "bus",
        package: "soma-bus",
        bench: "throughput",
        pairs: vec![
            pair(
                "durable publisher, Kafka up (1 KiB keyed, batches of 1,000)",
                "publish_1KiB_keyed/durable_publisher_kafka_up/1000",
                Some(("raw rdkafka", "publish_1KiB_keyed/raw_rdkafka/1000")),
                Rate(1_000, "msg/s"),
                Goal::RatioAtLeast(0.85),
            ),
            pair(
                "durable publisher, broker down (outbox)",
                "publish_1KiB_keyed/durable_publisher_broker_down_outbox/1000",
                None,
                Rate(1_000, "msg/s"),
                Goal::AtLeast(10_000.0),
            ),
            pair(
                "BusConsumer, no-op handler",
                "consume_noop/bus_consumer/2000",
                None,
                Rate(2_000, "msg/s"),
                Goal::AtLeast(50_000.0),
            ),
        ],
    }
}

/// `soma-bus`'s `relay` bench.
fn bus_relay() -> Bench {
    use Show::*;
    Bench {
        group: "bus",
        package: "soma-bus",
        bench: "relay",
        pairs: vec![pair(
            "outbox relay into Kafka (batch 500)",
            "relay_vs_raw_1KiB_keyed/relay_kafka_sink_batch500/5000",
            Some((
                "raw rdkafka",
                "relay_vs_raw_1KiB_keyed/raw_rdkafka_future_producer/5000",
            )),
            Rate(5_000, "msg/s"),
            Goal::RatioAtLeast(0.8),
        )],
    }
}

/// `soma-outbox`'s `outbox` bench.
fn outbox() -> Bench {
    use Show::*;
    Bench {
        group: "outbox",
        package: "soma-outbox",
        bench: "outbox",
        pairs: vec![pair(
            "outbox enqueue, UNNEST (1,000 rows)",
            "enqueue_1000_rows/unnest",
            Some(("multi-row VALUES", "enqueue_1000_rows/multi_row_values")),
            Rate(1_000, "rows/s"),
            Goal::AtLeast(30_000.0),
        )],
    }
}

/// `soma-policy`'s `policy` bench.
fn policy() -> Bench {
    use Show::*;
    Bench {
        group: "policy",
        package: "soma-policy",
        bench: "policy",
        pairs: vec![
            pair(
                "embedded decision (reference policy)",
                "decision/embedded",
                Some(("remote OPA, loopback", "decision/remote_opa_loopback")),
                Time("µs"),
                Goal::AtMost(15.0),
            ),
            pair(
                "decision-cache hit",
                "cache/authorizer_check_hit",
                None,
                Time("µs"),
                Goal::AtMost(1.0),
            ),
            pair(
                "HS256 token validation",
                "jwt/HS256",
                None,
                Time("µs"),
                Goal::AtMost(5.0),
            ),
            pair(
                "authn + authz + handler over HTTP, 16 in flight",
                "stack/authn_authz_handler_http_c16",
                Some(("bare handler", "stack/bare_handler_http_c16")),
                Time("µs"),
                Goal::None,
            ),
        ],
    }
}

/// `soma-redis`'s `redis` bench.
fn redis() -> Bench {
    use Show::*;
    Bench {
        group: "redis",
        package: "soma-redis",
        bench: "redis",
        pairs: vec![
            pair(
                "cache hit",
                "single/cache_hit",
                Some(("raw fred GET", "single/raw_fred_get")),
                Time("µs"),
                Goal::None,
            ),
            pair(
                "rate-limit check",
                "single/rate_limit_check",
                Some(("raw fred GET", "single/raw_fred_get")),
                Time("µs"),
                Goal::None,
            ),
        ],
    }
}

/// `soma-somabrain`'s `resilience` bench.
fn somabrain_resilience() -> Bench {
    use Show::*;
    Bench {
        group: "somabrain",
        package: "soma-somabrain",
        bench: "resilience",
        pairs: vec![
            pair(
                "recall through SomabrainClient",
                "recall/somabrain_client",
                Some(("bare reqwest", "recall/bare_reqwest")),
                Time("µs"),
                Goal::OverheadAtMost(2.0),
            ),
            pair(
                "call rejected by the open breaker",
                "breaker_open/rejected_call",
                None,
                Time("µs"),
                Goal::AtMost(1.0),
            ),
        ],
    }
}

/// `soma-memory-service`'s `recall` bench.
fn memory_recall() -> Bench {
    use Show::*;
    Bench {
        group: "memory",
        package: "soma-memory-service",
        bench: "recall",
        pairs: vec![
            pair(
                "local memory service: recall over a 10,000-memory scope (hybrid, window 256)",
                "recall_10k/hybrid_window_256",
                Some((
                    "trigram, unbounded (before the window)",
                    "recall_10k/trigram_unbounded",
                )),
                Time("ms"),
                Goal::RatioAtMost(0.05),
            ),
            pair(
                "local memory service: recall window 256 (default) against 1,000",
                "recall_10k/hybrid_window_256",
                Some(("hybrid, window 1,000", "recall_10k/hybrid_window_1000")),
                Time("ms"),
                Goal::RatioAtMost(0.5),
            ),
        ],
    }
}

/// `soma-config`'s `live` bench.
fn config_live() -> Bench {
    use Show::*;
    Bench {
        group: "config",
        package: "soma-config",
        bench: "live",
        pairs: vec![
            pair(
                "Live::load() + field",
                "read/live_load",
                None,
                Time("ns"),
                Goal::AtMost(50.0),
            ),
            pair(
                "Reader::load() with a writer",
                "contended/reader_load_with_writer",
                Some(("RwLock read", "contended/rwlock_read_with_writer")),
                Time("ns"),
                Goal::RatioAtMost(0.1),
            ),
        ],
    }
}

/// `soma-observability`'s `http_layers` bench.
fn observability_http_layers() -> Bench {
    use Show::*;
    Bench {
        group: "observability",
        package: "soma-observability",
        bench: "http_layers",
        pairs: vec![
            pair(
                "HTTP metrics layer, per request",
                "http_layers/metrics_layer",
                Some(("bare handler", "http_layers/bare_handler")),
                Time("µs"),
                Goal::OverheadAtMost(1.0),
            ),
            pair(
                "tracing + OTLP at 10 % sampling, per request",
                "http_layers/trace_layer_otlp_10pct",
                Some(("bare handler", "http_layers/bare_handler")),
                Time("µs"),
                Goal::OverheadAtMost(2.0),
            ),
        ],
    }
}

/// `soma-observability`'s `metrics` bench.
fn observability_metrics() -> Bench {
    use Show::*;
    Bench {
        group: "observability",
        package: "soma-observability",
        bench: "metrics",
        pairs: vec![
            pair(
                "counter increment, resolved family",
                "metrics/counter_inc_resolved",
                None,
                Time("ns"),
                Goal::AtMost(5.0),
            ),
            pair(
                "encode 10,000 series",
                "metrics/encode_10k_series",
                None,
                Time("ms"),
                Goal::AtMost(10.0),
            ),
        ],
    }
}

/// criterion's `full_id` → median ns per iteration, for every
/// `new/benchmark.json` under `dir`.
pub(crate) fn read_estimates(dir: &Path) -> HashMap<String, f64> {
    let mut out = HashMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if !p.is_dir() {
                continue;
            }
            if p.file_name().is_some_and(|n| n == "new") {
                if let Some((id, ns)) = read_one(&p) {
                    out.insert(id, ns);
                }
            } else {
                stack.push(p);
            }
        }
    }
    out
}

fn read_one(new: &Path) -> Option<(String, f64)> {
    let b: Value =
        serde_json::from_str(&fs::read_to_string(new.join("benchmark.json")).ok()?).ok()?;
    let e: Value =
        serde_json::from_str(&fs::read_to_string(new.join("estimates.json")).ok()?).ok()?;
    Some((
        b["full_id"].as_str()?.to_owned(),
        e["median"]["point_estimate"].as_f64()?,
    ))
}

/// The rows of `bench` from the estimates read.
pub(crate) fn rows(bench: &Bench, estimates: &HashMap<String, f64>) -> Vec<Row> {
    bench
        .pairs
        .iter()
        .map(|p| {
            let fig = |id: &str| estimates.get(id).map(|ns| p.show.figure(*ns));
            let mut r = Row::new(bench.group, p.what, p.show.unit())
                .ours(fig(p.ours))
                .goal(p.goal);
            if let Some((name, id)) = p.baseline {
                r = r.baseline(name, fig(id));
            }
            r
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn criterion_output_is_read_and_paired() {
        let dir = std::env::temp_dir().join(format!("soma-bench-crit-{}", std::process::id()));
        let write = |path: &str, id: &str, median_ns: f64| {
            let new = dir.join(path).join("new");
            fs::create_dir_all(&new).unwrap();
            fs::write(
                new.join("benchmark.json"),
                serde_json::json!({ "full_id": id }).to_string(),
            )
            .unwrap();
            fs::write(
                new.join("estimates.json"),
                serde_json::json!({ "median": { "point_estimate": median_ns } }).to_string(),
            )
            .unwrap();
        };
        write("g/ours", "g/ours/1000", 2e6); // 1,000 msgs in 2 ms
        write("g/raw", "g/raw/1000", 1e6);
        // `base` holds the previous run: never read.
        fs::create_dir_all(dir.join("g/raw/base")).unwrap();
        let est = read_estimates(&dir);
        assert_eq!(est.len(), 2);
        let bench = Bench {
            group: "bus",
            package: "p",
            bench: "b",
            pairs: vec![
                pair(
                    "publish",
                    "g/ours/1000",
                    Some(("raw", "g/raw/1000")),
                    Show::Rate(1_000, "msg/s"),
                    Goal::RatioAtLeast(0.85),
                ),
                pair(
                    "missing",
                    "g/none",
                    None,
                    Show::Time("µs"),
                    Goal::AtMost(1.0),
                ),
            ],
        };
        let rows = rows(&bench, &est);
        assert_eq!(rows[0].ours, Some(500_000.0));
        assert_eq!(rows[0].baseline, Some(1_000_000.0));
        assert_eq!(rows[0].met(), Some(false));
        assert_eq!(rows[1].ours, None);
        assert_eq!(rows[1].met(), None);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn times_convert_to_their_unit() {
        assert_eq!(Show::Time("ns").figure(1_500.0), 1_500.0);
        assert_eq!(Show::Time("µs").figure(1_500.0), 1.5);
        assert_eq!(Show::Time("ms").figure(1_500_000.0), 1.5);
        assert_eq!(Show::Rate(2_000, "msg/s").figure(1e9), 2_000.0);
    }
}
