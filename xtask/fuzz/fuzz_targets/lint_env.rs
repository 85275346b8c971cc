//! The lint-env linter on arbitrary source: never panics, never loops (a
//! parse failure is a finding, not a crash).
#![no_main]

use libfuzzer_sys::fuzz_target;
use soma_lint_env::{Config, lint_source};

fuzz_target!(|data: &[u8]| {
    let Ok(source) = std::str::from_utf8(data) else {
        return;
    };
    let _ = lint_source("fuzz.rs", source, &Config::default());
});
