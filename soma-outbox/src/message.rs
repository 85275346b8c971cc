//! Messages going in ([`NewMessage`]), results ([`EnqueueOutcome`]) and
//! messages coming out to the sink ([`OutboxRecord`]).

use std::collections::{BTreeMap, HashSet};

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::OutboxError;

/// A message a producer enqueues.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewMessage {
    /// Stable message id, carried to the broker so consumers can drop
    /// duplicates (soma-bus passes the envelope's UUIDv7).
    pub id: Uuid,
    /// Destination topic (Kafka rules: `[a-zA-Z0-9._-]`, 1..=249 chars, not `.` or `..`).
    pub topic: String,
    /// Ordering key: messages with the same `(topic, key)` are delivered in
    /// commit order. `None`: the message is its own order group.
    pub key: Option<String>,
    /// Opaque payload bytes.
    pub payload: Vec<u8>,
    /// Headers, passed to the sink unchanged.
    pub headers: BTreeMap<String, String>,
    /// Optional idempotency key: while a message with the same dedupe key is
    /// pending (or retained after delivery), another is not inserted and is
    /// reported as [`EnqueueOutcome::Duplicate`].
    pub dedupe_key: Option<String>,
}

impl NewMessage {
    /// A message with a fresh UUIDv7 id, no key, headers or dedupe key.
    pub fn new(topic: impl Into<String>, payload: impl Into<Vec<u8>>) -> Self {
        Self {
            id: Uuid::now_v7(),
            topic: topic.into(),
            key: None,
            payload: payload.into(),
            headers: BTreeMap::new(),
            dedupe_key: None,
        }
    }
    /// Sets the ordering key.
    pub fn with_key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }
    /// Adds a header.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }
    /// Sets the dedupe key.
    pub fn with_dedupe_key(mut self, dedupe_key: impl Into<String>) -> Self {
        self.dedupe_key = Some(dedupe_key.into());
        self
    }
}

/// What happened to one enqueued message, in the order they were given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnqueueOutcome {
    /// Written; it will be delivered once the transaction commits.
    Inserted {
        /// The message id.
        id: Uuid,
    },
    /// Not written: a message with the same dedupe key is already pending
    /// (or retained), or an earlier message of the same call had it.
    Duplicate {
        /// The id of the message that was *not* written (the caller's id).
        id: Uuid,
        /// The dedupe key that collided.
        dedupe_key: String,
    },
}

impl EnqueueOutcome {
    /// The id of the message this outcome is about.
    pub fn id(&self) -> Uuid {
        match self {
            Self::Inserted { id } | Self::Duplicate { id, .. } => *id,
        }
    }
    /// True if the message was written.
    pub fn is_inserted(&self) -> bool {
        matches!(self, Self::Inserted { .. })
    }
}

/// A message as the relay hands it to the [`Sink`](crate::Sink).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRecord {
    /// Stable message id (the producer's).
    pub id: Uuid,
    /// Destination topic.
    pub topic: String,
    /// Ordering key.
    pub key: Option<String>,
    /// Payload bytes.
    pub payload: Vec<u8>,
    /// Headers.
    pub headers: BTreeMap<String, String>,
    /// Failed attempts before this one.
    pub attempts: i32,
    /// When the producing transaction started.
    pub created_at: DateTime<Utc>,
}

/// Checks a topic name against Kafka's rules.
pub fn validate_topic(topic: &str) -> Result<(), OutboxError> {
    let reason = if topic.is_empty() {
        Some("must not be empty")
    } else if topic.len() > 249 {
        Some("must be at most 249 characters")
    } else if topic == "." || topic == ".." {
        Some("must not be \".\" or \"..\"")
    } else if !topic
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        Some("may only contain ASCII letters, digits, '.', '_' and '-'")
    } else {
        None
    };
    match reason {
        None => Ok(()),
        Some(reason) => Err(OutboxError::InvalidTopic {
            topic: topic.chars().take(300).collect(),
            reason,
        }),
    }
}

/// Longest accepted dedupe key, in bytes.
pub const MAX_DEDUPE_KEY_BYTES: usize = 1024;

/// Validates a batch before anything is written.
pub(crate) fn validate_batch(msgs: &[NewMessage], max_payload: usize) -> Result<(), OutboxError> {
    let mut ids = HashSet::with_capacity(msgs.len());
    for m in msgs {
        validate_topic(&m.topic)?;
        if m.payload.len() > max_payload {
            return Err(OutboxError::PayloadTooLarge {
                id: m.id,
                size: m.payload.len(),
                limit: max_payload,
            });
        }
        let invalid = |reason: &str| OutboxError::InvalidMessage {
            id: m.id,
            reason: reason.to_owned(),
        };
        if !ids.insert(m.id) {
            return Err(invalid("the same id appears twice in one enqueue call"));
        }
        if m.key.as_deref().is_some_and(|k| k.contains('\0')) {
            return Err(invalid("key contains a NUL character"));
        }
        if let Some(d) = &m.dedupe_key {
            if d.is_empty() || d.len() > MAX_DEDUPE_KEY_BYTES || d.contains('\0') {
                return Err(invalid(
                    "dedupe_key must be 1..=1024 bytes without NUL characters",
                ));
            }
        }
        if m.headers
            .iter()
            .any(|(k, v)| k.is_empty() || k.contains('\0') || v.contains('\0'))
        {
            return Err(invalid(
                "header names must be non-empty; names and values must not contain NUL",
            ));
        }
    }
    Ok(())
}

/// Stable 31-bit hash placing a message in a shard: FNV-1a over
/// `topic 0xFF key`, or over the id for unkeyed messages. Stored with the
/// row, so it must never change between versions.
pub(crate) fn key_hash(topic: &str, key: Option<&str>, id: &Uuid) -> i32 {
    const OFFSET: u32 = 0x811c_9dc5;
    const PRIME: u32 = 0x0100_0193;
    let mut h = OFFSET;
    let mut feed = |bytes: &[u8]| {
        for b in bytes {
            h ^= u32::from(*b);
            h = h.wrapping_mul(PRIME);
        }
    };
    match key {
        Some(k) => {
            feed(topic.as_bytes());
            feed(&[0xff]);
            feed(k.as_bytes());
        }
        None => feed(id.as_bytes()),
    }
    (h & 0x7fff_ffff) as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_rules() {
        for ok in ["a", "orders.v1", "A-b_c.9", &"x".repeat(249)] {
            validate_topic(ok).unwrap();
        }
        for bad in ["", ".", "..", "a b", "a/b", "ü", &"x".repeat(250)] {
            assert!(validate_topic(bad).unwrap_err().is_invalid_topic(), "{bad}");
        }
    }

    #[test]
    fn batch_validation() {
        let m = NewMessage::new("t", vec![0; 10]);
        validate_batch(std::slice::from_ref(&m), 10).unwrap();
        let e = validate_batch(std::slice::from_ref(&m), 9).unwrap_err();
        assert!(e.is_payload_too_large() && e.is_invalid_input());
        assert!(
            validate_batch(&[m.clone(), m.clone()], 10)
                .unwrap_err()
                .is_invalid_message()
        );
        let nul = m.clone().with_key("a\0b");
        assert!(validate_batch(&[nul], 10).unwrap_err().is_invalid_message());
        let empty_dedupe = NewMessage::new("t", vec![]).with_dedupe_key("");
        assert!(
            validate_batch(&[empty_dedupe], 10)
                .unwrap_err()
                .is_invalid_message()
        );
    }

    #[test]
    fn key_hash_is_stable_and_non_negative() {
        let id = Uuid::nil();
        // Pinned values: changing the hash would move keys between shards.
        assert_eq!(
            key_hash("t", Some("k"), &id),
            key_hash("t", Some("k"), &Uuid::max())
        );
        assert_ne!(
            key_hash("t", Some("k1"), &id),
            key_hash("t", Some("k2"), &id)
        );
        assert_ne!(
            key_hash("t1", Some("k"), &id),
            key_hash("t2", Some("k"), &id)
        );
        assert_eq!(key_hash("t", Some("k"), &id), 1_090_183_597);
        for i in 0..1000u32 {
            assert!(key_hash("t", Some(&i.to_string()), &id) >= 0);
        }
    }
}
