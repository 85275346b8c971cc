//! The W3C trace context of the caller's trace reaches SomaBrain.

mod common;

use common::ContractServer;
use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use soma_somabrain::{CallOptions, RecallRequest, SomabrainClient};
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::layer::SubscriberExt as _;

#[tokio::test]
async fn traceparent_continues_the_callers_trace() {
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
    // Current-thread runtime: the thread-local default covers the whole call.
    let _guard = tracing::subscriber::set_default(subscriber);

    let server = ContractServer::start().await;
    let client = SomabrainClient::new(server.config()).unwrap();
    let turn = tracing::info_span!("turn");
    let trace_id = turn.context().span().span_context().trace_id();
    assert_ne!(trace_id, opentelemetry::trace::TraceId::INVALID);
    client
        .recall(&RecallRequest::new("x"), CallOptions::new())
        .instrument(turn.clone())
        .await
        .unwrap();

    let seen = server.seen();
    let tp = seen[0].header("traceparent").expect("traceparent sent");
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!(parts.len(), 4, "{tp}");
    assert_eq!(parts[0], "00");
    assert_eq!(parts[1], trace_id.to_string(), "same trace as the caller");
    let turn_span_id = turn.context().span().span_context().span_id().to_string();
    assert_ne!(
        parts[2], turn_span_id,
        "the parent is the client call's own span"
    );
}
