//! Sensitive headers: never printed, never recorded.

use std::fmt;
use std::sync::Arc;

use http::{HeaderMap, HeaderName};

/// The placeholder printed instead of a sensitive value.
pub const REDACTED: &str = "[REDACTED]";

/// Headers that are always sensitive.
pub const DEFAULT_SENSITIVE_HEADERS: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "x-api-key",
];

/// A set of header names whose values must never reach logs or span attributes.
///
/// Always contains [`DEFAULT_SENSITIVE_HEADERS`]; add more with
/// [`with`](Self::with) or from `TelemetryConfig::sensitive_headers`.
///
/// [`mark`](Self::mark) flags matching values with
/// [`HeaderValue::set_sensitive`](http::HeaderValue::set_sensitive), so even a
/// stray `tracing::debug!(headers = ?req.headers())` further down prints
/// `Sensitive` instead of the value; [`redacted`](Self::redacted) gives a
/// printable view of a header map.
#[derive(Clone, Debug)]
pub struct SensitiveHeaders {
    names: Arc<[HeaderName]>,
}

impl Default for SensitiveHeaders {
    fn default() -> Self {
        Self {
            names: DEFAULT_SENSITIVE_HEADERS
                .iter()
                .map(|n| HeaderName::from_static(n))
                .collect(),
        }
    }
}

impl SensitiveHeaders {
    /// The default set plus `extra` (invalid header names are ignored with a warning).
    pub fn new<I, S>(extra: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        extra
            .into_iter()
            .fold(Self::default(), |set, name| set.with(name.as_ref()))
    }

    /// Adds a header name (case-insensitive).
    pub fn with(self, name: &str) -> Self {
        let Ok(name) = HeaderName::try_from(name.to_ascii_lowercase()) else {
            tracing::warn!(header = name, "ignoring invalid sensitive header name");
            return self;
        };
        if self.names.contains(&name) {
            return self;
        }
        let mut names = self.names.to_vec();
        names.push(name);
        Self {
            names: names.into(),
        }
    }

    /// Whether `name` is sensitive.
    pub fn is_sensitive(&self, name: &HeaderName) -> bool {
        self.names.contains(name)
    }

    /// Marks every sensitive value in `headers` as sensitive.
    pub fn mark(&self, headers: &mut HeaderMap) {
        for name in self.names.iter() {
            if let http::header::Entry::Occupied(mut entry) = headers.entry(name) {
                for value in entry.iter_mut() {
                    value.set_sensitive(true);
                }
            }
        }
    }

    /// A `Debug`/`Display` view of `headers` with sensitive values replaced by
    /// [`REDACTED`] (and any value already marked sensitive too).
    pub fn redacted<'a>(&'a self, headers: &'a HeaderMap) -> RedactedHeaders<'a> {
        RedactedHeaders { set: self, headers }
    }

    /// The names in this set.
    pub fn names(&self) -> impl Iterator<Item = &HeaderName> {
        self.names.iter()
    }
}

/// A header map printed with sensitive values redacted. See [`SensitiveHeaders::redacted`].
pub struct RedactedHeaders<'a> {
    set: &'a SensitiveHeaders,
    headers: &'a HeaderMap,
}

impl fmt::Debug for RedactedHeaders<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut map = f.debug_map();
        for (name, value) in self.headers {
            if self.set.is_sensitive(name) || value.is_sensitive() {
                map.entry(&name.as_str(), &REDACTED);
            } else {
                map.entry(&name.as_str(), &String::from_utf8_lossy(value.as_bytes()));
            }
        }
        map.finish()
    }
}

impl fmt::Display for RedactedHeaders<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_defaults_and_configured() {
        let set = SensitiveHeaders::new(["X-Tenant-Token"]);
        let mut h = HeaderMap::new();
        h.insert("authorization", "Bearer abc.def".parse().unwrap());
        h.append("cookie", "sid=1".parse().unwrap());
        h.append("cookie", "sid=2".parse().unwrap());
        h.insert("x-tenant-token", "tt".parse().unwrap());
        h.insert("accept", "text/plain".parse().unwrap());
        let shown = format!("{}", set.redacted(&h));
        for secret in ["abc.def", "sid=1", "sid=2", "\"tt\""] {
            assert!(!shown.contains(secret), "{shown}");
        }
        assert!(shown.contains("text/plain"));
        set.mark(&mut h);
        let debug = format!("{h:?}");
        assert!(
            !debug.contains("abc.def") && !debug.contains("sid=2"),
            "{debug}"
        );
        assert!(debug.contains("text/plain"));
    }
}
