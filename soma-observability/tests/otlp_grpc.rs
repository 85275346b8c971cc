//! OTLP/gRPC export of a two-hop HTTP call to a real in-process receiver.

mod common;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hop_http_call_exports_linked_spans_over_grpc() {
    let (addr, spans) = soma_testkit::otlp::start_grpc_receiver().await;
    common::two_hop_scenario(
        soma_observability::OtlpProtocol::Grpc,
        format!("http://{addr}"),
        &spans,
    )
    .await;
}
