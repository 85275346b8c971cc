//! A static check for negations that real OPA and regorus decide
//! differently when an operand is missing.
//!
//! OPA evaluates the operands of a call, of a membership test and the
//! index of a reference before it applies `not`: with `input.action`
//! missing, `not actions[input.action]`, `not is_string(input.action)` and
//! `not "admin" in input.roles` make the body fail. regorus, with both
//! evaluators, negates the undefined expression, so the body holds. In a
//! deny rule (`reasons contains "unknown_action" if not
//! actions[input.action]`) OPA then adds no reason and allows. A bare
//! reference (`not input.x`), a rule (`not known_action`) and a comparison
//! of references (`not input.x == 1`) are negated alike by both.
//!
//! The evidence is the `vm_interpreter_and_real_opa_on_undefined_operands`
//! test, which asserts that this check flags exactly the constructs found
//! to differ against OPA's own evaluator. Findings are warnings: the
//! policy still loads (both engines are right by their own rules), but a
//! policy that is to mean the same on an OPA sidecar must negate rules
//! instead (`known_action if actions[input.action]`, then `not
//! known_action`), as the reference policy does. The check is syntactic:
//! it does not know that an earlier expression of the body requires the
//! operand (`actions[input.action]; not f(actions[input.action])`), and
//! flags that too.

use regorus::CompiledPolicy;
use regorus::unstable::{Expr, Ref, Rule, RuleHead, Span};

use super::rego_walk::{self, Hazard, Visitor};

const CALL: &str = "`not` over a call or membership test with an operand that may be undefined \
                    (OPA fails the body where regorus negates; negate a rule instead)";
const INDEX: &str = "`not` over a reference whose index may be undefined (OPA fails the body \
                     where regorus negates; negate a rule instead)";

/// Every negation in `policy` that OPA decides differently when an operand
/// is undefined, in source order per module.
pub(crate) fn divergent_negations(policy: &CompiledPolicy) -> Vec<Hazard> {
    let mut w = Walker::default();
    for module in policy.get_modules() {
        // Names that may be undefined when referenced: the documents and
        // this module's rules (its functions are calls, checked by their
        // arguments). A rule defined in another file of the same package
        // is not known here, so a negation indexed by it is not flagged.
        w.documents = vec!["input".to_owned(), "data".to_owned()];
        for rule in &module.policy {
            let refr = match rule.as_ref() {
                Rule::Spec {
                    head: RuleHead::Compr { refr, .. } | RuleHead::Set { refr, .. },
                    ..
                }
                | Rule::Default { refr, .. } => refr,
                Rule::Spec { .. } => continue,
            };
            let text = refr.span().text();
            let base = text.split(['.', '[']).next().unwrap_or(text);
            w.documents.push(base.to_owned());
        }
        for rule in &module.policy {
            rego_walk::rule(&mut w, rule);
        }
    }
    w.found
}

#[derive(Default)]
struct Walker {
    found: Vec<Hazard>,
    documents: Vec<String>,
}

impl Walker {
    fn report(&mut self, span: &Span, what: &'static str) {
        self.found.push(Hazard::at(span, what));
    }

    /// The expression under a `not`: what makes OPA evaluate an operand
    /// that may be undefined before the negation, if anything does.
    fn negated(&self, e: &Ref<Expr>) -> Option<&'static str> {
        match e.as_ref() {
            Expr::Call { params, .. } => params
                .iter()
                .any(|p| self.may_be_undefined(p))
                .then_some(CALL),
            Expr::Membership {
                key,
                value,
                collection,
                ..
            } => key
                .iter()
                .chain([value, collection])
                .any(|p| self.may_be_undefined(p))
                .then_some(CALL),
            Expr::RefBrack { refr, index, .. } => {
                if self.may_be_undefined(index) {
                    Some(INDEX)
                } else {
                    self.negated(refr)
                }
            }
            Expr::RefDot { refr, .. } => self.negated(refr),
            Expr::UnaryExpr { expr, .. } => self.negated(expr),
            Expr::ArithExpr { lhs, rhs, .. }
            | Expr::BinExpr { lhs, rhs, .. }
            | Expr::BoolExpr { lhs, rhs, .. } => self.negated(lhs).or_else(|| self.negated(rhs)),
            _ => None,
        }
    }

    /// Whether `e` may be undefined: it reads a document (`input`, `data`,
    /// a rule) or a field of anything. Literals, comprehensions and local
    /// variables are defined.
    fn may_be_undefined(&self, e: &Ref<Expr>) -> bool {
        match e.as_ref() {
            Expr::String { .. }
            | Expr::RawString { .. }
            | Expr::Number { .. }
            | Expr::Bool { .. }
            | Expr::Null { .. }
            | Expr::ArrayCompr { .. }
            | Expr::SetCompr { .. }
            | Expr::ObjectCompr { .. } => false,
            Expr::Var { span, .. } => self.documents.iter().any(|d| d == span.text()),
            Expr::Array { items, .. } | Expr::Set { items, .. } => {
                items.iter().any(|i| self.may_be_undefined(i))
            }
            Expr::Object { fields, .. } => fields
                .iter()
                .any(|(_, k, v)| self.may_be_undefined(k) || self.may_be_undefined(v)),
            Expr::Call { params, .. } => params.iter().any(|p| self.may_be_undefined(p)),
            Expr::UnaryExpr { expr, .. } => self.may_be_undefined(expr),
            Expr::ArithExpr { lhs, rhs, .. }
            | Expr::BinExpr { lhs, rhs, .. }
            | Expr::BoolExpr { lhs, rhs, .. } => {
                self.may_be_undefined(lhs) || self.may_be_undefined(rhs)
            }
            // References, memberships, and anything this walker does not
            // know.
            _ => true,
        }
    }
}

impl Visitor for Walker {
    fn negation(&mut self, span: &Span, e: &Ref<Expr>) {
        if let Some(what) = self.negated(e) {
            self.report(span, what);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(src: &str) -> Vec<String> {
        let mut e = regorus::Engine::new();
        e.add_policy("p.rego".into(), src.into()).unwrap();
        let c = e.compile_with_entrypoint(&"data.p.allow".into()).unwrap();
        divergent_negations(&c).into_iter().map(|h| h.at).collect()
    }

    #[test]
    fn negated_calls_memberships_and_dynamic_indexes_are_found() {
        let cases = [
            ("allow if not actions[input.action]", "p.rego:4:10"),
            ("allow if not is_string(input.subject)", "p.rego:4:10"),
            ("allow if not \"admin\" in input.roles", "p.rego:4:10"),
            ("allow if { not count(input.xs) == 0 }", "p.rego:4:12"),
            ("allow if { not -count(input.xs) < 0 }", "p.rego:4:12"),
            (
                "allow if { not is_string({\"k\": input.x}) }",
                "p.rego:4:12",
            ),
            ("allow if { not is_number(1 + input.x) }", "p.rego:4:12"),
            ("allow if { not actions[input.a].roles }", "p.rego:4:12"),
            ("allow if { not actions[known].roles }", "p.rego:4:12"),
            ("allow if { [1 | not input.x in {1}] == [] }", "p.rego:4:17"),
            (
                "allow if { every x in [1] { not x in input.xs } }",
                "p.rego:4:29",
            ),
        ];
        for (rule, at) in cases {
            let src = format!(
                "package p\nimport rego.v1\nactions := {{\"a\": {{\"roles\": 1}}}}\n{rule}\n\
                 known if input.k\n"
            );
            assert_eq!(check(&src), [at], "{rule}");
        }
    }

    #[test]
    fn negated_rules_references_and_comparisons_pass() {
        let src = r#"package p
import rego.v1
actions := {"a": 1}
known if actions[input.action]
f(x) := x
allow if {
	not known
	not input.missing
	not input.a.b
	not input.x == 1
	not actions.a
	some r in input.rs
	not r in {"x"}
	not actions[r]
	not f(1)
	not is_string(r)
	not is_string({"k": [1, -2, 3 + 4, lower("A")]})
	not is_number(-count([r]) * 2)
}
"#;
        assert_eq!(check(src), Vec::<String>::new());
    }

    #[test]
    fn the_reference_policy_has_none() {
        assert_eq!(divergent_negations(&rego_walk::reference_policy()), []);
    }
}
