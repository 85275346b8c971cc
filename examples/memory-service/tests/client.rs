//! The real `soma_somabrain::SomabrainClient` against the service: what the
//! example platform will see.

mod common;

use std::time::Duration;

use common::{TOKEN, TestService};
use serde_json::{Value, json};
use soma_somabrain::{
    AggregateStatus, CallOptions, ContextRequest, FeedbackRequest, HitLayer, Memory, MemoryLayer,
    ReadyStatus, RecallRequest, RememberBatch, ServerDetail, SomabrainClient, ValidationIssue,
};

fn memory(key: &str, text: &str) -> Memory {
    Memory::from_json(key, json!({ "text": text })).unwrap()
}

fn scope(tenant: &str, namespace: &str) -> CallOptions {
    CallOptions::new().tenant(tenant).namespace(namespace)
}

fn keys(found: &soma_somabrain::RecallResponse) -> Vec<&str> {
    found.results.iter().filter_map(|h| h.key()).collect()
}

#[tokio::test]
async fn remember_then_recall_finds_it() {
    let svc = TestService::start().await;
    let c = svc.client();
    let ack = c
        .remember(
            &memory(
                "seat",
                "The user prefers window seats on flights to Lisbon.",
            ),
            scope("acme", "agent").request_id("turn-1"),
        )
        .await
        .unwrap();
    assert!(ack.is_confirmed(), "{ack:?}");
    assert_eq!(
        (ack.tenant.as_str(), ack.namespace.as_str()),
        ("acme", "agent")
    );
    assert_eq!(ack.request_id.as_deref(), Some("turn-1"));
    assert_eq!(ack.coordinate.as_ref().map(Vec::len), Some(3));
    c.remember(
        &memory("coffee", "The user drinks oat milk flat whites."),
        scope("acme", "agent"),
    )
    .await
    .unwrap();

    let found = c
        .recall(&RecallRequest::new("window seat"), scope("acme", "agent"))
        .await
        .unwrap();
    assert_eq!(
        keys(&found),
        ["seat"],
        "only the relevant memory: {found:?}"
    );
    let hit = &found.results[0];
    assert_eq!(
        hit.content["text"],
        "The user prefers window seats on flights to Lisbon."
    );
    assert_eq!(hit.namespace(), Some("agent"));
    assert!(hit.score > 0.0 && hit.score <= 1.0, "{}", hit.score);
    assert_eq!(found.hits_in_namespace().count(), 1);
    assert_eq!(found.total_results, 1);
    svc.stop().await;
}

#[tokio::test]
async fn another_tenant_or_namespace_never_sees_it() {
    let svc = TestService::start().await;
    let c = svc.client();
    c.remember(
        &memory("secret", "The launch code is tulip."),
        scope("acme", "agent"),
    )
    .await
    .unwrap();
    let q = RecallRequest::new("launch code tulip");
    for (tenant, namespace) in [("globex", "agent"), ("acme", "other"), ("globex", "other")] {
        for layer in [MemoryLayer::Both, MemoryLayer::Wm, MemoryLayer::Ltm] {
            let found = c
                .recall(&q.clone().layer(layer), scope(tenant, namespace))
                .await
                .unwrap();
            assert!(
                found.results.is_empty(),
                "{tenant}/{namespace} {layer:?}: {found:?}"
            );
            assert_eq!((found.wm_hits, found.ltm_hits), (0, 0));
            assert_eq!(found.tenant, tenant);
        }
        let m = c.memory_metrics(scope(tenant, namespace)).await.unwrap();
        assert_eq!(m.wm_items, 0, "{tenant}/{namespace}");
    }
    let same = c.recall(&q, scope("acme", "agent")).await.unwrap();
    assert_eq!(keys(&same), ["secret"]);
    assert_eq!(
        c.memory_metrics(scope("acme", "agent"))
            .await
            .unwrap()
            .wm_items,
        1
    );
    // Context evaluate spans the tenant's namespaces, never another tenant's.
    let req = ContextRequest {
        session_id: "s".into(),
        query: "launch code".into(),
        top_k: 5,
    };
    let other = c
        .context_evaluate(&req, scope("globex", "agent"))
        .await
        .unwrap();
    assert!(other.memories.is_empty(), "{other:?}");
    svc.stop().await;
}

#[tokio::test]
async fn top_k_and_layers_are_honoured() {
    let svc = TestService::start_with(|c| c.wm_capacity = 4).await;
    let c = svc.client();
    let items = (0..8)
        .map(|i| {
            memory(
                &format!("g{i}"),
                &format!("Garden note {i}: the tomatoes need water."),
            )
        })
        .collect();
    c.remember_batch(
        &RememberBatch {
            items,
            universe: None,
        },
        scope("acme", "agent"),
    )
    .await
    .unwrap();
    c.remember(
        &memory("other", "The user likes jazz."),
        scope("acme", "agent"),
    )
    .await
    .unwrap();
    let q = RecallRequest::new("garden tomatoes").top_k(3);

    let both = c.recall(&q, scope("acme", "agent")).await.unwrap();
    assert_eq!(both.results.len(), 3, "{both:?}");
    assert_eq!(
        both.wm_hits + both.ltm_hits,
        8,
        "every garden note matches, jazz does not"
    );
    assert_eq!(
        both.wm_hits, 3,
        "the newest 4 are working memory; 'other' is one of them"
    );
    assert!(both.results.windows(2).all(|w| w[0].score >= w[1].score));
    assert!(both.ltm_hits_truncated());

    let ltm = c
        .recall(&q.clone().layer(MemoryLayer::Ltm), scope("acme", "agent"))
        .await
        .unwrap();
    assert_eq!((ltm.results.len(), ltm.wm_hits, ltm.ltm_hits), (3, 0, 8));
    assert!(
        ltm.results
            .iter()
            .all(|h| h.layer == HitLayer::Ltm && h.coordinate.is_some())
    );

    let wm = c
        .recall(
            &q.clone().top_k(10).layer(MemoryLayer::Wm),
            scope("acme", "agent"),
        )
        .await
        .unwrap();
    assert_eq!((wm.results.len(), wm.wm_hits, wm.ltm_hits), (3, 3, 0));
    assert!(wm.results.iter().all(|h| h.layer == HitLayer::Wm));
    let mut wm_keys = keys(&wm);
    wm_keys.sort_unstable();
    assert_eq!(wm_keys, ["g5", "g6", "g7"], "the newest garden notes");

    let one = c
        .recall(&q.clone().top_k(1), scope("acme", "agent"))
        .await
        .unwrap();
    assert_eq!(one.results.len(), 1);
    assert_eq!(
        c.memory_metrics(scope("acme", "agent"))
            .await
            .unwrap()
            .wm_items,
        4
    );
    svc.stop().await;
}

/// Recall scores only the scope's newest `recall_window` memories: the
/// bound that keeps its cost flat while a conversation's memories grow.
#[tokio::test]
async fn recall_ranks_only_the_newest_window_of_the_scope() {
    let svc = TestService::start_with(|c| {
        c.wm_capacity = 2;
        c.recall_window = 3;
    })
    .await;
    let c = svc.client();
    for i in 0..5 {
        c.remember(
            &memory(
                &format!("g{i}"),
                &format!("Garden note {i}: the tomatoes need water."),
            ),
            scope("acme", "agent"),
        )
        .await
        .unwrap();
    }
    // Another namespace's newer memories don't push these out of the window.
    c.remember(
        &memory("x", "Garden tomatoes elsewhere."),
        scope("acme", "other"),
    )
    .await
    .unwrap();
    let found = c
        .recall(
            &RecallRequest::new("garden tomatoes").top_k(10),
            scope("acme", "agent"),
        )
        .await
        .unwrap();
    let mut got = keys(&found);
    got.sort_unstable();
    assert_eq!(got, ["g2", "g3", "g4"], "only the newest three are ranked");
    assert_eq!((found.wm_hits, found.ltm_hits), (2, 1));
    svc.stop().await;
}

#[tokio::test]
async fn a_bad_token_gets_the_real_401() {
    let svc = TestService::start().await;
    for token in ["not-the-configured-token", ""] {
        let mut cfg = svc.client_config();
        cfg.token = token.into();
        let c = SomabrainClient::new(cfg).unwrap();
        let e = c
            .remember(&memory("k", "x"), scope("acme", "agent"))
            .await
            .unwrap_err();
        assert!(
            e.is_unauthorized() && e.is_rejected() && !e.is_unavailable(),
            "{e}"
        );
        assert_eq!(e.status().map(|s| s.as_u16()), Some(401));
        assert_eq!(
            e.detail(),
            Some(&ServerDetail::Message("Unauthorized".into()))
        );
        let e = c
            .recall(&RecallRequest::new("x"), CallOptions::new())
            .await
            .unwrap_err();
        assert!(e.is_unauthorized(), "{e}");
        // Feature flags and probes need no token, as on SomaBrain.
        let flags = c.feature_flags(CallOptions::new()).await.unwrap();
        assert_eq!(flags.0.len(), 16);
        assert!(!flags.is_enabled("use_hrr"));
        assert_eq!(c.readyz().await.unwrap().status, ReadyStatus::Ready);
    }
    svc.stop().await;
}

#[tokio::test]
async fn invalid_bodies_get_the_real_4xx_shapes() {
    let svc = TestService::start().await;
    let http = reqwest::Client::new();
    let post = |path: &str, body: &str| {
        http.post(format!("{}{path}", svc.url()))
            .bearer_auth(TOKEN)
            .header("content-type", "application/json")
            .header("x-tenant-id", "acme")
            .body(body.to_owned())
            .send()
    };
    let answer = |r: reqwest::Response| async move {
        let status = r.status().as_u16();
        (status, r.json::<Value>().await.unwrap())
    };

    let (s, b) = answer(
        post(
            "/memory/remember",
            r#"{"tenant":"acme","namespace":"agent","value":{}}"#,
        )
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(s, 422);
    assert_eq!(
        b,
        json!({"detail": [{"type": "missing", "loc": ["body", "payload", "key"], "msg": "Field required"}]})
    );
    // The client's own type reads the 422 list.
    let issues: Vec<ValidationIssue> = serde_json::from_value(b["detail"].clone()).unwrap();
    assert_eq!(issues[0].kind, "missing");

    let (s, b) = answer(
        post("/memory/remember", r#"{"tenant": "acme", "namespace": "#)
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (s, b),
        (400, json!({"detail": "Cannot parse request body"}))
    );

    let (s, b) = answer(
        post(
            "/memory/remember",
            r#"{"tenant":"acme","namespace":"agent","key":"k","value":{},"ttl_seconds":-5}"#,
        )
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(s, 422);
    assert_eq!(b["detail"][0]["type"], "greater_than_equal");
    assert_eq!(
        b["detail"][0]["loc"],
        json!(["body", "payload", "ttl_seconds"])
    );

    let (s, b) = answer(
        post(
            "/memory/remember/batch",
            r#"{"tenant":"acme","namespace":"agent","items":[]}"#,
        )
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(s, 422);
    assert_eq!(b["detail"][0]["type"], "too_short");

    let (s, b) = answer(post("/memory/recall", r#"{"top_k":3}"#).await.unwrap()).await;
    assert_eq!(s, 422);
    assert_eq!(b["detail"][0]["loc"], json!(["body", "payload", "query"]));

    // Through the client: a wrong prefix is Django's HTML 404, read as a
    // detail; the /api prefix works.
    let mut cfg = svc.client_config();
    cfg.path_prefix = "/nope".into();
    let e = SomabrainClient::new(cfg)
        .unwrap()
        .remember(&memory("k", "x"), scope("acme", "agent"))
        .await
        .unwrap_err();
    assert_eq!(e.status().map(|s| s.as_u16()), Some(404));
    assert_eq!(e.detail(), Some(&ServerDetail::Body("Not Found".into())));
    let mut cfg = svc.client_config();
    cfg.path_prefix = "/api".into();
    SomabrainClient::new(cfg)
        .unwrap()
        .remember(&memory("k", "x"), scope("acme", "agent"))
        .await
        .expect("the /api prefix serves the same routes");
    svc.stop().await;
}

#[tokio::test]
async fn rewrites_overwrite_and_identical_ones_are_deduplicated() {
    let svc = TestService::start().await;
    let c = svc.client();
    let s = || scope("acme", "agent");
    let first = c
        .remember(&memory("k", "The meeting is on Monday."), s())
        .await
        .unwrap();
    assert!(!first.deduplicated);
    let again = c
        .remember(&memory("k", "The meeting is on Monday."), s())
        .await
        .unwrap();
    assert!(again.deduplicated, "{again:?}");
    assert_eq!(
        again.coordinate, first.coordinate,
        "same key, same coordinate"
    );
    let changed = c
        .remember(&memory("k", "The meeting moved to Tuesday."), s())
        .await
        .unwrap();
    assert!(!changed.deduplicated);
    let found = c.recall(&RecallRequest::new("meeting"), s()).await.unwrap();
    assert_eq!(found.results.len(), 1, "one memory per key: {found:?}");
    assert_eq!(
        found.results[0].content["text"],
        "The meeting moved to Tuesday."
    );
    // Fast ack is accepted and ignored: the write is durable when answered.
    let fast = c
        .remember(&memory("f", "fast"), s().fast_ack(true))
        .await
        .unwrap();
    assert!(fast.is_confirmed() && !fast.queued_for_ltm);
    svc.stop().await;
}

#[tokio::test]
async fn expired_memories_are_not_recalled() {
    let svc = TestService::start().await;
    let c = svc.client();
    let m = Memory {
        ttl_seconds: Some(1),
        ..memory("ephemeral", "The parking spot is B12.")
    };
    let ack = c.remember(&m, scope("acme", "agent")).await.unwrap();
    assert_eq!(ack.ttl_applied, Some(1));
    let q = RecallRequest::new("parking spot");
    assert_eq!(
        c.recall(&q, scope("acme", "agent"))
            .await
            .unwrap()
            .results
            .len(),
        1
    );
    tokio::time::sleep(Duration::from_millis(1_300)).await;
    let later = c.recall(&q, scope("acme", "agent")).await.unwrap();
    assert!(later.results.is_empty(), "{later:?}");
    svc.stop().await;
}

#[tokio::test]
async fn batch_context_reward_and_probes_through_the_client() {
    let svc = TestService::start().await;
    let c = svc.client();
    let batch = RememberBatch {
        items: vec![
            memory("hotel", "The user booked the Hotel Lumiere in Paris."),
            memory("allergy", "The user is allergic to peanuts."),
        ],
        universe: None,
    };
    let r = c
        .remember_batch(&batch, scope("acme", "travel").request_id("b-1"))
        .await
        .unwrap();
    assert!(r.ok && r.warnings().next().is_none());
    let ids: Vec<_> = r
        .results
        .iter()
        .map(|x| x.request_id.clone().unwrap())
        .collect();
    assert_eq!(ids, ["b-1:0", "b-1:1"]);
    c.remember(
        &memory("seat", "Window seat on the flight to Paris."),
        scope("acme", "agent"),
    )
    .await
    .unwrap();

    let ctx = c
        .context_evaluate(
            &ContextRequest {
                session_id: "s1".into(),
                query: "Paris hotel".into(),
                top_k: 5,
            },
            scope("acme", "agent"),
        )
        .await
        .unwrap();
    assert_eq!(ctx.tenant_id, "acme");
    assert!(ctx.prompt.contains("Hotel Lumiere"), "{}", ctx.prompt);
    assert_eq!(
        ctx.memories[0]["key"], "hotel",
        "best first, across namespaces"
    );
    assert!(ctx.memories.iter().all(|m| m["key"] != "allergy"));

    let state = c.adaptation_state(scope("acme", "agent")).await.unwrap();
    assert_eq!((state.tenant_id.as_str(), state.history_len), ("acme", 0));
    let fb = FeedbackRequest {
        session_id: "s1".into(),
        query: "Paris hotel".into(),
        prompt: ctx.prompt.clone(),
        response_text: "You booked the Hotel Lumiere.".into(),
        utility: 0.9,
        reward: Some(1.0),
        metadata: None,
    };
    let ack = c
        .context_feedback(&fb, scope("acme", "agent"))
        .await
        .unwrap();
    assert!(ack.accepted && !ack.adaptation_applied);
    let after = c.adaptation_state(scope("acme", "agent")).await.unwrap();
    assert_eq!(after.history_len, 1);
    assert_eq!(
        after.retrieval, state.retrieval,
        "weights are fixed: nothing is learned"
    );
    assert_eq!(
        c.adaptation_state(scope("globex", "agent"))
            .await
            .unwrap()
            .history_len,
        0
    );

    assert_eq!(c.healthz().await.unwrap().status, "healthy");
    assert_eq!(c.readyz().await.unwrap().status, ReadyStatus::Ready);
    let health = c.health().await.unwrap();
    assert_eq!(health.status, AggregateStatus::Healthy);
    assert_eq!(health.details["memory_ok"], true);
    assert_eq!(health.memory_ok(), Some(true));
    svc.stop().await;
}

/// The process's app serves SomaBrain's probes and the SDK's admin routes
/// side by side: `/healthz` is the contract's (`"healthy"`), `/live`,
/// `/ready`, `/v1/health` and `/metrics` are soma-observability's.
#[tokio::test]
async fn contract_probes_and_admin_routes_share_one_app() {
    let svc = TestService::start().await;
    let http = reqwest::Client::new();
    let get = |path: &'static str| {
        let http = http.clone();
        let url = format!("{}{path}", svc.url());
        async move {
            let r = http.get(url).send().await.expect(path);
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    let (status, body) = get("/healthz").await;
    assert_eq!(status, 200);
    assert!(body.contains("healthy"), "/healthz is SomaBrain's: {body}");
    let (status, body) = get("/live").await;
    assert_eq!((status, body.as_str()), (200, r#"{"status":"live"}"#));
    assert_eq!(get("/ready").await.0, 200);
    assert_eq!(get("/v1/health").await.0, 200);
    let (status, body) = get("/metrics").await;
    assert_eq!(status, 200);
    assert!(body.contains("# EOF"), "OpenMetrics text: {body}");
    svc.stop().await;
}

/// The example platform's pattern: the memory replicator stores a turn
/// (key = message id, `user_text` / `reply_text`), the conversation worker
/// later recalls with the user's next message, `top_k` 3, and reads
/// `user_text` of the hits in its namespace.
#[tokio::test]
async fn a_conversation_turn_is_recalled_by_a_later_question() {
    let svc = TestService::start().await;
    let c = svc.client();
    let s = || scope("tenant-a", "conversation");
    let turns = [
        ("My favourite colour is green.", "Noted: green."),
        ("I am flying to Lisbon next Tuesday.", "Have a good trip!"),
        ("Remind me to water the plants.", "I will."),
    ];
    for (i, (user, reply)) in turns.iter().enumerate() {
        let m = Memory::from_json(
            format!("0190f0aa-0000-7000-8000-00000000000{i}"),
            json!({"conversation_id": "c-1", "subject": "user-1", "user_text": user, "reply_text": reply}),
        )
        .unwrap();
        c.remember(&m, s()).await.unwrap();
    }
    for (question, expected) in [
        (
            "what is my favourite colour?",
            "My favourite colour is green.",
        ),
        (
            "when am I flying to Lisbon?",
            "I am flying to Lisbon next Tuesday.",
        ),
        ("which plants need water", "Remind me to water the plants."),
    ] {
        let found = c
            .recall(&RecallRequest::new(question).top_k(3), s())
            .await
            .unwrap();
        let texts: Vec<&str> = found
            .hits_in_namespace()
            .filter_map(|h| h.content.get("user_text").and_then(Value::as_str))
            .collect();
        assert_eq!(texts.first(), Some(&expected), "{question}: {texts:?}");
    }
    svc.stop().await;
}

/// PostgreSQL gone: memory routes answer 503 at once (nothing buffered),
/// the client calls it unavailable, and readiness turns degraded.
#[tokio::test]
async fn storage_down_is_a_503_and_not_ready() {
    let svc = TestService::start().await;
    let c = svc.client();
    svc.pool.close().await;
    let e = c
        .recall(&RecallRequest::new("anything"), scope("acme", "agent"))
        .await
        .unwrap_err();
    assert!(e.is_unavailable() && !e.is_rejected(), "{e}");
    assert_eq!(e.status().map(|s| s.as_u16()), Some(503));
    assert_eq!(
        e.detail(),
        Some(&ServerDetail::Message("Memory storage unavailable".into()))
    );
    let e = c
        .remember(&memory("k", "x"), scope("acme", "agent"))
        .await
        .unwrap_err();
    assert!(e.is_unavailable(), "{e}");
    // The background check notices within its 5 s interval.
    let mut degraded = false;
    for _ in 0..40 {
        if c.readyz().await.unwrap().status == ReadyStatus::Degraded {
            degraded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(degraded, "readyz turns degraded when PostgreSQL is gone");
    let health = c.health().await.unwrap();
    assert_eq!(health.status, AggregateStatus::Critical);
    assert_eq!(health.details["memory_ok"], false);
    assert_eq!(health.memory_ok(), Some(false));
    svc.stop().await;
}

/// The feedback totals (migration 3) start from the feedback a schema
/// already holds, and count on from there.
#[tokio::test]
async fn the_feedback_totals_migration_counts_the_feedback_already_stored() {
    let svc = TestService::start().await;
    let q = format!("\"{}\"", svc.schema);
    // The schema as a build before migration 3 left it, with feedback.
    sqlx::raw_sql(&format!(
        "DROP TABLE {q}.feedback_totals;
         DELETE FROM {q}.schema_migrations WHERE version = 3;
         INSERT INTO {q}.feedback (tenant, session_id, query, prompt, response_text, utility)
         SELECT t, 's', 'q', 'p', 'r', 1 FROM unnest(ARRAY['acme', 'acme', 'acme', 'globex']) t;"
    ))
    .execute(&svc.pool)
    .await
    .unwrap();
    // A new build starting on that schema migrates it.
    soma_memory_service::MemoryService::builder(
        svc.pool.clone(),
        soma_memory_service::MemoryConfig {
            token: TOKEN.into(),
            ..Default::default()
        },
    )
    .schema(&svc.schema)
    .build()
    .await
    .expect("migrates to the feedback totals");

    let c = svc.client();
    let len = |tenant: &'static str| {
        let c = c.clone();
        async move {
            c.adaptation_state(scope(tenant, "agent"))
                .await
                .unwrap()
                .history_len
        }
    };
    assert_eq!((len("acme").await, len("globex").await), (3, 1));
    let fb = FeedbackRequest {
        session_id: "s1".into(),
        query: "q".into(),
        prompt: "p".into(),
        response_text: "r".into(),
        utility: 0.5,
        reward: None,
        metadata: None,
    };
    c.context_feedback(&fb, scope("acme", "agent"))
        .await
        .unwrap();
    assert_eq!((len("acme").await, len("globex").await), (4, 1));
    svc.stop().await;
}
