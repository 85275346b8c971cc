//! [`Secret`]: a string setting that never prints.

use std::fmt;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The text every redacted secret is shown as, in `Debug`, `Display`,
/// serialization and [`snapshot`](crate) output.
pub const REDACTED: &str = "[REDACTED]";

/// A secret setting (password, token, API key).
///
/// Built on [`secrecy::SecretString`]: the value is zeroized on drop and only
/// [`Secret::expose_secret`] reveals it. `Debug`, `Display` and `Serialize`
/// all print [`REDACTED`], so a config struct holding a `Secret` can be
/// logged, serialized into a snapshot or put into a span without leaking it.
/// It deserializes from a plain string, so TOML files and `SOMA_*`
/// environment variables can supply it.
///
/// ```
/// use soma_config::Secret;
/// let s = Secret::new("hunter2");
/// assert_eq!(format!("{s:?}"), "[REDACTED]");
/// assert_eq!(s.expose_secret(), "hunter2");
/// ```
#[derive(Clone, Default)]
pub struct Secret(SecretString);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(SecretString::from(value.into()))
    }

    /// The secret value. Call it only where the value is used (a connection
    /// string, an `Authorization` header), never to log it.
    pub fn expose_secret(&self) -> &str {
        self.0.expose_secret()
    }

    /// `true` when the secret is the empty string (not configured).
    pub fn is_empty(&self) -> bool {
        self.0.expose_secret().is_empty()
    }
}

impl ExposeSecret<str> for Secret {
    fn expose_secret(&self) -> &str {
        self.0.expose_secret()
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Self::new(value)
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Self::new(value)
    }
}

impl PartialEq for Secret {
    /// Constant-time comparison, so comparing secrets does not leak them
    /// through timing.
    fn eq(&self, other: &Self) -> bool {
        let (a, b) = (
            self.expose_secret().as_bytes(),
            other.expose_secret().as_bytes(),
        );
        if a.len() != b.len() {
            return false;
        }
        a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

impl Eq for Secret {}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(REDACTED)
    }
}

impl<'de> Deserialize<'de> for Secret {
    /// From a string; an integer is accepted too and kept as its decimal
    /// text, because `SOMA_*` values that look like numbers (a numeric PIN
    /// or token) arrive as numbers.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Secret;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a secret string")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Secret, E> {
                Ok(Secret::new(v))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Secret, E> {
                Ok(Secret::new(v))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Secret, E> {
                Ok(Secret::new(v.to_string()))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Secret, E> {
                Ok(Secret::new(v.to_string()))
            }
        }
        deserializer.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_prints_the_value() {
        let s = Secret::new("hunter2");
        assert!(!format!("{s:?} {s}").contains("hunter2"));
        assert_eq!(
            serde_json::to_string(&s).unwrap(),
            format!("\"{REDACTED}\"")
        );
    }

    #[test]
    fn deserializes_from_a_string_and_compares() {
        let s: Secret = serde_json::from_str("\"abc\"").unwrap();
        assert_eq!(s.expose_secret(), "abc");
        assert_eq!(s, Secret::new("abc"));
        assert_ne!(s, Secret::new("abd"));
        assert_ne!(s, Secret::new("abcd"));
        assert!(Secret::default().is_empty());
    }
}
