//! The chat `POST` path with every soma layer off: the baseline the platform
//! load harness (`cargo xtask bench --group platform`) measures the gateway
//! against in the same run.
//!
//! `POST /v1/conversations/{id}/messages` with `{"text": …}` builds the same
//! envelope the gateway builds (type, tenant, key = conversation id, JSON
//! payload) and sends it with a plain [`soma_bus::BusProducer`] (the same
//! librdkafka settings as the gateway: `acks=all`, idempotence on), then
//! answers `202` with the message id. No authentication, policy, rate
//! limit, idempotency key, durable-publisher fallback or outbox: a failed
//! send is a `503` and the message is lost.
//!
//! `GET /v1/conversations/{id}/events` is an idle SSE stream (axum's `Sse`
//! with its default keep-alive and no events): what one held connection
//! costs a plain axum server, the baseline of `cargo xtask bench --group sse`.
//!
//! ```text
//! soma-bare-gateway <bind addr> <bootstrap servers> <topic>
//! ```

use std::convert::Infallible;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use soma_bus::{BusConfig, BusProducer, Envelope};

struct Shared {
    producer: BusProducer,
    topic: String,
}

#[derive(Deserialize)]
struct SendMessage {
    text: String,
}

async fn post_message(
    State(s): State<Arc<Shared>>,
    Path(conversation_id): Path<String>,
    axum::Json(msg): axum::Json<SendMessage>,
) -> Response {
    let body = serde_json::json!({ "conversation_id": conversation_id, "text": msg.text });
    let env = Envelope::builder("chat.message.received", "bare", conversation_id.as_str())
        .json(&body)
        .and_then(|b| b.build());
    let env = match env {
        Ok(e) => e,
        Err(e) => return (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    };
    match s.producer.send(&s.topic, &env).await {
        Ok(_) => (
            StatusCode::ACCEPTED,
            axum::Json(serde_json::json!({
                "message_id": env.id,
                "conversation_id": conversation_id,
                "delivery": "kafka",
            })),
        )
            .into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
    }
}

/// An SSE stream that never sends an event (only keep-alive comments).
async fn idle_events() -> Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>> {
    Sse::new(futures_util::stream::pending()).keep_alive(KeepAlive::default())
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [bind, bootstrap, topic] = args.as_slice() else {
        eprintln!("usage: soma-bare-gateway <bind addr> <bootstrap servers> <topic>");
        std::process::exit(2);
    };
    let mut config = BusConfig::default();
    config.bootstrap_servers = bootstrap.clone();
    config.client_id = "soma-bare-gateway".to_owned();
    // The topic with the platform's partition count (no DLQ: nothing consumes it).
    soma_bus::TopicAdmin::new(&config)
        .expect("the default admin settings are valid")
        .ensure_topics(&[topic.as_str()], false)
        .await
        .unwrap_or_else(|e| panic!("create topic {topic}: {e}"));
    let producer = BusProducer::new(&config).expect("the default producer settings are valid");
    let shared = Arc::new(Shared {
        producer,
        topic: topic.clone(),
    });
    let app = Router::new()
        .route("/v1/conversations/{id}/messages", post(post_message))
        .route("/v1/conversations/{id}/events", get(idle_events))
        .with_state(shared);
    let listener = tokio::net::TcpListener::bind(bind.as_str())
        .await
        .unwrap_or_else(|e| panic!("bind {bind}: {e}"));
    eprintln!("soma-bare-gateway listening on {bind}, publishing to {topic} at {bootstrap}");
    axum::serve(listener, app).await.expect("serve");
}
