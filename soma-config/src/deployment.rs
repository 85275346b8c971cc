//! The deployment profile: which sizing preset applies (the presets
//! themselves are in `profile.rs`; this type is below both them and the
//! errors that name a profile).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A deployment profile: which sizing preset applies.
///
/// Selected by the top-level key `profile` (`SOMA_PROFILE=prod`, or
/// `profile = "prod"` in a file); `local` when nothing says otherwise.
/// Include a `profile: DeploymentProfile` field in your settings type to
/// see (and, in strict mode, to accept) it.
///
/// **Sections see it too.** Every top-level section whose defaults have a
/// `deployment_profile` key (soma-bus's `BusConfig` does) receives the
/// selected profile there, above every source; a file, variable, update or
/// override that gives such a section another profile fails the load with
/// [`ConfigError::InvalidValue`](crate::ConfigError::InvalidValue). So a
/// crate can choose profile-dependent safety defaults (soma-bus:
/// replication factor 3 and `min.insync.replicas` 2 under `prod`) without a
/// second switch to forget.
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use soma_config::{DeploymentProfile, Loader};
/// #[derive(Debug, Default, Serialize, Deserialize)]
/// #[serde(default)]
/// struct Bus { deployment_profile: DeploymentProfile, partitions: u32 }
/// #[derive(Debug, Default, Serialize, Deserialize)]
/// #[serde(default)]
/// struct Settings { profile: DeploymentProfile, bus: Bus }
///
/// let s: Settings = Loader::new().without_env().set("profile", "prod").load().unwrap();
/// assert_eq!(s.bus.deployment_profile, DeploymentProfile::Prod);
/// let e = Loader::<Settings>::new().without_env()
///     .set("profile", "prod").set("bus.deployment_profile", "local")
///     .load().unwrap_err();
/// assert_eq!(e.key(), Some("bus.deployment_profile"));
/// ```
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum DeploymentProfile {
    /// A developer machine or CI: small pools, few partitions, short
    /// timeouts. Same authentication, policy and write acknowledgements as
    /// `prod`; topics get one replica (a local broker is one broker).
    #[default]
    Local,
    /// Production sizing.
    Prod,
}

impl DeploymentProfile {
    /// Every profile, `local` first: what a crate's preset function and an
    /// application's composition answer for (and what their tests iterate).
    pub const ALL: [DeploymentProfile; 2] = [DeploymentProfile::Local, DeploymentProfile::Prod];

    /// `"local"` or `"prod"`.
    pub fn as_str(self) -> &'static str {
        match self {
            DeploymentProfile::Local => "local",
            DeploymentProfile::Prod => "prod",
        }
    }
}

impl fmt::Display for DeploymentProfile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DeploymentProfile {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "local" => Ok(DeploymentProfile::Local),
            "prod" => Ok(DeploymentProfile::Prod),
            other => Err(format!(
                "unknown deployment profile `{other}` (expected `local` or `prod`)"
            )),
        }
    }
}
