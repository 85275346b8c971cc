//! W3C trace-context propagation over any header map.
//!
//! A trace must be able to span gateway → Kafka → worker → SomaBrain call →
//! Kafka → gateway. Each hop injects the current context into its outgoing
//! headers (`traceparent`, `tracestate`) and the next hop extracts it and makes
//! it the parent of its span. HTTP uses the tower [`TraceLayer`] and
//! the reqwest helpers; message transports implement [`HeaderCarrier`] for
//! their header type and call [`inject_context`] / [`extract_context`].
//!
//! These helpers use the W3C [`TraceContextPropagator`] directly (not the
//! global propagator), so they work the same whether or not telemetry was
//! initialised globally. Without telemetry (no `tracing-opentelemetry` layer),
//! there is no current context: injection writes nothing and extraction
//! returns a context that is simply not attached.
//!
//! ```
//! use std::collections::HashMap;
//! use soma_observability::propagation::{extract_context, inject_context, HeaderCarrier};
//! use opentelemetry::trace::TraceContextExt as _;
//!
//! let mut incoming = HashMap::new();
//! incoming.insert(
//!     "traceparent".to_string(),
//!     "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_string(),
//! );
//! let cx = extract_context(&incoming);
//! assert_eq!(cx.span().span_context().trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
//!
//! let mut outgoing: HashMap<String, String> = HashMap::new();
//! inject_context(&cx, &mut outgoing);
//! assert!(outgoing["traceparent"].starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
//! ```
//!
//! [`TraceLayer`]: crate::http::TraceLayer

use std::collections::{BTreeMap, HashMap};

use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator as _};
use opentelemetry::trace::TraceContextExt as _;
pub use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// The W3C `traceparent` header.
pub const TRACEPARENT: &str = "traceparent";
/// The W3C `tracestate` header.
pub const TRACESTATE: &str = "tracestate";

/// A string header map a trace context can be written to and read from.
///
/// Implemented for [`http::HeaderMap`], `HashMap<String, String>` and
/// `BTreeMap<String, String>`; soma-bus implements it for Kafka headers.
/// Keys are compared as the carrier does (HTTP header maps are
/// case-insensitive; the W3C keys are lowercase).
pub trait HeaderCarrier {
    /// The value of `key`, if present and valid UTF-8.
    fn get(&self, key: &str) -> Option<&str>;
    /// Sets `key` to `value`, replacing any previous value.
    fn set(&mut self, key: &str, value: String);
    /// Every key present.
    fn keys(&self) -> Vec<String>;
}

impl HeaderCarrier for http::HeaderMap {
    fn get(&self, key: &str) -> Option<&str> {
        http::HeaderMap::get(self, key).and_then(|v| v.to_str().ok())
    }

    fn set(&mut self, key: &str, value: String) {
        let (Ok(name), Ok(value)) = (
            http::HeaderName::try_from(key),
            http::HeaderValue::try_from(value),
        ) else {
            tracing::debug!(
                header = key,
                "trace-context header not representable; skipped"
            );
            return;
        };
        self.insert(name, value);
    }

    fn keys(&self) -> Vec<String> {
        http::HeaderMap::keys(self)
            .map(|k| k.as_str().to_owned())
            .collect()
    }
}

impl<S: std::hash::BuildHasher> HeaderCarrier for HashMap<String, String, S> {
    fn get(&self, key: &str) -> Option<&str> {
        HashMap::get(self, key).map(String::as_str)
    }

    fn set(&mut self, key: &str, value: String) {
        self.insert(key.to_owned(), value);
    }

    fn keys(&self) -> Vec<String> {
        HashMap::keys(self).cloned().collect()
    }
}

impl HeaderCarrier for BTreeMap<String, String> {
    fn get(&self, key: &str) -> Option<&str> {
        BTreeMap::get(self, key).map(String::as_str)
    }

    fn set(&mut self, key: &str, value: String) {
        self.insert(key.to_owned(), value);
    }

    fn keys(&self) -> Vec<String> {
        BTreeMap::keys(self).cloned().collect()
    }
}

struct InjectAdapter<'a, C: ?Sized>(&'a mut C);

impl<C: HeaderCarrier + ?Sized> Injector for InjectAdapter<'_, C> {
    fn set(&mut self, key: &str, value: String) {
        self.0.set(key, value);
    }
}

struct ExtractAdapter<'a, C: ?Sized>(&'a C);

impl<C: HeaderCarrier + ?Sized> Extractor for ExtractAdapter<'_, C> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key)
    }

    fn keys(&self) -> Vec<&str> {
        // The W3C propagator only reads known keys; listing them is enough
        // and avoids borrowing owned strings from the carrier.
        [TRACEPARENT, TRACESTATE]
            .into_iter()
            .filter(|k| self.0.get(k).is_some())
            .collect()
    }
}

/// Writes `cx` as `traceparent`/`tracestate` into `carrier`.
///
/// Writes nothing when `cx` has no valid span context.
pub fn inject_context<C: HeaderCarrier + ?Sized>(cx: &Context, carrier: &mut C) {
    if !cx.span().span_context().is_valid() {
        return;
    }
    TraceContextPropagator::new().inject_context(cx, &mut InjectAdapter(carrier));
}

/// Writes the current `tracing` span's context into `carrier`.
pub fn inject_current<C: HeaderCarrier + ?Sized>(carrier: &mut C) {
    inject_context(&tracing::Span::current().context(), carrier);
}

/// Reads a remote context from `carrier` (an empty context when absent or invalid).
pub fn extract_context<C: HeaderCarrier + ?Sized>(carrier: &C) -> Context {
    TraceContextPropagator::new().extract(&ExtractAdapter(carrier))
}

/// Makes the context in `carrier` the parent of `span`. Returns `false` (and
/// changes nothing) when the carrier holds no valid context, or the span is
/// disabled or already started.
///
/// Call it right after creating the span, before entering it:
///
/// ```
/// # use std::collections::HashMap;
/// # let headers: HashMap<String, String> = HashMap::new();
/// let span = tracing::info_span!("consume", otel.kind = "consumer", message_id = "m-1");
/// soma_observability::propagation::set_parent_from(&span, &headers);
/// let _entered = span.enter();
/// ```
pub fn set_parent_from<C: HeaderCarrier + ?Sized>(span: &tracing::Span, carrier: &C) -> bool {
    let cx = extract_context(carrier);
    if !cx.span().span_context().is_valid() {
        return false;
    }
    span.set_parent(cx).is_ok()
}

/// Records the span's trace id (32 hex digits) into its `trace_id` field, so
/// JSON log lines inside the span carry it. The span must declare the field
/// (`trace_id = tracing::field::Empty`); otherwise this does nothing.
pub fn record_trace_id(span: &tracing::Span) {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    if sc.is_valid() {
        span.record("trace_id", tracing::field::display(sc.trace_id()));
    }
}

/// The trace id of the current span as 32 hex digits, when there is one.
pub fn current_trace_id() -> Option<String> {
    let cx = tracing::Span::current().context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_map_roundtrip_and_invalid_input() {
        let mut headers = http::HeaderMap::new();
        headers.insert(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                .parse()
                .unwrap(),
        );
        headers.insert("tracestate", "vendor=x".parse().unwrap());
        let cx = extract_context(&headers);
        let sc = cx.span().span_context().clone();
        assert!(sc.is_remote() && sc.is_sampled());
        assert_eq!(sc.trace_state().get("vendor"), Some("x"));
        let mut out = http::HeaderMap::new();
        inject_context(&cx, &mut out);
        assert_eq!(out["traceparent"], headers["traceparent"]);
        assert_eq!(out["tracestate"], "vendor=x");

        let mut bad = HashMap::new();
        bad.insert("traceparent".to_string(), "garbage".to_string());
        assert!(!extract_context(&bad).span().span_context().is_valid());
        let mut out: BTreeMap<String, String> = BTreeMap::new();
        inject_context(&extract_context(&bad), &mut out);
        assert!(out.is_empty());
        assert!(!set_parent_from(&tracing::Span::none(), &bad));
    }
}
