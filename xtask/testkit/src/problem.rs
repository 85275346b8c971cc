//! Assertions on `application/problem+json` answers (RFC 9457), in the
//! shape every soma crate returns: `type`, `title`, `status`, `detail`,
//! `code`.

use http::{HeaderMap, StatusCode};
use serde_json::Value;

/// The media type of a problem body.
pub const PROBLEM_CONTENT_TYPE: &str = "application/problem+json";

/// Asserts the parts of an answer are a problem with `status`, `code`, the
/// status's reason as `title`, `type` `https://soma.dev/problems/{code}` and
/// a non-empty `detail`; returns the body.
pub fn assert_problem_parts(
    got: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
    status: u16,
    code: &str,
) -> Value {
    let text = String::from_utf8_lossy(body);
    assert_eq!(got.as_u16(), status, "status; body: {text}");
    assert_eq!(
        headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok()),
        Some(PROBLEM_CONTENT_TYPE),
        "content type; body: {text}"
    );
    let body: Value = serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("problem body is not JSON ({e}): {text}"));
    assert_eq!(body["status"], status, "{body}");
    assert_eq!(
        body["title"],
        got.canonical_reason().unwrap_or_default(),
        "{body}"
    );
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(
        body["type"],
        format!("https://soma.dev/problems/{code}"),
        "{body}"
    );
    assert!(
        body["detail"].as_str().is_some_and(|d| !d.is_empty()),
        "{body}"
    );
    body
}

/// [`assert_problem_parts`] for a buffered [`http::Response`].
pub fn assert_problem<B: AsRef<[u8]>>(res: &http::Response<B>, status: u16, code: &str) -> Value {
    assert_problem_parts(
        res.status(),
        res.headers(),
        res.body().as_ref(),
        status,
        code,
    )
}

/// [`assert_problem_parts`] for a [`reqwest::Response`] (reads the body).
#[cfg(feature = "reqwest")]
pub async fn expect_problem(res: reqwest::Response, status: u16, code: &str) -> Value {
    let got = res.status();
    let headers = res.headers().clone();
    let body = res.bytes().await.expect("read the problem body");
    assert_problem_parts(got, &headers, &body, status, code)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(body: &str) -> http::Response<String> {
        http::Response::builder()
            .status(429)
            .header("content-type", PROBLEM_CONTENT_TYPE)
            .body(body.to_owned())
            .unwrap()
    }

    #[test]
    fn a_complete_problem_passes() {
        let body = assert_problem(
            &response(
                r#"{"type":"https://soma.dev/problems/rate_limited","title":"Too Many Requests","status":429,"detail":"slow down","code":"rate_limited"}"#,
            ),
            429,
            "rate_limited",
        );
        assert_eq!(body["detail"], "slow down");
    }

    #[test]
    #[should_panic(expected = "assertion `left == right` failed")]
    fn a_problem_without_its_code_fails() {
        assert_problem(
            &response(
                r#"{"type":"https://soma.dev/problems/rate_limited","title":"Too Many Requests","status":429,"detail":"slow down"}"#,
            ),
            429,
            "rate_limited",
        );
    }
}
