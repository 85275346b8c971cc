//! Enqueue, validation, dedupe, migrations, inbox and operations against a
//! real PostgreSQL.

mod common;

use std::time::Duration;

use common::{setup, setup_with};
use soma_observability::health::{ComponentStatus, HealthCheck};
use soma_outbox::{EnqueueOutcome, Inbox, NewMessage, Outbox, OutboxConfig, OutboxHealthCheck};

#[tokio::test]
async fn enqueue_in_caller_transaction_commits_and_rolls_back_with_it() {
    let db = setup("txn").await;
    let ob = &db.outbox;

    let mut tx = db.pool.begin().await.unwrap();
    let out = ob
        .enqueue(
            &mut tx,
            &[NewMessage::new("orders", b"1".to_vec()).with_key("a")],
        )
        .await
        .unwrap();
    assert!(out[0].is_inserted());
    tx.rollback().await.unwrap();
    assert_eq!(
        ob.pending_for_key("orders", "a").await.unwrap(),
        0,
        "rolled back"
    );

    let mut tx = db.pool.begin().await.unwrap();
    let msgs: Vec<_> = (0..3)
        .map(|i| NewMessage::new("orders", i.to_string().into_bytes()).with_key("a"))
        .collect();
    ob.enqueue(&mut tx, &msgs).await.unwrap();
    assert_eq!(
        ob.pending_for_key("orders", "a").await.unwrap(),
        0,
        "not visible before commit"
    );
    tx.commit().await.unwrap();
    assert_eq!(ob.pending_for_key("orders", "a").await.unwrap(), 3);
    assert_eq!(ob.pending_for_key("orders", "b").await.unwrap(), 0);
    assert_eq!(
        ob.pending_for_keys(&[
            ("orders", "b"),
            ("orders", "a"),
            ("other", "a"),
            ("orders", "a")
        ])
        .await
        .unwrap(),
        vec![0, 3, 0, 3],
        "one query, answers in the order asked"
    );
    assert!(ob.pending_for_keys(&[]).await.unwrap().is_empty());

    // Stored in input order inside the transaction, with headers and payload intact.
    let rows: Vec<(uuid::Uuid, Vec<u8>, serde_json::Value)> = sqlx::query_as(&format!(
        "SELECT id, payload, headers FROM \"{}\".outbox ORDER BY txid, seq",
        db.schema
    ))
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        rows.iter().map(|r| r.0).collect::<Vec<_>>(),
        msgs.iter().map(|m| m.id).collect::<Vec<_>>()
    );
    assert_eq!(rows[2].1, b"2");
    db.drop_schema().await;
}

#[tokio::test]
async fn dedupe_key_conflicts_are_reported_per_record() {
    let db = setup("dedupe").await;
    let ob = &db.outbox;
    let a = NewMessage::new("t", b"a".to_vec()).with_dedupe_key("k1");
    let first = ob
        .enqueue_standalone(std::slice::from_ref(&a))
        .await
        .unwrap();
    assert_eq!(first, vec![EnqueueOutcome::Inserted { id: a.id }]);

    let b = NewMessage::new("t", b"b".to_vec()).with_dedupe_key("k1"); // collides with a
    let c = NewMessage::new("t", b"c".to_vec()).with_dedupe_key("k2");
    let d = NewMessage::new("t", b"d".to_vec()).with_dedupe_key("k2"); // collides with c, same call
    let e = NewMessage::new("t", b"e".to_vec()); // no dedupe key
    let out = ob
        .enqueue_standalone(&[b.clone(), c.clone(), d.clone(), e.clone()])
        .await
        .unwrap();
    assert_eq!(
        out,
        vec![
            EnqueueOutcome::Duplicate {
                id: b.id,
                dedupe_key: "k1".into()
            },
            EnqueueOutcome::Inserted { id: c.id },
            EnqueueOutcome::Duplicate {
                id: d.id,
                dedupe_key: "k2".into()
            },
            EnqueueOutcome::Inserted { id: e.id },
        ]
    );
    assert_eq!(db.pending().await, 3);

    // The same message (same id) enqueued again is a typed error, nothing written.
    let again = NewMessage {
        id: e.id,
        ..NewMessage::new("t", b"e2".to_vec())
    };
    let err = ob
        .enqueue_standalone(&[NewMessage::new("t", b"f".to_vec()), again])
        .await
        .unwrap_err();
    assert!(err.is_duplicate_id(), "{err}");
    assert_eq!(db.pending().await, 3);

    // Only the message id's own constraint means "duplicate id": another
    // unique violation (an index an operator added) is a database error.
    sqlx::query(&format!(
        "CREATE UNIQUE INDEX one_per_topic ON \"{}\".outbox (topic) WHERE topic = 'once'",
        db.schema
    ))
    .execute(&db.pool)
    .await
    .unwrap();
    ob.enqueue_standalone(&[NewMessage::new("once", b"1".to_vec())])
        .await
        .unwrap();
    let err = ob
        .enqueue_standalone(&[NewMessage::new("once", b"2".to_vec())])
        .await
        .unwrap_err();
    assert!(err.is_database() && !err.is_duplicate_id(), "{err:?}");
    // So is any other failure.
    sqlx::query(&format!("DROP TABLE \"{}\".outbox CASCADE", db.schema))
        .execute(&db.pool)
        .await
        .unwrap();
    let err = ob
        .enqueue_standalone(&[NewMessage::new("t", b"g".to_vec())])
        .await
        .unwrap_err();
    assert!(err.is_database() && !err.is_duplicate_id(), "{err:?}");
    // What an operator reads when the outbox is printed.
    assert_eq!(
        format!("{ob:?}"),
        format!("Outbox {{ schema: {:?}, .. }}", db.schema)
    );
    assert_eq!(ob.config().schema, db.schema);
    db.drop_schema().await;
}

#[tokio::test]
async fn bad_input_is_rejected_before_anything_is_written() {
    let db = setup_with("bad", |c| c.max_payload_bytes = 16).await;
    let ob = &db.outbox;
    let ok = NewMessage::new("t", b"fine".to_vec());

    let big = NewMessage::new("t", vec![0u8; 17]);
    let e = ob.enqueue_standalone(&[ok.clone(), big]).await.unwrap_err();
    assert!(
        e.is_payload_too_large() && e.is_invalid_input() && !e.is_database(),
        "{e}"
    );

    for topic in ["", ".", "..", "has space", "slash/no", &"x".repeat(250)] {
        let bad = NewMessage::new(topic, b"x".to_vec());
        let e = ob.enqueue_standalone(&[ok.clone(), bad]).await.unwrap_err();
        assert!(e.is_invalid_topic(), "{topic:?}: {e}");
    }
    let nul = NewMessage::new("t", b"x".to_vec()).with_header("h", "a\0b");
    assert!(
        ob.enqueue_standalone(&[nul])
            .await
            .unwrap_err()
            .is_invalid_message()
    );

    // Inside a transaction too: the transaction stays usable, nothing written.
    let mut tx = db.pool.begin().await.unwrap();
    let e = ob
        .enqueue(&mut tx, &[NewMessage::new("bad topic", b"".to_vec())])
        .await
        .unwrap_err();
    assert!(e.is_invalid_topic());
    ob.enqueue(&mut tx, std::slice::from_ref(&ok))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(db.pending().await, 1, "only the valid message was written");
    db.drop_schema().await;
}

#[tokio::test]
async fn migrations_are_idempotent_versioned_and_concurrent_safe() {
    let db = setup("mig").await;
    // Many concurrent openers of the same schema: all succeed, one migration row.
    let mut config = OutboxConfig::default();
    config.schema = db.schema.clone();
    let opens = (0..4).map(|_| Outbox::new(db.pool.clone(), config.clone()));
    for r in futures::future::join_all(opens).await {
        r.unwrap();
    }
    let versions: Vec<i32> = sqlx::query_scalar(&format!(
        "SELECT version FROM \"{}\".schema_migrations ORDER BY version",
        db.schema
    ))
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(versions, vec![1, 2]);

    // A hand-edited migration record is detected.
    sqlx::query(&format!(
        "UPDATE \"{}\".schema_migrations SET checksum = 'x'",
        db.schema
    ))
    .execute(&db.pool)
    .await
    .unwrap();
    let e = Outbox::new(db.pool.clone(), config.clone())
        .await
        .unwrap_err();
    assert!(e.is_migration(), "{e}");
    // A schema from a newer crate version is refused.
    sqlx::query(&format!(
        "INSERT INTO \"{}\".schema_migrations (version, name, checksum) VALUES (99, 'future', 'x')",
        db.schema
    ))
    .execute(&db.pool)
    .await
    .unwrap();
    assert!(
        Outbox::new(db.pool.clone(), config)
            .await
            .unwrap_err()
            .is_migration()
    );

    // Invalid schema names never reach SQL.
    let mut bad = OutboxConfig::default();
    bad.schema = "x\"; DROP TABLE y; --".into();
    assert!(
        Outbox::new(db.pool.clone(), bad)
            .await
            .unwrap_err()
            .is_config()
    );
    db.drop_schema().await;
}

#[tokio::test]
async fn inbox_records_each_message_once_per_consumer_inside_the_transaction() {
    let db = setup("inbox").await;
    let inbox: Inbox = db.outbox.inbox();
    sqlx::query(&format!("CREATE TABLE \"{}\".effects (n int)", db.schema))
        .execute(&db.pool)
        .await
        .unwrap();
    let id = uuid::Uuid::now_v7();

    // A consumer that applies an effect only on first sight.
    let consume = |rollback: bool| {
        let pool = db.pool.clone();
        let inbox = inbox.clone();
        let schema = db.schema.clone();
        async move {
            let mut tx = pool.begin().await.unwrap();
            let first = inbox.record(&mut tx, "billing", id).await.unwrap();
            if first {
                sqlx::query(&format!("INSERT INTO \"{schema}\".effects VALUES (1)"))
                    .execute(&mut *tx)
                    .await
                    .unwrap();
            }
            if rollback {
                tx.rollback().await.unwrap()
            } else {
                tx.commit().await.unwrap()
            }
            first
        }
    };
    let contains = |consumer: &'static str| {
        let pool = db.pool.clone();
        let inbox = inbox.clone();
        async move {
            let mut conn = pool.acquire().await.unwrap();
            inbox.contains(&mut conn, consumer, id).await.unwrap()
        }
    };
    assert!(!contains("billing").await, "nothing recorded yet");
    assert!(consume(true).await, "first delivery (rolled back)");
    assert!(
        !contains("billing").await,
        "a rolled-back record is no record"
    );
    assert!(consume(false).await, "rolled back delivery did not count");
    assert!(contains("billing").await, "the committed record is seen");
    assert!(!contains("audit").await, "per consumer");
    assert!(!consume(false).await, "duplicate delivery is skipped");
    // A consumer name must be non-empty and free of NUL.
    for bad in ["", "bill\0ing"] {
        let mut tx = db.pool.begin().await.unwrap();
        let err = inbox.record(&mut tx, bad, id).await.unwrap_err();
        assert!(err.is_invalid_message(), "{bad:?}: {err:?}");
    }
    // Concurrent redeliveries: exactly one applies.
    let results = futures::future::join_all((0..5).map(|_| {
        let pool = db.pool.clone();
        let inbox = inbox.clone();
        async move {
            let mut tx = pool.begin().await.unwrap();
            let first = inbox.record(&mut tx, "audit", id).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            tx.commit().await.unwrap();
            first
        }
    }))
    .await;
    assert_eq!(results.iter().filter(|f| **f).count(), 1, "{results:?}");

    let effects: i64 =
        sqlx::query_scalar(&format!("SELECT count(*) FROM \"{}\".effects", db.schema))
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(effects, 1);
    assert_eq!(
        inbox
            .purge_older_than(&db.pool, Duration::ZERO)
            .await
            .unwrap(),
        2
    );
    db.drop_schema().await;
}

#[tokio::test]
async fn health_turns_degraded_when_the_oldest_pending_message_is_too_old() {
    let db = setup("health").await;
    let check =
        OutboxHealthCheck::new(db.outbox.clone()).with_threshold(Duration::from_millis(300));
    let empty = check.check().await;
    assert_eq!(empty.status, ComponentStatus::Up);
    assert_eq!(empty.gauges["pending"], 0.0);

    db.outbox
        .enqueue_standalone(&[NewMessage::new("t", b"x".to_vec())])
        .await
        .unwrap();
    assert_eq!(
        check.check().await.status,
        ComponentStatus::Up,
        "young message"
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    let old = check.check().await;
    assert_eq!(old.status, ComponentStatus::Degraded, "{old:?}");
    assert_eq!(old.gauges["pending"], 1.0);
    assert!(old.gauges["oldest_pending_age_seconds"] >= 0.3);

    // A database that cannot be reached is `down`.
    db.pool.close().await;
    assert_eq!(check.check().await.status, ComponentStatus::Down);
    let schema = db.schema.clone();
    let pool = sqlx::PgPool::connect(&soma_testkit::require_postgres())
        .await
        .unwrap();
    sqlx::query(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
        .execute(&pool)
        .await
        .unwrap();
}
