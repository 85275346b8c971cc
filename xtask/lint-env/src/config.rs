//! The allowlist: which crates and files may touch the environment, and
//! which `env!` names are fine.

use globset::{Glob, GlobBuilder, GlobSet, GlobSetBuilder};

use crate::LintError;

/// Hint appended to findings when the manifest does not set one.
pub const DEFAULT_HINT: &str =
    "receive the value through configuration loaded by an allowed crate instead";

/// `env!` names allowed when the manifest does not say otherwise: the
/// variables cargo sets for every compilation.
pub const DEFAULT_ENV_MACRO: [&str; 2] = ["CARGO_*", "OUT_DIR"];

/// The linter's configuration, normally read from
/// `[workspace.metadata.lint-env]` (or `[package.metadata.lint-env]` for a
/// single-package manifest):
///
/// ```toml
/// [workspace.metadata.lint-env]
/// allow-crates = ["my-config", "xtask"]      # package names, globs allowed
/// allow-paths = ["tools/**", "*/build.rs"]   # globs relative to the workspace root
/// allow-env-macro = ["CARGO_*", "OUT_DIR"]   # env!/option_env! names (the default)
/// hint = "read it through my-config"         # appended to each finding
/// ```
#[derive(Debug, Clone)]
pub struct Config {
    allow_crates: Vec<String>,
    allow_paths: Vec<String>,
    allow_env_macro: Vec<String>,
    hint: Option<String>,
    crates: GlobSet,
    paths: GlobSet,
    env_macro: GlobSet,
}

impl Default for Config {
    fn default() -> Self {
        Config::new(
            Vec::new(),
            Vec::new(),
            DEFAULT_ENV_MACRO.iter().map(|s| s.to_string()).collect(),
            None,
        )
        .expect("default patterns are valid globs")
    }
}

fn name_glob(p: &str) -> Result<Glob, LintError> {
    Glob::new(p).map_err(|e| LintError::InvalidGlob {
        pattern: p.to_string(),
        message: e.kind().to_string(),
    })
}

fn path_glob(p: &str) -> Result<Glob, LintError> {
    GlobBuilder::new(p.trim_start_matches("./"))
        .literal_separator(true)
        .build()
        .map_err(|e| LintError::InvalidGlob {
            pattern: p.to_string(),
            message: e.kind().to_string(),
        })
}

fn set(patterns: &[String], f: fn(&str) -> Result<Glob, LintError>) -> Result<GlobSet, LintError> {
    let mut b = GlobSetBuilder::new();
    for p in patterns {
        b.add(f(p)?);
    }
    b.build().map_err(|e| LintError::InvalidGlob {
        pattern: patterns.join(", "),
        message: e.to_string(),
    })
}

impl Config {
    /// Builds a configuration; fails on an invalid glob.
    ///
    /// `allow_crates` are package names (as in `[package] name`, globs
    /// allowed, `-` and `_` equivalent); `allow_paths` are globs over paths
    /// relative to the workspace root (`*` stays within one directory, `**`
    /// crosses directories); `allow_env_macro` are variable names (globs)
    /// that `env!`/`option_env!` may read.
    pub fn new(
        allow_crates: Vec<String>,
        allow_paths: Vec<String>,
        allow_env_macro: Vec<String>,
        hint: Option<String>,
    ) -> Result<Config, LintError> {
        let normalized: Vec<String> = allow_crates.iter().map(|c| c.replace('-', "_")).collect();
        Ok(Config {
            crates: set(&normalized, name_glob)?,
            paths: set(&allow_paths, path_glob)?,
            env_macro: set(&allow_env_macro, name_glob)?,
            allow_crates,
            allow_paths,
            allow_env_macro,
            hint,
        })
    }

    /// Reads the `lint-env` table (the value of `metadata.lint-env`).
    /// Unknown keys are an error so typos do not silently widen or narrow
    /// the allowlist.
    pub fn from_table(table: &toml::Table, source: &str) -> Result<Config, LintError> {
        let invalid = |key: &str, message: &str| LintError::InvalidConfig {
            source_name: source.to_string(),
            key: key.to_string(),
            message: message.to_string(),
        };
        let list = |key: &str| -> Result<Option<Vec<String>>, LintError> {
            match table.get(key) {
                None => Ok(None),
                Some(toml::Value::Array(a)) => a
                    .iter()
                    .map(|v| {
                        v.as_str()
                            .map(str::to_string)
                            .ok_or_else(|| invalid(key, "expected an array of strings"))
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map(Some),
                Some(_) => Err(invalid(key, "expected an array of strings")),
            }
        };
        for key in table.keys() {
            if !matches!(
                key.as_str(),
                "allow-crates" | "allow-paths" | "allow-env-macro" | "hint"
            ) {
                return Err(invalid(
                    key,
                    "unknown key (expected allow-crates, allow-paths, allow-env-macro or hint)",
                ));
            }
        }
        let hint = match table.get("hint") {
            None => None,
            Some(toml::Value::String(s)) => Some(s.clone()),
            Some(_) => return Err(invalid("hint", "expected a string")),
        };
        Config::new(
            list("allow-crates")?.unwrap_or_default(),
            list("allow-paths")?.unwrap_or_default(),
            list("allow-env-macro")?
                .unwrap_or_else(|| DEFAULT_ENV_MACRO.iter().map(|s| s.to_string()).collect()),
            hint,
        )
    }

    /// Is every file of this package allowed?
    pub fn allows_crate(&self, package: &str) -> bool {
        self.crates.is_match(package.replace('-', "_"))
    }

    /// Is this file (path relative to the workspace root, `/`-separated)
    /// allowed?
    pub fn allows_path(&self, relative: &str) -> bool {
        self.paths.is_match(relative)
    }

    /// May `env!`/`option_env!` read this variable?
    pub fn allows_env_macro(&self, name: &str) -> bool {
        self.env_macro.is_match(name)
    }

    /// The allowed crate patterns, as configured.
    pub fn crate_patterns(&self) -> &[String] {
        &self.allow_crates
    }

    /// The allowed path patterns, as configured.
    pub fn path_patterns(&self) -> &[String] {
        &self.allow_paths
    }

    /// The allowed `env!` name patterns, as configured.
    pub fn env_macro_patterns(&self) -> &[String] {
        &self.allow_env_macro
    }

    /// The hint appended to findings.
    pub fn hint(&self) -> &str {
        self.hint.as_deref().unwrap_or(DEFAULT_HINT)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> toml::Table {
        text.parse().expect("toml")
    }

    #[test]
    fn path_globs_respect_separators() {
        let c = Config::new(
            vec![],
            vec!["*/build.rs".into(), "tools/**".into()],
            vec![],
            None,
        )
        .expect("config");
        assert!(c.allows_path("app/build.rs"));
        assert!(
            !c.allows_path("crates/app/build.rs"),
            "`*` stays in one directory"
        );
        assert!(c.allows_path("tools/a/b/c.rs"));
        assert!(!c.allows_path("src/tools/x.rs"));
    }

    #[test]
    fn crate_names_treat_dash_and_underscore_alike() {
        let c = Config::new(
            vec!["soma-config".into(), "gen_*".into()],
            vec![],
            vec![],
            None,
        )
        .expect("config");
        assert!(c.allows_crate("soma-config"));
        assert!(c.allows_crate("soma_config"));
        assert!(c.allows_crate("gen-protos"));
        assert!(!c.allows_crate("soma-configx"));
    }

    #[test]
    fn table_defaults_and_errors() {
        let c = Config::from_table(&table("allow-crates = [\"a\"]"), "test").expect("config");
        assert!(c.allows_env_macro("CARGO_PKG_NAME") && c.allows_env_macro("OUT_DIR"));
        assert!(!c.allows_env_macro("HOME"));
        assert_eq!(c.hint(), DEFAULT_HINT);

        let c = Config::from_table(&table("allow-env-macro = []\nhint = \"h\""), "test")
            .expect("config");
        assert!(
            !c.allows_env_macro("CARGO_PKG_NAME"),
            "an explicit list replaces the default"
        );
        assert_eq!(c.hint(), "h");

        for bad in [
            "allow-crate = []",
            "allow-paths = \"x\"",
            "allow-crates = [1]",
            "hint = 3",
        ] {
            let err = Config::from_table(&table(bad), "test").expect_err(bad);
            assert!(err.is_config(), "{bad}: {err}");
        }
        let err = Config::from_table(&table("allow-paths = [\"a/[\"]"), "test").expect_err("glob");
        assert!(matches!(err, LintError::InvalidGlob { .. }), "{err}");
    }
}
