//! The [`Authorizer`]: engine + cache + fail mode + audit + metrics.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::audit::{AuditEvent, AuditRecord, AuditSink, TracingAuditSink, emit, emit_change};
use crate::config::{CacheConfig, FailMode, PolicyConfig};
use crate::engine::{ConfiguredEngine, EngineDecision, PolicyEngine};
use crate::metrics::PolicyMetrics;
use crate::{AuthzError, AuthzInput, EngineError};

/// An authorization decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Whether the action may proceed.
    pub allow: bool,
    /// The policy's reasons (or `fail_open`).
    pub reasons: Vec<String>,
    /// `embedded`, `remote`, or `cache`.
    pub engine: &'static str,
    /// True when the engine was unavailable and fail mode `open` let the
    /// request through.
    pub fail_open: bool,
}

/// Decides whether an [`AuthzInput`] is allowed. Used by the HTTP layer and
/// directly by workers (`authorizer.check(&input)`).
///
/// - Every decision is audited (tracing target `soma_policy::audit` plus the
///   configured [`AuditSink`]) and counted.
/// - With the cache enabled (the default, for 1 s), decisions are reused for
///   `ttl_ms`, keyed by the engine's policy generation
///   ([`PolicyEngine::generation`]) and the SHA-256 of
///   [`AuthzInput::canonical_bytes`]: a policy reload is seen by the next
///   request; errors are never cached.
/// - When no decision can be had: [`FailMode::Closed`] returns
///   [`AuthzError::Unavailable`]. [`FailMode::Open`] allows, logs a warning
///   and counts `soma_policy_fail_open_total` only when the engine is
///   unavailable ([`EngineError::is_unavailable`]: timeout, transport error,
///   open breaker, HTTP 5xx); every other engine error is denied as in
///   fail-closed mode.
pub struct Authorizer {
    engine: Arc<dyn PolicyEngine>,
    engine_name: &'static str,
    cache: Option<moka::sync::Cache<CacheKey, EngineDecision>>,
    fail_mode: FailMode,
    audit: Arc<dyn AuditSink>,
    metrics: PolicyMetrics,
}

impl std::fmt::Debug for Authorizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authorizer")
            .field("engine", &self.engine_name)
            .field("cache", &self.cache.is_some())
            .field("fail_mode", &self.fail_mode)
            .finish_non_exhaustive()
    }
}

/// Builds an [`Authorizer`].
pub struct AuthorizerBuilder {
    engine: Arc<dyn PolicyEngine>,
    cache: CacheConfig,
    fail_mode: FailMode,
    audit: Arc<dyn AuditSink>,
    metrics: Option<PolicyMetrics>,
}

impl AuthorizerBuilder {
    /// Decision cache settings (on by default, 1 s; see [`CacheConfig`]).
    pub fn cache(mut self, cache: CacheConfig) -> Self {
        self.cache = cache;
        self
    }

    /// Fail mode (default [`FailMode::Closed`]).
    pub fn fail_mode(mut self, mode: FailMode) -> Self {
        self.fail_mode = mode;
        self
    }

    /// Audit sink besides tracing.
    pub fn audit_sink(mut self, sink: Arc<dyn AuditSink>) -> Self {
        self.audit = sink;
        self
    }

    /// Records the authorizer's metrics: `.metrics(&registry)` registers them in
    /// a [`MetricsRegistry`](soma_observability::MetricsRegistry); passing
    /// [`PolicyMetrics`] shares one set of handles between the authenticator
    /// and the authorizer (handles built twice on one registry share their
    /// series anyway).
    pub fn metrics(mut self, metrics: impl Into<PolicyMetrics>) -> Self {
        self.metrics = Some(metrics.into());
        self
    }

    /// Builds the authorizer.
    pub fn build(self) -> Authorizer {
        if self.fail_mode == FailMode::Open {
            tracing::warn!(
                "authorization fail_mode = open: requests are allowed when the policy engine is unavailable"
            );
        }
        let cache = self.cache.enabled.then(|| {
            moka::sync::Cache::builder()
                .max_capacity(self.cache.capacity)
                .time_to_live(Duration::from_millis(self.cache.ttl_ms))
                .build()
        });
        Authorizer {
            engine_name: self.engine.name(),
            engine: self.engine,
            cache,
            fail_mode: self.fail_mode,
            audit: self.audit,
            metrics: self.metrics.unwrap_or_default(),
        }
    }
}

impl Authorizer {
    /// Records `event` (a change, see [`AuditEvent::change`]) on this
    /// authorizer's audit trail: tracing target `soma_policy::audit` and
    /// the configured [`AuditSink`], beside its decisions.
    pub fn audit(&self, event: &AuditEvent) {
        emit_change(self.audit.as_ref(), event);
    }

    /// Starts building around `engine`.
    pub fn builder(engine: Arc<dyn PolicyEngine>) -> AuthorizerBuilder {
        AuthorizerBuilder {
            engine,
            cache: CacheConfig::default(),
            fail_mode: FailMode::Closed,
            audit: Arc::new(TracingAuditSink),
            metrics: None,
        }
    }

    /// Builds the engine named by `config.engine` (a
    /// [`ConfiguredEngine`], without health reporting) and an authorizer
    /// around it with the configured cache and fail mode; `metrics` as in
    /// [`AuthorizerBuilder::metrics`]. To report the engine's health or
    /// reload the embedded policy on a signal, build the
    /// [`ConfiguredEngine`] yourself and use [`Authorizer::with_engine`].
    ///
    /// # Errors
    ///
    /// As [`ConfiguredEngineBuilder::build`](crate::engine::ConfiguredEngineBuilder::build).
    pub fn from_config(
        config: &PolicyConfig,
        metrics: impl Into<PolicyMetrics>,
    ) -> Result<AuthorizerBuilder, EngineError> {
        let metrics = metrics.into();
        let engine = ConfiguredEngine::from_config(config)
            .policy_metrics(metrics.clone())
            .build()?;
        Ok(Self::with_engine(Arc::new(engine), config).metrics(metrics))
    }

    /// Starts building around `engine` with the cache and fail mode of
    /// `config` (`policy.cache`, `policy.fail_mode`); the engine is
    /// usually the [`ConfiguredEngine`] built from the same `config`.
    pub fn with_engine(engine: Arc<dyn PolicyEngine>, config: &PolicyConfig) -> AuthorizerBuilder {
        Self::builder(engine)
            .cache(config.cache.clone())
            .fail_mode(config.fail_mode)
    }

    /// The metric handles.
    pub fn metrics(&self) -> &PolicyMetrics {
        &self.metrics
    }

    /// Decides. `Ok` carries allow or deny; `Err` only when no decision
    /// could be had in fail-closed mode.
    pub async fn check(&self, input: &AuthzInput) -> Result<Decision, AuthzError> {
        let start = Instant::now();
        let key = self
            .cache
            .as_ref()
            .map(|_| cache_key(self.engine.as_ref(), input));
        if let (Some(cache), Some(key)) = (&self.cache, &key) {
            if let Some(d) = cache.get(key) {
                self.metrics.cache(true);
                let decision = Decision {
                    allow: d.allow,
                    reasons: d.reasons,
                    engine: "cache",
                    fail_open: false,
                };
                self.finish(input, &decision, start, None);
                return Ok(decision);
            }
            self.metrics.cache(false);
        }
        match self.engine.evaluate(input).await {
            Ok(d) => {
                if let (Some(cache), Some(key)) = (&self.cache, key) {
                    cache.insert(key, d.clone());
                }
                let decision = Decision {
                    allow: d.allow,
                    reasons: d.reasons,
                    engine: self.engine_name,
                    fail_open: false,
                };
                self.finish(input, &decision, start, None);
                Ok(decision)
            }
            // Only an engine that could not be asked fails open. A policy
            // that was asked and could not decide (undefined decision,
            // malformed answer, evaluation or load error, HTTP 4xx) denies in
            // either mode: failing open there would let one crafted input or
            // one bad deployment allow everything.
            Err(e) if self.fail_mode == FailMode::Open && e.is_unavailable() => {
                tracing::warn!(
                    action = %input.action,
                    subject = %input.subject,
                    tenant = %input.tenant,
                    error = %e,
                    "policy engine unavailable; allowing because fail_mode = open"
                );
                self.metrics.fail_open(&input.action);
                let decision = Decision {
                    allow: true,
                    reasons: vec!["fail_open".to_owned(), e.code().to_owned()],
                    engine: self.engine_name,
                    fail_open: true,
                };
                self.finish(input, &decision, start, Some(&e));
                Ok(decision)
            }
            Err(e) => {
                let decision = Decision {
                    allow: false,
                    reasons: vec![e.code().to_owned()],
                    engine: self.engine_name,
                    fail_open: false,
                };
                self.finish(input, &decision, start, Some(&e));
                Err(AuthzError::Unavailable(e))
            }
        }
    }

    /// Like [`Authorizer::check`], but a denial is an error
    /// ([`AuthzError::Forbidden`]) — convenient for workers using `?`.
    pub async fn enforce(&self, input: &AuthzInput) -> Result<Decision, AuthzError> {
        let d = self.check(input).await?;
        if d.allow {
            Ok(d)
        } else {
            Err(AuthzError::Forbidden {
                action: input.action.clone(),
                reasons: d.reasons,
            })
        }
    }

    /// Records a denial decided before the engine (an unmapped route).
    pub(crate) fn record_unmapped(&self, input: &AuthzInput) {
        let d = Decision {
            allow: false,
            reasons: vec!["unmapped_route".into()],
            engine: "router",
            fail_open: false,
        };
        self.finish(input, &d, Instant::now(), None);
    }

    /// Audits what an allowed action did (`outcome`, e.g. `replayed` or
    /// `discarded`, with `details` such as the count or the operator's
    /// reason) through the same audit path as the decisions: tracing
    /// target `soma_policy::audit` and the [`AuditSink`], with engine
    /// `outcome`. Call it after the work, with the input that was
    /// authorized (its resource naming what was acted on), so the audit
    /// trail holds both the decision and its effect. `details` must not
    /// carry credentials.
    pub fn audit_outcome(&self, input: &AuthzInput, outcome: &'static str, details: &[String]) {
        let record = AuditRecord {
            subject: &input.subject,
            tenant: &input.tenant,
            action: &input.action,
            resource: &input.resource,
            result: outcome,
            reason: details,
            engine: "outcome",
            latency_us: 0,
            request_id: input.request.request_id.as_deref(),
        };
        emit(self.audit.as_ref(), &record);
    }

    fn finish(
        &self,
        input: &AuthzInput,
        d: &Decision,
        start: Instant,
        error: Option<&EngineError>,
    ) {
        let elapsed = start.elapsed();
        let result = match (error, d.fail_open, d.allow) {
            (_, true, _) => "fail_open",
            (Some(_), _, _) => "error",
            (None, _, true) => "allow",
            (None, _, false) => "deny",
        };
        self.metrics
            .decision(&input.action, result, d.engine, elapsed.as_secs_f64());
        let record = AuditRecord {
            subject: &input.subject,
            tenant: &input.tenant,
            action: &input.action,
            resource: &input.resource,
            result,
            reason: &d.reasons,
            engine: d.engine,
            latency_us: u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
            request_id: input.request.request_id.as_deref(),
        };
        emit(self.audit.as_ref(), &record);
    }
}

/// A cached decision's key: the policy generation it was decided under and
/// the SHA-256 of the canonical input.
type CacheKey = (u64, [u8; 32]);

/// Read before the engine is asked: a decision made while a reload lands is
/// filed under the older generation, which no request after the reload asks
/// for.
fn cache_key(engine: &dyn PolicyEngine, input: &AuthzInput) -> CacheKey {
    (engine.generation(), input.canonical_digest())
}
