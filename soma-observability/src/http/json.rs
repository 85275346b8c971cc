//! [`json_body`]: a JSON request body, or the [`Problem`] to answer
//! (feature `axum`).

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use http::{HeaderMap, StatusCode, header};
use serde::de::DeserializeOwned;

use super::Problem;

/// The JSON request body of a handler that takes
/// `Result<Bytes, BytesRejection>` (so no rejection of axum's answers in
/// plain text), or the problem to answer:
///
/// | what | status | `code` |
/// |---|---|---|
/// | the body is over the router's `DefaultBodyLimit` | 413 | `body_too_large` |
/// | it could not be read | 400 | `invalid_body` |
/// | `Content-Type` is not `application/json` (or `+json`) | 415 | `unsupported_media_type` |
/// | it is not JSON | 400 | `invalid_body` |
/// | it is JSON of the wrong shape (a missing field, a wrong type) | 422 | `invalid_request` |
///
/// ```
/// use axum::body::Bytes;
/// use http::{HeaderMap, HeaderValue, header};
/// use soma_observability::http::json_body;
///
/// #[derive(Debug, serde::Deserialize)]
/// struct Reason { reason: String }
///
/// let mut headers = HeaderMap::new();
/// headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
/// let ok: Reason = json_body(&headers, Ok(Bytes::from(r#"{"reason":"x"}"#))).unwrap();
/// assert_eq!(ok.reason, "x");
/// let bad = json_body::<Reason>(&headers, Ok(Bytes::from(r#"{"reason":1}"#))).unwrap_err();
/// assert_eq!((bad.status, bad.code.as_str()), (422, "invalid_request"));
/// let bad = json_body::<Reason>(&HeaderMap::new(), Ok(Bytes::from("{}"))).unwrap_err();
/// assert_eq!(bad.status, 415);
/// ```
pub fn json_body<T: DeserializeOwned>(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<T, Problem> {
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Problem::payload_too_large("body_too_large", "the request body is too large")
        } else {
            Problem::bad_request("invalid_body", e.body_text())
        }
    })?;
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| {
            let m = m.trim().to_ascii_lowercase();
            m == "application/json" || m.ends_with("+json")
        });
    if !json {
        return Err(Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the body as Content-Type: application/json",
        ));
    }
    serde_json::from_slice(&body).map_err(|e| {
        if e.is_data() {
            Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_request",
                e.to_string(),
            )
        } else {
            Problem::bad_request("invalid_body", format!("the body is not JSON: {e}"))
        }
    })
}
