//! Workspace tasks for the Soma Platform SDK.
//!
//! ```text
//! cargo xtask test            # the whole pipeline CI runs (README: Quick start)
//! cargo xtask stack up|down|status
//! cargo xtask platform up|down|status|token   # the example platform (README: Run the platform)
//! cargo xtask chaos [--short] [--scenario NAME]...  # faults under load (README: Chaos)
//! cargo xtask bench [--group NAME]...                # benchmarks + load, one table (README: Load)
//! cargo xtask mutants [--crate NAME] [--changed-since REV]  # mutation testing (mutants.rs)
//! cargo xtask lint-env [--manifest-path PATH] [--format text|json]
//! ```
//!
//! `test` brings up every service the suite needs (installing what is
//! missing), then runs the format check, clippy with `-D warnings`,
//! `lint-env`, `cargo deny`, the release checks (`msrv`, `docs`, `package`:
//! see `release.rs`), and the tests. Each step prints its
//! duration; `--step NAME` runs one.

use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::Instant;

mod bench;
mod chaos;
mod disk;
mod fuzz;
mod load;
mod mutants;
mod platform;
mod release;
mod stack;

const USAGE: &str = "usage: cargo xtask <command>

commands:
  test [--no-stack] [--only-tests] [--step NAME]... [-- <nextest args>]
                       bring up the stack, then fmt, clippy, lint-env, deny, msrv,
                       docs, package, downstream, doc-tests, tests, fuzz, chaos; `--step`
                       runs only the named steps (the stack only for doc-tests
                       and tests)
  stack up|down|status the local services (PostgreSQL, Redis, tansu, and stack.d extras)
  platform up|down|status|token [--tenant T] [--subject S]
                       run the example platform (gateway + workers) and smoke-test it
  chaos [--short] [--scenario NAME]... [--keep] [--storage sqlite|postgres]
                       prove the durable chat path on the running platform under
                       broker, PostgreSQL, Redis and SomaBrain faults (README: Chaos)
  bench [--group NAME]... [--rate N] [--duration S] [--conversations N] [--no-run] ...
                       every benchmark, one table with same-run baselines and goals;
                       `--group platform` is the platform load harness (README: Load)
  fuzz [--secs N] [--target NAME]...
                       every parser of outside input under cargo-fuzz, N s each
                       (default 60); README: Fuzzing
  mutants [--crate NAME]... [--file PATH]... [--re REGEX] [--changed-since REV]
                       mutation testing of the core modules (cargo-mutants; README: Mutation testing)
  lint-env [--manifest-path PATH] [--format text|json]
                       forbid process-environment access outside allowed crates
  deny                 cargo deny --offline check licenses bans sources";

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let Some(cmd) = args.next() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let rest: Vec<String> = args.collect();
    let result = match cmd.as_str() {
        "lint-env" => return exit(lint_env(rest)),
        "stack" => stack::cli(&rest),
        "platform" => platform::cli(&rest),
        "chaos" => chaos::cli(&rest),
        "bench" => bench::cli(&rest),
        "mutants" => mutants::cli(&rest),
        "fuzz" => fuzz::cli(&rest),
        "test" | "ci" => test(&rest),
        "deny" => ensure_cargo_tool("deny").and_then(|()| deny()),
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            Ok(())
        }
        other => {
            eprintln!("xtask: unknown command `{other}`\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `lint-env` on this workspace unless `--manifest-path` says otherwise.
fn lint_env(mut args: Vec<String>) -> i32 {
    if !args.iter().any(|a| a.starts_with("--manifest-path")) {
        args.splice(
            0..0,
            [
                "--manifest-path".to_owned(),
                root().join("Cargo.toml").display().to_string(),
            ],
        );
    }
    soma_lint_env::cli(args)
}

fn exit(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

/// The workspace root (the parent of this crate's directory).
///
/// `cargo xtask` (`cargo run -p xtask`) sets `CARGO_MANIFEST_DIR` for the
/// run, so this is the checkout the command was started in — not the one
/// this binary was compiled from, which differs when worktrees share one
/// `CARGO_TARGET_DIR` (an xtask built in one would test the other). The
/// compile-time path is the fallback for a binary run by hand.
pub(crate) fn root() -> PathBuf {
    #[allow(clippy::disallowed_methods)] // xtask is on the lint-env allowlist
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .filter(|d| d.join("Cargo.toml").is_file())
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    manifest_dir
        .parent()
        .expect("xtask lives inside the workspace")
        .to_path_buf()
}

/// Runs a command in the workspace root, failing with its name on a non-zero exit.
pub(crate) fn run(program: &str, args: &[&str]) -> Result<(), String> {
    let status = Command::new(program)
        .args(args)
        .current_dir(root())
        .status()
        .map_err(|e| format!("could not start `{program}`: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("`{program} {}` failed ({status})", args.join(" ")))
    }
}

fn step(name: &str, f: impl FnOnce() -> Result<(), String>) -> Result<(), String> {
    println!("\n==> {name}");
    let started = Instant::now();
    let r = f();
    let secs = started.elapsed().as_secs_f64();
    match &r {
        Ok(()) => println!("==> {name}: ok in {secs:.1}s"),
        Err(e) => println!("==> {name}: FAILED in {secs:.1}s: {e}"),
    }
    r
}

pub(crate) fn cargo_bin_dir() -> PathBuf {
    #[allow(clippy::disallowed_methods)] // xtask is on the lint-env allowlist
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"));
    home.join("bin")
}

fn have_cargo_subcommand(name: &str) -> bool {
    cargo_bin_dir().join(format!("cargo-{name}")).exists()
        || Command::new("cargo")
            .args([name, "--version"])
            .output()
            .is_ok_and(|o| o.status.success())
}

/// Installs the cargo subcommand `cargo-<name>` from crates.io unless it is
/// there (cargo-deny, cargo-mutants, cargo-fuzz: installed on first use).
pub(crate) fn ensure_cargo_tool(name: &str) -> Result<(), String> {
    if have_cargo_subcommand(name) {
        return Ok(());
    }
    println!("installing cargo-{name} (cargo install --locked)");
    run("cargo", &["install", "--locked", &format!("cargo-{name}")])
}

fn deny() -> Result<(), String> {
    // `--offline` needs every platform's crates in the local cache (the graph
    // covers all targets); fetch them first.
    run("cargo", &["fetch", "--quiet"])?;
    run(
        "cargo",
        &["deny", "--offline", "check", "licenses", "bans", "sources"],
    )
}

/// Seconds each fuzz target runs in `cargo xtask test`.
const FUZZ_STEP_SECS: u64 = 10;

/// The steps of `cargo xtask test`, in order: the name `--step` takes, and
/// whether it is a check (skipped by `--only-tests`) rather than a test.
const STEPS: &[(&str, bool)] = &[
    ("fmt", true),
    ("clippy", true),
    ("lint-env", true),
    ("deny", true),
    ("msrv", true),
    ("docs", true),
    ("package", true),
    ("downstream", true),
    ("doc-tests", false),
    ("tests", false),
    ("fuzz", false),
    ("chaos", false),
];

fn test(args: &[String]) -> Result<(), String> {
    let (ours, passthrough) = match args.iter().position(|a| a == "--") {
        Some(i) => (&args[..i], &args[i + 1..]),
        None => (args, &[][..]),
    };
    let mut with_stack = true;
    let mut checks = true;
    let mut only: Vec<&str> = Vec::new();
    let mut it = ours.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--no-stack" => with_stack = false,
            "--only-tests" => checks = false,
            "--step" => {
                let name = it.next().ok_or("`--step` needs a step name")?;
                let known = STEPS.iter().find(|(n, _)| n == name).ok_or_else(|| {
                    let names: Vec<&str> = STEPS.iter().map(|(n, _)| *n).collect();
                    format!("unknown step `{name}`; steps: {}", names.join(", "))
                })?;
                only.push(known.0);
            }
            other => return Err(format!("unknown `test` option `{other}`\n{USAGE}")),
        }
    }
    let selected: Vec<&str> = STEPS
        .iter()
        .filter(|(name, check)| {
            if only.is_empty() {
                checks || !check
            } else {
                only.contains(name)
            }
        })
        .map(|(name, _)| *name)
        .collect();
    let started = Instant::now();
    // The whole pipeline brings the stack up first (it also installs what the
    // builds need, e.g. cmake); of single steps, only the doc tests and the
    // test suite talk to the services.
    let needs_stack = only.is_empty()
        || selected
            .iter()
            .any(|s| matches!(*s, "doc-tests" | "tests" | "chaos"));
    let target = platform::target_dir();
    if let Some(free) = disk::free_bytes(&target) {
        println!("disk: {} free under {}", disk::gib(free), target.display());
        if free < disk::TOO_LOW_BYTES {
            return Err(format!(
                "only {} free under {}: a cold run writes well over {} \
                 (debug, nightly docs, packaged crates, fuzz and chaos builds); \
                 free some space first",
                disk::gib(free),
                target.display(),
                disk::gib(disk::LOW_BYTES)
            ));
        }
    }
    if with_stack && needs_stack {
        step("stack up", stack::up)?;
    }
    for name in selected {
        disk::make_room(&target, name);
        run_step(name, passthrough)?;
        if let Some(free) = disk::free_bytes(&target) {
            println!("disk: {} free after `{name}`", disk::gib(free));
        }
    }
    println!(
        "\nxtask test: all steps passed in {:.1} min",
        started.elapsed().as_secs_f64() / 60.0
    );
    Ok(())
}

fn run_step(name: &str, passthrough: &[String]) -> Result<(), String> {
    match name {
        "fmt" => step("cargo fmt --check", || {
            run("cargo", &["fmt", "--all", "--", "--check"])
        }),
        "clippy" => step("clippy -D warnings", || {
            run(
                "cargo",
                &[
                    "clippy",
                    "--workspace",
                    "--all-targets",
                    "--",
                    "-D",
                    "warnings",
                ],
            )
        }),
        "lint-env" => step("lint-env", || match lint_env(Vec::new()) {
            0 => Ok(()),
            code => Err(format!("lint-env exited with {code}")),
        }),
        "deny" => {
            step("install cargo-deny", || ensure_cargo_tool("deny"))?;
            step("cargo deny", deny)
        }
        "msrv" => step("msrv: locked dependencies vs rust-version", release::msrv),
        "docs" => step("docs as docs.rs builds them (nightly)", release::docs),
        "package" => step("cargo package (published crates)", release::package),
        "downstream" => step(
            "examples/downstream against the packaged crates",
            release::downstream,
        ),
        "doc-tests" => step("doc tests", || {
            run("cargo", &["test", "--workspace", "--doc"])
        }),
        "tests" => step("tests (nextest)", || {
            let mut a = vec!["nextest", "run", "--workspace", "--no-fail-fast"];
            a.extend(passthrough.iter().map(String::as_str));
            run("cargo", &a)
        }),
        // Every fuzz target briefly (and every committed regression input):
        // a parser that panics again fails here, not in a long run.
        "fuzz" => step("fuzz targets, 10 s each (nightly)", || {
            let targets: Vec<String> = fuzz::TARGETS.iter().map(|t| (*t).to_owned()).collect();
            let outcomes = fuzz::fuzz(&targets, FUZZ_STEP_SECS)?;
            println!("\n{}", fuzz::table(&outcomes));
            match outcomes.iter().filter(|o| !o.passed).count() {
                0 => Ok(()),
                n => Err(format!("{n} fuzz target(s) failed")),
            }
        }),
        // The platform's promise on the running binaries, faults injected
        // into a private stack (README, "Chaos"): the short form, minutes.
        "chaos" => step("chaos --short (the platform under faults)", || {
            chaos::cli(&["--short".to_owned()])
        }),
        other => Err(format!("no step `{other}`")),
    }
}
