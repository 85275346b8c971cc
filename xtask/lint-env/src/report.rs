//! Findings and the report, with their text and JSON renderings.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Serialize;

/// Which rule a finding breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Rule {
    /// `std::env::{var, var_os, vars, vars_os}` outside the allowlist.
    EnvRead,
    /// `std::env::{set_var, remove_var}` outside the allowlist.
    EnvWrite,
    /// `env!`/`option_env!` of a name not in `allow-env-macro`.
    EnvMacro,
    /// `dotenv`/`dotenvy` loading (functions, or the `dotenv!` macro).
    Dotenv,
    /// The file does not parse, so it could not be checked.
    ParseError,
    /// The file could not be read (I/O error or not UTF-8).
    ReadError,
}

impl Rule {
    /// The rule's name as printed (`env-read`, `parse-error`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Rule::EnvRead => "env-read",
            Rule::EnvWrite => "env-write",
            Rule::EnvMacro => "env-macro",
            Rule::Dotenv => "dotenv",
            Rule::ParseError => "parse-error",
            Rule::ReadError => "read-error",
        }
    }

    /// True for findings about a file that could not be checked at all.
    pub fn is_unchecked_file(self) -> bool {
        matches!(self, Rule::ParseError | Rule::ReadError)
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One place where code touches the environment outside the allowlist (or
/// a file that could not be checked).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// Path relative to the workspace root, `/`-separated.
    pub path: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column, in characters.
    pub column: usize,
    /// The rule broken.
    pub rule: Rule,
    /// The package the file belongs to (empty for [`crate::lint_source`]).
    #[serde(rename = "crate")]
    pub krate: String,
    /// What is touched, canonically: `std::env::var`, `env!("HOME")`,
    /// `dotenvy::dotenv`; empty for parse and read errors.
    pub target: String,
    /// Human-readable message naming the call and what to do instead.
    pub message: String,
}

impl fmt::Display for Finding {
    /// `path:line:col: error[rule]: message`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: error[{}]: {}",
            self.path, self.line, self.column, self.rule, self.message
        )
    }
}

fn lossy_path<S: serde::Serializer>(p: &Path, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&p.to_string_lossy())
}

/// The result of linting a workspace.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The workspace root (directory of the root manifest).
    #[serde(serialize_with = "lossy_path")]
    pub workspace_root: PathBuf,
    /// Packages whose files were looked at, in order.
    pub packages: Vec<String>,
    /// Files parsed and checked.
    pub files_checked: usize,
    /// Files skipped because their crate or path is allowlisted.
    pub files_allowed: usize,
    /// Findings, sorted by path, line and column.
    pub findings: Vec<Finding>,
}

fn plural(n: usize, word: &str) -> String {
    format!("{n} {word}{}", if n == 1 { "" } else { "s" })
}

impl Report {
    /// No findings (and every file parsed).
    pub fn is_clean(&self) -> bool {
        self.findings.is_empty()
    }

    /// The process exit code the command line uses: 0 clean, 1 findings.
    pub fn exit_code(&self) -> i32 {
        if self.is_clean() { 0 } else { 1 }
    }

    /// The report as a JSON document (see the README for the schema).
    pub fn to_json(&self) -> String {
        #[derive(Serialize)]
        struct Doc<'a> {
            version: u32,
            clean: bool,
            #[serde(flatten)]
            report: &'a Report,
        }
        serde_json::to_string_pretty(&Doc {
            version: 1,
            clean: self.is_clean(),
            report: self,
        })
        .expect("a report always serializes")
    }

    /// One line summarizing the run.
    pub fn summary(&self) -> String {
        let unchecked = self
            .findings
            .iter()
            .filter(|f| f.rule.is_unchecked_file())
            .count();
        let files = self
            .findings
            .iter()
            .map(|f| f.path.as_str())
            .collect::<std::collections::BTreeSet<_>>()
            .len();
        let scope = format!(
            "{} checked in {}, {} allowlisted",
            plural(self.files_checked, "file"),
            plural(self.packages.len(), "package"),
            self.files_allowed
        );
        if self.is_clean() {
            return format!("lint-env: clean ({scope})");
        }
        let mut s = format!(
            "lint-env: {} in {}",
            plural(self.findings.len(), "finding"),
            plural(files, "file")
        );
        if unchecked > 0 {
            s.push_str(&format!(
                ", {} could not be checked",
                plural(unchecked, "file")
            ));
        }
        format!("{s} ({scope})")
    }
}
