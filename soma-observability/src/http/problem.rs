//! The one error body: [`Problem`].

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use serde::{Deserialize, Serialize};

/// Content type of every problem body.
pub const PROBLEM_CONTENT_TYPE: &str = "application/problem+json";

/// Prefix of every problem's `type`: the code follows it.
pub const PROBLEM_TYPE_BASE: &str = "https://soma.dev/problems/";

/// One error body for every HTTP error a soma layer or service returns.
///
/// [`Problem`] is an RFC 9457 `application/problem+json` document with five
/// members, always all present:
///
/// | member | holds |
/// |---|---|
/// | `type` | `https://soma.dev/problems/<code>` |
/// | `title` | the status's canonical reason (`Too Many Requests`) |
/// | `status` | the HTTP status code |
/// | `detail` | a human-readable sentence for this occurrence (never a secret) |
/// | `code` | the stable machine-readable code clients branch on (`rate_limited`) |
///
/// Clients branch on `code` (or `type`), never on `title` or `detail`.
///
/// ```
/// use soma_observability::http::{PROBLEM_CONTENT_TYPE, Problem};
///
/// let p = Problem::too_many_requests("rate_limited", "limit of 10 per 1s reached");
/// assert_eq!(p.title, "Too Many Requests");
/// assert_eq!(p.type_uri, "https://soma.dev/problems/rate_limited");
///
/// let res: http::Response<bytes::Bytes> = p.into();
/// assert_eq!(res.status(), 429);
/// assert_eq!(res.headers()["content-type"], PROBLEM_CONTENT_TYPE);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    /// `type`: [`PROBLEM_TYPE_BASE`] followed by the code.
    #[serde(rename = "type")]
    pub type_uri: String,
    /// `title`: the status's canonical reason phrase.
    pub title: String,
    /// `status`: the HTTP status code.
    pub status: u16,
    /// `detail`: what went wrong this time, for humans.
    pub detail: String,
    /// `code`: the stable machine-readable code.
    pub code: String,
}

impl Problem {
    /// A problem with `status`, machine code `code` and `detail`; `type` and
    /// `title` follow from them.
    pub fn new(status: StatusCode, code: impl Into<String>, detail: impl Into<String>) -> Self {
        let code = code.into();
        Self {
            type_uri: format!("{PROBLEM_TYPE_BASE}{code}"),
            title: status.canonical_reason().unwrap_or("Error").to_owned(),
            status: status.as_u16(),
            detail: detail.into(),
            code,
        }
    }

    /// `400 Bad Request`.
    pub fn bad_request(code: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, detail)
    }

    /// `401 Unauthorized`.
    pub fn unauthorized(code: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, code, detail)
    }

    /// `403 Forbidden`.
    pub fn forbidden(code: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, code, detail)
    }

    /// `404 Not Found`, code `not_found`.
    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", detail)
    }

    /// `405 Method Not Allowed`, code `method_not_allowed`.
    pub fn method_not_allowed(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", detail)
    }

    /// `413 Payload Too Large`.
    pub fn payload_too_large(code: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, code, detail)
    }

    /// `429 Too Many Requests`.
    pub fn too_many_requests(code: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::TOO_MANY_REQUESTS, code, detail)
    }

    /// `500 Internal Server Error`, code `internal`, a detail that reveals
    /// nothing.
    pub fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error",
        )
    }

    /// `503 Service Unavailable`.
    pub fn service_unavailable(code: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, code, detail)
    }

    /// `504 Gateway Timeout`.
    pub fn gateway_timeout(code: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::GATEWAY_TIMEOUT, code, detail)
    }

    /// The status as a [`StatusCode`] (`500` if `status` is not a valid code).
    pub fn status_code(&self) -> StatusCode {
        StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    /// The JSON body.
    pub fn to_json(&self) -> Bytes {
        // A struct of strings and a number always serializes.
        Bytes::from(serde_json::to_vec(self).unwrap_or_default())
    }

    /// The response: this status, `Content-Type: application/problem+json`
    /// and the JSON body, for any body type a tower layer returns.
    pub fn to_response<B: From<Bytes>>(&self) -> Response<B> {
        let mut res = Response::new(B::from(self.to_json()));
        *res.status_mut() = self.status_code();
        res.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(PROBLEM_CONTENT_TYPE),
        );
        res
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status, self.code, self.detail)
    }
}

impl<B: From<Bytes>> From<Problem> for Response<B> {
    fn from(p: Problem) -> Self {
        p.to_response()
    }
}

#[cfg(feature = "axum")]
#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
impl axum::response::IntoResponse for Problem {
    fn into_response(self) -> axum::response::Response {
        self.to_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_member_is_written_and_title_is_the_reason() {
        let p = Problem::service_unavailable("rate_limiter_unavailable", "retry shortly");
        let v: serde_json::Value = serde_json::from_slice(&p.to_json()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "type": "https://soma.dev/problems/rate_limiter_unavailable",
                "title": "Service Unavailable",
                "status": 503,
                "detail": "retry shortly",
                "code": "rate_limiter_unavailable",
            })
        );
        let back: Problem = serde_json::from_value(v).unwrap();
        assert_eq!(back, p);
    }

    #[test]
    fn the_response_carries_status_and_content_type() {
        let res: Response<Bytes> = Problem::method_not_allowed("GET is not allowed").into();
        assert_eq!(res.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(res.headers()[header::CONTENT_TYPE], PROBLEM_CONTENT_TYPE);
        let v: serde_json::Value = serde_json::from_slice(res.body()).unwrap();
        assert_eq!(v["code"], "method_not_allowed");
        assert_eq!(v["title"], "Method Not Allowed");
    }
}
