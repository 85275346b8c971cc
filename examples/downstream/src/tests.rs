//! The service's unit tests, on the crates' test adapters only.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use soma_bus::testkit::{Fault as BusFault, MemoryPublisher};
use soma_policy::{ApiKeyStore, Authenticator, InMemoryApiKeyStore, PolicyConfig, generate_key};
use soma_somabrain::testkit::{ContractServer, Fault as BrainFault};
use soma_somabrain::{CallOptions, Memory, SomabrainClient};
use tower::ServiceExt;

use crate::{Answer, AppState, TOPIC, router};

struct Harness {
    app: Router,
    bus: MemoryPublisher,
    brain: ContractServer,
    client: SomabrainClient,
    key: String,
}

/// The service wired to a `MemoryPublisher`, a `ContractServer` and an
/// in-memory key store holding one key of `alice` in tenant `acme` (the
/// contract server's default tenant).
async fn harness() -> Harness {
    let bus = MemoryPublisher::new();
    let brain = ContractServer::start().await;
    let client = SomabrainClient::new(brain.config()).expect("client for the contract server");
    let keys = InMemoryApiKeyStore::new();
    let issued = generate_key("soma", "alice", "acme", Vec::new(), Vec::new());
    keys.insert(issued.record.clone()).await.expect("store key");
    let auth = Authenticator::builder(&PolicyConfig::default())
        .api_key_store(Arc::new(keys))
        .build()
        .expect("authenticator");
    let state = AppState {
        bus: Arc::new(bus.clone()),
        brain: client.clone(),
    };
    Harness {
        app: router(state, Arc::new(auth)),
        bus,
        brain,
        client,
        key: issued.key.expose_secret().to_owned(),
    }
}

async fn ask(h: &Harness, key: &str, question: &str) -> (StatusCode, Vec<u8>) {
    let req = Request::post("/ask")
        .header("x-api-key", key)
        .header("content-type", "application/json")
        .body(Body::from(
            serde_json::json!({ "question": question }).to_string(),
        ))
        .expect("request");
    let resp = h.app.clone().oneshot(req).await.expect("infallible");
    let status = resp.status();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, body.to_vec())
}

#[tokio::test]
async fn a_question_is_announced_keyed_by_the_caller_and_answered_from_memory() {
    let h = harness().await;
    let memory = Memory::from_json("seat", serde_json::json!({"text": "window seat"})).unwrap();
    h.client
        .remember(&memory, CallOptions::new())
        .await
        .unwrap();

    let (status, body) = ask(&h, &h.key, "seat").await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let answer: Answer = serde_json::from_slice(&body).unwrap();
    // Working and long-term memory may both return it (the real server does).
    assert!(!answer.memories.is_empty(), "{answer:?}");
    assert!(
        answer.memories.iter().all(|m| m == "window seat"),
        "{answer:?}"
    );
    assert!(!answer.degraded);
    assert_eq!(answer.delivery, "kafka");

    let sent = h.bus.on_topic(TOPIC);
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].id.to_string(), answer.message_id);
    assert_eq!(sent[0].tenant, "acme");
    assert_eq!(sent[0].message_type, "question.asked");
    assert_eq!(h.bus.with_key("alice"), sent, "keyed by the caller");
    let payload: serde_json::Value = sent[0].json().unwrap();
    assert_eq!(payload["question"], "seat");

    let recall = h.brain.seen().pop().expect("a recall reached SomaBrain");
    assert_eq!(recall.path, "/memory/recall");
    assert_eq!(recall.header("x-tenant-id"), Some("acme"));
}

#[tokio::test]
async fn a_bus_outage_is_a_503_and_nothing_is_recorded_or_recalled() {
    let h = harness().await;
    h.bus.fail_next(1, BusFault::Unavailable);
    let (status, _) = ask(&h, &h.key, "seat").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(h.bus.is_empty());
    assert_eq!(
        h.brain.seen_count(),
        0,
        "no recall for an unannounced question"
    );

    // The fault was for one call only.
    let (status, _) = ask(&h, &h.key, "seat").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(h.bus.len(), 1);
}

#[tokio::test]
async fn a_question_kept_in_the_outbox_is_answered_as_deferred() {
    let h = harness().await;
    h.bus.defer_next(1);
    let (status, body) = ask(&h, &h.key, "seat").await;
    assert_eq!(status, StatusCode::OK);
    let answer: Answer = serde_json::from_slice(&body).unwrap();
    assert_eq!(answer.delivery, "deferred");
    assert_eq!(h.bus.len(), 1);
}

#[tokio::test]
async fn a_refused_message_is_a_422() {
    let h = harness().await;
    h.bus.fail_next(1, BusFault::Refused);
    let (status, _) = ask(&h, &h.key, "seat").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(h.bus.is_empty());
}

#[tokio::test]
async fn a_somabrain_failure_answers_without_memory() {
    let h = harness().await;
    // A 500 is not retried: one failed recall.
    h.brain.push(BrainFault::status(500));
    let (status, body) = ask(&h, &h.key, "seat").await;
    assert_eq!(status, StatusCode::OK);
    let answer: Answer = serde_json::from_slice(&body).unwrap();
    assert!(answer.degraded);
    assert!(answer.memories.is_empty());
    assert_eq!(h.bus.len(), 1, "the question was still announced");
    assert_eq!(h.brain.faults_left(), 0);
}

#[tokio::test]
async fn an_unknown_key_is_a_401_and_nothing_is_published() {
    let h = harness().await;
    let stranger = generate_key("soma", "mallory", "acme", Vec::new(), Vec::new());
    let (status, _) = ask(&h, stranger.key.expose_secret(), "seat").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(h.bus.is_empty());
    assert_eq!(h.brain.seen_count(), 0);
}
