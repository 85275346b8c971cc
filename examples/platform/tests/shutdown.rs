//! SIGTERM with handler calls in flight, per worker service: the tool
//! executor and the memory replicator are stopped the way `SIGTERM` stops
//! them (readiness down, then the staged shutdown), a replacement starts in
//! their place, and every request published before the signal has its
//! effect exactly once, nothing is dead-lettered, and the old instance
//! finished every stage within `shutdown.deadline_ms` without being forced.
//!
//! The handlers are held mid-flight with the real stack, not a test hook:
//! the test takes a PostgreSQL table lock on the table the handler writes
//! (the tool executor's inbox, the memory service's `memories`), waits
//! until a handler is blocked on it, sends the signal, and releases the
//! lock while the shutdown drains. Needs the PostgreSQL, Redis and Kafka
//! that `cargo xtask stack up` starts (the gateway and conversation worker
//! have theirs in `chat.rs`).

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use serde_json::Value;
use soma_bus::Envelope;
use soma_config::Live;
use soma_example_platform::protocol::{self, MemoryWrite, ToolCall};
use soma_example_platform::runtime::Worker;
use soma_example_platform::{PlatformSettings, memory, tools};
use soma_observability::metrics::MetricsRegistry;
use soma_observability::shutdown::ShutdownReport;
use soma_policy::{AuthKind, Principal};
use sqlx::{Connection, PgConnection, PgPool};
use tokio::net::TcpListener;

/// The shutdown deadline the tests give each service.
const DEADLINE: Duration = Duration::from_secs(15);
/// How long the table lock is held after the signal (handlers stay blocked).
const HELD_AFTER_SIGNAL: Duration = Duration::from_millis(700);
/// Requests published before the signal.
const REQUESTS: usize = 24;
/// Conversations they are spread over (one partition key each, so several
/// handlers run at once).
const CONVERSATIONS: usize = 6;
const MEMORY_TOKEN: &str = "shutdown-test-token";

/// Settings isolated to one test: own topics, schemas, key prefix and
/// consumer groups; SomaBrain at `somabrain`.
fn settings(prefix: &str, somabrain: &str) -> Live<PlatformSettings> {
    settings_with(prefix, somabrain, &[])
}

/// [`settings`] plus `overrides`.
fn settings_with(
    prefix: &str,
    somabrain: &str,
    overrides: &[(&str, Value)],
) -> Live<PlatformSettings> {
    soma_testkit::require_postgres();
    soma_testkit::require_redis();
    soma_testkit::require_kafka();
    let p = prefix;
    let policy_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../soma-policy/policy");
    let loader = soma_example_platform::settings::loader(&[])
        .without_env()
        .set("telemetry.service_name", "platform-shutdown-test")
        .set("postgres.url", soma_testkit::postgres_url())
        .set("policy.api_keys.schema", format!("{p}_keys"))
        .set("redis.url", soma_testkit::redis_url())
        .set("redis.key_prefix", format!("{p}:"))
        .set("bus.bootstrap_servers", soma_testkit::kafka_bootstrap())
        .set("bus.consumer.group", p)
        .set("bus.consumer.max_attempts", 3)
        .set("bus.consumer.retry_backoff_initial_ms", 50)
        .set("bus.consumer.shutdown_timeout_ms", 10_000)
        .set("shutdown.deadline_ms", DEADLINE.as_millis() as u64)
        .set("outbox.schema", format!("{p}_outbox"))
        .set("chat.requests_topic", format!("{p}.requests"))
        .set("chat.events_topic", format!("{p}.events"))
        .set("chat.memory_topic", format!("{p}.memory"))
        .set("chat.tools_topic", format!("{p}.tools"))
        .set("chat.config_topic", format!("{p}.config"))
        .set("policy.audiences", ["soma-platform"])
        .set("policy.policy_dir", policy_dir)
        .set("somabrain.base_url", somabrain)
        .set("somabrain.token", MEMORY_TOKEN);
    let mut loader = loader;
    for (k, v) in overrides {
        loader = loader.set(k, v.clone());
    }
    loader.into_live().expect("test settings load")
}

async fn listener() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.expect("bind")
}

fn principal(roles: &[&str], scopes: &[&str]) -> Principal {
    Principal {
        subject: "sam".into(),
        tenant: "acme".into(),
        roles: roles.iter().map(|r| (*r).to_owned()).collect(),
        scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
        auth_kind: AuthKind::Jwt {
            issuer: "https://id.test.soma".into(),
        },
    }
}

/// An `EXCLUSIVE` lock on one table (reads go on, writes wait), held in an
/// open transaction until [`TableLock::release`].
struct TableLock {
    conn: PgConnection,
    table: String,
}

impl TableLock {
    async fn take(table: &str) -> Self {
        let mut conn = PgConnection::connect(&soma_testkit::postgres_url())
            .await
            .expect("PostgreSQL for the lock");
        sqlx::query("BEGIN").execute(&mut conn).await.unwrap();
        sqlx::query(&format!("LOCK TABLE {table} IN EXCLUSIVE MODE"))
            .execute(&mut conn)
            .await
            .expect("lock the table");
        Self {
            conn,
            table: table.to_owned(),
        }
    }

    /// Waits until at least `n` sessions wait for this lock: handlers are
    /// blocked mid-flight.
    async fn wait_for_waiters(&self, pool: &PgPool, n: i64, within: Duration) -> i64 {
        let deadline = Instant::now() + within;
        loop {
            let (waiting,): (i64,) = sqlx::query_as(
                "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = $1::regclass",
            )
            .bind(&self.table)
            .fetch_one(pool)
            .await
            .expect("pg_locks");
            if waiting >= n {
                return waiting;
            }
            assert!(
                Instant::now() < deadline,
                "no handler blocked on {} within {within:?} ({waiting} waiting)",
                self.table
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn release(mut self) {
        sqlx::query("ROLLBACK")
            .execute(&mut self.conn)
            .await
            .expect("release the lock");
    }
}

/// What SIGTERM does to a worker process (`cli.rs`: the signal begins the
/// shutdown, then the staged sequence runs): returns the report and how
/// long the sequence took. `while_draining` runs once the signal is given.
async fn sigterm(
    worker: Worker,
    while_draining: impl std::future::Future<Output = ()>,
) -> (ShutdownReport, Duration) {
    let lifecycle = worker.runtime().lifecycle.clone();
    let started = Instant::now();
    lifecycle.begin();
    let stopping = tokio::spawn(worker.shutdown());
    while_draining.await;
    tokio::time::timeout(DEADLINE + Duration::from_secs(5), stopping)
        .await
        .expect("the shutdown ends (the deadline is 15 s)")
        .expect("the shutdown task");
    (lifecycle.finish(), started.elapsed())
}

fn assert_clean_exit(service: &str, report: &ShutdownReport, took: Duration) {
    assert!(
        report.completed(),
        "{service}: stages abandoned: {report:?}"
    );
    assert!(!report.forced, "{service}: the exit was forced: {report:?}");
    assert!(
        took < DEADLINE,
        "{service}: shutdown took {took:?}, over its {DEADLINE:?} deadline"
    );
    for stage in ["consumer", "publisher", "relay", "postgres"] {
        assert!(
            report.finished.iter().any(|(s, _)| s == stage),
            "{service}: stage {stage} did not run: {report:?}"
        );
    }
}

/// `soma_bus_consumed_total` for `topic` by outcome, from a worker's
/// metrics (read from its registry: the old instance's admin endpoint is
/// gone once it stopped).
fn consumed(metrics: &MetricsRegistry, topic: &str) -> HashMap<String, u64> {
    let text = metrics.encode_prometheus();
    let label = format!("topic=\"{topic}\"");
    let mut by_outcome = HashMap::new();
    for line in text.lines() {
        if !line.starts_with("soma_bus_consumed_total{") || !line.contains(&label) {
            continue;
        }
        let Some(outcome) = line
            .split("outcome=\"")
            .nth(1)
            .and_then(|s| s.split('"').next())
        else {
            continue;
        };
        let n = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0) as u64;
        *by_outcome.entry(outcome.to_owned()).or_insert(0) += n;
    }
    by_outcome
}

/// Every `completed` reply event in `topic`, by message id: the distinct
/// envelope ids answering it. Reads until each of `expected` has one, or
/// `within` passed, then a little longer for late duplicates.
async fn completed_replies(
    topic: &str,
    expected: &[String],
    within: Duration,
) -> HashMap<String, HashSet<String>> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", soma_testkit::kafka_bootstrap())
        .set("group.id", soma_testkit::unique_name("reply_reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut completed: HashMap<String, HashSet<String>> = HashMap::new();
    let mut deadline = Instant::now() + within;
    let mut settled = false;
    loop {
        if !settled && expected.iter().all(|id| completed.contains_key(id)) {
            // Everything answered: keep reading briefly for second answers.
            settled = true;
            deadline = Instant::now() + Duration::from_secs(3);
        }
        let Some(left) = deadline.checked_duration_since(Instant::now()) else {
            return completed;
        };
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
}

/// The tool executor stopped by SIGTERM while tool calls are blocked in
/// their exactly-once commit, then replaced: every call published before
/// the signal is answered exactly once (one `completed` reply per call, one
/// inbox row), none is dead-lettered, and the old executor finished its
/// shutdown in time without being forced.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tool_executor_stopped_with_calls_in_flight_and_replaced_runs_each_call_once() {
    let prefix = soma_testkit::unique_name("sdtools");
    let closed = format!("http://127.0.0.1:{}", soma_testkit::free_port());
    let live = settings(&prefix, &closed);
    let first = tools::start(live.clone(), listener().await)
        .await
        .expect("tool executor starts");
    let first_metrics = first.runtime().metrics.clone();
    let pool = PgPool::connect(&soma_testkit::postgres_url())
        .await
        .unwrap();
    let tools_topic = format!("{prefix}.tools");
    let inbox = format!("{prefix}_outbox.inbox");

    // Block the executor's commits, then publish every call.
    let lock = TableLock::take(&inbox).await;
    let agent = principal(&["agent"], &["tool:execute"]);
    let mut calls = Vec::new();
    for i in 0..REQUESTS {
        let conversation = format!("c-tools-{}", i % CONVERSATIONS);
        let call = ToolCall {
            conversation_id: conversation.clone(),
            message_id: uuid::Uuid::new_v4(),
            principal: agent.clone(),
            tool: "wordcount".into(),
            input: format!("call number {i}"),
            request_id: format!("r-{i}"),
        };
        let env = Envelope::builder(protocol::TOOL_CALL, "acme", conversation.as_str())
            .json(&call)
            .unwrap()
            .build()
            .unwrap();
        first
            .runtime()
            .publisher
            .publish(&tools_topic, &env)
            .await
            .expect("publish a tool call");
        calls.push(call.message_id.to_string());
    }
    let waiting = lock
        .wait_for_waiters(&pool, 1, Duration::from_secs(60))
        .await;
    println!("{waiting} tool calls blocked in their commit when the signal arrives");

    let (report, took) = sigterm(first, async {
        tokio::time::sleep(HELD_AFTER_SIGNAL).await;
        lock.release().await;
    })
    .await;
    assert_clean_exit("tool executor", &report, took);
    let first_outcomes = consumed(&first_metrics, &tools_topic);

    let second = tools::start(live.clone(), listener().await)
        .await
        .expect("replacement tool executor starts");
    let replies =
        completed_replies(&format!("{prefix}.events"), &calls, Duration::from_secs(90)).await;
    for id in &calls {
        let n = replies.get(id).map_or(0, HashSet::len);
        assert_eq!(n, 1, "tool call {id} answered {n} times");
    }
    let (inbox_rows,): (i64,) =
        sqlx::query_as(&format!("SELECT count(*) FROM {inbox} WHERE consumer = $1"))
            .bind(tools::HANDLER)
            .fetch_one(&pool)
            .await
            .expect("inbox rows");
    assert_eq!(inbox_rows, REQUESTS as i64, "one inbox row per call");

    let second_outcomes = consumed(&second.runtime().metrics, &tools_topic);
    for (who, outcomes) in [("old", &first_outcomes), ("new", &second_outcomes)] {
        assert_eq!(
            outcomes.get("dead_lettered").copied().unwrap_or(0),
            0,
            "{who} executor dead-lettered: {outcomes:?}"
        );
    }
    let handled_first = first_outcomes.get("handled").copied().unwrap_or(0);
    assert!(
        handled_first as i64 >= waiting,
        "the calls in flight at the signal were finished by the old executor \
         ({handled_first} handled, {waiting} were blocked)"
    );
    let stats = second.runtime().outbox.stats().await.expect("outbox stats");
    assert_eq!(stats.dead_letters, 0, "outbox dead letters");
    second.shutdown().await;
}

/// The memory replicator stopped by SIGTERM while its writes are blocked
/// inside the memory service (the real one, in-process, on its own
/// schema), then replaced: every write published before the signal is
/// stored exactly once (one row per key, written once), none is
/// dead-lettered, and the old replicator finished its shutdown in time
/// without being forced.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_memory_replicator_stopped_with_writes_in_flight_and_replaced_stores_each_once() {
    let prefix = soma_testkit::unique_name("sdmem");
    let pool = PgPool::connect(&soma_testkit::postgres_url())
        .await
        .unwrap();
    let memory_schema = format!("{prefix}_memory");
    let service = soma_memory_service::MemoryService::builder(
        pool.clone(),
        soma_memory_service::MemoryConfig {
            token: MEMORY_TOKEN.into(),
            ..Default::default()
        },
    )
    .schema(memory_schema.as_str())
    .build()
    .await
    .expect("memory service starts");
    let brain = listener().await;
    let brain_addr = brain.local_addr().unwrap();
    let router = service.router();
    tokio::spawn(async move { axum::serve(brain, router).await });
    // A write blocked in the memory service waits for it rather than
    // timing out into a retry (the default attempt timeout is 2 s).
    let live = settings_with(
        &prefix,
        &format!("http://{brain_addr}"),
        &[
            ("somabrain.request_timeout_ms", Value::from(10_000)),
            ("somabrain.call_deadline_ms", Value::from(20_000)),
        ],
    );
    let first = memory::start(live.clone(), listener().await)
        .await
        .expect("memory replicator starts");
    let first_metrics = first.runtime().metrics.clone();
    let memory_topic = format!("{prefix}.memory");
    let table = format!("{memory_schema}.memories");

    let lock = TableLock::take(&table).await;
    let user = principal(&["user"], &["memory:write"]);
    let mut keys = Vec::new();
    for i in 0..REQUESTS {
        let conversation = format!("c-mem-{}", i % CONVERSATIONS);
        let write = MemoryWrite {
            conversation_id: conversation.clone(),
            message_id: uuid::Uuid::new_v4(),
            principal: user.clone(),
            user_text: format!("message {i}"),
            reply_text: format!("reply {i}"),
            used_memories: Vec::new(),
        };
        let env = Envelope::builder(protocol::MEMORY_WRITE, "acme", conversation.as_str())
            .json(&write)
            .unwrap()
            .build()
            .unwrap();
        first
            .runtime()
            .publisher
            .publish(&memory_topic, &env)
            .await
            .expect("publish a memory write");
        keys.push(write.message_id.to_string());
    }
    let waiting = lock
        .wait_for_waiters(&pool, 1, Duration::from_secs(60))
        .await;
    println!("{waiting} memory writes blocked in the memory service when the signal arrives");

    let (report, took) = sigterm(first, async {
        tokio::time::sleep(HELD_AFTER_SIGNAL).await;
        lock.release().await;
    })
    .await;
    assert_clean_exit("memory replicator", &report, took);
    let first_outcomes = consumed(&first_metrics, &memory_topic);

    let second = memory::start(live.clone(), listener().await)
        .await
        .expect("replacement memory replicator starts");
    let deadline = Instant::now() + Duration::from_secs(90);
    let rows: Vec<(String, i64)> = loop {
        let rows: Vec<(String, i64)> = sqlx::query_as(&format!(
            "SELECT key, count(*) FROM {table} WHERE tenant = 'acme' GROUP BY key"
        ))
        .fetch_all(&pool)
        .await
        .expect("memory rows");
        if rows.len() >= keys.len() || Instant::now() > deadline {
            break rows;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    // Late redeliveries would land now.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stored: HashMap<String, i64> = rows.into_iter().collect();
    for key in &keys {
        assert_eq!(stored.get(key), Some(&1), "memory {key} rows");
    }
    assert_eq!(stored.len(), keys.len(), "no memory that was not sent");
    // The unique key makes a replayed write overwrite its own row, so the
    // rows alone cannot show a second write. Every INSERT takes a value of
    // the id sequence (one that conflicts too): the sequence counts the
    // writes that reached the memory service's store.
    let (writes, called): (i64, bool) = sqlx::query_as(&format!(
        "SELECT last_value, is_called FROM {memory_schema}.memories_id_seq"
    ))
    .fetch_one(&pool)
    .await
    .expect("the memory service's id sequence");
    assert!(called, "the memory service stored nothing");
    assert_eq!(
        writes, REQUESTS as i64,
        "writes that reached the memory service's store (a replayed write takes a second id)"
    );
    let second_outcomes = consumed(&second.runtime().metrics, &memory_topic);
    for (who, outcomes) in [("old", &first_outcomes), ("new", &second_outcomes)] {
        assert_eq!(
            outcomes.get("dead_lettered").copied().unwrap_or(0),
            0,
            "{who} replicator dead-lettered: {outcomes:?}"
        );
    }
    let handled_first = first_outcomes.get("handled").copied().unwrap_or(0);
    assert!(
        handled_first as i64 >= waiting,
        "the writes in flight at the signal were finished by the old replicator \
         ({handled_first} handled, {waiting} were blocked)"
    );
    second.shutdown().await;
}
