//! Tower middleware: [`IdempotencyLayer`] answers a retried request that
//! carries an `Idempotency-Key` with the first request's answer, on
//! [`Idempotency`]'s claims.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use soma_observability::http::Problem;
use soma_observability::resilience::FailMode;
use tower::{Layer, Service};

use super::{Claim, ClaimGuard, Idempotency};

/// The request header carrying a client's idempotency key.
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";

/// The response header (`true`) on an answer replayed from an earlier
/// request with the same key.
pub const IDEMPOTENT_REPLAYED_HEADER: &str = "idempotent-replayed";

/// The validated `Idempotency-Key` of a request, put in its extensions by
/// [`IdempotencyLayer`] for the handler (which need not parse the header
/// again: a malformed key never reaches it).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    /// The key as sent.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Whose key an `Idempotency-Key` is: the same key sent by another subject
/// or tenant is another key, so nobody replays someone else's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyScope {
    /// The tenant (a key part: no `:`, spaces or braces).
    pub tenant: String,
    /// The authenticated caller within the tenant.
    pub subject: String,
}

/// An `Idempotency-Key` header that is not 1–128 visible ASCII characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("Idempotency-Key must be 1-128 visible ASCII characters")]
pub struct InvalidIdempotencyKey;

/// Reads `Idempotency-Key` as [`IdempotencyLayer`] does: `Ok(None)` when
/// absent; a key is 1–128 visible ASCII characters (no spaces), anything
/// else is refused, not trimmed or guessed. For a handler behind the layer
/// that derives something from the key (e.g. a message id).
pub fn idempotency_key(headers: &HeaderMap) -> Result<Option<&str>, InvalidIdempotencyKey> {
    match headers.get(IDEMPOTENCY_KEY_HEADER) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .ok()
            .filter(|k| (1..=128).contains(&k.len()) && k.bytes().all(|b| b.is_ascii_graphic()))
            .map(Some)
            .ok_or(InvalidIdempotencyKey),
    }
}

type ScopeFn<B> = dyn Fn(&Request<B>) -> Option<IdempotencyScope> + Send + Sync;

/// Makes a request/response endpoint idempotent under the
/// `Idempotency-Key` header, with the first answer stored in Redis by
/// [`Idempotency`].
///
/// For a request with a key, scoped to `scope_fn(request)`
/// ([`IdempotencyScope`]: tenant and subject, so install the layer inside
/// authentication):
///
/// | state of the key | answer |
/// |---|---|
/// | new | the inner service runs **in a task of its own**, so a client that disconnects or times out does not abandon the work; a `2xx` answer is stored (status, `Content-Type`, body) and returned; any other answer releases the key so a retry runs again |
/// | completed, same request | the stored answer, with `Idempotent-Replayed: true`; the inner service is not called |
/// | still in progress | `409`, code `request_in_progress`, `Retry-After` |
/// | used with another request (method, path or body differ) | `422`, code `idempotency_key_reused` |
/// | Redis unavailable | `503`, code `idempotency_unavailable`, `Retry-After: 1` ([`FailMode::Closed`], the default); with [`FailMode::Open`] the request runs without idempotency |
///
/// A key that is not 1–128 visible ASCII characters is `400`,
/// `invalid_idempotency_key`; a body over
/// [`max_body_bytes`](Self::max_body_bytes) is `413`, `body_too_large`.
/// Requests without the header, or for which `scope_fn` returns `None`,
/// pass through untouched. Every refusal is an `application/problem+json`
/// [`Problem`].
///
/// The layer reads the whole request body (to fingerprint it) and the
/// whole `2xx` response body (to store it): put it on request/response
/// routes, never on a streaming one. A `2xx` body that is not UTF-8 or is
/// over [`max_stored_bytes`](Self::max_stored_bytes) is returned but not
/// stored (the key is released, and a warning logged).
///
/// ```
/// use soma_redis::{Idempotency, IdempotencyLayer, IdempotencyScope};
/// # fn demo(idempotency: Idempotency) {
/// let layer = IdempotencyLayer::new(idempotency, |req: &http::Request<bytes::Bytes>| {
///     let tenant = req.headers().get("x-tenant")?.to_str().ok()?.to_owned();
///     let subject = req.headers().get("x-user")?.to_str().ok()?.to_owned();
///     Some(IdempotencyScope { tenant, subject })
/// })
/// .max_body_bytes(16 * 1024);
/// # let _ = layer; }
/// ```
pub struct IdempotencyLayer<B> {
    idempotency: Idempotency,
    scope_fn: Arc<ScopeFn<B>>,
    max_body_bytes: usize,
    max_stored_bytes: usize,
    failure: FailMode,
}

impl<B> Clone for IdempotencyLayer<B> {
    fn clone(&self) -> Self {
        Self {
            idempotency: self.idempotency.clone(),
            scope_fn: self.scope_fn.clone(),
            max_body_bytes: self.max_body_bytes,
            max_stored_bytes: self.max_stored_bytes,
            failure: self.failure,
        }
    }
}

impl<B> std::fmt::Debug for IdempotencyLayer<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdempotencyLayer")
            .field("idempotency", &self.idempotency)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("max_stored_bytes", &self.max_stored_bytes)
            .field("failure", &self.failure)
            .finish()
    }
}

impl<B> IdempotencyLayer<B> {
    /// A layer scoping each key to `scope_fn(request)`; request bodies up
    /// to 1 MiB, stored answers up to 64 KiB, fail closed.
    pub fn new<F>(idempotency: Idempotency, scope_fn: F) -> Self
    where
        F: Fn(&Request<B>) -> Option<IdempotencyScope> + Send + Sync + 'static,
    {
        Self {
            idempotency,
            scope_fn: Arc::new(scope_fn),
            max_body_bytes: 1024 * 1024,
            max_stored_bytes: 64 * 1024,
            failure: FailMode::Closed,
        }
    }

    /// The largest request body the layer reads (default 1 MiB); set it to
    /// the route's body limit.
    pub fn max_body_bytes(mut self, n: usize) -> Self {
        self.max_body_bytes = n;
        self
    }

    /// The largest answer body that is stored for replay (default 64 KiB).
    pub fn max_stored_bytes(mut self, n: usize) -> Self {
        self.max_stored_bytes = n;
        self
    }

    /// The behaviour while Redis is unavailable (default [`FailMode::Closed`]).
    pub fn failure_mode(mut self, mode: FailMode) -> Self {
        self.failure = mode;
        self
    }
}

impl<S, B> Layer<S> for IdempotencyLayer<B> {
    type Service = IdempotencyService<S, B>;

    fn layer(&self, inner: S) -> Self::Service {
        IdempotencyService {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service made by [`IdempotencyLayer`].
pub struct IdempotencyService<S, B> {
    inner: S,
    layer: IdempotencyLayer<B>,
}

impl<S: Clone, B> Clone for IdempotencyService<S, B> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            layer: self.layer.clone(),
        }
    }
}

impl<S, B> std::fmt::Debug for IdempotencyService<S, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdempotencyService")
            .field("layer", &self.layer)
            .finish()
    }
}

/// The response future of [`IdempotencyService`]. Boxed: the claimed
/// request runs in a spawned task whose settling (store or release) is a
/// chain of `async` Redis calls.
pub type IdempotencyFuture<R, E> = Pin<Box<dyn Future<Output = Result<R, E>> + Send>>;

impl<S, ReqB, ResB> Service<Request<ReqB>> for IdempotencyService<S, ReqB>
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqB: http_body::Body<Data = Bytes> + From<Bytes> + Send + 'static,
    ReqB::Error: std::error::Error + Send + Sync + 'static,
    ResB: http_body::Body<Data = Bytes> + From<Bytes> + Send + 'static,
    ResB::Error: std::fmt::Display + Send,
{
    type Response = Response<ResB>;
    type Error = S::Error;
    type Future = IdempotencyFuture<Response<ResB>, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        // The ready inner service handles this request; a fresh clone takes its place.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(handle(self.layer.clone(), inner, req))
    }
}

/// What is stored for replay: the first `2xx` answer.
#[derive(Debug, Serialize, Deserialize)]
struct StoredAnswer {
    status: u16,
    content_type: Option<String>,
    body: String,
}

impl StoredAnswer {
    fn replay<B: From<Bytes>>(self) -> Response<B> {
        let mut res = Response::new(B::from(Bytes::from(self.body)));
        *res.status_mut() = StatusCode::from_u16(self.status).unwrap_or(StatusCode::OK);
        if let Some(v) = self
            .content_type
            .and_then(|c| HeaderValue::from_str(&c).ok())
        {
            res.headers_mut().insert(header::CONTENT_TYPE, v);
        }
        res.headers_mut()
            .insert(IDEMPOTENT_REPLAYED_HEADER, HeaderValue::from_static("true"));
        res
    }
}

async fn handle<S, ReqB, ResB>(
    layer: IdempotencyLayer<ReqB>,
    mut inner: S,
    mut req: Request<ReqB>,
) -> Result<Response<ResB>, S::Error>
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqB: http_body::Body<Data = Bytes> + From<Bytes> + Send + 'static,
    ReqB::Error: std::error::Error + Send + Sync + 'static,
    ResB: http_body::Body<Data = Bytes> + From<Bytes> + Send + 'static,
    ResB::Error: std::fmt::Display + Send,
{
    let key = match idempotency_key(req.headers()) {
        Ok(None) => return inner.call(req).await,
        Ok(Some(key)) => key.to_owned(),
        Err(InvalidIdempotencyKey) => {
            return Ok(Problem::bad_request(
                "invalid_idempotency_key",
                "Idempotency-Key must be 1-128 visible ASCII characters",
            )
            .to_response());
        }
    };
    req.extensions_mut().insert(IdempotencyKey(key.clone()));
    let Some(scope) = (layer.scope_fn)(&req) else {
        return inner.call(req).await;
    };
    let (parts, body) = req.into_parts();
    let body = match read_body(body, layer.max_body_bytes).await {
        Ok(b) => b,
        Err(answer) => return Ok(answer),
    };
    let fingerprint = fingerprint(&parts.method, parts.uri.path(), &body);
    let claim = layer
        .idempotency
        .claim::<StoredAnswer>(
            &scope.tenant,
            &scoped_key(&scope.subject, &key),
            &fingerprint,
        )
        .await;
    let guard = match admit(claim, layer.failure) {
        Ok(guard) => guard,
        Err(answer) => return Ok(answer),
    };
    let req = Request::from_parts(parts, ReqB::from(body));
    let Some(guard) = guard else {
        return inner.call(req).await;
    };
    // The claimed work runs to its end, and settles the key, whatever
    // happens to the request that started it.
    let max_stored = layer.max_stored_bytes;
    let work = tokio::spawn(async move {
        match inner.call(req).await {
            Ok(res) => Ok(settle(guard, res, max_stored).await),
            Err(e) => {
                release(guard).await;
                Err(e)
            }
        }
    });
    match work.await {
        Ok(answer) => answer,
        Err(e) => {
            tracing::error!(error = %e, "idempotency: the claimed request's task failed");
            Ok(Problem::internal().to_response())
        }
    }
}

/// The request body, up to `max` bytes; otherwise the answer: `413
/// body_too_large`, or `400 invalid_body` when it cannot be read.
async fn read_body<ReqB, ResB>(body: ReqB, max: usize) -> Result<Bytes, Response<ResB>>
where
    ReqB: http_body::Body<Data = Bytes>,
    ReqB::Error: std::error::Error + Send + Sync + 'static,
    ResB: From<Bytes>,
{
    match Limited::new(body, max).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Err(
            Problem::payload_too_large("body_too_large", "the request body is too large")
                .to_response(),
        ),
        Err(e) => {
            tracing::debug!(error = %e, "idempotency: request body unreadable");
            Err(
                Problem::bad_request("invalid_body", "the request body could not be read")
                    .to_response(),
            )
        }
    }
}

/// What a claim means for the request: run it holding the key
/// (`Ok(Some)`), run it without (`Ok(None)`: the store is down and the
/// layer fails open), or answer now (the stored answer, `409`, `422`,
/// `400`, or `503` failing closed).
fn admit<ResB: From<Bytes>>(
    claim: Result<Claim<StoredAnswer>, crate::RedisError>,
    failure: FailMode,
) -> Result<Option<ClaimGuard>, Response<ResB>> {
    match claim {
        Ok(Claim::Acquired(guard)) => Ok(Some(guard)),
        Ok(Claim::Completed(first)) => Err(first.replay()),
        Ok(Claim::InProgress { retry_after }) => Err(in_progress(retry_after)),
        Ok(Claim::Mismatch) => Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "idempotency_key_reused",
            "this Idempotency-Key was used for a different request",
        )
        .to_response()),
        Err(e) if e.is_invalid() => {
            tracing::warn!(error = %e, "idempotency: key scope rejected");
            Err(Problem::bad_request(
                "invalid_idempotency_scope",
                "the request's tenant cannot hold idempotency keys",
            )
            .to_response())
        }
        Err(e) => match failure {
            FailMode::Closed => {
                tracing::warn!(error = %e, "idempotency store unavailable; rejecting (fail closed)");
                let mut res: Response<ResB> = Problem::service_unavailable(
                    "idempotency_unavailable",
                    "cannot check the Idempotency-Key right now; retry later",
                )
                .to_response();
                res.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                Err(res)
            }
            FailMode::Open => {
                tracing::warn!(error = %e, "idempotency store unavailable; running without it (fail open)");
                Ok(None)
            }
        },
    }
}

/// Stores a `2xx` answer for replay (or releases the key) and returns it.
async fn settle<ResB>(guard: ClaimGuard, res: Response<ResB>, max_stored: usize) -> Response<ResB>
where
    ResB: http_body::Body<Data = Bytes> + From<Bytes>,
    ResB::Error: std::fmt::Display + Send,
{
    if !res.status().is_success() {
        release(guard).await;
        return res;
    }
    let (parts, body) = res.into_parts();
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => {
            tracing::error!(error = %e, "idempotency: the answer's body failed");
            release(guard).await;
            return Problem::internal().to_response();
        }
    };
    match std::str::from_utf8(&body) {
        Ok(text) if body.len() <= max_stored => {
            let stored = StoredAnswer {
                status: parts.status.as_u16(),
                content_type: parts
                    .headers
                    .get(header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned),
                body: text.to_owned(),
            };
            if let Err(e) = guard.complete(&stored).await {
                // Answered, but not stored: a retry after the in-progress
                // claim expires runs the request again.
                tracing::warn!(error = %e, "idempotency: answer not stored");
            }
        }
        _ => {
            tracing::warn!(
                bytes = body.len(),
                max_stored,
                "idempotency: answer not stored (not UTF-8 or too large); key released"
            );
            release(guard).await;
        }
    }
    Response::from_parts(parts, ResB::from(body))
}

async fn release(guard: ClaimGuard) {
    if let Err(e) = guard.release().await {
        tracing::warn!(error = %e, "idempotency: key not released (it expires)");
    }
}

/// The `409` answer while the first request with the key runs.
fn in_progress<B: From<Bytes>>(retry_after: Duration) -> Response<B> {
    let mut res: Response<B> = Problem::new(
        StatusCode::CONFLICT,
        "request_in_progress",
        "a request with this Idempotency-Key is still being handled",
    )
    .to_response();
    if let Ok(v) = HeaderValue::from_str(&retry_after.as_secs().max(1).to_string()) {
        res.headers_mut().insert(header::RETRY_AFTER, v);
    }
    res
}

/// The stored key of `key` sent by `subject`: a hash, so neither the
/// subject nor the client's key is readable in Redis, and any characters
/// fit a key part.
fn scoped_key(subject: &str, key: &str) -> String {
    let mut h = Sha256::new();
    for part in ["http", subject, key] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    hex::encode(h.finalize())
}

/// What makes two requests "the same request": method, path and body.
fn fingerprint(method: &Method, path: &str, body: &[u8]) -> String {
    let mut h = Sha256::new();
    for part in [method.as_str().as_bytes(), path.as_bytes(), body] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    hex::encode(h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_visible_ascii_up_to_128() {
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(IDEMPOTENCY_KEY_HEADER, HeaderValue::from_str(v).unwrap());
            h
        };
        let bad = Err(InvalidIdempotencyKey);
        assert_eq!(idempotency_key(&HeaderMap::new()), Ok(None));
        assert_eq!(idempotency_key(&with("k-1")), Ok(Some("k-1")));
        assert_eq!(
            idempotency_key(&with(&"a".repeat(128))).map(|k| k.map(str::len)),
            Ok(Some(128))
        );
        assert_eq!(idempotency_key(&with(&"a".repeat(129))), bad);
        assert_eq!(idempotency_key(&with("")), bad);
        assert_eq!(idempotency_key(&with("a b")), bad);
    }

    #[test]
    fn scope_and_request_shape_the_stored_key_and_fingerprint() {
        assert_ne!(scoped_key("alice", "k"), scoped_key("bob", "k"));
        // Length-prefixed: moving a character between parts changes the hash.
        assert_ne!(scoped_key("ab", "c"), scoped_key("a", "bc"));
        let fp = |m: &Method, p: &str, b: &[u8]| fingerprint(m, p, b);
        assert_eq!(
            fp(&Method::POST, "/x", b"{}"),
            fp(&Method::POST, "/x", b"{}")
        );
        assert_ne!(
            fp(&Method::POST, "/x", b"{}"),
            fp(&Method::PUT, "/x", b"{}")
        );
        assert_ne!(
            fp(&Method::POST, "/x", b"{}"),
            fp(&Method::POST, "/y", b"{}")
        );
        assert_ne!(
            fp(&Method::POST, "/x", b"{}"),
            fp(&Method::POST, "/x", b"[]")
        );
    }
}
