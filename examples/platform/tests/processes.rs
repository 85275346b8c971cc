//! Issue #18's end-to-end test with the platform as it is deployed: the four
//! binaries (gateway, conversation worker, tool executor, memory
//! replicator) as processes with a generated settings file, against the
//! real PostgreSQL, Redis and Kafka-protocol broker, the local memory
//! service (the SomaBrain stand-in, on its own schema) and an in-process
//! OTLP receiver. Checked only through HTTP, SSE, the receiver and the
//! processes' logs:
//!
//! - a turn recalls what the same subject said in an earlier turn, never
//!   what another subject said;
//! - another subject, and another tenant, get `403` on someone else's
//!   conversation;
//! - a tool call goes through the tool executor;
//! - an SSE client that disconnects mid-reply and reconnects with
//!   `Last-Event-ID` gets every missed event once, in order;
//! - one trace spans client → gateway → Kafka → conversation worker →
//!   memory service (its server span a child of the worker's call) →
//!   Kafka → gateway, the Kafka hops linked by the envelopes'
//!   `traceparent`, the memory service hop by the request's;
//! - the logs of all four processes (JSON, at debug) never contain a bearer
//!   token, the signing secret or the memory service token;
//! - a conversation worker killed (SIGKILL) while the model is mid-reply:
//!   the client saw a live preview; the replacement answers the message
//!   again, previewing it again from `seq` 0, and the stored reply comes
//!   exactly once.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::json;
use soma_testkit::otlp::{ReceivedSpan, Spans};
use sqlx::PgPool;
use support::model::{Mode, ModelServer, TOKENS};
use support::processes::{Processes, Wiring};
use support::*;

const MEMORY_TOKEN: &str = "processes-memory-token-5d1e";
/// The trace and span id of the client's `traceparent` on the traced turn.
const CLIENT_TRACE: &str = "5e1f0a2b3c4d5e6f708192a3b4c5d6e7";
const CLIENT_SPAN: &str = "a1b2c3d4e5f60718";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_four_binaries_recall_per_subject_resume_streams_trace_one_turn_and_log_no_secret() {
    let env = Env::new();
    let pool = PgPool::connect(&soma_testkit::postgres_url())
        .await
        .expect("PostgreSQL (start it with `cargo xtask stack up`)");
    let memory_schema = format!("{}_memory", env.prefix);
    let (otlp, spans) = soma_testkit::otlp::start_http_receiver().await;
    let (brain, telemetry) = traced_memory_service(&pool, &memory_schema, otlp).await;
    let brain = format!("http://{brain}");
    let mut platform = Processes::start(&env, &Wiring::new(&brain, MEMORY_TOKEN).otlp(otlp));
    platform.wait_ready(Duration::from_secs(120)).await;
    let (base, client) = (platform.base(), reqwest::Client::new());
    let alice = env.token("alice", "acme", &["user"], ALL_SCOPES);
    let bob = env.token("bob", "acme", &["user"], ALL_SCOPES);
    let conv_a = format!("a-{}", uuid::Uuid::new_v4().simple());
    let conv_b = format!("b-{}", uuid::Uuid::new_v4().simple());
    let mut sse_a = SseReader::open(&client, &base, &conv_a, &alice).await;
    warm_up(&client, &base, &mut sse_a, &conv_a, &alice).await;
    let mut sse_b = SseReader::open(&client, &base, &conv_b, &bob).await;

    // Memory per subject; the question is traced from the client.
    let said = [
        "my favourite colour is teal",
        "my favourite colour is crimson",
    ];
    let said_a = turn(&client, &base, &mut sse_a, &conv_a, &alice, said[0]).await;
    let said_b = turn(&client, &base, &mut sse_b, &conv_b, &bob, said[1]).await;
    let (key_a, key_b) = (key_of(&said_a), key_of(&said_b));
    stored(&pool, &memory_schema, &[&key_a, &key_b]).await;
    let (traced, asked) = traced_turn(&client, &base, &mut sse_a, &conv_a, &alice).await;
    let done = completed(&asked);
    let text = done.data["text"].as_str().unwrap();
    assert_eq!(done.data["memory"], "recalled", "{text}");
    assert!(text.contains("teal") && !text.contains("crimson"), "{text}");
    assert!(used(done).contains(&key_a) && !used(done).contains(&key_b));

    // Someone else's conversation.
    let eve = env.token("eve", "globex", &["user"], ALL_SCOPES);
    for (other, reason) in [(&bob, "not_conversation_owner"), (&eve, "tenant_mismatch")] {
        let r = send(&client, &base, &conv_a, other, json!({"text": "hi"}), None).await;
        assert_forbidden(r, reason).await;
        let r = events_request(&client, &base, &conv_a, other, None)
            .send()
            .await
            .unwrap();
        assert_forbidden(r, reason).await;
    }

    // A tool call reaches the executor (which refuses a `user`: a denial
    // is an answer).
    let tool = turn(&client, &base, &mut sse_a, &conv_a, &alice, "/wordcount a").await;
    assert_eq!(tool[0].event, "tool.result", "{tool:?}");
    assert!(
        tool[0].data["text"]
            .as_str()
            .unwrap()
            .contains("was not run")
    );

    resume_mid_reply(&client, &base, sse_a, &conv_a, &alice).await;
    assert_metric_families(&client, &platform).await;
    drop(sse_b);

    let exits = platform.stop(Duration::from_secs(40)).await;
    assert!(exits.iter().all(|(_, ok)| *ok), "clean exits: {exits:?}");
    telemetry
        .shutdown_async()
        .await
        .expect("the test process's spans flushed");
    assert_one_trace(&spans, &traced);
    let secrets = [&alice, &bob, &eve, MEMORY_TOKEN, &env.secret];
    assert_no_secret_logged(&platform, &secrets);
}

/// The id of the message a reply answered.
fn key_of(events: &[SseEvent]) -> String {
    completed(events).data["message_id"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Asks with the client's `traceparent` (the trace's root); returns the
/// message id and the answer.
async fn traced_turn(
    client: &reqwest::Client,
    base: &str,
    sse: &mut SseReader,
    conv: &str,
    token: &str,
) -> (String, Vec<SseEvent>) {
    let r = client
        .post(format!("{base}/v1/conversations/{conv}/messages"))
        .bearer_auth(token)
        .header("traceparent", format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"))
        .json(&json!({"text": "what is my favourite colour"}))
        .send()
        .await
        .unwrap();
    let id = message_id_of(expect_status(r, 202).await).await;
    let answer = answer_to(sse, &id).await;
    (id, answer)
}

/// Every process logged (JSON, at debug), and none of them any of `secrets`.
fn assert_no_secret_logged(platform: &Processes, secrets: &[&str]) {
    for (service, _) in &platform.admins {
        let log = platform.log(service);
        let lines = log.lines().count();
        assert!(lines > 10, "{service} logged: {lines} lines");
        for secret in secrets {
            assert!(
                !log.contains(secret),
                "{service}'s log has a secret ({}…)",
                &secret[..8]
            );
        }
    }
}

/// The memory service in this process, traced like its binary (the HTTP
/// trace layer, spans exported as `soma-memory-service` to `otlp`).
async fn traced_memory_service(
    pool: &PgPool,
    schema: &str,
    otlp: SocketAddr,
) -> (SocketAddr, soma_observability::TelemetryGuard) {
    let mut config = soma_observability::TelemetryConfig::default();
    config.service_name = "soma-memory-service".into();
    config.log_format = soma_observability::LogFormat::Json;
    config.otlp_endpoint = Some(format!("http://{otlp}/v1/traces"));
    config.otlp_protocol = soma_observability::OtlpProtocol::Http;
    config.batch_scheduled_delay_ms = 200;
    let telemetry = soma_observability::init(&config).expect("telemetry of the test process");
    let service = build_memory_service(pool, schema, MEMORY_TOKEN).await;
    let router = service
        .router()
        .layer(soma_observability::http::TraceLayer::from_config(&config));
    let l = listener().await;
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, router).await });
    (addr, telemetry)
}

/// Each process's `/metrics` has the families its operators need.
async fn assert_metric_families(client: &reqwest::Client, platform: &Processes) {
    let consumer = [
        "soma_bus_consumed_total",
        "soma_bus_consumer_lag_messages",
        "soma_outbox_dead_letters",
        "soma_outbox_pending",
    ];
    let families: [(&str, &[&str]); 4] = [
        (
            "soma-gateway",
            &[
                "soma_policy_auth_decisions_total",
                "soma_bus_published_total",
                "soma_outbox_pending",
                "soma_platform_sse_resets_total",
                "soma_platform_live_previews_total",
            ],
        ),
        (
            "soma-conversation-worker",
            &[
                "soma_platform_assistant_time_to_first_token_seconds_bucket",
                "soma_platform_assistant_tokens_total",
                "soma_platform_assistant_turns_total",
                "soma_platform_live_previews_total",
                "soma_somabrain_requests_total",
            ],
        ),
        ("soma-tool-executor", &[]),
        (
            "soma-memory-replicator",
            &[
                "soma_somabrain_requests_total",
                "soma_platform_memory_replica_lag_seconds",
                "soma_platform_memory_replica_pending_count",
                "soma_platform_memory_dead_lettered_count",
                "soma_platform_memory_writes_total",
            ],
        ),
    ];
    // Consumer lag is sampled from the client's statistics (every
    // `bus.consumer.lag_interval_ms`): give each process a while to report it.
    let deadline = Instant::now() + Duration::from_secs(30);
    for (service, own) in families {
        let consumes = service != "soma-gateway";
        loop {
            let text = metrics_text(client, platform.admin(service)).await;
            let missing: Vec<&str> = own
                .iter()
                .chain(consumer.iter().filter(|_| consumes))
                .copied()
                .filter(|f| !text.contains(f))
                .collect();
            if missing.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{service} /metrics has no {missing:?}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// Reads the first event of a reply, disconnects, lets another reply
/// happen, reconnects with `Last-Event-ID`: the rest of the first reply
/// and all of the second arrive, each event once, ids dense, in order.
async fn resume_mid_reply(
    client: &reqwest::Client,
    base: &str,
    mut sse: SseReader,
    conv: &str,
    token: &str,
) {
    let r = send(
        client,
        base,
        conv,
        token,
        json!({"text": "tell me more"}),
        None,
    )
    .await;
    let first = message_id_of(expect_status(r, 202).await).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let started = loop {
        let ev = sse.next(deadline).await.expect("the reply starts");
        if ev.data["message_id"] == first.as_str() {
            break ev;
        }
    };
    assert_eq!(started.event, "assistant.started");
    drop(sse);
    let r = send(client, base, conv, token, json!({"text": "and then"}), None).await;
    let second = message_id_of(expect_status(r, 202).await).await;
    // The second reply is stored before the client comes back.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut sse = SseReader::resume(client, base, conv, token, Some(&started.id)).await;
    let mut missed = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while let Some(ev) = sse.next(deadline).await {
        let done = ev.event == "assistant.completed" && ev.data["message_id"] == second.as_str();
        missed.push(ev);
        if done {
            break;
        }
    }
    let ids: Vec<u64> = missed
        .iter()
        .map(|e| e.id.parse().expect("stored ids"))
        .collect();
    let from: u64 = started.id.parse().unwrap();
    assert_eq!(
        ids,
        (from + 1..from + 1 + ids.len() as u64).collect::<Vec<_>>(),
        "once, in order"
    );
    let of = |id: &str| -> Vec<&str> {
        missed
            .iter()
            .filter(|e| e.data["message_id"] == id)
            .map(|e| e.event.as_str())
            .collect()
    };
    let rest = of(first.as_str());
    assert_eq!(
        rest.first(),
        Some(&"assistant.delta"),
        "the rest of the first reply: {rest:?}"
    );
    assert_eq!(rest.last(), Some(&"assistant.completed"));
    assert!(
        !rest.contains(&"assistant.started"),
        "nothing seen twice: {rest:?}"
    );
    let all = of(second.as_str());
    assert_eq!(all.first(), Some(&"assistant.started"), "{all:?}");
    assert_eq!(
        all.iter().filter(|k| **k == "assistant.completed").count(),
        1
    );
}

/// The spans of the turn answering `message_id`: one trace from the
/// gateway's publish through the worker (and its memory service call) back
/// to the gateway's SSE hub, each Kafka hop a parent link.
fn assert_one_trace(spans: &Spans, message_id: &str) {
    let all = spans.all();
    let all: Vec<&ReceivedSpan> = all.iter().collect();
    let publish = find(&all, "the gateway's publish span of the message", |s| {
        s.service == "soma-gateway"
            && s.name() == "soma.publish"
            && s.attr("message_id").as_deref() == Some(message_id)
    });
    assert_eq!(publish.trace_id(), CLIENT_TRACE, "the client's trace");
    let t: Vec<&ReceivedSpan> = all
        .into_iter()
        .filter(|s| s.trace_id() == CLIENT_TRACE)
        .collect();
    let request = find(&t, "the gateway's request span", |s| {
        s.service == "soma-gateway" && s.name() == "HTTP POST /v1/conversations/{id}/messages"
    });
    assert_eq!(
        request.parent_span_id(),
        CLIENT_SPAN,
        "child of the client's span"
    );
    assert!(
        descends(&t, publish, &request.span_id()),
        "publish under the request"
    );
    let consume = find(&t, "the worker's consume span, child of the publish", |s| {
        s.service == "soma-conversation-worker"
            && s.name() == "soma.consume"
            && s.parent_span_id() == publish.span_id()
    });
    let brain = find(&t, "the worker's memory service call", |s| {
        s.service == "soma-conversation-worker" && s.name() == "somabrain.call"
    });
    assert!(
        descends(&t, brain, &consume.span_id()),
        "call under the consume span"
    );
    let served = find(&t, "the memory service's span, child of the call", |s| {
        s.service == "soma-memory-service" && s.parent_span_id() == brain.span_id()
    });
    assert!(served.name().starts_with("HTTP POST"), "{}", served.name());
    let worker_spans: Vec<String> = t
        .iter()
        .filter(|s| s.service == "soma-conversation-worker")
        .map(|s| s.span_id())
        .collect();
    let back = find(&t, "the gateway's SSE hub consuming the reply", |s| {
        s.service == "soma-gateway"
            && s.name() == "soma.consume"
            && s.attr("handler").as_deref() == Some("sse-hub")
            && worker_spans.contains(&s.parent_span_id())
    });
    assert!(publish.span.start_time_unix_nano <= back.span.start_time_unix_nano);
    // The turn's durable memory write is in the same trace too.
    find(&t, "the replicator's remember", |s| {
        s.service == "soma-memory-replicator" && s.name() == "somabrain.call"
    });
}

/// The span of `spans` that `is` it; fails naming `what` and listing them.
fn find<'a>(
    spans: &[&'a ReceivedSpan],
    what: &str,
    is: impl Fn(&ReceivedSpan) -> bool,
) -> &'a ReceivedSpan {
    spans
        .iter()
        .copied()
        .find(|s| is(s))
        .unwrap_or_else(|| panic!("no {what} among: {}", summary(spans.iter().copied())))
}

/// Whether `span` has `ancestor` among its ancestors in `spans`.
fn descends(spans: &[&ReceivedSpan], span: &ReceivedSpan, ancestor: &str) -> bool {
    let mut parent = span.parent_span_id();
    for _ in 0..32 {
        if parent == ancestor {
            return true;
        }
        match spans.iter().find(|s| s.span_id() == parent) {
            Some(p) => parent = p.parent_span_id(),
            None => return false,
        }
    }
    false
}

fn summary<'a>(spans: impl IntoIterator<Item = &'a ReceivedSpan>) -> String {
    spans
        .into_iter()
        .map(|s| {
            format!(
                "{}:{}({}<-{})",
                s.service,
                s.name(),
                s.span_id(),
                s.parent_span_id()
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The contract of live previews under a crash: previews are provisional,
/// the stored reply is exactly-once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_killed_mid_reply_previews_again_and_the_stored_reply_comes_once() {
    let env = Env::new();
    let model = ModelServer::start(Mode::Stream).await;
    let no_memory = format!("http://127.0.0.1:{}", soma_testkit::free_port());
    let wiring = Wiring::new(&no_memory, MEMORY_TOKEN).model(model.base_url());
    let mut platform = Processes::start(&env, &wiring);
    platform.wait_ready(Duration::from_secs(120)).await;
    let (base, client) = (platform.base(), reqwest::Client::new());
    let ava = env.token("ava", "acme", &["user"], ALL_SCOPES);
    let conv = format!("k-{}", uuid::Uuid::new_v4().simple());
    let mut sse = SseReader::open(&client, &base, &conv, &ava).await;
    warm_up(&client, &base, &mut sse, &conv, &ava).await;

    model.set_mode(Mode::Gated);
    let r = send(
        &client,
        &base,
        &conv,
        &ava,
        json!({"text": "tell me"}),
        None,
    )
    .await;
    let id = message_id_of(expect_status(r, 202).await).await;
    model.release(2);
    let first = next_of(&mut sse, &id).await;
    assert_eq!(
        (first.event.as_str(), first.data["seq"].as_u64()),
        ("assistant.preview", Some(0))
    );

    // The crash: no commit, no inbox row, the offset not committed.
    let asked = model.seen().len();
    platform.kill("soma-conversation-worker");
    platform.restart("soma-conversation-worker");
    platform.wait_ready(Duration::from_secs(120)).await;
    // Redelivered to the replacement (after the dead member's session
    // timed out), which asks the model again — for this message only: the
    // warm-up messages whose offsets were not committed yet are skipped as
    // answered before. The old request's stream may still wait at the
    // gate, so give enough for both.
    let deadline = Instant::now() + Duration::from_secs(90);
    while model.seen().len() == asked {
        assert!(
            Instant::now() < deadline,
            "the message was not handled again"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    model.release(2 + 2);
    let again = next_of(&mut sse, &id).await;
    assert_eq!(
        (again.event.as_str(), again.data["seq"].as_u64()),
        ("assistant.preview", Some(0))
    );
    model.release(2 * TOKENS.len());
    let rest = answer_to(&mut sse, &id).await;
    let stored: Vec<&SseEvent> = rest
        .iter()
        .filter(|e| e.event != "assistant.preview")
        .collect();
    let kinds: Vec<&str> = stored.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(kinds.first(), Some(&"assistant.started"), "{kinds:?}");
    assert_eq!(
        kinds.iter().filter(|k| **k == "assistant.started").count(),
        1
    );
    assert_eq!(stored.last().unwrap().data["text"], TOKENS.concat());
    let quiet = Instant::now() + Duration::from_secs(3);
    while let Some(ev) = sse.next(quiet).await {
        assert_ne!(
            ev.data["message_id"],
            id.as_str(),
            "after completed: {ev:?}"
        );
    }
    assert_eq!(
        model.seen().len(),
        asked + 1,
        "only this message was asked again"
    );
    model.set_mode(Mode::Stream);
    drop(sse);
    let exits = platform.stop(Duration::from_secs(40)).await;
    assert!(exits.iter().all(|(_, ok)| *ok), "clean exits: {exits:?}");
}

/// The next SSE event answering `id`.
async fn next_of(sse: &mut SseReader, id: &str) -> SseEvent {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let ev = sse.next(deadline).await.expect("an event of the reply");
        if ev.data["message_id"] == id {
            return ev;
        }
    }
}
