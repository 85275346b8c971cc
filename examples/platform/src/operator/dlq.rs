//! Dead-letter administration (`/v1/admin/dlq`, action `ops.admin`, flag
//! `dlq_admin`): list with filters, inspect one, replay one or a filtered
//! set, discard with a reason. Every action is audited through
//! soma-policy's audit ([`Authorizer::audit_outcome`]) after its route's
//! decision was.
//!
//! | Route | What it does |
//! |---|---|
//! | `GET /v1/admin/dlq?topic=&key=&error=&since=&until=&status=&limit=` | the newest records of the platform's DLQs (`operator.dlq_scan_max` per DLQ), filtered: `topic` (the topic or its DLQ), `key` (exact), `error` (substring, any case), `since`/`until` (RFC 3339, on the dead-letter time), `status` `pending` (default: neither replayed nor discarded), `replayed`, `discarded` or `all` |
//! | `GET /v1/admin/dlq/{dlq}/{partition}/{offset}` | one record with its payload and disposition |
//! | `POST /v1/admin/dlq/{dlq}/{partition}/{offset}/replay` | replays it to the topic the DLQ belongs to |
//! | `POST /v1/admin/dlq/replay` `{"topic", "key"?, "error"?, "since"?, "until"?}` | replays every pending record matching the filter |
//! | `POST /v1/admin/dlq/{dlq}/{partition}/{offset}/discard` `{"reason"}` | discards it: listed only with `status=discarded`/`all`, never replayed |
//!
//! **Replay goes only to the topic the DLQ belongs to** ([`DlqReader::replay`]
//! applies soma-bus's rules: a record whose origin header names another
//! topic is refused, `422 foreign_origin`; one replayed `bus.consumer.replay_max`
//! times is not, `409 replay_max_exceeded`).
//!
//! **The ledger** (`<operator.dlq_schema>.dlq_ledger`, PostgreSQL) records
//! each record's disposition: `discarded` (who, why, when) or `replayed`.
//! It is what makes a discard durable (a restart forgets nothing) and a
//! replay once: a replay first claims the record (`replaying`), then
//! republishes it and waits for the broker's ack, then marks it
//! `replayed`; a second replay of it is `409 already_replayed`. A claim
//! whose replay failed is released; one left by a crash between the claim
//! and the mark may be claimed again after a minute. A record republished
//! twice that way keeps its envelope id, so the consumer's inbox drops the
//! second copy (at-least-once on the bus, once in effect).

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use soma_bus::{BusProducer, DlqPosition, DlqReader, DlqRecord};
use soma_observability::http::{Problem, RequestId, json_body};
use soma_observability::metrics::MetricsRegistry;
use soma_policy::{Authorizer, AuthzInput, Principal, RequestInfo, Resource, RouteRule};
use sqlx::PgPool;

use super::features::{DLQ_ADMIN, Features};
use crate::PlatformError;
use crate::runtime::Runtime;

/// `GET` list.
pub const LIST_ROUTE: &str = "/v1/admin/dlq";
/// `POST` replay of a filtered set.
pub const REPLAY_SET_ROUTE: &str = "/v1/admin/dlq/replay";
/// `GET` one record.
pub const RECORD_ROUTE: &str = "/v1/admin/dlq/{dlq}/{partition}/{offset}";
/// `POST` replay of one record.
pub const REPLAY_ROUTE: &str = "/v1/admin/dlq/{dlq}/{partition}/{offset}/replay";
/// `POST` discard of one record.
pub const DISCARD_ROUTE: &str = "/v1/admin/dlq/{dlq}/{partition}/{offset}/discard";

const ACTION: &str = "ops.admin";

/// Longest discard reason kept, in characters.
pub const MAX_REASON_CHARS: usize = 1_000;

/// The policy rules: every DLQ route is `ops.admin` on kind `dlq`.
pub fn routes() -> Vec<RouteRule> {
    vec![
        RouteRule::new("GET", LIST_ROUTE, ACTION, "dlq"),
        RouteRule::new("POST", REPLAY_SET_ROUTE, ACTION, "dlq"),
        RouteRule::new("GET", RECORD_ROUTE, ACTION, "dlq").with_id_param("dlq"),
        RouteRule::new("POST", REPLAY_ROUTE, ACTION, "dlq").with_id_param("dlq"),
        RouteRule::new("POST", DISCARD_ROUTE, ACTION, "dlq").with_id_param("dlq"),
    ]
}

/// A record's disposition in the ledger.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Disposition {
    /// `replaying`, `replayed` or `discarded`.
    pub state: String,
    /// Why (a discard's reason).
    pub reason: Option<String>,
    /// Who (`tenant/subject`).
    pub actor: String,
    /// When.
    pub at: DateTime<Utc>,
}

type Key = (String, i32, i64);

/// A ledger row: topic, partition, offset, state, reason, actor, time.
type LedgerRow = (
    String,
    i32,
    i64,
    String,
    Option<String>,
    String,
    DateTime<Utc>,
);

/// The DLQ ledger (see the [module docs](self)).
#[derive(Clone, Debug)]
struct Ledger {
    pool: PgPool,
    table: String,
}

/// What claiming a record for replay found.
enum Claim {
    Claimed,
    Taken(Disposition),
}

impl Ledger {
    async fn new(pool: PgPool, schema: &str) -> Result<Self, PlatformError> {
        let valid = !schema.is_empty()
            && schema.len() <= 48
            && schema
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !valid {
            return Err(PlatformError::Policy(format!(
                "operator.dlq_schema {schema:?}: use 1-48 characters of [a-z0-9_]"
            )));
        }
        let ledger = Self {
            pool,
            table: format!("{schema}.dlq_ledger"),
        };
        let pg = |source| PlatformError::Postgres {
            url: "the gateway's pool".into(),
            source,
        };
        let mut tx = ledger.pool.begin().await.map_err(pg)?;
        // One migration at a time across gateway replicas.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
            .bind(&ledger.table)
            .execute(&mut *tx)
            .await
            .map_err(pg)?;
        sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS {schema}"))
            .execute(&mut *tx)
            .await
            .map_err(pg)?;
        sqlx::query(&format!(
            "CREATE TABLE IF NOT EXISTS {} (
                dlq_topic text NOT NULL,
                dlq_partition integer NOT NULL,
                dlq_offset bigint NOT NULL,
                state text NOT NULL CHECK (state IN ('replaying', 'replayed', 'discarded')),
                reason text,
                actor text NOT NULL,
                request_id text,
                at timestamptz NOT NULL DEFAULT now(),
                PRIMARY KEY (dlq_topic, dlq_partition, dlq_offset)
            )",
            ledger.table
        ))
        .execute(&mut *tx)
        .await
        .map_err(pg)?;
        tx.commit().await.map_err(pg)?;
        Ok(ledger)
    }

    async fn dispositions(&self, dlq: &str) -> Result<HashMap<Key, Disposition>, sqlx::Error> {
        let rows: Vec<LedgerRow> = sqlx::query_as(&format!(
            "SELECT dlq_topic, dlq_partition, dlq_offset, state, reason, actor, at
                 FROM {} WHERE dlq_topic = $1",
            self.table
        ))
        .bind(dlq)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(t, p, o, state, reason, actor, at)| {
                (
                    (t, p, o),
                    Disposition {
                        state,
                        reason,
                        actor,
                        at,
                    },
                )
            })
            .collect())
    }

    async fn get(&self, dlq: &str, pos: DlqPosition) -> Result<Option<Disposition>, sqlx::Error> {
        let mut all = self.dispositions_of(dlq, &[pos]).await?;
        Ok(all.remove(&(dlq.to_owned(), pos.partition, pos.offset)))
    }

    async fn dispositions_of(
        &self,
        dlq: &str,
        positions: &[DlqPosition],
    ) -> Result<HashMap<Key, Disposition>, sqlx::Error> {
        let all = self.dispositions(dlq).await?;
        Ok(all
            .into_iter()
            .filter(|((_, p, o), _)| {
                positions
                    .iter()
                    .any(|x| x.partition == *p && x.offset == *o)
            })
            .collect())
    }

    /// Claims the record for replay: `Taken` when it is replayed,
    /// discarded, or being replayed (a claim younger than a minute).
    async fn claim(
        &self,
        dlq: &str,
        pos: DlqPosition,
        actor: &str,
        request_id: &str,
    ) -> Result<Claim, sqlx::Error> {
        let claimed: Option<(i32,)> = sqlx::query_as(&format!(
            "INSERT INTO {t} AS l (dlq_topic, dlq_partition, dlq_offset, state, actor, request_id)
             VALUES ($1, $2, $3, 'replaying', $4, $5)
             ON CONFLICT (dlq_topic, dlq_partition, dlq_offset) DO UPDATE
               SET state = 'replaying', actor = $4, request_id = $5, at = now()
               WHERE l.state = 'replaying' AND l.at < now() - interval '60 seconds'
             RETURNING 1",
            t = self.table
        ))
        .bind(dlq)
        .bind(pos.partition)
        .bind(pos.offset)
        .bind(actor)
        .bind(request_id)
        .fetch_optional(&self.pool)
        .await?;
        if claimed.is_some() {
            return Ok(Claim::Claimed);
        }
        match self.get(dlq, pos).await? {
            Some(d) => Ok(Claim::Taken(d)),
            // Released between the two statements: a retry will claim it.
            None => Ok(Claim::Taken(Disposition {
                state: "replaying".into(),
                reason: None,
                actor: actor.to_owned(),
                at: Utc::now(),
            })),
        }
    }

    async fn settle(&self, dlq: &str, pos: DlqPosition, replayed: bool) -> Result<(), sqlx::Error> {
        let sql = if replayed {
            format!(
                "UPDATE {} SET state = 'replayed', at = now()
                 WHERE dlq_topic = $1 AND dlq_partition = $2 AND dlq_offset = $3",
                self.table
            )
        } else {
            format!(
                "DELETE FROM {} WHERE dlq_topic = $1 AND dlq_partition = $2 AND dlq_offset = $3
                 AND state = 'replaying'",
                self.table
            )
        };
        sqlx::query(&sql)
            .bind(dlq)
            .bind(pos.partition)
            .bind(pos.offset)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Discards the record; `Some(existing)` when it already has a
    /// disposition (nothing changed).
    async fn discard(
        &self,
        dlq: &str,
        pos: DlqPosition,
        reason: &str,
        actor: &str,
        request_id: &str,
    ) -> Result<Option<Disposition>, sqlx::Error> {
        let done: Option<(i32,)> = sqlx::query_as(&format!(
            "INSERT INTO {} (dlq_topic, dlq_partition, dlq_offset, state, reason, actor, request_id)
             VALUES ($1, $2, $3, 'discarded', $4, $5, $6)
             ON CONFLICT DO NOTHING RETURNING 1",
            self.table
        ))
        .bind(dlq)
        .bind(pos.partition)
        .bind(pos.offset)
        .bind(reason)
        .bind(actor)
        .bind(request_id)
        .fetch_optional(&self.pool)
        .await?;
        if done.is_some() {
            return Ok(None);
        }
        self.get(dlq, pos).await
    }
}

/// The DLQ routes of one gateway.
#[derive(Clone)]
pub struct DlqAdmin {
    inner: Arc<Inner>,
}

struct Inner {
    reader: DlqReader,
    producer: BusProducer,
    ledger: Ledger,
    authz: Arc<Authorizer>,
    features: Features,
    metrics: MetricsRegistry,
    /// The platform's topics whose DLQs are administered.
    topics: Vec<String>,
    scan_max: usize,
}

impl std::fmt::Debug for DlqAdmin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DlqAdmin")
            .field("topics", &self.inner.topics)
            .finish_non_exhaustive()
    }
}

impl DlqAdmin {
    /// On the runtime's bus, producer and pool; migrates the ledger.
    ///
    /// # Errors
    /// Bad `operator.dlq_schema` or bus settings; PostgreSQL unreachable.
    pub async fn start(
        runtime: &Runtime,
        authz: Arc<Authorizer>,
        features: Features,
    ) -> Result<Self, PlatformError> {
        let settings = &runtime.settings;
        let ledger = Ledger::new(runtime.pool.clone(), &settings.operator.dlq_schema).await?;
        Ok(Self {
            inner: Arc::new(Inner {
                reader: DlqReader::new(&settings.bus)?,
                producer: runtime.producer.clone(),
                ledger,
                authz,
                features,
                metrics: runtime.metrics.clone(),
                topics: settings.topics().iter().map(|t| (*t).to_owned()).collect(),
                scan_max: settings.operator.dlq_scan_max,
            }),
        })
    }

    /// The five routes, gated by flag `dlq_admin`.
    pub fn router<S: Clone + Send + Sync + 'static>(&self) -> Router<S> {
        let routes = Router::new()
            .route(LIST_ROUTE, get(list))
            .route(REPLAY_SET_ROUTE, post(replay_set))
            .route(RECORD_ROUTE, get(inspect))
            .route(REPLAY_ROUTE, post(replay_one))
            .route(DISCARD_ROUTE, post(discard))
            .with_state(self.clone());
        self.inner.features.gate(DLQ_ADMIN, routes)
    }
}

impl Inner {
    /// The DLQ topic for `name` (a platform topic or its DLQ), or `404
    /// unknown_dlq`.
    fn dlq_name(&self, name: &str) -> Result<String, Problem> {
        self.topics
            .iter()
            .find(|t| *t == name || self.reader.dlq_of(t) == name)
            .map(|t| self.reader.dlq_of(t))
            .ok_or_else(|| {
                not_found(
                    "unknown_dlq",
                    format!("{name:?} is not one of the platform's topics or their DLQs"),
                )
            })
    }

    fn audit(&self, who: &Caller, resource: String, outcome: &'static str, details: Vec<String>) {
        let input = AuthzInput::new(
            &who.principal,
            ACTION,
            Resource {
                kind: "dlq".into(),
                id: Some(resource),
            },
        )
        .with_request(RequestInfo {
            method: who.method.to_owned(),
            route: who.route.to_owned(),
            request_id: Some(who.request_id.clone()),
        });
        self.authz.audit_outcome(&input, outcome, &details);
    }

    /// The records of `dlq` matching `filter`, with their dispositions.
    async fn matching(
        &self,
        dlq: &str,
        filter: &Filter,
    ) -> Result<Vec<(DlqRecord, Option<Disposition>)>, Problem> {
        let records = self
            .reader
            .read(dlq, self.scan_max)
            .await
            .map_err(bus_problem)?;
        let mut ledger = self
            .ledger
            .dispositions(dlq)
            .await
            .map_err(ledger_problem)?;
        Ok(records
            .into_iter()
            .filter(|r| filter.matches(r))
            .map(|r| {
                let d = ledger.remove(&(dlq.to_owned(), r.position.partition, r.position.offset));
                (r, d)
            })
            .filter(|(_, d)| filter.status.admits(d.as_ref()))
            .collect())
    }
}

/// The caller of an action, for the audit trail.
struct Caller {
    principal: Principal,
    request_id: String,
    method: &'static str,
    route: &'static str,
}

impl Caller {
    fn new(
        principal: Principal,
        id: &RequestId,
        method: &'static str,
        route: &'static str,
    ) -> Self {
        Self {
            principal,
            request_id: id.header_value().to_str().unwrap_or_default().to_owned(),
            method,
            route,
        }
    }

    fn actor(&self) -> String {
        format!("{}/{}", self.principal.tenant, self.principal.subject)
    }
}

/// `404` with `code`.
fn not_found(code: &str, detail: String) -> Problem {
    Problem::new(StatusCode::NOT_FOUND, code, detail)
}

fn bus_problem(e: soma_bus::BusError) -> Problem {
    tracing::warn!(event = "dlq_read_failed", error = %e);
    Problem::service_unavailable(
        "bus_unavailable",
        "the DLQ cannot be read right now; retry later",
    )
}

fn ledger_problem(e: sqlx::Error) -> Problem {
    tracing::warn!(event = "dlq_ledger_unavailable", error = %e);
    Problem::service_unavailable(
        "dlq_ledger_unavailable",
        "the DLQ ledger (PostgreSQL) cannot be read right now; retry later",
    )
}

/// Which dispositions a list shows.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
enum Status {
    /// Neither replayed nor discarded (being replayed counts as replayed).
    #[default]
    Pending,
    Replayed,
    Discarded,
    All,
}

impl Status {
    fn admits(self, d: Option<&Disposition>) -> bool {
        match (self, d) {
            (Status::All, _) => true,
            (Status::Pending, d) => d.is_none(),
            (Status::Replayed, Some(d)) => d.state != "discarded",
            (Status::Discarded, Some(d)) => d.state == "discarded",
            _ => false,
        }
    }
}

/// The list's query, and a set replay's body.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FilterInput {
    topic: Option<String>,
    key: Option<String>,
    error: Option<String>,
    since: Option<String>,
    until: Option<String>,
    #[serde(default)]
    status: Status,
    limit: Option<usize>,
}

#[derive(Debug)]
struct Filter {
    key: Option<String>,
    error: Option<String>,
    since: Option<DateTime<Utc>>,
    until: Option<DateTime<Utc>>,
    status: Status,
}

impl FilterInput {
    fn parse(&self) -> Result<Filter, Problem> {
        let time = |name: &str, v: &Option<String>| -> Result<Option<DateTime<Utc>>, Problem> {
            v.as_deref()
                .map(|s| {
                    DateTime::parse_from_rfc3339(s)
                        .map(|t| t.with_timezone(&Utc))
                        .map_err(|e| {
                            Problem::bad_request(
                                "invalid_time",
                                format!("{name} must be an RFC 3339 time: {e}"),
                            )
                        })
                })
                .transpose()
        };
        Ok(Filter {
            key: self.key.clone(),
            error: self.error.as_ref().map(|e| e.to_lowercase()),
            since: time("since", &self.since)?,
            until: time("until", &self.until)?,
            status: self.status,
        })
    }
}

impl Filter {
    fn matches(&self, r: &DlqRecord) -> bool {
        let at = failed_at(r);
        self.key
            .as_ref()
            .is_none_or(|k| r.key.as_deref() == Some(k.as_str()))
            && self.error.as_ref().is_none_or(|e| {
                r.error
                    .as_deref()
                    .is_some_and(|x| x.to_lowercase().contains(e.as_str()))
            })
            && self.since.is_none_or(|s| at.is_some_and(|t| t >= s))
            && self.until.is_none_or(|u| at.is_some_and(|t| t <= u))
    }
}

/// When the record was dead-lettered: its header, else the broker's time.
fn failed_at(r: &DlqRecord) -> Option<DateTime<Utc>> {
    r.failed_at
        .as_deref()
        .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
        .map(|t| t.with_timezone(&Utc))
        .or_else(|| r.timestamp_ms.and_then(DateTime::from_timestamp_millis))
}

fn record_id(r: &DlqRecord) -> String {
    format!(
        "{}/{}/{}",
        r.dlq_topic, r.position.partition, r.position.offset
    )
}

fn summary(r: &DlqRecord, d: Option<&Disposition>) -> serde_json::Value {
    let mut v = serde_json::to_value(r).unwrap_or_default();
    v["id"] = json!(record_id(r));
    v["dead_lettered_at"] = json!(failed_at(r));
    v["disposition"] = json!(d);
    v
}

/// `GET /v1/admin/dlq`.
async fn list(
    State(admin): State<DlqAdmin>,
    Extension(principal): Extension<Principal>,
    Extension(id): Extension<RequestId>,
    query: Result<Query<FilterInput>, QueryRejection>,
) -> Response {
    let Query(input) = match query {
        Ok(q) => q,
        Err(e) => return Problem::bad_request("invalid_query", e.body_text()).into_response(),
    };
    let me = &admin.inner;
    let filter = match input.parse() {
        Ok(f) => f,
        Err(p) => return p.into_response(),
    };
    let dlqs = match &input.topic {
        Some(t) => match me.dlq_name(t) {
            Ok(d) => vec![d],
            Err(p) => return p.into_response(),
        },
        None => me.topics.iter().map(|t| me.reader.dlq_of(t)).collect(),
    };
    let limit = input.limit.unwrap_or(100).clamp(1, me.scan_max);
    let mut out = Vec::new();
    for dlq in &dlqs {
        match me.matching(dlq, &filter).await {
            Ok(rows) => out.extend(rows.iter().map(|(r, d)| summary(r, d.as_ref()))),
            Err(p) => return p.into_response(),
        }
    }
    let total = out.len();
    // Newest first.
    out.sort_by(|a, b| {
        b["dead_lettered_at"]
            .as_str()
            .cmp(&a["dead_lettered_at"].as_str())
    });
    out.truncate(limit);
    let who = Caller::new(principal, &id, "GET", LIST_ROUTE);
    me.audit(
        &who,
        dlqs.join(","),
        "listed",
        vec![format!("matched={total}")],
    );
    Json(json!({ "records": out, "matched": total, "dlqs": dlqs })).into_response()
}

/// The record named by the path, or the problem answer.
async fn find(
    me: &Inner,
    (dlq, partition, offset): &(String, String, String),
) -> Result<(String, DlqRecord, Option<Disposition>), Problem> {
    let dlq = me.dlq_name(dlq)?;
    let pos = match (partition.parse(), offset.parse()) {
        (Ok(partition), Ok(offset)) => DlqPosition { partition, offset },
        _ => {
            return Err(Problem::bad_request(
                "invalid_position",
                "partition and offset must be integers",
            ));
        }
    };
    let record = me
        .reader
        .get(&dlq, pos)
        .await
        .map_err(bus_problem)?
        .ok_or_else(|| {
            not_found(
                "dlq_record_not_found",
                format!("no record at {dlq}/{}/{}", pos.partition, pos.offset),
            )
        })?;
    let d = me.ledger.get(&dlq, pos).await.map_err(ledger_problem)?;
    Ok((dlq, record, d))
}

/// `GET /v1/admin/dlq/{dlq}/{partition}/{offset}`.
async fn inspect(
    State(admin): State<DlqAdmin>,
    Extension(principal): Extension<Principal>,
    Extension(id): Extension<RequestId>,
    Path(path): Path<(String, String, String)>,
) -> Response {
    let me = &admin.inner;
    let (_, record, d) = match find(me, &path).await {
        Ok(found) => found,
        Err(p) => return p.into_response(),
    };
    let mut v = summary(&record, d.as_ref());
    v["payload"] = serde_json::from_slice(&record.payload)
        .unwrap_or_else(|_| json!(String::from_utf8_lossy(&record.payload)));
    let who = Caller::new(principal, &id, "GET", RECORD_ROUTE);
    me.audit(&who, record_id(&record), "inspected", Vec::new());
    Json(v).into_response()
}

/// Replays one record through the ledger; the outcome's name.
async fn replay_record(
    me: &Inner,
    who: &Caller,
    dlq: &str,
    pos: DlqPosition,
) -> Result<&'static str, Problem> {
    match me
        .ledger
        .claim(dlq, pos, &who.actor(), &who.request_id)
        .await
        .map_err(ledger_problem)?
    {
        Claim::Claimed => {}
        Claim::Taken(d) if d.state == "discarded" => return Ok("discarded"),
        Claim::Taken(_) => return Ok("already_replayed"),
    }
    let result = me
        .reader
        .replay(&me.producer, dlq, &[pos], Some(&me.metrics))
        .await;
    let outcome = match result {
        Ok((_, outcomes)) => outcomes.first().map_or("missing", |(_, o)| *o),
        Err(e) => {
            let _ = me.ledger.settle(dlq, pos, false).await;
            tracing::warn!(event = "dlq_replay_failed", dlq, error = %e);
            return Err(Problem::service_unavailable(
                "bus_unavailable",
                "the record could not be republished; retry later",
            ));
        }
    };
    me.ledger
        .settle(dlq, pos, outcome == "replayed")
        .await
        .map_err(ledger_problem)?;
    Ok(outcome)
}

/// `POST /v1/admin/dlq/{dlq}/{partition}/{offset}/replay`.
async fn replay_one(
    State(admin): State<DlqAdmin>,
    Extension(principal): Extension<Principal>,
    Extension(id): Extension<RequestId>,
    Path(path): Path<(String, String, String)>,
) -> Response {
    let me = &admin.inner;
    let (dlq, record, _) = match find(me, &path).await {
        Ok(found) => found,
        Err(p) => return p.into_response(),
    };
    let who = Caller::new(principal, &id, "POST", REPLAY_ROUTE);
    let rid = record_id(&record);
    let outcome = match replay_record(me, &who, &dlq, record.position).await {
        Ok(o) => o,
        Err(p) => return p.into_response(),
    };
    me.audit(&who, rid.clone(), outcome_audit(outcome), Vec::new());
    let target = me.reader.origin_of(&dlq).unwrap_or_default();
    let conflict = |code: &str, detail: String| {
        Problem::new(StatusCode::CONFLICT, code, detail).into_response()
    };
    match outcome {
        "replayed" => {
            Json(json!({ "id": rid, "outcome": outcome, "topic": target })).into_response()
        }
        "discarded" => conflict(
            "discarded",
            format!("{rid} was discarded; it is not replayed"),
        ),
        "already_replayed" => conflict("already_replayed", format!("{rid} was replayed already")),
        "exceeded" => conflict(
            "replay_max_exceeded",
            format!("{rid} was replayed bus.consumer.replay_max times already"),
        ),
        "refused" => Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "foreign_origin",
            format!("{rid} claims another origin than {target}; it is replayed only to {target}"),
        )
        .into_response(),
        "malformed" => Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "malformed_record",
            format!("{rid} has no origin header"),
        )
        .into_response(),
        _ => not_found("dlq_record_not_found", format!("no record at {rid}")).into_response(),
    }
}

fn outcome_audit(outcome: &'static str) -> &'static str {
    match outcome {
        "replayed" => "replayed",
        _ => "replay_refused",
    }
}

/// `POST /v1/admin/dlq/replay`.
async fn replay_set(
    State(admin): State<DlqAdmin>,
    Extension(principal): Extension<Principal>,
    Extension(id): Extension<RequestId>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let me = &admin.inner;
    let input: FilterInput = match json_body(&headers, body) {
        Ok(i) => i,
        Err(p) => return p.into_response(),
    };
    let Some(topic) = input.topic.as_deref() else {
        return Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "topic_required",
            "a filtered replay names its topic (or DLQ)",
        )
        .into_response();
    };
    if input.status != Status::Pending {
        return Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            "only pending records are replayed (leave status out)",
        )
        .into_response();
    }
    let (dlq, filter) = match (me.dlq_name(topic), input.parse()) {
        (Ok(d), Ok(f)) => (d, f),
        (Err(p), _) | (_, Err(p)) => return p.into_response(),
    };
    let rows = match me.matching(&dlq, &filter).await {
        Ok(rows) => rows,
        Err(p) => return p.into_response(),
    };
    let limit = input.limit.unwrap_or(me.scan_max).clamp(1, me.scan_max);
    let who = Caller::new(principal, &id, "POST", REPLAY_SET_ROUTE);
    let mut results = Vec::new();
    let mut counts: HashMap<&'static str, u64> = HashMap::new();
    for (r, _) in rows.iter().take(limit) {
        let outcome = match replay_record(me, &who, &dlq, r.position).await {
            Ok(o) => o,
            Err(p) => {
                me.audit(
                    &who,
                    dlq.clone(),
                    "replay_interrupted",
                    vec![format!("{counts:?}")],
                );
                return p.into_response();
            }
        };
        *counts.entry(outcome).or_default() += 1;
        results.push(json!({ "id": record_id(r), "outcome": outcome }));
    }
    let mut details: Vec<String> = counts.iter().map(|(k, v)| format!("{k}={v}")).collect();
    details.sort();
    me.audit(&who, dlq.clone(), "replayed_set", details);
    Json(json!({
        "dlq": dlq,
        "topic": me.reader.origin_of(&dlq).unwrap_or_default(),
        "matched": rows.len(),
        "replayed": counts.get("replayed").copied().unwrap_or(0),
        "records": results,
    }))
    .into_response()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DiscardBody {
    reason: String,
}

/// `POST /v1/admin/dlq/{dlq}/{partition}/{offset}/discard`.
async fn discard(
    State(admin): State<DlqAdmin>,
    Extension(principal): Extension<Principal>,
    Extension(id): Extension<RequestId>,
    Path(path): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let me = &admin.inner;
    let input: DiscardBody = match json_body(&headers, body) {
        Ok(i) => i,
        Err(p) => return p.into_response(),
    };
    let reason = input.reason.trim();
    if reason.is_empty() || reason.chars().count() > MAX_REASON_CHARS {
        return Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "reason_required",
            format!("a discard needs a reason of 1-{MAX_REASON_CHARS} characters"),
        )
        .into_response();
    }
    let (dlq, record, _) = match find(me, &path).await {
        Ok(found) => found,
        Err(p) => return p.into_response(),
    };
    let who = Caller::new(principal, &id, "POST", DISCARD_ROUTE);
    let rid = record_id(&record);
    match me
        .ledger
        .discard(&dlq, record.position, reason, &who.actor(), &who.request_id)
        .await
    {
        Ok(None) => {
            me.audit(&who, rid.clone(), "discarded", vec![reason.to_owned()]);
            Json(json!({ "id": rid, "outcome": "discarded", "reason": reason })).into_response()
        }
        Ok(Some(d)) => {
            me.audit(&who, rid.clone(), "discard_refused", vec![d.state.clone()]);
            Problem::new(
                StatusCode::CONFLICT,
                format!("already_{}", d.state),
                format!("{rid} is {} already (by {} at {})", d.state, d.actor, d.at),
            )
            .into_response()
        }
        Err(e) => ledger_problem(e).into_response(),
    }
}
