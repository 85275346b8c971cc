//! The gateway's store of session (reply) events, so an SSE client can
//! resume with `Last-Event-ID` on any gateway, after any restart.
//!
//! One table, `<outbox schema>.sse_events`: every gateway's hub inserts each
//! reply event it consumes, idempotently by envelope id (`ON CONFLICT DO
//! NOTHING`); the event's SSE id is the row's `bigserial` id, whichever
//! gateway inserted it first. A conversation's events come from one
//! partition, which every hub consumes in order, and a hub inserts event
//! `n + 1` only once its insert of `n` returned (inserted or found), so ids
//! increase along a conversation and never fork between gateways.
//!
//! Retention: the newest `chat.sse_retention_events` rows per conversation
//! are kept; pruning runs off the hot path, in a spawned task, every
//! [`PRUNE_EVERY`] inserts of a gateway.

use sqlx::{PgPool, Row};
use uuid::Uuid;

/// Every how many inserts a gateway prunes the conversation it just wrote.
pub const PRUNE_EVERY: i64 = 16;

/// A stored event.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    /// The SSE id (row id), increasing along a conversation.
    pub id: i64,
    /// The SSE event name.
    pub name: String,
    /// The JSON data.
    pub data: serde_json::Value,
}

/// The session-event store.
#[derive(Debug, Clone)]
pub struct SseStore {
    pool: PgPool,
    table: String,
    retention_events: i64,
}

impl SseStore {
    /// Creates the table (once, under an advisory lock) in `schema`.
    pub async fn open(
        pool: PgPool,
        schema: &str,
        retention_events: u64,
    ) -> Result<Self, sqlx::Error> {
        let table = format!("\"{schema}\".sse_events");
        let mut tx = pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
            .bind(format!("{schema}.sse_events"))
            .execute(&mut *tx)
            .await?;
        sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\""))
            .execute(&mut *tx)
            .await?;
        sqlx::query(&format!(
            "CREATE TABLE IF NOT EXISTS {table} (
                id bigserial PRIMARY KEY,
                tenant text NOT NULL,
                conversation_id text NOT NULL,
                envelope_id uuid NOT NULL UNIQUE,
                name text NOT NULL,
                data jsonb NOT NULL,
                created_at timestamptz NOT NULL DEFAULT now())"
        ))
        .execute(&mut *tx)
        .await?;
        sqlx::query(&format!(
            "CREATE INDEX IF NOT EXISTS sse_events_conv ON {table} (tenant, conversation_id, id)"
        ))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Self {
            pool,
            table,
            retention_events: retention_events.min(i64::MAX as u64) as i64,
        })
    }

    /// Stores an event (idempotent by envelope id) and answers its SSE id.
    pub async fn insert(
        &self,
        tenant: &str,
        conversation_id: &str,
        envelope_id: Uuid,
        name: &str,
        data: &serde_json::Value,
    ) -> Result<i64, sqlx::Error> {
        let row = sqlx::query(&format!(
            "WITH ins AS (
                INSERT INTO {t} (tenant, conversation_id, envelope_id, name, data)
                VALUES ($1, $2, $3, $4, $5)
                ON CONFLICT (envelope_id) DO NOTHING RETURNING id)
             SELECT id FROM ins UNION ALL SELECT id FROM {t} WHERE envelope_id = $3
             LIMIT 1",
            t = self.table
        ))
        .bind(tenant)
        .bind(conversation_id)
        .bind(envelope_id)
        .bind(name)
        .bind(data)
        .fetch_one(&self.pool)
        .await?;
        let id: i64 = row.try_get(0)?;
        if id % PRUNE_EVERY == 0 {
            let store = self.clone();
            let (tenant, conv) = (tenant.to_owned(), conversation_id.to_owned());
            tokio::spawn(async move {
                if let Err(e) = store.prune(&tenant, &conv).await {
                    tracing::warn!(event = "sse_prune_failed", error = %e);
                }
            });
        }
        Ok(id)
    }

    /// Deletes all but the newest `retention_events` events of a conversation.
    pub async fn prune(&self, tenant: &str, conversation_id: &str) -> Result<u64, sqlx::Error> {
        let r = sqlx::query(&format!(
            "DELETE FROM {t} WHERE tenant = $1 AND conversation_id = $2 AND id < (
                SELECT COALESCE(MIN(id), 0) FROM (
                  SELECT id FROM {t} WHERE tenant = $1 AND conversation_id = $2
                  ORDER BY id DESC LIMIT $3) newest)",
            t = self.table
        ))
        .bind(tenant)
        .bind(conversation_id)
        .bind(self.retention_events)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected())
    }

    /// Whether event `id` of the conversation is still kept.
    pub async fn contains(
        &self,
        tenant: &str,
        conversation_id: &str,
        id: i64,
    ) -> Result<bool, sqlx::Error> {
        let row = sqlx::query(&format!(
            "SELECT EXISTS (SELECT 1 FROM {} WHERE tenant = $1 AND conversation_id = $2 AND id = $3)",
            self.table
        ))
        .bind(tenant)
        .bind(conversation_id)
        .bind(id)
        .fetch_one(&self.pool)
        .await?;
        row.try_get(0)
    }

    /// The conversation's kept events after `after`, oldest first.
    pub async fn after(
        &self,
        tenant: &str,
        conversation_id: &str,
        after: i64,
    ) -> Result<Vec<StoredEvent>, sqlx::Error> {
        let rows = sqlx::query(&format!(
            "SELECT id, name, data FROM {} WHERE tenant = $1 AND conversation_id = $2 AND id > $3
             ORDER BY id",
            self.table
        ))
        .bind(tenant)
        .bind(conversation_id)
        .bind(after)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(StoredEvent {
                    id: r.try_get(0)?,
                    name: r.try_get(1)?,
                    data: r.try_get(2)?,
                })
            })
            .collect()
    }
}
