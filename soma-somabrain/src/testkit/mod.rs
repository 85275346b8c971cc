//! A strict SomaBrain contract server for tests (feature `testkit`): test
//! code that uses [`SomabrainClient`](crate::SomabrainClient) without a
//! SomaBrain deployment.
//!
//! [`ContractServer::start`] listens on a loopback port and serves the
//! contract of SomaBrain's memory and context API as recorded in this
//! crate's `tests/fixtures/` (upstream commit 9902512). It is *stricter*
//! than the real server where that catches client bugs:
//!
//! - unknown paths (including trailing slashes) → Django's HTML 404 page;
//!   wrong method → 405 `Method not allowed` (text/html);
//! - memory and context routes (not feature flags, not probes) need
//!   `Authorization: Bearer` [`TOKEN`] → else 401 `{"detail":"Unauthorized"}`;
//! - unparseable JSON or a missing `Content-Type: application/json` → 400
//!   `{"detail":"Cannot parse request body"}`;
//! - a missing required field → 422 `[{"type":"missing","loc":["body","payload",<field>],"msg":"Field required"}]`
//!   (the real shape); an unknown field → 422 `extra_forbidden` (stricter
//!   than the real server, which ignores it);
//! - `X-Tenant-ID` is required on memory and context routes and must equal
//!   the tenant in the body or query (`tenant` / `tenant_id`); `X-Namespace`,
//!   when sent, must equal the namespace in the body or query → else 400.
//!
//! Remembered memories are kept in memory per tenant and namespace and
//! returned by recall (a substring match on the query).
//!
//! Faults: connections reset at accept ([`ContractServer::reset_next_connections`]),
//! a fixed delay on every request ([`ContractServer::set_delay`]), and a queue
//! of per-request faults ([`ContractServer::push`]) consumed in order by
//! requests that passed validation: a canned response (status, content type,
//! body, `Retry-After`), a delay, or a malformed JSON body.
//!
//! ```
//! use soma_somabrain::testkit::{ContractServer, Fault};
//! use soma_somabrain::{CallOptions, Memory, RecallRequest, SomabrainClient};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let server = ContractServer::start().await;
//! let client = SomabrainClient::new(server.config())?; // tenant "acme", namespace "agent"
//! let memory = Memory::from_json("note-1", serde_json::json!({"text": "window seat"}))?;
//! client.remember(&memory, CallOptions::new()).await?;
//!
//! server.push(Fault::status(400)); // the next request gets a 400
//! let err = client.recall(&RecallRequest::new("seat"), CallOptions::new()).await.unwrap_err();
//! assert!(!err.is_unavailable());
//! assert_eq!(server.faults_left(), 0);
//! assert_eq!(server.seen()[0].path, "/memory/remember");
//! # Ok(()) }
//! ```
#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use crate::SomabrainConfig;
use axum::Router;
use parking::Mutex;
use serde_json::{Value, json};

mod contract;

mod parking {
    /// std Mutex that ignores poisoning (a failed assertion in one test task
    /// must not cascade).
    #[derive(Default)]
    pub(super) struct Mutex<T>(std::sync::Mutex<T>);
    impl<T> Mutex<T> {
        pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, T> {
            self.0.lock().unwrap_or_else(|e| e.into_inner())
        }
    }
}

/// The bearer token the server accepts ([`ContractServer::config`] sets it).
pub const TOKEN: &str = "test-token-7f3a";
/// Django's stock 404 page, as recorded (`23-error-unknown-path.json`).
pub const HTML_404: &str = "\n<!doctype html>\n<html lang=\"en\">\n<head>\n  <title>Not Found</title>\n</head>\n<body>\n  <h1>Not Found</h1><p>The requested resource was not found on this server.</p>\n</body>\n</html>\n";
/// Django's stock 500 page with DEBUG off (not in the recordings: no route
/// produced one; 18 shows a handled 500 with a JSON detail).
pub const HTML_500: &str = "\n<!doctype html>\n<html lang=\"en\">\n<head>\n  <title>Server Error (500)</title>\n</head>\n<body>\n  <h1>Server Error (500)</h1><p></p>\n</body>\n</html>\n";
const NINJA_JSON: &str = "application/json; charset=utf-8";

/// A request as the server saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// HTTP method.
    pub method: String,
    /// Path, without the query.
    pub path: String,
    /// Decoded query parameters.
    pub query: BTreeMap<String, String>,
    /// Lower-cased names.
    pub headers: BTreeMap<String, String>,
    /// The JSON body, when there was one.
    pub body: Option<Value>,
}

impl Seen {
    /// A header by (case-insensitive) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }
}

/// A fault queued with [`ContractServer::push`], consumed by the next
/// request that passed validation.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Answer with this response instead of serving the request.
    Respond {
        /// HTTP status.
        status: u16,
        /// `Content-Type` header.
        content_type: String,
        /// Body text.
        body: String,
        /// `Retry-After` header, if any.
        retry_after: Option<String>,
    },
    /// Wait this long, then serve the request.
    Delay(Duration),
    /// Serve the request but send a truncated, unparseable JSON body.
    MalformedJson,
}

impl Fault {
    /// A JSON `{"detail": ...}` response with `status`.
    pub fn status(status: u16) -> Self {
        Fault::Respond {
            status,
            content_type: NINJA_JSON.into(),
            body: json!({"detail": format!("injected {status}")}).to_string(),
            retry_after: None,
        }
    }
    /// Django's HTML 500 page.
    pub fn html_500() -> Self {
        Fault::Respond {
            status: 500,
            content_type: "text/html; charset=utf-8".into(),
            body: HTML_500.into(),
            retry_after: None,
        }
    }
    /// 429 with a `Retry-After` header.
    pub fn too_many(retry_after: &str) -> Self {
        Fault::Respond {
            status: 429,
            content_type: NINJA_JSON.into(),
            body: json!({"detail": "rate limited"}).to_string(),
            retry_after: Some(retry_after.into()),
        }
    }
    /// Replays the response of a recorded exchange (the JSON of a
    /// `tests/fixtures/*.json` file).
    ///
    /// # Panics
    ///
    /// If `rec` has no `response.status` or `response.content_type`.
    pub fn replay(rec: &Value) -> Self {
        let r = &rec["response"];
        let body = match &r["body"] {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        Fault::Respond {
            status: r["status"].as_u64().unwrap() as u16,
            content_type: r["content_type"].as_str().unwrap().into(),
            body,
            retry_after: None,
        }
    }
}

#[derive(Debug, Clone)]
struct Stored {
    namespace: String,
    key: String,
    universe: String,
    payload: Value,
}

/// What the server counts; shared with its tasks.
#[derive(Default)]
struct ServerState {
    seen: Mutex<Vec<Seen>>,
    faults: Mutex<VecDeque<Fault>>,
    resets: AtomicUsize,
    accepted: AtomicUsize,
    delay_ms: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    store: Mutex<HashMap<String, Vec<Stored>>>,
    feedback: Mutex<HashMap<String, u64>>,
    ready_degraded: AtomicBool,
    /// `/health` says `memory_ok: false` (everything else keeps answering,
    /// as the real server does when its memory backend is down).
    memory_down: AtomicBool,
    /// A route template that answers 500 on every call while set.
    failing_route: Mutex<Option<String>>,
}

/// The contract server; stops when dropped. See the [module docs](self).
pub struct ContractServer {
    addr: SocketAddr,
    state: Arc<ServerState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ContractServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ContractServer {
    /// Starts the server on `127.0.0.1` and an OS-chosen port.
    ///
    /// # Panics
    ///
    /// If no loopback port can be bound.
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(ServerState::default());
        let app = Router::new()
            .fallback(contract::handle)
            .with_state(state.clone());
        let listener = FaultyListener {
            inner: listener,
            state: state.clone(),
        };
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .await
                .expect("fake somabrain serve");
        });
        ContractServer { addr, state, task }
    }

    /// The loopback address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A client config pointing here, with fast test timings.
    pub fn config(&self) -> SomabrainConfig {
        let mut c = SomabrainConfig {
            base_url: self.url(),
            token: TOKEN.into(),
            default_tenant: "acme".into(),
            default_namespace: "agent".into(),
            ..SomabrainConfig::default()
        };
        c.retry.initial_ms = 5;
        c.retry.max_ms = 20;
        c.breaker.open_ms = 60_000;
        c
    }

    /// Queues a fault for the next request that passes validation.
    pub fn push(&self, fault: Fault) {
        self.state.faults.lock().push_back(fault);
    }

    /// Queues `n` copies of `fault`.
    pub fn push_n(&self, n: usize, fault: Fault) {
        for _ in 0..n {
            self.push(fault.clone());
        }
    }

    /// Resets the next `n` connections at accept.
    pub fn reset_next_connections(&self, n: usize) {
        self.state.resets.store(n, Ordering::SeqCst);
    }

    /// Delays every request by `d` (zero: no delay).
    pub fn set_delay(&self, d: Duration) {
        self.state
            .delay_ms
            .store(d.as_millis() as usize, Ordering::SeqCst);
    }

    /// Every request received, in arrival order.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().clone()
    }

    /// How many requests were received.
    pub fn seen_count(&self) -> usize {
        self.state.seen.lock().len()
    }

    /// Queued faults not consumed yet.
    pub fn faults_left(&self) -> usize {
        self.state.faults.lock().len()
    }

    /// Connections accepted, the ones reset by
    /// [`reset_next_connections`](Self::reset_next_connections) included.
    pub fn accepted_connections(&self) -> usize {
        self.state.accepted.load(Ordering::SeqCst)
    }

    /// The most requests the server was handling at once.
    pub fn max_in_flight(&self) -> usize {
        self.state.max_in_flight.load(Ordering::SeqCst)
    }

    /// While `true`, `/readyz` answers 503 `degraded` (database unhealthy).
    pub fn set_ready_degraded(&self, degraded: bool) {
        self.state.ready_degraded.store(degraded, Ordering::SeqCst);
    }

    /// Makes `/health` report `memory_ok: false` (status `degraded`) while
    /// `down`, as the real server does when its memory backend is lost;
    /// every other route keeps answering.
    pub fn set_memory_down(&self, down: bool) {
        self.state.memory_down.store(down, Ordering::SeqCst);
    }

    /// Makes `route` (a route template, e.g. `/context/adaptation/state`)
    /// answer 500 on every call; `None` heals it.
    pub fn fail_route(&self, route: Option<&str>) {
        *self.state.failing_route.lock() = route.map(str::to_owned);
    }
}

struct FaultyListener {
    inner: tokio::net::TcpListener,
    state: Arc<ServerState>,
}

impl axum::serve::Listener for FaultyListener {
    type Io = tokio::net::TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((stream, addr)) = self.inner.accept().await else {
                continue;
            };
            self.state.accepted.fetch_add(1, Ordering::SeqCst);
            let reset = self
                .state
                .resets
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            if reset {
                // Abortive close: the peer gets a TCP RST.
                let _ = stream.set_zero_linger();
                drop(stream);
                continue;
            }
            return (stream, addr);
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}
