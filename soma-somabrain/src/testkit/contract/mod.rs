//! The contract itself: routing, validation and the recorded responses.
//!
//! A request goes through [`handle`] in stages: it is recorded as [`Seen`],
//! delayed, routed through the table of [`Route`]s, validated (`check`),
//! given an injected fault if one is due, and answered by its route's
//! function (`answer`).

mod answer;
mod check;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use super::{Fault, HTML_404, NINJA_JSON, Seen, ServerState};
use answer::{
    adaptation_state, context_evaluate, context_feedback, feature_flags, health, healthz,
    memory_metrics, readyz, recall, remember, remember_batch,
};
use check::{
    context_evaluate_fields, context_feedback_fields, recall_fields, remember_batch_fields,
    remember_fields, validate,
};

fn json_response(status: StatusCode, body: Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, NINJA_JSON)],
        body.to_string(),
    )
        .into_response()
}

fn detail(status: StatusCode, msg: &str) -> Response {
    json_response(status, json!({ "detail": msg }))
}

fn html(status: StatusCode, body: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        body.to_owned(),
    )
        .into_response()
}

/// What a route answers to a request that passed validation.
type Answer = fn(&Call<'_>) -> Response;

/// One route of the contract: its path template, its method, what is
/// checked before it answers, and its answer.
struct Route {
    path: &'static str,
    method: Method,
    check: Check,
    answer: Answer,
}

impl Route {
    const fn new(path: &'static str, method: Method, check: Check, answer: Answer) -> Self {
        Route {
            path,
            method,
            check,
            answer,
        }
    }
}

/// Adds the problems of a JSON body's fields to `issues`, each located
/// under `loc` (`["body", "payload"]`).
type FieldCheck = fn(&Map<String, Value>, &[Value], &mut Vec<Value>);

/// What the server checks before a route answers (see [`validate`]).
enum Check {
    /// Nothing: the probes.
    Probe,
    /// A GET without the token or `X-Tenant-ID` (feature flags): no body,
    /// no query parameter.
    Open,
    /// A GET with the token and `X-Tenant-ID`: no body, only `allowed`
    /// query parameters, and the query's `tenant_key` equal to the header.
    Query {
        allowed: &'static [&'static str],
        tenant_key: &'static str,
    },
    /// A POST with the token, `X-Tenant-ID` and a JSON object whose fields
    /// pass `fields`; the body's `tenant_key` (when sent) equals
    /// `X-Tenant-ID`, and its `namespace_key` equals `X-Namespace` (when
    /// sent).
    Body {
        fields: FieldCheck,
        tenant_key: &'static str,
        namespace_key: Option<&'static str>,
    },
}

impl Check {
    const fn query(allowed: &'static [&'static str], tenant_key: &'static str) -> Self {
        Check::Query {
            allowed,
            tenant_key,
        }
    }

    const fn body(
        fields: FieldCheck,
        tenant_key: &'static str,
        namespace_key: Option<&'static str>,
    ) -> Self {
        Check::Body {
            fields,
            tenant_key,
            namespace_key,
        }
    }
}

/// The memory and context API, served at the root and under `/api`.
const API_ROUTES: &[Route] = &[
    Route::new(
        "/memory/remember",
        Method::POST,
        Check::body(remember_fields, "tenant", Some("namespace")),
        remember,
    ),
    Route::new(
        "/memory/remember/batch",
        Method::POST,
        Check::body(remember_batch_fields, "tenant", Some("namespace")),
        remember_batch,
    ),
    Route::new(
        "/memory/recall",
        Method::POST,
        Check::body(recall_fields, "tenant", Some("namespace")),
        recall,
    ),
    Route::new(
        "/memory/metrics",
        Method::GET,
        Check::query(&["tenant", "namespace"], "tenant"),
        memory_metrics,
    ),
    Route::new(
        "/context/evaluate",
        Method::POST,
        Check::body(context_evaluate_fields, "tenant_id", None),
        context_evaluate,
    ),
    Route::new(
        "/context/feedback",
        Method::POST,
        Check::body(context_feedback_fields, "tenant_id", None),
        context_feedback,
    ),
    Route::new(
        "/context/adaptation/state",
        Method::GET,
        Check::query(&["tenant_id"], "tenant_id"),
        adaptation_state,
    ),
    Route::new(
        "/context/feature-flags",
        Method::GET,
        Check::Open,
        feature_flags,
    ),
];
/// The probes, served at the root only.
const PROBES: &[Route] = &[
    Route::new("/healthz", Method::GET, Check::Probe, healthz),
    Route::new("/readyz", Method::GET, Check::Probe, readyz),
    Route::new("/health", Method::GET, Check::Probe, health),
];

/// The route serving `path`: API routes at the root and under `/api`,
/// probes at the root.
fn find_route(path: &str) -> Option<&'static Route> {
    let api_path = path
        .strip_prefix("/api")
        .filter(|p| p.starts_with('/'))
        .unwrap_or(path);
    API_ROUTES
        .iter()
        .find(|r| r.path == api_path)
        .or_else(|| PROBES.iter().find(|r| r.path == path))
}

/// Counts a request in flight while it is held.
struct InFlight<'a>(&'a ServerState);

impl<'a> InFlight<'a> {
    fn enter(st: &'a ServerState) -> Self {
        let n = st.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        st.max_in_flight.fetch_max(n, Ordering::SeqCst);
        InFlight(st)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Serves one request: records it, waits out the configured delay, routes
/// it (404, 405), validates it, gives it an injected fault if one is due,
/// and answers it from its route.
pub(super) async fn handle(State(st): State<Arc<ServerState>>, req: Request) -> Response {
    let _in_flight = InFlight::enter(&st);

    let (parts, body) = req.into_parts();
    let bytes: Bytes = axum::body::to_bytes(body, 1 << 20)
        .await
        .unwrap_or_default();
    let path = parts.uri.path();
    let query: BTreeMap<String, String> =
        parts.uri.query().map(url_decode_pairs).unwrap_or_default();
    record(&st, &parts, &query, &bytes);

    let delay = st.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay as u64)).await;
    }

    let Some(route) = find_route(path) else {
        return html(StatusCode::NOT_FOUND, HTML_404);
    };
    if parts.method != route.method {
        return html(StatusCode::METHOD_NOT_ALLOWED, "Method not allowed");
    }
    if let Err(resp) = validate(&route.check, &parts.headers, &query, &bytes) {
        return resp;
    }
    if let Some(resp) = injected_fault(&st, route.path).await {
        return resp;
    }
    (route.answer)(&Call::new(&st, &parts.headers, &query, &bytes))
}

/// Keeps the request as [`Seen`] (the body as JSON, or as a string when it
/// is not JSON), before anything can reject it.
fn record(st: &ServerState, parts: &Parts, query: &BTreeMap<String, String>, bytes: &[u8]) {
    let headers: BTreeMap<String, String> = parts
        .headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                v.to_str().unwrap_or("<non-ascii>").to_owned(),
            )
        })
        .collect();
    let body_json: Option<Value> = if bytes.is_empty() {
        None
    } else {
        Some(
            serde_json::from_slice(bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(bytes).into())),
        )
    };
    st.seen.lock().push(Seen {
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
        query: query.clone(),
        headers,
        body: body_json,
    });
}

/// The response that replaces the route's answer, if any: the 500 of a
/// [failing route](super::ContractServer::fail_route), else the next queued
/// [`Fault`] (a queued delay is waited out and the route answers).
async fn injected_fault(st: &ServerState, route: &str) -> Option<Response> {
    if st.failing_route.lock().as_deref() == Some(route) {
        return Some(json_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({"detail": "injected: route failing"}),
        ));
    }
    let fault = st.faults.lock().pop_front();
    match fault {
        Some(Fault::Respond {
            status,
            content_type,
            body,
            retry_after,
        }) => {
            let mut resp = (
                StatusCode::from_u16(status).unwrap(),
                [(header::CONTENT_TYPE, content_type)],
                body,
            )
                .into_response();
            if let Some(ra) = retry_after {
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, ra.parse().unwrap());
            }
            Some(resp)
        }
        Some(Fault::MalformedJson) => Some(
            (
                StatusCode::OK,
                [(header::CONTENT_TYPE, NINJA_JSON)],
                "{\"ok\": tru",
            )
                .into_response(),
        ),
        Some(Fault::Delay(d)) => {
            tokio::time::sleep(d).await;
            None
        }
        None => None,
    }
}

/// A request that passed validation, as the answers read it.
struct Call<'a> {
    st: &'a ServerState,
    query: &'a BTreeMap<String, String>,
    /// The JSON body; `Null` when there was none.
    body: Value,
    /// `X-Tenant-ID`, empty when absent.
    tenant: String,
    /// `X-Request-ID`.
    request_id: Option<String>,
    /// `X-Soma-Fast-Ack: true`.
    fast_ack: bool,
}

impl<'a> Call<'a> {
    fn new(
        st: &'a ServerState,
        headers: &HeaderMap,
        query: &'a BTreeMap<String, String>,
        bytes: &[u8],
    ) -> Self {
        let body: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(bytes).unwrap()
        };
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        Call {
            st,
            query,
            body,
            tenant: header("x-tenant-id").unwrap_or("").to_owned(),
            request_id: header("x-request-id").map(str::to_owned),
            fast_ack: header("x-soma-fast-ack") == Some("true"),
        }
    }
}

fn url_decode_pairs(q: &str) -> BTreeMap<String, String> {
    q.split('&')
        .filter(|s| !s.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (pct_decode(k), pct_decode(v))
        })
        .collect()
}

fn pct_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap_or(b'?'));
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
