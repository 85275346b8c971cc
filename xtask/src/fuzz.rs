//! `cargo xtask fuzz`: the cargo-fuzz targets of `xtask/fuzz` (every parser
//! of outside input), each for a bounded time, one table at the end.
//!
//! cargo-fuzz is installed on first use (like cargo-deny and cargo-mutants);
//! the targets build with the nightly toolchain, libFuzzer's coverage
//! instrumentation, debug assertions, and no sanitizer (the code under test
//! is safe Rust: what the fuzzer looks for is panics, overflows, hangs and
//! the properties each target asserts).
//!
//! Per target, libFuzzer reads three corpora: `target/fuzz/corpus/<t>` (what
//! earlier runs found; new inputs go there), `xtask/fuzz/seeds/<t>`
//! (committed seeds) and `xtask/fuzz/regressions/<t>` (every input that once
//! failed, committed with its fix: replayed on every run, so a regression
//! fails at once). A failing input is written to `target/fuzz/artifacts/<t>/`.

use std::fs;
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use crate::{platform, root, run};

/// Every target, in the order they run.
pub(crate) const TARGETS: [&str; 9] = [
    "envelope",
    "token",
    "jwks",
    "config_document",
    "config_update",
    "somabrain_response",
    "policy_input",
    "headers",
    "lint_env",
];

const USAGE: &str = "usage: cargo xtask fuzz [--secs N] [--target NAME]...
  runs each target for N seconds (default 60); targets: envelope, token, jwks,
  config_document, config_update, somabrain_response, policy_input, headers, lint_env";

/// One target's run, from libFuzzer's final statistics.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct Outcome {
    pub(crate) target: String,
    pub(crate) secs: f64,
    pub(crate) runs: u64,
    pub(crate) exec_per_sec: u64,
    pub(crate) coverage: u64,
    pub(crate) features: u64,
    pub(crate) corpus: u64,
    pub(crate) passed: bool,
}

pub(crate) fn cli(args: &[String]) -> Result<(), String> {
    let mut secs = 60_u64;
    let mut targets = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--secs" => {
                secs = it
                    .next()
                    .and_then(|s| s.parse().ok())
                    .filter(|s| *s > 0)
                    .ok_or_else(|| format!("--secs needs a positive number\n{USAGE}"))?;
            }
            "--target" => {
                let t = it.next().ok_or(USAGE)?;
                if !TARGETS.contains(&t.as_str()) {
                    return Err(format!("no fuzz target `{t}`\n{USAGE}"));
                }
                targets.push(t.clone());
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            other => return Err(format!("unknown argument `{other}`\n{USAGE}")),
        }
    }
    if targets.is_empty() {
        targets = TARGETS.iter().map(|t| (*t).to_owned()).collect();
    }
    let outcomes = fuzz(&targets, secs)?;
    println!("\n{}", table(&outcomes));
    let failed: Vec<&str> = outcomes
        .iter()
        .filter(|o| !o.passed)
        .map(|o| o.target.as_str())
        .collect();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "fuzz targets failed: {} (inputs under target/fuzz/artifacts/)",
            failed.join(", ")
        ))
    }
}

/// Builds the targets once, then runs each for `secs`.
pub(crate) fn fuzz(targets: &[String], secs: u64) -> Result<Vec<Outcome>, String> {
    crate::ensure_cargo_tool("fuzz")?;
    println!(
        "fuzz: building {} target(s) (nightly, libFuzzer)",
        targets.len()
    );
    // `cargo fuzz build` takes one target, or none for all of them.
    let builds: Vec<Option<&String>> = if targets.len() == TARGETS.len() {
        vec![None]
    } else {
        targets.iter().map(Some).collect()
    };
    for target in builds {
        let mut build = common_args("build");
        build.extend(target.cloned());
        let build: Vec<&str> = build.iter().map(String::as_str).collect();
        run("cargo", &build)?;
    }
    targets.iter().map(|t| fuzz_one(t, secs)).collect()
}

fn fuzz_dir() -> PathBuf {
    root().join("xtask/fuzz")
}

fn out_dir() -> PathBuf {
    platform::target_dir().join("fuzz")
}

/// `cargo +nightly fuzz <cmd>` with this repository's settings.
fn common_args(cmd: &str) -> Vec<String> {
    [
        "+nightly",
        "fuzz",
        cmd,
        "--fuzz-dir",
        &fuzz_dir().to_string_lossy(),
        "--target-dir",
        &out_dir().join("build").to_string_lossy(),
        "--sanitizer",
        "none",
        "--debug-assertions",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

fn fuzz_one(target: &str, secs: u64) -> Result<Outcome, String> {
    let corpus = out_dir().join("corpus").join(target);
    let artifacts = out_dir().join("artifacts").join(target);
    let seeds = fuzz_dir().join("seeds").join(target);
    let regressions = fuzz_dir().join("regressions").join(target);
    for d in [&corpus, &artifacts] {
        fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
    }
    let mut args = common_args("run");
    args.push(target.to_owned());
    args.push(corpus.to_string_lossy().into_owned());
    for d in [&seeds, &regressions] {
        if d.is_dir() {
            args.push(d.to_string_lossy().into_owned());
        }
    }
    args.extend([
        "--".to_owned(),
        format!("-max_total_time={secs}"),
        // A single input slower than this is a hang, and a failure.
        "-timeout=10".to_owned(),
        "-rss_limit_mb=2048".to_owned(),
        "-print_final_stats=1".to_owned(),
        format!("-artifact_prefix={}/", artifacts.display()),
    ]);
    println!("\n==> fuzz {target} ({secs} s)");
    let started = Instant::now();
    let out = Command::new("cargo")
        .args(&args)
        .current_dir(root())
        .output()
        .map_err(|e| format!("could not start cargo fuzz: {e}"))?;
    let log = String::from_utf8_lossy(&out.stderr);
    let mut o = parse_stats(target, &log);
    o.secs = started.elapsed().as_secs_f64();
    o.passed = out.status.success();
    if !o.passed {
        // The failure as libFuzzer reported it: the panic and the input.
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        for l in tail.into_iter().rev() {
            println!("  {l}");
        }
    }
    println!(
        "fuzz {target}: {} runs, {} exec/s, cov {}, corpus {} — {}",
        o.runs,
        o.exec_per_sec,
        o.coverage,
        o.corpus,
        if o.passed { "ok" } else { "FAILED" }
    );
    Ok(o)
}

/// Reads libFuzzer's status lines (`#N ... cov: C ft: F corp: K/..`) and
/// its final `stat::` lines.
pub(crate) fn parse_stats(target: &str, log: &str) -> Outcome {
    let mut o = Outcome {
        target: target.to_owned(),
        ..Outcome::default()
    };
    let after = |line: &str, key: &str| -> Option<u64> {
        let rest = &line[line.find(key)? + key.len()..];
        let num: String = rest
            .trim_start()
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        num.parse().ok()
    };
    for line in log.lines() {
        if line.starts_with('#') {
            o.coverage = after(line, "cov:").unwrap_or(o.coverage);
            o.features = after(line, "ft:").unwrap_or(o.features);
            o.corpus = after(line, "corp:").unwrap_or(o.corpus);
        }
        if let Some(n) = after(line, "stat::number_of_executed_units:") {
            o.runs = n;
        }
        if let Some(n) = after(line, "stat::average_exec_per_sec:") {
            o.exec_per_sec = n;
        }
    }
    o
}

pub(crate) fn table(outcomes: &[Outcome]) -> String {
    let mut s = String::from(
        "target             | secs | runs       | exec/s  | cov   | features | corpus | result\n\
         -------------------|------|------------|---------|-------|----------|--------|-------\n",
    );
    for o in outcomes {
        s.push_str(&format!(
            "{:<18} | {:>4.0} | {:>10} | {:>7} | {:>5} | {:>8} | {:>6} | {}\n",
            o.target,
            o.secs,
            o.runs,
            o.exec_per_sec,
            o.coverage,
            o.features,
            o.corpus,
            if o.passed { "ok" } else { "FAILED" }
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libfuzzer_statistics_are_read() {
        let log = "INFO: Seed: 1\n\
            #2\tINITED cov: 120 ft: 130 corp: 3/40b exec/s: 0 rss: 40Mb\n\
            #4096\tpulse  cov: 512 ft: 900 corp: 61/2011b lim: 43 exec/s: 2048 rss: 60Mb\n\
            #9000\tDONE   cov: 530 ft: 944 corp: 66/2200b lim: 90 exec/s: 3000 rss: 61Mb\n\
            stat::number_of_executed_units: 9000\n\
            stat::average_exec_per_sec:     3000\n";
        let o = parse_stats("envelope", log);
        assert_eq!(
            (o.runs, o.exec_per_sec, o.coverage, o.features, o.corpus),
            (9000, 3000, 530, 944, 66)
        );
        assert!(table(&[o]).contains("envelope"));
    }

    #[test]
    fn every_target_has_a_source_and_seeds() {
        for t in TARGETS {
            assert!(
                fuzz_dir()
                    .join("fuzz_targets")
                    .join(format!("{t}.rs"))
                    .is_file(),
                "xtask/fuzz/fuzz_targets/{t}.rs"
            );
            assert!(
                fuzz_dir().join("seeds").join(t).is_dir(),
                "xtask/fuzz/seeds/{t}/ (committed seeds)"
            );
        }
    }
}
