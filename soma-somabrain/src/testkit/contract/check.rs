//! What the server checks before a route answers: the token and scope
//! headers, the query of a GET, the JSON body of a POST and its fields.

use std::collections::BTreeMap;

use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use serde_json::{Map, Value, json};

use super::{Check, FieldCheck, detail, json_response};
use crate::testkit::TOKEN;

/// Checks a routed request as the real server would, stricter where that
/// catches client bugs (see the [module docs](crate::testkit)); `Err` is the answer.
pub(super) fn validate(
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

pub(super) fn remember_fields(obj: &Map<String, Value>, loc: &[Value], issues: &mut Vec<Value>) {
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

pub(super) fn remember_batch_fields(
    obj: &Map<String, Value>,
    loc: &[Value],
    issues: &mut Vec<Value>,
) {
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

pub(super) fn recall_fields(obj: &Map<String, Value>, loc: &[Value], issues: &mut Vec<Value>) {
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

pub(super) fn context_evaluate_fields(
    obj: &Map<String, Value>,
    loc: &[Value],
    issues: &mut Vec<Value>,
) {
    check_fields(
        obj,
        &["session_id", "query", "top_k", "tenant_id"],
        &["session_id", "query", "top_k", "tenant_id"],
        loc,
        issues,
    );
}

pub(super) fn context_feedback_fields(
    obj: &Map<String, Value>,
    loc: &[Value],
    issues: &mut Vec<Value>,
) {
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
