//! The one authorization input schema shared by the HTTP layer and workers.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::Principal;

/// What the policy engine sees, exactly:
/// `{subject, tenant, roles, scopes, action, resource {kind, id},
///   request {method, route, request_id}, context}`.
///
/// It never carries credentials or raw headers: the HTTP layer fills it from
/// the verified [`Principal`], the route template and the method, and a
/// worker fills it from the principal it acts for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuthzInput {
    /// Subject from the verified credential.
    pub subject: String,
    /// Tenant from the verified credential.
    pub tenant: String,
    /// Roles from the verified credential.
    pub roles: Vec<String>,
    /// Scopes from the verified credential.
    pub scopes: Vec<String>,
    /// Action, e.g. `conversation.send`.
    pub action: String,
    /// What the action is applied to.
    pub resource: Resource,
    /// Where the request came from.
    pub request: RequestInfo,
    /// Extra facts for the policy (e.g. `resource_tenant`, `tool_risk`).
    /// Keep it to facts; never put secrets here.
    pub context: Map<String, Value>,
}

/// The resource an action is applied to.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resource {
    /// Kind, e.g. `session`, `tool`, `schedule`.
    pub kind: String,
    /// Identifier, when the route names one.
    pub id: Option<String>,
}

/// Request metadata (no headers, no body).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestInfo {
    /// HTTP method, or the worker's operation kind (e.g. `TASK`).
    pub method: String,
    /// Route template (`/v1/sessions/{id}/messages`), never the raw path.
    pub route: String,
    /// Correlation id for audit; not part of the decision-cache key.
    pub request_id: Option<String>,
}

impl AuthzInput {
    /// Starts an input for `principal` performing `action` on `resource`.
    pub fn new(principal: &Principal, action: impl Into<String>, resource: Resource) -> Self {
        Self {
            subject: principal.subject.clone(),
            tenant: principal.tenant.clone(),
            roles: principal.roles.clone(),
            scopes: principal.scopes.clone(),
            action: action.into(),
            resource,
            request: RequestInfo::default(),
            context: Map::new(),
        }
    }

    /// Sets the request metadata.
    pub fn with_request(mut self, request: RequestInfo) -> Self {
        self.request = request;
        self
    }

    /// Adds one context fact.
    pub fn with_context(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.context.insert(key.into(), value.into());
        self
    }

    /// Canonical bytes of everything that can influence the decision: the
    /// whole input except `request.request_id`, with object keys sorted.
    /// The decision cache keys on a hash of these bytes, so entries are
    /// never shared across subjects, tenants, roles or scopes.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        self.write_canonical(&mut out);
        out
    }

    /// SHA-256 of [`canonical_bytes`](Self::canonical_bytes), computed
    /// while serializing (nothing is buffered).
    pub(crate) fn canonical_digest(&self) -> [u8; 32] {
        // The hasher is an `io::Write` (sha2's `std` feature).
        let mut h = <sha2::Sha256 as sha2::Digest>::new();
        self.write_canonical(&mut h);
        sha2::Digest::finalize(h).into()
    }

    fn write_canonical(&self, w: impl std::io::Write) {
        #[derive(Serialize)]
        struct Canon<'a> {
            action: &'a str,
            context: Sorted<'a>,
            request: (&'a str, &'a str),
            resource: &'a Resource,
            roles: &'a [String],
            scopes: &'a [String],
            subject: &'a str,
            tenant: &'a str,
        }
        let canon = Canon {
            action: &self.action,
            context: Sorted::Map(&self.context),
            request: (&self.request.method, &self.request.route),
            resource: &self.resource,
            roles: &self.roles,
            scopes: &self.scopes,
            subject: &self.subject,
            tenant: &self.tenant,
        };
        // Serializing strings and JSON values into memory cannot fail.
        let _ = serde_json::to_writer(w, &canon);
    }
}

/// Serializes a JSON value with object keys in sorted order, without
/// copying it (whatever map type serde_json was built with).
enum Sorted<'a> {
    Map(&'a Map<String, Value>),
    Value(&'a Value),
}

impl Serialize for Sorted<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{SerializeMap, SerializeSeq};
        let map = match self {
            Sorted::Map(m) => *m,
            Sorted::Value(Value::Object(m)) => m,
            Sorted::Value(Value::Array(a)) => {
                let mut seq = s.serialize_seq(Some(a.len()))?;
                for v in a {
                    seq.serialize_element(&Sorted::Value(v))?;
                }
                return seq.end();
            }
            Sorted::Value(other) => return other.serialize(s),
        };
        let mut entries: Vec<(&String, &Value)> = map.iter().collect();
        entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
        let mut out = s.serialize_map(Some(entries.len()))?;
        for (k, v) in entries {
            out.serialize_entry(k, &Sorted::Value(v))?;
        }
        out.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::AuthKind;

    fn input(subject: &str, tenant: &str) -> AuthzInput {
        let p = Principal {
            subject: subject.into(),
            tenant: tenant.into(),
            roles: vec!["user".into()],
            scopes: vec![],
            auth_kind: AuthKind::ApiKey { key_id: "k".into() },
        };
        AuthzInput::new(&p, "a", Resource::default())
    }

    #[test]
    fn canonical_bytes_ignore_key_order_and_request_id_only() {
        let a = input("s", "t")
            .with_context("b", 1)
            .with_context("a", serde_json::json!({"y": 1, "x": [{"d": 1, "c": 2}]}));
        let mut b = input("s", "t")
            .with_context("a", serde_json::json!({"x": [{"c": 2, "d": 1}], "y": 1}))
            .with_context("b", 1);
        b.request.request_id = Some("other".into());
        assert_eq!(a.canonical_bytes(), b.canonical_bytes());
        assert_ne!(
            input("s", "t").canonical_bytes(),
            input("s2", "t").canonical_bytes()
        );
        assert_ne!(
            input("s", "t").canonical_bytes(),
            input("s", "t2").canonical_bytes()
        );
        let mut c = input("s", "t");
        c.roles.push("admin".into());
        assert_ne!(input("s", "t").canonical_bytes(), c.canonical_bytes());
        // The streamed digest is the digest of those bytes.
        for i in [a, b, c] {
            let want: [u8; 32] = sha2::Digest::finalize(
                <sha2::Sha256 as sha2::Digest>::new_with_prefix(i.canonical_bytes()),
            )
            .into();
            assert_eq!(i.canonical_digest(), want);
        }
    }
}
