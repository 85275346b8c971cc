//! The gateway's workspace routes: scheduled jobs, uploads and
//! notifications, each behind authentication and its own policy action.
//!
//! | Route | Action | What it does |
//! |---|---|---|
//! | `GET /v1/ui/scheduler/jobs` | `scheduler.read` | The tenant's jobs. |
//! | `POST /v1/ui/scheduler/jobs` | `scheduler.create` | `{"name", "schedule": {"every_secs": n} \| {"cron": "sec min hour dom mon dow [year]"}, "payload"?, "enabled"?}` → `201` with the job; a bad schedule is `422` naming the field. |
//! | `PUT /v1/ui/scheduler/jobs/{id}` | `scheduler.update` | Replaces name, schedule, payload, enabled (owner or admin). |
//! | `POST /v1/ui/scheduler/jobs/{id}/run` | `scheduler.run` | Makes the job due now: the one runner runs it on its next tick (`202`). |
//! | `DELETE /v1/ui/scheduler/jobs/{id}` | `scheduler.delete` | Deletes the job and its history (`204`). |
//! | `GET /v1/ui/scheduler/jobs/{id}/history` | `scheduler.read` | The job's runs, newest first. |
//! | `POST /v1/uploads` | `uploads.write` | The body, as its `Content-Type` says → `201 {id, sha256, size_bytes, content_type}`; `413`/`415` past the size limit or outside the allowlist. |
//! | `GET /v1/uploads/{id}` | `uploads.read` | The bytes, for the uploader only, checksum verified on read (`x-checksum-sha256`). |
//! | `GET /v1/notifications` | `notifications.read` | The caller's notifications not yet expired, newest first. |
//! | `GET /v1/notifications/stream` | `notifications.read` | Server-sent `notification` events, each with its sequence as `id:` (resume with `Last-Event-ID`). |
//! | `POST /v1/notifications/{id}/read` | `notifications.ack` | Marks one read (`204`). |
//!
//! Resources are tenant-scoped: a job, upload or notification of another
//! tenant answers `404`, as one that does not exist (the gateway does not
//! confirm that an id exists elsewhere). Within the tenant, an upload or a
//! notification of another subject is `404` too (they are private); a job
//! of another subject is visible to the tenant (`scheduler.read`) and
//! changing it is `403 not_schedule_owner` unless the caller is an admin.
//! Every change to a job is recorded on the policy audit trail
//! ([`soma_policy::Authorizer::audit`]).

mod notifications;
mod scheduler;
mod uploads;

use std::sync::Arc;

use axum::Router;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use soma_observability::http::{Problem, RequestId};
use soma_policy::{
    AuditEvent, Authorizer, AuthzInput, Principal, RequestInfo, Resource, RouteRule,
};
use soma_redis::RedisClient;
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use notifications::{
    DEAD_LETTER_NOTIFICATION, Notification, NotificationSettings, Notifications,
};
pub use scheduler::{Job, JobRun, RUN_EVENT, RUN_NOTIFICATION, Schedule, SchedulerSettings};
pub use uploads::{CHECKSUM_HEADER, UploadSettings, Uploaded};

use crate::PlatformError;
use crate::runtime::Runtime;

/// Route of the job list and job creation.
pub const JOBS_ROUTE: &str = "/v1/ui/scheduler/jobs";
/// Route of one job (update, delete).
pub const JOB_ROUTE: &str = "/v1/ui/scheduler/jobs/{id}";
/// Route of "run now".
pub const JOB_RUN_ROUTE: &str = "/v1/ui/scheduler/jobs/{id}/run";
/// Route of a job's run history.
pub const JOB_HISTORY_ROUTE: &str = "/v1/ui/scheduler/jobs/{id}/history";
/// Route of uploads.
pub const UPLOADS_ROUTE: &str = "/v1/uploads";
/// Route of one upload.
pub const UPLOAD_ROUTE: &str = "/v1/uploads/{id}";
/// Route of the notification list.
pub const NOTIFICATIONS_ROUTE: &str = "/v1/notifications";
/// Route of the notification stream.
pub const NOTIFICATIONS_STREAM_ROUTE: &str = "/v1/notifications/stream";
/// Route of "mark read".
pub const NOTIFICATION_READ_ROUTE: &str = "/v1/notifications/{id}/read";

/// The workspace: one PostgreSQL schema for jobs, runs, uploads and
/// notifications, and each part's settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct WorkspaceSettings {
    /// PostgreSQL schema of the workspace's tables (created at start).
    pub schema: String,
    /// Scheduled jobs and their runner.
    pub scheduler: SchedulerSettings,
    /// Uploads.
    pub uploads: UploadSettings,
    /// Notifications and their janitor.
    pub notifications: NotificationSettings,
}

impl Default for WorkspaceSettings {
    fn default() -> Self {
        Self {
            schema: "soma_workspace".into(),
            scheduler: SchedulerSettings::default(),
            uploads: UploadSettings::default(),
            notifications: NotificationSettings::default(),
        }
    }
}

/// The workspace settings' checks (see [`crate::settings::loader`]).
pub fn validate(s: &WorkspaceSettings, checks: &mut soma_config::Checks) {
    checks.ensure(
        valid_schema(&s.schema),
        "workspace.schema",
        "1-48 characters of [a-z0-9_], starting with a letter",
    );
    checks.ensure(
        s.scheduler.tick_ms > 0 && s.scheduler.lease_ttl_ms >= 3 * s.scheduler.tick_ms.max(1),
        "workspace.scheduler.lease_ttl_ms",
        "tick_ms must be at least 1 and lease_ttl_ms at least 3 ticks",
    );
    checks.ensure(
        !s.scheduler.topic.is_empty(),
        "workspace.scheduler.topic",
        "must be set",
    );
    checks.ensure(
        s.uploads.max_bytes > 0,
        "workspace.uploads.max_bytes",
        "must be at least 1",
    );
    checks.ensure(
        s.notifications.ttl_secs > 0
            && s.notifications.janitor_interval_ms > 0
            && s.notifications.stream_poll_ms > 0,
        "workspace.notifications",
        "ttl_secs, janitor_interval_ms and stream_poll_ms must be at least 1",
    );
}

fn valid_schema(schema: &str) -> bool {
    (1..=48).contains(&schema.len())
        && schema.starts_with(|c: char| c.is_ascii_lowercase())
        && schema
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// The routes the workspace maps to policy actions.
pub fn routes() -> Vec<RouteRule> {
    vec![
        RouteRule::new("GET", JOBS_ROUTE, "scheduler.read", "scheduled_job"),
        RouteRule::new("POST", JOBS_ROUTE, "scheduler.create", "scheduled_job"),
        RouteRule::new("PUT", JOB_ROUTE, "scheduler.update", "scheduled_job").with_id_param("id"),
        RouteRule::new("DELETE", JOB_ROUTE, "scheduler.delete", "scheduled_job")
            .with_id_param("id"),
        RouteRule::new("POST", JOB_RUN_ROUTE, "scheduler.run", "scheduled_job").with_id_param("id"),
        RouteRule::new("GET", JOB_HISTORY_ROUTE, "scheduler.read", "scheduled_job")
            .with_id_param("id"),
        RouteRule::new("POST", UPLOADS_ROUTE, "uploads.write", "upload"),
        RouteRule::new("GET", UPLOAD_ROUTE, "uploads.read", "upload").with_id_param("id"),
        RouteRule::new(
            "GET",
            NOTIFICATIONS_ROUTE,
            "notifications.read",
            "notification",
        ),
        RouteRule::new(
            "GET",
            NOTIFICATIONS_STREAM_ROUTE,
            "notifications.read",
            "notification",
        ),
        RouteRule::new(
            "POST",
            NOTIFICATION_READ_ROUTE,
            "notifications.ack",
            "notification",
        )
        .with_id_param("id"),
    ]
}

/// What the workspace's handlers share.
struct Shared {
    settings: WorkspaceSettings,
    tables: Tables,
    pool: PgPool,
    authz: Arc<Authorizer>,
    notifications: Notifications,
    wake_runner: Arc<tokio::sync::Notify>,
    lifecycle: soma_observability::shutdown::Shutdown,
}

/// The workspace's table names, schema-qualified.
#[derive(Debug, Clone)]
struct Tables {
    jobs: String,
    runs: String,
    fences: String,
    uploads: String,
}

impl Tables {
    fn new(schema: &str) -> Self {
        Self {
            jobs: format!("{schema}.jobs"),
            runs: format!("{schema}.job_runs"),
            fences: format!("{schema}.fences"),
            uploads: format!("{schema}.uploads"),
        }
    }
}

/// The workspace's background work in one gateway: the scheduler's runner
/// (active only while this replica holds the lease), the notification
/// janitor and the dead-letter watcher.
pub struct Workspace {
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    dlq: Option<soma_bus::ConsumerHandle>,
}

impl std::fmt::Debug for Workspace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workspace")
            .field("tasks", &self.tasks.len())
            .finish_non_exhaustive()
    }
}

impl Workspace {
    /// Creates the tables, starts the runner, the janitor and the
    /// dead-letter watcher, and returns the routes (to be mounted inside
    /// the gateway's authentication and authorization layers).
    pub async fn start<S: Clone + Send + Sync + 'static>(
        runtime: &Runtime,
        redis: &RedisClient,
        authz: Arc<Authorizer>,
    ) -> Result<(Self, Router<S>), PlatformError> {
        let settings = runtime.settings.workspace.clone();
        let pool = runtime.pool.clone();
        migrate(&pool, &settings.schema)
            .await
            .map_err(|source| PlatformError::Postgres {
                url: soma_observability::redact_url(&runtime.settings.postgres.url),
                source,
            })?;
        let tables = Tables::new(&settings.schema);
        let notifications = Notifications::new(
            pool.clone(),
            &settings.schema,
            settings.notifications.clone(),
            &runtime.metrics,
        );
        let stop = CancellationToken::new();
        let wake_runner = Arc::new(tokio::sync::Notify::new());
        let shared = Arc::new(Shared {
            settings: settings.clone(),
            tables: tables.clone(),
            pool: pool.clone(),
            authz,
            notifications: notifications.clone(),
            wake_runner: wake_runner.clone(),
            lifecycle: runtime.lifecycle.clone(),
        });
        let mut tasks = vec![notifications.spawn_janitor(stop.clone())];
        tasks.push(scheduler::spawn_runner(runtime, redis, shared.clone(), stop.clone()).await?);
        let dlq = notifications::spawn_dlq_watcher(runtime, notifications.clone())?;
        let router = Router::new()
            .merge(scheduler::router())
            .merge(uploads::router(&settings.uploads))
            .merge(notifications::router())
            .with_state(shared);
        Ok((
            Self {
                stop,
                tasks,
                dlq: Some(dlq),
            },
            router,
        ))
    }

    /// Stops the runner (releasing its lease), the janitor and the watcher.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
        if let Some(d) = self.dlq.take() {
            d.shutdown().await;
        }
    }
}

async fn migrate(pool: &PgPool, schema: &str) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
        .bind(format!("soma-workspace:{schema}"))
        .execute(&mut *tx)
        .await?;
    for s in schema_ddl(schema) {
        sqlx::query(&s).execute(&mut *tx).await?;
    }
    tx.commit().await
}

/// The workspace's schema, tables and indexes, in creation order (each
/// statement idempotent).
fn schema_ddl(schema: &str) -> [String; 9] {
    let t = Tables::new(schema);
    let n = format!("{schema}.notifications");
    [
        format!("CREATE SCHEMA IF NOT EXISTS {schema}"),
        format!(
            "CREATE TABLE IF NOT EXISTS {} (
                id UUID PRIMARY KEY,
                tenant TEXT NOT NULL,
                owner TEXT NOT NULL,
                name TEXT NOT NULL,
                schedule JSONB NOT NULL,
                payload JSONB NOT NULL,
                enabled BOOLEAN NOT NULL,
                run_now BOOLEAN NOT NULL DEFAULT false,
                next_run_at TIMESTAMPTZ,
                created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
                updated_at TIMESTAMPTZ NOT NULL DEFAULT now())",
            t.jobs
        ),
        format!(
            "CREATE INDEX IF NOT EXISTS jobs_due ON {} (next_run_at) WHERE enabled",
            t.jobs
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {} (
                id UUID PRIMARY KEY,
                job_id UUID NOT NULL REFERENCES {} (id) ON DELETE CASCADE,
                tenant TEXT NOT NULL,
                owner TEXT NOT NULL,
                scheduled_for TIMESTAMPTZ NOT NULL,
                trigger TEXT NOT NULL,
                fence BIGINT NOT NULL,
                status TEXT NOT NULL,
                detail TEXT,
                claimed_at TIMESTAMPTZ NOT NULL DEFAULT now(),
                finished_at TIMESTAMPTZ,
                UNIQUE (job_id, scheduled_for))",
            t.runs, t.jobs
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {} (name TEXT PRIMARY KEY, token BIGINT NOT NULL)",
            t.fences
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {} (
                id UUID PRIMARY KEY,
                tenant TEXT NOT NULL,
                owner TEXT NOT NULL,
                content_type TEXT NOT NULL,
                size_bytes BIGINT NOT NULL,
                sha256 TEXT NOT NULL,
                data BYTEA NOT NULL,
                created_at TIMESTAMPTZ NOT NULL DEFAULT now())",
            t.uploads
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {n} (
                seq BIGSERIAL UNIQUE,
                id UUID PRIMARY KEY,
                tenant TEXT NOT NULL,
                subject TEXT NOT NULL,
                kind TEXT NOT NULL,
                body JSONB NOT NULL,
                created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
                expires_at TIMESTAMPTZ NOT NULL,
                read_at TIMESTAMPTZ)"
        ),
        format!("CREATE INDEX IF NOT EXISTS notifications_owner ON {n} (tenant, subject, seq)"),
        format!("CREATE INDEX IF NOT EXISTS notifications_expiry ON {n} (expires_at)"),
    ]
}

/// The error answer of the workspace's handlers.
fn problem(status: StatusCode, code: &str, detail: &str) -> Response {
    Problem::new(status, code, detail).into_response()
}

/// `503` for a store error (logged, never shown to the caller).
fn store_unavailable(e: &sqlx::Error) -> Response {
    tracing::warn!(event = "workspace_store_unavailable", error = %e);
    problem(
        StatusCode::SERVICE_UNAVAILABLE,
        "workspace_store_unavailable",
        "the workspace store is unavailable; retry later",
    )
}

/// `404` for a resource of the tenant that does not exist (or belongs to
/// another tenant, or to another subject where it is private).
fn not_found(what: &str) -> Response {
    Problem::not_found(format!("no such {what}")).into_response()
}

/// `400 invalid_id` unless `id` is a UUID.
fn parse_id(id: &str) -> Result<uuid::Uuid, Problem> {
    uuid::Uuid::parse_str(id)
        .map_err(|_| Problem::bad_request("invalid_id", "the id in the path is not a UUID"))
}

fn request_id_str(id: &RequestId) -> String {
    id.header_value().to_str().unwrap_or_default().to_owned()
}

/// Authorizes `action` on the resource again with its owner in the
/// context (the route check ran without it): `403` with the policy's
/// reasons when denied.
async fn authorize_owned(
    ws: &Shared,
    principal: &Principal,
    action: &str,
    resource: Resource,
    owner: &str,
    request: (&str, &str, &RequestId),
) -> Result<(), Response> {
    let (method, route, request_id) = request;
    let input = AuthzInput::new(principal, action, resource)
        .with_request(RequestInfo {
            method: method.to_owned(),
            route: route.to_owned(),
            request_id: Some(request_id_str(request_id)),
        })
        .with_context("owner", owner)
        .with_context("resource_tenant", principal.tenant.as_str());
    match ws.authz.check(&input).await {
        Ok(d) if d.allow => Ok(()),
        Ok(d) => Err(problem(
            StatusCode::FORBIDDEN,
            "forbidden",
            &format!("{action} denied: {}", d.reasons.join(", ")),
        )),
        Err(e) => Err(problem(
            e.status(),
            e.code(),
            "the policy engine is unavailable",
        )),
    }
}

/// Records a committed change on the audit trail.
fn audit(
    ws: &Shared,
    principal: &Principal,
    action: &str,
    resource: Resource,
    what: Vec<String>,
    request_id: &RequestId,
) {
    let id = request_id_str(request_id);
    ws.authz.audit(&AuditEvent::change(
        principal,
        action,
        resource,
        what,
        Some(id.as_str()),
    ));
}
