//! `GET /v1/runtime-config`: the running configuration as an operator may
//! see it — soma-config's redacted snapshot ([`Live::snapshot`]: every
//! [`Secret`](soma_config::Secret) and every value under a secret-looking
//! key is `[REDACTED]`, every URL loses its credentials), with its version
//! and checksum, plus `sizes`: the numeric settings the deployment
//! profile's preset ([`crate::settings::preset`]) sizes, with the values in
//! force.

use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use soma_config::Live;

use crate::settings::PlatformSettings;

/// Route of the runtime configuration.
pub const ROUTE: &str = "/v1/runtime-config";

/// The runtime-config route over one settings registry.
#[derive(Clone)]
pub struct RuntimeConfig {
    live: Live<PlatformSettings>,
}

impl std::fmt::Debug for RuntimeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuntimeConfig").finish_non_exhaustive()
    }
}

impl RuntimeConfig {
    /// Over `live`.
    pub fn new(live: Live<PlatformSettings>) -> Self {
        Self { live }
    }

    /// `GET /v1/runtime-config` (gated by flag `runtime_config`).
    pub fn router<S: Clone + Send + Sync + 'static>(&self) -> Router<S> {
        Router::new()
            .route(ROUTE, get(snapshot))
            .with_state(self.clone())
    }

    /// The snapshot with `sizes` added.
    pub fn view(&self) -> serde_json::Value {
        let mut snap = self.live.snapshot();
        let profile = self.live.load().value().profile;
        // The loader refuses a preset it cannot build, so the settings were
        // loaded with this one.
        let preset = crate::settings::preset(profile).ok();
        let sizes: serde_json::Map<String, serde_json::Value> = preset
            .iter()
            .flat_map(|preset| preset.entries())
            .filter_map(|(key, _)| {
                let v = key
                    .split('.')
                    .try_fold(&snap["config"], |v, part| v.get(part))?;
                Some((key.to_owned(), v.clone()))
            })
            .collect();
        snap["sizes"] = serde_json::Value::Object(sizes);
        snap
    }
}

async fn snapshot(State(config): State<RuntimeConfig>) -> Response {
    axum::Json(config.view()).into_response()
}
