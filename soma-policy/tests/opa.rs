//! RemoteOpa over HTTP against OPA's real evaluator, plus fault injection on
#![allow(clippy::field_reassign_with_default)] // tests tweak one setting of a default config
//! the far side (timeouts, malformed answers, 5xx) with a controllable server.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::post;
use common::*;
use serde_json::{Value, json};
use soma_observability::health::{ComponentStatus, HealthRegistry};
use soma_observability::resilience::BreakerState;
use soma_policy::{Authorizer, BreakerConfig, EngineError, OpaConfig, PolicyEngine, RemoteOpa};

fn opa(base: &str, timeout_ms: u64) -> RemoteOpa {
    let mut config = OpaConfig::default();
    config.base_url = base.into();
    config.package_path = "soma/authz/decision".into();
    config.timeout_ms = timeout_ms;
    config.breaker = BreakerConfig::new(3, 1_000);
    RemoteOpa::new(&config).unwrap()
}

#[tokio::test]
async fn remote_opa_decides_with_the_real_evaluator_and_sends_exactly_the_schema() {
    let server = start_opa();
    let engine = opa(&server.base_url(), 2_000);
    let d = engine.evaluate(&send_input()).await.unwrap();
    assert!(d.allow, "{d:?}");
    assert!(d.reasons.is_empty());
    let mut denied = send_input();
    denied.context.insert("resource_tenant".into(), json!("t2"));
    let d = engine.evaluate(&denied).await.unwrap();
    assert!(!d.allow);
    assert_eq!(d.reasons, vec!["tenant_mismatch"]);

    // What OPA received: {"input": …} with exactly the schema's keys.
    let received = server.received().await;
    assert_eq!(received.len(), 2);
    let body = &received[0];
    assert_eq!(
        body.as_object().unwrap().keys().collect::<Vec<_>>(),
        vec!["input"]
    );
    let got = &body["input"];
    let mut keys: Vec<&str> = got
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        vec![
            "action", "context", "request", "resource", "roles", "scopes", "subject", "tenant"
        ]
    );
    assert_eq!(
        *got,
        json!({
            "subject": "alice", "tenant": "t1", "roles": ["user"],
            "scopes": ["conversation:write", "memory:write"],
            "action": "conversation.send",
            "resource": {"kind": "session", "id": "s1"},
            "request": {"method": "POST", "route": "/v1/sessions/{id}/messages", "request_id": "r1"},
            "context": {"resource_tenant": "t1"},
        })
    );
    let text = body.to_string().to_lowercase();
    for forbidden in ["authorization", "bearer", "cookie", "x-api-key", "header"] {
        assert!(
            !text.contains(forbidden),
            "OPA input contains {forbidden:?}: {text}"
        );
    }
}

#[tokio::test]
async fn the_http_stack_sends_no_credentials_to_opa() {
    use soma_policy::Authenticator;
    let server = start_opa();
    let authn = Arc::new(
        Authenticator::builder(&config_with_static_keys())
            .build()
            .unwrap(),
    );
    let authz = Arc::new(Authorizer::builder(Arc::new(opa(&server.base_url(), 2_000))).build());
    let app = guarded_router(authn, Some(authz));
    let url = serve(app).await;
    let token = mint(
        soma_policy::JwtAlgorithm::HS256,
        Some("hs"),
        &claims("alice"),
    );
    let r = reqwest::Client::new()
        .post(format!("{url}/v1/sessions/abc/messages"))
        .header("authorization", format!("Bearer {token}"))
        .header("cookie", "session=secret-cookie")
        .header("x-request-id", "rid-9")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let received = server.received().await;
    assert_eq!(received.len(), 1);
    let text = received[0].to_string();
    assert!(
        !text.contains(&token) && !text.contains("secret-cookie") && !text.contains(HS_SECRET),
        "{text}"
    );
    assert_eq!(
        received[0]["input"]["request"],
        json!({"method": "POST", "route": "/v1/sessions/{id}/messages", "request_id": "rid-9"})
    );
    assert_eq!(
        received[0]["input"]["resource"],
        json!({"kind": "session", "id": "abc"})
    );
    assert_eq!(received[0]["input"]["tenant"], "t1");
}

/// A controllable far side: answers with `body` and `status` after `delay`.
async fn fault_server(
    status: u16,
    body: &'static str,
    delay: Duration,
    hits: Arc<AtomicUsize>,
) -> String {
    let app = Router::new().route(
        "/v1/data/{*path}",
        post(move || {
            let hits = hits.clone();
            async move {
                hits.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(delay).await;
                (axum::http::StatusCode::from_u16(status).unwrap(), body)
            }
        }),
    );
    serve(app).await
}

#[tokio::test]
async fn malformed_responses_are_typed_errors() {
    type Check = fn(&EngineError) -> bool;
    let cases: [(&str, Check); 6] = [
        ("not json", |e| {
            matches!(e, EngineError::MalformedResponse(_))
        }),
        ("[1,2]", |e| matches!(e, EngineError::MalformedResponse(_))),
        (r#"{"result": "yes"}"#, |e| {
            matches!(e, EngineError::MalformedResponse(_))
        }),
        (r#"{"result": {"allow": "true"}}"#, |e| {
            matches!(e, EngineError::MalformedResponse(_))
        }),
        (r#"{"result": {"allow": true, "reasons": [1]}}"#, |e| {
            matches!(e, EngineError::MalformedResponse(_))
        }),
        ("{}", |e| matches!(e, EngineError::Undefined)),
    ];
    for (body, check) in cases {
        let url = fault_server(200, body, Duration::ZERO, Arc::default()).await;
        let e = opa(&url, 1_000).evaluate(&send_input()).await.unwrap_err();
        assert!(check(&e), "{body}: {e:?}");
        assert!(e.is_malformed());
    }
    // Both accepted shapes.
    let url = fault_server(200, r#"{"result": true}"#, Duration::ZERO, Arc::default()).await;
    assert!(
        opa(&url, 1_000)
            .evaluate(&send_input())
            .await
            .unwrap()
            .allow
    );
    let url = fault_server(
        200,
        r#"{"result": {"allow": false, "reasons": ["r1"]}}"#,
        Duration::ZERO,
        Arc::default(),
    )
    .await;
    assert_eq!(
        opa(&url, 1_000)
            .evaluate(&send_input())
            .await
            .unwrap()
            .reasons,
        vec!["r1"]
    );
}

#[tokio::test]
async fn timeouts_fail_fast_and_open_the_breaker() {
    let hits = Arc::new(AtomicUsize::new(0));
    let url = fault_server(
        200,
        r#"{"result": true}"#,
        Duration::from_secs(5),
        hits.clone(),
    )
    .await;
    let health = HealthRegistry::new();
    let engine = opa(&url, 150).health(&health);
    assert_eq!(health.component("opa").unwrap().status, ComponentStatus::Up);
    for _ in 0..3 {
        let t = Instant::now();
        let e = engine.evaluate(&send_input()).await.unwrap_err();
        assert!(e.is_timeout(), "{e:?}");
        assert!(t.elapsed() < Duration::from_secs(2));
    }
    assert_eq!(engine.breaker_state(), BreakerState::Open);
    let opa_health = health.component("opa").unwrap();
    assert_eq!(opa_health.status, ComponentStatus::Down);
    assert!(opa_health.reason.unwrap().contains("open"));
    let e = engine.evaluate(&send_input()).await.unwrap_err();
    assert!(e.is_circuit_open());
    assert_eq!(
        hits.load(Ordering::SeqCst),
        3,
        "no request while the breaker is open"
    );
    // After the reset timeout one trial goes through (and fails again here).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(
        engine
            .evaluate(&send_input())
            .await
            .unwrap_err()
            .is_timeout()
    );
    assert_eq!(hits.load(Ordering::SeqCst), 4);
    assert_eq!(engine.breaker_state(), BreakerState::Open);
}

#[tokio::test]
async fn a_cancelled_trial_does_not_leave_the_breaker_open() {
    let hits = Arc::new(AtomicUsize::new(0));
    let url = fault_server(
        200,
        r#"{"result": true}"#,
        Duration::from_secs(5),
        hits.clone(),
    )
    .await;
    let engine = opa(&url, 150);
    for _ in 0..3 {
        assert!(
            engine
                .evaluate(&send_input())
                .await
                .unwrap_err()
                .is_timeout()
        );
    }
    assert_eq!(engine.breaker_state(), BreakerState::Open);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // The trial's caller gives up (its future is dropped) mid-call.
    let cancelled =
        tokio::time::timeout(Duration::from_millis(30), engine.evaluate(&send_input())).await;
    assert!(cancelled.is_err(), "the trial was cancelled");
    // Give the server a moment to count the cancelled trial's request.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(hits.load(Ordering::SeqCst), 4);
    // The next caller is the new trial: it reaches OPA instead of being
    // refused by a breaker stuck behind a trial that no longer exists.
    let e = engine.evaluate(&send_input()).await.unwrap_err();
    assert!(e.is_timeout(), "{e:?}");
    assert_eq!(hits.load(Ordering::SeqCst), 5);
    assert_eq!(engine.breaker_state(), BreakerState::Open);
}

#[tokio::test]
async fn server_errors_count_toward_the_breaker_and_recover() {
    let hits = Arc::new(AtomicUsize::new(0));
    let url = fault_server(500, "boom", Duration::ZERO, hits.clone()).await;
    let engine = opa(&url, 1_000);
    for _ in 0..3 {
        assert_eq!(
            engine.evaluate(&send_input()).await.unwrap_err(),
            EngineError::Status(500)
        );
    }
    assert!(
        engine
            .evaluate(&send_input())
            .await
            .unwrap_err()
            .is_circuit_open()
    );
    // Through the authorizer (fail closed), an open breaker is `policy_unavailable`.
    let authz = Authorizer::builder(Arc::new(engine)).build();
    let e = authz.check(&send_input()).await.unwrap_err();
    assert!(e.is_unavailable());
    assert_eq!(e.code(), "policy_unavailable");
    assert_eq!(e.status(), 503);

    // A healthy OPA closes the breaker after the reset timeout.
    let server = start_opa();
    let engine = opa(&server.base_url(), 2_000);
    assert!(engine.evaluate(&send_input()).await.unwrap().allow);
    assert_eq!(engine.breaker_state(), BreakerState::Closed);
}

#[tokio::test]
async fn undefined_package_path_is_an_error_not_a_decision() {
    let server = start_opa();
    let mut config = OpaConfig::default();
    config.base_url = server.base_url();
    config.package_path = "soma/no_such_package/decision".into();
    let engine = RemoteOpa::new(&config).unwrap();
    assert_eq!(
        engine.evaluate(&send_input()).await.unwrap_err(),
        EngineError::Undefined
    );
    let _: Value = json!(null);
}

#[tokio::test]
async fn evaluation_errors_and_4xx_deny_even_in_fail_open_mode() {
    use soma_policy::FailMode;
    let opa_eval_error = r#"{"code": "internal_error", "message": "policy.rego:3: eval_conflict_error: complete rules must not produce multiple outputs"}"#;
    let cases: [(u16, &'static str, bool); 4] = [
        (500, opa_eval_error, false),
        (
            400,
            r#"{"code": "invalid_parameter", "message": "bad input"}"#,
            false,
        ),
        (500, "proxy error", true),
        (502, "bad gateway", true),
    ];
    for (status, body, fails_open) in cases {
        let url = fault_server(status, body, Duration::ZERO, Arc::default()).await;
        let e = opa(&url, 1_000).evaluate(&send_input()).await.unwrap_err();
        assert_eq!(e.is_unavailable(), fails_open, "{status} {body}: {e:?}");
        let engine = opa(&url, 1_000);
        let authz = Authorizer::builder(Arc::new(engine))
            .fail_mode(FailMode::Open)
            .build();
        let r = authz.check(&send_input()).await;
        assert_eq!(r.is_ok(), fails_open, "{status} {body}: {r:?}");
    }
    // An evaluation error does not open the breaker: a crafted input cannot
    // turn fail-open on for everyone.
    let url = fault_server(500, opa_eval_error, Duration::ZERO, Arc::default()).await;
    let engine = opa(&url, 1_000);
    for _ in 0..5 {
        let e = engine.evaluate(&send_input()).await.unwrap_err();
        assert!(matches!(e, EngineError::Evaluation(_)), "{e:?}");
    }
    assert_eq!(engine.breaker_state(), BreakerState::Closed);
}

/// `.metrics(&registry)` exports the breaker of component `opa` and
/// `.health(&health)` registers the component `opa`, before any call.
#[test]
fn metrics_and_health_plug_in_through_the_registries() {
    let registry = soma_observability::MetricsRegistry::default();
    let health = HealthRegistry::new();
    let engine = opa("http://127.0.0.1:9", 100)
        .metrics(&registry)
        .health(&health);
    assert_eq!(engine.breaker_state(), BreakerState::Closed);
    assert_eq!(health.component("opa").unwrap().status, ComponentStatus::Up);
    let text = registry.encode();
    assert!(
        text.lines().any(
            |l| l.starts_with("soma_circuit_breaker_state{") && l.contains("component=\"opa\"")
        ),
        "{text}"
    );
}
