//! Scheduled jobs: stored in PostgreSQL, run by one runner across the
//! gateway replicas.
//!
//! # One runner, fenced
//!
//! Every replica tries to take the soma-redis [`Lease`] `scheduler`; the
//! holder runs the due jobs every `tick_ms`. The lease's fencing token
//! guards every write the runner makes: claiming a run first raises the
//! `fences` row to the token (refused when a newer holder already raised
//! it higher), and recording a run's result requires the token to be the
//! newest still. A runner that stalled past its lease (GC pause, a
//! partition from Redis) and wakes up next to the new holder therefore
//! cannot claim or record anything: its writes are refused and logged
//! (`scheduler_fenced`).
//!
//! # Delivery
//!
//! A due job is claimed as a run — one row per `(job, scheduled time)`, a
//! unique key, so a period runs at most once however many runners
//! overlap — in the same transaction that moves the job's `next_run_at`.
//! The run is then published with the soma-bus [`DurablePublisher`]
//! (Kafka, or the outbox when Kafka is down) as a `scheduler.run`
//! envelope on `workspace.scheduler.topic`, its envelope id the run's id,
//! and the result (`published` with `kafka`/`deferred`, or `failed`) is
//! recorded in the run's history with a notification to the job's owner.
//! A run claimed by a runner that died before recording it is published
//! again by the next holder after `lease_ttl_ms`, with the same envelope
//! id: consumers see each run at least once, and deduplicate by id
//! (soma-bus's inbox does) to see it once.
//!
//! [`DurablePublisher`]: soma_bus::DurablePublisher

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Extension, Json, Router};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use soma_bus::{DurablePublisher, Envelope, PublishOutcome, TopicAdmin};
use soma_observability::http::{Problem, RequestId};
use soma_policy::{Principal, Resource};
use soma_redis::{Lease, LeaseGuard, LeaseOptions, RedisClient};
use sqlx::types::Json as SqlJson;
use sqlx::{PgPool, Postgres, Transaction};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{
    JOB_HISTORY_ROUTE, JOB_ROUTE, JOB_RUN_ROUTE, JOBS_ROUTE, Shared, Tables, audit,
    authorize_owned, not_found, parse_id, store_unavailable,
};
use crate::PlatformError;
use crate::runtime::Runtime;

/// Envelope type of a published run.
pub const RUN_EVENT: &str = "scheduler.run";
/// Notification kind of a recorded run.
pub const RUN_NOTIFICATION: &str = "scheduler.run_completed";
/// The lease (and fence) name of the runner.
const LEASE_NAME: &str = "scheduler";
/// The key-space tenant of the runner's lease (platform-wide, not a
/// customer's).
const LEASE_TENANT: &str = "platform";
/// Most due jobs claimed per tick.
const CLAIM_BATCH: i64 = 100;

/// The scheduler's settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct SchedulerSettings {
    /// Where runs are published (envelope type `scheduler.run`, keyed by
    /// job id).
    pub topic: String,
    /// How often the lease holder looks for due jobs.
    pub tick_ms: u64,
    /// The runner lease's TTL: how long a crashed holder keeps the others
    /// waiting, and how old an unrecorded run is before it is published
    /// again.
    pub lease_ttl_ms: u64,
    /// Shortest accepted interval of an `every_secs` schedule.
    pub min_interval_secs: u64,
    /// Longest accepted job name, in bytes.
    pub max_name_bytes: usize,
}

impl Default for SchedulerSettings {
    fn default() -> Self {
        Self {
            topic: "scheduler.runs".into(),
            tick_ms: 500,
            lease_ttl_ms: 5_000,
            min_interval_secs: 1,
            max_name_bytes: 200,
        }
    }
}

/// When a job runs: `{"every_secs": n}` or `{"cron": "sec min hour
/// day-of-month month day-of-week [year]"}` (the `cron` crate's syntax,
/// UTC).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Schedule {
    /// Every `n` seconds, from the job's creation (or last change).
    EverySecs(u64),
    /// A cron expression, evaluated in UTC.
    Cron(String),
}

impl Schedule {
    /// Checks the schedule: `Err((field, why))`.
    fn validate(&self, s: &SchedulerSettings) -> Result<(), (&'static str, String)> {
        match self {
            Schedule::EverySecs(n) if *n < s.min_interval_secs.max(1) => Err((
                "schedule.every_secs",
                format!("must be at least {}", s.min_interval_secs.max(1)),
            )),
            Schedule::EverySecs(n) if *n > 366 * 86_400 => {
                Err(("schedule.every_secs", "must be at most a year".into()))
            }
            Schedule::EverySecs(_) => Ok(()),
            Schedule::Cron(expr) => match cron::Schedule::from_str(expr) {
                Err(e) => Err(("schedule.cron", format!("not a cron expression: {e}"))),
                Ok(c) if c.upcoming(Utc).next().is_none() => {
                    Err(("schedule.cron", "never fires again".into()))
                }
                Ok(_) => Ok(()),
            },
        }
    }

    /// The first run time after `last` that is later than `now` (`None`:
    /// a cron expression that never fires again).
    fn next_after(&self, last: DateTime<Utc>, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            Schedule::EverySecs(n) => {
                let every = chrono::Duration::seconds(i64::try_from(*n).ok()?.max(1));
                let mut next = last + every;
                if next <= now {
                    // Missed periods (no runner for a while) are skipped,
                    // not run in a burst.
                    let behind = (now - last).num_milliseconds() / every.num_milliseconds();
                    next = last + every * i32::try_from(behind + 1).ok()?;
                }
                Some(next)
            }
            Schedule::Cron(expr) => cron::Schedule::from_str(expr)
                .ok()?
                .after(&last.max(now))
                .next(),
        }
    }
}

/// A job as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow)]
pub struct Job {
    /// The job's id.
    pub id: Uuid,
    /// Who created it (the subject that may change it).
    pub owner: String,
    /// Its name.
    pub name: String,
    /// When it runs.
    #[sqlx(json)]
    pub schedule: Schedule,
    /// What each run carries (published as the run's `payload`).
    #[sqlx(json)]
    pub payload: Value,
    /// Whether the schedule is in force (a disabled job runs only when
    /// asked to run now).
    pub enabled: bool,
    /// When it runs next.
    pub next_run_at: Option<DateTime<Utc>>,
    /// Created.
    pub created_at: DateTime<Utc>,
    /// Last changed.
    pub updated_at: DateTime<Utc>,
}

/// One run of a job, as its history shows it.
#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow)]
pub struct JobRun {
    /// The run's id (the published envelope's id).
    pub id: Uuid,
    /// The job.
    pub job_id: Uuid,
    /// The period it ran for.
    pub scheduled_for: DateTime<Utc>,
    /// `schedule` or `manual` (run now).
    pub trigger: String,
    /// The fencing token of the runner that recorded it.
    pub fence: i64,
    /// `claimed` (being published), `published` or `failed`.
    pub status: String,
    /// `kafka`, `deferred` (in the outbox), or why it failed.
    pub detail: Option<String>,
    /// When it was claimed.
    pub claimed_at: DateTime<Utc>,
    /// When its result was recorded.
    pub finished_at: Option<DateTime<Utc>>,
}

/// A create or update request: `name` and `schedule` required, `payload`
/// (default `null`) and `enabled` (default `true`) optional.
#[derive(Debug)]
struct JobSpec {
    name: String,
    schedule: Schedule,
    payload: Value,
    enabled: bool,
}

/// The fields of a [`JobSpec`] body; any other is refused.
const JOB_FIELDS: [&str; 4] = ["name", "schedule", "payload", "enabled"];

/// The scheduler's routes.
pub(super) fn router() -> Router<Arc<Shared>> {
    Router::new()
        .route(JOBS_ROUTE, get(list_jobs).post(create_job))
        .route(JOB_ROUTE, put(update_job).delete(delete_job))
        .route(JOB_RUN_ROUTE, post(run_job))
        .route(JOB_HISTORY_ROUTE, get(job_history))
}

/// Parses and validates a job body: `400 invalid_body` unless JSON, `422
/// invalid_job` naming the field otherwise.
fn job_spec(ws: &Shared, body: Result<Bytes, BytesRejection>) -> Result<JobSpec, Problem> {
    let body = body.map_err(|e| Problem::new(e.status(), "invalid_body", e.body_text()))?;
    let value: Value = serde_json::from_slice(&body)
        .map_err(|e| Problem::bad_request("invalid_body", format!("not JSON: {e}")))?;
    let unprocessable = |field: &str, why: &str| {
        Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_job",
            format!("{field}: {why}"),
        )
    };
    let Value::Object(mut fields) = value else {
        return Err(unprocessable("body", "must be a JSON object"));
    };
    if let Some(unknown) = fields.keys().find(|k| !JOB_FIELDS.contains(&k.as_str())) {
        return Err(unprocessable(unknown, "unknown field"));
    }
    // Each field decoded on its own, so the answer names the one at fault.
    fn take<T: serde::de::DeserializeOwned>(
        fields: &mut serde_json::Map<String, Value>,
        name: &str,
        default: Option<T>,
    ) -> Result<T, String> {
        match (fields.remove(name), default) {
            (Some(v), _) => serde_json::from_value(v).map_err(|e| e.to_string()),
            (None, Some(d)) => Ok(d),
            (None, None) => Err("is required".into()),
        }
    }
    let spec = JobSpec {
        name: take(&mut fields, "name", None).map_err(|e| unprocessable("name", &e))?,
        schedule: take(&mut fields, "schedule", None).map_err(|e| unprocessable("schedule", &e))?,
        payload: take(&mut fields, "payload", Some(Value::Null))
            .map_err(|e| unprocessable("payload", &e))?,
        enabled: take(&mut fields, "enabled", Some(true))
            .map_err(|e| unprocessable("enabled", &e))?,
    };
    let name = spec.name.trim();
    if name.is_empty() || name.len() > ws.settings.scheduler.max_name_bytes {
        return Err(unprocessable(
            "name",
            &format!("must be 1-{} bytes", ws.settings.scheduler.max_name_bytes),
        ));
    }
    spec.schedule
        .validate(&ws.settings.scheduler)
        .map_err(|(field, why)| unprocessable(field, &why))?;
    Ok(spec)
}

async fn list_jobs(
    State(ws): State<Arc<Shared>>,
    Extension(principal): Extension<Principal>,
) -> Response {
    let sql = format!(
        "SELECT id, owner, name, schedule, payload, enabled, next_run_at, created_at, updated_at
         FROM {} WHERE tenant = $1 ORDER BY created_at LIMIT 1000",
        ws.tables.jobs
    );
    match sqlx::query_as::<_, Job>(&sql)
        .bind(&principal.tenant)
        .fetch_all(&ws.pool)
        .await
    {
        Ok(jobs) => Json(serde_json::json!({ "jobs": jobs })).into_response(),
        Err(e) => store_unavailable(&e),
    }
}

async fn create_job(
    State(ws): State<Arc<Shared>>,
    Extension(principal): Extension<Principal>,
    Extension(request_id): Extension<RequestId>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let spec = match job_spec(&ws, body) {
        Ok(s) => s,
        Err(p) => return p.into_response(),
    };
    let now = Utc::now();
    let next = spec.schedule.next_after(now, now);
    let sql = format!(
        "INSERT INTO {} (id, tenant, owner, name, schedule, payload, enabled, next_run_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
         RETURNING id, owner, name, schedule, payload, enabled, next_run_at, created_at, updated_at",
        ws.tables.jobs
    );
    let job = sqlx::query_as::<_, Job>(&sql)
        .bind(Uuid::now_v7())
        .bind(&principal.tenant)
        .bind(&principal.subject)
        .bind(spec.name.trim())
        .bind(SqlJson(&spec.schedule))
        .bind(SqlJson(&spec.payload))
        .bind(spec.enabled)
        .bind(next)
        .fetch_one(&ws.pool)
        .await;
    match job {
        Ok(job) => {
            audit(
                &ws,
                &principal,
                "scheduler.create",
                job_resource(job.id),
                vec!["created".into()],
                &request_id,
            );
            (StatusCode::CREATED, Json(job)).into_response()
        }
        Err(e) => store_unavailable(&e),
    }
}

fn job_resource(id: Uuid) -> Resource {
    Resource {
        kind: "scheduled_job".into(),
        id: Some(id.to_string()),
    }
}

/// The tenant's job `id` and its owner, authorized for `action` with the
/// owner in the policy input.
async fn owned_job(
    ws: &Shared,
    principal: &Principal,
    id: &str,
    action: &str,
    request: (&str, &str, &RequestId),
) -> Result<Job, Response> {
    let id = parse_id(id).map_err(IntoResponse::into_response)?;
    let sql = format!(
        "SELECT id, owner, name, schedule, payload, enabled, next_run_at, created_at, updated_at
         FROM {} WHERE id = $1 AND tenant = $2",
        ws.tables.jobs
    );
    let job = sqlx::query_as::<_, Job>(&sql)
        .bind(id)
        .bind(&principal.tenant)
        .fetch_optional(&ws.pool)
        .await
        .map_err(|e| store_unavailable(&e))?
        .ok_or_else(|| not_found("job"))?;
    authorize_owned(ws, principal, action, job_resource(id), &job.owner, request).await?;
    Ok(job)
}

async fn update_job(
    State(ws): State<Arc<Shared>>,
    Extension(principal): Extension<Principal>,
    Extension(request_id): Extension<RequestId>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let request = ("PUT", JOB_ROUTE, &request_id);
    let job = match owned_job(&ws, &principal, &id, "scheduler.update", request).await {
        Ok(j) => j,
        Err(r) => return r,
    };
    let spec = match job_spec(&ws, body) {
        Ok(s) => s,
        Err(p) => return p.into_response(),
    };
    let now = Utc::now();
    let next = spec.schedule.next_after(now, now);
    let sql = format!(
        "UPDATE {} SET name = $2, schedule = $3, payload = $4, enabled = $5,
             next_run_at = $6, updated_at = now()
         WHERE id = $1
         RETURNING id, owner, name, schedule, payload, enabled, next_run_at, created_at, updated_at",
        ws.tables.jobs
    );
    let updated = sqlx::query_as::<_, Job>(&sql)
        .bind(job.id)
        .bind(spec.name.trim())
        .bind(SqlJson(&spec.schedule))
        .bind(SqlJson(&spec.payload))
        .bind(spec.enabled)
        .bind(next)
        .fetch_optional(&ws.pool)
        .await;
    match updated {
        Ok(Some(j)) => {
            let mut changed = Vec::new();
            for (field, differs) in [
                ("name", j.name != job.name),
                ("schedule", j.schedule != job.schedule),
                ("payload", j.payload != job.payload),
                ("enabled", j.enabled != job.enabled),
            ] {
                if differs {
                    changed.push(field.to_owned());
                }
            }
            audit(
                &ws,
                &principal,
                "scheduler.update",
                job_resource(j.id),
                changed,
                &request_id,
            );
            Json(j).into_response()
        }
        Ok(None) => not_found("job"),
        Err(e) => store_unavailable(&e),
    }
}

async fn delete_job(
    State(ws): State<Arc<Shared>>,
    Extension(principal): Extension<Principal>,
    Extension(request_id): Extension<RequestId>,
    Path(id): Path<String>,
) -> Response {
    let request = ("DELETE", JOB_ROUTE, &request_id);
    let job = match owned_job(&ws, &principal, &id, "scheduler.delete", request).await {
        Ok(j) => j,
        Err(r) => return r,
    };
    let sql = format!("DELETE FROM {} WHERE id = $1", ws.tables.jobs);
    match sqlx::query(&sql).bind(job.id).execute(&ws.pool).await {
        Ok(r) if r.rows_affected() == 1 => {
            audit(
                &ws,
                &principal,
                "scheduler.delete",
                job_resource(job.id),
                vec!["deleted".into()],
                &request_id,
            );
            StatusCode::NO_CONTENT.into_response()
        }
        Ok(_) => not_found("job"),
        Err(e) => store_unavailable(&e),
    }
}

async fn run_job(
    State(ws): State<Arc<Shared>>,
    Extension(principal): Extension<Principal>,
    Extension(request_id): Extension<RequestId>,
    Path(id): Path<String>,
) -> Response {
    let request = ("POST", JOB_RUN_ROUTE, &request_id);
    let job = match owned_job(&ws, &principal, &id, "scheduler.run", request).await {
        Ok(j) => j,
        Err(r) => return r,
    };
    let sql = format!(
        "UPDATE {} SET next_run_at = now(), run_now = true WHERE id = $1 RETURNING next_run_at",
        ws.tables.jobs
    );
    match sqlx::query_scalar::<_, DateTime<Utc>>(&sql)
        .bind(job.id)
        .fetch_optional(&ws.pool)
        .await
    {
        Ok(Some(due)) => {
            audit(
                &ws,
                &principal,
                "scheduler.run",
                job_resource(job.id),
                vec!["run_requested".into()],
                &request_id,
            );
            ws.wake_runner.notify_one();
            (
                StatusCode::ACCEPTED,
                Json(serde_json::json!({ "job_id": job.id, "due_at": due })),
            )
                .into_response()
        }
        Ok(None) => not_found("job"),
        Err(e) => store_unavailable(&e),
    }
}

async fn job_history(
    State(ws): State<Arc<Shared>>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
) -> Response {
    let id = match parse_id(&id) {
        Ok(id) => id,
        Err(p) => return p.into_response(),
    };
    let sql = format!(
        "SELECT r.id, r.job_id, r.scheduled_for, r.trigger, r.fence, r.status, r.detail,
                r.claimed_at, r.finished_at
         FROM {} j LEFT JOIN {} r ON r.job_id = j.id
         WHERE j.id = $1 AND j.tenant = $2
         ORDER BY r.scheduled_for DESC LIMIT 1000",
        ws.tables.jobs, ws.tables.runs
    );
    let rows = sqlx::query_as::<_, OptionalRun>(&sql)
        .bind(id)
        .bind(&principal.tenant)
        .fetch_all(&ws.pool)
        .await;
    match rows {
        Ok(rows) if rows.is_empty() => not_found("job"),
        Ok(rows) => {
            let runs: Vec<JobRun> = rows.into_iter().filter_map(OptionalRun::run).collect();
            Json(serde_json::json!({ "job_id": id, "runs": runs })).into_response()
        }
        Err(e) => store_unavailable(&e),
    }
}

/// A history row of the job/run outer join (all `None` for a job without
/// runs).
#[derive(sqlx::FromRow)]
struct OptionalRun {
    id: Option<Uuid>,
    job_id: Option<Uuid>,
    scheduled_for: Option<DateTime<Utc>>,
    trigger: Option<String>,
    fence: Option<i64>,
    status: Option<String>,
    detail: Option<String>,
    claimed_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
}

impl OptionalRun {
    fn run(self) -> Option<JobRun> {
        Some(JobRun {
            id: self.id?,
            job_id: self.job_id?,
            scheduled_for: self.scheduled_for?,
            trigger: self.trigger?,
            fence: self.fence?,
            status: self.status?,
            detail: self.detail,
            claimed_at: self.claimed_at?,
            finished_at: self.finished_at,
        })
    }
}

/// Starts the runner loop of this replica (see the module docs).
pub(super) async fn spawn_runner(
    runtime: &Runtime,
    redis: &RedisClient,
    ws: Arc<Shared>,
    stop: CancellationToken,
) -> Result<JoinHandle<()>, PlatformError> {
    let s = &ws.settings.scheduler;
    let lease = Lease::new(
        redis,
        LeaseOptions::new(Duration::from_millis(s.lease_ttl_ms)),
    )?;
    let admin = TopicAdmin::new(&runtime.settings.bus)?;
    if let Err(e) = admin.ensure_topics(&[s.topic.as_str()], false).await {
        // Publishing still works: runs wait in the outbox for the broker.
        tracing::warn!(event = "ensure_topics_failed", error = %e);
    }
    let runner = Runner {
        store: RunStore::new(ws.pool.clone(), &ws.tables),
        publisher: runtime.publisher.clone(),
        ws,
    };
    Ok(tokio::spawn(runner.run(lease, stop)))
}

struct Runner {
    store: RunStore,
    publisher: DurablePublisher,
    ws: Arc<Shared>,
}

impl Runner {
    async fn run(self, lease: Lease, stop: CancellationToken) {
        let tick = Duration::from_millis(self.ws.settings.scheduler.tick_ms);
        loop {
            let acquired = tokio::select! {
                () = stop.cancelled() => return,
                g = lease.try_acquire(LEASE_TENANT, LEASE_NAME) => g,
            };
            match acquired {
                Ok(Some(guard)) => {
                    self.hold(&guard, &stop).await;
                    let _ = guard.release().await;
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(event = "scheduler_lease_failed", error = %e),
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(tick) => {}
            }
        }
    }

    /// Runs due jobs while `guard` is held.
    async fn hold(&self, guard: &LeaseGuard, stop: &CancellationToken) {
        let token = i64::try_from(guard.token()).unwrap_or(i64::MAX);
        tracing::info!(event = "scheduler_lease_acquired", fence = token);
        let s = &self.ws.settings.scheduler;
        let tick = Duration::from_millis(s.tick_ms);
        let stale_after = Duration::from_millis(s.lease_ttl_ms);
        while guard.is_held() && !stop.is_cancelled() {
            match self.store.claim_due(token, stale_after).await {
                Ok(runs) => {
                    for run in runs {
                        if !guard.is_held() {
                            break;
                        }
                        self.publish(token, run).await;
                    }
                }
                Err(e) if e.is_fenced() => {
                    tracing::warn!(event = "scheduler_fenced", fence = token);
                    return;
                }
                Err(e) => tracing::warn!(event = "scheduler_claim_failed", error = %e),
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = guard.lost() => {
                    tracing::warn!(event = "scheduler_lease_lost", fence = token);
                    return;
                }
                () = tokio::time::sleep(tick) => {}
                () = self.ws.wake_runner.notified() => {}
            }
        }
    }

    /// Publishes one claimed run and records its result.
    async fn publish(&self, token: i64, run: ClaimedRun) {
        let envelope = Envelope::builder(RUN_EVENT, run.tenant.as_str(), run.job_id.to_string())
            .id(run.id)
            .json(&serde_json::json!({
                "run_id": run.id,
                "job_id": run.job_id,
                "job_name": run.job_name,
                "owner": run.owner,
                "scheduled_for": run.scheduled_for,
                "trigger": run.trigger,
                "payload": run.payload,
            }))
            .and_then(|b| b.build());
        let (status, detail) = match envelope {
            Err(e) => ("failed", format!("invalid envelope: {e}")),
            Ok(env) => match self
                .publisher
                .publish(&self.ws.settings.scheduler.topic, &env)
                .await
            {
                Ok(PublishOutcome::Published { .. }) => ("published", "kafka".to_owned()),
                Ok(PublishOutcome::Deferred(_)) => ("published", "deferred".to_owned()),
                // Not recorded: the run stays claimed and is published
                // again by the next tick after `lease_ttl_ms`.
                Err(e) => {
                    tracing::warn!(event = "scheduler_publish_failed", run_id = %run.id, error = %e);
                    return;
                }
            },
        };
        let body = serde_json::json!({
            "job_id": run.job_id,
            "job_name": run.job_name,
            "run_id": run.id,
            "status": status,
            "detail": detail,
        });
        match self
            .store
            .record(
                token,
                run.id,
                status,
                &detail,
                Some(RunNote {
                    notifications: &self.ws.notifications,
                    tenant: &run.tenant,
                    subject: &run.owner,
                    body: &body,
                }),
            )
            .await
        {
            Ok(true) => {
                tracing::info!(event = "scheduler_run_recorded", run_id = %run.id, job_id = %run.job_id, status, fence = token);
            }
            Ok(false) => {
                tracing::warn!(event = "scheduler_fenced", run_id = %run.id, fence = token);
            }
            Err(e) => {
                tracing::warn!(event = "scheduler_record_failed", run_id = %run.id, error = %e);
            }
        }
    }
}

/// A run claimed for publishing.
#[derive(Debug, sqlx::FromRow)]
struct ClaimedRun {
    id: Uuid,
    job_id: Uuid,
    tenant: String,
    owner: String,
    job_name: String,
    scheduled_for: DateTime<Utc>,
    trigger: String,
    payload: SqlJson<Value>,
}

/// Why the runner's store refused or failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RunStoreError {
    /// A newer runner holds the fence: this one's writes are refused.
    #[error("fenced out by a newer scheduler lease")]
    Fenced,
    /// PostgreSQL failed.
    #[error(transparent)]
    Postgres(#[from] sqlx::Error),
}

impl RunStoreError {
    fn is_fenced(&self) -> bool {
        matches!(self, Self::Fenced)
    }
}

/// A notification written with a run's result, in its transaction.
struct RunNote<'a> {
    notifications: &'a super::Notifications,
    tenant: &'a str,
    subject: &'a str,
    body: &'a Value,
}

/// The runner's writes, each fenced by the lease's token.
#[derive(Debug, Clone)]
pub(crate) struct RunStore {
    pool: PgPool,
    jobs: String,
    runs: String,
    fences: String,
}

impl RunStore {
    fn new(pool: PgPool, t: &Tables) -> Self {
        Self {
            pool,
            jobs: t.jobs.clone(),
            runs: t.runs.clone(),
            fences: t.fences.clone(),
        }
    }

    /// Raises the fence to `token` in `tx`: refused when a newer token
    /// already raised it higher. The row lock is held to the commit, so a
    /// newer runner's raise waits for this transaction, then wins.
    async fn fence(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        token: i64,
    ) -> Result<(), RunStoreError> {
        let sql = format!(
            "INSERT INTO {f} (name, token) VALUES ($1, $2)
             ON CONFLICT (name) DO UPDATE SET token = EXCLUDED.token
             WHERE {f}.token <= EXCLUDED.token
             RETURNING token",
            f = self.fences
        );
        let raised: Option<i64> = sqlx::query_scalar(&sql)
            .bind(LEASE_NAME)
            .bind(token)
            .fetch_optional(&mut **tx)
            .await?;
        raised.map(|_| ()).ok_or(RunStoreError::Fenced)
    }

    /// Claims every due job as a run (moving its `next_run_at`) and
    /// returns them with the runs claimed earlier and left unrecorded for
    /// longer than `stale_after` (a runner died between claim and record).
    async fn claim_due(
        &self,
        token: i64,
        stale_after: Duration,
    ) -> Result<Vec<ClaimedRun>, RunStoreError> {
        let mut tx = self.pool.begin().await?;
        self.fence(&mut tx, token).await?;
        let due = format!(
            "SELECT id, schedule, next_run_at, run_now FROM {} \
             WHERE (enabled OR run_now) AND next_run_at <= now() \
             ORDER BY next_run_at LIMIT $1 FOR UPDATE SKIP LOCKED",
            self.jobs
        );
        let rows: Vec<(Uuid, SqlJson<Schedule>, DateTime<Utc>, bool)> = sqlx::query_as(&due)
            .bind(CLAIM_BATCH)
            .fetch_all(&mut *tx)
            .await?;
        let now = Utc::now();
        let insert = format!(
            "INSERT INTO {} (id, job_id, tenant, owner, scheduled_for, trigger, fence, status)
             SELECT $1, id, tenant, owner, $2, $3, $4, 'claimed' FROM {} WHERE id = $5
             ON CONFLICT (job_id, scheduled_for) DO NOTHING",
            self.runs, self.jobs
        );
        let advance = format!(
            "UPDATE {} SET next_run_at = $2, run_now = false WHERE id = $1",
            self.jobs
        );
        for (job_id, schedule, scheduled_for, run_now) in rows {
            let trigger = if run_now { "manual" } else { "schedule" };
            sqlx::query(&insert)
                .bind(Uuid::now_v7())
                .bind(scheduled_for)
                .bind(trigger)
                .bind(token)
                .bind(job_id)
                .execute(&mut *tx)
                .await?;
            let next = schedule.0.next_after(scheduled_for, now);
            sqlx::query(&advance)
                .bind(job_id)
                .bind(next)
                .execute(&mut *tx)
                .await?;
        }
        let pending = format!(
            "SELECT r.id, r.job_id, r.tenant, r.owner, j.name AS job_name, r.scheduled_for,
                    r.trigger, j.payload
             FROM {} r JOIN {} j ON j.id = r.job_id
             WHERE r.status = 'claimed' AND (r.fence = $1 OR r.claimed_at < now() - $2::bigint * interval '1 millisecond')
             ORDER BY r.scheduled_for",
            self.runs, self.jobs
        );
        let stale_ms = i64::try_from(stale_after.as_millis()).unwrap_or(i64::MAX);
        let runs = sqlx::query_as::<_, ClaimedRun>(&pending)
            .bind(token)
            .bind(stale_ms)
            .fetch_all(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(runs)
    }

    /// Records a run's result (and its notification, in the same
    /// transaction) if `token` is still the newest fence: `Ok(false)` when
    /// it is not (a newer runner took over) or the run was recorded
    /// already.
    async fn record(
        &self,
        token: i64,
        run_id: Uuid,
        status: &str,
        detail: &str,
        note: Option<RunNote<'_>>,
    ) -> Result<bool, RunStoreError> {
        let mut tx = self.pool.begin().await?;
        match self.fence(&mut tx, token).await {
            Err(RunStoreError::Fenced) => return Ok(false),
            other => other?,
        }
        let sql = format!(
            "UPDATE {} SET status = $2, detail = $3, fence = $4, finished_at = now()
             WHERE id = $1 AND status = 'claimed'",
            self.runs
        );
        let n = sqlx::query(&sql)
            .bind(run_id)
            .bind(status)
            .bind(detail)
            .bind(token)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if n != 1 {
            return Ok(false);
        }
        if let Some(n) = note {
            n.notifications
                .create_in(&mut tx, n.tenant, n.subject, RUN_NOTIFICATION, n.body)
                .await?;
        }
        tx.commit().await?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interval_schedules_skip_missed_periods_and_cron_follows_its_expression() {
        let t0 = DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let every = Schedule::EverySecs(10);
        let s = |n| t0 + chrono::Duration::seconds(n);
        assert_eq!(every.next_after(t0, s(1)), Some(s(10)));
        // 35 s late: the next period after now, not a burst of three.
        assert_eq!(every.next_after(t0, s(35)), Some(s(40)));
        let cron = Schedule::Cron("0 */5 * * * *".into());
        assert_eq!(cron.next_after(t0, s(1)), Some(s(300)));
    }

    #[test]
    fn bad_schedules_name_their_field() {
        let s = SchedulerSettings::default();
        let field = |sch: Schedule| sch.validate(&s).unwrap_err().0;
        assert_eq!(field(Schedule::EverySecs(0)), "schedule.every_secs");
        assert_eq!(field(Schedule::Cron("not cron".into())), "schedule.cron");
        assert_eq!(
            field(Schedule::Cron("0 0 0 1 1 * 2001".into())),
            "schedule.cron"
        );
        assert!(Schedule::Cron("*/2 * * * * *".into()).validate(&s).is_ok());
    }

    /// A runner whose lease was taken over cannot claim or record: the
    /// newer token raised the fence.
    #[tokio::test]
    async fn a_stale_token_cannot_claim_or_record_a_run() {
        let url = soma_testkit::require_postgres();
        let pool = PgPool::connect(&url).await.unwrap();
        let schema = soma_testkit::unique_name("ws_fence");
        super::super::migrate(&pool, &schema).await.unwrap();
        let store = RunStore::new(pool.clone(), &Tables::new(&schema));
        let job = Uuid::now_v7();
        sqlx::query(&format!(
            "INSERT INTO {schema}.jobs (id, tenant, owner, name, schedule, payload, enabled, next_run_at)
             VALUES ($1, 't', 'alice', 'j', '{{\"every_secs\": 60}}', 'null', true, now())"
        ))
        .bind(job)
        .execute(&pool)
        .await
        .unwrap();
        let stale = Duration::from_secs(60);
        let runs = store.claim_due(10, stale).await.unwrap();
        assert_eq!(runs.len(), 1);
        let run = runs[0].id;
        // A newer holder raises the fence; it finds the old holder's run
        // (not yet stale) not its own, and nothing else due.
        assert!(store.claim_due(20, stale).await.unwrap().is_empty());
        assert!(store.claim_due(10, stale).await.unwrap_err().is_fenced());
        assert!(
            !store
                .record(10, run, "published", "kafka", None)
                .await
                .unwrap()
        );
        let status: String = sqlx::query_scalar(&format!(
            "SELECT status FROM {schema}.job_runs WHERE id = $1"
        ))
        .bind(run)
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(status, "claimed", "the stale runner's result was refused");
        assert!(
            store
                .record(20, run, "published", "kafka", None)
                .await
                .unwrap()
        );
        assert!(
            !store
                .record(20, run, "published", "kafka", None)
                .await
                .unwrap()
        );
        sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
            .execute(&pool)
            .await
            .unwrap();
    }
}
