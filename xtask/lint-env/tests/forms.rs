//! Fixture tests for every form the linter recognizes, in both directions.
//!
//! Each `tests/fixtures/forms/*.rs` file marks the lines that must be
//! reported with `//~ rule target` (several per line allowed). A file
//! without marks must produce no finding at all. Because the marks are
//! comments that mention `std::env::var`, every fixture also checks that
//! comments are not reported.

use std::collections::BTreeSet;
use std::path::PathBuf;

use soma_lint_env::{Config, Rule, lint_source};

fn fixture(name: &str) -> (String, String) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/forms")
        .join(format!("{name}.rs"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (format!("forms/{name}.rs"), text)
}

/// (line, rule, target) expected from the `//~` marks.
fn expected(text: &str) -> BTreeSet<(usize, String, String)> {
    let mut out = BTreeSet::new();
    for (i, line) in text.lines().enumerate() {
        for mark in line.split("//~").skip(1) {
            let mut parts = mark.trim().splitn(2, ' ');
            let rule = parts.next().unwrap_or_default().to_string();
            let target = parts.next().unwrap_or_default().trim().to_string();
            out.insert((i + 1, rule, target));
        }
    }
    out
}

fn check(name: &str) {
    let (shown, text) = fixture(name);
    let want = expected(&text);
    if name.starts_with("clean_") {
        assert!(want.is_empty(), "{name}: clean fixtures carry no marks");
    } else {
        assert!(!want.is_empty(), "{name}: flag fixtures need marks");
    }
    let findings = lint_source(&shown, &text, &Config::default());
    let got: BTreeSet<(usize, String, String)> = findings
        .iter()
        .map(|f| (f.line, f.rule.to_string(), f.target.clone()))
        .collect();
    let missing: Vec<_> = want.difference(&got).collect();
    let extra: Vec<_> = findings
        .iter()
        .filter(|f| !want.contains(&(f.line, f.rule.to_string(), f.target.clone())))
        .map(|f| f.to_string())
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{name}:\n  missing (line, rule, target): {missing:#?}\n  unexpected: {extra:#?}"
    );
    assert_eq!(findings.len(), got.len(), "{name}: one finding per mark");
    for f in &findings {
        assert_eq!(f.path, shown);
        assert!(f.column >= 1);
        assert!(
            f.message.contains(&format!(
                "`{}",
                f.target.split('(').next().unwrap_or_default()
            )) || f.message.contains(&f.target),
            "message names the call: {f}"
        );
    }
}

macro_rules! fixtures {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                check(stringify!($name));
            }
        )*

        #[test]
        fn every_fixture_file_has_a_test() {
            let listed: BTreeSet<&str> = [$(stringify!($name)),*].into_iter().collect();
            let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/forms");
            for entry in std::fs::read_dir(&dir).expect("fixture dir") {
                let name = entry.expect("entry").file_name().to_string_lossy().into_owned();
                let stem = name.trim_end_matches(".rs");
                assert!(
                    listed.contains(stem) || stem == "broken_parse",
                    "fixture {name} is not listed in tests/forms.rs"
                );
            }
        }
    };
}

fixtures! {
    flag_absolute_paths,
    flag_use_forms,
    flag_function_values,
    flag_closures,
    flag_nested_modules,
    flag_blocks,
    flag_macro_args,
    flag_env_macros,
    flag_dotenv,
    clean_methods,
    clean_free_functions,
    clean_local_env_module,
    clean_text,
    clean_locals,
    clean_env_macros,
}

#[test]
fn a_file_that_does_not_parse_is_a_finding() {
    let (shown, text) = fixture("broken_parse");
    let findings = lint_source(&shown, &text, &Config::default());
    assert_eq!(findings.len(), 1, "{findings:?}");
    assert_eq!(findings[0].rule, Rule::ParseError);
    assert_eq!(findings[0].line, 1);
    assert!(
        findings[0].message.contains("does not parse"),
        "{}",
        findings[0]
    );
}

#[test]
fn positions_are_one_based_and_point_at_the_path() {
    let src = "fn f() {\n    let _ = ::std::env::var(\"A\");\n    let _ = env!(\"HOME\");\n}\n";
    let findings = lint_source("x.rs", src, &Config::default());
    let pos: Vec<_> = findings
        .iter()
        .map(|f| (f.line, f.column, f.rule))
        .collect();
    assert_eq!(pos, vec![(2, 13, Rule::EnvRead), (3, 13, Rule::EnvMacro)]);
    assert_eq!(
        findings[0].to_string(),
        format!("x.rs:2:13: error[env-read]: {}", findings[0].message)
    );
    assert!(
        findings[0]
            .message
            .starts_with("`::std::env::var(..)` reads the process environment"),
        "{}",
        findings[0]
    );
    let aliased = lint_source(
        "y.rs",
        "use std::env::var as get;\nfn f() { let _ = get(\"A\"); }",
        &Config::default(),
    );
    assert!(
        aliased[0]
            .message
            .starts_with("`get(..)` (`std::env::var`) reads"),
        "{}",
        aliased[0]
    );
    let value = lint_source(
        "z.rs",
        "fn f() { let _ = [\"A\"].map(std::env::var); }",
        &Config::default(),
    );
    assert!(
        value[0].message.contains("passed as a function value"),
        "{}",
        value[0]
    );
}

#[test]
fn env_macro_allowlist_is_configurable() {
    let src = "const A: &str = env!(\"BUILD_ID\");\nconst B: &str = env!(\"CARGO_PKG_NAME\");\n";
    let default = lint_source("x.rs", src, &Config::default());
    assert_eq!(default.len(), 1);
    assert_eq!(default[0].target, "env!(\"BUILD_ID\")");

    let custom = Config::new(vec![], vec![], vec!["BUILD_*".into()], None).expect("config");
    let findings = lint_source("x.rs", src, &custom);
    assert_eq!(findings.len(), 1);
    assert_eq!(findings[0].target, "env!(\"CARGO_PKG_NAME\")");
    assert!(findings[0].message.contains("BUILD_*"), "{}", findings[0]);
}

#[test]
fn the_hint_names_the_alternative() {
    let config = Config::new(
        vec![],
        vec![],
        vec![],
        Some("read it through soma-config".into()),
    )
    .expect("config");
    let findings = lint_source("x.rs", "fn f() { let _ = std::env::var(\"A\"); }", &config);
    assert_eq!(findings.len(), 1);
    assert!(
        findings[0].message.ends_with("read it through soma-config"),
        "{}",
        findings[0]
    );
}
