//! The platform's feature flags, in soma-config's one registry
//! ([`FeatureFlags`]): declared here, configured by the `flags` settings
//! section (`flags.profile`, `flags.overrides.<name>`), re-read whenever
//! the settings change (a file reload or a remote config update), and
//! driven to *degraded* from health where a feature depends on a
//! component (soma-observability's [`DegradedFlagDriver`], which keeps no
//! state of its own: the registry is the one state).
//!
//! | flag | profiles | gates | degraded when |
//! |---|---|---|---|
//! | `runtime_config` | all | `GET /v1/runtime-config` | — |
//! | `somabrain_operator` | standard and up | SomaBrain's operator routes | health component `somabrain` is not up |
//! | `dlq_admin` | standard and up | `/v1/admin/dlq` | — |
//!
//! A route whose flag is off answers `404 feature_off` (a problem body
//! naming the flag). `GET /v1/features` shows every flag:
//!
//! ```json
//! { "profile": "standard",
//!   "flags": [ { "name": "dlq_admin", "description": "…", "state": "on",
//!                "source": {"kind": "profile", "profile": "standard"},
//!                "default": false, "profiles": ["standard", "enhanced", "max"],
//!                "override": null, "reason": null } ] }
//! ```

use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;
use soma_config::{FeatureFlags, FeatureProfile, FlagDescriptor, FlagSetting, FlagsConfig, Live};
use soma_observability::health::flags::DegradedFlagDriver;
use soma_observability::http::Problem;
use tokio::task::JoinHandle;

use crate::PlatformError;
use crate::runtime::Runtime;
use crate::settings::PlatformSettings;

/// Route of the flags view.
pub const ROUTE: &str = "/v1/features";

/// `GET /v1/runtime-config`.
pub const RUNTIME_CONFIG: &str = "runtime_config";
/// SomaBrain's operator routes.
pub const SOMABRAIN_OPERATOR: &str = "somabrain_operator";
/// DLQ administration.
pub const DLQ_ADMIN: &str = "dlq_admin";

/// The platform's flags.
pub fn descriptors() -> Vec<FlagDescriptor> {
    vec![
        FlagDescriptor::new(
            RUNTIME_CONFIG,
            "GET /v1/runtime-config: the redacted running configuration",
        )
        .default_on(true)
        .from_profile(FeatureProfile::Minimal),
        FlagDescriptor::new(
            SOMABRAIN_OPERATOR,
            "SomaBrain's operator routes (/v1/context, /v1/weights, /v1/learning/reward, \
             /v1/flags/{flag}); degraded while SomaBrain is down",
        )
        .default_on(true)
        .from_profile(FeatureProfile::Standard),
        FlagDescriptor::new(
            DLQ_ADMIN,
            "/v1/admin/dlq: list, inspect, replay and discard dead letters",
        )
        .default_on(true)
        .from_profile(FeatureProfile::Standard),
    ]
}

/// The flags of one process, kept in step with its settings.
#[derive(Clone)]
pub struct Features {
    flags: FeatureFlags,
    live: Live<PlatformSettings>,
    tasks: Arc<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for Features {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Features")
            .field("flags", &self.flags)
            .finish_non_exhaustive()
    }
}

impl Features {
    /// The registry over [`descriptors`] with the `flags` section of the
    /// settings; follows every new settings version and drives
    /// `somabrain_operator` from the `somabrain` health component.
    ///
    /// # Errors
    /// [`PlatformError::Config`] for an override of an unknown flag.
    pub fn start(runtime: &Runtime) -> Result<Self, PlatformError> {
        let flags = FeatureFlags::new(descriptors(), runtime.settings.flags.clone(), None)?;
        let mut rx = runtime.live.subscribe();
        let follow = flags.clone();
        let watcher = tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let config = rx.borrow_and_update().value().flags.clone();
                // Keep-last-good: an unknown flag leaves the previous config.
                if let Err(e) = follow.set_config(config) {
                    tracing::warn!(event = "flags_config_rejected", error = %e);
                }
            }
        });
        let driver = DegradedFlagDriver::new(&runtime.health, "somabrain")
            .drive_flag(&flags, SOMABRAIN_OPERATOR)?;
        Ok(Self {
            flags,
            live: runtime.live.clone(),
            tasks: Arc::new(vec![watcher, driver]),
        })
    }

    /// The registry.
    pub fn flags(&self) -> &FeatureFlags {
        &self.flags
    }

    /// Stops following the settings and health.
    pub fn stop(&self) {
        self.tasks.iter().for_each(JoinHandle::abort);
    }

    /// `Err(404 feature_off)` unless `flag` is on or degraded.
    pub fn require(&self, flag: &str) -> Result<(), Problem> {
        match self.flags.lookup(flag) {
            Ok(l) if l.state.is_available() => Ok(()),
            Ok(_) => Err(Problem::new(
                StatusCode::NOT_FOUND,
                "feature_off",
                format!("feature {flag} is off (flags.profile / flags.overrides.{flag})"),
            )),
            Err(e) => {
                tracing::error!(event = "unknown_flag", flag, error = %e);
                Err(Problem::internal())
            }
        }
    }

    /// A middleware answering `404 feature_off` while `flag` is off.
    pub fn gate<S: Clone + Send + Sync + 'static>(
        &self,
        flag: &'static str,
        router: Router<S>,
    ) -> Router<S> {
        let me = self.clone();
        router.route_layer(axum::middleware::from_fn(
            move |req: Request, next: Next| {
                let me = me.clone();
                async move {
                    match me.require(flag) {
                        Ok(()) => next.run(req).await,
                        Err(p) => p.into_response(),
                    }
                }
            },
        ))
    }

    /// `GET /v1/features`.
    pub fn router<S: Clone + Send + Sync + 'static>(&self) -> Router<S> {
        Router::new()
            .route(ROUTE, get(list))
            .with_state(self.clone())
    }

    /// Every flag with its state and provenance (the JSON of the module docs).
    pub fn view(&self) -> serde_json::Value {
        let settings = self.live.get();
        let config: &FlagsConfig = &settings.value().flags;
        let flags: Vec<serde_json::Value> = self
            .flags
            .descriptors()
            .map(|d| {
                let lookup = self.flags.lookup(d.name()).ok();
                json!({
                    "name": d.name(),
                    "description": d.description(),
                    "state": lookup.as_ref().map(|l| l.state),
                    "source": lookup.as_ref().map(|l| &l.source),
                    "reason": lookup.as_ref().and_then(|l| l.reason.clone()),
                    "default": d.default(),
                    "profiles": d.profiles(),
                    "dependencies": d.dependencies(),
                    "override": config.overrides.get(d.name()).map(|s| match s {
                        FlagSetting::On => "on",
                        FlagSetting::Off => "off",
                    }),
                })
            })
            .collect();
        json!({
            "profile": config.profile,
            "settings_version": settings.version(),
            "flags": flags,
        })
    }
}

async fn list(State(features): State<Features>) -> Response {
    axum::Json(features.view()).into_response()
}
