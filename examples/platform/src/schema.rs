//! Creating the example's own tables: one place for the pattern every store
//! of the platform uses (session events, conversations, the memory replica,
//! and any table an operator route adds).
//!
//! Several processes of the platform start at once and each creates what it
//! needs, so creation runs in one transaction holding a transaction-scoped
//! advisory lock named after the store and its schema: the first process
//! creates, the others wait and then find everything there.

use sqlx::PgPool;

/// Runs `statements` (idempotent DDL: `CREATE … IF NOT EXISTS`) in one
/// transaction serialized on the advisory lock `lock` (hashed with
/// PostgreSQL's `hashtext`), after creating `schema` if it is missing.
///
/// `schema` must already be validated as a plain identifier by the caller
/// (it is interpolated into SQL).
pub async fn create_locked(
    pool: &PgPool,
    lock: &str,
    schema: &str,
    statements: &[String],
) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
        .bind(lock)
        .execute(&mut *tx)
        .await?;
    sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS {schema}"))
        .execute(&mut *tx)
        .await?;
    for s in statements {
        sqlx::query(s).execute(&mut *tx).await?;
    }
    tx.commit().await
}
