//! Prints the effective config of a small settings type as a redacted
//! snapshot, reading `SOMA_*` variables from the process environment and an
//! optional file given as the first argument.
//!
//! ```sh
//! SOMA_REDIS__POOL_SIZE=16 SOMA_REDIS__PASSWORD=hunter2 \
//!   cargo run -p soma-config --example print_config -- app.toml
//! ```

use serde::{Deserialize, Serialize};
use soma_config::{Loader, Secret};

/// The Redis section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
struct RedisConfig {
    url: String,
    pool_size: usize,
    password: Secret,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".into(),
            pool_size: 8,
            password: Secret::default(),
        }
    }
}

/// The application's settings.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
struct AppSettings {
    redis: RedisConfig,
}

fn main() -> std::process::ExitCode {
    let mut loader = Loader::<AppSettings>::new().strict(true);
    if let Some(path) = std::env::args_os().nth(1) {
        loader = loader.file(path);
    }
    match loader.into_live() {
        Ok(live) => {
            println!("{:#}", live.snapshot());
            std::process::ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("error: {err}");
            std::process::ExitCode::FAILURE
        }
    }
}
