//! The differential test of the lowering. A seeded generator writes random, well-typed hook bodies
//! over everything the DSL accepts (every type, operator, cast, method, `if`, `let`, assignment,
//! early `return`, parameter scalars and arrays, `Pos` fields, constants, literals typed only by
//! their use); each goes through the macro's own `parse -> check (typed IR) -> lower`, and is then
//! evaluated two ways on many inputs, edge values included:
//!
//! - by its Rust meaning: an interpreter of the IR that computes with Rust's operators and with
//!   `runtime/src/variant/dsl.rs`, the very functions the CPU reference's rewritten arithmetic calls;
//! - by its lowered C++, compiled for the host with g++ (`-ffp-contract=off`, UBSan on, so C++
//!   undefined behaviour is an error too) against the real `kernels/cuda/variant/*.cuh`.
//!
//! Integers and bools must agree bit for bit; floats too (0 ulp: both sides use the host's libm for
//! the transcendental functions and IEEE arithmetic for the rest; NaN equals NaN, and +0 equals
//! -0, whose sign `min`/`max` leave unspecified). The generator also checks that the IR typed every
//! `let` as it intended, i.e. as rustc would. A failing body is printed as Rust source with its
//! seed, ready to become a regression case.
//!
//! `FERRINFER_DIFF_BODIES` (default 2000) sets the number of bodies, `FERRINFER_DIFF_SEED` the
//! seed (default: fixed, so CI is reproducible; set it to explore).

use std::fmt::Write as _;
use std::process::Command;

use crate::ir::{BinOp, Block, Expr, Func, Kind, Scalar, Stmt, Ty};
use crate::{check, errors::Errors, lower, parse};

#[path = "../../runtime/src/variant/dsl.rs"]
#[allow(dead_code)]
mod dsl;

// ---- random ------------------------------------------------------------------------------------

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }
}

// ---- the generator -----------------------------------------------------------------------------

const SCALARS: [Scalar; 4] = [Scalar::F32, Scalar::I32, Scalar::U32, Scalar::Bool];

/// The parameters every generated variant sees: (name, type); arrays have 4 elements.
const FIELDS: &[(&str, Scalar)] = &[
    ("pf", Scalar::F32),
    ("pi", Scalar::I32),
    ("pu", Scalar::U32),
    ("pb", Scalar::Bool),
];
const ARRAYS: &[(&str, Scalar)] = &[
    ("af", Scalar::F32),
    ("ai", Scalar::I32),
    ("au", Scalar::U32),
];
const POS: &[&str] = &[
    "batch", "qo_pos", "kv_pos", "qo_head", "kv_head", "qo_len", "kv_len", "head_dim",
];

struct Gen {
    rng: Rng,
    /// Locals in scope: (name, type, mutable).
    scopes: Vec<Vec<(String, Scalar, bool)>>,
    /// Every `let` in order, with the type the generator meant (what rustc infers).
    lets: Vec<(String, Scalar)>,
    next: usize,
    /// The hook has `o: f32` and `i: u32` (output) or not (mask).
    output: bool,
    /// Only operations exact on every platform (no exp, ln, tanh, sin, cos, powf): the GPU sample,
    /// compared bit for bit with the host's libm-free results.
    exact: bool,
}

/// A generated expression: Rust source, and whether its type is fixed by the expression itself
/// (else it is an integer or float literal's, decided by the context, as in rustc).
struct G {
    src: String,
    anchored: bool,
}

impl G {
    fn fixed(src: String) -> G {
        G {
            src,
            anchored: true,
        }
    }
}

impl Gen {
    fn locals_of(&self, ty: Scalar, mutable: bool) -> Vec<String> {
        self.scopes
            .iter()
            .flatten()
            .filter(|(_, t, m)| *t == ty && (*m || !mutable))
            .map(|(n, _, _)| n.clone())
            .collect()
    }

    /// `e` with its type fixed (rustc would otherwise fall back to i32 or f64, or refuse a method
    /// call on it); `+ 0` and `* 1` are identities of the DSL's arithmetic (up to the sign of 0).
    fn anchored(&mut self, ty: Scalar, depth: usize) -> String {
        let g = self.expr(ty, depth);
        if g.anchored {
            return g.src;
        }
        match ty {
            Scalar::F32 => format!("({} * 1.0f32)", g.src),
            Scalar::I32 => format!("({} + 0i32)", g.src),
            Scalar::U32 => format!("({} + 0u32)", g.src),
            Scalar::Bool => g.src,
        }
    }

    fn literal(&mut self, ty: Scalar) -> G {
        let suffix = self.rng.chance(30);
        let (text, sfx) = match ty {
            Scalar::F32 => {
                let v = *self.rng.pick(&[
                    "0.0",
                    "1.0",
                    "0.5",
                    "2.0",
                    "1.5",
                    "3.0",
                    "1e-3",
                    "1e30",
                    "3.4e38",
                    "1e-40",
                    "0.1",
                    "255.0",
                    "2147483648.0",
                    "4294967296.0",
                    "7.25",
                ]);
                (v.to_string(), "f32")
            }
            Scalar::I32 => {
                let v = *self.rng.pick(&[
                    "0",
                    "1",
                    "2",
                    "3",
                    "7",
                    "31",
                    "32",
                    "33",
                    "100",
                    "2147483647",
                ]);
                (v.to_string(), "i32")
            }
            Scalar::U32 => {
                let v = *self.rng.pick(&[
                    "0",
                    "1",
                    "2",
                    "3",
                    "5",
                    "31",
                    "32",
                    "33",
                    "4096",
                    "0xff",
                    "3000000000",
                    "4294967295",
                ]);
                (v.to_string(), "u32")
            }
            Scalar::Bool => return G::fixed(self.rng.pick(&["true", "false"]).to_string()),
        };
        if suffix {
            // `1e30f32` and `0xfff32` would not read as intended: suffix with an underscore.
            G::fixed(format!("{text}_{sfx}"))
        } else {
            G {
                src: text,
                anchored: false,
            }
        }
    }

    fn leaf(&mut self, ty: Scalar) -> G {
        let locals = self.locals_of(ty, false);
        let choice = self.rng.below(8);
        if choice < 2 && !locals.is_empty() {
            return G::fixed(self.rng.pick(&locals).clone());
        }
        if choice < 4 {
            return self.literal(ty);
        }
        let src = match ty {
            Scalar::F32 => match self.rng.below(6) {
                0 if self.output => "o".to_string(),
                1 => "self.pf".into(),
                2 => format!("self.af[{}]", self.index(Scalar::U32)),
                3 => format!("self.af[{}]", self.index(Scalar::I32)),
                4 => self
                    .rng
                    .pick(&[
                        "f32::INFINITY",
                        "f32::NEG_INFINITY",
                        "f32::MAX",
                        "f32::MIN",
                        "f32::EPSILON",
                        "core::f32::consts::PI",
                        "std::f32::consts::LN_2",
                        "core::primitive::f32::MAX",
                    ])
                    .to_string(),
                _ => return self.literal(ty),
            },
            Scalar::I32 => match self.rng.below(5) {
                0 => "self.pi".into(),
                1 => format!("self.ai[{}]", self.index(Scalar::U32)),
                2 => self
                    .rng
                    .pick(&["i32::MIN", "i32::MAX", "-2147483648", "-1"])
                    .to_string(),
                _ => return self.literal(ty),
            },
            Scalar::U32 => match self.rng.below(6) {
                0 if self.output => "i".to_string(),
                1 => format!("at.{}", self.rng.pick(POS)),
                2 => "self.pu".into(),
                3 => format!("self.au[{}]", self.index(Scalar::I32)),
                4 => self
                    .rng
                    .pick(&["u32::MAX", "u32::MIN", "self.af.len()", "self.au.len()"])
                    .to_string(),
                _ => return self.literal(ty),
            },
            Scalar::Bool => match self.rng.below(3) {
                0 => "self.pb".into(),
                _ => return self.literal(ty),
            },
        };
        // A negative literal is not anchored (`-1` is whatever integer its context says).
        G {
            anchored: !src.starts_with('-'),
            src,
        }
    }

    /// An index that is in range for 4 elements, whatever the values.
    fn index(&mut self, ty: Scalar) -> String {
        match ty {
            Scalar::U32 => format!("{} % 4", self.anchored(Scalar::U32, 1)),
            _ => format!("{} & 3", self.anchored(Scalar::I32, 1)),
        }
    }

    fn expr(&mut self, ty: Scalar, depth: usize) -> G {
        if depth == 0 || self.rng.chance(25) {
            return self.leaf(ty);
        }
        let d = depth - 1;
        match ty {
            Scalar::F32 => match self.rng.below(9) {
                0..=2 => self.arith(ty, d, &["+", "-", "*", "/", "%"]),
                3 => self.neg(ty, d),
                4 => {
                    let all = [
                        "sqrt", "floor", "ceil", "abs", "exp", "exp2", "ln", "log2", "tanh", "sin",
                        "cos",
                    ];
                    let m = *self.rng.pick(if self.exact { &all[..4] } else { &all });
                    G::fixed(format!("{}.{m}()", self.anchored(ty, d)))
                }
                5 => {
                    let all = ["min", "max", "powf"];
                    let m = *self.rng.pick(if self.exact { &all[..2] } else { &all });
                    let r = self.anchored(ty, d);
                    let a = self.expr(ty, d).src;
                    G::fixed(format!("{r}.{m}({a})"))
                }
                6 => self.cast(ty, d),
                7 => self.if_value(ty, d),
                // Fused, and exact on every side (one rounding of the exact a * b + c).
                8 if self.rng.below(2) == 0 => {
                    let r = self.anchored(ty, d);
                    let (b, c) = (self.expr(ty, d).src, self.expr(ty, d).src);
                    G::fixed(format!("{r}.mul_add({b}, {c})"))
                }
                _ => self.leaf(ty),
            },
            Scalar::I32 | Scalar::U32 => match self.rng.below(10) {
                0..=2 => self.arith(ty, d, &["+", "-", "*", "/", "%", "&", "|", "^"]),
                3 => {
                    let op = *self.rng.pick(&["<<", ">>"]);
                    let l = self.expr(ty, d);
                    let amount_ty = *self.rng.pick(&[Scalar::I32, Scalar::U32]);
                    let r = self.anchored(amount_ty, d);
                    G {
                        src: format!("({} {op} {r})", l.src),
                        anchored: l.anchored,
                    }
                }
                4 if ty == Scalar::I32 => {
                    if self.rng.chance(50) {
                        self.neg(ty, d)
                    } else {
                        G::fixed(format!("{}.abs()", self.anchored(ty, d)))
                    }
                }
                5 => {
                    let m = *self.rng.pick(&["min", "max"]);
                    let r = self.anchored(ty, d);
                    let a = self.expr(ty, d).src;
                    G::fixed(format!("{r}.{m}({a})"))
                }
                6 => {
                    let x = self.expr(ty, d);
                    G {
                        src: format!("(!{})", x.src),
                        anchored: x.anchored,
                    }
                }
                7 => self.cast(ty, d),
                8 => self.if_value(ty, d),
                _ => self.leaf(ty),
            },
            Scalar::Bool => match self.rng.below(7) {
                0..=2 => {
                    let t = *self.rng.pick(&[Scalar::F32, Scalar::I32, Scalar::U32]);
                    let op = *self.rng.pick(&["==", "!=", "<", "<=", ">", ">="]);
                    let l = self.anchored(t, d);
                    let r = self.expr(t, d).src;
                    G::fixed(format!("({l} {op} {r})"))
                }
                3 => {
                    let op = *self.rng.pick(&["&&", "||", "&", "|", "^"]);
                    let l = self.expr(ty, d).src;
                    let r = self.expr(ty, d).src;
                    G::fixed(format!("({l} {op} {r})"))
                }
                4 => G::fixed(format!("(!{})", self.expr(ty, d).src)),
                5 => {
                    let l = self.anchored(Scalar::U32, d);
                    let r = self.expr(Scalar::U32, d).src;
                    G::fixed(format!("{l}.is_multiple_of({r})"))
                }
                _ => self.if_value(ty, d),
            },
        }
    }

    fn arith(&mut self, ty: Scalar, d: usize, ops: &[&str]) -> G {
        let op = *self.rng.pick(ops);
        let l = self.expr(ty, d);
        let r = self.expr(ty, d);
        G {
            src: format!("({} {op} {})", l.src, r.src),
            anchored: l.anchored || r.anchored,
        }
    }

    fn neg(&mut self, ty: Scalar, d: usize) -> G {
        let x = self.expr(ty, d);
        G {
            src: format!("(-{})", x.src),
            anchored: x.anchored,
        }
    }

    fn cast(&mut self, to: Scalar, d: usize) -> G {
        let from = *self.rng.pick(&SCALARS);
        // bool converts to integers only (`as f32` on a bool is refused by rustc).
        let from = if from == Scalar::Bool && to == Scalar::F32 {
            Scalar::U32
        } else {
            from
        };
        let x = self.anchored(from, d);
        G::fixed(format!("({x} as {})", to.rust()))
    }

    fn if_value(&mut self, ty: Scalar, d: usize) -> G {
        let c = self.expr(Scalar::Bool, d).src;
        let a = self.expr(ty, d);
        // Sometimes a branch with a statement: lowered to a lambda.
        let (pre, a_src) = if self.rng.chance(30) {
            let n = self.fresh();
            self.lets.push((n.clone(), ty));
            (
                format!("let {n}: {} = {}; ", ty.rust(), a.src),
                n.to_string(),
            )
        } else {
            (String::new(), a.src)
        };
        let b = self.expr(ty, d);
        G {
            src: format!("(if {c} {{ {pre}{a_src} }} else {{ {} }})", b.src),
            anchored: a.anchored || b.anchored || !pre.is_empty(),
        }
    }

    fn fresh(&mut self) -> String {
        self.next += 1;
        format!("v{}", self.next)
    }

    /// Statements at `indent`, into `out`.
    fn stmts(&mut self, out: &mut String, ret: Scalar, depth: usize, n: usize) {
        for _ in 0..n {
            match self.rng.below(10) {
                0..=3 => {
                    let ty = *self.rng.pick(&SCALARS);
                    let name = self.fresh();
                    let mutable = self.rng.chance(50);
                    let m = if mutable { "mut " } else { "" };
                    if self.rng.chance(40) {
                        let v = self.expr(ty, depth).src;
                        let _ = write!(out, "let {m}{name}: {} = {v}; ", ty.rust());
                    } else if mutable && self.rng.chance(50) {
                        // Typed by a later assignment only (issue 8's `let mut h = 0;`).
                        let lit = self.literal(ty);
                        self.lets.push((name.clone(), ty));
                        let v = self.anchored(ty, depth);
                        let _ = write!(out, "let {m}{name} = {}; {name} = {v}; ", lit.src);
                        self.scopes.last_mut().unwrap().push((name, ty, mutable));
                        continue;
                    } else {
                        let v = self.anchored(ty, depth);
                        let _ = write!(out, "let {m}{name} = {v}; ");
                    }
                    self.scopes
                        .last_mut()
                        .unwrap()
                        .push((name.clone(), ty, mutable));
                    self.lets.push((name, ty));
                }
                4 | 5 => {
                    let ty = *self.rng.pick(&SCALARS);
                    let targets = self.locals_of(ty, true);
                    if targets.is_empty() {
                        continue;
                    }
                    let t = self.rng.pick(&targets).clone();
                    let ops: &[&str] = match ty {
                        Scalar::F32 => &["=", "+=", "-=", "*=", "/=", "%="],
                        Scalar::Bool => &["=", "&=", "|=", "^="],
                        _ => &[
                            "=", "+=", "-=", "*=", "/=", "%=", "&=", "|=", "^=", "<<=", ">>=",
                        ],
                    };
                    let op = *self.rng.pick(ops);
                    let v = if op == "<<=" || op == ">>=" {
                        let amount_ty = *self.rng.pick(&[Scalar::I32, Scalar::U32]);
                        self.anchored(amount_ty, depth)
                    } else {
                        self.expr(ty, depth).src
                    };
                    let _ = write!(out, "{t} {op} {v}; ");
                }
                6 | 7 => {
                    let c = self.expr(Scalar::Bool, depth).src;
                    let _ = write!(out, "if {c} {{ ");
                    self.scopes.push(Vec::new());
                    self.stmts(out, ret, depth.saturating_sub(1), 2);
                    self.scopes.pop();
                    if self.rng.chance(50) {
                        out.push_str("} else { ");
                        self.scopes.push(Vec::new());
                        self.stmts(out, ret, depth.saturating_sub(1), 2);
                        self.scopes.pop();
                    }
                    out.push_str("} ");
                }
                8 => {
                    let c = self.expr(Scalar::Bool, depth).src;
                    let v = self.expr(ret, depth).src;
                    let _ = write!(out, "if {c} {{ return {v}; }} ");
                }
                _ => {
                    let _ = write!(out, "let _ = {}; ", self.anchored(ret, depth));
                }
            }
        }
    }

    /// One hook: `output` (f32) or `mask` (bool).
    fn hook(&mut self) -> (String, Scalar) {
        self.scopes = vec![Vec::new()];
        self.lets.clear();
        self.next = 0;
        let ret = if self.rng.chance(60) {
            Scalar::F32
        } else {
            Scalar::Bool
        };
        self.output = ret == Scalar::F32;
        let mut body = String::new();
        let n = self.rng.below(5);
        self.stmts(&mut body, ret, 3, n);
        let tail = self.expr(ret, 4).src;
        let sig = match ret {
            Scalar::F32 => "fn output(&self, o: f32, i: u32, at: Pos) -> f32",
            _ => "fn mask(&self, at: Pos) -> bool",
        };
        (format!("{sig} {{ {body}{tail} }}"), ret)
    }
}

// ---- the Rust side: an interpreter of the IR with Rust's rules ---------------------------------

#[derive(Clone, Copy, Debug, PartialEq)]
enum V {
    B(bool),
    I(i32),
    U(u32),
    F(f32),
}

/// One input: the arguments, `Pos`, and the parameter scalars.
#[derive(Clone, Copy)]
struct Input {
    o: f32,
    i: u32,
    pos: [u32; 8],
    pf: f32,
    pi: i32,
    pu: u32,
    pb: bool,
}

const AF: [f32; 4] = [1.5, -0.0, f32::NAN, -3.0e38];
const AI: [i32; 4] = [i32::MIN, -1, 0, 7];
const AU: [u32; 4] = [0, 1, 32, u32::MAX];

fn field_type(name: &str) -> Scalar {
    FIELDS
        .iter()
        .chain(ARRAYS)
        .find(|(n, _)| *n == name)
        .map(|(_, t)| *t)
        .unwrap()
}

fn scalar_of(ty: &Ty) -> Scalar {
    match ty {
        Ty::Scalar(s) => *s,
        Ty::Field(f) | Ty::Elem(f) => field_type(f),
    }
}

enum Flow {
    Next,
    Return(V),
}

struct Interp {
    input: Input,
    vars: Vec<Option<V>>,
}

impl Interp {
    fn run(func: &Func, input: Input) -> V {
        let mut it = Interp {
            input,
            vars: vec![None; func.locals.len()],
        };
        for (id, (_, name)) in func.args.iter().zip(func.sig.args) {
            if let Some(id) = id {
                it.vars[*id] = match *name {
                    "o" => Some(V::F(input.o)),
                    "i" => Some(V::U(input.i)),
                    _ => None,
                };
            }
        }
        match it.block(&func.body) {
            (Flow::Return(v), _) | (Flow::Next, Some(v)) => v,
            (Flow::Next, None) => panic!("no value"),
        }
    }

    fn block(&mut self, b: &Block) -> (Flow, Option<V>) {
        for s in &b.stmts {
            if let Flow::Return(v) = self.stmt(s) {
                return (Flow::Return(v), None);
            }
        }
        match &b.tail {
            Some(t) => match self.expr(t) {
                Ok(v) => (Flow::Next, Some(v)),
                Err(v) => (Flow::Return(v), None),
            },
            None => (Flow::Next, None),
        }
    }

    fn stmt(&mut self, s: &Stmt) -> Flow {
        let r = |r: Result<V, V>| r.unwrap_or_else(|_| panic!("return in a value"));
        match s {
            Stmt::Let(id, init) => {
                self.vars[*id] = init.as_ref().map(|e| r(self.expr(e)));
            }
            Stmt::Discard(e) => {
                r(self.expr(e));
            }
            Stmt::Assign(id, op, e) => {
                let v = r(self.expr(e));
                self.vars[*id] = Some(match op {
                    None => v,
                    Some(op) => binary(*op, self.vars[*id].expect("assigned"), v),
                });
            }
            Stmt::If(c, t, e) => {
                let V::B(c) = r(self.expr(c)) else { panic!() };
                let taken = if c { Some(t) } else { e.as_ref() };
                if let Some(b) = taken
                    && let (Flow::Return(v), _) = self.block(b)
                {
                    return Flow::Return(v);
                }
            }
            Stmt::Block(b) => {
                if let (Flow::Return(v), _) = self.block(b) {
                    return Flow::Return(v);
                }
            }
            Stmt::Return(e) => return Flow::Return(r(self.expr(e))),
        }
        Flow::Next
    }

    /// A value; `Err` carries a `return` from a branch of the hook's tail `if`.
    fn expr(&mut self, e: &Expr) -> Result<V, V> {
        let ty = scalar_of(&e.ty);
        Ok(match &e.kind {
            Kind::Bool(b) => V::B(*b),
            Kind::Int(v) => match ty {
                Scalar::I32 => V::I(*v as u32 as i32),
                Scalar::U32 => V::U(*v as u32),
                _ => panic!("int literal of type {ty:?}"),
            },
            Kind::Float(v) => V::F(*v),
            Kind::Local(id) => self.vars[*id].expect("initialised"),
            Kind::Pos(f) => V::U(self.input.pos[POS.iter().position(|p| p == f).unwrap()]),
            Kind::Field(f) => match f.as_str() {
                "pf" => V::F(self.input.pf),
                "pi" => V::I(self.input.pi),
                "pu" => V::U(self.input.pu),
                "pb" => V::B(self.input.pb),
                _ => panic!("{f}"),
            },
            Kind::Index(f, i) => {
                let i = match self.expr(i)? {
                    V::U(i) => i as usize,
                    V::I(i) => usize::try_from(i).expect("index in range"),
                    other => panic!("index {other:?}"),
                };
                match f.as_str() {
                    "af" => V::F(AF[i]),
                    "ai" => V::I(AI[i]),
                    "au" => V::U(AU[i]),
                    _ => panic!("{f}"),
                }
            }
            Kind::Len(_) => V::U(4),
            Kind::Const(c) => constant(c),
            Kind::Neg(x) => match self.expr(x)? {
                V::I(a) => V::I(dsl::neg(a)),
                V::F(a) => V::F(dsl::neg(a)),
                other => panic!("-{other:?}"),
            },
            Kind::Not(x) => match self.expr(x)? {
                V::B(a) => V::B(!a),
                V::I(a) => V::I(!a),
                V::U(a) => V::U(!a),
                other => panic!("!{other:?}"),
            },
            Kind::Binary(op, l, r) => {
                let l = self.expr(l)?;
                // `&&` and `||` short-circuit (nothing in a hook has an effect but a trap, and
                // indices are in range here, so this only mirrors Rust).
                match (op, l) {
                    (BinOp::And, V::B(false)) => V::B(false),
                    (BinOp::Or, V::B(true)) => V::B(true),
                    _ => binary(*op, l, self.expr(r)?),
                }
            }
            Kind::Cast(to, x) => cast(*to, self.expr(x)?),
            Kind::Call(m, args) => {
                let mut vs = Vec::new();
                for a in args {
                    vs.push(self.expr(a)?);
                }
                method(m.rust, &vs)
            }
            Kind::If(c, t, f) => {
                let V::B(c) = self.expr(c)? else { panic!() };
                match self.block(if c { t } else { f }) {
                    (Flow::Return(v), _) => return Err(v),
                    (Flow::Next, Some(v)) => v,
                    (Flow::Next, None) => panic!("if without a value"),
                }
            }
        })
    }
}

fn constant(cuda: &str) -> V {
    match cuda {
        "FI_INF" => V::F(f32::INFINITY),
        "(-FI_INF)" => V::F(f32::NEG_INFINITY),
        "2147483647" => V::I(i32::MAX),
        "(-2147483647 - 1)" => V::I(i32::MIN),
        "4294967295u" => V::U(u32::MAX),
        "0u" => V::U(0),
        f if f.ends_with(['f', ')']) => V::F(
            f.trim_matches(['(', ')'])
                .trim_end_matches('f')
                .parse()
                .unwrap(),
        ),
        other => panic!("constant {other}"),
    }
}

fn binary(op: BinOp, l: V, r: V) -> V {
    use BinOp::*;
    use V::*;
    macro_rules! num {
        ($f:path) => {
            match (l, r) {
                (I(a), I(b)) => I($f(a, b)),
                (U(a), U(b)) => U($f(a, b)),
                (F(a), F(b)) => F($f(a, b)),
                _ => panic!("{op:?} {l:?} {r:?}"),
            }
        };
    }
    macro_rules! bits {
        ($op:tt) => {
            match (l, r) {
                (I(a), I(b)) => I(a $op b),
                (U(a), U(b)) => U(a $op b),
                (B(a), B(b)) => B(a $op b),
                _ => panic!("{op:?} {l:?} {r:?}"),
            }
        };
    }
    macro_rules! cmp {
        ($op:tt) => {
            B(match (l, r) {
                (I(a), I(b)) => a $op b,
                (U(a), U(b)) => a $op b,
                (F(a), F(b)) => a $op b,
                (B(a), B(b)) => a $op b,
                _ => panic!("{op:?} {l:?} {r:?}"),
            })
        };
    }
    let amount = |v: V| match v {
        I(s) => s as u32,
        U(s) => s,
        other => panic!("shift by {other:?}"),
    };
    match op {
        Add => num!(dsl::add),
        Sub => num!(dsl::sub),
        Mul => num!(dsl::mul),
        Div => num!(dsl::div),
        Rem => num!(dsl::rem),
        BitAnd => bits!(&),
        BitOr => bits!(|),
        BitXor => bits!(^),
        Shl | Shr => match (l, op) {
            (I(a), Shl) => I(dsl::shl(a, amount(r))),
            (U(a), Shl) => U(dsl::shl(a, amount(r))),
            (I(a), _) => I(dsl::shr(a, amount(r))),
            (U(a), _) => U(dsl::shr(a, amount(r))),
            _ => panic!("{op:?} {l:?}"),
        },
        Eq => cmp!(==),
        Ne => cmp!(!=),
        Lt => cmp!(<),
        Le => cmp!(<=),
        Gt => cmp!(>),
        Ge => cmp!(>=),
        And | Or => match (l, r) {
            (B(a), B(b)) => B(if op == And { a && b } else { a || b }),
            _ => panic!("{op:?}"),
        },
    }
}

/// Rust's `as`.
fn cast(to: Scalar, v: V) -> V {
    use V::*;
    match (to, v) {
        (Scalar::F32, I(a)) => F(a as f32),
        (Scalar::F32, U(a)) => F(a as f32),
        (Scalar::F32, F(a)) => F(a),
        (Scalar::I32, I(a)) => I(a),
        (Scalar::I32, U(a)) => I(a as i32),
        (Scalar::I32, F(a)) => I(a as i32),
        (Scalar::I32, B(a)) => I(a as i32),
        (Scalar::U32, I(a)) => U(a as u32),
        (Scalar::U32, U(a)) => U(a),
        (Scalar::U32, F(a)) => U(a as u32),
        (Scalar::U32, B(a)) => U(a as u32),
        _ => panic!("{v:?} as {to:?}"),
    }
}

/// Rust's methods (what the CPU reference calls; `abs` is rewritten to `dsl::abs`).
fn method(name: &str, a: &[V]) -> V {
    use V::*;
    match (name, a) {
        ("abs", [I(x)]) => I(dsl::abs(*x)),
        ("abs", [F(x)]) => F(dsl::abs(*x)),
        ("min", [I(x), I(y)]) => I(*x.min(y)),
        ("min", [U(x), U(y)]) => U(*x.min(y)),
        ("min", [F(x), F(y)]) => F(x.min(*y)),
        ("max", [I(x), I(y)]) => I(*x.max(y)),
        ("max", [U(x), U(y)]) => U(*x.max(y)),
        ("max", [F(x), F(y)]) => F(x.max(*y)),
        ("is_multiple_of", [U(x), U(y)]) => B(x.is_multiple_of(*y)),
        ("powf", [F(x), F(y)]) => F(x.powf(*y)),
        ("mul_add", [F(x), F(y), F(z)]) => F(x.mul_add(*y, *z)),
        (f, [F(x)]) => F(match f {
            "exp" => x.exp(),
            "exp2" => x.exp2(),
            "ln" => x.ln(),
            "log2" => x.log2(),
            "tanh" | "tanh_approx" => x.tanh(),
            "sqrt" => x.sqrt(),
            "sin" => x.sin(),
            "cos" => x.cos(),
            "floor" => x.floor(),
            "ceil" => x.ceil(),
            other => panic!("{other}"),
        }),
        _ => panic!("{name}{a:?}"),
    }
}

// ---- inputs ------------------------------------------------------------------------------------

fn inputs(rng: &mut Rng, n: usize) -> Vec<Input> {
    let floats = [
        0.0,
        -0.0,
        1.0,
        -1.0,
        0.5,
        -2.5,
        1e30,
        -1e-30,
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::MAX,
        f32::MIN_POSITIVE,
        2147483648.0,
        -2147483904.0,
        4294967296.0,
        3.7,
    ];
    let ints = [
        0,
        1,
        -1,
        2,
        7,
        31,
        32,
        33,
        -33,
        i32::MIN,
        i32::MAX,
        1000,
        -1000,
    ];
    let uints = [
        0,
        1,
        2,
        5,
        31,
        32,
        33,
        64,
        4096,
        0x8000_0000,
        u32::MAX,
        u32::MAX - 1,
    ];
    let mut out = Vec::new();
    for k in 0..n {
        // The first few inputs are all-edge; the rest mix edge and random values.
        let f = |rng: &mut Rng| {
            if k > 2 && rng.chance(40) {
                f32::from_bits(rng.next() as u32)
            } else {
                *rng.pick(&floats)
            }
        };
        let o = f(rng);
        let pf = f(rng);
        let u = |rng: &mut Rng| {
            if rng.chance(30) {
                rng.next() as u32 % 200
            } else {
                *rng.pick(&uints)
            }
        };
        let i = u(rng);
        let mut pos = [0u32; 8];
        for p in &mut pos {
            *p = u(rng);
        }
        let pu = u(rng);
        let pi = if rng.chance(30) {
            rng.next() as i32
        } else {
            *rng.pick(&ints)
        };
        out.push(Input {
            o,
            i,
            pos,
            pf,
            pi,
            pu,
            pb: rng.chance(50),
        });
    }
    out
}

fn bits(v: V) -> u32 {
    match v {
        V::B(b) => b as u32,
        V::I(i) => i as u32,
        V::U(u) => u,
        V::F(f) => f.to_bits(),
    }
}

/// Floats agree when equal (+0 == -0) or both NaN; everything else bit for bit.
fn agree(ret: Scalar, rust: u32, cxx: u32) -> bool {
    match ret {
        Scalar::F32 => {
            let (a, b) = (f32::from_bits(rust), f32::from_bits(cxx));
            a == b || (a.is_nan() && b.is_nan())
        }
        _ => rust == cxx,
    }
}

// ---- the C++ side ------------------------------------------------------------------------------

const PRELUDE: &str = r#"
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#define __device__
#define __forceinline__ inline
static inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
#include "core/math.cuh"
#include "variant/dsl.cuh"
struct Params {
  float pf; int pi; unsigned pu; bool pb;
  const float* af; unsigned af_len;
  const int* ai; unsigned ai_len;
  const unsigned* au; unsigned au_len;
};
static float f_of(unsigned b) { float f; memcpy(&f, &b, 4); return f; }
static unsigned bits_of(float f) { unsigned b; memcpy(&b, &f, 4); return b; }
static unsigned bits_of(bool b) { return b ? 1u : 0u; }
"#;

/// Lower one generated hook, or the diagnostics.
fn pipeline(src: &str) -> Result<(Func, String), Vec<String>> {
    let imp: syn::ItemImpl =
        syn::parse_str(&format!("impl V {{ {src} }}")).map_err(|e| vec![e.to_string()])?;
    let mut errors = Errors::default();
    let def = parse::variant(Default::default(), &imp, &mut errors);
    let mut typed = check::variant(&def, &mut errors);
    if let Err(e) = errors.finish() {
        return Err(e.into_iter().map(|e| e.to_string()).collect());
    }
    if !typed.conflicts.is_empty() {
        return Err(typed.conflicts);
    }
    let cuda = lower::variant(&def, &typed);
    Ok((typed.funcs.remove(0), cuda))
}

/// Every `let` in the IR, in source order: (name, type).
fn let_types(func: &Func) -> Vec<(String, Scalar)> {
    let mut out = Vec::new();
    fn block(func: &Func, b: &Block, out: &mut Vec<(String, Scalar)>) {
        for s in &b.stmts {
            match s {
                Stmt::Let(id, init) => {
                    if let Some(e) = init {
                        expr(func, e, out);
                    }
                    let l = &func.locals[*id];
                    out.push((l.name.clone(), scalar_of(&l.ty)));
                }
                Stmt::Discard(e) | Stmt::Assign(_, _, e) | Stmt::Return(e) => expr(func, e, out),
                Stmt::If(c, t, e) => {
                    expr(func, c, out);
                    block(func, t, out);
                    if let Some(e) = e {
                        block(func, e, out);
                    }
                }
                Stmt::Block(b) => block(func, b, out),
            }
        }
        if let Some(t) = &b.tail {
            expr(func, t, out);
        }
    }
    fn expr(func: &Func, e: &Expr, out: &mut Vec<(String, Scalar)>) {
        match &e.kind {
            Kind::Index(_, x) | Kind::Neg(x) | Kind::Not(x) | Kind::Cast(_, x) => {
                expr(func, x, out)
            }
            Kind::Binary(_, l, r) => {
                expr(func, l, out);
                expr(func, r, out);
            }
            Kind::Call(_, a) => a.iter().for_each(|a| expr(func, a, out)),
            Kind::If(c, t, f) => {
                expr(func, c, out);
                block(func, t, out);
                block(func, f, out);
            }
            _ => {}
        }
    }
    block(func, &func.body, &mut out);
    out
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A generated hook, lowered.
struct Case {
    src: String,
    ret: Scalar,
    func: Func,
    cuda: String,
}

/// `bodies` hooks from `seed`, through the pipeline, each `let` typed as the generator meant.
fn generate(seed: u64, bodies: usize, exact: bool) -> Vec<Case> {
    let mut generator = Gen {
        rng: Rng(seed ^ 0x5eed),
        scopes: Vec::new(),
        lets: Vec::new(),
        next: 0,
        output: true,
        exact,
    };
    let mut cases = Vec::new();
    for k in 0..bodies {
        let (src, ret) = generator.hook();
        let (func, cuda) = match pipeline(&src) {
            Ok(x) => x,
            Err(e) => panic!("body {k} (seed {seed}) was refused: {e:#?}\n{src}"),
        };
        let got = let_types(&func);
        assert_eq!(
            got, generator.lets,
            "body {k} (seed {seed}): the IR typed a `let` otherwise than rustc would\n{src}"
        );
        cases.push(Case {
            src,
            ret,
            func,
            cuda,
        });
    }
    cases
}

/// Every case as `struct Variant_k`.
fn variants(cases: &[Case]) -> String {
    let mut s = String::new();
    for (k, c) in cases.iter().enumerate() {
        s.push_str(
            &c.cuda
                .replacen("struct Variant {", &format!("struct Variant_{k} {{"), 1),
        );
    }
    s
}

/// The call of case `k`'s hook, in C++.
fn call(k: usize, c: &Case) -> String {
    match c.ret {
        Scalar::F32 => format!("Variant_{k}::output(self, o, i, at)"),
        _ => format!("Variant_{k}::mask(self, at)"),
    }
}

/// Compare the interpreter with `results[k][j]` (body k, input j); the first failures, as text.
fn compare(
    cases: &[Case],
    input: &[Input],
    seed: u64,
    results: impl Fn(usize, usize) -> u32,
) -> Vec<String> {
    let mut failures = Vec::new();
    for (j, x) in input.iter().enumerate() {
        for (k, c) in cases.iter().enumerate() {
            let lowered = results(k, j);
            let rust = bits(Interp::run(&c.func, *x));
            if !agree(c.ret, rust, lowered) && failures.len() < 5 {
                failures.push(format!(
                    "body {k} (seed {seed}), input {j}: Rust {rust:#x}, lowered {lowered:#x}\n  o={:?} i={} pos={:?} pf={:?} pi={} pu={} pb={}\n  {}\n{}",
                    x.o, x.i, x.pos, x.pf, x.pi, x.pu, x.pb, c.src, c.cuda
                ));
            }
        }
    }
    failures
}

#[test]
fn lowered_hooks_compute_what_rust_computes() {
    let bodies = env_usize("FERRINFER_DIFF_BODIES", 2000);
    let seed = env_usize("FERRINFER_DIFF_SEED", 8) as u64;
    let mut rng = Rng(seed);
    let input = inputs(&mut rng, 24);
    let cases = generate(seed, bodies, false);

    // One translation unit: every body as `struct Variant_k`, and a main that runs each on every
    // input and prints the result bits.
    let mut tu = String::from(PRELUDE);
    tu.push_str(&variants(&cases));
    // The inputs as arrays of bits, then one loop.
    let col = |f: &dyn Fn(&Input) -> u32| {
        input
            .iter()
            .map(|x| format!("{}u", f(x)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let _ = writeln!(
        tu,
        "static const unsigned in_o[] = {{{}}};",
        col(&|x| x.o.to_bits())
    );
    let _ = writeln!(tu, "static const unsigned in_i[] = {{{}}};", col(&|x| x.i));
    let _ = writeln!(
        tu,
        "static const unsigned in_pf[] = {{{}}};",
        col(&|x| x.pf.to_bits())
    );
    let _ = writeln!(
        tu,
        "static const unsigned in_pi[] = {{{}}};",
        col(&|x| x.pi as u32)
    );
    let _ = writeln!(
        tu,
        "static const unsigned in_pu[] = {{{}}};",
        col(&|x| x.pu)
    );
    let _ = writeln!(
        tu,
        "static const unsigned in_pb[] = {{{}}};",
        col(&|x| x.pb as u32)
    );
    for p in 0..8 {
        let _ = writeln!(
            tu,
            "static const unsigned in_pos{p}[] = {{{}}};",
            col(&|x| x.pos[p])
        );
    }
    assert_eq!(AF[3].to_bits(), 0xff61_b1e6);
    let _ = writeln!(
        tu,
        "int main() {{
  static const float af[4] = {{f_of(0x3fc00000u), f_of(0x80000000u), f_of(0x7fc00000u), f_of(0xff61b1e6u)}};
  static const int ai[4] = {{-2147483647 - 1, -1, 0, 7}};
  static const unsigned au[4] = {{0u, 1u, 32u, 4294967295u}};
  for (int j = 0; j < {n}; ++j) {{
    Params self{{f_of(in_pf[j]), static_cast<int>(in_pi[j]), in_pu[j], in_pb[j] != 0, af, 4u, ai, 4u, au, 4u}};
    fi::Pos at{{in_pos0[j], in_pos1[j], in_pos2[j], in_pos3[j], in_pos4[j], in_pos5[j], in_pos6[j], in_pos7[j]}};
    float o = f_of(in_o[j]);
    unsigned i = in_i[j];
    printf(\"input %d\\n\", j);",
        n = input.len()
    );
    for (k, c) in cases.iter().enumerate() {
        let _ = writeln!(tu, "    printf(\"%x\\n\", bits_of({}));", call(k, c));
    }
    tu.push_str("  }\n");
    tu.push_str("  return 0;\n}\n");

    let text = run_host(&tu, "diff");
    let mut results = vec![vec![0u32; input.len()]; cases.len()];
    let mut lines = text.lines();
    for (j, _) in input.iter().enumerate() {
        assert_eq!(lines.next(), Some(format!("input {j}").as_str()));
        for row in results.iter_mut() {
            row[j] = u32::from_str_radix(lines.next().unwrap(), 16).unwrap();
        }
    }
    let failures = compare(&cases, &input, seed, |k, j| results[k][j]);
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// The start of a host `main` with the parameter arrays every input shares.
const MAIN_WITH_ARRAYS: &str = "int main() {
  static const float af[4] = {f_of(0x3fc00000u), f_of(0x80000000u), f_of(0x7fc00000u), f_of(0xff61b1e6u)};
  static const int ai[4] = {-2147483647 - 1, -1, 0, 7};
  static const unsigned au[4] = {0u, 1u, 32u, 4294967295u};
";

/// Opens a block of that `main` where `self`, `at` and the score `s` hold input `x` (its `o`).
fn open_score_input(tu: &mut String, x: &Input) {
    let _ = writeln!(
        tu,
        "  {{
    Params self{{f_of({pf}u), {pi}, {pu}u, {pb}, af, 4u, ai, 4u, au, 4u}};
    fi::Pos at{{{p0}u, {p1}u, {p2}u, {p3}u, {p4}u, {p5}u, {p6}u, {p7}u}};
    const float s = f_of({s}u);",
        pf = x.pf.to_bits(),
        pi = x.pi,
        pu = x.pu,
        pb = x.pb,
        p0 = x.pos[0],
        p1 = x.pos[1],
        p2 = x.pos[2],
        p3 = x.pos[3],
        p4 = x.pos[4],
        p5 = x.pos[5],
        p6 = x.pos[6],
        p7 = x.pos[7],
        s = x.o.to_bits(),
    );
}

/// Logits hooks of the shapes the split (split.rs) looks for, and near misses: (body, whether
/// `pre` is found, whether `post` is).
const SPLIT_SHAPES: &[(&str, bool, bool)] = &[
    ("self.pf * (s * (1.0 / self.pf)).tanh_approx()", true, true),
    ("(s * (1.0 / self.pf)).tanh_approx() * self.pf", true, true),
    ("s * self.pf", true, false),
    ("self.pf * s", true, false),
    ("(s * self.pf).exp() * (self.pf + 1.0)", true, true),
    (
        "let t = s * (self.pi as f32); let u = t.max(0.0); (self.pu as f32).sqrt() * u",
        true,
        true,
    ),
    ("let _ = at; -(s * self.pf)", true, false),
    ("self.pf * (s * 2.0 + at.kv_pos as f32)", true, true),
    ("(s * self.pf).mul_add(self.pf, 1.0) * 0.5", true, true),
    ("s + (at.kv_pos as f32) * self.pf", false, false),
    ("s * self.af[1] * self.pf", false, true),
    ("self.af[0] * (s * self.pf)", true, false),
    (
        "if at.kv_pos > at.qo_pos { s * self.pf } else { -s }",
        false,
        false,
    ),
    (
        "if self.pb { return s * self.pf; } self.pf * (at.qo_pos as f32)",
        true,
        false,
    ),
    ("let mut t = s; t = t * self.pf; self.pf * t", false, true),
    ("self.pf * (s * s)", false, true),
    (
        "let k = self.pf * self.pf; k * (s * k).tanh_approx()",
        false,
        false,
    ),
];

/// The split is exact: with the same values, `post * core(pre * s)` computes the operations of
/// `logits(s)` (f32 products commute bit for bit), on the edge inputs and random ones. A scale
/// that leaves the hook is found where the shape allows and not elsewhere.
#[test]
fn split_logits_compute_the_hook() {
    let mut rng = Rng(12);
    let input = inputs(&mut rng, 64);
    let mut tu = String::from(PRELUDE);
    for (k, (body, pre, post)) in SPLIT_SHAPES.iter().enumerate() {
        let src = format!("fn logits(&self, s: f32, at: Pos) -> f32 {{ {body} }}");
        let (_, cuda) = pipeline(&src).unwrap_or_else(|e| panic!("{body}: {e:?}"));
        let found = |name: &str| {
            !cuda.contains(&format!("{name}(const Params& self) {{\n    return 1.0f;"))
        };
        assert_eq!(
            (found("logits_pre"), found("logits_post")),
            (*pre, *post),
            "{body}: (pre, post) found\n{cuda}"
        );
        tu.push_str(&cuda.replacen("struct Variant {", &format!("struct Variant_{k} {{"), 1));
    }
    tu.push_str(MAIN_WITH_ARRAYS);
    for x in &input {
        open_score_input(&mut tu, x);
        for k in 0..SPLIT_SHAPES.len() {
            let _ = writeln!(
                tu,
                "    printf(\"%x %x\\n\", bits_of(Variant_{k}::logits(self, s, at)), \
                 bits_of(Variant_{k}::logits_post(self) * \
                 Variant_{k}::logits_core(self, Variant_{k}::logits_pre(self) * s, at)));"
            );
        }
        tu.push_str("  }\n");
    }
    tu.push_str("  return 0;\n}\n");
    let text = run_host(&tu, "split");
    let mut lines = text.lines();
    for (j, x) in input.iter().enumerate() {
        for (body, _, _) in SPLIT_SHAPES {
            let line = lines.next().unwrap();
            let (hook, split) = line.split_once(' ').unwrap();
            let (hook, split) = (
                u32::from_str_radix(hook, 16).unwrap(),
                u32::from_str_radix(split, 16).unwrap(),
            );
            assert!(
                agree(Scalar::F32, hook, split),
                "{body}, input {j} (s = {:?}, pf = {:?}): logits {hook:#x}, split {split:#x}",
                x.o,
                x.pf
            );
        }
    }
}

/// Logits hooks and the bound on their core (split.rs, `core_bound`) that the macro must find:
/// `None` where it must find none.
const BOUND_SHAPES: &[(&str, Option<f32>)] = &[
    ("self.pf * (s * (1.0 / self.pf)).tanh_approx()", Some(1.0)),
    ("(s * self.pf).tanh() * self.pf", Some(1.0)),
    ("s.tanh_approx()", Some(1.0)),
    (
        "self.pf * (2.0 * (s * self.pf).tanh_approx() - 0.5)",
        Some(2.5),
    ),
    ("self.pf * (s * self.pf).tanh().abs().max(-3.0)", Some(3.0)),
    (
        "if at.kv_pos > at.qo_pos { (s * self.pf).tanh() } else { -0.25 }",
        Some(1.0),
    ),
    ("self.pf * (s * self.pf).tanh() * self.pf", None),
    ("self.pf * s.tanh_approx().min(s)", None),
    ("self.pf * (s * self.pf).exp()", None),
    ("let t = s.tanh(); t * self.pf", None),
    (
        "if self.pb { return (s * self.pf).tanh(); } self.pf * s.tanh()",
        None,
    ),
    (
        "self.pf * ((s * self.pf).tanh() + (at.kv_pos as f32))",
        None,
    ),
];

/// The bound the macro emits holds: |logits_core| is at most `kLogitsCoreBound` on the edge
/// inputs and random ones, and it is found exactly where `BOUND_SHAPES` says.
#[test]
fn core_bounds_hold() {
    let mut rng = Rng(13);
    let input = inputs(&mut rng, 256);
    let mut tu = String::from(PRELUDE);
    let mut bounded = Vec::new();
    for (k, (body, want)) in BOUND_SHAPES.iter().enumerate() {
        let src = format!("fn logits(&self, s: f32, at: Pos) -> f32 {{ {body} }}");
        let (_, cuda) = pipeline(&src).unwrap_or_else(|e| panic!("{body}: {e:?}"));
        let found = cuda
            .split_once("static constexpr float kLogitsCoreBound = ")
            .map(|(_, rest)| rest[..rest.find("f;").unwrap()].parse::<f32>().unwrap());
        assert_eq!(found, *want, "{body}: bound\n{cuda}");
        if found.is_some() {
            bounded.push(k);
            tu.push_str(&cuda.replacen("struct Variant {", &format!("struct Variant_{k} {{"), 1));
        }
    }
    tu.push_str(MAIN_WITH_ARRAYS);
    for x in &input {
        open_score_input(&mut tu, x);
        for k in &bounded {
            let _ = writeln!(
                tu,
                "    printf(\"%x\\n\", bits_of(Variant_{k}::logits_core(self, \
                 Variant_{k}::logits_pre(self) * s, at)));"
            );
        }
        tu.push_str("  }\n");
    }
    tu.push_str("  return 0;\n}\n");
    let text = run_host(&tu, "bound");
    let mut lines = text.lines();
    for (j, x) in input.iter().enumerate() {
        for k in &bounded {
            let (body, bound) = BOUND_SHAPES[*k];
            let core = f32::from_bits(u32::from_str_radix(lines.next().unwrap(), 16).unwrap());
            // A NaN score or parameter gives a NaN core on either path.
            assert!(
                core.is_nan() || core.abs() <= bound.unwrap(),
                "{body}, input {j} (s = {:?}, pf = {:?}): core {core} over {bound:?}",
                x.o,
                x.pf
            );
        }
    }
}

/// A mask whose verdict on a tile is known. Query and key lengths are 1000.
struct Verdict {
    body: &'static str,
    /// `self.pu`.
    pu: u32,
    /// The tile's query positions and keys, first and last.
    q: [u32; 2],
    kv: [u32; 2],
    /// `mask_tile`'s answer: 0 none, 1 all, 2 some.
    want: u32,
}

const fn verdict(body: &'static str, pu: u32, q: [u32; 2], kv: [u32; 2], want: u32) -> Verdict {
    Verdict {
        body,
        pu,
        q,
        kv,
        want,
    }
}

const TILE_VERDICTS: &[Verdict] = &[
    // A sliding window of 100 keys (SlidingWindow's body).
    verdict(WINDOW, 100, [200, 215], [128, 191], 1),
    verdict(WINDOW, 100, [200, 215], [0, 63], 0),
    verdict(WINDOW, 100, [200, 215], [100, 163], 2),
    verdict(WINDOW, 100, [200, 215], [216, 300], 1),
    // Chunks of 64 positions.
    verdict(CHUNK, 64, [64, 79], [64, 127], 1),
    verdict(CHUNK, 64, [64, 79], [128, 191], 0),
    verdict(CHUNK, 64, [60, 79], [64, 127], 2),
    // A prefix seen by every query, then causal.
    verdict(PREFIX, 256, [300, 315], [0, 255], 1),
    verdict(PREFIX, 256, [300, 315], [256, 299], 1),
    verdict(PREFIX, 256, [300, 315], [316, 400], 0),
    // An early return (attention sinks before a window).
    verdict(SINK, 4, [200, 215], [0, 3], 1),
    verdict(SINK, 4, [200, 215], [4, 63], 0),
    verdict(SINK, 4, [200, 215], [160, 191], 1),
    verdict(SINK, 4, [200, 215], [0, 63], 2),
    // An element read where its index is one value in range (`au[2]` is 32).
    verdict("at.kv_pos < self.au[2]", 0, [0, 0], [0, 31], 1),
    verdict("at.kv_pos < self.au[2]", 0, [0, 0], [32, 40], 0),
    // An index that may be out of range: "some", though the other operand decides (the hook
    // must run, and trap, where it would).
    verdict(
        "at.kv_pos < 100 || self.au[at.kv_pos] > 0",
        0,
        [0, 0],
        [0, 10],
        2,
    ),
    // No interval form: "some" (no mask_tile).
    verdict("at.kv_pos % 2 == 0", 0, [0, 0], [4, 4], 2),
    // Wraps in u32 at this tile: "some", never a wrong verdict.
    verdict("at.kv_pos + self.pu > 10", 4294967295, [0, 0], [0, 3], 2),
];

const SINK: &str = "if at.kv_pos < self.pu { return true; } \
                    let q = at.qo_pos as i32; q - (at.kv_pos as i32) < 64";
const CHUNK: &str = "at.qo_pos / self.pu == at.kv_pos / self.pu";
const PREFIX: &str = "at.kv_pos < self.pu || at.kv_pos <= at.qo_pos";
const WINDOW: &str = "let q_abs = at.qo_pos as i32 + at.kv_len as i32 - at.qo_len as i32; \
                      let kv_pos = at.kv_pos as i32; \
                      kv_pos > q_abs || q_abs - kv_pos < self.pu as i32";

/// `mask_tile` (tile.rs, variant/tile.cuh) bounds the mask: on random tiles of random generated
/// masks, a tile it says the mask keeps whole (or drops whole) is kept (dropped) at each of its
/// positions by the lowered mask itself (which the test above checks against Rust), with UBSan
/// watching the interval arithmetic; it decides a share of the tiles where the mask is uniform;
/// and it gives the expected verdicts on the masks above.
#[test]
fn mask_tile_bounds_the_mask() {
    let bodies = env_usize("FERRINFER_DIFF_BODIES", 2000);
    let seed = env_usize("FERRINFER_DIFF_SEED", 8) as u64 + 1;
    let cases: Vec<Case> = generate(seed, bodies, false)
        .into_iter()
        .filter(|c| c.cuda.contains("mask_tile("))
        .collect();
    assert!(
        cases.len() >= bodies / 20,
        "{} masks with a mask_tile",
        cases.len()
    );
    let mut rng = Rng(seed);
    let input = inputs(&mut rng, 32);
    let mut tu = String::from(PRELUDE);
    tu.push_str(&variants(&cases));
    for (k, v) in TILE_VERDICTS.iter().enumerate() {
        let src = format!("fn mask(&self, at: Pos) -> bool {{ {} }}", v.body);
        let (_, cuda) = pipeline(&src).unwrap_or_else(|e| panic!("{}: {e:?}", v.body));
        tu.push_str(&cuda.replacen("struct Variant {", &format!("struct Fixed_{k} {{"), 1));
    }
    tu.push_str(
        "static const float af[4] = {f_of(0x3fc00000u), f_of(0x80000000u), f_of(0x7fc00000u), f_of(0xff61b1e6u)};
static const int ai[4] = {-2147483647 - 1, -1, 0, 7};
static const unsigned au[4] = {0u, 1u, 32u, 4294967295u};
// mask_tile's verdict, or 2 (some) without one, as variant/hooks.cuh's mask_keeps_tile takes it.
template <class V, class = void>
struct HasTile { static constexpr bool value = false; };
template <class V>
struct HasTile<V, decltype(void(&V::mask_tile))> { static constexpr bool value = true; };
template <class V>
static int verdict(const Params& self, const fi::PosRange& at) {
  if constexpr (HasTile<V>::value) {
    return V::mask_tile(self, at);
  } else {
    return 2;
  }
}
// Prints the verdict on the tile from pos (query positions, keys, heads `w` wide), and whether
// some position of it keeps and some drops.
template <class V>
static void tile(const Params& self, const unsigned* pos, const unsigned* w) {
  fi::PosRange at{fi::iv_point(pos[0]), fi::iv_span(pos[1], pos[1] + w[0]),
                  fi::iv_span(pos[2], pos[2] + w[1]), fi::iv_span(pos[3], pos[3] + w[2]),
                  fi::iv_point(pos[4]), fi::iv_point(pos[5]), fi::iv_point(pos[6]),
                  fi::iv_point(pos[7])};
  bool kept = false, dropped = false;
  for (unsigned q = 0; q <= w[0]; ++q)
    for (unsigned k = 0; k <= w[1]; ++k)
      for (unsigned h = 0; h <= w[2]; ++h) {
        const fi::Pos p{pos[0], pos[1] + q, pos[2] + k, pos[3] + h, pos[4], pos[5], pos[6], pos[7]};
        (V::mask(self, p) ? kept : dropped) = true;
      }
  printf(\"%d %d %d\\n\", verdict<V>(self, at), kept, dropped);
}
int main() {
",
    );
    for (k, Verdict { pu, q, kv, .. }) in TILE_VERDICTS.iter().enumerate() {
        let _ = writeln!(
            tu,
            "  {{ const Params self{{0.0f, 0, {pu}u, false, af, 4u, ai, 4u, au, 4u}};
    const unsigned pos[8] = {{0u, {}u, {}u, 0u, 0u, 1000u, 1000u, 128u}};
    const unsigned w[3] = {{{}u, {}u, 0u}};
    tile<Fixed_{k}>(self, pos, w); }}",
            q[0],
            kv[0],
            q[1] - q[0],
            kv[1] - kv[0]
        );
    }
    for x in &input {
        // Tiles up to 4 x 8 x 2 positions, ending at or before u32::MAX.
        let w = [
            rng.below(4) as u32,
            rng.below(8) as u32,
            rng.below(2) as u32,
        ];
        let mut pos = x.pos;
        for (p, w) in pos[1..4].iter_mut().zip(w) {
            *p = (*p).min(u32::MAX - w);
        }
        let _ = writeln!(
            tu,
            "  {{ const Params self{{f_of({}u), static_cast<int>({}u), {}u, {}, af, 4u, ai, 4u, au, 4u}};
    const unsigned pos[8] = {{{}}};
    const unsigned w[3] = {{{}u, {}u, {}u}};",
            x.pf.to_bits(),
            x.pi as u32,
            x.pu,
            x.pb,
            pos.map(|p| format!("{p}u")).join(", "),
            w[0],
            w[1],
            w[2]
        );
        for k in 0..cases.len() {
            let _ = writeln!(tu, "    tile<Variant_{k}>(self, pos, w);");
        }
        tu.push_str("  }\n");
    }
    tu.push_str("  return 0;\n}\n");

    let text = run_host(&tu, "tile");
    let mut lines = text.lines().map(|l| {
        let v: Vec<u32> = l.split(' ').map(|x| x.parse().unwrap()).collect();
        (v[0], v[1] == 1, v[2] == 1)
    });
    for v in TILE_VERDICTS {
        let (got, ..) = lines.next().unwrap();
        assert_eq!(
            got, v.want,
            "{} (pu {}) on queries {:?}, keys {:?}",
            v.body, v.pu, v.q, v.kv
        );
    }
    let (mut uniform, mut decided) = (0, 0);
    for j in 0..input.len() {
        for c in &cases {
            let (verdict, kept, dropped) = lines.next().unwrap();
            assert!(
                (verdict != 1 || !dropped) && (verdict != 0 || !kept),
                "input {j}: mask_tile says {verdict}, but the mask keeps ({kept}) and drops \
                 ({dropped}) on the tile\n{}\n{}",
                c.src,
                c.cuda
            );
            uniform += usize::from(kept != dropped);
            decided += usize::from(verdict != 2);
        }
    }
    assert!(lines.next().is_none());
    // Generated masks are mostly of positions with `%`, bit operations and floats; still, some
    // share of the uniform tiles is decided (else the analysis would be "some" everywhere).
    assert!(
        decided * 4 >= uniform,
        "{decided} of {uniform} uniform tiles decided"
    );
    eprintln!(
        "{} masks: {decided} of {uniform} uniform tiles decided",
        cases.len()
    );
}

/// `mask_keeps_tile` (variant/hooks.cuh) hands `mask_tile` ranges that hold every position of a
/// warp's rows: on row spans of every length within and across query positions, for groups of 1
/// to 8 heads, each packed row's query position and head lie in the range it builds (and the
/// range is no wider than the rows' span where they share a query position).
#[test]
fn mask_keeps_tile_covers_the_rows() {
    let tu = r#"
#include <math.h>
#include <stdio.h>
#include <string.h>
#define __device__
#define __forceinline__ inline
static inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
struct { unsigned x; } threadIdx;
static unsigned __ballot_sync(unsigned, bool b) { return b; }
#include "variant/hooks.cuh"
struct Params {};
static fi::PosRange seen;
// A variant whose mask_tile records its ranges.
struct Probe {
  static constexpr bool kHasMask = true;
  static fi::Tri mask_tile(const Params&, const fi::PosRange& at) { seen = at; return fi::kAll; }
};
static bool in(const fi::Iv& r, long long v) { return r.known && r.lo <= v && v <= r.hi; }
int main() {
  int bad = 0, cases = 0;
  for (unsigned group = 1; group <= 8; ++group)
    for (unsigned lo = 0; lo < 40; ++lo)
      for (unsigned hi = lo; hi < lo + 20; ++hi) {
        const unsigned kv_head = 3;
        fi::mask_keeps_tile<Probe>(Params{}, 7, lo, hi, group, kv_head, 100, 163, 50, 60, 128);
        ++cases;
        bool ok = in(seen.batch, 7) && in(seen.kv_pos, 100) && in(seen.kv_pos, 163) &&
                  in(seen.kv_head, kv_head) && in(seen.qo_len, 50) && in(seen.kv_len, 60) &&
                  in(seen.head_dim, 128);
        for (unsigned r = lo; r <= hi; ++r) {
          ok = ok && in(seen.qo_pos, r / group) && in(seen.qo_head, kv_head * group + r % group);
        }
        if (lo / group == hi / group) {
          ok = ok && seen.qo_head.hi - seen.qo_head.lo == hi - lo;
        }
        if (!ok && bad++ < 5) printf("group %u rows %u..%u\n", group, lo, hi);
      }
  printf("%d of %d\n", bad, cases);
  return 0;
}
"#;
    let out = run_host(tu, "rows");
    assert!(out.trim_end().ends_with("0 of 6400"), "{out}");
}

/// Compile the host translation unit `tu` with g++ (as the lowering's C++ is checked: no
/// contraction, UBSan on) and run it: its stdout.
fn run_host(tu: &str, name: &str) -> String {
    let dir = std::env::temp_dir().join(format!("ferrinfer-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cpp = dir.join(format!("{name}.cpp"));
    std::fs::write(&cpp, tu).unwrap();
    let exe = dir.join(name);
    let include = concat!(env!("CARGO_MANIFEST_DIR"), "/../kernels/cuda");
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "g++".into());
    let out = Command::new(&cxx)
        .args(["-std=c++17", "-O1", "-ffp-contract=off", "-fno-builtin", "-w"])
        .args(["-fsanitize=undefined", "-fno-sanitize-recover=all"])
        .arg("-I")
        .arg(include)
        .arg(&cpp)
        .arg("-o")
        .arg(&exe)
        .arg("-lm")
        .output()
        .unwrap_or_else(|e| panic!("{cxx} not found ({e}): the differential test needs a C++ compiler (apt-get install g++)"));
    assert!(
        out.status.success(),
        "{cxx} failed on {}:\n{}",
        cpp.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let run = Command::new(&exe).output().unwrap();
    assert!(
        run.status.success(),
        "the host build failed (UBSan?):\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
    String::from_utf8(run.stdout).unwrap()
}

/// The headers the lowered code needs, inlined (NVRTC gets no include files from the runtime's
/// `compile`: the kernels crate inlines them the same way).
fn dsl_headers() -> String {
    let mut s = String::new();
    for h in [
        "core/math.cuh",
        "variant/numeric.cuh",
        "variant/tile.cuh",
        "variant/dsl.cuh",
    ] {
        let text = ferrinfer_kernels::header(h).unwrap_or_else(|e| panic!("{h}: {e}"));
        for line in text.lines() {
            if !line.starts_with("#include") && !line.starts_with("#pragma once") {
                s.push_str(line);
                s.push('\n');
            }
        }
    }
    s
}

/// The device translation unit of `cases`: the DSL headers, the bodies, and a kernel that runs
/// every body on input `j` in thread `j` (14 words of input each; output body-major).
fn device_unit(cases: &[Case], seed: u64) -> ferrinfer_kernels::TranslationUnit {
    const W: usize = 14;
    let mut src = dsl_headers();
    src.push_str(
        "struct Params {
  float pf; int pi; unsigned pu; bool pb;
  const float* af; unsigned af_len;
  const int* ai; unsigned ai_len;
  const unsigned* au; unsigned au_len;
};
__device__ const unsigned af_bits[4] = {0x3fc00000u, 0x80000000u, 0x7fc00000u, 0xff61b1e6u};
__device__ const int ai[4] = {-2147483647 - 1, -1, 0, 7};
__device__ const unsigned au[4] = {0u, 1u, 32u, 4294967295u};
__device__ __forceinline__ unsigned bits_of(float f) { return __float_as_uint(f); }
__device__ __forceinline__ unsigned bits_of(bool b) { return b ? 1u : 0u; }
",
    );
    src.push_str(&variants(cases));
    let _ = writeln!(
        src,
        "extern \"C\" __global__ void ferrinfer_dsl_diff(const unsigned* in, unsigned* out, int n) {{
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= n) return;
  const unsigned* x = in + j * {W};
  const Params self{{__uint_as_float(x[2]), static_cast<int>(x[3]), x[4], x[5] != 0u,
      reinterpret_cast<const float*>(af_bits), 4u, ai, 4u, au, 4u}};
  const fi::Pos at{{x[6], x[7], x[8], x[9], x[10], x[11], x[12], x[13]}};
  const float o = __uint_as_float(x[0]);
  const unsigned i = x[1];"
    );
    for (k, c) in cases.iter().enumerate() {
        let _ = writeln!(src, "  out[{k} * n + j] = bits_of({});", call(k, c));
    }
    src.push_str("}\n");
    ferrinfer_kernels::TranslationUnit {
        name: format!("dsl_diff_{seed}_{}", cases.len()),
        source: src,
        entry: "ferrinfer_dsl_diff".into(),
        merge_entry: None,
    }
}

/// NVRTC compiles lowered bodies of every kind (the host test's, transcendental functions
/// included) for sm_80 and sm_90a: an ambiguous overload or a missing helper shows here, in CI,
/// not on a GPU. Needs NVRTC (scripts/test installs it); it fails without, never skips.
#[test]
fn nvrtc_compiles_lowered_bodies() {
    use ferrinfer_runtime::jit::{Arch, Jit, JitConfig};
    let seed = env_usize("FERRINFER_DIFF_SEED", 8) as u64;
    let cases = generate(seed, env_usize("FERRINFER_DIFF_NVRTC_BODIES", 500), false);
    let tu = device_unit(&cases, seed);
    let jit = Jit::new(JitConfig {
        cache_dir: None,
        compile: true,
        extra_options: Vec::new(),
    })
    .with_announce(false);
    for arch in [Arch::new(8, 0), Arch::new(9, 0)] {
        if let Err(e) = jit.compile(&tu, arch) {
            panic!("NVRTC refused lowered hook bodies for {arch:?}: {e}");
        }
    }
}

/// A sample of the bodies on the GPU: NVRTC with the runtime's options (multiply-add contraction
/// on, as for every kernel), one thread per input. Only operations that are exact everywhere are
/// generated (CUDA's expf, tanhf, powf... differ from the host's libm by their documented ulp
/// bounds, and one ulp in a comparison changes everything after it), and the results must agree
/// bit for bit. `FERRINFER_DIFF_GPU_BODIES` (default 300) sets the sample size.
#[test]
#[ignore = "requires a CUDA GPU"]
fn gpu_lowered_hooks_compute_what_rust_computes() {
    use cudarc::driver::{LaunchConfig, PushKernelArg};
    use ferrinfer_runtime::device::Gpu;
    use ferrinfer_runtime::jit::Jit;

    let bodies = env_usize("FERRINFER_DIFF_GPU_BODIES", 300);
    let seed = env_usize("FERRINFER_DIFF_SEED", 8) as u64;
    let mut rng = Rng(seed);
    let input = inputs(&mut rng, 256);
    let cases = generate(seed, bodies, true);

    // Inputs: 14 words each (o, i, pf, pi, pu, pb, pos[8]); outputs: body-major.
    const W: usize = 14;
    let mut words = Vec::with_capacity(input.len() * W);
    for x in &input {
        words.extend([
            x.o.to_bits(),
            x.i,
            x.pf.to_bits(),
            x.pi as u32,
            x.pu,
            x.pb as u32,
        ]);
        words.extend(x.pos);
    }
    let tu = device_unit(&cases, seed);
    assert_eq!(AF[3].to_bits(), 0xff61_b1e6);

    let gpu = Gpu::get(0).expect("this test needs a CUDA GPU");
    let kernel = Jit::global()
        .compile(&tu, gpu.arch())
        .unwrap_or_else(|e| panic!("NVRTC refused the lowered sample: {e}"));
    let module = gpu
        .context()
        .load_module(cudarc::nvrtc::Ptx::from_binary(kernel.cubin.clone()))
        .unwrap();
    let f = module.load_function("ferrinfer_dsl_diff").unwrap();
    let d_in = gpu.stream().clone_htod(&words).unwrap();
    // Poisoned, so a body that writes nothing cannot pass.
    let mut d_out = gpu
        .stream()
        .clone_htod(&vec![0xdead_beefu32; cases.len() * input.len()])
        .unwrap();
    let n = input.len() as i32;
    let stream = gpu.stream();
    let mut launch = stream.launch_builder(&f);
    launch.arg(&d_in);
    launch.arg(&mut d_out);
    launch.arg(&n);
    // 128 threads a block: a kernel of hundreds of bodies holds more registers than 1024 threads
    // of a block can have (LaunchConfig::for_num_elems's 1024 failed to launch on the H200).
    let cfg = LaunchConfig {
        grid_dim: ((input.len() as u32).div_ceil(128), 1, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the kernel takes (const unsigned*, unsigned*, int); `d_in` holds n * W words and
    // `d_out` cases * n, which is what threads j < n read and write; both live past the sync.
    unsafe { launch.launch(cfg) }.unwrap();
    gpu.synchronize().unwrap();
    let out = gpu.stream().clone_dtoh(&d_out).unwrap();
    let failures = compare(&cases, &input, seed, |k, j| out[k * input.len() + j]);
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
