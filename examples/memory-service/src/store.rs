//! PostgreSQL storage: migrations, keyed writes, ranked recall, feedback.

use serde_json::Value;
use sqlx::{Connection, PgPool, Row};

use crate::config::{MemoryConfig, Ranking};
use crate::error::Error;

/// One embedded migration.
struct Migration {
    version: i32,
    name: &'static str,
    sql: &'static str,
}

const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "init",
        sql: include_str!("../migrations/0001_init.sql"),
    },
    Migration {
        version: 2,
        name: "tenant_seq",
        sql: include_str!("../migrations/0002_tenant_seq.sql"),
    },
    Migration {
        version: 3,
        name: "feedback_totals",
        sql: include_str!("../migrations/0003_feedback_totals.sql"),
    },
];

/// Advisory lock serialising `CREATE EXTENSION pg_trgm` across schemas
/// (the extension is per database; concurrent creators race on the catalog).
const EXTENSION_LOCK: i64 = 0x736f_6d61_7472_676d; // "somatrgm"

/// A memory ready to store.
#[derive(Debug, Clone)]
pub(crate) struct NewMemory {
    pub(crate) universe: String,
    pub(crate) key: String,
    /// What recall returns as `content`.
    pub(crate) payload: Value,
    /// What recall ranks against.
    pub(crate) search_text: String,
    pub(crate) coordinate: Vec<f64>,
    pub(crate) ttl_seconds: Option<u64>,
}

/// What a recall asks for.
#[derive(Debug, Clone)]
pub(crate) struct Query<'a> {
    pub(crate) tenant: &'a str,
    /// `None`: every namespace of the tenant (context evaluate).
    pub(crate) namespace: Option<&'a str>,
    pub(crate) universe: Option<&'a str>,
    pub(crate) text: &'a str,
    pub(crate) layer: LayerFilter,
    pub(crate) top_k: u32,
}

/// Which memories a recall considers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LayerFilter {
    /// Only the working-memory window.
    Wm,
    /// Every memory, reported as long-term.
    Ltm,
    /// Every memory, reported as `wm` when in the window, else `ltm`.
    Both,
}

/// One ranked memory.
#[derive(Debug, Clone)]
pub(crate) struct Hit {
    pub(crate) payload: Value,
    pub(crate) coordinate: Vec<f64>,
    pub(crate) score: f64,
    pub(crate) in_wm: bool,
}

/// A recall's hits (at most `top_k`) and the counts before the cut.
#[derive(Debug, Clone, Default)]
pub(crate) struct Recalled {
    pub(crate) hits: Vec<Hit>,
    /// Matching memories in the working-memory window.
    pub(crate) wm_matches: u64,
    /// All matching memories.
    pub(crate) matches: u64,
}

/// Stored feedback.
#[derive(Debug, Clone)]
pub(crate) struct Feedback<'a> {
    pub(crate) tenant: &'a str,
    pub(crate) session_id: &'a str,
    pub(crate) query: &'a str,
    pub(crate) prompt: &'a str,
    pub(crate) response_text: &'a str,
    pub(crate) utility: f64,
    pub(crate) reward: Option<f64>,
    pub(crate) metadata: Option<&'a Value>,
}

/// The tables of one schema.
#[derive(Debug, Clone)]
pub(crate) struct Store {
    pool: PgPool,
    /// Quoted schema name.
    schema: String,
    wm_capacity: i64,
    /// How many of a scope's newest memories recall scores.
    window: i64,
    ranking: Ranking,
    trigram_threshold: f64,
    recall_sql: RecallSql,
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

fn fnv64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

impl Store {
    /// Creates `pg_trgm` if needed, creates and migrates `schema`.
    pub(crate) async fn open(
        pool: PgPool,
        schema: &str,
        config: &MemoryConfig,
    ) -> Result<Self, Error> {
        let trgm = ensure_trgm(&pool).await?;
        migrate(&pool, schema, &trgm).await?;
        let q = quote_ident(schema);
        Ok(Store {
            recall_sql: RecallSql::new(&q, &quote_ident(&trgm)),
            pool,
            schema: q,
            wm_capacity: i64::from(config.wm_capacity),
            window: i64::from(config.recall_window),
            ranking: config.ranking,
            trigram_threshold: config.trigram_threshold,
        })
    }

    /// `SELECT 1`.
    pub(crate) async fn ping(&self) -> Result<(), Error> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Stores `items` under `tenant`/`namespace` in one transaction. Per
    /// item: `true` when it was a duplicate of the stored memory (same key,
    /// same content, not expired) and nothing changed.
    pub(crate) async fn write(
        &self,
        tenant: &str,
        namespace: &str,
        items: &[NewMemory],
    ) -> Result<Vec<bool>, Error> {
        let s = &self.schema;
        let sql = format!(
            "INSERT INTO {s}.memories
                 (tenant, namespace, universe, key, payload, search_text, coordinate, expires_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7,
                     CASE WHEN $8::bigint IS NULL THEN NULL
                          ELSE now() + make_interval(secs => $8::bigint) END)
             ON CONFLICT (tenant, namespace, universe, key) DO UPDATE
                 SET payload = EXCLUDED.payload,
                     search_text = EXCLUDED.search_text,
                     coordinate = EXCLUDED.coordinate,
                     expires_at = EXCLUDED.expires_at,
                     seq = nextval('{s}.memory_seq'),
                     written_at = now()
                 WHERE {s}.memories.payload IS DISTINCT FROM EXCLUDED.payload
                    OR {s}.memories.expires_at <= now()
             RETURNING id"
        );
        let mut conn = self.pool.acquire().await?;
        let mut tx = conn.begin().await?;
        let mut dedup = Vec::with_capacity(items.len());
        for m in items {
            let ttl = m.ttl_seconds.map(|t| i64::try_from(t).unwrap_or(i64::MAX));
            let row = sqlx::query(&sql)
                .bind(tenant)
                .bind(namespace)
                .bind(&m.universe)
                .bind(&m.key)
                .bind(&m.payload)
                .bind(&m.search_text)
                .bind(&m.coordinate)
                .bind(ttl)
                .fetch_optional(&mut *tx)
                .await?;
            dedup.push(row.is_none());
        }
        tx.commit().await?;
        Ok(dedup)
    }

    /// Ranked recall (see [`Ranking`]) over the scope's newest
    /// `recall_window` memories; ties go to the newer memory.
    pub(crate) async fn recall(&self, q: &Query<'_>) -> Result<Recalled, Error> {
        let mut out = match self.ranking {
            Ranking::Fts => self.recall_by(q, Score::Fts).await?,
            Ranking::Trigram => self.recall_by(q, Score::Trigram).await?,
            Ranking::Hybrid => {
                let mut out = self.recall_by(q, Score::Fts).await?;
                if out.hits.len() < q.top_k as usize {
                    // Full text found too few: the trigram pass adds what
                    // only similarity finds (misspellings, word parts),
                    // after every full-text hit.
                    let rest = self.recall_by(q, Score::TrigramRest).await?;
                    out.wm_matches += rest.wm_matches;
                    out.matches += rest.matches;
                    out.hits.extend(rest.hits);
                }
                out
            }
        };
        out.hits.truncate(q.top_k as usize);
        Ok(out)
    }

    async fn recall_by(&self, q: &Query<'_>, score: Score) -> Result<Recalled, Error> {
        let layer = match q.layer {
            LayerFilter::Wm => "wm",
            LayerFilter::Ltm => "ltm",
            LayerFilter::Both => "both",
        };
        let min_score = match score {
            Score::Fts => 0.0,
            Score::Trigram | Score::TrigramRest => self.trigram_threshold,
        };
        let sql = self.recall_sql.get(score, q.namespace.is_some());
        let rows = sqlx::query(sql)
            .bind(q.tenant)
            .bind(q.namespace)
            .bind(q.text)
            .bind(self.wm_capacity)
            .bind(q.universe)
            .bind(layer)
            .bind(i64::from(q.top_k.max(1)))
            .bind(min_score)
            .bind(self.window)
            .fetch_all(&self.pool)
            .await?;
        let mut out = Recalled::default();
        for row in rows {
            out.wm_matches = row.try_get::<i64, _>("wm_count")?.max(0) as u64;
            out.matches = row.try_get::<i64, _>("all_count")?.max(0) as u64;
            out.hits.push(Hit {
                payload: row.try_get("payload")?,
                coordinate: row.try_get("coordinate")?,
                score: row.try_get("score")?,
                in_wm: row.try_get("in_wm")?,
            });
        }
        Ok(out)
    }

    /// Memories in the working-memory window of `tenant`/`namespace`.
    pub(crate) async fn wm_items(&self, tenant: &str, namespace: &str) -> Result<u64, Error> {
        let s = &self.schema;
        let n: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM (
                 SELECT 1 FROM {s}.memories
                 WHERE tenant = $1 AND namespace = $2
                   AND (expires_at IS NULL OR expires_at > now())
                 LIMIT $3) w"
        ))
        .bind(tenant)
        .bind(namespace)
        .bind(self.wm_capacity)
        .fetch_one(&self.pool)
        .await?;
        Ok(n.max(0) as u64)
    }

    /// Stores one feedback event and counts it in the tenant's total, in
    /// one statement; returns the tenant's feedback count.
    pub(crate) async fn record_feedback(&self, f: &Feedback<'_>) -> Result<u64, Error> {
        let s = &self.schema;
        let n: i64 = sqlx::query_scalar(&format!(
            "WITH stored AS (
                 INSERT INTO {s}.feedback
                     (tenant, session_id, query, prompt, response_text, utility, reward, metadata)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                 RETURNING tenant
             )
             INSERT INTO {s}.feedback_totals AS t (tenant, events)
             SELECT tenant, 1 FROM stored
             ON CONFLICT (tenant) DO UPDATE SET events = t.events + 1
             RETURNING events"
        ))
        .bind(f.tenant)
        .bind(f.session_id)
        .bind(f.query)
        .bind(f.prompt)
        .bind(f.response_text)
        .bind(f.utility)
        .bind(f.reward)
        .bind(f.metadata)
        .fetch_one(&self.pool)
        .await?;
        Ok(n.max(0) as u64)
    }

    /// Feedback events stored for `tenant` (one row read, whatever the
    /// tenant's history).
    pub(crate) async fn feedback_count(&self, tenant: &str) -> Result<u64, Error> {
        let s = &self.schema;
        let n: Option<i64> = sqlx::query_scalar(&format!(
            "SELECT events FROM {s}.feedback_totals WHERE tenant = $1"
        ))
        .bind(tenant)
        .fetch_optional(&self.pool)
        .await?;
        Ok(n.unwrap_or(0).max(0) as u64)
    }

    /// Deletes expired memories; returns how many.
    pub(crate) async fn sweep_expired(&self) -> Result<u64, Error> {
        let s = &self.schema;
        let done = sqlx::query(&format!(
            "DELETE FROM {s}.memories WHERE expires_at <= now()"
        ))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }
}

/// What a recall SQL scores by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Score {
    /// `ts_rank` of the memories the query's stemmed terms match.
    Fts,
    /// `word_similarity` of every memory in the window.
    Trigram,
    /// `word_similarity` of the memories full text does *not* match (the
    /// hybrid ranking's second pass).
    TrigramRest,
}

/// The recall SQL of one scoring and scope, built once per store.
#[derive(Debug, Clone)]
struct RecallSql {
    /// `[score][scoped]`: `scoped` names one namespace; otherwise every
    /// namespace of the tenant (context evaluate).
    by: [[String; 2]; 3],
}

impl RecallSql {
    fn new(s: &str, trgm: &str) -> Self {
        let all = |score| {
            [
                recall_sql(s, trgm, score, false),
                recall_sql(s, trgm, score, true),
            ]
        };
        RecallSql {
            by: [
                all(Score::Fts),
                all(Score::Trigram),
                all(Score::TrigramRest),
            ],
        }
    }

    fn get(&self, score: Score, scoped: bool) -> &str {
        &self.by[score as usize][usize::from(scoped)]
    }
}

/// The recall query. Parameters: `$1` tenant, `$2` namespace (NULL and
/// unused when not `scoped`), `$3` query text, `$4` WM capacity, `$5`
/// universe (NULL: all), `$6` layer, `$7` limit, `$8` minimum score, `$9`
/// the recall window.
///
/// The work is bounded: the window is the scope's newest `$9` live
/// memories, read in order from an index (`memories_scope_seq`, or
/// `memories_tenant_seq` for the whole tenant), and only those are scored.
/// The query's `tsquery` is computed once (a `MATERIALIZED` CTE; inlined,
/// PostgreSQL parsed and stemmed the query text again for every row).
fn recall_sql(s: &str, trgm: &str, score: Score, scoped: bool) -> String {
    // Full text: the query's stemmed terms OR-ed (plainto_tsquery ANDs them,
    // which misses a memory that shares only some words with a question).
    let similarity = format!("{trgm}.word_similarity($3, w.search_text)");
    let (score, matches) = match score {
        Score::Fts => ("ts_rank(w.tsv, q.tsq, 32)".to_owned(), "w.tsv @@ q.tsq"),
        Score::Trigram => (similarity, "TRUE"),
        Score::TrigramRest => (similarity, "NOT (w.tsv @@ q.tsq)"),
    };
    let scope = if scoped {
        "m.namespace = $2"
    } else {
        "$2::text IS NULL"
    };
    format!(
        "WITH q AS MATERIALIZED (
             SELECT replace(plainto_tsquery('english', $3)::text, ' & ', ' | ')::tsquery AS tsq
         ),
         w AS (
             SELECT m.seq, m.payload, m.coordinate, m.tsv, m.search_text, m.universe,
                    row_number() OVER (ORDER BY m.seq DESC) <= $4 AS in_wm
             FROM {s}.memories m
             WHERE m.tenant = $1 AND {scope}
               AND (m.expires_at IS NULL OR m.expires_at > now())
             ORDER BY m.seq DESC
             LIMIT $9
         ),
         scored AS (
             SELECT w.seq, w.payload, w.coordinate, w.in_wm, ({score})::float8 AS score
             FROM w, q
             WHERE {matches} AND ($5::text IS NULL OR w.universe = $5)
         )
         SELECT payload, coordinate, score, in_wm,
                count(*) FILTER (WHERE in_wm) OVER () AS wm_count,
                count(*) OVER () AS all_count
         FROM scored
         WHERE score >= $8 AND ($6 <> 'wm' OR in_wm)
         ORDER BY score DESC, seq DESC
         LIMIT $7"
    )
}

/// Creates `pg_trgm` (in `public`) unless it exists; returns its schema.
async fn ensure_trgm(pool: &PgPool) -> Result<String, Error> {
    let mut conn = pool.acquire().await?;
    let mut tx = conn.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(EXTENSION_LOCK)
        .execute(&mut *tx)
        .await?;
    sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_trgm WITH SCHEMA public")
        .execute(&mut *tx)
        .await?;
    let schema: String = sqlx::query_scalar(
        "SELECT n.nspname::text FROM pg_extension e
         JOIN pg_namespace n ON n.oid = e.extnamespace
         WHERE e.extname = 'pg_trgm'",
    )
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(schema)
}

/// Creates the schema if needed and applies every pending migration, each
/// in one transaction with its bookkeeping row, serialised per schema.
async fn migrate(pool: &PgPool, schema: &str, trgm: &str) -> Result<(), Error> {
    let q = quote_ident(schema);
    let mut conn = pool.acquire().await?;
    let mut tx = conn.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind((fnv64(schema.as_bytes()) >> 1) as i64)
        .execute(&mut *tx)
        .await?;
    sqlx::raw_sql(&format!(
        "CREATE SCHEMA IF NOT EXISTS {q};
         CREATE TABLE IF NOT EXISTS {q}.schema_migrations (
             version    integer PRIMARY KEY,
             name       text NOT NULL,
             checksum   text NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now()
         );"
    ))
    .execute(&mut *tx)
    .await?;
    let applied: Vec<(i32, String)> = sqlx::query_as(&format!(
        "SELECT version, checksum FROM {q}.schema_migrations ORDER BY version"
    ))
    .fetch_all(&mut *tx)
    .await?;
    let latest = MIGRATIONS.last().map_or(0, |m| m.version);
    if let Some((v, _)) = applied.iter().find(|(v, _)| *v > latest) {
        return Err(Error::Migration {
            version: *v,
            name: "unknown",
            reason: format!("schema {schema} is newer than this build (knows up to {latest})"),
        });
    }
    for m in MIGRATIONS {
        let sum = format!("{:016x}", fnv64(m.sql.as_bytes()));
        if let Some((_, got)) = applied.iter().find(|(v, _)| *v == m.version) {
            if *got != sum {
                return Err(Error::Migration {
                    version: m.version,
                    name: m.name,
                    reason: format!("recorded checksum {got} differs from the embedded {sum}"),
                });
            }
            continue;
        }
        let sql = m
            .sql
            .replace("{schema}", &q)
            .replace("{trgm}", &quote_ident(trgm));
        sqlx::raw_sql(&sql)
            .execute(&mut *tx)
            .await
            .map_err(|e| Error::Migration {
                version: m.version,
                name: m.name,
                reason: e.to_string(),
            })?;
        sqlx::query(&format!(
            "INSERT INTO {q}.schema_migrations (version, name, checksum) VALUES ($1, $2, $3)"
        ))
        .bind(m.version)
        .bind(m.name)
        .bind(&sum)
        .execute(&mut *tx)
        .await?;
        tracing::info!(
            event = "migration_applied",
            schema,
            version = m.version,
            name = m.name
        );
    }
    tx.commit().await?;
    Ok(())
}
