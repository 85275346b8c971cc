//! Issue #21's operator surface on the running platform: the four binaries
//! as processes (as `cargo xtask platform up` runs them), SomaBrain played
//! by soma-somabrain's contract server (a controllable server, for the
//! fault injection on the far side of the gateway's SomaBrain client),
//! real PostgreSQL, Redis and Kafka-protocol broker. Checked through HTTP
//! only:
//!
//! - the probes answer on the API port without credentials, with no secret;
//! - every operator route: `401` without credentials, `403` for a principal
//!   without its action, the happy path, problem bodies for bad input;
//! - `/v1/runtime-config` never shows a secret or a URL password, with a
//!   secret in every place the settings allow one;
//! - `/v1/features` shows the flags in force with their provenance;
//! - a SomaBrain fault is `502`/`503` naming SomaBrain, never a `4xx`;
//! - a dead letter replayed is consumed once (a second replay is refused);
//!   a filtered replay skips discarded records; a discard survives a
//!   gateway restart.

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use soma_bus::Envelope;
use soma_example_platform::protocol::{self, ChatRequest};
use soma_policy::{AuthKind, Principal};
use soma_somabrain::testkit::ContractServer;
use support::processes::{Processes, Wiring};
use support::*;

const PG_URL_SECRET: &str = "pg-url-password-7c1d";
const PG_QUERY_SECRET: &str = "pg-query-password-2b9e";
const UPDATE_KEY_SECRET: &str = "config-update-key-secret-0123456789abcdef";
const LLM_SECRET: &str = "llm-api-key-secret-91f3";
const OTLP_SECRET: &str = "otlp-header-secret-44aa";
const SASL_SECRET: &str = "sasl-password-secret-0e6d";

/// Scopes of the operator and admin tokens.
const OPS_SCOPES: &str =
    "ops:read ops:admin somabrain:operate conversation:write conversation:read";

/// A settings layer with a secret in every place the platform's settings
/// take one: a password in the PostgreSQL URL and in its query, the
/// config-update key, the model's API key, an OTLP header, the Kafka SASL
/// password (the JWT signing secret and the SomaBrain token are in the
/// generated file).
fn secrets_layer() -> String {
    let url = soma_testkit::postgres_url();
    let (scheme, rest) = url.split_once("://").unwrap();
    let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    let sep = if host.contains('?') { '&' } else { '?' };
    format!(
        r#"
[postgres]
url = "{scheme}://postgres:{PG_URL_SECRET}@{host}{sep}password={PG_QUERY_SECRET}"

[chat]
config_update_key = "{UPDATE_KEY_SECRET}"

[llm]
api_key = "{LLM_SECRET}"

[telemetry]
otlp_headers = {{ authorization = "Bearer {OTLP_SECRET}" }}

[bus]
sasl_username = "platform"
sasl_password = "{SASL_SECRET}"

[somabrain.breaker]
failure_threshold = 2
"#
    )
}

struct Ctx {
    base: String,
    client: reqwest::Client,
    admin: String,
    operator: String,
    user: String,
}

impl Ctx {
    async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> reqwest::Response {
        let mut req = self
            .client
            .request(method.parse().unwrap(), format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        req.send().await.unwrap()
    }

    async fn json(&self, method: &str, path: &str, token: &str, body: Option<Value>) -> Value {
        let r = self.call(method, path, Some(token), body).await;
        expect_status(r, 200).await.json().await.unwrap()
    }
}

/// Asserts an `application/problem+json` answer with `status`, any code;
/// returns the body.
async fn expect_any_problem(r: reqwest::Response, status: u16) -> Value {
    let r = expect_status(r, status).await;
    assert_eq!(
        r.headers()["content-type"].to_str().unwrap(),
        "application/problem+json"
    );
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["status"], status, "{body}");
    assert!(
        body["code"].as_str().is_some_and(|c| !c.is_empty()),
        "{body}"
    );
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_operator_surface_on_the_running_platform() {
    let env = Env::new();
    let brain = ContractServer::start().await;
    let brain_cfg = brain.config();
    let brain_url = brain.url();
    let wiring = Wiring::new(&brain_url, brain_cfg.token.expose_secret()).layer(&secrets_layer());
    let mut platform = Processes::start(&env, &wiring);
    platform.wait_ready(Duration::from_secs(120)).await;
    let ctx = Ctx {
        base: platform.base(),
        client: reqwest::Client::new(),
        admin: env.token("root", "acme", &["admin"], OPS_SCOPES),
        operator: env.token("ops", "acme", &["operator"], OPS_SCOPES),
        user: env.token(
            "alice",
            "acme",
            &["user"],
            &format!("{ALL_SCOPES} ops:read ops:admin somabrain:operate"),
        ),
    };
    let secrets = [
        PG_URL_SECRET,
        PG_QUERY_SECRET,
        UPDATE_KEY_SECRET,
        LLM_SECRET,
        OTLP_SECRET,
        SASL_SECRET,
        env.secret.as_str(),
        brain_cfg.token.expose_secret(),
    ];

    probes(&ctx, &secrets).await;
    every_route_needs_credentials_and_its_action(&ctx).await;
    runtime_config(&ctx, &secrets).await;
    features(&ctx).await;
    somabrain_routes(&ctx, &brain).await;
    dlq_administration(&env, &ctx, &mut platform).await;

    // SomaBrain gone altogether: 503 naming it, never a 4xx.
    drop(brain);
    let r = ctx
        .call("GET", "/v1/weights", Some(&ctx.operator), None)
        .await;
    let p = expect_any_problem(r, 503).await;
    assert!(p["detail"].as_str().unwrap().contains("SomaBrain"), "{p}");
}

async fn probes(ctx: &Ctx, secrets: &[&str]) {
    for path in ["/live", "/healthz", "/ready", "/v1/health"] {
        let r = ctx.call("GET", path, None, None).await;
        let text = expect_status(r, 200).await.text().await.unwrap();
        for s in secrets {
            assert!(!text.contains(s), "{path} shows a secret: {text}");
        }
    }
    // Metrics stay on the admin port.
    let r = ctx.call("GET", "/metrics", None, None).await;
    assert_ne!(r.status(), 200, "/metrics is not on the API port");
}

/// Each route, with a body where it takes one.
const ROUTES: &[(&str, &str, &str)] = &[
    ("GET", "/v1/runtime-config", "config.read"),
    ("GET", "/v1/features", "features.read"),
    ("POST", "/v1/context", "somabrain.operate"),
    ("GET", "/v1/weights", "somabrain.operate"),
    ("POST", "/v1/learning/reward", "somabrain.operate"),
    ("GET", "/v1/flags/enable_sleep", "somabrain.operate"),
    ("GET", "/v1/admin/dlq", "ops.admin"),
    ("POST", "/v1/admin/dlq/replay", "ops.admin"),
    ("GET", "/v1/admin/dlq/chat.requests.dlq/0/0", "ops.admin"),
    (
        "POST",
        "/v1/admin/dlq/chat.requests.dlq/0/0/replay",
        "ops.admin",
    ),
    (
        "POST",
        "/v1/admin/dlq/chat.requests.dlq/0/0/discard",
        "ops.admin",
    ),
];

async fn every_route_needs_credentials_and_its_action(ctx: &Ctx) {
    for (method, path, action) in ROUTES {
        let body = (*method == "POST").then(|| json!({"reason": "x", "topic": "chat.requests"}));
        let r = ctx.call(method, path, None, body.clone()).await;
        expect_any_problem(r, 401).await;
        // A user has every scope but not the role.
        let r = ctx.call(method, path, Some(&ctx.user), body.clone()).await;
        let p = expect_problem(r, 403, "forbidden").await;
        assert!(
            p["detail"].as_str().unwrap().contains(action),
            "{path}: {p}"
        );
        // An operator may not administer DLQs.
        if *action == "ops.admin" {
            let r = ctx.call(method, path, Some(&ctx.operator), body).await;
            expect_problem(r, 403, "forbidden").await;
        }
    }
}

async fn runtime_config(ctx: &Ctx, secrets: &[&str]) {
    let r = ctx
        .call("GET", "/v1/runtime-config", Some(&ctx.operator), None)
        .await;
    let text = expect_status(r, 200).await.text().await.unwrap();
    for s in secrets {
        assert!(!text.contains(s), "the runtime config shows {s}: {text}");
    }
    let v: Value = serde_json::from_str(&text).unwrap();
    assert!(v["version"].as_u64().is_some_and(|n| n >= 1), "{v}");
    let checksum = v["checksum"].as_str().unwrap();
    assert_eq!(checksum.len(), 64, "{checksum}");
    assert_eq!(v["profile"], "local");
    let url = v["config"]["postgres"]["url"].as_str().unwrap();
    assert!(url.starts_with("postgres://***@"), "{url}");
    assert!(url.contains("password=***"), "{url}");
    assert_eq!(v["config"]["chat"]["config_update_key"], "[REDACTED]");
    assert_eq!(v["config"]["llm"]["api_key"], "[REDACTED]");
    assert_eq!(v["config"]["somabrain"]["token"], "[REDACTED]");
    assert_eq!(v["config"]["bus"]["sasl_password"], "[REDACTED]");
    assert_eq!(
        v["config"]["telemetry"]["otlp_headers"]["authorization"],
        "[REDACTED]"
    );
    assert_eq!(
        v["config"]["policy"]["issuers"][0]["keys"][0]["secret"],
        "[REDACTED]"
    );
    // What the profile sized, with the values in force.
    assert_eq!(v["sizes"]["relay.batch_size"], 50, "{}", v["sizes"]);
    assert_eq!(v["sources"]["postgres"]["kind"], "file");
}

async fn features(ctx: &Ctx) {
    let v = ctx.json("GET", "/v1/features", &ctx.operator, None).await;
    assert_eq!(v["profile"], "standard", "{v}");
    let flags = v["flags"].as_array().unwrap();
    for name in ["runtime_config", "somabrain_operator", "dlq_admin"] {
        let f = flags
            .iter()
            .find(|f| f["name"] == name)
            .unwrap_or_else(|| panic!("{name}: {v}"));
        assert!(f["state"] == "on" || f["state"] == "degraded", "{f}");
        assert_eq!(f["source"]["kind"], "profile", "{f}");
        assert_eq!(f["source"]["profile"], "standard", "{f}");
        assert!(
            f["profiles"]
                .as_array()
                .unwrap()
                .contains(&json!("standard")),
            "{f}"
        );
        assert_eq!(f["override"], Value::Null, "{f}");
    }
}

async fn somabrain_routes(ctx: &Ctx, brain: &ContractServer) {
    let op = Some(ctx.operator.as_str());
    // Happy paths, with the caller's tenant.
    let v = ctx
        .json(
            "POST",
            "/v1/context",
            &ctx.operator,
            Some(json!({"session_id": "s1", "query": "Paris", "top_k": 3})),
        )
        .await;
    assert_eq!(v["tenant_id"], "acme", "{v}");
    let v = ctx
        .json(
            "POST",
            "/v1/learning/reward",
            &ctx.operator,
            Some(json!({"session_id": "s1", "query": "Paris", "prompt": "p",
                        "response_text": "r", "utility": 0.9, "reward": 1.0})),
        )
        .await;
    assert_eq!(v["accepted"], true, "{v}");
    let v = ctx.json("GET", "/v1/weights", &ctx.operator, None).await;
    assert_eq!(v["tenant_id"], "acme", "{v}");
    let v = ctx
        .json("GET", "/v1/flags/enable_sleep", &ctx.operator, None)
        .await;
    assert_eq!(v, json!({"flag": "enable_sleep", "enabled": true}));

    // The caller's bad input: problem bodies, SomaBrain not called.
    let seen = brain.seen_count();
    let r = ctx.call("GET", "/v1/flags/no_such_flag", op, None).await;
    expect_problem(r, 404, "unknown_flag").await;
    let r = ctx
        .call("POST", "/v1/context", op, Some(json!({"query": 1})))
        .await;
    expect_problem(r, 422, "invalid_request").await;
    let r = ctx
        .client
        .post(format!("{}/v1/context", ctx.base))
        .bearer_auth(&ctx.operator)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    expect_problem(r, 400, "invalid_body").await;
    let r = ctx
        .client
        .post(format!("{}/v1/context", ctx.base))
        .bearer_auth(&ctx.operator)
        .header("content-type", "text/plain")
        .body("{}")
        .send()
        .await
        .unwrap();
    expect_problem(r, 415, "unsupported_media_type").await;
    // Its own client: the gateway closes a connection whose body it did
    // not read, which a pooled connection would meet on its next request.
    let r = reqwest::Client::new()
        .post(format!("{}/v1/context", ctx.base))
        .bearer_auth(&ctx.operator)
        .header("content-type", "application/json")
        .body(format!("{{\"query\": \"{}\"}}", "x".repeat(64 * 1024)))
        .send()
        .await
        .unwrap();
    expect_problem(r, 413, "body_too_large").await;
    assert_eq!(
        brain.seen_count() - seen,
        1,
        "only the unknown flag's lookup reached SomaBrain"
    );

    // SomaBrain failing: 502 naming it, then its breaker opens: 503.
    brain.fail_route(Some("/context/adaptation/state"));
    let mut statuses = Vec::new();
    for _ in 0..6 {
        let r = ctx.call("GET", "/v1/weights", op, None).await;
        let status = r.status().as_u16();
        assert!(
            status == 502 || status == 503,
            "a SomaBrain fault answered {status}"
        );
        let p = expect_any_problem(r, status).await;
        assert!(p["detail"].as_str().unwrap().contains("SomaBrain"), "{p}");
        statuses.push(status);
    }
    assert_eq!(statuses[0], 502, "{statuses:?}");
    assert!(
        statuses.contains(&503),
        "the breaker never opened: {statuses:?}"
    );
    brain.fail_route(None);
}

/// A chat request of `subject` as a dead letter of `{p}.requests`, written
/// to its DLQ the way soma-bus's consumer writes one; its envelope id and
/// `partition/offset`.
async fn dead_letter(
    env: &Env,
    subject: &str,
    conversation: &str,
    text: &str,
    error: &str,
) -> (String, String) {
    let principal = Principal {
        subject: subject.into(),
        tenant: "acme".into(),
        roles: vec!["user".into()],
        scopes: ALL_SCOPES.split(' ').map(str::to_owned).collect(),
        auth_kind: AuthKind::Jwt {
            issuer: ISSUER.into(),
        },
    };
    let request = ChatRequest {
        conversation_id: conversation.into(),
        text: text.into(),
        principal,
        request_id: uuid::Uuid::new_v4().to_string(),
    };
    let envelope = Envelope::builder(protocol::MESSAGE_RECEIVED, "acme", conversation)
        .json(&request)
        .unwrap()
        .build()
        .unwrap();
    let origin = format!("{}.requests", env.prefix);
    let dlq = format!("{origin}.dlq");
    let mut headers = rdkafka::message::OwnedHeaders::new();
    let failed_at = chrono::Utc::now().to_rfc3339();
    let mut all: Vec<(String, String)> = envelope
        .to_headers()
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    all.extend([
        ("soma-dlq-origin-topic".to_owned(), origin.clone()),
        ("soma-dlq-origin-partition".to_owned(), "0".to_owned()),
        ("soma-dlq-origin-offset".to_owned(), "0".to_owned()),
        ("soma-dlq-attempts".to_owned(), "2".to_owned()),
        ("soma-dlq-error".to_owned(), error.to_owned()),
        ("soma-dlq-handler".to_owned(), "conversation".to_owned()),
        ("soma-dlq-failed-at".to_owned(), failed_at),
    ]);
    for (k, v) in &all {
        headers = headers.insert(rdkafka::message::Header {
            key: k,
            value: Some(v.as_bytes()),
        });
    }
    let producer: rdkafka::producer::FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", soma_testkit::kafka_bootstrap())
        .create()
        .unwrap();
    let delivery = producer
        .send(
            rdkafka::producer::FutureRecord::to(&dlq)
                .key(envelope.kafka_key().unwrap())
                .payload(&envelope.payload)
                .headers(headers),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)
        .expect("write the dead letter");
    (
        envelope.id.to_string(),
        format!("{}/{}", delivery.partition, delivery.offset),
    )
}

async fn dlq_administration(env: &Env, ctx: &Ctx, platform: &mut Processes) {
    let admin = Some(ctx.admin.as_str());
    let dlq = format!("{}.requests.dlq", env.prefix);
    let conversation = format!("dlq-{}", uuid::Uuid::new_v4().simple());
    let bob = env.token("bob", "acme", &["user"], ALL_SCOPES);
    let mut sse = SseReader::open(&ctx.client, &ctx.base, &conversation, &bob).await;
    warm_up(&ctx.client, &ctx.base, &mut sse, &conversation, &bob).await;

    let (replay_id, replay_off) =
        dead_letter(env, "bob", &conversation, "replay me", "model timed out").await;
    let (discard_id, discard_off) =
        dead_letter(env, "bob", &conversation, "discard me", "poison: bad utf-8").await;
    let (set_id, _) = dead_letter(
        env,
        "bob",
        &conversation,
        "replay me in a set",
        "model timed out",
    )
    .await;

    // The sender is told: one `message.dead_lettered` notification per
    // dead-lettered message of bob's, naming it (the gateway's DLQ watcher).
    let bob_reads = env.token("bob", "acme", &["user"], "notifications:read");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = ctx.json("GET", "/v1/notifications", &bob_reads, None).await;
        let told: Vec<&str> = v["notifications"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| n["kind"] == "message.dead_lettered")
            .filter_map(|n| n["body"]["message_id"].as_str())
            .collect();
        if [&replay_id, &discard_id, &set_id]
            .iter()
            .all(|id| told.iter().filter(|t| **t == id.as_str()).count() == 1)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "bob was not notified once of each dead letter within 30 s: {v}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Nobody else is.
    let carol = env.token("carol", "acme", &["user"], "notifications:read");
    let v = ctx.json("GET", "/v1/notifications", &carol, None).await;
    assert!(
        !v["notifications"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["kind"] == "message.dead_lettered"),
        "another user sees bob's dead letters: {v}"
    );

    // List with filters.
    let v = ctx
        .json(
            "GET",
            &format!("/v1/admin/dlq?topic={dlq}"),
            &ctx.admin,
            None,
        )
        .await;
    let ids: Vec<&str> = v["records"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["envelope_id"].as_str())
        .collect();
    for id in [&replay_id, &discard_id, &set_id] {
        assert!(ids.contains(&id.as_str()), "{id} not listed: {v}");
    }
    let v = ctx
        .json(
            "GET",
            &format!("/v1/admin/dlq?topic={}.requests&error=POISON", env.prefix),
            &ctx.admin,
            None,
        )
        .await;
    let listed: Vec<&Value> = v["records"].as_array().unwrap().iter().collect();
    assert_eq!(listed.len(), 1, "{v}");
    assert_eq!(listed[0]["envelope_id"], discard_id.as_str());
    assert_eq!(
        listed[0]["origin_topic"],
        format!("{}.requests", env.prefix)
    );
    let future = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    let r = ctx
        .call(
            "GET",
            &format!("/v1/admin/dlq?topic={dlq}&since={}", urlencode(&future)),
            admin,
            None,
        )
        .await;
    let v: Value = expect_status(r, 200).await.json().await.unwrap();
    assert_eq!(v["matched"], 0, "{v}");
    // Bad input.
    let r = ctx
        .call(
            "GET",
            &format!("/v1/admin/dlq?topic={dlq}&since=yesterday"),
            admin,
            None,
        )
        .await;
    expect_problem(r, 400, "invalid_time").await;
    let r = ctx
        .call("GET", "/v1/admin/dlq?topic=orders", admin, None)
        .await;
    expect_problem(r, 404, "unknown_dlq").await;
    let r = ctx
        .call("GET", &format!("/v1/admin/dlq/{dlq}/0/999999"), admin, None)
        .await;
    expect_problem(r, 404, "dlq_record_not_found").await;
    let r = ctx
        .call("GET", &format!("/v1/admin/dlq/{dlq}/zero/1"), admin, None)
        .await;
    expect_problem(r, 400, "invalid_position").await;

    // Inspect one.
    let v = ctx
        .json(
            "GET",
            &format!("/v1/admin/dlq/{dlq}/{replay_off}"),
            &ctx.admin,
            None,
        )
        .await;
    assert_eq!(v["envelope_id"], replay_id.as_str());
    assert_eq!(v["error"], "model timed out");
    assert_eq!(v["payload"]["text"], "replay me", "{v}");
    assert_eq!(v["disposition"], Value::Null);

    // Replay one: consumed once, answered once.
    let v = ctx
        .json(
            "POST",
            &format!("/v1/admin/dlq/{dlq}/{replay_off}/replay"),
            &ctx.admin,
            None,
        )
        .await;
    assert_eq!(v["outcome"], "replayed", "{v}");
    assert_eq!(v["topic"], format!("{}.requests", env.prefix));
    let answer = answer_to(&mut sse, &replay_id).await;
    assert_eq!(completed(&answer).data["message_id"], replay_id.as_str());
    let r = ctx
        .call(
            "POST",
            &format!("/v1/admin/dlq/{dlq}/{replay_off}/replay"),
            admin,
            None,
        )
        .await;
    expect_problem(r, 409, "already_replayed").await;

    // Discard: a reason is required, and the JSON body is checked.
    let discard_path = format!("/v1/admin/dlq/{dlq}/{discard_off}/discard");
    let r = ctx
        .call("POST", &discard_path, admin, Some(json!({"reason": "  "})))
        .await;
    expect_problem(r, 422, "reason_required").await;
    let r = ctx
        .call("POST", &discard_path, admin, Some(json!({"why": "x"})))
        .await;
    expect_problem(r, 422, "invalid_request").await;
    let r = ctx
        .client
        .post(format!("{}{discard_path}", ctx.base))
        .bearer_auth(&ctx.admin)
        .body("reason=x")
        .send()
        .await
        .unwrap();
    expect_problem(r, 415, "unsupported_media_type").await;
    let r = reqwest::Client::new()
        .post(format!("{}{discard_path}", ctx.base))
        .bearer_auth(&ctx.admin)
        .header("content-type", "application/json")
        .body(format!("{{\"reason\": \"{}\"}}", "x".repeat(64 * 1024)))
        .send()
        .await
        .unwrap();
    expect_problem(r, 413, "body_too_large").await;
    let v = ctx
        .json(
            "POST",
            &discard_path,
            &ctx.admin,
            Some(json!({"reason": "poison message, reported upstream"})),
        )
        .await;
    assert_eq!(v["outcome"], "discarded", "{v}");

    // A filtered replay honours the discard and what was replayed.
    let v = ctx
        .json(
            "POST",
            "/v1/admin/dlq/replay",
            &ctx.admin,
            Some(json!({"topic": dlq.clone(), "key": conversation.clone()})),
        )
        .await;
    assert_eq!(v["replayed"], 1, "{v}");
    let records = v["records"].as_array().unwrap();
    assert_eq!(records.len(), 1, "only the pending record: {v}");
    let answer = answer_to(&mut sse, &set_id).await;
    assert_eq!(completed(&answer).data["message_id"], set_id.as_str());
    let r = ctx
        .call(
            "POST",
            "/v1/admin/dlq/replay",
            admin,
            Some(json!({"key": "x"})),
        )
        .await;
    expect_problem(r, 422, "topic_required").await;

    // Nothing answered twice: no second completion of either replayed message.
    let deadline = Instant::now() + Duration::from_secs(5);
    while let Some(ev) = sse.next(deadline).await {
        let id = ev.data["message_id"].as_str().unwrap_or_default();
        assert!(
            !(ev.event == "assistant.completed" && (id == replay_id || id == set_id)),
            "a replayed message was answered twice: {ev:?}"
        );
        assert_ne!(id, discard_id, "the discarded message was consumed");
    }

    // The discard survives a gateway restart.
    platform.kill("soma-gateway");
    platform.restart("soma-gateway");
    platform.wait_ready(Duration::from_secs(90)).await;
    let v = ctx
        .json(
            "GET",
            &format!("/v1/admin/dlq?topic={dlq}"),
            &ctx.admin,
            None,
        )
        .await;
    let pending: Vec<&str> = v["records"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["envelope_id"].as_str())
        .collect();
    assert!(
        pending.is_empty(),
        "nothing is pending after the restart: {v}"
    );
    let v = ctx
        .json(
            "GET",
            &format!("/v1/admin/dlq?topic={dlq}&status=discarded"),
            &ctx.admin,
            None,
        )
        .await;
    let discarded = &v["records"].as_array().unwrap()[0];
    assert_eq!(discarded["envelope_id"], discard_id.as_str(), "{v}");
    assert_eq!(
        discarded["disposition"]["reason"],
        "poison message, reported upstream"
    );
    assert_eq!(discarded["disposition"]["actor"], "acme/root");
    let r = ctx
        .call(
            "POST",
            &format!("/v1/admin/dlq/{dlq}/{discard_off}/replay"),
            admin,
            None,
        )
        .await;
    expect_problem(r, 409, "discarded").await;
}

fn urlencode(s: &str) -> String {
    s.replace('+', "%2B").replace(':', "%3A")
}
