//! [`Effects`]: a handler's database effects and outgoing messages, exactly
//! once per incoming message id.

use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

use crate::consumer::HandlerError;
use crate::envelope::Envelope;
use crate::publisher::DurablePublisher;
use soma_outbox::Inbox;

/// Exactly-once effects for a consumer's handler.
///
/// Delivery is at-least-once, so a handler may see a message twice (a
/// redelivery after a crash or a rebalance). `Effects` makes the *effects*
/// happen once: in **one PostgreSQL transaction** it records
/// `(handler, message id)` in the soma-outbox [`Inbox`], applies the
/// handler's own writes, and writes the outgoing envelopes to the outbox
/// ([`DurablePublisher::publish_many_in_tx`]); the relay delivers them after
/// commit. A duplicate finds the inbox row and does nothing. Two concurrent
/// deliveries of one id serialize on the inbox row.
///
/// The transaction is opened only when the effects are written, not
/// across the handler's slow work (recalls, model calls): do that first,
/// then call [`commit_once`](Self::commit_once) or [`begin`](Self::begin).
///
/// ```no_run
/// # async fn f(effects: soma_bus::Effects, incoming: soma_bus::Envelope, reply: soma_bus::Envelope)
/// # -> Result<(), soma_bus::HandlerError> {
/// // Outgoing messages only:
/// effects.commit_once("billing", incoming.id, &[("billing.events", &reply)]).await?;
///
/// // With the handler's own writes in the same transaction:
/// if let Some(mut tx) = effects.begin("billing", incoming.id).await? {
///     sqlx::query("UPDATE accounts SET balance = balance - 1 WHERE id = 42")
///         .execute(tx.conn())
///         .await
///         .map_err(soma_bus::HandlerError::retryable)?;
///     tx.publish("billing.events", &reply).await?;
///     tx.commit().await?;
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Effects {
    pool: PgPool,
    inbox: Inbox,
    publisher: DurablePublisher,
}

/// One message's effects in progress: the open transaction that already
/// holds its inbox record. Dropped without [`commit`](Self::commit), it
/// rolls back and the message counts as not handled.
#[derive(Debug)]
pub struct EffectsTx<'a> {
    tx: Transaction<'static, Postgres>,
    publisher: &'a DurablePublisher,
}

impl Effects {
    /// Effects on `pool`, recording in `inbox` (e.g. `outbox.inbox()`) and
    /// publishing through `publisher`'s outbox.
    pub fn new(pool: PgPool, inbox: Inbox, publisher: DurablePublisher) -> Self {
        Self {
            pool,
            inbox,
            publisher,
        }
    }

    /// Starts the effects of message `cause` for `handler`: `None` when
    /// `handler` already handled `cause` (skip everything), otherwise the
    /// open transaction to write to. Database errors are retryable.
    pub async fn begin(
        &self,
        handler: &str,
        cause: Uuid,
    ) -> Result<Option<EffectsTx<'_>>, HandlerError> {
        let mut tx = self.pool.begin().await.map_err(HandlerError::retryable)?;
        let first = self
            .inbox
            .record(&mut tx, handler, cause)
            .await
            .map_err(HandlerError::retryable)?;
        if !first {
            tracing::debug!(event = "duplicate_skipped", handler, message_id = %cause);
            return Ok(None);
        }
        Ok(Some(EffectsTx {
            tx,
            publisher: &self.publisher,
        }))
    }

    /// In one transaction: record `cause` for `handler` in the inbox and
    /// write `out` (topic, envelope) to the outbox. Returns `false` (and
    /// writes nothing) when `handler` already handled `cause`. Database
    /// errors are retryable.
    pub async fn commit_once(
        &self,
        handler: &str,
        cause: Uuid,
        out: &[(&str, &Envelope)],
    ) -> Result<bool, HandlerError> {
        let Some(mut tx) = self.begin(handler, cause).await? else {
            return Ok(false);
        };
        tx.publish_all(out).await?;
        tx.commit().await?;
        Ok(true)
    }
}

impl EffectsTx<'_> {
    /// The transaction, for the handler's own writes.
    pub fn conn(&mut self) -> &mut sqlx::PgConnection {
        &mut self.tx
    }

    /// Writes `env` for `topic` to the outbox in this transaction.
    pub async fn publish(&mut self, topic: &str, env: &Envelope) -> Result<(), HandlerError> {
        self.publish_all(&[(topic, env)]).await
    }

    /// Writes every `(topic, envelope)` of `out` to the outbox in this
    /// transaction with one statement, in order (a reply of several events
    /// costs one round trip, not one per event).
    pub async fn publish_all(&mut self, out: &[(&str, &Envelope)]) -> Result<(), HandlerError> {
        self.publisher
            .publish_many_in_tx(&mut self.tx, out)
            .await
            .map(|_| ())
            .map_err(HandlerError::retryable)
    }

    /// Commits the inbox record, the handler's writes and the outgoing
    /// messages together.
    pub async fn commit(self) -> Result<(), HandlerError> {
        self.tx.commit().await.map_err(HandlerError::retryable)
    }
}
