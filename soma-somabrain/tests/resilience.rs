//! Faults on the far side of the client: refused and reset connections,
//! slow answers, 5xx bursts, 429 with Retry-After, malformed JSON; the
//! breaker's transitions; concurrency; tenant consistency; metrics; health.

mod common;

use std::time::{Duration, Instant};

use common::{ContractServer, Fault};
use serde_json::json;
use soma_observability::health::{ComponentStatus, HealthCheck};
use soma_observability::metrics::MetricsRegistry;
use soma_observability::resilience::BreakerState;
use soma_somabrain::{
    CallOptions, EndpointGroup, ErrorKind, FeedbackRequest, Memory, RecallRequest, SomabrainClient,
    SomabrainConfig, SomabrainHealthCheck,
};

const READ: EndpointGroup = EndpointGroup::MemoryRead;

fn client(server: &ContractServer, f: impl FnOnce(&mut SomabrainConfig)) -> SomabrainClient {
    let mut cfg = server.config();
    f(&mut cfg);
    SomabrainClient::new(cfg).unwrap()
}

fn memory(key: &str) -> Memory {
    Memory::from_json(key, json!({"text": format!("memory {key}")})).unwrap()
}

fn recall() -> RecallRequest {
    RecallRequest::new("memory")
}

#[tokio::test]
async fn connection_refused_is_unavailable_and_retried_within_budget() {
    let port = soma_testkit::free_port();
    let mut cfg = SomabrainConfig::new(format!("http://127.0.0.1:{port}"));
    cfg.retry.initial_ms = 1;
    let c = SomabrainClient::new(cfg).unwrap();
    let e = c.recall(&recall(), CallOptions::new()).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Transport, "{e}");
    assert!(e.is_unavailable() && !e.is_rejected() && !e.is_circuit_open());
    assert_eq!(e.attempts(), 3, "1 attempt + max_retries 2");
    assert!(e.request_id().is_some());
    // A refused connection never reached the server, so even a
    // non-idempotent call is retried.
    let fb = FeedbackRequest {
        session_id: "s".into(),
        query: "q".into(),
        utility: 1.0,
        ..Default::default()
    };
    let e = c
        .context_feedback(&fb, CallOptions::new())
        .await
        .unwrap_err();
    assert_eq!(e.attempts(), 3, "{e}");
}

#[tokio::test]
async fn reset_connections_are_retried_for_safe_calls_only() {
    let server = ContractServer::start().await;
    server.reset_next_connections(2);
    let c = client(&server, |_| {});
    let ack = c
        .remember(&memory("k1"), CallOptions::new())
        .await
        .expect("third attempt succeeds");
    assert!(ack.ok);
    assert_eq!(server.accepted_connections(), 3);
    assert_eq!(
        server.seen_count(),
        1,
        "the keyed write reached the server once"
    );

    // Feedback is not idempotent: a reset after connecting is not retried.
    let server = ContractServer::start().await;
    server.reset_next_connections(1);
    let c = client(&server, |_| {});
    let fb = FeedbackRequest {
        session_id: "s".into(),
        query: "q".into(),
        utility: 1.0,
        ..Default::default()
    };
    let e = c
        .context_feedback(&fb, CallOptions::new())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Transport, "{e}");
    assert_eq!(e.attempts(), 1);
    assert_eq!(server.seen_count(), 0);
}

#[tokio::test]
async fn slow_responses_past_the_deadline_time_out() {
    let server = ContractServer::start().await;
    server.push_n(5, Fault::Delay(Duration::from_millis(800)));
    let c = client(&server, |_| {});
    let started = Instant::now();
    let e = c
        .recall(
            &recall(),
            CallOptions::new().deadline(Duration::from_millis(150)),
        )
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert!(e.is_timeout() && e.is_unavailable(), "{e}");
    assert!(
        took < Duration::from_millis(700),
        "the deadline bounds the call: {took:?}"
    );

    // A per-attempt timeout shorter than the deadline: the slow attempt is
    // abandoned and the retry succeeds.
    let server = ContractServer::start().await;
    server.push(Fault::Delay(Duration::from_millis(800)));
    let c = client(&server, |c| c.request_timeout_ms = 100);
    let r = c
        .recall(&recall(), CallOptions::new())
        .await
        .expect("retry after an attempt timeout");
    assert_eq!(r.tenant, "acme");
    assert_eq!(server.seen_count(), 2);
}

#[tokio::test]
async fn bursts_of_503_are_retried_and_never_beyond_the_budget() {
    let server = ContractServer::start().await;
    let c = client(&server, |_| {});
    server.push_n(2, Fault::status(503));
    c.recall(&recall(), CallOptions::new())
        .await
        .expect("third attempt succeeds");
    assert_eq!(server.seen_count(), 3);

    server.push_n(10, Fault::status(503));
    let e = c.recall(&recall(), CallOptions::new()).await.unwrap_err();
    assert_eq!(server.seen_count(), 6, "exactly 1 + max_retries attempts");
    assert_eq!(e.attempts(), 3);
    assert!(e.is_unavailable() && e.status().unwrap().as_u16() == 503);

    let c0 = client(&server, |c| c.retry.max_retries = 0);
    let before = server.seen_count();
    c0.recall(&recall(), CallOptions::new()).await.unwrap_err();
    assert_eq!(
        server.seen_count(),
        before + 1,
        "max_retries 0: one attempt"
    );
}

#[tokio::test]
async fn rejections_and_server_bugs_are_not_retried() {
    let server = ContractServer::start().await;
    let c = client(&server, |_| {});
    for fault in [
        Fault::status(422),
        Fault::status(404),
        Fault::status(400),
        Fault::html_500(),
    ] {
        server.push(fault);
        let before = server.seen_count();
        let e = c
            .remember(&memory("k"), CallOptions::new())
            .await
            .unwrap_err();
        assert_eq!(server.seen_count(), before + 1, "{e}");
        assert_eq!(e.attempts(), 1);
    }
    // The HTML 500 is reported with its page title, as unavailable.
    server.push(Fault::html_500());
    let e = c.recall(&recall(), CallOptions::new()).await.unwrap_err();
    assert!(e.is_unavailable() && e.kind() == ErrorKind::Server);
    assert_eq!(e.detail().unwrap().to_string(), "Server Error (500)");
    // 408 is retried.
    server.push(Fault::status(408));
    c.recall(&recall(), CallOptions::new())
        .await
        .expect("408 retried");
    // Not-idempotent calls are not retried on 503.
    server.push(Fault::status(503));
    let fb = FeedbackRequest {
        session_id: "s".into(),
        query: "q".into(),
        utility: 1.0,
        ..Default::default()
    };
    let e = c
        .context_feedback(&fb, CallOptions::new())
        .await
        .unwrap_err();
    assert_eq!(e.attempts(), 1);
}

#[tokio::test]
async fn rate_limits_honour_retry_after() {
    let server = ContractServer::start().await;
    let c = client(&server, |_| {});
    server.push(Fault::too_many("1"));
    let started = Instant::now();
    c.recall(&recall(), CallOptions::new())
        .await
        .expect("retried after Retry-After");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "waited the server's Retry-After"
    );
    assert_eq!(server.seen_count(), 2);

    // Longer than max_retry_after_ms (2 s): returned at once, typed.
    server.push(Fault::too_many("30"));
    let started = Instant::now();
    let e = c.recall(&recall(), CallOptions::new()).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_millis(500));
    assert!(
        e.is_rate_limited() && e.is_rejected() && e.is_retryable(),
        "{e}"
    );
    assert_eq!(e.retry_after(), Some(Duration::from_secs(30)));
    assert_eq!(server.seen_count(), 3);
}

#[tokio::test]
async fn malformed_json_is_a_decode_error_not_a_panic() {
    let server = ContractServer::start().await;
    let c = client(&server, |_| {});
    server.push(Fault::MalformedJson);
    let e = c
        .remember(&memory("k"), CallOptions::new())
        .await
        .unwrap_err();
    assert!(e.is_decode() && !e.is_rejected(), "{e}");
    assert_eq!(e.status().unwrap().as_u16(), 200);
    assert_eq!(server.seen_count(), 1, "not retried");
}

#[tokio::test]
async fn breaker_counts_calls_and_goes_closed_open_half_open_closed() {
    let server = ContractServer::start().await;
    let registry = MetricsRegistry::default();
    let mut cfg = server.config();
    cfg.breaker.open_ms = 100;
    let c = SomabrainClient::builder(cfg)
        .metrics(&registry)
        .build()
        .unwrap();

    // Call 1: three failed attempts count as ONE failure.
    server.push_n(3, Fault::status(503));
    c.recall(&recall(), CallOptions::new()).await.unwrap_err();
    assert_eq!(server.seen_count(), 3);
    assert_eq!(
        c.breaker_state(READ),
        BreakerState::Closed,
        "3 attempts = 1 failed call"
    );
    // A call that fails twice then succeeds is a success (resets the count).
    server.push_n(2, Fault::status(503));
    c.recall(&recall(), CallOptions::new()).await.unwrap();
    // Three consecutive failed calls open it.
    server.push_n(9, Fault::status(503));
    for _ in 0..3 {
        c.recall(&recall(), CallOptions::new()).await.unwrap_err();
    }
    assert_eq!(c.breaker_state(READ), BreakerState::Open);
    let seen = server.seen_count();

    // Open: answered without a request.
    server.set_delay(Duration::from_millis(300));
    let started = Instant::now();
    let e = c
        .recall(&recall(), CallOptions::new().request_id("r-open"))
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert!(e.is_circuit_open() && e.is_unavailable(), "{e}");
    assert_eq!(e.attempts(), 0);
    assert_eq!(e.request_id(), Some("r-open"));
    assert!(
        took < Duration::from_millis(100),
        "no network wait (the server sleeps 300 ms): {took:?}"
    );
    assert_eq!(server.seen_count(), seen, "the server saw no request");

    // Half-open after 100 ms: one probe; concurrent calls are refused.
    tokio::time::sleep(Duration::from_millis(120)).await;
    let probe = {
        let c = c.clone();
        tokio::spawn(async move { c.recall(&recall(), CallOptions::new()).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(c.breaker_state(READ), BreakerState::HalfOpen);
    let e = c.recall(&recall(), CallOptions::new()).await.unwrap_err();
    assert!(e.is_circuit_open(), "only one probe while half-open: {e}");
    probe.await.unwrap().expect("probe succeeds");
    assert_eq!(c.breaker_state(READ), BreakerState::Closed);
    assert_eq!(
        server.seen_count(),
        seen + 1,
        "exactly the probe reached the server"
    );

    let text = registry.encode();
    for to in ["open", "half_open", "closed"] {
        let line = text
            .lines()
            .find(|l| {
                l.starts_with("soma_circuit_breaker_transitions_total")
                    && l.contains("component=\"somabrain.memory_read\"")
                    && l.contains(&format!("to=\"{to}\""))
            })
            .unwrap_or_else(|| panic!("transition to {to} in\n{text}"));
        assert!(line.ends_with(" 1"), "{line}");
    }
    for g in EndpointGroup::ALL {
        let component = format!("component=\"{}\"", g.component());
        let line = text
            .lines()
            .find(|l| l.starts_with("soma_circuit_breaker_state{") && l.contains(&component))
            .unwrap_or_else(|| panic!("{component} gauge in\n{text}"));
        assert!(line.ends_with(" 0"), "closed: {line}");
    }
    assert!(
        !text.contains("component=\"somabrain.memory_write\",to="),
        "the write group never moved:\n{text}"
    );
    let open_line = text
        .lines()
        .find(|l| {
            l.starts_with("soma_somabrain_requests_total")
                && l.contains("status=\"circuit_open\"")
                && l.contains("/memory/recall\"")
        })
        .expect("circuit_open counted");
    assert!(
        open_line.ends_with(" 2"),
        "one refused while open, one while the probe was out: {open_line}"
    );
    let retries = text
        .lines()
        .find(|l| l.starts_with("soma_somabrain_retries_total") && l.contains("/memory/recall\""))
        .expect("retries counted");
    assert!(retries.ends_with(" 10"), "2 + 2 + 3*2 retries: {retries}");
}

#[tokio::test]
async fn a_failed_probe_reopens_and_4xx_keeps_the_breaker_closed() {
    let server = ContractServer::start().await;
    let c = client(&server, |c| {
        c.breaker.failure_threshold = 1;
        c.breaker.open_ms = 50;
        c.retry.max_retries = 0;
    });
    server.push_n(5, Fault::status(422));
    for _ in 0..5 {
        assert!(
            c.recall(&recall(), CallOptions::new())
                .await
                .unwrap_err()
                .is_rejected()
        );
    }
    assert_eq!(
        c.breaker_state(READ),
        BreakerState::Closed,
        "a 4xx proves the server is up"
    );
    server.push(Fault::status(502));
    c.recall(&recall(), CallOptions::new()).await.unwrap_err();
    assert_eq!(c.breaker_state(READ), BreakerState::Open);
    tokio::time::sleep(Duration::from_millis(70)).await;
    server.push(Fault::status(502));
    c.recall(&recall(), CallOptions::new()).await.unwrap_err();
    assert_eq!(
        c.breaker_state(READ),
        BreakerState::Open,
        "failed probe re-opens"
    );
    assert!(
        c.recall(&recall(), CallOptions::new())
            .await
            .unwrap_err()
            .is_circuit_open()
    );
}

#[tokio::test]
async fn a_hundred_concurrent_calls_run_concurrently() {
    let server = ContractServer::start().await;
    server.set_delay(Duration::from_millis(100));
    let c = client(&server, |_| {});
    let started = Instant::now();
    let calls = (0..100).map(|i| {
        let c = c.clone();
        async move {
            c.recall(&recall(), CallOptions::new().request_id(format!("c-{i}")))
                .await
        }
    });
    let results = futures::future::join_all(calls).await;
    let took = started.elapsed();
    assert!(results.iter().all(Result::is_ok));
    let max = server.max_in_flight();
    assert!(max >= 50, "the server saw {max} requests in flight at once");
    assert!(
        took < Duration::from_secs(1),
        "100 calls of 100 ms took {took:?}"
    );
}

#[tokio::test]
async fn tenant_header_always_equals_the_tenant_in_body_or_query() {
    let server = ContractServer::start().await;
    let c = client(&server, |_| {});
    let tenants = ["acme", "globex", "initech", "umbrella"];
    let calls = tenants.iter().enumerate().map(|(i, t)| {
        let c = c.clone();
        async move {
            let o = CallOptions::new().tenant(*t).namespace(format!("ns-{i}"));
            c.remember(&memory(&format!("{t}-note")), o.clone())
                .await
                .unwrap();
            c.remember_batch(
                &soma_somabrain::RememberBatch {
                    items: vec![memory(&format!("{t}-b"))],
                    universe: None,
                },
                o.clone(),
            )
            .await
            .unwrap();
            c.memory_metrics(o.clone()).await.unwrap();
            c.adaptation_state(o.clone()).await.unwrap();
            let ctx = soma_somabrain::ContextRequest {
                session_id: "s".into(),
                query: "q".into(),
                top_k: 3,
            };
            c.context_evaluate(&ctx, o.clone()).await.unwrap();
            c.recall(&recall(), o).await.unwrap()
        }
    });
    let recalls = futures::future::join_all(calls).await;
    for (r, t) in recalls.iter().zip(tenants) {
        assert_eq!(r.tenant, t);
        assert!(
            r.results.iter().all(|h| h.content["tenant"] == t),
            "no cross-tenant hits"
        );
        assert_eq!(r.results.len(), 4, "2 WM + 2 LTM hits of this tenant only");
    }
    for s in server.seen() {
        let h = s.header("x-tenant-id").expect("X-Tenant-ID on every call");
        let b = s.body.as_ref();
        let in_request = b
            .and_then(|b| b.get("tenant").or(b.get("tenant_id")))
            .and_then(|v| v.as_str())
            .or(s
                .query
                .get("tenant")
                .or(s.query.get("tenant_id"))
                .map(String::as_str));
        if s.path != "/memory/recall" {
            assert_eq!(in_request, Some(h), "{} {}", s.method, s.path);
        }
    }
}

#[tokio::test]
async fn remember_surfaces_fast_ack_warnings() {
    let server = ContractServer::start().await;
    let c = client(&server, |_| {});
    let ack = c
        .remember(&memory("fast"), CallOptions::new().fast_ack(true))
        .await
        .unwrap();
    assert_eq!(ack.warnings, vec!["ltm-persist:queued-async".to_owned()]);
    assert!(ack.queued_for_ltm && !ack.is_confirmed());
    assert_eq!(server.seen()[0].header("x-soma-fast-ack"), Some("true"));
    let ack = c
        .remember(&memory("slow"), CallOptions::new())
        .await
        .unwrap();
    assert!(ack.is_confirmed());
    assert_eq!(server.seen()[1].header("x-soma-fast-ack"), None);
}

#[tokio::test]
async fn health_component_follows_server_and_breaker() {
    let server = ContractServer::start().await;
    let c = client(&server, |c| {
        c.breaker.failure_threshold = 1;
        c.retry.max_retries = 0;
    });
    let check = SomabrainHealthCheck::new(c.clone());
    assert_eq!(check.check().await.status, ComponentStatus::Up);
    server.set_ready_degraded(true);
    let o = check.check().await;
    assert_eq!(o.status, ComponentStatus::Degraded);
    assert!(o.reason.unwrap().contains("database"));
    server.set_ready_degraded(false);
    server.push(Fault::status(503));
    c.recall(&recall(), CallOptions::new()).await.unwrap_err();
    let o = check.check().await;
    assert_eq!(o.status, ComponentStatus::Down);
    assert_eq!(o.gauges.get("breaker_open"), Some(&1.0));

    // Registered as optional, SomaBrain down leaves the service ready.
    let registry = soma_observability::health::HealthRegistry::new();
    registry.register_check(
        soma_somabrain::COMPONENT,
        soma_observability::health::Criticality::Optional,
        SomabrainHealthCheck::new(c.clone()),
        soma_observability::health::CheckOptions::new(
            Duration::from_millis(20),
            Duration::from_secs(1),
        ),
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    let comp = registry
        .component(soma_somabrain::COMPONENT)
        .expect("registered");
    assert_eq!(comp.status, ComponentStatus::Down);
    assert!(
        registry.readiness().is_ready(),
        "optional component does not block readiness"
    );
    assert_eq!(
        registry.report().status,
        soma_observability::health::OverallStatus::Degraded
    );

    // Down server: probes report it (they bypass the breaker).
    drop(server);
    let cfg = SomabrainConfig::new(format!("http://127.0.0.1:{}", soma_testkit::free_port()));
    let o = SomabrainHealthCheck::new(SomabrainClient::new(cfg).unwrap())
        .check()
        .await;
    assert_eq!(o.status, ComponentStatus::Down);
}

#[tokio::test]
async fn metrics_count_calls_by_route_template_and_status() {
    let server = ContractServer::start().await;
    let registry = MetricsRegistry::default();
    let c = SomabrainClient::builder(server.config())
        .metrics(&registry)
        .build()
        .unwrap();
    c.remember(&memory("a"), CallOptions::new()).await.unwrap();
    c.remember(&memory("b"), CallOptions::new()).await.unwrap();
    server.push(Fault::status(422));
    c.recall(&recall(), CallOptions::new()).await.unwrap_err();
    let text = registry.encode();
    let find = |pred: &dyn Fn(&str) -> bool| text.lines().find(|l| pred(l)).map(str::to_owned);
    let ok = find(&|l| {
        l.starts_with("soma_somabrain_requests_total{")
            && l.contains("endpoint=\"/memory/remember\"")
            && l.contains("status=\"200\"")
    });
    assert!(ok.as_deref().is_some_and(|l| l.ends_with(" 2")), "{text}");
    let rej = find(&|l| {
        l.starts_with("soma_somabrain_requests_total{")
            && l.contains("endpoint=\"/memory/recall\"")
            && l.contains("status=\"422\"")
    });
    assert!(rej.as_deref().is_some_and(|l| l.ends_with(" 1")), "{text}");
    let hist = find(&|l| {
        l.starts_with("soma_somabrain_request_duration_seconds_count{")
            && l.contains("endpoint=\"/memory/remember\"")
    });
    assert!(hist.as_deref().is_some_and(|l| l.ends_with(" 2")), "{text}");
}

#[tokio::test]
async fn secrets_never_print() {
    let server = ContractServer::start().await;
    let c = client(&server, |_| {});
    let dbg = format!("{c:?} {:?}", server.config());
    assert!(!dbg.contains(common::TOKEN), "{dbg}");
    server.push(Fault::status(401));
    let e = c.recall(&recall(), CallOptions::new()).await.unwrap_err();
    assert!(!format!("{e} {e:?}").contains(common::TOKEN));
}

#[tokio::test]
async fn trace_context_injector_adds_headers_to_every_attempt() {
    let server = ContractServer::start().await;
    let c = SomabrainClient::builder(server.config())
        .header_injector(|h| {
            h.insert(
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                    .parse()
                    .unwrap(),
            );
        })
        .build()
        .unwrap();
    server.push(Fault::status(503));
    c.recall(&recall(), CallOptions::new().request_id("same-id"))
        .await
        .unwrap();
    let seen = server.seen();
    assert_eq!(seen.len(), 2);
    for s in &seen {
        assert_eq!(
            s.header("traceparent"),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        );
        assert_eq!(
            s.header("x-request-id"),
            Some("same-id"),
            "same request id on every attempt"
        );
    }
}

#[tokio::test]
async fn one_failing_route_opens_only_its_group() {
    let server = ContractServer::start().await;
    // The real server's adaptation state answers 500 on every call.
    server.fail_route(Some("/context/adaptation/state"));
    let c = client(&server, |_| {});
    for _ in 0..3 {
        let e = c.adaptation_state(CallOptions::new()).await.unwrap_err();
        assert!(e.is_unavailable() && !e.is_circuit_open(), "{e}");
    }
    assert_eq!(c.breaker_state(EndpointGroup::Context), BreakerState::Open);
    let e = c.adaptation_state(CallOptions::new()).await.unwrap_err();
    assert!(e.is_circuit_open(), "{e}");
    // Memory is untouched: recall and remember still reach the server.
    c.remember(&memory("k"), CallOptions::new())
        .await
        .expect("remember goes through");
    c.recall(&recall(), CallOptions::new())
        .await
        .expect("recall goes through");
    for g in [EndpointGroup::MemoryWrite, EndpointGroup::MemoryRead] {
        assert_eq!(c.breaker_state(g), BreakerState::Closed, "{g}");
    }
}

#[tokio::test]
async fn validation_errors_do_not_count_but_rate_limits_do() {
    let server = ContractServer::start().await;
    let c = client(&server, |c| {
        c.breaker.failure_threshold = 1;
        c.retry.max_retries = 0;
    });
    server.push_n(3, Fault::status(422));
    for _ in 0..3 {
        let e = c
            .remember(&memory("k"), CallOptions::new())
            .await
            .unwrap_err();
        assert!(e.is_rejected(), "{e}");
    }
    assert_eq!(
        c.breaker_state(EndpointGroup::MemoryWrite),
        BreakerState::Closed,
        "a 422 proves the route is up"
    );
    server.push(Fault::too_many("60"));
    let e = c
        .remember(&memory("k"), CallOptions::new())
        .await
        .unwrap_err();
    assert!(e.is_rate_limited(), "{e}");
    assert_eq!(
        c.breaker_state(EndpointGroup::MemoryWrite),
        BreakerState::Open,
        "a 429 the client gave up on counts: the route is refusing service"
    );
}

#[tokio::test]
async fn health_closes_an_open_breaker_after_its_period_without_traffic() {
    let server = ContractServer::start().await;
    let c = client(&server, |c| {
        c.breaker.failure_threshold = 1;
        c.breaker.open_ms = 200;
        c.retry.max_retries = 0;
    });
    server.fail_route(Some("/memory/recall"));
    c.recall(&recall(), CallOptions::new()).await.unwrap_err();
    assert_eq!(c.breaker_state(READ), BreakerState::Open);

    let registry = soma_observability::health::HealthRegistry::new();
    registry.register_check(
        soma_somabrain::COMPONENT,
        soma_observability::health::Criticality::Optional,
        SomabrainHealthCheck::new(c.clone()),
        soma_observability::health::CheckOptions::new(
            Duration::from_millis(20),
            Duration::from_secs(1),
        ),
    );
    tokio::time::sleep(Duration::from_millis(60)).await;
    let comp = registry.component(soma_somabrain::COMPONENT).unwrap();
    assert_eq!(comp.status, ComponentStatus::Down);
    assert!(
        comp.reason
            .as_deref()
            .unwrap_or_default()
            .contains("somabrain.memory_read"),
        "the open group is named: {comp:?}"
    );

    // The server heals; nobody calls recall.
    server.fail_route(None);
    let recalls = || {
        server
            .seen()
            .iter()
            .filter(|s| s.path == "/memory/recall")
            .count()
    };
    let before = recalls();
    let started = Instant::now();
    loop {
        let comp = registry.component(soma_somabrain::COMPONENT).unwrap();
        if comp.status == ComponentStatus::Up {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "health still {comp:?} 2 s after healing (open period 200 ms, interval 20 ms)"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(c.breaker_state(READ), BreakerState::Closed);
    assert_eq!(recalls(), before, "no recall was made: the check probed");
    c.recall(&recall(), CallOptions::new())
        .await
        .expect("calls go through again");
}

#[tokio::test]
async fn health_reports_a_lost_memory_backend_as_degraded() {
    let server = ContractServer::start().await;
    let c = client(&server, |_| {});
    let check = SomabrainHealthCheck::new(c.clone());
    assert_eq!(check.check().await.status, ComponentStatus::Up);
    server.set_memory_down(true);
    // Writes are still acknowledged, readiness is still ready...
    c.remember(&memory("k"), CallOptions::new()).await.unwrap();
    // ...only /health tells.
    let o = check.check().await;
    assert_eq!(o.status, ComponentStatus::Degraded, "{o:?}");
    assert!(
        o.reason
            .as_deref()
            .unwrap_or_default()
            .contains("memory_ok"),
        "{o:?}"
    );
    server.set_memory_down(false);
    assert_eq!(check.check().await.status, ComponentStatus::Up);
}

#[tokio::test]
async fn top_k_zero_is_refused_before_sending() {
    let server = ContractServer::start().await;
    let c = client(&server, |_| {});
    let e = c
        .recall(&RecallRequest::new("memory").top_k(0), CallOptions::new())
        .await
        .unwrap_err();
    assert!(e.is_invalid_request(), "{e}");
    assert_eq!(server.seen_count(), 0, "nothing sent");
    assert_eq!(c.breaker_state(READ), BreakerState::Closed);
}

#[tokio::test]
async fn a_base_url_with_a_path_is_a_config_error() {
    let server = ContractServer::start().await;
    let mut cfg = server.config();
    cfg.base_url = format!("{}/api", server.url());
    let e = SomabrainClient::new(cfg).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config);
    assert!(e.to_string().contains("path_prefix"), "{e}");
}

#[tokio::test]
async fn remember_is_unconfirmed_while_health_reports_memory_down() {
    let server = ContractServer::start().await;
    let c = client(&server, |_| {});
    let check = SomabrainHealthCheck::new(c.clone());
    assert_eq!(check.check().await.status, ComponentStatus::Up);
    let ack = c.remember(&memory("k1"), CallOptions::new()).await.unwrap();
    assert!(ack.is_confirmed(), "healthy backend: {ack:?}");

    server.set_memory_down(true);
    // The server still answers `persisted_to_ltm: true` without warnings.
    assert_eq!(check.check().await.status, ComponentStatus::Degraded);
    let ack = c.remember(&memory("k2"), CallOptions::new()).await.unwrap();
    assert!(ack.persisted_to_ltm && ack.warnings.is_empty(), "{ack:?}");
    assert!(
        !ack.is_confirmed(),
        "the last /health said memory_ok: false, so the ack is not a confirmation: {ack:?}"
    );
    let batch = soma_somabrain::RememberBatch {
        items: vec![memory("k3"), memory("k4")],
        universe: None,
    };
    let acks = c.remember_batch(&batch, CallOptions::new()).await.unwrap();
    assert!(!acks.is_confirmed(), "{acks:?}");
    assert!(acks.memory_backend_down);
    assert_eq!(c.memory_backend_down(), Some(true));

    server.set_memory_down(false);
    assert_eq!(check.check().await.status, ComponentStatus::Up);
    assert_eq!(c.memory_backend_down(), Some(false));
    let ack = c.remember(&memory("k5"), CallOptions::new()).await.unwrap();
    assert!(ack.is_confirmed(), "{ack:?}");
    let acks = c.remember_batch(&batch, CallOptions::new()).await.unwrap();
    assert!(acks.is_confirmed(), "{acks:?}");
}

/// `.metrics(&registry)` and `.health(&health)` on the builder: the client's
/// breakers are exported, and the component `somabrain` is registered as
/// optional and checked every `health_interval_ms`.
#[tokio::test]
async fn the_builder_plugs_into_the_metrics_and_health_registries() {
    let server = ContractServer::start().await;
    let metrics = MetricsRegistry::default();
    let health = soma_observability::HealthRegistry::new();
    let mut cfg = server.config();
    cfg.health_interval_ms = 20;
    let c = SomabrainClient::builder(cfg)
        .metrics(&metrics)
        .health(&health)
        .build()
        .unwrap();
    let comp = health
        .component(soma_somabrain::COMPONENT)
        .expect("registered at build");
    assert_eq!(
        comp.criticality,
        soma_observability::health::Criticality::Optional
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while health
        .component(soma_somabrain::COMPONENT)
        .and_then(|c| c.last_check)
        .is_none()
    {
        assert!(Instant::now() < deadline, "the check never ran");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        health.component(soma_somabrain::COMPONENT).unwrap().status,
        ComponentStatus::Up
    );
    c.recall(&recall(), CallOptions::new()).await.unwrap();
    let text = metrics.encode();
    assert!(
        text.contains(soma_somabrain::metrics::REQUESTS_TOTAL),
        "{text}"
    );
}
