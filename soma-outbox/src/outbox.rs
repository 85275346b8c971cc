//! [`Outbox`]: enqueueing, statistics and dead-letter operations.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{Connection, PgConnection, PgPool, Row};
use uuid::Uuid;

use crate::message::{key_hash, validate_batch};
use crate::schema::{self, quote_ident};
use crate::{EnqueueOutcome, Inbox, NewMessage, OutboxConfig, OutboxError};

/// Handle to one outbox schema. Cheap to clone.
///
/// See the [crate docs](crate) for the guarantees.
#[derive(Clone)]
pub struct Outbox {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    config: OutboxConfig,
    /// The quoted schema name, `"name"`.
    q: String,
    insert_sql: String,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("schema", &self.inner.config.schema)
            .finish_non_exhaustive()
    }
}

/// Point-in-time figures about an outbox schema.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxStats {
    /// Messages neither delivered nor dead-lettered.
    pub pending: u64,
    /// Age of the oldest pending message (since its transaction started).
    pub oldest_pending_age: Option<Duration>,
    /// Messages in the dead-letter table.
    pub dead_letters: u64,
}

/// A message in the dead-letter table.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// Stable message id.
    pub id: Uuid,
    /// Destination topic.
    pub topic: String,
    /// Ordering key.
    pub key: Option<String>,
    /// Payload bytes.
    pub payload: Vec<u8>,
    /// Headers.
    pub headers: std::collections::BTreeMap<String, String>,
    /// Dedupe key, if it had one.
    pub dedupe_key: Option<String>,
    /// When it was first enqueued.
    pub created_at: DateTime<Utc>,
    /// Delivery attempts made.
    pub attempts: i32,
    /// Times it was requeued from the dead-letter table before.
    pub replays: i32,
    /// The last error.
    pub last_error: String,
    /// Every error, oldest first: `[{"at", "attempt", "error"}, ...]`.
    pub errors: serde_json::Value,
    /// When it was dead-lettered.
    pub dead_at: DateTime<Utc>,
}

impl Outbox {
    /// Connects an outbox to `pool`, creating and migrating the configured
    /// schema (idempotent; concurrent callers are serialized).
    pub async fn new(pool: PgPool, config: OutboxConfig) -> Result<Self, OutboxError> {
        config.validate()?;
        schema::migrate(&pool, &config.schema).await?;
        let q = quote_ident(&config.schema);
        let insert_sql = format!(
            "INSERT INTO {q}.outbox (id, topic, key, key_hash, payload, headers, dedupe_key)
             SELECT u.id, u.topic, u.key, u.key_hash, u.payload, u.headers::jsonb, u.dedupe_key
             FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::int4[], $5::bytea[], $6::text[], $7::text[])
                  WITH ORDINALITY AS u(id, topic, key, key_hash, payload, headers, dedupe_key, ord)
             ORDER BY u.ord
             ON CONFLICT (dedupe_key) WHERE dedupe_key IS NOT NULL DO NOTHING
             RETURNING id"
        );
        Ok(Self {
            inner: Arc::new(Inner {
                pool,
                config,
                q,
                insert_sql,
            }),
        })
    }

    /// The pool this outbox uses.
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// The configuration this outbox was built with.
    pub fn config(&self) -> &OutboxConfig {
        &self.inner.config
    }

    /// The schema name.
    pub fn schema(&self) -> &str {
        &self.inner.config.schema
    }

    pub(crate) fn quoted_schema(&self) -> &str {
        &self.inner.q
    }

    /// The consumer-side inbox stored in this outbox's schema.
    pub fn inbox(&self) -> Inbox {
        Inbox::new(self.schema())
    }

    /// Enqueues `msgs` inside the caller's transaction — the transactional
    /// outbox: `outbox.enqueue(&mut *tx, &msgs)`. They become visible to the
    /// relay only when that transaction commits, and vanish if it rolls back.
    ///
    /// The whole batch is validated first; on a validation error nothing is
    /// written. One `INSERT ... SELECT FROM UNNEST(...)` writes the batch;
    /// messages whose dedupe key is already taken are reported as
    /// [`EnqueueOutcome::Duplicate`]. Outcomes are in input order.
    ///
    /// Validation errors leave the caller's transaction usable. A database
    /// error (including [`OutboxError::DuplicateId`]) aborts it, as any
    /// failed statement does in PostgreSQL: roll back and retry.
    pub async fn enqueue(
        &self,
        conn: &mut PgConnection,
        msgs: &[NewMessage],
    ) -> Result<Vec<EnqueueOutcome>, OutboxError> {
        validate_batch(msgs, self.inner.config.max_payload_bytes)?;
        if msgs.is_empty() {
            return Ok(Vec::new());
        }
        let n = msgs.len();
        let mut ids = Vec::with_capacity(n);
        let mut topics = Vec::with_capacity(n);
        let mut keys = Vec::with_capacity(n);
        let mut hashes = Vec::with_capacity(n);
        let mut payloads = Vec::with_capacity(n);
        let mut headers = Vec::with_capacity(n);
        let mut dedupes = Vec::with_capacity(n);
        for m in msgs {
            ids.push(m.id);
            topics.push(m.topic.as_str());
            keys.push(m.key.as_deref());
            hashes.push(key_hash(&m.topic, m.key.as_deref(), &m.id));
            payloads.push(m.payload.as_slice());
            headers.push(
                serde_json::to_string(&m.headers)
                    .expect("a map of strings always serializes to JSON"),
            );
            dedupes.push(m.dedupe_key.as_deref());
        }
        let inserted: Vec<Uuid> = sqlx::query_scalar(&self.inner.insert_sql)
            .bind(&ids)
            .bind(&topics)
            .bind(&keys)
            .bind(&hashes)
            .bind(&payloads)
            .bind(&headers)
            .bind(&dedupes)
            .fetch_all(&mut *conn)
            .await
            .map_err(|e| match &e {
                sqlx::Error::Database(d)
                    if d.code().as_deref() == Some("23505")
                        && d.constraint() == Some("outbox_pkey") =>
                {
                    OutboxError::DuplicateId {
                        detail: d
                            .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                            .and_then(|p| p.detail())
                            .unwrap_or_default()
                            .to_owned(),
                    }
                }
                _ => OutboxError::Database(e),
            })?;
        let inserted: HashSet<Uuid> = inserted.into_iter().collect();
        Ok(msgs
            .iter()
            .map(|m| match (&m.dedupe_key, inserted.contains(&m.id)) {
                (Some(d), false) => EnqueueOutcome::Duplicate {
                    id: m.id,
                    dedupe_key: d.clone(),
                },
                _ => EnqueueOutcome::Inserted { id: m.id },
            })
            .collect())
    }

    /// Enqueues `msgs` in a transaction of its own, committed before `Ok` is
    /// returned (for fallbacks, e.g. when the broker is down). Same
    /// validation and outcomes as [`enqueue`](Self::enqueue).
    pub async fn enqueue_standalone(
        &self,
        msgs: &[NewMessage],
    ) -> Result<Vec<EnqueueOutcome>, OutboxError> {
        validate_batch(msgs, self.inner.config.max_payload_bytes)?;
        let mut conn = self.inner.pool.acquire().await?;
        let mut tx = conn.begin().await?;
        let out = self.enqueue(&mut tx, msgs).await?;
        tx.commit().await?;
        Ok(out)
    }

    /// Messages of `(topic, key)` not yet delivered nor dead-lettered
    /// (committed ones only, as seen by a fresh transaction).
    pub async fn pending_for_key(&self, topic: &str, key: &str) -> Result<u64, OutboxError> {
        let q = self.quoted_schema();
        let n: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM {q}.outbox WHERE topic = $1 AND key = $2 AND sent_at IS NULL"
        ))
        .bind(topic)
        .bind(key)
        .fetch_one(&self.inner.pool)
        .await?;
        Ok(n as u64)
    }

    /// [`pending_for_key`](Self::pending_for_key) for many keys in one
    /// query: the counts, in the order of `keys`.
    pub async fn pending_for_keys(&self, keys: &[(&str, &str)]) -> Result<Vec<u64>, OutboxError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let q = self.quoted_schema();
        let (topics, names): (Vec<&str>, Vec<&str>) = keys.iter().copied().unzip();
        let counts: Vec<i64> = sqlx::query_scalar(&format!(
            "SELECT (SELECT count(*) FROM {q}.outbox o
                     WHERE o.topic = k.topic AND o.key = k.key AND o.sent_at IS NULL)
             FROM UNNEST($1::text[], $2::text[]) WITH ORDINALITY AS k(topic, key, n)
             ORDER BY k.n"
        ))
        .bind(&topics)
        .bind(&names)
        .fetch_all(&self.inner.pool)
        .await?;
        Ok(counts.into_iter().map(|n| n as u64).collect())
    }

    /// Pending count, oldest pending age and dead-letter count.
    pub async fn stats(&self) -> Result<OutboxStats, OutboxError> {
        let q = self.quoted_schema();
        let row = sqlx::query(&format!(
            "SELECT (SELECT count(*) FROM {q}.outbox WHERE sent_at IS NULL) AS pending,
                    (SELECT EXTRACT(EPOCH FROM clock_timestamp() - min(created_at))::float8
                       FROM {q}.outbox WHERE sent_at IS NULL) AS oldest,
                    (SELECT count(*) FROM {q}.dead_letters) AS dead"
        ))
        .fetch_one(&self.inner.pool)
        .await?;
        let pending: i64 = row.try_get("pending")?;
        let oldest: Option<f64> = row.try_get("oldest")?;
        let dead: i64 = row.try_get("dead")?;
        Ok(OutboxStats {
            pending: pending as u64,
            oldest_pending_age: oldest.map(|s| Duration::from_secs_f64(s.max(0.0))),
            dead_letters: dead as u64,
        })
    }

    /// Lists dead letters, oldest first, at most `limit`, after `after`
    /// (an id from a previous page) if given.
    pub async fn dead_letters(
        &self,
        limit: u32,
        after: Option<Uuid>,
    ) -> Result<Vec<DeadLetter>, OutboxError> {
        let q = self.quoted_schema();
        let rows = sqlx::query(&format!(
            "SELECT id, topic, key, payload, headers, dedupe_key, created_at, attempts, replays,
                    last_error, errors, dead_at
             FROM {q}.dead_letters d
             WHERE $2::uuid IS NULL
                OR (d.dead_at, d.id) > (SELECT dead_at, id FROM {q}.dead_letters WHERE id = $2)
             ORDER BY dead_at, id
             LIMIT $1"
        ))
        .bind(i64::from(limit))
        .bind(after)
        .fetch_all(&self.inner.pool)
        .await?;
        rows.into_iter()
            .map(|r| {
                let headers: serde_json::Value = r.try_get("headers")?;
                Ok(DeadLetter {
                    id: r.try_get("id")?,
                    topic: r.try_get("topic")?,
                    key: r.try_get("key")?,
                    payload: r.try_get("payload")?,
                    headers: serde_json::from_value(headers).unwrap_or_default(),
                    dedupe_key: r.try_get("dedupe_key")?,
                    created_at: r.try_get("created_at")?,
                    attempts: r.try_get("attempts")?,
                    replays: r.try_get("replays")?,
                    last_error: r.try_get("last_error")?,
                    errors: r.try_get("errors")?,
                    dead_at: r.try_get("dead_at")?,
                })
            })
            .collect()
    }

    /// Moves a dead letter back into the outbox with its id, attempts reset
    /// and its replay count increased. It goes back to its original place in
    /// its key's order: with
    /// [`DeadLetterOrder::BlockKey`](crate::DeadLetterOrder::BlockKey) the
    /// later messages of its key waited for it and are delivered after it;
    /// with `ReleaseKey` they may have been delivered already. (A dead letter
    /// written before schema version 2 has no recorded place and is ordered
    /// as a new message.)
    ///
    /// Refused with [`OutboxError::ReplayLimit`] once the message was
    /// requeued [`OutboxConfig::max_replays`] times, with
    /// [`OutboxError::NotFound`] if there is no such dead letter, and with
    /// [`OutboxError::Conflict`] if a pending message has its id or dedupe key.
    pub async fn requeue_dead_letter(&self, id: Uuid) -> Result<(), OutboxError> {
        let q = self.quoted_schema();
        let limit = self.inner.config.max_replays;
        let mut conn = self.inner.pool.acquire().await?;
        let mut tx = conn.begin().await?;
        let replays: Option<i32> = sqlx::query_scalar(&format!(
            "SELECT replays FROM {q}.dead_letters WHERE id = $1 FOR UPDATE"
        ))
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        let replays = replays.ok_or(OutboxError::NotFound { id })?;
        if replays as i64 >= i64::from(limit) {
            return Err(OutboxError::ReplayLimit { id, replays, limit });
        }
        let moved = sqlx::query(&format!(
            "WITH d AS (DELETE FROM {q}.dead_letters WHERE id = $1 RETURNING *)
             INSERT INTO {q}.outbox (id, topic, key, key_hash, payload, headers, dedupe_key,
                                     created_at, attempts, replays, errors, txid, seq)
             OVERRIDING SYSTEM VALUE
             SELECT id, topic, key, key_hash, payload, headers, dedupe_key,
                    created_at, 0, replays + 1,
                    errors || jsonb_build_array(jsonb_build_object(
                        'at', now(), 'requeued', true, 'replay', replays + 1)),
                    COALESCE(txid, pg_current_xact_id()),
                    COALESCE(seq, nextval(pg_get_serial_sequence('{q}.outbox', 'seq')))
             FROM d
             ON CONFLICT DO NOTHING"
        ))
        .bind(id)
        .execute(&mut *tx)
        .await;
        match moved {
            Ok(r) if r.rows_affected() == 1 => {}
            Ok(_) => {
                return Err(OutboxError::Conflict {
                    id,
                    reason: "a pending message has the same id or dedupe key".into(),
                });
            }
            Err(e) => return Err(e.into()),
        }
        tx.commit().await?;
        tracing::info!(schema = self.schema(), message_id = %id, replay = replays + 1, "dead letter requeued");
        Ok(())
    }

    /// Deletes dead letters: the given ids, or with `ids = None` every dead
    /// letter dead-lettered before `older_than` (or all, if that is `None`
    /// too). Returns how many were deleted. This is permanent.
    pub async fn purge_dead_letters(
        &self,
        ids: Option<&[Uuid]>,
        older_than: Option<DateTime<Utc>>,
    ) -> Result<u64, OutboxError> {
        let q = self.quoted_schema();
        let r = sqlx::query(&format!(
            "DELETE FROM {q}.dead_letters
             WHERE ($1::uuid[] IS NULL OR id = ANY($1))
               AND ($2::timestamptz IS NULL OR dead_at < $2)"
        ))
        .bind(ids)
        .bind(older_than)
        .execute(&self.inner.pool)
        .await?;
        Ok(r.rows_affected())
    }

    /// Deletes delivered messages kept for retention
    /// ([`RelayConfig::retention_secs`](crate::RelayConfig::retention_secs))
    /// that were sent more than `retention` ago, at most `limit` per call.
    pub async fn purge_sent(&self, retention: Duration, limit: u32) -> Result<u64, OutboxError> {
        let q = self.quoted_schema();
        let r = sqlx::query(&format!(
            "DELETE FROM {q}.outbox WHERE id IN (
                 SELECT id FROM {q}.outbox
                 WHERE sent_at IS NOT NULL AND sent_at < now() - $1 * interval '1 millisecond'
                 LIMIT $2)"
        ))
        .bind(retention.as_millis() as i64)
        .bind(i64::from(limit))
        .execute(&self.inner.pool)
        .await?;
        Ok(r.rows_affected())
    }
}
