//! Keeping credentials out of what a service shows: [`redact_url`] for
//! connection URLs, and the snapshot redaction of [`Live::snapshot`](crate::Live::snapshot).

/// Key-name fragments whose values are redacted in snapshots even when the
/// settings type forgot to use [`Secret`](crate::Secret). A URL query
/// parameter with such a name is redacted by [`redact_url`] too.
const SECRET_NAMES: &[&str] = &[
    "password",
    "passwd",
    "secret",
    "token",
    "api_key",
    "apikey",
    "credential",
    "private_key",
];

fn looks_secret(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    SECRET_NAMES.iter().any(|n| lower.contains(n))
}

/// `url` with its credentials replaced by `***`, for logs, errors, `Debug`
/// output and configuration snapshots:
///
/// - the user information (everything between `://` and the last `@`):
///   `redis://user:pw@host:6379/0` → `redis://***@host:6379/0` (the user
///   name goes too: some services take a token in its place);
/// - the value of every query parameter whose name looks secret
///   (`password`, `token`, `secret`, `api_key`, …):
///   `postgres://db/x?sslmode=require&password=pw` →
///   `postgres://db/x?sslmode=require&password=***`.
///
/// A URL without credentials (or without `://`) is returned as it is.
///
/// ```
/// use soma_config::redact_url;
///
/// assert_eq!(
///     redact_url("postgres://app:hunter2@db:5432/x"),
///     "postgres://***@db:5432/x"
/// );
/// assert_eq!(
///     redact_url("postgres://db/x?password=hunter2&sslmode=require"),
///     "postgres://db/x?password=***&sslmode=require"
/// );
/// assert_eq!(redact_url("redis://host:6379"), "redis://host:6379");
/// ```
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let rest = match rest.rsplit_once('@') {
        Some((_, host)) => format!("***@{host}"),
        None => rest.to_owned(),
    };
    let rest = match rest.split_once('?') {
        Some((path, query)) => {
            let (query, fragment) = match query.split_once('#') {
                Some((q, f)) => (q, Some(f)),
                None => (query, None),
            };
            let query: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((name, _)) if looks_secret(name) => format!("{name}=***"),
                    _ => pair.to_owned(),
                })
                .collect();
            let mut out = format!("{path}?{}", query.join("&"));
            if let Some(f) = fragment {
                out.push('#');
                out.push_str(f);
            }
            out
        }
        None => rest,
    };
    format!("{scheme}://{rest}")
}

/// Redacts a settings document for display: every string or number under
/// a secret-looking key becomes [`REDACTED`](crate::REDACTED), and every
/// other string that is a URL loses its credentials ([`redact_url`]).
pub(crate) fn redact(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                if looks_secret(k) && !(v.is_object() || v.is_null() || v.is_array()) {
                    *v = serde_json::Value::String(crate::REDACTED.into());
                } else if looks_secret(k) && v.is_array() {
                    // A list of secrets (several keys, rotation).
                    redact_all(v);
                } else {
                    redact(v);
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(redact),
        serde_json::Value::String(s) if s.contains("://") => *s = redact_url(s),
        _ => {}
    }
}

/// Every scalar under `value` redacted (objects keep their shape).
fn redact_all(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => map.values_mut().for_each(redact_all),
        serde_json::Value::Array(items) => items.iter_mut().for_each(redact_all),
        serde_json::Value::Null => {}
        v => *v = serde_json::Value::String(crate::REDACTED.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn credentials_never_survive() {
        for (url, shown) in [
            ("redis://user:pw@host:6379/0", "redis://***@host:6379/0"),
            ("redis://:pw@host", "redis://***@host"),
            ("redis://token@host", "redis://***@host"),
            ("postgres://app:p@ss@db/x", "postgres://***@db/x"),
            ("redis://host:6379", "redis://host:6379"),
            ("not a url", "not a url"),
            (
                "postgres://db/x?user=a&password=pw#frag",
                "postgres://db/x?user=a&password=***#frag",
            ),
            (
                "https://h/p?access_token=t&x=1",
                "https://h/p?access_token=***&x=1",
            ),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }

    #[test]
    fn redaction_by_key_name_and_inside_urls() {
        let mut v = json!({
            "db": {"password": "p", "pool": 3, "url": "postgres://u:pw@h/db"},
            "api_token": 1234,
            "list": [{"secret": "s"}],
            "tokens": ["a", "b"],
            "endpoints": ["http://x:y@h"],
        });
        redact(&mut v);
        assert_eq!(
            v,
            json!({
                "db": {"password": "[REDACTED]", "pool": 3, "url": "postgres://***@h/db"},
                "api_token": "[REDACTED]",
                "list": [{"secret": "[REDACTED]"}],
                "tokens": ["[REDACTED]", "[REDACTED]"],
                "endpoints": ["http://***@h"],
            })
        );
    }
}
