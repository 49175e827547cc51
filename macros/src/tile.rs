//! The mask hook over a tile: `mask_tile(self, at)` evaluates the mask's body by interval
//! arithmetic over every position of a tile (`fi::PosRange`: the query positions and heads of a
//! warp's rows, the keys of a K/V tile) and says whether the mask keeps every pair (`fi::kAll`),
//! none (`fi::kNone`), or may differ (`fi::kSome`). The prefill templates run the per-score mask
//! only on tiles it does not keep whole, so a sliding window, a prefix or a chunked mask costs
//! little more than causal, and the hook still decides every score it can change.
//!
//! Sound by construction, and exact where each position occurs once in a comparison of sums:
//! every integer sub-expression becomes an interval holding every value it takes on the tile
//! ("any" where an operation could wrap or has no monotone form: `%`, bit operations, shifts,
//! floats of a position), every boolean a three-valued `kAll`/`kNone`/`kSome` with Kleene's `&&`,
//! `||` and `!`. A sub-expression of parameters and constants alone has one value on the tile and
//! is computed as the hook computes it (split.rs's `params_only`, which leaves out array
//! elements). Both branches of an `if` (a value, or a statement that may `return`) are evaluated
//! and joined where the condition is not decided. An array element is read only where its index
//! is one value on the tile and in range; an index that may be out of range makes the verdict
//! "some", so the hook runs per score there and traps as it would (a skipped score must not hide
//! an error the hook would raise).
//!
//! A body with an assignment (which could change a local between its uses) gets no
//! `mask_tile`, nor one whose verdict is "some" on every tile; the templates evaluate such a
//! mask on every score of every tile.

use std::fmt::Write as _;

use crate::ir::{BinOp, Block, Expr, Func, Kind, Scalar, Stmt, Ty};
use crate::{lower, split};

/// What an expression lowers to over a tile.
#[derive(Clone)]
enum Val {
    /// An interval (`fi::Iv`) of an i32 or u32 expression.
    Int(String),
    /// Three-valued (`fi::Tri`).
    Bool(String),
    /// A float that depends on a position: no bound is kept.
    Opaque,
}

/// `mask_tile` for the mask hook `func`, or `None` where its body is not of the analysed shape.
pub fn mask_tile(func: &Func) -> Option<String> {
    let mut t = Tile {
        func,
        locals: Vec::new(),
        out: String::new(),
        checks: 0,
    };
    let Val::Bool(verdict) = t.seq(&func.body.stmts, End::Tail(func.body.tail.as_deref()?))? else {
        return None;
    };
    // A mask whose verdict is "some" on every tile (CustomMask's bits) gets no function.
    if verdict == SOME {
        return None;
    }
    let (ok, verdict) = match t.checks {
        0 => ("", verdict),
        _ => (
            "    bool ok = true;\n",
            format!("ok ? {verdict} : fi::kSome"),
        ),
    };
    Some(format!(
        "  __device__ __forceinline__ static fi::Tri mask_tile(const Params& self, \
         const fi::PosRange& at) {{\n{ok}{}    return {verdict};\n  }}\n",
        t.out
    ))
}

/// Where a run of statements ends when none returns: the body's tail, or (a block in statement
/// position, such as a branch of an `if`) its discarded tail and then what follows the block,
/// already lowered.
enum End<'e> {
    Tail(&'e Expr),
    Then(Option<&'e Expr>, Val),
}

/// Nothing known of an integer, of a boolean: folded through the operations, so a mask that
/// depends only on what has no interval form is seen to be "some" everywhere.
const ANY: &str = "fi::iv_any()";
const SOME: &str = "fi::kSome";

/// The CUDA integer type of `ty`, when it is i32 or u32.
fn int_type(ty: &Ty) -> Option<&'static str> {
    match ty {
        Ty::Scalar(s @ (Scalar::I32 | Scalar::U32)) => Some(s.cuda()),
        _ => None,
    }
}

/// What is known of a value of type `ty` without looking: anything.
fn any(ty: &Ty) -> Val {
    match ty {
        Ty::Scalar(Scalar::Bool) => Val::Bool(SOME.into()),
        ty if int_type(ty).is_some() => Val::Int(ANY.into()),
        _ => Val::Opaque,
    }
}

/// `fi::<name>(args)`, with `ANY` folded: any integer operand unknown makes the result unknown
/// (`unknown`: ANY or SOME, by the result's kind).
fn call(name: &str, args: &[&str], unknown: &str) -> String {
    if args.contains(&ANY) {
        unknown.to_string()
    } else {
        format!("fi::{name}({})", args.join(", "))
    }
}

struct Tile<'f> {
    func: &'f Func,
    /// What each local declared so far lowers to.
    locals: Vec<(usize, Val)>,
    /// The function's declarations so far.
    out: String,
    /// Array indexes checked so far (the function then declares `ok`).
    checks: usize,
}

impl Tile<'_> {
    /// The value of `stmts` ending in `end`: `None` for a statement outside the analysed shape
    /// (an assignment, a `let` without a value).
    fn seq(&mut self, stmts: &[Stmt], end: End<'_>) -> Option<Val> {
        for (i, stmt) in stmts.iter().enumerate() {
            match stmt {
                Stmt::Let(id, Some(init)) => {
                    let v = self.expr(init)?;
                    self.declare(*id, v);
                }
                // Evaluated for its index checks only.
                Stmt::Discard(e) => {
                    self.expr(e)?;
                }
                Stmt::Return(e) => return self.expr(e),
                Stmt::If(c, then, els) => {
                    let c = self.expr(c)?;
                    let rest = self.seq(&stmts[i + 1..], end)?;
                    let a = self.branch(then, rest.clone())?;
                    let b = match els {
                        Some(els) => self.branch(els, rest)?,
                        None => rest,
                    };
                    return Some(select(&c, a, b));
                }
                Stmt::Block(b) => {
                    let rest = self.seq(&stmts[i + 1..], end)?;
                    return self.branch(b, rest);
                }
                Stmt::Let(_, None) | Stmt::Assign(..) => return None,
            }
        }
        match end {
            End::Tail(e) => self.expr(e),
            End::Then(discarded, v) => {
                if let Some(e) = discarded {
                    self.expr(e)?; // for its index checks
                }
                Some(v)
            }
        }
    }

    /// A block in statement position followed by `then`.
    fn branch(&mut self, b: &Block, then: Val) -> Option<Val> {
        self.seq(&b.stmts, End::Then(b.tail.as_deref(), then))
    }

    /// Local `id` is `v`: declared, unless it is known to be unknown (then used as such, so the
    /// folding sees it).
    fn declare(&mut self, id: usize, v: Val) {
        let v = match v {
            Val::Int(text) if text == ANY => Val::Int(text),
            Val::Bool(text) if text == SOME => Val::Bool(text),
            Val::Int(text) => {
                let _ = writeln!(self.out, "    const fi::Iv r{id} = {text};");
                Val::Int(format!("r{id}"))
            }
            Val::Bool(text) => {
                let _ = writeln!(self.out, "    const fi::Tri r{id} = {text};");
                Val::Bool(format!("r{id}"))
            }
            Val::Opaque => Val::Opaque,
        };
        self.locals.push((id, v));
    }

    /// `None` only for a construct outside the analysed shape (see `seq`).
    fn expr(&mut self, e: &Expr) -> Option<Val> {
        if let Kind::Bool(b) = e.kind {
            return Some(Val::Bool(if b { "fi::kAll" } else { "fi::kNone" }.into()));
        }
        if split::params_only(e) {
            let exact = lower::exact(self.func, e);
            return Some(match &e.ty {
                Ty::Scalar(Scalar::Bool) => Val::Bool(format!("fi::tri_point({exact})")),
                ty if int_type(ty).is_some() => Val::Int(format!("fi::iv_point({exact})")),
                _ => Val::Opaque,
            });
        }
        let int = |v: &Val| match v {
            Val::Int(s) => Some(s.clone()),
            _ => None,
        };
        let tri = |v: &Val| match v {
            Val::Bool(s) => Some(s.clone()),
            _ => None,
        };
        Some(match &e.kind {
            Kind::Local(id) => match self.locals.iter().find(|(l, _)| l == id) {
                Some((_, Val::Int(s))) => Val::Int(s.clone()),
                Some((_, Val::Bool(s))) => Val::Bool(s.clone()),
                _ => any(&e.ty),
            },
            Kind::Pos(field) => Val::Int(format!("at.{field}")),
            Kind::Neg(x) => match (int_type(&e.ty), int(&self.expr(x)?)) {
                (Some(t), Some(x)) => Val::Int(call(&format!("iv_neg<{t}>"), &[&x], ANY)),
                _ => any(&e.ty),
            },
            Kind::Not(x) => match tri(&self.expr(x)?) {
                Some(x) if x == SOME => Val::Bool(x),
                Some(x) if e.ty == Ty::Scalar(Scalar::Bool) => {
                    Val::Bool(format!("fi::tri_not({x})"))
                }
                _ => any(&e.ty),
            },
            Kind::Binary(op, l, r) => {
                let (l, r) = (self.expr(l)?, self.expr(r)?);
                binary(*op, &e.ty, &l, &r).unwrap_or_else(|| any(&e.ty))
            }
            Kind::Cast(to, x) => {
                let x = self.expr(x)?;
                match (to, &x) {
                    (Scalar::I32 | Scalar::U32, Val::Int(x)) => {
                        Val::Int(call(&format!("iv_cast<{}>", to.cuda()), &[x], ANY))
                    }
                    (Scalar::I32 | Scalar::U32, Val::Bool(x)) => {
                        Val::Int(format!("fi::iv_of_tri({x})"))
                    }
                    _ => any(&e.ty),
                }
            }
            Kind::Call(m, args) => {
                let vals = args
                    .iter()
                    .map(|a| self.expr(a))
                    .collect::<Option<Vec<_>>>()?;
                let ints: Option<Vec<String>> = vals.iter().map(int).collect();
                match (m.rust, ints.as_deref(), int_type(&e.ty)) {
                    ("min" | "max", Some([a, b]), Some(_)) => {
                        Val::Int(call(&format!("iv_{}", m.rust), &[a, b], ANY))
                    }
                    ("abs", Some([a]), Some("int")) => Val::Int(call("iv_abs", &[a], ANY)),
                    _ => any(&e.ty),
                }
            }
            // An `if` as a value (`check` keeps `return` out of its blocks).
            Kind::If(c, then, els) => {
                let c = self.expr(c)?;
                let mut value = |b: &Block| match b.tail.as_deref() {
                    Some(tail) => self.seq(&b.stmts, End::Tail(tail)),
                    None => Some(any(&e.ty)),
                };
                let (a, b) = (value(then)?, value(els)?);
                select(&c, a, b)
            }
            Kind::Index(field, i) => {
                // Where the index may be out of range the hook may trap, so the verdict is
                // "some" (`ok`); the check is a statement, so no folding drops it. The element
                // is read where the index is one value.
                let index = match self.expr(i)? {
                    Val::Int(index) => index,
                    _ => ANY.to_string(),
                };
                let n = self.checks;
                self.checks += 1;
                let _ = writeln!(
                    self.out,
                    "    const fi::Iv c{n} = fi::iv_index(self.{field}_len, {index}, ok);"
                );
                match int_type(&e.ty) {
                    Some(_) => Val::Int(format!("fi::iv_element(self.{field}, c{n})")),
                    None => any(&e.ty),
                }
            }
            // What `params_only` took above.
            _ => any(&e.ty),
        })
    }
}

/// `if c { a } else { b }` over a tile: either branch where c is decided, else both joined.
fn select(c: &Val, a: Val, b: Val) -> Val {
    match (c, a, b) {
        (Val::Bool(c), Val::Int(a), Val::Int(b)) => Val::Int(call("iv_if", &[c, &a, &b], ANY)),
        (Val::Bool(_), Val::Bool(a), Val::Bool(b)) if a == SOME && b == SOME => Val::Bool(a),
        (Val::Bool(c), Val::Bool(a), Val::Bool(b)) => {
            Val::Bool(format!("fi::tri_if({c}, {a}, {b})"))
        }
        (_, Val::Int(_), _) => Val::Int(ANY.into()),
        (_, Val::Bool(_), _) => Val::Bool(SOME.into()),
        _ => Val::Opaque,
    }
}

/// `l op r` over a tile, where the operation has an interval form.
fn binary(op: BinOp, ty: &Ty, l: &Val, r: &Val) -> Option<Val> {
    use BinOp::*;
    Some(match (l, r) {
        (Val::Int(l), Val::Int(r)) => {
            let name = match op {
                Add => "add",
                Sub => "sub",
                Mul => "mul",
                Div => "div",
                Eq => "eq",
                Ne => "ne",
                Lt => "lt",
                Le => "le",
                Gt => "gt",
                Ge => "ge",
                _ => return None,
            };
            if op.is_comparison() {
                Val::Bool(call(&format!("iv_{name}"), &[l, r], SOME))
            } else {
                Val::Int(call(&format!("iv_{name}<{}>", int_type(ty)?), &[l, r], ANY))
            }
        }
        (Val::Bool(l), Val::Bool(r)) => {
            let (name, some_decides) = match op {
                And | BitAnd => ("and", false),
                Or | BitOr => ("or", false),
                Eq => ("eq", true),
                Ne | BitXor => ("ne", true),
                _ => return None,
            };
            // "some" and x is x's verdict or "some"; "some" compared with anything is "some".
            let unknown = (l == SOME) as usize + (r == SOME) as usize;
            if unknown == 2 || (unknown == 1 && some_decides) {
                Val::Bool(SOME.into())
            } else {
                Val::Bool(format!("fi::tri_{name}({l}, {r})"))
            }
        }
        _ => return None,
    })
}
