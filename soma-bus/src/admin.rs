//! Topic administration and the broker health check.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;
use soma_observability::health::{
    CheckOptions, CheckOutcome, Criticality, HealthCheck, HealthRegistry,
};

use crate::config::BusConfig;
use crate::error::BusError;

/// Creates topics (and their DLQs) and reads broker metadata; reports the
/// broker's health with [`TopicAdmin::health`]. Cheap to clone.
#[derive(Clone)]
pub struct TopicAdmin {
    client: Arc<AdminClient<DefaultClientContext>>,
    config: BusConfig,
}

impl std::fmt::Debug for TopicAdmin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TopicAdmin")
            .field("bootstrap_servers", &self.config.bootstrap_servers)
            .finish()
    }
}

/// Partition count of each topic, as the broker reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicInfo {
    /// Topic name.
    pub name: String,
    /// Number of partitions.
    pub partitions: usize,
}

impl TopicAdmin {
    /// An admin client for the configured cluster.
    pub fn new(config: &BusConfig) -> Result<Self, BusError> {
        config.validate()?;
        config.warn_deprecated_keys();
        let client: AdminClient<DefaultClientContext> = config.base_client_config().create()?;
        Ok(Self {
            client: Arc::new(client),
            config: config.clone(),
        })
    }

    /// Ensures each topic exists with `topics.partitions` partitions, the
    /// profile's [replication factor](BusConfig::replication_factor) and
    /// [`min.insync.replicas`](BusConfig::min_insync_replicas) (existing
    /// topics are left as they are). With `with_dlq`, also
    /// `<topic><dlq_suffix>` for each, with the same durability.
    pub async fn ensure_topics(&self, topics: &[&str], with_dlq: bool) -> Result<(), BusError> {
        let mut names: Vec<String> = topics.iter().map(|t| (*t).to_owned()).collect();
        if with_dlq {
            names.extend(topics.iter().map(|t| self.config.dlq_topic(t)));
        }
        let min_isr = self.config.min_insync_replicas().map(|m| m.to_string());
        let new = new_topics(&self.config, &names, min_isr.as_deref());
        let opts = AdminOptions::new().operation_timeout(Some(self.config.admin_timeout()));
        let fut = self.client.create_topics(new.iter(), &opts);
        let results =
            tokio::time::timeout(self.config.admin_timeout() + Duration::from_secs(1), fut)
                .await
                .map_err(|_| BusError::Timeout(self.config.topics.admin_timeout_ms))??;
        for r in results {
            match r {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => {
                    return Err(BusError::Kafka(rdkafka::error::KafkaError::AdminOp(code)))
                        .inspect_err(|_| {
                            tracing::error!(event = "create_topic_failed", topic, ?code)
                        });
                }
            }
        }
        Ok(())
    }

    /// Deletes topics (tests and tooling); missing topics are ignored.
    pub async fn delete_topics(&self, topics: &[&str]) -> Result<(), BusError> {
        let opts = AdminOptions::new().operation_timeout(Some(self.config.admin_timeout()));
        let results = self.client.delete_topics(topics, &opts).await?;
        for r in results {
            match r {
                Ok(_) | Err((_, RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
                Err((_, code)) => {
                    return Err(BusError::Kafka(rdkafka::error::KafkaError::AdminOp(code)));
                }
            }
        }
        Ok(())
    }

    /// Broker metadata for `topic` (or all topics), within `topics.admin_timeout_ms`.
    pub async fn describe(&self, topic: Option<&str>) -> Result<Vec<TopicInfo>, BusError> {
        let client = self.client.clone();
        let timeout = self.config.admin_timeout();
        let topic = topic.map(str::to_owned);
        let md = tokio::task::spawn_blocking(move || {
            client.inner().fetch_metadata(topic.as_deref(), timeout)
        })
        .await
        .map_err(|_| BusError::Shutdown)??;
        Ok(md
            .topics()
            .iter()
            .filter(|t| t.error().is_none())
            .map(|t| TopicInfo {
                name: t.name().to_owned(),
                partitions: t.partitions().len(),
            })
            .collect())
    }

    /// A health check that fetches broker metadata within `topics.admin_timeout_ms`.
    pub fn health_check(&self) -> BrokerHealthCheck {
        BrokerHealthCheck {
            admin: self.clone(),
        }
    }

    /// Reports the component `kafka` (required) in `registry`: the
    /// [broker check](Self::health_check) runs in the background every
    /// [`health_interval_ms`](BusConfig::health_interval_ms), within
    /// [`topics.admin_timeout_ms`](crate::TopicsConfig::admin_timeout_ms). Must be called
    /// within a tokio runtime.
    ///
    /// A service that only publishes (its messages wait in the outbox while
    /// Kafka is down) may prefer to register [`Self::health_check`] itself
    /// as [`Criticality::Optional`].
    pub fn health(self, registry: &HealthRegistry) -> Self {
        let interval = Duration::from_millis(self.config.health_interval_ms.max(100));
        self.register_check(registry, interval);
        self
    }

    /// Registers [`Self::health_check`] as component `kafka` (required), every `interval`.
    #[deprecated(
        since = "0.2.0",
        note = "use `TopicAdmin::health(&HealthRegistry)`, with the interval in `BusConfig::health_interval_ms`"
    )]
    pub fn register_health(&self, health: &HealthRegistry, interval: Duration) {
        self.register_check(health, interval);
    }

    fn register_check(&self, registry: &HealthRegistry, interval: Duration) {
        registry.register_check(
            "kafka",
            Criticality::Required,
            self.health_check(),
            CheckOptions::new(
                interval,
                self.config.admin_timeout() + Duration::from_millis(500),
            ),
        );
    }
}

/// The creation requests for `names` under `config`'s durability.
fn new_topics<'a>(
    config: &BusConfig,
    names: &'a [String],
    min_isr: Option<&'a str>,
) -> Vec<NewTopic<'a>> {
    names
        .iter()
        .map(|n| {
            let topic = NewTopic::new(
                n,
                config.topics.partitions,
                TopicReplication::Fixed(config.replication_factor()),
            );
            match min_isr {
                Some(m) => topic.set("min.insync.replicas", m),
                None => topic,
            }
        })
        .collect()
}

/// Checks that the broker answers a metadata request in time.
#[derive(Debug, Clone)]
pub struct BrokerHealthCheck {
    admin: TopicAdmin,
}

#[async_trait::async_trait]
impl HealthCheck for BrokerHealthCheck {
    async fn check(&self) -> CheckOutcome {
        let client = self.admin.client.clone();
        let timeout = self.admin.config.admin_timeout();
        let r = tokio::task::spawn_blocking(move || {
            client
                .inner()
                .fetch_metadata(None, timeout)
                .map(|m| m.brokers().len())
        })
        .await;
        match r {
            Ok(Ok(n)) if n > 0 => CheckOutcome::up().with_gauge("brokers", n as f64),
            Ok(Ok(_)) => CheckOutcome::down("metadata lists no brokers"),
            Ok(Err(e)) => CheckOutcome::down(format!("broker metadata request failed: {e}")),
            Err(_) => CheckOutcome::down("metadata task panicked"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use soma_config::DeploymentProfile;

    #[test]
    fn created_topics_carry_the_profiles_durability() {
        let names = vec!["orders".to_owned(), "orders.dlq".to_owned()];
        let prod = BusConfig {
            deployment_profile: DeploymentProfile::Prod,
            ..BusConfig::default()
        };
        let min_isr = prod.min_insync_replicas().map(|m| m.to_string());
        for t in new_topics(&prod, &names, min_isr.as_deref()) {
            assert!(
                matches!(t.replication, TopicReplication::Fixed(3)),
                "{}",
                t.name
            );
            assert_eq!(t.config, vec![("min.insync.replicas", "2")], "{}", t.name);
        }
        let local = BusConfig::default();
        for t in new_topics(&local, &names, None) {
            assert!(
                matches!(t.replication, TopicReplication::Fixed(1)),
                "{}",
                t.name
            );
            assert!(t.config.is_empty(), "{}", t.name);
        }
    }

    /// `.health(&registry)` lists the component `kafka`, required, at once
    /// (no broker needed: the client connects lazily).
    #[tokio::test]
    async fn health_registers_the_kafka_component() {
        let registry = HealthRegistry::new();
        let mut config = BusConfig {
            bootstrap_servers: "127.0.0.1:9".to_owned(),
            ..BusConfig::default()
        };
        config.topics.admin_timeout_ms = 100;
        let _admin = TopicAdmin::new(&config).unwrap().health(&registry);
        let component = registry.component("kafka").expect("kafka component");
        assert_eq!(component.criticality, Criticality::Required);
    }
}
