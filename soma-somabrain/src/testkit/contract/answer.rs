//! What each route answers to a request that passed validation: the
//! recorded responses, with remembered memories kept per tenant.

use std::sync::atomic::Ordering;

use axum::http::StatusCode;
use axum::response::Response;
use serde_json::{Value, json};

use super::{Call, json_response};
use crate::testkit::{ServerState, Stored};

pub(super) fn healthz(_: &Call<'_>) -> Response {
    json_response(
        StatusCode::OK,
        json!({"status": "healthy", "timestamp": "2026-11-22T03:01:03+00:00"}),
    )
}

pub(super) fn readyz(c: &Call<'_>) -> Response {
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

pub(super) fn health(c: &Call<'_>) -> Response {
    json_response(
        StatusCode::OK,
        if c.st.memory_down.load(Ordering::SeqCst) {
            json!({"status": "degraded", "version": "1.0.0", "ok": false, "memory_ok": false})
        } else {
            json!({"status": "healthy", "version": "1.0.0", "ok": true, "memory_ok": true})
        },
    )
}

pub(super) fn remember(c: &Call<'_>) -> Response {
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

pub(super) fn remember_batch(c: &Call<'_>) -> Response {
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

pub(super) fn recall(c: &Call<'_>) -> Response {
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

pub(super) fn memory_metrics(c: &Call<'_>) -> Response {
    let n = c.st.store.lock().get(&c.tenant).map_or(0, Vec::len);
    json_response(
        StatusCode::OK,
        json!({"tenant": c.query["tenant"], "namespace": c.query["namespace"], "wm_items": n, "circuit_open": false}),
    )
}

pub(super) fn context_evaluate(c: &Call<'_>) -> Response {
    let body = &c.body;
    json_response(
        StatusCode::OK,
        json!({"query": body["query"], "prompt": format!("Context for: {}", body["query"].as_str().unwrap_or("")),
               "tenant_id": body["tenant_id"], "memories": [], "weights": {"alpha": 1.0}}),
    )
}

pub(super) fn context_feedback(c: &Call<'_>) -> Response {
    *c.st.feedback.lock().entry(c.tenant.clone()).or_default() += 1;
    json_response(
        StatusCode::OK,
        json!({"accepted": true, "adaptation_applied": true}),
    )
}

pub(super) fn adaptation_state(c: &Call<'_>) -> Response {
    let n = c.st.feedback.lock().get(&c.tenant).copied().unwrap_or(0);
    json_response(
        StatusCode::OK,
        json!({"tenant_id": c.query.get("tenant_id"), "retrieval": {"alpha": 1.0, "beta": 0.2, "gamma": 0.1, "tau": 0.7},
               "utility": {"lambda_": 1.0, "mu": 0.1, "nu": 0.05}, "history_len": n, "learning_rate": 0.05}),
    )
}

pub(super) fn feature_flags(_: &Call<'_>) -> Response {
    json_response(
        StatusCode::OK,
        serde_json::from_str::<Value>(include_str!(
            "../../../tests/fixtures/15-context-feature-flags.json"
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
