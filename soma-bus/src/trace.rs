//! W3C trace context on messages.
//!
//! Every published message carries a `traceparent`: the envelope's own (set
//! with [`EnvelopeBuilder::trace`](crate::EnvelopeBuilder::trace) or inherited
//! through [`EnvelopeBuilder::caused_by`](crate::EnvelopeBuilder::caused_by)),
//! or the one in scope via [`with_trace_context`], or a fresh root. The
//! consumer opens its `soma.consume` span with the message's `trace_id` and
//! `parent_span_id` as fields and scopes the handler in that context, so a
//! message published from inside a handler continues the same trace.

use std::collections::BTreeMap;

use rdkafka::message::{Header, OwnedHeaders};

use crate::envelope::{HEADER_TRACEPARENT, HEADER_TRACESTATE, TraceContext};

tokio::task_local! {
    static CURRENT: TraceContext;
}

/// Runs `fut` with `ctx` as the trace context that publishes inside it continue.
pub async fn with_trace_context<F: std::future::Future>(ctx: TraceContext, fut: F) -> F::Output {
    CURRENT.scope(ctx, fut).await
}

/// The trace context in scope, if any.
pub fn current() -> Option<TraceContext> {
    CURRENT.try_with(Clone::clone).ok()
}

fn random_span_id() -> String {
    loop {
        let v: u64 = rand::random();
        if v != 0 {
            return format!("{v:016x}");
        }
    }
}

impl TraceContext {
    /// A new root context (random trace id and span id, sampled).
    pub fn new_root() -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string();
        Self {
            traceparent: format!("00-{id}-{}-01", random_span_id()),
            tracestate: None,
        }
    }

    /// A child of this context: same trace id and flags, new span id.
    pub fn child(&self) -> Self {
        let mut parts = self.traceparent.split('-');
        let version = parts.next().unwrap_or("00");
        let trace_id = parts.next().unwrap_or_default().to_owned();
        let flags = parts.nth(1).unwrap_or("01");
        Self {
            traceparent: format!("{version}-{trace_id}-{}-{flags}", random_span_id()),
            tracestate: self.tracestate.clone(),
        }
    }

    /// The 16-hex-digit span id of the sender.
    pub fn span_id(&self) -> &str {
        self.traceparent.split('-').nth(2).unwrap_or_default()
    }
}

/// The context a publish in the current scope should carry.
pub(crate) fn current_trace_context() -> Option<TraceContext> {
    Some(current().map_or_else(TraceContext::new_root, |c| c.child()))
}

pub(crate) fn add_trace_headers(mut h: OwnedHeaders, t: &TraceContext) -> OwnedHeaders {
    h = h.insert(Header {
        key: HEADER_TRACEPARENT,
        value: Some(t.traceparent.as_bytes()),
    });
    if let Some(s) = &t.tracestate {
        h = h.insert(Header {
            key: HEADER_TRACESTATE,
            value: Some(s.as_bytes()),
        });
    }
    h
}

pub(crate) fn add_trace_map(m: &mut BTreeMap<String, String>, t: &TraceContext) {
    m.insert(HEADER_TRACEPARENT.to_owned(), t.traceparent.clone());
    if let Some(s) = &t.tracestate {
        m.insert(HEADER_TRACESTATE.to_owned(), s.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_and_child_are_valid() {
        let r = TraceContext::new_root();
        TraceContext::parse(&r.traceparent, None).unwrap();
        let c = r.child();
        TraceContext::parse(&c.traceparent, None).unwrap();
        assert_eq!(r.trace_id(), c.trace_id());
        assert_ne!(r.span_id(), c.span_id());
    }

    #[tokio::test]
    async fn scoped_context_is_continued() {
        let root = TraceContext::new_root();
        let got = with_trace_context(root.clone(), async { current_trace_context() })
            .await
            .unwrap();
        assert_eq!(got.trace_id(), root.trace_id());
        assert!(current().is_none());
    }
}
