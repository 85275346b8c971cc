//! The environment source: the only place in the SDK that reads the process
//! environment.

use std::collections::BTreeSet;
use std::ffi::OsString;

use figment::value::{Dict, Tag, Value};

use crate::document::Layer;
use crate::error::{ConfigError, Origin};

/// The prefix of every environment variable soma-config reads.
pub const ENV_PREFIX: &str = "SOMA_";

/// The separator between nesting levels in a variable name.
pub const ENV_SEPARATOR: &str = "__";

/// Where environment variables come from.
#[derive(Debug, Clone, Default)]
pub(crate) enum EnvSource {
    /// The process environment, re-read on every load and reload.
    #[default]
    Process,
    /// A fixed set of pairs (tests, or a caller that captured them).
    Fixed(Vec<(OsString, OsString)>),
    /// No environment layer.
    Disabled,
}

impl EnvSource {
    pub(crate) fn pairs(&self) -> Option<Vec<(OsString, OsString)>> {
        match self {
            EnvSource::Process => Some(read_process_env()),
            EnvSource::Fixed(pairs) => Some(pairs.clone()),
            EnvSource::Disabled => None,
        }
    }
}

/// Reads the process environment. This is the one read of the process
/// environment in the whole SDK; `vars_os` never panics on non-UTF-8 names
/// or values (they become [`ConfigError::NonUtf8Env`] below).
#[allow(clippy::disallowed_methods)]
fn read_process_env() -> Vec<(OsString, OsString)> {
    std::env::vars_os().collect()
}

/// The key path a variable name maps to: `SOMA_BUS__BOOTSTRAP_SERVERS` ->
/// `bus.bootstrap_servers`. `None` when the name lacks the prefix.
pub fn env_var_to_key(name: &str) -> Option<String> {
    let rest = name.strip_prefix(ENV_PREFIX)?;
    Some(
        rest.split(ENV_SEPARATOR)
            .map(|s| s.to_ascii_lowercase())
            .collect::<Vec<_>>()
            .join("."),
    )
}

/// The variable name for a dotted key path: `bus.bootstrap_servers` ->
/// `SOMA_BUS__BOOTSTRAP_SERVERS`.
pub fn key_to_env_var(key: &str) -> String {
    format!(
        "{ENV_PREFIX}{}",
        key.split('.')
            .map(|s| s.to_ascii_uppercase())
            .collect::<Vec<_>>()
            .join(ENV_SEPARATOR)
    )
}

/// Builds the environment layer from `pairs`.
///
/// Only variables whose first segment names a top-level key of the settings
/// type (`sections`) are read, so unrelated `SOMA_*` variables (a test
/// harness's `SOMA_TEST_REDIS_URL`) are left alone. Values are parsed the way
/// figment parses environment values: `8` is a number, `true` a boolean,
/// `[a, b]` an array, `"8"` (quoted) a string.
pub(crate) fn env_layer(
    pairs: Vec<(OsString, OsString)>,
    sections: &BTreeSet<String>,
) -> Result<Layer, ConfigError> {
    let mut layer = Layer::new(Origin::Env { var: String::new() }, Dict::new());
    let mut sorted: Vec<(String, OsString)> = Vec::new();
    for (name, value) in pairs {
        let name = match name.into_string() {
            Ok(n) => n,
            Err(raw) => {
                let lossy = raw.to_string_lossy().into_owned();
                if lossy.starts_with(ENV_PREFIX) {
                    let key = env_var_to_key(&lossy).unwrap_or_default();
                    if sections.contains(key.split('.').next().unwrap_or_default()) {
                        return Err(ConfigError::NonUtf8Env { var: lossy, key });
                    }
                }
                continue;
            }
        };
        let Some(key) = env_var_to_key(&name) else {
            continue;
        };
        let top = key.split('.').next().unwrap_or_default();
        if !sections.contains(top) {
            tracing::trace!(var = %name, "ignoring SOMA_ variable outside the settings' sections");
            continue;
        }
        sorted.push((name, value));
    }
    // Deterministic: shorter (outer) keys first, then by name.
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, value) in sorted {
        let key = env_var_to_key(&name).unwrap_or_default();
        let segments: Vec<String> = key.split('.').map(str::to_owned).collect();
        if segments.iter().any(String::is_empty) {
            return Err(ConfigError::Parse {
                origin: Origin::Env { var: name },
                key: Some(key),
                message: format!("empty key segment: use `{ENV_SEPARATOR}` only between names"),
            });
        }
        let Some(text) = value.to_str() else {
            return Err(ConfigError::NonUtf8Env { var: name, key });
        };
        let parsed = parse_value(text);
        insert(&mut layer.dict, &segments, parsed).map_err(|message| ConfigError::Parse {
            origin: Origin::Env { var: name.clone() },
            key: Some(key.clone()),
            message,
        })?;
        layer.env_vars.insert(key, name);
    }
    Ok(layer)
}

/// An environment value as a typed value (`16` → integer, `true` → bool,
/// `[1, 2]` → array), or the text itself when it does not parse.
///
/// figment 0.10's escape handling indexes a string by character count as
/// if it were a byte offset, and panics on a backslash that follows a
/// non-ASCII character inside a quoted value (found by the
/// `config_document` fuzz target). Such a value is taken as plain text,
/// never handed to that parser: a service must not crash on its
/// environment.
fn parse_value(text: &str) -> Value {
    if text.contains('\\') && !text.is_ascii() {
        return Value::from(text.to_owned());
    }
    text.trim()
        .parse()
        .unwrap_or_else(|_| Value::from(text.to_owned()))
}

fn insert(dict: &mut Dict, segments: &[String], value: Value) -> Result<(), String> {
    let (last, parents) = segments.split_last().expect("at least one segment");
    let mut node = dict;
    for seg in parents {
        let entry = node
            .entry(seg.clone())
            .or_insert_with(|| Value::Dict(Tag::Default, Dict::new()));
        match entry {
            Value::Dict(_, inner) => node = inner,
            _ => {
                return Err(format!(
                    "`{seg}` is set by another variable as a value, not a table"
                ));
            }
        }
    }
    if matches!(node.get(last), Some(Value::Dict(..))) {
        return Err(format!(
            "`{last}` is a table set by other variables; it cannot also be a value"
        ));
    }
    node.insert(last.clone(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sections(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn naming_rule_round_trips() {
        assert_eq!(
            env_var_to_key("SOMA_BUS__BOOTSTRAP_SERVERS").unwrap(),
            "bus.bootstrap_servers"
        );
        assert_eq!(
            key_to_env_var("bus.bootstrap_servers"),
            "SOMA_BUS__BOOTSTRAP_SERVERS"
        );
        assert_eq!(env_var_to_key("HOME"), None);
    }

    #[test]
    fn a_backslash_after_non_ascii_text_is_plain_text_not_a_panic() {
        // figment's escape parser panics on these (a char index used as a
        // byte index); they must load as the text they are.
        for text in [r#""é\n""#, r#"["ü\t"]"#, "é\\", r#"{ a = "x\u0041" } é"#] {
            let pairs = vec![("SOMA_REDIS__URL".into(), text.into())];
            let layer = env_layer(pairs, &sections(&["redis"])).unwrap();
            let json = crate::document::dict_to_json(&layer.dict);
            assert_eq!(json["redis"]["url"], text, "{text}");
        }
        // ASCII escapes still parse as before.
        let pairs = vec![("SOMA_REDIS__URL".into(), r#""a\tb""#.into())];
        let layer = env_layer(pairs, &sections(&["redis"])).unwrap();
        let json = crate::document::dict_to_json(&layer.dict);
        assert_eq!(json["redis"]["url"], "a\tb");
    }

    #[test]
    fn builds_nested_typed_values_and_skips_foreign_variables() {
        let pairs = vec![
            ("SOMA_REDIS__POOL_SIZE".into(), "16".into()),
            ("SOMA_REDIS__URL".into(), "redis://x".into()),
            ("SOMA_TEST_REDIS_URL".into(), "redis://other".into()),
            ("PATH".into(), "/bin".into()),
        ];
        let layer = env_layer(pairs, &sections(&["redis"])).unwrap();
        let json = crate::document::dict_to_json(&layer.dict);
        assert_eq!(
            json,
            serde_json::json!({"redis": {"pool_size": 16, "url": "redis://x"}})
        );
        assert_eq!(layer.env_vars["redis.pool_size"], "SOMA_REDIS__POOL_SIZE");
    }

    #[test]
    fn conflicting_and_empty_segments_are_errors() {
        let pairs = vec![
            ("SOMA_REDIS".into(), "1".into()),
            ("SOMA_REDIS__URL".into(), "x".into()),
        ];
        let err = env_layer(pairs, &sections(&["redis"])).unwrap_err();
        assert!(err.is_parse(), "{err}");
        let pairs = vec![("SOMA_REDIS____URL".into(), "x".into())];
        let err = env_layer(pairs, &sections(&["redis"])).unwrap_err();
        assert_eq!(
            err.origin(),
            Some(Origin::Env {
                var: "SOMA_REDIS____URL".into()
            })
        );
    }

    #[cfg(unix)]
    #[test]
    fn non_utf8_value_is_a_typed_error_naming_the_variable() {
        use std::os::unix::ffi::OsStringExt;
        let pairs = vec![(
            "SOMA_REDIS__URL".into(),
            OsString::from_vec(vec![0x66, 0xff, 0x6f]),
        )];
        let err = env_layer(pairs, &sections(&["redis"])).unwrap_err();
        assert!(err.is_non_utf8_env());
        assert_eq!(err.key(), Some("redis.url"));
        assert!(err.to_string().contains("SOMA_REDIS__URL"));
    }
}
