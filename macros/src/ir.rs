//! The typed IR of a hook body: what `check` hands to `lower`. Every expression carries its
//! resolved type, so the lowering never guesses (an unsuffixed `0` assigned a `u32` later is a
//! `u32`, `x.min(4096)` has one type on both sides) and cannot fail.
//!
//! Types are inferred as rustc infers them, over the whole variant at once: a type variable per
//! expression, unified by the rules of each operator (both sides of `+` and of a comparison, a
//! local and everything assigned to it, a method's receiver and argument, the branches of an `if`,
//! a hook's return type). An integer literal no use decides is `i32` (rustc's fallback); an
//! integer literal directly under `as` takes the cast's integer type (rustc's cast hint). A float
//! literal no use decides would be `f64` in Rust, which hooks do not have: that is an error asking
//! for `f32`. A parameter field's type is known only to `#[derive(AttentionParams)]`: when nothing
//! in the hooks decides it, it stays the field's type (`decltype(Params::field)` in CUDA, where
//! every helper is overloaded on it).
//!
//! `build` runs only on hooks that `check` accepted, so a construct outside the DSL here is a bug;
//! it is still reported as an error with a span rather than a panic.

use std::collections::HashMap;

use proc_macro2::Span;
use syn::ext::IdentExt;
use syn::spanned::Spanned;

use crate::check::{is_compound_assign, is_self, is_self_field};
use crate::errors::Errors;
use crate::parse::{Hook, VariantDef};
use crate::vocab::{self, HookSig, Method, SigTy};

/// The scalar types of the DSL.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Scalar {
    Bool,
    I32,
    U32,
    F32,
}

impl Scalar {
    pub fn rust(self) -> &'static str {
        match self {
            Scalar::Bool => "bool",
            Scalar::I32 => "i32",
            Scalar::U32 => "u32",
            Scalar::F32 => "f32",
        }
    }
    pub fn cuda(self) -> &'static str {
        match self {
            Scalar::Bool => "bool",
            Scalar::I32 => "int",
            Scalar::U32 => "unsigned",
            Scalar::F32 => "float",
        }
    }
    fn named(name: &str) -> Option<Scalar> {
        [Scalar::Bool, Scalar::I32, Scalar::U32, Scalar::F32]
            .into_iter()
            .find(|s| s.rust() == name)
    }
    fn of_sig(t: SigTy) -> Option<Scalar> {
        match t {
            SigTy::F32 => Some(Scalar::F32),
            SigTy::U32 => Some(Scalar::U32),
            SigTy::Bool => Some(Scalar::Bool),
            SigTy::Pos => None,
        }
    }
}

/// A resolved type.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Ty {
    Scalar(Scalar),
    /// The type of scalar parameter `self.<field>`, which nothing in the hooks decides.
    Field(String),
    /// The element type of parameter array `self.<field>`, likewise.
    Elem(String),
}

pub type LocalId = usize;

/// A checked, typed hook.
pub struct Func {
    pub sig: &'static HookSig,
    /// The local of each argument after `&self`; `None` for `_`.
    pub args: Vec<Option<LocalId>>,
    pub locals: Vec<Local>,
    pub body: Block,
}

/// A named value: an argument or a `let`.
pub struct Local {
    pub name: String,
    pub ty: Ty,
    pub mutable: bool,
    var: usize,
    /// The `Pos` argument: only its fields are values.
    pos: bool,
}

pub struct Block {
    pub stmts: Vec<Stmt>,
    /// The value of the block (absent when it ends in a statement).
    pub tail: Option<Box<Expr>>,
}

pub enum Stmt {
    /// `let x = init;` or `let x: T;`
    Let(LocalId, Option<Expr>),
    /// An expression whose value is discarded (`e;`, `let _ = e;`).
    Discard(Expr),
    /// `x = e;` or `x op= e;`
    Assign(LocalId, Option<BinOp>, Expr),
    /// An `if` in statement position (its branches' values are discarded or returned).
    If(Expr, Block, Option<Block>),
    Block(Block),
    Return(Expr),
}

pub struct Expr {
    pub kind: Kind,
    pub ty: Ty,
    var: usize,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
    Rem,
    BitAnd,
    BitOr,
    BitXor,
    Shl,
    Shr,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    And,
    Or,
}

impl BinOp {
    pub fn rust(self) -> &'static str {
        use BinOp::*;
        match self {
            Add => "+",
            Sub => "-",
            Mul => "*",
            Div => "/",
            Rem => "%",
            BitAnd => "&",
            BitOr => "|",
            BitXor => "^",
            Shl => "<<",
            Shr => ">>",
            Eq => "==",
            Ne => "!=",
            Lt => "<",
            Le => "<=",
            Gt => ">",
            Ge => ">=",
            And => "&&",
            Or => "||",
        }
    }
    fn of(op: &syn::BinOp) -> Option<BinOp> {
        use syn::BinOp as S;
        Some(match op {
            S::Add(_) | S::AddAssign(_) => BinOp::Add,
            S::Sub(_) | S::SubAssign(_) => BinOp::Sub,
            S::Mul(_) | S::MulAssign(_) => BinOp::Mul,
            S::Div(_) | S::DivAssign(_) => BinOp::Div,
            S::Rem(_) | S::RemAssign(_) => BinOp::Rem,
            S::BitAnd(_) | S::BitAndAssign(_) => BinOp::BitAnd,
            S::BitOr(_) | S::BitOrAssign(_) => BinOp::BitOr,
            S::BitXor(_) | S::BitXorAssign(_) => BinOp::BitXor,
            S::Shl(_) | S::ShlAssign(_) => BinOp::Shl,
            S::Shr(_) | S::ShrAssign(_) => BinOp::Shr,
            S::Eq(_) => BinOp::Eq,
            S::Ne(_) => BinOp::Ne,
            S::Lt(_) => BinOp::Lt,
            S::Le(_) => BinOp::Le,
            S::Gt(_) => BinOp::Gt,
            S::Ge(_) => BinOp::Ge,
            S::And(_) => BinOp::And,
            S::Or(_) => BinOp::Or,
            _ => return None,
        })
    }
    pub fn is_comparison(self) -> bool {
        use BinOp::*;
        matches!(self, Eq | Ne | Lt | Le | Gt | Ge)
    }
}

pub enum Kind {
    Bool(bool),
    /// An integer literal's value (of the expression's type; at most `u32::MAX` reaches here).
    Int(u64),
    Float(f32),
    Local(LocalId),
    /// `at.<field>` (a `u32`).
    Pos(&'static str),
    /// `self.<field>`
    Field(String),
    /// `self.<field>[index]`
    Index(String, Box<Expr>),
    /// `self.<field>.len()`
    Len(String),
    /// A named constant, as its exact CUDA text.
    Const(&'static str),
    Neg(Box<Expr>),
    Not(Box<Expr>),
    Binary(BinOp, Box<Expr>, Box<Expr>),
    Cast(Scalar, Box<Expr>),
    /// A method: the receiver, then the arguments.
    Call(&'static Method, Vec<Expr>),
    /// An `if` used as a value.
    If(Box<Expr>, Block, Block),
}

/// The typed hooks of a variant.
pub struct Typed {
    pub funcs: Vec<Func>,
    /// Type conflicts: rustc rejects the variant, so its CUDA is never compiled; should it be,
    /// the lowering makes it a compile error rather than code with guessed types.
    pub conflicts: Vec<String>,
}

/// Build and type the hooks `check` accepted (`ok[i]` for `def.hooks[i]`), variant-wide.
pub fn build(def: &VariantDef<'_>, ok: &[bool], errors: &mut Errors) -> Typed {
    let mut b = Builder {
        errors,
        infer: Infer::default(),
        fields: HashMap::new(),
        elems: HashMap::new(),
        locals: Vec::new(),
        scopes: Vec::new(),
        failed: false,
        conflicts: Vec::new(),
        hook: "",
    };
    let mut funcs = Vec::new();
    for (hook, _) in def.hooks.iter().zip(ok).filter(|(_, ok)| **ok) {
        funcs.push(b.func(hook));
    }
    if b.failed {
        return Typed {
            funcs: Vec::new(),
            conflicts: Vec::new(),
        };
    }
    let mut r = Resolver {
        infer: &mut b.infer,
        errors: b.errors,
        reported: Vec::new(),
    };
    for f in &mut funcs {
        for l in &mut f.locals {
            l.ty = r.ty(l.var, None);
        }
        r.block(&mut f.body);
    }
    Typed {
        funcs,
        conflicts: b.conflicts,
    }
}

// ---- inference ---------------------------------------------------------------------------------

/// What is known of a type variable.
#[derive(Clone, Debug)]
enum Slot {
    Free,
    /// Some integer type.
    Int,
    /// Some float type.
    Float,
    Known(Scalar),
    /// A parameter's type (Ty::Field or Ty::Elem), unknown to the macro; `int` when it must be an
    /// integer.
    Param(Ty, bool),
    /// A conflict already reported: absorbs everything silently.
    Error,
}

#[derive(Default)]
struct Infer {
    parent: Vec<usize>,
    slot: Vec<Slot>,
    /// The first span of each variable, for "cannot infer" errors.
    span: Vec<Span>,
}

impl Infer {
    fn var(&mut self, slot: Slot, span: Span) -> usize {
        self.parent.push(self.parent.len());
        self.slot.push(slot);
        self.span.push(span);
        self.parent.len() - 1
    }
    fn root(&mut self, mut v: usize) -> usize {
        while self.parent[v] != v {
            self.parent[v] = self.parent[self.parent[v]];
            v = self.parent[v];
        }
        v
    }
    /// Make `a` and `b` one type; `Err` with both sides' names on a conflict.
    fn unify(&mut self, a: usize, b: usize) -> Result<(), (String, String)> {
        let (ra, rb) = (self.root(a), self.root(b));
        if ra == rb {
            return Ok(());
        }
        let merged = merge(&self.slot[ra], &self.slot[rb]);
        self.parent[rb] = ra;
        // An undecided float is reported at its literal.
        if matches!(self.slot[rb], Slot::Float) && !matches!(self.slot[ra], Slot::Float) {
            self.span[ra] = self.span[rb];
        }
        match merged {
            Some(s) => {
                self.slot[ra] = s;
                Ok(())
            }
            None => {
                let names = (describe(&self.slot[ra]), describe(&self.slot[rb]));
                self.slot[ra] = Slot::Error;
                Err(names)
            }
        }
    }
}

fn merge(a: &Slot, b: &Slot) -> Option<Slot> {
    use Slot::*;
    let int = |s: Scalar| matches!(s, Scalar::I32 | Scalar::U32);
    Some(match (a, b) {
        (Error, _) | (_, Error) => Error,
        (Free, x) | (x, Free) => x.clone(),
        (Known(s), Known(t)) if s == t => Known(*s),
        (Known(s), Int) | (Int, Known(s)) if int(*s) => Known(*s),
        (Known(Scalar::F32), Float) | (Float, Known(Scalar::F32)) => Known(Scalar::F32),
        (Known(s), Param(_, is_int)) | (Param(_, is_int), Known(s)) if !is_int || int(*s) => {
            Known(*s)
        }
        (Int, Int) => Int,
        (Float, Float) => Float,
        (Int, Param(t, _)) | (Param(t, _), Int) => Param(t.clone(), true),
        // Parameters hold f32, i32, u32 or bool: a float one is f32.
        (Float, Param(_, false)) | (Param(_, false), Float) => Known(Scalar::F32),
        (Param(t, i), Param(_, j)) => Param(t.clone(), *i || *j),
        _ => return None,
    })
}

fn describe(s: &Slot) -> String {
    match s {
        Slot::Known(t) => format!("`{}`", t.rust()),
        Slot::Int => "an integer".into(),
        Slot::Float => "a float".into(),
        Slot::Param(_, true) => "an integer parameter".into(),
        Slot::Param(..) | Slot::Free | Slot::Error => "a value".into(),
    }
}

// ---- building ----------------------------------------------------------------------------------

struct Builder<'e> {
    errors: &'e mut Errors,
    infer: Infer,
    /// The type variable of each scalar parameter field, and of each array's elements.
    fields: HashMap<String, usize>,
    elems: HashMap<String, usize>,
    locals: Vec<Local>,
    scopes: Vec<Vec<(String, LocalId)>>,
    /// A construct `check` should have refused (a bug), reported: nothing is lowered.
    failed: bool,
    /// Type conflicts (rustc reports them).
    conflicts: Vec<String>,
    /// The hook being built, for `conflicts`.
    hook: &'static str,
}

/// A `Kind` with its type variable (the type is filled in by the resolver).
fn node(kind: Kind, var: usize) -> Expr {
    Expr {
        kind,
        ty: Ty::Scalar(Scalar::Bool),
        var,
    }
}

impl Builder<'_> {
    fn known(&mut self, s: Scalar, span: Span) -> usize {
        self.infer.var(Slot::Known(s), span)
    }

    /// `a` and `b` have one type; a conflict is reported once, at `at`.
    /// `a` and `b` have one type. A conflict is rustc's to report (its message is the better
    /// one, and one mistake gives one error): it is only recorded, and the lowering refuses to
    /// compile, should rustc ever accept what this inference refused.
    fn same(&mut self, a: usize, b: usize, _at: Span) {
        if let Err((x, y)) = self.infer.unify(a, b) {
            self.conflicts
                .push(format!("hook `{}`: {x} against {y}", self.hook));
        }
    }

    fn bug(&mut self, at: impl quote::ToTokens) -> Expr {
        self.failed = true;
        self.errors.at(
            at,
            "ferrinfer-macros cannot lower this construct (a bug: please report it with this hook)",
        );
        node(
            Kind::Bool(false),
            self.infer.var(Slot::Error, Span::call_site()),
        )
    }

    fn declare(&mut self, name: String, var: usize, mutable: bool) -> LocalId {
        self.locals.push(Local {
            name: name.clone(),
            ty: Ty::Scalar(Scalar::Bool),
            mutable,
            var,
            pos: false,
        });
        let id = self.locals.len() - 1;
        self.scopes.last_mut().expect("a scope").push((name, id));
        id
    }

    fn lookup(&self, name: &str) -> Option<LocalId> {
        self.scopes
            .iter()
            .rev()
            .find_map(|s| s.iter().rev().find(|(n, _)| n == name).map(|(_, id)| *id))
    }

    fn func(&mut self, hook: &Hook<'_>) -> Func {
        self.hook = hook.sig.name;
        self.locals.clear();
        self.scopes = vec![Vec::new()];
        let mut args = Vec::new();
        for (name, (ty, _)) in crate::parse::arg_names(hook.func)
            .into_iter()
            .zip(hook.sig.args)
        {
            let slot = Scalar::of_sig(*ty).map_or(Slot::Free, Slot::Known);
            let var = self.infer.var(slot, hook.func.sig.ident.span());
            let id = name.map(|n| self.declare(n, var, false));
            if let Some(id) = id {
                self.locals[id].pos = *ty == SigTy::Pos;
            }
            args.push(id);
        }
        let ret = Scalar::of_sig(hook.sig.ret).expect("hooks return scalars");
        let ret_var = self.known(ret, hook.func.sig.ident.span());
        let body = self.block(&hook.func.block, Some(ret_var), true);
        if let (Some(tail), Some(last)) = (&body.tail, hook.func.block.stmts.last()) {
            self.same(ret_var, tail.var, last.span());
        }
        Func {
            sig: hook.sig,
            args,
            locals: std::mem::take(&mut self.locals),
            body,
        }
    }

    /// A block; `ret` is the hook's return type (for `return`); `value` when its last expression
    /// is its value (else a statement, as in the branches of an `if` statement).
    fn block(&mut self, block: &syn::Block, ret: Option<usize>, value: bool) -> Block {
        self.scopes.push(Vec::new());
        let mut stmts = Vec::new();
        let mut tail = None;
        let n = block.stmts.len();
        for (k, stmt) in block.stmts.iter().enumerate() {
            match stmt {
                syn::Stmt::Expr(syn::Expr::Return(r), None) if k + 1 == n => {
                    stmts.push(self.ret(r, ret))
                }
                syn::Stmt::Expr(e, None) if value && k + 1 == n && !is_stmt_like(e) => {
                    tail = Some(Box::new(self.expr(e, ret, None)))
                }
                syn::Stmt::Local(local) => self.local(local, ret, &mut stmts),
                syn::Stmt::Expr(e, _) => stmts.push(self.stmt(e, ret)),
                other => {
                    let e = self.bug(other);
                    stmts.push(Stmt::Discard(e));
                }
            }
        }
        self.scopes.pop();
        Block { stmts, tail }
    }

    fn ret(&mut self, r: &syn::ExprReturn, ret: Option<usize>) -> Stmt {
        match (&r.expr, ret) {
            (Some(v), Some(ret)) => {
                let e = self.expr(v, Some(ret), None);
                self.same(ret, e.var, v.span());
                Stmt::Return(e)
            }
            _ => Stmt::Discard(self.bug(r)),
        }
    }

    fn local(&mut self, local: &syn::Local, ret: Option<usize>, out: &mut Vec<Stmt>) {
        let (pat, annotated) = match &local.pat {
            syn::Pat::Type(t) => (&*t.pat, Some(&*t.ty)),
            p => (p, None),
        };
        let var = match annotated {
            Some(ty) => match vocab::type_ref(ty) {
                vocab::TypeRef::Known(n, _) if Scalar::named(n).is_some() => {
                    self.known(Scalar::named(n).expect("a scalar"), ty.span())
                }
                _ => {
                    let e = self.bug(ty);
                    return out.push(Stmt::Discard(e));
                }
            },
            None => self.infer.var(Slot::Free, local.span()),
        };
        // `let _ = at;` only marks an argument used.
        if matches!(pat, syn::Pat::Wild(_))
            && let Some(i) = &local.init
            && let syn::Expr::Path(p) = strip(&i.expr)
            && p.path.get_ident().is_some()
        {
            return;
        }
        let init = local.init.as_ref().map(|i| {
            // A literal under `let x: u32 = ...` is typed by the annotation through unification.
            let e = self.expr(&i.expr, ret, None);
            self.same(var, e.var, i.expr.span());
            e
        });
        match pat {
            syn::Pat::Ident(p) => {
                let id = self.declare(p.ident.unraw().to_string(), var, p.mutability.is_some());
                out.push(Stmt::Let(id, init));
            }
            syn::Pat::Wild(_) => {
                if let Some(e) = init {
                    out.push(Stmt::Discard(e));
                }
            }
            other => {
                let e = self.bug(other);
                out.push(Stmt::Discard(e));
            }
        }
    }

    /// An expression in statement position.
    fn stmt(&mut self, e: &syn::Expr, ret: Option<usize>) -> Stmt {
        match e {
            syn::Expr::Group(g) => self.stmt(&g.expr, ret),
            syn::Expr::If(i) => {
                let cond = self.cond(&i.cond, ret);
                let then = self.block(&i.then_branch, ret, false);
                let els = i.else_branch.as_ref().map(|(_, e)| self.else_block(e, ret));
                Stmt::If(cond, then, els)
            }
            syn::Expr::Block(b) => Stmt::Block(self.block(&b.block, ret, false)),
            syn::Expr::Return(r) => self.ret(r, ret),
            syn::Expr::Assign(a) => match self.target(&a.left) {
                Some(id) => {
                    let value = self.expr(&a.right, ret, None);
                    let v = self.locals[id].var;
                    self.same(v, value.var, a.right.span());
                    Stmt::Assign(id, None, value)
                }
                None => Stmt::Discard(self.bug(e)),
            },
            syn::Expr::Binary(b) if is_compound_assign(&b.op) => {
                match (self.target(&b.left), BinOp::of(&b.op)) {
                    (Some(id), Some(op)) => {
                        let value = self.expr(&b.right, ret, None);
                        let v = self.locals[id].var;
                        match op {
                            BinOp::Shl | BinOp::Shr => self.integer(value.var, b.right.span()),
                            _ => self.same(v, value.var, b.right.span()),
                        }
                        Stmt::Assign(id, Some(op), value)
                    }
                    _ => Stmt::Discard(self.bug(e)),
                }
            }
            other => Stmt::Discard(self.expr(other, ret, None)),
        }
    }

    /// The `else` of an `if`: a block, or an `else if` as a block of one `if`.
    fn else_block(&mut self, e: &syn::Expr, ret: Option<usize>) -> Block {
        match e {
            syn::Expr::Block(b) => self.block(&b.block, ret, false),
            syn::Expr::Group(g) => self.else_block(&g.expr, ret),
            other => Block {
                stmts: vec![self.stmt(other, ret)],
                tail: None,
            },
        }
    }

    fn target(&mut self, e: &syn::Expr) -> Option<LocalId> {
        match e {
            syn::Expr::Path(p) => p
                .path
                .get_ident()
                .and_then(|i| self.lookup(&i.unraw().to_string())),
            syn::Expr::Group(g) => self.target(&g.expr),
            _ => None,
        }
    }

    fn integer(&mut self, var: usize, at: Span) {
        let int = self.infer.var(Slot::Int, at);
        self.same(var, int, at);
    }

    fn cond(&mut self, e: &syn::Expr, ret: Option<usize>) -> Expr {
        let c = self.expr(e, ret, None);
        let b = self.known(Scalar::Bool, e.span());
        self.same(b, c.var, e.span());
        c
    }

    /// An expression used as a value. `hint` is the integer (or float) type of an enclosing `as`,
    /// which rustc gives to a literal directly under it.
    fn expr(&mut self, e: &syn::Expr, ret: Option<usize>, hint: Option<Scalar>) -> Expr {
        use syn::Expr as E;
        let span = e.span();
        match e {
            E::Lit(l) => self.lit(&l.lit, hint),
            E::Paren(p) => self.expr(&p.expr, ret, hint),
            E::Group(g) => self.expr(&g.expr, ret, hint),
            E::Path(p) => {
                if let Some(i) = p.path.get_ident()
                    && let Some(id) = self.lookup(&i.unraw().to_string())
                {
                    if self.locals[id].pos {
                        self.errors.at(
                            e,
                            format!("`{i}` is only usable as `{i}.<field>` (e.g. `{i}.kv_pos`)"),
                        );
                        self.failed = true;
                    }
                    return node(Kind::Local(id), self.locals[id].var);
                }
                match vocab::constant(&p.path) {
                    Some(c) => {
                        let s = Scalar::named(c.ty).expect("constants are scalars");
                        node(Kind::Const(c.cuda), self.known(s, span))
                    }
                    None => self.bug(e),
                }
            }
            E::Field(f) => {
                let syn::Member::Named(m) = &f.member else {
                    return self.bug(e);
                };
                let name = m.unraw().to_string();
                if is_self(&f.base) {
                    let var = match self.fields.get(&name) {
                        Some(v) => *v,
                        None => {
                            let v = self
                                .infer
                                .var(Slot::Param(Ty::Field(name.clone()), false), span);
                            self.fields.insert(name.clone(), v);
                            v
                        }
                    };
                    return node(Kind::Field(name), var);
                }
                match vocab::POS_FIELDS.iter().find(|p| **p == name) {
                    Some(p) => node(Kind::Pos(p), self.known(Scalar::U32, span)),
                    None => self.bug(e),
                }
            }
            E::Index(ix) => {
                let E::Field(f) = strip(&ix.expr) else {
                    return self.bug(e);
                };
                let syn::Member::Named(m) = &f.member else {
                    return self.bug(e);
                };
                let name = m.unraw().to_string();
                let index = self.expr(&ix.index, ret, None);
                self.integer(index.var, ix.index.span());
                let var = match self.elems.get(&name) {
                    Some(v) => *v,
                    None => {
                        let v = self
                            .infer
                            .var(Slot::Param(Ty::Elem(name.clone()), false), span);
                        self.elems.insert(name.clone(), v);
                        v
                    }
                };
                node(Kind::Index(name, Box::new(index)), var)
            }
            E::MethodCall(m) => self.method(m, ret),
            E::Unary(u) => {
                let inner = self.expr(&u.expr, ret, hint);
                let var = inner.var;
                match u.op {
                    syn::UnOp::Neg(_) => node(Kind::Neg(Box::new(inner)), var),
                    syn::UnOp::Not(_) => node(Kind::Not(Box::new(inner)), var),
                    _ => self.bug(e),
                }
            }
            E::Binary(b) => {
                let Some(op) = BinOp::of(&b.op).filter(|_| !is_compound_assign(&b.op)) else {
                    return self.bug(e);
                };
                let l = self.expr(&b.left, ret, None);
                let r = self.expr(&b.right, ret, None);
                let var = match op {
                    BinOp::Shl | BinOp::Shr => {
                        self.integer(l.var, b.left.span());
                        self.integer(r.var, b.right.span());
                        l.var
                    }
                    BinOp::And | BinOp::Or => {
                        let t = self.known(Scalar::Bool, span);
                        self.same(t, l.var, b.left.span());
                        self.same(t, r.var, b.right.span());
                        t
                    }
                    _ if op.is_comparison() => {
                        self.same(l.var, r.var, span);
                        self.known(Scalar::Bool, span)
                    }
                    _ => {
                        self.same(l.var, r.var, span);
                        l.var
                    }
                };
                node(Kind::Binary(op, Box::new(l), Box::new(r)), var)
            }
            E::Cast(c) => {
                let to = match vocab::type_ref(&c.ty) {
                    vocab::TypeRef::Known(n, _) => Scalar::named(n),
                    _ => None,
                };
                let Some(to) = to.filter(|t| *t != Scalar::Bool) else {
                    return self.bug(&c.ty);
                };
                let inner = self.expr(&c.expr, ret, Some(to));
                node(Kind::Cast(to, Box::new(inner)), self.known(to, span))
            }
            E::If(i) => {
                let cond = self.cond(&i.cond, ret);
                let then = self.block(&i.then_branch, ret, true);
                let els = match &i.else_branch {
                    Some((_, e)) => self.else_value(e, ret),
                    None => return self.bug(e),
                };
                // A branch without a value ends in `return` (only at the hook's tail, as `check`
                // makes sure): its type is the other branch's.
                let var = match (&then.tail, &els.tail) {
                    (Some(a), Some(b)) => {
                        let (va, vb) = (a.var, b.var);
                        self.same(va, vb, span);
                        va
                    }
                    (Some(a), None) | (None, Some(a)) => a.var,
                    (None, None) => ret.unwrap_or_else(|| self.infer.var(Slot::Free, span)),
                };
                node(Kind::If(Box::new(cond), then, els), var)
            }
            _ => self.bug(e),
        }
    }

    /// The `else` of an `if` used as a value: a block, or an `else if` as a block whose tail is it.
    fn else_value(&mut self, e: &syn::Expr, ret: Option<usize>) -> Block {
        match e {
            syn::Expr::Block(b) => self.block(&b.block, ret, true),
            syn::Expr::Group(g) => self.else_value(&g.expr, ret),
            other => Block {
                stmts: Vec::new(),
                tail: Some(Box::new(self.expr(other, ret, None))),
            },
        }
    }

    fn method(&mut self, m: &syn::ExprMethodCall, ret: Option<usize>) -> Expr {
        let span = m.span();
        let name = m.method.unraw().to_string();
        if name == "len" {
            return match strip(&m.receiver) {
                f @ syn::Expr::Field(syn::ExprField {
                    member: syn::Member::Named(field),
                    ..
                }) if is_self_field(f) => node(
                    Kind::Len(field.unraw().to_string()),
                    self.known(Scalar::U32, span),
                ),
                _ => self.bug(m),
            };
        }
        let Some(method) = vocab::method(&name) else {
            return self.bug(m);
        };
        if m.args.len() != method.args {
            return self.bug(m);
        }
        let recv = self.expr(&m.receiver, ret, None);
        let args: Vec<Expr> = m.args.iter().map(|a| self.expr(a, ret, None)).collect();
        let var = match name.as_str() {
            "abs" => recv.var,
            "min" | "max" => {
                self.same(recv.var, args[0].var, span);
                recv.var
            }
            "is_multiple_of" => {
                let u = self.known(Scalar::U32, span);
                self.same(u, recv.var, m.receiver.span());
                self.same(u, args[0].var, m.args[0].span());
                self.known(Scalar::Bool, span)
            }
            // The float functions: f32 in, f32 out.
            _ => {
                let f = self.known(Scalar::F32, span);
                self.same(f, recv.var, m.receiver.span());
                for (a, s) in args.iter().zip(&m.args) {
                    self.same(f, a.var, s.span());
                }
                f
            }
        };
        let mut all = vec![recv];
        all.extend(args);
        node(Kind::Call(method, all), var)
    }

    fn lit(&mut self, lit: &syn::Lit, hint: Option<Scalar>) -> Expr {
        let span = lit.span();
        match lit {
            syn::Lit::Bool(b) => node(Kind::Bool(b.value), self.known(Scalar::Bool, span)),
            syn::Lit::Int(i) if i.suffix() == "f32" => match i.base10_parse::<f32>() {
                Ok(v) => node(Kind::Float(v), self.known(Scalar::F32, span)),
                Err(_) => self.bug(lit),
            },
            syn::Lit::Int(i) => {
                let Ok(v) = i.base10_parse::<u64>() else {
                    return self.bug(lit);
                };
                let slot = match (i.suffix(), hint) {
                    ("i32", _) => Slot::Known(Scalar::I32),
                    ("u32", _) => Slot::Known(Scalar::U32),
                    ("", Some(s @ (Scalar::I32 | Scalar::U32))) => Slot::Known(s),
                    _ => Slot::Int,
                };
                node(Kind::Int(v), self.infer.var(slot, span))
            }
            syn::Lit::Float(f) => match f.base10_parse::<f32>() {
                Ok(v) => {
                    let slot = match (f.suffix(), hint) {
                        ("f32", _) | ("", Some(Scalar::F32)) => Slot::Known(Scalar::F32),
                        _ => Slot::Float,
                    };
                    node(Kind::Float(v), self.infer.var(slot, span))
                }
                Err(_) => self.bug(lit),
            },
            other => self.bug(other),
        }
    }
}

fn strip(e: &syn::Expr) -> &syn::Expr {
    match e {
        syn::Expr::Group(g) => strip(&g.expr),
        syn::Expr::Paren(p) => strip(&p.expr),
        other => other,
    }
}

/// A block's last expression that is a statement even without `;` (assignment, `if` without
/// else): not the block's value.
fn is_stmt_like(e: &syn::Expr) -> bool {
    match e {
        syn::Expr::Assign(_) => true,
        syn::Expr::Binary(b) => is_compound_assign(&b.op),
        syn::Expr::If(i) => i.else_branch.is_none(),
        syn::Expr::Group(g) => is_stmt_like(&g.expr),
        _ => false,
    }
}

// ---- resolution --------------------------------------------------------------------------------

struct Resolver<'a> {
    infer: &'a mut Infer,
    errors: &'a mut Errors,
    /// Roots already reported as undecidable (one error per value, not per use).
    reported: Vec<usize>,
}

impl Resolver<'_> {
    fn ty(&mut self, var: usize, _kind: Option<&Kind>) -> Ty {
        let root = self.infer.root(var);
        match self.infer.slot[root].clone() {
            Slot::Known(s) => Ty::Scalar(s),
            // rustc's fallback for an integer nothing decides.
            Slot::Int | Slot::Free | Slot::Error => Ty::Scalar(Scalar::I32),
            Slot::Param(t, _) => t,
            Slot::Float => {
                if !self.reported.contains(&root) {
                    self.reported.push(root);
                    let span = self.infer.span[root];
                    self.errors.at_span(
                        span,
                        "the type of this float is not decided by its use, so Rust would make it an f64, which hooks do not have: write `f32` (`1.0f32`, `let x: f32 = ...`)",
                    );
                }
                Ty::Scalar(Scalar::F32)
            }
        }
    }

    fn block(&mut self, b: &mut Block) {
        for s in &mut b.stmts {
            match s {
                Stmt::Let(_, e) => {
                    if let Some(e) = e {
                        self.expr(e)
                    }
                }
                Stmt::Discard(e) | Stmt::Assign(_, _, e) | Stmt::Return(e) => self.expr(e),
                Stmt::If(c, t, e) => {
                    self.expr(c);
                    self.block(t);
                    if let Some(e) = e {
                        self.block(e);
                    }
                }
                Stmt::Block(b) => self.block(b),
            }
        }
        if let Some(t) = &mut b.tail {
            self.expr(t);
        }
    }

    fn expr(&mut self, e: &mut Expr) {
        e.ty = self.ty(e.var, Some(&e.kind));
        match &mut e.kind {
            Kind::Index(_, i) | Kind::Neg(i) | Kind::Not(i) | Kind::Cast(_, i) => self.expr(i),
            Kind::Binary(_, l, r) => {
                self.expr(l);
                self.expr(r);
            }
            Kind::Call(_, args) => args.iter_mut().for_each(|a| self.expr(a)),
            Kind::If(c, t, f) => {
                self.expr(c);
                self.block(t);
                self.block(f);
            }
            _ => {}
        }
    }
}
