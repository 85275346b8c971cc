//! Authentication: bearer JWTs and API keys → [`Principal`].

mod apikey;
mod guard;
mod jws;
mod jwt;
#[cfg(feature = "fuzzing")]
pub(crate) use jwt::jwks_algorithms;
mod future;
mod layer;
#[cfg(feature = "postgres")]
mod postgres;

use std::net::IpAddr;
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
/// tenant in the tenant header must name the same one, exactly once, or it is
/// rejected with [`AuthError::TenantMismatch`] (several tenant headers are
/// rejected even when they all agree).
pub struct Authenticator {
    jwt: JwtVerifier,
    api_keys: Option<Arc<dyn ApiKeyStore>>,
    key_guard: guard::KeyGuard,
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

    /// Records the authenticator's metrics: `.metrics(&registry)` registers them in
    /// a [`MetricsRegistry`](soma_observability::MetricsRegistry); passing
    /// [`PolicyMetrics`] shares one set of handles between the authenticator
    /// and the authorizer (handles built twice on one registry share their
    /// series anyway).
    pub fn metrics(mut self, metrics: impl Into<PolicyMetrics>) -> Self {
        self.metrics = Some(metrics.into());
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
            key_guard: guard::KeyGuard::new(&self.config.api_keys),
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

    /// Authenticates a request from its headers, as a client without a
    /// known address (see [`Authenticator::authenticate_from`]).
    pub async fn authenticate(&self, headers: &HeaderMap) -> Result<Principal, AuthError> {
        self.authenticate_from(headers, None).await
    }

    /// Authenticates a request from its headers, sent by `peer` (the layer
    /// calls this with the address from axum's `ConnectInfo`). Failed
    /// API-key attempts are charged to `peer` (see
    /// [`ApiKeyConfig`](crate::ApiKeyConfig)); all requests without an
    /// address share one allowance.
    pub async fn authenticate_from(
        &self,
        headers: &HeaderMap,
        peer: Option<IpAddr>,
    ) -> Result<Principal, AuthError> {
        let result = self.authenticate_inner(headers, peer).await;
        if let Err(e) = &result {
            self.metrics.authn_failure(e.code());
        }
        result
    }

    async fn authenticate_inner(
        &self,
        headers: &HeaderMap,
        peer: Option<IpAddr>,
    ) -> Result<Principal, AuthError> {
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
                self.verify_api_key_from(cred, peer).await?
            } else {
                self.verify_token(cred).await?
            }
        } else if let Some(value) = headers.get(&self.api_key_header) {
            let key = value.to_str().map_err(|_| AuthError::InvalidApiKey)?;
            self.verify_api_key_from(key.trim(), peer).await?
        } else {
            return Err(AuthError::MissingCredential);
        };
        // Every value must agree, and there may be only one: a proxy or a
        // handler reading another value than the first must not see a tenant
        // that was never compared.
        let mut claimed = headers.get_all(&self.tenant_header).iter();
        if let Some(first) = claimed.next() {
            if claimed.next().is_some() || first.as_bytes() != principal.tenant.as_bytes() {
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

    /// Verifies an API key presented by a client without a known address.
    pub async fn verify_api_key(&self, key: &str) -> Result<Principal, AuthError> {
        self.verify_api_key_from(key, None).await
    }

    /// Verifies an API key presented by `peer`: refused with
    /// [`AuthError::RateLimited`] before the store is asked when `peer` has
    /// failed too often, and with [`AuthError::InvalidApiKey`] without a
    /// query when its lookup id was recently unknown.
    pub async fn verify_api_key_from(
        &self,
        key: &str,
        peer: Option<IpAddr>,
    ) -> Result<Principal, AuthError> {
        match &self.api_keys {
            Some(store) => {
                apikey::verify_key(
                    store.as_ref(),
                    &self.key_guard,
                    peer,
                    &self.api_key_prefix,
                    key,
                )
                .await
            }
            None => Err(AuthError::InvalidApiKey),
        }
    }
}
