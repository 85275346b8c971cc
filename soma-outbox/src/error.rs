//! The crate's error type.

use uuid::Uuid;

/// Everything that can go wrong in soma-outbox.
///
/// Branch on the `is_*()` predicates rather than on the message text.
/// Validation errors (`is_invalid_input()`) are returned before anything is
/// written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OutboxError {
    /// A payload exceeds [`OutboxConfig::max_payload_bytes`](crate::OutboxConfig::max_payload_bytes).
    #[error("payload of message {id} is {size} bytes, over the {limit}-byte limit")]
    PayloadTooLarge {
        /// The message id.
        id: Uuid,
        /// The payload size in bytes.
        size: usize,
        /// The configured limit in bytes.
        limit: usize,
    },
    /// A topic name breaks the Kafka naming rules.
    #[error("invalid topic name {topic:?}: {reason}")]
    InvalidTopic {
        /// The offending topic name (truncated to 300 characters).
        topic: String,
        /// Which rule it breaks.
        reason: &'static str,
    },
    /// A message is malformed in another way (duplicate id in one batch, NUL
    /// characters in text fields, empty or over-long dedupe key).
    #[error("invalid message {id}: {reason}")]
    InvalidMessage {
        /// The message id.
        id: Uuid,
        /// What is wrong with it.
        reason: String,
    },
    /// A message with one of the ids is already in the outbox (pending or
    /// retained): the same message was enqueued before. Nothing of this
    /// call was written.
    #[error("a message with one of these ids is already in the outbox: {detail}")]
    DuplicateId {
        /// PostgreSQL's detail naming the id.
        detail: String,
    },
    /// A configuration value is out of range or malformed.
    #[error("invalid soma-outbox configuration: {0}")]
    InvalidConfig(String),
    /// PostgreSQL returned an error or could not be reached.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// The schema in the database does not match the migrations of this
    /// version of the crate.
    #[error("migration {version} ({name}): {reason}")]
    Migration {
        /// Migration version.
        version: i32,
        /// Migration name.
        name: &'static str,
        /// What went wrong.
        reason: String,
    },
    /// No dead letter with this id exists.
    #[error("no dead letter with id {id}")]
    NotFound {
        /// The id looked up.
        id: Uuid,
    },
    /// A dead letter was already requeued the maximum number of times.
    #[error("message {id} was already replayed {replays} times (limit {limit})")]
    ReplayLimit {
        /// The message id.
        id: Uuid,
        /// Replays so far.
        replays: i32,
        /// The configured limit.
        limit: u32,
    },
    /// Requeueing would collide with a pending message with the same id or
    /// dedupe key.
    #[error("message {id} cannot be requeued: {reason}")]
    Conflict {
        /// The message id.
        id: Uuid,
        /// What it collides with.
        reason: String,
    },
    /// Relays sharing this schema are running with a different shard count.
    #[error(
        "relay configured with {configured} shards but running relays of this schema use {active}; \
         stop them all before changing the shard count"
    )]
    ShardCountMismatch {
        /// Shards in this relay's configuration.
        configured: u32,
        /// Shards recorded by the running relays.
        active: u32,
    },
    /// The relay task failed (panicked or was aborted).
    #[error("relay task failed: {0}")]
    Relay(String),
}

impl OutboxError {
    /// A payload was over the size limit.
    pub fn is_payload_too_large(&self) -> bool {
        matches!(self, Self::PayloadTooLarge { .. })
    }
    /// A topic name was invalid.
    pub fn is_invalid_topic(&self) -> bool {
        matches!(self, Self::InvalidTopic { .. })
    }
    /// A message was malformed (other than size and topic).
    pub fn is_invalid_message(&self) -> bool {
        matches!(self, Self::InvalidMessage { .. })
    }
    /// The same message id was enqueued before.
    pub fn is_duplicate_id(&self) -> bool {
        matches!(self, Self::DuplicateId { .. })
    }
    /// Any validation error: nothing was written, fix the input.
    pub fn is_invalid_input(&self) -> bool {
        self.is_payload_too_large() || self.is_invalid_topic() || self.is_invalid_message()
    }
    /// A configuration value was rejected.
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            Self::InvalidConfig(_) | Self::ShardCountMismatch { .. }
        )
    }
    /// The database returned an error or was unreachable.
    pub fn is_database(&self) -> bool {
        matches!(self, Self::Database(_))
    }
    /// The database could not be reached (connection refused or lost, pool
    /// exhausted or closed). Retrying later may succeed.
    pub fn is_unavailable(&self) -> bool {
        match self {
            Self::Database(e) => matches!(
                e,
                sqlx::Error::Io(_)
                    | sqlx::Error::Tls(_)
                    | sqlx::Error::PoolTimedOut
                    | sqlx::Error::PoolClosed
                    | sqlx::Error::WorkerCrashed
            ),
            _ => false,
        }
    }
    /// A migration failed or the schema was changed by hand.
    pub fn is_migration(&self) -> bool {
        matches!(self, Self::Migration { .. })
    }
    /// The dead letter did not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::NotFound { .. })
    }
    /// The replay-count guard refused a requeue.
    pub fn is_replay_limit(&self) -> bool {
        matches!(self, Self::ReplayLimit { .. })
    }
    /// A requeue collided with a pending message.
    pub fn is_conflict(&self) -> bool {
        matches!(self, Self::Conflict { .. })
    }
    /// Relays disagree on the shard count.
    pub fn is_shard_count_mismatch(&self) -> bool {
        matches!(self, Self::ShardCountMismatch { .. })
    }
}
