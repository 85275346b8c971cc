//! Keeping credentials out of logs and error messages.

/// `url` with its credentials replaced by `***`: a re-export of
/// [`soma_config::redact_url`], the workspace's one credential-stripping
/// URL formatter (soma-config shows redacted URLs in its snapshots, and
/// is the lower crate).
///
/// ```
/// use soma_observability::redact_url;
///
/// assert_eq!(
///     redact_url("postgres://app:hunter2@db:5432/x"),
///     "postgres://***@db:5432/x"
/// );
/// ```
pub use soma_config::redact_url;
