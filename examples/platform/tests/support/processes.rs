//! The four platform binaries as processes (as `cargo xtask platform up`
//! and the chaos harness run them): one generated settings file layered
//! over `config/local.toml`, every port free, every topic, schema and key
//! prefix the test's own, logs (JSON, debug) captured per process.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{AUDIENCE, Env, ISSUER};

/// The binaries, in start order, with their admin-port setting.
const SERVICES: [(&str, &str); 4] = [
    ("soma-gateway", env!("CARGO_BIN_EXE_soma-gateway")),
    (
        "soma-conversation-worker",
        env!("CARGO_BIN_EXE_soma-conversation-worker"),
    ),
    (
        "soma-tool-executor",
        env!("CARGO_BIN_EXE_soma-tool-executor"),
    ),
    (
        "soma-memory-replicator",
        env!("CARGO_BIN_EXE_soma-memory-replicator"),
    ),
];

/// Where the processes find the memory service and send their traces.
pub struct Wiring<'a> {
    /// The SomaBrain-compatible memory service's base URL.
    pub somabrain_url: &'a str,
    /// Its bearer token (a secret: must never reach a log).
    pub somabrain_token: &'a str,
    /// An OTLP/HTTP receiver, if traces are checked.
    pub otlp: Option<SocketAddr>,
    /// An OpenAI-compatible model (`llm.base_url`); `None`: the built-in
    /// responder.
    pub llm_base_url: Option<String>,
    /// More settings (TOML sections the generated file has not got).
    pub extra: String,
    /// A settings file layered over the generated one (any key, sections
    /// the generated file has too), when given.
    pub layer: Option<String>,
}

impl<'a> Wiring<'a> {
    /// The memory service at `somabrain_url` with `somabrain_token`; no
    /// trace export, the built-in responder.
    pub fn new(somabrain_url: &'a str, somabrain_token: &'a str) -> Self {
        Self {
            somabrain_url,
            somabrain_token,
            otlp: None,
            llm_base_url: None,
            extra: String::new(),
            layer: None,
        }
    }

    /// Layers `toml` over the generated settings (a third `--config`).
    pub fn layer(mut self, toml: &str) -> Self {
        self.layer = Some(toml.to_owned());
        self
    }

    /// Appends `toml` (whole sections the generated file does not have,
    /// e.g. `[memory]`) to the settings.
    pub fn settings(mut self, toml: &str) -> Self {
        self.extra.push_str(toml);
        self
    }

    /// Exports traces to the OTLP/HTTP receiver at `addr`.
    pub fn otlp(mut self, addr: SocketAddr) -> Self {
        self.otlp = Some(addr);
        self
    }

    /// Generates replies with the model at `base_url`.
    pub fn model(mut self, base_url: String) -> Self {
        self.llm_base_url = Some(base_url);
        self
    }
}

/// The running processes; killed (by their pid) when dropped.
pub struct Processes {
    /// The settings file and the logs.
    pub dir: PathBuf,
    /// The gateway's API.
    pub api: SocketAddr,
    /// Every gateway replica's API (the first is `api`).
    pub apis: Vec<SocketAddr>,
    /// Admin addresses, in [`SERVICES`] order.
    pub admins: Vec<(&'static str, SocketAddr)>,
    settings: Vec<PathBuf>,
    children: Vec<(&'static str, Child)>,
}

fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], soma_testkit::free_port()))
}

impl Processes {
    /// Writes the settings and starts the four binaries.
    pub fn start(env: &Env, wiring: &Wiring<'_>) -> Self {
        let dir = std::env::temp_dir().join(&env.prefix);
        std::fs::create_dir_all(&dir).expect("a directory under the temp dir");
        let api = free_addr();
        let admins: Vec<(&'static str, SocketAddr)> =
            SERVICES.iter().map(|(n, _)| (*n, free_addr())).collect();
        let generated = dir.join("settings.toml");
        std::fs::write(&generated, settings_toml(env, wiring, api, &admins)).unwrap();
        let mut settings = vec![generated];
        if let Some(layer) = &wiring.layer {
            let file = dir.join("layer.toml");
            std::fs::write(&file, layer).unwrap();
            settings.push(file);
        }
        let children = SERVICES
            .iter()
            .map(|(name, bin)| (*name, spawn(&dir, name, bin, &settings)))
            .collect();
        Self {
            dir,
            api,
            apis: vec![api],
            admins,
            settings,
            children,
        }
    }

    /// Starts `replicas` gateways only (no workers), named `soma-gateway`,
    /// `soma-gateway-2`, …: one settings file as [`start`](Self::start)
    /// writes it, plus for each further replica a file of its own API and
    /// admin ports.
    pub fn start_gateways(env: &Env, wiring: &Wiring<'_>, replicas: usize) -> Self {
        const NAMES: [&str; 3] = ["soma-gateway", "soma-gateway-2", "soma-gateway-3"];
        let dir = std::env::temp_dir().join(&env.prefix);
        std::fs::create_dir_all(&dir).expect("a directory under the temp dir");
        let apis: Vec<SocketAddr> = (0..replicas).map(|_| free_addr()).collect();
        let admins: Vec<(&'static str, SocketAddr)> = NAMES[..replicas]
            .iter()
            .map(|n| (*n, free_addr()))
            .collect();
        // The other services' admin ports are written but not used.
        let mut ports: Vec<(&'static str, SocketAddr)> =
            SERVICES.iter().map(|(n, _)| (*n, free_addr())).collect();
        ports[0].1 = admins[0].1;
        let settings = vec![dir.join("settings.toml")];
        std::fs::write(&settings[0], settings_toml(env, wiring, apis[0], &ports)).unwrap();
        let bin = SERVICES[0].1;
        let children = (0..replicas)
            .map(|i| {
                let name = NAMES[i];
                if i == 0 {
                    return (name, spawn(&dir, name, bin, &settings));
                }
                let own = dir.join(format!("{name}.toml"));
                std::fs::write(
                    &own,
                    format!(
                        "[http]\ngateway_bind = \"{}\"\ngateway_admin_bind = \"{}\"\n",
                        apis[i], admins[i].1
                    ),
                )
                .unwrap();
                (
                    name,
                    spawn(
                        &dir,
                        name,
                        bin,
                        &[settings.clone(), vec![own.clone()]].concat(),
                    ),
                )
            })
            .collect();
        Self {
            dir,
            api: apis[0],
            apis,
            admins,
            settings,
            children,
        }
    }

    /// Kills `service` at once (SIGKILL: no shutdown, nothing flushed or
    /// committed), as a crash would.
    pub fn kill(&mut self, service: &str) {
        let (_, child) = self
            .children
            .iter_mut()
            .find(|(n, _)| *n == service)
            .unwrap();
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Starts `service` again (after [`kill`](Self::kill)), on the same
    /// settings, its log appended to the first run's.
    pub fn restart(&mut self, service: &str) {
        let (name, bin) = SERVICES.iter().find(|(n, _)| *n == service).unwrap();
        let child = spawn(&self.dir, name, bin, &self.settings);
        let slot = self.children.iter_mut().find(|(n, _)| n == name).unwrap();
        slot.1 = child;
    }

    /// `http://<gateway API>`.
    pub fn base(&self) -> String {
        format!("http://{}", self.api)
    }

    /// The admin address of `service`.
    pub fn admin(&self, service: &str) -> SocketAddr {
        self.admins.iter().find(|(n, _)| *n == service).unwrap().1
    }

    /// Waits until every process answers `/ready` with 200; fails naming
    /// the ones that did not (and the end of their logs) or exited.
    pub async fn wait_ready(&mut self, within: Duration) {
        let client = reqwest::Client::new();
        let deadline = Instant::now() + within;
        loop {
            let mut waiting = Vec::new();
            for (name, addr) in &self.admins {
                let ok = client
                    .get(format!("http://{addr}/ready"))
                    .timeout(Duration::from_secs(2))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success());
                if !ok {
                    waiting.push(*name);
                }
            }
            let exited: Vec<(&str, std::process::ExitStatus)> = self
                .children
                .iter_mut()
                .filter_map(|(name, child)| Some((*name, child.try_wait().ok()??)))
                .collect();
            if let Some((name, status)) = exited.first() {
                panic!("{name} exited ({status}): {}", self.log_tail(name));
            }
            if waiting.is_empty() {
                return;
            }
            if Instant::now() > deadline {
                let tails: Vec<String> = waiting.iter().map(|n| self.log_tail(n)).collect();
                panic!(
                    "not ready within {within:?}: {waiting:?}\n{}",
                    tails.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// SIGTERM to every process (by its pid), then waits for each to exit
    /// (killing one still running after `within`). Returns the exit
    /// statuses' success by service.
    pub async fn stop(&mut self, within: Duration) -> Vec<(&'static str, bool)> {
        for (_, child) in &self.children {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
        }
        let deadline = Instant::now() + within;
        let mut out = Vec::new();
        for (name, child) in &mut self.children {
            let status = loop {
                match child.try_wait() {
                    Ok(Some(s)) => break s.success(),
                    _ if Instant::now() > deadline => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break false;
                    }
                    _ => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            };
            out.push((*name, status));
        }
        out
    }

    /// The captured log of `service`.
    pub fn log(&self, service: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{service}.log"))).unwrap_or_default()
    }

    /// The last 30 of `service`'s `WARN` and `ERROR` lines and consumer
    /// group rebalances.
    fn complaints(&self, service: &str) -> String {
        let log = self.log(service);
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| {
                l.contains("\"level\":\"WARN\"")
                    || l.contains("\"level\":\"ERROR\"")
                    || l.contains("\"event\":\"partitions_")
            })
            .collect();
        let from = lines.len().saturating_sub(30);
        format!(
            "--- {service}: {} warnings, errors and rebalances, the last {} ---\n{}",
            lines.len(),
            lines.len() - from,
            lines[from..].join("\n")
        )
    }

    fn log_tail(&self, service: &str) -> String {
        let log = self.log(service);
        let lines: Vec<&str> = log.lines().collect();
        let from = lines.len().saturating_sub(15);
        format!("--- {service} ---\n{}", lines[from..].join("\n"))
    }
}

/// Starts `bin` on the local file plus the `settings` files, from the workspace
/// root, logging (appending) to `<dir>/<name>.log`.
fn spawn(dir: &std::path::Path, name: &str, bin: &str, settings: &[PathBuf]) -> Child {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let base = concat!(env!("CARGO_MANIFEST_DIR"), "/config/local.toml");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("{name}.log")))
        .unwrap();
    let mut cmd = Command::new(bin);
    cmd.arg("--config").arg(base);
    for file in settings {
        cmd.arg("--config").arg(file);
    }
    cmd.current_dir(root)
        // Only the files configure them (no SOMA_* of this shell).
        .env_clear()
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("start {name} ({bin}): {e}"))
}

impl Drop for Processes {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if std::thread::panicking() {
            // What the failing test's output needs to be read without the
            // machine: each service's warnings, errors and rebalances and its
            // last lines.
            for (service, _) in &self.admins {
                eprintln!("{}", self.complaints(service));
                eprintln!("{}", self.log_tail(service));
            }
            eprintln!("the processes' logs are kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn settings_toml(
    env: &Env,
    wiring: &Wiring<'_>,
    api: SocketAddr,
    admins: &[(&'static str, SocketAddr)],
) -> String {
    let p = &env.prefix;
    let admin = |i: usize| admins[i].1;
    let otlp = match wiring.otlp {
        Some(addr) => format!(
            "otlp_endpoint = \"http://{addr}/v1/traces\"\notlp_protocol = \"http\"\n\
             batch_scheduled_delay_ms = 200\n"
        ),
        None => String::new(),
    };
    let policy_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../soma-policy/policy");
    format!(
        r#"
[telemetry]
log_format = "json"
log_filter = "debug,rdkafka=warn,librdkafka=warn"
{otlp}
[http]
gateway_bind = "{api}"
gateway_admin_bind = "{gw}"
conversation_admin_bind = "{cw}"
tools_admin_bind = "{te}"
memory_admin_bind = "{mr}"

[postgres]
url = "{pg}"

[redis]
url = "{redis}"
key_prefix = "{p}:"

[bus]
bootstrap_servers = "{kafka}"
consumer_group = "{p}"
max_attempts = 2
retry_backoff_initial_ms = 50
# A member that died without leaving is out of the group in seconds (the
# rebalance waits for it at most the poll interval).
session_timeout_ms = 6000

[bus.librdkafka]
"max.poll.interval.ms" = "10000"

[outbox]
schema = "{p}_outbox"

[chat]
session_events_schema = "{p}_chat"
requests_topic = "{p}.requests"
events_topic = "{p}.events"
memory_topic = "{p}.memory"
tools_topic = "{p}.tools"
tool_results_topic = "{p}.tool_results"
config_topic = "{p}.config"

[operator]
dlq_schema = "{p}_dlq"

[policy]
audiences = ["{AUDIENCE}"]
policy_dir = "{policy_dir}"

[policy.api_keys]
schema = "{p}_keys"

[[policy.issuers]]
issuer = "{ISSUER}"

[[policy.issuers.keys]]
kid = "k1"
alg = "HS256"
secret = "{secret}"

[somabrain]
base_url = "{brain}"
token = "{brain_token}"

[llm]
base_url = "{llm}"

{workspace}
{extra}
"#,
        gw = admin(0),
        cw = admin(1),
        te = admin(2),
        mr = admin(3),
        pg = soma_testkit::postgres_url(),
        redis = soma_testkit::redis_url(),
        kafka = soma_testkit::kafka_bootstrap(),
        secret = env.secret,
        brain = wiring.somabrain_url,
        brain_token = wiring.somabrain_token,
        llm = wiring.llm_base_url.as_deref().unwrap_or_default(),
        extra = wiring.extra,
        // The test's own workspace tables and topic, unless its extra
        // settings configure the workspace themselves.
        workspace = if wiring.extra.contains("[workspace") {
            String::new()
        } else {
            format!(
                "[workspace]\nschema = \"{p}_ws\"\n\n[workspace.scheduler]\ntopic = \"{p}.sched\"\n"
            )
        },
    )
}
