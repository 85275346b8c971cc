//! W3C trace context on Kafka headers (see the crate docs, "Trace context").

use std::collections::BTreeMap;

use rdkafka::message::{Header, Headers as _, OwnedHeaders};
use soma_observability::propagation::{HeaderCarrier, inject_context};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::envelope::{HEADER_TRACEPARENT, HEADER_TRACESTATE, TraceContext};

impl HeaderCarrier for TraceContext {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            HEADER_TRACEPARENT if !self.traceparent.is_empty() => Some(&self.traceparent),
            HEADER_TRACESTATE => self.tracestate.as_deref(),
            _ => None,
        }
    }

    fn set(&mut self, key: &str, value: String) {
        match key {
            HEADER_TRACEPARENT => self.traceparent = value,
            HEADER_TRACESTATE => self.tracestate = Some(value).filter(|s| !s.is_empty()),
            _ => {}
        }
    }

    fn keys(&self) -> Vec<String> {
        [HEADER_TRACEPARENT, HEADER_TRACESTATE]
            .into_iter()
            .filter(|k| HeaderCarrier::get(self, k).is_some())
            .map(str::to_owned)
            .collect()
    }
}

impl TraceContext {
    /// The OpenTelemetry context of `span`, or `None` when it has none (no
    /// `tracing-opentelemetry` layer, or the span is disabled and has no
    /// context of its own).
    pub fn of_span(span: &tracing::Span) -> Option<Self> {
        let mut t = Self::default();
        inject_context(&span.context(), &mut t);
        (!t.traceparent.is_empty()).then_some(t)
    }

    /// The OpenTelemetry context of the current span (see [`TraceContext::of_span`]).
    pub fn current() -> Option<Self> {
        Self::of_span(&tracing::Span::current())
    }
}

/// The trace headers of a raw record (for the `soma.consume` span's parent,
/// read before the envelope is decoded so malformed records keep their trace).
pub(crate) fn record_trace_headers(headers: Option<&OwnedHeaders>) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    for h in headers.into_iter().flat_map(|h| h.iter()) {
        if h.key == HEADER_TRACEPARENT || h.key == HEADER_TRACESTATE {
            if let Some(v) = h.value.and_then(|v| std::str::from_utf8(v).ok()) {
                m.insert(h.key.to_owned(), v.to_owned());
            }
        }
    }
    m
}

/// Appends `t` to Kafka headers (for messages without a context of their own).
pub(crate) fn add_trace_headers(mut h: OwnedHeaders, t: &TraceContext) -> OwnedHeaders {
    for key in [HEADER_TRACEPARENT, HEADER_TRACESTATE] {
        if let Some(v) = HeaderCarrier::get(t, key) {
            h = h.insert(Header {
                key,
                value: Some(v.as_bytes()),
            });
        }
    }
    h
}

/// Writes `t` into an outbox header map.
pub(crate) fn add_trace_map(m: &mut BTreeMap<String, String>, t: &TraceContext) {
    for key in [HEADER_TRACEPARENT, HEADER_TRACESTATE] {
        if let Some(v) = HeaderCarrier::get(t, key) {
            m.insert(key.to_owned(), v.to_owned());
        }
    }
}

#[cfg(test)]
mod tests {
    use soma_observability::propagation::extract_context;

    use super::*;

    #[test]
    fn carrier_round_trips_through_the_propagator() {
        let t = TraceContext::parse(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            Some("vendor=x"),
        )
        .unwrap();
        let mut out = TraceContext::default();
        inject_context(&extract_context(&t), &mut out);
        assert_eq!(out, t);
        assert_eq!(t.keys(), vec!["traceparent", "tracestate"]);
        assert!(TraceContext::default().keys().is_empty());
    }

    #[test]
    fn no_context_without_an_otel_layer() {
        let span = tracing::info_span!("x");
        assert_eq!(TraceContext::of_span(&span), None);
        assert_eq!(TraceContext::current(), None);
        let mut m = BTreeMap::new();
        add_trace_map(&mut m, &TraceContext::default());
        assert!(m.is_empty());
    }
}
