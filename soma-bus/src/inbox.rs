//! Optional consumer-side dedupe on the soma-outbox [`Inbox`].

use soma_outbox::{Inbox, OutboxError};
use sqlx::PgPool;
use uuid::Uuid;

/// Drops redelivered messages a handler already processed successfully.
///
/// For each message the consumer first *checks* the inbox for
/// `(handler name, envelope id)` (a read, no transaction held), skips a
/// message already recorded (its offset is committed), runs the handler, and
/// only after the handler succeeded *records* the id in a short transaction
/// of its own. A dead-lettered message is not recorded, so a DLQ replay is
/// handled.
///
/// No transaction stays open across the handler, its retries or their
/// backoff: an open transaction with an assigned id would hold back
/// `pg_snapshot_xmin`, and with it every outbox relay in the database.
///
/// This gives **at-least-once effects with duplicates dropped**: a crash
/// between a successful handler and the record, or two deliveries of one id
/// handled at the same moment (a rebalance overlap), runs the handler twice.
/// For exactly-once database effects use [`Effects`](crate::Effects), which
/// records the id in the same transaction as the effects.
#[derive(Debug, Clone)]
pub struct InboxDedupe {
    inbox: Inbox,
    pool: PgPool,
}

impl InboxDedupe {
    /// Dedupe through `inbox` (e.g. `outbox.inbox()`) using connections from `pool`.
    pub fn new(inbox: Inbox, pool: PgPool) -> Self {
        Self { inbox, pool }
    }

    /// True when `handler` already handled `id`.
    pub(crate) async fn seen(&self, handler: &str, id: Uuid) -> Result<bool, OutboxError> {
        let mut conn = self.pool.acquire().await.map_err(OutboxError::from)?;
        self.inbox.contains(&mut conn, handler, id).await
    }

    /// Records that `handler` handled `id` (its own short transaction).
    pub(crate) async fn record(&self, handler: &str, id: Uuid) -> Result<(), OutboxError> {
        let mut conn = self.pool.acquire().await.map_err(OutboxError::from)?;
        self.inbox.record(&mut conn, handler, id).await.map(|_| ())
    }
}
