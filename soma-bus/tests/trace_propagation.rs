//! One trace across publish → Kafka → consume → publish → Kafka → consume,
//! with a real OpenTelemetry pipeline (`tracing-opentelemetry` over an SDK
//! tracer provider) and the shared tansu broker.
//!
//! This binary holds a single test because it installs the process-wide
//! subscriber (the consumer's tasks run on tokio worker threads, which a
//! thread-local `set_default` would not reach).

mod common;

use std::sync::Arc;
use std::time::Duration;

use opentelemetry::trace::{SpanId, TracerProvider as _};
use opentelemetry::{Context, Value};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, Span, SpanData, SpanProcessor};
use parking_lot::Mutex;
use soma_bus::{BusConsumer, BusProducer, DurablePublisher, Envelope};
use soma_observability::propagation::current_trace_id;
use tracing::Instrument as _;
use tracing_subscriber::layer::SubscriberExt as _;

use common::*;

/// Keeps every ended span in memory (the SDK's in-memory exporter needs the
/// `testing` feature, which would rebuild opentelemetry_sdk for one test).
#[derive(Debug, Clone, Default)]
struct Collected(Arc<Mutex<Vec<SpanData>>>);

impl SpanProcessor for Collected {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        self.0.lock().push(span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

impl Collected {
    /// The span named `name` whose `message_id` attribute is `id`.
    fn find(&self, name: &str, id: &uuid::Uuid) -> Option<SpanData> {
        let id = Value::from(id.to_string());
        self.0
            .lock()
            .iter()
            .find(|s| {
                s.name == name
                    && s.attributes
                        .iter()
                        .any(|kv| kv.key.as_str() == "message_id" && kv.value == id)
            })
            .cloned()
    }

    fn named(&self, name: &str) -> Option<SpanData> {
        self.0.lock().iter().find(|s| s.name == name).cloned()
    }
}

/// What a handler saw: the envelope, the trace id in scope and the reply it built.
#[derive(Debug, Clone)]
struct Seen {
    env: Envelope,
    trace_id: Option<String>,
    reply: Option<Envelope>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_spans_publish_consume_and_reply() {
    let bootstrap = soma_testkit::require_kafka();
    let spans = Collected::default();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(spans.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("soma-bus-test")));
    tracing::subscriber::set_global_default(subscriber).expect("only test in this binary");

    let cfg = config(&bootstrap);
    let requests = topic(&cfg, "trace-req").await;
    let replies = topic(&cfg, "trace-reply").await;
    let producer = BusProducer::new(&cfg).unwrap();
    let publisher =
        DurablePublisher::builder(producer.clone(), outbox(&require_postgres()).await).build();

    // The "gateway": publishes inside its request span.
    let request = Envelope::builder("chat.turn", "tenant-a", "session-1")
        .json(&serde_json::json!({"text": "hello"}))
        .unwrap()
        .build()
        .unwrap();
    assert_eq!(request.trace, None);
    let gateway_span = tracing::info_span!("gateway.request");
    let gateway_trace = async {
        publisher.publish(&requests, &request).await.unwrap();
        current_trace_id().expect("the gateway span has an OpenTelemetry context")
    }
    .instrument(gateway_span.clone())
    .await;
    drop(gateway_span);

    // The "worker": replies from inside its handler.
    let worker_seen = Arc::new(Mutex::new(Vec::<Seen>::new()));
    let (seen, reply_publisher, reply_topic) =
        (worker_seen.clone(), publisher.clone(), replies.clone());
    let worker = BusConsumer::builder(&cfg, &[&requests], "worker", move |e: Envelope| {
        let (seen, publisher, topic) = (seen.clone(), reply_publisher.clone(), reply_topic.clone());
        async move {
            let trace_id = current_trace_id();
            let reply = Envelope::builder("chat.reply", "tenant-a", "session-1")
                .caused_by(&e)
                .build()
                .unwrap();
            publisher.publish(&topic, &reply).await.unwrap();
            seen.lock().push(Seen {
                env: e,
                trace_id,
                reply: Some(reply),
            });
            Ok(())
        }
    })
    .producer(producer.clone())
    .spawn()
    .unwrap();

    // Back at the "gateway": consumes the reply.
    let gateway_seen = Arc::new(Mutex::new(Vec::<Seen>::new()));
    let seen = gateway_seen.clone();
    let gateway = BusConsumer::builder(&cfg, &[&replies], "gateway", move |e: Envelope| {
        let seen = seen.clone();
        async move {
            seen.lock().push(Seen {
                env: e,
                trace_id: current_trace_id(),
                reply: None,
            });
            Ok(())
        }
    })
    .producer(producer)
    .spawn()
    .unwrap();

    wait_for("the reply to be consumed", Duration::from_secs(60), || {
        !gateway_seen.lock().is_empty()
    })
    .await;
    worker.shutdown().await;
    gateway.shutdown().await;
    // Spans end when their last handle is dropped, after the handlers return.
    wait_for("both consume spans to end", Duration::from_secs(10), || {
        spans
            .0
            .lock()
            .iter()
            .filter(|s| s.name == "soma.consume")
            .count()
            == 2
    })
    .await;

    let worker_seen = worker_seen.lock()[0].clone();
    let gateway_seen = gateway_seen.lock()[0].clone();
    let reply = worker_seen.reply.clone().unwrap();

    // Every hop saw the gateway's trace.
    assert_eq!(worker_seen.env.id, request.id);
    assert_eq!(
        worker_seen.trace_id.as_deref(),
        Some(gateway_trace.as_str())
    );
    let on_wire = worker_seen
        .env
        .trace
        .clone()
        .expect("request carried a traceparent");
    assert_eq!(on_wire.trace_id(), gateway_trace);
    // caused_by inside the consume span leaves the context to the publisher.
    assert_eq!(reply.trace, None);
    assert_eq!(gateway_seen.env.id, reply.id);
    assert_eq!(
        gateway_seen.trace_id.as_deref(),
        Some(gateway_trace.as_str())
    );
    let reply_on_wire = gateway_seen
        .env
        .trace
        .clone()
        .expect("reply carried a traceparent");
    assert_eq!(reply_on_wire.trace_id(), gateway_trace);
    assert_eq!(gateway_seen.env.causation_id, Some(request.id.to_string()));

    // And the spans form one tree:
    // gateway.request → soma.publish → soma.consume(worker) → soma.publish → soma.consume(gateway).
    let root = spans.named("gateway.request").expect("gateway span ended");
    let publish = spans
        .find("soma.publish", &request.id)
        .expect("publish span");
    let consume = spans
        .find("soma.consume", &request.id)
        .expect("worker consume span");
    let reply_publish = spans
        .find("soma.publish", &reply.id)
        .expect("reply publish span");
    let reply_consume = spans
        .find("soma.consume", &reply.id)
        .expect("gateway consume span");
    let id = |s: &SpanData| s.span_context.span_id();
    assert_eq!(root.parent_span_id, SpanId::INVALID);
    assert_eq!(publish.parent_span_id, id(&root));
    // The message names the publish span as its sender.
    assert_eq!(on_wire.span_id(), id(&publish).to_string());
    assert_eq!(consume.parent_span_id, id(&publish));
    assert!(consume.parent_span_is_remote);
    assert_eq!(reply_publish.parent_span_id, id(&consume));
    assert_eq!(reply_on_wire.span_id(), id(&reply_publish).to_string());
    assert_eq!(reply_consume.parent_span_id, id(&reply_publish));
    for s in [&root, &publish, &consume, &reply_publish, &reply_consume] {
        assert_eq!(
            s.span_context.trace_id().to_string(),
            gateway_trace,
            "{}",
            s.name
        );
    }
    let _ = provider.shutdown();
}
