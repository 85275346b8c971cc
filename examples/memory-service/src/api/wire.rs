//! The wire contract: SomaBrain's error bodies and request validation.
//!
//! SomaBrain (Django + Ninja, pydantic v2) answers errors in three shapes,
//! all recorded (`soma-somabrain/tests/fixtures/19`–`25`), and this service
//! answers in the same ones, not in the SDK's `application/problem+json`
//! (the point of the service is to be a drop-in for SomaBrain's clients):
//!
//! | case | status | body |
//! |---|---|---|
//! | bad or missing bearer | 401 | `{"detail":"Unauthorized"}` |
//! | body is not JSON | 400 | `{"detail":"Cannot parse request body"}` |
//! | field missing / wrong type | 422 | `{"detail":[{"type","loc":["body","payload",...],"msg"}]}` |
//! | unknown path (also a trailing `/`) | 404 | Django's HTML "Not Found" page |
//! | wrong method | 405 | `Method not allowed` (`text/html`) |
//! | storage unavailable | 503 | `{"detail":"Memory storage unavailable"}` |

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

/// Ninja's JSON content type.
pub(crate) const NINJA_JSON: &str = "application/json; charset=utf-8";

/// Django's 404 page with `DEBUG` off, byte for byte as recorded.
pub(crate) const HTML_404: &str = "\n<!doctype html>\n<html lang=\"en\">\n<head>\n  <title>Not Found</title>\n</head>\n<body>\n  <h1>Not Found</h1><p>The requested resource was not found on this server.</p>\n</body>\n</html>\n";

/// A JSON answer with Ninja's content type.
pub(crate) fn json_response(status: StatusCode, body: &Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, NINJA_JSON)],
        body.to_string(),
    )
        .into_response()
}

/// `{"detail": "<message>"}`.
pub(crate) fn detail(status: StatusCode, message: &str) -> Response {
    json_response(status, &json!({ "detail": message }))
}

/// Why a request was refused, answered in SomaBrain's shapes.
#[derive(Debug)]
pub(crate) enum Rejection {
    /// 401 `{"detail":"Unauthorized"}`.
    Unauthorized,
    /// 400 `{"detail":"Cannot parse request body"}`.
    Unparseable,
    /// 422 with the validation issues.
    Invalid(Vec<Issue>),
    /// 503: PostgreSQL failed (the driver's text is logged, never answered:
    /// it may carry connection details).
    Unavailable,
}

impl From<crate::Error> for Rejection {
    fn from(err: crate::Error) -> Self {
        tracing::warn!(event = "storage_call_failed", error = %err);
        Rejection::Unavailable
    }
}

impl IntoResponse for Rejection {
    fn into_response(self) -> Response {
        match self {
            Rejection::Unauthorized => detail(StatusCode::UNAUTHORIZED, "Unauthorized"),
            Rejection::Unparseable => detail(StatusCode::BAD_REQUEST, "Cannot parse request body"),
            Rejection::Invalid(issues) => invalid(&issues),
            Rejection::Unavailable => detail(
                StatusCode::SERVICE_UNAVAILABLE,
                "Memory storage unavailable",
            ),
        }
    }
}

/// Django's 404 page.
pub(crate) fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        HTML_404,
    )
        .into_response()
}

/// Django's 405.
pub(crate) fn method_not_allowed() -> Response {
    (
        StatusCode::METHOD_NOT_ALLOWED,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        "Method not allowed",
    )
        .into_response()
}

/// One pydantic validation issue.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Issue {
    kind: &'static str,
    loc: Vec<Value>,
    msg: &'static str,
}

/// 422 with the issues.
fn invalid(issues: &[Issue]) -> Response {
    let list: Vec<Value> = issues
        .iter()
        .map(|i| json!({"type": i.kind, "loc": i.loc, "msg": i.msg}))
        .collect();
    json_response(StatusCode::UNPROCESSABLE_ENTITY, &json!({ "detail": list }))
}

/// What a field must be. Unknown fields are ignored, as pydantic does by
/// default; `null` is accepted wherever the field is optional.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Kind {
    /// A string of at least this many characters.
    Str(usize),
    /// A JSON object.
    Object,
    /// An integer ≥ 0.
    Uint,
    /// An integer.
    Int,
    /// A number ≥ 0.
    NonNegNum,
    /// A number.
    Num,
    /// A list of strings.
    StrList,
    /// A list of objects with these fields (`min` items).
    Items(&'static [Field], usize),
    /// An object with these fields.
    Nested(&'static [Field]),
}

/// One field of a request body.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Field {
    name: &'static str,
    kind: Kind,
    required: bool,
}

const fn req(name: &'static str, kind: Kind) -> Field {
    Field {
        name,
        kind,
        required: true,
    }
}

const fn opt(name: &'static str, kind: Kind) -> Field {
    Field {
        name,
        kind,
        required: false,
    }
}

const SIGNALS: &[Field] = &[
    opt("importance", Kind::NonNegNum),
    opt("novelty", Kind::NonNegNum),
    opt("ttl_seconds", Kind::Uint),
    opt("reinforcement", Kind::Str(0)),
    opt("recall_bias", Kind::Str(0)),
];

const ATTACHMENT: &[Field] = &[
    req("kind", Kind::Str(0)),
    opt("uri", Kind::Str(0)),
    opt("content_type", Kind::Str(0)),
    opt("checksum", Kind::Str(0)),
    opt("data", Kind::Str(0)),
    opt("meta", Kind::Object),
];

const LINK: &[Field] = &[
    req("rel", Kind::Str(0)),
    req("target", Kind::Str(0)),
    opt("weight", Kind::NonNegNum),
    opt("meta", Kind::Object),
];

/// The fields of one memory (`MemoryWriteRequest` without tenant/namespace,
/// and `MemoryBatchWriteItem`).
pub(crate) const MEMORY: &[Field] = &[
    req("key", Kind::Str(1)),
    req("value", Kind::Object),
    opt("meta", Kind::Object),
    opt("universe", Kind::Str(0)),
    opt("ttl_seconds", Kind::Uint),
    opt("tags", Kind::StrList),
    opt("policy_tags", Kind::StrList),
    opt("attachments", Kind::Items(ATTACHMENT, 0)),
    opt("links", Kind::Items(LINK, 0)),
    opt("signals", Kind::Nested(SIGNALS)),
    opt("importance", Kind::NonNegNum),
    opt("novelty", Kind::NonNegNum),
    opt("trace_id", Kind::Str(0)),
];

/// `MemoryWriteRequest`'s own fields (plus [`MEMORY`]).
pub(crate) const SCOPE: &[Field] = &[req("tenant", Kind::Str(1)), req("namespace", Kind::Str(1))];

/// `MemoryBatchWriteRequest`.
pub(crate) const BATCH: &[Field] = &[
    req("tenant", Kind::Str(1)),
    req("namespace", Kind::Str(1)),
    req("items", Kind::Items(MEMORY, 1)),
    opt("universe", Kind::Str(0)),
];

/// `RecallRequest`.
pub(crate) const RECALL: &[Field] = &[
    req("query", Kind::Str(0)),
    opt("top_k", Kind::Int),
    opt("layer", Kind::Str(0)),
    opt("tenant", Kind::Str(0)),
    opt("namespace", Kind::Str(0)),
    opt("universe", Kind::Str(0)),
];

/// The context evaluate body the client sends.
pub(crate) const EVALUATE: &[Field] = &[
    req("session_id", Kind::Str(0)),
    req("query", Kind::Str(0)),
    opt("top_k", Kind::Int),
    opt("tenant_id", Kind::Str(0)),
];

/// The context feedback body the client sends.
pub(crate) const FEEDBACK: &[Field] = &[
    req("session_id", Kind::Str(0)),
    req("query", Kind::Str(0)),
    req("prompt", Kind::Str(0)),
    req("response_text", Kind::Str(0)),
    req("utility", Kind::Num),
    opt("reward", Kind::Num),
    opt("metadata", Kind::Object),
    opt("tenant_id", Kind::Str(0)),
];

/// Parses a request body: 400 when it is not JSON, 422 when it is not an
/// object or a field is missing or of the wrong type.
pub(crate) fn parse_body(
    bytes: &[u8],
    schemas: &[&[Field]],
) -> Result<Map<String, Value>, Rejection> {
    let value: Value = serde_json::from_slice(bytes).map_err(|_| Rejection::Unparseable)?;
    let root = [json!("body"), json!("payload")];
    let Value::Object(obj) = value else {
        let issue = Issue {
            kind: "model_attributes_type",
            loc: root.to_vec(),
            msg: "Input should be a valid dictionary or object to extract fields from",
        };
        return Err(Rejection::Invalid(vec![issue]));
    };
    let mut issues = Vec::new();
    for fields in schemas {
        check(&obj, fields, &root, &mut issues);
    }
    if issues.is_empty() {
        Ok(obj)
    } else {
        Err(Rejection::Invalid(issues))
    }
}

fn check(obj: &Map<String, Value>, fields: &[Field], loc: &[Value], out: &mut Vec<Issue>) {
    for f in fields {
        let mut at = loc.to_vec();
        at.push(json!(f.name));
        match obj.get(f.name) {
            None => {
                if f.required {
                    out.push(issue("missing", at, "Field required"));
                }
            }
            Some(Value::Null) if !f.required => {}
            Some(v) => check_value(v, f.kind, at, out),
        }
    }
}

fn issue(kind: &'static str, loc: Vec<Value>, msg: &'static str) -> Issue {
    Issue { kind, loc, msg }
}

fn check_value(v: &Value, kind: Kind, at: Vec<Value>, out: &mut Vec<Issue>) {
    let is_int = |v: &Value| v.is_i64() || v.is_u64();
    match kind {
        Kind::Str(min) => match v.as_str() {
            None => out.push(issue("string_type", at, "Input should be a valid string")),
            Some(s) if s.chars().count() < min => out.push(issue(
                "string_too_short",
                at,
                "String should have at least 1 character",
            )),
            Some(_) => {}
        },
        Kind::Object => {
            if !v.is_object() {
                out.push(issue("dict_type", at, "Input should be a valid dictionary"));
            }
        }
        Kind::Int => {
            if !is_int(v) {
                out.push(issue("int_type", at, "Input should be a valid integer"));
            }
        }
        Kind::Uint => {
            if !is_int(v) {
                out.push(issue("int_type", at, "Input should be a valid integer"));
            } else if v.as_i64().is_some_and(|n| n < 0) {
                out.push(issue(
                    "greater_than_equal",
                    at,
                    "Input should be greater than or equal to 0",
                ));
            }
        }
        Kind::Num | Kind::NonNegNum => match v.as_f64() {
            None => out.push(issue("float_type", at, "Input should be a valid number")),
            Some(n) if matches!(kind, Kind::NonNegNum) && n < 0.0 => out.push(issue(
                "greater_than_equal",
                at,
                "Input should be greater than or equal to 0",
            )),
            Some(_) => {}
        },
        Kind::StrList => match v.as_array() {
            None => out.push(issue("list_type", at, "Input should be a valid list")),
            Some(items) => {
                for (i, item) in items.iter().enumerate() {
                    let mut l = at.clone();
                    l.push(json!(i));
                    check_value(item, Kind::Str(0), l, out);
                }
            }
        },
        Kind::Items(fields, min) => check_items(v, fields, min, at, out),
        Kind::Nested(fields) => match v.as_object() {
            Some(o) => check(o, fields, &at, out),
            None => out.push(issue(
                "model_attributes_type",
                at,
                "Input should be a valid dictionary or object to extract fields from",
            )),
        },
    }
}

/// Checks a list of at least `min` objects, each against `fields`.
fn check_items(v: &Value, fields: &[Field], min: usize, at: Vec<Value>, out: &mut Vec<Issue>) {
    match v.as_array() {
        None => out.push(issue("list_type", at, "Input should be a valid list")),
        Some(items) if items.len() < min => out.push(issue(
            "too_short",
            at,
            "List should have at least 1 item after validation, not 0",
        )),
        Some(items) => {
            for (i, item) in items.iter().enumerate() {
                let mut l = at.clone();
                l.push(json!(i));
                match item.as_object() {
                    Some(o) => check(o, fields, &l, out),
                    None => out.push(issue(
                        "model_attributes_type",
                        l,
                        "Input should be a valid dictionary or object to extract fields from",
                    )),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issues(body: &str, schemas: &[&[Field]]) -> Value {
        let resp = parse_body(body.as_bytes(), schemas).unwrap_err();
        assert_eq!(
            resp.into_response().status(),
            StatusCode::UNPROCESSABLE_ENTITY
        );
        let obj: Map<String, Value> = serde_json::from_str(body).unwrap();
        let mut out = Vec::new();
        for f in schemas {
            check(&obj, f, &[json!("body"), json!("payload")], &mut out);
        }
        Value::Array(
            out.into_iter()
                .map(|i| json!({"type": i.kind, "loc": i.loc}))
                .collect(),
        )
    }

    #[test]
    fn missing_key_has_the_recorded_loc() {
        let v = issues(
            r#"{"tenant":"acme","namespace":"agent","value":{}}"#,
            &[SCOPE, MEMORY],
        );
        assert_eq!(
            v,
            json!([{"type": "missing", "loc": ["body", "payload", "key"]}])
        );
    }

    #[test]
    fn types_and_nested_fields_are_checked() {
        let v = issues(
            r#"{"tenant":"","namespace":"a","key":"k","value":[1],"ttl_seconds":-1,
                "signals":{"importance":-0.5},"links":[{"rel":"r"}],"tags":["a",2]}"#,
            &[SCOPE, MEMORY],
        );
        let kinds: Vec<&str> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["type"].as_str().unwrap())
            .collect();
        assert_eq!(
            kinds,
            [
                "string_too_short",
                "dict_type",
                "greater_than_equal",
                "string_type",
                "missing",
                "greater_than_equal"
            ]
        );
        assert_eq!(
            v[4]["loc"],
            json!(["body", "payload", "links", 0, "target"])
        );
    }

    #[test]
    fn not_json_is_400_and_not_an_object_is_422() {
        assert_eq!(
            parse_body(b"{\"tenant\": ", &[SCOPE])
                .unwrap_err()
                .into_response()
                .status(),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            parse_body(b"[1]", &[SCOPE])
                .unwrap_err()
                .into_response()
                .status(),
            StatusCode::UNPROCESSABLE_ENTITY
        );
        assert!(parse_body(br#"{"tenant":"a","namespace":"b","extra":1}"#, &[SCOPE]).is_ok());
    }
}
