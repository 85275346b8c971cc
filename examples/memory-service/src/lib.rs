//! A SomaBrain-compatible local memory service on PostgreSQL.
//!
//! # Why
//!
//! The example platform remembers and recalls through SomaBrain, which
//! cannot be installed from the package registries the local stack uses.
//! Without it every reply says "My memory is unavailable right now" and
//! remember / recall / context / reward are never exercised end to end.
//! This crate is a **local stand-in**: it serves the routes, headers,
//! authentication, status codes and error bodies of the real server (as
//! recorded in `soma-somabrain/tests/fixtures`, replayed against it by
//! `tests/conformance.rs`), stores memories in PostgreSQL and ranks recall
//! by relevance. It has none of SomaBrain's cognitive features.
//!
//! # Guarantees
//!
//! - **Durable before acknowledged.** A remember (or a whole batch, in one
//!   transaction) is answered after the PostgreSQL commit; `persisted_to_ltm`
//!   is true because it is. `X-Soma-Fast-Ack` changes nothing.
//! - **Keyed writes.** Tenant + namespace + universe + key name one memory;
//!   writing it again overwrites it (`deduplicated: true` when the content
//!   was identical and nothing changed).
//! - **Isolation.** Recall sees only the `X-Tenant-ID` tenant and the body's
//!   namespace — working memory included (SomaBrain's working memory leaks
//!   across namespaces; this service does not).
//! - **Ranked, at bounded cost.** Hits are ordered by relevance: full-text
//!   rank, then `pg_trgm` word similarity for what full text misses, by
//!   default ([`Ranking`], chosen by measurement); `top_k` caps the results,
//!   `wm_hits` / `ltm_hits` count the matches before the cap. Only the
//!   scope's newest `memory.recall_window` memories are scored, so a recall
//!   costs the same after 100 turns as after 100,000.
//! - **Health is reported.** A background check pings PostgreSQL; `/readyz`
//!   and `/health` read its cached state.
//!
//! # Example
//!
//! ```no_run
//! use soma_memory_service::{MemoryConfig, MemoryService};
//! use soma_observability::health::HealthRegistry;
//! use soma_observability::metrics::MetricsRegistry;
//!
//! # async fn demo() -> Result<(), soma_memory_service::Error> {
//! let pool = sqlx::PgPool::connect("postgres://postgres@127.0.0.1:5432/test").await?;
//! let service = MemoryService::builder(pool, MemoryConfig {
//!         token: "local-dev-token".into(),
//!         ..MemoryConfig::default()
//!     })
//!     .schema("soma_memory")
//!     .metrics(&MetricsRegistry::default())
//!     .health(&HealthRegistry::new())
//!     .build()
//!     .await?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:9696").await.unwrap();
//! axum::serve(listener, service.router()).await.unwrap();
//! # Ok(()) }
//! ```

mod api;
mod config;
mod error;
mod run;
mod store;

use std::sync::Arc;
use std::time::Duration;

use soma_observability::health::{
    CheckOptions, CheckOutcome, Criticality, HealthRegistry, check_fn,
};
use soma_observability::metrics::MetricsRegistry;
use sqlx::PgPool;

pub use config::{HttpSettings, MemoryConfig, PostgresSettings, Ranking, Settings, load, loader};
pub use error::Error;
pub use run::{app, run};

/// The README's example, compiled as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

/// A running memory service: its routes over one PostgreSQL schema.
/// Cheap to clone.
#[derive(Clone)]
pub struct MemoryService {
    state: api::Shared,
}

impl std::fmt::Debug for MemoryService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryService")
            .field("ranking", &self.state.config.ranking)
            .finish_non_exhaustive()
    }
}

/// Builds a [`MemoryService`].
#[derive(Debug)]
pub struct MemoryServiceBuilder {
    pool: PgPool,
    config: MemoryConfig,
    schema: String,
    metrics: Option<MetricsRegistry>,
    health: Option<HealthRegistry>,
    version: String,
}

impl MemoryServiceBuilder {
    /// The schema of the service's tables (default `soma_memory`).
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    /// Registers the service's metrics in `registry`.
    pub fn metrics(mut self, registry: &MetricsRegistry) -> Self {
        self.metrics = Some(registry.clone());
        self
    }

    /// Reports the `postgres` component (required) in `health`; `/readyz`
    /// and `/health` read it.
    pub fn health(mut self, health: &HealthRegistry) -> Self {
        self.health = Some(health.clone());
        self
    }

    /// The `version` `/health` reports (default: this crate's version).
    pub fn version(mut self, version: impl Into<String>) -> Self {
        self.version = version.into();
        self
    }

    /// Creates `pg_trgm` if needed, creates and migrates the schema, starts
    /// the PostgreSQL health check and the expiry sweep (background tasks
    /// that run until the Tokio runtime stops).
    pub async fn build(self) -> Result<MemoryService, Error> {
        if self.config.token.is_empty() {
            return Err(Error::Config("memory.token must be set".into()));
        }
        if !config::valid_schema(&self.schema) {
            return Err(Error::Config(format!(
                "schema {:?} must match [a-z_][a-z0-9_]*",
                self.schema
            )));
        }
        let store = store::Store::open(self.pool, &self.schema, &self.config).await?;
        let metrics = self.metrics.unwrap_or_default();
        let health = self.health.unwrap_or_default();
        let probe = store.clone();
        health.register_check(
            api::STORAGE_COMPONENT,
            Criticality::Required,
            check_fn(move || {
                let probe = probe.clone();
                async move {
                    match probe.ping().await {
                        Ok(()) => CheckOutcome::up(),
                        Err(e) => CheckOutcome::down(e.to_string()),
                    }
                }
            }),
            CheckOptions::new(Duration::from_secs(5), Duration::from_secs(2)),
        );
        spawn_sweeper(
            store.clone(),
            Duration::from_secs(self.config.ttl_sweep_interval_secs.max(1)),
        );
        let state = Arc::new(api::AppState {
            store,
            config: self.config,
            health,
            metrics: api::ServiceMetrics::new(&metrics),
            version: self.version,
        });
        Ok(MemoryService { state })
    }
}

/// Deletes expired memories every `every` (recall already hides them).
fn spawn_sweeper(store: store::Store, every: Duration) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.tick().await;
        loop {
            tick.tick().await;
            match store.sweep_expired().await {
                Ok(0) => {}
                Ok(n) => tracing::debug!(event = "expired_memories_swept", deleted = n),
                Err(e) => tracing::warn!(event = "expiry_sweep_failed", error = %e),
            }
        }
    });
}

impl MemoryService {
    /// A builder over `pool` with the `memory` section.
    pub fn builder(pool: PgPool, config: MemoryConfig) -> MemoryServiceBuilder {
        MemoryServiceBuilder {
            pool,
            config,
            schema: "soma_memory".into(),
            metrics: None,
            health: None,
            version: env!("CARGO_PKG_VERSION").into(),
        }
    }

    /// The SomaBrain routes: `/healthz`, `/readyz`, `/health` at the root;
    /// `/memory/*` and `/context/*` at the root and under `/api`. Add
    /// tracing, metrics and the admin routes around it (see [`run`]).
    pub fn router(&self) -> axum::Router {
        api::router(self.state.clone())
    }

    /// The configured ranking.
    pub fn ranking(&self) -> Ranking {
        self.state.config.ranking
    }
}
