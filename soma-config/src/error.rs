//! [`ConfigError`]: every way loading, reloading or applying config can fail,
//! each naming the source and the key path.

use std::fmt;
use std::path::PathBuf;

use crate::deployment::DeploymentProfile;

/// Where a setting (or a bad input) came from.
///
/// Layers, lowest precedence first: [`Origin::Default`] <
/// [`Origin::Profile`] < [`Origin::File`] < [`Origin::Env`] <
/// [`Origin::Update`] < [`Origin::Override`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Origin {
    /// The settings type's `Default` value.
    Default,
    /// A deployment profile's sizing preset.
    Profile(DeploymentProfile),
    /// A TOML file.
    File(PathBuf),
    /// A `SOMA_*` environment variable.
    Env {
        /// The variable's name, e.g. `SOMA_BUS__BOOTSTRAP_SERVERS`.
        var: String,
    },
    /// A remote update applied with [`Live::apply`](crate::Live::apply).
    Update {
        /// The update's version.
        version: u64,
    },
    /// A programmatic override ([`Loader::set`](crate::Loader::set)).
    Override,
    /// The feature-flag registry (flag names and descriptors).
    Flags,
}

impl Origin {
    /// The layer kind as a short word: `default`, `profile`, `file`, `env`,
    /// `update`, `override` or `flags`. Used in [`snapshot`](crate::Live::snapshot).
    pub fn kind(&self) -> &'static str {
        match self {
            Origin::Default => "default",
            Origin::Profile(_) => "profile",
            Origin::File(_) => "file",
            Origin::Env { .. } => "env",
            Origin::Update { .. } => "update",
            Origin::Override => "override",
            Origin::Flags => "flags",
        }
    }

    /// The detail beyond the kind: the file path, the variable name, the
    /// update version or the profile name.
    pub fn detail(&self) -> Option<String> {
        match self {
            Origin::Profile(p) => Some(p.as_str().to_owned()),
            Origin::File(p) => Some(p.display().to_string()),
            Origin::Env { var } => Some(var.clone()),
            Origin::Update { version } => Some(version.to_string()),
            Origin::Default | Origin::Override | Origin::Flags => None,
        }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Default => f.write_str("defaults"),
            Origin::Profile(p) => write!(f, "profile preset `{}`", p.as_str()),
            Origin::File(p) => write!(f, "file `{}`", p.display()),
            Origin::Env { var } => write!(f, "environment variable `{var}`"),
            Origin::Update { version } => write!(f, "update version {version}"),
            Origin::Override => f.write_str("programmatic override"),
            Origin::Flags => f.write_str("feature flags"),
        }
    }
}

/// One failed validation rule: the key path it is about and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Dotted key path, e.g. `redis.pool_size`.
    pub key: String,
    /// What is wrong, for an operator.
    pub message: String,
    /// The layer the offending value came from (filled in by the loader).
    pub origin: Origin,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}` from {}: {}", self.key, self.origin, self.message)
    }
}

/// Every error of this crate. Each variant names where the bad input came
/// from ([`ConfigError::origin`]) and, when it is about one setting, the
/// dotted key path ([`ConfigError::key`]). Branch with the `is_*`
/// predicates rather than on the message text.
///
/// A [`Live`](crate::Live) that gets any of these from a reload, a file
/// watch or an update keeps serving its last good value.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A source could not be parsed (malformed TOML, an update document
    /// that is not an object, an environment variable name that maps to no
    /// key).
    #[error("cannot parse {origin}{}: {message}", key_suffix(key))]
    Parse {
        /// Where the input came from.
        origin: Origin,
        /// The key path, when known.
        key: Option<String>,
        /// The parser's message (line and column for TOML).
        message: String,
    },
    /// A value has the wrong type or an invalid value for its key.
    #[error("invalid value for `{key}` from {origin}: {message}")]
    InvalidValue {
        /// Where the value came from.
        origin: Origin,
        /// The key path.
        key: String,
        /// What was expected and what was found.
        message: String,
    },
    /// Strict mode: a key no setting has (usually a typo).
    #[error("unknown key `{key}` from {origin}")]
    UnknownKey {
        /// Where the key came from.
        origin: Origin,
        /// The key path.
        key: String,
    },
    /// An environment variable with the `SOMA_` prefix whose value is not
    /// UTF-8.
    #[error("environment variable `{var}` is not valid UTF-8")]
    NonUtf8Env {
        /// The variable's name (lossily decoded if it is not UTF-8 itself).
        var: String,
        /// The key path the variable maps to.
        key: String,
    },
    /// A file could not be read.
    #[error("cannot read config file `{}`: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The validation hook rejected the config.
    #[error("config failed validation: {}", join(violations))]
    Validation {
        /// Every failed rule, each naming its key and source.
        violations: Vec<Violation>,
    },
    /// An update's checksum does not match its document.
    #[error(
        "update version {version}: checksum mismatch (declared {declared}, computed {computed})"
    )]
    ChecksumMismatch {
        /// The update's version.
        version: u64,
        /// The checksum the update carried.
        declared: String,
        /// SHA-256 over the canonical JSON of the document.
        computed: String,
    },
    /// A remote update whose signature is missing or wrong while updates
    /// must be signed ([`Live::require_signed_updates`](crate::Live::require_signed_updates)).
    #[error("update version {version} rejected: {problem}")]
    UpdateSignature {
        /// The update's (unauthenticated) version.
        version: u64,
        /// What is wrong with the signature.
        problem: SignatureProblem,
    },
    /// An update whose version is not above the last applied one.
    #[error("update version {version} is not newer than the applied version {current}")]
    VersionRegression {
        /// The rejected update's version.
        version: u64,
        /// The last applied update version.
        current: u64,
    },
    /// A feature flag name that no descriptor declares.
    #[error("unknown feature flag `{name}`")]
    UnknownFlag {
        /// The name that was asked for.
        name: String,
    },
    /// An invalid feature-flag registry (duplicate name, unknown or
    /// cyclic dependency).
    #[error("invalid feature flag `{name}`: {message}")]
    InvalidFlag {
        /// The flag.
        name: String,
        /// What is wrong.
        message: String,
    },
    /// A deployment profile preset that tries to set something other than
    /// a sizing number, or touches authentication, policy or durability.
    #[error("profile preset `{}` rejected for `{key}`: {message}", profile.as_str())]
    ProfileViolation {
        /// The profile.
        profile: DeploymentProfile,
        /// The key path the preset tried to set.
        key: String,
        /// Why it is not allowed.
        message: String,
    },
    /// The file watcher could not be started.
    #[cfg(feature = "watch")]
    #[error("cannot watch `{}`: {source}", path.display())]
    Watch {
        /// The watched path.
        path: PathBuf,
        /// The notify error.
        source: notify::Error,
    },
}

fn key_suffix(key: &Option<String>) -> String {
    key.as_ref()
        .map(|k| format!(" at `{k}`"))
        .unwrap_or_default()
}

fn join(violations: &[Violation]) -> String {
    violations
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

impl ConfigError {
    /// Malformed input (TOML syntax, an update that is not an object, a
    /// wrong type or value for a key).
    pub fn is_parse(&self) -> bool {
        matches!(
            self,
            ConfigError::Parse { .. } | ConfigError::InvalidValue { .. }
        )
    }

    /// A value of the wrong type or out of its allowed set.
    pub fn is_invalid_value(&self) -> bool {
        matches!(self, ConfigError::InvalidValue { .. })
    }

    /// Rejected by the validation hook.
    pub fn is_validation(&self) -> bool {
        matches!(self, ConfigError::Validation { .. })
    }

    /// Strict mode found a key no setting has.
    pub fn is_unknown_key(&self) -> bool {
        matches!(self, ConfigError::UnknownKey { .. })
    }

    /// A `SOMA_*` variable with a non-UTF-8 value.
    pub fn is_non_utf8_env(&self) -> bool {
        matches!(self, ConfigError::NonUtf8Env { .. })
    }

    /// A config file could not be read.
    pub fn is_io(&self) -> bool {
        matches!(self, ConfigError::Io { .. })
    }

    /// An update's checksum did not match its document.
    pub fn is_checksum_mismatch(&self) -> bool {
        matches!(self, ConfigError::ChecksumMismatch { .. })
    }

    /// A remote update was unsigned or badly signed.
    pub fn is_update_signature(&self) -> bool {
        matches!(self, ConfigError::UpdateSignature { .. })
    }

    /// An update was not newer than the applied one.
    pub fn is_version_regression(&self) -> bool {
        matches!(self, ConfigError::VersionRegression { .. })
    }

    /// A feature flag name nobody declared.
    pub fn is_unknown_flag(&self) -> bool {
        matches!(self, ConfigError::UnknownFlag { .. })
    }

    /// A profile preset tried to set something it may not.
    pub fn is_profile_violation(&self) -> bool {
        matches!(self, ConfigError::ProfileViolation { .. })
    }

    /// Where the bad input came from, when it is one place.
    pub fn origin(&self) -> Option<Origin> {
        match self {
            ConfigError::Parse { origin, .. }
            | ConfigError::InvalidValue { origin, .. }
            | ConfigError::UnknownKey { origin, .. } => Some(origin.clone()),
            ConfigError::NonUtf8Env { var, .. } => Some(Origin::Env { var: var.clone() }),
            ConfigError::Io { path, .. } => Some(Origin::File(path.clone())),
            ConfigError::Validation { violations } => violations.first().map(|v| v.origin.clone()),
            ConfigError::ChecksumMismatch { version, .. }
            | ConfigError::UpdateSignature { version, .. }
            | ConfigError::VersionRegression { version, .. } => {
                Some(Origin::Update { version: *version })
            }
            ConfigError::UnknownFlag { .. } | ConfigError::InvalidFlag { .. } => {
                Some(Origin::Flags)
            }
            ConfigError::ProfileViolation { profile, .. } => Some(Origin::Profile(*profile)),
            #[cfg(feature = "watch")]
            ConfigError::Watch { path, .. } => Some(Origin::File(path.clone())),
        }
    }

    /// The dotted key path the error is about, when it is about one key
    /// (the first one for a validation failure).
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Parse { key, .. } => key.as_deref(),
            ConfigError::InvalidValue { key, .. }
            | ConfigError::UnknownKey { key, .. }
            | ConfigError::NonUtf8Env { key, .. }
            | ConfigError::ProfileViolation { key, .. } => Some(key),
            ConfigError::Validation { violations } => violations.first().map(|v| v.key.as_str()),
            ConfigError::UnknownFlag { name } | ConfigError::InvalidFlag { name, .. } => Some(name),
            _ => None,
        }
    }
}

/// Why a remote update's signature was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SignatureProblem {
    /// The update carried no signature.
    #[error("the update is not signed")]
    Missing,
    /// The signature is not lowercase/uppercase hex of 32 bytes.
    #[error("the signature is not hex-encoded HMAC-SHA256")]
    Malformed,
    /// The signature does not match (another key, or a changed version or
    /// document).
    #[error("the signature does not match")]
    Mismatch,
}

impl SignatureProblem {
    /// The update had no signature.
    pub fn is_missing(self) -> bool {
        self == SignatureProblem::Missing
    }

    /// The signature was present but wrong or unreadable.
    pub fn is_bad(self) -> bool {
        !self.is_missing()
    }
}
