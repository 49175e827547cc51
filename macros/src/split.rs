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

use crate::ir::{BinOp, Block, Expr, Func, Kind, Scalar, Stmt, Ty};

/// Where the scales of a logits hook are; `None` where a scale is 1.
pub struct Split<'f> {
    /// The product `s * pre` (or `pre * s`), which the core reads as its argument, and `pre`.
    pub pre: Option<(&'f Expr, &'f Expr)>,
    /// The body's value `post * rest` (or `rest * post`), which the core returns as `rest`, and
    /// `post` and `rest`.
    pub post: Option<(&'f Expr, &'f Expr, &'f Expr)>,
    /// A bound on |core| for every argument, where the core's value is made of tanh (hardware
    /// or exact), constants, `abs`, `min`, `max`, negation, sums and products: 1 for
    /// soft-capping. With it the prefill templates weight a score by `2^(post * core)` with no
    /// running row maximum where `|post|` times the bound is small (variant/hooks.cuh,
    /// `fixed_max`). `None` for any other shape, a body with a `return`, or a bound that is not
    /// finite.
    pub core_bound: Option<f32>,
}

/// The split of a hook whose first argument is the score (the logits hook).
pub fn split(func: &Func) -> Split<'_> {
    let score = func.args.first().copied().flatten();
    let is_score = |e: &Expr| matches!(e.kind, Kind::Local(id) if Some(id) == score);
    // One walk: any `return`, the score's reads and assignments, and its scaled product.
    let (mut returns, mut reads, mut assigned, mut product) = (false, 0, false, None);
    visit(&func.body, &mut |node| match node {
        Node::Stmt(Stmt::Return(_)) => returns = true,
        Node::Stmt(Stmt::Assign(id, _, _)) => assigned |= Some(*id) == score,
        Node::Stmt(_) => {}
        Node::Expr(e) => {
            reads += usize::from(is_score(e));
            if let Some((factor, _)) = scaled(e, is_score) {
                product = Some((e, factor));
            }
        }
    });
    let pre = product.filter(|_| reads == 1 && !assigned);
    let post = if returns {
        None
    } else {
        func.body.tail.as_deref().and_then(|tail| {
            let (factor, rest) = scaled(tail, |_| true)?;
            Some((tail, factor, rest))
        })
    };
    // `s * k` as the whole body is either; taken as `pre`, it is not also `post`.
    let post = post.filter(|(tail, _, _)| pre.is_none_or(|(p, _)| !std::ptr::eq(p, *tail)));
    // The core's value: the body's, less `post`.
    let value = match &post {
        Some((_, _, rest)) => Some(*rest),
        None => func.body.tail.as_deref(),
    };
    let core_bound = value
        .filter(|_| !returns)
        .and_then(bound)
        .filter(|b| b.is_finite());
    Split {
        pre,
        post,
        core_bound,
    }
}

/// The bound of `core_bound` on `e`. f32 rounding is monotone, so the bound's own sums and
/// products round no lower than the core's.
fn bound(e: &Expr) -> Option<f32> {
    if e.ty != Ty::Scalar(Scalar::F32) {
        return None;
    }
    match &e.kind {
        Kind::Float(c) => Some(c.abs()),
        Kind::Neg(x) => bound(x),
        Kind::Binary(BinOp::Add | BinOp::Sub, l, r) => Some(bound(l)? + bound(r)?),
        Kind::Binary(BinOp::Mul, l, r) => Some(bound(l)? * bound(r)?),
        Kind::Call(m, args) => match (m.rust, args.as_slice()) {
            ("tanh" | "tanh_approx", [_]) => Some(1.0),
            ("abs", [x]) => bound(x),
            ("min" | "max", [x, y]) => Some(bound(x)?.max(bound(y)?)),
            _ => None,
        },
        Kind::If(_, t, f) => Some(bound(t.tail.as_deref()?)?.max(bound(f.tail.as_deref()?)?)),
        _ => None,
    }
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
pub fn params_only(e: &Expr) -> bool {
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

/// A statement or an expression of a hook body, as `visit` meets them.
enum Node<'f> {
    Stmt(&'f Stmt),
    Expr(&'f Expr),
}

/// Calls `f` on every statement and expression of `b`, nested blocks included, parents first.
fn visit<'f>(b: &'f Block, f: &mut impl FnMut(Node<'f>)) {
    for s in &b.stmts {
        f(Node::Stmt(s));
        match s {
            Stmt::Let(_, e) => {
                if let Some(e) = e {
                    visit_expr(e, f);
                }
            }
            Stmt::Discard(e) | Stmt::Return(e) | Stmt::Assign(_, _, e) => visit_expr(e, f),
            Stmt::If(c, t, els) => {
                visit_expr(c, f);
                visit(t, f);
                if let Some(els) = els {
                    visit(els, f);
                }
            }
            Stmt::Block(b) => visit(b, f),
        }
    }
    if let Some(t) = &b.tail {
        visit_expr(t, f);
    }
}

fn visit_expr<'f>(e: &'f Expr, f: &mut impl FnMut(Node<'f>)) {
    f(Node::Expr(e));
    match &e.kind {
        Kind::Neg(x) | Kind::Not(x) | Kind::Cast(_, x) | Kind::Index(_, x) => visit_expr(x, f),
        Kind::Binary(_, l, r) => {
            visit_expr(l, f);
            visit_expr(r, f);
        }
        Kind::Call(_, args) => args.iter().for_each(|a| visit_expr(a, f)),
        Kind::If(c, t, els) => {
            visit_expr(c, f);
            visit(t, f);
            visit(els, f);
        }
        _ => {}
    }
}
