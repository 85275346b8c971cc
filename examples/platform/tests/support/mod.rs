//! Helpers shared by the platform's end-to-end tests: isolated settings,
//! tokens, a server-sent-events reader, Kafka and `/metrics` readers.
#![allow(dead_code, unreachable_pub)]

pub mod model;
pub mod platform;
pub mod processes;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures::StreamExt;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use serde_json::{Value, json};
use soma_config::Live;
use soma_example_platform::gateway::EVENTS_ROUTE;
use soma_example_platform::{Gateway, PlatformSettings};
use sqlx::PgPool;
use tokio::net::TcpListener;

pub const ISSUER: &str = "https://id.test.soma";
pub const AUDIENCE: &str = "soma-platform";

pub struct Env {
    pub secret: String,
    pub prefix: String,
}

impl Env {
    pub fn new() -> Self {
        soma_testkit::require_postgres();
        soma_testkit::require_redis();
        soma_testkit::require_kafka();
        Self {
            secret: uuid::Uuid::new_v4().simple().to_string(),
            prefix: soma_testkit::unique_name("plat"),
        }
    }

    /// Settings isolated to this test: own topics, schemas, key prefix and
    /// groups; SomaBrain pointed at a closed loopback port.
    pub fn settings(&self, overrides: &[(&str, Value)]) -> Live<PlatformSettings> {
        let p = &self.prefix;
        let policy_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../soma-policy/policy");
        let mut loader = soma_example_platform::settings::loader(&[])
            .without_env()
            .set("telemetry.service_name", "platform-test")
            .set("postgres.url", soma_testkit::postgres_url())
            .set("policy.api_keys.schema", format!("{p}_keys"))
            .set("redis.url", soma_testkit::redis_url())
            .set("redis.key_prefix", format!("{p}:"))
            .set("bus.bootstrap_servers", soma_testkit::kafka_bootstrap())
            .set("bus.consumer.group", p.as_str())
            .set("bus.consumer.max_attempts", 2)
            .set("bus.consumer.retry_backoff_initial_ms", 50)
            .set("outbox.schema", format!("{p}_outbox"))
            .set("chat.session_events_schema", format!("{p}_chat"))
            .set("operator.dlq_schema", format!("{p}_dlq"))
            .set("chat.requests_topic", format!("{p}.requests"))
            .set("chat.events_topic", format!("{p}.events"))
            .set("chat.memory_topic", format!("{p}.memory"))
            .set("chat.tools_topic", format!("{p}.tools"))
            .set("chat.tool_results_topic", format!("{p}.tool_results"))
            .set("chat.config_topic", format!("{p}.config"))
            .set("chat.config_update_key", CONFIG_UPDATE_KEY)
            .set("workspace.schema", format!("{p}_ws"))
            .set("workspace.scheduler.topic", format!("{p}.sched"))
            .set("policy.audiences", [AUDIENCE])
            .set("policy.policy_dir", policy_dir)
            .set(
                "policy.issuers",
                json!([{
                    "issuer": ISSUER,
                    "keys": [{"kid": "k1", "alg": "HS256", "secret": self.secret}],
                }]),
            )
            .set(
                "somabrain.base_url",
                format!("http://127.0.0.1:{}", soma_testkit::free_port()),
            )
            .set("somabrain.retry.max_retries", 0);
        for (k, v) in overrides {
            loader = loader.set(k, v.clone());
        }
        loader.into_live().expect("test settings load")
    }

    pub fn token(&self, sub: &str, tenant: &str, roles: &[&str], scope: &str) -> String {
        self.token_with_secret(sub, tenant, roles, scope, &self.secret)
    }

    pub fn token_with_secret(
        &self,
        sub: &str,
        tenant: &str,
        roles: &[&str],
        scope: &str,
        secret: &str,
    ) -> String {
        let now = chrono_now();
        let claims = json!({
            "iss": ISSUER, "aud": AUDIENCE, "sub": sub, "tenant": tenant,
            "roles": roles, "scope": scope, "iat": now, "exp": now + 600,
        });
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("k1".into());
        encode(
            &header,
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .expect("sign")
    }
}

pub fn chrono_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

pub async fn listener() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.expect("bind")
}

/// Asserts the status, printing the body when it differs.
pub async fn expect_status(r: reqwest::Response, code: u16) -> reqwest::Response {
    if r.status().as_u16() == code {
        return r;
    }
    let status = r.status();
    let body = r.text().await.unwrap_or_default();
    panic!("expected {code}, got {status}: {body}");
}

/// Asserts `r` is an `application/problem+json` answer (the testkit's
/// assertion); returns the body.
pub use soma_testkit::expect_problem;

/// The key the test settings' replicas require remote config updates to
/// be signed with.
pub const CONFIG_UPDATE_KEY: &str = "platform-test-config-update-key-0123456789";

/// Publishes the config update `{version, document}`, signed with
/// [`CONFIG_UPDATE_KEY`], to `topic` through `gateway`'s durable publisher.
pub async fn publish_config_update(gateway: &Gateway, topic: &str, version: u64, document: Value) {
    let key = soma_config::Secret::new(CONFIG_UPDATE_KEY);
    let update = soma_config::ConfigUpdate::new(version, document).sign(&key);
    publish_raw_config_update(gateway, topic, &update).await;
}

/// Publishes `update` as it is (signed or not) to `topic`.
pub async fn publish_raw_config_update(
    gateway: &Gateway,
    topic: &str,
    update: &soma_config::ConfigUpdate,
) {
    let envelope = soma_bus::Envelope::builder("config.update", "platform", "config")
        .json(update)
        .unwrap()
        .build()
        .unwrap();
    gateway
        .runtime()
        .publisher
        .publish(topic, &envelope)
        .await
        .expect("publish the update");
}

/// `GET /v1/health` on an admin address.
pub async fn get_health(client: &reqwest::Client, admin: std::net::SocketAddr) -> Value {
    client
        .get(format!("http://{admin}/v1/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// The `message_id` of a `202 Accepted` answer.
pub async fn message_id_of(r: reqwest::Response) -> String {
    r.json::<Value>().await.unwrap()["message_id"]
        .as_str()
        .unwrap()
        .to_owned()
}

pub const ALL_SCOPES: &str = "conversation:write conversation:read memory:write";

/// A minimal server-sent-events reader.
pub struct SseReader {
    stream: futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buf: String,
}

#[derive(Debug)]
pub struct SseEvent {
    pub event: String,
    pub id: String,
    pub data: Value,
}

impl SseReader {
    pub async fn open(
        client: &reqwest::Client,
        base: &str,
        conversation: &str,
        token: &str,
    ) -> Self {
        Self::resume(client, base, conversation, token, None).await
    }

    /// Opens the stream with `Last-Event-ID: last_event_id` when given.
    pub async fn resume(
        client: &reqwest::Client,
        base: &str,
        conversation: &str,
        token: &str,
        last_event_id: Option<&str>,
    ) -> Self {
        let resp = events_request(client, base, conversation, token, last_event_id)
            .send()
            .await
            .expect("open SSE");
        Self::from_response(resp)
    }

    /// Reads the event stream `resp` answered with (asserted `200`
    /// `text/event-stream`).
    pub fn from_response(resp: reqwest::Response) -> Self {
        assert_eq!(resp.status(), 200, "SSE status");
        assert_eq!(
            resp.headers()["content-type"].to_str().unwrap(),
            "text/event-stream"
        );
        Self {
            stream: resp.bytes_stream().boxed(),
            buf: String::new(),
        }
    }

    /// The next event within `deadline`, `None` on timeout or end of stream.
    pub async fn next(&mut self, deadline: Instant) -> Option<SseEvent> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let mut ev = SseEvent {
                    event: "message".into(),
                    id: String::new(),
                    data: Value::Null,
                };
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        ev.event = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("id:") {
                        ev.id = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if data.is_empty() {
                    continue; // keep-alive comment
                }
                ev.data = serde_json::from_str(&data).expect("SSE data is JSON");
                return Some(ev);
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            match tokio::time::timeout(left, self.stream.next()).await {
                Ok(Some(Ok(chunk))) => self.buf.push_str(&String::from_utf8_lossy(&chunk)),
                Ok(Some(Err(e))) => panic!("SSE stream failed: {e}"),
                Ok(None) | Err(_) => return None,
            }
        }
    }

    /// Every event of the reply to `message_id`, up to `assistant.completed`.
    pub async fn reply_to(&mut self, message_id: &str, within: Duration) -> Option<Vec<SseEvent>> {
        let deadline = Instant::now() + within;
        let mut events = Vec::new();
        while let Some(ev) = self.next(deadline).await {
            if ev.data["message_id"] != message_id {
                continue;
            }
            let done = ev.event == "assistant.completed";
            events.push(ev);
            if done {
                return Some(events);
            }
        }
        None
    }
}

pub fn events_request(
    client: &reqwest::Client,
    base: &str,
    conversation: &str,
    token: &str,
    last_event_id: Option<&str>,
) -> reqwest::RequestBuilder {
    let url = format!("{base}{}", EVENTS_ROUTE.replace("{id}", conversation));
    let mut req = client.get(url).bearer_auth(token);
    if let Some(id) = last_event_id {
        req = req.header("last-event-id", id);
    }
    req
}

pub async fn send(
    client: &reqwest::Client,
    base: &str,
    conversation: &str,
    token: &str,
    body: Value,
    idempotency_key: Option<&str>,
) -> reqwest::Response {
    let mut req = client
        .post(format!("{base}/v1/conversations/{conversation}/messages"))
        .bearer_auth(token)
        .json(&body);
    if let Some(k) = idempotency_key {
        req = req.header("idempotency-key", k);
    }
    req.send().await.expect("POST message")
}

/// Reads `topic` from the start until a record whose payload names
/// `message_id` and returns its payload and headers; `None` when none arrives in time.
pub async fn record_within(
    topic: &str,
    message_id: &str,
    within: Duration,
) -> Option<(Value, std::collections::BTreeMap<String, String>)> {
    record_matching(topic, within, |payload, _| {
        payload["message_id"] == message_id
    })
    .await
}

/// Reads `topic` from the start until a record `matches` (its JSON payload
/// and headers) and returns its payload and headers; `None` when none
/// arrives in time.
pub async fn record_matching(
    topic: &str,
    within: Duration,
    matches: impl Fn(&Value, &std::collections::BTreeMap<String, String>) -> bool,
) -> Option<(Value, std::collections::BTreeMap<String, String>)> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", soma_testkit::kafka_bootstrap())
        .set("group.id", soma_testkit::unique_name("dlq_reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.checked_duration_since(Instant::now())?;
        let msg = match tokio::time::timeout(left, consumer.recv()).await {
            Ok(Ok(m)) => m,
            Ok(Err(e)) => panic!("reading {topic}: {e}"),
            Err(_) => return None,
        };
        let payload: Value =
            serde_json::from_slice(msg.payload().unwrap_or_default()).unwrap_or(Value::Null);
        let mut headers = std::collections::BTreeMap::new();
        if let Some(h) = msg.headers() {
            for header in h.iter() {
                headers.insert(
                    header.key.to_owned(),
                    String::from_utf8_lossy(header.value.unwrap_or_default()).into_owned(),
                );
            }
        }
        if matches(&payload, &headers) {
            return Some((payload, headers));
        }
    }
}

/// The text of an admin `/metrics`.
pub async fn metrics_text(client: &reqwest::Client, admin: std::net::SocketAddr) -> String {
    client
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// A counter's value on an admin `/metrics`, summed over the series of
/// `name` whose labels include `label` (e.g. `cause="lagged"`; "" for all).
pub async fn metric(
    client: &reqwest::Client,
    admin: std::net::SocketAddr,
    name: &str,
    label: &str,
) -> f64 {
    let text = metrics_text(client, admin).await;
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(['{', ' ']) && rest.contains(label))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Everything the processes log, for the secret checks.
#[derive(Clone, Default)]
pub struct Captured(soma_testkit::LogCapture);

impl Captured {
    /// Captures this test process's logs at `debug` (each test runs in its
    /// own process under nextest).
    pub fn install() -> Self {
        let captured = Captured::default();
        let writer = captured.0.clone();
        tracing_subscriber::fmt()
            .json()
            .with_max_level(tracing::Level::DEBUG)
            .with_writer(move || writer.clone())
            .try_init()
            .expect("one subscriber per test process");
        captured
    }

    pub fn text(&self) -> String {
        self.0.text()
    }

    /// Asserts the logs are not empty and contain none of `secrets`.
    pub fn assert_free_of(&self, secrets: &[&str]) {
        let logs = self.text();
        assert!(
            logs.lines().count() > 20,
            "logs were captured: {} lines",
            logs.lines().count()
        );
        for s in secrets {
            assert!(!s.is_empty());
            assert!(
                !logs.contains(s),
                "a secret ({}…) is in the logs",
                &s[..8.min(s.len())]
            );
        }
    }
}

/// The memory service (the local SomaBrain) on its own schema, not yet
/// serving.
pub async fn build_memory_service(
    pool: &PgPool,
    schema: &str,
    token: &str,
) -> soma_memory_service::MemoryService {
    soma_memory_service::MemoryService::builder(
        pool.clone(),
        soma_memory_service::MemoryConfig {
            token: token.into(),
            ..Default::default()
        },
    )
    .schema(schema)
    .build()
    .await
    .expect("memory service starts (PostgreSQL: `cargo xtask stack up`)")
}

/// The memory service on its own schema, on a loopback port.
pub async fn memory_service(pool: &PgPool, schema: &str, token: &str) -> SocketAddr {
    let service = build_memory_service(pool, schema, token).await;
    let l = listener().await;
    let addr = l.local_addr().unwrap();
    let router = service.router();
    tokio::spawn(async move { axum::serve(l, router).await });
    addr
}

/// Sends `text` and returns the events answering it, up to its final
/// (`assistant.completed` or `error`) event.
pub async fn turn(
    client: &reqwest::Client,
    base: &str,
    sse: &mut SseReader,
    conversation: &str,
    token: &str,
    text: &str,
) -> Vec<SseEvent> {
    let r = send(
        client,
        base,
        conversation,
        token,
        json!({ "text": text }),
        None,
    )
    .await;
    let id = message_id_of(expect_status(r, 202).await).await;
    answer_to(sse, &id).await
}

pub async fn answer_to(sse: &mut SseReader, id: &str) -> Vec<SseEvent> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut out = Vec::new();
    // Events for other messages: tells a quiet stream from a lost answer.
    let mut others = 0usize;
    while let Some(ev) = sse.next(deadline).await {
        if ev.data["message_id"] != id {
            others += 1;
            continue;
        }
        let done = ev.event == "assistant.completed" || ev.event == "error";
        out.push(ev);
        if done {
            return out;
        }
    }
    panic!("no answer to {id} within 60 s; got {out:?} (and {others} events for other messages)");
}

/// Sends warm-up messages until one is answered over `sse` (the gateway's
/// broadcast consumer starts at the end of the topic once assigned).
pub async fn warm_up(
    client: &reqwest::Client,
    base: &str,
    sse: &mut SseReader,
    conversation: &str,
    token: &str,
) {
    let started = Instant::now();
    loop {
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "no reply reached the SSE stream within 90 s"
        );
        let r = send(
            client,
            base,
            conversation,
            token,
            json!({"text": "warm up"}),
            None,
        )
        .await;
        let id = message_id_of(expect_status(r, 202).await).await;
        let deadline = Instant::now() + Duration::from_secs(15);
        while let Some(ev) = sse.next(deadline).await {
            if ev.data["message_id"] == id.as_str() && ev.event == "assistant.completed" {
                return;
            }
        }
    }
}

pub fn completed(events: &[SseEvent]) -> &SseEvent {
    let last = events.last().expect("an answer");
    assert_eq!(last.event, "assistant.completed", "{events:?}");
    last
}

pub fn used(ev: &SseEvent) -> Vec<String> {
    ev.data["memories"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until the memory service stores every key of `keys`.
pub async fn stored(pool: &PgPool, schema: &str, keys: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (n,): (i64,) = sqlx::query_as(&format!(
            "SELECT count(DISTINCT key) FROM {schema}.memories WHERE key = ANY($1)"
        ))
        .bind(keys.iter().map(|k| k.to_string()).collect::<Vec<_>>())
        .fetch_one(pool)
        .await
        .unwrap();
        if n as usize == keys.len() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "only {n} of {} memories stored within 60 s",
            keys.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Asserts `r` is a 403 `forbidden` problem whose detail names `reason`.
pub async fn assert_forbidden(r: reqwest::Response, reason: &str) {
    let body = expect_problem(r, 403, "forbidden").await;
    let detail = body["detail"].as_str().unwrap();
    assert!(detail.contains(reason), "{detail}");
}
