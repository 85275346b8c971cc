//! Settings types shared by the integration tests.
#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use soma_config::{DeploymentProfile, FlagsConfig, Secret};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RedisConfig {
    pub url: String,
    pub pool_size: usize,
    pub connect_timeout_ms: u64,
    pub password: Secret,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".into(),
            pool_size: 8,
            connect_timeout_ms: 1_000,
            password: Secret::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BusConfig {
    pub bootstrap_servers: String,
    pub partitions: u32,
    pub acks: String,
    pub topics: Vec<String>,
}

impl Default for BusConfig {
    fn default() -> Self {
        Self {
            bootstrap_servers: "127.0.0.1:9092".into(),
            partitions: 3,
            acks: "all".into(),
            topics: vec!["events".into()],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AuthConfig {
    pub required: bool,
    pub issuer: String,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            required: true,
            issuer: "https://issuer.local".into(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AppSettings {
    pub profile: DeploymentProfile,
    pub service_name: String,
    pub redis: RedisConfig,
    pub bus: BusConfig,
    pub auth: AuthConfig,
    pub flags: FlagsConfig,
    pub labels: BTreeMap<String, String>,
}

/// A temp dir with one TOML file.
pub fn toml_file(body: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("app.toml");
    std::fs::write(&path, body).expect("write toml");
    (dir, path)
}

pub fn no_env() -> Vec<(String, String)> {
    Vec::new()
}

/// A strict `Live<AppSettings>` over one TOML file and the given environment,
/// validating that `redis.pool_size` is at least 1.
pub fn strict_live<K, V>(
    path: &std::path::Path,
    env: impl IntoIterator<Item = (K, V)>,
) -> soma_config::Live<AppSettings>
where
    K: Into<std::ffi::OsString>,
    V: Into<std::ffi::OsString>,
{
    soma_config::Loader::<AppSettings>::new()
        .env_from(env)
        .file(path)
        .strict(true)
        .validate(|s, c| {
            c.ensure(
                s.redis.pool_size > 0,
                "redis.pool_size",
                "must be at least 1",
            )
        })
        .into_live()
        .expect("valid settings")
}
