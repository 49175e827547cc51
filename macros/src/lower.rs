//! Lowering: a checked variant to the CUDA text of `struct Variant`. Deterministic and readable;
//! it calls only what `kernels/cuda/variant/dsl.cuh` defines plus CUDA's float math functions.
//!
//! Two things need care because C++ is not Rust: operator precedence (an operand is parenthesised
//! unless it binds tighter in both languages) and scoping (C++ cannot redeclare a name in one scope,
//! so every `let` gets a name unused so far in the function). A few literal and operator forms
//! depend on the Rust type; where it is evident from the syntax it is used, else a `fi::` helper
//! that is overloaded on the C++ type decides.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use syn::ext::IdentExt;
use syn::{BinOp, Block, Expr, ExprIf, Lit, Pat, Stmt, Type, UnOp};

use crate::check::{is_compound_assign, is_self};
use crate::parse::{Hook, VariantDef};
use crate::vocab::{self, SigTy};

/// The CUDA `struct Variant` of a checked variant.
pub fn variant(def: &VariantDef<'_>) -> String {
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
    for sig in vocab::HOOKS {
        if let Some(hook) = def.hook(sig.name) {
            s.push_str(&function(hook));
        }
    }
    s.push_str("};\n");
    s
}

fn capitalized(name: &str) -> String {
    let mut c = name.chars();
    c.next()
        .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
        .unwrap_or_default()
}

fn function(hook: &Hook<'_>) -> String {
    let mut f = FnBody::default();
    f.scopes.push(Vec::new());
    let mut params = vec!["const Params& self".to_string()];
    for (name, (ty, _)) in crate::parse::arg_names(hook.func)
        .into_iter()
        .zip(hook.sig.args)
    {
        match name {
            Some(n) => {
                let c = f.declare(&n, scalar(*ty));
                params.push(format!("{} {c}", ty.cuda_param()));
            }
            None => params.push(ty.cuda_param().to_string()),
        }
    }
    f.block_body(&hook.func.block, 2, Mode::Return);
    format!(
        "  __device__ __forceinline__ static {} {}({}) {{\n{}  }}\n",
        hook.sig.ret.cuda_param(),
        hook.sig.name,
        params.join(", "),
        f.out
    )
}

/// The Rust scalar type of an expression, where the syntax shows it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Ty {
    F32,
    I32,
    U32,
    Bool,
}

fn scalar(ty: SigTy) -> Option<Ty> {
    match ty {
        SigTy::F32 => Some(Ty::F32),
        SigTy::U32 => Some(Ty::U32),
        SigTy::Bool => Some(Ty::Bool),
        SigTy::Pos => None,
    }
}

/// The scalar a type names, in any spelling `check` accepts (`f32`, `core::primitive::f32`...).
fn type_named(ty: &Type) -> Option<(Ty, &'static str)> {
    let vocab::TypeRef::Known(name, _) = vocab::type_ref(ty) else {
        return None;
    };
    scalar_named(name)
}

fn scalar_named(name: &str) -> Option<(Ty, &'static str)> {
    [
        ("f32", Ty::F32, "float"),
        ("i32", Ty::I32, "int"),
        ("u32", Ty::U32, "unsigned"),
        ("bool", Ty::Bool, "bool"),
    ]
    .into_iter()
    .find(|(r, _, _)| *r == name)
    .map(|(_, t, c)| (t, c))
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
    Mul,
    Add,
    Shift,
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
            Prec::Cmp => Prec::Shift as u8 + 1,
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

struct Local {
    rust: String,
    cuda: String,
    ty: Option<Ty>,
}

/// The lowering of one function body.
#[derive(Default)]
struct FnBody {
    out: String,
    scopes: Vec<Vec<Local>>,
    /// Every CUDA name declared so far in the function: never reused.
    used: BTreeSet<String>,
}

fn pad(indent: usize) -> String {
    "  ".repeat(indent)
}

impl FnBody {
    fn line(&mut self, indent: usize, text: &str) {
        let _ = writeln!(self.out, "{}{text}", pad(indent));
    }

    /// Bind a Rust name to a fresh CUDA name: `x`, then `x_1`, `x_2`... (`float_` for keywords).
    fn declare(&mut self, rust: &str, ty: Option<Ty>) -> String {
        let base = if vocab::is_reserved_in_cuda(rust) {
            format!("{rust}_")
        } else {
            rust.to_string()
        };
        let mut cuda = base.clone();
        let mut n = 1;
        while self.used.contains(&cuda) {
            cuda = format!("{base}_{n}");
            n += 1;
        }
        self.used.insert(cuda.clone());
        self.scopes.last_mut().expect("a scope").push(Local {
            rust: rust.to_string(),
            cuda: cuda.clone(),
            ty,
        });
        cuda
    }

    fn lookup(&self, rust: &str) -> Option<&Local> {
        self.scopes
            .iter()
            .rev()
            .find_map(|s| s.iter().rev().find(|l| l.rust == rust))
    }

    fn local_of(&self, e: &Expr) -> Option<&Local> {
        match e {
            Expr::Path(p) => p
                .path
                .get_ident()
                .and_then(|i| self.lookup(&i.unraw().to_string())),
            _ => None,
        }
    }

    /// The statements of a block at `indent`, in a new scope.
    fn block_body(&mut self, block: &Block, indent: usize, mode: Mode) {
        self.scopes.push(Vec::new());
        let n = block.stmts.len();
        for (k, stmt) in block.stmts.iter().enumerate() {
            match stmt {
                Stmt::Expr(e, None) if k + 1 == n && mode == Mode::Return => {
                    self.return_stmt(e, indent)
                }
                Stmt::Local(local) => self.local(local, indent),
                Stmt::Expr(e, _) => self.stmt(e, indent),
                // Rejected by `check`.
                Stmt::Item(_) | Stmt::Macro(_) => {}
            }
        }
        self.scopes.pop();
    }

    fn local(&mut self, local: &syn::Local, indent: usize) {
        let (pat, annotated) = match &local.pat {
            Pat::Type(t) => (&*t.pat, type_named(&t.ty)),
            p => (p, None),
        };
        let p = match pat {
            Pat::Ident(p) => p,
            Pat::Wild(_) => {
                // `let _ = at;` only silences an unused argument in Rust: nothing to lower.
                if let Some(init) = &local.init
                    && !matches!(strip_group(&init.expr), Expr::Path(_))
                {
                    let value = self.expr(&init.expr, indent, None).text;
                    self.line(indent, &format!("(void)({value});"));
                }
                return;
            }
            _ => return,
        };
        let mutable = p.mutability.is_some();
        let expect = annotated.map(|(t, _)| t);
        let init = local
            .init
            .as_ref()
            .map(|i| (self.expr(&i.expr, indent, expect).text, self.ty_of(&i.expr)));
        let ty = expect.or(init.as_ref().and_then(|(_, t)| *t));
        let name = self.declare(&p.ident.unraw().to_string(), ty);
        let cty = annotated.map_or("auto", |(_, c)| c);
        let line = match init {
            Some((value, _)) if mutable => format!("{cty} {name} = {value};"),
            Some((value, _)) => format!("const {cty} {name} = {value};"),
            None => format!("{cty} {name};"),
        };
        self.line(indent, &line);
    }

    /// An expression in statement position.
    fn stmt(&mut self, e: &Expr, indent: usize) {
        match e {
            Expr::If(i) => self.if_stmt(i, indent, Mode::Stmt),
            Expr::Block(b) => {
                self.line(indent, "{");
                self.block_body(&b.block, indent + 1, Mode::Stmt);
                self.line(indent, "}");
            }
            Expr::Return(r) => self.return_value(r.expr.as_deref(), indent),
            Expr::Assign(a) => {
                let target = self.expr(&a.left, indent, None).text;
                let ty = self.ty_of(&a.left);
                let value = self.expr(&a.right, indent, ty).text;
                self.line(indent, &format!("{target} = {value};"));
            }
            Expr::Binary(b) if is_compound_assign(&b.op) => self.compound(b, indent),
            Expr::Group(g) => self.stmt(&g.expr, indent),
            other => {
                let text = self.expr(other, indent, None).text;
                self.line(indent, &format!("{text};"));
            }
        }
    }

    fn compound(&mut self, b: &syn::ExprBinary, indent: usize) {
        let target = self.expr(&b.left, indent, None).text;
        let ty = self.ty_of(&b.left);
        let value = self.expr(&b.right, indent, ty);
        let op = match b.op {
            BinOp::AddAssign(_) => "+=",
            BinOp::SubAssign(_) => "-=",
            BinOp::MulAssign(_) => "*=",
            BinOp::DivAssign(_) => "/=",
            BinOp::BitXorAssign(_) => "^=",
            BinOp::BitAndAssign(_) => "&=",
            BinOp::BitOrAssign(_) => "|=",
            BinOp::ShlAssign(_) => "<<=",
            BinOp::ShrAssign(_) => ">>=",
            _ => {
                let lhs = Code::atom(target.clone());
                let rem = remainder(ty, lhs, value);
                self.line(indent, &format!("{target} = {};", rem.text));
                return;
            }
        };
        self.line(indent, &format!("{target} {op} {};", value.text));
    }

    /// The tail of a function or lambda body: returned.
    fn return_stmt(&mut self, e: &Expr, indent: usize) {
        match e {
            Expr::If(i) if !is_simple_if(i) => self.if_stmt(i, indent, Mode::Return),
            Expr::Return(r) => self.return_value(r.expr.as_deref(), indent),
            Expr::Block(b) => {
                self.line(indent, "{");
                self.block_body(&b.block, indent + 1, Mode::Return);
                self.line(indent, "}");
            }
            Expr::Group(g) => self.return_stmt(&g.expr, indent),
            other => self.return_value(Some(other), indent),
        }
    }

    fn return_value(&mut self, e: Option<&Expr>, indent: usize) {
        match e {
            Some(e) => {
                let text = self.expr(e, indent, None).text;
                self.line(indent, &format!("return {text};"));
            }
            None => self.line(indent, "return;"),
        }
    }

    fn if_stmt(&mut self, first: &ExprIf, indent: usize, mode: Mode) {
        let cond = self.expr(&first.cond, indent, None).text;
        self.line(indent, &format!("if ({cond}) {{"));
        let mut cur = first;
        loop {
            self.block_body(&cur.then_branch, indent + 1, mode);
            let Some((_, els)) = &cur.else_branch else {
                self.line(indent, "}");
                return;
            };
            match strip_group(els) {
                Expr::If(next) => {
                    let cond = self.expr(&next.cond, indent, None).text;
                    self.line(indent, &format!("}} else if ({cond}) {{"));
                    cur = next;
                }
                Expr::Block(b) => {
                    self.line(indent, "} else {");
                    self.block_body(&b.block, indent + 1, mode);
                    self.line(indent, "}");
                    return;
                }
                _ => return,
            }
        }
    }

    /// An expression used as a value. `expect` is the Rust type the context gives it, if known (it
    /// decides whether an unsuffixed integer literal is unsigned). `indent` is that of the
    /// statement, for the body of a lambda.
    fn expr(&mut self, e: &Expr, indent: usize, expect: Option<Ty>) -> Code {
        match e {
            Expr::Lit(l) => Code::atom(literal(&l.lit, expect)),
            Expr::Path(p) => {
                if let Some(local) = self.local_of(e) {
                    return Code::atom(local.cuda.clone());
                }
                let c = vocab::constant(&p.path).map_or("/* unknown */", |c| c.cuda);
                Code::atom(c.to_string())
            }
            Expr::Field(f) => {
                let base = if is_self(&f.base) {
                    "self".to_string()
                } else {
                    self.expr(&f.base, indent, None).text
                };
                Code::atom(format!("{base}.{}", member(&f.member)))
            }
            Expr::Index(ix) => {
                let field = match &*ix.expr {
                    Expr::Field(f) => member(&f.member),
                    _ => String::new(),
                };
                let index = self.expr(&ix.index, indent, None).text;
                Code::atom(format!(
                    "fi::index(self.{field}, self.{field}_len, {index})"
                ))
            }
            Expr::MethodCall(m) => self.method(m, indent, expect),
            Expr::Binary(b) => self.binary(b, indent, expect),
            Expr::Unary(u) => {
                let ty = self.ty_of(&u.expr);
                let operand = self.expr(&u.expr, indent, expect);
                match u.op {
                    UnOp::Neg(_) => unary("-", operand),
                    // `!` is logical on bool and bitwise on integers; C++ splits the two.
                    _ => match ty {
                        Some(Ty::Bool) => unary("!", operand),
                        Some(_) => unary("~", operand),
                        None => Code::atom(format!("fi::bit_not({})", operand.text)),
                    },
                }
            }
            Expr::Cast(c) => {
                let to = type_named(&c.ty).map_or("f32", |(t, _)| match t {
                    Ty::I32 => "i32",
                    Ty::U32 => "u32",
                    _ => "f32",
                });
                let value = self.expr(&c.expr, indent, None).text;
                Code::atom(format!("fi::as_{to}({value})"))
            }
            Expr::Paren(p) => self.expr(&p.expr, indent, expect),
            Expr::Group(g) => self.expr(&g.expr, indent, expect),
            Expr::If(i) if is_simple_if(i) => self.ternary(i, indent, expect),
            Expr::If(i) => {
                // An if-else with statements, used as a value: an immediately invoked lambda.
                let outer = std::mem::take(&mut self.out);
                self.if_stmt(i, indent + 1, Mode::Return);
                let body = std::mem::replace(&mut self.out, outer);
                Code::atom(format!("[&]() {{\n{body}{}}}()", pad(indent)))
            }
            // Rejected by `check`.
            _ => Code::atom("/* unsupported */".to_string()),
        }
    }

    fn ternary(&mut self, i: &ExprIf, indent: usize, expect: Option<Ty>) -> Code {
        let then = tail(&i.then_branch);
        let els = i.else_branch.as_ref().map(|(_, e)| strip_group(e));
        let els = match els {
            Some(Expr::Block(b)) => tail(&b.block),
            other => other,
        };
        let (Some(then), Some(els)) = (then, els) else {
            return Code::atom("/* unsupported */".to_string());
        };
        let expect = expect.or(self.ty_of(then)).or(self.ty_of(els));
        let cond = self.expr(&i.cond, indent, None).text;
        let a = self.expr(then, indent, expect).text;
        let b = self.expr(els, indent, expect).text;
        Code::atom(format!("({cond} ? {a} : {b})"))
    }

    fn method(&mut self, m: &syn::ExprMethodCall, indent: usize, expect: Option<Ty>) -> Code {
        let name = m.method.unraw().to_string();
        if name == "len" {
            let field = match &*m.receiver {
                Expr::Field(f) => member(&f.member),
                _ => String::new(),
            };
            return Code::atom(format!("self.{field}_len"));
        }
        let cuda = vocab::method(&name).map_or("/* unknown */", |k| k.cuda);
        // The only method whose result type is not its receiver's: both sides are u32.
        let expect = if name == "is_multiple_of" {
            Some(Ty::U32)
        } else {
            expect
        };
        // min/max: both sides have one type; an unsuffixed literal on one side takes the other's
        // (so `fi::min(unsigned, 3u)` resolves, where `fi::min(unsigned, 3)` is ambiguous).
        let arg_ty = m.args.first().and_then(|a| self.ty_of(a));
        let recv_ty = self.ty_of(&m.receiver);
        let recv = self.expr(&m.receiver, indent, expect.or(arg_ty)).text;
        let mut parts = vec![recv];
        for a in &m.args {
            parts.push(self.expr(a, indent, expect.or(recv_ty)).text);
        }
        Code::atom(format!("{cuda}({})", parts.join(", ")))
    }

    fn binary(&mut self, b: &syn::ExprBinary, indent: usize, expect: Option<Ty>) -> Code {
        let (lt, rt) = (self.ty_of(&b.left), self.ty_of(&b.right));
        let (op, prec) = match b.op {
            BinOp::Add(_) => ("+", Prec::Add),
            BinOp::Sub(_) => ("-", Prec::Add),
            BinOp::Mul(_) => ("*", Prec::Mul),
            BinOp::Div(_) => ("/", Prec::Mul),
            BinOp::Rem(_) => ("%", Prec::Mul),
            BinOp::BitAnd(_) => ("&", Prec::BitAnd),
            BinOp::BitXor(_) => ("^", Prec::BitXor),
            BinOp::BitOr(_) => ("|", Prec::BitOr),
            BinOp::Shl(_) => ("<<", Prec::Shift),
            BinOp::Shr(_) => (">>", Prec::Shift),
            BinOp::Eq(_) => ("==", Prec::Cmp),
            BinOp::Ne(_) => ("!=", Prec::Cmp),
            BinOp::Lt(_) => ("<", Prec::Cmp),
            BinOp::Le(_) => ("<=", Prec::Cmp),
            BinOp::Gt(_) => (">", Prec::Cmp),
            BinOp::Ge(_) => (">=", Prec::Cmp),
            BinOp::And(_) => ("&&", Prec::And),
            BinOp::Or(_) => ("||", Prec::Or),
            _ => return Code::atom("/* unsupported */".to_string()),
        };
        // What each operand's unsuffixed literals should be.
        let (le, re) = match prec {
            Prec::Shift => (expect, rt),
            Prec::Cmp => (rt, lt),
            Prec::And | Prec::Or => (None, None),
            _ => (expect.or(rt), expect.or(lt)),
        };
        let left = self.expr(&b.left, indent, le);
        let right = self.expr(&b.right, indent, re);
        if op == "%" {
            return remainder(expect.or(lt).or(rt), left, right);
        }
        Code {
            text: format!(
                "{} {op} {}",
                left.operand(prec, true),
                right.operand(prec, false)
            ),
            prec,
        }
    }

    /// The Rust type of `e`, where the syntax (and the declared locals) show it.
    fn ty_of(&self, e: &Expr) -> Option<Ty> {
        match e {
            Expr::Lit(l) => match &l.lit {
                Lit::Int(i) => match i.suffix() {
                    "f32" => Some(Ty::F32),
                    "u32" => Some(Ty::U32),
                    "i32" => Some(Ty::I32),
                    _ => None,
                },
                Lit::Float(_) => Some(Ty::F32),
                Lit::Bool(_) => Some(Ty::Bool),
                _ => None,
            },
            Expr::Path(p) => match self.local_of(e) {
                Some(local) => local.ty,
                None => vocab::constant(&p.path)
                    .and_then(|c| scalar_named(c.ty))
                    .map(|(t, _)| t),
            },
            // Pos fields are u32; parameter fields are not visible to this macro.
            Expr::Field(f) if !is_self(&f.base) => Some(Ty::U32),
            Expr::MethodCall(m) if m.method == "len" => Some(Ty::U32),
            Expr::MethodCall(m) => match m.method.to_string().as_str() {
                "abs" => self.ty_of(&m.receiver),
                "is_multiple_of" => Some(Ty::Bool),
                "min" | "max" => self
                    .ty_of(&m.receiver)
                    .or_else(|| m.args.first().and_then(|a| self.ty_of(a))),
                _ => Some(Ty::F32),
            },
            Expr::Binary(b) => match b.op {
                BinOp::Eq(_)
                | BinOp::Ne(_)
                | BinOp::Lt(_)
                | BinOp::Le(_)
                | BinOp::Gt(_)
                | BinOp::Ge(_)
                | BinOp::And(_)
                | BinOp::Or(_) => Some(Ty::Bool),
                BinOp::Shl(_) | BinOp::Shr(_) => self.ty_of(&b.left),
                _ => self.ty_of(&b.left).or_else(|| self.ty_of(&b.right)),
            },
            Expr::Unary(u) => self.ty_of(&u.expr),
            Expr::Cast(c) => type_named(&c.ty).map(|(t, _)| t),
            Expr::Paren(p) => self.ty_of(&p.expr),
            Expr::Group(g) => self.ty_of(&g.expr),
            Expr::If(i) => tail(&i.then_branch)
                .and_then(|t| self.ty_of(t))
                .or_else(|| {
                    i.else_branch
                        .as_ref()
                        .and_then(|(_, e)| match strip_group(e) {
                            Expr::Block(b) => tail(&b.block).and_then(|t| self.ty_of(t)),
                            other => self.ty_of(other),
                        })
                }),
            _ => None,
        }
    }
}

fn unary(op: &str, operand: Code) -> Code {
    Code {
        text: format!("{op}{}", operand.operand(Prec::Unary, false)),
        prec: Prec::Unary,
    }
}

/// Rust's `%`: truncated remainder on integers (C++ `%`), `fmodf` on f32 (C++ has no float `%`).
fn remainder(ty: Option<Ty>, left: Code, right: Code) -> Code {
    match ty {
        Some(Ty::F32) => Code::atom(format!("fmodf({}, {})", left.text, right.text)),
        Some(_) => Code {
            text: format!(
                "{} % {}",
                left.operand(Prec::Mul, true),
                right.operand(Prec::Mul, false)
            ),
            prec: Prec::Mul,
        },
        None => Code::atom(format!("fi::rem({}, {})", left.text, right.text)),
    }
}

fn member(m: &syn::Member) -> String {
    match m {
        syn::Member::Named(i) => i.unraw().to_string(),
        syn::Member::Unnamed(i) => i.index.to_string(),
    }
}

fn strip_group(e: &Expr) -> &Expr {
    match e {
        Expr::Group(g) => strip_group(&g.expr),
        other => other,
    }
}

/// The block's value when it is nothing but a tail expression.
fn tail(b: &Block) -> Option<&Expr> {
    match b.stmts.as_slice() {
        [Stmt::Expr(e, None)] => Some(strip_group(e)),
        _ => None,
    }
}

/// An if-else whose every branch is a single value (not a `return`): it lowers to `?:`.
fn is_simple_if(i: &ExprIf) -> bool {
    let simple_tail = |b: &Block| tail(b).is_some_and(|e| !matches!(e, Expr::Return(_)));
    if !simple_tail(&i.then_branch) {
        return false;
    }
    match i.else_branch.as_ref().map(|(_, e)| strip_group(e)) {
        Some(Expr::Block(b)) => simple_tail(&b.block),
        Some(Expr::If(next)) => is_simple_if(next),
        _ => false,
    }
}

/// A literal in CUDA: floats always with a point or exponent and `f`, unsigned with `u`.
fn literal(lit: &Lit, expect: Option<Ty>) -> String {
    match lit {
        Lit::Int(i) if i.suffix() == "f32" => float_literal(i.base10_digits()),
        Lit::Int(i) => {
            let digits = i.base10_digits();
            // Rust types an unsuffixed literal above i32::MAX as u32 (it cannot be an i32).
            let big = digits.parse::<u64>().is_ok_and(|v| v > i32::MAX as u64);
            let unsigned =
                i.suffix() == "u32" || (i.suffix().is_empty() && (big || expect == Some(Ty::U32)));
            if unsigned {
                format!("{digits}u")
            } else {
                digits.to_string()
            }
        }
        Lit::Float(f) => float_literal(f.base10_digits()),
        Lit::Bool(b) => b.value.to_string(),
        _ => "/* unsupported */".to_string(),
    }
}

fn float_literal(digits: &str) -> String {
    let mut s = digits.to_string();
    if s.ends_with('.') {
        s.push('0');
    } else if !s.contains(['.', 'e', 'E']) {
        s.push_str(".0");
    }
    s.push('f');
    s
}
