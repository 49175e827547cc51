//! The rules of the DSL: hook signatures, and the Rust subset a hook body may use (so that the
//! lowering can always produce CUDA with Rust's meaning). Every rule reports, with its span, what is
//! allowed instead. The hooks that pass are then typed by `ir::build` (types inferred as rustc
//! does), which is what `lower` prints.
//!
//! One mistake gives one error. As rustc does with its error type, a name whose binding was refused
//! (a destructuring `let`, an argument with a wrong type, a local whose value was refused, a name
//! already reported unknown) is bound as [`Binding::Error`], and nothing that depends on what the
//! name is (unknown name, field access, assignment, call, indexing) is reported for it again.

use syn::ext::IdentExt;
use syn::spanned::Spanned;
use syn::{BinOp, Block, Expr, FnArg, Lit, Pat, ReturnType, Stmt, Type, UnOp};

use crate::errors::Errors;
use crate::ir;
use crate::parse::{Hook, VariantDef};
use crate::vocab::{self, SigTy};

/// Check every hook of the variant, and the rules that span hooks; returns the typed IR of the
/// hooks (empty when any was refused: nothing is lowered then).
pub fn variant(def: &VariantDef<'_>, errors: &mut Errors) -> ir::Typed {
    let mut ok = Vec::new();
    for hook in &def.hooks {
        let before = errors.count();
        let args = signature(hook, errors);
        Body::new(args, errors).block(&hook.func.block, Place::Tail);
        ok.push(errors.count() == before);
    }
    // Types are inferred over the hooks that passed (a parameter's type is shared by all), so a
    // refused hook does not hide a type error in another.
    let funcs = ir::build(def, &ok, errors);
    if let (Some(lit), Some(sink)) = (def.softmax, def.hook("sink"))
        && !lit.value
    {
        errors.at(
            &sink.func.sig.ident,
            "a sink needs softmax: it adds exp(sink) to the softmax denominator; remove `sink` or `const SOFTMAX: bool = false;`",
        );
    }
    funcs
}

/// Whether `ty` is the DSL type `name` in an accepted spelling; a known name behind a path the DSL
/// does not accept is reported here (so the caller reports nothing more).
fn type_is(ty: &Type, name: &str, errors: &mut Errors) -> Result<bool, ()> {
    match vocab::type_ref(ty) {
        vocab::TypeRef::Known(n, _) => Ok(n == name),
        vocab::TypeRef::Misspelled(n) => {
            errors.at(ty, vocab::spellings(n));
            Err(())
        }
        vocab::TypeRef::Other => Ok(false),
    }
}

/// Check the signature; returns the arguments' bindings for the body (refused ones as `Error`).
fn signature(hook: &Hook<'_>, errors: &mut Errors) -> Vec<(String, Binding)> {
    let sig = &hook.func.sig;
    let want = hook.sig;
    let expected = format!("the signature is `{}`", want.rust_signature());
    if let Some(t) = &sig.constness {
        errors.at(t, "a hook cannot be a `const fn`: write a plain `fn`");
    }
    if let Some(t) = &sig.asyncness {
        errors.at(t, "a hook cannot be `async`: write a plain `fn`");
    }
    if let Some(t) = &sig.unsafety {
        errors.at(t, "a hook cannot be `unsafe`: write a plain `fn`");
    }
    if let Some(abi) = &sig.abi {
        errors.at(abi, "a hook cannot have an ABI: write a plain `fn`");
    }
    if !sig.generics.params.is_empty() || sig.generics.where_clause.is_some() {
        errors.at(
            &sig.generics,
            format!("a hook cannot be generic: {expected}"),
        );
    }
    if let Some(v) = &sig.variadic {
        errors.at(v, format!("a hook cannot be variadic: {expected}"));
    }
    receiver(hook, &expected, errors);
    let typed: Vec<&syn::PatType> = sig
        .inputs
        .iter()
        .filter_map(|a| match a {
            FnArg::Typed(t) => Some(t),
            FnArg::Receiver(_) => None,
        })
        .collect();
    let mut bindings = Vec::new();
    if typed.len() != want.args.len() {
        // Which argument is which is unknown: none is reported again in the body.
        for arg in &typed {
            bind_all(&arg.pat, Binding::Error, &mut bindings);
        }
        errors.at(
            &sig.inputs,
            format!(
                "wrong number of arguments: `{}` takes {} after `&self`, found {}; {expected}",
                want.name,
                want.args.len(),
                typed.len()
            ),
        );
    } else {
        for (arg, (ty, _)) in typed.iter().zip(want.args) {
            let type_ok = match type_is(&arg.ty, ty.rust(), errors) {
                Ok(true) => true,
                Ok(false) => {
                    errors.at(
                        &arg.ty,
                        format!("wrong argument type: expected `{}`; {expected}", ty.rust()),
                    );
                    false
                }
                Err(()) => false,
            };
            let binding = match (type_ok, ty) {
                (false, _) => Binding::Error,
                (true, SigTy::Pos) => Binding::PosArg,
                (true, _) => Binding::Arg,
            };
            if arg_pattern(&arg.pat, errors) {
                bind_all(&arg.pat, binding, &mut bindings);
            } else {
                bind_all(&arg.pat, Binding::Error, &mut bindings);
            }
        }
    }
    let ret = match &sig.output {
        ReturnType::Type(_, ty) => type_is(ty, want.ret.rust(), errors),
        ReturnType::Default => Ok(false),
    };
    match &sig.output {
        _ if ret == Ok(true) || ret.is_err() => {}
        ReturnType::Type(_, ty) => errors.at(
            ty,
            format!(
                "wrong return type: `{}` returns `{}`; {expected}",
                want.name,
                want.ret.rust()
            ),
        ),
        ReturnType::Default => errors.at(
            &sig.ident,
            format!(
                "missing return type: `{}` returns `{}`; {expected}",
                want.name,
                want.ret.rust()
            ),
        ),
    }
    bindings
}

/// `self: &Self`, the explicit form of `&self`.
fn is_ref_self(ty: &Type) -> bool {
    matches!(ty, Type::Reference(r) if r.lifetime.is_none() && r.mutability.is_none()
        && matches!(&*r.elem, Type::Path(p) if p.qself.is_none() && p.path.is_ident("Self")))
}

fn receiver(hook: &Hook<'_>, expected: &str, errors: &mut Errors) {
    let sig = &hook.func.sig;
    match sig.inputs.first() {
        Some(FnArg::Receiver(r)) => {
            let plain_ref = matches!(&r.reference, Some((_, None))) && r.colon_token.is_none();
            let explicit = r.colon_token.is_some() && is_ref_self(&r.ty);
            if !(plain_ref || explicit) || r.mutability.is_some() {
                // syn gives every receiver its type: `&mut self` is `self: &mut Self`.
                let found = match &*r.ty {
                    Type::Reference(t) if t.mutability.is_some() => {
                        "`&mut self`: hooks only read the parameters"
                    }
                    Type::Path(_) if r.colon_token.is_none() => {
                        "`self` by value: hooks only read the parameters"
                    }
                    _ => "another receiver form",
                };
                errors.at(r, format!("a hook takes `&self`, not {found}; {expected}"));
            }
        }
        _ => errors.at(
            &sig.ident,
            format!("a hook takes `&self` as its first argument; {expected}"),
        ),
    }
}

/// Whether an argument's pattern is accepted: a plain name or `_`.
fn arg_pattern(pat: &Pat, errors: &mut Errors) -> bool {
    match pat {
        Pat::Ident(p) if p.by_ref.is_none() && p.subpat.is_none() => {
            if let Some(m) = &p.mutability {
                errors.at(
                    m,
                    "hook arguments are read-only: copy into a local (`let mut x = x;`)",
                );
                return false;
            }
            true
        }
        Pat::Wild(_) => true,
        other => {
            errors.at(other, "a hook argument is a plain name (or `_`)");
            false
        }
    }
}

/// The names bound by the `let`s of an `if` condition (`if let P = e`, `if a && let P = e`).
fn let_bindings(cond: &Expr, out: &mut Vec<(String, Binding)>) {
    match cond {
        Expr::Let(l) => bind_all(&l.pat, Binding::Error, out),
        Expr::Binary(b) if matches!(b.op, BinOp::And(_)) => {
            let_bindings(&b.left, out);
            let_bindings(&b.right, out);
        }
        Expr::Group(g) => let_bindings(&g.expr, out),
        Expr::Paren(p) => let_bindings(&p.expr, out),
        _ => {}
    }
}

/// Bind every name a pattern introduces (all of them, for a refused pattern, so that none of
/// them is reported as unknown later).
fn bind_all(pat: &Pat, binding: Binding, out: &mut Vec<(String, Binding)>) {
    let mut all = |p: &Pat| bind_all(p, binding, out);
    match pat {
        Pat::Ident(p) => {
            if let Some((_, sub)) = &p.subpat {
                all(sub);
            }
            out.push((p.ident.unraw().to_string(), binding));
        }
        Pat::Or(p) => p.cases.iter().for_each(all),
        Pat::Paren(p) => all(&p.pat),
        Pat::Reference(p) => all(&p.pat),
        Pat::Slice(p) => p.elems.iter().for_each(all),
        Pat::Tuple(p) => p.elems.iter().for_each(all),
        Pat::TupleStruct(p) => p.elems.iter().for_each(all),
        Pat::Struct(p) => p.fields.iter().for_each(|f| all(&f.pat)),
        Pat::Type(p) => all(&p.pat),
        _ => {}
    }
}

/// Where an expression sits: statement position may assign and `return`; a value may not; the tail
/// of the function (and of its statement-position branches) is a value that may also `return`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Place {
    Stmt,
    Value,
    Tail,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Binding {
    Local,
    Arg,
    PosArg,
    /// A name whose binding or value was refused (and reported): anything is accepted of it.
    Error,
}

struct Body<'e> {
    errors: &'e mut Errors,
    scopes: Vec<Vec<(String, Binding)>>,
    /// Inside an `if` used as a value (lowered to a C++ lambda, where `return` means something else).
    in_value_if: usize,
    /// Set when an error is reported or an `Error` name is read: a `let` of such a value binds
    /// an `Error` name.
    poisoned: bool,
}

const LOOP: &str = "loops are not supported in a hook: a hook computes one element; precompute into a parameter array or unroll by hand";
const RETURN: &str = "`return` is only allowed as a statement (`return x;`), not inside an expression or an if-else used as a value";

impl<'e> Body<'e> {
    fn new(args: Vec<(String, Binding)>, errors: &'e mut Errors) -> Self {
        Body {
            errors,
            scopes: vec![args],
            in_value_if: 0,
            poisoned: false,
        }
    }

    /// Report a problem (every report in a body goes through here).
    fn err<T: quote::ToTokens, M: std::fmt::Display>(&mut self, at: T, message: M) {
        self.poisoned = true;
        self.errors.at(at, message);
    }

    /// The binding of `e` when it is a plain name.
    fn binding_of(&self, e: &Expr) -> Option<Binding> {
        match e {
            Expr::Path(p) if p.qself.is_none() => p
                .path
                .get_ident()
                .and_then(|i| self.lookup(&i.unraw().to_string())),
            Expr::Group(g) => self.binding_of(&g.expr),
            Expr::Paren(p) => self.binding_of(&p.expr),
            _ => None,
        }
    }

    /// Whether `e` is a name already reported (no further error about it); reading one poisons
    /// the value being checked.
    fn read_error(&mut self, e: &Expr) -> bool {
        let error = self.binding_of(e) == Some(Binding::Error);
        self.poisoned |= error;
        error
    }

    /// A name just reported unknown: bound for the rest of the hook, so it is reported once.
    fn unknown(&mut self, name: String) {
        self.scopes[0].push((name, Binding::Error));
    }

    fn lookup(&self, name: &str) -> Option<Binding> {
        self.scopes
            .iter()
            .rev()
            .find_map(|s| s.iter().rev().find(|(n, _)| n == name).map(|(_, b)| *b))
    }

    fn block(&mut self, block: &Block, tail: Place) {
        self.scopes.push(Vec::new());
        let n = block.stmts.len();
        for (k, stmt) in block.stmts.iter().enumerate() {
            match stmt {
                Stmt::Expr(e, None) if k + 1 == n => self.expr(e, tail),
                _ => self.stmt(stmt),
            }
        }
        self.scopes.pop();
    }

    fn stmt(&mut self, stmt: &Stmt) {
        match stmt {
            Stmt::Local(local) => self.local(local),
            Stmt::Expr(e, _) => self.expr(e, Place::Stmt),
            Stmt::Macro(m) => self.err(&m.mac, MACRO),
            Stmt::Item(item) => self.err(
                item,
                "items (fn, use, const, struct...) are not supported inside a hook: use `let`",
            ),
        }
    }

    fn local(&mut self, local: &syn::Local) {
        let (pat, ty) = match &local.pat {
            Pat::Type(t) => (&*t.pat, Some(&*t.ty)),
            p => (p, None),
        };
        // Whether anything in this `let` is refused, or reads a refused name.
        let outer = std::mem::replace(&mut self.poisoned, false);
        if let Some(ty) = ty {
            let scalar = match vocab::type_ref(ty) {
                vocab::TypeRef::Known(n, _) => vocab::SCALARS.iter().any(|(r, _)| *r == n),
                vocab::TypeRef::Misspelled(n) => {
                    self.err(ty, vocab::spellings(n));
                    true
                }
                vocab::TypeRef::Other => false,
            };
            if !scalar {
                self.err(ty, "a local's type is f32, i32, u32 or bool");
            }
        }
        let mut let_else = false;
        match &local.init {
            Some(init) => {
                if let Some((_, diverge)) = &init.diverge {
                    // Its pattern is refutable by necessity: that is not a second error.
                    self.err(diverge, "`let ... else` is not supported in a hook");
                    let_else = true;
                }
                self.expr(&init.expr, Place::Value);
            }
            None if ty.is_none() => self.err(
                local,
                "a `let` without a value needs a type (`let x: f32;`): the CUDA declaration needs it",
            ),
            None => {}
        }
        let plain = match pat {
            Pat::Ident(p) if p.by_ref.is_none() && p.subpat.is_none() => true,
            // `let _ = x;` discards a value (e.g. an unused argument).
            Pat::Wild(_) if local.init.is_some() => true,
            _ if let_else => false,
            other => {
                self.err(
                    other,
                    "a `let` binds one name (`let x = ...;` or `let mut x = ...;`); patterns are not supported",
                );
                false
            }
        };
        let binding = match plain && !self.poisoned {
            true => Binding::Local,
            false => Binding::Error,
        };
        self.poisoned |= outer;
        let scope = self.scopes.last_mut().expect("a block scope");
        bind_all(pat, binding, scope);
    }

    fn expr(&mut self, e: &Expr, place: Place) {
        use Place::*;
        match e {
            Expr::Lit(l) => self.lit(&l.lit),
            Expr::Path(_) => self.path(e),
            Expr::Field(f) => self.field(f),
            Expr::Index(ix) => {
                if !is_self_field(&ix.expr) && !self.read_error(&ix.expr) {
                    self.err(
                        &ix.expr,
                        "only parameter arrays can be indexed: `self.<array field>[i]`",
                    );
                }
                self.expr(&ix.index, Value);
            }
            Expr::MethodCall(m) => self.method(m),
            Expr::Binary(b) if is_compound_assign(&b.op) => {
                self.assignment(&b.left, e, place);
                self.expr(&b.right, Value);
            }
            Expr::Binary(b) => {
                self.expr(&b.left, Value);
                self.expr(&b.right, Value);
            }
            Expr::Assign(a) => {
                self.assignment(&a.left, e, place);
                self.expr(&a.right, Value);
            }
            Expr::Unary(u) => match u.op {
                UnOp::Deref(_) => self.err(e, REFS),
                _ => self.expr(&u.expr, Value),
            },
            Expr::Reference(_) => self.err(e, REFS),
            Expr::Cast(c) => {
                self.cast_type(&c.ty);
                self.expr(&c.expr, Value);
            }
            Expr::Paren(p) => self.expr(&p.expr, Value),
            Expr::Group(g) => self.expr(&g.expr, place),
            Expr::If(i) => self.if_expr(i, place),
            Expr::Block(b) if place == Stmt && b.label.is_none() => self.block(&b.block, Stmt),
            Expr::Block(_) => self.err(
                e,
                "a block used as a value is not supported: bind the value with `let` before",
            ),
            Expr::Return(r) => {
                if place == Value || self.in_value_if > 0 {
                    self.err(e, RETURN);
                }
                if let Some(v) = &r.expr {
                    self.expr(v, Value);
                }
            }
            Expr::ForLoop(_) | Expr::While(_) | Expr::Loop(_) => {
                self.poisoned = true;
                self.errors.at_span(loop_keyword(e), LOOP)
            }
            Expr::Break(_) | Expr::Continue(_) => self.err(e, LOOP),
            Expr::Closure(_) => self.err(
                e,
                "closures are not supported in a hook: compute the value inline",
            ),
            Expr::Match(m) => self.err(
                m.match_token,
                "`match` is not supported in a hook: use if / else if / else",
            ),
            Expr::Struct(_) | Expr::Tuple(_) | Expr::Array(_) | Expr::Repeat(_) => {
                self.err(
                    e,
                    "struct, tuple and array literals are not supported in a hook: hooks work on f32, i32, u32 and bool",
                )
            }
            Expr::Range(_) => self.err(e, "ranges are not supported in a hook"),
            Expr::Macro(m) => self.err(&m.mac, MACRO),
            // Calling a refused name (a refused closure, say) is part of that error.
            Expr::Call(c) if self.read_error(&c.func) => {}
            Expr::Call(c) => self.err(
                &c.func,
                "function calls are not supported in a hook: use the method form (`x.exp()`, `a.max(b)`)",
            ),
            Expr::Let(_) => self.err(
                e,
                "`if let` / `let` in an expression is not supported in a hook: use a plain `if`",
            ),
            Expr::Unsafe(_) => self.err(e, "`unsafe` is not supported in a hook"),
            _ => self.err(
                e,
                "unsupported expression in a hook: use arithmetic, comparisons, if/else, let, casts, \
                 math methods, self.<field> and the Pos fields",
            ),
        }
    }

    fn if_expr(&mut self, i: &syn::ExprIf, place: Place) {
        self.expr(&i.cond, Place::Value);
        // `if let` is refused (in `expr`); the names its patterns bind are not reported again.
        let mut refused = Vec::new();
        let_bindings(&i.cond, &mut refused);
        self.scopes.push(refused);
        if place == Place::Value {
            if i.else_branch.is_none() {
                self.err(i.if_token, "an `if` used as a value needs an `else` branch");
            }
            self.in_value_if += 1;
        }
        self.block(&i.then_branch, place);
        self.scopes.pop();
        if let Some((_, els)) = &i.else_branch {
            match &**els {
                Expr::Block(b) => self.block(&b.block, place),
                other => self.expr(other, place),
            }
        }
        if place == Place::Value {
            self.in_value_if -= 1;
        }
    }

    fn lit(&mut self, lit: &Lit) {
        match lit {
            // `2f32` is an integer token with a float suffix.
            Lit::Int(i) if matches!(i.suffix(), "" | "i32" | "u32" | "f32") => {}
            Lit::Int(i) if i.suffix() == "f64" => self.err(i, F64),
            Lit::Int(i) => self.err(
                i,
                format!(
                    "integer literal suffix `{}` is not allowed: hooks use i32 and u32 (write `1`, `1i32` or `1u32`)",
                    i.suffix()
                ),
            ),
            Lit::Float(f) if f.suffix() == "f64" => self.err(f, F64),
            Lit::Float(f) if !matches!(f.suffix(), "" | "f32") => self.err(
                f,
                format!(
                    "float literal suffix `{}` is not allowed: write `1.0` or `1.0f32`",
                    f.suffix()
                ),
            ),
            Lit::Float(_) | Lit::Bool(_) => {}
            other => self.err(
                other,
                "only numeric and bool literals are allowed in a hook",
            ),
        }
    }

    fn path(&mut self, e: &Expr) {
        let Expr::Path(p) = e else { return };
        if p.qself.is_some() || p.path.segments.iter().any(|s| !s.arguments.is_empty()) {
            self.err(e, "unsupported path in a hook");
            return;
        }
        if let Some(ident) = p.path.get_ident() {
            let name = ident.unraw().to_string();
            if name == "self" {
                self.err(
                    e,
                    "`self` is only usable as `self.<field>` (or `self.<array>[i]`, `self.<array>.len()`)",
                );
            } else if self.read_error(e) {
            } else if self.lookup(&name).is_none() {
                const CONSTS: [&str; 7] = [
                    "PI",
                    "E",
                    "LN_2",
                    "LN_10",
                    "LOG2_E",
                    "SQRT_2",
                    "FRAC_1_SQRT_2",
                ];
                let hint = if CONSTS.contains(&name.as_str()) {
                    format!(" (write the full path `core::f32::consts::{name}`)")
                } else {
                    String::new()
                };
                self.err(
                    e,
                    format!(
                        "unknown name `{name}`: a hook sees its arguments, its locals, `self.<field>` and the constants {}{hint}",
                        vocab::CONSTANT_LIST
                    ),
                );
                self.unknown(name);
            }
            return;
        }
        if vocab::constant(&p.path).is_none() {
            self.err(
                e,
                format!(
                    "unsupported path: the constants a hook may use are {} \
                     (a type may also be written `core::primitive::f32` or `std::primitive::f32`, \
                     and a path to a constant may start with `::`)",
                    vocab::CONSTANT_LIST
                ),
            );
        }
    }

    fn field(&mut self, f: &syn::ExprField) {
        let syn::Member::Named(member) = &f.member else {
            self.err(&f.member, "tuple fields are not supported: name the field");
            return;
        };
        if is_self(&f.base) || self.read_error(&f.base) {
            return;
        }
        if let Expr::Path(p) = &*f.base
            && let Some(ident) = p.path.get_ident()
            && self.lookup(&ident.unraw().to_string()) == Some(Binding::PosArg)
        {
            if !vocab::POS_FIELDS.contains(&member.unraw().to_string().as_str()) {
                self.err(
                    &f.member,
                    format!("`Pos` has the fields {}", vocab::POS_FIELDS.join(", ")),
                );
            }
            return;
        }
        self.err(
            &f.base,
            "field access is only allowed on `self` (the parameters) and on the `Pos` argument",
        );
    }

    fn method(&mut self, m: &syn::ExprMethodCall) {
        if let Some(t) = &m.turbofish {
            self.err(t, "turbofish is not supported in a hook");
        }
        let name = m.method.unraw().to_string();
        if name == "len" {
            if !is_self_field(&m.receiver) && !self.read_error(&m.receiver) {
                self.err(
                    &m.receiver,
                    "`len()` is only available on parameter arrays: `self.<array field>.len()`",
                );
            }
            if !m.args.is_empty() {
                self.err(&m.args, "`len()` takes no arguments");
            }
            return;
        }
        match vocab::method(&name) {
            Some(known) => {
                if m.args.len() != known.args {
                    self.err(
                        &m.method,
                        format!(
                            "`{name}` takes {} argument(s), found {}",
                            known.args,
                            m.args.len()
                        ),
                    );
                }
            }
            None => self.err(
                &m.method,
                format!(
                    "unknown method `{name}`: a hook may call {}",
                    vocab::method_list()
                ),
            ),
        }
        self.expr(&m.receiver, Place::Value);
        for a in &m.args {
            self.expr(a, Place::Value);
        }
    }

    fn cast_type(&mut self, ty: &Type) {
        let name = match vocab::type_ref(ty) {
            vocab::TypeRef::Known(n, _) => n,
            vocab::TypeRef::Misspelled(n) if n != "usize" => {
                return self.err(ty, vocab::spellings(n));
            }
            vocab::TypeRef::Misspelled(n) => n,
            vocab::TypeRef::Other => "",
        };
        if ["f32", "i32", "u32"].contains(&name) {
            return;
        }
        if name == "usize" {
            self.err(
                ty,
                "casts to `usize` are not supported: index arrays with u32 or i32 (`self.a[at.qo_head]`)",
            );
        } else {
            self.err(ty, "casts are only to f32, i32 or u32");
        }
    }

    fn assignment(&mut self, target: &Expr, whole: &Expr, place: Place) {
        if place != Place::Stmt {
            self.err(
                whole,
                "assignment is only allowed as a statement (`x = ...;`), not as a value",
            );
            return;
        }
        let name = match target {
            Expr::Path(p) => p.path.get_ident().map(|i| i.unraw().to_string()),
            _ => None,
        };
        match (
            name.as_deref(),
            name.as_deref().and_then(|n| self.lookup(n)),
        ) {
            (Some("self"), _) => self.err(target, "`self` is read-only"),
            (_, Some(Binding::Local)) => {}
            (_, Some(Binding::Error)) => self.poisoned = true,
            (_, Some(_)) => self.err(
                target,
                "hook arguments are read-only: copy into a local (`let mut x = x;`)",
            ),
            (Some(n), None) => {
                self.err(target, format!("unknown name `{n}`"));
                self.unknown(n.to_string());
            }
            (None, _) if is_self_field(target) => self.err(
                target,
                "parameters are read-only: assign to a local (`let mut x = self.x;`)",
            ),
            (None, _) => self.err(target, "only locals can be assigned"),
        }
    }
}

const F64: &str = "f64 literals are not allowed: hooks compute in f32 (write `1.0` or `1.0f32`)";
const MACRO: &str = "macro invocations are not supported in a hook: they cannot be lowered to CUDA";
const REFS: &str =
    "references and dereferences are not supported in a hook: use the values directly";

/// `self`
pub fn is_self(e: &Expr) -> bool {
    matches!(e, Expr::Path(p) if p.qself.is_none() && p.path.is_ident("self"))
}

/// `self.<named field>`
pub fn is_self_field(e: &Expr) -> bool {
    matches!(e, Expr::Field(f) if is_self(&f.base) && matches!(f.member, syn::Member::Named(_)))
}

pub fn is_compound_assign(op: &BinOp) -> bool {
    matches!(
        op,
        BinOp::AddAssign(_)
            | BinOp::SubAssign(_)
            | BinOp::MulAssign(_)
            | BinOp::DivAssign(_)
            | BinOp::RemAssign(_)
            | BinOp::BitXorAssign(_)
            | BinOp::BitAndAssign(_)
            | BinOp::BitOrAssign(_)
            | BinOp::ShlAssign(_)
            | BinOp::ShrAssign(_)
    )
}

/// The `for`/`while`/`loop` keyword, so the error does not underline the whole loop.
fn loop_keyword(e: &Expr) -> proc_macro2::Span {
    match e {
        Expr::ForLoop(f) => f.for_token.span,
        Expr::While(w) => w.while_token.span,
        Expr::Loop(l) => l.loop_token.span,
        other => other.span(),
    }
}
