//! `/memory/*`: remember, batch remember, recall, metrics.

use std::collections::BTreeMap;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use super::wire::{self, BATCH, MEMORY, RECALL, Rejection, SCOPE};
use super::{Shared, header_str, request_id};
use crate::store::{LayerFilter, NewMemory, Query as RecallQuery};

/// The coordinate SomaBrain derives from universe + key: three numbers in
/// `[-1, 1)`, the same for the same pair (so a rewrite lands on the same
/// point). Derived here from SHA-256; the values differ from SomaBrain's.
pub(crate) fn coordinate(universe: &str, key: &str) -> Vec<f64> {
    let digest = Sha256::digest(format!("{universe}\u{1f}{key}").as_bytes());
    digest
        .chunks_exact(8)
        .take(3)
        .map(|c| {
            let mut b = [0u8; 8];
            b.copy_from_slice(c);
            (u64::from_be_bytes(b) >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
        })
        .collect()
}

/// Every string in `value` (depth first), space-separated: what recall
/// ranks against. Object keys are structure, not content, and are left out.
fn collect_text(value: &Value, out: &mut String) {
    match value {
        Value::String(s) => {
            if !out.is_empty() {
                out.push(' ');
            }
            out.push_str(s);
        }
        Value::Array(items) => items.iter().for_each(|v| collect_text(v, out)),
        Value::Object(map) => map.values().for_each(|v| collect_text(v, out)),
        _ => {}
    }
}

/// The signals as applied: top-level shortcuts win over `signals.*`.
struct Applied {
    importance: Option<f64>,
    novelty: Option<f64>,
    ttl: Option<u64>,
}

fn applied(m: &Map<String, Value>) -> Applied {
    let sig = |k: &str| m.get("signals").and_then(|s| s.get(k));
    let num = |k: &str| {
        m.get(k)
            .and_then(Value::as_f64)
            .or(sig(k).and_then(Value::as_f64))
    };
    Applied {
        importance: num("importance"),
        novelty: num("novelty"),
        ttl: m
            .get("ttl_seconds")
            .and_then(Value::as_u64)
            .or(sig("ttl_seconds").and_then(Value::as_u64)),
    }
}

/// Turns a validated memory object into a row: the stored payload is the
/// memory's `value` plus SomaBrain's server fields (as recall returns them).
fn new_memory(
    m: &Map<String, Value>,
    tenant: &str,
    namespace: &str,
    default_universe: &str,
) -> NewMemory {
    let key = m.get("key").and_then(Value::as_str).unwrap_or_default();
    let universe = m
        .get("universe")
        .and_then(Value::as_str)
        .filter(|u| !u.is_empty())
        .unwrap_or(default_universe);
    let coordinate = coordinate(universe, key);
    let mut payload = m
        .get("value")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let mut search_text = String::new();
    collect_text(&Value::Object(payload.clone()), &mut search_text);
    if let Some(tags) = m.get("tags") {
        collect_text(tags, &mut search_text);
    }
    for (k, v) in [
        ("tenant", json!(tenant)),
        ("tenant_id", json!(tenant)),
        ("namespace", json!(namespace)),
        ("key", json!(key)),
        ("universe", json!(universe)),
        ("memory_type", json!("episodic")),
        ("coordinate", json!(coordinate)),
    ] {
        payload.insert(k.into(), v);
    }
    for k in [
        "meta",
        "tags",
        "policy_tags",
        "attachments",
        "links",
        "signals",
        "ttl_seconds",
        "importance",
        "novelty",
        "trace_id",
    ] {
        if let Some(v) = m.get(k).filter(|v| !v.is_null()) {
            payload.insert(k.into(), v.clone());
        }
    }
    if !payload.contains_key("tags") {
        payload.insert("tags".into(), json!([]));
    }
    if !payload.contains_key("policy_tags") {
        payload.insert("policy_tags".into(), json!([]));
    }
    NewMemory {
        universe: universe.to_owned(),
        key: key.to_owned(),
        payload: Value::Object(payload),
        search_text,
        coordinate,
        ttl_seconds: applied(m).ttl,
    }
}

/// One write result, as `MemoryWriteResponse` / `MemoryBatchWriteResult`.
fn write_result(m: &Map<String, Value>, row: &NewMemory, dedup: bool, request_id: String) -> Value {
    let a = applied(m);
    let sig = m.get("signals");
    let sig_str = |k: &str| sig.and_then(|s| s.get(k)).cloned().unwrap_or(Value::Null);
    json!({
        "key": row.key,
        "coordinate": row.coordinate,
        "promoted_to_wm": true,
        "persisted_to_ltm": true,
        "queued_for_ltm": false,
        "deduplicated": dedup,
        "importance": a.importance,
        "novelty": a.novelty,
        "ttl_applied": a.ttl,
        "trace_id": m.get("trace_id").cloned().unwrap_or(Value::Null),
        "request_id": request_id,
        "warnings": [],
        "signals": {
            "importance": a.importance,
            "novelty": a.novelty,
            "ttl_seconds": a.ttl,
            "reinforcement": sig_str("reinforcement"),
            "recall_bias": sig_str("recall_bias"),
            "promoted_to_wm": true,
            "persisted_to_ltm": true,
        },
    })
}

/// `POST /memory/remember`: stores one memory where the **body** says
/// (`tenant`, `namespace`), as SomaBrain does. Synchronous: the answer
/// comes after the PostgreSQL commit, so `persisted_to_ltm` is true and
/// `X-Soma-Fast-Ack` changes nothing.
pub(super) async fn remember(
    State(st): State<Shared>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Rejection> {
    st.authorize(&headers)?;
    let obj = wire::parse_body(&body, &[SCOPE, MEMORY])?;
    let tenant = obj["tenant"].as_str().unwrap_or_default();
    let namespace = obj["namespace"].as_str().unwrap_or_default();
    let row = new_memory(&obj, tenant, namespace, &st.config.default_universe);
    let dedup = st
        .store
        .write(tenant, namespace, std::slice::from_ref(&row))
        .await?
        .first()
        .copied()
        .unwrap_or(false);
    st.metrics.write(dedup);
    let mut out = write_result(&obj, &row, dedup, request_id(&headers));
    out["ok"] = json!(true);
    out["tenant"] = json!(tenant);
    out["namespace"] = json!(namespace);
    Ok(wire::json_response(StatusCode::OK, &out))
}

/// `POST /memory/remember/batch`: every item in one transaction (all or
/// none); per-item `request_id` is `<X-Request-ID>:<index>`.
pub(super) async fn remember_batch(
    State(st): State<Shared>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Rejection> {
    st.authorize(&headers)?;
    let obj = wire::parse_body(&body, &[BATCH])?;
    let tenant = obj["tenant"].as_str().unwrap_or_default();
    let namespace = obj["namespace"].as_str().unwrap_or_default();
    let batch_universe = obj
        .get("universe")
        .and_then(Value::as_str)
        .filter(|u| !u.is_empty())
        .unwrap_or(&st.config.default_universe);
    let items: Vec<&Map<String, Value>> = obj["items"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_object).collect())
        .unwrap_or_default();
    let rows: Vec<NewMemory> = items
        .iter()
        .map(|m| new_memory(m, tenant, namespace, batch_universe))
        .collect();
    let dedups = st.store.write(tenant, namespace, &rows).await?;
    let rid = request_id(&headers);
    let results: Vec<Value> = items
        .iter()
        .zip(&rows)
        .zip(&dedups)
        .enumerate()
        .map(|(i, ((m, row), dedup))| {
            st.metrics.write(*dedup);
            let mut r = write_result(m, row, *dedup, format!("{rid}:{i}"));
            if let Some(o) = r.as_object_mut() {
                o.remove("queued_for_ltm");
            }
            r
        })
        .collect();
    Ok(wire::json_response(
        StatusCode::OK,
        &json!({"ok": true, "tenant": tenant, "namespace": namespace, "results": results}),
    ))
}

/// `POST /memory/recall`: the tenant comes from `X-Tenant-ID` only (the
/// body's `tenant` is ignored, as SomaBrain does), the namespace from the
/// body. Unlike SomaBrain, working memory is ranked and filtered by
/// namespace like everything else (see the crate docs).
pub(super) async fn recall(
    State(st): State<Shared>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Rejection> {
    let started = Instant::now();
    st.authorize(&headers)?;
    let obj = wire::parse_body(&body, &[RECALL])?;
    let (layer, label) = match obj.get("layer").and_then(Value::as_str).unwrap_or("both") {
        "wm" => (LayerFilter::Wm, "wm"),
        "ltm" => (LayerFilter::Ltm, "ltm"),
        _ => (LayerFilter::Both, "both"),
    };
    let tenant = header_str(&headers, "x-tenant-id").unwrap_or("public");
    let namespace = obj
        .get("namespace")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .unwrap_or("default");
    let top_k = obj.get("top_k").and_then(Value::as_i64).unwrap_or(10);
    let top_k = u32::try_from(top_k.max(0))
        .unwrap_or(u32::MAX)
        .min(st.config.max_top_k);
    let query = RecallQuery {
        tenant,
        namespace: Some(namespace),
        universe: obj.get("universe").and_then(Value::as_str),
        text: obj["query"].as_str().unwrap_or_default(),
        layer,
        top_k,
    };
    let found = st.store.recall(&query).await?;
    st.metrics.recall(label, !found.hits.is_empty());
    let (wm_hits, ltm_hits) = match layer {
        LayerFilter::Wm => (found.wm_matches, 0),
        LayerFilter::Ltm => (0, found.matches),
        LayerFilter::Both => (found.wm_matches, found.matches - found.wm_matches),
    };
    let results: Vec<Value> = found
        .hits
        .iter()
        .map(|h| {
            let as_wm = h.in_wm && layer != LayerFilter::Ltm;
            let mut hit = json!({
                "content": h.payload,
                "layer": if as_wm { "wm" } else { "ltm" },
                "score": (h.score * 1e6).round() / 1e6,
            });
            if !as_wm {
                hit["coordinate"] = json!(h.coordinate);
            }
            hit
        })
        .collect();
    let duration_ms = (started.elapsed().as_secs_f64() * 1e6).round() / 1e3;
    Ok(wire::json_response(
        StatusCode::OK,
        &json!({
            "tenant": tenant,
            "namespace": namespace,
            "total_results": results.len(),
            "results": results,
            "wm_hits": wm_hits,
            "ltm_hits": ltm_hits,
            "duration_ms": duration_ms,
            "degraded": false,
            "degraded_reasons": [],
        }),
    ))
}

/// `GET /memory/metrics?tenant=&namespace=`: working-memory size of the
/// scope (query first, then `X-Tenant-ID`, then `public` / `default`).
pub(super) async fn metrics(
    State(st): State<Shared>,
    headers: HeaderMap,
    Query(q): Query<BTreeMap<String, String>>,
) -> Result<Response, Rejection> {
    st.authorize(&headers)?;
    let tenant = q
        .get("tenant")
        .map(String::as_str)
        .filter(|t| !t.is_empty())
        .or(header_str(&headers, "x-tenant-id"))
        .unwrap_or("public");
    let namespace = q
        .get("namespace")
        .map(String::as_str)
        .filter(|n| !n.is_empty())
        .unwrap_or("default");
    let n = st.store.wm_items(tenant, namespace).await?;
    Ok(wire::json_response(
        StatusCode::OK,
        &json!({"tenant": tenant, "namespace": namespace, "wm_items": n, "circuit_open": false}),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coordinates_are_stable_and_bounded() {
        let a = coordinate("real", "note-1");
        assert_eq!(a, coordinate("real", "note-1"));
        assert_ne!(a, coordinate("real", "note-2"));
        assert_ne!(a, coordinate("other", "note-1"));
        assert_eq!(a.len(), 3);
        assert!(a.iter().all(|x| (-1.0..1.0).contains(x)));
    }

    #[test]
    fn payload_carries_value_and_server_fields() {
        let m: Map<String, Value> = serde_json::from_value(json!({
            "key": "k", "value": {"text": "window seat", "n": {"deep": "aisle"}},
            "tags": ["travel"], "signals": {"importance": 0.8, "ttl_seconds": 60},
            "ttl_seconds": null
        }))
        .unwrap();
        let row = new_memory(&m, "acme", "agent", "real");
        assert_eq!(row.payload["text"], "window seat");
        assert_eq!(row.payload["tenant"], "acme");
        assert_eq!(row.payload["namespace"], "agent");
        assert_eq!(row.payload["key"], "k");
        assert_eq!(row.payload["universe"], "real");
        assert!(!row.payload.as_object().unwrap().contains_key("ttl_seconds"));
        assert_eq!(row.ttl_seconds, Some(60));
        let mut words: Vec<&str> = row.search_text.split(' ').collect();
        words.sort_unstable();
        assert_eq!(words, ["aisle", "seat", "travel", "window"]);
    }
}
