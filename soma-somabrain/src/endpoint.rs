//! [`Endpoint`]: the SomaBrain routes this client calls.

use std::fmt;

use reqwest::Method;

/// A SomaBrain route, named by its template. Used as the `endpoint` label of
/// the client's metrics and attached to every [`Error`](crate::Error).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Endpoint {
    /// `POST /memory/remember`
    Remember,
    /// `POST /memory/remember/batch`
    RememberBatch,
    /// `POST /memory/recall`
    Recall,
    /// `GET /memory/metrics`
    MemoryMetrics,
    /// `POST /context/evaluate`
    ContextEvaluate,
    /// `POST /context/feedback`
    ContextFeedback,
    /// `GET /context/adaptation/state`
    AdaptationState,
    /// `GET /context/feature-flags`
    FeatureFlags,
    /// `GET /healthz`
    Healthz,
    /// `GET /readyz`
    Readyz,
    /// `GET /health`
    Health,
}

/// A group of routes that share one circuit breaker.
///
/// One failing route opens only its group's breaker: the real server's
/// `/context/adaptation/state` answering 500 on every call does not stop
/// recall and remember. Each group's breaker is a
/// [`CircuitBreaker`](soma_observability::resilience::CircuitBreaker) named
/// by [`component`](Self::component), the label of
/// `soma_circuit_breaker_state{component}` and the name the health check
/// reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum EndpointGroup {
    /// Remember and batch remember.
    MemoryWrite,
    /// Recall and memory metrics.
    MemoryRead,
    /// Context evaluate, feedback (reward), adaptation state (weights) and
    /// feature flags.
    Context,
    /// The probes `/healthz`, `/readyz`, `/health`. Probes are never
    /// refused (they are how recovery is noticed); their outcomes still
    /// move this group's breaker, so an unreachable server shows here.
    Operator,
}

impl EndpointGroup {
    /// Every group, in declaration order.
    pub const ALL: [EndpointGroup; 4] = [
        EndpointGroup::MemoryWrite,
        EndpointGroup::MemoryRead,
        EndpointGroup::Context,
        EndpointGroup::Operator,
    ];

    /// The breaker's component name: `somabrain.memory_write`,
    /// `somabrain.memory_read`, `somabrain.context`, `somabrain.operator`.
    pub const fn component(self) -> &'static str {
        match self {
            EndpointGroup::MemoryWrite => "somabrain.memory_write",
            EndpointGroup::MemoryRead => "somabrain.memory_read",
            EndpointGroup::Context => "somabrain.context",
            EndpointGroup::Operator => "somabrain.operator",
        }
    }

    /// Whether a service cannot use SomaBrain's memory while this group is
    /// open (the health check then reports `down`; otherwise `degraded`).
    pub const fn is_memory(self) -> bool {
        matches!(self, EndpointGroup::MemoryWrite | EndpointGroup::MemoryRead)
    }

    pub(crate) const fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for EndpointGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.component())
    }
}

/// Whether a call may be repeated after a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Idempotency {
    /// Reads and keyed writes: retried on transient failures.
    Safe,
    /// Not repeatable: retried only when the connection was refused.
    Unsafe,
}

impl Endpoint {
    /// Every endpoint, in declaration order.
    pub const ALL: [Endpoint; 11] = [
        Endpoint::Remember,
        Endpoint::RememberBatch,
        Endpoint::Recall,
        Endpoint::MemoryMetrics,
        Endpoint::ContextEvaluate,
        Endpoint::ContextFeedback,
        Endpoint::AdaptationState,
        Endpoint::FeatureFlags,
        Endpoint::Healthz,
        Endpoint::Readyz,
        Endpoint::Health,
    ];

    /// The route template, relative to the configured path prefix.
    pub const fn path(self) -> &'static str {
        match self {
            Endpoint::Remember => "/memory/remember",
            Endpoint::RememberBatch => "/memory/remember/batch",
            Endpoint::Recall => "/memory/recall",
            Endpoint::MemoryMetrics => "/memory/metrics",
            Endpoint::ContextEvaluate => "/context/evaluate",
            Endpoint::ContextFeedback => "/context/feedback",
            Endpoint::AdaptationState => "/context/adaptation/state",
            Endpoint::FeatureFlags => "/context/feature-flags",
            Endpoint::Healthz => "/healthz",
            Endpoint::Readyz => "/readyz",
            Endpoint::Health => "/health",
        }
    }

    /// The HTTP method.
    pub fn method(self) -> Method {
        match self {
            Endpoint::Remember
            | Endpoint::RememberBatch
            | Endpoint::Recall
            | Endpoint::ContextEvaluate
            | Endpoint::ContextFeedback => Method::POST,
            _ => Method::GET,
        }
    }

    /// The group whose circuit breaker guards this route.
    pub const fn group(self) -> EndpointGroup {
        match self {
            Endpoint::Remember | Endpoint::RememberBatch => EndpointGroup::MemoryWrite,
            Endpoint::Recall | Endpoint::MemoryMetrics => EndpointGroup::MemoryRead,
            Endpoint::ContextEvaluate
            | Endpoint::ContextFeedback
            | Endpoint::AdaptationState
            | Endpoint::FeatureFlags => EndpointGroup::Context,
            Endpoint::Healthz | Endpoint::Readyz | Endpoint::Health => EndpointGroup::Operator,
        }
    }

    /// Probes are plain server routes: never under the API prefix, never
    /// refused by a breaker, never authenticated.
    pub const fn is_probe(self) -> bool {
        matches!(
            self,
            Endpoint::Healthz | Endpoint::Readyz | Endpoint::Health
        )
    }

    /// Whether the route needs the bearer token.
    pub(crate) const fn needs_auth(self) -> bool {
        !self.is_probe() && !matches!(self, Endpoint::FeatureFlags)
    }

    pub(crate) const fn idempotency(self) -> Idempotency {
        match self {
            Endpoint::ContextEvaluate | Endpoint::ContextFeedback => Idempotency::Unsafe,
            _ => Idempotency::Safe,
        }
    }

    pub(crate) const fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.method(), self.path())
    }
}
