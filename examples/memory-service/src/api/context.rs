//! `/context/*`: evaluate (context build), feedback (reward), adaptation
//! state (weights), feature flags.
//!
//! No learning happens here. Evaluate is a ranked recall across the
//! tenant's namespaces plus a prompt assembled from the hits; feedback is
//! stored and counted; the weights are fixed ([`RETRIEVAL`], [`UTILITY`],
//! [`LEARNING_RATE`]) and `adaptation_applied` is always `false`.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde_json::{Map, Value, json};

use super::wire::{self, EVALUATE, FEEDBACK, Rejection};
use super::{Shared, header_str};
use crate::store::{Feedback, LayerFilter, Query as RecallQuery};

/// Retrieval weights reported by evaluate and adaptation state (α, β, γ, τ):
/// SomaBrain's shape, fixed values.
pub(crate) const RETRIEVAL: [(&str, f64); 4] =
    [("alpha", 1.0), ("beta", 0.2), ("gamma", 0.1), ("tau", 0.7)];
/// Utility weights (λ, μ, ν), fixed.
pub(crate) const UTILITY: [(&str, f64); 3] = [("lambda_", 1.0), ("mu", 0.1), ("nu", 0.05)];
/// Reported learning rate (nothing is learned).
pub(crate) const LEARNING_RATE: f64 = 0.05;

/// SomaBrain's feature flags (the 16 it reports), all off: this service
/// has none of those cognitive features.
const FLAGS: [&str; 16] = [
    "minimal_public_api",
    "allow_anonymous_tenants",
    "kill_switch",
    "allow_tiny_embedder",
    "enable_cog_threads",
    "enable_sleep",
    "consolidation_enabled",
    "use_planner",
    "use_focus_state",
    "use_microcircuits",
    "use_hrr",
    "use_meta_brain",
    "use_exec_controller",
    "use_drift_monitor",
    "use_sdr_prefilter",
    "use_graph_augment",
];

fn weights<const N: usize>(w: [(&str, f64); N]) -> Value {
    Value::Object(w.iter().map(|(k, v)| ((*k).to_owned(), json!(v))).collect())
}

/// The call's tenant: the body's `tenant_id`, else `X-Tenant-ID`, else
/// `public`.
fn tenant<'a>(body: &'a Map<String, Value>, headers: &'a HeaderMap) -> &'a str {
    body.get("tenant_id")
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
        .or(header_str(headers, "x-tenant-id"))
        .unwrap_or("public")
}

/// `POST /context/evaluate` (JSON body, the contract the client models):
/// the `top_k` best memories of the tenant for `query`, in every namespace,
/// and a prompt that lists them.
pub(super) async fn evaluate(
    State(st): State<Shared>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Rejection> {
    st.authorize(&headers)?;
    let obj = wire::parse_body(&body, &[EVALUATE])?;
    let tenant = tenant(&obj, &headers);
    let text = obj["query"].as_str().unwrap_or_default();
    let top_k = obj.get("top_k").and_then(Value::as_i64).unwrap_or(5);
    let top_k = u32::try_from(top_k.max(0))
        .unwrap_or(u32::MAX)
        .min(st.config.max_top_k);
    let query = RecallQuery {
        tenant,
        namespace: None,
        universe: None,
        text,
        layer: LayerFilter::Ltm,
        top_k,
    };
    let found = st.store.recall(&query).await?;
    let mut prompt = String::from("Relevant memories:\n");
    let memories: Vec<Value> = found
        .hits
        .iter()
        .map(|h| {
            let line = h
                .payload
                .get("text")
                .and_then(Value::as_str)
                .map(str::to_owned)
                .unwrap_or_else(|| h.payload.to_string());
            prompt.push_str("- ");
            prompt.push_str(&line);
            prompt.push('\n');
            let mut m = h.payload.clone();
            m["score"] = json!((h.score * 1e6).round() / 1e6);
            m
        })
        .collect();
    if memories.is_empty() {
        prompt.push_str("(none)\n");
    }
    prompt.push_str("\nQuery: ");
    prompt.push_str(text);
    Ok(wire::json_response(
        StatusCode::OK,
        &json!({
            "query": text,
            "prompt": prompt,
            "tenant_id": tenant,
            "memories": memories,
            "weights": weights(RETRIEVAL),
        }),
    ))
}

/// `POST /context/feedback` (the platform's reward): stored, counted, not
/// learned from.
pub(super) async fn feedback(
    State(st): State<Shared>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Rejection> {
    st.authorize(&headers)?;
    let obj = wire::parse_body(&body, &[FEEDBACK])?;
    let s = |k: &str| obj.get(k).and_then(Value::as_str).unwrap_or_default();
    let f = Feedback {
        tenant: tenant(&obj, &headers),
        session_id: s("session_id"),
        query: s("query"),
        prompt: s("prompt"),
        response_text: s("response_text"),
        utility: obj
            .get("utility")
            .and_then(Value::as_f64)
            .unwrap_or_default(),
        reward: obj.get("reward").and_then(Value::as_f64),
        metadata: obj.get("metadata").filter(|m| m.is_object()),
    };
    let n = st.store.record_feedback(&f).await?;
    Ok(wire::json_response(
        StatusCode::OK,
        &json!({"accepted": true, "adaptation_applied": false, "history_len": n}),
    ))
}

/// `GET /context/adaptation/state?tenant_id=`: the fixed weights and the
/// tenant's stored feedback count.
pub(super) async fn adaptation_state(
    State(st): State<Shared>,
    headers: HeaderMap,
    Query(q): Query<BTreeMap<String, String>>,
) -> Result<Response, Rejection> {
    st.authorize(&headers)?;
    let tenant = q
        .get("tenant_id")
        .map(String::as_str)
        .filter(|t| !t.is_empty())
        .or(header_str(&headers, "x-tenant-id"))
        .unwrap_or("public");
    let n = st.store.feedback_count(tenant).await?;
    Ok(wire::json_response(
        StatusCode::OK,
        &json!({
            "tenant_id": tenant,
            "retrieval": weights(RETRIEVAL),
            "utility": weights(UTILITY),
            "history_len": n,
            "learning_rate": LEARNING_RATE,
        }),
    ))
}

/// `GET /context/feature-flags` (no auth, as SomaBrain).
pub(super) async fn feature_flags() -> Response {
    let flags: BTreeMap<&str, bool> = FLAGS.iter().map(|f| (*f, false)).collect();
    wire::json_response(StatusCode::OK, &json!(flags))
}
