//! Shared helpers for soma-policy's integration tests: the crate's
//! `testkit` (test issuer, tokens, the benchmarks' request), the test-only
//! fixtures, and OPA's real evaluator on the reference policy.
#![allow(dead_code, unreachable_pub, missing_docs, unused_imports)]

use std::path::PathBuf;

use soma_policy::JwtAlgorithm;
pub use soma_policy::testkit::*;
pub use soma_testkit::OpaServer;

pub fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixture(name: &str) -> String {
    std::fs::read_to_string(crate_dir().join("tests/fixtures").join(name)).expect("fixture")
}

/// The public half (or the secret) that verifies [`encoding_key`]'s tokens.
pub fn decoding_key(alg: JwtAlgorithm) -> jsonwebtoken::DecodingKey {
    use jsonwebtoken::DecodingKey;
    match alg {
        JwtAlgorithm::HS256 => Ok(DecodingKey::from_secret(HS_SECRET.as_bytes())),
        JwtAlgorithm::RS256 => DecodingKey::from_rsa_pem(fixture("rsa_public.pem").as_bytes()),
        JwtAlgorithm::ES256 => DecodingKey::from_ec_pem(fixture("ec_public.pem").as_bytes()),
        JwtAlgorithm::EdDSA => DecodingKey::from_ed_pem(fixture("ed_public.pem").as_bytes()),
    }
    .unwrap()
}

/// OPA's real evaluator on the reference policy.
pub fn start_opa() -> OpaServer {
    OpaServer::start(&policy_dir())
}

/// Serves a router on a free loopback port; returns the base URL.
pub use soma_testkit::serve_url as serve;
