//! Issue #18 items 2, 5 and 6, end to end: the gateway and the workers
//! in-process against the real PostgreSQL, Redis, Kafka-protocol broker and
//! OPA-compatible policy, with the local memory service (the SomaBrain
//! stand-in) in-process on its own schema.
//!
//! - memory in the loop: a turn recalls what the same subject said in an
//!   earlier turn — never what another subject or tenant said — and the
//!   reply names the memories it used; each turn is remembered and sends
//!   reward feedback;
//! - isolation: a conversation belongs to its creator (403 problem bodies
//!   for another subject and another tenant, on send and on stream);
//! - idempotency: a retry after the client gave up publishes the same
//!   envelope id, per subject;
//! - a configured model streams the reply; a failing one answers `error`;
//! - tools run within their timeout and output limit, results on
//!   `tool.results`, relayed to the stream;
//! - captured logs never contain a bearer token, the model's API key or
//!   the memory service token; `/metrics` has the families operators need.

mod support;

use std::time::{Duration, Instant};

use axum::http::StatusCode;
use serde_json::{Value, json};
use soma_example_platform::Gateway;
use soma_example_platform::gateway::message_id_for;
use sqlx::PgPool;
use support::model::{Mode, ModelServer, TOKENS};
use support::*;

const MEMORY_TOKEN: &str = "memory-loop-service-token-7f3a";
const LLM_KEY: &str = "sk-test-llm-key-91c2";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn turns_recall_only_their_subjects_memories_and_conversations_belong_to_their_creator() {
    let logs = Captured::install();
    let env = Env::new();
    let pool = PgPool::connect(&soma_testkit::postgres_url())
        .await
        .expect("PostgreSQL (start it with `cargo xtask stack up`)");
    let memory_schema = format!("{}_memory", env.prefix);
    let brain = memory_service(&pool, &memory_schema, MEMORY_TOKEN).await;
    let platform = env
        .platform()
        .set("somabrain.base_url", json!(format!("http://{brain}")))
        .set("somabrain.token", json!(MEMORY_TOKEN))
        .set("chat.recall_top_k", json!(8))
        .conversation_worker()
        .memory_replicator()
        .start()
        .await;
    let base = platform.base.clone();
    let client = reqwest::Client::new();
    let alice = env.token("alice", "acme", &["user"], ALL_SCOPES);
    let bob = env.token("bob", "acme", &["user"], ALL_SCOPES);
    let eve = env.token("eve", "globex", &["user"], ALL_SCOPES);
    let conv_a = format!("a-{}", uuid::Uuid::new_v4().simple());
    let conv_b = format!("b-{}", uuid::Uuid::new_v4().simple());
    let conv_e = format!("e-{}", uuid::Uuid::new_v4().simple());

    let mut sse_a = SseReader::open(&client, &base, &conv_a, &alice).await;
    warm_up(&client, &base, &mut sse_a, &conv_a, &alice).await;
    let mut sse_b = SseReader::open(&client, &base, &conv_b, &bob).await;
    let mut sse_e = SseReader::open(&client, &base, &conv_e, &eve).await;

    // Each subject tells the platform something.
    let said_a = turn(
        &client,
        &base,
        &mut sse_a,
        &conv_a,
        &alice,
        "my favourite colour is teal",
    )
    .await;
    let said_b = turn(
        &client,
        &base,
        &mut sse_b,
        &conv_b,
        &bob,
        "my favourite colour is crimson",
    )
    .await;
    let said_e = turn(
        &client,
        &base,
        &mut sse_e,
        &conv_e,
        &eve,
        "my favourite colour is ochre",
    )
    .await;
    let key = |events: &[SseEvent]| {
        completed(events).data["message_id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let (key_a, key_b, key_e) = (key(&said_a), key(&said_b), key(&said_e));
    // Remembered through the durable path (outbox → replicator → service).
    stored(&pool, &memory_schema, &[&key_a, &key_b, &key_e]).await;

    // A later turn of the same subject recalls it, and names it.
    let asked_a = turn(
        &client,
        &base,
        &mut sse_a,
        &conv_a,
        &alice,
        "what is my favourite colour",
    )
    .await;
    let done = completed(&asked_a);
    let text = done.data["text"].as_str().unwrap();
    assert_eq!(done.data["memory"], "recalled", "{text}");
    assert!(used(done).contains(&key_a), "{:?}", done.data);
    assert!(text.contains("teal"), "{text}");
    assert!(
        !text.contains("crimson") && !text.contains("ochre"),
        "another subject's or tenant's memory reached alice: {text}"
    );
    assert!(!used(done).contains(&key_b) && !used(done).contains(&key_e));
    assert!(text.contains("No language model is configured"), "{text}");
    let deltas = asked_a
        .iter()
        .filter(|e| e.event == "assistant.delta")
        .count();
    assert!((1..=4).contains(&deltas), "{deltas} deltas");
    assert_eq!(asked_a[0].event, "assistant.started");

    let asked_b = turn(
        &client,
        &base,
        &mut sse_b,
        &conv_b,
        &bob,
        "what is my favourite colour",
    )
    .await;
    let done = completed(&asked_b);
    let text = done.data["text"].as_str().unwrap();
    assert!(used(done).contains(&key_b), "{:?}", done.data);
    assert!(text.contains("crimson") && !text.contains("teal"), "{text}");

    // A principal the policy grants `memory.read_tenant` (an admin with
    // `memory:read`) recalls the tenant's memories — still never another
    // tenant's — through the context route.
    let ada = env.token(
        "ada",
        "acme",
        &["admin"],
        &format!("{ALL_SCOPES} memory:read"),
    );
    let conv_d = format!("d-{}", uuid::Uuid::new_v4().simple());
    let mut sse_d = SseReader::open(&client, &base, &conv_d, &ada).await;
    let asked_d = turn(
        &client,
        &base,
        &mut sse_d,
        &conv_d,
        &ada,
        "what is my favourite colour",
    )
    .await;
    let done = completed(&asked_d);
    let seen = used(done);
    assert!(
        seen.contains(&key_a) && seen.contains(&key_b),
        "{:?}",
        done.data
    );
    assert!(
        !seen.contains(&key_e),
        "another tenant's memory: {:?}",
        done.data
    );

    // Reward feedback is sent for every turn (after its memory is stored),
    // with utility for the turns whose reply used memories.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (feedback, useful): (i64, i64) = sqlx::query_as(&format!(
            "SELECT count(*), count(*) FILTER (WHERE utility > 0) \
             FROM {memory_schema}.feedback WHERE tenant = 'acme'"
        ))
        .fetch_one(&pool)
        .await
        .unwrap();
        if feedback >= 5 && useful >= 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "feedback: {feedback} rows, {useful} with utility"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Another subject of the tenant, and another tenant: 403 on send and
    // on stream, with a problem body naming the reason.
    let r = send(&client, &base, &conv_a, &bob, json!({"text": "hi"}), None).await;
    assert_forbidden(r, "not_conversation_owner").await;
    let r = events_request(&client, &base, &conv_a, &bob, None)
        .send()
        .await
        .unwrap();
    assert_forbidden(r, "not_conversation_owner").await;
    let r = send(&client, &base, &conv_a, &eve, json!({"text": "hi"}), None).await;
    assert_forbidden(r, "tenant_mismatch").await;
    let r = events_request(&client, &base, &conv_a, &eve, None)
        .send()
        .await
        .unwrap();
    assert_forbidden(r, "tenant_mismatch").await;

    // Idempotency: the message id is derived from (tenant, subject, key);
    // the retry gets the first answer and the message is answered once.
    // Bob's same key is another message.
    let key = format!("k-{}", uuid::Uuid::new_v4().simple());
    let expected = message_id_for("acme", "alice", &key);
    let first = send(
        &client,
        &base,
        &conv_a,
        &alice,
        json!({"text": "once only"}),
        Some(&key),
    )
    .await;
    let first: Value = expect_status(first, 202).await.json().await.unwrap();
    assert_eq!(first["message_id"], expected.to_string());
    let retry = send(
        &client,
        &base,
        &conv_a,
        &alice,
        json!({"text": "once only"}),
        Some(&key),
    )
    .await;
    let retry = expect_status(retry, 202).await;
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    let retry_answer: Value = retry.json().await.unwrap();
    assert_eq!(retry_answer["message_id"], expected.to_string());
    let once = answer_to(&mut sse_a, &expected.to_string()).await;
    completed(&once);
    let deadline = Instant::now() + Duration::from_secs(3);
    while let Some(ev) = sse_a.next(deadline).await {
        assert_ne!(
            ev.data["message_id"],
            expected.to_string(),
            "answered twice: {ev:?}"
        );
    }
    let r = send(
        &client,
        &base,
        &conv_b,
        &bob,
        json!({"text": "once only"}),
        Some(&key),
    )
    .await;
    let bobs: Value = expect_status(r, 202).await.json().await.unwrap();
    assert_eq!(
        bobs["message_id"],
        message_id_for("acme", "bob", &key).to_string()
    );
    assert_ne!(bobs["message_id"], retry_answer["message_id"]);

    // The metric families operators need, on each service.
    let gw = metrics_text(&client, platform.gateway.admin_addr()).await;
    let wk = metrics_text(&client, platform.worker("conversation").admin_addr()).await;
    let rp = metrics_text(&client, platform.worker("memory").admin_addr()).await;
    for (who, text, families) in [
        (
            "gateway",
            &gw,
            &[
                "soma_policy_auth_decisions_total",
                "soma_bus_published_total",
                "soma_outbox_pending",
                "soma_platform_sse_resets_total",
            ][..],
        ),
        (
            "worker",
            &wk,
            &[
                "soma_platform_assistant_time_to_first_token_seconds_bucket",
                "soma_platform_assistant_tokens_total",
                "soma_platform_assistant_turns_total",
                "soma_somabrain_requests_total",
                "soma_bus_consumer_lag_messages",
                "soma_bus_consumed_total",
                "soma_outbox_dead_letters",
            ][..],
        ),
        (
            "replicator",
            &rp,
            &[
                "soma_somabrain_requests_total",
                "soma_bus_consumer_lag_messages",
                "soma_bus_consumed_total",
                "soma_outbox_dead_letters",
            ][..],
        ),
    ] {
        for f in families {
            assert!(text.contains(f), "{who} /metrics has no {f}");
        }
    }
    assert!(
        wk.lines().any(|l| l
            .starts_with("soma_platform_assistant_time_to_first_token_seconds_count")
            && l.contains("generator=\"builtin\"")
            && !l.ends_with(" 0")),
        "time to first token observed"
    );

    drop((sse_a, sse_b, sse_e, sse_d));
    platform.shutdown().await;
    logs.assert_free_of(&[&alice, &bob, &eve, &ada, MEMORY_TOKEN, &env.secret]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_configured_model_streams_the_reply_and_tools_keep_to_their_limits() {
    let logs = Captured::install();
    let env = Env::new();
    let model = ModelServer::start(Mode::Stream).await;
    let platform = env
        .platform()
        .set("llm.base_url", json!(model.base_url()))
        .set("llm.api_key", json!(LLM_KEY))
        .set("llm.model", json!("fake-1"))
        .set("tools.max_output_bytes", json!(64))
        .set("tools.limits", json!({"sleep": {"timeout_ms": 300}}))
        .conversation_worker()
        .tool_executor()
        .start()
        .await;
    let worker = platform.worker("conversation");
    let base = platform.base.clone();
    let client = reqwest::Client::new();
    let ava = env.token(
        "ava",
        "acme",
        &["agent"],
        "conversation:write conversation:read tool:execute",
    );
    let conv = format!("m-{}", uuid::Uuid::new_v4().simple());
    let mut sse = SseReader::open(&client, &base, &conv, &ava).await;
    warm_up(&client, &base, &mut sse, &conv, &ava).await;

    // Streamed by the model: the reply is its tokens, in one stored delta.
    let events = turn(&client, &base, &mut sse, &conv, &ava, "tell me about teal").await;
    let done = completed(&events);
    assert_eq!(done.data["text"], TOKENS.concat());
    let deltas: String = events
        .iter()
        .filter(|e| e.event == "assistant.delta")
        .map(|e| e.data["text"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(deltas, TOKENS.concat());
    assert!(
        events
            .iter()
            .filter(|e| e.event == "assistant.delta")
            .count()
            == 1
    );
    {
        let seen = model.seen();
        let (auth, body) = seen.last().unwrap();
        assert_eq!(auth.as_deref(), Some(format!("Bearer {LLM_KEY}").as_str()));
        assert_eq!(body["stream"], true);
        assert_eq!(body["model"], "fake-1");
        assert_eq!(body["messages"][1]["content"], "tell me about teal");
    }

    // A failing model: an `error` event, no reply.
    model.set_mode(Mode::Fail);
    let events = turn(&client, &base, &mut sse, &conv, &ava, "again").await;
    let last = events.last().unwrap();
    assert_eq!(last.event, "error", "{events:?}");
    assert!(
        last.data["text"].as_str().unwrap().contains("answered 500"),
        "{last:?}"
    );
    assert!(events.iter().all(|e| e.event != "assistant.completed"));
    // A stream that breaks off: also an error, not half a reply. What the
    // client previewed of it is withdrawn by that `error`: no stored event
    // carries the half reply.
    model.set_mode(Mode::Break);
    let events = turn(&client, &base, &mut sse, &conv, &ava, "once more").await;
    let last = events.last().unwrap();
    assert_eq!(last.event, "error", "{events:?}");
    assert!(
        last.data["text"].as_str().unwrap().contains("[DONE]"),
        "{last:?}"
    );
    let previewed = events.iter().position(|e| e.event == "assistant.preview");
    assert_eq!(
        previewed,
        Some(0),
        "the half reply was previewed: {events:?}"
    );
    assert!(
        events[1..]
            .iter()
            .all(|e| e.event == "assistant.preview" || e.event == "error"),
        "{events:?}"
    );

    let wk = metrics_text(&client, worker.admin_addr()).await;
    assert!(
        wk.lines().any(|l| l
            .starts_with("soma_platform_assistant_time_to_first_token_seconds_count")
            && l.contains("generator=\"openai\"")
            && !l.ends_with(" 0")),
        "{wk}"
    );
    let tokens = metric(
        &client,
        worker.admin_addr(),
        "soma_platform_assistant_tokens_total",
        "generator=\"openai\"",
    )
    .await;
    assert!(tokens >= TOKENS.len() as f64, "{tokens} tokens counted");
    let failed = metric(
        &client,
        worker.admin_addr(),
        "soma_platform_assistant_turns_total",
        "outcome=\"model_failed\"",
    )
    .await;
    assert_eq!(failed, 2.0);

    // Tools: a result event, then the reply; the timeout and the output
    // limit hold; the result is on `tool.results` with the request id.
    let request_id = format!("req-{}", uuid::Uuid::new_v4().simple());
    let r = client
        .post(format!("{base}/v1/conversations/{conv}/messages"))
        .bearer_auth(&ava)
        .header("x-request-id", &request_id)
        .json(&json!({"text": "/sleep 5000"}))
        .send()
        .await
        .unwrap();
    let id = message_id_of(expect_status(r, 202).await).await;
    let started = Instant::now();
    let events = answer_to(&mut sse, &id).await;
    assert_eq!(events[0].event, "tool.result", "{events:?}");
    assert_eq!(
        events[0].data["text"],
        "Tool `sleep` timed out after 300 ms."
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the 300 ms timeout cut the 5 s sleep"
    );
    let (result, headers) = record_within(
        &format!("{}.tool_results", env.prefix),
        &id,
        Duration::from_secs(30),
    )
    .await
    .expect("the result is on tool.results");
    assert_eq!(result["status"], "timed_out");
    assert_eq!(result["request_id"], request_id.as_str());
    assert_eq!(
        headers.get("soma-correlation-id").map(String::as_str),
        Some(request_id.as_str()),
        "{headers:?}"
    );

    let long = "x".repeat(500);
    let events = turn(
        &client,
        &base,
        &mut sse,
        &conv,
        &ava,
        &format!("/echo {long}"),
    )
    .await;
    assert_eq!(events[0].event, "tool.result");
    assert_eq!(
        events[0].data["text"].as_str().unwrap().len(),
        64,
        "cut at tools.max_output_bytes"
    );
    let id = events[0].data["message_id"].as_str().unwrap().to_owned();
    let (result, _) = record_within(
        &format!("{}.tool_results", env.prefix),
        &id,
        Duration::from_secs(30),
    )
    .await
    .expect("the echo result is on tool.results");
    assert_eq!(result["status"], "ok");
    assert_eq!(result["truncated"], true);

    drop(sse);
    platform.shutdown().await;
    logs.assert_free_of(&[&ava, LLM_KEY, &env.secret]);
}

/// The request times out at the gateway (`http.request_timeout_ms`, 400 ms)
/// while its publish waits for an unreachable broker (1.5 s, then the
/// outbox): the publish is not cancelled with the request. It completes,
/// stores its answer under the key, and the client's retry gets that answer
/// (`deferred`, replayed) with the id derived from (tenant, subject, key).
/// Were the publish tied to the request, the retry would find the key
/// still in progress (`409`) until its claim expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_outlives_its_timed_out_request_and_the_retry_gets_its_answer() {
    let env = Env::new();
    let dead_broker = format!("127.0.0.1:{}", soma_testkit::free_port());
    let live = env.settings(&[
        ("bus.bootstrap_servers", json!(dead_broker)),
        ("bus.publisher.timeout_ms", json!(1_500)),
        ("http.request_timeout_ms", json!(400)),
    ]);
    let gateway = Gateway::start(live, listener().await, listener().await)
        .await
        .expect("the gateway starts without Kafka");
    let base = format!("http://{}", gateway.addr());
    let client = reqwest::Client::new();
    let token = env.token("alice", "acme", &["user"], ALL_SCOPES);
    let key = format!("k-{}", uuid::Uuid::new_v4().simple());
    let body = json!({"text": "are you there"});

    let first = send(&client, &base, "c-slow", &token, body.clone(), Some(&key)).await;
    assert_eq!(
        first.status(),
        StatusCode::GATEWAY_TIMEOUT,
        "the request timed out"
    );
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let retry = send(&client, &base, "c-slow", &token, body, Some(&key)).await;
    let retry = expect_status(retry, 202).await;
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    let answer: Value = retry.json().await.unwrap();
    assert_eq!(answer["delivery"], "deferred");
    assert_eq!(
        answer["message_id"],
        message_id_for("acme", "alice", &key).to_string()
    );
    // Exactly one message is waiting in the outbox with that id.
    let stats = gateway
        .runtime()
        .outbox
        .stats()
        .await
        .expect("outbox stats");
    assert_eq!(stats.pending, 1, "{stats:?}");
    gateway.shutdown().await;
}
