//! The reference policy: its own Rego tests under regorus and real OPA, a
#![allow(clippy::field_reassign_with_default)] // tests tweak one setting of a default config
//! differential test over generated inputs, hot reload and keep-last-good.

mod common;

use std::sync::Arc;

use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Map, Value, json};
use soma_observability::health::{ComponentStatus, Criticality, HealthRegistry};
use soma_policy::{
    AuthzInput, EmbeddedRego, EngineError, PolicyEngine, PolicyMetrics, RegoEvaluator, RequestInfo,
    Resource,
};

const ENTRY: &str = "data.soma.authz.decision";

fn test_rule_names() -> Vec<String> {
    let src = std::fs::read_to_string(policy_dir().join("soma_test.rego")).unwrap();
    src.lines()
        .filter_map(|l| l.strip_prefix("test_"))
        .map(|rest| {
            format!(
                "test_{}",
                rest.split(|c: char| !(c.is_alphanumeric() || c == '_'))
                    .next()
                    .unwrap()
            )
        })
        .collect()
}

#[test]
fn rego_tests_pass_under_regorus() {
    let mut engine = regorus::Engine::new();
    for f in ["soma.rego", "soma_test.rego"] {
        engine.add_policy_from_file(policy_dir().join(f)).unwrap();
    }
    let names = test_rule_names();
    assert!(names.len() >= 20, "found {} tests", names.len());
    for name in names {
        let v = engine
            .eval_rule(format!("data.soma.authz_test.{name}"))
            .unwrap();
        assert_eq!(v, regorus::Value::from(true), "{name} failed under regorus");
    }
}

#[tokio::test]
async fn rego_tests_pass_under_real_opa() {
    let server = OpaServer::start();
    let client = reqwest::Client::new();
    let r = server.eval(&client, "soma/authz_test", &json!({})).await;
    let result = r["result"].as_object().expect("test package evaluates");
    let names = test_rule_names();
    for name in &names {
        assert_eq!(
            result.get(name),
            Some(&Value::Bool(true)),
            "{name} failed under OPA"
        );
    }
}

const ACTIONS: &[&str] = &[
    "conversation.send",
    "conversation.read",
    "tool.execute",
    "memory.write",
    "scheduler.create",
    "scheduler.read",
    "scheduler.update",
    "scheduler.delete",
    "operations.read",
    "operations.admin",
    "conversation.delete",
    "",
    "tool.execute ",
    "TOOL.EXECUTE",
];
const ROLES: &[&str] = &["user", "agent", "admin", "operator", "viewer", "Admin", ""];
const SCOPES: &[&str] = &[
    "conversation:write",
    "conversation:read",
    "tool:execute",
    "memory:write",
    "scheduler:read",
    "scheduler:write",
    "ops:read",
    "ops:admin",
    "*",
    "memory:read",
];
const TENANTS: &[&str] = &["t1", "t2", ""];
const SUBJECTS: &[&str] = &["alice", "bob", ""];

fn pick<'a>(rng: &mut StdRng, xs: &[&'a str]) -> &'a str {
    xs[rng.random_range(0..xs.len())]
}

fn subset(rng: &mut StdRng, xs: &[&str]) -> Vec<String> {
    xs.iter()
        .filter(|_| rng.random_bool(0.35))
        .map(|s| (*s).to_owned())
        .collect()
}

fn generate(rng: &mut StdRng) -> AuthzInput {
    let mut context = Map::new();
    if rng.random_bool(0.5) {
        context.insert("resource_tenant".into(), json!(pick(rng, TENANTS)));
    }
    if rng.random_bool(0.4) {
        context.insert(
            "tool_risk".into(),
            json!(pick(rng, &["low", "high", "medium"])),
        );
    }
    if rng.random_bool(0.4) {
        context.insert("owner".into(), json!(pick(rng, SUBJECTS)));
    }
    if rng.random_bool(0.1) {
        context.insert("resource_tenant".into(), json!(7));
    }
    AuthzInput {
        subject: pick(rng, SUBJECTS).into(),
        tenant: pick(rng, TENANTS).into(),
        roles: subset(rng, ROLES),
        scopes: subset(rng, SCOPES),
        action: pick(rng, ACTIONS).into(),
        resource: Resource {
            kind: "thing".into(),
            id: rng.random_bool(0.5).then(|| "r1".into()),
        },
        request: RequestInfo {
            method: "POST".into(),
            route: "/v1/x".into(),
            request_id: Some("r".into()),
        },
        context,
    }
}

/// Both of regorus' evaluators against OPA on the same generated inputs.
#[tokio::test]
async fn regorus_and_real_opa_agree_on_generated_inputs() {
    let server = OpaServer::start();
    let client = reqwest::Client::new();
    let interpreter =
        EmbeddedRego::from_dir(policy_dir(), ENTRY, PolicyMetrics::default()).unwrap();
    assert_eq!(interpreter.evaluator(), RegoEvaluator::Interpreter);
    let vm = EmbeddedRego::from_dir(policy_dir(), ENTRY, PolicyMetrics::default())
        .unwrap()
        .with_evaluator(RegoEvaluator::Vm)
        .unwrap();
    assert_eq!(vm.evaluator(), RegoEvaluator::Vm);
    let mut rng = StdRng::seed_from_u64(0x5047_4c43);
    let (mut allows, mut denies) = (0, 0);
    const N: usize = 1_500;
    for i in 0..N {
        let input = generate(&mut rng);
        let theirs = server
            .eval(
                &client,
                "soma/authz/decision",
                &serde_json::to_value(&input).unwrap(),
            )
            .await;
        let theirs = &theirs["result"];
        let ours = interpreter.evaluate(&input).await.unwrap();
        assert_eq!(
            json!({"allow": ours.allow, "reasons": ours.reasons}),
            *theirs,
            "interpreter: input #{i} disagrees: {}",
            serde_json::to_string(&input).unwrap()
        );
        let ours_vm = vm.evaluate(&input).await.unwrap();
        assert_eq!(
            ours_vm,
            ours,
            "vm: input #{i} disagrees: {}",
            serde_json::to_string(&input).unwrap()
        );
        if ours.allow { allows += 1 } else { denies += 1 }
    }
    // The generator must exercise both outcomes meaningfully.
    assert!(
        allows >= 50 && denies >= 50,
        "allows {allows}, denies {denies}"
    );
}

#[test]
fn the_vm_refuses_policies_it_cannot_compile_or_gets_wrong() {
    let load = |src: &str, evaluator| {
        EmbeddedRego::from_sources(&[("p.rego", src)], ENTRY, PolicyMetrics::default())
            .and_then(|e| e.with_evaluator(evaluator))
    };
    // `with` is not supported by the VM compiler: the interpreter takes it,
    // the VM refuses to load rather than evaluate something else.
    let with = "package soma.authz\ndefault decision := {\"allow\": false, \"reasons\": []}\n\
                decision := {\"allow\": true, \"reasons\": []} if { input.x with input.x as true }\n";
    let e = load(with, RegoEvaluator::Vm).unwrap_err();
    assert!(
        matches!(&e, EngineError::Load(m) if m.contains("cannot compile")),
        "{e:?}"
    );
    assert!(load(with, RegoEvaluator::Interpreter).is_ok());
    // The known divergence: an undefined body assignment does not stop the
    // body under the VM. Here it would allow an unknown subject; OPA and the
    // interpreter deny. The empty-input tripwire catches this policy.
    let assign = r#"package soma.authz
grants := {"alice": {"blocked": false}}
default allow := false
allow if {
	g := grants[input.subject]
	not g.blocked
}
decision := {"allow": allow, "reasons": []}
"#;
    let e = load(assign, RegoEvaluator::Vm).unwrap_err();
    assert!(
        matches!(&e, EngineError::Load(m) if m.contains("disagree")),
        "{e:?}"
    );
    let interpreter = load(assign, RegoEvaluator::Interpreter).unwrap();
    let mut i = AuthzInput::new(
        &soma_policy::Principal {
            subject: "mallory".into(),
            tenant: "t1".into(),
            roles: vec![],
            scopes: vec![],
            auth_kind: soma_policy::AuthKind::ApiKey { key_id: "k".into() },
        },
        "a",
        Resource::default(),
    );
    assert!(!interpreter.evaluate_sync(&i).unwrap().allow);
    i.subject = "alice".into();
    assert!(interpreter.evaluate_sync(&i).unwrap().allow);

    // A reload to a policy the VM refuses keeps the last good one, on the VM.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("p.rego"),
        "package soma.authz\ndecision := {\"allow\": input.subject == \"alice\", \"reasons\": []}\n",
    )
    .unwrap();
    let engine = EmbeddedRego::from_dir(dir.path(), ENTRY, PolicyMetrics::default())
        .unwrap()
        .with_evaluator(RegoEvaluator::Vm)
        .unwrap();
    std::fs::write(dir.path().join("p.rego"), assign).unwrap();
    assert!(matches!(engine.reload(), Err(EngineError::Load(_))));
    assert!(engine.evaluate_sync(&i).unwrap().allow);
    i.subject = "mallory".into();
    assert!(!engine.evaluate_sync(&i).unwrap().allow);
    assert_eq!(engine.evaluator(), RegoEvaluator::Vm);
}

#[tokio::test]
async fn hot_reload_swaps_policy_and_keeps_last_good_on_error() {
    let dir = tempfile::tempdir().unwrap();
    let write = |src: &str| std::fs::write(dir.path().join("p.rego"), src).unwrap();
    write(
        "package soma.authz\ndecision := {\"allow\": input.subject == \"alice\", \"reasons\": []}\n",
    );
    std::fs::write(dir.path().join("ignored_test.rego"), "this is not rego").unwrap();
    let metrics = PolicyMetrics::default();
    let health = HealthRegistry::new();
    let engine = Arc::new(
        EmbeddedRego::from_dir(dir.path(), ENTRY, metrics.clone())
            .unwrap()
            .with_health(health.reporter("policy", Criticality::Required)),
    );
    let (tx, rx) = tokio::sync::watch::channel(0u32);
    let task = engine.spawn_reloader(rx);

    let as_subject = |s: &str| {
        let mut i = AuthzInput::new(
            &soma_policy::Principal {
                subject: s.into(),
                tenant: "t1".into(),
                roles: vec![],
                scopes: vec![],
                auth_kind: soma_policy::AuthKind::ApiKey { key_id: "k".into() },
            },
            "a",
            Resource::default(),
        );
        i.request.method = "GET".into();
        i
    };
    assert!(engine.evaluate(&as_subject("alice")).await.unwrap().allow);
    assert!(!engine.evaluate(&as_subject("bob")).await.unwrap().allow);

    write(
        "package soma.authz\ndecision := {\"allow\": input.subject == \"bob\", \"reasons\": []}\n",
    );
    tx.send(1).unwrap();
    wait_for(|| metrics.reload_count(true) == 1).await;
    assert!(engine.evaluate(&as_subject("bob")).await.unwrap().allow);
    assert!(!engine.evaluate(&as_subject("alice")).await.unwrap().allow);

    // A broken policy: reload fails, the last good one stays in force.
    write("package soma.authz\ndecision := {\"allow\": \n");
    tx.send(2).unwrap();
    wait_for(|| metrics.reload_count(false) == 1).await;
    assert!(engine.evaluate(&as_subject("bob")).await.unwrap().allow);
    assert_eq!(
        health.component("policy").unwrap().status,
        ComponentStatus::Degraded
    );
    let e = engine.reload().unwrap_err();
    assert!(matches!(e, EngineError::Load(_)), "{e:?}");

    drop(tx);
    task.await.unwrap();
}

async fn wait_for(cond: impl Fn() -> bool) {
    for _ in 0..200 {
        if cond() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    panic!("condition not reached in 5 s");
}

#[test]
fn empty_or_missing_policy_dirs_fail_to_load() {
    let dir = tempfile::tempdir().unwrap();
    let e = EmbeddedRego::from_dir(dir.path(), ENTRY, PolicyMetrics::default()).unwrap_err();
    assert!(matches!(e, EngineError::Load(_)));
    assert!(
        EmbeddedRego::from_dir(dir.path().join("missing"), ENTRY, PolicyMetrics::default())
            .is_err()
    );
}

#[tokio::test]
async fn the_vm_is_chosen_through_configuration() {
    let mut config: soma_policy::PolicyConfig =
        serde_json::from_value(json!({"evaluator": "vm"})).unwrap();
    assert_eq!(config.evaluator, RegoEvaluator::Vm);
    assert_eq!(
        soma_policy::PolicyConfig::default().evaluator,
        RegoEvaluator::Interpreter
    );
    config.policy_dir = policy_dir();
    let authz = soma_policy::Authorizer::from_config(&config, PolicyMetrics::default())
        .unwrap()
        .build();
    let p = soma_policy::Principal {
        subject: "alice".into(),
        tenant: "t1".into(),
        roles: vec!["agent".into()],
        scopes: vec!["tool:execute".into()],
        auth_kind: soma_policy::AuthKind::ApiKey { key_id: "k".into() },
    };
    let tool = Resource {
        kind: "tool".into(),
        id: Some("search".into()),
    };
    let low = AuthzInput::new(&p, "tool.execute", tool.clone()).with_context("tool_risk", "low");
    let d = authz.check(&low).await.unwrap();
    assert!(d.allow, "{d:?}");
    let high = AuthzInput::new(&p, "tool.execute", tool).with_context("tool_risk", "high");
    let d = authz.check(&high).await.unwrap();
    assert_eq!(d.reasons, ["high_risk_tool_requires_admin"]);
    assert!(!d.allow);
}
