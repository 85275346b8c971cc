//! What every service of the platform starts with: metrics, health, the
//! Postgres pool, the outbox and its relay, the Kafka producer and durable
//! publisher, the admin endpoints, and the broadcast consumer that applies
//! remote configuration updates.

use std::sync::Arc;
use std::time::Duration;

use soma_bus::{
    BusConfig, BusConsumer, BusProducer, ConsumerHandle, DurablePublisher, Effects, Envelope,
    Handler, HandlerError, KafkaSink, TopicAdmin,
};
use soma_config::{Change, ConfigError, ConfigUpdate, Live};
use soma_observability::health::{CheckOptions, Criticality, HealthRegistry};
use soma_observability::metrics::MetricsRegistry;
use soma_observability::shutdown::Shutdown;
use soma_outbox::{Outbox, OutboxHealthCheck, Relay, RelayHandle};
use soma_policy::engine::ConfiguredEngine;
use soma_policy::{Authorizer, AuthzInput, Decision, PolicyMetrics};
use soma_somabrain::SomabrainClient;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::PlatformError;
use crate::conversations::Conversations;
use crate::session_events::SessionEvents;
use crate::settings::PlatformSettings;

/// How Kafka's health counts for a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KafkaRole {
    /// The service only publishes: with Kafka down its messages go to the
    /// outbox, so Kafka is `optional` (the service is degraded, still ready).
    PublishOnly,
    /// The service consumes: without Kafka it cannot work, so Kafka is
    /// `required`.
    Consumes,
}

/// The shared building blocks of one platform process.
pub struct Runtime {
    /// The settings registry (remote updates are applied to it).
    pub live: Live<PlatformSettings>,
    /// The settings this process started with.
    pub settings: Arc<PlatformSettings>,
    /// The process's metrics (served on `/metrics`).
    pub metrics: MetricsRegistry,
    /// The process's health (served on `/live`, `/ready`, `/v1/health`).
    pub health: HealthRegistry,
    /// The Postgres pool.
    pub pool: PgPool,
    /// The outbox (also the inbox).
    pub outbox: Outbox,
    /// The session event store (`chat.session_events_schema`): written by
    /// the workers that produce reply events, read by the gateway's SSE
    /// streams.
    pub session_events: SessionEvents,
    /// Who owns each conversation (in the session event store's schema).
    pub conversations: Conversations,
    /// The Kafka producer shared by the publisher, the relay and DLQ writes.
    pub producer: BusProducer,
    /// Kafka, or the outbox when Kafka is down.
    pub publisher: DurablePublisher,
    /// The address the admin endpoints listen on.
    pub admin_addr: std::net::SocketAddr,
    /// This process's shutdown: SIGTERM turns readiness down and starts the
    /// staged shutdown within `shutdown.deadline_ms`; a second SIGTERM
    /// forces it (see soma-observability's `shutdown` module).
    pub lifecycle: Shutdown,
    group_suffix: String,
    relay: Option<RelayHandle>,
    config_consumer: Option<ConsumerHandle>,
    admin: Option<JoinHandle<()>>,
    admin_stop: CancellationToken,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("service", &self.settings.telemetry.service_name)
            .field("admin_addr", &self.admin_addr)
            .finish_non_exhaustive()
    }
}

impl Runtime {
    /// Connects everything and starts the relay, the admin endpoints (on
    /// `admin`) and the configuration-update consumer.
    ///
    /// PostgreSQL must be reachable (the outbox is the durability of last
    /// resort, so a process without it does not start). Kafka need not be:
    /// topic creation is retried by the health check's view of the broker,
    /// and publishes fall back to the outbox.
    pub async fn start(
        live: Live<PlatformSettings>,
        admin: TcpListener,
        kafka: KafkaRole,
        group_suffix: &str,
    ) -> Result<Self, PlatformError> {
        let settings: Arc<PlatformSettings> = Arc::new(live.load().value().clone());
        let metrics = MetricsRegistry::new(settings.telemetry.const_labels());
        let health = HealthRegistry::new();
        health.export_metrics(&metrics);
        let lifecycle = Shutdown::new(settings.shutdown.clone(), &health);

        let pool = connect_postgres(&settings).await?;
        let outbox = Outbox::new(pool.clone(), settings.outbox.clone()).await?;
        let session_events =
            SessionEvents::new(pool.clone(), &settings.chat.session_events_schema)?;
        session_events.migrate().await?;
        let conversations = session_events.conversations();
        conversations.migrate().await?;
        OutboxHealthCheck::new(outbox.clone()).register(
            &health,
            CheckOptions::new(Duration::from_secs(5), Duration::from_secs(2)),
        );

        let bus = settings.bus.clone();
        let producer = BusProducer::new(&bus)?;
        let publisher = DurablePublisher::builder(producer.clone(), outbox.clone())
            .metrics(&metrics)
            .health(&health)
            .build();
        let relay = Relay::new(
            outbox.clone(),
            KafkaSink::new(producer.clone()),
            settings.relay.clone(),
        )
        .metrics(&metrics)
        .health(&health)
        .spawn();

        watch_kafka(&bus, &settings, kafka, &health).await?;

        let config_consumer = spawn_config_updates(&live, &bus, &settings, &producer, &metrics)?;

        let admin_addr = admin.local_addr().map_err(|source| PlatformError::Bind {
            addr: "admin".into(),
            source,
        })?;
        let (admin_stop, admin_task) = serve_admin(admin, &metrics, &health);

        Ok(Self {
            live,
            settings,
            metrics,
            health,
            pool,
            outbox,
            session_events,
            conversations,
            producer,
            publisher,
            admin_addr,
            lifecycle,
            group_suffix: group_suffix.to_owned(),
            relay: Some(relay),
            config_consumer,
            admin: Some(admin_task),
            admin_stop,
        })
    }

    /// The authorizer every service uses, from the `policy` section (the
    /// engine chosen by soma-policy's `ConfiguredEngine`): the
    /// embedded Rego engine (reported as health component `policy`, and
    /// recompiled from `policy.policy_dir` whenever the settings change —
    /// e.g. a config update on the `config.updates` topic — keeping the last
    /// good policy when the new one does not compile), or the remote OPA
    /// sidecar (component `opa`, with its circuit breaker).
    /// `metrics` are the process's policy metrics (create them once per
    /// registry: the authenticator shares them).
    pub fn authorizer(&self, metrics: PolicyMetrics) -> Result<Authorizer, PlatformError> {
        let policy = &self.settings.policy;
        let engine = ConfiguredEngine::from_config(policy)
            .metrics(&self.metrics)
            .health(&self.health)
            .build()
            .map_err(|e| PlatformError::Policy(e.to_string()))?;
        // Recompiled when the engine's own settings change, not on every
        // settings change (a rate limit).
        engine.spawn_reloader(
            self.live
                .map(|s| soma_policy::engine::EngineInputs::of(&s.policy)),
        );
        Ok(Authorizer::with_engine(Arc::new(engine), policy)
            .metrics(metrics)
            .build())
    }

    /// A SomaBrain client reporting through this process's metrics, with an
    /// optional `somabrain` health component: SomaBrain down makes the
    /// service degraded, not down. Every request carries the W3C
    /// `traceparent` of its `somabrain.call` span, so the memory service's
    /// spans join the turn's trace.
    pub fn somabrain(&self) -> Result<SomabrainClient, PlatformError> {
        let brain = SomabrainClient::builder(self.settings.somabrain.clone())
            .metrics(&self.metrics)
            .health(&self.health)
            .header_injector(soma_observability::propagation::inject_current)
            .build()?;
        Ok(brain)
    }

    /// Exactly-once effects on this process's pool, inbox and publisher.
    pub fn effects(&self) -> Effects {
        Effects::new(
            self.pool.clone(),
            self.outbox.inbox(),
            self.publisher.clone(),
        )
    }

    /// Turns this runtime into a worker consuming `topic` in group
    /// `<bus.consumer.group>.<group suffix given to start>`, calling
    /// `handler` (named `handler_name` in DLQ headers, logs and metrics),
    /// with DLQ writes on the shared producer and a required
    /// `bus_consumer.<handler_name>` health component.
    pub fn into_worker(
        self,
        topic: &str,
        handler_name: &str,
        handler: impl Handler,
    ) -> Result<Worker, PlatformError> {
        let consumer = BusConsumer::builder(&self.settings.bus, &[topic], handler_name, handler)
            .group(self.group(&self.group_suffix))
            .producer(self.producer.clone())
            .metrics(&self.metrics)
            .health(&self.health)
            .spawn()?;
        tracing::info!(event = "worker_started", handler = handler_name, admin = %self.admin_addr);
        Ok(Worker {
            runtime: self,
            consumer: Some(consumer),
        })
    }

    /// The consumer group `<bus.consumer.group>.<suffix>` of one of this
    /// service's consumers (for [`ConsumerBuilder::group`](soma_bus::ConsumerBuilder::group)).
    pub fn group(&self, group_suffix: &str) -> String {
        format!("{}.{}", self.settings.bus.consumer.group, group_suffix)
    }

    /// The runtime's stages of the shutdown sequence, after the service
    /// stopped taking work: stop the config consumer; flush the durable
    /// publisher (every accepted message acknowledged by Kafka or already
    /// in the outbox) **before** the pool closes; let the relay finish its
    /// batch; stop the admin endpoints (they served `/ready` = 503 during
    /// the drain); close the pool. Messages still in the outbox stay there
    /// for the next relay: nothing accepted is lost.
    pub async fn shutdown(mut self) {
        let lifecycle = self.lifecycle.clone();
        lifecycle.begin();
        if let Some(c) = self.config_consumer.take() {
            lifecycle
                .stage("config_consumer", async {
                    c.shutdown().await;
                })
                .await;
        }
        let publisher = self.publisher.clone();
        lifecycle
            .stage("publisher", async move {
                let report = publisher.shutdown().await;
                if !report.is_complete() {
                    tracing::warn!(event = "producer_flush_incomplete", ?report);
                }
            })
            .await;
        if let Some(r) = self.relay.take() {
            lifecycle
                .stage("relay", async {
                    if let Err(e) = r.shutdown().await {
                        tracing::warn!(event = "relay_shutdown_failed", error = %e);
                    }
                })
                .await;
        }
        self.admin_stop.cancel();
        if let Some(a) = self.admin.take() {
            lifecycle
                .stage("admin", async {
                    let _ = a.await;
                })
                .await;
        }
        let pool = self.pool.clone();
        lifecycle
            .stage("postgres", async move {
                pool.close().await;
            })
            .await;
        let report = lifecycle.finish();
        tracing::info!(
            event = "runtime_stopped",
            completed = report.completed(),
            forced = report.forced,
            abandoned = ?report.abandoned
        );
    }
}

/// A running worker: the shared runtime plus one consumer.
pub struct Worker {
    runtime: Runtime,
    consumer: Option<ConsumerHandle>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("runtime", &self.runtime)
            .finish_non_exhaustive()
    }
}

impl Worker {
    /// Where `/live`, `/ready`, `/v1/health` and `/metrics` listen.
    pub fn admin_addr(&self) -> std::net::SocketAddr {
        self.runtime.admin_addr
    }

    /// The shared runtime.
    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    /// Readiness down, then stops fetching, finishes in-flight messages and
    /// commits what was handled (stage `consumer`), then shuts the runtime
    /// down.
    pub async fn shutdown(mut self) {
        let lifecycle = self.runtime.lifecycle.clone();
        lifecycle.begin();
        lifecycle.drain_delay().await;
        if let Some(c) = self.consumer.take() {
            lifecycle
                .stage("consumer", async {
                    let report = c.shutdown().await;
                    tracing::info!(event = "consumer_stopped", ?report);
                })
                .await;
        }
        self.runtime.shutdown().await;
    }
}

/// The process's PostgreSQL pool (`postgres.max_connections`, waiting at
/// most `postgres.connect_timeout_ms` for a connection).
async fn connect_postgres(settings: &PlatformSettings) -> Result<PgPool, PlatformError> {
    PgPoolOptions::new()
        .max_connections(settings.postgres.max_connections)
        .acquire_timeout(Duration::from_millis(settings.postgres.connect_timeout_ms))
        .connect(&settings.postgres.url)
        .await
        .map_err(|source| PlatformError::Postgres {
            url: soma_observability::redact_url(&settings.postgres.url),
            source,
        })
}

/// Reports the broker as health component `kafka` (required when the
/// service consumes, optional when it only publishes) and creates the
/// platform's topics; a broker that is down is logged, not an error.
async fn watch_kafka(
    bus: &BusConfig,
    settings: &PlatformSettings,
    kafka: KafkaRole,
    health: &HealthRegistry,
) -> Result<(), PlatformError> {
    let topic_admin = TopicAdmin::new(bus)?;
    let criticality = match kafka {
        KafkaRole::PublishOnly => Criticality::Optional,
        KafkaRole::Consumes => Criticality::Required,
    };
    health.register_check(
        "kafka",
        criticality,
        topic_admin.health_check(),
        CheckOptions::new(Duration::from_secs(5), Duration::from_secs(3)),
    );
    if let Err(e) = topic_admin.ensure_topics(&settings.topics(), true).await {
        // Publishing still works (the outbox holds messages until the
        // broker is back); consumers report the problem through health.
        tracing::warn!(event = "ensure_topics_failed", error = %e);
    }
    Ok(())
}

/// Serves `/metrics`, `/live`, `/ready` and `/v1/health` on `admin` in a
/// task until the returned token is cancelled.
fn serve_admin(
    admin: TcpListener,
    metrics: &MetricsRegistry,
    health: &HealthRegistry,
) -> (CancellationToken, JoinHandle<()>) {
    let admin_stop = CancellationToken::new();
    let router = soma_observability::admin::admin_router(metrics.clone(), health.clone());
    let stop = admin_stop.clone();
    let admin_task = tokio::spawn(async move {
        let serve = axum::serve(admin, router)
            .with_graceful_shutdown(async move { stop.cancelled().await });
        if let Err(e) = serve.await {
            tracing::error!(event = "admin_server_failed", error = %e);
        }
    });
    (admin_stop, admin_task)
}

/// Every replica applies every remote config update (broadcast consumer):
/// the fix for an update that reached one replica and never the facade.
///
/// Updates must be signed with `chat.config_update_key` (anyone who can
/// publish to the topic could otherwise push `version = u64::MAX` and freeze
/// every replica); without a key, no remote updates are taken. The consumer
/// reads the topic from its beginning, so a replica that starts later
/// applies the updates published before it and reaches the current version
/// (versions only go up, so replaying history ends at the newest).
fn spawn_config_updates(
    live: &Live<PlatformSettings>,
    bus: &BusConfig,
    settings: &PlatformSettings,
    producer: &BusProducer,
    metrics: &MetricsRegistry,
) -> Result<Option<ConsumerHandle>, PlatformError> {
    if settings.chat.config_update_key.is_empty() {
        tracing::warn!(
            event = "config_updates_disabled",
            topic = %settings.chat.config_topic,
            "chat.config_update_key is not set: remote config updates are not taken"
        );
        return Ok(None);
    }
    live.require_signed_updates(settings.chat.config_update_key.clone())?;
    let outcomes = metrics.counter_family::<Vec<(&'static str, &'static str)>>(
        "soma_platform_config_updates_total",
        "remote config updates by outcome: applied, redelivered, rejected_unsigned, \
         rejected_bad_signature, rejected (checksum, version, validation), malformed",
    );
    let count = move |outcome: &'static str| {
        outcomes.get_or_create(&vec![("outcome", outcome)]).inc();
    };
    let live = live.clone();
    let handler = move |env: Envelope| {
        let (live, count) = (live.clone(), count.clone());
        async move {
            let update: ConfigUpdate = env.json().map_err(|e| {
                count("malformed");
                HandlerError::fatal(format!("not a config update: {e}"))
            })?;
            match live.apply(&update) {
                Ok(change) => {
                    count(if change == Change::AlreadyApplied {
                        "redelivered"
                    } else {
                        "applied"
                    });
                    tracing::info!(
                        event = "config_update_applied",
                        update_version = update.version,
                        ?change
                    );
                    Ok(())
                }
                // Keep-last-good: the running value is unchanged.
                Err(e) => {
                    count(match &e {
                        ConfigError::UpdateSignature { problem, .. } if problem.is_missing() => {
                            "rejected_unsigned"
                        }
                        ConfigError::UpdateSignature { .. } => "rejected_bad_signature",
                        _ => "rejected",
                    });
                    Err(HandlerError::fatal(format!("config update rejected: {e}")))
                }
            }
        }
    };
    Ok(Some(
        BusConsumer::builder(
            bus,
            &[settings.chat.config_topic.as_str()],
            "config-updates",
            handler,
        )
        .producer(producer.clone())
        .metrics(metrics)
        .broadcast_from_beginning()
        .spawn()?,
    ))
}

/// Whether `handler` already handled message `id` (its inbox row is
/// committed): a redelivery after a crash or a rebalance, before the offset
/// was committed, is skipped before the work is done again. A read only:
/// the inbox record written with the work's effects stays the
/// exactly-once guarantee, so a failed read answers `false` (the work runs
/// and its commit finds the row). (A candidate for `soma_bus::Effects`.)
pub(crate) async fn handled_before(
    pool: &PgPool,
    inbox: &soma_outbox::Inbox,
    handler: &str,
    id: uuid::Uuid,
) -> bool {
    let seen = match pool.acquire().await {
        Ok(mut conn) => inbox
            .contains(&mut conn, handler, id)
            .await
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    seen.unwrap_or_else(|error| {
        tracing::debug!(event = "inbox_check_failed", handler, %error);
        false
    })
}

/// A worker's policy decision for a message: an engine that cannot decide
/// is a retryable handler error (the message is handled again later), never
/// an allow.
pub(crate) async fn decide(
    authz: &Authorizer,
    input: &AuthzInput,
) -> Result<Decision, HandlerError> {
    authz
        .check(input)
        .await
        .map_err(|e| HandlerError::retryable(format!("policy unavailable: {e}")))
}
