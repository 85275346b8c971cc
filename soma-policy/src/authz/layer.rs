//! The authorization tower layer.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use tower::{Layer, Service};

use super::Authorizer;
use crate::input::{AuthzInput, RequestInfo};
use crate::problem::problem;
use crate::routes::RouteMap;
use crate::{AuthzError, Principal};

/// Header read for the request id (audit correlation only).
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Authorizes each request: action from route template + method via the
/// [`RouteMap`], subject/tenant/roles/scopes from the [`Principal`] the
/// authentication layer put in the extensions.
///
/// Outcomes: allowed → the [`crate::Decision`] goes into the extensions and the
/// inner service runs; denied or unmapped route → 403 `forbidden`; engine
/// unavailable in fail-closed mode → 503 `policy_unavailable`; no principal
/// (authentication layer missing) → 401.
///
/// The route template comes from axum's `MatchedPath` when the `axum` feature
/// is on and the layer runs inside a router (`Router::route_layer`);
/// otherwise the raw path is matched against the mapping's templates.
#[derive(Clone, Debug)]
pub struct AuthzLayer {
    authorizer: Arc<Authorizer>,
    routes: Arc<RouteMap>,
}

impl AuthzLayer {
    /// A layer deciding with `authorizer` over `routes`.
    pub fn new(authorizer: Arc<Authorizer>, routes: Arc<RouteMap>) -> Self {
        Self { authorizer, routes }
    }
}

impl<S> Layer<S> for AuthzLayer {
    type Service = AuthzService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthzService {
            inner,
            authorizer: self.authorizer.clone(),
            routes: self.routes.clone(),
        }
    }
}

/// The service produced by [`AuthzLayer`].
#[derive(Clone, Debug)]
pub struct AuthzService<S> {
    inner: S,
    authorizer: Arc<Authorizer>,
    routes: Arc<RouteMap>,
}

/// Future of [`AuthzService`].
pub struct ResponseFuture<ResBody, E> {
    inner: Pin<Box<dyn Future<Output = Result<Response<ResBody>, E>> + Send>>,
}

impl<ResBody, E> std::fmt::Debug for ResponseFuture<ResBody, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthzResponseFuture")
            .finish_non_exhaustive()
    }
}

impl<ResBody, E> Future for ResponseFuture<ResBody, E> {
    type Output = Result<Response<ResBody>, E>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

fn matched_template<B>(_req: &Request<B>) -> Option<&str> {
    #[cfg(feature = "axum")]
    if let Some(m) = _req.extensions().get::<axum::extract::MatchedPath>() {
        return Some(m.as_str());
    }
    None
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for AuthzService<S>
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
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let authorizer = self.authorizer.clone();
        let routes = self.routes.clone();
        ResponseFuture {
            inner: Box::pin(async move {
                // Read the principal in place: the input copies what it needs.
                let Some(principal) = req.extensions().get::<Principal>() else {
                    return Ok(authz_failure(&AuthzError::Unauthenticated));
                };
                let method = req.method().as_str();
                let template = matched_template(&req);
                let request_id = req
                    .headers()
                    .get(REQUEST_ID_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .filter(|v| v.len() <= 128)
                    .map(str::to_owned);
                let Some(resolved) = routes.resolve(method, template, req.uri().path()) else {
                    let route = template.unwrap_or("<unmatched>").to_owned();
                    let input = AuthzInput::new(principal, "unmapped", Default::default())
                        .with_request(RequestInfo {
                            method: method.to_owned(),
                            route: route.clone(),
                            request_id,
                        });
                    authorizer.record_unmapped(&input);
                    return Ok(authz_failure(&AuthzError::Unmapped {
                        method: method.to_owned(),
                        route,
                    }));
                };
                let input = AuthzInput::new(principal, resolved.action, resolved.resource)
                    .with_request(RequestInfo {
                        method: method.to_owned(),
                        route: resolved.route,
                        request_id,
                    });
                match authorizer.check(&input).await {
                    Ok(d) if d.allow => {
                        req.extensions_mut().insert(d);
                        inner.call(req).await
                    }
                    Ok(d) => Ok(authz_failure(&AuthzError::Forbidden {
                        action: input.action,
                        reasons: d.reasons,
                    })),
                    Err(e) => Ok(authz_failure(&e)),
                }
            }),
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
    problem(e.status(), e.code(), &detail)
}
