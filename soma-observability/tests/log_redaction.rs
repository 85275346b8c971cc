//! Log capture: a request carrying `Authorization: Bearer <token>` (and other
//! sensitive headers) never prints them, even when a handler logs the headers.

use axum::routing::get;
use soma_observability::http::TraceLayer;
use soma_observability::telemetry::TelemetryBuilder;
use soma_observability::{LogFormat, TelemetryConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_token_never_printed() {
    let capture = soma_testkit::LogCapture::default();
    let mut config = TelemetryConfig::default();
    config.log_filter = "trace".into();
    config.log_format = LogFormat::Json;
    config.sensitive_headers = vec!["X-Tenant-Secret".into()];
    config.record_headers = vec!["authorization".into(), "cookie".into()];
    let writer = capture.clone();
    let _guard = TelemetryBuilder::new(&config)
        .with_writer(move || writer.clone())
        .init()
        .unwrap();

    let app = axum::Router::new()
        .route(
            "/v1/me",
            get(|req: axum::extract::Request| async move {
                // A careless handler logging every header.
                tracing::info!(headers = ?req.headers(), "handler saw request");
                tracing::info!(auth = ?req.headers().get("authorization"), "auth header");
                "me"
            }),
        )
        .layer(TraceLayer::from_config(&config));
    let addr = soma_testkit::serve(app).await;
    let resp = reqwest::Client::new()
        .get(format!("http://{addr}/v1/me"))
        .header("authorization", "Bearer tok_LIVE_9f8e7d6c5b4a")
        .header("cookie", "session=COOKIE-SECRET-1")
        .header("x-api-key", "APIKEY-SECRET-2")
        .header("x-tenant-secret", "TENANT-SECRET-3")
        .header("x-request-id", "req-42")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    let logs = capture.text();
    // The capture really saw the request: the handler's events, inside the
    // request span (JSON logs carry span fields).
    assert!(
        logs.contains("handler saw request"),
        "no handler log captured:\n{logs}"
    );
    assert!(
        logs.contains("\"request_id\":\"req-42\""),
        "span fields missing:\n{logs}"
    );
    assert!(
        logs.contains("x-request-id"),
        "headers were not logged at all:\n{logs}"
    );
    assert!(
        logs.contains("\"trace_id\":\""),
        "trace id missing from JSON logs:\n{logs}"
    );
    for secret in [
        "tok_LIVE_9f8e7d6c5b4a",
        "COOKIE-SECRET-1",
        "APIKEY-SECRET-2",
        "TENANT-SECRET-3",
    ] {
        assert!(
            !logs.contains(secret),
            "`{secret}` leaked into logs:\n{logs}"
        );
    }
}
