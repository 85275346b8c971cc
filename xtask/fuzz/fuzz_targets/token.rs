//! The authenticator on arbitrary credentials: the input's lines are an
//! `Authorization` value (JWS compact tokens, `Bearer`/`Basic` forms), an
//! `X-API-Key` value and an `X-Tenant-ID` value (plain-text seeds), against an HS256 issuer and an in-memory key store.
//! Never panics; nothing is accepted unless it was signed with the secret
//! or is the issued key.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use soma_policy::{ApiKeyStore, Authenticator, InMemoryApiKeyStore, PolicyConfig, generate_key};

const SECRET: &str = "fuzz-secret-fuzz-secret-fuzz-secret-0123";

struct Setup {
    rt: tokio::runtime::Runtime,
    authn: Authenticator,
}

fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let config: PolicyConfig = serde_json::from_value(serde_json::json!({
            "issuers": [{
                "issuer": "https://issuer.fuzz",
                "audiences": ["soma"],
                "keys": [{ "alg": "HS256", "kid": "k1", "secret": SECRET }]
            }]
        }))
        .expect("policy config");
        let keys = InMemoryApiKeyStore::new();
        let issued = generate_key("soma", "svc", "acme", vec!["reader".into()], vec![]);
        rt.block_on(keys.insert(issued.record)).unwrap();
        let authn = Authenticator::builder(&config)
            .api_key_store(Arc::new(keys))
            .build()
            .expect("authenticator");
        Setup { rt, authn }
    })
}

fuzz_target!(|data: &[u8]| {
    let s = setup();
    let mut headers = http::HeaderMap::new();
    let names = ["authorization", "x-api-key", "x-tenant-id"];
    for (name, value) in names.into_iter().zip(data.split(|b| *b == b'\n')) {
        if value.is_empty() {
            continue;
        }
        if let Ok(v) = http::HeaderValue::from_bytes(value) {
            headers.insert(name, v);
        }
    }
    if let Ok(p) = s.rt.block_on(s.authn.authenticate(&headers)) {
        // Only a forged-by-chance signature could get here: libFuzzer can't
        // produce an HMAC of the secret, nor the issued random key.
        panic!("accepted an unsigned credential: {p:?}");
    }
});
