//! Tower layers for JWT/API-key authentication and OPA authorization (remote or embedded Rego)
