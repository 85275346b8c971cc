//! A controllable OpenAI-compatible streaming model for the tests: streams
//! [`TOKENS`] with a delay per token, or one token per permit the test
//! releases ([`Mode::Gated`]), fails on demand, and reports its own
//! progress (tokens written, streams finished) so tests can order what a
//! client saw against what the model had done.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::sync::Semaphore;

/// What the model answers, token by token.
pub const TOKENS: &[&str] = &["Teal", " is", " a", " calm", " colour", ", ", "friend", "."];

/// What the model does with the next requests.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Mode {
    /// Streams `TOKENS` (one per `delay`), then `[DONE]`.
    Stream,
    /// Streams `TOKENS`, each when the test releases a permit
    /// ([`ModelServer::release`]), then `[DONE]`.
    Gated,
    /// Answers 500.
    Fail,
    /// Streams two tokens and ends without `[DONE]`.
    Break,
}

/// A request the model received: its `Authorization` and its body.
pub type Seen = (Option<String>, Value);

#[derive(Clone)]
struct Model {
    mode: Arc<Mutex<Mode>>,
    delay: Arc<Mutex<Duration>>,
    seen: Arc<Mutex<Vec<Seen>>>,
    gate: Arc<Semaphore>,
    written: Arc<AtomicUsize>,
    finished: Arc<AtomicUsize>,
}

/// The running model server (on a loopback port, for the test's life).
#[derive(Clone)]
pub struct ModelServer {
    /// Where it listens: the base URL is `http://{addr}/v1`.
    pub addr: SocketAddr,
    model: Model,
}

impl ModelServer {
    /// Starts the server in `mode`, 20 ms per token.
    pub async fn start(mode: Mode) -> Self {
        let model = Model {
            mode: Arc::new(Mutex::new(mode)),
            delay: Arc::new(Mutex::new(Duration::from_millis(20))),
            seen: Arc::new(Mutex::new(Vec::new())),
            gate: Arc::new(Semaphore::new(0)),
            written: Arc::new(AtomicUsize::new(0)),
            finished: Arc::new(AtomicUsize::new(0)),
        };
        let app = axum::Router::new()
            .route("/v1/chat/completions", axum::routing::post(completions))
            .with_state(model.clone());
        let addr = soma_testkit::serve(app).await;
        Self { addr, model }
    }

    /// `llm.base_url` for it.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Changes what the next requests get.
    pub fn set_mode(&self, mode: Mode) {
        *self.model.mode.lock().unwrap() = mode;
    }

    /// Changes the delay per token of [`Mode::Stream`].
    pub fn set_delay(&self, delay: Duration) {
        *self.model.delay.lock().unwrap() = delay;
    }

    /// The delay per token of [`Mode::Stream`].
    pub fn delay(&self) -> Duration {
        *self.model.delay.lock().unwrap()
    }

    /// Lets `n` more tokens out in [`Mode::Gated`].
    pub fn release(&self, n: usize) {
        self.model.gate.add_permits(n);
    }

    /// Tokens written to response bodies so far (all requests).
    pub fn tokens_written(&self) -> usize {
        self.model.written.load(Ordering::SeqCst)
    }

    /// Streams that reached `[DONE]` so far.
    pub fn streams_finished(&self) -> usize {
        self.model.finished.load(Ordering::SeqCst)
    }

    /// The requests received so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.model.seen.lock().unwrap().clone()
    }
}

async fn completions(
    State(m): State<Model>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    m.seen.lock().unwrap().push((auth, body));
    let mode = *m.mode.lock().unwrap();
    if mode == Mode::Fail {
        return (StatusCode::INTERNAL_SERVER_ERROR, "model overloaded").into_response();
    }
    let delay = *m.delay.lock().unwrap();
    let take = if mode == Mode::Break { 2 } else { TOKENS.len() };
    let chunks: Vec<(bool, String)> = TOKENS[..take]
        .iter()
        .map(|t| {
            let data = json!({"choices": [{"index": 0, "delta": {"content": t}}]});
            (true, format!("data: {data}\n\n"))
        })
        .chain((mode != Mode::Break).then(|| (false, "data: [DONE]\n\n".to_owned())))
        .collect();
    let stream = futures::stream::iter(chunks).then(move |(is_token, chunk)| {
        let m = m.clone();
        async move {
            if !is_token {
                m.finished.fetch_add(1, Ordering::SeqCst);
            } else if mode == Mode::Gated {
                m.gate.acquire().await.expect("gate open").forget();
                m.written.fetch_add(1, Ordering::SeqCst);
            } else {
                tokio::time::sleep(delay).await;
                m.written.fetch_add(1, Ordering::SeqCst);
            }
            Ok::<_, std::io::Error>(chunk)
        }
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(stream))
        .unwrap()
}
