//! Versioned, idempotent migrations into a configurable schema.
//!
//! sqlx's `migrate!` fixes the SQL (and the schema) at compile time, so the
//! crate runs its own small migrator: each migration is embedded with
//! `include_str!`, the validated schema name is substituted, and the applied
//! versions are recorded with a checksum in `<schema>.schema_migrations`.
//! Concurrent callers serialize on a transaction-level advisory lock, and
//! each migration runs in the same transaction as its bookkeeping row, so a
//! migration is applied exactly once or not at all.

use sqlx::{Connection, PgPool};

use crate::OutboxError;

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
        name: "dead_letter_order",
        sql: include_str!("../migrations/0002_dead_letter_order.sql"),
    },
];

/// Latest schema version this crate knows.
pub(crate) const LATEST_VERSION: i32 = 2;

/// SQL for one migration with placeholders filled in.
fn render(sql: &str, schema: &str) -> String {
    sql.replace("{schema}", &quote_ident(schema))
        .replace("{channel}", &channel_name(schema))
}

/// Double-quoted identifier. `schema` is already validated to
/// `[a-z_][a-z0-9_]*`, quoting is belt and braces.
pub(crate) fn quote_ident(schema: &str) -> String {
    format!("\"{}\"", schema.replace('"', "\"\""))
}

/// LISTEN/NOTIFY channel for a schema (fits in 63 bytes for any schema name).
pub(crate) fn channel_name(schema: &str) -> String {
    format!("soma_outbox_{:016x}", fnv64(schema.as_bytes()))
}

/// Advisory-lock namespace for a schema, in `0..2^30` (so keys stay positive
/// when Postgres shows them as `oid` in `pg_locks`).
pub(crate) fn lock_namespace(schema: &str) -> i32 {
    (fnv64(schema.as_bytes()) & 0x3fff_fffc) as i32
}

fn fnv64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Stable checksum of a migration's SQL text (before substitution).
fn checksum(sql: &str) -> String {
    format!("{:016x}", fnv64(sql.as_bytes()))
}

/// Creates the schema if needed and applies every pending migration.
pub(crate) async fn migrate(pool: &PgPool, schema: &str) -> Result<(), OutboxError> {
    let q = quote_ident(schema);
    let mut conn = pool.acquire().await?;
    let mut tx = conn.begin().await?;
    // Serialize concurrent migrators of this schema (CREATE SCHEMA IF NOT
    // EXISTS itself races on the catalog's unique index).
    sqlx::query("SELECT pg_advisory_xact_lock($1, 0)")
        .bind(lock_namespace(schema) | 3)
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
    let applied: Vec<(i32, String, String)> = sqlx::query_as(&format!(
        "SELECT version, name, checksum FROM {q}.schema_migrations ORDER BY version"
    ))
    .fetch_all(&mut *tx)
    .await?;
    if let Some((v, name, _)) = applied.iter().find(|(v, ..)| *v > LATEST_VERSION) {
        return Err(OutboxError::Migration {
            version: *v,
            name: "unknown",
            reason: format!(
                "schema {schema} has migration {v} ({name}) applied, newer than this \
                 soma-outbox knows ({LATEST_VERSION}); upgrade the crate"
            ),
        });
    }
    for m in MIGRATIONS {
        let sum = checksum(m.sql);
        if let Some((_, _, got)) = applied.iter().find(|(v, ..)| *v == m.version) {
            if *got != sum {
                return Err(OutboxError::Migration {
                    version: m.version,
                    name: m.name,
                    reason: format!(
                        "recorded checksum {got} differs from the embedded {sum}: \
                         the migration was edited after it was applied"
                    ),
                });
            }
            continue;
        }
        sqlx::raw_sql(&render(m.sql, schema))
            .execute(&mut *tx)
            .await
            .map_err(|e| OutboxError::Migration {
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
            schema,
            version = m.version,
            name = m.name,
            "soma-outbox migration applied"
        );
    }
    tx.commit().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_substitutes_quoted_schema_and_channel() {
        let sql = render("CREATE TABLE {schema}.t; SELECT '{channel}'", "abc");
        assert_eq!(
            sql,
            format!("CREATE TABLE \"abc\".t; SELECT '{}'", channel_name("abc"))
        );
        assert!(channel_name(&"z".repeat(63)).len() <= 63);
        assert!(lock_namespace("x") >= 0 && lock_namespace("x") < (1 << 30));
        assert!(!MIGRATIONS[0].sql.contains("{schema }"));
        assert_eq!(MIGRATIONS.last().map(|m| m.version), Some(LATEST_VERSION));
    }
}
