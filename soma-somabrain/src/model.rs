//! Request and response types of the SomaBrain API.
//!
//! Requests carry only what the caller chooses; the client adds the tenant
//! and namespace of the call (so the body and the `X-Tenant-ID` header can
//! never disagree). Responses tolerate unknown fields and missing optional
//! fields, so a newer server does not break an older client.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A JSON object.
pub type JsonObject = Map<String, Value>;

/// One memory to store: the body of `POST /memory/remember` without
/// `tenant`/`namespace`, and one item of a batch.
///
/// The same `key` + `universe` maps to the same coordinate, so writing a key
/// again overwrites it. That is what makes retrying a write safe.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Memory {
    /// Caller-chosen key, unique within the universe (non-empty).
    pub key: String,
    /// The memory's content (a JSON object).
    pub value: JsonObject,
    /// Free-form metadata.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<JsonObject>,
    /// Universe (coordinate space); the server's default when `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub universe: Option<String>,
    /// Time to live.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<u64>,
    /// Tags.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Policy tags.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policy_tags: Vec<String>,
    /// Attachments.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attachments: Vec<Attachment>,
    /// Links to other memories.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub links: Vec<Link>,
    /// Write-time signals.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signals: Option<Signals>,
    /// Importance (≥ 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub importance: Option<f64>,
    /// Novelty (≥ 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub novelty: Option<f64>,
    /// Trace id to store with the memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
}

impl Memory {
    /// A memory with a key and an object value.
    pub fn new(key: impl Into<String>, value: JsonObject) -> Self {
        Memory {
            key: key.into(),
            value,
            ..Memory::default()
        }
    }

    /// A memory from any JSON value; the value must be an object.
    pub fn from_json(key: impl Into<String>, value: Value) -> Result<Self, crate::Error> {
        match value {
            Value::Object(value) => Ok(Memory::new(key, value)),
            other => Err(crate::Error::invalid(
                None,
                format!(
                    "memory value must be a JSON object, got {}",
                    json_type(&other)
                ),
            )),
        }
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.key.is_empty() {
            return Err("memory key must not be empty".into());
        }
        for (name, v) in [("importance", self.importance), ("novelty", self.novelty)] {
            if v.is_some_and(|v| !(v >= 0.0 && v.is_finite())) {
                return Err(format!("{name} must be a finite number >= 0"));
            }
        }
        if let Some(s) = &self.signals {
            for (name, v) in [
                ("signals.importance", s.importance),
                ("signals.novelty", s.novelty),
            ] {
                if v.is_some_and(|v| !(v >= 0.0 && v.is_finite())) {
                    return Err(format!("{name} must be a finite number >= 0"));
                }
            }
        }
        if let Some(w) = self
            .links
            .iter()
            .filter_map(|l| l.weight)
            .find(|w| w.is_nan() || *w < 0.0)
        {
            return Err(format!("link weight must be >= 0, got {w}"));
        }
        Ok(())
    }
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// An attachment of a memory.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Attachment {
    /// Attachment kind (required).
    pub kind: String,
    /// Where the content lives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    /// MIME type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    /// Checksum of the content.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksum: Option<String>,
    /// Inline content, base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    /// Free-form metadata.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<JsonObject>,
}

/// A link from a memory to another.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Link {
    /// Relation name.
    pub rel: String,
    /// Target key or coordinate.
    pub target: String,
    /// Weight (≥ 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<f64>,
    /// Free-form metadata.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<JsonObject>,
}

/// Write-time signals of a memory.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Signals {
    /// Importance (≥ 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub importance: Option<f64>,
    /// Novelty (≥ 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub novelty: Option<f64>,
    /// Time to live.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<u64>,
    /// Reinforcement hint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reinforcement: Option<String>,
    /// Recall-bias hint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recall_bias: Option<String>,
}

/// Signals as the server applied them (echoed in write responses).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[non_exhaustive]
pub struct SignalFeedback {
    /// Importance applied.
    #[serde(default)]
    pub importance: Option<f64>,
    /// Novelty applied.
    #[serde(default)]
    pub novelty: Option<f64>,
    /// TTL applied.
    #[serde(default)]
    pub ttl_seconds: Option<u64>,
    /// Reinforcement applied.
    #[serde(default)]
    pub reinforcement: Option<String>,
    /// Recall bias applied.
    #[serde(default)]
    pub recall_bias: Option<String>,
    /// Whether the memory entered working memory.
    #[serde(default)]
    pub promoted_to_wm: Option<bool>,
    /// Whether the server reports a long-term persist.
    #[serde(default)]
    pub persisted_to_ltm: Option<bool>,
}

/// Response of `POST /memory/remember`.
///
/// **`persisted_to_ltm: true` is not proof of durability**: the server
/// reports it even when its long-term backend is down. Read
/// [`warnings`](Self::warnings) (e.g. `ltm-persist:queued-async` after a
/// fast ack) and [`memory_backend_down`](Self::memory_backend_down) (set by
/// the client from the server's `/health`);
/// [`is_confirmed`](Self::is_confirmed) combines them.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[non_exhaustive]
pub struct RememberResponse {
    /// Whether the server accepted the write.
    pub ok: bool,
    /// Tenant the memory was stored under.
    pub tenant: String,
    /// Namespace the memory was stored under.
    pub namespace: String,
    /// Key of the memory.
    #[serde(default)]
    pub key: Option<String>,
    /// Coordinate (3 floats) derived from universe + key.
    #[serde(default)]
    pub coordinate: Option<Vec<f64>>,
    /// Admitted to working memory.
    #[serde(default)]
    pub promoted_to_wm: bool,
    /// The server *reports* a long-term persist (see the type docs).
    #[serde(default)]
    pub persisted_to_ltm: bool,
    /// The long-term persist was queued (fast ack).
    #[serde(default)]
    pub queued_for_ltm: bool,
    /// The write was a duplicate of a stored memory.
    #[serde(default)]
    pub deduplicated: bool,
    /// Importance applied.
    #[serde(default)]
    pub importance: Option<f64>,
    /// Novelty applied.
    #[serde(default)]
    pub novelty: Option<f64>,
    /// TTL applied, seconds.
    #[serde(default)]
    pub ttl_applied: Option<u64>,
    /// Trace id stored with the memory.
    #[serde(default)]
    pub trace_id: Option<String>,
    /// Request id (echoes `X-Request-ID`).
    #[serde(default)]
    pub request_id: Option<String>,
    /// Server warnings about this write. Never ignore them.
    #[serde(default)]
    pub warnings: Vec<String>,
    /// Signals as applied.
    #[serde(default)]
    pub signals: Option<SignalFeedback>,
    /// Set by the client, not sent by the server: the last `/health` the
    /// client read reported `memory_ok: false`, so the server's
    /// `persisted_to_ltm` cannot be believed (see
    /// [`SomabrainClient::memory_backend_down`](crate::SomabrainClient::memory_backend_down)).
    #[serde(skip)]
    pub memory_backend_down: bool,
}

impl RememberResponse {
    /// `ok`, reported persisted to long-term memory, no warnings, and the
    /// server's memory backend not known to be down: the strongest
    /// acknowledgement there is. `false` means the write may exist only in
    /// working memory (or nowhere durable): keep the data if it matters.
    pub fn is_confirmed(&self) -> bool {
        self.ok && self.persisted_to_ltm && self.warnings.is_empty() && !self.memory_backend_down
    }
}

/// The body of `POST /memory/remember/batch` without `tenant`/`namespace`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RememberBatch {
    /// The memories (at least one).
    pub items: Vec<Memory>,
    /// Universe for every item that does not name one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub universe: Option<String>,
}

/// One item of a batch write response.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[non_exhaustive]
pub struct BatchItemResult {
    /// Key of the memory.
    pub key: String,
    /// Coordinate.
    #[serde(default)]
    pub coordinate: Option<Vec<f64>>,
    /// Admitted to working memory.
    #[serde(default)]
    pub promoted_to_wm: bool,
    /// The server *reports* a long-term persist (not proof of durability).
    #[serde(default)]
    pub persisted_to_ltm: bool,
    /// The long-term persist was queued.
    #[serde(default)]
    pub queued_for_ltm: bool,
    /// Duplicate of a stored memory.
    #[serde(default)]
    pub deduplicated: bool,
    /// Importance applied.
    #[serde(default)]
    pub importance: Option<f64>,
    /// Novelty applied.
    #[serde(default)]
    pub novelty: Option<f64>,
    /// TTL applied, seconds.
    #[serde(default)]
    pub ttl_applied: Option<u64>,
    /// Trace id.
    #[serde(default)]
    pub trace_id: Option<String>,
    /// `<X-Request-ID>:<index>`.
    #[serde(default)]
    pub request_id: Option<String>,
    /// Server warnings about this item.
    #[serde(default)]
    pub warnings: Vec<String>,
    /// Signals as applied.
    #[serde(default)]
    pub signals: Option<SignalFeedback>,
}

/// Response of `POST /memory/remember/batch`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[non_exhaustive]
pub struct RememberBatchResponse {
    /// Whether the server accepted the batch.
    pub ok: bool,
    /// Tenant.
    pub tenant: String,
    /// Namespace.
    pub namespace: String,
    /// Per-item results, in request order.
    #[serde(default)]
    pub results: Vec<BatchItemResult>,
    /// Set by the client, not sent by the server: the last `/health` the
    /// client read reported `memory_ok: false`, so no item's
    /// `persisted_to_ltm` can be believed.
    #[serde(skip)]
    pub memory_backend_down: bool,
}

impl RememberBatchResponse {
    /// `ok`, every item reported persisted to long-term memory without
    /// warnings, and the server's memory backend not known to be down (see
    /// [`RememberResponse::is_confirmed`]).
    pub fn is_confirmed(&self) -> bool {
        self.ok
            && !self.memory_backend_down
            && self
                .results
                .iter()
                .all(|r| r.persisted_to_ltm && r.warnings.is_empty())
    }

    /// Every warning of every item, as `(key, warning)`.
    pub fn warnings(&self) -> impl Iterator<Item = (&str, &str)> {
        self.results
            .iter()
            .flat_map(|r| r.warnings.iter().map(|w| (r.key.as_str(), w.as_str())))
    }
}

/// Memory layer of a recall (named apart from tower's `Layer`, the
/// middleware trait every other soma crate uses).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum MemoryLayer {
    /// Working memory only.
    Wm,
    /// Long-term memory only.
    Ltm,
    /// Both (the server's default).
    #[default]
    Both,
}

/// The old name of [`MemoryLayer`], which read like tower's `Layer`.
#[deprecated(
    since = "0.2.0",
    note = "renamed `MemoryLayer` (apart from tower's `Layer`)"
)]
pub type Layer = MemoryLayer;

/// The body of `POST /memory/recall` without `namespace`.
///
/// The server takes the tenant from `X-Tenant-ID`, which the client sets to
/// the call's tenant.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RecallRequest {
    /// The query text (required).
    pub query: String,
    /// Maximum results (server default 10).
    pub top_k: u32,
    /// Layer; `None` lets the server choose (`both`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layer: Option<MemoryLayer>,
    /// Universe.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub universe: Option<String>,
}

impl RecallRequest {
    /// A recall of `query` with `top_k` 10.
    pub fn new(query: impl Into<String>) -> Self {
        RecallRequest {
            query: query.into(),
            top_k: 10,
            layer: None,
            universe: None,
        }
    }

    /// Sets `top_k`. `0` is refused by
    /// [`recall`](crate::SomabrainClient::recall) with an invalid-request
    /// error (the server would silently answer it as 1).
    pub fn top_k(mut self, top_k: u32) -> Self {
        self.top_k = top_k;
        self
    }

    /// Sets the layer.
    pub fn layer(mut self, layer: MemoryLayer) -> Self {
        self.layer = Some(layer);
        self
    }
}

/// Layer a recall hit came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HitLayer {
    /// Working memory.
    Wm,
    /// Long-term memory.
    Ltm,
    /// A layer this client does not know.
    #[serde(other)]
    Other,
}

/// One recall result.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[non_exhaustive]
pub struct RecallHit {
    /// The stored payload (the memory's value plus server fields such as
    /// `key`, `tenant`, `namespace`, `tags`).
    #[serde(default)]
    pub content: JsonObject,
    /// Where the hit came from.
    pub layer: HitLayer,
    /// Score (working-memory hits always score 1.0).
    #[serde(default)]
    pub score: f64,
    /// Coordinate, when the server sends it.
    #[serde(default)]
    pub coordinate: Option<Vec<f64>>,
}

impl RecallHit {
    /// The memory key stored in the payload.
    pub fn key(&self) -> Option<&str> {
        self.content.get("key").and_then(Value::as_str)
    }

    /// The namespace stored in the payload.
    pub fn namespace(&self) -> Option<&str> {
        self.content.get("namespace").and_then(Value::as_str)
    }
}

/// Response of `POST /memory/recall`.
///
/// Known server behaviour: the working-memory part is not a similarity
/// search and is **not filtered by namespace** (every WM item of the tenant
/// comes back with score 1.0), so with a small `top_k` WM items can crowd
/// out long-term hits, and a recall in one namespace can return WM items of
/// another. [`hits_in_namespace`](Self::hits_in_namespace) filters them.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[non_exhaustive]
pub struct RecallResponse {
    /// Tenant the server used (from `X-Tenant-ID`).
    pub tenant: String,
    /// Namespace.
    pub namespace: String,
    /// Hits, best first.
    #[serde(default)]
    pub results: Vec<RecallHit>,
    /// Working-memory hits before `top_k`.
    #[serde(default)]
    pub wm_hits: u64,
    /// Long-term hits before `top_k`.
    #[serde(default)]
    pub ltm_hits: u64,
    /// Server-side duration.
    #[serde(default)]
    pub duration_ms: f64,
    /// `results.len()` as the server counts it.
    #[serde(default)]
    pub total_results: u64,
    /// The server answered from a degraded path.
    #[serde(default)]
    pub degraded: bool,
    /// Why it was degraded.
    #[serde(default)]
    pub degraded_reasons: Vec<String>,
}

impl RecallResponse {
    /// Hits whose payload is in the response's namespace (or names none).
    pub fn hits_in_namespace(&self) -> impl Iterator<Item = &RecallHit> {
        self.results
            .iter()
            .filter(|h| h.namespace().is_none_or(|ns| ns == self.namespace))
    }

    /// Whether long-term hits were found but cut by `top_k`.
    pub fn ltm_hits_truncated(&self) -> bool {
        let returned = self
            .results
            .iter()
            .filter(|h| h.layer == HitLayer::Ltm)
            .count() as u64;
        returned < self.ltm_hits
    }
}

/// Response of `GET /memory/metrics`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[non_exhaustive]
pub struct MemoryMetrics {
    /// Tenant.
    pub tenant: String,
    /// Namespace.
    pub namespace: String,
    /// Items in working memory.
    #[serde(default)]
    pub wm_items: u64,
    /// The server's own breaker towards its memory backend.
    #[serde(default)]
    pub circuit_open: bool,
}

/// The body of `POST /context/evaluate` without `tenant_id`
/// (the platform's "context build").
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ContextRequest {
    /// Session id.
    pub session_id: String,
    /// The query.
    pub query: String,
    /// Memories to include.
    pub top_k: u32,
}

/// Response of `POST /context/evaluate`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ContextResponse {
    /// The query.
    #[serde(default)]
    pub query: String,
    /// The assembled prompt.
    #[serde(default)]
    pub prompt: String,
    /// Tenant.
    #[serde(default)]
    pub tenant_id: String,
    /// Memories used.
    #[serde(default)]
    pub memories: Vec<Value>,
    /// Retrieval weights used.
    #[serde(default)]
    pub weights: Value,
}

/// The body of `POST /context/feedback` without `tenant_id`
/// (the platform's "reward update").
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FeedbackRequest {
    /// Session id.
    pub session_id: String,
    /// The query.
    pub query: String,
    /// The prompt that was used.
    pub prompt: String,
    /// The model's response.
    pub response_text: String,
    /// Utility of the response.
    pub utility: f64,
    /// Reward.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reward: Option<f64>,
    /// Free-form metadata.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<JsonObject>,
}

/// Response of `POST /context/feedback`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct FeedbackResponse {
    /// The feedback was recorded.
    #[serde(default)]
    pub accepted: bool,
    /// Weights were adapted.
    #[serde(default)]
    pub adaptation_applied: bool,
}

/// Retrieval weights.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RetrievalWeights {
    /// α.
    #[serde(default)]
    pub alpha: f64,
    /// β.
    #[serde(default)]
    pub beta: f64,
    /// γ.
    #[serde(default)]
    pub gamma: f64,
    /// τ.
    #[serde(default)]
    pub tau: f64,
}

/// Utility weights.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct UtilityWeights {
    /// λ (sent as `lambda_`).
    #[serde(default, rename = "lambda_")]
    pub lambda: f64,
    /// μ.
    #[serde(default)]
    pub mu: f64,
    /// ν.
    #[serde(default)]
    pub nu: f64,
}

/// Response of `GET /context/adaptation/state` (the platform's "weights").
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct AdaptationState {
    /// Tenant.
    #[serde(default)]
    pub tenant_id: String,
    /// Retrieval weights.
    #[serde(default)]
    pub retrieval: RetrievalWeights,
    /// Utility weights.
    #[serde(default)]
    pub utility: UtilityWeights,
    /// Feedback events seen.
    #[serde(default)]
    pub history_len: u64,
    /// Learning rate.
    #[serde(default)]
    pub learning_rate: f64,
}

/// Response of `GET /context/feature-flags`: flag name → enabled.
///
/// Entries whose value is not a boolean are dropped rather than failing the
/// whole call.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct FeatureFlags(pub BTreeMap<String, bool>);

impl FeatureFlags {
    /// Whether `flag` is present and enabled.
    pub fn is_enabled(&self, flag: &str) -> bool {
        self.0.get(flag).copied().unwrap_or(false)
    }

    /// The flag's value, `None` when the server does not know it.
    pub fn get(&self, flag: &str) -> Option<bool> {
        self.0.get(flag).copied()
    }
}

impl<'de> Deserialize<'de> for FeatureFlags {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = BTreeMap::<String, Value>::deserialize(d)?;
        Ok(FeatureFlags(
            raw.into_iter()
                .filter_map(|(k, v)| v.as_bool().map(|b| (k, b)))
                .collect(),
        ))
    }
}

/// Response of `GET /healthz` (liveness).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[non_exhaustive]
pub struct Liveness {
    /// `healthy` when alive.
    #[serde(default)]
    pub status: String,
}

/// Readiness status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReadyStatus {
    /// Ready to serve.
    Ready,
    /// Serving with failed checks (the server answers 503).
    Degraded,
    /// A status this client does not know.
    #[serde(other)]
    Other,
}

/// Response of `GET /readyz`. A 503 with this body is returned as
/// `Ok(Readiness { status: Degraded, .. })`, not as an error.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[non_exhaustive]
pub struct Readiness {
    /// Ready or degraded.
    pub status: ReadyStatus,
    /// Per-check status, e.g. `{"database": "healthy"}`.
    #[serde(default)]
    pub checks: BTreeMap<String, Value>,
}

/// Aggregate status of `GET /health`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AggregateStatus {
    /// Everything up.
    Healthy,
    /// Some components down.
    Degraded,
    /// Required components down.
    Critical,
    /// A status this client does not know.
    #[serde(other)]
    Other,
}

/// Response of `GET /health` (always 200; read [`status`](Self::status)).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[non_exhaustive]
pub struct AggregateHealth {
    /// Overall status.
    pub status: AggregateStatus,
    /// Server version.
    #[serde(default)]
    pub version: Option<String>,
    /// Everything else the server reports (components, counts, ...).
    #[serde(flatten)]
    pub details: JsonObject,
}

impl AggregateHealth {
    /// The server's `memory_ok`: `Some(false)` when its memory backend is
    /// down (while `/readyz` stays ready and remember still acknowledges
    /// `persisted_to_ltm: true`); `None` when the field is absent.
    pub fn memory_ok(&self) -> Option<bool> {
        self.details
            .get("memory_ok")
            .and_then(serde_json::Value::as_bool)
    }
}

#[derive(Serialize)]
pub(crate) struct WithScope<'a, T> {
    pub(crate) tenant: &'a str,
    pub(crate) namespace: &'a str,
    #[serde(flatten)]
    pub(crate) body: &'a T,
}

#[derive(Serialize)]
pub(crate) struct WithNamespace<'a, T> {
    #[serde(flatten)]
    pub(crate) body: &'a T,
    pub(crate) namespace: &'a str,
}

#[derive(Serialize)]
pub(crate) struct WithTenantId<'a, T> {
    #[serde(flatten)]
    pub(crate) body: &'a T,
    pub(crate) tenant_id: &'a str,
}
