//! PostgreSQL API-key store (feature `postgres`).

use std::time::SystemTime;

use async_trait::async_trait;
use sqlx::PgPool;
use sqlx::Row;

use super::apikey::{ApiKeyRecord, ApiKeyStore, StoreError};
use crate::config::ApiKeyConfig;

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

/// `expires_at` as seconds since the epoch (PostgreSQL's `EXTRACT(EPOCH …)`)
/// to an expiry: `'infinity'` (and any instant past what `SystemTime` holds)
/// never expires; `'-infinity'`, instants before 1970 and NaN are already
/// expired.
fn expiry_from_epoch(secs: f64) -> Option<SystemTime> {
    if secs.is_nan() || secs <= 0.0 {
        return Some(SystemTime::UNIX_EPOCH);
    }
    std::time::Duration::try_from_secs_f64(secs)
        .ok()
        .and_then(|d| SystemTime::UNIX_EPOCH.checked_add(d))
}

impl PgApiKeyStore {
    /// A store in `schema` (a plain identifier: letters, digits, `_`).
    pub fn new(pool: PgPool, schema: &str) -> Result<Self, StoreError> {
        if !crate::config::is_identifier(schema) {
            return Err(StoreError::Invalid(format!("schema name {schema:?}")));
        }
        Ok(Self {
            pool,
            table: format!("\"{schema}\".soma_api_keys"),
            schema: schema.to_owned(),
        })
    }

    /// A store in `schema` on its own pool of at most `max_connections`
    /// connections to `url`, waiting at most 1 s for one.
    ///
    /// Prefer this to sharing a pool: every API-key request that gets past
    /// the negative cache and the failure limiter (see
    /// [`ApiKeyConfig`](crate::ApiKeyConfig)) costs a query, and on a shared
    /// pool a flood of them would take the connections the outbox and its
    /// fallback need. With its own pool, the worst a flood does is make
    /// API-key verification itself wait, then answer 503
    /// `auth_unavailable`.
    pub async fn connect(
        url: &str,
        schema: &str,
        max_connections: u32,
    ) -> Result<Self, StoreError> {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(max_connections.max(1))
            .acquire_timeout(std::time::Duration::from_secs(1))
            .connect(url)
            .await
            .map_err(unavailable)?;
        Self::new(pool, schema)
    }

    /// The store `config` describes: in `config.schema`, on its own pool of
    /// at most `config.max_connections` connections to `url` (see
    /// [`connect`](Self::connect)).
    ///
    /// # Errors
    ///
    /// [`StoreError::Config`] when `config` is invalid
    /// ([`ApiKeyConfig::validate`]; nothing is connected), or
    /// [`StoreError::Unavailable`] when the database cannot be reached.
    pub async fn from_config(url: &str, config: &ApiKeyConfig) -> Result<Self, StoreError> {
        config.validate()?;
        Self::connect(url, &config.schema, config.max_connections).await
    }

    /// The store's pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Creates the schema and table if missing (idempotent). Concurrent
    /// callers (replicas starting together) serialize on a transaction-level
    /// advisory lock: `CREATE ... IF NOT EXISTS` alone races on the
    /// catalog's unique index and fails one of them.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
            .bind(format!("soma-policy api keys {}", self.schema))
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS \"{}\"", self.schema))
            .execute(&mut *tx)
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
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)?;
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
            expires_at: expires.and_then(expiry_from_epoch),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn infinite_and_out_of_range_expiries_do_not_panic() {
        assert_eq!(expiry_from_epoch(f64::INFINITY), None);
        assert_eq!(expiry_from_epoch(1e300), None);
        assert_eq!(
            expiry_from_epoch(f64::NEG_INFINITY),
            Some(SystemTime::UNIX_EPOCH)
        );
        assert_eq!(expiry_from_epoch(f64::NAN), Some(SystemTime::UNIX_EPOCH));
        assert_eq!(expiry_from_epoch(-5.0), Some(SystemTime::UNIX_EPOCH));
        assert_eq!(
            expiry_from_epoch(10.0),
            Some(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(10))
        );
    }
}
