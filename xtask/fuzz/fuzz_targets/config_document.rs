//! A settings document (TOML) layered with `SOMA_*` variables through
//! soma-config's loader into typed sections of several crates: never
//! panics; an accepted document loads to the same settings twice.
#![no_main]

use std::io::Write;

use libfuzzer_sys::fuzz_target;
use serde::{Deserialize, Serialize};

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(default)]
struct Settings {
    bus: soma_bus::BusConfig,
    policy: soma_policy::PolicyConfig,
    somabrain: soma_somabrain::SomabrainConfig,
}

fuzz_target!(|data: &[u8]| {
    // Up to the first NUL: the TOML document; after it, `KEY=VALUE` lines
    // as environment variables.
    let mut parts = data.splitn(2, |b| *b == 0);
    let doc = parts.next().unwrap_or_default();
    let env: Vec<(String, String)> = parts
        .next()
        .map(|e| String::from_utf8_lossy(e).into_owned())
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (format!("SOMA_{k}"), v.to_owned()))
        .collect();
    let path = std::env::temp_dir().join(format!("soma-fuzz-config-{}.toml", std::process::id()));
    std::fs::File::create(&path)
        .and_then(|mut f| f.write_all(doc))
        .expect("write the document");
    let load = || {
        soma_config::Loader::<Settings>::new()
            .file(&path)
            .env_from(env.clone())
            .load()
    };
    if let Ok(first) = load() {
        let again = load().expect("a document that loaded once loads again");
        let as_json = |s: &Settings| serde_json::to_value(s).expect("settings serialize");
        assert_eq!(as_json(&again), as_json(&first), "loading is deterministic");
    }
});
