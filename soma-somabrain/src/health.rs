//! The SomaBrain health component.

use async_trait::async_trait;
use soma_observability::health::{
    CheckOptions, CheckOutcome, Criticality, HealthCheck, HealthRegistry,
};

use crate::SomabrainClient;
use crate::breaker::BreakerState;
use crate::model::ReadyStatus;

/// Default component name.
pub const COMPONENT: &str = "somabrain";

/// A [`HealthCheck`] for SomaBrain: `down` while the breaker is open or
/// `/readyz` cannot be reached, `degraded` while the breaker is half-open or
/// the server reports itself degraded, `up` otherwise. Each outcome carries
/// the gauge `breaker_open` (0 or 1).
///
/// Register it as [`Criticality::Optional`] (the usual choice: a service
/// keeps serving without memory, degraded) or [`Criticality::Required`].
#[derive(Debug, Clone)]
pub struct SomabrainHealthCheck {
    client: SomabrainClient,
}

impl SomabrainHealthCheck {
    /// A check using `client`.
    pub fn new(client: SomabrainClient) -> Self {
        Self { client }
    }
}

#[async_trait]
impl HealthCheck for SomabrainHealthCheck {
    async fn check(&self) -> CheckOutcome {
        let state = self.client.breaker_state();
        let gauge = |o: CheckOutcome| {
            o.with_gauge(
                "breaker_open",
                f64::from(u8::from(state == BreakerState::Open)),
            )
        };
        if state == BreakerState::Open {
            return gauge(CheckOutcome::down(
                "circuit breaker open: calls are refused",
            ));
        }
        let outcome = match self.client.readyz().await {
            Ok(r) if r.status == ReadyStatus::Ready => {
                if state == BreakerState::HalfOpen {
                    CheckOutcome::degraded("circuit breaker half-open: probing")
                } else {
                    CheckOutcome::up()
                }
            }
            Ok(r) => {
                let failing: Vec<&str> = r
                    .checks
                    .iter()
                    .filter(|(_, v)| v.as_str() != Some("healthy"))
                    .map(|(k, _)| k.as_str())
                    .collect();
                CheckOutcome::degraded(format!(
                    "somabrain reports degraded: {}",
                    failing.join(", ")
                ))
            }
            Err(e) => CheckOutcome::down(e.to_string()),
        };
        gauge(outcome)
    }
}

impl SomabrainClient {
    /// Registers the SomaBrain component (named [`COMPONENT`]) in `registry`
    /// with the given criticality; the check runs in the background per
    /// `options`. Must be called within a tokio runtime.
    pub fn register_health(
        &self,
        registry: &HealthRegistry,
        criticality: Criticality,
        options: CheckOptions,
    ) {
        registry.register_check(
            COMPONENT,
            criticality,
            SomabrainHealthCheck::new(self.clone()),
            options,
        );
    }
}
