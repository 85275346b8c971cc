//! API keys: `<prefix>_<secret>`, stored as hashes, compared in constant time.
//!
//! The secret part is 43 URL-safe characters (32 random bytes). Its first
//! [`LOOKUP_ID_LEN`] characters are the key's public lookup id; the store keeps
//! the lookup id and the SHA-256 of the whole key, never the key itself. A
//! presented key is found by lookup id and accepted only when the SHA-256 of
//! what was presented equals the stored hash, compared in constant time.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use parking_lot::RwLock;
use sha2::{Digest, Sha256};
use soma_config::Secret;
use subtle::ConstantTimeEq;

use super::guard::KeyGuard;
use crate::{AuthKind, Principal};

/// Length of the public lookup id taken from the start of the secret part.
pub const LOOKUP_ID_LEN: usize = 12;

/// A stored API key: who it belongs to and the hash of the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyRecord {
    /// Public lookup id (first [`LOOKUP_ID_LEN`] characters of the secret part).
    pub lookup_id: String,
    /// SHA-256 of the full key string.
    pub key_hash: [u8; 32],
    /// Subject the key acts as.
    pub subject: String,
    /// Tenant the key belongs to.
    pub tenant: String,
    /// Roles granted.
    pub roles: Vec<String>,
    /// Scopes granted.
    pub scopes: Vec<String>,
    /// After this instant the key is rejected.
    pub expires_at: Option<SystemTime>,
    /// A revoked key is rejected.
    pub revoked: bool,
}

/// Error from an API-key store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The backing store failed (connection, query).
    #[error("api key store unavailable: {0}")]
    Unavailable(String),
    /// A record with this lookup id exists already.
    #[error("duplicate api key id")]
    Duplicate,
    /// Invalid argument (e.g. schema name).
    #[error("invalid: {0}")]
    Invalid(String),
    /// The store's settings are invalid (see
    /// [`ApiKeyConfig::validate`](crate::ApiKeyConfig::validate)).
    #[error(transparent)]
    Config(#[from] crate::ApiKeyConfigError),
}

impl StoreError {
    /// True when the store's settings are invalid: fix them, retrying does
    /// not help.
    pub fn is_config(&self) -> bool {
        matches!(self, Self::Config(_))
    }

    /// True when the store could not be reached.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }
}

/// Where API-key records live.
#[async_trait]
pub trait ApiKeyStore: Send + Sync + 'static {
    /// The record for `lookup_id`, if any.
    async fn find(&self, lookup_id: &str) -> Result<Option<ApiKeyRecord>, StoreError>;
    /// Stores a new record.
    async fn insert(&self, record: ApiKeyRecord) -> Result<(), StoreError>;
    /// Revokes a key; returns whether it existed.
    async fn revoke(&self, lookup_id: &str) -> Result<bool, StoreError>;
}

/// A newly issued key: the plaintext (shown once, never stored) and its record.
#[derive(Debug)]
pub struct IssuedKey {
    /// The full key `<prefix>_<secret>`; hand it to the client and forget it.
    pub key: Secret,
    /// The record to store.
    pub record: ApiKeyRecord,
}

/// Issues a new random key for `prefix` (the record is not stored).
pub fn generate_key(
    prefix: &str,
    subject: impl Into<String>,
    tenant: impl Into<String>,
    roles: Vec<String>,
    scopes: Vec<String>,
) -> IssuedKey {
    let bytes: [u8; 32] = rand::random();
    let secret = URL_SAFE_NO_PAD.encode(bytes);
    let key = format!("{prefix}_{secret}");
    let record = ApiKeyRecord {
        lookup_id: secret[..LOOKUP_ID_LEN].to_owned(),
        key_hash: hash_key(&key),
        subject: subject.into(),
        tenant: tenant.into(),
        roles,
        scopes,
        expires_at: None,
        revoked: false,
    };
    IssuedKey {
        key: Secret::new(key),
        record,
    }
}

/// SHA-256 of a full key string.
pub fn hash_key(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// Splits `<prefix>_<secret>` and returns the lookup id, or `None` when the
/// string is not a key of this prefix.
pub(crate) fn parse_key<'a>(prefix: &str, key: &'a str) -> Option<&'a str> {
    let secret = key.strip_prefix(prefix)?.strip_prefix('_')?;
    if secret.len() < LOOKUP_ID_LEN + 16 || secret.len() > 128 {
        return None;
    }
    if !secret
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return None;
    }
    Some(&secret[..LOOKUP_ID_LEN])
}

/// Verifies a presented key against `store`, behind `guard`: a client out of
/// failed attempts is refused before the store is asked, and so is a lookup
/// id the store recently did not know.
pub(crate) async fn verify_key(
    store: &dyn ApiKeyStore,
    guard: &KeyGuard,
    peer: Option<IpAddr>,
    prefix: &str,
    key: &str,
) -> Result<Principal, crate::AuthError> {
    use crate::AuthError;
    let lookup_id = parse_key(prefix, key).ok_or(AuthError::InvalidApiKey)?;
    if guard.exhausted(peer) {
        return Err(AuthError::RateLimited);
    }
    if guard.known_unknown(lookup_id) {
        guard.failed(peer);
        return Err(AuthError::InvalidApiKey);
    }
    let presented = hash_key(key);
    let record = store.find(lookup_id).await.map_err(|e| match e {
        StoreError::Unavailable(m) => AuthError::Unavailable(m),
        _ => AuthError::InvalidApiKey,
    })?;
    if record.is_none() {
        guard.remember_unknown(lookup_id);
    }
    // Compare against a dummy hash when there is no record, so an unknown id
    // and a wrong secret cost the same.
    let (stored, record) = match record {
        Some(r) => (r.key_hash, Some(r)),
        None => ([0u8; 32], None),
    };
    let equal: bool = presented.ct_eq(&stored).into();
    let record = match record {
        Some(r) if equal && !r.revoked && r.expires_at.is_none_or(|t| t > SystemTime::now()) => r,
        _ => {
            guard.failed(peer);
            return Err(AuthError::InvalidApiKey);
        }
    };
    Ok(Principal {
        subject: record.subject,
        tenant: record.tenant,
        roles: record.roles,
        scopes: record.scopes,
        auth_kind: AuthKind::ApiKey {
            key_id: record.lookup_id,
        },
    })
}

/// An in-process store (tests, single-node tools). Keys are lost on restart.
///
/// This is the test adapter for API-key authentication: hand it to
/// [`Authenticator::builder`](crate::Authenticator::builder) in unit tests
/// instead of [`PgApiKeyStore`](crate::PgApiKeyStore) (feature `postgres`),
/// and no PostgreSQL is needed. It behaves like the PostgreSQL store:
/// `insert` of an existing lookup id fails with [`StoreError::Duplicate`],
/// `revoke` keeps the record marked revoked (the authenticator then rejects
/// the key). Clones share the records, so a test can keep one handle and
/// issue or revoke keys while the authenticator runs.
///
/// ```
/// use std::sync::Arc;
/// use soma_policy::{ApiKeyStore, Authenticator, InMemoryApiKeyStore, PolicyConfig, generate_key};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let keys = InMemoryApiKeyStore::new();
/// let issued = generate_key("soma", "svc-reporter", "acme", vec!["reader".into()], vec![]);
/// keys.insert(issued.record.clone()).await?;
///
/// let authn = Authenticator::builder(&PolicyConfig::default())
///     .api_key_store(Arc::new(keys.clone()))
///     .build()?;
/// let mut headers = http::HeaderMap::new();
/// headers.insert("x-api-key", issued.key.expose_secret().parse()?);
/// let who = authn.authenticate(&headers).await?;
/// assert_eq!((who.subject.as_str(), who.tenant.as_str()), ("svc-reporter", "acme"));
///
/// assert!(keys.revoke(&issued.record.lookup_id).await?);
/// assert!(authn.authenticate(&headers).await.is_err(), "a revoked key is rejected");
/// # Ok(()) }
/// ```
#[derive(Debug, Default, Clone)]
pub struct InMemoryApiKeyStore {
    records: Arc<RwLock<std::collections::HashMap<String, ApiKeyRecord>>>,
}

impl InMemoryApiKeyStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl ApiKeyStore for InMemoryApiKeyStore {
    async fn find(&self, lookup_id: &str) -> Result<Option<ApiKeyRecord>, StoreError> {
        Ok(self.records.read().get(lookup_id).cloned())
    }

    async fn insert(&self, record: ApiKeyRecord) -> Result<(), StoreError> {
        let mut m = self.records.write();
        if m.contains_key(&record.lookup_id) {
            return Err(StoreError::Duplicate);
        }
        m.insert(record.lookup_id.clone(), record);
        Ok(())
    }

    async fn revoke(&self, lookup_id: &str) -> Result<bool, StoreError> {
        Ok(self
            .records
            .write()
            .get_mut(lookup_id)
            .map(|r| r.revoked = true)
            .is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_the_prefix_and_28_to_128_safe_characters() {
        let shortest = format!("soma_{}", "a".repeat(LOOKUP_ID_LEN + 16));
        assert_eq!(parse_key("soma", &shortest), Some(&shortest[5..17]));
        let short = format!("soma_{}", "a".repeat(LOOKUP_ID_LEN + 15));
        assert_eq!(parse_key("soma", &short), None);
        let longest = format!("soma_{}", "b".repeat(128));
        assert!(parse_key("soma", &longest).is_some());
        let long = format!("soma_{}", "b".repeat(129));
        assert_eq!(parse_key("soma", &long), None);
        assert_eq!(parse_key("other", &shortest), None);
        let unsafe_char = format!("soma_{}!", "a".repeat(LOOKUP_ID_LEN + 16));
        assert_eq!(parse_key("soma", &unsafe_char), None);
    }

    #[test]
    fn store_errors_say_whether_to_fix_settings_or_retry() {
        let down = StoreError::Unavailable("connection refused".into());
        assert!(down.is_unavailable() && !down.is_config());
        let dup = StoreError::Duplicate;
        assert!(!dup.is_unavailable() && !dup.is_config());
    }
}
