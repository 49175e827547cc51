//! Lowering: the typed IR of a checked variant to the CUDA text of `struct Variant`. Deterministic,
//! readable, and total: every IR node has one printing, so nothing that `check` accepted can fail
//! here. It calls only what `kernels/cuda/variant/dsl.cuh` and `numeric.cuh` define plus CUDA's
//! float math functions.
//!
//! Every node's type is known, so a literal is printed in its exact type and arithmetic calls the
//! `fi::` helper of that type (`numeric.cuh` gives Rust's wrapping, shift, division and no-FMA
//! rules). Two things still need care because C++ is not Rust: operator precedence (an operand of
//! the operators kept as operators is parenthesised unless it binds tighter in both languages) and
//! scoping (C++ cannot redeclare a name in one scope, so every `let` gets a name unused so far in
//! the function).

use std::collections::BTreeSet;
use std::fmt::Write as _;

use crate::ir::{BinOp, Block, Expr, Func, Kind, Scalar, Stmt, Ty, Typed};
use crate::parse::VariantDef;
use crate::split::{self, Split};
use crate::tile;
use crate::vocab;

/// The CUDA `struct Variant` of a checked variant and its typed hooks.
pub fn variant(def: &VariantDef<'_>, typed: &Typed) -> String {
    let funcs = &typed.funcs;
    let mut s = format!(
        "// {}: lowered from Rust by #[attention_variant]\nstruct Variant {{\n",
        def.name
    );
    let _ = writeln!(s, "  static constexpr bool kSoftmax = {};", def.softmax());
    for sig in vocab::HOOKS {
        let _ = writeln!(
            s,
            "  static constexpr bool kHas{} = {};",
            capitalized(sig.name),
            def.hook(sig.name).is_some()
        );
    }
    for c in &typed.conflicts {
        // rustc refuses such a variant; this line is for the day it would not.
        let _ = writeln!(
            s,
            "  static_assert(false, \"#[attention_variant] could not type this variant ({}); please report it\");",
            c.replace('`', "'")
        );
    }
    for sig in vocab::HOOKS {
        if let Some(f) = funcs.iter().find(|f| f.sig.name == sig.name) {
            s.push_str(&function(f));
            if sig.name == "logits" {
                s.push_str(&logits_split(f));
            }
            if sig.name == "mask"
                && let Some(tile) = tile::mask_tile(f)
            {
                s.push_str(&tile);
            }
        }
    }
    s.push_str("};\n");
    s
}

/// `logits_pre`, `logits_post` and `logits_core`: the logits hook as `post * core(pre * s)`
/// (split.rs), for the prefill templates to fold their scales into; `kLogitsCoreBound` where
/// the core is bounded.
fn logits_split(func: &Func) -> String {
    let split = split::split(func);
    let scale = |name: &str, factor: Option<&Expr>| {
        let value = match factor {
            Some(e) => {
                let mut f = FnBody::new(func, None);
                f.expr(e, 2).text
            }
            None => "1.0f".to_string(),
        };
        format!(
            "  __device__ __forceinline__ static float {name}(const Params& self) {{\n    \
             return {value};\n  }}\n"
        )
    };
    let mut out = scale("logits_pre", split.pre.map(|(_, k)| k));
    out += &scale("logits_post", split.post.map(|(_, k, _)| k));
    if split.pre.is_none() && split.post.is_none() {
        out += "  __device__ __forceinline__ static float logits_core(const Params& self, float s, \
                const fi::Pos& at) {\n    return logits(self, s, at);\n  }\n";
    } else {
        out += &function_as(func, "logits_core", Some(&split));
    }
    if let Some(b) = split.core_bound {
        let _ = writeln!(out, "  static constexpr float kLogitsCoreBound = {b:e}f;");
    }
    out
}

fn capitalized(name: &str) -> String {
    let mut c = name.chars();
    c.next()
        .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
        .unwrap_or_default()
}

/// The CUDA text of `e`, an expression of `func` that reads no local (tile.rs's exact parts).
pub fn exact(func: &Func, e: &Expr) -> String {
    FnBody::new(func, None).expr(e, 2).text
}

/// One hook as a static member function.
pub fn function(func: &Func) -> String {
    function_as(func, func.sig.name, None)
}

/// A hook as the static member function `name`; with a split, its core (split.rs).
fn function_as(func: &Func, name: &str, split: Option<&Split>) -> String {
    let mut f = FnBody::new(func, split);
    let mut params = vec!["const Params& self".to_string()];
    for (id, (ty, _)) in func.args.iter().zip(func.sig.args) {
        match id {
            Some(id) => {
                let c = f.declare(*id);
                params.push(format!("{} {c}", ty.cuda_param()));
            }
            None => params.push(ty.cuda_param().to_string()),
        }
    }
    f.block_body(&func.body, 2, Mode::Return);
    format!(
        "  __device__ __forceinline__ static {} {name}({}) {{\n{}  }}\n",
        func.sig.ret.cuda_param(),
        params.join(", "),
        f.out
    )
}

/// A type in CUDA. A parameter's type is the Params struct's, which the runtime generates.
pub fn cuda_type(ty: &Ty) -> String {
    match ty {
        Ty::Scalar(s) => s.cuda().to_string(),
        Ty::Field(f) => format!("decltype(Params::{f})"),
        Ty::Elem(f) => format!("fi::elem_t<decltype(Params::{f})>"),
    }
}

/// How a block's tail is used: discarded, or returned (function body, lambda body).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Stmt,
    Return,
}

/// Binding strength of a lowered expression, loosest last.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Prec {
    /// Names, literals, calls, and anything already parenthesised.
    Atom,
    Unary,
    BitAnd,
    BitXor,
    BitOr,
    Cmp,
    And,
    Or,
}

impl Prec {
    fn rust_rank(self) -> u8 {
        self as u8
    }
    /// C++ ranks comparisons above the bitwise operators; everything else agrees with Rust.
    fn cxx_rank(self) -> u8 {
        match self {
            Prec::Cmp => Prec::Unary as u8 + 1,
            Prec::BitAnd | Prec::BitXor | Prec::BitOr => self as u8 + 1,
            other => other as u8,
        }
    }
}

/// A lowered expression and how tightly it binds.
struct Code {
    text: String,
    prec: Prec,
}

impl Code {
    fn atom(text: String) -> Self {
        Code {
            text,
            prec: Prec::Atom,
        }
    }
    /// This code as an operand of `parent`; `left` for the left operand of a binary operator.
    fn operand(self, parent: Prec, left: bool) -> String {
        let tighter =
            self.prec.rust_rank() < parent.rust_rank() && self.prec.cxx_rank() < parent.cxx_rank();
        // Every binary operator is left-associative in both languages, except comparisons in Rust.
        let same_left = self.prec == parent && left && parent != Prec::Cmp;
        let bare = match parent {
            Prec::Unary => self.prec == Prec::Atom,
            _ => self.prec == Prec::Atom || tighter || same_left,
        };
        if bare {
            self.text
        } else {
            format!("({})", self.text)
        }
    }
}

/// The lowering of one function body.
struct FnBody<'f> {
    func: &'f Func,
    out: String,
    /// The CUDA name of each local, once declared.
    names: Vec<String>,
    /// Every CUDA name declared so far in the function: never reused.
    used: BTreeSet<String>,
    /// Lowering the core of a split logits hook: its scales are left out.
    split: Option<&'f Split<'f>>,
}

fn pad(indent: usize) -> String {
    "  ".repeat(indent)
}

impl<'f> FnBody<'f> {
    fn new(func: &'f Func, split: Option<&'f Split<'f>>) -> Self {
        FnBody {
            func,
            out: String::new(),
            names: vec![String::new(); func.locals.len()],
            used: BTreeSet::new(),
            split,
        }
    }

    fn line(&mut self, indent: usize, text: &str) {
        let _ = writeln!(self.out, "{}{text}", pad(indent));
    }

    /// Give a local a fresh CUDA name: `x`, then `x_1`, `x_2`... (`float_` for keywords).
    fn declare(&mut self, id: usize) -> String {
        let rust = &self.func.locals[id].name;
        let base = if vocab::is_reserved_in_cuda(rust) {
            format!("{rust}_")
        } else {
            rust.clone()
        };
        let mut cuda = base.clone();
        let mut n = 1;
        while self.used.contains(&cuda) {
            cuda = format!("{base}_{n}");
            n += 1;
        }
        self.used.insert(cuda.clone());
        self.names[id] = cuda.clone();
        cuda
    }

    /// The statements of a block at `indent`.
    fn block_body(&mut self, block: &Block, indent: usize, mode: Mode) {
        for stmt in &block.stmts {
            self.stmt(stmt, indent, mode);
        }
        if let Some(tail) = &block.tail {
            match mode {
                Mode::Return => self.return_tail(tail, indent),
                Mode::Stmt => self.discard(tail, indent),
            }
        }
    }

    /// A statement; `mode` is that of the enclosing block, for the branches of an `if`.
    fn stmt(&mut self, stmt: &Stmt, indent: usize, mode: Mode) {
        match stmt {
            Stmt::Let(id, init) => {
                let local = &self.func.locals[*id];
                let ty = cuda_type(&local.ty);
                let mutable = local.mutable;
                let value = init.as_ref().map(|e| self.expr(e, indent).text);
                let name = self.declare(*id);
                let line = match value {
                    Some(v) if mutable => format!("{ty} {name} = {v};"),
                    Some(v) => format!("const {ty} {name} = {v};"),
                    None => format!("{ty} {name};"),
                };
                self.line(indent, &line);
            }
            Stmt::Discard(e) => self.discard(e, indent),
            Stmt::Assign(id, op, value) => {
                let target = self.names[*id].clone();
                let value = match op {
                    None => self.expr(value, indent).text,
                    Some(op) => {
                        let lhs = Code::atom(target.clone());
                        let rhs = self.expr(value, indent);
                        binary(*op, &self.func.locals[*id].ty, lhs, rhs).text
                    }
                };
                self.line(indent, &format!("{target} = {value};"));
            }
            Stmt::If(cond, then, els) => {
                let cond = self.expr(cond, indent).text;
                self.line(indent, &format!("if ({cond}) {{"));
                self.block_body(then, indent + 1, Mode::Stmt);
                if let Some(els) = els {
                    self.line(indent, "} else {");
                    self.block_body(els, indent + 1, Mode::Stmt);
                }
                self.line(indent, "}");
            }
            Stmt::Block(b) => {
                self.line(indent, "{");
                self.block_body(b, indent + 1, mode);
                self.line(indent, "}");
            }
            Stmt::Return(e) => {
                let text = self.expr(e, indent).text;
                self.line(indent, &format!("return {text};"));
            }
        }
    }

    /// A value computed for nothing (`let _ = e;`): kept, so an out-of-range index still traps.
    fn discard(&mut self, e: &Expr, indent: usize) {
        if matches!(e.kind, Kind::Local(_)) {
            return;
        }
        let text = self.expr(e, indent).text;
        self.line(indent, &format!("(void)({text});"));
    }

    /// The value of a function or lambda body: returned.
    fn return_tail(&mut self, e: &Expr, indent: usize) {
        if let Some((node, _, rest)) = self.split.and_then(|s| s.post.as_ref())
            && std::ptr::eq(e, *node)
        {
            return self.return_tail(rest, indent);
        }
        match &e.kind {
            Kind::If(c, t, f) if !is_simple(t, f) => self.if_return(c, t, f, indent),
            _ => {
                let text = self.expr(e, indent).text;
                self.line(indent, &format!("return {text};"));
            }
        }
    }

    /// An `if` whose branches return their values, with `else if` chains kept flat.
    fn if_return(&mut self, cond: &Expr, then: &Block, els: &Block, indent: usize) {
        let cond = self.expr(cond, indent).text;
        self.line(indent, &format!("if ({cond}) {{"));
        let (mut then, mut els) = (then, els);
        loop {
            self.block_body(then, indent + 1, Mode::Return);
            match (&els.stmts[..], els.tail.as_deref().map(|e| &e.kind)) {
                ([], Some(Kind::If(c, t, f))) if !is_simple(t, f) => {
                    let c = self.expr(c, indent).text;
                    self.line(indent, &format!("}} else if ({c}) {{"));
                    (then, els) = (t, f);
                }
                _ => {
                    self.line(indent, "} else {");
                    self.block_body(els, indent + 1, Mode::Return);
                    self.line(indent, "}");
                    return;
                }
            }
        }
    }

    /// An expression used as a value; `indent` is that of the statement, for a lambda's body.
    fn expr(&mut self, e: &Expr, indent: usize) -> Code {
        if let Some((node, factor)) = self.split.and_then(|s| s.pre.as_ref())
            && std::ptr::eq(e, *node)
            && let Kind::Binary(_, l, r) = &e.kind
        {
            // The core's argument is the product already.
            let score = if std::ptr::eq(&**l, *factor) { r } else { l };
            return self.expr(score, indent);
        }
        match &e.kind {
            Kind::Bool(b) => Code::atom(b.to_string()),
            Kind::Int(v) => Code::atom(int_literal(*v, &e.ty)),
            Kind::Float(v) => Code::atom(float_literal(*v)),
            Kind::Local(id) => Code::atom(self.names[*id].clone()),
            Kind::Pos(field) => {
                let at = self
                    .func
                    .args
                    .iter()
                    .zip(self.func.sig.args)
                    .find(|(_, (t, _))| *t == vocab::SigTy::Pos)
                    .and_then(|(id, _)| *id)
                    .map_or_else(|| "at".to_string(), |id| self.names[id].clone());
                Code::atom(format!("{at}.{field}"))
            }
            Kind::Field(f) => Code::atom(format!("self.{f}")),
            Kind::Index(f, i) => {
                let index = self.expr(i, indent).text;
                Code::atom(format!("fi::index(self.{f}, self.{f}_len, {index})"))
            }
            Kind::Len(f) => Code::atom(format!("self.{f}_len")),
            Kind::Const(c) => Code::atom(c.to_string()),
            // `-5` on i32: the literal itself (rustc folds it too, so `-2147483648` is fine).
            Kind::Neg(x) if e.ty == Ty::Scalar(Scalar::I32) && matches!(x.kind, Kind::Int(_)) => {
                let Kind::Int(v) = x.kind else { unreachable!() };
                Code::atom(int_literal(u64::from(0u32.wrapping_sub(v as u32)), &e.ty))
            }
            Kind::Neg(x) => {
                let operand = self.expr(x, indent);
                match e.ty {
                    Ty::Scalar(Scalar::F32) => unary("-", operand),
                    _ => Code::atom(format!("fi::neg({})", operand.text)),
                }
            }
            // `!` is logical on bool and bitwise on integers; C++ splits the two.
            Kind::Not(x) => {
                let operand = self.expr(x, indent);
                match e.ty {
                    Ty::Scalar(Scalar::Bool) => unary("!", operand),
                    Ty::Scalar(_) => unary("~", operand),
                    _ => Code::atom(format!("fi::bit_not({})", operand.text)),
                }
            }
            Kind::Binary(op, l, r) => {
                let ty = l.ty.clone();
                let (l, r) = (self.expr(l, indent), self.expr(r, indent));
                binary(*op, &ty, l, r)
            }
            Kind::Cast(to, x) => {
                let value = self.expr(x, indent).text;
                Code::atom(format!("fi::as_{}({value})", to.rust()))
            }
            Kind::Call(m, args) => {
                let parts: Vec<String> = args.iter().map(|a| self.expr(a, indent).text).collect();
                Code::atom(format!("{}({})", m.cuda, parts.join(", ")))
            }
            Kind::If(c, t, f) if is_simple(t, f) => {
                let cond = self.expr(c, indent).text;
                let a = self.expr(t.tail.as_ref().expect("simple"), indent).text;
                let b = self.expr(f.tail.as_ref().expect("simple"), indent).text;
                Code::atom(format!("({cond} ? {a} : {b})"))
            }
            Kind::If(c, t, f) => {
                // An if-else with statements, used as a value: an immediately invoked lambda
                // (`check` keeps `return` out of it).
                let outer = std::mem::take(&mut self.out);
                self.if_return(c, t, f, indent + 1);
                let body = std::mem::replace(&mut self.out, outer);
                Code::atom(format!(
                    "[&]() -> {} {{\n{body}{}}}()",
                    cuda_type(&e.ty),
                    pad(indent)
                ))
            }
        }
    }
}

/// A binary operator on operands of type `ty` (both sides have it, but for shifts).
fn binary(op: BinOp, ty: &Ty, l: Code, r: Code) -> Code {
    let helper = match op {
        BinOp::Add => Some("add"),
        BinOp::Sub => Some("sub"),
        BinOp::Mul => Some("mul"),
        BinOp::Div => Some("div"),
        BinOp::Rem => Some("rem"),
        BinOp::Shl => Some("shl"),
        BinOp::Shr => Some("shr"),
        _ => None,
    };
    if let Some(h) = helper {
        return Code::atom(format!("fi::{h}({}, {})", l.text, r.text));
    }
    let prec = match op {
        BinOp::BitAnd => Prec::BitAnd,
        BinOp::BitXor => Prec::BitXor,
        BinOp::BitOr => Prec::BitOr,
        BinOp::And => Prec::And,
        BinOp::Or => Prec::Or,
        _ => Prec::Cmp,
    };
    let text = format!(
        "{} {} {}",
        l.operand(prec, true),
        op.rust(),
        r.operand(prec, false)
    );
    // `&`, `|`, `^` on bool give an int in C++: back to bool, so `auto` and overloads see a bool.
    if ty == &Ty::Scalar(Scalar::Bool) && matches!(prec, Prec::BitAnd | Prec::BitXor | Prec::BitOr)
    {
        return Code::atom(format!("static_cast<bool>({text})"));
    }
    Code { text, prec }
}

fn unary(op: &str, operand: Code) -> Code {
    Code {
        text: format!("{op}{}", operand.operand(Prec::Unary, false)),
        prec: Prec::Unary,
    }
}

/// An if-else whose branches are single values: it lowers to `?:`.
fn is_simple(then: &Block, els: &Block) -> bool {
    let simple = |b: &Block| b.stmts.is_empty() && b.tail.is_some();
    simple(then) && simple(els)
}

/// An integer literal of type `ty`: `7` (i32), `7u` (u32), or converted to a parameter's type.
fn int_literal(v: u64, ty: &Ty) -> String {
    // A value above the type's range is a rustc error (deny-by-default `overflowing_literals`);
    // where allowed it wraps, as here.
    let bits = v as u32;
    match ty {
        Ty::Scalar(Scalar::I32) => match bits as i32 {
            // -2147483648 would be a long long in C++ (the literal is positive, then negated).
            i32::MIN => "(-2147483647 - 1)".to_string(),
            i => i.to_string(),
        },
        Ty::Scalar(Scalar::U32) => format!("{bits}u"),
        // An integer literal is never f32 or bool in Rust (rustc refuses the variant).
        Ty::Scalar(Scalar::F32) => float_literal(v as f32),
        Ty::Scalar(Scalar::Bool) => (v != 0).to_string(),
        other => format!("static_cast<{}>({bits}u)", cuda_type(other)),
    }
}

/// An f32 literal: Rust's shortest round-tripping digits, which C++ reads back to the same bits.
fn float_literal(v: f32) -> String {
    if v.is_infinite() {
        return if v > 0.0 { "FI_INF" } else { "(-FI_INF)" }.to_string();
    }
    let s = format!("{v:?}");
    if s.contains(['.', 'e', 'E']) {
        format!("{s}f")
    } else {
        format!("{s}.0f")
    }
}
