//! End-to-end: the gateway and workers, in-process, against the real
//! PostgreSQL, Redis and Kafka-protocol broker started by `cargo xtask test`.

mod support;

use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use serde_json::{Value, json};
use soma_example_platform::gateway::IDEMPOTENT_REPLAYED;
use soma_example_platform::{Gateway, conversation, memory, tools};
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_message_comes_back_as_ordered_sse_events_and_memory_writes_wait_for_somabrain() {
    let env = Env::new();
    let live = env.settings(&[]);
    let gateway = Gateway::start(live.clone(), listener().await, listener().await)
        .await
        .expect("gateway starts");
    let worker = conversation::start(live.clone(), listener().await)
        .await
        .expect("conversation worker starts");
    let memory = memory::start(live.clone(), listener().await)
        .await
        .expect("memory replicator starts");
    let tools = tools::start(live.clone(), listener().await)
        .await
        .expect("tool executor starts");
    let base = format!("http://{}", gateway.addr());
    let client = reqwest::Client::new();
    let token = env.token("alice", "acme", &["user"], ALL_SCOPES);
    let conversation = format!("c-{}", uuid::Uuid::new_v4().simple());
    let mut sse = SseReader::open(&client, &base, &conversation, &token).await;

    // SSE is live-only and the gateway's broadcast consumer starts at the
    // end of the topic once its partitions are assigned: send warm-up
    // messages until one reply arrives over SSE.
    let started = Instant::now();
    loop {
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "no reply reached the SSE stream within 90 s"
        );
        let r = send(
            &client,
            &base,
            &conversation,
            &token,
            json!({"text": "warm up"}),
            None,
        )
        .await;
        let r = expect_status(r, 202).await;
        let id = message_id_of(r).await;
        if sse.reply_to(&id, Duration::from_secs(15)).await.is_some() {
            break;
        }
    }

    // The real message, with an idempotency key.
    let first = send(
        &client,
        &base,
        &conversation,
        &token,
        json!({"text": "hello brave new world"}),
        Some("key-1"),
    )
    .await;
    let first = expect_status(first, 202).await;
    assert!(first.headers().get(IDEMPOTENT_REPLAYED).is_none());
    let accepted: Value = first.json().await.unwrap();
    assert_eq!(accepted["delivery"], "kafka");
    assert_eq!(accepted["conversation_id"], conversation.as_str());
    let message_id = accepted["message_id"].as_str().unwrap().to_owned();

    // A retry gets the first answer back; the key with another body is refused.
    let retry = send(
        &client,
        &base,
        &conversation,
        &token,
        json!({"text": "hello brave new world"}),
        Some("key-1"),
    )
    .await;
    let retry = expect_status(retry, 202).await;
    assert_eq!(retry.headers()[IDEMPOTENT_REPLAYED], "true");
    assert_eq!(retry.json::<Value>().await.unwrap(), accepted);
    let reused = send(
        &client,
        &base,
        &conversation,
        &token,
        json!({"text": "something else"}),
        Some("key-1"),
    )
    .await;
    expect_status(reused, 422).await;

    let events = sse
        .reply_to(&message_id, Duration::from_secs(60))
        .await
        .expect("the reply arrives over SSE");
    assert_eq!(events[0].event, "assistant.started");
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e.data["seq"], i as u64, "events in order: {events:?}");
        assert_eq!(e.data["conversation_id"], conversation.as_str());
        assert_eq!(e.data["memory"], "unavailable", "SomaBrain is down");
        assert!(!e.id.is_empty());
    }
    let last = events.last().unwrap();
    let deltas: String = events[1..events.len() - 1]
        .iter()
        .map(|e| {
            assert_eq!(e.event, "assistant.delta");
            e.data["text"].as_str().unwrap().to_owned()
        })
        .collect();
    let reply = last.data["text"].as_str().unwrap();
    assert_eq!(deltas, reply, "the deltas add up to the completed reply");
    assert!(
        reply.starts_with("Hello alice, you said 4 words: \"hello brave new world\"."),
        "{reply}"
    );
    assert!(reply.contains("memory is unavailable"), "{reply}");
    // Exactly one reply per message: the retry was not a second message.
    let later = sse.reply_to(&message_id, Duration::from_secs(2)).await;
    assert!(later.is_none(), "a second reply to the same message");

    // The memory write cannot reach SomaBrain: it waits (retried with
    // backoff, counted as `waiting`), and is never dead-lettered.
    let memory_admin = memory.admin_addr();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let metrics = metrics_text(&client, memory_admin).await;
        let waiting = metrics.lines().any(|l| {
            l.starts_with("soma_bus_consumed_total{")
                && l.contains("outcome=\"waiting\"")
                && !l.ends_with(" 0")
        });
        if waiting {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the memory write never reported waiting:\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let dlq_topic = format!("{}.memory.dlq", env.prefix);
    assert!(
        record_within(&dlq_topic, &message_id, Duration::from_secs(5))
            .await
            .is_none(),
        "a write waiting for SomaBrain was dead-lettered"
    );

    // Health says what is degraded.
    let health: Value = get_health(&client, worker.admin_addr()).await;
    let brain = &health["components"]["somabrain"];
    assert!(
        brain["status"] == "down" || brain["status"] == "degraded",
        "somabrain component: {health}"
    );
    assert_eq!(brain["criticality"], "optional");
    assert_eq!(health["status"], "degraded", "{health}");
    let metrics = client
        .get(format!("http://{}/metrics", gateway.admin_addr()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("soma_bus_published"),
        "publish metrics exported"
    );
    assert!(metrics.contains("soma_policy"), "policy metrics exported");

    // Tool calls: the executor authorizes each with the tool's risk from its
    // own registry; denials are answers, not errors.
    let scopes = "conversation:write conversation:read tool:execute";
    let agent = env.token("ava", "acme", &["agent"], scopes);
    let admin = env.token("root", "acme", &["admin"], scopes);
    let cases = [
        (
            &token,
            "/time",
            "Tool `time` was not run: missing_role, missing_scope.",
        ),
        (&agent, "/wordcount one two  three", "3 words."),
        (
            &agent,
            "/outbox",
            "Tool `outbox` was not run: high_risk_tool_requires_admin.",
        ),
        (&admin, "/outbox", "Outbox: "),
        (
            &admin,
            "/nope",
            "There is no tool `nope`. Tools: time, wordcount, echo, sleep, outbox.",
        ),
    ];
    for (i, (who, text, expected)) in cases.into_iter().enumerate() {
        // A conversation belongs to its creator: each sender uses its own.
        let own = format!("{conversation}-{i}");
        let mut sse = SseReader::open(&client, &base, &own, who).await;
        let r = send(&client, &base, &own, who, json!({"text": text}), None).await;
        let r = expect_status(r, 202).await;
        let id = message_id_of(r).await;
        let events = sse
            .reply_to(&id, Duration::from_secs(60))
            .await
            .unwrap_or_else(|| panic!("no answer to {text}"));
        let answer = events.last().unwrap().data["text"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(answer.starts_with(expected), "{text}: {answer}");
        assert_eq!(events.last().unwrap().data["memory"], "none");
    }

    // A remote config update reaches every replica (broadcast consumers),
    // each applying it to its live settings.
    let config_topic = format!("{}.config", env.prefix);
    let runtimes = [
        gateway.runtime(),
        worker.runtime(),
        memory.runtime(),
        tools.runtime(),
    ];
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut version = 100;
    loop {
        version += 1;
        publish_config_update(
            &gateway,
            &config_topic,
            version,
            json!({"chat": {"rate_limit": 77}}),
        )
        .await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        if runtimes.iter().all(|r| r.live.load().chat.rate_limit == 77) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "config update not applied everywhere within 60 s"
        );
    }
    for r in runtimes {
        let cur = r.live.load();
        assert!(cur.version() > 1, "a new version was published");
        assert!(cur.update_version().is_some_and(|v| v > 100));
    }
    // A broken update is rejected everywhere and the last good value stays.
    publish_config_update(
        &gateway,
        &config_topic,
        version + 1,
        json!({"chat": {"rate_limit": 0}}),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    for r in [gateway.runtime(), worker.runtime(), memory.runtime()] {
        assert_eq!(r.live.load().chat.rate_limit, 77, "keep last good");
    }

    drop(sse);
    tools.shutdown().await;
    memory.shutdown().await;
    worker.shutdown().await;
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authentication_policy_validation_and_rate_limits_answer_as_documented() {
    let env = Env::new();
    let live = env.settings(&[("chat.rate_limit", json!(10))]);
    let gateway = Gateway::start(live, listener().await, listener().await)
        .await
        .expect("gateway starts");
    let base = format!("http://{}", gateway.addr());
    let client = reqwest::Client::new();
    let good = env.token("bob", "acme", &["user"], ALL_SCOPES);

    // No credential: 401 with a challenge and a problem body.
    let r = client
        .post(format!("{base}/v1/conversations/c1/messages"))
        .json(&json!({"text": "hi"}))
        .send()
        .await
        .unwrap();
    assert!(r.headers().contains_key("www-authenticate"));
    expect_problem(r, 401, "missing_credential").await;

    // Signed with another key: 401.
    let forged = env.token_with_secret("bob", "acme", &["user"], ALL_SCOPES, "not-the-key");
    let r = send(&client, &base, "c1", &forged, json!({"text": "hi"}), None).await;
    expect_status(r, 401).await;

    // A tenant header that disagrees with the token: 403.
    let r = client
        .post(format!("{base}/v1/conversations/c1/messages"))
        .bearer_auth(&good)
        .header("x-soma-tenant", "other")
        .json(&json!({"text": "hi"}))
        .send()
        .await
        .unwrap();
    expect_problem(r, 403, "tenant_mismatch").await;

    // Missing scope or role: the policy denies with 403 `forbidden`.
    let no_scope = env.token("bob", "acme", &["user"], "conversation:read");
    let r = send(&client, &base, "c1", &no_scope, json!({"text": "hi"}), None).await;
    let body = expect_problem(r, 403, "forbidden").await;
    assert!(body.to_string().contains("missing_scope"), "{body}");
    let operator = env.token("olga", "acme", &["operator"], ALL_SCOPES);
    let r = send(&client, &base, "c1", &operator, json!({"text": "hi"}), None).await;
    expect_status(r, 403).await;
    // Reading the stream needs `conversation:read`.
    let write_only = env.token("bob", "acme", &["user"], "conversation:write");
    let r = client
        .get(format!("{base}/v1/conversations/c1/events"))
        .bearer_auth(&write_only)
        .send()
        .await
        .unwrap();
    expect_status(r, 403).await;

    // Bad input: typed 4xx problems, nothing published.
    let r = send(&client, &base, "bad:id", &good, json!({"text": "hi"}), None).await;
    expect_problem(r, 400, "invalid_conversation_id").await;
    let r = send(&client, &base, "c1", &good, json!({"text": "   "}), None).await;
    expect_status(r, 400).await;
    let r = send(&client, &base, "c1", &good, json!({"txt": "hi"}), None).await;
    expect_status(r, 400).await;
    let big = "x".repeat(5_000);
    let r = send(&client, &base, "c1", &good, json!({"text": big}), None).await;
    expect_problem(r, 413, "message_too_large").await;
    // A body past `http.max_body_bytes` (16 KiB): axum's body limit, answered
    // as a problem too, not axum's plain text.
    let huge = "x".repeat(20 * 1024);
    let r = send(&client, &base, "c1", &good, json!({"text": huge}), None).await;
    expect_problem(r, 413, "body_too_large").await;
    // A method the route does not serve: 405 as a problem, not plain text.
    let r = client
        .put(format!("{base}/v1/conversations/c1/messages"))
        .bearer_auth(&good)
        .send()
        .await
        .unwrap();
    expect_problem(r, 405, "method_not_allowed").await;

    // Rate limit: 10 per window per tenant and route (the requests above,
    // even those the policy refused, counted against acme's budget: the
    // limiter runs before the policy). A fresh tenant gets exactly 10.
    let mut admitted = 0;
    let fresh = env.token("erin", "initech", &["user"], ALL_SCOPES);
    let limited = loop {
        let r = send(&client, &base, "c1", &fresh, json!({"text": "hi"}), None).await;
        match r.status().as_u16() {
            202 => admitted += 1,
            429 => break r,
            s => panic!("unexpected status {s}"),
        }
        assert!(admitted <= 10, "more than the limit admitted");
    };
    assert_eq!(admitted, 10);
    assert!(limited.headers().contains_key("retry-after"));
    assert_eq!(limited.headers()["x-ratelimit-limit"], "10");
    expect_problem(limited, 429, "rate_limited").await;
    // Another tenant has its own budget.
    // (Its own conversation: "c1" belongs to initech's erin now.)
    let other = env.token("carol", "globex", &["user"], ALL_SCOPES);
    let r = send(
        &client,
        &base,
        "c1-globex",
        &other,
        json!({"text": "hi"}),
        None,
    )
    .await;
    expect_status(r, 202).await;
    // An Idempotency-Key that is not 1-128 visible ASCII characters: the
    // idempotency layer refuses it before the handler runs.
    let r = send(
        &client,
        &base,
        "c1-globex",
        &other,
        json!({"text": "hi"}),
        Some("two words"),
    )
    .await;
    expect_problem(r, 400, "invalid_idempotency_key").await;

    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_kafka_unreachable_the_gateway_defers_to_the_outbox_and_stays_ready() {
    let env = Env::new();
    let dead_broker = format!("127.0.0.1:{}", soma_testkit::free_port());
    let live = env.settings(&[
        ("bus.bootstrap_servers", json!(dead_broker)),
        ("bus.publisher.timeout_ms", json!(500)),
    ]);
    let gateway = Gateway::start(live, listener().await, listener().await)
        .await
        .expect("the gateway starts without Kafka");
    let base = format!("http://{}", gateway.addr());
    let client = reqwest::Client::new();
    let token = env.token("dana", "acme", &["user"], ALL_SCOPES);

    let mut ids = Vec::new();
    for i in 0..3 {
        let r = send(
            &client,
            &base,
            "c-down",
            &token,
            json!({"text": format!("m{i}")}),
            None,
        )
        .await;
        let r = expect_status(r, 202).await;
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["delivery"], "deferred", "{body}");
        ids.push(body["message_id"].as_str().unwrap().to_owned());
    }
    // Committed in Postgres, in order, waiting for the relay.
    let rows: Vec<(uuid::Uuid,)> = sqlx::query_as(&format!(
        "SELECT id FROM {}_outbox.outbox WHERE key = 'c-down' ORDER BY txid, seq",
        env.prefix
    ))
    .fetch_all(&gateway.runtime().pool)
    .await
    .expect("outbox rows");
    let stored: Vec<String> = rows.iter().map(|r| r.0.to_string()).collect();
    assert_eq!(stored, ids);

    // Kafka is optional for a publish-only service: degraded, still ready.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let health: Value = get_health(&client, gateway.admin_addr()).await;
        // (Other components' checks may still be catching up with their
        // first connection; wait for the steady state.)
        if health["components"]["kafka"]["status"] == "down" && health["status"] == "degraded" {
            assert_eq!(health["components"]["kafka"]["criticality"], "optional");
            assert_eq!(
                health["components"]["bus_publisher"]["status"], "degraded",
                "{health}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never degraded with kafka down and everything else up: {health}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let ready = client
        .get(format!("http://{}/ready", gateway.admin_addr()))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_edit_applies_on_the_next_policy_revision_and_a_broken_one_keeps_the_last_good() {
    let env = Env::new();
    let src = std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../soma-policy/policy"
    ));
    let dir = std::env::temp_dir().join(soma_testkit::unique_name("policy"));
    std::fs::create_dir_all(&dir).unwrap();
    let original = std::fs::read_to_string(src.join("soma.rego")).unwrap();
    std::fs::write(dir.join("soma.rego"), &original).unwrap();
    let live = env.settings(&[("policy.policy_dir", json!(dir.display().to_string()))]);
    let gateway = Gateway::start(live, listener().await, listener().await)
        .await
        .expect("gateway starts");
    let base = format!("http://{}", gateway.addr());
    let client = reqwest::Client::new();
    let user = env.token("uma", "acme", &["user"], ALL_SCOPES);
    let r = send(&client, &base, "c1", &user, json!({"text": "hi"}), None).await;
    expect_status(r, 202).await;

    // Tighten the policy on disk: sending now needs the admin role.
    let tightened = original.replace(
        r#""conversation.send": {"roles": {"user", "agent", "admin"}"#,
        r#""conversation.send": {"roles": {"admin"}"#,
    );
    assert_ne!(tightened, original, "the policy text changed");
    std::fs::write(dir.join("soma.rego"), &tightened).unwrap();
    // Nothing happens until the policy settings change: an update of
    // another section (a rate limit) recompiles nothing; bumping
    // `policy.revision` re-reads the files.
    let config_topic = format!("{}.config", env.prefix);
    let mut version = 500;
    let mut publish_update = async |doc: Value| {
        version += 1;
        publish_config_update(&gateway, &config_topic, version, doc).await;
    };
    publish_update(json!({"chat": {"rate_limit": 199}})).await;
    soma_testkit::wait_for(
        "the rate-limit update applied",
        Duration::from_secs(60),
        || gateway.runtime().live.load().chat.rate_limit == 199,
    )
    .await;
    // Time for a (wrong) reload to finish compiling.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let r = send(&client, &base, "c1", &user, json!({"text": "hi"}), None).await;
    expect_status(r, 202).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut rate = 200;
    loop {
        rate += 1;
        publish_update(json!({"policy": {"revision": rate}})).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let r = send(&client, &base, "c1", &user, json!({"text": "hi"}), None).await;
        if r.status() == 403 {
            let body = r.text().await.unwrap();
            assert!(body.contains("missing_role"), "{body}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the policy edit never took effect"
        );
    }

    // A policy that does not compile: the last good one stays in force and
    // health says so.
    std::fs::write(
        dir.join("soma.rego"),
        "package soma.authz\n\nthis is not rego {",
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        rate += 1;
        publish_update(json!({"policy": {"revision": rate}})).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let health: Value = get_health(&client, gateway.admin_addr()).await;
        if health["components"]["policy"]["status"] == "degraded" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a broken policy was not reported: {health}"
        );
    }
    let r = send(&client, &base, "c1", &user, json!({"text": "hi"}), None).await;
    let body = expect_status(r, 403).await.text().await.unwrap();
    assert!(
        body.contains("missing_role"),
        "the tightened policy still decides: {body}"
    );
    // (Its own conversation: "c1" belongs to uma.)
    let admin = env.token("ada", "acme", &["admin"], ALL_SCOPES);
    let r = send(&client, &base, "c2", &admin, json!({"text": "hi"}), None).await;
    expect_status(r, 202).await;

    gateway.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// The gateway's shutdown sequence under load: readiness goes down first,
/// requests in flight finish (every `202` was accepted: it is in the outbox
/// or on Kafka), an open SSE stream ends with a `shutdown` event telling the
/// client to reconnect, and the pool closes only after the publisher
/// flushed. Kafka is unreachable here so each POST is in flight for the
/// publish timeout when the shutdown starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_drains_in_flight_requests_ends_sse_with_reconnect_and_loses_nothing() {
    let env = Env::new();
    let dead_broker = format!("127.0.0.1:{}", soma_testkit::free_port());
    let live = env.settings(&[
        ("bus.bootstrap_servers", json!(dead_broker)),
        ("bus.publisher.timeout_ms", json!(700)),
        ("shutdown.deadline_ms", json!(15_000)),
    ]);
    let gateway = Gateway::start(live, listener().await, listener().await)
        .await
        .expect("the gateway starts without Kafka");
    let base = format!("http://{}", gateway.addr());
    let admin = gateway.admin_addr();
    let client = reqwest::Client::new();
    let token = env.token("erin", "acme", &["user"], ALL_SCOPES);
    let pool = sqlx::PgPool::connect(&soma_testkit::postgres_url())
        .await
        .unwrap();
    let mut sse = SseReader::open(&client, &base, "c-drain", &token).await;

    // 24 POSTs in flight (each waits ~700 ms for Kafka, then the outbox).
    let mut posts = Vec::new();
    for i in 0..24 {
        let client = client.clone();
        let base = base.clone();
        let token = token.clone();
        posts.push(tokio::spawn(async move {
            let r = client
                .post(format!("{base}/v1/conversations/c-drain/messages"))
                .bearer_auth(&token)
                .json(&json!({"text": format!("m{i}")}))
                .send()
                .await;
            match r {
                Ok(r) if r.status() == 202 => Some(message_id_of(r).await),
                _ => None,
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(250)).await;
    let stopping = tokio::spawn(gateway.shutdown());

    // Readiness goes down while the requests are still draining.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let ready = client.get(format!("http://{admin}/ready")).send().await;
        if matches!(&ready, Ok(r) if r.status() == 503) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "readiness never went down: {ready:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The open stream ends with a reconnect instruction.
    let ev = sse
        .next(Instant::now() + Duration::from_secs(10))
        .await
        .expect("a final event before the stream ends");
    assert_eq!(ev.event, "shutdown", "{ev:?}");
    assert_eq!(ev.data["reconnect"], true);
    assert!(
        sse.next(Instant::now() + Duration::from_secs(5))
            .await
            .is_none(),
        "the stream ends after the shutdown event"
    );

    let mut accepted = Vec::new();
    for p in posts {
        if let Some(id) = p.await.unwrap() {
            accepted.push(id);
        }
    }
    tokio::time::timeout(Duration::from_secs(20), stopping)
        .await
        .expect("shutdown within its deadline")
        .unwrap();
    assert_eq!(
        accepted.len(),
        24,
        "requests already in flight when the shutdown began are finished, not cut"
    );
    // Every accepted message is durable (Kafka is down: all in the outbox).
    let rows: Vec<(uuid::Uuid,)> = sqlx::query_as(&format!(
        "SELECT id FROM {}_outbox.outbox WHERE key = 'c-drain'",
        env.prefix
    ))
    .fetch_all(&pool)
    .await
    .expect("outbox rows");
    let stored: std::collections::HashSet<String> = rows.iter().map(|r| r.0.to_string()).collect();
    for id in &accepted {
        assert!(stored.contains(id), "accepted {id} is not in the outbox");
    }
    assert_eq!(stored.len(), accepted.len(), "nothing un-accepted appears");
}

/// A stuck dependency cannot pile requests up: past
/// `http.max_concurrent_requests` the gateway sheds load with `503`, and a
/// request running past `http.request_timeout_ms` answers `504`, both with
/// problem bodies.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overload_is_shed_with_503_and_slow_requests_time_out_with_504() {
    let env = Env::new();
    let dead_broker = format!("127.0.0.1:{}", soma_testkit::free_port());
    let live = env.settings(&[
        ("bus.bootstrap_servers", json!(dead_broker)),
        ("bus.publisher.timeout_ms", json!(3_000)),
        ("http.request_timeout_ms", json!(600)),
        ("http.max_concurrent_requests", json!(2)),
    ]);
    let gateway = Gateway::start(live, listener().await, listener().await)
        .await
        .expect("the gateway starts without Kafka");
    let base = format!("http://{}", gateway.addr());
    let client = reqwest::Client::new();
    let token = env.token("fay", "acme", &["user"], ALL_SCOPES);
    let mut posts = Vec::new();
    for i in 0..6 {
        let client = client.clone();
        let base = base.clone();
        let token = token.clone();
        posts.push(tokio::spawn(async move {
            let r = client
                .post(format!("{base}/v1/conversations/c-slow/messages"))
                .bearer_auth(&token)
                .json(&json!({"text": format!("m{i}")}))
                .send()
                .await
                .expect("an answer");
            let status = r.status().as_u16();
            let ct = r.headers()["content-type"].to_str().unwrap().to_owned();
            let body: Value = r.json().await.unwrap();
            (status, ct, body)
        }));
    }
    let mut by_status = std::collections::BTreeMap::<u16, usize>::new();
    for p in posts {
        let (status, ct, body) = p.await.unwrap();
        *by_status.entry(status).or_default() += 1;
        assert_eq!(ct, "application/problem+json", "{status} {body}");
        match status {
            504 => assert_eq!(body["code"], "request_timeout", "{body}"),
            503 => assert_eq!(body["code"], "overloaded", "{body}"),
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert_eq!(by_status.get(&504), Some(&2), "{by_status:?}");
    assert_eq!(by_status.get(&503), Some(&4), "{by_status:?}");
    gateway.shutdown().await;
}

/// The conversation worker stopped (SIGTERM's shutdown sequence) while
/// handler calls are in flight, then a new one started in its place: every
/// accepted message is answered exactly once (one `completed` reply event
/// per message, never two with different ids).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_stopped_mid_stream_and_replaced_answers_every_message_exactly_once() {
    let env = Env::new();
    let live = env.settings(&[]);
    let gateway = Gateway::start(live.clone(), listener().await, listener().await)
        .await
        .expect("gateway starts");
    let mut first = Some(
        conversation::start(live.clone(), listener().await)
            .await
            .expect("worker starts"),
    );
    let base = format!("http://{}", gateway.addr());
    let client = reqwest::Client::new();
    let token = env.token("gus", "acme", &["user"], ALL_SCOPES);
    let mut accepted = Vec::new();
    for i in 0..40 {
        let conversation = format!("c-roll-{}", i % 4);
        let r = send(
            &client,
            &base,
            &conversation,
            &token,
            json!({"text": format!("m{i}")}),
            None,
        )
        .await;
        accepted.push(message_id_of(expect_status(r, 202).await).await);
        if i == 20 {
            // Half-way: stop the worker while it is handling.
            if let Some(w) = first.take() {
                w.shutdown().await;
            }
        }
    }
    let second = conversation::start(live.clone(), listener().await)
        .await
        .expect("replacement worker starts");

    // Read every reply event; count distinct `completed` envelopes per message.
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", soma_testkit::kafka_bootstrap())
        .set("group.id", soma_testkit::unique_name("reply_reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    consumer
        .subscribe(&[format!("{}.events", env.prefix).as_str()])
        .expect("subscribe");
    let mut completed: std::collections::HashMap<String, std::collections::HashSet<String>> =
        std::collections::HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while accepted.iter().any(|id| !completed.contains_key(id)) {
        let left = deadline
            .checked_duration_since(Instant::now())
            .unwrap_or_else(|| {
                panic!(
                    "replies missing after 120 s: {} of {}",
                    accepted.len() - completed.len(),
                    accepted.len()
                )
            });
        let Ok(Ok(msg)) = tokio::time::timeout(left, consumer.recv()).await else {
            continue;
        };
        let payload: Value =
            serde_json::from_slice(msg.payload().unwrap_or_default()).unwrap_or(Value::Null);
        if payload["kind"] != "completed" {
            continue;
        }
        let envelope_id = msg
            .headers()
            .and_then(|h| {
                h.iter()
                    .find(|x| x.key == soma_bus::HEADER_ID)
                    .map(|x| String::from_utf8_lossy(x.value.unwrap_or_default()).into_owned())
            })
            .unwrap_or_else(|| format!("{}:{}", msg.partition(), msg.offset()));
        completed
            .entry(
                payload["message_id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            )
            .or_default()
            .insert(envelope_id);
    }
    for id in &accepted {
        let replies = &completed[id];
        assert_eq!(
            replies.len(),
            1,
            "message {id} answered {} times",
            replies.len()
        );
    }
    second.shutdown().await;
    gateway.shutdown().await;
}

/// Sends warm-up messages until a reply reaches every one of `streams`
/// (each gateway's broadcast consumer starts at the end of the topic once
/// its partitions are assigned). Returns the last warm-up reply's events
/// as `streams[0]` saw them.
async fn warm_up(
    client: &reqwest::Client,
    base: &str,
    conversation: &str,
    token: &str,
    streams: &mut [&mut SseReader],
) -> Vec<SseEvent> {
    let started = Instant::now();
    let mut i = 0;
    loop {
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "no reply reached every SSE stream within 90 s"
        );
        i += 1;
        let r = send(
            client,
            base,
            conversation,
            token,
            json!({"text": format!("warm-up {i}")}),
            None,
        )
        .await;
        let id = message_id_of(expect_status(r, 202).await).await;
        let mut first = None;
        let mut all = true;
        for s in streams.iter_mut() {
            match s.reply_to(&id, Duration::from_secs(5)).await {
                Some(events) => {
                    first.get_or_insert(events);
                }
                None => all = false,
            }
        }
        if all {
            return first.expect("at least one stream");
        }
    }
}

/// Reads events until `message_id`'s `assistant.completed`, returning every
/// event read (of any message) in order.
async fn read_through(sse: &mut SseReader, message_id: &str, within: Duration) -> Vec<SseEvent> {
    let deadline = Instant::now() + within;
    let mut out = Vec::new();
    while let Some(ev) = sse.next(deadline).await {
        let done = ev.event == "assistant.completed" && ev.data["message_id"] == message_id;
        out.push(ev);
        if done {
            return out;
        }
    }
    panic!("no assistant.completed for {message_id} within {within:?}; read {out:?}");
}

fn ids(events: &[SseEvent]) -> Vec<u64> {
    events
        .iter()
        .map(|e| {
            e.id.parse::<u64>()
                .unwrap_or_else(|_| panic!("event id of {e:?}"))
        })
        .collect()
}

/// Asserts the ids are dense and increasing from `first`.
fn assert_dense_from(events: &[SseEvent], first: u64) {
    let got = ids(events);
    let want: Vec<u64> = (first..first + got.len() as u64).collect();
    assert_eq!(got, want, "every event once, in order, no gap: {events:?}");
}

/// The `(message_id, seq)` pairs of `events`.
fn positions(events: &[SseEvent]) -> Vec<(String, u64)> {
    events
        .iter()
        .map(|e| {
            (
                e.data["message_id"].as_str().unwrap_or_default().to_owned(),
                e.data["seq"].as_u64().unwrap_or(u64::MAX),
            )
        })
        .collect()
}

/// Issue #18 item 4: a client that drops its stream mid-reply and
/// reconnects with `Last-Event-ID` — to another gateway instance — gets
/// every event it missed exactly once, in order, then the live stream; and
/// a gateway draining for shutdown hands its clients over the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_sse_client_resumes_with_last_event_id_on_another_gateway_and_misses_nothing() {
    let env = Env::new();
    let live = env.settings(&[("shutdown.deadline_ms", json!(10_000))]);
    let g1 = Gateway::start(live.clone(), listener().await, listener().await)
        .await
        .expect("gateway 1 starts");
    let g2 = Gateway::start(live.clone(), listener().await, listener().await)
        .await
        .expect("gateway 2 starts");
    let worker = conversation::start(live.clone(), listener().await)
        .await
        .expect("conversation worker starts");
    let (base1, base2) = (
        format!("http://{}", g1.addr()),
        format!("http://{}", g2.addr()),
    );
    let client = reqwest::Client::new();
    let token = env.token("alice", "acme", &["user"], ALL_SCOPES);
    let conversation = format!("c-{}", uuid::Uuid::new_v4().simple());
    let mut s1 = SseReader::open(&client, &base1, &conversation, &token).await;
    let mut s2 = SseReader::open(&client, &base2, &conversation, &token).await;
    warm_up(
        &client,
        &base1,
        &conversation,
        &token,
        &mut [&mut s1, &mut s2],
    )
    .await;
    drop(s2);

    // Mid-reply: the client reads `started` and one delta, then drops.
    let m1 = message_id_of(
        expect_status(
            send(
                &client,
                &base1,
                &conversation,
                &token,
                json!({"text": "first question, with a few words in it"}),
                None,
            )
            .await,
            202,
        )
        .await,
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut head = Vec::new();
    while head.len() < 2 {
        let ev = s1.next(deadline).await.expect("the start of m1's reply");
        if ev.data["message_id"] == m1.as_str() {
            head.push(ev);
        }
    }
    assert_eq!(head[0].event, "assistant.started");
    assert_eq!(head[1].event, "assistant.delta");
    let last = head[1].id.clone();
    drop(s1);
    // Sent while disconnected.
    let m2 = message_id_of(
        expect_status(
            send(
                &client,
                &base1,
                &conversation,
                &token,
                json!({"text": "second question"}),
                None,
            )
            .await,
            202,
        )
        .await,
    )
    .await;

    // Reconnect to the other gateway.
    let mut r = SseReader::resume(&client, &base2, &conversation, &token, Some(&last)).await;
    let missed = read_through(&mut r, &m2, Duration::from_secs(30)).await;
    assert_dense_from(&missed, last.parse::<u64>().unwrap() + 1);
    let pos = positions(&missed);
    let m1_rest: Vec<_> = pos.iter().take_while(|(m, _)| *m == m1).cloned().collect();
    let m2_all: Vec<_> = pos[m1_rest.len()..].to_vec();
    // A reply is started, one delta, completed: the rest of m1 is its
    // completed event.
    assert_eq!(m1_rest.len(), 1, "the rest of m1 (its completed): {pos:?}");
    assert_eq!(
        m1_rest,
        (2..2 + m1_rest.len() as u64)
            .map(|s| (m1.clone(), s))
            .collect::<Vec<_>>(),
        "m1 resumes right after the last event seen"
    );
    assert_eq!(
        m2_all,
        (0..m2_all.len() as u64)
            .map(|s| (m2.clone(), s))
            .collect::<Vec<_>>(),
        "then all of m2, nothing else"
    );
    assert_eq!(missed.last().unwrap().event, "assistant.completed");

    // Then live continues on the same stream.
    let m3 = message_id_of(
        expect_status(
            send(
                &client,
                &base1,
                &conversation,
                &token,
                json!({"text": "third"}),
                None,
            )
            .await,
            202,
        )
        .await,
    )
    .await;
    let next = read_through(&mut r, &m3, Duration::from_secs(30)).await;
    let after = *ids(&missed).last().unwrap();
    assert_dense_from(&next, after + 1);
    assert!(
        next.iter().all(|e| e.data["message_id"] == m3.as_str()),
        "{next:?}"
    );
    assert!(
        metric(
            &client,
            g2.admin_addr(),
            "soma_platform_sse_resumes_total",
            "cause=\"last_event_id\""
        )
        .await
            >= 1.0
    );

    // Gateway 2 drains: its stream ends with `shutdown`; the client
    // resumes on gateway 1 from the last id it saw and misses nothing
    // (m4 is answered while it is between gateways).
    let last = next.last().unwrap().id.clone();
    let stopping = tokio::spawn(g2.shutdown());
    let ev = r
        .next(Instant::now() + Duration::from_secs(15))
        .await
        .expect("a final event");
    assert_eq!(ev.event, "shutdown", "{ev:?}");
    let m4 = message_id_of(
        expect_status(
            send(
                &client,
                &base1,
                &conversation,
                &token,
                json!({"text": "fourth"}),
                None,
            )
            .await,
            202,
        )
        .await,
    )
    .await;
    let mut r1 = SseReader::resume(&client, &base1, &conversation, &token, Some(&last)).await;
    let m4_events = read_through(&mut r1, &m4, Duration::from_secs(30)).await;
    assert_dense_from(&m4_events, last.parse::<u64>().unwrap() + 1);
    assert!(
        m4_events
            .iter()
            .all(|e| e.data["message_id"] == m4.as_str()),
        "{m4_events:?}"
    );
    stopping.await.unwrap();
    worker.shutdown().await;
    g1.shutdown().await;
}

/// Retention keeps the newest `chat.session_events_max_per_conversation`
/// events; a `Last-Event-ID` older than that gets `event: reset` and then
/// the oldest kept onwards; one the conversation never had gets `reset`
/// and the live stream; a malformed one is a 400 problem.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retention_keeps_the_newest_events_and_an_expired_last_event_id_gets_a_reset() {
    let env = Env::new();
    let live = env.settings(&[
        ("chat.session_events_max_per_conversation", json!(4)),
        ("chat.session_events_prune_interval_ms", json!(200)),
    ]);
    let gateway = Gateway::start(live.clone(), listener().await, listener().await)
        .await
        .expect("gateway starts");
    let worker = conversation::start(live.clone(), listener().await)
        .await
        .expect("conversation worker starts");
    let base = format!("http://{}", gateway.addr());
    let client = reqwest::Client::new();
    let token = env.token("bob", "acme", &["user"], ALL_SCOPES);
    let conversation = format!("c-{}", uuid::Uuid::new_v4().simple());

    // Malformed ids: typed problem bodies.
    for bad in ["abc", "-3", "1.5", "18446744073709551616"] {
        let r = events_request(&client, &base, &conversation, &token, Some(bad))
            .send()
            .await
            .unwrap();
        let r = expect_status(r, 400).await;
        assert_eq!(
            r.headers()["content-type"].to_str().unwrap(),
            soma_observability::http::PROBLEM_CONTENT_TYPE
        );
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["code"], "invalid_last_event_id", "{bad}: {body}");
        assert_eq!(body["title"], "Bad Request", "{bad}: {body}");
        assert_eq!(body["status"], 400);
    }

    let mut sse = SseReader::open(&client, &base, &conversation, &token).await;
    warm_up(&client, &base, &conversation, &token, &mut [&mut sse]).await;
    let m = message_id_of(
        expect_status(
            send(
                &client,
                &base,
                &conversation,
                &token,
                json!({"text": "one more message to keep"}),
                None,
            )
            .await,
            202,
        )
        .await,
    )
    .await;
    let events = read_through(&mut sse, &m, Duration::from_secs(30)).await;
    let head = *ids(&events).last().unwrap();
    assert!(head > 4, "more events than are kept: {head}");

    // Pruning runs on the worker's timer: wait until only the newest 4 remain.
    let pool = sqlx::PgPool::connect(&soma_testkit::postgres_url())
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let kept = loop {
        let rows: Vec<(i64,)> = sqlx::query_as(&format!(
            "SELECT seq FROM {}_chat.session_events WHERE tenant = 'acme' AND conversation_id = $1 ORDER BY seq",
            env.prefix
        ))
        .bind(&conversation)
        .fetch_all(&pool)
        .await
        .unwrap();
        let kept: Vec<u64> = rows.into_iter().map(|r| r.0 as u64).collect();
        if kept.len() <= 4 || Instant::now() > deadline {
            break kept;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        kept,
        (head - 3..=head).collect::<Vec<_>>(),
        "the newest 4 are kept"
    );

    // Older than retention: reset, then the oldest kept onwards.
    let mut r = SseReader::resume(&client, &base, &conversation, &token, Some("1")).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let reset = r.next(deadline).await.expect("a reset event");
    assert_eq!(reset.event, "reset", "{reset:?}");
    assert_eq!(reset.data["last_event_id"], 1);
    assert_eq!(reset.data["resumed_after"], head - 4);
    assert_eq!(reset.id, (head - 4).to_string());
    let mut replayed = Vec::new();
    while replayed.len() < 4 {
        replayed.push(r.next(deadline).await.expect("the kept events"));
    }
    assert_dense_from(&replayed, head - 3);

    // An id this conversation never had: reset to the newest, then live.
    let mut f = SseReader::resume(
        &client,
        &base,
        &conversation,
        &token,
        Some(&(head + 100).to_string()),
    )
    .await;
    let reset = f
        .next(Instant::now() + Duration::from_secs(10))
        .await
        .expect("a reset event");
    assert_eq!(reset.event, "reset", "{reset:?}");
    assert_eq!(reset.data["resumed_after"], head);
    let m2 = message_id_of(
        expect_status(
            send(
                &client,
                &base,
                &conversation,
                &token,
                json!({"text": "after the reset"}),
                None,
            )
            .await,
            202,
        )
        .await,
    )
    .await;
    let live_events = read_through(&mut f, &m2, Duration::from_secs(30)).await;
    assert_dense_from(&live_events, head + 1);
    assert!(
        metric(
            &client,
            gateway.admin_addr(),
            "soma_platform_sse_resets_total",
            ""
        )
        .await
            >= 2.0
    );
    worker.shutdown().await;
    gateway.shutdown().await;
}

/// Fan-out is per conversation: with `chat.sse_buffer` = 1, a burst of
/// replies on one conversation cannot make another's stream miss or lag;
/// a stream that overflows its own channel is caught up from the store
/// (every event once, in order), not cut off.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_busy_conversation_does_not_disturb_another_and_a_lagged_stream_sees_no_gap() {
    let env = Env::new();
    let live = env.settings(&[("chat.sse_buffer", json!(1))]);
    let gateway = Gateway::start(live.clone(), listener().await, listener().await)
        .await
        .expect("gateway starts");
    let worker = conversation::start(live.clone(), listener().await)
        .await
        .expect("conversation worker starts");
    let base = format!("http://{}", gateway.addr());
    let client = reqwest::Client::new();
    let token = env.token("carol", "acme", &["user"], ALL_SCOPES);
    let busy = format!("busy-{}", uuid::Uuid::new_v4().simple());
    let quiet = format!("quiet-{}", uuid::Uuid::new_v4().simple());
    let mut b = SseReader::open(&client, &base, &busy, &token).await;
    let mut q = SseReader::open(&client, &base, &quiet, &token).await;
    let warm = warm_up(&client, &base, &busy, &token, &mut [&mut b]).await;
    let busy_from = *ids(&warm).last().unwrap() + 1;

    let mut sent = Vec::new();
    for i in 0..8 {
        let r = send(
            &client,
            &base,
            &busy,
            &token,
            json!({"text": format!("busy message number {i} with words")}),
            None,
        )
        .await;
        sent.push(message_id_of(expect_status(r, 202).await).await);
    }
    let qm = message_id_of(
        expect_status(
            send(
                &client,
                &base,
                &quiet,
                &token,
                json!({"text": "quiet one"}),
                None,
            )
            .await,
            202,
        )
        .await,
    )
    .await;

    let quiet_events = read_through(&mut q, &qm, Duration::from_secs(60)).await;
    assert!(
        quiet_events
            .iter()
            .all(|e| e.event.starts_with("assistant.")),
        "{quiet_events:?}"
    );
    assert_dense_from(&quiet_events, 1);

    let busy_events = read_through(&mut b, sent.last().unwrap(), Duration::from_secs(60)).await;
    assert!(
        busy_events
            .iter()
            .all(|e| e.event.starts_with("assistant.")),
        "no reset, no lagged: {busy_events:?}"
    );
    assert_dense_from(&busy_events, busy_from);
    let pos = positions(&busy_events);
    let mut expected_msgs: Vec<&str> = pos.iter().map(|(m, _)| m.as_str()).collect();
    expected_msgs.dedup();
    assert_eq!(
        expected_msgs,
        sent.iter().map(String::as_str).collect::<Vec<_>>(),
        "every reply, in send order"
    );
    for m in &sent {
        let seqs: Vec<u64> = pos
            .iter()
            .filter(|(x, _)| x == m)
            .map(|(_, s)| *s)
            .collect();
        assert_eq!(
            seqs,
            (0..seqs.len() as u64).collect::<Vec<_>>(),
            "reply {m} whole and in order"
        );
    }
    let resumed = metric(
        &client,
        gateway.admin_addr(),
        "soma_platform_sse_resumes_total",
        "cause=\"lagged\"",
    )
    .await
        + metric(
            &client,
            gateway.admin_addr(),
            "soma_platform_sse_resumes_total",
            "cause=\"gap\"",
        )
        .await;
    println!("streams caught up from the store during the burst: {resumed}");
    worker.shutdown().await;
    gateway.shutdown().await;
}

/// Remote config updates are authenticated and converge: an unsigned update
/// with `version = u64::MAX` (anyone on the topic could publish it) and a
/// badly signed one are rejected and counted, a signed one applies, and a
/// replica that starts afterwards catches up on the current version without
/// a new publish.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn config_updates_must_be_signed_and_a_late_replica_catches_up() {
    let env = Env::new();
    let gateway = Gateway::start(env.settings(&[]), listener().await, listener().await)
        .await
        .expect("gateway starts");
    let client = reqwest::Client::new();
    let topic = format!("{}.config", env.prefix);
    let forged = soma_config::ConfigUpdate::new(u64::MAX, json!({"chat": {"rate_limit": 5}}));
    publish_raw_config_update(&gateway, &topic, &forged).await;
    let wrong_key = soma_config::Secret::new("k".repeat(40));
    publish_raw_config_update(
        &gateway,
        &topic,
        &soma_config::ConfigUpdate::new(u64::MAX - 1, json!({"chat": {"rate_limit": 6}}))
            .sign(&wrong_key),
    )
    .await;
    publish_config_update(&gateway, &topic, 7, json!({"chat": {"rate_limit": 77}})).await;
    soma_testkit::wait_for("the signed update applied", Duration::from_secs(60), || {
        gateway.runtime().live.load().chat.rate_limit == 77
    })
    .await;
    let admin = gateway.admin_addr();
    let count = |outcome: &'static str| {
        let client = client.clone();
        async move {
            metric(
                &client,
                admin,
                "soma_platform_config_updates_total",
                &format!("outcome=\"{outcome}\""),
            )
            .await
        }
    };
    assert_eq!(count("rejected_unsigned").await, 1.0);
    assert_eq!(count("rejected_bad_signature").await, 1.0);
    assert_eq!(count("applied").await, 1.0);
    assert_eq!(gateway.runtime().live.load().update_version(), Some(7));

    // A replica started now (its own settings, as another process would
    // load them) reaches the current version from the topic's history.
    let late = tools::start(env.settings(&[]), listener().await)
        .await
        .expect("late replica starts");
    let deadline = Instant::now() + Duration::from_secs(60);
    while late.runtime().live.load().chat.rate_limit != 77 {
        assert!(
            Instant::now() < deadline,
            "a replica started after the update never obtained it"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(late.runtime().live.load().update_version(), Some(7));

    // The forged u64::MAX froze nothing: the next signed version applies on both.
    publish_config_update(&gateway, &topic, 8, json!({"chat": {"rate_limit": 78}})).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while [gateway.runtime(), late.runtime()]
        .iter()
        .any(|r| r.live.load().chat.rate_limit != 78)
    {
        assert!(
            Instant::now() < deadline,
            "version 8 not applied everywhere"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    late.shutdown().await;
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_request_id_reaches_the_response_the_span_the_audit_record_and_the_published_message() {
    let logs = Captured::install();
    let env = Env::new();
    let gateway = Gateway::start(env.settings(&[]), listener().await, listener().await)
        .await
        .expect("gateway starts");
    let base = format!("http://{}", gateway.addr());
    let client = reqwest::Client::new();
    let token = env.token("bob", "acme", &["user"], ALL_SCOPES);
    let requests_topic = format!("{}.requests", env.prefix);

    let valid = format!("req-{}", uuid::Uuid::new_v4().simple());
    let too_long = "r".repeat(129);
    // (what the client sends, whether the gateway keeps it)
    let cases = [
        (Some(valid.as_str()), true),
        (Some("two words"), false),
        (Some(too_long.as_str()), false),
        (None, false),
    ];
    for (sent, kept) in cases {
        let conversation = format!("c-{}", uuid::Uuid::new_v4().simple());
        let mut req = client
            .post(format!("{base}/v1/conversations/{conversation}/messages"))
            .bearer_auth(&token)
            .json(&json!({"text": "hi"}));
        if let Some(id) = sent {
            req = req.header("x-request-id", id);
        }
        let r = expect_status(req.send().await.unwrap(), 202).await;
        let id = r.headers()["x-request-id"].to_str().unwrap().to_owned();
        if kept {
            assert_eq!(Some(id.as_str()), sent);
        } else {
            assert_ne!(Some(id.as_str()), sent);
            assert!(uuid::Uuid::parse_str(&id).is_ok(), "a fresh id: {id}");
        }
        let message_id = message_id_of(r).await;

        // The published message: the ChatRequest and the envelope's
        // correlation id.
        let (payload, headers) =
            record_matching(&requests_topic, Duration::from_secs(15), |_, h| {
                h.get("soma-id") == Some(&message_id)
            })
            .await
            .expect("the message is on the requests topic");
        assert_eq!(payload["request_id"], id.as_str(), "{payload}");
        assert_eq!(headers["soma-correlation-id"], id, "{headers:?}");

        // Every authorization decision of the request (the layer's and the
        // handler's owner check) is audited with that id, inside the
        // request's span, which carries it too.
        let audits: Vec<Value> = logs
            .text()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|l| {
                l["target"] == "soma_policy::audit"
                    && l["fields"]["resource_id"] == conversation.as_str()
            })
            .collect();
        assert_eq!(audits.len(), 2, "layer and owner check: {audits:?}");
        for a in &audits {
            assert_eq!(a["fields"]["request_id"], id.as_str(), "{a}");
            let span = a["spans"]
                .as_array()
                .and_then(|s| s.iter().find(|s| s["name"] == "http.server.request"))
                .unwrap_or_else(|| panic!("audited inside the request span: {a}"));
            assert_eq!(span["request_id"], id.as_str(), "{a}");
        }
    }
    gateway.shutdown().await;
}
