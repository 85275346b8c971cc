//! The full stack in front of an axum handler: authentication, route
#![allow(clippy::field_reassign_with_default)] // tests tweak one setting of a default config
//! mapping, the reference policy, fail modes, audit, cache.

mod common;

use std::sync::Arc;

use axum::Router;
use axum::extract::Extension;
use axum::routing::{get, post};
use common::*;
use serde_json::{Value, json};
use soma_policy::{
    ApiKeyStore, Authenticator, AuthnLayer, Authorizer, AuthzLayer, CacheConfig, Decision,
    EmbeddedRego, FailMode, InMemoryApiKeyStore, JwtAlgorithm, MemoryAuditSink, OpaConfig,
    PolicyEngine, PolicyMetrics, Principal, RemoteOpa, RouteMap, RouteRule, generate_key,
};

fn routes() -> Arc<RouteMap> {
    Arc::new(
        RouteMap::new([
            RouteRule::new(
                "POST",
                "/v1/sessions/{session_id}/messages",
                "conversation.send",
                "session",
            )
            .with_id_param("session_id"),
            RouteRule::new("POST", "/v1/tools/{tool}/execute", "tool.execute", "tool")
                .with_id_param("tool"),
            RouteRule::new("GET", "/v1/schedules/{id}", "scheduler.read", "schedule")
                .with_id_param("id"),
            RouteRule::new(
                "DELETE",
                "/v1/schedules/{id}",
                "scheduler.delete",
                "schedule",
            )
            .with_id_param("id"),
        ])
        .unwrap(),
    )
}

async fn whoami(
    Extension(p): Extension<Principal>,
    Extension(d): Extension<Decision>,
) -> axum::Json<Value> {
    axum::Json(json!({"subject": p.subject, "tenant": p.tenant, "engine": d.engine}))
}

struct Stack {
    url: String,
    audit: MemoryAuditSink,
    metrics: PolicyMetrics,
    api_key: String,
}

async fn stack_with(engine: Arc<dyn PolicyEngine>, fail_mode: FailMode, cache: bool) -> Stack {
    let metrics = PolicyMetrics::default();
    let store = Arc::new(InMemoryApiKeyStore::new());
    let issued = generate_key(
        "soma",
        "agent-7",
        "t1",
        vec!["agent".into()],
        vec!["tool:execute".into()],
    );
    store.insert(issued.record.clone()).await.unwrap();
    let config = config_with_static_keys();
    let authn = Arc::new(
        Authenticator::builder(&config)
            .api_key_store(store)
            .metrics(metrics.clone())
            .build()
            .unwrap(),
    );
    let audit = MemoryAuditSink::new();
    let authz = Arc::new(
        Authorizer::builder(engine)
            .fail_mode(fail_mode)
            .cache(CacheConfig {
                enabled: cache,
                ttl_ms: 60_000,
                capacity: 1000,
            })
            .audit_sink(Arc::new(audit.clone()))
            .metrics(metrics.clone())
            .build(),
    );
    let app = Router::new()
        .route("/v1/sessions/{session_id}/messages", post(whoami))
        .route("/v1/tools/{tool}/execute", post(whoami))
        .route("/v1/schedules/{id}", get(whoami).delete(whoami))
        .route("/v1/unmapped", get(whoami))
        .route_layer(AuthzLayer::new(authz, routes()))
        .layer(AuthnLayer::new(authn));
    Stack {
        url: serve(app).await,
        audit,
        metrics,
        api_key: issued.key.expose_secret().to_owned(),
    }
}

async fn embedded_stack() -> Stack {
    let engine = EmbeddedRego::from_dir(
        policy_dir(),
        "data.soma.authz.decision",
        PolicyMetrics::default(),
    )
    .unwrap();
    stack_with(Arc::new(engine), FailMode::Closed, false).await
}

fn bearer(sub: &str) -> String {
    format!(
        "Bearer {}",
        mint(JwtAlgorithm::RS256, Some("rs"), &claims(sub))
    )
}

#[tokio::test]
async fn allowed_request_reaches_the_handler_with_principal_and_decision() {
    let s = embedded_stack().await;
    let c = reqwest::Client::new();
    let r = c
        .post(format!("{}/v1/sessions/s-1/messages", s.url))
        .header("authorization", bearer("alice"))
        .header("x-request-id", "req-42")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        body,
        json!({"subject": "alice", "tenant": "t1", "engine": "embedded"})
    );
    let events = s.audit.events();
    assert_eq!(events.len(), 1);
    let e = &events[0];
    assert_eq!(
        (e.subject.as_str(), e.tenant.as_str(), e.action.as_str()),
        ("alice", "t1", "conversation.send")
    );
    assert_eq!(e.resource.kind, "session");
    assert_eq!(e.resource.id.as_deref(), Some("s-1"));
    assert_eq!(e.result, "allow");
    assert_eq!(e.engine, "embedded");
    assert_eq!(e.request_id.as_deref(), Some("req-42"));
    assert_eq!(s.metrics.decisions_count("conversation.send", "allow"), 1);
}

#[tokio::test]
async fn missing_and_bad_credentials_get_401_with_www_authenticate_and_problem() {
    let s = embedded_stack().await;
    let c = reqwest::Client::new();
    let url = format!("{}/v1/sessions/s-1/messages", s.url);
    let r = c.post(&url).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["www-authenticate"], "Bearer realm=\"soma\"");
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["code"], "missing_credential");
    assert_eq!(body["status"], 401);

    let mut expired = claims("alice");
    expired["exp"] = json!(now() - 3600);
    let token = mint(JwtAlgorithm::RS256, Some("rs"), &expired);
    let r = c
        .post(&url)
        .header("authorization", format!("Bearer {token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let www = r.headers()["www-authenticate"].to_str().unwrap().to_owned();
    assert!(www.contains("error=\"invalid_token\""), "{www}");
    let body = r.text().await.unwrap();
    assert!(body.contains("\"expired\""));
    assert!(
        !body.contains(&token),
        "the credential must never be echoed"
    );
    for bad in ["Basic dXNlcjpwYXNz", "Bearer", "Bearer not.a.jwt"] {
        let r = c
            .post(&url)
            .header("authorization", bad)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{bad}");
    }
    assert!(
        s.audit.events().is_empty(),
        "unauthenticated requests never reach the authorizer"
    );
}

#[tokio::test]
async fn tenant_header_must_match_the_credential() {
    let s = embedded_stack().await;
    let c = reqwest::Client::new();
    let url = format!("{}/v1/sessions/s-1/messages", s.url);
    let r = c
        .post(&url)
        .header("authorization", bearer("alice"))
        .header("x-soma-tenant", "t2")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["code"], "tenant_mismatch");
    let r = c
        .post(&url)
        .header("authorization", bearer("alice"))
        .header("x-soma-tenant", "t1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn policy_denial_is_403_forbidden_and_unmapped_routes_are_denied() {
    let s = embedded_stack().await;
    let c = reqwest::Client::new();
    // A user may not execute tools.
    let r = c
        .post(format!("{}/v1/tools/search/execute", s.url))
        .header("authorization", bearer("alice"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["code"], "forbidden");
    assert!(body["detail"].as_str().unwrap().contains("missing_role"));
    // Unmapped route: denied, never reaches the handler.
    let r = c
        .get(format!("{}/v1/unmapped", s.url))
        .header("authorization", bearer("alice"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let events = s.audit.events();
    assert_eq!(events.len(), 2);
    assert_eq!(events[0].result, "deny");
    assert_eq!(events[1].reason, vec!["unmapped_route"]);
    // API-key principal (agent) may execute tools.
    let r = c
        .post(format!("{}/v1/tools/search/execute", s.url))
        .header("x-api-key", &s.api_key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = c
        .post(format!("{}/v1/tools/search/execute", s.url))
        .header("authorization", format!("Bearer {}", s.api_key))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["subject"], "agent-7");
}

fn dead_opa() -> Arc<dyn PolicyEngine> {
    let port = soma_testkit::free_port();
    Arc::new(
        RemoteOpa::new(&OpaConfig {
            base_url: format!("http://127.0.0.1:{port}"),
            timeout_ms: 200,
            ..Default::default()
        })
        .unwrap(),
    )
}

#[tokio::test]
async fn fail_closed_is_503_policy_unavailable() {
    let s = stack_with(dead_opa(), FailMode::Closed, false).await;
    let r = reqwest::Client::new()
        .post(format!("{}/v1/sessions/s-1/messages", s.url))
        .header("authorization", bearer("alice"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["code"], "policy_unavailable");
    let e = &s.audit.events()[0];
    assert_eq!(e.result, "error");
    assert_eq!(e.engine, "remote");
    assert_eq!(s.metrics.decisions_count("conversation.send", "error"), 1);
}

#[tokio::test]
async fn fail_open_lets_through_and_counts_every_request() {
    let s = stack_with(dead_opa(), FailMode::Open, true).await;
    let c = reqwest::Client::new();
    for _ in 0..3 {
        let r = c
            .post(format!("{}/v1/sessions/s-1/messages", s.url))
            .header("authorization", bearer("alice"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    assert_eq!(
        s.metrics.fail_open_count("conversation.send"),
        3,
        "every request let through is counted"
    );
    assert!(s.audit.events().iter().all(|e| e.result == "fail_open"));
    // Errors are never cached: every request went to the engine (3 misses).
    assert_eq!(s.metrics.cache_counts(), (0, 3));
}

#[tokio::test]
async fn decision_cache_hits_per_subject_and_never_across_subjects() {
    let engine = EmbeddedRego::from_dir(
        policy_dir(),
        "data.soma.authz.decision",
        PolicyMetrics::default(),
    )
    .unwrap();
    let s = stack_with(Arc::new(engine), FailMode::Closed, true).await;
    let c = reqwest::Client::new();
    let send = |sub: &'static str, auth: String| {
        let c = c.clone();
        let url = format!("{}/v1/sessions/s-1/messages", s.url);
        async move {
            let _ = sub;
            c.post(url)
                .header("authorization", auth)
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    assert_eq!(send("alice", bearer("alice")).await, 200);
    assert_eq!(send("alice", bearer("alice")).await, 200);
    assert_eq!(s.metrics.cache_counts(), (1, 1));
    // Same route, different subject: a miss, not alice's decision.
    assert_eq!(send("bob", bearer("bob")).await, 200);
    assert_eq!(s.metrics.cache_counts(), (1, 2));
    // Different tenant claim, same subject: a miss, and the decision is its own.
    let mut other = claims("alice");
    other["tenant"] = json!("t2");
    other["scope"] = json!("");
    let token = format!("Bearer {}", mint(JwtAlgorithm::RS256, Some("rs"), &other));
    assert_eq!(send("alice", token).await, 403);
    assert_eq!(s.metrics.cache_counts(), (1, 3));
    let engines: Vec<String> = s.audit.events().iter().map(|e| e.engine.clone()).collect();
    assert_eq!(engines, vec!["embedded", "cache", "embedded", "embedded"]);
}
