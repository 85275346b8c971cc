//! `cargo xtask chaos --stress [N]`: the soma-bus + soma-outbox conformance
//! suite (issue #22) run N times at once, every scenario including the
//! ignored `*_stress` variants, against the shared stack.
//!
//! Each copy is its own `cargo nextest run` process; the scenarios pick
//! their own topics, outbox schemas and private brokers' ports, so copies
//! share nothing but the machine, the shared broker and PostgreSQL. That is
//! the point: contention the one-copy CI run never sees (slower brokers,
//! busier PostgreSQL, relays and consumers of several copies interleaving).
//! The verdict of each scenario is unchanged (exactly once, per-key order,
//! nothing un-accepted); a copy passes when all of its scenarios do.

use std::fs;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::{platform, root};

/// The packages whose conformance suites run (test target `conformance`).
const SUITES: [&str; 2] = ["soma-bus", "soma-outbox"];

/// What one copy did.
#[derive(Debug)]
struct Copy {
    index: usize,
    ok: bool,
    run: u64,
    passed: u64,
    failed: u64,
    secs: f64,
    log: std::path::PathBuf,
}

/// A copy started and not yet waited for.
struct Running {
    index: usize,
    log: std::path::PathBuf,
    started: Instant,
    child: std::process::Child,
}

/// Runs `copies` copies of the suite at once and prints a table; `Err`
/// unless every copy passed.
pub(crate) fn run(copies: usize) -> Result<(), String> {
    let copies = copies.clamp(1, 8);
    let dir = platform::target_dir().join("chaos").join("stress");
    fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    check_stack_reachable()?;
    build_suites()?;
    println!(
        "chaos --stress: {copies} copies of the conformance suite at once (stress variants included)"
    );
    let started = Instant::now();
    let running = spawn_copies(&dir, copies)?;
    let results = wait_for_copies(running)?;
    let wall = started.elapsed().as_secs_f64();
    print_table(&results);
    println!(
        "\n{copies} copies in {wall:.0} s wall time; logs in {}",
        dir.display()
    );
    let report = json!({
        "copies": copies,
        "wall_secs": wall,
        "runs": results.iter().map(|c| json!({
            "copy": c.index, "ok": c.ok, "run": c.run, "passed": c.passed,
            "failed": c.failed, "secs": c.secs,
        })).collect::<Vec<_>>(),
    });
    let _ = fs::write(dir.join("latest.json"), report.to_string());
    let failed: Vec<_> = results.iter().filter(|c| !c.ok).collect();
    if failed.is_empty() {
        return Ok(());
    }
    for c in &failed {
        print_failures(c);
    }
    Err(format!("{} of {copies} copies failed", failed.len()))
}

/// Reachability first: a copy against a missing broker would fail with
/// every scenario's timeout instead of one line.
fn check_stack_reachable() -> Result<(), String> {
    for (what, addr, how) in [
        ("tansu (Kafka)", "127.0.0.1:9092", "cargo xtask stack up"),
        ("PostgreSQL", "127.0.0.1:5432", "cargo xtask stack up"),
    ] {
        let sock = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
        std::net::TcpStream::connect_timeout(&sock, Duration::from_secs(2))
            .map_err(|e| format!("{what} at {addr} is unreachable ({e}); start it with `{how}`"))?;
    }
    Ok(())
}

/// Builds the conformance suites once, before the copies race to.
fn build_suites() -> Result<(), String> {
    let base = nextest_args(false);
    println!("chaos --stress: building the conformance suites");
    let status = Command::new("cargo")
        .args(&base)
        .arg("--no-run")
        .current_dir(root())
        .status()
        .map_err(|e| format!("cargo: {e}"))?;
    if !status.success() {
        return Err(format!("building the conformance suites failed ({status})"));
    }
    Ok(())
}

/// Starts the copies, each logging to `dir/copy-<n>.log`.
fn spawn_copies(dir: &std::path::Path, copies: usize) -> Result<Vec<Running>, String> {
    let mut running = Vec::new();
    for index in 1..=copies {
        let log = dir.join(format!("copy-{index}.log"));
        let file = fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let err = file.try_clone().map_err(|e| e.to_string())?;
        let child = Command::new("cargo")
            .args(nextest_args(true))
            .current_dir(root())
            .stdout(Stdio::from(file))
            .stderr(Stdio::from(err))
            .spawn()
            .map_err(|e| format!("cargo nextest: {e}"))?;
        running.push(Running {
            index,
            log,
            started: Instant::now(),
            child,
        });
    }
    Ok(running)
}

/// Waits for each copy in turn and reads its verdict from its log.
fn wait_for_copies(running: Vec<Running>) -> Result<Vec<Copy>, String> {
    let mut results = Vec::new();
    for Running {
        index,
        log,
        started,
        mut child,
    } in running
    {
        let status = child.wait().map_err(|e| e.to_string())?;
        let secs = started.elapsed().as_secs_f64();
        let text = fs::read_to_string(&log).unwrap_or_default();
        let (run, passed, failed) = summary(&text);
        results.push(Copy {
            index,
            ok: status.success() && failed == 0 && run > 0,
            run,
            passed,
            failed,
            secs,
            log,
        });
    }
    Ok(results)
}

/// The table of copies, one row each.
fn print_table(results: &[Copy]) {
    println!("\n| copy | scenarios run | passed | failed | time | result |");
    println!("|---|---|---|---|---|---|");
    for c in results {
        println!(
            "| {} | {} | {} | {} | {:.0} s | {} |",
            c.index,
            c.run,
            c.passed,
            c.failed,
            c.secs,
            if c.ok { "pass" } else { "FAIL" }
        );
    }
}

/// The last 20 failure lines of a failed copy's log.
fn print_failures(c: &Copy) {
    let text = fs::read_to_string(&c.log).unwrap_or_default();
    println!("\n--- copy {} (tail of {}) ---", c.index, c.log.display());
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("FAIL") || l.contains("panicked") || l.contains("TIMEOUT"))
        .collect();
    for l in lines.iter().rev().take(20).rev() {
        println!("{l}");
    }
}

fn nextest_args(run: bool) -> Vec<String> {
    let mut a: Vec<String> = ["nextest", "run"].map(String::from).to_vec();
    for p in SUITES {
        a.extend(["-p".into(), p.into()]);
    }
    a.extend(["--test".into(), "conformance".into()]);
    if run {
        a.extend(
            [
                "--run-ignored",
                "all",
                "--no-fail-fast",
                "--test-threads",
                "2",
                "--color",
                "never",
            ]
            .map(String::from),
        );
    }
    a
}

/// `(run, passed, failed)` from nextest's closing summary line, e.g.
/// `Summary [ 95.1s] 14 tests run: 13 passed, 1 failed, 0 skipped`.
fn summary(text: &str) -> (u64, u64, u64) {
    let Some(line) = text.lines().rev().find(|l| l.contains("tests run:")) else {
        return (0, 0, 0);
    };
    let number_before = |word: &str| -> u64 {
        let Some(at) = line.find(word) else { return 0 };
        line[..at]
            .split(|c: char| !c.is_ascii_digit())
            .rfind(|s| !s.is_empty())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    (
        number_before(" tests run") + number_before(" test run"),
        number_before(" passed"),
        number_before(" failed"),
    )
}

#[cfg(test)]
mod tests {
    use super::summary;

    #[test]
    fn reads_nextest_summaries() {
        let ok = "noise\n     Summary [  95.123s] 14 tests run: 14 passed, 0 skipped\n";
        assert_eq!(summary(ok), (14, 14, 0));
        let bad = "Summary [ 301.0s] 15 tests run: 12 passed (1 slow), 3 failed, 0 skipped";
        assert_eq!(summary(bad), (15, 12, 3));
        assert_eq!(summary("no summary"), (0, 0, 0));
    }
}
