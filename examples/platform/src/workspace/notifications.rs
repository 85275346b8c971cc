//! Notifications: written by the platform's workers for one subject of a
//! tenant, kept until read or `ttl_secs` old, streamed over SSE.
//!
//! Two workers create them today:
//!
//! - the scheduler's runner, when it records a run of a job
//!   (`scheduler.run_completed`, to the job's owner, in the transaction
//!   that records the run: a recorded run always has its notification);
//! - the dead-letter watcher, when a chat message of the user's lands on
//!   the requests topic's DLQ (`message.dead_lettered`, to the message's
//!   sender; the notification's id is the message's, so a redelivered DLQ
//!   record notifies once).
//!
//! A janitor in every gateway deletes expired notifications every
//! `janitor_interval_ms` and sets the gauge
//! `soma_platform_notifications_pending` (unread, unexpired, all tenants)
//! from the same pass. The stream (`GET /v1/notifications/stream`) polls
//! the store every `stream_poll_ms`, so a notification written on any
//! replica reaches a stream on any other within that period; each event's
//! `id:` is the notification's sequence number, and a client reconnecting
//! with `Last-Event-ID` gets every notification after it that is still
//! kept.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use chrono::{DateTime, Utc};
use futures::Stream;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use soma_bus::{BusConsumer, ConsumerHandle, Envelope, HandlerError};
use soma_observability::http::RequestId;
use soma_observability::metrics::MetricsRegistry;
use soma_observability::prometheus_client::metrics::gauge::Gauge;
use soma_observability::shutdown::Shutdown;
use soma_policy::{Principal, Resource};
use sqlx::{PgConnection, PgPool};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{
    NOTIFICATION_READ_ROUTE, NOTIFICATIONS_ROUTE, NOTIFICATIONS_STREAM_ROUTE, Shared,
    authorize_owned, not_found, parse_id, store_unavailable,
};
use crate::PlatformError;
use crate::protocol::ChatRequest;
use crate::runtime::Runtime;

/// Notification kind of a dead-lettered chat message.
pub const DEAD_LETTER_NOTIFICATION: &str = "message.dead_lettered";
/// Most notifications a list or one stream poll returns.
const PAGE: i64 = 200;

/// The notifications' settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct NotificationSettings {
    /// How long a notification is kept, read or not, in seconds.
    pub ttl_secs: u64,
    /// How often the janitor deletes expired notifications (and measures
    /// the pending gauge), in milliseconds.
    pub janitor_interval_ms: u64,
    /// How often a notification stream looks for new notifications, in
    /// milliseconds.
    pub stream_poll_ms: u64,
}

impl Default for NotificationSettings {
    fn default() -> Self {
        Self {
            ttl_secs: 7 * 86_400,
            janitor_interval_ms: 60_000,
            stream_poll_ms: 1_000,
        }
    }
}

/// A notification as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow)]
pub struct Notification {
    /// Its id.
    pub id: Uuid,
    /// Its position in the store (the SSE event id).
    pub seq: i64,
    /// What happened (`scheduler.run_completed`, `message.dead_lettered`).
    pub kind: String,
    /// The details.
    #[sqlx(json)]
    pub body: Value,
    /// Created.
    pub created_at: DateTime<Utc>,
    /// Deleted by the janitor after this.
    pub expires_at: DateTime<Utc>,
    /// When the recipient marked it read.
    pub read_at: Option<DateTime<Utc>>,
}

/// The notification store.
#[derive(Debug, Clone)]
pub struct Notifications {
    pool: PgPool,
    table: String,
    settings: NotificationSettings,
    pending: Gauge,
}

const COLUMNS: &str = "id, seq, kind, body, created_at, expires_at, read_at";

impl Notifications {
    pub(super) fn new(
        pool: PgPool,
        schema: &str,
        settings: NotificationSettings,
        metrics: &MetricsRegistry,
    ) -> Self {
        let pending = metrics
            .gauge_family::<Vec<(&'static str, &'static str)>>(
                "soma_platform_notifications_pending",
                "Notifications neither read nor expired, all tenants (measured by the \
                 janitor every workspace.notifications.janitor_interval_ms)",
            )
            .get_or_create(&Vec::new())
            .clone();
        Self {
            pool,
            table: format!("{schema}.notifications"),
            settings,
            pending,
        }
    }

    /// Writes a notification for `subject` of `tenant` on `conn` (the
    /// caller's transaction), expiring after `ttl_secs`. `id` makes it
    /// idempotent: a second write with the same id is a no-op.
    pub(crate) async fn create_on(
        &self,
        conn: &mut PgConnection,
        id: Uuid,
        tenant: &str,
        subject: &str,
        kind: &str,
        body: &Value,
    ) -> Result<(), sqlx::Error> {
        let sql = format!(
            "INSERT INTO {} (id, tenant, subject, kind, body, expires_at)
             VALUES ($1, $2, $3, $4, $5, now() + $6::bigint * interval '1 second')
             ON CONFLICT (id) DO NOTHING",
            self.table
        );
        sqlx::query(&sql)
            .bind(id)
            .bind(tenant)
            .bind(subject)
            .bind(kind)
            .bind(sqlx::types::Json(body))
            .bind(i64::try_from(self.settings.ttl_secs).unwrap_or(i64::MAX))
            .execute(conn)
            .await?;
        Ok(())
    }

    /// [`create_on`](Self::create_on) in `tx`, with a new id.
    pub(crate) async fn create_in(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Postgres>,
        tenant: &str,
        subject: &str,
        kind: &str,
        body: &Value,
    ) -> Result<(), sqlx::Error> {
        self.create_on(tx, Uuid::now_v7(), tenant, subject, kind, body)
            .await
    }

    /// The unexpired notifications of `subject` after sequence `after`,
    /// oldest first (`newest_first`: the newest `PAGE`, newest first).
    async fn list(
        &self,
        tenant: &str,
        subject: &str,
        after: i64,
        newest_first: bool,
    ) -> Result<Vec<Notification>, sqlx::Error> {
        let order = if newest_first { "DESC" } else { "ASC" };
        let sql = format!(
            "SELECT {COLUMNS} FROM {} WHERE tenant = $1 AND subject = $2 AND seq > $3
             AND expires_at > now() ORDER BY seq {order} LIMIT $4",
            self.table
        );
        sqlx::query_as::<_, Notification>(&sql)
            .bind(tenant)
            .bind(subject)
            .bind(after)
            .bind(PAGE)
            .fetch_all(&self.pool)
            .await
    }

    /// One janitor pass: deletes expired notifications, measures the
    /// pending ones; returns how many were deleted.
    pub(crate) async fn sweep(&self) -> Result<u64, sqlx::Error> {
        let deleted = sqlx::query(&format!(
            "DELETE FROM {} WHERE expires_at <= now()",
            self.table
        ))
        .execute(&self.pool)
        .await?
        .rows_affected();
        let pending: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM {} WHERE read_at IS NULL AND expires_at > now()",
            self.table
        ))
        .fetch_one(&self.pool)
        .await?;
        self.pending.set(pending);
        Ok(deleted)
    }

    /// Runs [`sweep`](Self::sweep) every `janitor_interval_ms` until `stop`.
    pub(super) fn spawn_janitor(&self, stop: CancellationToken) -> JoinHandle<()> {
        let this = self.clone();
        let every = Duration::from_millis(self.settings.janitor_interval_ms);
        tokio::spawn(async move {
            loop {
                match this.sweep().await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(event = "notifications_expired", deleted = n),
                    Err(e) => tracing::warn!(event = "notification_janitor_failed", error = %e),
                }
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(every) => {}
                }
            }
        })
    }
}

/// The notifications' routes.
pub(super) fn router() -> Router<Arc<Shared>> {
    Router::new()
        .route(NOTIFICATIONS_ROUTE, get(list))
        .route(NOTIFICATIONS_STREAM_ROUTE, get(stream))
        .route(NOTIFICATION_READ_ROUTE, post(mark_read))
}

async fn list(
    State(ws): State<Arc<Shared>>,
    Extension(principal): Extension<Principal>,
) -> Response {
    match ws
        .notifications
        .list(&principal.tenant, &principal.subject, 0, true)
        .await
    {
        Ok(n) => Json(serde_json::json!({ "notifications": n })).into_response(),
        Err(e) => store_unavailable(&e),
    }
}

async fn mark_read(
    State(ws): State<Arc<Shared>>,
    Extension(principal): Extension<Principal>,
    Extension(request_id): Extension<RequestId>,
    Path(id): Path<String>,
) -> Response {
    let id = match parse_id(&id) {
        Ok(id) => id,
        Err(p) => return p.into_response(),
    };
    let table = &ws.notifications.table;
    // Private to the recipient: another subject's or tenant's is "not found".
    let owner: Result<Option<String>, _> = sqlx::query_scalar(&format!(
        "SELECT subject FROM {table} WHERE id = $1 AND tenant = $2 AND subject = $3
         AND expires_at > now()"
    ))
    .bind(id)
    .bind(&principal.tenant)
    .bind(&principal.subject)
    .fetch_optional(&ws.pool)
    .await;
    let owner = match owner {
        Ok(Some(o)) => o,
        Ok(None) => return not_found("notification"),
        Err(e) => return store_unavailable(&e),
    };
    let resource = Resource {
        kind: "notification".into(),
        id: Some(id.to_string()),
    };
    let request = ("POST", NOTIFICATION_READ_ROUTE, &request_id);
    if let Err(r) = authorize_owned(
        &ws,
        &principal,
        "notifications.ack",
        resource,
        &owner,
        request,
    )
    .await
    {
        return r;
    }
    let done = sqlx::query(&format!(
        "UPDATE {table} SET read_at = coalesce(read_at, now()) WHERE id = $1"
    ))
    .bind(id)
    .execute(&ws.pool)
    .await;
    match done {
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => store_unavailable(&e),
    }
}

/// `GET /v1/notifications/stream`: see the module docs.
async fn stream(
    State(ws): State<Arc<Shared>>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
) -> Response {
    let after = headers
        .get(crate::gateway::LAST_EVENT_ID)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<i64>().ok())
        .unwrap_or(0);
    let poll = Duration::from_millis(ws.settings.notifications.stream_poll_ms);
    let events = poll_stream(
        ws.notifications.clone(),
        principal,
        after,
        poll,
        ws.lifecycle.clone(),
    );
    Sse::new(events)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

struct PollState {
    store: Notifications,
    principal: Principal,
    after: i64,
    poll: Duration,
    lifecycle: Shutdown,
    queued: std::collections::VecDeque<Notification>,
    first: bool,
    done: bool,
}

/// The stream's events: every kept notification after `after`, then new
/// ones as the poll finds them; ends (with a `shutdown` event) when the
/// gateway drains, or after an `unavailable` event when the store fails.
fn poll_stream(
    store: Notifications,
    principal: Principal,
    after: i64,
    poll: Duration,
    lifecycle: Shutdown,
) -> impl Stream<Item = Result<Event, axum::Error>> + Send {
    let state = PollState {
        store,
        principal,
        after,
        poll,
        lifecycle,
        queued: Default::default(),
        first: true,
        done: false,
    };
    futures::stream::unfold(state, |mut s| async move {
        loop {
            if s.done {
                return None;
            }
            if let Some(n) = s.queued.pop_front() {
                s.after = n.seq;
                let event = Event::default()
                    .event("notification")
                    .id(n.seq.to_string())
                    .json_data(&n);
                return Some((event, s));
            }
            if !s.first {
                let draining = s.lifecycle.draining();
                tokio::select! {
                    () = draining => {
                        s.done = true;
                        return Some((Ok(Event::default().event("shutdown").data("reconnect")), s));
                    }
                    () = tokio::time::sleep(s.poll) => {}
                }
            }
            s.first = false;
            match s
                .store
                .list(&s.principal.tenant, &s.principal.subject, s.after, false)
                .await
            {
                Ok(found) => s.queued.extend(found),
                Err(e) => {
                    tracing::warn!(event = "notification_stream_unavailable", error = %e);
                    s.done = true;
                    return Some((Ok(Event::default().event("unavailable").data("retry")), s));
                }
            }
        }
    })
}

/// Notifies the sender of every chat message dead-lettered on the
/// requests topic (see the module docs).
pub(super) fn spawn_dlq_watcher(
    runtime: &Runtime,
    store: Notifications,
) -> Result<ConsumerHandle, PlatformError> {
    let settings = &runtime.settings;
    let dlq = settings.bus.dlq_topic(&settings.chat.requests_topic);
    let pool = runtime.pool.clone();
    let handler = move |env: Envelope| {
        let (store, pool) = (store.clone(), pool.clone());
        async move {
            let request: ChatRequest = match env.json() {
                Ok(r) => r,
                // Not a chat message of a user: nobody to notify.
                Err(_) => return Ok(()),
            };
            let body = serde_json::json!({
                "message_id": env.id,
                "conversation_id": request.conversation_id,
                "request_id": request.request_id,
            });
            let mut conn = pool
                .acquire()
                .await
                .map_err(|e| HandlerError::retryable(e.to_string()))?;
            store
                .create_on(
                    &mut conn,
                    env.id,
                    &env.tenant,
                    &request.principal.subject,
                    DEAD_LETTER_NOTIFICATION,
                    &body,
                )
                .await
                .map_err(|e| HandlerError::retryable(e.to_string()))
        }
    };
    Ok(BusConsumer::builder(
        &runtime.settings.bus,
        &[dlq.as_str()],
        "dlq-notifications",
        handler,
    )
    .group(runtime.group("gateway-notifications"))
    .producer(runtime.producer.clone())
    .metrics(&runtime.metrics)
    .spawn()?)
}
