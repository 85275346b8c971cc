//! The consumer-side inbox: exactly-once database effects per message id.

use std::time::Duration;

use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::OutboxError;
use crate::schema::quote_ident;

/// Records which message ids a consumer has processed, in the consumer's own
/// transaction.
///
/// Delivery is at-least-once, so a consumer may see a message twice. Call
/// [`record`](Inbox::record) in the same transaction as the message's
/// database effects: it returns `true` the first time and `false` for a
/// duplicate, whose effects the consumer then skips. Because the inbox row
/// and the effects commit (or roll back) together, the effects happen exactly
/// once per `(consumer, message id)`. Two concurrent deliveries of the same
/// message serialize on the row: the second `record` waits for the first
/// transaction and returns `false` if it committed, `true` if it rolled back.
///
/// ```no_run
/// # async fn f(outbox: soma_outbox::Outbox, msg_id: uuid::Uuid) -> Result<(), Box<dyn std::error::Error>> {
/// use sqlx::Connection;
/// let inbox = outbox.inbox();
/// let mut conn = outbox.pool().acquire().await?;
/// let mut tx = conn.begin().await?;
/// if inbox.record(&mut tx, "billing", msg_id).await? {
///     // apply the message's effects with `&mut *tx`
/// }
/// tx.commit().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Inbox {
    record_sql: String,
    contains_sql: String,
    purge_sql: String,
}

impl Inbox {
    /// The inbox in `schema` (created by [`Outbox::new`](crate::Outbox::new)).
    pub fn new(schema: &str) -> Self {
        let q = quote_ident(schema);
        Self {
            record_sql: format!(
                "INSERT INTO {q}.inbox (consumer, message_id) VALUES ($1, $2)
                 ON CONFLICT DO NOTHING RETURNING true"
            ),
            contains_sql: format!(
                "SELECT EXISTS (SELECT 1 FROM {q}.inbox WHERE consumer = $1 AND message_id = $2)"
            ),
            purge_sql: format!(
                "DELETE FROM {q}.inbox WHERE processed_at < now() - $1 * interval '1 millisecond'"
            ),
        }
    }

    /// Marks `message_id` processed by `consumer` in the caller's
    /// transaction. `true`: first time, apply the effects; `false`: already
    /// processed, skip them.
    pub async fn record(
        &self,
        conn: &mut PgConnection,
        consumer: &str,
        message_id: Uuid,
    ) -> Result<bool, OutboxError> {
        if consumer.is_empty() || consumer.contains('\0') {
            return Err(OutboxError::InvalidMessage {
                id: message_id,
                reason: "inbox consumer name must be non-empty without NUL".into(),
            });
        }
        let first: Option<bool> = sqlx::query_scalar(&self.record_sql)
            .bind(consumer)
            .bind(message_id)
            .fetch_optional(&mut *conn)
            .await?;
        Ok(first.is_some())
    }

    /// Whether `consumer` already recorded `message_id` (a committed
    /// record, as `conn` sees it). A read only: for a check before the work
    /// and a [`record`](Self::record) after it, without holding a
    /// transaction (and its transaction id) open across the work.
    pub async fn contains(
        &self,
        conn: &mut PgConnection,
        consumer: &str,
        message_id: Uuid,
    ) -> Result<bool, OutboxError> {
        let seen: bool = sqlx::query_scalar(&self.contains_sql)
            .bind(consumer)
            .bind(message_id)
            .fetch_one(&mut *conn)
            .await?;
        Ok(seen)
    }

    /// Forgets entries older than `age`. A duplicate arriving after its entry
    /// was purged is processed again, so keep entries longer than any
    /// redelivery can take. Returns how many were deleted.
    pub async fn purge_older_than(&self, pool: &PgPool, age: Duration) -> Result<u64, OutboxError> {
        let r = sqlx::query(&self.purge_sql)
            .bind(age.as_millis() as i64)
            .execute(pool)
            .await?;
        Ok(r.rows_affected())
    }
}
