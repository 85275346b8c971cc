//! Metric hot paths:
//! - a counter increment on a resolved family (budget ≤ 5 ns), next to the
//!   lookup-then-increment path for comparison;
//! - encoding 10,000 series (budget ≤ 10 ms).
//!
//! `cargo bench -p soma-observability --bench metrics -- --warm-up-time 1 --measurement-time 3`

// `criterion_group!` generates an undocumented function.
#![allow(missing_docs)]

use std::hint::black_box;
use std::time::Instant;

use criterion::{Criterion, criterion_group};
use soma_observability::metrics::MetricsRegistry;
use soma_observability::prometheus_client::encoding::EncodeLabelSet;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Labels {
    topic: String,
    outcome: &'static str,
}

fn registry_with_series(n: usize) -> MetricsRegistry {
    let m = MetricsRegistry::default();
    let counters = m.counter_family::<Labels>("soma_bench_messages_total", "Messages");
    let histos =
        m.histogram_family::<Labels>("soma_bench_latency_seconds", "Latency", &[0.01, 0.1, 1.0]);
    // `n` series in all (one series = one sample line): 70% counter series, and
    // histograms for the rest, each 6 series (4 buckets incl. +Inf, sum, count).
    let histograms = n * 3 / 10 / 6;
    for i in 0..n - histograms * 6 {
        counters
            .get_or_create(&Labels {
                topic: format!("topic-{i}"),
                outcome: "ok",
            })
            .inc_by(i as u64);
    }
    for i in 0..histograms {
        histos
            .get_or_create(&Labels {
                topic: format!("topic-{i}"),
                outcome: "ok",
            })
            .observe(0.05);
    }
    m
}

fn benches(c: &mut Criterion) {
    let m = MetricsRegistry::default();
    let family = m.counter_family::<Labels>("soma_bench_ops_total", "Ops");
    let labels = Labels {
        topic: "orders".into(),
        outcome: "ok",
    };
    let counter = family.get_or_create(&labels).clone();

    let mut g = c.benchmark_group("metrics");
    g.bench_function("counter_inc_resolved", |b| {
        b.iter(|| black_box(&counter).inc())
    });
    g.bench_function("counter_get_or_create_inc", |b| {
        b.iter(|| family.get_or_create(black_box(&labels)).inc())
    });
    let big = registry_with_series(10_000);
    g.bench_function("encode_10k_series", |b| b.iter(|| black_box(big.encode())));
    g.finish();

    let n = 50_000_000u32;
    let start = Instant::now();
    for _ in 0..n {
        black_box(&counter).inc();
    }
    println!(
        "SUMMARY counter_inc_resolved: {:.2} ns per increment (budget 5 ns)",
        start.elapsed().as_secs_f64() * 1e9 / f64::from(n)
    );
    let start = Instant::now();
    let text = big.encode();
    println!(
        "SUMMARY encode_10k_series: {:.2} ms for {} series, {} bytes (budget 10 ms)",
        start.elapsed().as_secs_f64() * 1e3,
        text.lines().filter(|l| !l.starts_with('#')).count(),
        text.len()
    );
}

criterion_group!(metrics, benches);

fn main() {
    metrics();
    Criterion::default().configure_from_args().final_summary();
}
