//! The memory replica on the real PostgreSQL (the store) and with the
//! services in-process (a permanent refusal):
//!
//! - a write is recorded once whatever the number of attempts, counted as
//!   lag while pending, and leaves the lag when remembered or refused; a
//!   refused write replayed is pending again, and a remembered one stays so;
//! - a write the memory service refuses for good (a wrong token: `401`) is
//!   dead-lettered at once, counted by `soma_platform_memory_dead_lettered_count`
//!   with `memory_dlq` degraded, and its replica row is marked refused, not
//!   left as lag.

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use soma_example_platform::memory_replica::{ReplicaState, ReplicaWrite};
use soma_example_platform::session_events::SessionEvents;
use sqlx::PgPool;
use support::*;

#[tokio::test]
async fn the_replica_records_a_write_once_and_measures_what_waits() {
    let pool = PgPool::connect(&soma_testkit::postgres_url())
        .await
        .expect("PostgreSQL (start it with `cargo xtask stack up`)");
    let schema = soma_testkit::unique_name("replica");
    let replica = SessionEvents::new(pool.clone(), &schema)
        .expect("a plain schema name")
        .memory_replica();
    replica.migrate().await.unwrap();
    replica.migrate().await.expect("migrations run twice");
    let used = vec!["k1".to_owned()];
    let write = ReplicaWrite {
        tenant: "acme",
        namespace: "conversation.0123",
        conversation_id: "c1",
        message_id: uuid::Uuid::new_v4(),
        user_text: "my favourite tree is the rowan",
        reply_text: "noted",
        used_memories: &used,
    };
    let id = write.message_id;
    for expected in [true, false] {
        let mut tx = pool.begin().await.unwrap();
        assert_eq!(replica.record(&mut tx, &write).await.unwrap(), expected);
        tx.commit().await.unwrap();
    }
    assert_eq!(
        replica.state("acme", id).await.unwrap(),
        ReplicaState::Pending
    );
    assert_eq!(
        replica.state("globex", id).await.unwrap(),
        ReplicaState::Missing
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let lag = replica.lag().await.unwrap();
    assert_eq!(lag.pending, 1);
    assert!(lag.oldest >= Duration::from_millis(250), "{lag:?}");

    let steps = [
        (ReplicaState::Refused, ReplicaState::Refused, 0),
        (ReplicaState::Pending, ReplicaState::Pending, 1),
        (ReplicaState::Remembered, ReplicaState::Remembered, 0),
        // Remembered stays remembered.
        (ReplicaState::Refused, ReplicaState::Remembered, 0),
        (ReplicaState::Pending, ReplicaState::Remembered, 0),
    ];
    for (to, state, pending) in steps {
        replica.mark("acme", id, to).await.unwrap();
        assert_eq!(
            replica.state("acme", id).await.unwrap(),
            state,
            "after {to:?}"
        );
        let lag = replica.lag().await.unwrap();
        assert_eq!(lag.pending, pending, "after {to:?}");
        if pending == 0 {
            assert_eq!(lag.oldest, Duration::ZERO);
        }
    }
    let (rows, used_stored): (i64, serde_json::Value) = sqlx::query_as(&format!(
        "SELECT count(*) OVER (), used_memories FROM {} WHERE message_id = $1",
        replica.table()
    ))
    .bind(id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((rows, used_stored), (1, json!(["k1"])));
    sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(&pool)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_the_memory_service_refuses_is_dead_lettered_counted_and_not_lag() {
    let env = Env::new();
    let pool = PgPool::connect(&soma_testkit::postgres_url())
        .await
        .expect("PostgreSQL (start it with `cargo xtask stack up`)");
    let memory_schema = format!("{}_memory", env.prefix);
    let brain = memory_service(&pool, &memory_schema, "the-right-memory-token-3b").await;
    let platform = env
        .platform()
        .set("somabrain.base_url", json!(format!("http://{brain}")))
        .set("somabrain.token", json!("a-wrong-memory-token-3b"))
        .set("memory.replica_lag_interval_ms", json!(100))
        .conversation_worker()
        .memory_replicator()
        .start()
        .await;
    let (base, client) = (platform.base.clone(), reqwest::Client::new());
    let ada = env.token("ada", "acme", &["user"], ALL_SCOPES);
    let conv = format!("r-{}", uuid::Uuid::new_v4().simple());
    let mut sse = SseReader::open(&client, &base, &conv, &ada).await;
    warm_up(&client, &base, &mut sse, &conv, &ada).await;
    let answer = turn(&client, &base, &mut sse, &conv, &ada, "remember this").await;
    let key = completed(&answer).data["message_id"]
        .as_str()
        .unwrap()
        .to_owned();

    let dlq = format!("{}.memory.dlq", env.prefix);
    let (_, headers) = record_within(&dlq, &key, Duration::from_secs(60))
        .await
        .expect("the refused write in the DLQ");
    assert!(headers.contains_key("soma-dlq-error"), "{headers:?}");
    let admin = platform.worker("memory").admin_addr();
    let table = format!("{}_chat.memory_replica", env.prefix);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let dead = metric(
            &client,
            admin,
            "soma_platform_memory_dead_lettered_count",
            "",
        )
        .await;
        let counted = metric(
            &client,
            admin,
            "soma_platform_memory_writes_total",
            "outcome=\"dead_lettered\"",
        )
        .await;
        let pending = metric(
            &client,
            admin,
            "soma_platform_memory_replica_pending_count",
            "",
        )
        .await;
        let health = get_health(&client, admin).await;
        let (refused,): (i64,) = sqlx::query_as(&format!(
            "SELECT count(*) FROM {table} WHERE message_id = $1::uuid AND refused_at IS NOT NULL"
        ))
        .bind(&key)
        .fetch_one(&pool)
        .await
        .unwrap();
        let dlq_degraded = health["components"]["memory_dlq"]["status"] == "degraded";
        if dead >= 1.0 && dead == counted && pending == 0.0 && refused == 1 && dlq_degraded {
            assert_eq!(health["components"]["memory_replica"]["status"], "up");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "dead-lettered {dead} (counted {counted}), pending {pending}, refused {refused}: {health}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(sse);
    platform.shutdown().await;
}
