//! The telemetry guard's shutdown respects its deadline even when the
//! collector hangs (fault injection: a listener that accepts and never answers).

use std::time::{Duration, Instant};

use soma_observability::telemetry::TelemetryBuilder;
use soma_observability::{OtlpProtocol, TelemetryConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_returns_within_deadline_when_collector_hangs() {
    // Accepts TCP connections (kernel backlog) and never speaks.
    let hung = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = hung.local_addr().unwrap();
    let deadline = Duration::from_millis(1000);
    let mut config = TelemetryConfig::default();
    config.otlp_endpoint = Some(format!("http://{addr}"));
    config.otlp_protocol = OtlpProtocol::Grpc;
    config.otlp_timeout_ms = 30_000;
    config.batch_scheduled_delay_ms = 50;
    config.shutdown_timeout_ms = deadline.as_millis() as u64;
    let (dispatch, guard) = TelemetryBuilder::new(&config)
        .with_writer(std::io::sink)
        .build()
        .unwrap();
    tracing::dispatcher::with_default(&dispatch, || {
        for i in 0..10 {
            tracing::info_span!("work", i).in_scope(|| {});
        }
    });
    // Let the exporter start its (hanging) export.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let started = Instant::now();
    let result = guard.shutdown_async().await;
    let took = started.elapsed();
    assert!(
        took < deadline + Duration::from_secs(2),
        "shutdown took {took:?}, deadline {deadline:?}"
    );
    let err = result.expect_err("a hung collector cannot have received the spans");
    assert!(err.is_export(), "{err}");
    drop(hung);
}
