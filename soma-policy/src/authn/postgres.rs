//! PostgreSQL API-key store (feature `postgres`).

use std::time::SystemTime;

use async_trait::async_trait;
use sqlx::PgPool;
use sqlx::Row;

use super::apikey::{ApiKeyRecord, ApiKeyStore, StoreError};

/// API-key records in a PostgreSQL table `<schema>.soma_api_keys`.
///
/// Only the lookup id and the SHA-256 of each key are stored. Call
/// [`PgApiKeyStore::migrate`] once to create the schema and table.
#[derive(Debug, Clone)]
pub struct PgApiKeyStore {
    pool: PgPool,
    table: String,
    schema: String,
}

fn unavailable(e: sqlx::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

impl PgApiKeyStore {
    /// A store in `schema` (a plain identifier: letters, digits, `_`).
    pub fn new(pool: PgPool, schema: &str) -> Result<Self, StoreError> {
        let ok = !schema.is_empty()
            && schema.len() <= 63
            && schema
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_')
            && !schema.as_bytes()[0].is_ascii_digit();
        if !ok {
            return Err(StoreError::Invalid(format!("schema name {schema:?}")));
        }
        Ok(Self {
            pool,
            table: format!("\"{schema}\".soma_api_keys"),
            schema: schema.to_owned(),
        })
    }

    /// Creates the schema and table if missing (idempotent).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS \"{}\"", self.schema))
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
        sqlx::query(&format!(
            "CREATE TABLE IF NOT EXISTS {} (
                lookup_id  TEXT PRIMARY KEY,
                key_hash   BYTEA NOT NULL,
                subject    TEXT NOT NULL,
                tenant     TEXT NOT NULL,
                roles      TEXT[] NOT NULL DEFAULT '{{}}',
                scopes     TEXT[] NOT NULL DEFAULT '{{}}',
                created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
                expires_at TIMESTAMPTZ,
                revoked_at TIMESTAMPTZ
            )",
            self.table
        ))
        .execute(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(())
    }
}

#[async_trait]
impl ApiKeyStore for PgApiKeyStore {
    async fn find(&self, lookup_id: &str) -> Result<Option<ApiKeyRecord>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT lookup_id, key_hash, subject, tenant, roles, scopes,
                    EXTRACT(EPOCH FROM expires_at)::float8 AS expires_epoch,
                    revoked_at IS NOT NULL AS revoked
             FROM {} WHERE lookup_id = $1",
            self.table
        ))
        .bind(lookup_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(unavailable)?;
        let Some(row) = row else { return Ok(None) };
        let hash: Vec<u8> = row.try_get("key_hash").map_err(unavailable)?;
        let key_hash: [u8; 32] = hash
            .try_into()
            .map_err(|_| StoreError::Invalid("stored hash length".into()))?;
        let expires: Option<f64> = row.try_get("expires_epoch").map_err(unavailable)?;
        Ok(Some(ApiKeyRecord {
            lookup_id: row.try_get("lookup_id").map_err(unavailable)?,
            key_hash,
            subject: row.try_get("subject").map_err(unavailable)?,
            tenant: row.try_get("tenant").map_err(unavailable)?,
            roles: row.try_get("roles").map_err(unavailable)?,
            scopes: row.try_get("scopes").map_err(unavailable)?,
            expires_at: expires
                .map(|s| SystemTime::UNIX_EPOCH + std::time::Duration::from_secs_f64(s.max(0.0))),
            revoked: row.try_get("revoked").map_err(unavailable)?,
        }))
    }

    async fn insert(&self, r: ApiKeyRecord) -> Result<(), StoreError> {
        let expires = r.expires_at.map(|t| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0)
        });
        let res = sqlx::query(&format!(
            "INSERT INTO {} (lookup_id, key_hash, subject, tenant, roles, scopes, expires_at, revoked_at)
             VALUES ($1, $2, $3, $4, $5, $6, to_timestamp($7), CASE WHEN $8 THEN now() END)",
            self.table
        ))
        .bind(&r.lookup_id)
        .bind(&r.key_hash[..])
        .bind(&r.subject)
        .bind(&r.tenant)
        .bind(&r.roles)
        .bind(&r.scopes)
        .bind(expires)
        .bind(r.revoked)
        .execute(&self.pool)
        .await;
        match res {
            Ok(_) => Ok(()),
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Err(StoreError::Duplicate),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn revoke(&self, lookup_id: &str) -> Result<bool, StoreError> {
        let res = sqlx::query(&format!(
            "UPDATE {} SET revoked_at = COALESCE(revoked_at, now()) WHERE lookup_id = $1",
            self.table
        ))
        .bind(lookup_id)
        .execute(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(res.rows_affected() > 0)
    }
}
