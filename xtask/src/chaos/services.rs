//! The four platform binaries as processes on the chaos stack's private
//! ports, configured through `SOMA_*` overrides on top of
//! `examples/platform/config/local.toml`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::deps::Proc;
use crate::platform::http;

/// The gateway's API on the chaos stack.
pub(crate) const GATEWAY: &str = "127.0.0.1:28080";

/// Binary, settings key of its admin address, admin address.
pub(crate) const SERVICES: [(&str, &str, &str); 4] = [
    ("soma-gateway", "GATEWAY_ADMIN_BIND", "127.0.0.1:28480"),
    (
        "soma-conversation-worker",
        "CONVERSATION_ADMIN_BIND",
        "127.0.0.1:28481",
    ),
    (
        "soma-memory-replicator",
        "MEMORY_ADMIN_BIND",
        "127.0.0.1:28482",
    ),
    ("soma-tool-executor", "TOOLS_ADMIN_BIND", "127.0.0.1:28483"),
];

/// Where the platform finds its dependencies.
pub(crate) struct Wiring {
    pub(crate) postgres_url: String,
    pub(crate) redis_url: String,
    pub(crate) bootstrap: String,
    pub(crate) somabrain_url: String,
    pub(crate) issuer_file: PathBuf,
    /// The checkout the binaries come from: their working directory (the
    /// policy directory is relative to it) and where `config/local.toml` is read.
    pub(crate) source: PathBuf,
}

impl Wiring {
    /// The `SOMA_*` overrides. Besides addresses, one sizing change:
    /// `chat.sse_buffer` holds a whole burst's reply events, so a client
    /// reading 50 streams at once is not cut off as `lagged` while the
    /// backlog drains (that limit is about slow clients, not durability).
    fn env(&self) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = [
            ("SOMA_POSTGRES__URL", &self.postgres_url),
            ("SOMA_REDIS__URL", &self.redis_url),
            ("SOMA_BUS__BOOTSTRAP_SERVERS", &self.bootstrap),
            ("SOMA_SOMABRAIN__BASE_URL", &self.somabrain_url),
            ("SOMA_HTTP__GATEWAY_BIND", &GATEWAY.to_owned()),
            ("SOMA_CHAT__SSE_BUFFER", &"65536".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.clone()))
        .collect();
        for (_, key, addr) in SERVICES {
            env.push((format!("SOMA_HTTP__{key}"), addr.to_owned()));
        }
        env
    }
}

/// The running services.
pub(crate) struct Platform {
    pub(crate) procs: Vec<Proc>,
    bin_dir: PathBuf,
    log_dir: PathBuf,
    source: PathBuf,
    issuer_file: PathBuf,
    env: Vec<(String, String)>,
}

impl Platform {
    /// Starts the four binaries from `bin_dir`, logs in `log_dir`.
    pub(crate) fn start(bin_dir: &Path, log_dir: &Path, wiring: &Wiring) -> Result<Self, String> {
        let mut platform = Self {
            procs: Vec::new(),
            bin_dir: bin_dir.to_owned(),
            log_dir: log_dir.to_owned(),
            source: wiring.source.clone(),
            issuer_file: wiring.issuer_file.clone(),
            env: wiring.env(),
        };
        for (name, _, _) in SERVICES {
            let proc = platform.spawn(name)?;
            platform.procs.push(proc);
        }
        Ok(platform)
    }

    fn spawn(&self, name: &str) -> Result<Proc, String> {
        let mut cmd = Command::new(self.bin_dir.join(name));
        cmd.current_dir(&self.source)
            .arg("--config")
            .arg(self.source.join("examples/platform/config/local.toml"))
            .arg("--config")
            .arg(&self.issuer_file)
            .envs(self.env.iter().cloned());
        Proc::spawn(name, cmd, &self.log_dir.join(format!("{name}.log")))
    }

    /// A deploy of service `i`: SIGTERM (its graceful shutdown, SIGKILL
    /// after `grace`), then the same binary started again. Returns how long
    /// the old process took to exit.
    pub(crate) fn redeploy(&mut self, i: usize, grace: Duration) -> Result<Duration, String> {
        let name = SERVICES[i].0;
        let started = std::time::Instant::now();
        self.procs[i].terminate(grace);
        let stopped = started.elapsed();
        self.procs[i] = self.spawn(name)?;
        Ok(stopped)
    }

    /// Whether service `i` answers `/ready` with 200.
    pub(crate) fn is_ready(i: usize) -> bool {
        matches!(http(SERVICES[i].2, "GET", "/ready", &[], ""), Ok((200, _)))
    }

    /// Names of services that are not `/ready` (or not answering).
    pub(crate) fn not_ready() -> Vec<&'static str> {
        SERVICES
            .iter()
            .filter(|(_, _, admin)| !matches!(http(admin, "GET", "/ready", &[], ""), Ok((200, _))))
            .map(|(name, _, _)| *name)
            .collect()
    }

    /// The health components of `service` that are not `up`, with their reasons.
    pub(crate) fn unhealthy(service: &str) -> Vec<String> {
        let Some((_, _, admin)) = SERVICES.iter().find(|(name, _, _)| *name == service) else {
            return Vec::new();
        };
        let Ok((_, body)) = http(admin, "GET", "/v1/health", &[], "") else {
            return vec!["admin endpoint not answering".to_owned()];
        };
        let health: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        health["components"]
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(_, c)| c["status"] != "up")
            .map(|(name, c)| {
                format!(
                    "{name} {} {}: {}",
                    c["criticality"].as_str().unwrap_or("?"),
                    c["status"].as_str().unwrap_or("?"),
                    c["reason"].as_str().unwrap_or("")
                )
            })
            .collect()
    }

    /// The gateway's `soma_bus_consumed_total` for `topic` (all outcomes):
    /// how many reply events its SSE hub took from the bus.
    pub(crate) fn gateway_consumed(topic: &str) -> Option<u64> {
        let (_, body) = http(SERVICES[0].2, "GET", "/metrics", &[], "").ok()?;
        let label = format!("topic=\"{topic}\"");
        Some(
            body.lines()
                .filter(|l| l.starts_with("soma_bus_consumed_total") && l.contains(&label))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>() as u64,
        )
    }

    /// Services that exited on their own, with their exit status.
    pub(crate) fn exited(&mut self) -> Vec<String> {
        self.procs
            .iter_mut()
            .filter_map(|p| p.exited().map(|s| format!("{} ({s})", p.name)))
            .collect()
    }

    /// SIGTERM to each (graceful shutdown), SIGKILL after 20 s.
    pub(crate) fn stop(&mut self) {
        for p in &mut self.procs {
            let _ = Command::new("kill")
                .args(["-TERM", &p.child.id().to_string()])
                .status();
        }
        for p in &mut self.procs {
            p.terminate(Duration::from_secs(20));
        }
    }
}
