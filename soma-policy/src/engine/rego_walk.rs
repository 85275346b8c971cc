//! One walk over a compiled policy's syntax, shared by the static checks
//! (`vm_check`, `negation_check`): every rule head and body, `else` and
//! function bodies, comprehensions, `every` bodies and `with` modifiers.
//! A check sees what it needs through [`Visitor`]'s hooks.

use regorus::unstable::{Expr, Literal, Query, Ref, Rule, RuleAssign, RuleHead, Span};

/// A check's finding: where, and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Hazard {
    /// `file:line:col`.
    pub at: String,
    /// What was found.
    pub what: &'static str,
}

impl Hazard {
    /// A finding at `span`.
    pub(crate) fn at(span: &Span, what: &'static str) -> Self {
        Self {
            at: format!("{}:{}:{}", span.source.file(), span.line, span.col),
            what,
        }
    }
}

impl std::fmt::Display for Hazard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.at, self.what)
    }
}

/// What a check is shown during the walk; each hook's default does nothing.
pub(crate) trait Visitor {
    /// Each expression, before its parts are walked.
    fn expr(&mut self, _e: &Ref<Expr>) {}
    /// Each `not` statement: the statement's span and the negated expression.
    fn negation(&mut self, _span: &Span, _e: &Ref<Expr>) {}
    /// Each variable bound by `some` or `every`.
    fn local(&mut self, _name: &str) {}
    /// An expression of a kind this walk does not know (a variant added by
    /// a regorus feature it was not written for); its parts are not walked.
    fn unknown(&mut self, _e: &Ref<Expr>) {}
}

/// Walks `rule` with `v`.
pub(crate) fn rule<V: Visitor>(v: &mut V, rule: &Rule) {
    match rule {
        Rule::Spec { head, bodies, .. } => {
            match head {
                RuleHead::Compr { refr, assign, .. } => {
                    expr(v, refr);
                    self::assign(v, assign.as_ref());
                }
                RuleHead::Set { refr, key, .. } => {
                    expr(v, refr);
                    if let Some(k) = key {
                        expr(v, k);
                    }
                }
                RuleHead::Func {
                    refr, args, assign, ..
                } => {
                    expr(v, refr);
                    for a in args {
                        expr(v, a);
                    }
                    self::assign(v, assign.as_ref());
                }
            }
            for body in bodies {
                self::assign(v, body.assign.as_ref());
                query(v, &body.query);
            }
        }
        Rule::Default {
            refr, args, value, ..
        } => {
            expr(v, refr);
            for a in args {
                expr(v, a);
            }
            expr(v, value);
        }
    }
}

/// A rule head's `:= value` (or an `else := value`).
fn assign<V: Visitor>(v: &mut V, assign: Option<&RuleAssign>) {
    if let Some(a) = assign {
        expr(v, &a.value);
    }
}

fn query<V: Visitor>(v: &mut V, q: &Query) {
    for stmt in &q.stmts {
        for m in &stmt.with_mods {
            expr(v, &m.refr);
            expr(v, &m.r#as);
        }
        match &stmt.literal {
            Literal::SomeVars { vars, .. } => {
                for var in vars {
                    v.local(var.text());
                }
            }
            Literal::SomeIn {
                key,
                value,
                collection,
                ..
            } => {
                for bound in key.iter().chain([value]) {
                    v.local(bound.span().text());
                }
                membership(v, key.as_ref(), value, collection);
            }
            Literal::Expr { expr: e, .. } => expr(v, e),
            Literal::NotExpr { span, expr: e } => {
                v.negation(span, e);
                expr(v, e);
            }
            Literal::Every {
                key,
                value,
                domain,
                query: body,
                ..
            } => {
                for bound in key.iter().chain([value]) {
                    v.local(bound.text());
                }
                expr(v, domain);
                query(v, body);
            }
        }
    }
}

/// `[key,] value in collection`, as an expression or a `some` statement.
fn membership<V: Visitor>(
    v: &mut V,
    key: Option<&Ref<Expr>>,
    value: &Ref<Expr>,
    collection: &Ref<Expr>,
) {
    for e in key.into_iter().chain([value, collection]) {
        expr(v, e);
    }
}

fn expr<V: Visitor>(v: &mut V, e: &Ref<Expr>) {
    v.expr(e);
    #[allow(unreachable_patterns)]
    match e.as_ref() {
        Expr::String { .. }
        | Expr::RawString { .. }
        | Expr::Number { .. }
        | Expr::Bool { .. }
        | Expr::Null { .. }
        | Expr::Var { .. } => {}
        Expr::Array { items, .. } | Expr::Set { items, .. } => {
            for i in items {
                expr(v, i);
            }
        }
        Expr::Object { fields, .. } => {
            for (_, k, val) in fields {
                expr(v, k);
                expr(v, val);
            }
        }
        Expr::ArrayCompr { term, query: q, .. } | Expr::SetCompr { term, query: q, .. } => {
            expr(v, term);
            query(v, q);
        }
        Expr::ObjectCompr {
            key,
            value,
            query: q,
            ..
        } => {
            expr(v, key);
            expr(v, value);
            query(v, q);
        }
        Expr::Call { fcn, params, .. } => {
            expr(v, fcn);
            for p in params {
                expr(v, p);
            }
        }
        Expr::UnaryExpr { expr: inner, .. } => expr(v, inner),
        Expr::RefDot { refr, .. } => expr(v, refr),
        Expr::RefBrack { refr, index, .. } => {
            expr(v, refr);
            expr(v, index);
        }
        Expr::ArithExpr { lhs, rhs, .. }
        | Expr::BinExpr { lhs, rhs, .. }
        | Expr::BoolExpr { lhs, rhs, .. }
        | Expr::AssignExpr { lhs, rhs, .. } => {
            expr(v, lhs);
            expr(v, rhs);
        }
        Expr::Membership {
            key,
            value,
            collection,
            ..
        } => membership(v, key.as_ref(), value, collection),
        _ => v.unknown(e),
    }
}

/// The shipped reference policy, compiled for its entry point.
#[cfg(test)]
pub(crate) fn reference_policy() -> regorus::CompiledPolicy {
    let mut e = regorus::Engine::new();
    e.add_policy(
        "soma.rego".into(),
        include_str!("../../policy/soma.rego").into(),
    )
    .unwrap();
    e.compile_with_entrypoint(&"data.soma.authz.decision".into())
        .unwrap()
}
