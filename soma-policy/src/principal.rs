//! The authenticated identity.

use serde::{Deserialize, Serialize};

/// Who is calling, as established from a verified credential. The
/// authentication layer puts one into the request's extensions.
///
/// Every field comes from the credential (token claims or the API-key
/// record), never from a client-supplied header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Principal {
    /// Subject (`sub` claim or the API key's owner).
    pub subject: String,
    /// Tenant the credential was issued for.
    pub tenant: String,
    /// Roles granted to the subject.
    pub roles: Vec<String>,
    /// Scopes the credential carries.
    pub scopes: Vec<String>,
    /// How the credential was presented.
    pub auth_kind: AuthKind,
}

/// How a principal authenticated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AuthKind {
    /// A bearer JWT from the named issuer.
    Jwt {
        /// The token's `iss`.
        issuer: String,
    },
    /// An API key, identified by its public lookup id (never the secret).
    ApiKey {
        /// The key's lookup id.
        key_id: String,
    },
}
