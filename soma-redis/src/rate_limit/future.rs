//! The response future of [`RateLimitService`](super::RateLimitService):
//! count the request, then call the inner service and stamp the limit's
//! headers on its response, or answer the refusal.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use pin_project_lite::pin_project;
use tower::Service;

use super::{RateLimitDecision, RateLimiter};
use crate::RedisError;
use soma_observability::http::Problem;
use soma_observability::resilience::FailMode;

/// The limiter's answer in flight.
///
/// [`RateLimiter::check`] is an `async fn` (a Lua script on Redis) whose
/// future type has no name on stable Rust, so this one step is boxed. The
/// inner service's future is polled in place.
type Check = Pin<Box<dyn Future<Output = Result<RateLimitDecision, RedisError>> + Send>>;

pin_project! {
    /// Response future of [`RateLimitService`](super::RateLimitService).
    pub struct ResponseFuture<S, ReqBody>
    where
        S: Service<Request<ReqBody>>,
    {
        #[pin]
        state: State<S, ReqBody>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, ReqBody>
    where
        S: Service<Request<ReqBody>>,
    {
        // Counting the request; `inner` is the service driven to readiness.
        Checking {
            check: Check,
            req: Option<Request<ReqBody>>,
            inner: Option<S>,
            failure: FailMode,
        },
        // Admitted (or not limited): the inner service answers; an admitting
        // decision's headers go on its response.
        Calling {
            #[pin]
            future: S::Future,
            decision: Option<RateLimitDecision>,
        },
    }
}

impl<S, ReqBody> ResponseFuture<S, ReqBody>
where
    S: Service<Request<ReqBody>>,
{
    /// Passes the request on without a limit (no key).
    pub(super) fn unlimited(future: S::Future) -> Self {
        Self {
            state: State::Calling {
                future,
                decision: None,
            },
        }
    }

    /// Counts `req` against `tenant` and `route`; `inner` (driven to
    /// readiness) answers it once admitted.
    ///
    /// The one allocation of the request path: the check is an `async fn`
    /// whose future type cannot be named on stable Rust, so it is boxed
    /// here (see [`Check`]); everything after it is a plain state machine.
    pub(super) fn check(
        limiter: RateLimiter,
        tenant: String,
        route: String,
        failure: FailMode,
        req: Request<ReqBody>,
        inner: S,
    ) -> Self {
        let check: Check = Box::pin(async move { limiter.check(&tenant, &route).await });
        Self {
            state: State::Checking {
                check,
                req: Some(req),
                inner: Some(inner),
                failure,
            },
        }
    }
}

impl<S, ReqBody> std::fmt::Debug for ResponseFuture<S, ReqBody>
where
    S: Service<Request<ReqBody>>,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<S, ReqBody, ResBody> Future for ResponseFuture<S, ReqBody>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: From<Bytes>,
{
    type Output = Result<Response<ResBody>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        const DONE: &str = "rate limit future polled after completion";
        let mut state = self.project().state;
        loop {
            match state.as_mut().project() {
                StateProj::Checking {
                    check,
                    req,
                    inner,
                    failure,
                } => {
                    let decision = match ready!(check.as_mut().poll(cx)) {
                        Ok(d) if d.allowed => Some(d),
                        Ok(d) => return Poll::Ready(Ok(limited(&d))),
                        Err(e) if e.is_invalid() => {
                            tracing::warn!(error = %e, "rate limit key rejected");
                            return Poll::Ready(Ok(invalid_key()));
                        }
                        Err(e) => match failure {
                            FailMode::Closed => {
                                tracing::warn!(error = %e, "rate limiter unavailable; rejecting (fail closed)");
                                return Poll::Ready(Ok(unavailable()));
                            }
                            FailMode::Open => {
                                tracing::warn!(error = %e, "rate limiter unavailable; admitting (fail open)");
                                None
                            }
                        },
                    };
                    let mut req = req.take().expect(DONE);
                    if let Some(d) = decision {
                        req.extensions_mut().insert(d);
                    }
                    let future = inner.take().expect(DONE).call(req);
                    state.set(State::Calling { future, decision });
                }
                StateProj::Calling { future, decision } => {
                    let mut res = ready!(future.poll(cx))?;
                    if let Some(d) = decision {
                        d.write_headers(res.headers_mut());
                    }
                    return Poll::Ready(Ok(res));
                }
            }
        }
    }
}

/// The `429` answer: a problem body plus the decision's headers.
fn limited<ResB: From<Bytes>>(d: &RateLimitDecision) -> Response<ResB> {
    let mut res = Problem::too_many_requests(
        "rate_limited",
        "the rate limit for this tenant and route is reached; retry after Retry-After seconds",
    )
    .to_response();
    d.write_headers(res.headers_mut());
    res
}

/// The `503` answer while Redis is unavailable (fail closed).
fn unavailable<ResB: From<Bytes>>() -> Response<ResB> {
    let mut res = Problem::service_unavailable(
        "rate_limiter_unavailable",
        "the rate limiter is unavailable; retry shortly",
    )
    .to_response();
    res.headers_mut()
        .insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
    res
}

/// The `400` answer for a key the limiter rejects.
fn invalid_key<ResB: From<Bytes>>() -> Response<ResB> {
    Problem::bad_request(
        "invalid_rate_limit_key",
        "the request's tenant cannot be rate limited",
    )
    .to_response()
}
