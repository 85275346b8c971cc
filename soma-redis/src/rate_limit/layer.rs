//! Tower middleware: [`RateLimitLayer`] / [`RateLimitService`]; the
//! [`ResponseFuture`] is in `future.rs`.

use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use tower::{Layer, Service};

use super::RateLimiter;
pub use super::future::ResponseFuture;

/// Which tenant and route a request is counted against.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RateLimitKey {
    /// The tenant (a key part: no `:`, spaces or braces).
    pub tenant: String,
    /// The route *template* (`"POST /v1/orders/{id}"`), never the raw path,
    /// so the number of keys stays bounded.
    pub route: String,
}

/// What the layer does when the limiter cannot reach Redis: the one
/// [`FailMode`](soma_observability::resilience::FailMode) of every soma
/// crate.
///
/// - `Closed` (the default): reject with `503 Service Unavailable`,
///   `Retry-After: 1` and a problem body (`rate_limiter_unavailable`). The
///   limit is never exceeded, at the cost of availability while Redis is
///   down.
/// - `Open`: admit the request without a limit (and without
///   `X-RateLimit-*` headers). Availability first; the limit is not
///   enforced while Redis is down.
pub use soma_observability::resilience::FailMode;

/// The old name of [`FailMode`].
#[deprecated(since = "0.2.0", note = "one name in every soma crate: use `FailMode`")]
pub type FailureMode = FailMode;

type KeyFn<B> = dyn Fn(&Request<B>) -> Option<RateLimitKey> + Send + Sync;

/// Applies a [`RateLimiter`] to every request, keyed by tenant and route.
///
/// * Admitted: the inner service runs; its response gets `X-RateLimit-Limit`,
///   `X-RateLimit-Remaining` and `X-RateLimit-Reset`. The
///   [`RateLimitDecision`](super::RateLimitDecision) is also put in the request's extensions.
/// * Limited: `429 Too Many Requests` with the same headers plus
///   `Retry-After`, and a [`Problem`](soma_observability::http::Problem) body with code `rate_limited`; the
///   inner service is not called.
/// * No key (the key function returned `None`, e.g. health probes): the
///   request passes unlimited.
/// * Invalid key (a tenant containing `:`, spaces or braces): `400 Bad
///   Request`, code `invalid_rate_limit_key`.
/// * Redis unavailable: see [`FailMode`] (`503`, code
///   `rate_limiter_unavailable`, when closed).
///
/// Every rejection is an `application/problem+json` [`Problem`](soma_observability::http::Problem), so the
/// response body type must be `From<Bytes>` (axum's `Body`,
/// `http_body_util::Full<Bytes>`, `Bytes`).
///
/// ```
/// use std::time::Duration;
/// use soma_redis::rate_limit::{RateLimitKey, RateLimitLayer};
/// # fn demo(limiter: soma_redis::RateLimiter) {
/// let layer = RateLimitLayer::new(limiter, |req: &http::Request<bytes::Bytes>| {
///     let tenant = req.headers().get("x-tenant")?.to_str().ok()?.to_owned();
///     Some(RateLimitKey { tenant, route: format!("{} /v1/items", req.method()) })
/// });
/// # let _ = layer; }
/// ```
pub struct RateLimitLayer<B> {
    limiter: RateLimiter,
    key_fn: Arc<KeyFn<B>>,
    failure: FailMode,
}

impl<B> Clone for RateLimitLayer<B> {
    fn clone(&self) -> Self {
        Self {
            limiter: self.limiter.clone(),
            key_fn: self.key_fn.clone(),
            failure: self.failure,
        }
    }
}

impl<B> std::fmt::Debug for RateLimitLayer<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimitLayer")
            .field("limiter", &self.limiter)
            .field("failure", &self.failure)
            .finish()
    }
}

impl<B> RateLimitLayer<B> {
    /// A layer counting each request against `key_fn(request)`.
    pub fn new<F>(limiter: RateLimiter, key_fn: F) -> Self
    where
        F: Fn(&Request<B>) -> Option<RateLimitKey> + Send + Sync + 'static,
    {
        Self {
            limiter,
            key_fn: Arc::new(key_fn),
            failure: FailMode::Closed,
        }
    }

    /// Sets the behaviour while Redis is unavailable (default [`FailMode::Closed`]).
    pub fn failure_mode(mut self, mode: FailMode) -> Self {
        self.failure = mode;
        self
    }
}

impl<S, B> Layer<S> for RateLimitLayer<B> {
    type Service = RateLimitService<S, B>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimitService {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service made by [`RateLimitLayer`].
pub struct RateLimitService<S, B> {
    inner: S,
    layer: RateLimitLayer<B>,
}

impl<S: Clone, B> Clone for RateLimitService<S, B> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            layer: self.layer.clone(),
        }
    }
}

impl<S, B> std::fmt::Debug for RateLimitService<S, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimitService")
            .field("layer", &self.layer)
            .finish()
    }
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for RateLimitService<S, ReqB>
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Clone,
    ResB: From<Bytes>,
{
    type Response = Response<ResB>;
    type Error = S::Error;
    type Future = ResponseFuture<S, ReqB>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        let Some(key) = (self.layer.key_fn)(&req) else {
            return ResponseFuture::unlimited(self.inner.call(req));
        };
        // The ready inner service handles this request; a fresh clone takes its place.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let limiter = self.layer.limiter.clone();
        ResponseFuture::check(
            limiter,
            key.tenant,
            key.route,
            self.layer.failure,
            req,
            inner,
        )
    }
}
