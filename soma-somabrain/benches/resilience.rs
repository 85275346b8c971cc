//! What the resilience wrapper costs.
//!
//! - `recall/bare_reqwest`: a reqwest call to a local server with the same
//!   URL, headers and body as the client sends, and the same JSON decode.
//! - `recall/somabrain_client`: the same call through `SomabrainClient`
//!   (breaker, retry loop, deadline, request id, span, metrics).
//! - `breaker_open/rejected_call`: a call refused by the open breaker.
//!
//! After criterion, an interleaved run of both recall variants prints the
//! per-call difference and ratio (same server, same run).
//!
//! `cargo bench -p soma-somabrain --bench resilience -- --warm-up-time 1 --measurement-time 3`

use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::post;
use criterion::Criterion;
use soma_observability::metrics::MetricsRegistry;
use soma_somabrain::{
    CallOptions, RecallRequest, RecallResponse, SomabrainClient, SomabrainConfig,
};

const TOKEN: &str = "bench-token";

fn recall_body() -> serde_json::Value {
    serde_json::json!({
        "tenant": "acme", "namespace": "agent",
        "results": [{"content": {"text": "The user prefers window seats.", "key": "k1", "namespace": "agent"}, "layer": "wm", "score": 1.0}],
        "wm_hits": 1, "ltm_hits": 0, "duration_ms": 0.1, "total_results": 1, "degraded": false, "degraded_reasons": []
    })
}

struct Setup {
    url: String,
    client: SomabrainClient,
    bare: reqwest::Client,
    open: SomabrainClient,
    _server: tokio::task::JoinHandle<()>,
}

async fn setup() -> Setup {
    let body = recall_body().to_string();
    let app = Router::new().route(
        "/memory/recall",
        post(move || {
            let body = body.clone();
            async move { ([("content-type", "application/json; charset=utf-8")], body) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let url = format!("http://{addr}");
    let mut cfg = SomabrainConfig::new(url.clone()).with_token(TOKEN);
    cfg.default_tenant = "acme".into();
    cfg.default_namespace = "agent".into();
    let client = SomabrainClient::builder(cfg.clone())
        .metrics(&MetricsRegistry::default())
        .build()
        .unwrap();
    let bare = reqwest::Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
        .build()
        .unwrap();

    // A client whose breaker is open: one failed call against a closed port.
    let mut open_cfg = cfg;
    open_cfg.base_url = format!("http://127.0.0.1:{}", soma_testkit::free_port());
    open_cfg.breaker.failure_threshold = 1;
    open_cfg.breaker.open_ms = 3_600_000;
    open_cfg.retry.max_retries = 0;
    let open = SomabrainClient::builder(open_cfg)
        .metrics(&MetricsRegistry::default())
        .build()
        .unwrap();
    let _ = open
        .recall(&RecallRequest::new("x"), CallOptions::new())
        .await;
    assert!(
        open.recall(&RecallRequest::new("x"), CallOptions::new())
            .await
            .unwrap_err()
            .is_circuit_open()
    );

    Setup {
        url,
        client,
        bare,
        open,
        _server: server,
    }
}

async fn bare_call(s: &Setup, req: &RecallRequest) -> RecallResponse {
    #[derive(serde::Serialize)]
    struct Body<'a> {
        #[serde(flatten)]
        body: &'a RecallRequest,
        namespace: &'a str,
    }
    let bytes = serde_json::to_vec(&Body {
        body: req,
        namespace: "agent",
    })
    .unwrap();
    let resp = s
        .bare
        .post(format!("{}/memory/recall", s.url))
        .timeout(Duration::from_secs(2))
        .header("authorization", format!("Bearer {TOKEN}"))
        .header("x-tenant-id", "acme")
        .header("x-namespace", "agent")
        .header("x-request-id", "bench")
        .header("content-type", "application/json")
        .body(bytes)
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success());
    serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap()
}

async fn client_call(s: &Setup, req: &RecallRequest) -> RecallResponse {
    s.client.recall(req, CallOptions::new()).await.unwrap()
}

fn benches(c: &mut Criterion) {
    // One thread runs the server and the client: no cross-thread wake-ups,
    // so the two variants differ only by the work the wrapper does.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let s = rt.block_on(setup());
    let req = RecallRequest::new("window seats").top_k(5);

    criterion_groups(c, &rt, &s, &req);
    let (b, w, d, cpu) = paired_rounds(&rt, &s, &req);
    let t = Instant::now();
    let n = 100_000;
    for _ in 0..n {
        let _ = futures::executor::block_on(s.open.recall(&req, CallOptions::new()));
    }
    let open = t.elapsed().as_secs_f64() / f64::from(n);
    println!(
        "\nsummary: bare reqwest {:.2} µs/call, SomabrainClient {:.2} µs/call, paired overhead {:+.2} µs/call ({:.3}x); breaker-open rejection {:.3} µs/call",
        b * 1e6,
        w * 1e6,
        d * 1e6,
        (b + d) / b,
        open * 1e6
    );
    if let Some(cpu) = cpu {
        println!(
            "summary: paired CPU-time overhead of the wrapper {:+.2} µs/call",
            cpu * 1e6
        );
    }
}

/// Paired comparison in the same run: rounds of 100 calls of each
/// variant, alternating which goes first (ABBA), so both see the same
/// machine load; the overhead is the median of the per-round differences.
/// Wall time is dominated by scheduling noise on a loaded machine, so
/// each round also records the process's CPU time (Linux schedstat):
/// both variants run the same server code on the same thread, so the
/// CPU difference is the client-side work the wrapper adds.
///
/// Returns the medians, in seconds per call, of the bare variant, the
/// wrapped one, their difference, and their difference in CPU time (`None`
/// without Linux schedstat).
fn paired_rounds(
    rt: &tokio::runtime::Runtime,
    s: &Setup,
    req: &RecallRequest,
) -> (f64, f64, f64, Option<f64>) {
    let (mut bare, mut wrapped, mut diffs, mut cpu_diffs) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let round = |wrapped: bool| async move {
        let (t, c) = (Instant::now(), cpu_ns());
        for _ in 0..100 {
            if wrapped {
                client_call(s, req).await;
            } else {
                bare_call(s, req).await;
            }
        }
        let cpu = cpu_ns().zip(c).map(|(a, b)| (a - b) as f64 / 1e9 / 100.0);
        (t.elapsed().as_secs_f64() / 100.0, cpu)
    };
    rt.block_on(async {
        for _ in 0..200 {
            client_call(s, req).await;
            bare_call(s, req).await;
        }
        for i in 0..100 {
            let (b, w) = if i % 2 == 0 {
                let b = round(false).await;
                (b, round(true).await)
            } else {
                let w = round(true).await;
                (round(false).await, w)
            };
            bare.push(b.0);
            wrapped.push(w.0);
            diffs.push(w.0 - b.0);
            if let (Some(bc), Some(wc)) = (b.1, w.1) {
                cpu_diffs.push(wc - bc);
            }
        }
    });
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (b, w, d) = (median(&mut bare), median(&mut wrapped), median(&mut diffs));
    let cpu = (!cpu_diffs.is_empty()).then(|| median(&mut cpu_diffs));
    (b, w, d, cpu)
}

/// The criterion groups: a recall through bare reqwest and through the
/// client, and a call the open breaker rejects.
fn criterion_groups(
    c: &mut Criterion,
    rt: &tokio::runtime::Runtime,
    s: &Setup,
    req: &RecallRequest,
) {
    let mut g = c.benchmark_group("recall");
    g.bench_function("bare_reqwest", |b| {
        b.to_async(rt).iter(|| bare_call(s, req))
    });
    g.bench_function("somabrain_client", |b| {
        b.to_async(rt).iter(|| client_call(s, req))
    });
    g.finish();

    let mut g = c.benchmark_group("breaker_open");
    g.bench_function("rejected_call", |b| {
        b.iter(|| {
            let e =
                futures::executor::block_on(s.open.recall(req, CallOptions::new())).unwrap_err();
            assert!(e.is_circuit_open());
            e
        })
    });
    g.finish();
}

/// CPU time of every thread of this process, in ns (Linux `schedstat`).
fn cpu_ns() -> Option<u64> {
    let mut total = 0;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let stat = std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok()?;
        total += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(total)
}

/// Runs the benchmarks with criterion's command-line configuration.
fn resilience() {
    let mut c = Criterion::default().configure_from_args();
    benches(&mut c);
}

fn main() {
    resilience();
    Criterion::default().configure_from_args().final_summary();
}
