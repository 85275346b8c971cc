//! The platform's one settings type, composed from each soma crate's section
//! and loaded by soma-config.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use soma_bus::BusConfig;
use soma_config::{
    Checks, ConfigError, DeploymentProfile, FlagsConfig, Live, Loader, ProfilePreset, SectionPreset,
};
use soma_observability::TelemetryConfig;
use soma_observability::shutdown::ShutdownConfig;
use soma_outbox::{OutboxConfig, RelayConfig};
use soma_policy::PolicyConfig;
use soma_redis::RedisConfig;
use soma_somabrain::SomabrainConfig;

/// Everything the gateway and the workers are configured with.
///
/// Load it with [`load`]: defaults < `config/local.toml` (or the files
/// given) < `SOMA_*` environment. Each section is the owning crate's own
/// config struct.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct PlatformSettings {
    /// Deployment profile (`local` or `prod`): sizing only.
    pub profile: DeploymentProfile,
    /// Logs, traces and metric labels (soma-observability).
    pub telemetry: TelemetryConfig,
    /// Listen addresses of the three services.
    pub http: HttpSettings,
    /// The PostgreSQL pool behind the outbox, inbox and API-key store.
    pub postgres: PostgresSettings,
    /// Redis (rate limits, idempotency keys).
    pub redis: RedisConfig,
    /// Kafka (soma-bus).
    pub bus: BusConfig,
    /// The transactional outbox (soma-outbox).
    pub outbox: OutboxConfig,
    /// The outbox relay that drains into Kafka.
    pub relay: RelayConfig,
    /// Authentication and authorization (soma-policy).
    pub policy: PolicyConfig,
    /// The SomaBrain memory service (soma-somabrain).
    pub somabrain: SomabrainConfig,
    /// The chat protocol: topics, limits.
    pub chat: ChatSettings,
    /// The reply generator's model endpoint (none: the built-in responder).
    pub llm: crate::reply::LlmSettings,
    /// The tool executor's per-tool timeouts and output limits.
    pub tools: crate::tools::ToolSettings,
    /// The memory replicator's replica lag and DLQ health.
    pub memory: MemorySettings,
    /// Graceful shutdown: the deadline and the drain delay
    /// (soma-observability).
    pub shutdown: ShutdownConfig,
    /// The gateway's workspace: scheduled jobs, uploads, notifications.
    pub workspace: crate::workspace::WorkspaceSettings,
    /// Feature flags: the active feature profile and per-flag overrides
    /// (soma-config's registry; the flags are declared in
    /// [`crate::operator::features`]).
    pub flags: FlagsConfig,
    /// The gateway's operator routes (DLQ administration).
    pub operator: OperatorSettings,
}

/// The gateway's operator routes (see [`crate::operator`]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct OperatorSettings {
    /// PostgreSQL schema of the DLQ ledger: which dead letters were
    /// discarded (with who and why) or replayed, so a discard survives a
    /// restart and a record is replayed once.
    pub dlq_schema: String,
    /// Most DLQ records one list or filtered replay reads per DLQ (the
    /// newest ones).
    pub dlq_scan_max: usize,
}

impl Default for OperatorSettings {
    fn default() -> Self {
        Self {
            dlq_schema: "soma_dlq".into(),
            dlq_scan_max: 1_000,
        }
    }
}

/// Where each service listens.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct HttpSettings {
    /// The gateway's public API (`/v1/...`, and the probes `/live`,
    /// `/ready`, `/healthz`, `/v1/health`); default `127.0.0.1:21016`.
    pub gateway_bind: String,
    /// The gateway's admin endpoints (`/metrics`, and the probes again).
    pub gateway_admin_bind: String,
    /// The conversation worker's admin endpoints.
    pub conversation_admin_bind: String,
    /// The memory replicator's admin endpoints.
    pub memory_admin_bind: String,
    /// The tool executor's admin endpoints.
    pub tools_admin_bind: String,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// Longest a request may take before the gateway answers `504` (the
    /// SSE stream's body is not bounded by it, only its start).
    pub request_timeout_ms: u64,
    /// Requests the gateway handles at once; beyond that it sheds load with
    /// `503` at once instead of queueing without bound.
    pub max_concurrent_requests: usize,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            gateway_bind: "127.0.0.1:21016".into(),
            gateway_admin_bind: "127.0.0.1:9480".into(),
            conversation_admin_bind: "127.0.0.1:9481".into(),
            memory_admin_bind: "127.0.0.1:9482".into(),
            tools_admin_bind: "127.0.0.1:9483".into(),
            max_body_bytes: 16 * 1024,
            request_timeout_ms: 10_000,
            max_concurrent_requests: 512,
        }
    }
}

/// The PostgreSQL pool.
///
/// The gateway's API-key store has its own pool and schema, set under
/// `policy.api_keys` (`schema`, `max_connections`). The old keys
/// `postgres.api_keys_schema` and `postgres.api_keys_max_connections` still
/// load, with a deprecation warning, until the next release (see
/// [`DEPRECATED_KEYS`]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct PostgresSettings {
    /// Connection URL (no password here: use the `PGPASSWORD`-free trust
    /// auth locally, or a URL from a secret store in production).
    pub url: String,
    /// Pool size.
    pub max_connections: u32,
    /// How long to wait for a connection.
    pub connect_timeout_ms: u64,
}

impl Default for PostgresSettings {
    fn default() -> Self {
        Self {
            url: "postgres://postgres@127.0.0.1:5432/test".into(),
            max_connections: 10,
            connect_timeout_ms: 5_000,
        }
    }
}

impl PostgresSettings {
    /// The pool's sizes under a deployment profile, keys relative to the
    /// section (mounted at `postgres` by [`preset`]): `max_connections`
    /// 5 / 50 and `connect_timeout_ms` 2 000 / 5 000 under `local` /
    /// `prod`.
    pub fn preset(profile: DeploymentProfile) -> SectionPreset {
        let (max_connections, connect_timeout_ms) = match profile {
            DeploymentProfile::Local => (5, 2_000),
            DeploymentProfile::Prod => (50, 5_000),
        };
        SectionPreset::new(
            profile,
            [
                ("max_connections", max_connections),
                ("connect_timeout_ms", connect_timeout_ms),
            ],
        )
    }
}

/// The chat protocol between the gateway and the workers.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct ChatSettings {
    /// Accepted user messages, keyed by conversation id.
    pub requests_topic: String,
    /// Reply events streamed back to SSE clients, keyed by conversation id.
    pub events_topic: String,
    /// Memory writes for the replicator, keyed by conversation id.
    pub memory_topic: String,
    /// Tool calls for the tool executor, keyed by conversation id.
    pub tools_topic: String,
    /// Tool results (`tool.result` envelopes, correlated by request id and
    /// message id), keyed by conversation id.
    pub tool_results_topic: String,
    /// Remote configuration updates (`{version, checksum, document,
    /// signature}`), consumed in broadcast mode by every replica from the
    /// topic's beginning, so a replica that starts later catches up on the
    /// current version.
    pub config_topic: String,
    /// HMAC-SHA256 key remote config updates must be signed with (at least
    /// 32 bytes; `soma_config::ConfigUpdate::sign`). Unsigned and badly
    /// signed updates are rejected and counted
    /// (`soma_platform_config_updates_total{outcome}`). Empty: this process
    /// does not take remote updates at all.
    pub config_update_key: soma_config::Secret,
    /// Longest accepted message text, in bytes.
    pub max_message_bytes: usize,
    /// Messages a tenant may send per route per window.
    pub rate_limit: u32,
    /// The rate-limit window in seconds.
    pub rate_window_secs: u64,
    /// Live events buffered per conversation channel of a gateway (one
    /// channel per `(tenant, conversation)` with subscribers). A stream
    /// further behind than this is not cut off: it resumes from the session
    /// event store, then goes on live. The channel's ring is allocated
    /// whole when its first stream subscribes (32 bytes a slot), so this
    /// is what every open conversation costs a gateway: 64 slots are 2 KiB
    /// and hold about ten replies with their previews; 65,536 were 2 MiB a
    /// stream (`cargo xtask bench --group sse`).
    pub sse_buffer: usize,
    /// Reply events a gateway remembers by id, so one delivered twice on
    /// the bus (a producer's retry after an outage) reaches SSE clients once.
    pub sse_dedupe_window: usize,
    /// Interval of the SSE heartbeat (a `: heartbeat` comment sent when the
    /// stream was otherwise quiet this long), so proxies keep idle streams
    /// open and clients notice dead ones.
    pub sse_heartbeat_ms: u64,
    /// PostgreSQL schema of the session event store (what `Last-Event-ID`
    /// resumes from).
    pub session_events_schema: String,
    /// Newest events kept per conversation; older ones are pruned.
    pub session_events_max_per_conversation: u64,
    /// Longest an event is kept, in seconds, however few its conversation
    /// has.
    pub session_events_max_age_secs: u64,
    /// How often the conversation worker prunes the session event store.
    pub session_events_prune_interval_ms: u64,
    /// SomaBrain namespace used for conversation memory.
    pub memory_namespace: String,
    /// How many memories the worker recalls per message.
    pub recall_top_k: usize,
    /// Whether the conversation worker publishes live previews of replies
    /// while it generates them (Redis pub/sub, best effort; see
    /// [`crate::live`]). Off: clients see a reply when it is complete.
    pub live_previews: bool,
    /// The Redis pub/sub channel of live previews (a name: no `:`, spaces
    /// or glob characters), under `redis.key_prefix`.
    pub live_channel: String,
    /// Shortest time between two previews of one reply (the first goes
    /// with the first token).
    pub live_interval_ms: u64,
    /// Most previews per reply (each carries the reply so far, so a reply
    /// costs at most this many times its length on the live path).
    pub live_max_previews: u32,
}

impl Default for ChatSettings {
    fn default() -> Self {
        Self {
            requests_topic: "chat.requests".into(),
            events_topic: "chat.events".into(),
            memory_topic: "memory.writes".into(),
            tools_topic: "tool.requests".into(),
            tool_results_topic: "tool.results".into(),
            config_topic: "config.updates".into(),
            config_update_key: soma_config::Secret::default(),
            max_message_bytes: 4 * 1024,
            rate_limit: 120,
            rate_window_secs: 60,
            sse_buffer: 64,
            sse_dedupe_window: 65_536,
            sse_heartbeat_ms: 15_000,
            session_events_schema: "soma_chat".into(),
            session_events_max_per_conversation: 1_000,
            session_events_max_age_secs: 24 * 3600,
            session_events_prune_interval_ms: 60_000,
            memory_namespace: "conversation".into(),
            recall_top_k: 3,
            live_previews: true,
            live_channel: "chat-live".into(),
            live_interval_ms: 100,
            live_max_previews: 32,
        }
    }
}

/// The memory replicator's replica (see [`crate::memory`]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct MemorySettings {
    /// Health component `memory_replica` turns degraded when the oldest
    /// write not yet in SomaBrain is older than this, in seconds.
    pub replica_lag_degraded_secs: u64,
    /// How often the replica lag (and DLQ count) is measured into the
    /// gauges and health, in milliseconds.
    pub replica_lag_interval_ms: u64,
}

impl Default for MemorySettings {
    fn default() -> Self {
        Self {
            replica_lag_degraded_secs: 30,
            replica_lag_interval_ms: 1_000,
        }
    }
}

impl PlatformSettings {
    /// The topics the platform uses (DLQs are added by `ensure_topics`).
    pub fn topics(&self) -> [&str; 6] {
        [
            self.chat.requests_topic.as_str(),
            self.chat.events_topic.as_str(),
            self.chat.memory_topic.as_str(),
            self.chat.tools_topic.as_str(),
            self.chat.tool_results_topic.as_str(),
            self.chat.config_topic.as_str(),
        ]
    }
}

/// Settings renamed in this release: `(old key, new key)`. The old key
/// still loads, with a warning, until the next release; the new key wins.
pub const DEPRECATED_KEYS: [(&str, &str); 2] = [
    ("postgres.api_keys_schema", "policy.api_keys.schema"),
    (
        "postgres.api_keys_max_connections",
        "policy.api_keys.max_connections",
    ),
];

/// The platform's sizing preset for `profile`: each section's own preset
/// (the soma crates' and this crate's `postgres`), mounted where
/// [`PlatformSettings`] mounts the section. [`loader`] sizes the settings
/// with it, and `GET /v1/runtime-config` lists its keys as `sizes`.
///
/// # Errors
/// [`ConfigError::ProfileViolation`] if a section's preset set anything
/// but a size (each crate's tests, and this crate's, prove none does).
pub fn preset(profile: DeploymentProfile) -> Result<ProfilePreset, ConfigError> {
    ProfilePreset::new(profile)
        .section("postgres", PostgresSettings::preset(profile))?
        .section("redis", RedisConfig::preset(profile))?
        .section("bus", BusConfig::preset(profile))?
        .section("relay", RelayConfig::preset(profile))?
        .section("policy", PolicyConfig::preset(profile))
}

/// The loader for [`PlatformSettings`]: the profile's [`preset`], the
/// given TOML files in order, then the `SOMA_*` environment; strict
/// (unknown keys are errors, except the [`DEPRECATED_KEYS`], read as their
/// replacements) and validated.
pub fn loader(files: &[PathBuf]) -> Loader<PlatformSettings> {
    let mut loader = Loader::<PlatformSettings>::new()
        .presets(preset)
        .strict(true);
    for (old, new) in DEPRECATED_KEYS {
        loader = loader.deprecated_key(old, new);
    }
    // The bus section's flat keys of before its nesting (`bus.linger_ms` →
    // `bus.producer.linger_ms`, ...): still read, with a warning, and
    // accepted by strict mode.
    for (old, new) in BusConfig::RENAMED {
        loader = loader.deprecated_key(&format!("bus.{old}"), &format!("bus.{new}"));
    }
    for f in files {
        loader = loader.file(f);
    }
    loader.validate(validate)
}

/// The rules no type expresses: counts and sizes of at least 1, a named
/// live-preview channel, a message limit within the body limit, and at
/// least one accepted credential.
fn validate(s: &PlatformSettings, checks: &mut Checks) {
    checks.ensure(!s.postgres.url.is_empty(), "postgres.url", "must be set");
    if let Err(e) = s.policy.api_keys.validate() {
        checks.fail(e.key(), e.to_string());
    }
    let at_least_one = [
        (s.chat.rate_limit > 0, "chat.rate_limit"),
        (s.chat.rate_window_secs > 0, "chat.rate_window_secs"),
        (s.chat.sse_buffer > 0, "chat.sse_buffer"),
        (s.chat.sse_heartbeat_ms > 0, "chat.sse_heartbeat_ms"),
        (
            s.chat.session_events_max_per_conversation > 0,
            "chat.session_events_max_per_conversation",
        ),
        (
            s.chat.session_events_prune_interval_ms > 0,
            "chat.session_events_prune_interval_ms",
        ),
        (
            s.memory.replica_lag_interval_ms > 0,
            "memory.replica_lag_interval_ms",
        ),
        (s.http.request_timeout_ms > 0, "http.request_timeout_ms"),
        (
            s.http.max_concurrent_requests > 0,
            "http.max_concurrent_requests",
        ),
        (s.llm.request_timeout_ms > 0, "llm.request_timeout_ms"),
        (s.operator.dlq_scan_max > 0, "operator.dlq_scan_max"),
    ];
    for (ok, key) in at_least_one {
        checks.ensure(ok, key, "must be at least 1");
    }
    checks.ensure(
        !s.chat.live_previews
            || (s.chat.live_max_previews > 0 && valid_live_channel(&s.chat.live_channel)),
        "chat.live_channel",
        "live previews need a channel name (no `:`, spaces, braces or glob \
         characters) and chat.live_max_previews of at least 1",
    );
    checks.ensure(
        s.chat.max_message_bytes > 0 && s.chat.max_message_bytes <= s.http.max_body_bytes,
        "chat.max_message_bytes",
        "must be between 1 and http.max_body_bytes",
    );
    checks.ensure(
        s.tools.timeout_ms > 0 && s.tools.max_output_bytes > 0,
        "tools",
        "timeout_ms and max_output_bytes must be at least 1",
    );
    checks.ensure(
        !s.policy.issuers.is_empty() || s.policy.api_keys.enabled,
        "policy.issuers",
        "no credential is accepted: configure an issuer or enable API keys",
    );
    crate::workspace::validate(&s.workspace, checks);
}

/// A Redis pub/sub channel name live previews can use: 1–128 visible ASCII
/// characters, none of `:{}*?[]` (key separators and glob characters).
fn valid_live_channel(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && !b":{}*?[]".contains(&b))
}

/// Loads the settings into a live registry (see [`loader`]).
pub fn load(files: &[PathBuf]) -> Result<Live<PlatformSettings>, ConfigError> {
    loader(files).into_live()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each crate proves its own preset's keys against its own section;
    /// this proves they are mounted where these settings have the sections
    /// (a preset key the settings lack would size nothing), and pins what
    /// each profile sizes.
    #[test]
    fn every_composed_preset_key_is_a_numeric_setting() {
        for profile in DeploymentProfile::ALL {
            PostgresSettings::preset(profile)
                .check(&PostgresSettings::default())
                .unwrap();
            preset(profile)
                .unwrap()
                .check(&PlatformSettings::default())
                .unwrap();
        }
        let table = [
            ("bus.consumer.concurrency", 4, 16),
            ("bus.topics.partitions", 1, 12),
            ("policy.cache.capacity", 1_000, 100_000),
            ("postgres.connect_timeout_ms", 2_000, 5_000),
            ("postgres.max_connections", 5, 50),
            ("redis.command_timeout_ms", 1_000, 2_000),
            ("redis.connect_timeout_ms", 2_000, 5_000),
            ("redis.pool_size", 4, 32),
            ("relay.batch_size", 50, 500),
            ("relay.poll_interval_ms", 100, 500),
        ];
        let local = preset(DeploymentProfile::Local).unwrap();
        let prod = preset(DeploymentProfile::Prod).unwrap();
        assert_eq!(
            local.entries().collect::<Vec<_>>(),
            table.map(|(key, size, _)| (key, size))
        );
        assert_eq!(
            prod.entries().collect::<Vec<_>>(),
            table.map(|(key, _, size)| (key, size))
        );
    }

    #[test]
    fn the_local_file_loads_strictly_and_the_prod_profile_resizes() {
        let file = concat!(env!("CARGO_MANIFEST_DIR"), "/config/local.toml");
        let issuer = tempfile_issuer();
        let live = loader(&[file.into(), issuer.clone()])
            .without_env()
            .into_live()
            .unwrap();
        let s = live.load();
        assert_eq!(s.profile, DeploymentProfile::Local);
        assert_eq!(s.relay.batch_size, 50);
        assert_eq!(s.policy.issuers.len(), 1);
        let prod = loader(&[file.into(), issuer])
            .without_env()
            .set("profile", "prod")
            .load()
            .unwrap();
        assert_eq!(prod.relay.batch_size, 500);
        assert_eq!(prod.redis.pool_size, 32);
        // The bus section follows the profile: prod topics are replicated.
        assert_eq!(s.bus.deployment_profile, DeploymentProfile::Local);
        assert_eq!(s.bus.replication_factor(), 1);
        assert_eq!(prod.bus.deployment_profile, DeploymentProfile::Prod);
        assert_eq!(
            (
                prod.bus.replication_factor(),
                prod.bus.min_insync_replicas()
            ),
            (3, Some(2))
        );
        // Sizing only: authentication and policy are untouched.
        assert_eq!(prod.policy.fail_mode, s.policy.fail_mode);
        assert_eq!(prod.policy.issuers.len(), 1);
    }

    #[test]
    fn a_live_channel_that_is_not_a_plain_name_is_refused() {
        let issuer = tempfile_issuer();
        let load = |channel: &str| {
            loader(std::slice::from_ref(&issuer))
                .without_env()
                .set("chat.live_channel", channel)
                .load()
        };
        assert_eq!(load("chat-live").unwrap().chat.live_channel, "chat-live");
        for bad in ["a:b", "", "with space", "glob*"] {
            let err = load(bad).unwrap_err().to_string();
            assert!(err.contains("chat.live_channel"), "{bad:?}: {err}");
        }
        let off = loader(&[issuer])
            .without_env()
            .set("chat.live_previews", false)
            .set("chat.live_channel", "")
            .load();
        assert!(off.is_ok(), "no channel needed when previews are off");
    }

    /// The bus section's flat keys still load under strict mode (the
    /// loader reads them as the nested ones), and a nested key wins.
    #[test]
    fn flat_bus_keys_load_as_the_nested_ones() {
        let issuer = tempfile_issuer();
        let load = |env: &[(&str, &str)]| {
            loader(std::slice::from_ref(&issuer))
                .env_from(env.iter().copied())
                .load()
                .unwrap()
        };
        let s = load(&[
            ("SOMA_BUS__CONSUMER_FETCH_WAIT_MS", "70"),
            ("SOMA_BUS__TOPIC_PARTITIONS", "3"),
        ]);
        assert_eq!(s.bus.consumer.fetch_wait_ms, Some(70));
        assert_eq!(s.bus.topics.partitions, 3);
        let s = load(&[
            ("SOMA_BUS__CONSUMER_FETCH_WAIT_MS", "70"),
            ("SOMA_BUS__CONSUMER__FETCH_WAIT_MS", "80"),
        ]);
        assert_eq!(s.bus.consumer.fetch_wait_ms, Some(80));
    }

    /// The API-key store's settings moved from `postgres.api_keys_*` to
    /// `policy.api_keys.*`: both spellings load (file and environment), and
    /// the new one wins when both are set.
    #[test]
    fn api_key_store_settings_load_under_the_new_and_the_deprecated_keys() {
        let issuer = tempfile_issuer();
        let dir = issuer.parent().unwrap().to_owned();
        let file = |name: &str, body: &str| {
            let p = dir.join(name);
            std::fs::write(&p, body).unwrap();
            p
        };
        let keys = |s: &PlatformSettings| {
            (
                s.policy.api_keys.schema.clone(),
                s.policy.api_keys.max_connections,
            )
        };
        let load = |files: &[PathBuf], env: &[(&str, &str)]| {
            let mut all = vec![issuer.clone()];
            all.extend_from_slice(files);
            loader(&all).env_from(env.iter().copied()).load()
        };

        let defaults = load(&[], &[]).unwrap();
        assert_eq!(keys(&defaults), ("soma_api_keys".into(), 2));

        let new = file(
            "keys-new.toml",
            "[policy.api_keys]\nschema = \"new_keys\"\nmax_connections = 4\n",
        );
        assert_eq!(
            keys(&load(std::slice::from_ref(&new), &[]).unwrap()),
            ("new_keys".into(), 4)
        );

        let old = file(
            "keys-old.toml",
            "[postgres]\napi_keys_schema = \"old_keys\"\napi_keys_max_connections = 3\n",
        );
        assert_eq!(
            keys(&load(std::slice::from_ref(&old), &[]).unwrap()),
            ("old_keys".into(), 3)
        );
        let old_env = [
            ("SOMA_POSTGRES__API_KEYS_SCHEMA", "env_keys"),
            ("SOMA_POSTGRES__API_KEYS_MAX_CONNECTIONS", "5"),
        ];
        assert_eq!(keys(&load(&[], &old_env).unwrap()), ("env_keys".into(), 5));

        // Both set: the new key wins, whichever source is higher.
        let both = file(
            "keys-both.toml",
            "[postgres]\napi_keys_schema = \"old_keys\"\n\
             [policy.api_keys]\nschema = \"new_keys\"\n",
        );
        assert_eq!(keys(&load(&[both], &[]).unwrap()).0, "new_keys");
        assert_eq!(
            keys(&load(&[new], &old_env).unwrap()),
            ("new_keys".into(), 4)
        );
        // Old in one field, new in the other: each field takes what is set.
        assert_eq!(
            keys(&load(&[old], &[("SOMA_POLICY__API_KEYS__MAX_CONNECTIONS", "6")]).unwrap()),
            ("old_keys".into(), 6)
        );

        // Validated under either spelling, and named by the new key.
        for env in [
            [("SOMA_POLICY__API_KEYS__SCHEMA", "bad-name")],
            [("SOMA_POSTGRES__API_KEYS_SCHEMA", "bad-name")],
        ] {
            let err = load(&[], &env).unwrap_err().to_string();
            assert!(err.contains("policy.api_keys.schema"), "{err}");
        }
        let err = load(&[], &[("SOMA_POSTGRES__API_KEYS_MAX_CONNECTIONS", "0")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("policy.api_keys.max_connections"), "{err}");
    }

    fn tempfile_issuer() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("soma-platform-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("issuer.toml");
        std::fs::write(
            &p,
            "[[policy.issuers]]\nissuer = \"t\"\n[[policy.issuers.keys]]\nalg = \"HS256\"\nsecret = \"s\"\n",
        )
        .unwrap();
        p
    }
}
