//! Authentication and authorization for Soma services, as tower layers.
//!
//! # Why
//!
//! Every protected flow — `conversation.send`, `tool.execute`,
//! `memory.write`, scheduler CRUD, operations administration — must be
//! authenticated, authorized, fail closed and be audited. The platform this
//! replaces took the tenant from a client header, sent every request header
//! (credentials included) to OPA, used two input shapes its own policy
//! matched neither of, failed open, and skipped policy in local mode.
//!
//! # Guarantees
//!
//! - **Identity from credentials only.** [`AuthnLayer`] verifies a bearer JWT
//!   (HS256, RS256, ES256, EdDSA; `alg: none` and everything else rejected;
//!   issuer, audience, `exp`, `nbf` with leeway; static keys or JWKS with a
//!   refetch cooldown) or an API key (hashed at rest, compared in constant
//!   time), and puts a [`Principal`] in the request extensions. A tenant
//!   header that disagrees with the credential is rejected with 403.
//!   Failures are 401 with `WWW-Authenticate` and a JSON problem body.
//!   Credentials are never logged.
//! - **One input schema.** [`AuthzInput`] is exactly `{subject, tenant, roles,
//!   scopes, action, resource {kind, id}, request {method, route,
//!   request_id}, context}` for HTTP and workers alike — no credentials, no
//!   headers.
//! - **Deny unless allowed.** A route without a mapping is denied. An engine
//!   that cannot decide gives 503 `policy_unavailable` (distinct from 403
//!   `forbidden`) unless [`FailMode::Open`] was chosen explicitly, in which
//!   case every request let through is logged and counted.
//! - **Engines behind one trait.** [`RemoteOpa`] (OPA sidecar, timeout,
//!   circuit breaker) and `EmbeddedRego` (feature `rego`: regorus, hot reload,
//!   keep-last-good; regorus' Rego VM for policies that pass its safety
//!   checks, its interpreter for the rest, see [`RegoEvaluator`]). The
//!   reference policy ships in `policy/soma.rego`, with its tests, and is
//!   available as data from [`reference_policy()`].
//! - **Audited.** One [`AuditEvent`] per decision to tracing and an
//!   [`AuditSink`]; metrics `soma_policy_auth_decisions_total{action,result}`,
//!   `soma_policy_auth_duration_seconds`, cache hits and misses.
//!
//! For tests, the feature `testkit` adds `testkit`: a test issuer with a
//! static key per algorithm, tokens minted for it, and the request the
//! benchmarks send.
//!
//! # Example
//!
//! ```no_run
//! use std::sync::Arc;
//! use soma_observability::MetricsRegistry;
//! use soma_policy::{Authenticator, Authorizer, AuthnLayer, AuthzLayer, PolicyConfig, RouteMap, RouteRule};
//! # async fn run(config: PolicyConfig) -> Result<(), Box<dyn std::error::Error>> {
//! let metrics = MetricsRegistry::default(); // the process's registry
//! let authn = Arc::new(Authenticator::builder(&config).metrics(&metrics).build()?);
//! let authz = Arc::new(Authorizer::from_config(&config, &metrics)?.build());
//! let routes = Arc::new(RouteMap::new([RouteRule::new(
//!     "POST", "/v1/sessions/{id}/messages", "conversation.send", "session",
//! ).with_id_param("id")])?);
//! let app: axum::Router = axum::Router::new()
//!     .route("/v1/sessions/{id}/messages", axum::routing::post(|| async { "sent" }))
//!     .route_layer(AuthzLayer::new(authz, routes))
//!     .layer(AuthnLayer::new(authn));
//! # let _ = app; Ok(()) }
//! ```
#![cfg_attr(docsrs, feature(doc_cfg))]

mod audit;
mod authn;
mod authz;
mod config;
pub mod engine;
mod error;
mod input;
mod metrics;
mod principal;
mod reference;
mod routes;
#[cfg(feature = "testkit")]
#[cfg_attr(docsrs, doc(cfg(feature = "testkit")))]
pub mod testkit;

/// Entry points for the cargo-fuzz targets (`xtask/fuzz`), behind the
/// `fuzzing` feature. Not part of the stable API.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing {
    /// The algorithms of the keys the JWT verifier would take from a JWKS
    /// document (as its issuer serves it), or why it refuses the document.
    pub fn jwks_keys(document: &[u8]) -> Result<Vec<String>, String> {
        crate::authn::jwks_algorithms(document)
    }
}

pub use audit::{AuditEvent, AuditSink, ChannelAuditSink, MemoryAuditSink, TracingAuditSink};
#[cfg(feature = "postgres")]
pub use authn::PgApiKeyStore;
pub use authn::{
    ApiKeyRecord, ApiKeyStore, AuthConfigError, Authenticator, AuthenticatorBuilder, AuthnLayer,
    AuthnResponseFuture, AuthnService, InMemoryApiKeyStore, IssuedKey, JwtConfigError, JwtVerifier,
    LOOKUP_ID_LEN, StoreError, generate_key, hash_key,
};
pub use authz::{
    Authorizer, AuthorizerBuilder, AuthzLayer, AuthzResponseFuture, AuthzService, Decision,
    REQUEST_ID_HEADER,
};
pub use config::{
    ApiKeyConfig, ApiKeyConfigError, BreakerConfig, CacheConfig, EngineKind, FailMode,
    IssuerConfig, JwksConfig, JwtAlgorithm, OpaConfig, PolicyConfig, RegoEvaluator, StaticKey,
    TokenCacheConfig,
};
#[cfg(feature = "rego")]
pub use engine::EmbeddedRego;
pub use engine::{EngineDecision, PolicyEngine, RemoteOpa};
pub use error::{AuthError, AuthzError, EngineError};
pub use input::{AuthzInput, RequestInfo, Resource};
pub use metrics::PolicyMetrics;
pub use principal::{AuthKind, Principal};
pub use reference::{ReferencePolicy, reference_policy};
pub use routes::{ResolvedRoute, RouteError, RouteMap, RouteRule};
/// Content type of every error body the layers write (the same constant as
/// [`soma_observability::http::PROBLEM_CONTENT_TYPE`], kept here for
/// existing callers; the body is [`soma_observability::http::Problem`]).
pub use soma_observability::http::PROBLEM_CONTENT_TYPE;

/// The README's example is compiled as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
