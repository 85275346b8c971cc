//! Optional consumer-side dedupe on the soma-outbox [`Inbox`].

use soma_outbox::{Inbox, OutboxError};
use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

/// Drops redelivered messages a handler already processed successfully.
///
/// For each message the consumer opens a transaction, records
/// `(handler name, envelope id)` in the inbox (a duplicate is skipped and its
/// offset committed), runs the handler, and commits the record only after the
/// handler succeeded (a dead-lettered message is not recorded, so a DLQ
/// replay is handled). Concurrent deliveries of one id serialize on the inbox
/// row. The handler's own effects are *not* inside this transaction: a crash
/// between a successful handler and the commit handles the message again.
/// For exactly-once effects, use [`Inbox::record`] inside the handler's own
/// transaction instead.
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

    /// `None` when `id` was already processed by `handler`; otherwise the
    /// open transaction holding the record (commit it after success).
    pub(crate) async fn begin(
        &self,
        handler: &str,
        id: Uuid,
    ) -> Result<Option<Transaction<'static, Postgres>>, OutboxError> {
        let mut tx = self.pool.begin().await.map_err(OutboxError::from)?;
        if self.inbox.record(&mut tx, handler, id).await? {
            Ok(Some(tx))
        } else {
            Ok(None)
        }
    }
}
