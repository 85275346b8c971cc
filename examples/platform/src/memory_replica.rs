//! The PostgreSQL replica of memory writes: every turn the memory
//! replicator accepted, kept whatever SomaBrain's state, and the measure of
//! how far SomaBrain is behind.
//!
//! One row per `(tenant, message id)` (the memory key) in
//! `<chat.session_events_schema>.memory_replica`: tenant, the subject's
//! memory namespace, conversation, message id, user text, reply text, the
//! memories the reply used, `written_at` (when the replicator recorded it),
//! `remembered_at` (when SomaBrain confirmed it and took its feedback;
//! `NULL` until then) and `refused_at` (when SomaBrain refused it for good
//! and the write was dead-lettered).
//!
//! **Written once.** The row is inserted in the **same transaction** as the
//! replicator's inbox record of the write's envelope id ([`record`]), so a
//! redelivered write (a crash or rebalance before the offset commit) finds
//! the inbox row and writes nothing; the primary key makes a second row for
//! one message impossible even if two envelopes carried it.
//!
//! **Lag.** [`MemoryReplica::lag`] counts rows neither remembered nor
//! refused and the age of the oldest: 0 when SomaBrain has everything.
//! Rows are kept (no retention here): the replica is the record of what
//! was written, e.g. to rebuild a memory service's store.
//!
//! [`record`]: MemoryReplica::record

use std::time::Duration;

use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::session_events::SessionEventsError;

/// One memory write as the replica keeps it.
#[derive(Debug, Clone, Copy)]
pub struct ReplicaWrite<'a> {
    /// The tenant.
    pub tenant: &'a str,
    /// The subject's SomaBrain namespace.
    pub namespace: &'a str,
    /// The conversation.
    pub conversation_id: &'a str,
    /// The user message's id: the memory key.
    pub message_id: Uuid,
    /// What the user said.
    pub user_text: &'a str,
    /// What the assistant answered.
    pub reply_text: &'a str,
    /// The keys of the memories the reply used.
    pub used_memories: &'a [String],
}

/// Writes waiting for SomaBrain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReplicaLag {
    /// Rows neither remembered nor refused.
    pub pending: u64,
    /// Age of the oldest of them (zero when none).
    pub oldest: Duration,
}

/// Where one message's write stands in the replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaState {
    /// No row.
    Missing,
    /// Recorded, not yet in SomaBrain.
    Pending,
    /// SomaBrain has it.
    Remembered,
    /// SomaBrain refused it for good (dead-lettered).
    Refused,
}

/// The memory replica table (see the module docs).
#[derive(Debug, Clone)]
pub struct MemoryReplica {
    pool: PgPool,
    schema: String,
    table: String,
}

impl MemoryReplica {
    /// The replica in `schema` (already validated by the session event
    /// store, whose schema it shares).
    pub(crate) fn new(pool: PgPool, schema: &str) -> Self {
        Self {
            pool,
            schema: schema.to_owned(),
            table: format!("{schema}.memory_replica"),
        }
    }

    /// The table's qualified name (`<schema>.memory_replica`).
    pub fn table(&self) -> &str {
        &self.table
    }

    /// Creates the table if missing (serialized on an advisory lock, so
    /// several processes may start at once).
    pub async fn migrate(&self) -> Result<(), SessionEventsError> {
        let statements = [
            format!(
                "CREATE TABLE IF NOT EXISTS {} (
                    tenant TEXT NOT NULL,
                    namespace TEXT NOT NULL,
                    conversation_id TEXT NOT NULL,
                    message_id UUID NOT NULL,
                    user_text TEXT NOT NULL,
                    reply_text TEXT NOT NULL,
                    used_memories JSONB NOT NULL,
                    written_at TIMESTAMPTZ NOT NULL DEFAULT now(),
                    remembered_at TIMESTAMPTZ,
                    refused_at TIMESTAMPTZ,
                    PRIMARY KEY (tenant, message_id))",
                self.table
            ),
            format!(
                "CREATE INDEX IF NOT EXISTS memory_replica_pending ON {} (written_at)
                 WHERE remembered_at IS NULL AND refused_at IS NULL",
                self.table
            ),
        ];
        let lock = format!("soma-memory-replica:{}", self.schema);
        crate::schema::create_locked(&self.pool, &lock, &self.schema, &statements).await?;
        Ok(())
    }

    /// Inserts `write` in the caller's transaction `conn` (the one holding
    /// the inbox record); `false` when its `(tenant, message id)` row
    /// already exists (nothing written).
    pub async fn record(
        &self,
        conn: &mut PgConnection,
        write: &ReplicaWrite<'_>,
    ) -> Result<bool, SessionEventsError> {
        let inserted = sqlx::query(&format!(
            "INSERT INTO {} (tenant, namespace, conversation_id, message_id, user_text,
                             reply_text, used_memories)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (tenant, message_id) DO NOTHING",
            self.table
        ))
        .bind(write.tenant)
        .bind(write.namespace)
        .bind(write.conversation_id)
        .bind(write.message_id)
        .bind(write.user_text)
        .bind(write.reply_text)
        .bind(sqlx::types::Json(write.used_memories))
        .execute(conn)
        .await?
        .rows_affected();
        Ok(inserted == 1)
    }

    /// Where the write of `message_id` stands.
    pub async fn state(
        &self,
        tenant: &str,
        message_id: Uuid,
    ) -> Result<ReplicaState, SessionEventsError> {
        let row: Option<(bool, bool)> = sqlx::query_as(&format!(
            "SELECT remembered_at IS NOT NULL, refused_at IS NOT NULL FROM {}
             WHERE tenant = $1 AND message_id = $2",
            self.table
        ))
        .bind(tenant)
        .bind(message_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(match row {
            None => ReplicaState::Missing,
            Some((true, _)) => ReplicaState::Remembered,
            Some((false, true)) => ReplicaState::Refused,
            Some((false, false)) => ReplicaState::Pending,
        })
    }

    /// Moves the write of `message_id` to `to` (now): `Remembered` (kept
    /// once set), `Refused`, or back to `Pending` (a refused write replayed
    /// from the DLQ). `Missing` changes nothing.
    pub async fn mark(
        &self,
        tenant: &str,
        message_id: Uuid,
        to: ReplicaState,
    ) -> Result<(), SessionEventsError> {
        let set = match to {
            ReplicaState::Missing => return Ok(()),
            ReplicaState::Pending => "refused_at = NULL",
            ReplicaState::Remembered => "remembered_at = now(), refused_at = NULL",
            ReplicaState::Refused => "refused_at = now()",
        };
        sqlx::query(&format!(
            "UPDATE {t} SET {set}
             WHERE tenant = $1 AND message_id = $2 AND remembered_at IS NULL",
            t = self.table
        ))
        .bind(tenant)
        .bind(message_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Rows waiting for SomaBrain, and the oldest one's age.
    pub async fn lag(&self) -> Result<ReplicaLag, SessionEventsError> {
        let (pending, oldest): (i64, Option<f64>) = sqlx::query_as(&format!(
            "SELECT count(*),
                    EXTRACT(EPOCH FROM now() - min(written_at))::float8
             FROM {} WHERE remembered_at IS NULL AND refused_at IS NULL",
            self.table
        ))
        .fetch_one(&self.pool)
        .await?;
        Ok(ReplicaLag {
            pending: pending.max(0) as u64,
            oldest: Duration::from_secs_f64(oldest.unwrap_or(0.0).max(0.0)),
        })
    }
}
