//! The `policy` configuration section.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use soma_config::{DeploymentProfile, Secret, SectionPreset};
pub use soma_observability::resilience::BreakerConfig;

use crate::routes::RouteRule;

/// Settings for authentication and authorization, one section of an
/// application's settings (soma-config composes it).
///
/// There is deliberately no switch that turns authentication or policy off:
/// a local profile runs the same checks with the embedded engine and local
/// keys. Failing open must be chosen explicitly with [`FailMode::Open`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct PolicyConfig {
    /// Trusted token issuers. A token whose `iss` is not listed is rejected.
    pub issuers: Vec<IssuerConfig>,
    /// Clock-skew allowance for `exp` and `nbf`, in seconds.
    pub leeway_secs: u64,
    /// Audiences accepted by default (an issuer may override them). A token
    /// must carry `aud` naming one of them.
    pub audiences: Vec<String>,
    /// Tokens longer than this are rejected before any parsing.
    pub max_token_bytes: usize,
    /// JWKS settings shared by every issuer that uses a JWKS URL.
    pub jwks: JwksConfig,
    /// Cache of verified JWTs (on by default).
    pub token_cache: TokenCacheConfig,
    /// API-key authentication.
    pub api_keys: ApiKeyConfig,
    /// Header a client may send to name its tenant. The tenant always comes
    /// from the verified credential; a header that disagrees is rejected
    /// with 403.
    pub tenant_header: String,
    /// Which engine decides.
    pub engine: EngineKind,
    /// Remote OPA settings (used when `engine = "remote"`).
    pub opa: OpaConfig,
    /// Directory of `.rego` policies and `data.json` documents for the
    /// embedded engine. Files ending in `_test.rego` are not loaded.
    pub policy_dir: PathBuf,
    /// Rule evaluated by the embedded engine, as a `data.` path.
    pub entrypoint: String,
    /// How the embedded engine evaluates the policy: `auto` (the default:
    /// the Rego VM when the policy is eligible, else the interpreter),
    /// `interpreter` or `vm` (see [`RegoEvaluator`]).
    pub evaluator: RegoEvaluator,
    /// A number an operator bumps to make the embedded engine re-read its
    /// policy directory (a live settings update `{"policy": {"revision":
    /// N}}`), when it reloads on its own inputs
    /// ([`EngineInputs`](crate::engine::EngineInputs)). 0 by default;
    /// nothing else reads it.
    pub revision: u64,
    /// Decision cache (on by default, 1 s).
    pub cache: CacheConfig,
    /// What happens when the engine cannot decide.
    pub fail_mode: FailMode,
    /// Route template + method → action mapping for the HTTP layer.
    pub routes: Vec<RouteRule>,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            issuers: Vec::new(),
            leeway_secs: 30,
            audiences: vec!["soma".to_owned()],
            max_token_bytes: 8 * 1024,
            jwks: JwksConfig::default(),
            token_cache: TokenCacheConfig::default(),
            api_keys: ApiKeyConfig::default(),
            tenant_header: "x-soma-tenant".to_owned(),
            engine: EngineKind::Embedded,
            opa: OpaConfig::default(),
            policy_dir: PathBuf::from("policy"),
            entrypoint: "data.soma.authz.decision".to_owned(),
            evaluator: RegoEvaluator::default(),
            revision: 0,
            cache: CacheConfig::default(),
            fail_mode: FailMode::Closed,
            routes: Vec::new(),
        }
    }
}

impl PolicyConfig {
    /// This section's sizes under a deployment profile, keys relative to
    /// the section; mount them where your settings mount it
    /// ([`ProfilePreset::section`](soma_config::ProfilePreset::section)).
    /// Only the decision cache's size: authentication, the engine and the
    /// fail mode are the same in every profile.
    ///
    /// | key | `local` | `prod` |
    /// |---|---|---|
    /// | `cache.capacity` | 1 000 | 100 000 |
    ///
    /// ```
    /// use soma_config::{DeploymentProfile, ProfilePreset};
    /// use soma_policy::PolicyConfig;
    ///
    /// let prod = DeploymentProfile::Prod;
    /// let preset = ProfilePreset::new(prod).section("policy", PolicyConfig::preset(prod))?;
    /// assert!(preset.entries().any(|entry| entry == ("policy.cache.capacity", 100_000)));
    /// # Ok::<(), soma_config::ConfigError>(())
    /// ```
    pub fn preset(profile: DeploymentProfile) -> SectionPreset {
        let cache_capacity = match profile {
            DeploymentProfile::Local => 1_000,
            DeploymentProfile::Prod => 100_000,
        };
        SectionPreset::new(profile, [("cache.capacity", cache_capacity)])
    }
}

/// One trusted issuer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct IssuerConfig {
    /// Exact `iss` value.
    pub issuer: String,
    /// Audiences for this issuer; empty means [`PolicyConfig::audiences`].
    pub audiences: Vec<String>,
    /// Static verification keys.
    pub keys: Vec<StaticKey>,
    /// JWKS document URL (keys are cached and refetched on an unknown `kid`).
    /// Must be `https://`; `http://` is accepted only for a loopback host
    /// (`localhost`, `127.0.0.0/8`, `[::1]`), e.g. a local identity provider
    /// or a test. Redirects are not followed, and a document over 1 MiB is
    /// refused as it streams in.
    pub jwks_url: Option<String>,
    /// Claim holding the tenant (required in every token).
    pub tenant_claim: String,
    /// Claim holding the roles (array of strings).
    pub roles_claim: String,
}

impl IssuerConfig {
    /// An issuer trusted by its exact `iss` value, with the default claims
    /// (`tenant`, `roles`) and no keys yet: add [`with_jwks_url`](Self::with_jwks_url)
    /// or [`keys`](Self::keys).
    pub fn new(issuer: impl Into<String>) -> Self {
        Self {
            issuer: issuer.into(),
            ..Self::default()
        }
    }

    /// Verifies this issuer's tokens with the keys of a JWKS document (see
    /// [`jwks_url`](Self::jwks_url) for the accepted URLs).
    pub fn with_jwks_url(mut self, url: impl Into<String>) -> Self {
        self.jwks_url = Some(url.into());
        self
    }
}

impl Default for IssuerConfig {
    fn default() -> Self {
        Self {
            issuer: String::new(),
            audiences: Vec::new(),
            keys: Vec::new(),
            jwks_url: None,
            tenant_claim: "tenant".to_owned(),
            roles_claim: "roles".to_owned(),
        }
    }
}

/// Signature algorithms accepted. `none` and everything else is rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum JwtAlgorithm {
    /// HMAC with SHA-256 (shared secret).
    HS256,
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    RS256,
    /// ECDSA P-256 with SHA-256.
    ES256,
    /// Ed25519.
    EdDSA,
}

impl JwtAlgorithm {
    /// The header `alg` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::HS256 => "HS256",
            Self::RS256 => "RS256",
            Self::ES256 => "ES256",
            Self::EdDSA => "EdDSA",
        }
    }

    /// Parses a header `alg` value.
    pub fn parse(alg: &str) -> Option<Self> {
        match alg {
            "HS256" => Some(Self::HS256),
            "RS256" => Some(Self::RS256),
            "ES256" => Some(Self::ES256),
            "EdDSA" => Some(Self::EdDSA),
            _ => None,
        }
    }
}

/// A statically configured verification key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StaticKey {
    /// Key id matched against the token's `kid`. A token without `kid` is
    /// accepted only when its issuer has exactly one key of the token's
    /// algorithm (static or from the JWKS).
    #[serde(default)]
    pub kid: Option<String>,
    /// Algorithm this key verifies; a token naming another is rejected.
    pub alg: JwtAlgorithm,
    /// Shared secret, for `HS256`.
    #[serde(default)]
    pub secret: Option<Secret>,
    /// PEM public key, for `RS256`, `ES256` and `EdDSA`.
    #[serde(default)]
    pub public_key_pem: Option<String>,
}

/// JWKS fetching.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct JwksConfig {
    /// Minimum time between two fetches of one issuer's JWKS. An unknown
    /// `kid` inside this window is rejected without contacting the identity
    /// provider, so a flood of made-up kids costs it at most one request per
    /// window.
    pub refetch_cooldown_secs: u64,
    /// Known keys are refreshed after this long (subject to the cooldown).
    pub max_age_secs: u64,
    /// Timeout for one JWKS request.
    pub timeout_ms: u64,
}

impl Default for JwksConfig {
    fn default() -> Self {
        Self {
            refetch_cooldown_secs: 30,
            max_age_secs: 600,
            timeout_ms: 2_000,
        }
    }
}

/// API-key authentication (`<prefix>_<secret>`).
///
/// Every well-formed key whose lookup id is not cached costs the store a
/// query. Two guards keep guessing from exhausting it:
///
/// - **Negative cache.** A lookup id the store did not find is remembered
///   for `negative_cache_ttl_secs` (at most `negative_cache_capacity` ids,
///   least-used dropped first); the same id presented again is rejected
///   without a query. A key issued within that window with a recently
///   guessed id would be refused until it expires; ids are 72 random bits.
/// - **Per-client failure limiter.** Each client (peer IPv4 address or IPv6
///   /64, from axum's `ConnectInfo<SocketAddr>` in the request extensions)
///   may fail `client_failure_burst` times, refilled at
///   `client_failures_per_sec`; past that, its API-key attempts are
///   answered 429 `too_many_attempts` before the store is asked. Successful
///   verifications cost nothing. Requests without a peer address (a server
///   not started with `into_make_service_with_connect_info`) share one
///   bucket, so serve with connect info. Behind a proxy the peer is the
///   proxy. `client_failure_burst = 0` turns the limiter off.
///
/// Give the store its own small pool too, so what still reaches it cannot
/// take the connections other work needs: `PgApiKeyStore::from_config`
/// (feature `postgres`) opens one of `max_connections` connections on the
/// store in `schema`. [`ApiKeyConfig::validate`] checks those two.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct ApiKeyConfig {
    /// Accept API keys at all (the store must also be supplied).
    pub enabled: bool,
    /// Key prefix, e.g. `soma` for `soma_3kT…`.
    pub prefix: String,
    /// Header carrying a key (keys are also accepted as `Authorization: Bearer <key>`).
    pub header: String,
    /// How long an unknown lookup id is remembered, in seconds (0: never).
    pub negative_cache_ttl_secs: u64,
    /// Most unknown lookup ids remembered.
    pub negative_cache_capacity: u64,
    /// Failed API-key attempts a client may make in a burst (0: no limit).
    pub client_failure_burst: u32,
    /// Failed attempts a client regains per second.
    pub client_failures_per_sec: u32,
    /// Most clients tracked by the failure limiter.
    pub client_limiter_capacity: u64,
    /// PostgreSQL schema of the key store (`<schema>.soma_api_keys`, for
    /// `PgApiKeyStore`): a plain identifier of letters, digits and `_`, not
    /// starting with a digit, at most 63 bytes. Default `soma_api_keys`.
    pub schema: String,
    /// Size of the key store's own connection pool (at least 1). A flood of
    /// API-key lookups waits on these connections, never on the pool other
    /// work uses; past a 1 s wait it is answered 503 `auth_unavailable`.
    /// Default 2.
    pub max_connections: u32,
}

impl ApiKeyConfig {
    /// Checks the key store's settings: [`schema`](Self::schema) is a plain
    /// identifier and [`max_connections`](Self::max_connections) is at
    /// least 1.
    ///
    /// # Errors
    ///
    /// The first [`ApiKeyConfigError`] found, naming its setting.
    pub fn validate(&self) -> Result<(), ApiKeyConfigError> {
        if !is_identifier(&self.schema) {
            return Err(ApiKeyConfigError::Schema(self.schema.clone()));
        }
        if self.max_connections == 0 {
            return Err(ApiKeyConfigError::MaxConnections);
        }
        Ok(())
    }
}

/// A PostgreSQL identifier we can quote without escaping: letters, digits
/// and `_`, not starting with a digit, 1 to 63 bytes.
pub(crate) fn is_identifier(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !name.as_bytes()[0].is_ascii_digit()
}

/// Why the API-key store's settings ([`ApiKeyConfig`]) are invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ApiKeyConfigError {
    /// `policy.api_keys.schema` is not a plain identifier.
    #[error(
        "policy.api_keys.schema must be letters, digits and `_`, not starting with a digit, \
         at most 63 bytes; got {0:?}"
    )]
    Schema(String),
    /// `policy.api_keys.max_connections` is 0.
    #[error("policy.api_keys.max_connections must be at least 1")]
    MaxConnections,
}

impl ApiKeyConfigError {
    /// The setting at fault, as a dotted key (for soma-config's `Checks`).
    pub fn key(&self) -> &'static str {
        match self {
            Self::Schema(_) => "policy.api_keys.schema",
            Self::MaxConnections => "policy.api_keys.max_connections",
        }
    }
}

impl Default for ApiKeyConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            prefix: "soma".to_owned(),
            header: "x-api-key".to_owned(),
            negative_cache_ttl_secs: 30,
            negative_cache_capacity: 100_000,
            client_failure_burst: 20,
            client_failures_per_sec: 1,
            client_limiter_capacity: 100_000,
            schema: "soma_api_keys".to_owned(),
            max_connections: 2,
        }
    }
}

/// Which engine decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EngineKind {
    /// An OPA server (sidecar) over HTTP.
    Remote,
    /// In-process Rego (feature `rego`). The default for local runs.
    Embedded,
}

/// How the embedded engine (regorus) evaluates a policy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RegoEvaluator {
    /// The Rego VM when the policy is eligible for it (see [`Self::Vm`]),
    /// the interpreter otherwise; decided again at every (re)load, and
    /// logged when a policy falls back. The default.
    /// `EmbeddedRego::active_evaluator` tells which one is in force.
    #[default]
    Auto,
    /// regorus' tree-walking interpreter, its reference evaluator: every
    /// Rego construct regorus supports, OPA's semantics.
    Interpreter,
    /// The entry point compiled to regorus' Rego virtual machine (RVM)
    /// bytecode at load, evaluated on pooled VMs: several times faster
    /// (8–11 µs instead of 44–69 µs per decision on the reference policy in
    /// the crate's benchmarks; see its README).
    ///
    /// regorus 0.14's VM is not a drop-in for OPA everywhere, so a policy
    /// is eligible only when all of these hold, checked at every (re)load:
    /// - the VM compiles the entry point (it cannot compile `with`);
    /// - no query contains a `:=` assignment: the VM does not stop a body
    ///   whose assignment's right side is undefined
    ///   (`allow if { g := grants[input.user]; not g.blocked }` would allow
    ///   an unknown user). Index directly (`not grants[input.user].blocked`),
    ///   use a helper rule or unify (`=`), which the VM evaluates as OPA does;
    /// - no builtin call that can fail, and no arithmetic: where OPA reports
    ///   an error (`count(false)`), the VM drops the rule body, so a deny
    ///   rule adds nothing. Type tests (`is_string`, …), `count`/`sort` of
    ///   the policy's own partial set rules and the policy's own functions
    ///   pass;
    /// - the VM and the interpreter agree on an empty input.
    ///
    /// With `Vm` an ineligible policy fails to load (a reload keeps the last
    /// good policy); with [`Self::Auto`] it runs on the interpreter. The
    /// shipped `policy/soma.rego` is eligible, and the crate's tests check
    /// that OPA, the interpreter and the VM agree on it.
    Vm,
}

impl RegoEvaluator {
    /// `auto`, `interpreter` or `vm`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Interpreter => "interpreter",
            Self::Vm => "vm",
        }
    }
}

/// Remote OPA settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct OpaConfig {
    /// Base URL, e.g. `http://127.0.0.1:8181`.
    pub base_url: String,
    /// Document path under `/v1/data/`, e.g. `soma/authz/decision`.
    pub package_path: String,
    /// Timeout for one decision request.
    pub timeout_ms: u64,
    /// Circuit breaker (the shared spelling): after `failure_threshold`
    /// consecutive failures no request is sent for `open_ms`; then one trial
    /// request decides whether it closes again. Defaults here: 5 failures,
    /// 10 000 ms (keys missing from a given section take the shared
    /// defaults, 3 and 30 000).
    pub breaker: BreakerConfig,
}

impl Default for OpaConfig {
    fn default() -> Self {
        Self {
            base_url: "http://127.0.0.1:8181".to_owned(),
            package_path: "soma/authz/decision".to_owned(),
            timeout_ms: 250,
            breaker: BreakerConfig::new(5, 10_000),
        }
    }
}

/// Cache of verified JWTs, so a client that sends the same token again is
/// not re-verified (signature, base64 and JSON) on every request.
///
/// Keyed by the SHA-256 of the exact token (the token itself is not kept);
/// only tokens that passed every check are cached. A hit still checks `exp`
/// and `nbf` (with the leeway) against the clock, so a cached token expires
/// exactly when it would have failed verification. Any change of an
/// issuer's JWKS key set invalidates every entry, and an entry lives at
/// most `max_ttl_secs`, which also bounds how long a key removed from a
/// JWKS keeps verifying the tokens it signed (plus `jwks.max_age_secs`, as
/// without the cache).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct TokenCacheConfig {
    /// Cache verified tokens at all.
    pub enabled: bool,
    /// Maximum number of cached tokens.
    pub capacity: u64,
    /// Longest time an entry is reused, in seconds.
    pub max_ttl_secs: u64,
}

impl Default for TokenCacheConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            capacity: 10_000,
            max_ttl_secs: 60,
        }
    }
}

/// Decision cache: on by default, each decision reused for 1 s.
///
/// Keyed by the engine's policy generation and the SHA-256 of the canonical
/// input (subject, tenant, roles, scopes, action, resource, method, route,
/// context — not the request id), so two requests share a decision only when
/// the policy saw the same thing, and a reload of the embedded engine is
/// seen by the next request. A remote OPA's policy can change without us
/// knowing: a decision may then outlive it by up to `ttl_ms`. Errors are
/// never cached. Under pressure the cache drops least-used entries past
/// `capacity`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct CacheConfig {
    /// Cache decisions at all (default on).
    pub enabled: bool,
    /// How long a decision is reused, in milliseconds (default 1000).
    pub ttl_ms: u64,
    /// Maximum number of cached decisions.
    pub capacity: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            ttl_ms: 1_000,
            capacity: 10_000,
        }
    }
}

/// What a caller sees when the engine cannot decide: the one
/// [`FailMode`](soma_observability::resilience::FailMode) of every soma
/// crate.
///
/// - `Closed` (the default): deny with `policy_unavailable` (HTTP 503).
/// - `Open`: allow when the engine is unavailable — timeout, transport
///   error, open circuit breaker, HTTP 5xx (see
///   [`EngineError::is_unavailable`](crate::EngineError::is_unavailable)) —
///   logging and counting every request let through. An engine that
///   answered but could not decide (undefined decision, malformed answer,
///   evaluation or load error, HTTP 4xx) still denies. Must be chosen
///   explicitly.
pub use soma_observability::resilience::FailMode;

#[cfg(test)]
mod tests {
    use super::*;

    /// The preset's keys live here, so the proof that each one is a numeric
    /// setting of this section does too.
    #[test]
    fn every_preset_key_is_a_numeric_setting_of_the_section() {
        for profile in DeploymentProfile::ALL {
            PolicyConfig::preset(profile)
                .check(&PolicyConfig::default())
                .unwrap();
        }
    }

    #[test]
    fn api_key_store_settings_load_under_policy_api_keys_and_are_validated() {
        let config: PolicyConfig = serde_json::from_value(serde_json::json!({
            "api_keys": {"schema": "tenant_keys", "max_connections": 4}
        }))
        .unwrap();
        assert_eq!(config.api_keys.schema, "tenant_keys");
        assert_eq!(config.api_keys.max_connections, 4);
        assert_eq!(config.api_keys.prefix, "soma", "other keys keep defaults");
        assert_eq!(config.api_keys.validate(), Ok(()));

        let defaults = ApiKeyConfig::default();
        assert_eq!(
            (defaults.schema.as_str(), defaults.max_connections),
            ("soma_api_keys", 2)
        );
        assert_eq!(defaults.validate(), Ok(()));

        for bad in ["", "a-b", "1abc", "x\"; DROP TABLE y; --", &"k".repeat(64)] {
            let c = ApiKeyConfig {
                schema: bad.to_owned(),
                ..ApiKeyConfig::default()
            };
            let e = c.validate().unwrap_err();
            assert_eq!(e, ApiKeyConfigError::Schema(bad.to_owned()));
            assert_eq!(e.key(), "policy.api_keys.schema");
        }
        let c = ApiKeyConfig {
            max_connections: 0,
            ..ApiKeyConfig::default()
        };
        let e = c.validate().unwrap_err();
        assert_eq!(e, ApiKeyConfigError::MaxConnections);
        assert_eq!(e.key(), "policy.api_keys.max_connections");
    }
}
