//! Test helpers: the recorded fixtures. The contract server itself is
//! `soma_somabrain::testkit` (feature `testkit`).
#![allow(dead_code, unreachable_pub)]

use serde_json::Value;
pub use soma_somabrain::testkit::*;

/// A recorded exchange from `tests/fixtures/<name>.json`.
pub fn fixture(name: &str) -> Value {
    let path = format!("{}/tests/fixtures/{name}.json", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("fixture {path}: {e}"));
    serde_json::from_str(&text).unwrap()
}

/// All fixture names, in file order.
pub fn fixture_names() -> Vec<String> {
    let dir = format!("{}/tests/fixtures", env!("CARGO_MANIFEST_DIR"));
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".json") && n.as_bytes()[0].is_ascii_digit())
        .map(|n| n.trim_end_matches(".json").to_owned())
        .collect();
    v.sort();
    v
}
