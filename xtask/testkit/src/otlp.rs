//! An in-process OTLP trace receiver, over gRPC (opentelemetry-proto's tonic
//! server) or HTTP/protobuf (axum at `/v1/traces`): a real far side for
//! tests of trace export.
//!
//! ```no_run
//! # async fn demo() {
//! let (addr, spans) = soma_testkit::otlp::start_http_receiver().await;
//! // export to http://{addr}/v1/traces, then:
//! let got = spans
//!     .collect_until(std::time::Duration::from_secs(10), |s| !s.is_empty())
//!     .await;
//! # let _ = (addr, got); }
//! ```

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue};
use opentelemetry_proto::tonic::trace::v1::Span;

/// One received span with its resource attributes.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    /// `service.name` of the exporting process ("" when absent).
    pub service: String,
    /// Every resource attribute, as text.
    pub resource: Vec<(String, String)>,
    /// The span.
    pub span: Span,
}

impl ReceivedSpan {
    /// A span attribute, as text.
    pub fn attr(&self, key: &str) -> Option<String> {
        attr(&self.span.attributes, key)
    }
    /// A resource attribute, as text.
    pub fn resource_attr(&self, key: &str) -> Option<String> {
        self.resource
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    }
    /// The span's name.
    pub fn name(&self) -> &str {
        &self.span.name
    }
    /// Its trace id, hex.
    pub fn trace_id(&self) -> String {
        hex(&self.span.trace_id)
    }
    /// Its span id, hex.
    pub fn span_id(&self) -> String {
        hex(&self.span.span_id)
    }
    /// Its parent's span id, hex ("" for a root).
    pub fn parent_span_id(&self) -> String {
        hex(&self.span.parent_span_id)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn text(v: &Option<AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

fn attr(attrs: &[KeyValue], key: &str) -> Option<String> {
    attrs
        .iter()
        .find(|kv| kv.key == key)
        .map(|kv| text(&kv.value))
}

/// The spans a receiver got so far, in arrival order.
#[derive(Clone, Debug, Default)]
pub struct Spans(Arc<Mutex<Vec<ReceivedSpan>>>);

impl Spans {
    /// A copy of everything received.
    pub fn all(&self) -> Vec<ReceivedSpan> {
        self.lock().clone()
    }

    /// Everything received, leaving the store empty (a long-running bench
    /// drains it so it does not grow).
    pub fn take(&self) -> Vec<ReceivedSpan> {
        std::mem::take(&mut *self.lock())
    }

    /// Waits until `done` says the received set is complete and returns it;
    /// panics after `within`, listing the names received.
    pub async fn collect_until(
        &self,
        within: Duration,
        mut done: impl FnMut(&[ReceivedSpan]) -> bool,
    ) -> Vec<ReceivedSpan> {
        let complete = crate::eventually(within, || std::future::ready(done(&self.lock()))).await;
        let spans = self.all();
        assert!(
            complete,
            "OTLP receiver did not get the expected spans within {within:?}; got: {:#?}",
            spans.iter().map(ReceivedSpan::name).collect::<Vec<_>>()
        );
        spans
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<ReceivedSpan>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn record(&self, req: ExportTraceServiceRequest) {
        let mut all = self.lock();
        for rs in req.resource_spans {
            let resource: Vec<(String, String)> = rs
                .resource
                .map(|r| {
                    r.attributes
                        .iter()
                        .map(|kv| (kv.key.clone(), text(&kv.value)))
                        .collect()
                })
                .unwrap_or_default();
            let service = resource
                .iter()
                .find(|(k, _)| k == "service.name")
                .map(|(_, v)| v.clone())
                .unwrap_or_default();
            for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                all.push(ReceivedSpan {
                    service: service.clone(),
                    resource: resource.clone(),
                    span,
                });
            }
        }
    }
}

struct Collector(Spans);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.record(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// Starts an OTLP/gRPC trace receiver on a free loopback port; export to
/// `http://{addr}`.
pub async fn start_grpc_receiver() -> (SocketAddr, Spans) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("local addr");
    let spans = Spans::default();
    let service = TraceServiceServer::new(Collector(spans.clone()));
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .expect("OTLP/gRPC receiver failed");
    });
    (addr, spans)
}

/// Starts an OTLP/HTTP (protobuf) trace receiver on a free loopback port;
/// export to `http://{addr}/v1/traces`.
pub async fn start_http_receiver() -> (SocketAddr, Spans) {
    use prost::Message as _;
    let spans = Spans::default();
    let sink = spans.clone();
    let router = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let sink = sink.clone();
            async move {
                let req = ExportTraceServiceRequest::decode(body).expect("valid OTLP protobuf");
                sink.record(req);
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
    (crate::serve(router).await, spans)
}
