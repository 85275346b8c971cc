//! A remote config update as a replica reads it from `config.updates`:
//! JSON decode, checksum and signature check. Never panics; nothing
//! passes the signature check without the key.
#![no_main]

use libfuzzer_sys::fuzz_target;
use soma_config::{ConfigUpdate, Secret};

fuzz_target!(|data: &[u8]| {
    let Ok(update) = serde_json::from_slice::<ConfigUpdate>(data) else {
        return;
    };
    let _ = update.verify();
    let key = Secret::from("fuzz-update-key-fuzz-update-key-0123456789");
    assert!(
        update.verify_signature(&key).is_err(),
        "an update signed without the key passed: {update:?}"
    );
});
