//! Bearer JWT verification: several issuers, static keys or JWKS.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jsonwebtoken::DecodingKey;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm};
use parking_lot::RwLock;
use sha2::{Digest, Sha256};

use super::jws::{self, Claim, ClaimNames, Claims, KeyMaterial};

use crate::config::{IssuerConfig, JwksConfig, JwtAlgorithm, PolicyConfig};
use crate::metrics::PolicyMetrics;
use crate::{AuthError, AuthKind, Principal};

/// Verifies bearer JWTs against the configured issuers.
///
/// Checks, in order: size, shape, `alg` (only HS256, RS256, ES256, EdDSA; never
/// `none`), key (by `kid` and `alg`; a key only verifies the algorithm it is
/// configured for; a token without `kid` only when its issuer has exactly one
/// key of that algorithm), signature, `exp`, `nbf`, `iss`, `aud`, then the `sub`
/// and tenant claims. With several issuers, `iss` is read first, since it
/// picks the keys. A token that passed them all is remembered (see
/// [`TokenCacheConfig`](crate::TokenCacheConfig)); a cached token is only
/// re-checked against the clock.
pub struct JwtVerifier {
    issuers: HashMap<String, Issuer>,
    max_token_bytes: usize,
    leeway_secs: u64,
    cache: Option<moka::sync::Cache<[u8; 32], Arc<Verified>>>,
    /// Bumped whenever an issuer's JWKS key set is replaced; entries cached
    /// under an older generation are misses.
    key_generation: Arc<AtomicU64>,
    metrics: PolicyMetrics,
}

/// A token that passed verification.
struct Verified {
    principal: Principal,
    exp: u64,
    nbf: Option<u64>,
    key_generation: u64,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `exp` and `nbf` against the clock, with `leeway` seconds either way: at
/// verification and again on every token-cache hit.
fn check_window(exp: u64, nbf: Option<u64>, leeway: u64) -> Result<(), AuthError> {
    let now = unix_now();
    if exp < now.saturating_sub(leeway) {
        return Err(AuthError::Expired);
    }
    if nbf.is_some_and(|nbf| nbf > now.saturating_add(leeway)) {
        return Err(AuthError::NotYetValid);
    }
    Ok(())
}

/// The keys among `keys` that may verify a token with `kid` and `alg`.
///
/// A token without `kid` is verified only when exactly one key of its
/// algorithm is known: with several, it must name one (it would otherwise be
/// tried against every key, and any key ever published would do).
fn matching(keys: &[VerifyKey], kid: Option<&str>, alg: JwtAlgorithm) -> Vec<Arc<KeyMaterial>> {
    let out: Vec<_> = keys
        .iter()
        .filter(|k| k.matches(kid, alg))
        .map(|k| k.key.clone())
        .collect();
    if kid.is_none() && out.len() > 1 {
        return Vec::new();
    }
    out
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
    audiences: Vec<String>,
    key_generation: Arc<AtomicU64>,
}

struct VerifyKey {
    kid: Option<String>,
    alg: JwtAlgorithm,
    key: Arc<KeyMaterial>,
}

impl VerifyKey {
    /// Whether this key may verify a token with `kid` (any key of the
    /// algorithm when the token names none) and `alg`.
    fn matches(&self, kid: Option<&str>, alg: JwtAlgorithm) -> bool {
        self.alg == alg && (kid.is_none() || self.kid.as_deref() == kid)
    }
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
        let key_generation = Arc::new(AtomicU64::new(0));
        let mut issuers = HashMap::new();
        for ic in &config.issuers {
            let issuer = Issuer::build(ic, config, metrics.clone(), key_generation.clone())?;
            issuers.insert(ic.issuer.clone(), issuer);
        }
        let tc = &config.token_cache;
        let cache = tc.enabled.then(|| {
            moka::sync::Cache::builder()
                .max_capacity(tc.capacity)
                .time_to_live(Duration::from_secs(tc.max_ttl_secs))
                .build()
        });
        Ok(Self {
            issuers,
            max_token_bytes: config.max_token_bytes,
            leeway_secs: config.leeway_secs,
            cache,
            key_generation,
            metrics,
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
        let Some(cache) = &self.cache else {
            return self.verify_uncached(token).await.map(|v| v.principal);
        };
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let generation = self.key_generation.load(Ordering::Acquire);
        if let Some(hit) = cache.get(&key) {
            if hit.key_generation == generation {
                self.metrics.token_cache(true);
                // The validity window again, against the clock of now.
                if let Err(e) = check_window(hit.exp, hit.nbf, self.leeway_secs) {
                    if e.is_expired() {
                        cache.invalidate(&key);
                    }
                    return Err(e);
                }
                return Ok(hit.principal.clone());
            }
        }
        self.metrics.token_cache(false);
        let verified = self.verify_uncached(token).await?;
        let principal = verified.principal.clone();
        // Tagged with the generation its key was read under: if the key set
        // changed since, the next request verifies again.
        cache.insert(key, Arc::new(verified));
        Ok(principal)
    }

    fn single_issuer(&self) -> Option<&Issuer> {
        match self.issuers.len() {
            1 => self.issuers.values().next(),
            _ => None,
        }
    }

    async fn verify_uncached(&self, token: &str) -> Result<Verified, AuthError> {
        let parts = jws::split(token)?;
        let payload = &parts.payload;
        let issuer = match self.single_issuer() {
            // One issuer: its claim names are known before the payload is
            // read, so the payload is read once, after the signature.
            Some(issuer) => issuer,
            None => {
                // Several: `iss` picks the issuer (and its keys) before the
                // signature can be checked.
                let claims = Claims::parse(payload, ClaimNames::STANDARD)?;
                self.issuers
                    .get(claims.iss()?)
                    .ok_or(AuthError::UnknownIssuer)?
            }
        };
        let alg = parts.header.alg;
        let (candidates, key_generation) =
            issuer.keys_for(parts.header.kid.as_deref(), alg).await?;
        let message = parts.message.as_bytes();
        if !candidates
            .iter()
            .any(|k| k.verifies(message, &parts.signature))
        {
            return Err(AuthError::BadSignature);
        }
        let claims = Claims::parse(payload, issuer.claim_names())?;
        issuer.validate(&claims, self.leeway_secs, key_generation)
    }
}

impl Issuer {
    fn build(
        ic: &IssuerConfig,
        config: &PolicyConfig,
        metrics: PolicyMetrics,
        key_generation: Arc<AtomicU64>,
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
                    KeyMaterial::hmac(s.expose_secret().as_bytes())
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
                    let key =
                        r.map_err(|e| err(format!("bad {} public key: {e}", alg.as_str())))?;
                    KeyMaterial::public(alg, &key).map_err(err)?
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
        let jwks = match &ic.jwks_url {
            Some(url) => Some(
                Jwks::new(url.clone(), &config.jwks, metrics, key_generation.clone())
                    .map_err(err)?,
            ),
            None => None,
        };
        Ok(Self {
            name: ic.issuer.clone(),
            static_keys,
            jwks,
            tenant_claim: ic.tenant_claim.clone(),
            roles_claim: ic.roles_claim.clone(),
            audiences,
            key_generation,
        })
    }

    /// The keys that may verify a token with `kid` and `alg`, and the key
    /// generation they were read under.
    async fn keys_for(
        &self,
        kid: Option<&str>,
        alg: JwtAlgorithm,
    ) -> Result<(Vec<Arc<KeyMaterial>>, u64), AuthError> {
        let out = matching(&self.static_keys, kid, alg);
        if !out.is_empty() {
            // Static keys never change; any generation is current for them.
            return Ok((out, self.key_generation.load(Ordering::Acquire)));
        }
        match &self.jwks {
            Some(jwks) => jwks.keys_for(kid, alg).await,
            None => Err(AuthError::UnknownKey),
        }
    }

    fn claim_names(&self) -> ClaimNames<'_> {
        ClaimNames {
            tenant: Some(&self.tenant_claim),
            roles: Some(&self.roles_claim),
        }
    }

    /// The checks after the signature, in order: `exp`, `nbf` (both with
    /// the leeway), `iss`, `aud`, then the identity claims.
    fn validate(
        &self,
        claims: &Claims<'_>,
        leeway: u64,
        key_generation: u64,
    ) -> Result<Verified, AuthError> {
        let exp = claims.exp()?;
        let nbf = claims.nbf()?;
        check_window(exp, nbf, leeway)?;
        if claims.iss()? != self.name {
            return Err(AuthError::UnknownIssuer);
        }
        claims.check_audience(&self.audiences)?;
        Ok(Verified {
            principal: self.principal(claims)?,
            exp,
            nbf,
            key_generation,
        })
    }

    fn principal(&self, claims: &Claims<'_>) -> Result<Principal, AuthError> {
        let non_empty = |c: &Option<Claim<'_>>| match c {
            Some(Claim::Str(s)) if !s.is_empty() => Some(s.to_string()),
            _ => None,
        };
        let subject = non_empty(&claims.sub)
            .ok_or_else(|| AuthError::InvalidClaims("sub must be a non-empty string".into()))?;
        let tenant = non_empty(&claims.tenant).ok_or_else(|| {
            AuthError::InvalidClaims(format!("{} must be a non-empty string", self.tenant_claim))
        })?;
        let roles = string_list(&claims.roles).ok_or_else(|| {
            AuthError::InvalidClaims(format!("{} must be an array of strings", self.roles_claim))
        })?;
        // `scope` (space-separated string, RFC 8693) or `scp` (array).
        let scopes = match (&claims.scope, &claims.scp) {
            (Some(Claim::Str(s)), _) => s.split_whitespace().map(str::to_owned).collect(),
            (None, scp) => string_list(scp).ok_or_else(|| {
                AuthError::InvalidClaims("scp must be an array of strings".into())
            })?,
            _ => return Err(AuthError::InvalidClaims("scope must be a string".into())),
        };
        Ok(Principal {
            subject,
            tenant,
            roles,
            scopes,
            auth_kind: AuthKind::Jwt {
                issuer: self.name.clone(),
            },
        })
    }
}

fn string_list(v: &Option<Claim<'_>>) -> Option<Vec<String>> {
    match v {
        None | Some(Claim::Null) => Some(Vec::new()),
        Some(Claim::StrList(a)) => Some(a.iter().map(|x| x.to_string()).collect()),
        Some(_) => None,
    }
}

/// Largest JWKS document read; a longer one is refused while it streams in.
const MAX_JWKS_BYTES: usize = 1024 * 1024;

/// A JWKS URL must be `https://`; `http://` only for a loopback host
/// (`localhost`, `127.0.0.0/8`, `::1`: a sidecar or a test), where nothing
/// crosses a network.
fn check_jwks_url(url: &str) -> Result<(), String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("jwks_url {url:?}: {e}"))?;
    let host = parsed.host_str().unwrap_or("");
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    match parsed.scheme() {
        "https" => Ok(()),
        "http" if loopback => Ok(()),
        _ => Err(format!(
            "jwks_url {url:?} must use https (http is allowed only for a loopback host)"
        )),
    }
}

/// The response body, refused as soon as it grows past `max` bytes (the
/// whole body is never buffered first).
async fn read_limited(mut resp: reqwest::Response, max: usize) -> Result<Vec<u8>, String> {
    let too_large = || format!("JWKS document larger than {max} bytes");
    if resp.content_length().is_some_and(|n| n > max as u64) {
        return Err(too_large());
    }
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
        if out.len() + chunk.len() > max {
            return Err(too_large());
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
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
    key_generation: Arc<AtomicU64>,
}

#[derive(Default)]
struct JwksState {
    keys: Vec<VerifyKey>,
    fetched_at: Option<Instant>,
    attempted_at: Option<Instant>,
}

impl Jwks {
    fn new(
        url: String,
        cfg: &JwksConfig,
        metrics: PolicyMetrics,
        key_generation: Arc<AtomicU64>,
    ) -> Result<Self, String> {
        check_jwks_url(&url)?;
        // No redirects: a JWKS URL names the one place keys come from; a
        // redirect (to http, to another host) would let whoever controls it
        // choose the keys.
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(cfg.timeout_ms))
            .redirect(reqwest::redirect::Policy::none())
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
            key_generation,
        })
    }

    /// Matching keys, whether they are stale, whether a fetch is allowed,
    /// and the key generation, read under the same lock as the keys (the
    /// generation is bumped under the write lock that replaces them).
    fn lookup(
        &self,
        kid: Option<&str>,
        alg: JwtAlgorithm,
    ) -> (Vec<Arc<KeyMaterial>>, bool, bool, u64) {
        let st = self.state.read();
        let keys = matching(&st.keys, kid, alg);
        let stale = st.fetched_at.is_none_or(|t| t.elapsed() >= self.max_age);
        let may_fetch = st.attempted_at.is_none_or(|t| t.elapsed() >= self.cooldown);
        let generation = self.key_generation.load(Ordering::Acquire);
        (keys, stale, may_fetch, generation)
    }

    async fn keys_for(
        &self,
        kid: Option<&str>,
        alg: JwtAlgorithm,
    ) -> Result<(Vec<Arc<KeyMaterial>>, u64), AuthError> {
        let found = |keys: Vec<Arc<KeyMaterial>>, generation| {
            if keys.is_empty() {
                Err(AuthError::UnknownKey)
            } else {
                Ok((keys, generation))
            }
        };
        // Fresh, or within the cooldown: answer from what we have, never
        // hammer the IdP.
        let answer_now = |keys: &[Arc<KeyMaterial>], stale: bool, may_fetch: bool| {
            (!keys.is_empty() && !stale) || !may_fetch
        };
        let (keys, stale, may_fetch, generation) = self.lookup(kid, alg);
        if answer_now(&keys, stale, may_fetch) {
            return found(keys, generation);
        }
        let _guard = self.fetch.lock().await;
        // Another task may have fetched while we waited.
        let (keys, stale, may_fetch, generation) = self.lookup(kid, alg);
        if answer_now(&keys, stale, may_fetch) {
            return found(keys, generation);
        }
        self.state.write().attempted_at = Some(Instant::now());
        match self.fetch_keys().await {
            Ok(fresh) => {
                self.metrics.jwks_fetch("ok");
                let mut st = self.state.write();
                st.keys = fresh;
                st.fetched_at = Some(Instant::now());
                // Tokens verified with the previous key set are verified again.
                self.key_generation.fetch_add(1, Ordering::AcqRel);
            }
            Err(e) => {
                self.metrics.jwks_fetch("error");
                tracing::warn!(url = %self.url, error = %e, "jwks fetch failed");
                if keys.is_empty() {
                    return Err(AuthError::Unavailable(format!("JWKS fetch failed: {e}")));
                }
                // Keep serving the keys we have.
                return Ok((keys, generation));
            }
        }
        let (keys, _, _, generation) = self.lookup(kid, alg);
        found(keys, generation)
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
        let bytes = read_limited(resp, MAX_JWKS_BYTES).await?;
        parse_jwks(&bytes, &self.url)
    }
}

/// The algorithms of [`parse_jwks`]'s keys (the fuzz targets' view).
#[cfg(feature = "fuzzing")]
pub(crate) fn jwks_algorithms(bytes: &[u8]) -> Result<Vec<String>, String> {
    Ok(parse_jwks(bytes, "fuzz")?
        .iter()
        .map(|k| format!("{:?}", k.alg))
        .collect())
}

/// The usable verification keys of a JWKS document (`url` only names it in
/// the log). Symmetric keys and unknown algorithms are skipped: a JWKS
/// never supplies a shared secret.
fn parse_jwks(bytes: &[u8], url: &str) -> Result<Vec<VerifyKey>, String> {
    let set: JwkSet = serde_json::from_slice(bytes).map_err(|e| format!("bad JWKS: {e}"))?;
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
            (None, AlgorithmParameters::OctetKeyPair(p)) if p.curve == EllipticCurve::Ed25519 => {
                JwtAlgorithm::EdDSA
            }
            (None, _) => continue,
        };
        let key = DecodingKey::from_jwk(jwk)
            .map_err(|e| e.to_string())
            .and_then(|key| KeyMaterial::public(alg, &key));
        match key {
            Ok(key) => out.push(VerifyKey {
                kid: jwk.common.key_id.clone(),
                alg,
                key: Arc::new(key),
            }),
            Err(e) => tracing::warn!(url = %url, error = %e, "skipping unusable JWK"),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `check` with the clock's second, retrying if the second changed
    /// meanwhile (the boundary must be read against one `now`).
    fn at_one_second(check: impl Fn(u64) -> Result<(), AuthError>) -> Result<(), AuthError> {
        loop {
            let now = unix_now();
            let r = check(now);
            if unix_now() == now {
                return r;
            }
        }
    }

    #[test]
    fn the_window_includes_both_of_its_edges() {
        let leeway = 60;
        // Expiring exactly at the leeway's edge: still valid; a second before, not.
        assert_eq!(
            at_one_second(|now| check_window(now - leeway, None, leeway)),
            Ok(())
        );
        assert_eq!(
            at_one_second(|now| check_window(now - leeway - 1, None, leeway)),
            Err(AuthError::Expired)
        );
        // Valid from exactly the leeway's edge: already valid; a second later, not yet.
        assert_eq!(
            at_one_second(|now| check_window(now + 600, Some(now + leeway), leeway)),
            Ok(())
        );
        assert_eq!(
            at_one_second(|now| check_window(now + 600, Some(now + leeway + 1), leeway)),
            Err(AuthError::NotYetValid)
        );
    }
}
