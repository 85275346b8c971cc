//! OPA over HTTP (a sidecar): `POST {base}/v1/data/{path}` with `{"input": …}`.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use parking_lot::Mutex;
use serde::Serialize;

use super::{EngineDecision, PolicyEngine, decision_from_value};
use soma_observability::health::HealthReporter;

use crate::config::OpaConfig;
use crate::{AuthzInput, EngineError};

/// A remote OPA server.
///
/// Every call has a timeout. A circuit breaker stops calling after
/// `failure_threshold` consecutive failures (timeouts, transport errors, 5xx,
/// malformed answers) for `reset_timeout_secs`, then lets one trial call
/// through; while open, calls fail at once with [`EngineError::CircuitOpen`]
/// (the authorizer's fail mode then applies). Nothing is retried here: a
/// retry would double the latency of a request that is already waiting.
#[derive(Debug)]
pub struct RemoteOpa {
    client: reqwest::Client,
    url: String,
    breaker: Breaker,
    health: Option<HealthReporter>,
}

/// State of the remote engine's circuit breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    /// Calls go through.
    Closed,
    /// Calls are rejected until the reset timeout passes.
    Open,
    /// One trial call is in flight.
    HalfOpen,
}

#[derive(Debug)]
struct Breaker {
    threshold: u32,
    reset: Duration,
    state: Mutex<BreakerState>,
}

#[derive(Debug)]
struct BreakerState {
    failures: u32,
    open_until: Option<Instant>,
    trial_in_flight: bool,
}

impl Breaker {
    fn admit(&self) -> bool {
        let mut st = self.state.lock();
        match st.open_until {
            None => true,
            Some(t) if Instant::now() >= t && !st.trial_in_flight => {
                st.trial_in_flight = true;
                true
            }
            Some(_) => false,
        }
    }

    /// Returns true when this closed an open breaker.
    fn success(&self) -> bool {
        let mut st = self.state.lock();
        st.failures = 0;
        st.trial_in_flight = false;
        st.open_until.take().is_some()
    }

    /// Returns true when this opened the breaker.
    fn failure(&self) -> bool {
        let mut st = self.state.lock();
        st.failures = st.failures.saturating_add(1);
        st.trial_in_flight = false;
        if st.failures >= self.threshold {
            let opened = st.open_until.is_none();
            if opened {
                tracing::warn!(failures = st.failures, "opa circuit opened");
            }
            st.open_until = Some(Instant::now() + self.reset);
            return opened;
        }
        false
    }

    fn state(&self) -> CircuitState {
        let st = self.state.lock();
        match st.open_until {
            None => CircuitState::Closed,
            Some(_) if st.trial_in_flight => CircuitState::HalfOpen,
            Some(t) if Instant::now() >= t => CircuitState::HalfOpen,
            Some(_) => CircuitState::Open,
        }
    }
}

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
            breaker: Breaker {
                threshold: config.breaker.failure_threshold.max(1),
                reset: Duration::from_secs(config.breaker.reset_timeout_secs),
                state: Mutex::new(BreakerState {
                    failures: 0,
                    open_until: None,
                    trial_in_flight: false,
                }),
            },
            health: None,
        })
    }

    /// Reports the engine's health: `down` while the breaker is open, `up`
    /// again when a call succeeds. Register the reporter as
    /// `Criticality::Required` when policy decisions gate traffic.
    pub fn with_health(mut self, reporter: HealthReporter) -> Self {
        reporter.set_up();
        self.health = Some(reporter);
        self
    }

    /// The breaker's current state.
    pub fn circuit_state(&self) -> CircuitState {
        self.breaker.state()
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
        if !self.breaker.admit() {
            return Err(EngineError::CircuitOpen);
        }
        let r = self.call(input).await;
        match &r {
            // A 4xx is our request's fault, not the engine's health.
            // So is an evaluation error: the engine answered.
            Ok(_) | Err(EngineError::Status(0..500) | EngineError::Evaluation(_)) => {
                if self.breaker.success() {
                    tracing::info!("opa circuit closed");
                    if let Some(h) = &self.health {
                        h.set_up();
                    }
                }
            }
            Err(e) => {
                if self.breaker.failure() {
                    if let Some(h) = &self.health {
                        h.set_down(format!(
                            "OPA circuit open after repeated failures (last: {})",
                            e.code()
                        ));
                    }
                }
            }
        }
        r
    }
}
