//! Keeps process-environment access inside the crates allowed to have it.
//!
//! # Why
//!
//! A service whose settings are read with `std::env::var` in eighty places
//! cannot validate them in one place, cannot show where a value came from,
//! and cannot reload them. The Soma SDK routes every setting through one
//! config crate; this linter makes sure nothing else reads (or, worse,
//! changes) the process environment behind its back — in our workspace and
//! in yours.
//!
//! # What it guarantees
//!
//! It parses every `.rs` file of every workspace member with `syn` and
//! resolves paths the way the compiler does (imports per module and block,
//! aliases, globs, nested groups, `crate::`/`self::`/`super::`, `::std`,
//! `extern crate` renames, dependency renames), then reports:
//!
//! - calls of `std::env::{var, var_os, vars, vars_os}` (`env-read`) and
//!   `std::env::{set_var, remove_var}` (`env-write`), also when the function
//!   is passed as a value (`.map(std::env::var)`), inside closures, nested
//!   modules, `#[cfg(test)]` code and macro arguments;
//! - `env!`/`option_env!` of names outside `allow-env-macro` (`env-macro`;
//!   `CARGO_*` and `OUT_DIR` by default);
//! - `dotenv`/`dotenvy` calls and `dotenv!` (`dotenv`);
//! - files that do not parse or cannot be read (`parse-error`,
//!   `read-error`): a file is never skipped silently.
//!
//! Look-alikes are not reported: a method `.var()`, a function `var` from
//! another crate or module, a local `mod env`, a local variable named
//! `var`, strings, comments and doc comments.
//!
//! # Using it
//!
//! From a command line (`soma-lint-env [--manifest-path PATH] [--format
//! text|json]`), from an `xtask` through [`cli`], or as a library:
//!
//! ```
//! use soma_lint_env::{Config, Rule, lint_source};
//!
//! let src = r#"
//!     use std::env::{self as e};
//!     fn port() -> String { e::var("PORT").unwrap_or_default() }
//!     fn name(x: &Thing) -> u8 { x.var() } // a method: not reported
//! "#;
//! let findings = lint_source("src/lib.rs", src, &Config::default());
//! assert_eq!(findings.len(), 1);
//! assert_eq!(findings[0].rule, Rule::EnvRead);
//! assert_eq!(findings[0].target, "std::env::var");
//! assert_eq!((findings[0].line, findings[0].column), (3, 27));
//! ```
//!
//! The allowlist lives in the linted workspace's root `Cargo.toml`; see
//! [`Config`] and the README.
#![cfg_attr(docsrs, feature(doc_cfg))]

// The README's examples run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

mod check;
mod cli;
mod config;
mod report;
mod resolve;
mod targets;
mod workspace;

use std::path::{Path, PathBuf};

pub use crate::cli::cli;
pub use crate::config::{Config, DEFAULT_ENV_MACRO, DEFAULT_HINT};
pub use crate::report::{Finding, Report, Rule};

use crate::check::{Checker, FileCtx};
use crate::resolve::{Scopes, SourceFile};

/// A usage or configuration problem: the lint could not run. The command
/// line exits with 2 for every variant.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LintError {
    /// Bad command-line arguments.
    #[error("{0}")]
    Usage(String),
    /// No `Cargo.toml` where one was expected.
    #[error("no Cargo.toml at {}", path.display())]
    ManifestNotFound {
        /// Where it was looked for.
        path: PathBuf,
    },
    /// A manifest could not be read.
    #[error("cannot read {}: {source}", path.display())]
    ManifestRead {
        /// The manifest.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A manifest is not valid TOML or lacks what a manifest needs.
    #[error("invalid manifest {}: {message}", path.display())]
    ManifestParse {
        /// The manifest.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The `lint-env` table is malformed.
    #[error("invalid lint-env configuration in {source_name}: `{key}`: {message}")]
    InvalidConfig {
        /// Where the table came from (manifest path and table name).
        source_name: String,
        /// The offending key.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// An allowlist pattern or `members` entry is not a valid glob.
    #[error("invalid glob `{pattern}`: {message}")]
    InvalidGlob {
        /// The pattern.
        pattern: String,
        /// What is wrong.
        message: String,
    },
    /// Walking the workspace failed.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

impl LintError {
    /// Bad command-line arguments.
    pub fn is_usage(&self) -> bool {
        matches!(self, LintError::Usage(_))
    }

    /// A missing or malformed manifest, or a malformed allowlist.
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            LintError::ManifestNotFound { .. }
                | LintError::ManifestParse { .. }
                | LintError::InvalidConfig { .. }
                | LintError::InvalidGlob { .. }
        )
    }

    /// A filesystem error.
    pub fn is_io(&self) -> bool {
        matches!(self, LintError::Io { .. } | LintError::ManifestRead { .. })
    }

    /// The command-line exit code for this error (always 2).
    pub fn exit_code(&self) -> i32 {
        2
    }
}

/// How to lint a workspace.
#[derive(Debug, Clone, Default)]
pub struct Options {
    config: Option<Config>,
}

impl Options {
    /// Use this allowlist instead of the one in the manifest.
    pub fn config(mut self, config: Config) -> Options {
        self.config = Some(config);
        self
    }
}

/// Lints the workspace (or single package) a manifest describes.
///
/// `manifest` is a `Cargo.toml` or a directory holding one. A workspace
/// root lints every member (explicit, globbed, or a path dependency inside
/// the workspace, minus `exclude`); a member's manifest lints that member
/// with its workspace's allowlist. Findings carry paths relative to the
/// workspace root and are sorted.
pub fn lint_workspace(manifest: &Path, options: &Options) -> Result<Report, LintError> {
    let ws = workspace::load(manifest)?;
    let config = options.config.clone().unwrap_or(ws.config);
    let mut report = Report {
        workspace_root: ws.root.clone(),
        packages: Vec::new(),
        files_checked: 0,
        files_allowed: 0,
        findings: Vec::new(),
    };
    for package in &ws.packages {
        report.packages.push(package.name.clone());
        let files = workspace::package_files(&package.dir)?;
        if config.allows_crate(&package.name) {
            report.files_allowed += files.len();
            continue;
        }
        let mut parsed = Vec::new();
        let mut checked_idx = Vec::new();
        for path in files {
            let rel = workspace::relative(&ws.root, &path);
            let allowed = config.allows_path(&rel);
            if allowed {
                report.files_allowed += 1;
            }
            match parse(&path) {
                Ok(ast) => {
                    if !allowed {
                        checked_idx.push((parsed.len(), rel));
                    }
                    parsed.push(SourceFile { path, ast });
                }
                Err(mut f) if !allowed => {
                    report.files_checked += 1;
                    f.path = rel;
                    f.krate.clone_from(&package.name);
                    report.findings.push(f);
                }
                Err(_) => {}
            }
        }
        let mut scopes = Scopes::build(&parsed);
        let ctx = FileCtx {
            config: &config,
            renames: &package.renames,
            hint: config.hint(),
        };
        for (i, rel) in checked_idx {
            report.files_checked += 1;
            let hits = Checker::new(&mut scopes, &ctx, i).run(&parsed[i].ast);
            report.findings.extend(hits.into_iter().map(|h| Finding {
                path: rel.clone(),
                line: h.line,
                column: h.column,
                rule: h.rule,
                krate: package.name.clone(),
                target: h.target,
                message: h.message,
            }));
        }
    }
    report
        .findings
        .sort_by(|a, b| (&a.path, a.line, a.column).cmp(&(&b.path, b.line, b.column)));
    Ok(report)
}

/// Parses a file, turning failures into findings (path left for the caller).
fn parse(path: &Path) -> Result<syn::File, Finding> {
    let text = match std::fs::read(path) {
        Ok(bytes) => match String::from_utf8(bytes) {
            Ok(t) => t,
            Err(_) => {
                return Err(unchecked(
                    Rule::ReadError,
                    1,
                    1,
                    "file is not UTF-8, so it was not checked".into(),
                ));
            }
        },
        Err(e) => {
            return Err(unchecked(
                Rule::ReadError,
                1,
                1,
                format!("cannot read file ({e}), so it was not checked"),
            ));
        }
    };
    parse_text(&text)
}

fn parse_text(text: &str) -> Result<syn::File, Finding> {
    syn::parse_file(text).map_err(|e| {
        let start = e.span().start();
        let mut detail = e.to_string();
        if detail == "cannot parse string into token stream" {
            detail = "unbalanced delimiters or an invalid token".to_string();
        }
        unchecked(
            Rule::ParseError,
            start.line.max(1),
            start.column + 1,
            format!(
                "file does not parse, so it was not checked: {detail} (if this is valid Rust \
                 that syn cannot parse yet, list the file in allow-paths)"
            ),
        )
    })
}

fn unchecked(rule: Rule, line: usize, column: usize, message: String) -> Finding {
    Finding {
        path: String::new(),
        line,
        column,
        rule,
        krate: String::new(),
        target: String::new(),
        message,
    }
}

/// Lints one source file on its own, as a crate root: imports and modules
/// inside the file are resolved, `mod x;` files and other crates are not
/// followed. `path` is only used in the findings. A parse failure is
/// returned as a single [`Rule::ParseError`] finding.
pub fn lint_source(path: impl AsRef<Path>, source: &str, config: &Config) -> Vec<Finding> {
    let shown = path.as_ref().to_string_lossy().replace('\\', "/");
    let ast = match parse_text(source) {
        Ok(ast) => ast,
        Err(mut f) => {
            f.path = shown;
            return vec![f];
        }
    };
    let files = vec![SourceFile {
        path: path.as_ref().to_path_buf(),
        ast,
    }];
    let mut scopes = Scopes::build(&files);
    let renames = Default::default();
    let ctx = FileCtx {
        config,
        renames: &renames,
        hint: config.hint(),
    };
    Checker::new(&mut scopes, &ctx, 0)
        .run(&files[0].ast)
        .into_iter()
        .map(|h| Finding {
            path: shown.clone(),
            line: h.line,
            column: h.column,
            rule: h.rule,
            krate: String::new(),
            target: h.target,
            message: h.message,
        })
        .collect()
}
