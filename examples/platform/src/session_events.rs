//! The session event store: every reply event of a conversation, numbered,
//! kept for a bounded time so an SSE client can resume with
//! `Last-Event-ID` on any gateway.
//!
//! **Who writes.** The worker that produces the events (conversation worker,
//! tool executor) writes them here in the **same PostgreSQL transaction** as
//! its inbox record and its outbox records ([`commit_reply`]). So an event
//! is stored exactly once per handled message (a redelivery finds the inbox
//! row and writes nothing), it is on the bus only if it is in the store, and
//! its number is known before it is published: the number travels in the
//! event itself ([`ChatEvent::event_id`]), and every gateway uses it as the
//! SSE `id`. No gateway writes the store, so gateways cannot fork the
//! sequence, and a number means the same on every gateway and across
//! restarts.
//!
//! **Numbering.** Per `(tenant, conversation)`, dense from 1: a head row per
//! conversation is incremented in the writing transaction (its row lock
//! serializes two writers of one conversation, e.g. two workers during a
//! rebalance), so numbers never repeat and never skip. Retention never
//! touches the head row, so numbering continues after old events are
//! pruned.
//!
//! **Retention.** [`SessionEvents::prune`] (run on a timer by the
//! conversation worker, off the request and handling paths) deletes an
//! event when it is older than `chat.session_events_max_age_secs` **or**
//! beyond the newest `chat.session_events_max_per_conversation` of its
//! conversation.

use std::time::Duration;

use soma_bus::{Effects, Envelope, HandlerError};
use soma_observability::shutdown::Shutdown;
use sqlx::{PgConnection, PgPool};

use crate::protocol::{self, ChatEvent};

/// Why the session event store failed.
#[derive(Debug, thiserror::Error)]
pub enum SessionEventsError {
    /// The configured schema is not a plain identifier.
    #[error("invalid session events schema {0:?}: use [a-z0-9_], starting with a letter")]
    InvalidSchema(String),
    /// PostgreSQL failed or is unreachable.
    #[error("session event store: {0}")]
    Database(#[from] sqlx::Error),
    /// A stored event did not decode.
    #[error("undecodable stored session event: {0}")]
    Decode(#[from] serde_json::Error),
}

impl SessionEventsError {
    /// Whether PostgreSQL was unavailable or failed (retrying later may work).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, SessionEventsError::Database(_))
    }

    /// Whether the configuration is wrong (fix it; retrying does not help).
    pub fn is_config(&self) -> bool {
        matches!(self, SessionEventsError::InvalidSchema(_))
    }
}

/// What the store holds for one conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// The oldest kept event's number; `None` when none is kept.
    pub oldest: Option<u64>,
    /// The newest number ever given out (0: none yet). Kept after pruning.
    pub head: u64,
}

/// The session event store in one PostgreSQL schema (see the module docs).
#[derive(Debug, Clone)]
pub struct SessionEvents {
    pool: PgPool,
    heads: String,
    events: String,
    schema: String,
}

impl SessionEvents {
    /// The store in `schema` on `pool` (call [`migrate`](Self::migrate)
    /// once before use).
    pub fn new(pool: PgPool, schema: &str) -> Result<Self, SessionEventsError> {
        let valid = schema.len() <= 48
            && schema.starts_with(|c: char| c.is_ascii_lowercase())
            && schema
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !valid {
            return Err(SessionEventsError::InvalidSchema(schema.to_owned()));
        }
        Ok(Self {
            pool,
            heads: format!("{schema}.session_heads"),
            events: format!("{schema}.session_events"),
            schema: schema.to_owned(),
        })
    }

    /// The conversation ownership store in the same schema.
    pub fn conversations(&self) -> crate::conversations::Conversations {
        crate::conversations::Conversations::new(self.pool.clone(), &self.schema)
    }

    /// The memory replicator's replica of memory writes in the same schema.
    pub fn memory_replica(&self) -> crate::memory_replica::MemoryReplica {
        crate::memory_replica::MemoryReplica::new(self.pool.clone(), &self.schema)
    }

    /// Creates the schema and tables if missing (safe to run from several
    /// processes at once: serialized on an advisory lock).
    pub async fn migrate(&self) -> Result<(), SessionEventsError> {
        let statements = [
            format!(
                "CREATE TABLE IF NOT EXISTS {} (
                    tenant TEXT NOT NULL,
                    conversation_id TEXT NOT NULL,
                    last_seq BIGINT NOT NULL,
                    PRIMARY KEY (tenant, conversation_id))",
                self.heads
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {} (
                    tenant TEXT NOT NULL,
                    conversation_id TEXT NOT NULL,
                    seq BIGINT NOT NULL,
                    event JSONB NOT NULL,
                    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
                    PRIMARY KEY (tenant, conversation_id, seq))",
                self.events
            ),
            format!(
                "CREATE INDEX IF NOT EXISTS session_events_created_at ON {} (created_at)",
                self.events
            ),
        ];
        let lock = format!("soma-session-events:{}", self.schema);
        crate::schema::create_locked(&self.pool, &lock, &self.schema, &statements).await?;
        Ok(())
    }

    /// Numbers `events` (all of one conversation of `tenant`) with the
    /// conversation's next numbers, setting each [`ChatEvent::event_id`],
    /// and stores them, in the caller's transaction `conn`.
    pub async fn append(
        &self,
        conn: &mut PgConnection,
        tenant: &str,
        conversation_id: &str,
        events: &mut [ChatEvent],
    ) -> Result<(), SessionEventsError> {
        if events.is_empty() {
            return Ok(());
        }
        let n = events.len() as i64;
        let (last,): (i64,) = sqlx::query_as(&format!(
            "INSERT INTO {h} (tenant, conversation_id, last_seq) VALUES ($1, $2, $3)
             ON CONFLICT (tenant, conversation_id)
             DO UPDATE SET last_seq = {h}.last_seq + EXCLUDED.last_seq
             RETURNING last_seq",
            h = self.heads
        ))
        .bind(tenant)
        .bind(conversation_id)
        .bind(n)
        .fetch_one(&mut *conn)
        .await?;
        let first = (last - n + 1) as u64;
        let mut seqs = Vec::with_capacity(events.len());
        let mut bodies = Vec::with_capacity(events.len());
        for (i, e) in events.iter_mut().enumerate() {
            e.event_id = first + i as u64;
            seqs.push(e.event_id as i64);
            bodies.push(sqlx::types::Json(&*e));
        }
        // One statement for the whole reply (one round trip, not one per event).
        sqlx::query(&format!(
            "INSERT INTO {} (tenant, conversation_id, seq, event)
             SELECT $1, $2, s, e FROM UNNEST($3::bigint[], $4::jsonb[]) AS t(s, e)",
            self.events
        ))
        .bind(tenant)
        .bind(conversation_id)
        .bind(&seqs)
        .bind(&bodies)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }

    /// Up to `limit` stored events of the conversation numbered after
    /// `after`, in order.
    pub async fn after(
        &self,
        tenant: &str,
        conversation_id: &str,
        after: u64,
        limit: u32,
    ) -> Result<Vec<ChatEvent>, SessionEventsError> {
        let rows: Vec<(sqlx::types::Json<ChatEvent>,)> = sqlx::query_as(&format!(
            "SELECT event FROM {} WHERE tenant = $1 AND conversation_id = $2 AND seq > $3
             ORDER BY seq LIMIT $4",
            self.events
        ))
        .bind(tenant)
        .bind(conversation_id)
        .bind(after.min(i64::MAX as u64) as i64)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|(e,)| e.0).collect())
    }

    /// The oldest kept and the newest given-out number of the conversation.
    pub async fn bounds(
        &self,
        tenant: &str,
        conversation_id: &str,
    ) -> Result<Bounds, SessionEventsError> {
        let (oldest, head): (Option<i64>, Option<i64>) = sqlx::query_as(&format!(
            "SELECT (SELECT min(seq) FROM {e} WHERE tenant = $1 AND conversation_id = $2),
                    (SELECT last_seq FROM {h} WHERE tenant = $1 AND conversation_id = $2)",
            e = self.events,
            h = self.heads
        ))
        .bind(tenant)
        .bind(conversation_id)
        .fetch_one(&self.pool)
        .await?;
        Ok(Bounds {
            oldest: oldest.map(|v| v as u64),
            head: head.unwrap_or(0) as u64,
        })
    }

    /// Deletes events older than `max_age` or beyond the newest
    /// `keep_per_conversation` of their conversation; returns how many.
    pub async fn prune(
        &self,
        keep_per_conversation: u64,
        max_age: Duration,
    ) -> Result<u64, SessionEventsError> {
        let by_age = sqlx::query(&format!(
            "DELETE FROM {} WHERE created_at < now() - make_interval(secs => $1)",
            self.events
        ))
        .bind(max_age.as_secs_f64())
        .execute(&self.pool)
        .await?
        .rows_affected();
        let by_count = sqlx::query(&format!(
            "DELETE FROM {e} USING {h}
             WHERE {e}.tenant = {h}.tenant AND {e}.conversation_id = {h}.conversation_id
               AND {e}.seq <= {h}.last_seq - $1",
            e = self.events,
            h = self.heads
        ))
        .bind(keep_per_conversation.min(i64::MAX as u64) as i64)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(by_age + by_count)
    }

    /// Runs [`prune`](Self::prune) every `interval` until `lifecycle`
    /// starts draining. A failed prune is logged and retried next time
    /// (events are kept longer meanwhile; nothing else is affected).
    pub fn spawn_pruner(
        self,
        lifecycle: &Shutdown,
        interval: Duration,
        keep_per_conversation: u64,
        max_age: Duration,
    ) -> tokio::task::JoinHandle<()> {
        let draining = lifecycle.draining();
        tokio::spawn(async move {
            tokio::pin!(draining);
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = &mut draining => break,
                    _ = tick.tick() => {}
                }
                match self.prune(keep_per_conversation, max_age).await {
                    Ok(n) if n > 0 => tracing::debug!(event = "session_events_pruned", deleted = n),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(event = "session_events_prune_failed", error = %e),
                }
            }
        })
    }
}

/// In one transaction (see [`Effects::begin`]): records `cause` for
/// `handler` in the inbox, numbers and stores `events` (all of one
/// conversation of `cause`'s tenant), writes them to the outbox for
/// `events_topic` (carrying their numbers) and `also` for their topics.
/// `false` (nothing written) when `handler` already handled `cause`.
pub async fn commit_reply(
    effects: &Effects,
    store: &SessionEvents,
    handler: &str,
    cause: &Envelope,
    events_topic: &str,
    mut events: Vec<ChatEvent>,
    also: &[(&str, &Envelope)],
) -> Result<bool, HandlerError> {
    let Some(mut tx) = effects.begin(handler, cause.id).await? else {
        return Ok(false);
    };
    if let Some(conversation) = events.first().map(|e| e.conversation_id.clone()) {
        store
            .append(tx.conn(), &cause.tenant, &conversation, &mut events)
            .await
            .map_err(HandlerError::retryable)?;
    }
    let envelopes = events
        .iter()
        .map(|e| protocol::event_envelope(cause, e))
        .collect::<Result<Vec<_>, _>>()
        .map_err(HandlerError::fatal)?;
    let out: Vec<(&str, &Envelope)> = envelopes
        .iter()
        .map(|env| (events_topic, env))
        .chain(also.iter().map(|(topic, env)| (*topic, *env)))
        .collect();
    tx.publish_all(&out).await?;
    tx.commit().await?;
    Ok(true)
}
