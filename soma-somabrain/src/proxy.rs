//! Gateway helper (feature `axum`): the platform's operator routes, proxied
//! through a [`SomabrainClient`].
//!
//! | gateway route | SomaBrain call |
//! |---|---|
//! | `POST /v1/context` (body: [`ContextRequest`]) | [`SomabrainClient::context_evaluate`] |
//! | `GET /v1/weights` | [`SomabrainClient::adaptation_state`] |
//! | `POST /v1/learning/reward` (body: [`FeedbackRequest`]) | [`SomabrainClient::context_feedback`] |
//! | `GET /v1/flags/{flag}` | [`SomabrainClient::feature_flags`] → `{"flag", "enabled"}`, 404 for an unknown flag |
//!
//! **Tenant.** The tenant comes from a [`Scope`] request extension, which
//! the gateway's authentication layer inserts (identity travels in
//! extensions, never in a header the caller chooses). Without one, the
//! `X-Tenant-ID` header is used only if [`ProxyOptions::trust_tenant_header`]
//! is set, else the client's default tenant.
//!
//! **Request id.** The id the gateway's
//! [`RequestIdLayer`](soma_observability::http::RequestIdLayer) gave the
//! request (its [`RequestId`] extension) goes on to SomaBrain as
//! `x-request-id` ([`REQUEST_ID_HEADER`]); without the layer, a valid
//! `x-request-id` of the caller is passed on.
//!
//! **Errors** are [`Problem`] bodies (`application/problem+json`), and the
//! `detail` of every upstream fault names SomaBrain:
//!
//! | what happened | status | `code` |
//! |---|---|---|
//! | the caller's body is not JSON / not the expected shape | 400 / 422 | `invalid_body` / `invalid_request` |
//! | the body is not sent as `Content-Type: application/json` | 415 | `unsupported_media_type` |
//! | the body is over the router's body limit | 413 | `body_too_large` |
//! | a flag SomaBrain does not know | 404 | `unknown_flag` |
//! | SomaBrain refused the caller's input or rate (its 400, 409, 413, 422, 429) | the same | `somabrain_rejected` |
//! | SomaBrain refused the gateway (401/403: its token; 404/405: its path prefix), answered 5xx or something unreadable | 502 | `somabrain_bad_gateway` |
//! | SomaBrain unreachable or its breaker open (`Retry-After` set) | 503 | `somabrain_unavailable` |
//! | SomaBrain did not answer in time (or answered 408) | 504 | `somabrain_timeout` |
//!
//! A fault of SomaBrain's is never a 4xx: the caller did nothing wrong.
//!
//! ```
//! # fn demo(client: soma_somabrain::SomabrainClient) {
//! let app: axum::Router = axum::Router::new()
//!     .merge(soma_somabrain::proxy::router(client));
//! # let _ = app; }
//! ```

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::de::DeserializeOwned;
use serde_json::json;

use soma_observability::http::{
    Problem, REQUEST_ID_HEADER, RequestId, is_valid_request_id, json_body,
};

use crate::client::TENANT_HEADER;
use crate::model::{ContextRequest, FeedbackRequest};
use crate::{CallOptions, Error, ErrorKind, SomabrainClient};

/// The caller's scope, inserted as a request extension by the gateway's
/// authentication layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    /// Tenant.
    pub tenant: String,
    /// Namespace (the client's default when `None`).
    pub namespace: Option<String>,
}

/// Options of the proxy router.
#[derive(Debug, Clone, Default)]
pub struct ProxyOptions {
    /// Use the caller's `X-Tenant-ID` when no [`Scope`] extension is
    /// present. Only for gateways whose callers are trusted.
    pub trust_tenant_header: bool,
}

#[derive(Clone)]
struct ProxyState {
    client: SomabrainClient,
    options: ProxyOptions,
}

/// The proxy routes, with default [`ProxyOptions`].
pub fn router<S: Clone + Send + Sync + 'static>(client: SomabrainClient) -> Router<S> {
    router_with(client, ProxyOptions::default())
}

/// The proxy routes.
pub fn router_with<S: Clone + Send + Sync + 'static>(
    client: SomabrainClient,
    options: ProxyOptions,
) -> Router<S> {
    Router::new()
        .route("/v1/context", post(context))
        .route("/v1/weights", get(weights))
        .route("/v1/learning/reward", post(reward))
        .route("/v1/flags/{flag}", get(flag))
        .with_state(ProxyState { client, options })
}

fn call_options(
    state: &ProxyState,
    scope: Option<Extension<Scope>>,
    request_id: Option<Extension<RequestId>>,
    headers: &HeaderMap,
) -> CallOptions {
    let mut opts = CallOptions::new();
    if let Some(Extension(scope)) = scope {
        opts = opts.tenant(scope.tenant);
        if let Some(ns) = scope.namespace {
            opts = opts.namespace(ns);
        }
    } else if state.options.trust_tenant_header {
        if let Some(t) = headers.get(TENANT_HEADER).and_then(|v| v.to_str().ok()) {
            opts = opts.tenant(t);
        }
    }
    let id = match &request_id {
        Some(Extension(id)) => Some(id.header_value()),
        None => headers
            .get(REQUEST_ID_HEADER)
            .filter(|v| is_valid_request_id(v)),
    };
    if let Some(id) = id.and_then(|v| v.to_str().ok()) {
        opts = opts.request_id(id);
    }
    opts
}

fn parse<T: DeserializeOwned>(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<T, Box<Response>> {
    json_body(headers, body).map_err(|p| Box::new(p.into_response()))
}

async fn context(
    State(state): State<ProxyState>,
    scope: Option<Extension<Scope>>,
    request_id: Option<Extension<RequestId>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let req: ContextRequest = match parse(&headers, body) {
        Ok(r) => r,
        Err(resp) => return *resp,
    };
    let opts = call_options(&state, scope, request_id, &headers);
    respond(state.client.context_evaluate(&req, opts).await)
}

async fn weights(
    State(state): State<ProxyState>,
    scope: Option<Extension<Scope>>,
    request_id: Option<Extension<RequestId>>,
    headers: HeaderMap,
) -> Response {
    let opts = call_options(&state, scope, request_id, &headers);
    respond(state.client.adaptation_state(opts).await)
}

async fn reward(
    State(state): State<ProxyState>,
    scope: Option<Extension<Scope>>,
    request_id: Option<Extension<RequestId>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let req: FeedbackRequest = match parse(&headers, body) {
        Ok(r) => r,
        Err(resp) => return *resp,
    };
    let opts = call_options(&state, scope, request_id, &headers);
    respond(state.client.context_feedback(&req, opts).await)
}

async fn flag(
    State(state): State<ProxyState>,
    Path(flag): Path<String>,
    scope: Option<Extension<Scope>>,
    request_id: Option<Extension<RequestId>>,
    headers: HeaderMap,
) -> Response {
    let opts = call_options(&state, scope, request_id, &headers);
    match state.client.feature_flags(opts).await {
        Ok(flags) => match flags.get(&flag) {
            Some(enabled) => {
                axum::Json(json!({ "flag": flag, "enabled": enabled })).into_response()
            }
            None => Problem::new(
                StatusCode::NOT_FOUND,
                "unknown_flag",
                format!("SomaBrain has no flag {flag:?}"),
            )
            .into_response(),
        },
        Err(e) => error_response(&e),
    }
}

fn respond<T: serde::Serialize>(result: Result<T, Error>) -> Response {
    match result {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => error_response(&e),
    }
}

/// Maps a client error to the gateway's answer: a [`Problem`] naming
/// SomaBrain (see the module docs).
pub fn error_response(e: &Error) -> Response {
    let upstream = e
        .status()
        .map_or_else(|| "no answer".to_owned(), |s| s.as_u16().to_string());
    let (status, code, detail) = match e.kind() {
        // The caller's input or rate: pass through. Anything else (401/403:
        // the gateway's token; 404/405: the gateway's prefix) is the
        // gateway's own upstream problem.
        ErrorKind::Rejected => match e.status().map(|s| s.as_u16()) {
            Some(s @ (400 | 409 | 413 | 422 | 429)) => (
                StatusCode::from_u16(s).unwrap_or(StatusCode::BAD_REQUEST),
                "somabrain_rejected",
                format!(
                    "SomaBrain refused the request ({s}): {}",
                    e.detail().map_or_else(|| e.to_string(), |d| d.to_string())
                ),
            ),
            Some(408) => (
                StatusCode::GATEWAY_TIMEOUT,
                "somabrain_timeout",
                format!("SomaBrain timed out (408): {e}"),
            ),
            _ => (
                StatusCode::BAD_GATEWAY,
                "somabrain_bad_gateway",
                format!("SomaBrain refused the gateway ({upstream}): {e}"),
            ),
        },
        ErrorKind::InvalidRequest => (
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("not a valid SomaBrain request: {e}"),
        ),
        ErrorKind::Timeout => (
            StatusCode::GATEWAY_TIMEOUT,
            "somabrain_timeout",
            format!("SomaBrain did not answer in time: {e}"),
        ),
        ErrorKind::CircuitOpen | ErrorKind::Transport => (
            StatusCode::SERVICE_UNAVAILABLE,
            "somabrain_unavailable",
            format!("SomaBrain is unavailable: {e}"),
        ),
        ErrorKind::Server | ErrorKind::Decode | ErrorKind::Config => (
            StatusCode::BAD_GATEWAY,
            "somabrain_bad_gateway",
            format!("SomaBrain failed ({upstream}): {e}"),
        ),
    };
    let mut resp = Problem::new(status, code, detail).into_response();
    if status == StatusCode::SERVICE_UNAVAILABLE || e.is_rate_limited() {
        let secs = e.retry_after().map_or(1, |d| d.as_secs().max(1));
        if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
    }
    resp
}
