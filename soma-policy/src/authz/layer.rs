//! The authorization tower layer.

use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use soma_observability::http::{is_valid_request_id, request_id_of};
use tower::{Layer, Service};

use super::Authorizer;
pub use super::future::ResponseFuture;
use crate::input::{AuthzInput, RequestInfo};
use crate::routes::RouteMap;
use crate::{AuthzError, Principal};

/// Header read for the request id when no [`RequestId`](soma_observability::http::RequestId) extension is there
/// (audit correlation only): the one constant of `soma-observability`.
pub use soma_observability::http::REQUEST_ID_HEADER;

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

fn matched_template<B>(_req: &Request<B>) -> Option<&str> {
    #[cfg(feature = "axum")]
    if let Some(m) = _req.extensions().get::<axum::extract::MatchedPath>() {
        return Some(m.as_str());
    }
    None
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for AuthzService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
    ResBody: From<Bytes>,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S, ReqBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        match self.input(&req) {
            Ok(input) => {
                // Take the service that was driven to readiness; leave a clone behind.
                let clone = self.inner.clone();
                let inner = std::mem::replace(&mut self.inner, clone);
                ResponseFuture::check(self.authorizer.clone(), input, req, inner)
            }
            Err(e) => ResponseFuture::refused(&e),
        }
    }
}

impl<S> AuthzService<S> {
    /// The policy input for `req`: the principal the authentication layer
    /// put in the extensions (read in place: the input copies what it
    /// needs), the action and resource its route maps to, and the request id.
    /// An unmapped route is recorded (metrics, audit) and refused.
    fn input<B>(&self, req: &Request<B>) -> Result<AuthzInput, AuthzError> {
        let Some(principal) = req.extensions().get::<Principal>() else {
            return Err(AuthzError::Unauthenticated);
        };
        let method = req.method().as_str();
        let template = matched_template(req);
        let request_id = request_id(req);
        let Some(resolved) = self.routes.resolve(method, template, req.uri().path()) else {
            let route = template.unwrap_or("<unmatched>").to_owned();
            let input = AuthzInput::new(principal, "unmapped", Default::default()).with_request(
                RequestInfo {
                    method: method.to_owned(),
                    route: route.clone(),
                    request_id,
                },
            );
            self.authorizer.record_unmapped(&input);
            return Err(AuthzError::Unmapped {
                method: method.to_owned(),
                route,
            });
        };
        Ok(
            AuthzInput::new(principal, resolved.action, resolved.resource).with_request(
                RequestInfo {
                    method: method.to_owned(),
                    route: resolved.route,
                    request_id,
                },
            ),
        )
    }
}

/// The request's one id: the [`RequestId`](soma_observability::http::RequestId) extension of
/// `soma_observability`'s `RequestIdLayer`, else a valid `x-request-id`.
fn request_id<B>(req: &Request<B>) -> Option<String> {
    request_id_of(req)
        .or_else(|| {
            req.headers()
                .get(REQUEST_ID_HEADER)
                .filter(|v| is_valid_request_id(v))
                .and_then(|v| v.to_str().ok())
        })
        .map(str::to_owned)
}
