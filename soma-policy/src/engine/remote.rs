//! OPA over HTTP (a sidecar): `POST {base}/v1/data/{path}` with `{"input": …}`.

use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;

use super::{EngineDecision, PolicyEngine, decision_from_value};
use soma_observability::health::{Criticality, HealthReporter};
use soma_observability::resilience::{BreakerState, CircuitBreaker, OpenHealth};
use soma_observability::{HealthRegistry, MetricsRegistry};

use crate::config::OpaConfig;
use crate::{AuthzInput, EngineError};

/// A remote OPA server. Plug it in with [`RemoteOpa::metrics`] and
/// [`RemoteOpa::health`].
///
/// Every call has a timeout. A circuit breaker (the shared
/// [`CircuitBreaker`], component `opa`) stops calling after
/// `failure_threshold` consecutive failures (timeouts, transport errors, 5xx,
/// malformed answers) for `open_ms`, then lets exactly one trial call
/// through; while open, and while the trial is out, calls fail at once with
/// [`EngineError::CircuitOpen`] (the authorizer's fail mode then applies). A
/// trial whose caller is cancelled frees the trial slot, so the next call
/// tries again. Nothing is retried here: a retry would double the latency of
/// a request that is already waiting.
#[derive(Debug)]
pub struct RemoteOpa {
    client: reqwest::Client,
    url: String,
    breaker: CircuitBreaker,
}

/// The old name of the shared
/// [`BreakerState`](soma_observability::resilience::BreakerState), the one
/// breaker state of every soma crate.
#[deprecated(
    since = "0.2.0",
    note = "one name in every soma crate: use `soma_observability::resilience::BreakerState`"
)]
pub type CircuitState = soma_observability::resilience::BreakerState;

impl RemoteOpa {
    /// A client for the OPA described by `config`.
    pub fn new(config: &OpaConfig) -> Result<Self, EngineError> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(config.timeout_ms.max(1)))
            .pool_max_idle_per_host(32)
            .build()
            .map_err(|e| EngineError::Transport(e.to_string()))?;
        let url = format!(
            "{}/v1/data/{}",
            config.base_url.trim_end_matches('/'),
            config.package_path.trim_matches('/')
        );
        Ok(Self {
            client,
            url,
            breaker: CircuitBreaker::new("opa", config.breaker),
        })
    }

    /// Reports the health component `opa` (required: policy decisions gate
    /// traffic) in `registry`: `up` from now on, `down` while the breaker is
    /// open, `up` again when a call succeeds.
    ///
    /// # Panics
    ///
    /// Never for a freshly built engine (the breaker is not shared yet).
    pub fn health(self, registry: &HealthRegistry) -> Self {
        self.health_reporter(registry.reporter("opa", Criticality::Required))
    }

    /// Exports the breaker's state as
    /// `soma_circuit_breaker_state{component="opa"}` (and its transitions) in
    /// `registry`.
    pub fn metrics(mut self, registry: &MetricsRegistry) -> Self {
        self.breaker = self.breaker.metrics(registry);
        self
    }

    fn health_reporter(mut self, reporter: HealthReporter) -> Self {
        reporter.set_up();
        self.breaker = self.breaker.health(reporter, OpenHealth::Down);
        self
    }

    /// Reports the engine's health through `reporter`: `down` while the
    /// breaker is open, `up` again when a call succeeds.
    #[deprecated(
        since = "0.2.0",
        note = "use `RemoteOpa::health(&HealthRegistry)`, which registers the component `opa`"
    )]
    pub fn with_health(self, reporter: HealthReporter) -> Self {
        self.health_reporter(reporter)
    }

    /// Exports the breaker's state; same as [`metrics`](RemoteOpa::metrics).
    #[deprecated(since = "0.2.0", note = "use `RemoteOpa::metrics(&MetricsRegistry)`")]
    pub fn with_metrics(self, registry: &MetricsRegistry) -> Self {
        self.metrics(registry)
    }

    /// The breaker's current state (the name the publisher and the
    /// SomaBrain client use too).
    pub fn breaker_state(&self) -> BreakerState {
        self.breaker.state()
    }

    /// The old name of [`RemoteOpa::breaker_state`].
    #[deprecated(
        since = "0.2.0",
        note = "renamed `breaker_state`, as in every soma crate"
    )]
    pub fn circuit_state(&self) -> BreakerState {
        self.breaker_state()
    }

    async fn call(&self, input: &AuthzInput) -> Result<EngineDecision, EngineError> {
        #[derive(Serialize)]
        struct Body<'a> {
            input: &'a AuthzInput,
        }
        let resp = self
            .client
            .post(&self.url)
            .json(&Body { input })
            .send()
            .await
            .map_err(map_reqwest)?;
        let status = resp.status();
        if status == reqwest::StatusCode::INTERNAL_SERVER_ERROR {
            // OPA answers an evaluation error (a conflict, a builtin error
            // under strict mode) with 500 `internal_error`: the engine is up,
            // the policy could not decide on this input.
            let bytes = resp.bytes().await.unwrap_or_default();
            return Err(classify_500(&bytes));
        }
        if !status.is_success() {
            return Err(EngineError::Status(status.as_u16()));
        }
        let bytes = resp.bytes().await.map_err(map_reqwest)?;
        let doc: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| EngineError::MalformedResponse(format!("not JSON: {e}")))?;
        let result = doc
            .as_object()
            .ok_or_else(|| EngineError::MalformedResponse("response is not an object".into()))?
            .get("result")
            .ok_or(EngineError::Undefined)?;
        decision_from_value(result)
    }
}

/// A 500 carrying OPA's error document `{"code": "internal_error", "message"}`
/// is an evaluation error; any other 500 (a proxy, a crashed sidecar) is
/// [`EngineError::Status`].
fn classify_500(body: &[u8]) -> EngineError {
    let doc: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    let opa_error = doc.as_ref().and_then(|d| {
        (d.get("code")?.as_str()? == "internal_error")
            .then(|| d.get("message").and_then(|m| m.as_str()).unwrap_or(""))
    });
    match opa_error {
        Some(message) => EngineError::Evaluation(message.chars().take(512).collect()),
        None => EngineError::Status(500),
    }
}

fn map_reqwest(e: reqwest::Error) -> EngineError {
    if e.is_timeout() {
        EngineError::Timeout
    } else {
        EngineError::Transport(e.to_string())
    }
}

#[async_trait]
impl PolicyEngine for RemoteOpa {
    fn name(&self) -> &'static str {
        "remote"
    }

    async fn evaluate(&self, input: &AuthzInput) -> Result<EngineDecision, EngineError> {
        // Dropped unreported if this future is cancelled: a cancelled trial
        // frees the half-open slot instead of holding the breaker open.
        let Ok(permit) = self.breaker.try_acquire() else {
            return Err(EngineError::CircuitOpen);
        };
        let r = self.call(input).await;
        match &r {
            // A 4xx is our request's fault, not the engine's health.
            // So is an evaluation error: the engine answered (and an input
            // crafted to fail evaluation must not open the breaker, which in
            // fail-open mode would allow everyone).
            Ok(_) | Err(EngineError::Status(0..500) | EngineError::Evaluation(_)) => {
                permit.success();
            }
            Err(e) => {
                tracing::debug!(event = "opa_call_failed", code = e.code());
                permit.failure();
            }
        }
        r
    }
}
