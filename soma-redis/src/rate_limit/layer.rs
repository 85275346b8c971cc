//! Tower middleware: [`RateLimitLayer`] / [`RateLimitService`] / [`ResponseFuture`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{HeaderValue, Request, Response, StatusCode};
use tower::{Layer, Service};

use super::{RateLimitDecision, RateLimiter};

/// Which tenant and route a request is counted against.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RateLimitKey {
    /// The tenant (a key part: no `:`, spaces or braces).
    pub tenant: String,
    /// The route *template* (`"POST /v1/orders/{id}"`), never the raw path,
    /// so the number of keys stays bounded.
    pub route: String,
}

/// What the layer does when the limiter cannot reach Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FailureMode {
    /// Reject with `503 Service Unavailable` and `Retry-After: 1`. The limit
    /// is never exceeded, at the cost of availability while Redis is down.
    #[default]
    Closed,
    /// Admit the request without a limit (and without `X-RateLimit-*`
    /// headers). Availability first; the limit is not enforced while Redis
    /// is down.
    Open,
}

type KeyFn<B> = dyn Fn(&Request<B>) -> Option<RateLimitKey> + Send + Sync;

/// Applies a [`RateLimiter`] to every request, keyed by tenant and route.
///
/// * Admitted: the inner service runs; its response gets `X-RateLimit-Limit`,
///   `X-RateLimit-Remaining` and `X-RateLimit-Reset`. The
///   [`RateLimitDecision`] is also put in the request's extensions.
/// * Limited: `429 Too Many Requests` with the same headers plus
///   `Retry-After`, and an empty body; the inner service is not called.
/// * No key (the key function returned `None`, e.g. health probes): the
///   request passes unlimited.
/// * Invalid key (a tenant containing `:`, spaces or braces): `400 Bad Request`.
/// * Redis unavailable: see [`FailureMode`].
///
/// ```
/// use std::time::Duration;
/// use soma_redis::rate_limit::{RateLimitKey, RateLimitLayer};
/// # fn demo(limiter: soma_redis::RateLimiter) {
/// let layer = RateLimitLayer::new(limiter, |req: &http::Request<String>| {
///     let tenant = req.headers().get("x-tenant")?.to_str().ok()?.to_owned();
///     Some(RateLimitKey { tenant, route: format!("{} /v1/items", req.method()) })
/// });
/// # let _ = layer; }
/// ```
pub struct RateLimitLayer<B> {
    limiter: RateLimiter,
    key_fn: Arc<KeyFn<B>>,
    failure: FailureMode,
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
            failure: FailureMode::Closed,
        }
    }

    /// Sets the behaviour while Redis is unavailable (default [`FailureMode::Closed`]).
    pub fn failure_mode(mut self, mode: FailureMode) -> Self {
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

/// The response future of [`RateLimitService`].
pub struct ResponseFuture<R, E> {
    inner: Pin<Box<dyn Future<Output = Result<R, E>> + Send>>,
}

impl<R, E> std::fmt::Debug for ResponseFuture<R, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResponseFuture")
    }
}

impl<R, E> Future for ResponseFuture<R, E> {
    type Output = Result<R, E>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

fn reply<ResB: Default>(
    status: StatusCode,
    decision: Option<&RateLimitDecision>,
) -> Response<ResB> {
    let mut res = Response::new(ResB::default());
    *res.status_mut() = status;
    if let Some(d) = decision {
        d.write_headers(res.headers_mut());
    } else if status == StatusCode::SERVICE_UNAVAILABLE {
        res.headers_mut()
            .insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    res
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for RateLimitService<S, ReqB>
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqB: Send + 'static,
    ResB: Default + Send + 'static,
{
    type Response = Response<ResB>;
    type Error = S::Error;
    type Future = ResponseFuture<Response<ResB>, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqB>) -> Self::Future {
        let key = (self.layer.key_fn)(&req);
        // The ready inner service handles this request; a fresh clone takes its place.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let limiter = self.layer.limiter.clone();
        let failure = self.layer.failure;
        ResponseFuture {
            inner: Box::pin(async move {
                let Some(key) = key else {
                    return inner.call(req).await;
                };
                match limiter.check(&key.tenant, &key.route).await {
                    Ok(d) if d.allowed => {
                        req.extensions_mut().insert(d);
                        let mut res = inner.call(req).await?;
                        d.write_headers(res.headers_mut());
                        Ok(res)
                    }
                    Ok(d) => Ok(reply(StatusCode::TOO_MANY_REQUESTS, Some(&d))),
                    Err(e) if e.is_invalid() => {
                        tracing::warn!(error = %e, "rate limit key rejected");
                        Ok(reply(StatusCode::BAD_REQUEST, None))
                    }
                    Err(e) => match failure {
                        FailureMode::Closed => {
                            tracing::warn!(error = %e, "rate limiter unavailable; rejecting (fail closed)");
                            Ok(reply(StatusCode::SERVICE_UNAVAILABLE, None))
                        }
                        FailureMode::Open => {
                            tracing::warn!(error = %e, "rate limiter unavailable; admitting (fail open)");
                            inner.call(req).await
                        }
                    },
                }
            }),
        }
    }
}
