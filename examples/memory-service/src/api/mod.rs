//! The SomaBrain routes: probes at the root, the memory and context API at
//! the root and under `/api` (SomaBrain mounts it at both).

mod context;
mod memory;
pub(crate) mod wire;

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde_json::json;
use soma_observability::health::{ComponentStatus, HealthRegistry};
use soma_observability::metrics::MetricsRegistry;
use subtle::ConstantTimeEq;

use crate::config::MemoryConfig;
use crate::store::Store;

/// The health component that reports PostgreSQL.
pub(crate) const STORAGE_COMPONENT: &str = "postgres";

/// Counters of what the service did (bounded labels only).
#[derive(Clone)]
pub(crate) struct ServiceMetrics {
    /// `soma_memory_service_writes_total{outcome=stored|deduplicated}`.
    writes: Family<Vec<(&'static str, &'static str)>, Counter>,
    /// `soma_memory_service_recalls_total{layer=wm|ltm|both, found=yes|no}`.
    recalls: Family<Vec<(&'static str, &'static str)>, Counter>,
}

impl ServiceMetrics {
    pub(crate) fn new(registry: &MetricsRegistry) -> Self {
        Self {
            writes: registry.counter_family(
                "soma_memory_service_writes",
                "Memories written, by outcome (stored or deduplicated)",
            ),
            recalls: registry.counter_family(
                "soma_memory_service_recalls",
                "Recalls served, by layer and whether anything was found",
            ),
        }
    }

    fn write(&self, deduplicated: bool) {
        let outcome = if deduplicated {
            "deduplicated"
        } else {
            "stored"
        };
        self.writes.get_or_create(&vec![("outcome", outcome)]).inc();
    }

    fn recall(&self, layer: &'static str, found: bool) {
        let found = if found { "yes" } else { "no" };
        self.recalls
            .get_or_create(&vec![("layer", layer), ("found", found)])
            .inc();
    }
}

/// What every handler shares.
pub(crate) struct AppState {
    pub(crate) store: Store,
    pub(crate) config: MemoryConfig,
    pub(crate) health: HealthRegistry,
    pub(crate) metrics: ServiceMetrics,
    pub(crate) version: String,
}

pub(crate) type Shared = Arc<AppState>;

impl AppState {
    /// The bearer check of every memory and context route except feature
    /// flags: `Authorization: Bearer <memory.token>`, compared in constant
    /// time; anything else is SomaBrain's 401.
    fn authorize(&self, headers: &HeaderMap) -> Result<(), wire::Rejection> {
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        let expected = self.config.token.expose_secret().as_bytes();
        match presented {
            Some(p) if bool::from(p.as_bytes().ct_eq(expected)) => Ok(()),
            _ => Err(wire::Rejection::Unauthorized),
        }
    }
}

/// A header's value, when sent, UTF-8 and non-empty.
fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .filter(|s| !s.is_empty())
}

/// The request id to echo: `X-Request-ID`, or a new UUID.
fn request_id(headers: &HeaderMap) -> String {
    header_str(headers, "x-request-id")
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}

/// The API and probes. Unknown paths get Django's 404 page, wrong methods
/// its 405.
pub(crate) fn router(state: Shared) -> Router {
    let api = Router::new()
        .route("/memory/remember", post(memory::remember))
        .route("/memory/remember/batch", post(memory::remember_batch))
        .route("/memory/recall", post(memory::recall))
        .route("/memory/metrics", get(memory::metrics))
        .route("/context/evaluate", post(context::evaluate))
        .route("/context/feedback", post(context::feedback))
        .route("/context/adaptation/state", get(context::adaptation_state))
        .route("/context/feature-flags", get(context::feature_flags));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/health", get(health))
        .merge(api.clone())
        .nest("/api", api)
        .method_not_allowed_fallback(|| async { wire::method_not_allowed() })
        .fallback(|| async { wire::not_found() })
        .with_state(state)
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, false)
}

/// Django's `application/json` (the probes are plain Django views).
fn django_json(status: StatusCode, body: &serde_json::Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// `GET /healthz`: alive while the process serves HTTP.
async fn healthz() -> Response {
    django_json(
        StatusCode::OK,
        &json!({"status": "healthy", "timestamp": now()}),
    )
}

fn storage_up(st: &AppState) -> bool {
    st.health
        .component(STORAGE_COMPONENT)
        .is_some_and(|c| c.status == ComponentStatus::Up)
}

/// `GET /readyz`: 200 `ready` when PostgreSQL answers (reported by the
/// background health check, never polled here), else 503 `degraded`.
async fn readyz(State(st): State<Shared>) -> Response {
    let ready = st.health.readiness().is_ready() && storage_up(&st);
    let db = if storage_up(&st) {
        "healthy"
    } else {
        "unhealthy"
    };
    let (status, word) = if ready {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "degraded")
    };
    django_json(
        status,
        &json!({"status": word, "checks": {"database": db}, "timestamp": now()}),
    )
}

/// `GET /health`: SomaBrain's aggregate shape, reduced to what this service
/// has (PostgreSQL is its memory backend). Always 200; read `status`.
async fn health(State(st): State<Shared>) -> Response {
    let up = storage_up(&st);
    let (status, healthy, unhealthy) = if up {
        ("healthy", 1, 0)
    } else {
        ("critical", 0, 1)
    };
    django_json(
        StatusCode::OK,
        &json!({
            "status": status,
            "version": st.version,
            "service": "soma-memory-service",
            "timestamp": now(),
            "healthy_count": healthy,
            "degraded_count": 0,
            "unhealthy_count": unhealthy,
            "ok": up,
            "ready": up,
            "namespace": "default",
            "trace_id": null,
            "postgres_ok": up,
            "memory_ok": up,
            "memory_circuit_open": false,
            "memory_should_reset": false,
            "memory_degraded": !up,
            "components": {
                "memory": {"healthy": up, "circuit_open": false, "should_reset": false, "degraded": !up},
                "postgres": {"ok": up},
            },
        }),
    )
}
