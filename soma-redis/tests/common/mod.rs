//! Shared helpers for the integration tests (real Redis).
#![allow(dead_code, unreachable_pub, unused_imports)]

use std::process::Stdio;
use std::time::Duration;

use soma_redis::{RedisClient, RedisConfig};
use tokio::process::{Child, Command};

/// A config for the shared Redis with a unique key prefix.
pub fn config() -> RedisConfig {
    let mut config = RedisConfig::default();
    config.url = soma_testkit::require_redis();
    config.key_prefix = format!("{}:", soma_testkit::unique_name("soma_redis_test"));
    config.command_timeout_ms = 2_000;
    config
}

pub async fn client() -> RedisClient {
    RedisClient::connect(config())
        .await
        .expect("connect to redis at 127.0.0.1:6379")
}

pub use soma_testkit::eventually;

/// A private `redis-server` on a free loopback port (no persistence), for
/// tests that kill and restart it.
pub struct PrivateRedis {
    pub port: u16,
    child: Option<Child>,
    extra_args: Vec<String>,
}

impl PrivateRedis {
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// Starts it with extra `redis-server` arguments (config directives such
    /// as `--requirepass`), kept across restarts.
    pub async fn start_with(extra_args: &[&str]) -> Self {
        let port = soma_testkit::free_port();
        let mut s = Self {
            port,
            child: None,
            extra_args: extra_args.iter().map(|a| (*a).to_owned()).collect(),
        };
        s.restart().await;
        s
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let child = Command::new("/usr/bin/redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(&self.extra_args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start /usr/bin/redis-server (apt-get install redis-server)");
        self.child = Some(child);
        let addr = format!("127.0.0.1:{}", self.port);
        let up = eventually(Duration::from_secs(10), || {
            let addr = addr.clone();
            async move { tokio::net::TcpStream::connect(&addr).await.is_ok() }
        })
        .await;
        assert!(up, "private redis-server on {addr} did not start");
    }

    /// SIGKILL: no shutdown, no goodbye to clients (a crash).
    pub async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().await.expect("kill redis-server");
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.start_kill();
        }
    }
}
