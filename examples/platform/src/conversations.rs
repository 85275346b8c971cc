//! Who owns each conversation: the principal that first used it.
//!
//! A conversation id names one conversation platform-wide. The first
//! authenticated request that names it (a message or an event stream)
//! creates it, owned by that request's tenant and subject; the owner never
//! changes. The gateway and the conversation worker put the owner in the
//! policy input (`context.owner`, `context.resource_tenant`), and the
//! reference policy denies any other subject (`not_conversation_owner`) and
//! any other tenant (`tenant_mismatch`), whatever their roles.
//!
//! Stored in PostgreSQL (`<chat.session_events_schema>.conversations`),
//! beside the session event store. Owners are immutable, so each process
//! keeps the ones it has looked up in a bounded in-memory map (cleared
//! whole when it reaches [`CACHE_CAPACITY`]; a miss costs one query).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use sqlx::PgPool;

use crate::session_events::SessionEventsError;

/// Owners kept in memory per process before the map is cleared.
pub const CACHE_CAPACITY: usize = 100_000;

/// The principal a conversation belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// The owner's tenant.
    pub tenant: String,
    /// The owner's subject.
    pub subject: String,
}

/// The conversation ownership store (see the module docs).
#[derive(Debug, Clone)]
pub struct Conversations {
    pool: PgPool,
    schema: String,
    table: String,
    cache: Arc<Mutex<HashMap<String, Owner>>>,
}

impl Conversations {
    /// The store in `schema` (already validated by the session event
    /// store, whose schema it shares).
    pub(crate) fn new(pool: PgPool, schema: &str) -> Self {
        Self {
            pool,
            schema: schema.to_owned(),
            table: format!("{schema}.conversations"),
            cache: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Creates the table if missing (serialized on an advisory lock, so
    /// several processes may start at once).
    pub async fn migrate(&self) -> Result<(), SessionEventsError> {
        let table = format!(
            "CREATE TABLE IF NOT EXISTS {} (
                conversation_id TEXT PRIMARY KEY,
                tenant TEXT NOT NULL,
                owner TEXT NOT NULL,
                created_at TIMESTAMPTZ NOT NULL DEFAULT now())",
            self.table
        );
        let lock = format!("soma-conversations:{}", self.schema);
        crate::schema::create_locked(&self.pool, &lock, &self.schema, &[table]).await?;
        Ok(())
    }

    fn cached(&self, conversation_id: &str) -> Option<Owner> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.get(conversation_id).cloned()
    }

    fn remember(&self, conversation_id: &str, owner: &Owner) {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= CACHE_CAPACITY {
            cache.clear();
        }
        cache.insert(conversation_id.to_owned(), owner.clone());
    }

    /// The owner of `conversation_id`; when it has none yet, it becomes
    /// `tenant`/`subject`'s (the first to use it owns it).
    pub async fn owner_or_claim(
        &self,
        conversation_id: &str,
        tenant: &str,
        subject: &str,
    ) -> Result<Owner, SessionEventsError> {
        if let Some(o) = self.cached(conversation_id) {
            return Ok(o);
        }
        // The insert and the read are one statement; a concurrent first
        // claim that commits while it runs is seen by the second try.
        for _ in 0..2 {
            let row: Option<(String, String)> = sqlx::query_as(&format!(
                "WITH ins AS (
                    INSERT INTO {t} (conversation_id, tenant, owner) VALUES ($1, $2, $3)
                    ON CONFLICT (conversation_id) DO NOTHING
                    RETURNING tenant, owner)
                 SELECT tenant, owner FROM ins
                 UNION ALL
                 SELECT tenant, owner FROM {t} WHERE conversation_id = $1
                 LIMIT 1",
                t = self.table
            ))
            .bind(conversation_id)
            .bind(tenant)
            .bind(subject)
            .fetch_optional(&self.pool)
            .await?;
            if let Some((tenant, subject)) = row {
                let owner = Owner { tenant, subject };
                self.remember(conversation_id, &owner);
                return Ok(owner);
            }
        }
        Err(SessionEventsError::Database(sqlx::Error::RowNotFound))
    }

    /// The owner of `conversation_id`, `None` when nobody has used it.
    pub async fn owner(&self, conversation_id: &str) -> Result<Option<Owner>, SessionEventsError> {
        if let Some(o) = self.cached(conversation_id) {
            return Ok(Some(o));
        }
        let row: Option<(String, String)> = sqlx::query_as(&format!(
            "SELECT tenant, owner FROM {} WHERE conversation_id = $1",
            self.table
        ))
        .bind(conversation_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|(tenant, subject)| {
            let owner = Owner { tenant, subject };
            self.remember(conversation_id, &owner);
            owner
        }))
    }
}
