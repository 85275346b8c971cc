//! [`Error`]: what a failed call tells its caller.

use std::fmt;
use std::time::Duration;

use reqwest::StatusCode;
use serde::Deserialize;

use crate::Endpoint;

/// Why a call failed. Callers usually branch on the predicates of
/// [`Error`] instead ([`Error::is_unavailable`] and friends).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The circuit breaker is open: no request was sent.
    CircuitOpen,
    /// The call's deadline or an attempt's timeout expired.
    Timeout,
    /// The connection could not be made or broke (refused, reset, closed).
    Transport,
    /// The server answered 5xx.
    Server,
    /// The server answered 4xx: the request was refused as sent.
    Rejected,
    /// The server answered 2xx with a body that is not the expected JSON.
    Decode,
    /// The request was invalid before it was sent (empty key, non-object
    /// value, bad header value); nothing reached the server.
    InvalidRequest,
    /// The client could not be built from its configuration.
    Config,
}

/// One entry of a 422 validation error (`{"type","loc","msg"}`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ValidationIssue {
    /// Machine-readable error type, e.g. `missing`.
    #[serde(rename = "type", default)]
    pub kind: String,
    /// Where the problem is, e.g. `["body", "payload", "key"]`.
    #[serde(default)]
    pub loc: Vec<serde_json::Value>,
    /// Human-readable message, e.g. `Field required`.
    #[serde(default)]
    pub msg: String,
}

/// What the server said about a failed request.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum ServerDetail {
    /// `{"detail": "<string>"}`.
    Message(String),
    /// `{"detail": [{"type","loc","msg"}, ...]}` (422).
    Validation(Vec<ValidationIssue>),
    /// Anything else (an HTML error page, plain text, other JSON): the page
    /// title when there is one, else the start of the body (at most 512
    /// bytes).
    Body(String),
}

impl ServerDetail {
    const MAX_BODY: usize = 512;

    /// Reads an error body. Never fails: whatever the body is, it becomes a
    /// detail (or `None` when it is empty).
    pub(crate) fn parse(body: &[u8]) -> Option<Self> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Detail {
            Message(String),
            Validation(Vec<ValidationIssue>),
        }
        #[derive(Deserialize)]
        struct Envelope {
            detail: Detail,
        }
        if let Ok(env) = serde_json::from_slice::<Envelope>(body) {
            return Some(match env.detail {
                Detail::Message(m) => ServerDetail::Message(m),
                Detail::Validation(v) => ServerDetail::Validation(v),
            });
        }
        let text = String::from_utf8_lossy(body);
        let text = text.trim();
        if text.is_empty() {
            return None;
        }
        if let Some(title) = html_title(text) {
            return Some(ServerDetail::Body(title));
        }
        let mut end = text.len().min(Self::MAX_BODY);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        Some(ServerDetail::Body(text[..end].to_owned()))
    }
}

fn html_title(text: &str) -> Option<String> {
    let lower = text.to_ascii_lowercase();
    let start = lower.find("<title>")? + "<title>".len();
    let end = start + lower[start..].find("</title>")?;
    let title = text[start..end].trim();
    (!title.is_empty()).then(|| title.to_owned())
}

impl fmt::Display for ServerDetail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServerDetail::Message(m) | ServerDetail::Body(m) => f.write_str(m),
            ServerDetail::Validation(issues) => {
                for (i, issue) in issues.iter().enumerate() {
                    if i > 0 {
                        f.write_str("; ")?;
                    }
                    let loc: Vec<String> = issue
                        .loc
                        .iter()
                        .map(|l| match l {
                            serde_json::Value::String(s) => s.clone(),
                            other => other.to_string(),
                        })
                        .collect();
                    write!(f, "{}: {} ({})", loc.join("."), issue.msg, issue.kind)?;
                }
                Ok(())
            }
        }
    }
}

/// A failed SomaBrain call.
///
/// Branch on the predicates, not on the message:
///
/// | predicate | true for |
/// |---|---|
/// | [`is_unavailable`](Self::is_unavailable) | open breaker, transport error, timeout, 5xx |
/// | [`is_circuit_open`](Self::is_circuit_open) | open breaker (no request sent) |
/// | [`is_timeout`](Self::is_timeout) | deadline or attempt timeout |
/// | [`is_rejected`](Self::is_rejected) | any 4xx (with the server's [`detail`](Self::detail)) |
/// | [`is_unauthorized`](Self::is_unauthorized) | 401 and 403 |
/// | [`is_rate_limited`](Self::is_rate_limited) | 429 |
/// | [`is_decode`](Self::is_decode) | 2xx whose body is not the expected JSON |
///
/// The status code, the server's detail (string, 422 list, or the title or
/// start of an HTML page) and the request id (`X-Request-ID`) are attached
/// whenever they exist.
pub struct Error {
    inner: Box<Inner>,
}

struct Inner {
    kind: ErrorKind,
    endpoint: Option<Endpoint>,
    status: Option<StatusCode>,
    detail: Option<ServerDetail>,
    request_id: Option<String>,
    retry_after: Option<Duration>,
    attempts: u32,
    message: Option<String>,
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl Error {
    pub(crate) fn new(kind: ErrorKind, endpoint: Option<Endpoint>) -> Self {
        Error {
            inner: Box::new(Inner {
                kind,
                endpoint,
                status: None,
                detail: None,
                request_id: None,
                retry_after: None,
                attempts: 0,
                message: None,
                source: None,
            }),
        }
    }

    pub(crate) fn circuit_open(endpoint: Endpoint) -> Self {
        Error::new(ErrorKind::CircuitOpen, Some(endpoint))
    }

    pub(crate) fn invalid(endpoint: Option<Endpoint>, message: impl Into<String>) -> Self {
        Error::new(ErrorKind::InvalidRequest, endpoint).with_message(message)
    }

    pub(crate) fn config(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Config, None).with_message(message)
    }

    pub(crate) fn from_status(
        endpoint: Endpoint,
        status: StatusCode,
        body: &[u8],
        retry_after: Option<Duration>,
    ) -> Self {
        let kind = if status.is_server_error() {
            ErrorKind::Server
        } else {
            ErrorKind::Rejected
        };
        let mut e = Error::new(kind, Some(endpoint));
        e.inner.status = Some(status);
        e.inner.detail = ServerDetail::parse(body);
        e.inner.retry_after = retry_after;
        e
    }

    pub(crate) fn decode(endpoint: Endpoint, status: StatusCode, err: serde_json::Error) -> Self {
        let mut e = Error::new(ErrorKind::Decode, Some(endpoint)).with_source(err);
        e.inner.status = Some(status);
        e
    }

    pub(crate) fn with_message(mut self, message: impl Into<String>) -> Self {
        self.inner.message = Some(message.into());
        self
    }

    pub(crate) fn with_source(
        mut self,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        self.inner.source = Some(source.into());
        self
    }

    pub(crate) fn with_request_id(mut self, request_id: Option<&str>) -> Self {
        self.inner.request_id = request_id.map(str::to_owned);
        self
    }

    pub(crate) fn set_attempts(&mut self, attempts: u32) {
        self.inner.attempts = attempts;
    }

    /// Why the call failed.
    pub fn kind(&self) -> ErrorKind {
        self.inner.kind
    }

    /// The endpoint that was called (`None` for configuration errors).
    pub fn endpoint(&self) -> Option<Endpoint> {
        self.inner.endpoint
    }

    /// The HTTP status of the last response, when there was one.
    pub fn status(&self) -> Option<StatusCode> {
        self.inner.status
    }

    /// What the server said: its `detail` string or 422 list, or the title /
    /// start of a non-JSON error page.
    pub fn detail(&self) -> Option<&ServerDetail> {
        self.inner.detail.as_ref()
    }

    /// The `X-Request-ID` the call was sent with (the same on every attempt).
    pub fn request_id(&self) -> Option<&str> {
        self.inner.request_id.as_deref()
    }

    /// The server's `Retry-After`, when it sent one.
    pub fn retry_after(&self) -> Option<Duration> {
        self.inner.retry_after
    }

    /// Attempts made (0 when the breaker or validation refused the call).
    pub fn attempts(&self) -> u32 {
        self.inner.attempts
    }

    /// SomaBrain cannot serve the call right now: the breaker is open, the
    /// connection failed, the call timed out, or the server answered 5xx.
    /// These are the failures the circuit breaker counts.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self.inner.kind,
            ErrorKind::CircuitOpen | ErrorKind::Timeout | ErrorKind::Transport | ErrorKind::Server
        )
    }

    /// The breaker was open and the call was refused without a request.
    pub fn is_circuit_open(&self) -> bool {
        self.inner.kind == ErrorKind::CircuitOpen
    }

    /// The server refused the request (4xx). [`detail`](Self::detail) says
    /// why; retrying the same request will not help (except after 429).
    pub fn is_rejected(&self) -> bool {
        self.inner.kind == ErrorKind::Rejected
    }

    /// The server refused the credentials (401 or 403): check the token.
    pub fn is_unauthorized(&self) -> bool {
        self.inner.kind == ErrorKind::Rejected
            && matches!(
                self.inner.status,
                Some(StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN)
            )
    }

    /// The server is rate limiting (429); see [`retry_after`](Self::retry_after).
    pub fn is_rate_limited(&self) -> bool {
        self.inner.status == Some(StatusCode::TOO_MANY_REQUESTS)
    }

    /// The call's deadline, or an attempt's timeout, expired.
    pub fn is_timeout(&self) -> bool {
        self.inner.kind == ErrorKind::Timeout
    }

    /// The server answered success with a body that is not the expected
    /// JSON (a server or proxy defect).
    pub fn is_decode(&self) -> bool {
        self.inner.kind == ErrorKind::Decode
    }

    /// The request was invalid before it was sent.
    pub fn is_invalid_request(&self) -> bool {
        self.inner.kind == ErrorKind::InvalidRequest
    }

    /// Whether a caller-level retry could succeed (unavailable or rate
    /// limited). The client has already retried within its own budget.
    pub fn is_retryable(&self) -> bool {
        self.is_unavailable() || self.is_rate_limited()
    }

    /// Whether this outcome counts as a failure for the circuit breaker:
    /// the route is down — unreachable, too slow, failing (5xx), rate
    /// limiting (429, still refused after the retries the client allows),
    /// or answering garbage. Any other 4xx (validation, auth, not found)
    /// proves the server is up and counts as a success.
    pub(crate) fn counts_as_breaker_failure(&self) -> bool {
        matches!(
            self.inner.kind,
            ErrorKind::Timeout | ErrorKind::Transport | ErrorKind::Server | ErrorKind::Decode
        ) || self.is_rate_limited()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = &self.inner;
        f.write_str("somabrain")?;
        if let Some(ep) = i.endpoint {
            write!(f, " {ep}")?;
        }
        let what = match i.kind {
            ErrorKind::CircuitOpen => "circuit breaker open, request not sent",
            ErrorKind::Timeout => "timed out",
            ErrorKind::Transport => "transport error",
            ErrorKind::Server => "server error",
            ErrorKind::Rejected => "rejected",
            ErrorKind::Decode => "response body did not decode",
            ErrorKind::InvalidRequest => "invalid request",
            ErrorKind::Config => "invalid configuration",
        };
        write!(f, ": {what}")?;
        if let Some(status) = i.status {
            write!(f, " (HTTP {})", status.as_u16())?;
        }
        if let Some(m) = &i.message {
            write!(f, ": {m}")?;
        }
        if let Some(d) = &i.detail {
            write!(f, ": {d}")?;
        }
        if let Some(src) = &i.source {
            write!(f, ": {src}")?;
        }
        if i.attempts > 1 {
            write!(f, " (after {} attempts)", i.attempts)?;
        }
        if let Some(id) = &i.request_id {
            write!(f, " [request_id={id}]")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = &self.inner;
        f.debug_struct("Error")
            .field("kind", &i.kind)
            .field("endpoint", &i.endpoint)
            .field("status", &i.status)
            .field("detail", &i.detail)
            .field("request_id", &i.request_id)
            .field("attempts", &i.attempts)
            .field("message", &i.message)
            .field("source", &i.source)
            .finish()
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.inner
            .source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_detail_shape() {
        assert_eq!(
            ServerDetail::parse(br#"{"detail":"Unauthorized"}"#),
            Some(ServerDetail::Message("Unauthorized".into()))
        );
        let v = ServerDetail::parse(
            br#"{"detail":[{"type":"missing","loc":["body","payload","key"],"msg":"Field required"}]}"#,
        )
        .unwrap();
        assert_eq!(v.to_string(), "body.payload.key: Field required (missing)");
        let html = b"\n<!doctype html>\n<html><head>\n  <title>Not Found</title>\n</head></html>";
        assert_eq!(
            ServerDetail::parse(html),
            Some(ServerDetail::Body("Not Found".into()))
        );
        assert_eq!(
            ServerDetail::parse(b"Method not allowed"),
            Some(ServerDetail::Body("Method not allowed".into()))
        );
        assert_eq!(ServerDetail::parse(b"  "), None);
        let long = "é".repeat(600);
        let ServerDetail::Body(b) = ServerDetail::parse(long.as_bytes()).unwrap() else {
            panic!("expected a body detail")
        };
        assert!(b.len() <= 512);
    }

    #[test]
    fn predicates_follow_the_status() {
        let e = Error::from_status(Endpoint::Remember, StatusCode::UNAUTHORIZED, b"", None);
        assert!(e.is_rejected() && e.is_unauthorized() && !e.is_unavailable());
        let e = Error::from_status(Endpoint::Remember, StatusCode::BAD_GATEWAY, b"", None);
        assert!(e.is_unavailable() && !e.is_rejected() && e.counts_as_breaker_failure());
        let e = Error::circuit_open(Endpoint::Recall);
        assert!(e.is_circuit_open() && e.is_unavailable() && !e.counts_as_breaker_failure());
        let e = Error::from_status(Endpoint::Recall, StatusCode::TOO_MANY_REQUESTS, b"", None);
        assert!(e.is_rejected() && e.is_rate_limited() && e.is_retryable());
        assert!(
            e.counts_as_breaker_failure(),
            "429: the route is refusing service"
        );
        let e = Error::from_status(
            Endpoint::Recall,
            StatusCode::UNPROCESSABLE_ENTITY,
            b"",
            None,
        );
        assert!(!e.counts_as_breaker_failure(), "422: the server is up");
    }
}
