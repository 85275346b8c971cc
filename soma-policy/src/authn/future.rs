//! The response future of [`AuthnService`](super::AuthnService): check the
//! credential, then call the inner service with the principal in the
//! request's extensions, or answer the failure.

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, header};
use pin_project_lite::pin_project;
use tower::Service;

use super::Authenticator;
use crate::{AuthError, Principal};
use soma_observability::http::Problem;

/// The credential check in flight, with the request it reads (see
/// [`ResponseFuture::new`] for why it is boxed).
///
/// [`Authenticator::authenticate_from`](super::Authenticator::authenticate_from)
/// is an `async fn` (JWKS refresh, key-store lookup, attempt limiter) whose
/// future type has no name on stable Rust, so this one step is boxed; the
/// request rides along because the check borrows its headers, and comes back
/// with the outcome. The inner service's future is polled in place.
type Check<ReqBody> =
    Pin<Box<dyn Future<Output = (Request<ReqBody>, Result<Principal, AuthError>)> + Send>>;

pin_project! {
    /// Response future of [`AuthnService`](super::AuthnService).
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
        // Verifying the credential; `inner` is the service driven to readiness.
        Checking { check: Check<ReqBody>, inner: Option<S> },
        // Authenticated: the inner service answers.
        Calling { #[pin] future: S::Future },
    }
}

impl<S, ReqBody> ResponseFuture<S, ReqBody>
where
    S: Service<Request<ReqBody>>,
{
    /// Starts checking `req`'s credential; `inner` (driven to readiness)
    /// answers once it passes.
    ///
    /// The one allocation of the request path: the check is an `async fn`
    /// whose future type cannot be named on stable Rust, so it is boxed
    /// here (see [`Check`]); everything after it is a plain state machine.
    pub(super) fn new(
        auth: Arc<Authenticator>,
        req: Request<ReqBody>,
        peer: Option<IpAddr>,
        inner: S,
    ) -> Self
    where
        ReqBody: Send + 'static,
    {
        let check: Check<ReqBody> = Box::pin(async move {
            let outcome = auth.authenticate_from(req.headers(), peer).await;
            (req, outcome)
        });
        Self {
            state: State::Checking {
                check,
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
        f.debug_struct("AuthnResponseFuture")
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
        let mut state = self.project().state;
        loop {
            match state.as_mut().project() {
                StateProj::Checking { check, inner } => {
                    let (mut req, outcome) = ready!(check.as_mut().poll(cx));
                    let principal = match outcome {
                        Ok(principal) => principal,
                        Err(e) => return Poll::Ready(Ok(rejected(&e))),
                    };
                    req.extensions_mut().insert(principal);
                    let mut inner = inner.take().expect("authn future polled after completion");
                    state.set(State::Calling {
                        future: inner.call(req),
                    });
                }
                StateProj::Calling { future } => return future.poll(cx),
            }
        }
    }
}

/// Logs a failed check and builds its answer.
fn rejected<B: From<Bytes>>(e: &AuthError) -> Response<B> {
    if e.is_unavailable() {
        // The detail (a JWKS URL, a database error) is for the operator's
        // log, never for an unauthenticated client.
        tracing::warn!(reason = e.code(), error = %e, "credential verification unavailable");
    } else {
        tracing::debug!(reason = e.code(), "authentication failed");
    }
    auth_failure(e)
}

/// The response for an authentication failure.
///
/// The body's `detail` is [`AuthError::public_detail`]: a fixed sentence per
/// code, so no internal detail (JWKS URLs, database errors) reaches a client
/// that has not even authenticated.
fn auth_failure<B: From<Bytes>>(e: &AuthError) -> Response<B> {
    let status = e.status();
    let mut res = Problem::new(status, e.code(), e.public_detail()).to_response();
    if status == http::StatusCode::UNAUTHORIZED {
        // RFC 6750 §3: no error attribute when no credential was presented.
        let value = if e.is_missing() {
            "Bearer realm=\"soma\"".to_owned()
        } else {
            format!(
                "Bearer realm=\"soma\", error=\"invalid_token\", error_description=\"{}\"",
                e.code()
            )
        };
        if let Ok(v) = HeaderValue::from_str(&value) {
            res.headers_mut().insert(header::WWW_AUTHENTICATE, v);
        }
    }
    if e.is_rate_limited() {
        res.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    res
}
