//! SomaBrain's operator routes, mounted from [`soma_somabrain::proxy`]
//! behind the gateway's authentication and policy (action
//! `somabrain.operate`): the caller's tenant (from its verified
//! credential, never a header) is the SomaBrain tenant, and the request id
//! of the gateway's request-id layer goes on to SomaBrain. Errors are the
//! proxy's problem bodies: a fault of SomaBrain's is `502`, `503` (with
//! `Retry-After`) or `504` naming SomaBrain, never a `4xx`.

use axum::Router;
use axum::extract::Request;
use axum::middleware::Next;
use soma_policy::{Principal, RouteRule};
use soma_somabrain::SomabrainClient;
use soma_somabrain::proxy::{self, Scope};

use super::features::{Features, SOMABRAIN_OPERATOR};
use crate::PlatformError;
use crate::runtime::Runtime;

/// The proxied routes and their methods.
pub const ROUTES: [(&str, &str); 4] = [
    ("POST", "/v1/context"),
    ("GET", "/v1/weights"),
    ("POST", "/v1/learning/reward"),
    ("GET", "/v1/flags/{flag}"),
];

/// The policy rules of the proxied routes: every one is `somabrain.operate`.
pub fn routes() -> Vec<RouteRule> {
    ROUTES
        .iter()
        .map(|(method, route)| RouteRule::new(method, route, "somabrain.operate", "somabrain"))
        .collect()
}

/// The proxy over this gateway's SomaBrain client.
#[derive(Clone)]
pub struct SomabrainRoutes {
    client: SomabrainClient,
    features: Features,
}

impl std::fmt::Debug for SomabrainRoutes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SomabrainRoutes").finish_non_exhaustive()
    }
}

impl SomabrainRoutes {
    /// A SomaBrain client on the runtime (health component `somabrain`,
    /// optional: SomaBrain down makes the gateway degraded, not unready).
    ///
    /// # Errors
    /// [`PlatformError::Somabrain`] for bad `somabrain` settings.
    pub fn new(runtime: &Runtime, features: Features) -> Result<Self, PlatformError> {
        Ok(Self {
            client: runtime.somabrain()?,
            features,
        })
    }

    /// The four routes, gated by flag `somabrain_operator`, with the
    /// caller's [`Scope`] taken from its [`Principal`].
    pub fn router<S: Clone + Send + Sync + 'static>(&self) -> Router<S> {
        let routes = proxy::router(self.client.clone()).route_layer(axum::middleware::from_fn(
            |mut req: Request, next: Next| async move {
                if let Some(p) = req.extensions().get::<Principal>() {
                    let scope = Scope {
                        tenant: p.tenant.clone(),
                        namespace: None,
                    };
                    req.extensions_mut().insert(scope);
                }
                next.run(req).await
            },
        ));
        self.features.gate(SOMABRAIN_OPERATOR, routes)
    }
}
