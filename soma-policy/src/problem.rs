//! JSON problem responses (RFC 9457) for the layers.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

/// Content type of every error body the layers write.
pub const PROBLEM_CONTENT_TYPE: &str = "application/problem+json";

/// Builds a problem response with `code` as the stable machine-readable field.
pub(crate) fn problem<B: From<Bytes>>(status: StatusCode, code: &str, detail: &str) -> Response<B> {
    let body = serde_json::json!({
        "type": format!("https://soma.dev/problems/{code}"),
        "title": status.canonical_reason().unwrap_or("error"),
        "status": status.as_u16(),
        "code": code,
        "detail": detail,
    });
    let mut res = Response::new(B::from(Bytes::from(body.to_string())));
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(PROBLEM_CONTENT_TYPE),
    );
    res
}
