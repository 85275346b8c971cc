//! The gateway's operator surface: the running configuration, the feature
//! flags in force, SomaBrain's operator routes and dead-letter
//! administration, plus the probes on the API port. The gateway mounts it
//! in one place ([`Operator::router`] inside its authentication and policy,
//! [`probes`] outside them).
//!
//! | Route | Action | What it does |
//! |---|---|---|
//! | `GET /live`, `/healthz`, `/ready`, `/v1/health` | none (unauthenticated) | the probes, on the API port too (no secrets, no metrics: those stay on the admin port) |
//! | `GET /v1/runtime-config` | `config.read` | the redacted settings snapshot ([`soma_config::Live::snapshot`]: secrets and URL credentials redacted), its version and checksum, and the sizes the deployment profile set |
//! | `GET /v1/features` | `features.read` | every feature flag: state, source, default, profiles, override (see [`features`]) |
//! | `POST /v1/context`, `GET /v1/weights`, `POST /v1/learning/reward`, `GET /v1/flags/{flag}` | `somabrain.operate` | SomaBrain's operator routes through [`soma_somabrain::proxy`], with the caller's tenant; an upstream fault is `502`/`503`/`504` naming SomaBrain (flag `somabrain_operator`) |
//! | `GET /v1/admin/dlq`, `GET`/`POST /v1/admin/dlq/...` | `ops.admin` | dead letters: list with filters, inspect, replay one or a filtered set, discard with a reason (see [`dlq`]; flag `dlq_admin`) |
//!
//! Every route needs a credential (`401` without), passes the gateway's
//! rate limit and its route's policy action (`403` without it), and
//! answers every error with a [`Problem`](soma_observability::http::Problem) body.

pub mod config;
pub mod dlq;
pub mod features;
pub mod somabrain;

use std::sync::Arc;

use axum::Router;
use soma_observability::health::HealthRegistry;
use soma_policy::{Authorizer, RouteRule};

use crate::PlatformError;
use crate::runtime::Runtime;

/// The routes the operator surface maps to policy actions.
pub fn routes() -> Vec<RouteRule> {
    let mut rules = vec![
        RouteRule::new("GET", config::ROUTE, "config.read", "config"),
        RouteRule::new("GET", features::ROUTE, "features.read", "features"),
    ];
    rules.extend(somabrain::routes());
    rules.extend(dlq::routes());
    rules
}

/// The probes on the API port: `/live`, `/healthz`, `/ready`,
/// `/v1/health`, unauthenticated (mount outside authentication).
pub fn probes<S: Clone + Send + Sync + 'static>(health: &HealthRegistry) -> Router<S> {
    soma_observability::admin::probe_router(health.clone()).route(
        "/healthz",
        axum::routing::get(soma_observability::admin::live_handler),
    )
}

/// The operator surface of one gateway.
pub struct Operator {
    features: features::Features,
    config: config::RuntimeConfig,
    somabrain: somabrain::SomabrainRoutes,
    dlq: dlq::DlqAdmin,
}

impl std::fmt::Debug for Operator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Operator").finish_non_exhaustive()
    }
}

impl Operator {
    /// Builds the operator surface on the gateway's runtime and authorizer
    /// (the DLQ ledger's schema is migrated here).
    pub async fn start(runtime: &Runtime, authz: Arc<Authorizer>) -> Result<Self, PlatformError> {
        let features = features::Features::start(runtime)?;
        Ok(Self {
            config: config::RuntimeConfig::new(runtime.live.clone()),
            somabrain: somabrain::SomabrainRoutes::new(runtime, features.clone())?,
            dlq: dlq::DlqAdmin::start(runtime, authz, features.clone()).await?,
            features,
        })
    }

    /// The feature flags in force.
    pub fn features(&self) -> &features::Features {
        &self.features
    }

    /// The operator routes, to merge into the gateway's router inside its
    /// authentication and policy layers.
    pub fn router<S: Clone + Send + Sync + 'static>(&self) -> Router<S> {
        Router::new()
            .merge(
                self.features
                    .gate(features::RUNTIME_CONFIG, self.config.router()),
            )
            .merge(self.features.router())
            .merge(self.somabrain.router())
            .merge(self.dlq.router())
    }

    /// Stops the background tasks (the flag watchers).
    pub fn shutdown(&self) {
        self.features.stop();
    }
}
