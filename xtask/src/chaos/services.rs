//! The platform binaries as processes on the chaos stack's private ports
//! (one gateway, or two behind the load generator), configured through
//! `SOMA_*` overrides on top of `examples/platform/config/local.toml`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::deps::Proc;
use crate::platform::http;

/// One platform process on the chaos stack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Service {
    /// Its name in logs and the table (the log file is `<name>.log`).
    pub(crate) name: &'static str,
    /// The binary it runs.
    bin: &'static str,
    /// The settings key of its admin address (`SOMA_HTTP__<key>`).
    admin_key: &'static str,
    /// Its admin address (`/ready`, `/v1/health`, `/metrics`).
    pub(crate) admin: &'static str,
    /// A gateway's API address.
    pub(crate) api: Option<&'static str>,
}

/// The gateway (the only one, or gateway A of two).
pub(crate) const GATEWAY_A: Service = Service {
    name: "soma-gateway",
    bin: "soma-gateway",
    admin_key: "GATEWAY_ADMIN_BIND",
    admin: "127.0.0.1:28480",
    api: Some("127.0.0.1:28080"),
};

/// The second gateway: the same binary on other ports; it consumes the
/// reply topic as a broadcast consumer too, so SSE works on either.
pub(crate) const GATEWAY_B: Service = Service {
    name: "soma-gateway-b",
    bin: "soma-gateway",
    admin_key: "GATEWAY_ADMIN_BIND",
    admin: "127.0.0.1:28484",
    api: Some("127.0.0.1:28081"),
};

/// The conversation worker.
pub(crate) const WORKER: Service = Service {
    name: "soma-conversation-worker",
    bin: "soma-conversation-worker",
    admin_key: "CONVERSATION_ADMIN_BIND",
    admin: "127.0.0.1:28481",
    api: None,
};

/// The memory replicator.
pub(crate) const MEMORY: Service = Service {
    name: "soma-memory-replicator",
    bin: "soma-memory-replicator",
    admin_key: "MEMORY_ADMIN_BIND",
    admin: "127.0.0.1:28482",
    api: None,
};

/// The tool executor.
pub(crate) const TOOLS: Service = Service {
    name: "soma-tool-executor",
    bin: "soma-tool-executor",
    admin_key: "TOOLS_ADMIN_BIND",
    admin: "127.0.0.1:28483",
    api: None,
};

/// Every service the harness can run, gateway B last.
pub(crate) const ALL: [Service; 5] = [GATEWAY_A, WORKER, MEMORY, TOOLS, GATEWAY_B];

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
    /// Added to every service port (0 for chaos), so another harness can run
    /// the platform beside a chaos run.
    pub(crate) port_offset: u16,
    /// More `SOMA_*` overrides (after the ones above, so they win).
    pub(crate) extra_env: Vec<(String, String)>,
}

impl Wiring {
    /// The `SOMA_*` overrides: the addresses, then `extra_env`.
    fn env(&self) -> Vec<(String, String)> {
        [
            ("SOMA_POSTGRES__URL", &self.postgres_url),
            ("SOMA_REDIS__URL", &self.redis_url),
            ("SOMA_BUS__BOOTSTRAP_SERVERS", &self.bootstrap),
            ("SOMA_SOMABRAIN__BASE_URL", &self.somabrain_url),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.clone()))
        .chain(self.extra_env.iter().cloned())
        .collect()
    }
}

/// `addr` (`host:port`) with `offset` added to its port.
pub(crate) fn shifted(addr: &str, offset: u16) -> String {
    match addr.rsplit_once(':') {
        Some((host, port)) => match port.parse::<u16>() {
            Ok(p) => format!("{host}:{}", p + offset),
            Err(_) => addr.to_owned(),
        },
        None => addr.to_owned(),
    }
}

/// The running services.
pub(crate) struct Platform {
    /// The services started, in [`ALL`]'s order.
    pub(crate) services: Vec<Service>,
    pub(crate) procs: Vec<Proc>,
    bin_dir: PathBuf,
    log_dir: PathBuf,
    source: PathBuf,
    issuer_file: PathBuf,
    env: Vec<(String, String)>,
    port_offset: u16,
}

impl Platform {
    /// Starts the binaries from `bin_dir` (gateway, conversation worker,
    /// memory replicator, tool executor, and with `two_gateways` gateway B),
    /// logs in `log_dir`.
    pub(crate) fn start(
        bin_dir: &Path,
        log_dir: &Path,
        wiring: &Wiring,
        two_gateways: bool,
    ) -> Result<Self, String> {
        let services: Vec<Service> = ALL
            .into_iter()
            .filter(|s| two_gateways || *s != GATEWAY_B)
            .collect();
        let mut platform = Self {
            services,
            procs: Vec::new(),
            bin_dir: bin_dir.to_owned(),
            log_dir: log_dir.to_owned(),
            source: wiring.source.clone(),
            issuer_file: wiring.issuer_file.clone(),
            env: wiring.env(),
            port_offset: wiring.port_offset,
        };
        for s in platform.services.clone() {
            let proc = platform.spawn(s)?;
            platform.procs.push(proc);
        }
        Ok(platform)
    }

    /// The gateways' API addresses (`http://host:port`).
    pub(crate) fn gateway_urls(&self) -> Vec<String> {
        self.services
            .iter()
            .filter_map(|s| s.api)
            .map(|a| format!("http://{}", shifted(a, self.port_offset)))
            .collect()
    }

    /// The index of `service` among the started ones.
    pub(crate) fn index(&self, service: Service) -> Option<usize> {
        self.services.iter().position(|s| *s == service)
    }

    fn spawn(&self, s: Service) -> Result<Proc, String> {
        let mut cmd = Command::new(self.bin_dir.join(s.bin));
        cmd.current_dir(&self.source)
            .arg("--config")
            .arg(self.source.join("examples/platform/config/local.toml"))
            .arg("--config")
            .arg(&self.issuer_file)
            .envs(self.env.iter().cloned())
            .env(
                format!("SOMA_HTTP__{}", s.admin_key),
                shifted(s.admin, self.port_offset),
            );
        if let Some(api) = s.api {
            cmd.env("SOMA_HTTP__GATEWAY_BIND", shifted(api, self.port_offset));
        }
        Proc::spawn(s.name, cmd, &self.log_dir.join(format!("{}.log", s.name)))
    }

    /// A deploy of service `i`: SIGTERM (its graceful shutdown, SIGKILL
    /// after `grace`), then the same binary started again. Returns how long
    /// the old process took to exit.
    pub(crate) fn redeploy(&mut self, i: usize, grace: Duration) -> Result<Duration, String> {
        let started = std::time::Instant::now();
        self.procs[i].terminate(grace);
        let stopped = started.elapsed();
        self.procs[i] = self.spawn(self.services[i])?;
        Ok(stopped)
    }

    /// Service `i`'s admin address (`/ready`, `/v1/health`, `/metrics`).
    pub(crate) fn admin(&self, i: usize) -> String {
        shifted(self.services[i].admin, self.port_offset)
    }

    /// Whether service `i` answers `/ready` with 200.
    pub(crate) fn is_ready(&self, i: usize) -> bool {
        matches!(http(&self.admin(i), "GET", "/ready", &[], ""), Ok((200, _)))
    }

    /// Names of services that are not `/ready` (or not answering).
    pub(crate) fn not_ready(&self) -> Vec<&'static str> {
        (0..self.services.len())
            .filter(|&i| !self.is_ready(i))
            .map(|i| self.services[i].name)
            .collect()
    }

    /// The health components of `service` that are not `up`, with their reasons.
    pub(crate) fn unhealthy(&self, service: &str) -> Vec<String> {
        let Some(i) = self.services.iter().position(|s| s.name == service) else {
            return Vec::new();
        };
        let Ok((_, body)) = http(&self.admin(i), "GET", "/v1/health", &[], "") else {
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

    /// The gateways' `soma_bus_consumed_total` for `topic` (all outcomes),
    /// per gateway: how many reply events each SSE hub took from the bus.
    pub(crate) fn gateway_consumed(&self, topic: &str) -> Vec<(&'static str, u64)> {
        let label = format!("topic=\"{topic}\"");
        self.services
            .iter()
            .filter(|s| s.api.is_some())
            .filter_map(|s| {
                let admin = shifted(s.admin, self.port_offset);
                let (_, body) = http(&admin, "GET", "/metrics", &[], "").ok()?;
                let n = body
                    .lines()
                    .filter(|l| l.starts_with("soma_bus_consumed_total") && l.contains(&label))
                    .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                    .sum::<f64>() as u64;
                Some((s.name, n))
            })
            .collect()
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
