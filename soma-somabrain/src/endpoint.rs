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

    /// Probes are plain server routes: never under the API prefix, never
    /// behind the breaker, never authenticated.
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
