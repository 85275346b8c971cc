//! The syntax walk: finds paths, macro calls and macro arguments, resolves
//! them with [`crate::resolve`] and records what touches the environment.

use std::collections::{HashMap, HashSet};

use proc_macro2::{Delimiter, Spacing, TokenStream, TokenTree};
use syn::parse::Parser;
use syn::punctuated::Punctuated;
use syn::visit::{self, Visit};
use syn::{Expr, Pat, Token};

use crate::config::Config;
use crate::report::Rule;
use crate::resolve::{Res, ScopeId, Scopes, Want, name};
use crate::targets::classify;

/// Crates whose `dotenv!` macro reads `.env` at compile time.
const DOTENV_MACRO_CRATES: [&str; 4] = ["dotenv_codegen", "dotenvy_macro", "dotenv", "dotenvy"];

/// Macros whose arguments are quoted as tokens, never run.
const NOT_EVALUATED: [&str; 5] = [
    "stringify",
    "quote",
    "quote_spanned",
    "parse_quote",
    "parse_quote_spanned",
];

/// One raw hit inside a file, before it becomes a [`crate::Finding`].
#[derive(Debug, Clone)]
pub(crate) struct Hit {
    pub(crate) line: usize,
    /// 1-based, in characters.
    pub(crate) column: usize,
    pub(crate) rule: Rule,
    /// What the code touches, canonical (`std::env::var`, `env!("HOME")`).
    pub(crate) target: String,
    pub(crate) message: String,
}

/// Everything the walk of one file needs besides the syntax tree.
pub(crate) struct FileCtx<'a> {
    pub(crate) config: &'a Config,
    /// Dependency renames of the package: extern name -> real crate name.
    pub(crate) renames: &'a HashMap<String, String>,
    /// The hint appended to read/write findings.
    pub(crate) hint: &'a str,
}

#[derive(Default)]
struct Frame {
    /// Stops the lookup of local variables (an item body cannot see the
    /// locals of the function it is nested in).
    barrier: bool,
    names: HashSet<String>,
}

/// Walks one file.
pub(crate) struct Checker<'a> {
    scopes: &'a mut Scopes,
    ctx: &'a FileCtx<'a>,
    file: usize,
    scope: ScopeId,
    locals: Vec<Frame>,
    hits: Vec<Hit>,
}

impl<'a> Checker<'a> {
    pub(crate) fn new(scopes: &'a mut Scopes, ctx: &'a FileCtx<'a>, file: usize) -> Checker<'a> {
        let scope = scopes.file_scopes[&file];
        Checker {
            scopes,
            ctx,
            file,
            scope,
            locals: vec![Frame {
                barrier: true,
                names: HashSet::new(),
            }],
            hits: Vec::new(),
        }
    }

    pub(crate) fn run(mut self, ast: &syn::File) -> Vec<Hit> {
        self.visit_file(ast);
        let mut seen = HashSet::new();
        self.hits
            .retain(|h| seen.insert((h.line, h.column, h.rule)));
        self.hits.sort_by_key(|h| (h.line, h.column));
        self.hits
    }

    fn is_local(&self, name: &str) -> bool {
        for f in self.locals.iter().rev() {
            if f.names.contains(name) {
                return true;
            }
            if f.barrier {
                break;
            }
        }
        false
    }

    fn push_frame(&mut self, barrier: bool) {
        self.locals.push(Frame {
            barrier,
            names: HashSet::new(),
        });
    }

    fn bind_pat(&mut self, pat: &Pat) {
        let mut names = Vec::new();
        pat_names(pat, &mut names);
        if let Some(f) = self.locals.last_mut() {
            f.names.extend(names);
        }
    }

    /// Applies dependency renames to an external path.
    fn normalize(&self, mut p: Vec<String>) -> Vec<String> {
        if let Some(first) = p.first_mut() {
            if let Some(real) = self.ctx.renames.get(first.as_str()) {
                first.clone_from(real);
            }
        }
        p
    }

    fn check_path(&mut self, path: &syn::Path, span_start: proc_macro2::LineColumn, called: bool) {
        let segments: Vec<String> = path.segments.iter().map(|s| name(&s.ident)).collect();
        let leading = path.leading_colon.is_some();
        if !leading && segments.len() == 1 && self.is_local(&segments[0]) {
            return;
        }
        let Res::Extern(p) = self
            .scopes
            .resolve(self.scope, leading, &segments, Want::Value)
        else {
            return;
        };
        let p = self.normalize(p);
        let Some(rule) = classify(&p) else { return };
        let written = format!("{}{}", if leading { "::" } else { "" }, segments.join("::"));
        let target = p.join("::");
        let shown = if written.trim_start_matches("::") == target {
            format!("`{written}{}`", if called { "(..)" } else { "" })
        } else {
            format!(
                "`{written}{}` (`{target}`)",
                if called { "(..)" } else { "" }
            )
        };
        let what = if called {
            shown
        } else {
            format!("{shown}, passed as a function value,")
        };
        let message = match rule {
            Rule::EnvRead => format!(
                "{what} reads the process environment outside the lint-env allowlist; {}",
                self.ctx.hint
            ),
            Rule::EnvWrite => format!(
                "{what} changes the process environment (racy, and unsafe once threads run); \
                 pass the value explicitly instead, or {}",
                self.ctx.hint
            ),
            _ => format!(
                "{what} loads a .env file into the process environment; {}",
                self.ctx.hint
            ),
        };
        self.hits.push(Hit {
            line: span_start.line,
            column: span_start.column + 1,
            rule,
            target,
            message,
        });
    }

    fn check_macro_path(&mut self, mac: &syn::Macro) {
        let segments: Vec<String> = mac.path.segments.iter().map(|s| name(&s.ident)).collect();
        let leading = mac.path.leading_colon.is_some();
        let Res::Extern(p) = self
            .scopes
            .resolve(self.scope, leading, &segments, Want::Macro)
        else {
            return;
        };
        let p = self.normalize(p);
        let start = path_start(&mac.path);
        let is_builtin = |name: &str| match p.as_slice() {
            [n] => n == name,
            [k, n] => (k == "std" || k == "core") && n == name,
            _ => false,
        };
        let macro_name = if is_builtin("env") {
            "env"
        } else if is_builtin("option_env") {
            "option_env"
        } else {
            let is_dotenv = match p.as_slice() {
                [n] => n == "dotenv",
                [k, n] => DOTENV_MACRO_CRATES.contains(&k.as_str()) && n == "dotenv",
                _ => false,
            };
            if is_dotenv {
                let var = first_str_arg(&mac.tokens);
                let target = format!("dotenv!({})", var.as_deref().map(quote).unwrap_or_default());
                self.hits.push(Hit {
                    line: start.line,
                    column: start.column + 1,
                    rule: Rule::Dotenv,
                    message: format!(
                        "`{target}` bakes a value from a .env file into the binary at compile time; {}",
                        self.ctx.hint
                    ),
                    target,
                });
            }
            return;
        };
        let var = first_str_arg(&mac.tokens);
        if let Some(name) = &var {
            if self.ctx.config.allows_env_macro(name) {
                return;
            }
        }
        let shown = var
            .as_deref()
            .map(quote)
            .unwrap_or_else(|| "..".to_string());
        let target = format!("{macro_name}!({shown})");
        let allowed = self.ctx.config.env_macro_patterns().join(", ");
        let allowed = if allowed.is_empty() {
            "none".to_string()
        } else {
            allowed
        };
        self.hits.push(Hit {
            line: start.line,
            column: start.column + 1,
            rule: Rule::EnvMacro,
            message: format!(
                "`{target}` bakes a build-environment variable into the binary; only names \
                 matching allow-env-macro ({allowed}) are allowed; for runtime settings {}",
                self.ctx.hint
            ),
            target,
        });
    }

    /// Looks inside a macro's arguments: as comma separated expressions
    /// when they parse that way (format!, println!, assert!, vec!, write!,
    /// ...), else chunk by chunk, else token by token for fully written paths.
    fn scan_tokens(&mut self, tokens: TokenStream) {
        if tokens.is_empty() {
            return;
        }
        if let Ok(exprs) = Punctuated::<Expr, Token![,]>::parse_terminated.parse2(tokens.clone()) {
            for e in &exprs {
                self.visit_expr(e);
            }
            return;
        }
        for chunk in split_top_level(tokens) {
            if chunk.is_empty() {
                continue;
            }
            if let Ok(e) = syn::parse2::<Expr>(chunk.clone()) {
                self.visit_expr(&e);
                continue;
            }
            if let Ok(stmts) = syn::Block::parse_within.parse2(chunk.clone()) {
                let block = syn::Block {
                    brace_token: Default::default(),
                    stmts,
                };
                self.visit_block(&block);
                continue;
            }
            self.scan_raw(chunk);
        }
    }

    /// Token-level fallback for macro input that is not Rust syntax: finds
    /// written-out paths (`a::b::c`) and descends into groups.
    fn scan_raw(&mut self, tokens: TokenStream) {
        let toks: Vec<TokenTree> = tokens.into_iter().collect();
        let mut i = 0;
        while i < toks.len() {
            match &toks[i] {
                TokenTree::Group(g) => {
                    self.scan_tokens(g.stream());
                    i += 1;
                }
                TokenTree::Ident(_) | TokenTree::Punct(_) => {
                    let (path, next) = read_path(&toks, i);
                    match path {
                        Some(path) if path.segments.len() >= 2 || path.leading_colon.is_some() => {
                            let called = matches!(toks.get(next), Some(TokenTree::Group(g)) if g.delimiter() == Delimiter::Parenthesis);
                            let start = path_start(&path);
                            self.check_path(&path, start, called);
                            i = next.max(i + 1);
                        }
                        _ => i += 1,
                    }
                }
                TokenTree::Literal(_) => i += 1,
            }
        }
    }
}

fn quote(s: &str) -> String {
    format!("{s:?}")
}

fn path_start(path: &syn::Path) -> proc_macro2::LineColumn {
    match &path.leading_colon {
        Some(c) => c.spans[0].start(),
        None => path
            .segments
            .first()
            .map(|s| s.ident.span().start())
            .unwrap_or(proc_macro2::LineColumn { line: 0, column: 0 }),
    }
}

/// The first argument of `env!("NAME")`-like macros, when it is a string
/// literal.
fn first_str_arg(tokens: &TokenStream) -> Option<String> {
    let args = Punctuated::<Expr, Token![,]>::parse_terminated
        .parse2(tokens.clone())
        .ok()?;
    match args.first()? {
        Expr::Lit(syn::ExprLit {
            lit: syn::Lit::Str(s),
            ..
        }) => Some(s.value()),
        _ => None,
    }
}

/// Splits a token stream at top-level `,`, `;` and `=>`.
fn split_top_level(tokens: TokenStream) -> Vec<TokenStream> {
    let toks: Vec<TokenTree> = tokens.into_iter().collect();
    let mut out = Vec::new();
    let mut cur: Vec<TokenTree> = Vec::new();
    let mut i = 0;
    while i < toks.len() {
        if let TokenTree::Punct(p) = &toks[i] {
            let c = p.as_char();
            if c == ',' || c == ';' {
                out.push(cur.drain(..).collect());
                i += 1;
                continue;
            }
            if c == '=' && p.spacing() == Spacing::Joint {
                if let Some(TokenTree::Punct(q)) = toks.get(i + 1) {
                    if q.as_char() == '>' {
                        out.push(cur.drain(..).collect());
                        i += 2;
                        continue;
                    }
                }
            }
        }
        cur.push(toks[i].clone());
        i += 1;
    }
    out.push(cur.into_iter().collect());
    out
}

/// Reads `[::] ident (:: ident)*` starting at `i`; returns the path and the
/// index after it.
fn read_path(toks: &[TokenTree], mut i: usize) -> (Option<syn::Path>, usize) {
    let start = i;
    let is_colon2 = |j: usize| {
        matches!((toks.get(j), toks.get(j + 1)),
            (Some(TokenTree::Punct(a)), Some(TokenTree::Punct(b)))
                if a.as_char() == ':' && a.spacing() == Spacing::Joint && b.as_char() == ':')
    };
    let mut ts = TokenStream::new();
    if is_colon2(i) {
        ts.extend(toks[i..i + 2].iter().cloned());
        i += 2;
    }
    let mut any = false;
    while let Some(TokenTree::Ident(id)) = toks.get(i) {
        ts.extend(std::iter::once(TokenTree::Ident(id.clone())));
        any = true;
        i += 1;
        if is_colon2(i) && matches!(toks.get(i + 2), Some(TokenTree::Ident(_))) {
            ts.extend(toks[i..i + 2].iter().cloned());
            i += 2;
        } else {
            break;
        }
    }
    if !any {
        return (None, start + 1);
    }
    (syn::parse2::<syn::Path>(ts).ok(), i)
}

/// Names bound by a pattern.
fn pat_names(pat: &Pat, out: &mut Vec<String>) {
    match pat {
        Pat::Ident(p) => {
            out.push(name(&p.ident));
            if let Some((_, sub)) = &p.subpat {
                pat_names(sub, out);
            }
        }
        Pat::Or(p) => p.cases.iter().for_each(|c| pat_names(c, out)),
        Pat::Paren(p) => pat_names(&p.pat, out),
        Pat::Reference(p) => pat_names(&p.pat, out),
        Pat::Slice(p) => p.elems.iter().for_each(|c| pat_names(c, out)),
        Pat::Struct(p) => p.fields.iter().for_each(|f| pat_names(&f.pat, out)),
        Pat::Tuple(p) => p.elems.iter().for_each(|c| pat_names(c, out)),
        Pat::TupleStruct(p) => p.elems.iter().for_each(|c| pat_names(c, out)),
        Pat::Type(p) => pat_names(&p.pat, out),
        _ => {}
    }
}

/// Patterns bound by `let` conditions (`if let`, `while let`, let chains).
fn cond_pats(e: &Expr, out: &mut Vec<String>) {
    match e {
        Expr::Let(l) => pat_names(&l.pat, out),
        Expr::Binary(b) if matches!(b.op, syn::BinOp::And(_)) => {
            cond_pats(&b.left, out);
            cond_pats(&b.right, out);
        }
        Expr::Paren(p) => cond_pats(&p.expr, out),
        _ => {}
    }
}

impl<'ast> Visit<'ast> for Checker<'_> {
    fn visit_item(&mut self, i: &'ast syn::Item) {
        // Items never see the local variables around them.
        self.push_frame(true);
        visit::visit_item(self, i);
        self.locals.pop();
    }

    fn visit_item_mod(&mut self, m: &'ast syn::ItemMod) {
        for a in &m.attrs {
            self.visit_attribute(a);
        }
        let Some((_, items)) = &m.content else {
            // `mod x;` — the file is walked on its own.
            return;
        };
        let inner = self.scopes.inline_module(self.scope, self.file, m);
        let saved = std::mem::replace(&mut self.scope, inner);
        for i in items {
            self.visit_item(i);
        }
        self.scope = saved;
    }

    fn visit_item_use(&mut self, _: &'ast syn::ItemUse) {
        // An import alone touches nothing; its uses are checked.
    }

    fn visit_item_macro(&mut self, m: &'ast syn::ItemMacro) {
        for a in &m.attrs {
            self.visit_attribute(a);
        }
        if m.ident.is_some() {
            // A `macro_rules!` definition: its rules are templates, not
            // expressions. Look at them token by token.
            self.scan_raw(m.mac.tokens.clone());
        } else {
            self.visit_macro(&m.mac);
        }
    }

    fn visit_macro(&mut self, mac: &'ast syn::Macro) {
        self.check_macro_path(mac);
        // Macros whose input is quoted, never evaluated.
        let quoted = mac
            .path
            .segments
            .last()
            .is_some_and(|s| NOT_EVALUATED.contains(&name(&s.ident).as_str()));
        if !quoted {
            self.scan_tokens(mac.tokens.clone());
        }
    }

    fn visit_signature(&mut self, sig: &'ast syn::Signature) {
        for input in &sig.inputs {
            if let syn::FnArg::Typed(t) = input {
                self.bind_pat(&t.pat);
            }
        }
        visit::visit_signature(self, sig);
    }

    fn visit_impl_item_fn(&mut self, f: &'ast syn::ImplItemFn) {
        self.push_frame(true);
        visit::visit_impl_item_fn(self, f);
        self.locals.pop();
    }

    fn visit_trait_item_fn(&mut self, f: &'ast syn::TraitItemFn) {
        self.push_frame(true);
        visit::visit_trait_item_fn(self, f);
        self.locals.pop();
    }

    fn visit_block(&mut self, b: &'ast syn::Block) {
        let block = self.scopes.new_block(self.scope, self.file, &b.stmts);
        let saved = std::mem::replace(&mut self.scope, block);
        self.push_frame(false);
        for s in &b.stmts {
            self.visit_stmt(s);
        }
        self.locals.pop();
        self.scope = saved;
    }

    fn visit_local(&mut self, l: &'ast syn::Local) {
        for a in &l.attrs {
            self.visit_attribute(a);
        }
        if let Some(init) = &l.init {
            self.visit_expr(&init.expr);
            if let Some((_, diverge)) = &init.diverge {
                self.visit_expr(diverge);
            }
        }
        self.bind_pat(&l.pat);
    }

    fn visit_expr_closure(&mut self, c: &'ast syn::ExprClosure) {
        self.push_frame(false);
        for p in &c.inputs {
            self.bind_pat(p);
        }
        self.visit_expr(&c.body);
        self.locals.pop();
    }

    fn visit_arm(&mut self, arm: &'ast syn::Arm) {
        self.push_frame(false);
        self.bind_pat(&arm.pat);
        if let Some((_, guard)) = &arm.guard {
            self.visit_expr(guard);
        }
        self.visit_expr(&arm.body);
        self.locals.pop();
    }

    fn visit_expr_for_loop(&mut self, f: &'ast syn::ExprForLoop) {
        self.visit_expr(&f.expr);
        self.push_frame(false);
        self.bind_pat(&f.pat);
        self.visit_block(&f.body);
        self.locals.pop();
    }

    fn visit_expr_let(&mut self, l: &'ast syn::ExprLet) {
        // The pattern binds; only the scrutinee is evaluated here.
        self.visit_expr(&l.expr);
    }

    fn visit_expr_if(&mut self, e: &'ast syn::ExprIf) {
        self.visit_expr(&e.cond);
        let mut names = Vec::new();
        cond_pats(&e.cond, &mut names);
        self.push_frame(false);
        if let Some(f) = self.locals.last_mut() {
            f.names.extend(names);
        }
        self.visit_block(&e.then_branch);
        self.locals.pop();
        if let Some((_, els)) = &e.else_branch {
            self.visit_expr(els);
        }
    }

    fn visit_expr_while(&mut self, e: &'ast syn::ExprWhile) {
        self.visit_expr(&e.cond);
        let mut names = Vec::new();
        cond_pats(&e.cond, &mut names);
        self.push_frame(false);
        if let Some(f) = self.locals.last_mut() {
            f.names.extend(names);
        }
        self.visit_block(&e.body);
        self.locals.pop();
    }

    fn visit_expr_call(&mut self, c: &'ast syn::ExprCall) {
        for a in &c.attrs {
            self.visit_attribute(a);
        }
        match &*c.func {
            Expr::Path(p) if p.qself.is_none() => {
                self.check_path(&p.path, path_start(&p.path), true);
                // Generic arguments may hold expressions (const generics).
                for s in &p.path.segments {
                    self.visit_path_arguments(&s.arguments);
                }
            }
            other => self.visit_expr(other),
        }
        for arg in &c.args {
            self.visit_expr(arg);
        }
    }

    fn visit_expr_path(&mut self, p: &'ast syn::ExprPath) {
        if p.qself.is_none() {
            self.check_path(&p.path, path_start(&p.path), false);
        }
        visit::visit_expr_path(self, p);
    }
}
