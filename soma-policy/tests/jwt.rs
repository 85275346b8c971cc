//! JWT verification: every algorithm, every bad input, JWKS with cooldown.
#![allow(clippy::field_reassign_with_default)] // tests tweak one setting of a default config

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Router;
use axum::routing::get;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::*;
use jsonwebtoken::EncodingKey;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use serde_json::json;
use soma_policy::{
    AuthError, AuthKind, Authenticator, IssuerConfig, JwtAlgorithm, PolicyConfig, PolicyMetrics,
};

fn authenticator(config: &PolicyConfig) -> Authenticator {
    Authenticator::builder(config).build().unwrap()
}

const ALL: [JwtAlgorithm; 4] = [
    JwtAlgorithm::HS256,
    JwtAlgorithm::RS256,
    JwtAlgorithm::ES256,
    JwtAlgorithm::EdDSA,
];

#[tokio::test]
async fn every_algorithm_verifies_and_yields_the_principal() {
    let auth = authenticator(&config_with_static_keys());
    let printed = format!("{auth:?}");
    assert!(
        printed.contains("JwtVerifier") && printed.contains(ISSUER),
        "the issuers an operator debugs with: {printed}"
    );
    for alg in ALL {
        let token = mint(alg, Some(kid_for(alg)), &claims("alice"));
        let p = auth
            .verify_token(&token)
            .await
            .unwrap_or_else(|e| panic!("{alg:?}: {e}"));
        assert_eq!(p.subject, "alice");
        assert_eq!(p.tenant, "t1");
        assert_eq!(p.roles, vec!["user"]);
        assert_eq!(
            p.scopes,
            vec!["conversation:write", "memory:write", "scheduler:read"]
        );
        assert_eq!(
            p.auth_kind,
            AuthKind::Jwt {
                issuer: ISSUER.into()
            }
        );
        // Without a kid, the key is found by algorithm.
        let token = mint(alg, None, &claims("bob"));
        assert_eq!(auth.verify_token(&token).await.unwrap().subject, "bob");
    }
}

#[tokio::test]
async fn malformed_tokens_are_rejected() {
    let auth = authenticator(&config_with_static_keys());
    for bad in [
        "",
        "abc",
        "a.b",
        "a.b.c.d",
        "!!!.###.$$$",
        "eyJhbGciOiJIUzI1NiJ9.e30",
        "eyJ9.eyJ9.sig",
    ] {
        let e = auth.verify_token(bad).await.unwrap_err();
        assert!(matches!(e, AuthError::Malformed(_)), "{bad:?} gave {e:?}");
        assert_eq!(e.status(), 401);
    }
    // Valid header and payload shape, garbage signature.
    let token = mint(JwtAlgorithm::HS256, Some("hs"), &claims("alice"));
    let (head, _) = token.rsplit_once('.').unwrap();
    let e = auth
        .verify_token(&format!("{head}.AAAA"))
        .await
        .unwrap_err();
    assert_eq!(e, AuthError::BadSignature);
}

#[tokio::test]
async fn expired_and_not_yet_valid_tokens_are_rejected_beyond_leeway() {
    let mut config = config_with_static_keys();
    config.leeway_secs = 30;
    let auth = authenticator(&config);
    let mut c = claims("alice");
    c["exp"] = json!(now() - 120);
    let e = auth
        .verify_token(&mint(JwtAlgorithm::RS256, Some("rs"), &c))
        .await
        .unwrap_err();
    assert_eq!(e, AuthError::Expired);
    assert!(e.is_expired());
    // Inside the leeway it still passes.
    c["exp"] = json!(now() - 10);
    auth.verify_token(&mint(JwtAlgorithm::RS256, Some("rs"), &c))
        .await
        .unwrap();

    let mut c = claims("alice");
    c["nbf"] = json!(now() + 600);
    let e = auth
        .verify_token(&mint(JwtAlgorithm::ES256, Some("es"), &c))
        .await
        .unwrap_err();
    assert_eq!(e, AuthError::NotYetValid);
    c["nbf"] = json!(now() + 10);
    auth.verify_token(&mint(JwtAlgorithm::ES256, Some("es"), &c))
        .await
        .unwrap();
}

#[tokio::test]
async fn wrong_audience_and_issuer_are_rejected() {
    let auth = authenticator(&config_with_static_keys());
    let mut c = claims("alice");
    c["aud"] = json!("someone-else");
    assert_eq!(
        auth.verify_token(&mint(JwtAlgorithm::HS256, Some("hs"), &c))
            .await
            .unwrap_err(),
        AuthError::WrongAudience
    );
    let mut c = claims("alice");
    c.as_object_mut().unwrap().remove("aud");
    assert!(matches!(
        auth.verify_token(&mint(JwtAlgorithm::HS256, Some("hs"), &c))
            .await
            .unwrap_err(),
        AuthError::InvalidClaims(_)
    ));
    let mut c = claims("alice");
    c["iss"] = json!("https://evil.example");
    assert_eq!(
        auth.verify_token(&mint(JwtAlgorithm::HS256, Some("hs"), &c))
            .await
            .unwrap_err(),
        AuthError::UnknownIssuer
    );
}

#[tokio::test]
async fn alg_none_and_unsupported_algorithms_are_rejected() {
    let auth = authenticator(&config_with_static_keys());
    let payload = URL_SAFE_NO_PAD.encode(claims("alice").to_string());
    for alg in ["none", "None", "HS512", "RS384", "PS256"] {
        let header = URL_SAFE_NO_PAD.encode(json!({"alg": alg, "typ": "JWT"}).to_string());
        for sig in ["", "c2ln"] {
            let e = auth
                .verify_token(&format!("{header}.{payload}.{sig}"))
                .await
                .unwrap_err();
            assert_eq!(e, AuthError::UnsupportedAlgorithm(alg.into()), "alg {alg}");
        }
    }
}

#[tokio::test]
async fn wrong_key_and_algorithm_confusion_are_rejected() {
    let auth = authenticator(&config_with_static_keys());
    // Signed by a different RSA key under the trusted kid.
    let other = EncodingKey::from_rsa_pem(fixture("rsa2_private.pem").as_bytes()).unwrap();
    let token = mint_with(JwtAlgorithm::RS256, &other, Some("rs"), &claims("alice"));
    assert_eq!(
        auth.verify_token(&token).await.unwrap_err(),
        AuthError::BadSignature
    );
    // HS256 with a different secret.
    let token = mint_with(
        JwtAlgorithm::HS256,
        &EncodingKey::from_secret(b"another-secret-another-secret-xx"),
        Some("hs"),
        &claims("a"),
    );
    assert_eq!(
        auth.verify_token(&token).await.unwrap_err(),
        AuthError::BadSignature
    );
    // HS256 "signed" with the RSA public key under the RSA kid: the kid's key
    // only verifies RS256, so no key matches.
    let pubkey = fixture("rsa_public.pem");
    let token = mint_with(
        JwtAlgorithm::HS256,
        &EncodingKey::from_secret(pubkey.as_bytes()),
        Some("rs"),
        &claims("a"),
    );
    assert_eq!(
        auth.verify_token(&token).await.unwrap_err(),
        AuthError::UnknownKey
    );
    // Unknown kid with static keys only.
    let token = mint(JwtAlgorithm::RS256, Some("nope"), &claims("alice"));
    assert_eq!(
        auth.verify_token(&token).await.unwrap_err(),
        AuthError::UnknownKey
    );
}

#[tokio::test]
async fn oversized_tokens_are_rejected_before_parsing() {
    let mut config = config_with_static_keys();
    config.max_token_bytes = 4096;
    let auth = authenticator(&config);
    let mut c = claims("alice");
    c["padding"] = json!("x".repeat(8000));
    let token = mint(JwtAlgorithm::HS256, Some("hs"), &c);
    let e = auth.verify_token(&token).await.unwrap_err();
    assert!(matches!(e, AuthError::Oversized { max: 4096, .. }), "{e:?}");
    assert!(
        !e.to_string().contains(&token[..20]),
        "error must not echo the token"
    );
    // The bound is inclusive: a token of exactly max_token_bytes is read.
    let token = mint(JwtAlgorithm::HS256, Some("hs"), &claims("alice"));
    config.max_token_bytes = token.len();
    let auth = authenticator(&config);
    assert_eq!(auth.verify_token(&token).await.unwrap().subject, "alice");
}

/// With one issuer the signature is checked before the payload is read: a
/// forged token with a payload that is not even JSON is a bad signature,
/// never parsed.
#[tokio::test]
async fn one_issuer_checks_the_signature_before_reading_the_payload() {
    let auth = authenticator(&config_with_static_keys());
    let header = URL_SAFE_NO_PAD.encode(json!({"alg": "HS256", "kid": "hs"}).to_string());
    let payload = URL_SAFE_NO_PAD.encode("not json at all");
    let token = format!("{header}.{payload}.c2ln");
    assert_eq!(
        auth.verify_token(&token).await.unwrap_err(),
        AuthError::BadSignature
    );
}

#[tokio::test]
async fn missing_or_bad_identity_claims_are_rejected() {
    let auth = authenticator(&config_with_static_keys());
    for (field, value) in [
        ("tenant", json!(null)),
        ("tenant", json!("")),
        ("roles", json!("admin")),
        ("sub", json!("")),
    ] {
        let mut c = claims("alice");
        c[field] = value;
        let e = auth
            .verify_token(&mint(JwtAlgorithm::HS256, Some("hs"), &c))
            .await
            .unwrap_err();
        assert!(matches!(e, AuthError::InvalidClaims(_)), "{field}: {e:?}");
    }
}

#[test]
fn weak_hs256_secrets_and_keyless_issuers_are_refused_at_build() {
    let mut config = config_with_static_keys();
    config.issuers[0].keys[0].secret = Some("short".into());
    assert!(Authenticator::builder(&config).build().is_err());
    // 32 bytes is the floor, inclusive.
    config.issuers[0].keys[0].secret = Some("x".repeat(31).into());
    assert!(Authenticator::builder(&config).build().is_err());
    config.issuers[0].keys[0].secret = Some("x".repeat(32).into());
    assert!(Authenticator::builder(&config).build().is_ok());
    let mut config = PolicyConfig::default();
    config.issuers = vec![IssuerConfig::new(ISSUER)];
    assert!(Authenticator::builder(&config).build().is_err());
    assert!(
        Authenticator::builder(&PolicyConfig::default())
            .build()
            .is_err(),
        "no credential source"
    );
}

/// A JWKS endpoint that counts hits and serves the keys in `keys`.
async fn jwks_server(keys: Arc<parking_lot::Mutex<Vec<Jwk>>>, hits: Arc<AtomicUsize>) -> String {
    let app = Router::new().route(
        "/jwks",
        get(move || {
            let keys = keys.clone();
            let hits = hits.clone();
            async move {
                hits.fetch_add(1, Ordering::SeqCst);
                axum::Json(JwkSet {
                    keys: keys.lock().clone(),
                })
            }
        }),
    );
    format!("{}/jwks", serve(app).await)
}

fn public_jwk(private_pem_fixture: &str, kid: &str) -> Jwk {
    let key = EncodingKey::from_rsa_pem(fixture(private_pem_fixture).as_bytes()).unwrap();
    let mut jwk = Jwk::from_encoding_key(&key, jsonwebtoken::Algorithm::RS256).unwrap();
    jwk.common.key_id = Some(kid.into());
    jwk
}

/// An authenticator whose one issuer publishes `k1` (rsa_private.pem) on a
/// JWKS endpoint this test controls.
struct JwksIssuer {
    auth: Authenticator,
    keys: Arc<parking_lot::Mutex<Vec<Jwk>>>,
    hits: Arc<AtomicUsize>,
    metrics: PolicyMetrics,
}

async fn jwks_issuer(refetch_cooldown_secs: u64) -> JwksIssuer {
    let keys = Arc::new(parking_lot::Mutex::new(vec![public_jwk(
        "rsa_private.pem",
        "k1",
    )]));
    let hits = Arc::new(AtomicUsize::new(0));
    let url = jwks_server(keys.clone(), hits.clone()).await;
    let mut config = PolicyConfig::default();
    config.issuers = vec![IssuerConfig::new(ISSUER).with_jwks_url(url)];
    config.jwks.refetch_cooldown_secs = refetch_cooldown_secs;
    let metrics = PolicyMetrics::default();
    let auth = Authenticator::builder(&config)
        .metrics(metrics.clone())
        .build()
        .unwrap();
    JwksIssuer {
        auth,
        keys,
        hits,
        metrics,
    }
}

#[tokio::test]
async fn jwks_keys_verify_and_unknown_kid_floods_are_throttled() {
    let JwksIssuer {
        auth,
        keys,
        hits,
        metrics,
    } = jwks_issuer(2).await;
    let auth = Arc::new(auth);

    let good = mint(JwtAlgorithm::RS256, Some("k1"), &claims("alice"));
    assert_eq!(auth.verify_token(&good).await.unwrap().subject, "alice");
    assert_eq!(
        hits.load(Ordering::SeqCst),
        1,
        "first use fetches the JWKS once"
    );

    // 500 tokens with made-up kids, concurrently. (Same payload and
    // signature with a new header each: the kid is what matters.)
    let (_, rest) = good.split_once('.').unwrap();
    let mut tasks = Vec::new();
    for i in 0..500 {
        let auth = auth.clone();
        let header = URL_SAFE_NO_PAD.encode(
            json!({"alg": "RS256", "typ": "JWT", "kid": format!("made-up-{i}")}).to_string(),
        );
        let token = format!("{header}.{rest}");
        tasks.push(tokio::spawn(async move { auth.verify_token(&token).await }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap_err(), AuthError::UnknownKey);
    }
    assert!(
        hits.load(Ordering::SeqCst) <= 2,
        "a flood of unknown kids must cost the IdP at most one refetch per cooldown, got {}",
        hits.load(Ordering::SeqCst)
    );
    // Known keys keep working during the flood.
    auth.verify_token(&good).await.unwrap();

    // Key rotation: a new kid published at the IdP is picked up after the cooldown.
    keys.lock().push(public_jwk("rsa2_private.pem", "k2"));
    let rotated = mint_with(
        JwtAlgorithm::RS256,
        &EncodingKey::from_rsa_pem(fixture("rsa2_private.pem").as_bytes()).unwrap(),
        Some("k2"),
        &claims("alice"),
    );
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let before = hits.load(Ordering::SeqCst);
    assert_eq!(auth.verify_token(&rotated).await.unwrap().subject, "alice");
    assert_eq!(hits.load(Ordering::SeqCst), before + 1);
    assert!(metrics.jwks_fetch_count("ok") >= 2);
}

#[tokio::test]
async fn jwks_outage_is_unavailable_not_unauthorized() {
    let port = soma_testkit::free_port();
    let mut config = PolicyConfig::default();
    config.issuers =
        vec![IssuerConfig::new(ISSUER).with_jwks_url(format!("http://127.0.0.1:{port}/jwks"))];
    let auth = authenticator(&config);
    let e = auth
        .verify_token(&mint(JwtAlgorithm::RS256, Some("k1"), &claims("a")))
        .await
        .unwrap_err();
    assert!(e.is_unavailable(), "{e:?}");
    assert_eq!(e.status(), 503);
}

#[tokio::test]
async fn verified_tokens_are_cached_and_still_expire_on_time() {
    let mut config = config_with_static_keys();
    config.leeway_secs = 0;
    let metrics = PolicyMetrics::default();
    let auth = Authenticator::builder(&config)
        .metrics(metrics.clone())
        .build()
        .unwrap();
    let mut c = claims("alice");
    c["exp"] = json!(now() + 2);
    let token = mint(JwtAlgorithm::RS256, Some("rs"), &c);
    let first = auth.verify_token(&token).await.unwrap();
    assert_eq!(metrics.token_cache_counts(), (0, 1));
    let again = auth.verify_token(&token).await.unwrap();
    assert_eq!(again, first);
    assert_eq!(metrics.token_cache_counts(), (1, 1));

    // Another signature over the same header and claims is another token:
    // verified (and rejected), whatever is cached.
    let (head, _) = token.rsplit_once('.').unwrap();
    let forged = format!("{head}.AAAA");
    for _ in 0..2 {
        assert_eq!(
            auth.verify_token(&forged).await.unwrap_err(),
            AuthError::BadSignature
        );
    }
    assert_eq!(
        metrics.token_cache_counts(),
        (1, 3),
        "failures are never cached"
    );

    // A cached token expires exactly when verification would reject it.
    while now() <= c["exp"].as_i64().unwrap() {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(
        auth.verify_token(&token).await.unwrap_err(),
        AuthError::Expired
    );
    assert_eq!(
        auth.verify_token(&token).await.unwrap_err(),
        AuthError::Expired
    );
}

#[tokio::test]
async fn a_jwks_key_set_change_invalidates_cached_tokens() {
    let JwksIssuer {
        auth,
        keys,
        hits,
        metrics,
    } = jwks_issuer(0).await;
    let good = mint(JwtAlgorithm::RS256, Some("k1"), &claims("alice"));
    auth.verify_token(&good).await.unwrap();
    auth.verify_token(&good).await.unwrap();
    assert_eq!(metrics.token_cache_counts(), (1, 1));
    assert_eq!(hits.load(Ordering::SeqCst), 1);

    // The IdP rotates k1 out; a token naming the new kid makes us refetch.
    *keys.lock() = vec![public_jwk("rsa2_private.pem", "k2")];
    let rotated = mint_with(
        JwtAlgorithm::RS256,
        &EncodingKey::from_rsa_pem(fixture("rsa2_private.pem").as_bytes()).unwrap(),
        Some("k2"),
        &claims("bob"),
    );
    assert_eq!(auth.verify_token(&rotated).await.unwrap().subject, "bob");
    assert_eq!(hits.load(Ordering::SeqCst), 2);
    // The token signed with the removed key is verified again, and fails.
    assert_eq!(
        auth.verify_token(&good).await.unwrap_err(),
        AuthError::UnknownKey
    );
}

#[tokio::test]
async fn the_token_cache_can_be_turned_off() {
    let mut config = config_with_static_keys();
    config.token_cache.enabled = false;
    let metrics = PolicyMetrics::default();
    let auth = Authenticator::builder(&config)
        .metrics(metrics.clone())
        .build()
        .unwrap();
    let token = mint(JwtAlgorithm::HS256, Some("hs"), &claims("alice"));
    for _ in 0..3 {
        auth.verify_token(&token).await.unwrap();
    }
    assert_eq!(metrics.token_cache_counts(), (0, 0));
}

#[tokio::test]
async fn jwks_serves_every_asymmetric_algorithm_and_never_a_secret() {
    let jwk = |alg: JwtAlgorithm, kid: &str| {
        let mut jwk = if alg == JwtAlgorithm::EdDSA {
            // jsonwebtoken cannot make an OKP JWK; the public key is the
            // raw 32 bytes its PEM holds.
            let key = decoding_key(alg);
            serde_json::from_value(json!({
                "kty": "OKP", "crv": "Ed25519", "alg": "EdDSA",
                "x": URL_SAFE_NO_PAD.encode(key.as_bytes()),
            }))
            .unwrap()
        } else {
            Jwk::from_encoding_key(&encoding_key(alg), jwt_alg(alg)).unwrap()
        };
        jwk.common.key_id = Some(kid.into());
        jwk
    };
    let keys = Arc::new(parking_lot::Mutex::new(vec![
        jwk(JwtAlgorithm::RS256, "k-rs"),
        jwk(JwtAlgorithm::ES256, "k-es"),
        jwk(JwtAlgorithm::EdDSA, "k-ed"),
        // A symmetric key published by mistake must not verify anything.
        jwk(JwtAlgorithm::HS256, "k-hs"),
    ]));
    let url = jwks_server(keys, Arc::new(AtomicUsize::new(0))).await;
    let mut config = PolicyConfig::default();
    config.issuers = vec![IssuerConfig::new(ISSUER).with_jwks_url(url)];
    let auth = authenticator(&config);
    for (alg, kid) in [
        (JwtAlgorithm::RS256, "k-rs"),
        (JwtAlgorithm::ES256, "k-es"),
        (JwtAlgorithm::EdDSA, "k-ed"),
    ] {
        let token = mint(alg, Some(kid), &claims("alice"));
        assert_eq!(
            auth.verify_token(&token).await.unwrap().subject,
            "alice",
            "{alg:?}"
        );
        // This signature over other claims does not verify.
        let other = mint(alg, Some(kid), &claims("mallory"));
        let (head, _) = other.rsplit_once('.').unwrap();
        let (_, sig) = token.rsplit_once('.').unwrap();
        assert_eq!(
            auth.verify_token(&format!("{head}.{sig}"))
                .await
                .unwrap_err(),
            AuthError::BadSignature,
            "{alg:?}"
        );
    }
    let token = mint(JwtAlgorithm::HS256, Some("k-hs"), &claims("alice"));
    assert_eq!(
        auth.verify_token(&token).await.unwrap_err(),
        AuthError::UnknownKey
    );
}

/// The verifier against jsonwebtoken's `decode`, configured as the verifier
/// is (issuer, audience, leeway, required `exp`/`iss`/`aud`/`sub`), on
/// tokens altered one way each: both must accept or both reject. Where the
/// verifier is deliberately stricter, it must reject.
#[tokio::test]
async fn verification_agrees_with_jsonwebtoken() {
    use jsonwebtoken::Validation;
    let mut config = config_with_static_keys();
    config.leeway_secs = 30;
    config.token_cache.enabled = false;
    let auth = authenticator(&config);
    let b64 = |v: &str| URL_SAFE_NO_PAD.encode(v);
    let sign = |alg: JwtAlgorithm, header: &str, payload: &str| {
        let msg = format!("{header}.{payload}");
        let sig =
            jsonwebtoken::crypto::sign(msg.as_bytes(), &encoding_key(alg), jwt_alg(alg)).unwrap();
        format!("{msg}.{sig}")
    };
    let n = now();
    let base = claims("alice");
    let with = |k: &str, v: serde_json::Value| {
        let mut c = base.clone();
        c[k] = v;
        c.to_string()
    };
    let without = |k: &str| {
        let mut c = base.clone();
        c.as_object_mut().unwrap().remove(k);
        c.to_string()
    };
    // Payloads (JSON text), each changing one thing.
    let payloads: Vec<(&str, String)> = vec![
        ("valid", base.to_string()),
        ("expired", with("exp", json!(n - 120))),
        ("expired within leeway", with("exp", json!(n - 10))),
        ("exp float", with("exp", json!(n as f64 + 100.4))),
        ("exp string", with("exp", json!((n + 100).to_string()))),
        ("exp negative", with("exp", json!(-5))),
        ("exp null", with("exp", json!(null))),
        ("exp missing", without("exp")),
        ("nbf future", with("nbf", json!(n + 600))),
        ("nbf within leeway", with("nbf", json!(n + 10))),
        ("nbf past", with("nbf", json!(n - 10))),
        ("nbf string", with("nbf", json!("soon"))),
        ("aud array", with("aud", json!(["other", "soma"]))),
        ("aud wrong", with("aud", json!("other"))),
        ("aud empty array", with("aud", json!([]))),
        ("aud number", with("aud", json!(5))),
        ("aud mixed array", with("aud", json!(["soma", 5]))),
        ("aud missing", without("aud")),
        ("iss wrong", with("iss", json!("https://evil.example"))),
        ("iss number", with("iss", json!(5))),
        ("iss missing", without("iss")),
        ("sub number", with("sub", json!(5))),
        ("sub missing", without("sub")),
        (
            "extra claims",
            with("x", json!({"deep": [1, {"a": null}], "s": "\u{e9}"})),
        ),
        (
            "escaped strings",
            base.to_string().replace("alice", "al\\u0069ce"),
        ),
        (
            "duplicate sub",
            base.to_string().replacen('{', "{\"sub\":\"bob\",", 1),
        ),
        ("array payload", "[1,2]".into()),
        ("not json", "{\"sub\":".into()),
    ];
    let mut compared = 0;
    for alg in ALL {
        let key = decoding_key(alg);
        let mut v = Validation::new(jwt_alg(alg));
        v.leeway = 30;
        v.validate_nbf = true;
        v.set_audience(&["soma"]);
        v.set_issuer(&[ISSUER]);
        v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let header =
            b64(&json!({"alg": alg.as_str(), "typ": "JWT", "kid": kid_for(alg)}).to_string());
        let mut tokens: Vec<(String, String)> = payloads
            .iter()
            .map(|(what, p)| (what.to_string(), sign(alg, &header, &b64(p))))
            .collect();
        let good = sign(alg, &header, &b64(&base.to_string()));
        let (msg, sig) = good.rsplit_once('.').unwrap();
        let flip = |s: &str, i: usize| {
            let mut b = s.as_bytes().to_vec();
            b[i] = if b[i] == b'A' { b'B' } else { b'A' };
            String::from_utf8(b).unwrap()
        };
        tokens.extend([
            (
                "signature flipped".into(),
                format!("{msg}.{}", flip(sig, 3)),
            ),
            (
                "signature truncated".into(),
                format!("{msg}.{}", &sig[..sig.len() - 4]),
            ),
            ("signature empty".into(), format!("{msg}.")),
            ("signature padded".into(), format!("{good}=")),
            (
                "signature standard base64".into(),
                format!("{msg}.{}", sig.replace(['-', '_'], "+")),
            ),
            ("payload flipped".into(), {
                let (h, rest) = good.split_once('.').unwrap();
                format!("{h}.{}", flip(rest, 5))
            }),
            (
                "header without kid".into(),
                sign(
                    alg,
                    &b64(&json!({"alg": alg.as_str()}).to_string()),
                    &b64(&base.to_string()),
                ),
            ),
            (
                "header padded".into(),
                sign(alg, &format!("{header}="), &b64(&base.to_string())),
            ),
            (
                "header alg lowercase".into(),
                sign(
                    alg,
                    &b64(&json!({"alg": alg.as_str().to_lowercase()}).to_string()),
                    &b64(&base.to_string()),
                ),
            ),
            (
                "header not an object".into(),
                sign(alg, &b64("[]"), &b64(&base.to_string())),
            ),
            ("four parts".into(), format!("{good}.x")),
        ]);
        for (what, token) in &tokens {
            let ours = auth.verify_token(token).await;
            let theirs = jsonwebtoken::decode::<serde_json::Value>(token, &key, &v);
            assert_eq!(
                ours.is_ok(),
                theirs.is_ok(),
                "{alg:?} {what}: ours {ours:?}, jsonwebtoken {:?}",
                theirs.map(|_| ()).map_err(|e| e.to_string())
            );
            compared += 1;
        }
        // Deliberately stricter: a repeated claim the verifier reads (which
        // of the two would count is not defined), and a `crit` header.
        let dup_tenant = base.to_string().replacen('{', "{\"tenant\":\"t2\",", 1);
        let token = sign(alg, &header, &b64(&dup_tenant));
        assert!(jsonwebtoken::decode::<serde_json::Value>(&token, &key, &v).is_ok());
        assert!(matches!(
            auth.verify_token(&token).await.unwrap_err(),
            AuthError::Malformed(_)
        ));
        let crit = b64(&json!({"alg": alg.as_str(), "crit": ["exp"], "exp": 1}).to_string());
        let token = sign(alg, &crit, &b64(&base.to_string()));
        assert!(matches!(
            auth.verify_token(&token).await.unwrap_err(),
            AuthError::Malformed(_)
        ));
    }
    assert_eq!(compared, 4 * (28 + 11));
}

#[test]
fn jwks_urls_must_be_https_or_loopback() {
    for (url, ok) in [
        ("https://idp.example.com/jwks", true),
        ("http://127.0.0.1:8080/jwks", true),
        ("http://localhost/jwks", true),
        ("http://[::1]:9000/jwks", true),
        ("http://idp.example.com/jwks", false),
        ("http://10.0.0.5/jwks", false),
        ("ftp://idp.example.com/jwks", false),
        ("not a url", false),
    ] {
        let mut config = PolicyConfig::default();
        config.issuers = vec![IssuerConfig::new(ISSUER).with_jwks_url(url)];
        assert_eq!(Authenticator::builder(&config).build().is_ok(), ok, "{url}");
    }
}

/// An issuer whose JWKS URL is `path` on a server this test controls.
async fn jwks_issuer_at(app: Router, path: &str) -> Authenticator {
    let base = serve(app).await;
    let mut config = PolicyConfig::default();
    config.issuers = vec![IssuerConfig::new(ISSUER).with_jwks_url(format!("{base}{path}"))];
    authenticator(&config)
}

#[tokio::test]
async fn jwks_redirects_are_not_followed() {
    let good = JwkSet {
        keys: vec![public_jwk("rsa_private.pem", "k1")],
    };
    let app = Router::new()
        .route(
            "/jwks",
            get(|| async { axum::response::Redirect::temporary("/elsewhere") }),
        )
        .route("/elsewhere", get(move || async move { axum::Json(good) }));
    let auth = jwks_issuer_at(app, "/jwks").await;
    let e = auth
        .verify_token(&mint(JwtAlgorithm::RS256, Some("k1"), &claims("a")))
        .await
        .unwrap_err();
    assert!(e.is_unavailable(), "the redirect target was used: {e:?}");
}

#[tokio::test]
async fn oversized_jwks_documents_are_refused_while_streaming() {
    use futures_util::{StreamExt, stream};
    // 4 MiB streamed without a content length, a valid JWKS up front.
    let app = Router::new().route(
        "/jwks",
        get(|| async {
            let head = format!(
                r#"{{"keys": [{}], "pad": ""#,
                serde_json::to_string(&public_jwk("rsa_private.pem", "k1")).unwrap()
            );
            let pad = stream::iter((0..4096).map(|_| Ok::<_, std::io::Error>(vec![b'x'; 1024])));
            let body = stream::once(async move { Ok(head.into_bytes()) })
                .chain(pad)
                .chain(stream::once(async { Ok(br#""}"#.to_vec()) }));
            axum::body::Body::from_stream(body)
        }),
    );
    let auth = jwks_issuer_at(app, "/jwks").await;
    let e = auth
        .verify_token(&mint(JwtAlgorithm::RS256, Some("k1"), &claims("a")))
        .await
        .unwrap_err();
    assert!(e.is_unavailable(), "{e:?}");
}

/// A valid JWKS document of exactly `len` bytes (a padding member fills it).
fn jwks_of_len(len: usize) -> Vec<u8> {
    let head = format!(
        r#"{{"keys": [{}], "pad": ""#,
        serde_json::to_string(&public_jwk("rsa_private.pem", "k1")).unwrap()
    );
    let tail = br#""}"#;
    let mut doc = head.into_bytes();
    doc.resize(len - tail.len(), b'x');
    doc.extend_from_slice(tail);
    doc
}

/// The JWKS size limit (1 MiB) is inclusive, with a content length and
/// streamed in chunks without one: a document of exactly 1 MiB verifies
/// tokens, one byte more is refused (the issuer is unavailable).
#[tokio::test]
async fn a_jwks_document_of_exactly_the_limit_is_read_and_one_byte_more_is_not() {
    use futures_util::{StreamExt, stream};
    const LIMIT: usize = 1024 * 1024;
    let whole = |len: usize| async move { axum::body::Body::from(jwks_of_len(len)) };
    let streamed = |len: usize| async move {
        let chunks: Vec<Vec<u8>> = jwks_of_len(len).chunks(1000).map(<[u8]>::to_vec).collect();
        axum::body::Body::from_stream(stream::iter(chunks).map(Ok::<_, std::io::Error>))
    };
    let app = Router::new()
        .route("/whole/at", get(move || whole(LIMIT)))
        .route("/whole/over", get(move || whole(LIMIT + 1)))
        .route("/streamed/at", get(move || streamed(LIMIT)))
        .route("/streamed/over", get(move || streamed(LIMIT + 1)));
    let base = serve(app).await;
    let token = mint(JwtAlgorithm::RS256, Some("k1"), &claims("alice"));
    for path in ["/whole/at", "/streamed/at", "/whole/over", "/streamed/over"] {
        let mut config = PolicyConfig::default();
        config.issuers = vec![IssuerConfig::new(ISSUER).with_jwks_url(format!("{base}{path}"))];
        let result = authenticator(&config).verify_token(&token).await;
        if path.ends_with("/at") {
            assert_eq!(result.map(|p| p.subject).as_deref(), Ok("alice"), "{path}");
        } else {
            let e = result.unwrap_err();
            assert!(e.is_unavailable(), "{path}: {e:?}");
        }
    }
}

#[tokio::test]
async fn a_token_without_kid_needs_a_single_key_of_its_algorithm() {
    let keys = Arc::new(parking_lot::Mutex::new(vec![public_jwk(
        "rsa_private.pem",
        "k1",
    )]));
    let url = jwks_server(keys.clone(), Arc::default()).await;
    let mut config = PolicyConfig::default();
    config.issuers = vec![IssuerConfig::new(ISSUER).with_jwks_url(url)];
    config.jwks.refetch_cooldown_secs = 0;
    config.jwks.max_age_secs = 0;
    config.token_cache.enabled = false;
    let auth = authenticator(&config);
    let no_kid = mint(JwtAlgorithm::RS256, None, &claims("alice"));
    // One RS256 key: a token without kid is verified by it.
    assert_eq!(auth.verify_token(&no_kid).await.unwrap().subject, "alice");
    // Two: the token must say which.
    keys.lock().push(public_jwk("rsa2_private.pem", "k2"));
    assert_eq!(
        auth.verify_token(&no_kid).await.unwrap_err(),
        AuthError::UnknownKey
    );
    let with_kid = mint(JwtAlgorithm::RS256, Some("k1"), &claims("alice"));
    assert_eq!(auth.verify_token(&with_kid).await.unwrap().subject, "alice");
}

/// `.metrics(&registry)` on the authenticator records on the registry's
/// series: a `PolicyMetrics` built on the same registry (as the authorizer's
/// would be) sees the verified-JWT cache lookups.
#[tokio::test]
async fn the_authenticator_plugs_into_a_metrics_registry() {
    let registry = soma_observability::MetricsRegistry::default();
    let auth = Authenticator::builder(&config_with_static_keys())
        .metrics(&registry)
        .build()
        .unwrap();
    let token = mint(JwtAlgorithm::HS256, Some("hs"), &claims("alice"));
    auth.verify_token(&token).await.unwrap();
    auth.verify_token(&token).await.unwrap();
    let (hits, misses) = PolicyMetrics::new(&registry).token_cache_counts();
    assert_eq!(hits + misses, 2, "hits {hits}, misses {misses}");
    assert!(
        registry
            .encode()
            .contains("soma_policy_token_cache_lookups_total")
    );
}

#[tokio::test]
async fn scopes_come_from_an_scp_array_when_there_is_no_scope_string() {
    let auth = authenticator(&config_with_static_keys());
    let mut c = claims("carol");
    let c_obj = c.as_object_mut().unwrap();
    c_obj.remove("scope");
    c_obj.insert("scp".into(), json!(["memory:read", "tool:execute"]));
    let token = mint(JwtAlgorithm::HS256, Some(kid_for(JwtAlgorithm::HS256)), &c);
    let p = auth.verify_token(&token).await.unwrap();
    assert_eq!(p.scopes, vec!["memory:read", "tool:execute"]);
}
