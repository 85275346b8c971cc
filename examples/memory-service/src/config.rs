//! The service's settings: one section per concern, loaded by soma-config.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use soma_config::{ConfigError, Loader, Secret};
use soma_observability::TelemetryConfig;

/// How recall ranks memories against a query.
///
/// All are PostgreSQL-native and score only the scope's newest
/// [`MemoryConfig::recall_window`] memories. The default, `hybrid`, was
/// chosen by the measured recall quality on the labelled set in
/// `tests/relevance.rs` (MRR@10 0.72, as `trigram`, against 0.65 for
/// `fts`) and by cost (`benches/recall.rs`: about what `fts` costs, several
/// hundred times less than `trigram` over a 10,000-memory scope); the
/// README has both tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Ranking {
    /// Full-text search: `to_tsvector('english', text)` against the query's
    /// stemmed terms OR-ed together, scored by `ts_rank` normalised to
    /// `rank / (rank + 1)`. Matches word forms ("booked" ~ "booking"), not
    /// misspellings.
    Fts,
    /// Trigram similarity (`pg_trgm`): `word_similarity(query, text)`, the
    /// best match of the query against any stretch of the memory's text.
    /// Tolerates misspellings and partial words, not synonyms. Costs a
    /// similarity computation per memory in the recall window.
    Trigram,
    /// Full text first; when it finds fewer than `top_k` hits, trigram
    /// similarity ranks the rest of the window (misspellings, word parts)
    /// after every full-text hit. Costs about what `fts` costs when full
    /// text finds enough, and what `trigram` costs otherwise. The default.
    #[default]
    Hybrid,
}

impl Ranking {
    /// `fts`, `trigram` or `hybrid`.
    pub fn as_str(self) -> &'static str {
        match self {
            Ranking::Fts => "fts",
            Ranking::Trigram => "trigram",
            Ranking::Hybrid => "hybrid",
        }
    }
}

/// The `memory` section: the SomaBrain contract this service serves.
///
/// ```
/// let cfg: soma_memory_service::MemoryConfig = serde_json::from_str(
///     r#"{"token": "local-dev-token", "ranking": "fts"}"#,
/// ).unwrap();
/// assert_eq!(cfg.ranking, soma_memory_service::Ranking::Fts);
/// assert_eq!(cfg.wm_capacity, 32); // untouched keys keep their defaults
/// assert!(!format!("{cfg:?}").contains("local-dev-token"));
/// ```
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct MemoryConfig {
    /// The bearer token every memory and context route requires
    /// (`Authorization: Bearer <token>`). Must be set: an empty token refuses
    /// to start rather than serve unauthenticated.
    pub token: Secret,
    /// Working-memory size per tenant and namespace: the most recently
    /// written memories that count as `wm` (older ones are `ltm` only).
    pub wm_capacity: u32,
    /// How recall ranks memories.
    pub ranking: Ranking,
    /// How many of a scope's newest memories (tenant + namespace, or the
    /// whole tenant for context evaluate) recall scores. Older memories
    /// stay stored but are not recalled: the bound that keeps a recall's
    /// cost flat as a busy conversation's memories grow (SomaBrain's own
    /// long-term memory searches an approximate vector index instead).
    /// 256 by default: at 1,000 a full window cost 4–6 ms of PostgreSQL a
    /// recall and the platform's load decayed as busy conversations filled
    /// it; at 256, 0.7 ms.
    pub recall_window: u32,
    /// Smallest trigram `word_similarity` that counts as a hit (`trigram`
    /// ranking only; full-text hits are every memory sharing a stemmed term).
    pub trigram_threshold: f64,
    /// Largest `top_k` honoured; larger requests are capped.
    pub max_top_k: u32,
    /// Universe used when a write or recall names none (SomaBrain's `real`).
    pub default_universe: String,
    /// How often expired memories (`ttl_seconds`) are deleted. Expired
    /// memories are invisible to recall at once; the sweep frees the rows.
    pub ttl_sweep_interval_secs: u64,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            token: Secret::default(),
            wm_capacity: 32,
            ranking: Ranking::default(),
            recall_window: 256,
            trigram_threshold: 0.3,
            max_top_k: 100,
            default_universe: "real".into(),
            ttl_sweep_interval_secs: 60,
            max_body_bytes: 1 << 20,
        }
    }
}

/// The `postgres` section: where memories are stored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct PostgresSettings {
    /// Connection URL.
    pub url: String,
    /// Schema of the service's tables, created and migrated at start
    /// (`[a-z_][a-z0-9_]*`).
    pub schema: String,
    /// Pool size.
    pub max_connections: u32,
    /// How long to wait for a connection.
    pub connect_timeout_ms: u64,
}

impl Default for PostgresSettings {
    fn default() -> Self {
        Self {
            url: "postgres://postgres@127.0.0.1:5432/test".into(),
            schema: "soma_memory".into(),
            max_connections: 8,
            connect_timeout_ms: 5_000,
        }
    }
}

/// The `http` section.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct HttpSettings {
    /// Listen address of the API, the probes and the admin routes.
    pub bind: String,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            bind: "127.0.0.1:9696".into(),
        }
    }
}

/// Everything the `soma-memory-service` binary is configured with.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    /// Logs, traces and metric labels (soma-observability).
    pub telemetry: TelemetryConfig,
    /// Listen address.
    pub http: HttpSettings,
    /// Storage.
    pub postgres: PostgresSettings,
    /// The memory contract.
    pub memory: MemoryConfig,
}

/// Whether `schema` is a plain lowercase identifier.
pub(crate) fn valid_schema(schema: &str) -> bool {
    let mut chars = schema.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && schema.len() <= 48
}

/// The loader for [`Settings`]: defaults < the given TOML files (in order) <
/// `SOMA_*` environment variables (`SOMA_HTTP__BIND=127.0.0.1:9797`),
/// validated.
///
/// Not strict: an unknown key is logged, not fatal, because the stack
/// scripts run the binary in a shell that carries other `SOMA_*` variables.
pub fn loader(files: &[PathBuf]) -> Loader<Settings> {
    let mut loader = Loader::<Settings>::new();
    for f in files {
        loader = loader.file(f);
    }
    loader.validate(|s, checks| {
        checks.ensure(
            !s.memory.token.is_empty(),
            "memory.token",
            "must be set (the bearer token clients send)",
        );
        checks.ensure(
            valid_schema(&s.postgres.schema),
            "postgres.schema",
            "must match [a-z_][a-z0-9_]* (at most 48 characters)",
        );
        checks.ensure(
            s.memory.max_top_k > 0,
            "memory.max_top_k",
            "must be at least 1",
        );
        checks.ensure(
            s.memory.recall_window >= s.memory.wm_capacity.max(1),
            "memory.recall_window",
            "must be at least memory.wm_capacity (and 1)",
        );
        checks.ensure(
            (0.0..=1.0).contains(&s.memory.trigram_threshold),
            "memory.trigram_threshold",
            "must be between 0 and 1",
        );
        checks.ensure(
            !s.memory.default_universe.is_empty(),
            "memory.default_universe",
            "must not be empty",
        );
    })
}

/// Loads the settings once (see [`loader`]).
pub fn load(files: &[PathBuf]) -> Result<Settings, ConfigError> {
    loader(files).load()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names() {
        assert!(valid_schema("soma_memory"));
        assert!(valid_schema("_x1"));
        assert!(!valid_schema("1x"));
        assert!(!valid_schema("Soma"));
        assert!(!valid_schema("a;drop"));
        assert!(!valid_schema(""));
    }

    #[test]
    fn an_empty_token_is_refused() {
        let err = loader(&[]).without_env().load().unwrap_err();
        assert!(err.is_validation(), "{err}");
        assert!(err.to_string().contains("memory.token"), "{err}");
        let ok = loader(&[])
            .without_env()
            .set("memory.token", "t")
            .load()
            .unwrap();
        assert_eq!(ok.http.bind, "127.0.0.1:9696");
    }
}
