//! One audit event per authorization decision.

use std::sync::Arc;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::input::Resource;
use crate::principal::Principal;

/// The record of one decision. Carries identities and outcome, never
/// credentials, headers or the policy context.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// Subject from the verified credential.
    pub subject: String,
    /// Tenant from the verified credential.
    pub tenant: String,
    /// Action decided.
    pub action: String,
    /// Resource the action applied to.
    pub resource: Resource,
    /// `allow`, `deny`, `error` or `fail_open`; for an outcome recorded
    /// with [`Authorizer::audit_outcome`](crate::Authorizer::audit_outcome)
    /// (engine `outcome`), what the action did.
    pub result: String,
    /// Policy reasons, or the engine error code.
    pub reason: Vec<String>,
    /// `embedded`, `remote`, or `cache` when the decision was reused;
    /// `outcome` for an action's recorded effect.
    pub engine: String,
    /// Time to decide, in microseconds.
    pub latency_us: u64,
    /// Request correlation id, when known.
    pub request_id: Option<String>,
}

impl AuditEvent {
    /// The record of a change `principal` made to `resource` through
    /// `action` (a job created, an entry discarded), as opposed to an
    /// authorization decision: `result` is `"changed"`, `reason` says what
    /// changed (field names, a discard reason: never the changed data
    /// itself, which may be personal), `engine` is `"application"` and
    /// `latency_us` is 0. Record it with [`Authorizer::audit`] after the
    /// change is committed, so the trail holds only what happened.
    ///
    /// [`Authorizer::audit`]: crate::Authorizer::audit
    pub fn change(
        principal: &Principal,
        action: &str,
        resource: Resource,
        reason: Vec<String>,
        request_id: Option<&str>,
    ) -> Self {
        Self {
            subject: principal.subject.clone(),
            tenant: principal.tenant.clone(),
            action: action.to_owned(),
            resource,
            result: CHANGED.to_owned(),
            reason,
            engine: "application".to_owned(),
            latency_us: 0,
            request_id: request_id.map(str::to_owned),
        }
    }

    /// Whether this records a change ([`AuditEvent::change`]) rather than
    /// an authorization decision.
    pub fn is_change(&self) -> bool {
        self.result == CHANGED
    }
}

/// `result` of a change record.
const CHANGED: &str = "changed";

/// Where audit events go besides tracing. Called on the request path, so an
/// implementation must not block: hand the event to a queue or channel (a
/// soma-bus publisher, for instance) and return. What a sink does when its
/// queue is full is its own documented choice.
pub trait AuditSink: Send + Sync + 'static {
    /// Records one event.
    fn record(&self, event: &AuditEvent);

    /// Whether this sink takes events. `false` lets the authorizer skip
    /// building an owned [`AuditEvent`] per decision (tracing still gets
    /// every decision). Defaults to `true`.
    fn is_enabled(&self) -> bool {
        true
    }
}

/// Emits each event to tracing only (target `soma_policy::audit`). Every
/// authorizer does this anyway; use it when no other sink is wanted.
#[derive(Debug, Default, Clone, Copy)]
pub struct TracingAuditSink;

impl AuditSink for TracingAuditSink {
    fn record(&self, _event: &AuditEvent) {}

    fn is_enabled(&self) -> bool {
        false
    }
}

/// Keeps events in memory (tests, local tooling). Unbounded: not for production.
#[derive(Debug, Default, Clone)]
pub struct MemoryAuditSink {
    events: Arc<Mutex<Vec<AuditEvent>>>,
}

impl MemoryAuditSink {
    /// A new, empty sink.
    pub fn new() -> Self {
        Self::default()
    }

    /// Events recorded so far.
    pub fn events(&self) -> Vec<AuditEvent> {
        self.events.lock().clone()
    }
}

impl AuditSink for MemoryAuditSink {
    fn record(&self, event: &AuditEvent) {
        self.events.lock().push(event.clone());
    }
}

/// Sends events into a bounded tokio channel (e.g. drained by a soma-bus
/// publisher). When the channel is full the event is dropped from this sink
/// (it was still written to tracing) and counted in [`ChannelAuditSink::dropped`].
#[derive(Debug, Clone)]
pub struct ChannelAuditSink {
    tx: tokio::sync::mpsc::Sender<AuditEvent>,
    dropped: Arc<std::sync::atomic::AtomicU64>,
}

impl ChannelAuditSink {
    /// A sink and the receiver to drain, holding at most `capacity` events.
    pub fn new(capacity: usize) -> (Self, tokio::sync::mpsc::Receiver<AuditEvent>) {
        let (tx, rx) = tokio::sync::mpsc::channel(capacity.max(1));
        (
            Self {
                tx,
                dropped: Arc::default(),
            },
            rx,
        )
    }

    /// Events dropped because the channel was full or closed.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl AuditSink for ChannelAuditSink {
    fn record(&self, event: &AuditEvent) {
        if self.tx.try_send(event.clone()).is_err() {
            self.dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// One decision, borrowed from the authorizer's input and decision: written
/// to tracing as is, turned into an owned [`AuditEvent`] only for a sink
/// that takes events.
pub(crate) struct AuditRecord<'a> {
    pub(crate) subject: &'a str,
    pub(crate) tenant: &'a str,
    pub(crate) action: &'a str,
    pub(crate) resource: &'a Resource,
    pub(crate) result: &'static str,
    pub(crate) reason: &'a [String],
    pub(crate) engine: &'static str,
    pub(crate) latency_us: u64,
    pub(crate) request_id: Option<&'a str>,
}

/// Writes a change record to tracing (target `soma_policy::audit`, the
/// same fields as a decision) and hands it to `sink`.
pub(crate) fn emit_change(sink: &dyn AuditSink, e: &AuditEvent) {
    tracing::info!(
        target: "soma_policy::audit",
        subject = %e.subject,
        tenant = %e.tenant,
        action = %e.action,
        resource_kind = %e.resource.kind,
        resource_id = e.resource.id.as_deref().unwrap_or(""),
        result = %e.result,
        reason = ?e.reason,
        engine = %e.engine,
        latency_us = e.latency_us,
        request_id = e.request_id.as_deref().unwrap_or(""),
        "change"
    );
    if sink.is_enabled() {
        sink.record(e);
    }
}

pub(crate) fn emit(sink: &dyn AuditSink, r: &AuditRecord<'_>) {
    tracing::info!(
        target: "soma_policy::audit",
        subject = %r.subject,
        tenant = %r.tenant,
        action = %r.action,
        resource_kind = %r.resource.kind,
        resource_id = r.resource.id.as_deref().unwrap_or(""),
        result = %r.result,
        reason = ?r.reason,
        engine = %r.engine,
        latency_us = r.latency_us,
        request_id = r.request_id.unwrap_or(""),
        "authorization decision"
    );
    if sink.is_enabled() {
        sink.record(&AuditEvent {
            subject: r.subject.to_owned(),
            tenant: r.tenant.to_owned(),
            action: r.action.to_owned(),
            resource: r.resource.clone(),
            result: r.result.to_owned(),
            reason: r.reason.to_vec(),
            engine: r.engine.to_owned(),
            latency_us: r.latency_us,
            request_id: r.request_id.map(str::to_owned),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::principal::AuthKind;

    #[test]
    fn a_change_reaches_the_sink_marked_as_a_change() {
        let sink = MemoryAuditSink::new();
        let principal = Principal {
            subject: "alice".into(),
            tenant: "acme".into(),
            roles: vec!["operator".into()],
            scopes: vec![],
            auth_kind: AuthKind::Jwt {
                issuer: "iss".into(),
            },
        };
        let resource = Resource {
            kind: "scheduled_job".into(),
            id: Some("j1".into()),
        };
        let event = AuditEvent::change(
            &principal,
            "scheduler.create",
            resource.clone(),
            vec!["name".into()],
            Some("r1"),
        );
        emit_change(&sink, &event);
        let got = sink.events();
        assert_eq!(got.len(), 1);
        assert!(got[0].is_change());
        assert_eq!(
            (got[0].subject.as_str(), got[0].tenant.as_str()),
            ("alice", "acme")
        );
        assert_eq!(got[0].action, "scheduler.create");
        assert_eq!(got[0].resource, resource);
        assert_eq!(got[0].request_id.as_deref(), Some("r1"));
        assert_eq!(got[0].reason, vec!["name".to_owned()]);
    }
}
