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
//! **Errors** come back as `{"detail": ..., "upstream_status": ..., "request_id": ...}`:
//! SomaBrain's 400, 409, 413, 422 and 429 (the caller's input or rate) are
//! passed through with its detail; other 4xx (401/403: the gateway's token,
//! 404/405: its path prefix) and 5xx or unreadable answers are 502; an open
//! breaker or unreachable SomaBrain is 503 with `Retry-After`; a timeout
//! (or 408) is 504.
//!
//! ```
//! # fn demo(client: soma_somabrain::SomabrainClient) {
//! let app: axum::Router = axum::Router::new()
//!     .merge(soma_somabrain::proxy::router(client));
//! # let _ = app; }
//! ```

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Extension, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::client::{REQUEST_ID_HEADER, TENANT_HEADER};
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
    if let Some(id) = headers.get(REQUEST_ID_HEADER).and_then(|v| v.to_str().ok()) {
        opts = opts.request_id(id);
    }
    opts
}

fn parse<T: DeserializeOwned>(body: &Bytes) -> Result<T, Box<Response>> {
    serde_json::from_slice(body).map_err(|e| {
        let status = if e.is_data() {
            StatusCode::UNPROCESSABLE_ENTITY
        } else {
            StatusCode::BAD_REQUEST
        };
        Box::new((status, axum::Json(json!({ "detail": e.to_string() }))).into_response())
    })
}

async fn context(
    State(state): State<ProxyState>,
    scope: Option<Extension<Scope>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let req: ContextRequest = match parse(&body) {
        Ok(r) => r,
        Err(resp) => return *resp,
    };
    let opts = call_options(&state, scope, &headers);
    respond(state.client.context_evaluate(&req, opts).await)
}

async fn weights(
    State(state): State<ProxyState>,
    scope: Option<Extension<Scope>>,
    headers: HeaderMap,
) -> Response {
    let opts = call_options(&state, scope, &headers);
    respond(state.client.adaptation_state(opts).await)
}

async fn reward(
    State(state): State<ProxyState>,
    scope: Option<Extension<Scope>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let req: FeedbackRequest = match parse(&body) {
        Ok(r) => r,
        Err(resp) => return *resp,
    };
    let opts = call_options(&state, scope, &headers);
    respond(state.client.context_feedback(&req, opts).await)
}

async fn flag(
    State(state): State<ProxyState>,
    Path(flag): Path<String>,
    scope: Option<Extension<Scope>>,
    headers: HeaderMap,
) -> Response {
    let opts = call_options(&state, scope, &headers);
    match state.client.feature_flags(opts).await {
        Ok(flags) => match flags.get(&flag) {
            Some(enabled) => {
                axum::Json(json!({ "flag": flag, "enabled": enabled })).into_response()
            }
            None => (
                StatusCode::NOT_FOUND,
                axum::Json(json!({ "detail": format!("unknown flag {flag:?}") })),
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

/// Maps a client error to the gateway's answer (see the module docs).
pub fn error_response(e: &Error) -> Response {
    let status = match e.kind() {
        // The caller's input or rate: pass through. Anything else (401/403:
        // the gateway's token; 404/405: the gateway's prefix) is the
        // gateway's own upstream problem.
        ErrorKind::Rejected => match e.status().map(|s| s.as_u16()) {
            Some(s @ (400 | 409 | 413 | 422 | 429)) => {
                StatusCode::from_u16(s).unwrap_or(StatusCode::BAD_REQUEST)
            }
            Some(408) => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::BAD_GATEWAY,
        },
        ErrorKind::InvalidRequest => StatusCode::BAD_REQUEST,
        ErrorKind::Timeout => StatusCode::GATEWAY_TIMEOUT,
        ErrorKind::CircuitOpen | ErrorKind::Transport => StatusCode::SERVICE_UNAVAILABLE,
        ErrorKind::Server | ErrorKind::Decode | ErrorKind::Config => StatusCode::BAD_GATEWAY,
    };
    let detail = match e.detail() {
        Some(d) if status.is_client_error() => d.to_string(),
        _ => e.to_string(),
    };
    let body = json!({
        "detail": detail,
        "upstream_status": e.status().map(|s| s.as_u16()),
        "request_id": e.request_id(),
    });
    let mut resp = (status, axum::Json(body)).into_response();
    if status == StatusCode::SERVICE_UNAVAILABLE || e.is_rate_limited() {
        let secs = e.retry_after().map_or(1, |d| d.as_secs().max(1));
        if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
    }
    resp
}
