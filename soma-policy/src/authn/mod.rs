//! Authentication: bearer JWTs and API keys → [`Principal`].

mod apikey;
mod jws;
mod jwt;
mod layer;
#[cfg(feature = "postgres")]
mod postgres;

use std::sync::Arc;

use http::{HeaderMap, HeaderName};

pub use apikey::{
    ApiKeyRecord, ApiKeyStore, InMemoryApiKeyStore, IssuedKey, LOOKUP_ID_LEN, StoreError,
    generate_key, hash_key,
};
pub use jwt::{JwtConfigError, JwtVerifier};
pub use layer::{AuthnLayer, AuthnService, ResponseFuture as AuthnResponseFuture};
#[cfg(feature = "postgres")]
pub use postgres::PgApiKeyStore;

use crate::config::PolicyConfig;
use crate::metrics::PolicyMetrics;
use crate::{AuthError, Principal};

/// Verifies the credential on a request: `Authorization: Bearer <jwt>`,
/// `Authorization: Bearer <prefix>_<secret>` or `<api key header>: <prefix>_<secret>`.
///
/// The tenant comes from the credential only. A request that also names a
/// tenant in the tenant header must name the same one, or it is rejected with
/// [`AuthError::TenantMismatch`].
pub struct Authenticator {
    jwt: JwtVerifier,
    api_keys: Option<Arc<dyn ApiKeyStore>>,
    api_key_prefix: String,
    api_key_header: HeaderName,
    tenant_header: HeaderName,
    metrics: PolicyMetrics,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("jwt", &self.jwt)
            .field("api_keys", &self.api_keys.is_some())
            .field("api_key_prefix", &self.api_key_prefix)
            .finish_non_exhaustive()
    }
}

/// Error building an [`Authenticator`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthConfigError {
    /// An issuer is misconfigured.
    #[error(transparent)]
    Jwt(#[from] JwtConfigError),
    /// A header name is invalid.
    #[error("invalid header name {0:?}")]
    Header(String),
    /// Nothing could ever authenticate: no issuer and no API-key store.
    #[error("no credential source configured: add an issuer or an API-key store")]
    NoCredentialSource,
}

/// Builds an [`Authenticator`].
pub struct AuthenticatorBuilder {
    config: PolicyConfig,
    store: Option<Arc<dyn ApiKeyStore>>,
    metrics: Option<PolicyMetrics>,
}

impl AuthenticatorBuilder {
    /// Uses `store` for API keys (when `api_keys.enabled`).
    pub fn api_key_store(mut self, store: Arc<dyn ApiKeyStore>) -> Self {
        self.store = Some(store);
        self
    }

    /// Records metrics on these handles.
    pub fn metrics(mut self, metrics: PolicyMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Builds the authenticator.
    pub fn build(self) -> Result<Authenticator, AuthConfigError> {
        let metrics = self.metrics.unwrap_or_default();
        let jwt = JwtVerifier::from_config(&self.config, metrics.clone())?;
        let header =
            |s: &str| HeaderName::try_from(s).map_err(|_| AuthConfigError::Header(s.to_owned()));
        let api_keys = if self.config.api_keys.enabled {
            self.store
        } else {
            None
        };
        if !jwt.has_issuers() && api_keys.is_none() {
            return Err(AuthConfigError::NoCredentialSource);
        }
        Ok(Authenticator {
            jwt,
            api_keys,
            api_key_prefix: self.config.api_keys.prefix.clone(),
            api_key_header: header(&self.config.api_keys.header)?,
            tenant_header: header(&self.config.tenant_header)?,
            metrics,
        })
    }
}

impl Authenticator {
    /// Starts building from the `policy` section.
    pub fn builder(config: &PolicyConfig) -> AuthenticatorBuilder {
        AuthenticatorBuilder {
            config: config.clone(),
            store: None,
            metrics: None,
        }
    }

    /// Authenticates a request from its headers (the layer calls this).
    pub async fn authenticate(&self, headers: &HeaderMap) -> Result<Principal, AuthError> {
        let result = self.authenticate_inner(headers).await;
        if let Err(e) = &result {
            self.metrics.authn_failure(e.code());
        }
        result
    }

    async fn authenticate_inner(&self, headers: &HeaderMap) -> Result<Principal, AuthError> {
        let principal = if let Some(value) = headers.get(http::header::AUTHORIZATION) {
            let value = value
                .to_str()
                .map_err(|_| AuthError::Malformed("authorization header is not ASCII"))?;
            let (scheme, cred) = value
                .split_once(' ')
                .ok_or(AuthError::Malformed("expected `Bearer <credential>`"))?;
            if !scheme.eq_ignore_ascii_case("bearer") {
                return Err(AuthError::Malformed("unsupported authorization scheme"));
            }
            let cred = cred.trim();
            if cred.is_empty() {
                return Err(AuthError::MissingCredential);
            }
            if self.is_api_key(cred) {
                self.verify_api_key(cred).await?
            } else {
                self.verify_token(cred).await?
            }
        } else if let Some(value) = headers.get(&self.api_key_header) {
            let key = value.to_str().map_err(|_| AuthError::InvalidApiKey)?;
            self.verify_api_key(key.trim()).await?
        } else {
            return Err(AuthError::MissingCredential);
        };
        if let Some(claimed) = headers.get(&self.tenant_header) {
            if claimed.as_bytes() != principal.tenant.as_bytes() {
                return Err(AuthError::TenantMismatch);
            }
        }
        Ok(principal)
    }

    fn is_api_key(&self, cred: &str) -> bool {
        cred.strip_prefix(self.api_key_prefix.as_str())
            .is_some_and(|r| r.starts_with('_'))
    }

    /// Verifies a bearer JWT.
    pub async fn verify_token(&self, token: &str) -> Result<Principal, AuthError> {
        self.jwt.verify(token).await
    }

    /// Verifies an API key.
    pub async fn verify_api_key(&self, key: &str) -> Result<Principal, AuthError> {
        match &self.api_keys {
            Some(store) => apikey::verify_key(store.as_ref(), &self.api_key_prefix, key).await,
            None => Err(AuthError::InvalidApiKey),
        }
    }
}
