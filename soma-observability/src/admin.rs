//! The admin [`Router`] (feature `axum`): `/live`, `/ready`,
//! `/v1/health`, `/metrics`; and the [`probe_router`] with the probes alone,
//! for a service's public port (no metrics there).
//!
//! | path | answers |
//! |---|---|
//! | `GET /live` | 200 `{"status":"live"}` while the process serves HTTP |
//! | `GET /ready` | 200 `{"status":"ready"}` when every required component is up, else 503 `{"status":"not_ready","failing":[..]}` |
//! | `GET /v1/health` | the [`HealthReport`](crate::health::HealthReport) JSON; 200 for ok/degraded, 503 for down |
//! | `GET /metrics` | OpenMetrics text; Prometheus text 0.0.4 when `Accept` asks for `text/plain` and not OpenMetrics |
//!
//! Every probe reads cached state; none waits on a dependency.
//!
//! ```
//! use soma_observability::admin::admin_router;
//! use soma_observability::health::HealthRegistry;
//! use soma_observability::metrics::MetricsRegistry;
//!
//! let router: axum::Router = admin_router(MetricsRegistry::default(), HealthRegistry::new());
//! # let _ = router;
//! ```

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;

use crate::health::HealthRegistry;
use crate::metrics::{MetricsRegistry, OPENMETRICS_CONTENT_TYPE, PROMETHEUS_TEXT_CONTENT_TYPE};

/// Builds the admin router over `metrics` and `health`: the probes of
/// [`probe_router`] plus `/metrics`.
pub fn admin_router(metrics: MetricsRegistry, health: HealthRegistry) -> Router {
    Router::new()
        .route("/metrics", get(metrics_text))
        .with_state(metrics)
        .merge(probe_router(health))
}

/// The probes alone over `health`: `/live`, `/ready` and `/v1/health`, no
/// `/metrics`. For a service's public port, where load balancers and
/// orchestrators probe: mount it outside authentication. What it shows is
/// component names, statuses and reasons, never configuration or
/// credentials.
///
/// The paths are exactly those three, so a service whose own API already
/// serves a probe of another name (SomaBrain's `/healthz`, for one) can
/// merge this router without a route clash; a service that wants an alias
/// adds it itself with [`live_handler`].
pub fn probe_router<S: Clone + Send + Sync + 'static>(health: HealthRegistry) -> Router<S> {
    Router::new()
        .route("/live", get(live))
        .route("/ready", get(ready))
        .route("/v1/health", get(health_report))
        .with_state(health)
}

/// The `/live` handler alone, for a service that serves liveness under
/// another path as well (a `/healthz` alias, say): 200 `{"status":"live"}`.
pub async fn live_handler() -> Response {
    live().await
}

async fn live() -> Response {
    Json(json!({ "status": "live" })).into_response()
}

async fn ready(State(health): State<HealthRegistry>) -> Response {
    let readiness = health.readiness();
    if readiness.is_ready() {
        (StatusCode::OK, Json(json!({ "status": "ready" }))).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "not_ready", "failing": readiness.failing })),
        )
            .into_response()
    }
}

async fn health_report(State(health): State<HealthRegistry>) -> Response {
    let report = health.report();
    let status =
        StatusCode::from_u16(report.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, Json(report)).into_response()
}

async fn metrics_text(State(metrics): State<MetricsRegistry>, headers: HeaderMap) -> Response {
    if wants_prometheus_text(&headers) {
        let body = metrics.encode_prometheus();
        ([(header::CONTENT_TYPE, PROMETHEUS_TEXT_CONTENT_TYPE)], body).into_response()
    } else {
        (
            [(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)],
            metrics.encode(),
        )
            .into_response()
    }
}

/// OpenMetrics unless the scraper asks for `text/plain` and not for OpenMetrics.
fn wants_prometheus_text(headers: &HeaderMap) -> bool {
    let accept = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
        .join(",");
    accept.contains("text/plain") && !accept.contains("application/openmetrics-text")
}
