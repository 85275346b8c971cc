//! Typed errors: why authentication failed, why an engine could not decide.

use http::StatusCode;

/// Why a request could not be authenticated.
///
/// Messages never contain the credential. [`AuthError::status`] gives the
/// HTTP status the layer answers with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// No credential was presented.
    #[error("no credential presented")]
    MissingCredential,
    /// The token is not a well-formed JWT.
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    /// The token is longer than `max_token_bytes`.
    #[error("token too large ({len} bytes, limit {max})")]
    Oversized {
        /// Length presented.
        len: usize,
        /// Configured limit.
        max: usize,
    },
    /// `alg` is `none` or not one of HS256, RS256, ES256, EdDSA.
    #[error("unsupported token algorithm {0:?}")]
    UnsupportedAlgorithm(String),
    /// `iss` names no configured issuer.
    #[error("untrusted issuer")]
    UnknownIssuer,
    /// No key of the issuer matches the token's `kid` and `alg`.
    #[error("no matching verification key")]
    UnknownKey,
    /// The signature does not verify.
    #[error("invalid signature")]
    BadSignature,
    /// `exp` is in the past (beyond the leeway).
    #[error("token expired")]
    Expired,
    /// `nbf` is in the future (beyond the leeway).
    #[error("token not yet valid")]
    NotYetValid,
    /// `aud` names none of the accepted audiences.
    #[error("wrong audience")]
    WrongAudience,
    /// A required claim is missing or has the wrong type.
    #[error("invalid claims: {0}")]
    InvalidClaims(String),
    /// The API key is unknown, revoked, expired or wrong.
    #[error("invalid API key")]
    InvalidApiKey,
    /// The tenant header disagrees with the credential's tenant.
    #[error("tenant header does not match the credential")]
    TenantMismatch,
    /// The client failed too many API-key attempts recently; the store was
    /// not asked (HTTP 429 `too_many_attempts`).
    #[error("too many failed attempts")]
    RateLimited,
    /// Keys or API-key records could not be fetched (identity provider or
    /// store down). Nothing was decided.
    #[error("credential verification unavailable: {0}")]
    Unavailable(String),
}

impl AuthError {
    /// The HTTP status for this failure: 401, 403 for a tenant mismatch, 429
    /// for too many failed attempts, 503 when verification itself is
    /// unavailable.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::TenantMismatch => StatusCode::FORBIDDEN,
            Self::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::UNAUTHORIZED,
        }
    }

    /// Stable machine-readable code (also the `reason` metric label).
    pub fn code(&self) -> &'static str {
        match self {
            Self::MissingCredential => "missing_credential",
            Self::Malformed(_) => "malformed_token",
            Self::Oversized { .. } => "oversized_token",
            Self::UnsupportedAlgorithm(_) => "unsupported_algorithm",
            Self::UnknownIssuer => "unknown_issuer",
            Self::UnknownKey => "unknown_key",
            Self::BadSignature => "bad_signature",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::WrongAudience => "wrong_audience",
            Self::InvalidClaims(_) => "invalid_claims",
            Self::InvalidApiKey => "invalid_api_key",
            Self::TenantMismatch => "tenant_mismatch",
            Self::RateLimited => "too_many_attempts",
            Self::Unavailable(_) => "auth_unavailable",
        }
    }

    /// The problem body's `detail`: the error's message, except for
    /// [`AuthError::Unavailable`], whose cause (a JWKS URL, a database error)
    /// is logged but never told to the client — it gets a fixed sentence.
    pub fn public_detail(&self) -> String {
        match self {
            Self::Unavailable(_) => {
                "credential verification is temporarily unavailable; retry later".to_owned()
            }
            other => other.to_string(),
        }
    }

    /// True when verification could not run (retry later), as opposed to a
    /// bad credential.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }

    /// True when the client was turned away for too many failed attempts.
    pub fn is_rate_limited(&self) -> bool {
        matches!(self, Self::RateLimited)
    }

    /// True when the token's validity window is the problem.
    pub fn is_expired(&self) -> bool {
        matches!(self, Self::Expired)
    }

    /// True when no credential was presented at all.
    pub fn is_missing(&self) -> bool {
        matches!(self, Self::MissingCredential)
    }
}

/// Why an engine could not produce a decision. A decision to deny is not an
/// error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// The engine did not answer in time.
    #[error("policy engine timed out")]
    Timeout,
    /// The engine could not be reached.
    #[error("policy engine unreachable: {0}")]
    Transport(String),
    /// The engine answered with a non-success HTTP status (other than an
    /// evaluation error, which is [`EngineError::Evaluation`]).
    #[error("policy engine returned HTTP {0}")]
    Status(u16),
    /// The answer was neither a boolean nor `{allow, reasons}`.
    #[error("malformed policy response: {0}")]
    MalformedResponse(String),
    /// The decision document is undefined (wrong package path or no policy loaded).
    #[error("policy decision is undefined")]
    Undefined,
    /// The circuit breaker is open; the engine was not contacted.
    #[error("policy engine circuit open")]
    CircuitOpen,
    /// The policy failed to evaluate.
    #[error("policy evaluation failed: {0}")]
    Evaluation(String),
    /// The policy failed to load or compile.
    #[error("policy failed to load: {0}")]
    Load(String),
    /// The settings describe no engine that can be built (e.g.
    /// `engine = "embedded"` without the `rego` feature, an OPA base URL
    /// that is not http(s)); see
    /// [`ConfiguredEngine`](crate::engine::ConfiguredEngine). Fix the
    /// settings: retrying does not help.
    #[error("invalid policy engine settings: {0}")]
    Config(String),
}

impl EngineError {
    /// True when the settings themselves are wrong
    /// ([`EngineError::Config`]), as opposed to a policy that does not load
    /// or an engine that cannot be reached.
    pub fn is_config(&self) -> bool {
        matches!(self, Self::Config(_))
    }

    /// True for a timeout.
    pub fn is_timeout(&self) -> bool {
        matches!(self, Self::Timeout)
    }

    /// True when the breaker rejected the call without contacting the engine.
    pub fn is_circuit_open(&self) -> bool {
        matches!(self, Self::CircuitOpen)
    }

    /// True when the engine could not be asked at all: a timeout, a transport
    /// error, an open circuit breaker or an HTTP 5xx that is not a policy
    /// evaluation error. Only these let [`FailMode::Open`](crate::FailMode)
    /// allow a request.
    ///
    /// Everything else means the engine was reached and the policy itself is
    /// wrong or could not decide on this input — an undefined decision (wrong
    /// package path, no policy loaded), a malformed answer, an evaluation
    /// error, a load error, an HTTP 4xx — and is always denied: failing open
    /// there would let one crafted input, or one bad deployment, allow
    /// everything.
    pub fn is_unavailable(&self) -> bool {
        match self {
            Self::Timeout | Self::Transport(_) | Self::CircuitOpen => true,
            Self::Status(code) => *code >= 500,
            Self::MalformedResponse(_)
            | Self::Undefined
            | Self::Evaluation(_)
            | Self::Load(_)
            | Self::Config(_) => false,
        }
    }

    /// True when the engine answered something unusable.
    pub fn is_malformed(&self) -> bool {
        matches!(self, Self::MalformedResponse(_) | Self::Undefined)
    }

    /// Bounded label for metrics and audit.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Timeout => "timeout",
            Self::Transport(_) => "transport",
            Self::Status(_) => "status",
            Self::MalformedResponse(_) => "malformed_response",
            Self::Undefined => "undefined",
            Self::CircuitOpen => "circuit_open",
            Self::Evaluation(_) => "evaluation",
            Self::Load(_) => "load",
            Self::Config(_) => "config",
        }
    }
}

/// Why an authorization check did not allow the request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthzError {
    /// The policy denied the action (HTTP 403 `forbidden`).
    #[error("forbidden: {action}")]
    Forbidden {
        /// The action denied.
        action: String,
        /// The policy's reasons.
        reasons: Vec<String>,
    },
    /// No engine decision could be had in fail-closed mode (HTTP 503
    /// `policy_unavailable`).
    #[error("policy unavailable: {0}")]
    Unavailable(#[from] EngineError),
    /// The route/method has no action mapping, so it is denied (HTTP 403).
    #[error("no action mapped for {method} {route}")]
    Unmapped {
        /// Request method.
        method: String,
        /// Route template (`<unmatched>` when the server matched no route
        /// template: the raw path is not echoed).
        route: String,
    },
    /// No principal on the request: the authentication layer is missing in
    /// front of the authorization layer (HTTP 401).
    #[error("request is not authenticated")]
    Unauthenticated,
}

impl AuthzError {
    /// True when the policy said no (or the route is unmapped).
    pub fn is_forbidden(&self) -> bool {
        matches!(self, Self::Forbidden { .. } | Self::Unmapped { .. })
    }

    /// True when no decision could be had (fail closed).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }

    /// The HTTP status for this outcome.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Forbidden { .. } | Self::Unmapped { .. } => StatusCode::FORBIDDEN,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Unauthenticated => StatusCode::UNAUTHORIZED,
        }
    }

    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Forbidden { .. } | Self::Unmapped { .. } => "forbidden",
            Self::Unavailable(_) => "policy_unavailable",
            Self::Unauthenticated => "unauthenticated",
        }
    }
}
