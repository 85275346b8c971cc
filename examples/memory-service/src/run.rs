//! [`run`]: the `soma-memory-service` process.

use std::time::Duration;

use axum::Router;
use soma_observability::health::HealthRegistry;
use soma_observability::http::{HttpMetricsLayer, TraceLayer};
use soma_observability::metrics::MetricsRegistry;
use soma_observability::shutdown::{Shutdown, ShutdownConfig};
use sqlx::postgres::PgPoolOptions;

use crate::{Error, MemoryService, Settings};

/// Runs the service until SIGTERM or Ctrl-C: telemetry, the PostgreSQL
/// pool, migrations, then the SomaBrain routes plus the admin routes
/// (`/live`, `/ready`, `/v1/health`, `/metrics`) on `http.bind`. On the
/// signal, readiness goes down and in-flight requests finish (a second
/// signal forces the exit).
pub async fn run(settings: Settings) -> Result<(), Error> {
    let _telemetry = soma_observability::init(&settings.telemetry)?;
    let metrics = MetricsRegistry::new(settings.telemetry.const_labels());
    let health = HealthRegistry::new();
    health.export_metrics(&metrics);
    let shutdown = Shutdown::new(ShutdownConfig::default(), &health);
    shutdown.listen_for_signals();

    let pg = &settings.postgres;
    let pool = PgPoolOptions::new()
        .max_connections(pg.max_connections)
        .acquire_timeout(Duration::from_millis(pg.connect_timeout_ms))
        .connect(&pg.url)
        .await?;
    let service = MemoryService::builder(pool.clone(), settings.memory.clone())
        .schema(&pg.schema)
        .metrics(&metrics)
        .health(&health)
        .version(&settings.telemetry.service_version)
        .build()
        .await?;

    let app = app(&service, &settings, &metrics, &health);
    let bind = &settings.http.bind;
    let listener = tokio::net::TcpListener::bind(bind)
        .await
        .map_err(|source| Error::Bind {
            addr: bind.clone(),
            source,
        })?;
    tracing::info!(
        event = "memory_service_listening",
        addr = %bind,
        schema = %pg.schema,
        ranking = service.ranking().as_str(),
    );
    let stop = shutdown.clone();
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.requested().await })
        .await
        .map_err(Error::Serve)?;
    shutdown
        .stage("postgres", async move { pool.close().await })
        .await;
    shutdown.finish();
    Ok(())
}

/// The process's whole HTTP app: the SomaBrain routes of `service`, the
/// admin routes (`/live`, `/ready`, `/v1/health`, `/metrics`) beside them,
/// the body limit of `settings.memory`, HTTP metrics and tracing. [`run`]
/// serves exactly this; tests serve it too, so a route clash between the
/// contract and the admin routes fails a test, not the stack.
pub fn app(
    service: &MemoryService,
    settings: &Settings,
    metrics: &MetricsRegistry,
    health: &HealthRegistry,
) -> Router {
    service
        .router()
        .merge(soma_observability::admin::admin_router(
            metrics.clone(),
            health.clone(),
        ))
        .layer(axum::extract::DefaultBodyLimit::max(
            settings.memory.max_body_bytes,
        ))
        .layer(HttpMetricsLayer::new(metrics))
        .layer(TraceLayer::from_config(&settings.telemetry))
}
