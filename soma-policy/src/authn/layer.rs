//! The authentication tower layer.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use tower::{Layer, Service};

use super::Authenticator;
pub use super::future::ResponseFuture;

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

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for AuthnService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
    ReqBody: Send + 'static,
    ResBody: From<Bytes>,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S, ReqBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        // Take the service that was driven to readiness; leave a clone behind.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let peer = peer(&req);
        ResponseFuture::new(self.auth.clone(), req, peer, inner)
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
