//! Shared helpers for the integration tests: a real in-process OTLP receiver
//! (gRPC via opentelemetry-proto's tonic server, HTTP/protobuf via axum) and
//! axum servers on loopback ports.
#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use tokio::sync::mpsc;

/// One received span with its resource attributes.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    pub span: Span,
    pub resource: Vec<(String, String)>,
}

impl ReceivedSpan {
    pub fn attr(&self, key: &str) -> Option<String> {
        attr(&self.span.attributes, key)
    }
    pub fn resource_attr(&self, key: &str) -> Option<String> {
        self.resource
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    }
    pub fn trace_id(&self) -> String {
        hex(&self.span.trace_id)
    }
    pub fn span_id(&self) -> String {
        hex(&self.span.span_id)
    }
    pub fn parent_span_id(&self) -> String {
        hex(&self.span.parent_span_id)
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn value_string(v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

pub fn attr(attrs: &[KeyValue], key: &str) -> Option<String> {
    attrs
        .iter()
        .find(|kv| kv.key == key)
        .map(|kv| value_string(&kv.value))
}

fn flatten(req: ExportTraceServiceRequest) -> Vec<ReceivedSpan> {
    let mut out = Vec::new();
    for rs in req.resource_spans {
        let resource: Vec<(String, String)> = rs
            .resource
            .map(|r| {
                r.attributes
                    .iter()
                    .map(|kv| (kv.key.clone(), value_string(&kv.value)))
                    .collect()
            })
            .unwrap_or_default();
        for ss in rs.scope_spans {
            for span in ss.spans {
                out.push(ReceivedSpan {
                    span,
                    resource: resource.clone(),
                });
            }
        }
    }
    out
}

struct Collector(mpsc::UnboundedSender<ReceivedSpan>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        for span in flatten(request.into_inner()) {
            let _ = self.0.send(span);
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// Starts an OTLP/gRPC trace receiver on a loopback port.
pub async fn start_grpc_receiver() -> (SocketAddr, mpsc::UnboundedReceiver<ReceivedSpan>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Collector(tx)))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .expect("OTLP receiver failed");
    });
    (addr, rx)
}

/// Starts an OTLP/HTTP (protobuf) trace receiver at `/v1/traces` on a loopback port.
pub async fn start_http_receiver() -> (SocketAddr, mpsc::UnboundedReceiver<ReceivedSpan>) {
    use prost::Message as _;
    let (tx, rx) = mpsc::unbounded_channel();
    let router = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let tx = tx.clone();
            async move {
                let req = ExportTraceServiceRequest::decode(body).expect("valid OTLP protobuf");
                for span in flatten(req) {
                    let _ = tx.send(span);
                }
                let resp = ExportTraceServiceResponse {
                    partial_success: None,
                }
                .encode_to_vec();
                (
                    [(axum::http::header::CONTENT_TYPE, "application/x-protobuf")],
                    resp,
                )
            }
        }),
    );
    (serve(router).await, rx)
}

/// Serves `router` on a loopback port.
pub async fn serve(router: axum::Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.expect("server failed") });
    addr
}

/// Collects spans until `done` says the set is complete, or fails after `within`.
pub async fn collect_until(
    rx: &mut mpsc::UnboundedReceiver<ReceivedSpan>,
    within: Duration,
    mut done: impl FnMut(&[ReceivedSpan]) -> bool,
) -> Vec<ReceivedSpan> {
    let mut spans = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    while !done(&spans) {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(span)) => spans.push(span),
            _ => panic!(
                "OTLP receiver did not get the expected spans within {within:?}; got: {:#?}",
                spans.iter().map(|s| &s.span.name).collect::<Vec<_>>()
            ),
        }
    }
    spans
}

/// The two-hop scenario: caller (with a gateway's `traceparent` and a bearer
/// token) → service A (TraceLayer) → reqwest `send_traced` → service B
/// (TraceLayer). Asserts the parent/child chain, route-template span names,
/// resource attributes and header redaction on the spans the receiver got.
pub async fn two_hop_scenario(
    protocol: soma_observability::OtlpProtocol,
    endpoint: String,
    rx: &mut mpsc::UnboundedReceiver<ReceivedSpan>,
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
    let spans = collect_until(rx, Duration::from_secs(20), |spans| {
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
