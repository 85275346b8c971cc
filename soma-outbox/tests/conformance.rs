//! soma-outbox's part of the conformance suite (issue #22; the soma-bus
//! README's "Conformance" section lists every scenario).
//!
//! - The relay's claim plan at a backlog: 100,000 pending rows, most of
//!   them in shards other relays own (one of which is mid-claim), some keys
//!   blocked behind a retry. On a relay-configured session the claim must
//!   walk the `(txid, seq)` index and stop at the batch size, without
//!   sorting and without filtering away a large part of the backlog. Fails
//!   if the plan regresses.
//! - `xid8` transaction ids above `i64::MAX`: the claim, the dead-letter
//!   listing and a requeue handle them (nothing decodes `txid` as `i64`),
//!   and they order as unsigned 64-bit values. A test cluster's xid epoch
//!   cannot be advanced here, so the rows carry synthetic `xid8` literals.

mod common;

use common::setup;
use soma_outbox::{NewMessage, Relay};
use std::time::Duration;

use sqlx::{Connection, Row};

const BACKLOG: usize = 100_000;
const SHARDS: i32 = 16;
const BATCH: i64 = 100;

/// Sums `Rows Removed by Filter` (times loops) and collects node types of
/// an `EXPLAIN (ANALYZE, FORMAT JSON)` plan.
fn walk(plan: &serde_json::Value, removed: &mut f64, nodes: &mut Vec<String>) {
    let loops = plan["Actual Loops"].as_f64().unwrap_or(1.0);
    *removed += plan["Rows Removed by Filter"].as_f64().unwrap_or(0.0) * loops;
    let mut name = plan["Node Type"].as_str().unwrap_or("?").to_owned();
    if let Some(ix) = plan["Index Name"].as_str() {
        name = format!("{name} using {ix}");
    } else if let Some(rel) = plan["Relation Name"].as_str() {
        name = format!("{name} on {rel}");
    }
    nodes.push(name);
    for p in plan["Plans"].as_array().into_iter().flatten() {
        walk(p, removed, nodes);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim_walks_the_index_at_a_backlog_of_100k_mostly_claimed_rows() {
    let db = setup("plan").await;
    let q = format!("\"{}\"", db.schema);
    // 100,000 rows over 1,000 keys in 20 transactions (20 txids).
    for _ in 0..20 {
        sqlx::query(&format!(
            "INSERT INTO {q}.outbox (id, topic, key, key_hash, payload)
             SELECT gen_random_uuid(), 'plan', 'k' || (g % 1000),
                    hashtext('k' || (g % 1000)) & 2147483647, '\\x00'::bytea
             FROM generate_series(1, {}) g",
            BACKLOG / 20
        ))
        .execute(&db.pool)
        .await
        .unwrap();
    }
    // Ten of our keys wait for a retry: their later rows are held back.
    sqlx::query(&format!(
        "UPDATE {q}.outbox SET attempts = 1, available_at = now() + interval '1 hour'
         WHERE id IN (SELECT DISTINCT ON (key) id FROM {q}.outbox
                      WHERE key_hash % {SHARDS} IN (0, 1) ORDER BY key, txid, seq LIMIT 10)"
    ))
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query(&format!("ANALYZE {q}.outbox"))
        .execute(&db.pool)
        .await
        .unwrap();
    // Another relay is mid-claim on shard 5 (rows locked, transaction open).
    let mut other = db.pool.acquire().await.unwrap();
    let mut other_tx = other.begin().await.unwrap();
    sqlx::query(&format!(
        "SELECT id FROM {q}.outbox WHERE key_hash % {SHARDS} = 5
         ORDER BY txid, seq LIMIT {BATCH} FOR UPDATE"
    ))
    .fetch_all(&mut *other_tx)
    .await
    .unwrap();

    // This relay owns 2 of 16 shards: 7/8 of the backlog is other relays'.
    let (claim, settings) = Relay::claim_query_for_tests(&db.outbox);
    let mut conn = db.pool.acquire().await.unwrap();
    for s in settings {
        sqlx::query(s).execute(&mut *conn).await.unwrap();
    }
    sqlx::query("SET statement_timeout = '20s'")
        .execute(&mut *conn)
        .await
        .unwrap();
    // Rows are claimable once their transaction is below every running
    // transaction's snapshot (cluster-wide): a test elsewhere that holds a
    // transaction open from before our inserts holds our backlog back.
    let below_xmin = format!(
        "SELECT pg_snapshot_xmin(pg_current_snapshot()) > (SELECT max(txid) FROM {q}.outbox)"
    );
    let claimable = soma_testkit::eventually(Duration::from_secs(60), || {
        let (pool, sql) = (db.pool.clone(), below_xmin.clone());
        async move {
            sqlx::query_scalar::<_, bool>(&sql)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    })
    .await;
    assert!(
        claimable,
        "another session kept a transaction open for 60 s from before the backlog was written"
    );
    let mut tx = conn.begin().await.unwrap();
    let explained: serde_json::Value =
        sqlx::query(&format!("EXPLAIN (ANALYZE, FORMAT JSON) {claim}"))
            .bind(SHARDS)
            .bind(vec![0i32, 1])
            .bind(BATCH)
            .bind(true)
            .fetch_one(&mut *tx)
            .await
            .expect("EXPLAIN ANALYZE of the claim")
            .try_get(0)
            .unwrap();
    tx.rollback().await.unwrap();
    other_tx.rollback().await.unwrap();
    drop((conn, other));
    let top = &explained[0]["Plan"];
    let (mut removed, mut nodes) = (0.0, Vec::new());
    walk(top, &mut removed, &mut nodes);
    let ms = explained[0]["Execution Time"].as_f64().unwrap_or(f64::NAN);
    eprintln!("claim plan: {nodes:?}, rows removed by filter {removed}, {ms} ms");
    assert_eq!(
        top["Actual Rows"].as_f64(),
        Some(BATCH as f64),
        "a full batch"
    );
    assert!(
        nodes
            .iter()
            .any(|n| n == "Index Scan using outbox_pending_order"),
        "the claim walks the (txid, seq) index: {nodes:?}"
    );
    assert!(
        !nodes
            .iter()
            .any(|n| n.contains("Sort") || n == "Seq Scan on outbox"),
        "no sort of, and no scan over, the backlog: {nodes:?}"
    );
    // Walking in order, the claim passes over other shards' rows (7 of 8)
    // and held-back keys until the batch is full: a few batch sizes, not
    // the backlog.
    assert!(
        removed < (BATCH * 20) as f64,
        "the claim filtered away {removed} rows of a {BACKLOG}-row backlog: {nodes:?}"
    );
    db.drop_schema().await;
}

#[tokio::test]
async fn xid8_above_i64_max_is_claimed_listed_and_requeued_without_i64_decoding() {
    let db = setup("xid").await;
    let q = format!("\"{}\"", db.schema);
    let big = "18446744073709551000"; // > i64::MAX (9223372036854775807)
    let edge = "9223372036854775807";
    let m1 = NewMessage::new("xid", b"a".to_vec()).with_key("k");
    let m2 = NewMessage::new("xid", b"b".to_vec()).with_key("k");
    db.outbox
        .enqueue_standalone(&[m1.clone(), m2.clone()])
        .await
        .unwrap();
    sqlx::query(&format!(
        "UPDATE {q}.outbox SET txid = $2::text::xid8 WHERE id = $1"
    ))
    .bind(m1.id)
    .bind(big)
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query(&format!(
        "UPDATE {q}.outbox SET txid = $2::text::xid8 WHERE id = $1"
    ))
    .bind(m2.id)
    .bind(edge)
    .execute(&db.pool)
    .await
    .unwrap();
    // Unsigned order: 2^63 - 1 before 2^64 - 616 (as i64 the big one would be negative).
    let order: Vec<String> = sqlx::query_scalar(&format!(
        "SELECT o.txid::text AS t FROM {q}.outbox o ORDER BY o.txid, o.seq"
    ))
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(order, vec![edge.to_owned(), big.to_owned()]);

    // The claim runs over them (future transactions: nothing claimable).
    let (claim, _) = Relay::claim_query_for_tests(&db.outbox);
    let mut conn = db.pool.acquire().await.unwrap();
    let mut tx = conn.begin().await.unwrap();
    let rows = sqlx::query(&claim)
        .bind(1i32)
        .bind(vec![0i32])
        .bind(10i64)
        .bind(true)
        .fetch_all(&mut *tx)
        .await
        .expect("claim over xid8 values above i64::MAX");
    assert!(
        rows.is_empty(),
        "a txid above the snapshot's xmin is not claimable"
    );
    tx.rollback().await.unwrap();
    drop(conn);

    // Dead-letter the big one the way the relay does, list it, requeue it.
    sqlx::query(&format!(
        "WITH moved AS (DELETE FROM {q}.outbox WHERE id = $1
             RETURNING id, topic, key, key_hash, payload, headers, dedupe_key, created_at,
                       attempts, replays, errors, txid, seq)
         INSERT INTO {q}.dead_letters (id, topic, key, key_hash, payload, headers, dedupe_key,
             created_at, attempts, replays, last_error, errors, txid, seq)
         SELECT id, topic, key, key_hash, payload, headers, dedupe_key, created_at,
                attempts + 1, replays, 'synthetic', errors, txid, seq FROM moved"
    ))
    .bind(m1.id)
    .execute(&db.pool)
    .await
    .unwrap();
    let listed = db.outbox.dead_letters(10, None).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, m1.id);
    db.outbox.requeue_dead_letter(m1.id).await.unwrap();
    let back: String =
        sqlx::query_scalar(&format!("SELECT txid::text FROM {q}.outbox WHERE id = $1"))
            .bind(m1.id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(back, big, "the requeued row keeps its place (txid) exactly");
    db.drop_schema().await;
}
