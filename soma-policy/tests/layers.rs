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
    ApiKeyStore, Authenticator, AuthnLayer, Authorizer, AuthzError, AuthzInput, AuthzLayer,
    CacheConfig, Decision, EmbeddedRego, EngineDecision, EngineError, FailMode,
    InMemoryApiKeyStore, JwtAlgorithm, MemoryAuditSink, OpaConfig, PolicyEngine, PolicyMetrics,
    Principal, RemoteOpa, RouteMap, RouteRule, StoreError, generate_key,
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
            .cache({
                let mut c = CacheConfig::default();
                c.enabled = cache;
                c.ttl_ms = 60_000;
                c.capacity = 1000;
                c
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
        .layer(AuthnLayer::new(authn))
        .layer(soma_observability::http::RequestIdLayer::new());
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

/// Asserts `r` is an `application/problem+json` answer with all five
/// members; returns the body.
use soma_testkit::expect_problem as problem;

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
async fn the_audit_record_carries_the_request_id_layer_s_one_id() {
    let s = embedded_stack().await;
    let c = reqwest::Client::new();
    // No id, and an invalid one: the layer's new id is the response's and
    // the audit record's, never the client's invalid value.
    for sent in [None, Some("two words")] {
        let mut req = c
            .post(format!("{}/v1/sessions/s-1/messages", s.url))
            .header("authorization", bearer("alice"));
        if let Some(v) = sent {
            req = req.header("x-request-id", v);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 200);
        let id = r.headers()["x-request-id"].to_str().unwrap().to_owned();
        assert_ne!(Some(id.as_str()), sent);
        assert_eq!(id.len(), 36, "a UUID: {id}");
        let events = s.audit.events();
        let last = events.last().expect("audited");
        assert_eq!(last.request_id.as_deref(), Some(id.as_str()));
    }
}

#[tokio::test]
async fn missing_and_bad_credentials_get_401_with_www_authenticate_and_problem() {
    let s = embedded_stack().await;
    let c = reqwest::Client::new();
    let url = format!("{}/v1/sessions/s-1/messages", s.url);
    let r = c.post(&url).send().await.unwrap();
    assert_eq!(r.headers()["www-authenticate"], "Bearer realm=\"soma\"");
    problem(r, 401, "missing_credential").await;

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
    let body = problem(r, 403, "forbidden").await;
    assert!(body["detail"].as_str().unwrap().contains("missing_role"));
    // Unmapped route: denied, never reaches the handler.
    let r = c
        .get(format!("{}/v1/unmapped", s.url))
        .header("authorization", bearer("alice"))
        .send()
        .await
        .unwrap();
    let body = problem(r, 403, "forbidden").await;
    assert_eq!(
        body["detail"], "no action mapped for GET /v1/unmapped",
        "the route axum matched is named"
    );
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
        RemoteOpa::new(&{
            let mut c = OpaConfig::default();
            c.base_url = format!("http://127.0.0.1:{port}");
            c.timeout_ms = 200;
            c
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

/// An engine that always fails with one error.
struct Failing(EngineError);

#[async_trait::async_trait]
impl PolicyEngine for Failing {
    fn name(&self) -> &'static str {
        "failing"
    }

    async fn evaluate(&self, _: &AuthzInput) -> Result<EngineDecision, EngineError> {
        Err(self.0.clone())
    }
}

#[tokio::test]
async fn fail_open_allows_only_when_the_engine_is_unavailable() {
    let unavailable = [
        EngineError::Timeout,
        EngineError::Transport("connection refused".into()),
        EngineError::CircuitOpen,
        EngineError::Status(500),
        EngineError::Status(503),
    ];
    let undecided = [
        EngineError::Undefined,
        EngineError::MalformedResponse("not JSON".into()),
        EngineError::Evaluation("eval_conflict_error".into()),
        EngineError::Load("no .rego policies found".into()),
        EngineError::Status(400),
        EngineError::Status(404),
    ];
    for e in unavailable {
        assert!(e.is_unavailable(), "{e:?}");
        let metrics = PolicyMetrics::default();
        let authz = Authorizer::builder(Arc::new(Failing(e.clone())))
            .fail_mode(FailMode::Open)
            .metrics(metrics.clone())
            .build();
        let d = authz.check(&send_input()).await.unwrap();
        assert!(d.allow && d.fail_open, "{e:?} fails open");
        assert_eq!(metrics.fail_open_count("conversation.send"), 1);
    }
    for e in undecided {
        assert!(!e.is_unavailable(), "{e:?}");
        let metrics = PolicyMetrics::default();
        let authz = Authorizer::builder(Arc::new(Failing(e.clone())))
            .fail_mode(FailMode::Open)
            .metrics(metrics.clone())
            .build();
        let err = authz.check(&send_input()).await.unwrap_err();
        assert_eq!(err, AuthzError::Unavailable(e.clone()), "{e:?} is denied");
        assert!(authz.enforce(&send_input()).await.is_err());
        assert_eq!(metrics.fail_open_count("conversation.send"), 0, "{e:?}");
    }
}

/// A key store that is down, with the kind of message sqlx gives.
struct DownStore;

#[async_trait::async_trait]
impl ApiKeyStore for DownStore {
    async fn find(&self, _: &str) -> Result<Option<soma_policy::ApiKeyRecord>, StoreError> {
        Err(StoreError::Unavailable(
            "error returned from database: password authentication failed for user \"soma_keys\" at 10.0.4.7:5432".into(),
        ))
    }
    async fn insert(&self, _: soma_policy::ApiKeyRecord) -> Result<(), StoreError> {
        Err(StoreError::Unavailable("down".into()))
    }
    async fn revoke(&self, _: &str) -> Result<bool, StoreError> {
        Err(StoreError::Unavailable("down".into()))
    }
}

#[tokio::test]
async fn unavailable_bodies_carry_a_stable_code_and_no_internal_detail() {
    let port = soma_testkit::free_port();
    let mut config = soma_policy::PolicyConfig::default();
    config.issuers = vec![
        soma_policy::IssuerConfig::new(ISSUER)
            .with_jwks_url(format!("http://127.0.0.1:{port}/internal/idp/jwks.json")),
    ];
    let authn = Arc::new(
        Authenticator::builder(&config)
            .api_key_store(Arc::new(DownStore))
            .build()
            .unwrap(),
    );
    let app = Router::new()
        .route("/v1/schedules/{id}", get(|| async { "ok" }))
        .layer(AuthnLayer::new(authn));
    let url = serve(app).await;
    let key = generate_key("soma", "s", "t1", vec![], vec![]);
    let c = reqwest::Client::new();
    for auth in [
        format!("Bearer {}", key.key.expose_secret()),
        format!(
            "Bearer {}",
            mint(JwtAlgorithm::RS256, Some("k1"), &claims("a"))
        ),
    ] {
        let r = c
            .get(format!("{url}/v1/schedules/1"))
            .header("authorization", auth)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 503);
        assert_eq!(
            r.headers()["content-type"],
            soma_policy::PROBLEM_CONTENT_TYPE
        );
        let text = r.text().await.unwrap();
        let body: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(body["code"], "auth_unavailable");
        for leak in [
            "database",
            "soma_keys",
            "10.0.4.7",
            "127.0.0.1",
            "internal/idp",
            "jwks",
            "JWKS",
        ] {
            assert!(!text.contains(leak), "{leak:?} leaked: {text}");
        }
    }
}

#[tokio::test]
async fn several_tenant_headers_are_rejected() {
    let s = embedded_stack().await;
    let c = reqwest::Client::new();
    let url = format!("{}/v1/sessions/s-1/messages", s.url);
    for second in ["t2", "t1"] {
        let r = c
            .post(&url)
            .header("authorization", bearer("alice"))
            .header("x-soma-tenant", "t1")
            .header("x-soma-tenant", second)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403, "t1 + {second}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["code"], "tenant_mismatch");
    }
}

/// Allows everything and records the resource ids it was asked about.
#[derive(Default)]
struct Recording(parking_lot::Mutex<Vec<Option<String>>>);

#[async_trait::async_trait]
impl PolicyEngine for Recording {
    fn name(&self) -> &'static str {
        "recording"
    }

    async fn evaluate(&self, input: &AuthzInput) -> Result<EngineDecision, EngineError> {
        self.0.lock().push(input.resource.id.clone());
        Ok(EngineDecision {
            allow: true,
            reasons: vec![],
        })
    }
}

#[tokio::test]
async fn the_policy_sees_the_resource_id_the_handler_sees() {
    let engine = Arc::new(Recording::default());
    let authz = Arc::new(Authorizer::builder(engine.clone()).build());
    let authn = Arc::new(
        Authenticator::builder(&config_with_static_keys())
            .build()
            .unwrap(),
    );
    let routes = Arc::new(
        RouteMap::new([
            RouteRule::new("GET", "/v1/docs/{id}", "doc.read", "doc").with_id_param("id"),
            RouteRule::new("GET", "/v1/files/{*path}", "file.read", "file").with_id_param("path"),
        ])
        .unwrap(),
    );
    let app = Router::new()
        .route(
            "/v1/docs/{id}",
            get(|axum::extract::Path(id): axum::extract::Path<String>| async move { id }),
        )
        .route(
            "/v1/files/{*path}",
            get(|axum::extract::Path(p): axum::extract::Path<String>| async move { p }),
        )
        .route_layer(AuthzLayer::new(authz, routes))
        .layer(AuthnLayer::new(authn));
    let url = serve(app).await;
    let c = reqwest::Client::new();
    let get = |path: &str| {
        c.get(format!("{url}{path}"))
            .header("authorization", bearer("alice"))
            .send()
    };
    for (path, id) in [
        ("/v1/docs/%73ecret", "secret"),
        ("/v1/docs/caf%C3%A9", "café"),
        ("/v1/docs/plain", "plain"),
        ("/v1/files/a/%62/c", "a/b/c"),
    ] {
        let r = get(path).await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        let handler_saw = r.text().await.unwrap();
        assert_eq!(handler_saw, id, "{path}");
        let policy_saw = engine.0.lock().pop().unwrap();
        assert_eq!(policy_saw.as_deref(), Some(id), "{path}");
    }
    // An encoded `/` in a parameter is denied before the handler or the
    // policy: it would make one id name two resources.
    for path in ["/v1/docs/a%2Fb", "/v1/files/a%2Fb/c"] {
        let r = get(path).await.unwrap();
        assert_eq!(r.status(), 403, "{path}");
    }
    assert!(engine.0.lock().is_empty());
}

/// The authorization layer passes its inner service's readiness on (a
/// handler that cannot take a request keeps the layer's service pending),
/// and its response future prints its name only.
#[tokio::test]
async fn the_authz_layer_passes_readiness_on_and_its_future_prints_its_name() {
    use tower::{Layer, Service};
    let authz = Arc::new(Authorizer::builder(dead_opa()).build());
    let handler = tower::service_fn(|_req: http::Request<axum::body::Body>| async {
        Ok::<_, std::convert::Infallible>(http::Response::new(axum::body::Body::empty()))
    });
    let waker = futures_util::task::noop_waker();
    let mut cx = std::task::Context::from_waker(&waker);

    let mut never_ready = AuthzLayer::new(authz.clone(), routes())
        .layer(tower::limit::ConcurrencyLimit::new(handler, 0));
    assert!(never_ready.poll_ready(&mut cx).is_pending());

    let mut ready = AuthzLayer::new(authz, routes()).layer(handler);
    assert!(ready.poll_ready(&mut cx).is_ready());
    let fut = ready.call(
        http::Request::builder()
            .uri("/v1/unmapped")
            .body(axum::body::Body::empty())
            .unwrap(),
    );
    assert!(
        format!("{fut:?}").starts_with("AuthzResponseFuture"),
        "{fut:?}"
    );
}

/// Log lines written while `f` runs (soma-observability's subscriber with a
/// capture buffer as its writer).
fn logs_of(f: impl FnOnce()) -> String {
    let capture = soma_testkit::LogCapture::default();
    let writer = capture.clone();
    let (dispatch, _guard) = soma_observability::telemetry::TelemetryBuilder::new(
        &soma_observability::TelemetryConfig::default(),
    )
    .with_writer(move || writer.clone())
    .build()
    .unwrap();
    tracing::dispatcher::with_default(&dispatch, f);
    capture.text()
}

/// Failing open is an explicit choice the authorizer warns about when it
/// is built (failing closed, the default, is silent), and the authorizer
/// prints its engine, cache and fail mode.
#[test]
fn an_authorizer_that_fails_open_says_so_when_built_and_prints_its_settings() {
    let mut open = None;
    let logs = logs_of(|| {
        open = Some(
            Authorizer::builder(dead_opa())
                .fail_mode(FailMode::Open)
                .build(),
        );
    });
    assert!(logs.contains("fail_mode = open"), "{logs}");
    let printed = format!("{:?}", open.unwrap());
    assert!(
        printed.starts_with("Authorizer {") && printed.contains("fail_mode: Open"),
        "{printed}"
    );
    assert!(printed.contains("cache: true"), "{printed}");
    let logs = logs_of(|| {
        Authorizer::builder(dead_opa()).build();
    });
    assert!(!logs.contains("fail_mode"), "{logs}");
}

/// `Authorizer::audit` (a change) and `audit_outcome` (what an allowed
/// action did) reach the authorizer's audit sink beside its decisions, and
/// `metrics()` are the handles it records its decisions on.
#[tokio::test]
async fn an_authorizer_audits_changes_and_outcomes_and_shows_its_metrics() {
    let engine = EmbeddedRego::from_dir(
        policy_dir(),
        "data.soma.authz.decision",
        PolicyMetrics::default(),
    )
    .unwrap();
    let registry = soma_observability::MetricsRegistry::default();
    let audit = MemoryAuditSink::new();
    let authz = Authorizer::builder(Arc::new(engine))
        .audit_sink(Arc::new(audit.clone()))
        .metrics(&registry)
        .build();
    let alice = soma_policy::Principal {
        subject: "alice".into(),
        tenant: "t1".into(),
        roles: vec!["user".into()],
        scopes: vec![],
        auth_kind: soma_policy::AuthKind::ApiKey {
            key_id: "k1".into(),
        },
    };
    let resource = soma_policy::Resource {
        kind: "schedule".into(),
        id: Some("s1".into()),
    };
    let input = soma_policy::AuthzInput::new(&alice, "schedule:delete", resource.clone());
    let decision = authz.check(&input).await.unwrap();
    assert_eq!(
        authz.metrics().decisions_count(
            "schedule:delete",
            if decision.allow { "allow" } else { "deny" }
        ),
        1,
        "the handles the authorizer records on"
    );
    authz.audit(&soma_policy::AuditEvent::change(
        &alice,
        "schedule:update",
        resource,
        vec!["cron".into()],
        Some("req-1"),
    ));
    authz.audit_outcome(&input, "discarded", &["operator: stale".into()]);
    let events = audit.events();
    assert_eq!(events.len(), 3, "{events:?}");
    assert!(events[1].is_change() && events[1].reason == vec!["cron"]);
    assert_eq!(events[1].request_id.as_deref(), Some("req-1"));
    assert_eq!(
        (events[2].result.as_str(), events[2].engine.as_str()),
        ("discarded", "outcome")
    );
    assert_eq!(events[2].reason, vec!["operator: stale"]);
}
