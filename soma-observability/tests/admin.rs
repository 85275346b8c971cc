//! The admin router over real HTTP: health transitions, a hung check never
//! delaying `/ready`, and `/metrics` checked by `promtool check metrics`.

use std::time::{Duration, Instant};

use axum::routing::get;
use soma_observability::admin::admin_router;
use soma_observability::health::{
    CheckOptions, CheckOutcome, ComponentStatus, Criticality, HealthRegistry, check_fn,
};
use soma_observability::http::{HttpMetricsLayer, TraceLayer};
use soma_observability::metrics::{ConstLabels, MetricsRegistry};
use soma_observability::prometheus_client::encoding::EncodeLabelSet;

async fn get_json(url: &str) -> (u16, serde_json::Value) {
    let resp = reqwest::get(url).await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

#[tokio::test]
async fn health_transitions_over_http() {
    let health = HealthRegistry::new();
    let addr = soma_testkit::serve(admin_router(MetricsRegistry::default(), health.clone())).await;
    let base = format!("http://{addr}");
    let db = health.reporter("postgres", Criticality::Required);
    let cache = health.reporter("redis_cache", Criticality::Optional);

    // Registered, nothing reported: not ready, required is down.
    let (status, body) = get_json(&format!("{base}/ready")).await;
    assert_eq!(status, 503);
    assert_eq!(body["failing"], serde_json::json!(["postgres"]));
    assert_eq!(
        get_json(&format!("{base}/live")).await.0,
        200,
        "live is the process only"
    );

    db.set_up();
    cache.set_up();
    db.set_gauge("replica_lag_seconds", 0.25);
    let (status, body) = get_json(&format!("{base}/v1/health")).await;
    assert_eq!((status, body["status"].as_str()), (200, Some("ok")));
    assert_eq!(
        body["components"]["postgres"]["gauges"]["replica_lag_seconds"],
        0.25
    );
    assert_eq!(get_json(&format!("{base}/ready")).await.0, 200);

    // Required down → 503 on both, naming it.
    db.set_down("connection refused");
    let (status, body) = get_json(&format!("{base}/ready")).await;
    assert_eq!(status, 503);
    assert_eq!(body["failing"], serde_json::json!(["postgres"]));
    let (status, body) = get_json(&format!("{base}/v1/health")).await;
    assert_eq!((status, body["status"].as_str()), (503, Some("down")));
    assert_eq!(
        body["components"]["postgres"]["reason"],
        "connection refused"
    );
    assert_eq!(body["components"]["postgres"]["criticality"], "required");

    // Recovery of the required one, optional down → degraded, still 200 and ready.
    db.set_up();
    cache.set_down("timeout");
    let (status, body) = get_json(&format!("{base}/v1/health")).await;
    assert_eq!((status, body["status"].as_str()), (200, Some("degraded")));
    assert_eq!(body["components"]["redis_cache"]["status"], "down");
    assert_eq!(get_json(&format!("{base}/ready")).await.0, 200);

    // Full recovery → ok.
    cache.set_up();
    let (status, body) = get_json(&format!("{base}/v1/health")).await;
    assert_eq!((status, body["status"].as_str()), (200, Some("ok")));
    assert!(body["components"]["redis_cache"].get("reason").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_check_never_delays_ready() {
    let health = HealthRegistry::new();
    let timeout = Duration::from_millis(3000);
    health.register_check(
        "somabrain",
        Criticality::Required,
        check_fn(|| async {
            // Never completes: a dependency that accepts and never answers.
            std::future::pending::<()>().await;
            CheckOutcome::up()
        }),
        CheckOptions::new(Duration::from_secs(60), timeout),
    );
    let addr = soma_testkit::serve(admin_router(MetricsRegistry::default(), health.clone())).await;
    let client = reqwest::Client::new();

    // While the check hangs, /ready answers from cached state at once.
    let started = Instant::now();
    let resp = client
        .get(format!("http://{addr}/ready"))
        .send()
        .await
        .unwrap();
    let waited = started.elapsed();
    assert_eq!(resp.status(), 503);
    assert!(
        waited < timeout,
        "/ready waited {waited:?} on a hung check (timeout {timeout:?})"
    );

    // At the timeout, the component is marked down with the reason.
    let mut rx = health.subscribe();
    let report = tokio::time::timeout(
        timeout * 4,
        rx.wait_for(|r| {
            r.components["somabrain"]
                .reason
                .as_deref()
                .is_some_and(|m| m.contains("timed out"))
        }),
    )
    .await
    .expect("hung check was not marked down after its timeout")
    .unwrap()
    .clone();
    let c = &report.components["somabrain"];
    assert_eq!(c.status, ComponentStatus::Down);
    assert!(c.check_latency_ms.unwrap() >= timeout.as_millis() as f64 - 1.0);
    let resp = client
        .get(format!("http://{addr}/v1/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert!(
        body["components"]["somabrain"]["reason"]
            .as_str()
            .unwrap()
            .contains("timed out")
    );
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueLabels {
    queue: String,
}

#[tokio::test]
async fn metrics_endpoint_passes_promtool_and_labels_by_route_template() {
    let metrics = MetricsRegistry::new(ConstLabels::new("gateway", "1.2.3", "ci"));
    let health = HealthRegistry::new();
    // Application routes with the layers, admin routes merged in.
    let app = axum::Router::new()
        .route("/v1/sessions/{id}", get(|| async { "session" }))
        .route(
            "/boom",
            get(|| async { (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "x") }),
        )
        // Set before the layers so unmatched requests are counted too.
        .fallback(|| async { axum::http::StatusCode::NOT_FOUND })
        .layer(HttpMetricsLayer::new(&metrics))
        .layer(TraceLayer::new())
        .merge(admin_router(metrics.clone(), health));
    // A second layer instance (e.g. a second router) shares the families.
    let _again = HttpMetricsLayer::new(&metrics);
    // Other crates' families.
    let depth = metrics.gauge_family::<QueueLabels>("soma_bus_dlq_depth_messages", "DLQ depth");
    depth
        .get_or_create(&QueueLabels {
            queue: "orders \"eu\"\n".into(),
        })
        .set(3);
    metrics
        .counter_family::<QueueLabels>("soma_bus_messages_published_total", "Published")
        .get_or_create(&QueueLabels {
            queue: "orders".into(),
        })
        .inc_by(5);

    let addr = soma_testkit::serve(app).await;
    for path in ["/v1/sessions/a1", "/v1/sessions/b2", "/boom", "/nope/123"] {
        reqwest::get(format!("http://{addr}{path}")).await.unwrap();
    }
    let resp = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap();
    assert_eq!(
        resp.headers()["content-type"],
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    let text = resp.text().await.unwrap();

    let c = r#"service="gateway",version="1.2.3",env="ci""#;
    let expect = [
        format!(
            r#"soma_http_server_requests_total{{{c},method="GET",route="/v1/sessions/{{id}}",status="200"}} 2"#
        ),
        format!(
            r#"soma_http_server_requests_total{{{c},method="GET",route="/boom",status="500"}} 1"#
        ),
        format!(
            r#"soma_http_server_requests_total{{{c},method="GET",route="unmatched",status="404"}} 1"#
        ),
        format!(
            r#"soma_http_server_request_duration_seconds_count{{{c},method="GET",route="/v1/sessions/{{id}}",status="200"}} 2"#
        ),
        format!(
            r#"soma_http_server_requests_in_flight{{{c},method="GET",route="/v1/sessions/{{id}}"}} 0"#
        ),
        format!(r#"soma_bus_messages_published_total{{{c},queue="orders"}} 5"#),
    ];
    for line in &expect {
        assert!(text.contains(line.as_str()), "missing `{line}` in:\n{text}");
    }
    assert!(
        !text.contains("/v1/sessions/a1"),
        "raw path used as a label:\n{text}"
    );
    assert_eq!(
        text.matches("# TYPE soma_http_server_requests counter")
            .count(),
        1
    );
    assert!(text.ends_with("# EOF\n"));

    openmetrics_parse(&text);

    // The Prometheus text variant, for scrapers that ask for it, linted by promtool.
    let resp = reqwest::Client::new()
        .get(format!("http://{addr}/metrics"))
        .header("accept", "text/plain;version=0.0.4")
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let prom = resp.text().await.unwrap();
    assert!(
        prom.contains("# TYPE soma_http_server_requests_total counter"),
        "{prom}"
    );
    assert!(prom.contains(&expect[0]), "{prom}");
    promtool_check(&prom);
}

/// Parses `text` with the strict OpenMetrics parser of the Python
/// `prometheus_client` (Debian's python3-prometheus-client) and checks the
/// families it found.
fn openmetrics_parse(text: &str) {
    use std::io::Write as _;
    const SCRIPT: &str = r#"
import sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
families = list(text_string_to_metric_families(sys.stdin.read()))
for f in families:
    for s in f.samples:
        assert s.labels["service"] == "gateway" and s.labels["env"] == "ci", s
print("\n".join(sorted(f"{f.name} {f.type} {len(f.samples)}" for f in families)))
"#;
    let mut child = match std::process::Command::new("/usr/bin/python3")
        .args(["-c", SCRIPT])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    {
        Ok(child) => child,
        Err(err) => panic!(
            "/usr/bin/python3 with python3-prometheus-client is required ({err}); install it with \
             `cargo xtask stack up` or `bash xtask/stack.d/50-metrics-parsers.sh`"
        ),
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "OpenMetrics parser rejected /metrics (if it says No module named prometheus_client, run \
         `bash xtask/stack.d/50-metrics-parsers.sh`):\n{}\n--- input ---\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    for family in [
        "soma_http_server_requests counter 3",
        "soma_http_server_request_duration_seconds histogram",
        "soma_http_server_requests_in_flight gauge",
        "soma_bus_dlq_depth_messages gauge 1",
        "soma_bus_messages_published counter 1",
    ] {
        assert!(
            stdout.contains(family),
            "parser did not report `{family}`:\n{stdout}"
        );
    }
}

/// Runs `promtool check metrics` (Debian's `prometheus` package) on `text`.
fn promtool_check(text: &str) {
    use std::io::Write as _;
    let mut child = match std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    {
        Ok(child) => child,
        Err(err) => panic!(
            "promtool is required for this test and could not be run ({err}); install it with \
             `cargo xtask stack up` or `bash xtask/stack.d/50-metrics-parsers.sh`"
        ),
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\n--- input ---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
