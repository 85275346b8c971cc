//! Error types.

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use crate::envelope::EnvelopeError;

/// Errors from soma-bus operations.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BusError {
    /// Invalid configuration.
    #[error("invalid bus configuration: {0}")]
    Config(String),
    /// A topic durability setting below what the deployment profile
    /// requires (e.g. replication factor 1 under `prod`).
    #[error(
        "{setting} = {value} is below the minimum of {minimum} for the `{profile}` profile: refusing to create topics that can lose acknowledged messages"
    )]
    WeakDurability {
        /// The deployment profile in force.
        profile: soma_config::DeploymentProfile,
        /// The setting (`topics.replication_factor`, `topics.min_insync_replicas`).
        setting: &'static str,
        /// Its effective value.
        value: i32,
        /// The lowest value the profile allows.
        minimum: i32,
    },
    /// The envelope is invalid.
    #[error(transparent)]
    Envelope(#[from] EnvelopeError),
    /// The broker rejected or failed the request. (librdkafka's
    /// configuration errors become [`Config`](Self::Config) instead: they
    /// carry the rejected value, which can be a credential.)
    #[error("kafka error: {0}")]
    Kafka(KafkaError),
    /// The broker did not answer in time.
    #[error("kafka did not answer within {0} ms")]
    Timeout(u64),
    /// Kafka failed and the outbox write failed too: the message was NOT accepted.
    #[error("kafka unavailable ({kafka}) and outbox write failed: {outbox}")]
    Unavailable {
        /// Why Kafka was not used.
        kafka: String,
        /// Why the outbox write failed.
        outbox: soma_outbox::OutboxError,
    },
    /// An outbox operation failed.
    #[error("outbox error: {0}")]
    Outbox(#[from] soma_outbox::OutboxError),
    /// Not sent because an earlier message of the same batch could not be enqueued.
    #[error("not sent: an earlier message of the batch failed: {0}")]
    NotSent(String),
    /// The broker's delivery report named no offset, so it does not prove
    /// the message is stored: librdkafka reports some idempotence paths
    /// (a `DUPLICATE_SEQUENCE_NUMBER` answer, a sequence error that turned
    /// fatal) as delivered without one. Treated as not acknowledged: the
    /// durable publisher keeps the message in the outbox (a duplicate, same
    /// envelope id, if the broker did store it).
    #[error("delivery not confirmed: the broker reported no offset (partition {partition})")]
    Unconfirmed {
        /// The partition the report named.
        partition: i32,
    },
    /// The component is shutting down.
    #[error("shutting down")]
    Shutdown,
}

impl BusError {
    /// True for configuration errors (including
    /// [`is_weak_durability`](Self::is_weak_durability)).
    pub fn is_config(&self) -> bool {
        matches!(self, Self::Config(_) | Self::WeakDurability { .. })
    }

    /// True when a topic durability setting is below what the deployment
    /// profile requires.
    pub fn is_weak_durability(&self) -> bool {
        matches!(self, Self::WeakDurability { .. })
    }

    /// True when the message was rejected for what it is (invalid envelope, too large):
    /// retrying the same message will fail again.
    pub fn is_permanent(&self) -> bool {
        match self {
            Self::Envelope(_) | Self::Config(_) | Self::WeakDurability { .. } => true,
            Self::Kafka(e) => is_permanent_kafka(e),
            _ => false,
        }
    }

    /// True when a dependency (Kafka and/or Postgres) is unavailable; retry later.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            Self::Unavailable { .. }
                | Self::Timeout(_)
                | Self::Outbox(_)
                | Self::NotSent(_)
                | Self::Unconfirmed { .. }
        ) || matches!(self, Self::Kafka(e) if !is_permanent_kafka(e))
    }

    /// True for timeouts.
    pub fn is_timeout(&self) -> bool {
        matches!(self, Self::Timeout(_))
    }
}

impl From<KafkaError> for BusError {
    /// A property librdkafka refuses (`KafkaError::ClientConfig`) becomes
    /// [`BusError::Config`] naming the property, its value replaced by `***`:
    /// librdkafka's own text quotes the value, and the property may be
    /// `sasl.password` or `ssl.key.pem`. Everything else stays
    /// [`BusError::Kafka`].
    fn from(e: KafkaError) -> Self {
        match e {
            KafkaError::ClientConfig(_, desc, key, value) => {
                let desc = if value.is_empty() {
                    desc
                } else {
                    desc.replace(&value, "***")
                };
                Self::Config(format!(
                    "librdkafka rejected property `{key}` (value not shown): {desc}"
                ))
            }
            other => Self::Kafka(other),
        }
    }
}

/// Errors caused by the message itself rather than by the broker being unavailable.
pub(crate) fn is_permanent_kafka(e: &KafkaError) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        e.rdkafka_error_code(),
        Some(
            C::MessageSizeTooLarge
                | C::InvalidMessageSize
                | C::InvalidMessage
                | C::InvalidRecord
                | C::TopicAuthorizationFailed
                | C::InvalidTopic
                | C::UnknownPartition
                | C::InvalidArgument
        )
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BusConfig, BusProducer};

    #[test]
    fn a_rejected_property_names_the_key_never_the_value() {
        let mut config = BusConfig::default();
        config
            .librdkafka
            .insert("security.protocol".into(), "hunter2-not-a-protocol".into());
        let err = BusProducer::new(&config).expect_err("librdkafka refuses the value");
        assert!(err.is_config(), "{err:?}");
        for shown in [err.to_string(), format!("{err:?}")] {
            assert!(shown.contains("security.protocol"), "{shown}");
            assert!(!shown.contains("hunter2"), "the value leaked: {shown}");
        }
    }

    #[test]
    fn other_kafka_errors_stay_kafka_errors() {
        let err = BusError::from(KafkaError::Canceled);
        assert!(
            matches!(err, BusError::Kafka(KafkaError::Canceled)),
            "{err:?}"
        );
    }
}
