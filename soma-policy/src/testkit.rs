//! Test helpers (feature `testkit`): a test issuer with a static key per
//! algorithm, tokens minted for it, the reference policy's directory, the
//! request the benchmarks send, and (with feature `axum`) that route behind
//! the layers.
//!
//! This crate's integration tests, benchmarks and measuring examples use
//! them; downstream tests may too. The keys are the test-only key pairs of
//! this crate's `tests/fixtures`: they protect nothing, never configure them
//! outside tests.
//!
//! ```
//! use soma_policy::testkit::{claims, config_with_static_keys, kid_for, mint};
//! use soma_policy::{Authenticator, JwtAlgorithm};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let authn = Authenticator::builder(&config_with_static_keys()).build()?;
//! let alg = JwtAlgorithm::ES256;
//! let token = mint(alg, Some(kid_for(alg)), &claims("alice"));
//! let mut headers = http::HeaderMap::new();
//! headers.insert("authorization", format!("Bearer {token}").parse()?);
//! assert_eq!(authn.authenticate(&headers).await?.subject, "alice");
//! # Ok(()) }
//! ```

use std::path::PathBuf;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use crate::{
    AuthKind, AuthzInput, IssuerConfig, JwtAlgorithm, PolicyConfig, Principal, RequestInfo,
    Resource, StaticKey,
};

/// The test issuer (`iss`) of [`config_with_static_keys`].
pub const ISSUER: &str = "https://id.soma.test";
/// The test issuer's HS256 secret (key id `hs`).
pub const HS_SECRET: &str = "test-only-hs256-secret-0123456789abcdef";

const RSA_PRIVATE: &str = include_str!("../tests/fixtures/rsa_private.pem");
const RSA_PUBLIC: &str = include_str!("../tests/fixtures/rsa_public.pem");
const EC_PRIVATE: &str = include_str!("../tests/fixtures/ec_private.pem");
const EC_PUBLIC: &str = include_str!("../tests/fixtures/ec_public.pem");
const ED_PRIVATE: &str = include_str!("../tests/fixtures/ed_private.pem");
const ED_PUBLIC: &str = include_str!("../tests/fixtures/ed_public.pem");

/// The directory of the reference policy (`policy/` in this crate's
/// sources), for [`EmbeddedRego::from_dir`](crate::EmbeddedRego).
pub fn policy_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("policy")
}

/// Seconds since the Unix epoch, as `iat` and `exp` count them.
///
/// # Panics
///
/// If the system clock is before 1970.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Claims of a valid token of `sub` in tenant `t1` (role `user`, scopes
/// `conversation:write memory:write scheduler:read`), issued by [`ISSUER`]
/// for audience `soma`, expiring in five minutes.
pub fn claims(sub: &str) -> Value {
    json!({
        "iss": ISSUER, "aud": "soma", "sub": sub, "tenant": "t1",
        "roles": ["user"], "scope": "conversation:write memory:write scheduler:read",
        "iat": now(), "exp": now() + 300,
    })
}

/// The test issuer's signing key for `alg`.
///
/// # Panics
///
/// Never for the embedded keys (a PEM that does not parse would panic).
pub fn encoding_key(alg: JwtAlgorithm) -> EncodingKey {
    match alg {
        JwtAlgorithm::HS256 => EncodingKey::from_secret(HS_SECRET.as_bytes()),
        JwtAlgorithm::RS256 => EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).unwrap(),
        JwtAlgorithm::ES256 => EncodingKey::from_ec_pem(EC_PRIVATE.as_bytes()).unwrap(),
        JwtAlgorithm::EdDSA => EncodingKey::from_ed_pem(ED_PRIVATE.as_bytes()).unwrap(),
    }
}

/// jsonwebtoken's name for `alg`.
pub fn jwt_alg(alg: JwtAlgorithm) -> Algorithm {
    match alg {
        JwtAlgorithm::HS256 => Algorithm::HS256,
        JwtAlgorithm::RS256 => Algorithm::RS256,
        JwtAlgorithm::ES256 => Algorithm::ES256,
        JwtAlgorithm::EdDSA => Algorithm::EdDSA,
    }
}

/// A token with `claims`, signed with the test issuer's key for `alg`, with
/// header `kid` when given.
pub fn mint(alg: JwtAlgorithm, kid: Option<&str>, claims: &Value) -> String {
    mint_with(alg, &encoding_key(alg), kid, claims)
}

/// A token with `claims`, signed with `key` as `alg`, with header `kid`
/// when given.
///
/// # Panics
///
/// If `key` does not fit `alg`.
pub fn mint_with(
    alg: JwtAlgorithm,
    key: &EncodingKey,
    kid: Option<&str>,
    claims: &Value,
) -> String {
    let mut h = Header::new(jwt_alg(alg));
    h.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&h, claims, key).unwrap()
}

/// The test issuer's verifying keys for all four algorithms, key ids `hs`,
/// `rs`, `es`, `ed` (see [`kid_for`]).
pub fn static_keys() -> Vec<StaticKey> {
    vec![
        StaticKey {
            kid: Some("hs".into()),
            alg: JwtAlgorithm::HS256,
            secret: Some(HS_SECRET.into()),
            public_key_pem: None,
        },
        StaticKey {
            kid: Some("rs".into()),
            alg: JwtAlgorithm::RS256,
            secret: None,
            public_key_pem: Some(RSA_PUBLIC.into()),
        },
        StaticKey {
            kid: Some("es".into()),
            alg: JwtAlgorithm::ES256,
            secret: None,
            public_key_pem: Some(EC_PUBLIC.into()),
        },
        StaticKey {
            kid: Some("ed".into()),
            alg: JwtAlgorithm::EdDSA,
            secret: None,
            public_key_pem: Some(ED_PUBLIC.into()),
        },
    ]
}

/// A [`PolicyConfig`] trusting [`ISSUER`] with [`static_keys`], and the
/// reference policy as its policy directory.
pub fn config_with_static_keys() -> PolicyConfig {
    let mut issuer = IssuerConfig::new(ISSUER);
    issuer.keys = static_keys();
    PolicyConfig {
        issuers: vec![issuer],
        policy_dir: policy_dir(),
        ..PolicyConfig::default()
    }
}

/// The key id of the test issuer's key for `alg`.
pub fn kid_for(alg: JwtAlgorithm) -> &'static str {
    match alg {
        JwtAlgorithm::HS256 => "hs",
        JwtAlgorithm::RS256 => "rs",
        JwtAlgorithm::ES256 => "es",
        JwtAlgorithm::EdDSA => "ed",
    }
}

/// The route the benchmarks and measuring examples send to.
pub const SEND_ROUTE: &str = "/v1/sessions/{id}/messages";
/// A path of [`SEND_ROUTE`].
pub const SEND_PATH: &str = "/v1/sessions/s1/messages";

/// The benchmarks' input: alice (role `user`) sends a message to a session
/// of her own tenant, which the reference policy allows.
pub fn send_input() -> AuthzInput {
    let p = Principal {
        subject: "alice".into(),
        tenant: "t1".into(),
        roles: vec!["user".into()],
        scopes: vec!["conversation:write".into(), "memory:write".into()],
        auth_kind: AuthKind::Jwt {
            issuer: ISSUER.into(),
        },
    };
    AuthzInput::new(
        &p,
        "conversation.send",
        Resource {
            kind: "session".into(),
            id: Some("s1".into()),
        },
    )
    .with_request(RequestInfo {
        method: "POST".into(),
        route: SEND_ROUTE.into(),
        request_id: Some("r1".into()),
    })
    .with_context("resource_tenant", "t1")
}

/// `Bearer <HS256 token>` for alice, valid for a day.
pub fn long_lived_bearer() -> String {
    let mut c = claims("alice");
    c["exp"] = json!(now() + 86_400);
    format!("Bearer {}", mint(JwtAlgorithm::HS256, Some("hs"), &c))
}

#[cfg(feature = "axum")]
#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
pub use routers::{bare_router, guarded_router};

#[cfg(feature = "axum")]
mod routers {
    use std::sync::Arc;

    use super::SEND_ROUTE;
    use crate::{Authenticator, AuthnLayer, Authorizer, AuthzLayer, RouteMap, RouteRule};

    /// [`SEND_ROUTE`] answering `ok`, with no layers.
    pub fn bare_router() -> axum::Router {
        axum::Router::new().route(SEND_ROUTE, axum::routing::post(|| async { "ok" }))
    }

    /// [`bare_router`] behind authentication (`authn`) and, when given,
    /// authorization (`authz`, the route mapped to `conversation.send` on a
    /// `session` named by its `id`).
    ///
    /// # Panics
    ///
    /// Never: the route map is fixed and valid.
    pub fn guarded_router(
        authn: Arc<Authenticator>,
        authz: Option<Arc<Authorizer>>,
    ) -> axum::Router {
        let mut router = bare_router();
        if let Some(authz) = authz {
            let routes =
                RouteMap::new([
                    RouteRule::new("POST", SEND_ROUTE, "conversation.send", "session")
                        .with_id_param("id"),
                ])
                .unwrap();
            router = router.route_layer(AuthzLayer::new(authz, Arc::new(routes)));
        }
        router.layer(AuthnLayer::new(authn))
    }
}
