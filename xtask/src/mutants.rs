//! `cargo xtask mutants`: mutation testing of the core crates with
//! cargo-mutants (installed on first use, like cargo-deny).
//!
//! ```text
//! cargo xtask mutants                              # every core module (hours on 2 cores)
//! cargo xtask mutants --crate soma-outbox          # one crate's core modules
//! cargo xtask mutants --file soma-outbox/src/relay.rs [--re 'Worker::rebalance']
//! cargo xtask mutants --changed-since origin/main  # only lines changed since a revision
//! cargo xtask mutants ... -- <nextest args>        # e.g. narrow the tests each mutant runs
//! ```
//!
//! Results go to `target/mutants/<crate>/mutants.out/` (cargo-mutants'
//! `caught.txt`, `missed.txt`, `timeout.txt`, `unviable.txt`,
//! `outcomes.json`); the command ends with one table per crate: mutants,
//! caught, missed, timeouts, unviable and the kill rate,
//! caught ÷ (caught + missed + timeout). A timeout is not a kill: a
//! mutant that makes a loop report progress without doing any must be
//! caught by a test that checks the work was done. Equivalent mutants are
//! excluded in `.cargo/mutants.toml`, one reason each. With one job (the
//! default) the tree is mutated in place, reusing the warm target
//! directory; don't edit it while the run lasts.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{platform, root};

const USAGE: &str = "usage: cargo xtask mutants [--crate NAME]... [--file PATH]... [--re REGEX] \
[--changed-since REV] [--timeout SECS] [-j JOBS] [-- <nextest args>]";

/// The core modules (issue #23), per crate.
const CORE: &[(&str, &[&str])] = &[
    (
        "soma-outbox",
        &["src/outbox.rs", "src/relay.rs", "src/inbox.rs"],
    ),
    (
        "soma-bus",
        &[
            "src/publisher.rs",
            "src/producer.rs",
            "src/ordered.rs",
            "src/sink.rs",
            "src/consumer/**/*.rs",
            "src/envelope.rs",
            "src/replay.rs",
            "src/sequencer.rs",
        ],
    ),
    (
        "soma-policy",
        &[
            "src/authn/**/*.rs",
            "src/authz/**/*.rs",
            "src/routes.rs",
            "src/engine/**/*.rs",
        ],
    ),
    (
        "soma-redis",
        &[
            "src/rate_limit/**/*.rs",
            "src/idempotency/**/*.rs",
            "src/lease.rs",
            "src/cache.rs",
        ],
    ),
    ("soma-config", &["src/loader.rs", "src/live.rs"]),
];

#[derive(Debug, Default)]
struct Opts {
    crates: Vec<String>,
    files: Vec<String>,
    re: Option<String>,
    changed_since: Option<String>,
    timeout: Option<String>,
    jobs: Option<String>,
    passthrough: Vec<String>,
}

fn parse(args: &[String]) -> Result<Opts, String> {
    let (ours, passthrough) = match args.iter().position(|a| a == "--") {
        Some(i) => (&args[..i], args[i + 1..].to_vec()),
        None => (args, Vec::new()),
    };
    let mut o = Opts {
        passthrough,
        ..Opts::default()
    };
    let mut it = ours.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().cloned().ok_or_else(|| USAGE.to_owned());
        match a.as_str() {
            "--crate" | "-p" => o.crates.push(value()?),
            "--file" | "-f" => o.files.push(value()?),
            "--re" => o.re = Some(value()?),
            "--changed-since" => o.changed_since = Some(value()?),
            "--timeout" => o.timeout = Some(value()?),
            "-j" | "--jobs" => o.jobs = Some(value()?),
            "-h" | "--help" => return Err(USAGE.to_owned()),
            other => return Err(format!("unknown option `{other}`\n{USAGE}")),
        }
    }
    for c in &o.crates {
        if !CORE.iter().any(|(name, _)| name == c) {
            return Err(format!("`{c}` is not a core crate here\n{USAGE}"));
        }
    }
    Ok(o)
}

/// What to mutate: per crate, the files (paths relative to the crate).
fn plan(o: &Opts) -> Result<Vec<(String, Vec<String>)>, String> {
    if !o.files.is_empty() {
        let mut out: Vec<(String, Vec<String>)> = Vec::new();
        for f in &o.files {
            let (krate, rel) = f
                .split_once('/')
                .ok_or_else(|| format!("--file {f}: give the path from the workspace root"))?;
            match out.iter_mut().find(|(c, _)| c == krate) {
                Some((_, files)) => files.push(rel.to_owned()),
                None => out.push((krate.to_owned(), vec![rel.to_owned()])),
            }
        }
        return Ok(out);
    }
    Ok(CORE
        .iter()
        .filter(|(name, _)| o.crates.is_empty() || o.crates.iter().any(|c| c == name))
        .map(|(name, files)| {
            (
                (*name).to_owned(),
                files.iter().map(|f| (*f).to_owned()).collect(),
            )
        })
        .collect())
}

/// Counts of one crate's run, read from cargo-mutants' outcome lists.
#[derive(Debug, Default, PartialEq, Eq)]
struct Tally {
    caught: usize,
    missed: usize,
    timeout: usize,
    unviable: usize,
}

impl Tally {
    fn read(dir: &Path) -> Self {
        let count = |name: &str| {
            fs::read_to_string(dir.join(name))
                .map(|t| t.lines().filter(|l| !l.trim().is_empty()).count())
                .unwrap_or(0)
        };
        Self {
            caught: count("caught.txt"),
            missed: count("missed.txt"),
            timeout: count("timeout.txt"),
            unviable: count("unviable.txt"),
        }
    }

    fn mutants(&self) -> usize {
        self.caught + self.missed + self.timeout + self.unviable
    }

    /// caught ÷ (caught + missed + timeout), in percent; `None` with no viable mutant.
    fn kill_rate(&self) -> Option<f64> {
        let viable = self.caught + self.missed + self.timeout;
        (viable > 0).then(|| 100.0 * self.caught as f64 / viable as f64)
    }
}

pub(crate) fn cli(args: &[String]) -> Result<(), String> {
    let o = parse(args)?;
    crate::ensure_cargo_tool("mutants")?;
    let out_root = platform::target_dir().join("mutants");
    fs::create_dir_all(&out_root).map_err(|e| format!("{}: {e}", out_root.display()))?;
    let diff = match &o.changed_since {
        Some(rev) => Some(write_diff(rev, &out_root)?),
        None => None,
    };
    let mut rows: Vec<(String, Tally, bool)> = Vec::new();
    for (krate, files) in plan(&o)? {
        let out_dir: PathBuf = out_root.join(&krate);
        let a = mutants_args(&o, &krate, &files, &out_dir, diff.as_deref());
        let ran = run_mutants(&a)?;
        rows.push((krate, Tally::read(&out_dir.join("mutants.out")), ran));
    }
    print_table(&rows);
    if rows.iter().any(|(_, _, ran)| !ran) {
        return Err("a cargo-mutants run failed (see its output above)".into());
    }
    Ok(())
}

/// Writes the Rust changes since `rev` to `out_root/changes.diff` (for
/// cargo-mutants' `--in-diff`) and returns its path.
fn write_diff(rev: &str, out_root: &Path) -> Result<PathBuf, String> {
    let out = Command::new("git")
        .args(["diff", rev, "--", "*.rs"])
        .current_dir(root())
        .output()
        .map_err(|e| format!("git diff: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "git diff {rev}: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let path = out_root.join("changes.diff");
    fs::write(&path, &out.stdout).map_err(|e| e.to_string())?;
    Ok(path)
}

/// The `cargo mutants` arguments for one crate's `files`.
fn mutants_args(
    o: &Opts,
    krate: &str,
    files: &[String],
    out_dir: &Path,
    diff: Option<&Path>,
) -> Vec<String> {
    let mut a: Vec<String> = ["mutants", "--package", krate, "--test-tool", "nextest"]
        .map(String::from)
        .to_vec();
    a.extend(["--output".into(), out_dir.display().to_string()]);
    let jobs = o.jobs.clone().unwrap_or_else(|| "1".into());
    if jobs == "1" {
        // One job mutates this tree in place and reuses its warm target
        // directory (a copy would build every dependency cold); the
        // sources are restored when cargo-mutants ends. Don't edit the
        // tree meanwhile.
        a.push("--in-place".into());
    } else {
        a.extend(["--jobs".into(), jobs]);
    }
    // A timeout is reported, not counted as a kill: keep it bounded.
    a.extend([
        "--timeout".into(),
        o.timeout.clone().unwrap_or_else(|| "300".into()),
    ]);
    for f in files {
        a.extend(["--file".into(), format!("{krate}/{f}")]);
    }
    if let Some(re) = &o.re {
        a.extend(["--re".into(), re.clone()]);
    }
    if let Some(d) = diff {
        a.extend(["--in-diff".into(), d.display().to_string()]);
    }
    if !o.passthrough.is_empty() {
        a.push("--".into());
        a.extend(o.passthrough.iter().cloned());
    }
    a
}

/// Runs `cargo <a>`; whether cargo-mutants completed its run (whatever
/// it found).
fn run_mutants(a: &[String]) -> Result<bool, String> {
    println!("\n==> cargo {}", a.join(" "));
    let status = Command::new("cargo")
        .args(a)
        // .config/nextest.toml: stop at the first failing test.
        .env("NEXTEST_PROFILE", "mutants")
        .current_dir(root())
        .status()
        .map_err(|e| format!("cargo mutants: {e}"))?;
    // Exit codes: 0 all caught, 2 missed, 3 timeouts; anything else
    // (usage, baseline tests failing) is a failed run.
    Ok(matches!(status.code(), Some(0 | 2 | 3)))
}

/// One table row per crate run, then where the surviving mutants are listed.
fn print_table(rows: &[(String, Tally, bool)]) {
    println!("\n| crate | mutants | caught | missed | timeout | unviable | kill rate |");
    println!("|---|---|---|---|---|---|---|");
    for (krate, t, ran) in rows {
        let rate = t
            .kill_rate()
            .map_or_else(|| "—".to_owned(), |r| format!("{r:.1} %"));
        let note = if *ran { "" } else { " (run failed)" };
        println!(
            "| {krate}{note} | {} | {} | {} | {} | {} | {rate} |",
            t.mutants(),
            t.caught,
            t.missed,
            t.timeout,
            t.unviable
        );
    }
    println!(
        "\nmissed and timed-out mutants: target/mutants/<crate>/mutants.out/{{missed,timeout}}.txt"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn files_are_grouped_by_crate_and_unknown_crates_refused() {
        let o = parse(&args(&[
            "--file",
            "soma-outbox/src/relay.rs",
            "--file",
            "soma-outbox/src/inbox.rs",
            "--file",
            "soma-bus/src/consumer.rs",
        ]))
        .unwrap();
        let p = plan(&o).unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].0, "soma-outbox");
        assert_eq!(p[0].1, vec!["src/relay.rs", "src/inbox.rs"]);
        assert!(parse(&args(&["--crate", "serde"])).is_err());
        let all = plan(&parse(&[]).unwrap()).unwrap();
        assert_eq!(all.len(), CORE.len());
        let one = plan(&parse(&args(&["--crate", "soma-config"])).unwrap()).unwrap();
        assert_eq!(
            one,
            vec![(
                "soma-config".to_owned(),
                vec!["src/loader.rs".to_owned(), "src/live.rs".to_owned()]
            )]
        );
    }

    #[test]
    fn one_job_mutates_in_place_and_options_pass_through() {
        let o = parse(&args(&["--re", "relay", "--", "-E", "test(x)"])).unwrap();
        let files = ["src/relay.rs".to_owned()];
        let a = mutants_args(
            &o,
            "soma-outbox",
            &files,
            Path::new("out"),
            Some(Path::new("d")),
        );
        let expected = "mutants --package soma-outbox --test-tool nextest --output out \
                        --in-place --timeout 300 --file soma-outbox/src/relay.rs --re relay \
                        --in-diff d -- -E test(x)";
        assert_eq!(a.join(" "), expected);
        let o = parse(&args(&["-j", "2", "--timeout", "60"])).unwrap();
        let a = mutants_args(&o, "soma-bus", &[], Path::new("out"), None);
        assert_eq!(
            a.join(" "),
            "mutants --package soma-bus --test-tool nextest --output out --jobs 2 --timeout 60"
        );
    }

    #[test]
    fn the_kill_rate_counts_timeouts_as_survivors() {
        let dir = std::env::temp_dir().join(format!("xtask-mutants-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("caught.txt"), "a\nb\nc\nd\ne\nf\n").unwrap();
        fs::write(dir.join("missed.txt"), "g\n").unwrap();
        fs::write(dir.join("timeout.txt"), "h\n").unwrap();
        fs::write(dir.join("unviable.txt"), "i\nj\n").unwrap();
        let t = Tally::read(&dir);
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(t.mutants(), 10);
        assert_eq!(t.kill_rate(), Some(75.0));
        assert_eq!(Tally::default().kill_rate(), None);
    }
}
