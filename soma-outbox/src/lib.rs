//! A PostgreSQL transactional outbox with an ordered, sharded relay, dead
//! letters and an inbox.
//!
//! # Why
//!
//! When a message must commit atomically with business data, or the broker
//! is down, it goes to the outbox: a table written in the same transaction
//! as the data. A relay drains it to the broker. The outbox this replaces
//! lost ordering (no message keys; serial ids are not commit-ordered), left
//! rows stuck in `sending` after a crash and never purged sent rows. This
//! crate fixes each of those, and says exactly what it guarantees.
//!
//! # Guarantees
//!
//! **At-least-once delivery; order preserved per message key across retries,
//! crashes, relay restarts and several relays; a duplicate is possible only
//! when a relay dies between the broker's ack and its own commit, and every
//! message carries a stable id so consumers can drop it.**
//!
//! In detail:
//!
//! * A message key is `(topic, key)`. Messages without a key are each their
//!   own order group (no order between them).
//! * A message is accepted when [`Outbox::enqueue`]'s transaction commits
//!   ([`Outbox::enqueue_standalone`]: when it returns `Ok`). From then on it
//!   is kept in PostgreSQL until the sink reports it delivered and the relay
//!   commits that, or until it is dead-lettered. Nothing accepted is dropped
//!   while the broker or the relay is down: messages wait in the table, the
//!   `soma_outbox_pending` gauge grows, and the [`OutboxHealthCheck`] turns
//!   degraded once the oldest is older than the threshold.
//! * A failed message blocks later messages of its key until it succeeds
//!   or is dead-lettered, and never blocks other keys.
//! * **An outage is not an attempt.** When the sink is unavailable
//!   ([`SinkOutcome::Unavailable`]: broker down, timeout, transport error)
//!   the relay backs off as a whole and probes with one message at a time;
//!   no message's attempt count changes, so no outage, however long,
//!   dead-letters anything (unless the opt-in
//!   [`RelayConfig::dead_letter_after_secs`] is set).
//! * Dead-lettering (after [`RelayConfig::max_attempts`] failed attempts, or
//!   at once on [`SinkOutcome::Reject`]) never lets a later message of the
//!   key overtake silently: by default ([`DeadLetterOrder::BlockKey`]) the
//!   key waits until an operator requeues the dead letter (delivered first,
//!   in its original place) or purges it. [`DeadLetterOrder::ReleaseKey`]
//!   is the explicit choice to let the key proceed without it.
//! * Invalid input (payload over [`OutboxConfig::max_payload_bytes`],
//!   invalid topic name, malformed message) is rejected with a typed error
//!   before anything is written.
//! * With the [`Inbox`], a consumer's database effects happen exactly once
//!   per message id.
//!
//! # Commit order
//!
//! SERIAL or identity values are handed out when a row is *inserted*, not
//! when its transaction *commits*: transaction A may take id 10, B id 11, B
//! commits first, and a relay that has moved past 11 skips 10 forever (or,
//! without a cursor, publishes 11 before 10). Every row here records the
//! 64-bit id of its transaction (`txid xid8 DEFAULT pg_current_xact_id()`)
//! plus a per-row sequence for order inside the transaction. The relay only
//! claims rows with `txid < pg_snapshot_xmin(pg_current_snapshot())`: every
//! transaction below its snapshot's xmin has finished (committed or rolled
//! back), so **no row can ever appear later with a smaller `(txid, seq)`
//! than a row already claimed**. The claimable set only grows at its end, and
//! the relay delivers it in `(txid, seq)` order, which for each key is the
//! order producers committed (a transaction that starts after another one
//! committed gets a larger txid). A transaction that commits late is held
//! back, never skipped nor reordered. This is watermill-sql's approach.
//!
//! Precisely: for one key, messages go out in the order of their
//! transactions' ids, and within a transaction in enqueue order. PostgreSQL
//! assigns a transaction its id at its first write (a row lock with
//! `SELECT ... FOR UPDATE` counts). So a transaction that begins after
//! another committed is always later; of two transactions that overlap in
//! time and write the same key, the one that wrote anything first goes
//! first, even if it commits second (it then holds the other back until it
//! finishes). Producers that serialize on a business row by locking it as
//! their first write get exactly their lock order.
//!
//! Cost: while any transaction with an assigned xid is open in the cluster,
//! rows of later transactions wait for it. Keep write transactions short; a
//! long one shows up as `soma_outbox_oldest_pending_age_seconds` and a
//! degraded health component, never as loss or disorder.
//!
//! # Claims and crashes
//!
//! There is no "sending" state to get stuck in. A relay claims a batch with
//! `SELECT ... ORDER BY txid, seq LIMIT n FOR UPDATE` inside a transaction,
//! publishes the batch through the [`Sink`] while that transaction is open,
//! then deletes (or marks sent) the delivered rows, reschedules failed ones
//! and dead-letters exhausted ones, and commits. If the relay dies anywhere
//! before the commit, PostgreSQL rolls the transaction back and the rows are
//! exactly as before — claimable again. Only a death after the broker's ack
//! and before the commit causes a re-publish: the duplicate case above. The
//! relay's session sets `idle_in_transaction_session_timeout` and TCP
//! keepalives so the server also ends the session of a relay that hangs or
//! vanishes from the network.
//!
//! # Retries and per-key blocking
//!
//! A failed attempt sets `available_at` to now plus an exponential backoff
//! with full jitter (uniform in `[0, min(backoff_max, backoff_base * 2^(n-1))]`)
//! and appends the error to the row's history. The claim query skips a
//! keyed row if an earlier row of the same key has failed and is waiting
//! for its retry (a small partial index holds only rows that failed at
//! least once, so this check costs one tiny index probe per row), so a
//! failing message holds back its own key only. Later records of that key
//! that were in the same batch are left untouched (not counted as attempts)
//! and wait. After `max_attempts`, the row moves to the dead-letter table
//! with its error history and its `(txid, seq)` place, in the same
//! transaction. A message the sink [rejects](SinkOutcome::Reject) is
//! dead-lettered at once. With [`DeadLetterOrder::BlockKey`] the claim also
//! skips keyed rows that have an earlier row of their key in the dead-letter
//! table (an index probe on `dead_letters (topic, key, txid, seq)`).
//!
//! An [unavailable](SinkOutcome::Unavailable) sink is different: nothing
//! about the record changes; the relay waits
//! ([`RelayConfig::unavailable_backoff_initial_ms`] doubling, with jitter,
//! up to [`RelayConfig::unavailable_backoff_max_ms`]) and then claims a
//! batch of one record as a probe, returning to full batches once the sink
//! delivers again. While it waits, [`Relay::health`]'s component
//! `outbox_relay` is degraded and the gauge
//! `soma_outbox_relay_sink_unavailable` is 1.
//!
//! # Operations
//!
//! * [`Outbox::dead_letters`] lists dead letters with their error history;
//!   [`Outbox::requeue_dead_letter`] moves one back (at most
//!   [`OutboxConfig::max_replays`] times per message);
//!   [`Outbox::purge_dead_letters`] deletes them.
//! * Delivered messages are deleted, or with
//!   [`RelayConfig::retention_secs`] kept (marked sent, still deduplicating)
//!   and purged by the relay once older.
//! * [`Relay::metrics`] registers [`OutboxMetrics`], which exports
//!   `soma_outbox_pending`, `soma_outbox_oldest_pending_age_seconds`, the
//!   published / failed / dead-lettered totals and the relay batch duration;
//!   [`Relay::health`] reports the relay's component `outbox_relay`, and
//!   [`OutboxHealthCheck`] the outbox's backlog (component `outbox`).
//!
//! # Under pressure
//!
//! The outbox table is the buffer: it is unbounded and durable. While the
//! broker or every relay is down, accepted messages wait there (nothing in
//! memory, nothing dropped); producers are never slowed by it. The backlog
//! shows in `soma_outbox_pending`, its age in
//! `soma_outbox_oldest_pending_age_seconds`, and the health component turns
//! degraded past [`OutboxConfig::health_max_pending_age_secs`]. When
//! PostgreSQL itself is down, `enqueue` fails with an error for which
//! [`OutboxError::is_unavailable`] is true and nothing is accepted.
//!
//! # Scale-out
//!
//! Keys hash (FNV-1a, stored with the row) into [`RelayConfig::shards`]
//! shards. A relay owns a shard by holding a session-level
//! `pg_try_advisory_lock` on **the same connection its claim transactions
//! run on**, and claims only rows of shards it owns. So a relay can never
//! claim a shard it does not hold, and when its connection ends (crash,
//! kill, network loss detected by keepalive) its locks and its open batch go
//! together. Live relays are counted through their membership locks in
//! `pg_locks`; every [`RelayConfig::rebalance_interval_ms`] each relay
//! releases shards above `ceil(shards / relays)` between batches and takes
//! free ones up to it, so a dead relay's shards are taken over within about
//! one rebalance interval (1 s by default). Two relays never publish the same
//! shard at once, so without a crash there are no duplicates. All relays of
//! a schema must agree on the shard count; one that disagrees with running
//! relays stops with [`OutboxError::ShardCountMismatch`].
//!
//! # Wake-up
//!
//! An `AFTER INSERT` statement trigger sends `NOTIFY` on commit; relays
//! `LISTEN` and wake at once, poll quickly for a moment after a wake-up (in
//! case an older transaction is still open), and otherwise poll every
//! [`RelayConfig::poll_interval_ms`] (lost notifications, expired
//! backoffs).
//!
//! # Example
//!
//! ```no_run
//! use soma_outbox::{NewMessage, Outbox, OutboxConfig, OutboxRecord, Relay, RelayConfig, Sink, SinkOutcome};
//! use sqlx::Connection;
//!
//! struct Print;
//! #[async_trait::async_trait]
//! impl Sink for Print {
//!     async fn send_batch(&self, batch: &[OutboxRecord]) -> Vec<SinkOutcome> {
//!         batch.iter().map(|r| { println!("{} {:?}", r.topic, r.key); SinkOutcome::Delivered }).collect()
//!     }
//! }
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let pool = sqlx::PgPool::connect("postgres://postgres@127.0.0.1:5432/test").await?;
//! let outbox = Outbox::new(pool.clone(), OutboxConfig::default()).await?;
//!
//! // In the business transaction:
//! let mut tx = pool.begin().await?;
//! // ... business writes with &mut *tx ...
//! outbox.enqueue(&mut *tx, &[NewMessage::new("orders", b"{}".to_vec()).with_key("order-42")]).await?;
//! tx.commit().await?;
//!
//! let relay = Relay::new(outbox.clone(), Print, RelayConfig::default()).spawn();
//! // ...
//! relay.shutdown().await?; // finishes the in-flight batch
//! # Ok(()) }
//! ```
#![cfg_attr(docsrs, feature(doc_cfg))]

mod config;
mod error;
mod inbox;
mod message;
mod metrics;
mod outbox;
mod relay;
mod schema;
mod sink;

pub use config::{DeadLetterOrder, OutboxConfig, RelayConfig};
pub use error::OutboxError;
pub use inbox::Inbox;
pub use message::{EnqueueOutcome, MAX_DEDUPE_KEY_BYTES, NewMessage, OutboxRecord, validate_topic};
pub use metrics::{OutboxHealthCheck, OutboxMetrics};
pub use outbox::{DeadLetter, Outbox, OutboxStats};
pub use relay::{Relay, RelayCounters, RelayHandle};
pub use sink::{Sink, SinkOutcome};

/// The README's examples, compiled as doctests so they cannot drift.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
