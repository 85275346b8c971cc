//! Whole-workspace runs: member discovery, the allowlist in the manifest,
//! `--manifest-path`, exit codes and both output formats.

use std::path::{Path, PathBuf};
use std::process::Command;

use soma_lint_env::{Config, Options, Rule, cli, lint_workspace};

fn fixture_ws() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ws-basic")
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_soma-lint-env"))
}

fn write(root: &Path, rel: &str, text: &str) {
    let path = root.join(rel);
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(path, text).expect("write");
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// A throwaway single-package crate, outside any workspace.
fn single_package(lib: &str, metadata: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    write(
        dir.path(),
        "Cargo.toml",
        &format!(
            "[package]\nname = \"single\"\nversion = \"0.1.0\"\nedition = \"2024\"\n{metadata}"
        ),
    );
    write(dir.path(), "src/lib.rs", lib);
    dir
}

#[test]
fn fixture_workspace_findings() {
    let report =
        lint_workspace(&fixture_ws().join("Cargo.toml"), &Options::default()).expect("lint");
    let got: Vec<(&str, usize, Rule)> = report
        .findings
        .iter()
        .map(|f| (f.path.as_str(), f.line, f.rule))
        .collect();
    assert_eq!(
        got,
        vec![
            // Through a `pub use std::env::var as read` in another file.
            ("crates/app/src/lib.rs", 5, Rule::EnvRead),
            // `envfile` is `dotenvy` renamed in [workspace.dependencies].
            ("crates/app/src/lib.rs", 9, Rule::Dotenv),
            ("crates/app/src/util/inner.rs", 4, Rule::EnvRead),
            ("crates/app/tests/it.rs", 3, Rule::EnvWrite),
            ("crates/broken/src/lib.rs", 1, Rule::ParseError),
            // A member only because `app` depends on it by path.
            ("libs/helper/src/lib.rs", 1, Rule::EnvRead),
            ("tools/build.rs", 3, Rule::EnvRead),
            ("tools/src/main.rs", 2, Rule::EnvRead),
        ],
        "{:#?}",
        report.findings
    );
    // env!("BUILD_ID") is allowed by allow-env-macro; config-crate by
    // allow-crates; tools/scripts by allow-paths; crates/excluded by
    // `exclude`; nested-not-member is another package.
    let mut packages = report.packages.clone();
    packages.sort();
    assert_eq!(
        packages,
        ["app", "broken", "config-crate", "helper", "tools"]
    );
    assert_eq!(report.files_allowed, 2);
    assert_eq!(report.files_checked, 9);
    assert!(
        report.findings[0]
            .message
            .ends_with("read it through config-crate")
    );
    assert_eq!(report.findings[1].target, "dotenvy::dotenv");
    assert_eq!(report.findings[0].krate, "app");
    assert!(!report.is_clean());
    assert_eq!(report.exit_code(), 1);
}

#[test]
fn member_manifest_lints_that_member_with_the_root_allowlist() {
    let report = lint_workspace(
        &fixture_ws().join("crates/app/Cargo.toml"),
        &Options::default(),
    )
    .expect("lint");
    assert_eq!(report.packages, ["app"]);
    assert_eq!(report.workspace_root, fixture_ws());
    let paths: Vec<&str> = report.findings.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "crates/app/src/lib.rs",
            "crates/app/src/lib.rs",
            "crates/app/src/util/inner.rs",
            "crates/app/tests/it.rs"
        ]
    );
    // The root's allow-env-macro applies: env!("BUILD_ID") is not reported.
    assert!(report.findings.iter().all(|f| f.rule != Rule::EnvMacro));
}

#[test]
fn options_can_override_the_manifest_allowlist() {
    let config = Config::new(vec!["*".into()], vec![], vec![], None).expect("config");
    let report = lint_workspace(&fixture_ws(), &Options::default().config(config)).expect("lint");
    assert!(report.is_clean(), "{:#?}", report.findings);
    assert_eq!(report.files_checked, 0);
}

#[test]
fn exit_codes() {
    let ws = fixture_ws();
    let ws = ws.to_str().expect("utf-8 path");
    assert_eq!(cli(args(&["--manifest-path", ws])), 1);
    assert_eq!(
        cli(args(&[
            &format!("--manifest-path={ws}/Cargo.toml"),
            "--format",
            "json"
        ])),
        1
    );

    let clean = single_package(
        "pub fn f() -> &'static str { env!(\"CARGO_PKG_NAME\") }\n",
        "",
    );
    let clean_path = clean.path().to_str().expect("utf-8 path");
    assert_eq!(cli(args(&["--manifest-path", clean_path])), 0);
    assert_eq!(cli(args(&["--help"])), 0);

    assert_eq!(cli(args(&["--bogus"])), 2);
    assert_eq!(
        cli(args(&["--format", "xml", "--manifest-path", clean_path])),
        2
    );
    assert_eq!(cli(args(&["--manifest-path"])), 2);
    assert_eq!(
        cli(args(&["--manifest-path", "/nonexistent/Cargo.toml"])),
        2
    );

    let typo = single_package("", "[package.metadata.lint-env]\nallow-crate = [\"x\"]\n");
    assert_eq!(
        cli(args(&[
            "--manifest-path",
            typo.path().to_str().expect("utf-8")
        ])),
        2
    );
    let bad_glob = single_package(
        "",
        "[package.metadata.lint-env]\nallow-paths = [\"src/[\"]\n",
    );
    assert_eq!(
        cli(args(&[
            "--manifest-path",
            bad_glob.path().to_str().expect("utf-8")
        ])),
        2
    );
    let not_toml = single_package("", "[package.metadata.lint-env\n");
    assert_eq!(
        cli(args(&[
            "--manifest-path",
            not_toml.path().to_str().expect("utf-8")
        ])),
        2
    );
}

#[test]
fn config_errors_are_typed() {
    let typo = single_package("", "[package.metadata.lint-env]\nallow-crate = [\"x\"]\n");
    let err = lint_workspace(typo.path(), &Options::default()).expect_err("unknown key");
    assert!(err.is_config(), "{err}");
    assert!(err.to_string().contains("allow-crate"), "{err}");
    let err = lint_workspace(Path::new("/nonexistent"), &Options::default()).expect_err("missing");
    assert!(err.is_config() && !err.is_usage());
}

#[test]
fn single_package_manifest_uses_package_metadata() {
    let dir = single_package(
        "pub fn f() -> bool { std::env::var(\"A\").is_ok() }\nmod gen;\n",
        "[package.metadata.lint-env]\nallow-paths = [\"src/gen.rs\"]\n",
    );
    write(
        dir.path(),
        "src/gen.rs",
        "pub fn g() -> bool { std::env::var(\"B\").is_ok() }\n",
    );
    let report = lint_workspace(dir.path(), &Options::default()).expect("lint");
    assert_eq!(report.packages, ["single"]);
    assert_eq!(report.files_allowed, 1);
    let got: Vec<_> = report
        .findings
        .iter()
        .map(|f| (f.path.as_str(), f.line))
        .collect();
    assert_eq!(got, [("src/lib.rs", 1)]);
}

#[test]
fn target_and_hidden_directories_are_skipped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    write(
        root,
        "Cargo.toml",
        "[workspace]\nmembers = [\"a\"]\n[package]\nname = \"root\"\nversion = \"0.1.0\"\nedition = \"2024\"\n",
    );
    write(root, "src/lib.rs", "pub fn ok() {}\n");
    write(
        root,
        "a/Cargo.toml",
        "[package]\nname = \"a\"\nversion = \"0.1.0\"\nedition = \"2024\"\n",
    );
    write(root, "a/src/lib.rs", "pub fn ok() {}\n");
    let bad = "pub fn bad() -> bool { std::env::var(\"X\").is_ok() }\n";
    write(root, "target/debug/build/x/out/gen.rs", bad);
    write(
        root,
        "target/CACHEDIR.TAG",
        "Signature: 8a477f597d28d172789f06886806bc55\n",
    );
    write(root, "a/target/debug/gen.rs", bad);
    write(
        root,
        "custom-target/CACHEDIR.TAG",
        "Signature: 8a477f597d28d172789f06886806bc55\n",
    );
    write(root, "custom-target/gen.rs", bad);
    write(root, ".git/hooks/x.rs", bad);
    // A source module that happens to be called `target` is still checked.
    write(root, "src/target/mod.rs", bad);
    let report = lint_workspace(root, &Options::default()).expect("lint");
    let paths: Vec<&str> = report.findings.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(paths, ["src/target/mod.rs"]);
    let mut packages = report.packages.clone();
    packages.sort();
    assert_eq!(packages, ["a", "root"]);
}

#[test]
fn binary_text_output() {
    let out = bin()
        .args(["--manifest-path", fixture_ws().to_str().expect("utf-8")])
        .output()
        .expect("run soma-lint-env");
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8(out.stdout).expect("utf-8");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 8, "{stdout}");
    assert!(
        lines[0].starts_with(
            "crates/app/src/lib.rs:5:5: error[env-read]: `settings::read(..)` (`std::env::var`)"
        ),
        "{}",
        lines[0]
    );
    for l in &lines {
        let mut parts = l.splitn(4, ':');
        let (_path, line, col) = (parts.next(), parts.next(), parts.next());
        assert!(line.is_some_and(|n| n.parse::<usize>().is_ok()), "{l}");
        assert!(col.is_some_and(|n| n.parse::<usize>().is_ok()), "{l}");
    }
    let stderr = String::from_utf8(out.stderr).expect("utf-8");
    assert!(stderr.contains("8 findings"), "{stderr}");
}

#[test]
fn binary_json_output() {
    let out = bin()
        .args(["--format", "json", "--manifest-path"])
        .arg(fixture_ws().join("Cargo.toml"))
        .output()
        .expect("run soma-lint-env");
    assert_eq!(out.status.code(), Some(1));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stdout is JSON");
    assert_eq!(doc["version"], 1);
    assert_eq!(doc["clean"], false);
    assert_eq!(doc["files_allowed"], 2);
    let findings = doc["findings"].as_array().expect("findings array");
    assert_eq!(findings.len(), 8);
    let first = &findings[0];
    assert_eq!(first["path"], "crates/app/src/lib.rs");
    assert_eq!(first["line"], 5);
    assert_eq!(first["column"], 5);
    assert_eq!(first["rule"], "env-read");
    assert_eq!(first["crate"], "app");
    assert_eq!(first["target"], "std::env::var");
    assert!(findings.iter().any(|f| f["rule"] == "parse-error"));
}

#[test]
fn binary_usage_error() {
    let out = bin().arg("--nope").output().expect("run soma-lint-env");
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8(out.stderr).expect("utf-8");
    assert!(
        stderr.contains("unexpected argument `--nope`") && stderr.contains("usage:"),
        "{stderr}"
    );
}

#[test]
fn module_files_resolve_across_files() {
    let dir = single_package(
        "use std::env;\n#[path = \"weird/name.rs\"]\nmod m;\nmod a;\n",
        "",
    );
    // `#[path]`: super:: reaches lib.rs's `use std::env`.
    write(
        dir.path(),
        "src/weird/name.rs",
        "use super::env as e;\npub fn f() -> bool { e::var(\"X\").is_ok() }\n",
    );
    // A non-mod-rs file's child lives in src/a/b.rs.
    write(dir.path(), "src/a.rs", "mod b;\n");
    write(
        dir.path(),
        "src/a/b.rs",
        "use std::env::*;\n\
         pub fn g() -> bool { super::super::env::var_os(\"Y\").is_some() }\n\
         // A local `r#var` shadows the glob's `var`.\n\
         pub fn r#var(_: &str) {}\npub fn h() { var(\"not std\") }\n",
    );
    let report = lint_workspace(dir.path(), &Options::default()).expect("lint");
    let got: Vec<_> = report
        .findings
        .iter()
        .map(|f| (f.path.as_str(), f.line, f.target.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            ("src/a/b.rs", 2, "std::env::var_os"),
            ("src/weird/name.rs", 2, "std::env::var")
        ]
    );
}

#[test]
fn unreadable_files_are_findings() {
    let dir = single_package("pub fn ok() {}\nmod latin1;\n", "");
    std::fs::write(
        dir.path().join("src/latin1.rs"),
        b"// caf\xe9\npub fn f() {}\n",
    )
    .expect("write");
    let report = lint_workspace(dir.path(), &Options::default()).expect("lint");
    assert_eq!(report.findings.len(), 1, "{:#?}", report.findings);
    assert_eq!(report.findings[0].rule, Rule::ReadError);
    assert_eq!(report.findings[0].path, "src/latin1.rs");
    assert_eq!(report.exit_code(), 1);
}

/// The linter's own sources (and tests) pass the linter with an empty crate
/// allowlist: reading arguments and `env!("CARGO_*")` are fine.
#[test]
fn dogfood_the_linter_passes_itself() {
    let config = Config::new(
        vec![],
        vec!["**/tests/fixtures/**".into()],
        vec!["CARGO_*".into()],
        None,
    )
    .expect("config");
    let report = lint_workspace(
        &PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"),
        &Options::default().config(config),
    )
    .expect("lint");
    assert_eq!(report.packages, ["soma-lint-env"]);
    assert!(report.files_checked >= 10, "{report:?}");
    assert!(report.is_clean(), "{:#?}", report.findings);
}
