//! Shared helpers for soma-policy's integration tests, benchmarks and
//! measuring examples.
#![allow(dead_code, unreachable_pub, missing_docs, unused_imports)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use soma_policy::{
    AuthKind, Authenticator, AuthnLayer, Authorizer, AuthzInput, AuthzLayer, IssuerConfig,
    JwtAlgorithm, PolicyConfig, Principal, RequestInfo, Resource, RouteMap, RouteRule, StaticKey,
};

pub const ISSUER: &str = "https://id.soma.test";
pub const HS_SECRET: &str = "test-only-hs256-secret-0123456789abcdef";

pub fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixture(name: &str) -> String {
    std::fs::read_to_string(crate_dir().join("tests/fixtures").join(name)).expect("fixture")
}

pub fn policy_dir() -> PathBuf {
    crate_dir().join("policy")
}

pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Claims for a valid token of `sub` in tenant `t1`.
pub fn claims(sub: &str) -> Value {
    json!({
        "iss": ISSUER, "aud": "soma", "sub": sub, "tenant": "t1",
        "roles": ["user"], "scope": "conversation:write memory:write scheduler:read",
        "iat": now(), "exp": now() + 300,
    })
}

pub fn encoding_key(alg: JwtAlgorithm) -> EncodingKey {
    match alg {
        JwtAlgorithm::HS256 => EncodingKey::from_secret(HS_SECRET.as_bytes()),
        JwtAlgorithm::RS256 => {
            EncodingKey::from_rsa_pem(fixture("rsa_private.pem").as_bytes()).unwrap()
        }
        JwtAlgorithm::ES256 => {
            EncodingKey::from_ec_pem(fixture("ec_private.pem").as_bytes()).unwrap()
        }
        JwtAlgorithm::EdDSA => {
            EncodingKey::from_ed_pem(fixture("ed_private.pem").as_bytes()).unwrap()
        }
    }
}

/// The public half (or the secret) that verifies [`encoding_key`]'s tokens.
pub fn decoding_key(alg: JwtAlgorithm) -> jsonwebtoken::DecodingKey {
    use jsonwebtoken::DecodingKey;
    match alg {
        JwtAlgorithm::HS256 => Ok(DecodingKey::from_secret(HS_SECRET.as_bytes())),
        JwtAlgorithm::RS256 => DecodingKey::from_rsa_pem(fixture("rsa_public.pem").as_bytes()),
        JwtAlgorithm::ES256 => DecodingKey::from_ec_pem(fixture("ec_public.pem").as_bytes()),
        JwtAlgorithm::EdDSA => DecodingKey::from_ed_pem(fixture("ed_public.pem").as_bytes()),
    }
    .unwrap()
}

pub fn jwt_alg(alg: JwtAlgorithm) -> Algorithm {
    match alg {
        JwtAlgorithm::HS256 => Algorithm::HS256,
        JwtAlgorithm::RS256 => Algorithm::RS256,
        JwtAlgorithm::ES256 => Algorithm::ES256,
        JwtAlgorithm::EdDSA => Algorithm::EdDSA,
    }
}

pub fn mint(alg: JwtAlgorithm, kid: Option<&str>, claims: &Value) -> String {
    mint_with(alg, &encoding_key(alg), kid, claims)
}

pub fn mint_with(
    alg: JwtAlgorithm,
    key: &EncodingKey,
    kid: Option<&str>,
    claims: &Value,
) -> String {
    let mut h = Header::new(jwt_alg(alg));
    h.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&h, claims, key).unwrap()
}

/// Static keys for all four algorithms, kids `hs`, `rs`, `es`, `ed`.
pub fn static_keys() -> Vec<StaticKey> {
    vec![
        StaticKey {
            kid: Some("hs".into()),
            alg: JwtAlgorithm::HS256,
            secret: Some(HS_SECRET.into()),
            public_key_pem: None,
        },
        StaticKey {
            kid: Some("rs".into()),
            alg: JwtAlgorithm::RS256,
            secret: None,
            public_key_pem: Some(fixture("rsa_public.pem")),
        },
        StaticKey {
            kid: Some("es".into()),
            alg: JwtAlgorithm::ES256,
            secret: None,
            public_key_pem: Some(fixture("ec_public.pem")),
        },
        StaticKey {
            kid: Some("ed".into()),
            alg: JwtAlgorithm::EdDSA,
            secret: None,
            public_key_pem: Some(fixture("ed_public.pem")),
        },
    ]
}

pub fn config_with_static_keys() -> PolicyConfig {
    let mut issuer = IssuerConfig::new(ISSUER);
    issuer.keys = static_keys();
    let mut config = PolicyConfig::default();
    config.issuers = vec![issuer];
    config.policy_dir = policy_dir();
    config
}

pub fn kid_for(alg: JwtAlgorithm) -> &'static str {
    match alg {
        JwtAlgorithm::HS256 => "hs",
        JwtAlgorithm::RS256 => "rs",
        JwtAlgorithm::ES256 => "es",
        JwtAlgorithm::EdDSA => "ed",
    }
}

/// OPA's real evaluator behind a minimal Data API (tests/support/opa_data_api.py).
pub struct OpaServer {
    child: Child,
    pub port: u16,
}

impl OpaServer {
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Starts the server on a free loopback port, loading `policy/`.
    pub fn start() -> Self {
        Self::start_with(&policy_dir())
    }

    pub fn start_with(policy: &std::path::Path) -> Self {
        let root = crate_dir().parent().unwrap().to_path_buf();
        let site = root.join(".stack/opa/site");
        assert!(
            site.join("opa_bindings/libopabridge.so").exists(),
            "OPA evaluator is not installed at {}: run `bash xtask/stack.d/40-opa.sh` \
             (or `cargo xtask stack up`), which unpacks the opa-golib-python-bindings wheel",
            site.display()
        );
        let port = soma_testkit::free_port();
        let child = Command::new("python3")
            .arg(crate_dir().join("tests/support/opa_data_api.py"))
            .arg("--site")
            .arg(&site)
            .arg("--policy-dir")
            .arg(policy)
            .arg("--port")
            .arg(port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 is required to run the OPA Data API test server");
        let mut server = Self { child, port };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!("OPA Data API server exited early with {status}");
            }
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "OPA Data API server did not listen on 127.0.0.1:{port} within 20 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }

    /// Request bodies the server received so far.
    pub async fn received(&self) -> Vec<Value> {
        reqwest::get(format!("{}/_received", self.base_url()))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Evaluates `data.<path>` with `input` directly.
    pub async fn eval(&self, client: &reqwest::Client, path: &str, input: &Value) -> Value {
        let r: Value = client
            .post(format!("{}/v1/data/{path}", self.base_url()))
            .json(&json!({ "input": input }))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        r
    }
}

impl Drop for OpaServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Serves a router on a free loopback port; returns the base URL.
pub use soma_testkit::serve_url as serve;

/// The route the benchmarks and measuring examples send to.
pub const SEND_ROUTE: &str = "/v1/sessions/{id}/messages";
/// A path of [`SEND_ROUTE`].
pub const SEND_PATH: &str = "/v1/sessions/s1/messages";

/// The benchmarks' input: alice (role `user`) sends a message to a session
/// of her own tenant, which the reference policy allows.
pub fn send_input() -> AuthzInput {
    let p = Principal {
        subject: "alice".into(),
        tenant: "t1".into(),
        roles: vec!["user".into()],
        scopes: vec!["conversation:write".into(), "memory:write".into()],
        auth_kind: AuthKind::Jwt {
            issuer: ISSUER.into(),
        },
    };
    AuthzInput::new(
        &p,
        "conversation.send",
        Resource {
            kind: "session".into(),
            id: Some("s1".into()),
        },
    )
    .with_request(RequestInfo {
        method: "POST".into(),
        route: SEND_ROUTE.into(),
        request_id: Some("r1".into()),
    })
    .with_context("resource_tenant", "t1")
}

/// `Bearer <HS256 token>` for alice, valid for a day.
pub fn long_lived_bearer() -> String {
    let mut c = claims("alice");
    c["exp"] = json!(now() + 86_400);
    format!("Bearer {}", mint(JwtAlgorithm::HS256, Some("hs"), &c))
}

/// [`SEND_ROUTE`] answering `ok`, with no layers.
pub fn bare_router() -> axum::Router {
    axum::Router::new().route(SEND_ROUTE, axum::routing::post(|| async { "ok" }))
}

/// [`bare_router`] behind authentication (`authn`) and, when given,
/// authorization (`authz`, the route mapped to `conversation.send`).
pub fn guarded_router(authn: Arc<Authenticator>, authz: Option<Arc<Authorizer>>) -> axum::Router {
    let mut router = bare_router();
    if let Some(authz) = authz {
        let routes =
            RouteMap::new([
                RouteRule::new("POST", SEND_ROUTE, "conversation.send", "session")
                    .with_id_param("id"),
            ])
            .unwrap();
        router = router.route_layer(AuthzLayer::new(authz, Arc::new(routes)));
    }
    router.layer(AuthnLayer::new(authn))
}
