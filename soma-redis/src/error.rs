//! [`RedisError`]: every failure of this crate, classified.

use fred::error::{Error as FredError, ErrorKind};

/// An error from [`RedisClient`](crate::RedisClient) or one of the helpers.
///
/// Branch on the predicates, not on the message:
///
/// * [`is_connection`](Self::is_connection): Redis is unreachable or the
///   connection broke. While the server is down every call returns this at
///   once (no queueing), so a caller can fall back in microseconds.
/// * [`is_timeout`](Self::is_timeout): the command was sent but no reply came
///   within `command_timeout_ms`. The command may or may not have run.
/// * [`is_retryable`](Self::is_retryable): trying the same call again later
///   may succeed (connection, timeout, busy/loading server).
///
/// The message never contains a password: fred's errors do not echo
/// credentials and this crate never formats its configuration into errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RedisError {
    /// The connection is down or broke while the command was in flight.
    #[error("redis unavailable: {0}")]
    Connection(String),
    /// No reply within the command timeout.
    #[error("redis command timed out: {0}")]
    Timeout(String),
    /// The server rejected the command (`WRONGTYPE`, `NOSCRIPT`, script error, OOM...).
    #[error("redis server error: {0}")]
    Server(String),
    /// Authentication or ACL permission failure. Not retryable.
    #[error("redis authentication failed: {0}")]
    Auth(String),
    /// Invalid configuration (bad URL, zero pool size, missing TLS support...).
    #[error("invalid redis configuration: {0}")]
    Config(String),
    /// An invalid argument from the caller: an empty tenant, a `:` in a key
    /// part, a zero TTL.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A stored value could not be decoded (JSON or an unexpected reply type).
    #[error("cannot decode redis value: {0}")]
    Decode(String),
    /// A value could not be encoded to JSON.
    #[error("cannot encode value: {0}")]
    Encode(String),
    /// A lease or idempotency claim is no longer owned by this caller (it
    /// expired or someone else holds it).
    #[error("ownership lost: {0}")]
    NotOwner(String),
}

impl RedisError {
    /// `true` when Redis could not be reached or the connection broke.
    pub fn is_connection(&self) -> bool {
        matches!(self, Self::Connection(_))
    }

    /// `true` when the command got no reply in time.
    pub fn is_timeout(&self) -> bool {
        matches!(self, Self::Timeout(_))
    }

    /// `true` when the same call may succeed later. Whether it is *safe* to
    /// repeat depends on the command: a timed-out `INCR` may have run.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Connection(_) | Self::Timeout(_) => true,
            Self::Server(msg) => {
                msg.starts_with("LOADING")
                    || msg.starts_with("BUSY")
                    || msg.starts_with("TRYAGAIN")
                    || msg.starts_with("MASTERDOWN")
                    || msg.starts_with("CLUSTERDOWN")
            }
            _ => false,
        }
    }

    /// `true` for configuration and argument errors: fix the call, do not retry.
    pub fn is_invalid(&self) -> bool {
        matches!(self, Self::Config(_) | Self::InvalidArgument(_))
    }

    /// `true` when a lease or claim was lost.
    pub fn is_not_owner(&self) -> bool {
        matches!(self, Self::NotOwner(_))
    }

    /// A short, bounded label for metrics.
    pub(crate) fn kind_label(&self) -> &'static str {
        match self {
            Self::Connection(_) => "connection",
            Self::Timeout(_) => "timeout",
            Self::Server(_) => "server",
            Self::Auth(_) => "auth",
            Self::Config(_) => "config",
            Self::InvalidArgument(_) => "invalid_argument",
            Self::Decode(_) => "decode",
            Self::Encode(_) => "encode",
            Self::NotOwner(_) => "not_owner",
        }
    }

    /// A RESP error reply (`-ERR ...`) for one command.
    pub(crate) fn from_server_reply(msg: &str) -> Self {
        if msg.starts_with("NOAUTH") || msg.starts_with("WRONGPASS") || msg.starts_with("NOPERM") {
            Self::Auth(msg.to_owned())
        } else {
            Self::Server(msg.to_owned())
        }
    }

    pub(crate) fn invalid(msg: impl Into<String>) -> Self {
        Self::InvalidArgument(msg.into())
    }
}

impl From<FredError> for RedisError {
    fn from(e: FredError) -> Self {
        let details = e.details().to_owned();
        match e.kind() {
            ErrorKind::Timeout => Self::Timeout(details),
            // fred reports a fail-fast rejection and an in-flight connection
            // loss as `Canceled`.
            ErrorKind::IO | ErrorKind::Canceled | ErrorKind::Routing | ErrorKind::Backpressure => {
                Self::Connection(details)
            }
            ErrorKind::Sentinel | ErrorKind::Cluster if looks_like_connection(&details) => {
                Self::Connection(details)
            }
            ErrorKind::Auth => Self::Auth(details),
            ErrorKind::Config | ErrorKind::Url => Self::Config(details),
            ErrorKind::Tls => Self::Connection(details),
            ErrorKind::InvalidArgument => Self::InvalidArgument(details),
            ErrorKind::Parse | ErrorKind::Protocol => Self::Decode(details),
            ErrorKind::Unknown if looks_like_connection(&details) => Self::Connection(details),
            _ if details.starts_with("NOAUTH")
                || details.starts_with("WRONGPASS")
                || details.starts_with("NOPERM") =>
            {
                Self::Auth(details)
            }
            _ => Self::Server(details),
        }
    }
}

fn looks_like_connection(details: &str) -> bool {
    let d = details.to_ascii_lowercase();
    d.contains("connection")
        || d.contains("not initialized")
        || d.contains("router")
        // fred, when no connection is up to take the command (it also
        // schedules a reconnect): `Unknown` "Failed to route command."
        || d.contains("failed to route")
        || d.contains("closed")
}

impl From<serde_json::Error> for RedisError {
    fn from(e: serde_json::Error) -> Self {
        Self::Decode(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_fred_errors() {
        let e: RedisError =
            FredError::new(ErrorKind::Canceled, "Connection closed unexpectedly.").into();
        assert!(e.is_connection() && e.is_retryable() && !e.is_timeout());
        let e: RedisError = FredError::new(ErrorKind::Unknown, "Failed to route command.").into();
        assert!(e.is_connection() && e.is_retryable(), "{e:?}");
        let e: RedisError = FredError::new(ErrorKind::Timeout, "Request timed out.").into();
        assert!(e.is_timeout() && e.is_retryable() && !e.is_connection());
        let e: RedisError =
            FredError::new(ErrorKind::Unknown, "WRONGTYPE Operation against a key").into();
        assert!(matches!(e, RedisError::Server(_)) && !e.is_retryable());
        let e: RedisError = FredError::new(ErrorKind::Unknown, "LOADING Redis is loading").into();
        assert!(e.is_retryable() && !e.is_connection());
        let e: RedisError =
            FredError::new(ErrorKind::Auth, "WRONGPASS invalid username-password pair").into();
        assert!(matches!(e, RedisError::Auth(_)) && !e.is_retryable());
        let e: RedisError = FredError::new(ErrorKind::Url, "Invalid scheme").into();
        assert!(e.is_invalid());
    }
}
