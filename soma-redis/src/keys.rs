//! Key naming and lifetimes: [`KeySpace`] and [`Ttl`].

use std::time::Duration;

use crate::RedisError;

/// How long a key lives. Every write in this crate takes one; there is no
/// default, so "this key never expires" is always a visible decision in code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ttl {
    /// Expire after this long (millisecond precision, must be ≥ 1 ms).
    After(Duration),
    /// Never expire. Use only for data with its own cleanup (and say which
    /// in a comment next to the call).
    NoExpiry,
}

impl Ttl {
    /// Expire after `secs` seconds.
    pub const fn secs(secs: u64) -> Self {
        Self::After(Duration::from_secs(secs))
    }

    /// Expire after `ms` milliseconds.
    pub const fn millis(ms: u64) -> Self {
        Self::After(Duration::from_millis(ms))
    }

    /// The TTL in whole milliseconds, or `None` for [`Ttl::NoExpiry`].
    /// Errors on a TTL below 1 ms, which Redis would reject or round to "no TTL".
    pub(crate) fn as_millis(self) -> Result<Option<i64>, RedisError> {
        match self {
            Self::NoExpiry => Ok(None),
            Self::After(d) => {
                let ms = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
                if ms < 1 {
                    Err(RedisError::invalid("ttl must be at least 1 ms"))
                } else {
                    Ok(Some(ms))
                }
            }
        }
    }
}

/// Builds every key this crate touches:
/// `{key_prefix}soma:{tenant}:{kind}:{id}`.
///
/// * `key_prefix` comes from [`RedisConfig::key_prefix`](crate::RedisConfig::key_prefix)
///   (an environment such as `"prod:"`, or a unique per-test prefix); empty by default.
/// * `tenant` owns the data (`"acme"`, or `"_"` for platform-wide keys).
/// * `kind` names the helper and use: `cache.session`, `rl`, `idem`, `lease`,
///   `ch` (pub/sub channel).
/// * `id` is free-form (it may contain `:`).
///
/// `tenant` and `kind` must be non-empty and free of `:`, `{`, `}`, spaces
/// and control characters, so one tenant can never name another tenant's
/// keys, and `SCAN MATCH {prefix}soma:acme:*` finds exactly one tenant's data.
///
/// ```
/// use soma_redis::KeySpace;
/// let ks = KeySpace::new("prod:");
/// assert_eq!(ks.key("acme", "cache.user", "42").unwrap(), "prod:soma:acme:cache.user:42");
/// assert!(ks.key("ac:me", "cache.user", "42").is_err());
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeySpace {
    prefix: String,
}

impl KeySpace {
    /// A key space with the given prefix (may be empty).
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    /// The configured prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `{prefix}soma:{tenant}:{kind}:{id}`, after validating `tenant` and `kind`.
    pub fn key(&self, tenant: &str, kind: &str, id: &str) -> Result<String, RedisError> {
        validate_part("tenant", tenant)?;
        validate_part("kind", kind)?;
        let mut k =
            String::with_capacity(self.prefix.len() + tenant.len() + kind.len() + id.len() + 8);
        k.push_str(&self.prefix);
        k.push_str("soma:");
        k.push_str(tenant);
        k.push(':');
        k.push_str(kind);
        k.push(':');
        k.push_str(id);
        Ok(k)
    }

    /// The pattern matching all keys of one tenant, for `SCAN MATCH`.
    pub fn tenant_pattern(&self, tenant: &str) -> Result<String, RedisError> {
        validate_part("tenant", tenant)?;
        Ok(format!("{}soma:{}:*", self.prefix, tenant))
    }
}

pub(crate) fn validate_part(what: &str, value: &str) -> Result<(), RedisError> {
    if value.is_empty() {
        return Err(RedisError::invalid(format!("{what} must not be empty")));
    }
    if value.len() > 128 {
        return Err(RedisError::invalid(format!("{what} longer than 128 bytes")));
    }
    if value.bytes().any(|b| {
        matches!(b, b':' | b'{' | b'}' | b' ' | b'*' | b'?' | b'[' | b']') || b.is_ascii_control()
    }) {
        return Err(RedisError::invalid(format!(
            "{what} {value:?} contains a reserved character"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_layout_and_validation() {
        let ks = KeySpace::new("t1:");
        assert_eq!(
            ks.key("acme", "rl", "GET /x:y").unwrap(),
            "t1:soma:acme:rl:GET /x:y"
        );
        assert!(ks.key("", "rl", "x").unwrap_err().is_invalid());
        assert!(ks.key("a b", "rl", "x").is_err());
        assert!(ks.key("acme", "r:l", "x").is_err());
        assert!(ks.key("acme", "{rl}", "x").is_err());
        assert_eq!(ks.tenant_pattern("acme").unwrap(), "t1:soma:acme:*");
    }

    #[test]
    fn ttl_validation() {
        assert_eq!(Ttl::secs(2).as_millis().unwrap(), Some(2000));
        assert_eq!(Ttl::NoExpiry.as_millis().unwrap(), None);
        assert!(Ttl::After(Duration::from_micros(10)).as_millis().is_err());
    }
}
