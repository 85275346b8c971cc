//! A tiny service on the published soma crates: `POST /ask` takes a question
//! from a caller authenticated by API key, announces it on the bus (topic
//! `questions`, keyed by the caller) and answers with what SomaBrain
//! recalls for the caller's tenant.
//!
//! It holds an `Arc<dyn Publish>`, not a `DurablePublisher`, so its unit
//! tests (`src/tests.rs`) run on the crates' test adapters —
//! `soma_bus::testkit::MemoryPublisher`,
//! `soma_somabrain::testkit::ContractServer` and
//! `soma_policy::InMemoryApiKeyStore` — with no Kafka, no PostgreSQL and no
//! SomaBrain.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Extension, Json, Router};
use serde::{Deserialize, Serialize};
use soma_bus::{Envelope, Publish, PublishOutcome};
use soma_policy::{Authenticator, AuthnLayer, Principal};
use soma_somabrain::{CallOptions, RecallRequest, SomabrainClient};

/// The topic questions are announced on.
pub const TOPIC: &str = "questions";

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    /// Where questions are announced (a `DurablePublisher` in production).
    pub bus: Arc<dyn Publish>,
    /// SomaBrain.
    pub brain: SomabrainClient,
}

/// The body of `POST /ask`.
#[derive(Debug, Deserialize, Serialize)]
pub struct Ask {
    /// The question.
    pub question: String,
}

/// The answer of `POST /ask`.
#[derive(Debug, Deserialize, Serialize)]
pub struct Answer {
    /// The id of the announcement's envelope.
    pub message_id: String,
    /// `kafka` (acknowledged by the broker) or `deferred` (kept in the outbox).
    pub delivery: String,
    /// Recalled memories (their `text`), best first.
    pub memories: Vec<String>,
    /// True when SomaBrain could not be asked: answered without memory.
    pub degraded: bool,
}

/// The service: `POST /ask`, behind API-key authentication.
pub fn router(state: AppState, auth: Arc<Authenticator>) -> Router {
    Router::new()
        .route("/ask", post(ask))
        .layer(AuthnLayer::new(auth))
        .with_state(state)
}

async fn ask(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Json(body): Json<Ask>,
) -> Response {
    let env = match Envelope::builder("question.asked", &who.tenant, &who.subject)
        .json(&body)
        .and_then(|b| b.build())
    {
        Ok(env) => env,
        Err(e) => return (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    };
    let delivery = match state.bus.publish(TOPIC, &env).await {
        Ok(PublishOutcome::Published { .. }) => "kafka",
        Ok(PublishOutcome::Deferred(_)) => "deferred",
        // Not accepted: the caller retries later, or not at all.
        Err(e) if e.is_permanent() => {
            return (StatusCode::UNPROCESSABLE_ENTITY, "question refused").into_response();
        }
        Err(_) => return (StatusCode::SERVICE_UNAVAILABLE, "bus unavailable").into_response(),
    };
    // Memory is best effort: the question is announced either way.
    let scope = CallOptions::new().tenant(who.tenant.clone());
    let (memories, degraded) = match state
        .brain
        .recall(&RecallRequest::new(body.question.clone()).top_k(5), scope)
        .await
    {
        Ok(found) => (
            found
                .results
                .iter()
                .filter_map(|hit| hit.content.get("text")?.as_str().map(str::to_owned))
                .collect(),
            false,
        ),
        Err(_) => (Vec::new(), true),
    };
    Json(Answer {
        message_id: env.id.to_string(),
        delivery: delivery.into(),
        memories,
        degraded,
    })
    .into_response()
}

#[cfg(test)]
mod tests;
