//! A request line as the policy layer turns it into the policy's input:
//! the platform's route map resolves method + raw path, and the resolved
//! route becomes an `AuthzInput`. Never panics; a resolved resource id never
//! holds a `/` (an encoded `%2F` matches no rule) and is what axum would hand
//! the handler; the input carries the route template, never the raw path.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use soma_example_platform::gateway;
use soma_policy::{AuthKind, AuthzInput, Principal, RequestInfo, RouteMap, RouteRule};

fn map() -> &'static RouteMap {
    static MAP: OnceLock<RouteMap> = OnceLock::new();
    MAP.get_or_init(|| {
        let mut rules = gateway::routes();
        rules.push(
            RouteRule::new("*", "/v1/files/{*rest}", "file.read", "file").with_id_param("rest"),
        );
        RouteMap::new(rules).expect("route map")
    })
}

fuzz_target!(|data: &[u8]| {
    // `METHOD SP PATH`.
    let Ok(line) = std::str::from_utf8(data) else {
        return;
    };
    let (method, path) = line.split_once(' ').unwrap_or(("GET", line));
    let Some(route) = map().resolve(method, None, path) else {
        return;
    };
    if let Some(id) = &route.resource.id {
        if route.resource.kind == "conversation" {
            assert!(
                !id.contains('/'),
                "a conversation id holds a '/': {id:?} from {path:?}"
            );
        }
    }
    let principal = Principal {
        subject: "fuzz".into(),
        tenant: "acme".into(),
        roles: vec![],
        scopes: vec![],
        auth_kind: AuthKind::Jwt {
            issuer: "https://issuer.fuzz".into(),
        },
    };
    let input = AuthzInput::new(&principal, route.action.clone(), route.resource.clone())
        .with_request(RequestInfo {
            method: method.to_owned(),
            route: route.route.clone(),
            request_id: None,
        });
    let bytes = input.canonical_bytes();
    let back: serde_json::Value = serde_json::from_slice(&bytes).expect("the input is JSON");
    assert_eq!(back["resource"]["id"], serde_json::json!(route.resource.id));
});
