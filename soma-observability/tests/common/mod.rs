//! The two-hop trace scenario both OTLP protocol tests run against the
//! testkit's in-process receiver (`soma_testkit::otlp`).
#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use soma_testkit::otlp::Spans;
use soma_testkit::serve;
use tokio::sync::mpsc;

/// The two-hop scenario: caller (with a gateway's `traceparent` and a bearer
/// token) → service A (TraceLayer) → reqwest `send_traced` → service B
/// (TraceLayer). Asserts the parent/child chain, route-template span names,
/// resource attributes and header redaction on the spans the receiver got.
pub async fn two_hop_scenario(
    protocol: soma_observability::OtlpProtocol,
    endpoint: String,
    received: &Spans,
) {
    use axum::routing::get;
    use soma_observability::http::TraceLayer;
    use soma_observability::http::client::send_traced;
    use soma_observability::telemetry::TelemetryBuilder;
    use soma_observability::{LogFormat, TelemetryConfig};

    let mut config = TelemetryConfig::default();
    config.service_name = "two-hop-test".into();
    config.service_version = "9.9.9".into();
    config.environment = "ci".into();
    config.log_filter = "info".into();
    config.log_format = LogFormat::Json;
    config.otlp_endpoint = Some(endpoint);
    config.otlp_protocol = protocol;
    config.batch_scheduled_delay_ms = 100;
    config.record_headers = vec!["authorization".into(), "x-tenant".into()];
    let guard = TelemetryBuilder::new(&config)
        .with_writer(std::io::sink)
        .init()
        .unwrap();

    // Service B "publishes a message": it injects its context into message
    // headers (a HashMap standing in for Kafka headers); a worker consumes it.
    let (msg_tx, mut msg_rx) =
        mpsc::unbounded_channel::<std::collections::HashMap<String, String>>();
    let b = axum::Router::new()
        .route(
            "/b/{id}",
            get(move || {
                let msg_tx = msg_tx.clone();
                async move {
                    let mut headers = std::collections::HashMap::new();
                    soma_observability::propagation::inject_current(&mut headers);
                    msg_tx.send(headers).unwrap();
                    "from-b"
                }
            }),
        )
        .layer(TraceLayer::from_config(&config));
    tokio::spawn(async move {
        while let Some(headers) = msg_rx.recv().await {
            let span = tracing::info_span!(
                "worker.consume",
                otel.name = "orders process",
                otel.kind = "consumer",
                message_id = "m-1"
            );
            assert!(soma_observability::propagation::set_parent_from(
                &span, &headers
            ));
            span.in_scope(|| tracing::info!("processed"));
        }
    });
    let b_addr = serve(b).await;
    let client = reqwest::Client::new();
    let a = axum::Router::new()
        .route(
            "/a",
            get(move || {
                let client = client.clone();
                async move {
                    let resp = send_traced(client.get(format!("http://{b_addr}/b/42")))
                        .await
                        .unwrap();
                    resp.text().await.unwrap()
                }
            }),
        )
        .layer(TraceLayer::from_config(&config));
    let a_addr = serve(a).await;

    let gateway_trace = "0af7651916cd43dd8448eb211c80319c";
    let gateway_span = "b7ad6b7169203331";
    let resp = reqwest::Client::new()
        .get(format!("http://{a_addr}/a?token=query-secret"))
        .header(
            "traceparent",
            format!("00-{gateway_trace}-{gateway_span}-01"),
        )
        .header("authorization", "Bearer SECRET-TOKEN-xyz")
        .header("x-tenant", "acme")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "from-b");

    let names = [
        "HTTP GET /a",
        "HTTP GET",
        "HTTP GET /b/{id}",
        "orders process",
    ];
    let spans = received
        .collect_until(Duration::from_secs(20), |spans| {
            names
                .iter()
                .all(|n| spans.iter().any(|s| s.span.name == *n))
        })
        .await;
    let find = |name: &str| spans.iter().find(|s| s.span.name == name).unwrap().clone();
    let server_a = find("HTTP GET /a");
    let client = find("HTTP GET");
    let server_b = find("HTTP GET /b/{id}");
    let consumer = find("orders process");

    // One trace, continued from the gateway's traceparent.
    for s in [&server_a, &client, &server_b] {
        assert_eq!(s.trace_id(), gateway_trace, "{:?}", s.span.name);
    }
    assert_eq!(server_a.parent_span_id(), gateway_span);
    assert_eq!(client.parent_span_id(), server_a.span_id());
    assert_eq!(server_b.parent_span_id(), client.span_id());
    // The message hop: the consumer continues B's trace (CONSUMER = 5).
    assert_eq!(consumer.trace_id(), gateway_trace);
    assert_eq!(consumer.parent_span_id(), server_b.span_id());
    assert_eq!(consumer.span.kind, 5);
    // Kinds: SERVER = 2, CLIENT = 3.
    assert_eq!(server_a.span.kind, 2);
    assert_eq!(client.span.kind, 3);
    assert_eq!(server_b.span.kind, 2);
    assert_eq!(server_b.attr("http.route").as_deref(), Some("/b/{id}"));
    assert_eq!(server_b.attr("url.path").as_deref(), Some("/b/42"));
    assert_eq!(
        server_b.attr("http.response.status_code").as_deref(),
        Some("200")
    );
    assert_eq!(
        client.attr("http.response.status_code").as_deref(),
        Some("200")
    );

    // Resource attributes.
    for s in [&server_a, &client, &server_b] {
        assert_eq!(
            s.resource_attr("service.name").as_deref(),
            Some("two-hop-test")
        );
        assert_eq!(s.resource_attr("service.version").as_deref(), Some("9.9.9"));
        assert_eq!(
            s.resource_attr("deployment.environment").as_deref(),
            Some("ci")
        );
    }

    // Redaction: the recorded authorization header is redacted; nothing
    // exported carries the token or the query string.
    assert_eq!(
        server_a
            .attr("http.request.header.authorization")
            .as_deref(),
        Some("[REDACTED]")
    );
    assert_eq!(
        server_a.attr("http.request.header.x-tenant").as_deref(),
        Some("acme")
    );
    let dump = format!("{spans:?}");
    assert!(!dump.contains("SECRET-TOKEN"), "token leaked into spans");
    assert!(
        !dump.contains("query-secret"),
        "query string leaked into spans"
    );

    guard.shutdown_async().await.unwrap();
}
