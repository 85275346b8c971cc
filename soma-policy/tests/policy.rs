//! The reference policy: its own Rego tests under regorus and real OPA, a
#![allow(clippy::field_reassign_with_default)] // tests tweak one setting of a default config
//! differential test over generated inputs, hot reload and keep-last-good.

mod common;

use std::sync::Arc;

use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Map, Value, json};
use soma_observability::health::{ComponentStatus, HealthRegistry};
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
    let server = start_opa();
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
    "memory.read_tenant",
    "scheduler.create",
    "scheduler.read",
    "scheduler.update",
    "scheduler.delete",
    "ops.read",
    "ops.admin",
    "config.read",
    "features.read",
    "somabrain.operate",
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
    "somabrain:operate",
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

/// The reference policy on regorus' interpreter, and with the default
/// evaluator (auto), which runs it on the VM.
fn reference_policy_on_both_evaluators() -> (EmbeddedRego, EmbeddedRego) {
    let interpreter = EmbeddedRego::from_dir(policy_dir(), ENTRY, PolicyMetrics::default())
        .unwrap()
        .with_evaluator(RegoEvaluator::Interpreter)
        .unwrap();
    assert_eq!(interpreter.evaluator(), RegoEvaluator::Interpreter);
    assert_eq!(interpreter.active_evaluator(), RegoEvaluator::Interpreter);
    let printed = format!("{interpreter:?}");
    assert!(
        printed.starts_with("EmbeddedRego {")
            && printed.contains(ENTRY)
            && printed.contains("Interpreter"),
        "{printed}"
    );
    let vm = EmbeddedRego::from_dir(policy_dir(), ENTRY, PolicyMetrics::default()).unwrap();
    assert_eq!(vm.evaluator(), RegoEvaluator::Auto);
    assert_eq!(vm.active_evaluator(), RegoEvaluator::Vm);
    assert_eq!(vm.opa_divergences(), Vec::<String>::new());
    (interpreter, vm)
}

/// Both of regorus' evaluators against OPA on the same generated inputs.
#[tokio::test]
async fn regorus_and_real_opa_agree_on_generated_inputs() {
    let server = start_opa();
    let client = reqwest::Client::new();
    let (interpreter, vm) = reference_policy_on_both_evaluators();
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

fn load(src: &str, entry: &str, evaluator: RegoEvaluator) -> Result<EmbeddedRego, EngineError> {
    EmbeddedRego::from_sources(&[("p.rego", src)], entry, PolicyMetrics::default())
        .and_then(|e| e.with_evaluator(evaluator))
}

/// regorus' known VM divergence: an undefined `:=` does not stop the body.
/// Here it would allow an unknown subject under the VM; OPA and the
/// interpreter deny.
const ASSIGN: &str = r#"package soma.authz
grants := {"alice": {"blocked": false}}
default allow := false
allow if {
	g := grants[input.subject]
	not g.blocked
}
decision := {"allow": allow, "reasons": []}
"#;

fn principal_input(subject: &str) -> AuthzInput {
    AuthzInput::new(
        &soma_policy::Principal {
            subject: subject.into(),
            tenant: "t1".into(),
            roles: vec![],
            scopes: vec![],
            auth_kind: soma_policy::AuthKind::ApiKey { key_id: "k".into() },
        },
        "a",
        Resource::default(),
    )
}

#[test]
fn the_vm_refuses_policies_it_cannot_compile_or_gets_wrong() {
    // `with` is not supported by the VM compiler: the interpreter takes it,
    // the VM refuses to load rather than evaluate something else.
    let with = "package soma.authz\ndefault decision := {\"allow\": false, \"reasons\": []}\n\
                decision := {\"allow\": true, \"reasons\": []} if { input.x with input.x as true }\n";
    let e = load(with, ENTRY, RegoEvaluator::Vm).unwrap_err();
    assert!(
        matches!(&e, EngineError::Load(m) if m.contains("cannot compile")),
        "{e:?}"
    );
    assert!(load(with, ENTRY, RegoEvaluator::Interpreter).is_ok());
    // A body assignment is refused, and the error says where.
    let e = load(ASSIGN, ENTRY, RegoEvaluator::Vm).unwrap_err();
    assert!(
        matches!(&e, EngineError::Load(m) if m.contains("not eligible") && m.contains("p.rego:5:")),
        "{e:?}"
    );
    let interpreter = load(ASSIGN, ENTRY, RegoEvaluator::Interpreter).unwrap();
    let mut i = principal_input("mallory");
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
    std::fs::write(dir.path().join("p.rego"), ASSIGN).unwrap();
    assert!(matches!(engine.reload(), Err(EngineError::Load(_))));
    assert!(engine.evaluate_sync(&i).unwrap().allow);
    i.subject = "mallory".into();
    assert!(!engine.evaluate_sync(&i).unwrap().allow);
    assert_eq!(engine.active_evaluator(), RegoEvaluator::Vm);
}

/// `auto` (the default) puts each (re)loaded policy on the VM when it is
/// eligible and on the interpreter when not, so the unknown subject is
/// denied either way.
#[test]
fn auto_runs_eligible_policies_on_the_vm_and_the_rest_on_the_interpreter() {
    let dir = tempfile::tempdir().unwrap();
    let safe = "package soma.authz\ngrants := {\"alice\": {\"blocked\": false}}\n\
                default allow := false\nallow if { grants[input.subject]; not grants[input.subject].blocked }\n\
                decision := {\"allow\": allow, \"reasons\": []}\n";
    std::fs::write(dir.path().join("p.rego"), safe).unwrap();
    let engine = EmbeddedRego::from_dir(dir.path(), ENTRY, PolicyMetrics::default()).unwrap();
    assert_eq!(engine.evaluator(), RegoEvaluator::Auto);
    assert_eq!(engine.active_evaluator(), RegoEvaluator::Vm);
    let (alice, mallory) = (principal_input("alice"), principal_input("mallory"));
    assert!(engine.evaluate_sync(&alice).unwrap().allow);
    assert!(!engine.evaluate_sync(&mallory).unwrap().allow);

    std::fs::write(dir.path().join("p.rego"), ASSIGN).unwrap();
    engine.reload().unwrap();
    assert_eq!(engine.active_evaluator(), RegoEvaluator::Interpreter);
    assert!(engine.evaluate_sync(&alice).unwrap().allow);
    assert!(!engine.evaluate_sync(&mallory).unwrap().allow);

    std::fs::write(dir.path().join("p.rego"), safe).unwrap();
    engine.reload().unwrap();
    assert_eq!(engine.active_evaluator(), RegoEvaluator::Vm);
    // Forcing the interpreter holds across reloads.
    let engine = engine.with_evaluator(RegoEvaluator::Interpreter).unwrap();
    engine.reload().unwrap();
    assert_eq!(engine.active_evaluator(), RegoEvaluator::Interpreter);
}

/// Each construct on undefined, defined and wrongly typed operands, against
/// real OPA. The ones the VM check lets through must run on the VM and decide
/// exactly as OPA; the others (`:=`, builtins that can fail, arithmetic) must
/// be refused by `vm` and run on the interpreter under `auto`. The
/// differences found are asserted exactly, so a regorus upgrade that changes
/// any of them fails here, naming the construct and the input.
#[tokio::test]
async fn vm_interpreter_and_real_opa_on_undefined_operands() {
    // (rule, the context key whose absence makes regorus differ from OPA):
    // under `not`, OPA evaluates an undefined call argument or reference
    // index before the negation, so the body fails (deny); regorus, with
    // both evaluators, negates the undefined expression (allow). Policies
    // must negate rules instead, as the reference policy does
    // (`not known_action`, `not has_role`).
    let eligible: [(&str, Option<&str>); 20] = [
        ("allow if { r = input.missing; true }", None),
        ("allow if { input.missing == input.missing2 }", None),
        ("allow if { input.missing != 1 }", None),
        ("allow if { not input.missing }", None),
        ("allow if { not grants[input.user].blocked }", Some("user")),
        ("f(x) := x\nallow if { f(input.missing) }", None),
        ("allow if { some x in input.missing; x == 1 }", None),
        ("allow if { some x in input.xs; x == 1 }", None),
        ("allow if { every x in input.missing { x == 1 } }", None),
        ("allow if { every x in input.xs { x > 0 } }", None),
        ("allow if { input.missing[0] }", None),
        ("allow := false if { input.x == 2 } else := true", None),
        (
            "s contains input.missing if true\nallow if { count(s) == 0 }",
            None,
        ),
        ("r := grants[input.user]\nallow if { not r.blocked }", None),
        (
            "r := grants[input.user]\nallow if { x = r; not x.blocked }",
            None,
        ),
        ("allow if { input.missing in {1} }", None),
        ("allow if { not input.missing in {1} }", Some("missing")),
        ("allow if { not input.missing == 1 }", None),
        ("allow if { input.x < 2 }", None),
        // Values of different types are ordered, as in OPA.
        (
            "deny contains \"big\" if input.missing > 0\nallow if count(deny) == 0",
            None,
        ),
    ];
    let ineligible: [(&str, Option<&str>); 14] = [
        ("allow if { count(input.missing) == 0 }", None),
        (
            "allow if { not count(input.missing) == 0 }",
            Some("missing"),
        ),
        (
            "allow if { count([x | some x in input.missing]) == 0 }",
            None,
        ),
        ("allow if { y = input.missing + 1; y > 0 }", None),
        ("allow if { object.get(input, \"missing\", true) }", None),
        (
            "allow if { startswith(input.missing, \"a\") == false }",
            None,
        ),
        ("allow if { input.user in object.keys(grants) }", None),
        // Under the VM a failing builtin drops the deny rule's body: allow.
        (
            "deny contains \"bad\" if count(input.missing) > 0\nallow if count(deny) == 0",
            None,
        ),
        ("allow if { r := grants[input.user]; not r.blocked }", None),
        ("allow if { r := input.missing; true }", None),
        ("allow if { r := input.missing; not r }", None),
        ("allow if { r := {\"a\": input.missing}; true }", None),
        (
            "r := grants[input.user]\nallow if { x := r; not x.blocked }",
            None,
        ),
        ("allow if { y := input.missing + 1; y > 0 }", None),
    ];
    let contexts = [
        json!({}),
        json!({"user": "bob", "x": 1, "xs": [1, 2]}),
        json!({"user": "alice", "x": 2, "xs": [0], "missing": false}),
        json!({"user": "alice", "xs": [], "missing": [1]}),
    ];
    let rules: Vec<(&str, bool, Option<&str>)> = eligible
        .iter()
        .map(|(r, k)| (*r, true, *k))
        .chain(ineligible.iter().map(|(r, k)| (*r, false, *k)))
        .collect();
    // One package per construct, all served by one OPA; the rules read
    // `input.*` and the generated values travel in the input's `context`.
    let dir = tempfile::tempdir().unwrap();
    let sources: Vec<String> = rules
        .iter()
        .enumerate()
        .map(|(i, (rule, _, _))| {
            format!(
                "package p{i}\nimport rego.v1\ngrants := {{\"alice\": {{\"blocked\": false}}}}\n\
                 default allow := false\n{}\n",
                rule.replace("input.", "input.context.")
            )
        })
        .collect();
    for (i, src) in sources.iter().enumerate() {
        std::fs::write(dir.path().join(format!("p{i}.rego")), src).unwrap();
    }
    let opa = OpaServer::start(dir.path());
    let client = reqwest::Client::new();
    let (mut opa_errors, mut interpreter_errors, mut not_undefined) = (0, 0, 0);
    for (i, ((rule, is_eligible, differs_without), src)) in rules.iter().zip(&sources).enumerate() {
        let entry = format!("data.p{i}.allow");
        let interpreter = load(src, &entry, RegoEvaluator::Interpreter).unwrap();
        // The load-time check flags exactly the constructs found to differ.
        assert_eq!(
            interpreter.opa_divergences().is_empty(),
            differs_without.is_none(),
            "{rule}: {:?}",
            interpreter.opa_divergences()
        );
        let auto = load(src, &entry, RegoEvaluator::Auto).unwrap();
        let vm = load(src, &entry, RegoEvaluator::Vm);
        assert_eq!(vm.is_ok(), *is_eligible, "{rule}: {:?}", vm.err());
        let expected = if *is_eligible {
            RegoEvaluator::Vm
        } else {
            RegoEvaluator::Interpreter
        };
        assert_eq!(auto.active_evaluator(), expected, "{rule}");
        for context in &contexts {
            let mut input = principal_input("s");
            input.context = context.as_object().unwrap().clone();
            let theirs = opa
                .eval(
                    &client,
                    &format!("p{i}/allow"),
                    &serde_json::to_value(&input).unwrap(),
                )
                .await;
            // `None`: an evaluation error (a builtin given the wrong type);
            // OPA answers 500, our authorizer 503. Fail-closed either way.
            let theirs = theirs["result"].as_bool();
            opa_errors += usize::from(theirs.is_none());
            let decide = |e: &EmbeddedRego| e.evaluate_sync(&input).map(|d| d.allow).ok();
            let interp = decide(&interpreter);
            let vm_says = vm.as_ref().ok().map(decide);
            if differs_without.is_some_and(|k| !context.as_object().unwrap().contains_key(k)) {
                assert_eq!(
                    (interp, theirs),
                    (Some(true), Some(false)),
                    "{rule} on {context}"
                );
                if let Some(vm_says) = vm_says {
                    assert_eq!(vm_says, Some(true), "{rule} on {context}");
                }
                not_undefined += 1;
                continue;
            }
            // Where the interpreter decides, it decides as OPA. Where it errs
            // (also iterating over a non-collection, which OPA treats as
            // empty), the authorizer fails closed.
            match interp {
                Some(_) => assert_eq!(interp, theirs, "interpreter vs OPA: {rule} on {context}"),
                None => interpreter_errors += 1,
            }
            // The VM, on what the check lets through, decides as OPA.
            if let Some(vm_says) = vm_says {
                assert_eq!(vm_says, theirs, "vm vs OPA: {rule} on {context}");
            }
            assert_eq!(
                decide(&auto),
                vm_says.unwrap_or(interp),
                "auto: {rule} on {context}"
            );
        }
    }
    assert_eq!(
        (opa_errors, interpreter_errors, not_undefined),
        (9, 11, 5),
        "(OPA errors, interpreter errors, `not`-over-undefined differences)"
    );
}

/// The two VM behaviours the check keeps policies away from, on regorus'
/// VM directly. If a regorus upgrade fixes one, this fails: relax the check
/// (`engine/vm_check.rs`) accordingly.
#[test]
fn the_vm_hazards_the_check_guards_against_still_exist() {
    use regorus::languages::rego::compiler::Compiler;
    use regorus::rvm::vm::RegoVM;
    let run = |rule: &str, input: &str| {
        let mut e = regorus::Engine::new();
        e.add_policy(
            "p.rego".into(),
            format!("package p\nimport rego.v1\ndefault allow := false\n{rule}\n"),
        )
        .unwrap();
        let c = e.compile_with_entrypoint(&"data.p.allow".into()).unwrap();
        let interpreter = c
            .eval_with_input(regorus::Value::from_json_str(input).unwrap())
            .ok();
        let mut vm = RegoVM::new();
        vm.load_program(Compiler::compile_from_policy(&c, &["data.p.allow"]).unwrap());
        vm.set_data(e.get_data()).unwrap();
        vm.set_input(regorus::Value::from_json_str(input).unwrap());
        (interpreter, vm.execute().ok())
    };
    let t = Some(regorus::Value::Bool(true));
    let f = Some(regorus::Value::Bool(false));
    // An undefined `:=` does not stop the body.
    assert_eq!(
        run(
            "allow if { g := input.grants[input.user]; not g.blocked }",
            r#"{"user": "x"}"#
        ),
        (f.clone(), t.clone())
    );
    // A failing builtin drops a deny rule's body instead of erring.
    assert_eq!(
        run(
            "deny contains \"bad\" if count(input.items) > 2\nallow if count(deny) == 0",
            r#"{"items": false}"#
        ),
        (None, t)
    );
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
            .health(&health),
    );
    let (tx, rx) = tokio::sync::watch::channel(0u32);
    let task = engine.spawn_reloader(rx);

    let as_subject = |s: &str| {
        let mut i = principal_input(s);
        i.request.method = "GET".into();
        i
    };
    assert!(engine.evaluate(&as_subject("alice")).await.unwrap().allow);
    assert!(!engine.evaluate(&as_subject("bob")).await.unwrap().allow);

    write(
        "package soma.authz\ndecision := {\"allow\": input.subject == \"bob\", \"reasons\": []}\n",
    );
    tx.send(1).unwrap();
    soma_testkit::wait_for(
        "a successful reload",
        std::time::Duration::from_secs(5),
        || metrics.reload_count(true) == 1,
    )
    .await;
    assert!(engine.evaluate(&as_subject("bob")).await.unwrap().allow);
    assert!(!engine.evaluate(&as_subject("alice")).await.unwrap().allow);

    // A broken policy: reload fails, the last good one stays in force.
    write("package soma.authz\ndecision := {\"allow\": \n");
    tx.send(2).unwrap();
    soma_testkit::wait_for("a failed reload", std::time::Duration::from_secs(5), || {
        metrics.reload_count(false) == 1
    })
    .await;
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
        RegoEvaluator::Auto
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

/// Inputs [`AuthzInput`] cannot express: each field of an allowed request
/// missing, or of another type. A caller other than this crate may send
/// them to an OPA sidecar; the policy must deny them under OPA exactly as
/// under regorus (where regorus errs, the engine fails closed: 503).
#[tokio::test]
async fn regorus_and_real_opa_agree_on_malformed_inputs() {
    let server = start_opa();
    let client = reqwest::Client::new();
    let (interpreter, vm) = reference_policy_on_both_evaluators();
    let odd = [
        json!(null),
        json!(5),
        json!(true),
        json!(""),
        json!("admin"),
        json!([]),
        json!(["admin"]),
        json!([1]),
        json!({"a": "admin"}),
    ];
    let bases = [
        (
            "conversation.send",
            json!(["user"]),
            json!(["conversation:write"]),
            json!({"resource_tenant": "t1"}),
        ),
        (
            "tool.execute",
            json!(["admin"]),
            json!(["tool:execute"]),
            json!({"tool_risk": "high"}),
        ),
        (
            "scheduler.update",
            json!(["admin"]),
            json!(["scheduler:write"]),
            json!({"owner": "bob"}),
        ),
    ];
    let mut problems = Vec::new();
    let mut n = 0;
    for (action, roles, scopes, context) in bases {
        let base = json!({
            "subject": "alice", "tenant": "t1", "roles": roles, "scopes": scopes,
            "action": action, "resource": {"kind": "k", "id": "r1"},
            "request": {"method": "POST", "route": "/v1/x", "request_id": "r"},
            "context": context,
        });
        let mut inputs = vec![base.clone()];
        let mut paths: Vec<Vec<String>> = base
            .as_object()
            .unwrap()
            .keys()
            .map(|k| vec![k.clone()])
            .collect();
        for k in ["resource_tenant", "tool_risk", "owner"] {
            paths.push(vec!["context".into(), k.into()]);
        }
        for path in &paths {
            for v in odd.iter().map(Some).chain([None]) {
                let mut input = base.clone();
                let (last, parents) = path.split_last().unwrap();
                let mut at = &mut input;
                for p in parents {
                    at = &mut at[p.as_str()];
                }
                match v {
                    Some(v) => at[last.as_str()] = v.clone(),
                    None => {
                        at.as_object_mut().unwrap().remove(last.as_str());
                    }
                }
                inputs.push(input);
            }
        }
        for input in inputs {
            n += 1;
            let theirs = server.eval(&client, "soma/authz/decision", &input).await;
            let theirs = theirs.get("result").cloned();
            let show = |r: Result<soma_policy::EngineDecision, EngineError>| match r {
                Ok(d) => json!({"allow": d.allow, "reasons": d.reasons}),
                Err(e) => json!({"error": e.to_string()}),
            };
            let interp = show(interpreter.evaluate_document(&input));
            let on_vm = show(vm.evaluate_document(&input));
            let opa = theirs.clone().unwrap_or(json!("undefined"));
            // regorus' interpreter errs on `some r in <not a collection>`
            // where OPA and the VM iterate nothing: a 503, never an allow.
            let interp_closed = interp.get("error").is_some() && opa["allow"] == json!(false);
            if (interp != opa && !interp_closed) || on_vm != opa {
                problems.push(format!(
                    "{input}\n  opa {opa}\n  interpreter {interp}\n  vm {on_vm}"
                ));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "{} of {n} disagree:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

#[tokio::test]
async fn the_decision_cache_forgets_on_policy_reload() {
    let dir = tempfile::tempdir().unwrap();
    let write = |src: &str| std::fs::write(dir.path().join("p.rego"), src).unwrap();
    write(
        "package soma.authz\ndecision := {\"allow\": input.subject == \"alice\", \"reasons\": []}\n",
    );
    let engine =
        Arc::new(EmbeddedRego::from_dir(dir.path(), ENTRY, PolicyMetrics::default()).unwrap());
    let metrics = PolicyMetrics::default();
    let authz = soma_policy::Authorizer::builder(engine.clone())
        .cache({
            let mut c = soma_policy::CacheConfig::default();
            c.enabled = true;
            c.ttl_ms = 60_000;
            c.capacity = 100;
            c
        })
        .metrics(metrics.clone())
        .build();
    let alice = principal_input("alice");
    assert!(authz.check(&alice).await.unwrap().allow);
    assert_eq!(authz.check(&alice).await.unwrap().engine, "cache");

    write(
        "package soma.authz\ndecision := {\"allow\": input.subject == \"bob\", \"reasons\": []}\n",
    );
    let before = engine.generation();
    engine.reload().unwrap();
    assert_ne!(engine.generation(), before);
    let d = authz.check(&alice).await.unwrap();
    assert!(
        !d.allow,
        "a decision of the old policy was served after the reload"
    );
    assert_eq!(d.engine, "embedded");
    assert_eq!(authz.check(&alice).await.unwrap().engine, "cache");
}

#[test]
fn the_decision_cache_is_on_by_default_for_one_second() {
    let c = soma_policy::CacheConfig::default();
    assert!(c.enabled);
    assert_eq!(c.ttl_ms, 1_000);
}

/// `.metrics(&registry)` and `.health(&health)` plug the embedded engine and
/// the authorizer into the process registries: the component `policy` is
/// listed, decisions and reloads are exported, and a `PolicyMetrics` built on
/// the same registry reads the same series.
#[tokio::test]
async fn the_embedded_engine_and_authorizer_plug_into_the_registries() {
    let registry = soma_observability::MetricsRegistry::default();
    let health = soma_observability::HealthRegistry::new();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("p.rego"),
        "package soma.authz\ndecision := {\"allow\": input.subject == \"alice\", \"reasons\": []}\n",
    )
    .unwrap();
    let engine = Arc::new(
        EmbeddedRego::from_dir(dir.path(), ENTRY, PolicyMetrics::default())
            .unwrap()
            .metrics(&registry)
            .health(&health),
    );
    assert_eq!(
        health.component("policy").unwrap().status,
        ComponentStatus::Up
    );
    engine.reload().unwrap();
    let authz = soma_policy::Authorizer::builder(engine)
        .metrics(&registry)
        .build();
    assert!(authz.check(&principal_input("alice")).await.unwrap().allow);

    let text = registry.encode();
    assert!(
        text.contains("soma_policy_reloads_total{") && text.contains("result=\"ok\""),
        "{text}"
    );
    let shared = PolicyMetrics::new(&registry);
    assert_eq!(shared.reload_count(true), 1);
    assert_eq!(shared.decisions_count("a", "allow"), 1);
}
