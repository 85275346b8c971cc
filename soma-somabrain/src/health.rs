//! The SomaBrain health component.

use async_trait::async_trait;
use soma_observability::health::{
    CheckOptions, CheckOutcome, Criticality, HealthCheck, HealthRegistry,
};
use soma_observability::resilience::{BreakerState, Permit};

use crate::SomabrainClient;
use crate::endpoint::EndpointGroup;
use crate::model::ReadyStatus;

/// Default component name.
pub const COMPONENT: &str = "somabrain";

/// A [`HealthCheck`] for SomaBrain.
///
/// Each run reads `/readyz` and `/health` and reports:
///
/// - `down` when `/readyz` cannot be reached, or while the breaker of a
///   memory group ([`EndpointGroup::is_memory`]) is open;
/// - `degraded` when the server reports itself degraded, when `/health`
///   says `memory_ok: false` (the real server keeps `/readyz` ready and
///   acknowledges remember with `persisted_to_ltm: true` while its memory
///   backend is down; only `/health` tells), or while the breaker of
///   another group is open;
/// - `up` otherwise.
///
/// **Recovery without traffic.** A group whose breaker has served its open
/// period (half-open) is probed by the check itself: it takes that group's
/// probe permit and reports the `/readyz` outcome on it, so a healed server
/// closes the breaker on the next check even when no call is made. While
/// another caller holds the probe, the check leaves it alone.
///
/// Each outcome carries the gauge `breaker_open` (number of open groups)
/// and `breaker_open.<group component>` (0 or 1) per group.
///
/// [`SomabrainClientBuilder::health`](crate::SomabrainClientBuilder::health)
/// registers it as [`Criticality::Optional`] (the usual choice: a service
/// keeps serving without memory, degraded); to make it
/// [`Criticality::Required`], register it yourself with
/// [`HealthRegistry::register_check`] under [`COMPONENT`].
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
        let client = &self.client;
        // Half-open groups: this check is their probe (if nobody else's is out).
        let probes: Vec<Permit> = EndpointGroup::ALL
            .iter()
            .filter(|g| client.breaker_state(**g) == BreakerState::HalfOpen)
            .filter_map(|g| client.breaker(*g).try_acquire().ok())
            .collect();
        let ready = client.readyz().await;
        let answered = ready.is_ok();
        for p in probes {
            if answered { p.success() } else { p.failure() }
        }
        let open: Vec<EndpointGroup> = EndpointGroup::ALL
            .into_iter()
            .filter(|g| client.breaker_state(*g) == BreakerState::Open)
            .collect();
        let mut outcome = match ready {
            Err(e) => CheckOutcome::down(e.to_string()),
            Ok(_) if open.iter().any(|g| g.is_memory()) => {
                CheckOutcome::down(format!("circuit breaker open: {}", names(&open)))
            }
            Ok(r) if r.status != ReadyStatus::Ready => {
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
            Ok(_) => match client.health().await {
                Ok(h) if h.memory_ok() == Some(false) => CheckOutcome::degraded(
                    "somabrain memory backend down (/health memory_ok: false)",
                ),
                Ok(_) if !open.is_empty() => {
                    CheckOutcome::degraded(format!("circuit breaker open: {}", names(&open)))
                }
                Ok(_) => CheckOutcome::up(),
                Err(e) => CheckOutcome::degraded(format!("/health unreadable: {e}")),
            },
        };
        outcome = outcome.with_gauge("breaker_open", open.len() as f64);
        for g in EndpointGroup::ALL {
            outcome = outcome.with_gauge(
                format!("breaker_open.{}", g.component()),
                f64::from(u8::from(open.contains(&g))),
            );
        }
        outcome
    }
}

fn names(groups: &[EndpointGroup]) -> String {
    groups
        .iter()
        .map(|g| g.component())
        .collect::<Vec<_>>()
        .join(", ")
}

impl SomabrainClient {
    /// Registers the SomaBrain component (named [`COMPONENT`]) in `registry`
    /// with the given criticality; the check runs in the background per
    /// `options` (its interval is also how soon a healed server closes an
    /// open breaker without traffic: at most `open_ms` + one interval).
    /// Must be called within a tokio runtime.
    #[deprecated(
        since = "0.2.0",
        note = "use `SomabrainClientBuilder::health(&HealthRegistry)` (optional, interval and timeout from `SomabrainConfig`), or register a `SomabrainHealthCheck` yourself for another criticality"
    )]
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
