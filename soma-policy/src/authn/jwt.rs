//! Bearer JWT verification: several issuers, static keys or JWKS.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm};
use jsonwebtoken::{DecodingKey, Validation, errors::ErrorKind};
use parking_lot::RwLock;
use serde::Deserialize;
use serde_json::Value;

use crate::config::{IssuerConfig, JwksConfig, JwtAlgorithm, PolicyConfig};
use crate::metrics::PolicyMetrics;
use crate::{AuthError, AuthKind, Principal};

/// Verifies bearer JWTs against the configured issuers.
///
/// Checks, in order: size, shape, `alg` (only HS256, RS256, ES256, EdDSA; never
/// `none`), issuer, key (by `kid` and `alg`; a key only verifies the
/// algorithm it is configured for), signature, `exp`, `nbf`, `aud`, then the
/// `sub` and tenant claims.
pub struct JwtVerifier {
    issuers: HashMap<String, Issuer>,
    max_token_bytes: usize,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("issuers", &self.issuers.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

struct Issuer {
    name: String,
    static_keys: Vec<VerifyKey>,
    jwks: Option<Jwks>,
    tenant_claim: String,
    roles_claim: String,
    validations: HashMap<JwtAlgorithm, Validation>,
}

#[derive(Clone)]
struct VerifyKey {
    kid: Option<String>,
    alg: JwtAlgorithm,
    key: Arc<DecodingKey>,
}

/// Error building a verifier from configuration.
#[derive(Debug, thiserror::Error)]
#[error("invalid issuer configuration for {issuer:?}: {reason}")]
pub struct JwtConfigError {
    issuer: String,
    reason: String,
}

impl JwtVerifier {
    /// Builds a verifier from the `policy` section.
    pub fn from_config(
        config: &PolicyConfig,
        metrics: PolicyMetrics,
    ) -> Result<Self, JwtConfigError> {
        let mut issuers = HashMap::new();
        for ic in &config.issuers {
            let issuer = Issuer::build(ic, config, metrics.clone())?;
            issuers.insert(ic.issuer.clone(), issuer);
        }
        Ok(Self {
            issuers,
            max_token_bytes: config.max_token_bytes,
        })
    }

    /// True when at least one issuer is configured.
    pub fn has_issuers(&self) -> bool {
        !self.issuers.is_empty()
    }

    /// Verifies `token` and returns the principal it names.
    pub async fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        if token.len() > self.max_token_bytes {
            return Err(AuthError::Oversized {
                len: token.len(),
                max: self.max_token_bytes,
            });
        }
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(_s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(AuthError::Malformed("expected three dot-separated parts"));
        };
        #[derive(Deserialize)]
        struct RawHeader {
            alg: Option<String>,
            kid: Option<String>,
        }
        let header: RawHeader =
            decode_segment(h).ok_or(AuthError::Malformed("header is not base64url JSON"))?;
        let alg_name = header
            .alg
            .ok_or(AuthError::Malformed("header has no alg"))?;
        let alg =
            JwtAlgorithm::parse(&alg_name).ok_or(AuthError::UnsupportedAlgorithm(alg_name))?;
        #[derive(Deserialize)]
        struct RawIss {
            iss: Option<String>,
        }
        let claims: RawIss =
            decode_segment(p).ok_or(AuthError::Malformed("payload is not base64url JSON"))?;
        let iss = claims
            .iss
            .ok_or_else(|| AuthError::InvalidClaims("missing iss".into()))?;
        let issuer = self.issuers.get(&iss).ok_or(AuthError::UnknownIssuer)?;
        let candidates = issuer.keys_for(header.kid.as_deref(), alg).await?;
        let validation = &issuer.validations[&alg];
        let mut last = AuthError::UnknownKey;
        for key in candidates {
            match jsonwebtoken::decode::<Value>(token, &key.key, validation) {
                Ok(data) => return issuer.principal(data.claims),
                Err(e) => {
                    last = map_jwt_error(e.kind());
                    if !matches!(last, AuthError::BadSignature) {
                        return Err(last);
                    }
                }
            }
        }
        Err(last)
    }
}

fn decode_segment<T: for<'de> Deserialize<'de>>(seg: &str) -> Option<T> {
    let raw = URL_SAFE_NO_PAD.decode(seg.trim_end_matches('=')).ok()?;
    serde_json::from_slice(&raw).ok()
}

fn map_jwt_error(kind: &ErrorKind) -> AuthError {
    match kind {
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::InvalidAudience => AuthError::WrongAudience,
        ErrorKind::InvalidSignature => AuthError::BadSignature,
        ErrorKind::InvalidIssuer => AuthError::UnknownIssuer,
        ErrorKind::InvalidAlgorithm => AuthError::UnknownKey,
        ErrorKind::MissingRequiredClaim(c) => AuthError::InvalidClaims(format!("missing {c}")),
        ErrorKind::InvalidClaimFormat(c) => AuthError::InvalidClaims(format!("bad {c}")),
        ErrorKind::InvalidToken
        | ErrorKind::Base64(_)
        | ErrorKind::Json(_)
        | ErrorKind::Utf8(_) => AuthError::Malformed("undecodable token"),
        _ => AuthError::BadSignature,
    }
}

impl Issuer {
    fn build(
        ic: &IssuerConfig,
        config: &PolicyConfig,
        metrics: PolicyMetrics,
    ) -> Result<Self, JwtConfigError> {
        let err = |reason: String| JwtConfigError {
            issuer: ic.issuer.clone(),
            reason,
        };
        if ic.issuer.is_empty() {
            return Err(err("issuer must not be empty".into()));
        }
        if ic.keys.is_empty() && ic.jwks_url.is_none() {
            return Err(err("needs static keys or a jwks_url".into()));
        }
        let mut static_keys = Vec::new();
        for k in &ic.keys {
            let key = match k.alg {
                JwtAlgorithm::HS256 => {
                    let s = k
                        .secret
                        .as_ref()
                        .ok_or_else(|| err("HS256 key needs `secret`".into()))?;
                    if s.expose_secret().len() < 32 {
                        return Err(err("HS256 secret must be at least 32 bytes".into()));
                    }
                    DecodingKey::from_secret(s.expose_secret().as_bytes())
                }
                alg => {
                    let pem = k.public_key_pem.as_deref().ok_or_else(|| {
                        err(format!("{} key needs `public_key_pem`", alg.as_str()))
                    })?;
                    let r = match alg {
                        JwtAlgorithm::RS256 => DecodingKey::from_rsa_pem(pem.as_bytes()),
                        JwtAlgorithm::ES256 => DecodingKey::from_ec_pem(pem.as_bytes()),
                        _ => DecodingKey::from_ed_pem(pem.as_bytes()),
                    };
                    r.map_err(|e| err(format!("bad {} public key: {e}", alg.as_str())))?
                }
            };
            static_keys.push(VerifyKey {
                kid: k.kid.clone(),
                alg: k.alg,
                key: Arc::new(key),
            });
        }
        let audiences = if ic.audiences.is_empty() {
            config.audiences.clone()
        } else {
            ic.audiences.clone()
        };
        if audiences.is_empty() {
            return Err(err("no audiences configured".into()));
        }
        let mut validations = HashMap::new();
        for alg in [
            JwtAlgorithm::HS256,
            JwtAlgorithm::RS256,
            JwtAlgorithm::ES256,
            JwtAlgorithm::EdDSA,
        ] {
            let mut v = Validation::new(alg.to_jwt());
            v.leeway = config.leeway_secs;
            v.validate_exp = true;
            v.validate_nbf = true;
            v.validate_aud = true;
            v.set_audience(&audiences);
            v.set_issuer(&[&ic.issuer]);
            v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
            validations.insert(alg, v);
        }
        let jwks = match &ic.jwks_url {
            Some(url) => Some(Jwks::new(url.clone(), &config.jwks, metrics).map_err(err)?),
            None => None,
        };
        Ok(Self {
            name: ic.issuer.clone(),
            static_keys,
            jwks,
            tenant_claim: ic.tenant_claim.clone(),
            roles_claim: ic.roles_claim.clone(),
            validations,
        })
    }

    async fn keys_for(
        &self,
        kid: Option<&str>,
        alg: JwtAlgorithm,
    ) -> Result<Vec<VerifyKey>, AuthError> {
        let matches = |k: &VerifyKey| k.alg == alg && (kid.is_none() || k.kid.as_deref() == kid);
        let mut out: Vec<VerifyKey> = self
            .static_keys
            .iter()
            .filter(|k| matches(k))
            .cloned()
            .collect();
        if out.is_empty() {
            if let Some(jwks) = &self.jwks {
                out = jwks.keys_for(kid, alg).await?;
            }
        }
        if out.is_empty() {
            Err(AuthError::UnknownKey)
        } else {
            Ok(out)
        }
    }

    fn principal(&self, claims: Value) -> Result<Principal, AuthError> {
        let sub = claims
            .get("sub")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty());
        let sub =
            sub.ok_or_else(|| AuthError::InvalidClaims("sub must be a non-empty string".into()))?;
        let tenant = claims
            .get(&self.tenant_claim)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty());
        let tenant = tenant.ok_or_else(|| {
            AuthError::InvalidClaims(format!("{} must be a non-empty string", self.tenant_claim))
        })?;
        let roles = string_list(claims.get(&self.roles_claim)).ok_or_else(|| {
            AuthError::InvalidClaims(format!("{} must be an array of strings", self.roles_claim))
        })?;
        // `scope` (space-separated string, RFC 8693) or `scp` (array).
        let scopes = match (claims.get("scope"), claims.get("scp")) {
            (Some(Value::String(s)), _) => s.split_whitespace().map(str::to_owned).collect(),
            (None, scp) => string_list(scp).ok_or_else(|| {
                AuthError::InvalidClaims("scp must be an array of strings".into())
            })?,
            _ => return Err(AuthError::InvalidClaims("scope must be a string".into())),
        };
        Ok(Principal {
            subject: sub.to_owned(),
            tenant: tenant.to_owned(),
            roles,
            scopes,
            auth_kind: AuthKind::Jwt {
                issuer: self.name.clone(),
            },
        })
    }
}

fn string_list(v: Option<&Value>) -> Option<Vec<String>> {
    match v {
        None | Some(Value::Null) => Some(Vec::new()),
        Some(Value::Array(a)) => a.iter().map(|x| x.as_str().map(str::to_owned)).collect(),
        Some(_) => None,
    }
}

/// One issuer's JWKS: fetched lazily, cached, refetched on an unknown `kid`
/// at most once per cooldown window (single-flight).
struct Jwks {
    url: String,
    client: reqwest::Client,
    cooldown: Duration,
    max_age: Duration,
    state: RwLock<JwksState>,
    fetch: tokio::sync::Mutex<()>,
    metrics: PolicyMetrics,
}

#[derive(Default)]
struct JwksState {
    keys: Vec<VerifyKey>,
    fetched_at: Option<Instant>,
    attempted_at: Option<Instant>,
}

impl Jwks {
    fn new(url: String, cfg: &JwksConfig, metrics: PolicyMetrics) -> Result<Self, String> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(cfg.timeout_ms))
            .build()
            .map_err(|e| format!("http client: {e}"))?;
        Ok(Self {
            url,
            client,
            cooldown: Duration::from_secs(cfg.refetch_cooldown_secs),
            max_age: Duration::from_secs(cfg.max_age_secs),
            state: RwLock::new(JwksState::default()),
            fetch: tokio::sync::Mutex::new(()),
            metrics,
        })
    }

    fn lookup(&self, kid: Option<&str>, alg: JwtAlgorithm) -> (Vec<VerifyKey>, bool, bool) {
        let st = self.state.read();
        let keys: Vec<VerifyKey> = st
            .keys
            .iter()
            .filter(|k| k.alg == alg && (kid.is_none() || k.kid.as_deref() == kid))
            .cloned()
            .collect();
        let stale = st.fetched_at.is_none_or(|t| t.elapsed() >= self.max_age);
        let may_fetch = st.attempted_at.is_none_or(|t| t.elapsed() >= self.cooldown);
        (keys, stale, may_fetch)
    }

    async fn keys_for(
        &self,
        kid: Option<&str>,
        alg: JwtAlgorithm,
    ) -> Result<Vec<VerifyKey>, AuthError> {
        let (keys, stale, may_fetch) = self.lookup(kid, alg);
        if !keys.is_empty() && !stale {
            return Ok(keys);
        }
        if !may_fetch {
            // Within the cooldown: answer from what we have, never hammer the IdP.
            return if keys.is_empty() {
                Err(AuthError::UnknownKey)
            } else {
                Ok(keys)
            };
        }
        let _guard = self.fetch.lock().await;
        // Another task may have fetched while we waited.
        let (keys, stale, may_fetch) = self.lookup(kid, alg);
        if (!keys.is_empty() && !stale) || !may_fetch {
            return if keys.is_empty() {
                Err(AuthError::UnknownKey)
            } else {
                Ok(keys)
            };
        }
        self.state.write().attempted_at = Some(Instant::now());
        match self.fetch_keys().await {
            Ok(fresh) => {
                self.metrics.jwks_fetch("ok");
                let mut st = self.state.write();
                st.keys = fresh;
                st.fetched_at = Some(Instant::now());
            }
            Err(e) => {
                self.metrics.jwks_fetch("error");
                tracing::warn!(url = %self.url, error = %e, "jwks fetch failed");
                if keys.is_empty() {
                    return Err(AuthError::Unavailable(format!("JWKS fetch failed: {e}")));
                }
                // Keep serving the keys we have.
                return Ok(keys);
            }
        }
        let (keys, _, _) = self.lookup(kid, alg);
        if keys.is_empty() {
            Err(AuthError::UnknownKey)
        } else {
            Ok(keys)
        }
    }

    async fn fetch_keys(&self) -> Result<Vec<VerifyKey>, String> {
        let resp = self
            .client
            .get(&self.url)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("HTTP {}", resp.status().as_u16()));
        }
        let bytes = resp.bytes().await.map_err(|e| e.to_string())?;
        if bytes.len() > 1024 * 1024 {
            return Err("JWKS document larger than 1 MiB".into());
        }
        let set: JwkSet = serde_json::from_slice(&bytes).map_err(|e| format!("bad JWKS: {e}"))?;
        let mut out = Vec::new();
        for jwk in &set.keys {
            let alg = match (&jwk.common.key_algorithm, &jwk.algorithm) {
                (Some(KeyAlgorithm::HS256), _) => continue, // never accept symmetric keys from a JWKS
                (Some(KeyAlgorithm::RS256), _) => JwtAlgorithm::RS256,
                (Some(KeyAlgorithm::ES256), _) => JwtAlgorithm::ES256,
                (Some(KeyAlgorithm::EdDSA), _) => JwtAlgorithm::EdDSA,
                (Some(_), _) => continue,
                (None, AlgorithmParameters::RSA(_)) => JwtAlgorithm::RS256,
                (None, AlgorithmParameters::EllipticCurve(p)) if p.curve == EllipticCurve::P256 => {
                    JwtAlgorithm::ES256
                }
                (None, AlgorithmParameters::OctetKeyPair(p))
                    if p.curve == EllipticCurve::Ed25519 =>
                {
                    JwtAlgorithm::EdDSA
                }
                (None, _) => continue,
            };
            match DecodingKey::from_jwk(jwk) {
                Ok(key) => out.push(VerifyKey {
                    kid: jwk.common.key_id.clone(),
                    alg,
                    key: Arc::new(key),
                }),
                Err(e) => tracing::warn!(url = %self.url, error = %e, "skipping unusable JWK"),
            }
        }
        Ok(out)
    }
}
