//! The gateway proxy routes (`proxy` module, feature `axum`).

mod common;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::{ContractServer, Fault, fixture};
use serde_json::{Value, json};
use soma_somabrain::SomabrainClient;
use soma_somabrain::proxy::{self, ProxyOptions, Scope};
use tower::ServiceExt;

async fn send(app: &axum::Router, req: Request<Body>) -> (StatusCode, Option<String>, Value) {
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let retry_after = resp
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap();
    (
        status,
        retry_after,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

fn scoped(method: &str, uri: &str, tenant: &str, body: Option<Value>) -> Request<Body> {
    let mut b = Request::builder().method(method).uri(uri);
    b = b.extension(Scope {
        tenant: tenant.into(),
        namespace: None,
    });
    match body {
        Some(v) => b
            .header("content-type", "application/json")
            .body(Body::from(v.to_string()))
            .unwrap(),
        None => b.body(Body::empty()).unwrap(),
    }
}

#[tokio::test]
async fn operator_routes_go_through_the_client_with_the_callers_tenant() {
    let server = ContractServer::start().await;
    let client = SomabrainClient::new(server.config()).unwrap();
    let app: axum::Router = proxy::router(client);

    let (s, _, v) = send(
        &app,
        scoped(
            "POST",
            "/v1/context",
            "globex",
            Some(json!({"session_id": "s1", "query": "Paris", "top_k": 3})),
        ),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["tenant_id"], "globex");
    assert_eq!(v["prompt"], "Context for: Paris");

    let (s, _, v) = send(
        &app,
        scoped("POST", "/v1/learning/reward", "globex", Some(json!({"session_id": "s1", "query": "Paris", "prompt": "p", "response_text": "r", "utility": 0.9, "reward": 1.0}))),
    )
    .await;
    assert_eq!((s, v["accepted"].clone()), (StatusCode::OK, json!(true)));

    let (s, _, v) = send(&app, scoped("GET", "/v1/weights", "globex", None)).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["tenant_id"], "globex");
    assert_eq!(
        v["history_len"], 1,
        "the reward above was recorded for globex"
    );
    assert_eq!(v["utility"]["lambda_"], 1.0);

    let (s, _, v) = send(
        &app,
        scoped("GET", "/v1/flags/enable_sleep", "globex", None),
    )
    .await;
    assert_eq!(
        (s, v),
        (
            StatusCode::OK,
            json!({"flag": "enable_sleep", "enabled": true})
        )
    );
    let (s, _, _) = send(
        &app,
        scoped("GET", "/v1/flags/no_such_flag", "globex", None),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    for seen in server
        .seen()
        .iter()
        .filter(|s| s.path != "/context/feature-flags")
    {
        assert_eq!(seen.header("x-tenant-id"), Some("globex"), "{}", seen.path);
        let t = seen
            .body
            .as_ref()
            .and_then(|b| b["tenant_id"].as_str())
            .or(seen.query.get("tenant_id").map(String::as_str));
        assert_eq!(t, Some("globex"), "{}", seen.path);
    }
}

#[tokio::test]
async fn tenant_header_is_ignored_unless_trusted() {
    let server = ContractServer::start().await;
    let client = SomabrainClient::new(server.config()).unwrap();
    let untrusted: axum::Router = proxy::router(client.clone());
    let trusted: axum::Router = proxy::router_with(
        client,
        ProxyOptions {
            trust_tenant_header: true,
        },
    );
    let req = || {
        Request::builder()
            .uri("/v1/weights")
            .header("x-tenant-id", "mallory")
            .body(Body::empty())
            .unwrap()
    };
    let (_, _, v) = send(&untrusted, req()).await;
    assert_eq!(
        v["tenant_id"], "acme",
        "default tenant, not the caller's header"
    );
    let (_, _, v) = send(&trusted, req()).await;
    assert_eq!(v["tenant_id"], "mallory");
}

#[tokio::test]
async fn upstream_failures_map_to_gateway_statuses() {
    let server = ContractServer::start().await;
    let mut cfg = server.config();
    cfg.breaker.failure_threshold = 1;
    cfg.retry.max_retries = 0;
    let app: axum::Router = proxy::router(SomabrainClient::new(cfg).unwrap());
    let ctx = || {
        scoped(
            "POST",
            "/v1/context",
            "acme",
            Some(json!({"session_id": "s", "query": "q", "top_k": 1})),
        )
    };

    // The recorded upstream 422 is passed through with its detail.
    server.push(Fault::replay(&fixture("16-context-evaluate")));
    let (s, _, v) = send(&app, ctx()).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(v["code"], "somabrain_rejected", "{v}");
    assert_eq!(v["status"], 422);
    assert_eq!(
        v["detail"],
        "SomaBrain refused the request (422): query.payload: Field required (missing)"
    );

    // A bad body from the caller is refused before any upstream call.
    let before = server.seen_count();
    let (s, _, v) = send(
        &app,
        scoped("POST", "/v1/context", "acme", Some(json!({"query": 1}))),
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(v["code"], "invalid_request", "{v}");
    let (s, _, v) = send(
        &app,
        Request::builder()
            .method("POST")
            .uri("/v1/context")
            .header("content-type", "application/json")
            .body(Body::from("{not json"))
            .unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(v["code"], "invalid_body", "{v}");
    let (s, _, v) = send(
        &app,
        Request::builder()
            .method("POST")
            .uri("/v1/context")
            .header("content-type", "text/plain")
            .body(Body::from("{}"))
            .unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(v["code"], "unsupported_media_type", "{v}");
    assert_eq!(server.seen_count(), before);

    // The gateway's own upstream problems (token, prefix) are not the
    // caller's: 502.
    for upstream in [401, 404] {
        server.push(Fault::status(upstream));
        let (s, _, v) = send(&app, scoped("GET", "/v1/weights", "acme", None)).await;
        assert_eq!(s, StatusCode::BAD_GATEWAY, "{upstream}: {v}");
        assert_eq!(v["code"], "somabrain_bad_gateway", "{v}");
        let detail = v["detail"].as_str().unwrap();
        assert!(
            detail.starts_with(&format!("SomaBrain refused the gateway ({upstream})")),
            "{detail}"
        );
    }

    // The recorded 500 → 502, and it opens the breaker (threshold 1) → 503.
    server.push(Fault::replay(&fixture("18-context-adaptation-state")));
    let (s, _, v) = send(&app, scoped("GET", "/v1/weights", "acme", None)).await;
    assert_eq!(s, StatusCode::BAD_GATEWAY, "{v}");
    assert_eq!(v["code"], "somabrain_bad_gateway", "{v}");
    let (s, retry_after, v) = send(&app, ctx()).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert_eq!(v["code"], "somabrain_unavailable", "{v}");
    assert_eq!(v["type"], "https://soma.dev/problems/somabrain_unavailable");
    assert!(retry_after.is_some());
    assert!(
        v["detail"]
            .as_str()
            .unwrap()
            .contains("circuit breaker open")
    );
}
