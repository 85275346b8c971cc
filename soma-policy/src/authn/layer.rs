//! The authentication tower layer.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, header};
use tower::{Layer, Service};

use super::Authenticator;
use crate::AuthError;
use crate::problem::problem;

/// Wraps a service so every request is authenticated first (the shape of
/// tower-http's `AsyncRequireAuthorization`).
///
/// On success the [`crate::Principal`] is inserted into the request's
/// extensions and the inner service is called. On failure the inner service
/// is not called and the client gets a JSON problem: 401 with
/// `WWW-Authenticate: Bearer …`, 403 on a tenant-header mismatch, 429
/// `too_many_attempts` (with `Retry-After`) when the client's address
/// (axum's `ConnectInfo<SocketAddr>`) failed too many API-key attempts, 503 when
/// keys or the key store are unreachable. The credential is never logged;
/// the cause of a 503 is logged (`warn`) and the body carries only the
/// stable code `auth_unavailable`.
#[derive(Clone, Debug)]
pub struct AuthnLayer {
    auth: Arc<Authenticator>,
}

impl AuthnLayer {
    /// A layer using `auth`.
    pub fn new(auth: Arc<Authenticator>) -> Self {
        Self { auth }
    }
}

impl<S> Layer<S> for AuthnLayer {
    type Service = AuthnService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthnService {
            inner,
            auth: self.auth.clone(),
        }
    }
}

/// The service produced by [`AuthnLayer`].
#[derive(Clone, Debug)]
pub struct AuthnService<S> {
    inner: S,
    auth: Arc<Authenticator>,
}

/// Future of [`AuthnService`].
pub struct ResponseFuture<ResBody, E> {
    inner: Pin<Box<dyn Future<Output = Result<Response<ResBody>, E>> + Send>>,
}

impl<ResBody, E> std::fmt::Debug for ResponseFuture<ResBody, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthnResponseFuture")
            .finish_non_exhaustive()
    }
}

impl<ResBody, E> Future for ResponseFuture<ResBody, E> {
    type Output = Result<Response<ResBody>, E>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for AuthnService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: 'static,
    ReqBody: Send + 'static,
    ResBody: From<Bytes> + Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        // Take the service that was driven to readiness; leave a clone behind.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let auth = self.auth.clone();
        ResponseFuture {
            inner: Box::pin(async move {
                match auth.authenticate_from(req.headers(), peer(&req)).await {
                    Ok(principal) => {
                        req.extensions_mut().insert(principal);
                        inner.call(req).await
                    }
                    Err(e) if e.is_unavailable() => {
                        // The detail (a JWKS URL, a database error) is for the
                        // operator's log, never for an unauthenticated client.
                        tracing::warn!(reason = e.code(), error = %e, "credential verification unavailable");
                        Ok(auth_failure(&e))
                    }
                    Err(e) => {
                        tracing::debug!(reason = e.code(), "authentication failed");
                        Ok(auth_failure(&e))
                    }
                }
            }),
        }
    }
}

/// The client's address: axum's `ConnectInfo<SocketAddr>` (feature `axum`,
/// served with `into_make_service_with_connect_info::<SocketAddr>()`), or a
/// bare `SocketAddr` another server put in the extensions.
fn peer<B>(req: &Request<B>) -> Option<IpAddr> {
    #[cfg(feature = "axum")]
    if let Some(info) = req
        .extensions()
        .get::<axum::extract::ConnectInfo<SocketAddr>>()
    {
        return Some(info.0.ip());
    }
    req.extensions().get::<SocketAddr>().map(SocketAddr::ip)
}

/// The response for an authentication failure.
///
/// The body's `detail` is [`AuthError::public_detail`]: a fixed sentence per
/// code, so no internal detail (JWKS URLs, database errors) reaches a client
/// that has not even authenticated.
pub(crate) fn auth_failure<B: From<Bytes>>(e: &AuthError) -> Response<B> {
    let status = e.status();
    let mut res = problem(status, e.code(), &e.public_detail());
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
