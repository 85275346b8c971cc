//! HTTP middleware: tracing with W3C context, metrics by route template,
//! redaction, one error body ([`Problem`], `application/problem+json`), and
//! (feature `reqwest`) outgoing-call propagation.
//!
//! Stack them with the request id outermost (one id for the whole request,
//! see [`RequestIdLayer`]), then the trace layer so metrics and handlers run
//! in the request span:
//!
//! ```
//! use soma_observability::http::{HttpMetricsLayer, RequestIdLayer, TraceLayer};
//! use soma_observability::metrics::MetricsRegistry;
//! use tower::ServiceBuilder;
//!
//! let metrics = MetricsRegistry::default();
//! let layers = ServiceBuilder::new()
//!     .layer(RequestIdLayer::new())
//!     .layer(TraceLayer::new())
//!     .layer(HttpMetricsLayer::new(&metrics));
//! # let _ = layers;
//! ```
//!
//! # Route templates
//!
//! Metrics and span names use the route *template* (`/v1/sessions/{id}`),
//! never the raw path. The template comes from axum's `MatchedPath` (feature
//! `axum`, with the layers added through `Router::layer`), or from a
//! [`RouteTemplate`] request extension set by any other router. A request with
//! neither is labelled [`UNMATCHED_ROUTE`].

#[cfg(feature = "reqwest")]
pub mod client;
#[cfg(feature = "axum")]
mod json;
pub mod metrics;
mod problem;
mod redact;
mod request_id;
pub mod trace;

use std::borrow::Cow;
use std::sync::Arc;

#[cfg(feature = "axum")]
pub use json::json_body;
pub use metrics::HttpMetricsLayer;
pub use problem::{PROBLEM_CONTENT_TYPE, PROBLEM_TYPE_BASE, Problem};
pub use redact::{DEFAULT_SENSITIVE_HEADERS, REDACTED, RedactedHeaders, SensitiveHeaders};
pub use request_id::{
    MAX_REQUEST_ID_LEN, REQUEST_ID_HEADER, RequestId, RequestIdLayer, RequestIdService,
    is_valid_request_id, request_id_of,
};
pub use trace::TraceLayer;

/// Route label for requests no router matched.
pub const UNMATCHED_ROUTE: &str = "unmatched";

/// The route template of a request, as a request extension, for routers other
/// than axum (which provides `MatchedPath`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteTemplate(pub Arc<str>);

impl RouteTemplate {
    /// A template such as `/v1/sessions/{id}`.
    pub fn new(template: impl Into<Arc<str>>) -> Self {
        Self(template.into())
    }
}

/// The route template of `req` (see the [module docs](self)).
pub fn route_template<B>(req: &http::Request<B>) -> Cow<'static, str> {
    #[cfg(feature = "axum")]
    if let Some(path) = req.extensions().get::<axum::extract::MatchedPath>() {
        return Cow::Owned(path.as_str().to_owned());
    }
    if let Some(RouteTemplate(t)) = req.extensions().get::<RouteTemplate>() {
        return Cow::Owned(t.to_string());
    }
    Cow::Borrowed(UNMATCHED_ROUTE)
}

/// A bounded method label: the standard methods, else `other`.
pub fn method_label(method: &http::Method) -> &'static str {
    match *method {
        http::Method::GET => "GET",
        http::Method::POST => "POST",
        http::Method::PUT => "PUT",
        http::Method::DELETE => "DELETE",
        http::Method::PATCH => "PATCH",
        http::Method::HEAD => "HEAD",
        http::Method::OPTIONS => "OPTIONS",
        http::Method::CONNECT => "CONNECT",
        http::Method::TRACE => "TRACE",
        _ => "other",
    }
}
