//! A typed, circuit-broken client for the SomaBrain memory service.
//!
//! # Why
//!
//! SomaBrain is called on every agent turn (remember, recall, context,
//! reward, weights, flags). The client it replaces serialized every call
//! behind one per-process lock, counted retries as breaker failures, called
//! paths no SomaBrain server ever served, and fixed the tenant per process.
//! This one is async and concurrent, matches the server's real routes
//! (recorded exchanges are its conformance tests), and says plainly when
//! SomaBrain is not there.
//!
//! # Guarantees
//!
//! - **Concurrent.** Nothing serializes calls; one client (cheap to clone)
//!   shares a keep-alive pool.
//! - **Scoped per call.** Every call takes a tenant and namespace
//!   ([`CallOptions`]), defaulting to the configured ones. The client writes
//!   the tenant into `X-Tenant-ID` *and* into the body or query wherever the
//!   route names one, from the same value, so they cannot disagree (recall
//!   reads only the header; remember only the body).
//! - **One breaker per endpoint group, counting calls, not attempts.**
//!   Memory writes, memory reads, context/learning and the operator probes
//!   ([`EndpointGroup`]) each have their own shared
//!   [`CircuitBreaker`](soma_observability::resilience::CircuitBreaker)
//!   (component `somabrain.memory_write` etc.), so one failing route does
//!   not refuse the others. A call with two failed attempts and a third
//!   that succeeds is one success. After `breaker.failure_threshold`
//!   (default 3) consecutive failed calls of a group (transport error,
//!   timeout, 5xx, 429, undecodable body) its breaker opens and its calls
//!   fail at once with [`Error::is_circuit_open`] — no request, no
//!   waiting. After `breaker.open_ms` (default 30 s) exactly one probe
//!   call goes through (or the health check probes); its success closes
//!   the breaker, its failure re-opens it. Any other 4xx proves the server
//!   is up and counts as a success.
//! - **Retries only where repeating is safe.** Reads and keyed writes
//!   (remember, batch: the same key + universe overwrites) are retried on
//!   transport errors, timeouts, 408, 429, 502, 503 and 504, with full-jitter
//!   exponential backoff, honouring `Retry-After`, within the call's
//!   deadline. Context evaluate and feedback are retried only when the
//!   connection was refused (nothing reached the server). Other 4xx and 500
//!   are never retried. Every attempt carries the same `X-Request-ID`.
//! - **Deadlines.** Each call has one deadline covering all attempts and
//!   backoff; each attempt also has a timeout.
//! - **Typed errors.** [`Error`] carries the status, the server's detail
//!   (string, 422 list, or the title of an HTML error page — never a parse
//!   failure) and the request id, with predicates `is_unavailable`,
//!   `is_circuit_open`, `is_rejected`, `is_unauthorized`, `is_timeout`.
//! - **Write acknowledgements are not overstated.** The server reports
//!   `persisted_to_ltm: true` even when its backend is down; responses keep
//!   its `warnings` and the client logs them, and while the last `/health`
//!   the client read said `memory_ok: false` every remember result carries
//!   `memory_backend_down` ([`SomabrainClient::memory_backend_down`]);
//!   [`RememberResponse::is_confirmed`] is true only without either.
//! - **What is kept under failure.** Nothing is buffered: a call that fails
//!   (or is refused by the open breaker) returns its error to the caller,
//!   who still owns the request. The client never drops a write silently
//!   and never queues one behind the caller's back.
//! - **Observed.** Metrics per route template (see [`metrics`]), a span per
//!   call (`somabrain.call` with `endpoint`, `tenant`, `request_id`) whose
//!   W3C trace context (`traceparent`) is injected into every attempt, and a
//!   health component ([`SomabrainHealthCheck`]).
//!
//! # Example
//!
//! ```no_run
//! use soma_somabrain::{CallOptions, Memory, RecallRequest, SomabrainClient, SomabrainConfig};
//! # async fn demo() -> Result<(), soma_somabrain::Error> {
//! let client = SomabrainClient::new(SomabrainConfig::default().with_token("dev-token"))?;
//! let scope = CallOptions::new().tenant("acme").namespace("agent");
//!
//! let memory = Memory::from_json("note-1", serde_json::json!({"text": "window seat"}))?;
//! let ack = client.remember(&memory, scope.clone()).await?;
//! if !ack.is_confirmed() {
//!     eprintln!("stored, but: {:?}", ack.warnings);
//! }
//!
//! match client.recall(&RecallRequest::new("seat").top_k(5), scope).await {
//!     Ok(found) => println!("{} hits", found.results.len()),
//!     Err(e) if e.is_unavailable() => println!("memory unavailable, answering without it"),
//!     Err(e) => return Err(e),
//! }
//! # Ok(()) }
//! ```
//!
//! # Features
//!
//! - `axum`: [`proxy`], an axum router for the gateway's operator routes.
//! - `testkit`: [`testkit::ContractServer`], a strict SomaBrain stand-in on a
//!   loopback port for downstream unit tests, with fault injection.
#![cfg_attr(docsrs, feature(doc_cfg))]

mod client;
mod config;
mod endpoint;
mod error;
mod health;
pub mod metrics;
mod model;
#[cfg(feature = "axum")]
pub mod proxy;
#[cfg(feature = "testkit")]
#[cfg_attr(docsrs, doc(cfg(feature = "testkit")))]
pub mod testkit;

#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
pub use client::{
    CallOptions, FAST_ACK_HEADER, HeaderInjector, NAMESPACE_HEADER, SomabrainClient,
    SomabrainClientBuilder, TENANT_HEADER,
};
pub use config::{RetryConfig, SomabrainConfig};
pub use endpoint::{Endpoint, EndpointGroup};
pub use error::{Error, ErrorKind, ServerDetail, ValidationIssue};
pub use health::{COMPONENT, SomabrainHealthCheck};
/// The old name of [`MemoryLayer`].
#[allow(deprecated)]
pub use model::Layer;
pub use model::{
    AdaptationState, AggregateHealth, AggregateStatus, Attachment, BatchItemResult, ContextRequest,
    ContextResponse, FeatureFlags, FeedbackRequest, FeedbackResponse, HitLayer, JsonObject, Link,
    Liveness, Memory, MemoryLayer, MemoryMetrics, Readiness, ReadyStatus, RecallHit, RecallRequest,
    RecallResponse, RememberBatch, RememberBatchResponse, RememberResponse, RetrievalWeights,
    SignalFeedback, Signals, UtilityWeights,
};
/// `x-request-id`: the one request-id header of the workspace (a re-export
/// of [`soma_observability::http::REQUEST_ID_HEADER`], which the gateway's
/// request-id layer sets).
pub use soma_observability::http::REQUEST_ID_HEADER;
