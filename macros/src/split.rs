//! The logits hook split around its scales: `logits(s) = post * core(pre * s)`, where `pre` and
//! `post` depend only on the parameters. The prefill templates multiply a score by sm_scale and
//! the logits by log2(e) anyway; with the split they fold those into `pre` and `post` once per
//! kernel, and `post` into the exponent's multiply-add, so soft-capping (`cap * tanh(s / cap)`
//! written `self.cap * (s * (1.0 / self.cap)).tanh_approx()`) costs a multiply and the tanh a
//! score instead of four multiplies and the tanh, and the reciprocal is taken once per kernel,
//! not on every score of a masked tile.
//!
//! Found, never required: a hook of another shape gets `pre = post = 1` and is its own core. The
//! pattern, on the typed IR:
//! - `pre`: the score argument occurs once in the body, as an operand of an f32 `*` whose other
//!   operand uses only parameters and constants;
//! - `post`: the body has no `return` and its value is an f32 `*` with such an operand.
//!
//! "Only parameters and constants" excludes array elements (an index out of range traps, and the
//! template evaluates `pre` and `post` where the hook might not run) and `if` (its blocks may
//! hold statements). With the same values, `post * core(pre * s)` computes the very operations
//! of `logits(s)` (an f32 product is commutative, bit for bit): the differential test checks it.

use crate::ir::{BinOp, Block, Expr, Func, Kind, LocalId, Scalar, Stmt, Ty};

/// Where the scales of a logits hook are; `None` where a scale is 1.
pub struct Split<'f> {
    /// The product `s * pre` (or `pre * s`), which the core reads as its argument, and `pre`.
    pub pre: Option<(&'f Expr, &'f Expr)>,
    /// The body's value `post * rest` (or `rest * post`), which the core returns as `rest`, and
    /// `post` and `rest`.
    pub post: Option<(&'f Expr, &'f Expr, &'f Expr)>,
}

/// The split of a hook whose first argument is the score (the logits hook).
pub fn split(func: &Func) -> Split<'_> {
    let score = func.args.first().copied().flatten();
    let pre = score.and_then(|s| {
        let mut uses = Uses {
            local: s,
            count: 0,
            assigned: false,
            product: None,
        };
        uses.block(&func.body);
        (uses.count == 1 && !uses.assigned)
            .then_some(uses.product)
            .flatten()
    });
    let post = if returns(&func.body) {
        None
    } else {
        func.body.tail.as_deref().and_then(|tail| {
            let (factor, rest) = scaled(tail, |_| true)?;
            Some((tail, factor, rest))
        })
    };
    // `s * k` as the whole body is either; taken as `pre`, it is not also `post`.
    let post = post.filter(|(tail, _, _)| pre.is_none_or(|(p, _)| !std::ptr::eq(p, *tail)));
    Split { pre, post }
}

/// `a * b` on f32 with one operand `params_only` and the other accepted by `other`:
/// (that operand, the other).
fn scaled(e: &Expr, other: impl Fn(&Expr) -> bool) -> Option<(&Expr, &Expr)> {
    let Kind::Binary(BinOp::Mul, l, r) = &e.kind else {
        return None;
    };
    if e.ty != Ty::Scalar(Scalar::F32) {
        return None;
    }
    if params_only(l) && other(r) {
        Some((l, r))
    } else if params_only(r) && other(l) {
        Some((r, l))
    } else {
        None
    }
}

/// An expression of parameters and constants only: the same value wherever the hook runs, and
/// safe to compute where it would not (no array element, nothing that traps).
fn params_only(e: &Expr) -> bool {
    match &e.kind {
        Kind::Bool(_)
        | Kind::Int(_)
        | Kind::Float(_)
        | Kind::Field(_)
        | Kind::Len(_)
        | Kind::Const(_) => true,
        Kind::Neg(x) | Kind::Not(x) | Kind::Cast(_, x) => params_only(x),
        Kind::Binary(_, l, r) => params_only(l) && params_only(r),
        Kind::Call(_, args) => args.iter().all(params_only),
        Kind::Local(_) | Kind::Pos(_) | Kind::Index(..) | Kind::If(..) => false,
    }
}

/// Whether a block holds a `return` anywhere.
fn returns(b: &Block) -> bool {
    b.stmts.iter().any(|s| match s {
        Stmt::Return(_) => true,
        Stmt::Let(_, e) => e.as_ref().is_some_and(expr_returns),
        Stmt::Discard(e) | Stmt::Assign(_, _, e) => expr_returns(e),
        Stmt::If(c, t, f) => expr_returns(c) || returns(t) || f.as_ref().is_some_and(returns),
        Stmt::Block(b) => returns(b),
    }) || b.tail.as_deref().is_some_and(expr_returns)
}

fn expr_returns(e: &Expr) -> bool {
    match &e.kind {
        Kind::If(c, t, f) => expr_returns(c) || returns(t) || returns(f),
        Kind::Neg(x) | Kind::Not(x) | Kind::Cast(_, x) | Kind::Index(_, x) => expr_returns(x),
        Kind::Binary(_, l, r) => expr_returns(l) || expr_returns(r),
        Kind::Call(_, args) => args.iter().any(expr_returns),
        _ => false,
    }
}

/// The uses of one local: how many reads, whether it is assigned, and the scaled product of the
/// last read seen as an operand of one.
struct Uses<'f> {
    local: LocalId,
    count: usize,
    assigned: bool,
    product: Option<(&'f Expr, &'f Expr)>,
}

impl<'f> Uses<'f> {
    fn block(&mut self, b: &'f Block) {
        for s in &b.stmts {
            match s {
                Stmt::Let(_, e) => {
                    if let Some(e) = e {
                        self.expr(e);
                    }
                }
                Stmt::Discard(e) | Stmt::Return(e) => self.expr(e),
                Stmt::Assign(id, _, e) => {
                    self.assigned |= *id == self.local;
                    self.expr(e);
                }
                Stmt::If(c, t, f) => {
                    self.expr(c);
                    self.block(t);
                    if let Some(f) = f {
                        self.block(f);
                    }
                }
                Stmt::Block(b) => self.block(b),
            }
        }
        if let Some(t) = &b.tail {
            self.expr(t);
        }
    }

    fn expr(&mut self, e: &'f Expr) {
        let local = self.local;
        if let Some((factor, _)) = scaled(e, |x| matches!(x.kind, Kind::Local(id) if id == local)) {
            self.product = Some((e, factor));
        }
        match &e.kind {
            Kind::Local(id) => self.count += usize::from(*id == local),
            Kind::Neg(x) | Kind::Not(x) | Kind::Cast(_, x) | Kind::Index(_, x) => self.expr(x),
            Kind::Binary(_, l, r) => {
                self.expr(l);
                self.expr(r);
            }
            Kind::Call(_, args) => args.iter().for_each(|a| self.expr(a)),
            Kind::If(c, t, f) => {
                self.expr(c);
                self.block(t);
                self.block(f);
            }
            _ => {}
        }
    }
}
