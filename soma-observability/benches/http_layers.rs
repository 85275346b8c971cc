//! HTTP layer overhead, each variant against the same handler without the layer:
//! - `HttpMetricsLayer` (budget: ≤ 1 µs per request);
//! - `TraceLayer` with OTLP/gRPC export at 10% sampling to an in-process
//!   receiver (budget: ≤ 2 µs per request).
//!
//! `cargo bench -p soma-observability --bench http_layers -- --warm-up-time 1 --measurement-time 3`

// `criterion_group!` generates an undocumented function.
#![allow(missing_docs)]

use std::convert::Infallible;
use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group};
use futures_util::FutureExt as _;
use soma_observability::http::{HttpMetricsLayer, RouteTemplate, TraceLayer};
use soma_observability::metrics::MetricsRegistry;
use soma_observability::telemetry::TelemetryBuilder;
use soma_observability::{OtlpProtocol, TelemetryConfig};
use tower::{Layer, Service};

type Req = http::Request<()>;
type Resp = http::Response<&'static str>;

async fn handler(req: Req) -> Result<Resp, Infallible> {
    black_box(req.uri());
    Ok(http::Response::new("ok"))
}

fn request() -> Req {
    http::Request::builder()
        .uri("/v1/sessions/3f1c2a")
        .extension(RouteTemplate::new("/v1/sessions/{id}"))
        .body(())
        .unwrap()
}

/// One request through `svc`; every service here is ready at once and answers
/// without suspending, so the future completes on its first poll.
fn call<S>(svc: &mut S) -> Resp
where
    S: Service<Req, Response = Resp, Error = Infallible>,
{
    svc.call(request())
        .now_or_never()
        .expect("completes at once")
        .unwrap()
}

fn per_call<S>(svc: &mut S, n: u32) -> Duration
where
    S: Service<Req, Response = Resp, Error = Infallible>,
{
    let start = Instant::now();
    for _ in 0..n {
        black_box(call(svc));
    }
    start.elapsed() / n
}

/// Prints overhead (ns per request) and ratio against the bare handler, over
/// interleaved rounds to share any machine noise evenly.
fn summary<S>(label: &str, budget_ns: f64, layered: &mut S)
where
    S: Service<Req, Response = Resp, Error = Infallible>,
{
    let mut bare = tower::service_fn(handler);
    let (mut b, mut l) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..10 {
        b += per_call(&mut bare, 20_000);
        l += per_call(layered, 20_000);
    }
    let (b, l) = (b.as_secs_f64() * 1e8, l.as_secs_f64() * 1e8); // ns (sum of 10 means / 10)
    println!(
        "SUMMARY {label}: bare {b:.0} ns, layered {l:.0} ns, overhead {:.0} ns (budget {budget_ns:.0} ns), ratio {:.2}x",
        l - b,
        l / b
    );
}

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();

    // Telemetry with OTLP/gRPC export at 10% sampling to a real receiver.
    let (addr, spans) = rt.block_on(soma_testkit::otlp::start_grpc_receiver());
    // Drain what arrives so the receiver's store does not grow with the run.
    rt.spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            drop(spans.take());
        }
    });
    // Logs at WARN (the request path logs nothing), spans at INFO.
    let mut config = TelemetryConfig::default();
    config.service_name = "bench".into();
    config.log_filter = "warn".into();
    config.trace_filter = Some("info".into());
    config.otlp_endpoint = Some(format!("http://{addr}"));
    config.otlp_protocol = OtlpProtocol::Grpc;
    config.sampling_ratio = 0.1;
    config.batch_scheduled_delay_ms = 200;
    let guard = {
        let _rt = rt.enter();
        TelemetryBuilder::new(&config)
            .with_writer(std::io::sink)
            .init()
            .unwrap()
    };

    let metrics = MetricsRegistry::default();
    let mut bare = tower::service_fn(handler);
    let mut with_metrics = HttpMetricsLayer::new(&metrics).layer(tower::service_fn(handler));
    let mut with_trace = TraceLayer::new().layer(tower::service_fn(handler));

    // The same plus JSON logs at INFO carrying span fields (to a sink).
    let mut json_config = config.clone();
    json_config.log_filter = "info".into();
    json_config.log_format = soma_observability::LogFormat::Json;
    let (json_dispatch, json_guard) = {
        let _rt = rt.enter();
        TelemetryBuilder::new(&json_config)
            .with_writer(std::io::sink)
            .build()
            .unwrap()
    };
    // Breakdown: the layer with no subscriber, and with a bare registry.
    let no_subscriber = tracing::Dispatch::none();
    let registry_only = tracing::Dispatch::new(tracing_subscriber::registry());

    let mut g = c.benchmark_group("http_layers");
    g.bench_function("bare_handler", |b| b.iter(|| call(&mut bare)));
    g.bench_function("metrics_layer", |b| b.iter(|| call(&mut with_metrics)));
    g.bench_function("trace_layer_otlp_10pct", |b| {
        b.iter(|| call(&mut with_trace))
    });
    for (name, dispatch) in [
        ("trace_layer_otlp_10pct_json_logs", &json_dispatch),
        ("trace_layer_registry_only", &registry_only),
        ("trace_layer_no_subscriber", &no_subscriber),
    ] {
        tracing::dispatcher::with_default(dispatch, || {
            g.bench_function(name, |b| b.iter(|| call(&mut with_trace)));
        });
    }
    g.finish();

    summary("metrics_layer", 1_000.0, &mut with_metrics);
    summary("trace_layer_otlp_10pct", 2_000.0, &mut with_trace);
    tracing::dispatcher::with_default(&json_dispatch, || {
        summary("trace_layer_otlp_10pct_json_logs", 2_000.0, &mut with_trace);
    });
    rt.block_on(json_guard.shutdown_async()).unwrap();
    rt.block_on(guard.shutdown_async()).unwrap();
}

criterion_group!(http_layers, benches);

fn main() {
    http_layers();
    Criterion::default().configure_from_args().final_summary();
}
