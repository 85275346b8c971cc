//! A JWKS document as the JWT verifier reads it from its issuer: never
//! panics, symmetric keys are never taken from it.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(keys) = soma_policy::fuzzing::jwks_keys(data) {
        assert!(
            keys.iter().all(|alg| alg != "HS256"),
            "a JWKS never supplies a shared secret: {keys:?}"
        );
    }
});
