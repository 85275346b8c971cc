//! Declarative route template + method → action mapping.

use serde::{Deserialize, Serialize};

use crate::input::Resource;

/// One mapping: requests with `method` on `route` perform `action` on a
/// resource of `resource_kind`, identified by the path parameter
/// `resource_id_param` (if any).
///
/// Templates use axum's syntax: `/v1/sessions/{session_id}/messages`,
/// `{*rest}` for a trailing wildcard. `method` is an HTTP method or `*`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteRule {
    /// HTTP method (`GET`, `POST`, …) or `*` for any.
    pub method: String,
    /// Route template.
    pub route: String,
    /// Action, e.g. `conversation.send`.
    pub action: String,
    /// Resource kind, e.g. `session`.
    pub resource_kind: String,
    /// Path parameter holding the resource id.
    #[serde(default)]
    pub resource_id_param: Option<String>,
}

impl RouteRule {
    /// A rule without a resource id.
    pub fn new(method: &str, route: &str, action: &str, resource_kind: &str) -> Self {
        Self {
            method: method.to_owned(),
            route: route.to_owned(),
            action: action.to_owned(),
            resource_kind: resource_kind.to_owned(),
            resource_id_param: None,
        }
    }

    /// Takes the resource id from path parameter `param`.
    pub fn with_id_param(mut self, param: &str) -> Self {
        self.resource_id_param = Some(param.to_owned());
        self
    }
}

#[derive(Debug, Clone)]
enum Seg {
    Lit(String),
    Param(String),
    Rest(String),
}

#[derive(Debug, Clone)]
struct Compiled {
    rule: RouteRule,
    segs: Vec<Seg>,
}

/// What a request resolved to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedRoute {
    /// The action.
    pub action: String,
    /// The resource.
    pub resource: Resource,
    /// The route template that matched.
    pub route: String,
}

/// The compiled mapping. A request that matches no rule is unmapped, and
/// the authorization layer denies it.
#[derive(Debug, Clone, Default)]
pub struct RouteMap {
    rules: Vec<Compiled>,
}

/// A route template that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("invalid route rule {route:?}: {reason}")]
pub struct RouteError {
    route: String,
    reason: &'static str,
}

impl RouteMap {
    /// Compiles `rules`; the first matching rule wins.
    pub fn new(rules: impl IntoIterator<Item = RouteRule>) -> Result<Self, RouteError> {
        let mut out = Vec::new();
        for rule in rules {
            let err = |reason| RouteError {
                route: rule.route.clone(),
                reason,
            };
            if !rule.route.starts_with('/') {
                return Err(err("template must start with '/'"));
            }
            if rule.action.is_empty() {
                return Err(err("action must not be empty"));
            }
            let mut segs = Vec::new();
            let parts: Vec<&str> = split(&rule.route).collect();
            for (i, s) in parts.iter().enumerate() {
                let seg = if let Some(name) = s.strip_prefix("{*").and_then(|r| r.strip_suffix('}'))
                {
                    if i + 1 != parts.len() {
                        return Err(err("wildcard must be the last segment"));
                    }
                    Seg::Rest(name.to_owned())
                } else if let Some(name) = s.strip_prefix('{').and_then(|r| r.strip_suffix('}')) {
                    Seg::Param(name.to_owned())
                } else {
                    Seg::Lit((*s).to_owned())
                };
                segs.push(seg);
            }
            if let Some(p) = &rule.resource_id_param {
                let known = segs
                    .iter()
                    .any(|s| matches!(s, Seg::Param(n) | Seg::Rest(n) if n == p));
                if !known {
                    return Err(err("resource_id_param is not a parameter of the template"));
                }
            }
            out.push(Compiled { rule, segs });
        }
        Ok(Self { rules: out })
    }

    /// Resolves a request. `template` is the framework's matched route
    /// (axum's `MatchedPath`) when known; otherwise `path` is matched against
    /// every template.
    ///
    /// `path` is the raw (percent-encoded) request path. The resource id is
    /// decoded exactly as axum decodes the handler's path parameters (each
    /// `%XX`, as UTF-8), so the policy decides on the id the handler acts
    /// on. A parameter holding an encoded `/` (`%2F`), invalid UTF-8 or
    /// nothing matches no rule (and is denied as unmapped); `//` is not
    /// collapsed.
    pub fn resolve(
        &self,
        method: &str,
        template: Option<&str>,
        path: &str,
    ) -> Option<ResolvedRoute> {
        self.rules.iter().find_map(|c| {
            let m = &c.rule.method;
            if m != "*" && !m.eq_ignore_ascii_case(method) {
                return None;
            }
            if template.is_some_and(|t| t != c.rule.route) {
                return None;
            }
            let id = match_path(&c.segs, path, c.rule.resource_id_param.as_deref())?;
            Some(ResolvedRoute {
                action: c.rule.action.clone(),
                resource: Resource {
                    kind: c.rule.resource_kind.clone(),
                    id,
                },
                route: c.rule.route.clone(),
            })
        })
    }
}

/// A template's segments (it starts with `/`, checked at compile).
fn split(p: &str) -> impl Iterator<Item = &str> {
    p.strip_prefix('/').unwrap_or(p).split('/')
}

/// A path parameter's value as axum gives it to the handler: each `%XX`
/// decoded, the result UTF-8 (a malformed `%` sequence stays as it is, as
/// with axum). `None` — the request does not match — for invalid UTF-8, for
/// an empty value, and for an encoded `/` (`%2F`), which would let one id
/// name two resources (`a%2Fb` and `a/b` under a wildcard).
fn decode_param(raw: &str) -> Option<String> {
    if raw.is_empty() {
        return None;
    }
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let hex = |b: u8| (b as char).to_digit(16);
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                let b = u8::try_from(h * 16 + l).ok()?;
                if b == b'/' {
                    return None;
                }
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// `Some(id)` when `path` matches (`id` is `None` without an id param).
///
/// Segments are compared as they are on the wire, empty ones included (a
/// `//` is not collapsed: axum's router does not collapse it either);
/// literals match their raw text; parameters are decoded by
/// [`decode_param`], so the policy sees the id the handler sees.
fn match_path(segs: &[Seg], path: &str, id_param: Option<&str>) -> Option<Option<String>> {
    let mut parts = path.strip_prefix('/')?.split('/');
    let mut id = None;
    for seg in segs {
        match seg {
            Seg::Lit(l) => {
                if parts.next()? != l {
                    return None;
                }
            }
            Seg::Param(name) => {
                let v = decode_param(parts.next()?)?;
                if Some(name.as_str()) == id_param {
                    id = Some(v);
                }
            }
            Seg::Rest(name) => {
                let rest: Vec<&str> = parts.by_ref().collect();
                let v = decode_param(&rest.join("/"))?;
                if Some(name.as_str()) == id_param {
                    id = Some(v);
                }
            }
        }
    }
    if parts.next().is_some() {
        return None;
    }
    Some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map() -> RouteMap {
        RouteMap::new([
            RouteRule::new(
                "POST",
                "/v1/sessions/{session_id}/messages",
                "conversation.send",
                "session",
            )
            .with_id_param("session_id"),
            RouteRule::new("GET", "/v1/schedules/{id}", "scheduler.read", "schedule")
                .with_id_param("id"),
            RouteRule::new("*", "/v1/files/{*path}", "memory.write", "file").with_id_param("path"),
        ])
        .unwrap()
    }

    #[test]
    fn resolves_by_path_and_extracts_id() {
        let r = map()
            .resolve("POST", None, "/v1/sessions/abc/messages")
            .unwrap();
        assert_eq!(r.action, "conversation.send");
        assert_eq!(r.resource.id.as_deref(), Some("abc"));
        assert_eq!(r.route, "/v1/sessions/{session_id}/messages");
        let r = map().resolve("PUT", None, "/v1/files/a/b/c").unwrap();
        assert_eq!(r.resource.id.as_deref(), Some("a/b/c"));
    }

    #[test]
    fn method_and_template_must_match() {
        assert!(
            map()
                .resolve("GET", None, "/v1/sessions/abc/messages")
                .is_none()
        );
        assert!(
            map()
                .resolve("GET", Some("/v1/other/{id}"), "/v1/schedules/1")
                .is_none()
        );
        assert!(
            map()
                .resolve("GET", Some("/v1/schedules/{id}"), "/v1/schedules/1")
                .is_some()
        );
        assert!(
            map()
                .resolve("GET", None, "/v1/schedules/1/extra")
                .is_none()
        );
        assert!(map().resolve("GET", None, "/v1/unknown").is_none());
    }

    #[test]
    fn parameters_are_decoded_as_axum_decodes_them() {
        let id = |path: &str| {
            map()
                .resolve("GET", None, path)
                .map(|r| r.resource.id.unwrap())
        };
        assert_eq!(id("/v1/schedules/%73ecret").as_deref(), Some("secret"));
        assert_eq!(id("/v1/schedules/caf%C3%A9").as_deref(), Some("café"));
        assert_eq!(id("/v1/schedules/100%").as_deref(), Some("100%"));
        // A `%` with one character after it, at the end, stays as it is.
        assert_eq!(id("/v1/schedules/50%2").as_deref(), Some("50%2"));
        assert_eq!(id("/v1/schedules/a%2Bb").as_deref(), Some("a+b"));
        // An encoded `/`, invalid UTF-8 and an empty id match nothing.
        assert_eq!(id("/v1/schedules/a%2Fb"), None);
        assert_eq!(id("/v1/schedules/a%2fb"), None);
        assert_eq!(id("/v1/schedules/%FF"), None);
        assert_eq!(id("/v1/schedules/"), None);
        let file = |path: &str| {
            map()
                .resolve("PUT", None, path)
                .map(|r| r.resource.id.unwrap())
        };
        assert_eq!(file("/v1/files/a/%62/c").as_deref(), Some("a/b/c"));
        assert_eq!(file("/v1/files/a%2Fb/c"), None);
    }

    #[test]
    fn double_slashes_are_not_collapsed() {
        assert!(map().resolve("GET", None, "/v1//schedules/1").is_none());
        assert!(map().resolve("GET", None, "//v1/schedules/1").is_none());
        assert!(map().resolve("GET", None, "/v1/schedules//1").is_none());
        assert!(map().resolve("GET", None, "/v1/schedules/1/").is_none());
        assert_eq!(
            map()
                .resolve("PUT", None, "/v1/files/a//b")
                .unwrap()
                .resource
                .id
                .as_deref(),
            Some("a//b")
        );
    }

    #[test]
    fn bad_rules_are_rejected() {
        assert!(RouteMap::new([RouteRule::new("GET", "nope", "a", "b")]).is_err());
        assert!(
            RouteMap::new([RouteRule::new("GET", "/x/{id}", "a", "b").with_id_param("other")])
                .is_err()
        );
        assert!(RouteMap::new([RouteRule::new("GET", "/x/{*r}/y", "a", "b")]).is_err());
    }
}
