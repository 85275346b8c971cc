#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod deployment;
mod document;
mod env;
mod error;
mod flags;
mod live;
mod loader;
mod profile;
mod redact;
mod secret;
#[cfg(feature = "watch")]
mod watch;

pub use deployment::DeploymentProfile;
pub use document::{canonical_json, checksum};
pub use env::{ENV_PREFIX, ENV_SEPARATOR, env_var_to_key, key_to_env_var};
pub use error::{ConfigError, Origin, SignatureProblem, Violation};
pub use flags::{
    FeatureFlags, FeatureProfile, FlagDescriptor, FlagLookup, FlagSetting, FlagSource, FlagState,
    FlagsConfig, ResolverError, TenantFlagResolver,
};
pub use live::{Change, ConfigUpdate, Live, MIN_UPDATE_KEY_BYTES, Reader, UpdateStats, Versioned};
pub use loader::{Checks, Loader, Settings};
pub use profile::{ProfilePreset, SectionPreset};
pub use redact::redact_url;
pub use secret::{REDACTED, Secret};
#[cfg(feature = "watch")]
pub use watch::{WatchHandle, WatchStats};
