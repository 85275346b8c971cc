//! A static check that keeps regorus' Rego VM off policies it is known to
//! evaluate differently from OPA in ways that can allow.
//!
//! Two hazards, both found comparing the VM with real OPA and the
//! interpreter (see the `vm_interpreter_and_real_opa_on_undefined_operands`
//! test):
//!
//! 1. In regorus 0.14 the VM does not stop a body when the right side of a
//!    `:=` assignment is undefined (`g := grants[input.user]` for an
//!    unknown user): the body goes on with an undefined `g`, so
//!    `not g.blocked` succeeds and `allow if { g := …; not g.blocked }`
//!    allows. OPA and the interpreter stop the body there.
//! 2. Where a builtin fails (`count(false)`, `startswith(5, "x")`, `1 / 0`,
//!    `"a" + 1`), OPA and the interpreter report an error (no decision:
//!    503); the VM drops the rule body instead, so a deny rule
//!    (`deny contains "bad" if count(input.items) > 2`) adds nothing and the
//!    request is allowed.
//!
//! The check walks every module of a compiled policy (rule heads and bodies,
//! `else` and function bodies, comprehensions, `every` bodies) and reports
//! each `:=` inside a query, each arithmetic expression and each call of a
//! builtin, except the builtins that cannot fail (the `is_*` type tests and
//! `type_name`) and `count` / `sort` applied directly to a partial set rule
//! of the policy (`count(reasons)`, unless a `some` or `every` anywhere
//! binds a local variable of that name), whose value is always a set. Calls of
//! the policy's own functions pass (their bodies are checked). Unification
//! (`=`), references, comparisons, `not`, `some … in`, `every` and
//! comprehensions evaluate as in OPA and pass. A construct this walker does
//! not know (a variant added by a regorus feature it was not written for)
//! is reported too: unknown means unsafe.

use regorus::CompiledPolicy;
use regorus::unstable::{AssignOp, Expr, Ref, Rule, RuleHead, Span};

use super::rego_walk::{self, Hazard, Visitor};

const ASSIGNMENT: &str = "`:=` assignment in a body (the Rego VM does not stop the body when \
                          its right side is undefined)";
const UNKNOWN: &str = "construct not covered by the Rego VM safety check";
const BUILTIN: &str = "call of a builtin that can fail (the Rego VM drops a body whose builtin \
                       fails, where OPA reports an error)";
const ARITHMETIC: &str = "arithmetic (the Rego VM drops a body whose arithmetic fails, where \
                          OPA reports an error)";

/// Builtins that return a value for every argument.
const TOTAL_BUILTINS: [&str; 8] = [
    "is_string",
    "is_number",
    "is_boolean",
    "is_array",
    "is_set",
    "is_object",
    "is_null",
    "type_name",
];

/// Builtins that cannot fail on a set.
const SET_BUILTINS: [&str; 2] = ["count", "sort"];

/// Every hazard in `policy`, in source order per module.
pub(crate) fn hazards(policy: &CompiledPolicy) -> Vec<Hazard> {
    let mut w = Walker::default();
    for module in policy.get_modules() {
        // The module's own functions and partial set rules, by name as
        // written in their heads. (One defined in another file of the same
        // package is not recognised: its calls are reported, which only
        // keeps the policy on the interpreter.)
        w.functions.clear();
        w.sets.clear();
        for rule in &module.policy {
            if let Rule::Spec { head, .. } = rule.as_ref() {
                match head {
                    RuleHead::Func { refr, .. } => {
                        w.functions.push(refr.span().text().to_owned());
                    }
                    RuleHead::Set { refr, .. } => {
                        w.sets.push(refr.span().text().to_owned());
                    }
                    RuleHead::Compr { .. } => {}
                }
            }
        }
        for rule in &module.policy {
            rego_walk::rule(&mut w, rule);
        }
    }
    // `count(reasons)` is only safe if `reasons` is the set rule, not a
    // local variable of that name (`every reasons in …` may shadow it).
    for (name, span) in std::mem::take(&mut w.set_calls) {
        if w.locals.contains(&name) {
            w.report(&span, BUILTIN);
        }
    }
    w.found
}

#[derive(Default)]
struct Walker {
    found: Vec<Hazard>,
    functions: Vec<String>,
    sets: Vec<String>,
    /// `count`/`sort` calls exempted because their argument names a set
    /// rule, with the call's location.
    set_calls: Vec<(String, Span)>,
    /// Names bound as local variables anywhere (`some`, `every`).
    locals: Vec<String>,
}

impl Walker {
    fn report(&mut self, span: &Span, what: &'static str) {
        self.found.push(Hazard::at(span, what));
    }

    /// Reports a call of a builtin that can fail.
    fn call(&mut self, fcn: &Ref<Expr>, params: &[Ref<Expr>]) {
        let name = fcn.span().text();
        // The policy's own function, by its name or through `data.`.
        if self.functions.iter().any(|f| f == name) || name.starts_with("data.") {
            return;
        }
        if TOTAL_BUILTINS.contains(&name) {
            return;
        }
        if let [arg] = params {
            let arg_name = arg.span().text();
            if SET_BUILTINS.contains(&name)
                && matches!(arg.as_ref(), Expr::Var { .. })
                && self.sets.iter().any(|s| s == arg_name)
            {
                self.set_calls
                    .push((arg_name.to_owned(), fcn.span().clone()));
                return;
            }
        }
        self.report(fcn.span(), BUILTIN);
    }
}

impl Visitor for Walker {
    fn expr(&mut self, e: &Ref<Expr>) {
        match e.as_ref() {
            Expr::Call { fcn, params, .. } => self.call(fcn, params),
            Expr::ArithExpr { span, .. } => self.report(span, ARITHMETIC),
            // `:=` can only be a query statement; flag it wherever it is.
            Expr::AssignExpr { op, lhs, .. } if *op == AssignOp::ColEq => {
                self.report(lhs.span(), ASSIGNMENT);
            }
            _ => {}
        }
    }

    fn local(&mut self, name: &str) {
        self.locals.push(name.to_owned());
    }

    fn unknown(&mut self, e: &Ref<Expr>) {
        self.report(e.span(), UNKNOWN);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(src: &str) -> Vec<Hazard> {
        let mut e = regorus::Engine::new();
        e.add_policy("p.rego".into(), src.into()).unwrap();
        let c = e.compile_with_entrypoint(&"data.p.allow".into()).unwrap();
        hazards(&c)
    }

    #[test]
    fn body_assignments_are_found_wherever_they_are() {
        let cases = [
            ("allow if { g := input.g; not g.blocked }", "p.rego:3:12"),
            ("allow if g := input.g", "p.rego:3:10"),
            (
                "allow := false if { x := 1; x == 2 } else := true",
                "p.rego:3:21",
            ),
            (
                "f(a) := b if { b := a.c }\nallow if f(input)",
                "p.rego:3:16",
            ),
            ("allow if { [y | y := input.a[_]] == [1] }", "p.rego:3:17"),
            (
                "s := {k: v | some k; v := input.o[k]}\nallow if s",
                "p.rego:3:22",
            ),
            (
                "allow if { every x in input.xs { y := x.v; y > 1 } }",
                "p.rego:3:34",
            ),
            ("allow := [y | y := input.a[_]][0]", "p.rego:3:15"),
        ];
        for (rule, at) in cases {
            let src = format!("package p\nimport rego.v1\n{rule}\n");
            let h = check(&src);
            assert_eq!(h.len(), 1, "{rule}: {h:?}");
            assert_eq!(h[0].at, at, "{rule}");
            assert!(h[0].what.contains(":="), "{rule}");
        }
    }

    #[test]
    fn head_values_unification_and_other_constructs_pass() {
        let src = r#"package p
import rego.v1
t := {"a": {"roles": {"x"}}}
default allow := false
r := data.grants[input.user]
f(x) := y if y = x
deny contains "d" if input.size > 100
allow := true if {
	x = input.x
	not r.blocked
	some a in input.as
	a in {"b"}
	every v in input.vs { v > 1 }
	[z | some z in input.zs; z = 1]
	t[input.k].roles
	f(1) == 1
	data.p.f(2) == 2
	is_string(input.s)
	count(deny) == 0
	sort(deny) == []
} else := false
"#;
        assert_eq!(check(src), []);
    }

    #[test]
    fn builtins_that_can_fail_and_arithmetic_are_found() {
        let cases = [
            ("allow if count(input.items) > 2", "p.rego:3:10", "builtin"),
            (
                "allow if { startswith(input.name, \"x\") }",
                "p.rego:3:12",
                "builtin",
            ),
            (
                "allow if { object.get(input, \"a\", 1) == 1 }",
                "p.rego:3:18",
                "builtin",
            ),
            ("allow if { input.a + 1 > 2 }", "p.rego:3:20", "arithmetic"),
            // Inside a unary minus.
            (
                "allow if { -count(input.items) < 0 }",
                "p.rego:3:13",
                "builtin",
            ),
            // `deny` here is the local of `every`, not the set rule.
            (
                "deny contains \"d\" if input.x\nallow if { every deny in input.ds { count(deny) == 0 } }",
                "p.rego:4:37",
                "builtin",
            ),
            (
                "allow if { x = input.a / input.b; x > 0 }",
                "p.rego:3:24",
                "arithmetic",
            ),
            // count of something that is not one of the policy's set rules.
            ("s := {1}\nallow if count(s) == 1", "p.rego:4:10", "builtin"),
            (
                "allow if count([x | some x in input.xs]) > 0",
                "p.rego:3:10",
                "builtin",
            ),
        ];
        for (rule, at, what) in cases {
            let src = format!("package p\nimport rego.v1\n{rule}\n");
            let h = check(&src);
            assert_eq!(h.len(), 1, "{rule}: {h:?}");
            assert_eq!(h[0].at, at, "{rule}");
            assert!(h[0].what.contains(what), "{rule}: {}", h[0].what);
        }
    }

    #[test]
    fn set_rules_and_functions_of_another_module_do_not_exempt_calls() {
        let mut e = regorus::Engine::new();
        e.add_policy(
            "a.rego".into(),
            "package a\nimport rego.v1\nnames contains 1 if true\nstartswith(x, y) := true\n"
                .into(),
        )
        .unwrap();
        e.add_policy(
            "b.rego".into(),
            "package b\nimport rego.v1\nnames := input.n\n\
             allow if { count(names) == 0; startswith(input.s, \"x\") }\n"
                .into(),
        )
        .unwrap();
        let c = e.compile_with_entrypoint(&"data.b.allow".into()).unwrap();
        let at: Vec<String> = hazards(&c).into_iter().map(|h| h.at).collect();
        assert_eq!(at, ["b.rego:4:12", "b.rego:4:31"]);
    }

    #[test]
    fn the_reference_policy_is_eligible() {
        assert_eq!(hazards(&rego_walk::reference_policy()), []);
    }
}
