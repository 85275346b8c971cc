//! Disk space during `cargo xtask test`.
//!
//! The pipeline builds the workspace several times over (debug, nightly
//! docs, the packaged crates, the fuzz targets with coverage, the chaos
//! binaries), each in its own part of `target/`. On a machine whose disk is
//! nearly full that ends in `No space left on device` in the middle of a
//! later step (CI once failed that way in the fuzz build). So every step
//! reports the space left, and before a step that builds, the outputs of
//! finished steps that no later step reads are removed when space is short.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Below this much free space under `target/`, finished steps' outputs are
/// removed before the next build (a cold fuzz or chaos build writes a few
/// GiB).
pub(crate) const LOW_BYTES: u64 = 12 << 30;

/// Below this much at the start, the run stops at once: it could not finish.
pub(crate) const TOO_LOW_BYTES: u64 = 3 << 30;

/// Bytes available to an unprivileged writer on the filesystem holding
/// `path` (or its nearest existing ancestor), from `df`.
pub(crate) fn free_bytes(path: &Path) -> Option<u64> {
    let existing = path.ancestors().find(|p| p.exists())?;
    let out = Command::new("df")
        .args(["-B1", "--output=avail"])
        .arg(existing)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    parse_df_avail(&String::from_utf8_lossy(&out.stdout))
}

/// The number in `df --output=avail` output (a header line, then the value).
fn parse_df_avail(text: &str) -> Option<u64> {
    text.lines().nth(1)?.trim().parse().ok()
}

/// `bytes` as GiB with one decimal.
pub(crate) fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / f64::from(1u32 << 30))
}

/// The outputs under `target` that the steps before `step` wrote and that
/// neither `step` nor any step after it reads (every step rebuilds what it
/// needs, so removing these costs nothing but an incremental rebuild on the
/// next run).
pub(crate) fn finished_outputs(target: &Path, step: &str) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    // `package` and `downstream` write the packaged crates and their build;
    // `docs` writes rustdoc's output; incremental caches only speed a rebuild.
    if matches!(step, "doc-tests" | "tests" | "fuzz" | "chaos") {
        dirs.extend([
            target.join("package"),
            target.join("doc"),
            target.join("debug").join("incremental"),
        ]);
    }
    // The fuzz build (coverage-instrumented, nightly) is read by nothing else.
    if step == "chaos" {
        dirs.push(target.join("fuzz").join("build"));
    }
    dirs
}

/// Before `step`: when less than [`LOW_BYTES`] is free under `target`,
/// removes [`finished_outputs`] and says what that freed.
pub(crate) fn make_room(target: &Path, step: &str) {
    let Some(before) = free_bytes(target) else {
        return;
    };
    if before >= LOW_BYTES {
        return;
    }
    for dir in finished_outputs(target, step) {
        if dir.exists() {
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => println!("disk: removed {} (no later step reads it)", dir.display()),
                Err(e) => println!("disk: could not remove {}: {e}", dir.display()),
            }
        }
    }
    if let Some(after) = free_bytes(target) {
        println!(
            "disk: {} free before `{step}` (was {}, below {})",
            gib(after),
            gib(before),
            gib(LOW_BYTES)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn df_output_is_read_from_its_second_line() {
        assert_eq!(
            parse_df_avail("     Avail\n85899345920\n"),
            Some(85_899_345_920)
        );
        assert_eq!(parse_df_avail("Avail\n"), None);
        assert_eq!(parse_df_avail("Avail\nn/a\n"), None);
    }

    #[test]
    fn a_step_never_loses_what_it_or_a_later_step_reads() {
        let t = Path::new("/t");
        // Nothing is removed before the steps that write or read these.
        for step in ["fmt", "clippy", "docs", "package", "downstream"] {
            assert!(finished_outputs(t, step).is_empty(), "{step}");
        }
        // The fuzz build survives until the fuzz step is over.
        assert!(!finished_outputs(t, "fuzz").contains(&t.join("fuzz/build")));
        assert!(finished_outputs(t, "chaos").contains(&t.join("fuzz/build")));
        // The debug build itself (read by tests and chaos) is never removed.
        for step in ["doc-tests", "tests", "fuzz", "chaos"] {
            let dirs = finished_outputs(t, step);
            assert!(!dirs.contains(&t.join("debug")), "{step}");
            assert!(dirs.contains(&t.join("package")), "{step}");
        }
    }

    #[test]
    fn sizes_read_as_gib() {
        assert_eq!(gib(3 << 30), "3.0 GiB");
        assert_eq!(gib(1_610_612_736), "1.5 GiB");
    }
}
