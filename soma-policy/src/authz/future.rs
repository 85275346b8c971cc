//! The response future of [`AuthzService`](super::AuthzService): ask the
//! policy, then call the inner service with the [`Decision`] in the
//! request's extensions, or answer the refusal.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::{Request, Response};
use pin_project_lite::pin_project;
use tower::Service;

use super::{Authorizer, Decision};
use crate::{AuthzError, AuthzInput};
use soma_observability::http::Problem;

/// The policy decision in flight, with the action it decides (for a
/// refusal's detail).
///
/// [`Authorizer::check`] is an `async fn` (decision cache, then an embedded
/// or remote engine) whose future type has no name on stable Rust, so this
/// one step is boxed. The inner service's future is polled in place.
type Check = Pin<Box<dyn Future<Output = (String, Result<Decision, AuthzError>)> + Send>>;

pin_project! {
    /// Response future of [`AuthzService`](super::AuthzService).
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
        // Refused before any engine was asked (no principal, unmapped route).
        Refused { response: Option<S::Response> },
        // Asking the policy; `inner` is the service driven to readiness.
        Checking { check: Check, req: Option<Request<ReqBody>>, inner: Option<S> },
        // Allowed: the inner service answers.
        Calling { #[pin] future: S::Future },
    }
}

impl<S, ReqBody> ResponseFuture<S, ReqBody>
where
    S: Service<Request<ReqBody>>,
{
    /// Answers the refusal `e` without calling the inner service.
    pub(super) fn refused<ResBody>(e: &AuthzError) -> Self
    where
        S: Service<Request<ReqBody>, Response = Response<ResBody>>,
        ResBody: From<Bytes>,
    {
        Self {
            state: State::Refused {
                response: Some(authz_failure(e)),
            },
        }
    }

    /// Asks `authorizer` about `input`; `inner` (driven to readiness) answers
    /// `req` once it is allowed.
    ///
    /// The one allocation of the request path: the check is an `async fn`
    /// whose future type cannot be named on stable Rust, so it is boxed
    /// here (see [`Check`]); everything after it is a plain state machine.
    pub(super) fn check(
        authorizer: Arc<Authorizer>,
        input: AuthzInput,
        req: Request<ReqBody>,
        inner: S,
    ) -> Self {
        let check: Check = Box::pin(async move {
            let decision = authorizer.check(&input).await;
            (input.action, decision)
        });
        Self {
            state: State::Checking {
                check,
                req: Some(req),
                inner: Some(inner),
            },
        }
    }
}

impl<S, ReqBody> std::fmt::Debug for ResponseFuture<S, ReqBody>
where
    S: Service<Request<ReqBody>>,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthzResponseFuture")
            .finish_non_exhaustive()
    }
}

impl<S, ReqBody, ResBody> Future for ResponseFuture<S, ReqBody>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: From<Bytes>,
{
    type Output = Result<Response<ResBody>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        const DONE: &str = "authz future polled after completion";
        let mut state = self.project().state;
        loop {
            match state.as_mut().project() {
                StateProj::Refused { response } => {
                    return Poll::Ready(Ok(response.take().expect(DONE)));
                }
                StateProj::Checking { check, req, inner } => {
                    let decision = match ready!(check.as_mut().poll(cx)) {
                        (_, Ok(d)) if d.allow => d,
                        (action, Ok(d)) => {
                            let denied = AuthzError::Forbidden {
                                action,
                                reasons: d.reasons,
                            };
                            return Poll::Ready(Ok(authz_failure(&denied)));
                        }
                        (_, Err(e)) => return Poll::Ready(Ok(authz_failure(&e))),
                    };
                    let mut req = req.take().expect(DONE);
                    req.extensions_mut().insert(decision);
                    let future = inner.take().expect(DONE).call(req);
                    state.set(State::Calling { future });
                }
                StateProj::Calling { future } => return future.poll(cx),
            }
        }
    }
}

fn authz_failure<B: From<Bytes>>(e: &AuthzError) -> Response<B> {
    let detail = match e {
        AuthzError::Forbidden { action, reasons } => {
            format!("{action} denied: {}", reasons.join(", "))
        }
        AuthzError::Unavailable(_) => "the policy engine is unavailable".to_owned(),
        other => other.to_string(),
    };
    Problem::new(e.status(), e.code(), detail).to_response()
}
