//! The command line shared by `cargo xtask lint-env` and the
//! `soma-lint-env` binary.

use std::io::Write as _;
use std::path::PathBuf;

use crate::{LintError, Options, lint_workspace, workspace};

const USAGE: &str = "\
usage: lint-env [--manifest-path PATH] [--format text|json]

Reports code that reads or changes the process environment outside the
crates and paths allowed by [workspace.metadata.lint-env] in Cargo.toml.

  --manifest-path PATH  Cargo.toml (or its directory) to lint; default: the
                        nearest Cargo.toml at or above the current directory
  --format text|json    output format (default: text)
  -h, --help            print this help

exit codes: 0 clean, 1 findings (or files that do not parse), 2 usage or
configuration error";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Text,
    Json,
}

#[derive(Debug)]
struct Args {
    manifest_path: Option<PathBuf>,
    format: Format,
    help: bool,
}

fn parse_args<I: IntoIterator<Item = String>>(args: I) -> Result<Args, LintError> {
    let mut out = Args {
        manifest_path: None,
        format: Format::Text,
        help: false,
    };
    let mut it = args.into_iter();
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = |name: &str| {
            inline
                .clone()
                .or_else(|| it.next())
                .ok_or_else(|| LintError::Usage(format!("{name} needs a value")))
        };
        match flag.as_str() {
            "-h" | "--help" => out.help = true,
            "--manifest-path" => {
                if out.manifest_path.is_some() {
                    return Err(LintError::Usage("--manifest-path given twice".into()));
                }
                out.manifest_path = Some(PathBuf::from(value("--manifest-path")?));
            }
            "--format" => {
                out.format = match value("--format")?.as_str() {
                    "text" => Format::Text,
                    "json" => Format::Json,
                    other => {
                        return Err(LintError::Usage(format!(
                            "unknown format `{other}` (expected text or json)"
                        )));
                    }
                }
            }
            other => return Err(LintError::Usage(format!("unexpected argument `{other}`"))),
        }
    }
    Ok(out)
}

/// Runs the linter as a command line: `args` are the arguments after `lint-env`
/// (`[--manifest-path PATH] [--format text|json]`). Prints findings to stdout,
/// errors to stderr. Returns the process exit code: 0 clean, 1 findings
/// (or files that failed to parse), 2 usage/config errors.
pub fn cli<I: IntoIterator<Item = String>>(args: I) -> i32 {
    let args = match parse_args(args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("lint-env: error: {e}\n\n{USAGE}");
            return e.exit_code();
        }
    };
    if args.help {
        println!("{USAGE}");
        return 0;
    }
    let manifest = match args.manifest_path {
        Some(p) => Ok(p),
        None => std::env::current_dir()
            .map_err(|source| LintError::Io {
                path: PathBuf::from("."),
                source,
            })
            .and_then(|d| workspace::discover(&d)),
    };
    let report = match manifest.and_then(|m| lint_workspace(&m, &Options::default())) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("lint-env: error: {e}");
            return e.exit_code();
        }
    };
    // Write errors (a closed pipe, `| head`) must not panic; the exit code
    // still tells the caller what was found.
    let mut out = std::io::stdout().lock();
    let _ = match args.format {
        Format::Text => report
            .findings
            .iter()
            .try_for_each(|f| writeln!(out, "{f}")),
        Format::Json => writeln!(out, "{}", report.to_json()),
    };
    drop(out);
    eprintln!("{}", report.summary());
    report.exit_code()
}
