//! One request id per request, set outermost: [`RequestIdLayer`].

use std::task::{Context, Poll};

use http::{HeaderName, HeaderValue, Request, Response};
use tower::{Layer, Service};
use tower_http::request_id::{
    MakeRequestUuid, PropagateRequestId, PropagateRequestIdLayer, SetRequestId, SetRequestIdLayer,
};

pub use tower_http::request_id::RequestId;

/// The request-id header, `x-request-id`: read from the client, written on
/// the response, sent on outgoing calls.
pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// Longest request id kept from a client, in bytes.
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// True when `value` is a request id a client may choose: 1 to
/// [`MAX_REQUEST_ID_LEN`] bytes of visible ASCII (no spaces or control
/// characters), so it is safe in logs, spans and message headers.
pub fn is_valid_request_id(value: &HeaderValue) -> bool {
    let b = value.as_bytes();
    !b.is_empty() && b.len() <= MAX_REQUEST_ID_LEN && b.iter().all(|c| (0x21..=0x7e).contains(c))
}

/// The request id [`RequestIdLayer`] put in `req`'s extensions, if any.
pub fn request_id_of<B>(req: &Request<B>) -> Option<&str> {
    req.extensions()
        .get::<RequestId>()
        .and_then(|id| id.header_value().to_str().ok())
}

/// Gives every request exactly one id, in the [`RequestId`] extension, that
/// everything after it reads: tracing spans, the policy input and audit
/// record, handlers, published messages.
///
/// Put it **outermost**, so even a request refused by an outer layer has its
/// id. It is tower-http's [`SetRequestIdLayer`] and
/// [`PropagateRequestIdLayer`] on [`REQUEST_ID_HEADER`], plus a check of the
/// client's value:
///
/// - a client's `x-request-id` that [`is_valid_request_id`] is kept;
/// - a missing, invalid or repeated one is replaced by a new UUID;
/// - the id is written back on the response's `x-request-id`.
///
/// ```
/// use soma_observability::http::{RequestIdLayer, request_id_of};
/// use tower::{ServiceBuilder, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let svc = ServiceBuilder::new().layer(RequestIdLayer::new()).service_fn(
///     |req: http::Request<()>| async move {
///         let id = request_id_of(&req).unwrap().to_owned();
///         Ok::<_, std::convert::Infallible>(http::Response::new(id))
///     },
/// );
/// let req = http::Request::builder()
///     .header("x-request-id", "req-42")
///     .body(())
///     .unwrap();
/// let res = svc.oneshot(req).await.unwrap();
/// assert_eq!(res.headers()["x-request-id"], "req-42");
/// assert_eq!(res.body(), "req-42");
/// # }
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestIdLayer;

impl RequestIdLayer {
    /// The layer.
    pub fn new() -> Self {
        Self
    }
}

impl<S> Layer<S> for RequestIdLayer {
    type Service = RequestIdService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        let inner = PropagateRequestIdLayer::new(REQUEST_ID_HEADER).layer(inner);
        RequestIdService {
            inner: SetRequestIdLayer::new(REQUEST_ID_HEADER, MakeRequestUuid).layer(inner),
        }
    }
}

/// The service made by [`RequestIdLayer`].
#[derive(Clone)]
pub struct RequestIdService<S> {
    inner: SetRequestId<PropagateRequestId<S>, MakeRequestUuid>,
}

impl<S> std::fmt::Debug for RequestIdService<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestIdService")
            .field("header", &REQUEST_ID_HEADER)
            .finish_non_exhaustive()
    }
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for RequestIdService<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
{
    type Response = Response<ResB>;
    type Error = S::Error;
    type Future =
        <SetRequestId<PropagateRequestId<S>, MakeRequestUuid> as Service<Request<ReqB>>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqB>) -> Self::Future {
        let mut values = req.headers().get_all(REQUEST_ID_HEADER).iter();
        let keep = match (values.next(), values.next()) {
            (Some(v), None) => is_valid_request_id(v),
            (None, _) => true,
            (Some(_), Some(_)) => false,
        };
        if !keep {
            // Replaced by a fresh id below (tower-http sets one when absent).
            req.headers_mut().remove(REQUEST_ID_HEADER);
        }
        // Only this layer decides the id: nothing a caller put in the
        // extensions before it counts.
        req.extensions_mut().remove::<RequestId>();
        self.inner.call(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::{ServiceBuilder, ServiceExt};

    async fn seen(header: Option<&str>) -> (String, String) {
        let svc = ServiceBuilder::new()
            .layer(RequestIdLayer::new())
            .service_fn(|req: Request<()>| async move {
                let id = request_id_of(&req).expect("an id").to_owned();
                assert_eq!(req.headers()[REQUEST_ID_HEADER], id.as_str());
                Ok::<_, std::convert::Infallible>(Response::new(id))
            });
        let mut req = Request::builder();
        if let Some(h) = header {
            req = req.header(REQUEST_ID_HEADER, h);
        }
        let res = svc.oneshot(req.body(()).unwrap()).await.unwrap();
        let header = res.headers()[REQUEST_ID_HEADER]
            .to_str()
            .unwrap()
            .to_owned();
        (header, res.into_body())
    }

    #[tokio::test]
    async fn a_valid_client_id_is_kept_and_echoed() {
        assert_eq!(
            seen(Some("req-42")).await,
            ("req-42".to_owned(), "req-42".to_owned())
        );
    }

    #[tokio::test]
    async fn a_missing_or_invalid_id_is_replaced_by_one_new_id() {
        let too_long = "x".repeat(MAX_REQUEST_ID_LEN + 1);
        for header in [None, Some(""), Some("has space"), Some(too_long.as_str())] {
            let (on_response, in_handler) = seen(header).await;
            assert_eq!(on_response, in_handler, "{header:?}");
            assert_ne!(Some(on_response.as_str()), header);
            assert_eq!(on_response.len(), 36, "a UUID: {on_response}");
        }
    }

    #[test]
    fn validity() {
        assert!(is_valid_request_id(&HeaderValue::from_static("a")));
        let max = HeaderValue::from_str(&"a".repeat(MAX_REQUEST_ID_LEN)).unwrap();
        assert!(is_valid_request_id(&max));
        assert!(!is_valid_request_id(&HeaderValue::from_static("a\tb")));
    }
}
