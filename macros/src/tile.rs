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
//! is computed as the hook computes it (split.rs's `params_only`, which leaves out array elements:
//! an index out of range traps, and the hook might not have read it).
//!
//! Only a body of `let`s with values and a tail is analysed (no assignment can then change a
//! local, no `return` can leave early); another body gets no `mask_tile`, and the templates
//! evaluate its mask on every score of every tile.

use std::fmt::Write as _;

use crate::ir::{BinOp, Expr, Func, Kind, Scalar, Stmt, Ty};
use crate::{lower, split};

/// What an expression lowers to over a tile.
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
    };
    let mut out = String::new();
    for stmt in &func.body.stmts {
        let Stmt::Let(id, Some(init)) = stmt else {
            return None;
        };
        let v = t.expr(init)?;
        let v = match v {
            // A local known to be unknown is used as such, so the folding below sees it.
            Val::Int(text) if text == ANY => Val::Int(text),
            Val::Bool(text) if text == SOME => Val::Bool(text),
            Val::Int(text) => {
                let _ = writeln!(out, "    const fi::Iv r{id} = {text};");
                Val::Int(format!("r{id}"))
            }
            Val::Bool(text) => {
                let _ = writeln!(out, "    const fi::Tri r{id} = {text};");
                Val::Bool(format!("r{id}"))
            }
            Val::Opaque => Val::Opaque,
        };
        t.locals.push((*id, v));
    }
    let Val::Bool(tail) = t.expr(func.body.tail.as_deref()?)? else {
        return None;
    };
    // A mask whose verdict is "some" on every tile (CustomMask's bits) gets no function.
    if tail == SOME {
        return None;
    }
    Some(format!(
        "  __device__ __forceinline__ static fi::Tri mask_tile(const Params& self, \
         const fi::PosRange& at) {{\n{out}    return {tail};\n  }}\n"
    ))
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

/// `fi::<name>(args)` of integer operands, with `ANY` folded: any operand unknown makes the
/// result unknown (`unknown`: ANY or SOME, by the result's kind).
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
}

impl Tile<'_> {
    /// `None` only for a construct outside the analysed shape (an `if` with statements).
    fn expr(&self, e: &Expr) -> Option<Val> {
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
            Kind::If(c, then, els) => {
                let (Some(a), Some(b)) = (then.tail.as_deref(), els.tail.as_deref()) else {
                    return None;
                };
                if !then.stmts.is_empty() || !els.stmts.is_empty() {
                    return None;
                }
                let (c, a, b) = (self.expr(c)?, self.expr(a)?, self.expr(b)?);
                match (tri(&c), &a, &b) {
                    (Some(c), Val::Int(a), Val::Int(b)) => {
                        Val::Int(call("iv_if", &[&c, a, b], ANY))
                    }
                    (Some(_), Val::Bool(a), Val::Bool(b)) if a == SOME && b == SOME => any(&e.ty),
                    (Some(c), Val::Bool(a), Val::Bool(b)) => {
                        Val::Bool(format!("fi::tri_if({c}, {a}, {b})"))
                    }
                    _ => any(&e.ty),
                }
            }
            // Array elements with a position in the index, and what `params_only` took above.
            _ => any(&e.ty),
        })
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
