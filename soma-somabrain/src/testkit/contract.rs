//! The contract itself: routing, validation and the recorded responses.
//!
//! A request goes through [`handle`] in stages: it is recorded as [`Seen`],
//! delayed, routed through the table of [`Route`]s, validated, given an
//! injected fault if one is due, and answered by its route's function.

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

use super::{Fault, HTML_404, NINJA_JSON, Seen, ServerState, Stored, TOKEN};

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

const MEMORY_FIELDS: &[&str] = &[
    "key",
    "value",
    "meta",
    "universe",
    "ttl_seconds",
    "tags",
    "policy_tags",
    "attachments",
    "links",
    "signals",
    "importance",
    "novelty",
    "trace_id",
];

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

fn healthz(_: &Call<'_>) -> Response {
    json_response(
        StatusCode::OK,
        json!({"status": "healthy", "timestamp": "2026-11-22T03:01:03+00:00"}),
    )
}

fn readyz(c: &Call<'_>) -> Response {
    if c.st.ready_degraded.load(Ordering::SeqCst) {
        json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"status": "degraded", "checks": {"database": "unhealthy", "cache": "healthy"}}),
        )
    } else {
        json_response(
            StatusCode::OK,
            json!({"status": "ready", "checks": {"database": "healthy", "cache": "healthy"}}),
        )
    }
}

fn health(c: &Call<'_>) -> Response {
    json_response(
        StatusCode::OK,
        if c.st.memory_down.load(Ordering::SeqCst) {
            json!({"status": "degraded", "version": "1.0.0", "ok": false, "memory_ok": false})
        } else {
            json!({"status": "healthy", "version": "1.0.0", "ok": true, "memory_ok": true})
        },
    )
}

fn remember(c: &Call<'_>) -> Response {
    let body = &c.body;
    let item = store(
        c.st,
        &body["tenant"],
        &body["namespace"],
        body["universe"].as_str(),
        body,
    );
    let mut r = write_result(&item, body, c.request_id.clone(), c.fast_ack);
    r["ok"] = json!(true);
    r["tenant"] = body["tenant"].clone();
    r["namespace"] = body["namespace"].clone();
    json_response(StatusCode::OK, r)
}

fn remember_batch(c: &Call<'_>) -> Response {
    let body = &c.body;
    let results: Vec<Value> = body["items"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, it)| {
            let universe = it["universe"].as_str().or(body["universe"].as_str());
            let item = store(c.st, &body["tenant"], &body["namespace"], universe, it);
            let mut r = write_result(
                &item,
                it,
                c.request_id.as_ref().map(|id| format!("{id}:{i}")),
                false,
            );
            r.as_object_mut().unwrap().remove("queued_for_ltm");
            r
        })
        .collect();
    json_response(
        StatusCode::OK,
        json!({"ok": true, "tenant": body["tenant"], "namespace": body["namespace"], "results": results}),
    )
}

fn recall(c: &Call<'_>) -> Response {
    let body = &c.body;
    let ns = body["namespace"].as_str().unwrap_or("default").to_owned();
    let top_k = body["top_k"].as_u64().unwrap_or(10) as usize;
    let layer = body["layer"].as_str().unwrap_or("both");
    let q = body["query"].as_str().unwrap_or("").to_lowercase();
    let items =
        c.st.store
            .lock()
            .get(&c.tenant)
            .cloned()
            .unwrap_or_default();
    let mut results = Vec::new();
    let (mut wm, mut ltm) = (0, 0);
    if layer != "ltm" {
        // Like the real server: WM is every item of the header tenant, any namespace.
        for it in &items {
            wm += 1;
            results.push(json!({"content": it.payload, "layer": "wm", "score": 1.0}));
        }
    }
    if layer != "wm" {
        for it in items.iter().filter(|i| i.namespace == ns) {
            let text = it.payload["text"].as_str().unwrap_or("").to_lowercase();
            if !q.is_empty() && text.contains(&q) {
                ltm += 1;
                results.push(json!({"content": it.payload, "layer": "ltm", "score": 0.5, "coordinate": coord(&it.universe, &it.key)}));
            }
        }
    }
    results.truncate(top_k);
    json_response(
        StatusCode::OK,
        json!({"tenant": c.tenant, "namespace": ns, "results": results, "wm_hits": wm, "ltm_hits": ltm,
               "duration_ms": 1.5, "total_results": results.len(), "degraded": false, "degraded_reasons": []}),
    )
}

fn memory_metrics(c: &Call<'_>) -> Response {
    let n = c.st.store.lock().get(&c.tenant).map_or(0, Vec::len);
    json_response(
        StatusCode::OK,
        json!({"tenant": c.query["tenant"], "namespace": c.query["namespace"], "wm_items": n, "circuit_open": false}),
    )
}

fn context_evaluate(c: &Call<'_>) -> Response {
    let body = &c.body;
    json_response(
        StatusCode::OK,
        json!({"query": body["query"], "prompt": format!("Context for: {}", body["query"].as_str().unwrap_or("")),
               "tenant_id": body["tenant_id"], "memories": [], "weights": {"alpha": 1.0}}),
    )
}

fn context_feedback(c: &Call<'_>) -> Response {
    *c.st.feedback.lock().entry(c.tenant.clone()).or_default() += 1;
    json_response(
        StatusCode::OK,
        json!({"accepted": true, "adaptation_applied": true}),
    )
}

fn adaptation_state(c: &Call<'_>) -> Response {
    let n = c.st.feedback.lock().get(&c.tenant).copied().unwrap_or(0);
    json_response(
        StatusCode::OK,
        json!({"tenant_id": c.query.get("tenant_id"), "retrieval": {"alpha": 1.0, "beta": 0.2, "gamma": 0.1, "tau": 0.7},
               "utility": {"lambda_": 1.0, "mu": 0.1, "nu": 0.05}, "history_len": n, "learning_rate": 0.05}),
    )
}

fn feature_flags(_: &Call<'_>) -> Response {
    json_response(
        StatusCode::OK,
        serde_json::from_str::<Value>(include_str!(
            "../../tests/fixtures/15-context-feature-flags.json"
        ))
        .expect("embedded fixture 15 is JSON")["response"]["body"]
            .clone(),
    )
}

fn coord(universe: &str, key: &str) -> Value {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (universe, key).hash(&mut h);
    let v = h.finish();
    let f = |s: u32| ((v >> s) & 0xffff) as f64 / 32768.0 - 1.0;
    json!([f(0), f(16), f(32)])
}

fn store(
    st: &ServerState,
    tenant: &Value,
    ns: &Value,
    universe: Option<&str>,
    item: &Value,
) -> Stored {
    let tenant = tenant.as_str().unwrap().to_owned();
    let mut payload = item["value"].as_object().cloned().unwrap_or_default();
    payload.insert("tenant".into(), json!(tenant));
    payload.insert("namespace".into(), ns.clone());
    payload.insert("key".into(), item["key"].clone());
    let stored = Stored {
        namespace: ns.as_str().unwrap().to_owned(),
        key: item["key"].as_str().unwrap().to_owned(),
        universe: universe.unwrap_or("real").to_owned(),
        payload: Value::Object(payload),
    };
    let mut store = st.store.lock();
    let items = store.entry(tenant).or_default();
    // Same key + universe → same coordinate → overwrite.
    items.retain(|i| !(i.key == stored.key && i.universe == stored.universe));
    items.push(stored.clone());
    stored
}

fn write_result(item: &Stored, req: &Value, request_id: Option<String>, fast_ack: bool) -> Value {
    let ttl = req["ttl_seconds"]
        .as_u64()
        .or(req["signals"]["ttl_seconds"].as_u64());
    let importance = req["importance"]
        .as_f64()
        .or(req["signals"]["importance"].as_f64());
    let novelty = req["novelty"]
        .as_f64()
        .or(req["signals"]["novelty"].as_f64());
    json!({
        "key": item.key, "coordinate": coord(&item.universe, &item.key),
        "promoted_to_wm": true, "persisted_to_ltm": !fast_ack, "queued_for_ltm": fast_ack, "deduplicated": false,
        "importance": importance, "novelty": novelty, "ttl_applied": ttl, "trace_id": req["trace_id"],
        "request_id": request_id,
        "warnings": if fast_ack { vec!["ltm-persist:queued-async"] } else { vec![] },
        "signals": {"importance": importance, "novelty": novelty, "ttl_seconds": ttl, "reinforcement": null,
                    "recall_bias": null, "promoted_to_wm": true, "persisted_to_ltm": !fast_ack},
    })
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

fn missing(loc: Vec<Value>) -> Value {
    json!({"type": "missing", "loc": loc, "msg": "Field required"})
}

fn extra(loc: Vec<Value>) -> Value {
    json!({"type": "extra_forbidden", "loc": loc, "msg": "Extra inputs are not permitted"})
}

fn check_fields(
    obj: &Map<String, Value>,
    required: &[&str],
    allowed: &[&str],
    loc: &[Value],
    issues: &mut Vec<Value>,
) {
    for f in required {
        if obj.get(*f).is_none_or(Value::is_null) {
            let mut l = loc.to_vec();
            l.push(json!(f));
            issues.push(missing(l));
        }
    }
    for k in obj.keys() {
        if !allowed.contains(&k.as_str()) {
            let mut l = loc.to_vec();
            l.push(json!(k));
            issues.push(extra(l));
        }
    }
}

/// Checks a routed request as the real server would, stricter where that
/// catches client bugs (see the [module docs](super)); `Err` is the answer.
fn validate(
    check: &Check,
    headers: &HeaderMap,
    query: &BTreeMap<String, String>,
    bytes: &[u8],
) -> Result<(), Response> {
    let scope = Scope::of(headers);
    match check {
        Check::Probe => Ok(()),
        Check::Open => check_query(&[], None, &scope, query, bytes),
        Check::Query {
            allowed,
            tenant_key,
        } => {
            check_guard(headers, &scope)?;
            check_query(allowed, Some(*tenant_key), &scope, query, bytes)
        }
        Check::Body {
            fields,
            tenant_key,
            namespace_key,
        } => {
            check_guard(headers, &scope)?;
            check_body(*fields, tenant_key, *namespace_key, &scope, headers, bytes)
        }
    }
}

/// The scope headers a request sent.
struct Scope<'a> {
    /// `X-Tenant-ID`.
    tenant: Option<&'a str>,
    /// `X-Namespace`.
    namespace: Option<&'a str>,
}

impl<'a> Scope<'a> {
    fn of(headers: &'a HeaderMap) -> Self {
        let h = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
        Scope {
            tenant: h("x-tenant-id"),
            namespace: h("x-namespace"),
        }
    }
}

/// The memory and context routes' guard: the bearer [`TOKEN`] (else 401),
/// then a non-empty `X-Tenant-ID` (else 400).
fn check_guard(headers: &HeaderMap, scope: &Scope<'_>) -> Result<(), Response> {
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if auth != Some(&format!("Bearer {TOKEN}")) {
        return Err(detail(StatusCode::UNAUTHORIZED, "Unauthorized"));
    }
    if scope.tenant.is_none_or(str::is_empty) {
        return Err(detail(
            StatusCode::BAD_REQUEST,
            "X-Tenant-ID header required",
        ));
    }
    Ok(())
}

/// A GET: no body (400), only `allowed` query parameters (422), the query's
/// `tenant_key` equal to `X-Tenant-ID` and its namespace to `X-Namespace`
/// when both are sent (400).
fn check_query(
    allowed: &[&str],
    tenant_key: Option<&str>,
    scope: &Scope<'_>,
    query: &BTreeMap<String, String>,
    bytes: &[u8],
) -> Result<(), Response> {
    if !bytes.is_empty() {
        return Err(detail(StatusCode::BAD_REQUEST, "GET with a body"));
    }
    let bad: Vec<Value> = query
        .keys()
        .filter(|k| !allowed.contains(&k.as_str()))
        .map(|k| extra(vec![json!("query"), json!(k)]))
        .collect();
    if !bad.is_empty() {
        return Err(json_response(
            StatusCode::UNPROCESSABLE_ENTITY,
            json!({"detail": bad}),
        ));
    }
    if let Some(tk) = tenant_key {
        if query.get(tk).map(String::as_str) != scope.tenant {
            return Err(detail(
                StatusCode::BAD_REQUEST,
                &format!("query {tk} does not match X-Tenant-ID"),
            ));
        }
    }
    if let (Some(ns), Some(q)) = (scope.namespace, query.get("namespace")) {
        if ns != q {
            return Err(detail(
                StatusCode::BAD_REQUEST,
                "X-Namespace does not match query namespace",
            ));
        }
    }
    Ok(())
}

/// A POST: a JSON object sent as `application/json` (400), whose fields pass
/// `fields` (422), whose `tenant_key` (when sent) equals `X-Tenant-ID` and
/// whose `namespace_key` equals `X-Namespace` when the header is sent (400).
fn check_body(
    fields: FieldCheck,
    tenant_key: &str,
    namespace_key: Option<&str>,
    scope: &Scope<'_>,
    headers: &HeaderMap,
    bytes: &[u8],
) -> Result<(), Response> {
    let ct = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let Some(Value::Object(obj)) = (ct.starts_with("application/json"))
        .then(|| serde_json::from_slice::<Value>(bytes).ok())
        .flatten()
    else {
        return Err(detail(StatusCode::BAD_REQUEST, "Cannot parse request body"));
    };
    let mut issues = Vec::new();
    fields(&obj, &[json!("body"), json!("payload")], &mut issues);
    if !issues.is_empty() {
        return Err(json_response(
            StatusCode::UNPROCESSABLE_ENTITY,
            json!({"detail": issues}),
        ));
    }
    if let Some(t) = obj.get(tenant_key) {
        if t.as_str() != scope.tenant {
            return Err(detail(
                StatusCode::BAD_REQUEST,
                &format!("body {tenant_key} does not match X-Tenant-ID"),
            ));
        }
    }
    if let (Some(nk), Some(ns)) = (namespace_key, scope.namespace) {
        if obj.get(nk).and_then(Value::as_str) != Some(ns) {
            return Err(detail(
                StatusCode::BAD_REQUEST,
                "X-Namespace does not match body namespace",
            ));
        }
    }
    Ok(())
}

fn remember_fields(obj: &Map<String, Value>, loc: &[Value], issues: &mut Vec<Value>) {
    let allowed: Vec<&str> = ["tenant", "namespace"]
        .iter()
        .chain(MEMORY_FIELDS)
        .copied()
        .collect();
    check_fields(
        obj,
        &["tenant", "namespace", "key", "value"],
        &allowed,
        loc,
        issues,
    );
    check_memory(obj, loc, issues);
}

fn remember_batch_fields(obj: &Map<String, Value>, loc: &[Value], issues: &mut Vec<Value>) {
    check_fields(
        obj,
        &["tenant", "namespace", "items"],
        &["tenant", "namespace", "items", "universe"],
        loc,
        issues,
    );
    match obj.get("items").and_then(Value::as_array) {
        Some(items) if !items.is_empty() => {
            for (i, it) in items.iter().enumerate() {
                let iloc = [loc[0].clone(), loc[1].clone(), json!("items"), json!(i)];
                match it.as_object() {
                    Some(o) => {
                        check_fields(o, &["key", "value"], MEMORY_FIELDS, &iloc, issues);
                        check_memory(o, &iloc, issues);
                    }
                    None => issues.push(json!({"type": "model_type", "loc": iloc, "msg": "Input should be an object"})),
                }
            }
        }
        Some(_) => issues.push(json!({"type": "too_short", "loc": [loc[0], loc[1], "items"], "msg": "List should have at least 1 item"})),
        None => {}
    }
}

fn recall_fields(obj: &Map<String, Value>, loc: &[Value], issues: &mut Vec<Value>) {
    check_fields(
        obj,
        &["query"],
        &["query", "top_k", "layer", "tenant", "namespace", "universe"],
        loc,
        issues,
    );
    if let Some(l) = obj.get("layer") {
        if !matches!(l.as_str(), Some("wm" | "ltm" | "both")) {
            issues.push(json!({"type": "enum", "loc": [loc[0], loc[1], "layer"], "msg": "layer must be wm, ltm or both"}));
        }
    }
}

fn context_evaluate_fields(obj: &Map<String, Value>, loc: &[Value], issues: &mut Vec<Value>) {
    check_fields(
        obj,
        &["session_id", "query", "top_k", "tenant_id"],
        &["session_id", "query", "top_k", "tenant_id"],
        loc,
        issues,
    );
}

fn context_feedback_fields(obj: &Map<String, Value>, loc: &[Value], issues: &mut Vec<Value>) {
    let allowed = [
        "session_id",
        "query",
        "prompt",
        "response_text",
        "utility",
        "reward",
        "metadata",
        "tenant_id",
    ];
    check_fields(
        obj,
        &[
            "session_id",
            "query",
            "prompt",
            "response_text",
            "utility",
            "tenant_id",
        ],
        &allowed,
        loc,
        issues,
    );
}

fn check_memory(obj: &Map<String, Value>, loc: &[Value], issues: &mut Vec<Value>) {
    let at = |f: &str| {
        let mut l = loc.to_vec();
        l.push(json!(f));
        l
    };
    if obj
        .get("key")
        .is_some_and(|k| k.as_str().is_none_or(str::is_empty))
    {
        issues.push(json!({"type": "string_too_short", "loc": at("key"), "msg": "String should have at least 1 character"}));
    }
    if obj.get("value").is_some_and(|v| !v.is_object()) {
        issues.push(json!({"type": "dict_type", "loc": at("value"), "msg": "Input should be a valid dictionary"}));
    }
    for (name, allowed) in [(
        "signals",
        &[
            "importance",
            "novelty",
            "ttl_seconds",
            "reinforcement",
            "recall_bias",
        ][..],
    )] {
        if let Some(Value::Object(o)) = obj.get(name) {
            check_fields(o, &[], allowed, &at(name), issues);
        }
    }
    if let Some(Value::Array(a)) = obj.get("attachments") {
        for (i, x) in a.iter().enumerate() {
            if let Some(o) = x.as_object() {
                let mut l = at("attachments");
                l.push(json!(i));
                check_fields(
                    o,
                    &["kind"],
                    &["kind", "uri", "content_type", "checksum", "data", "meta"],
                    &l,
                    issues,
                );
            }
        }
    }
    if let Some(Value::Array(a)) = obj.get("links") {
        for (i, x) in a.iter().enumerate() {
            if let Some(o) = x.as_object() {
                let mut l = at("links");
                l.push(json!(i));
                check_fields(
                    o,
                    &["rel", "target"],
                    &["rel", "target", "weight", "meta"],
                    &l,
                    issues,
                );
            }
        }
    }
}
