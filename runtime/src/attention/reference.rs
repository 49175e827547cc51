//! CPU reference backend: attention with any variant, accumulating in f64. The oracle of every GPU test.
//!
//! It follows the attention semantics every backend implements: the hooks are called in f32 exactly
//! as the kernels call them; everything else (dot products, softmax, sums, `exp`, `ln`) is f64, so
//! the only difference from a GPU kernel is the kernel's own rounding.

use std::panic::AssertUnwindSafe;

use crate::attention::batch::Batch;
use crate::device::dtype::{self, Element};
use crate::error::{Error, Result};
use crate::parallel;
use crate::variant::params::check_coverage;
use crate::variant::{Pos, Variant};

/// The result of [`attention`], in f64.
#[derive(Clone, Debug, PartialEq)]
pub struct Reference {
    /// `[total_qo, num_qo_heads, head_dim]`.
    pub o: Vec<f64>,
    /// `[total_qo, num_qo_heads]`, natural log; `-inf` for a row with no visible key and no sink
    /// (its `o` is 0), NaN for a row with a NaN score or sink (its `o` is NaN too).
    /// Softmax-off variants have no log-sum-exp: every entry is NaN and means nothing.
    pub lse: Vec<f64>,
}

/// Attention of `q` over the keys `k` and values `v` that `batch` describes, with the variant's
/// hooks.
///
/// `q` is `[total_qo, num_qo_heads, head_dim]` (or at the batch's q strides); `k` and `v` are
/// addressed by the batch's KV index. The result is dense whatever the batch's o strides.
///
/// # Errors
/// [`Error::InvalidInput`] for:
/// - every inconsistency between the batch and the buffers;
/// - a parameter array shorter than the coverage its field states (`#[cover(qo_heads)]`...),
///   checked before any hook runs, as `run` does before a launch;
/// - a hook that panics, such as an array index that depends on the array's contents (the bit
///   offsets of `CustomMask`) and is out of range despite the coverage. The panic is caught and
///   the error names the variant, the request, row and head, and the panic's message; the
///   process's panic hook still prints the panic as usual. (Built with `panic = "abort"`, the
///   process aborts instead.) On the GPU the same index traps in the CUDA context.
///
/// A NaN in `q` or `k` (or a NaN logit or sink) makes every row that sees it NaN, in `o` and
/// `lse`, never an empty row; a row whose keys are all masked out stays empty (`o` = 0,
/// `lse` = `-inf`), whatever its query holds.
pub fn attention<V: Variant>(
    variant: &V,
    batch: &Batch,
    q: &[f32],
    k: &[f32],
    v: &[f32],
) -> Result<Reference> {
    batch.validate()?;
    batch.check_rows(batch.total_qo(), q.len(), k.len(), v.len(), None)?;
    check_coverage(variant, batch)?;
    let name = V::SPEC.name;
    let heads = batch.heads();
    let d = heads.head_dim() as usize;
    let mut out = Reference {
        o: vec![0.0; batch.q_len()],
        lse: vec![0.0; batch.lse_len()],
    };
    // One job per (request, KV head): its rows of `o` and `lse` are its own, so jobs run on every
    // core (the GPU tests' time is this function's) and their results are written back in order.
    let jobs: Vec<(usize, u32)> = (0..batch.batch())
        .flat_map(|b| (0..heads.num_kv_heads()).map(move |h| (b, h)))
        .collect();
    let job = |&(b, kv_head): &(usize, u32)| -> Result<Vec<(usize, Vec<f64>, f64)>> {
        let req = Request {
            b,
            kv_head,
            qo_len: batch.qo_len(b),
            kv_len: batch.kv().kv_len(b),
            kv_offset: batch.kv().key_offset(b),
            kv_total: batch.kv().key_total(b),
            head_dim: heads.head_dim(),
        };
        let kv = guarded(
            name,
            || format!("request {b}, KV head {kv_head}"),
            || KvRows::load(variant, batch, &req, k, v),
        )?;
        let group = heads.group_size();
        let mut rows = Vec::with_capacity((group * req.qo_len) as usize);
        for h in kv_head * group..(kv_head + 1) * group {
            for i in 0..req.qo_len {
                let row = batch.qo_indptr()[b] as usize + i as usize;
                let at = row * heads.num_qo_heads() as usize + h as usize;
                // check_rows held q to its strides: every row and head is inside it.
                let qa = batch.q_strides().at(row, h as usize);
                let (o, lse) = guarded(
                    name,
                    || format!("request {b}, query row {i}, query head {h}"),
                    || row_attention(variant, batch, &req, &kv, &q[qa..qa + d], i, h),
                )?;
                rows.push((at, o, lse));
            }
        }
        Ok(rows)
    };
    for rows in parallel::map(&jobs, usize::MAX, job) {
        for (at, o, lse) in rows? {
            out.o[at * d..(at + 1) * d].copy_from_slice(&o);
            out.lse[at] = lse;
        }
    }
    Ok(out)
}

/// [`attention`] on f16 or bf16 buffers (converted to f32 first, exactly).
pub fn attention_typed<V: Variant, T: Element>(
    variant: &V,
    batch: &Batch,
    q: &[T],
    k: &[T],
    v: &[T],
) -> Result<Reference> {
    attention(
        variant,
        batch,
        &dtype::to_f32(q),
        &dtype::to_f32(k),
        &dtype::to_f32(v),
    )
}

/// Runs code that calls hooks. A panic in a hook becomes an [`Error::InvalidInput`] that names the
/// variant, `place` and the panic's message, instead of unwinding into the caller.
fn guarded<T>(variant: &str, place: impl FnOnce() -> String, f: impl FnOnce() -> T) -> Result<T> {
    // Unwind safety: on a panic everything `f` touched is dropped with the whole result.
    std::panic::catch_unwind(AssertUnwindSafe(f)).map_err(|payload| {
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "no message".to_owned());
        Error::invalid(format!(
            "a hook of {variant} panicked at {}: {message}",
            place()
        ))
    })
}

/// Relative L2 error `||got - want|| / ||want||`.
///
/// Any NaN in `got`, or a length mismatch, gives `+inf`, so a test that bounds the error also
/// catches them. Entries equal in both (including equal infinities, such as the `-inf` log-sum-exp
/// of an empty row) count as exact and are left out of `||want||` when infinite. A zero `want`
/// gives 0 when `got` is zero too, `+inf` otherwise.
pub fn rel_l2(got: &[f32], want: &[f64]) -> f64 {
    if got.len() != want.len() || has_nan(got) {
        return f64::INFINITY;
    }
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for (&g, &w) in got.iter().zip(want) {
        let g = f64::from(g);
        if g != w {
            diff += (g - w) * (g - w);
        }
        if w.is_finite() {
            norm += w * w;
        }
    }
    if diff == 0.0 {
        0.0
    } else if norm == 0.0 {
        f64::INFINITY
    } else {
        (diff / norm).sqrt()
    }
}

/// The worst [`rel_l2`] over the (request, query head) slices of `[total_qo, num_qo_heads,
/// head_dim]` outputs of `batch`, with the request and head it occurs at: a bound on it holds for
/// every request and head, so one wrong request cannot hide in a large batch. Requests with no
/// query row have no slice. `(0.0, 0, 0)` for a batch without rows.
pub fn worst_rel_l2(batch: &Batch, got: &[f32], want: &[f64]) -> (f64, usize, u32) {
    let heads = batch.heads();
    let (hq, d) = (heads.num_qo_heads() as usize, heads.head_dim() as usize);
    if got.len() != want.len() || got.len() != batch.q_len() {
        return (f64::INFINITY, 0, 0);
    }
    let mut worst = (0.0, 0, 0);
    let (mut g, mut w) = (Vec::new(), Vec::new());
    for b in 0..batch.batch() {
        let rows = batch.qo_indptr()[b] as usize..batch.qo_indptr()[b + 1] as usize;
        for h in 0..hq {
            g.clear();
            w.clear();
            for r in rows.clone() {
                let at = (r * hq + h) * d;
                g.extend_from_slice(&got[at..at + d]);
                w.extend_from_slice(&want[at..at + d]);
            }
            let err = rel_l2(&g, &w);
            if !rows.is_empty() && err > worst.0 {
                worst = (err, b, h as u32);
            }
        }
    }
    worst
}

/// Whether any element is NaN (GPU outputs are poisoned with NaN before a run).
pub fn has_nan(xs: &[f32]) -> bool {
    xs.iter().any(|x| x.is_nan())
}

/// The request and KV head one [`KvRows`] belongs to.
struct Request {
    b: usize,
    kv_head: u32,
    qo_len: u32,
    /// Keys of the KV index: `kv_offset..kv_offset + kv_len` of the whole request's `kv_total`
    /// (`KvIndex::with_key_positions`; 0 and `kv_len` without positions).
    kv_len: u32,
    kv_offset: u32,
    kv_total: u32,
    head_dim: u32,
}

impl Request {
    /// What the hooks see of query row `qo_pos` and key position `kv_pos` (0 where there is no
    /// key) of the whole request.
    fn pos(&self, qo_pos: u32, kv_pos: u32, qo_head: u32) -> Pos {
        Pos {
            batch: self.b as u32,
            qo_pos,
            kv_pos,
            qo_head,
            kv_head: self.kv_head,
            qo_len: self.qo_len,
            kv_len: self.kv_total,
            head_dim: self.head_dim,
        }
    }
}

/// Keys (after the key hook) and values of one request and KV head, `[kv_len, head_dim]` each.
/// Built once and shared by every query row and query head of the group.
struct KvRows {
    keys: Vec<f64>,
    values: Vec<f64>,
}

impl KvRows {
    fn load<V: Variant>(variant: &V, batch: &Batch, req: &Request, k: &[f32], v: &[f32]) -> Self {
        let d = req.head_dim as usize;
        let n = req.kv_len as usize * d;
        let (mut keys, mut values) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for j in 0..req.kv_len {
            let off = batch.kv().offset(&batch.heads(), req.b, j, req.kv_head);
            let key = &k[off..off + d];
            if V::SPEC.hooks.key {
                let at = req.pos(0, req.kv_offset + j, 0);
                keys.extend(
                    (0..d).map(|e| {
                        f64::from(variant.key(key[e], key[(e + d / 2) % d], e as u32, at))
                    }),
                );
            } else {
                keys.extend(key.iter().map(|&x| f64::from(x)));
            }
            values.extend(v[off..off + d].iter().map(|&x| f64::from(x)));
        }
        KvRows { keys, values }
    }
}

/// Output row and log-sum-exp of query row `i`, head `h`.
fn row_attention<V: Variant>(
    variant: &V,
    batch: &Batch,
    req: &Request,
    kv: &KvRows,
    q: &[f32],
    i: u32,
    h: u32,
) -> (Vec<f64>, f64) {
    let hooks = V::SPEC.hooks;
    let d = q.len();
    // The query hook and the output-side hooks see the same position (kv_pos 0).
    let at_o = req.pos(i, 0, h);
    let q: Vec<f64> = if hooks.query {
        (0..d)
            .map(|e| f64::from(variant.query(q[e], q[(e + d / 2) % d], e as u32, at_o)))
            .collect()
    } else {
        q.iter().map(|&x| f64::from(x)).collect()
    };
    // The causal diagonal: queries are aligned to the end of the whole request, whose keys this
    // index holds from position kv_offset on.
    let last_visible =
        i64::from(i) + i64::from(req.kv_total) - i64::from(req.qo_len) - i64::from(req.kv_offset);
    let sm_scale = f64::from(batch.sm_scale());
    // (key index, logit) of every visible key.
    let mut logits = Vec::with_capacity(req.kv_len as usize);
    for j in 0..req.kv_len {
        let at = req.pos(i, req.kv_offset + j, h);
        if (batch.causal() && i64::from(j) > last_visible) || (hooks.mask && !variant.mask(at)) {
            continue;
        }
        let key = &kv.keys[j as usize * d..(j as usize + 1) * d];
        let s = q.iter().zip(key).map(|(a, b)| a * b).sum::<f64>() * sm_scale;
        let l = if hooks.logits {
            f64::from(variant.logits(s as f32, at))
        } else {
            s
        };
        logits.push((j as usize, l));
    }

    let mut o = vec![0.0f64; d];
    let lse = if V::SPEC.softmax {
        softmax_rows(variant, &at_o, kv, &logits, &mut o)
    } else {
        for &(j, l) in &logits {
            for (acc, &x) in o.iter_mut().zip(&kv.values[j * d..(j + 1) * d]) {
                *acc += l * x;
            }
        }
        f64::NAN
    };
    if hooks.output {
        for (e, x) in o.iter_mut().enumerate() {
            *x = f64::from(variant.output(*x as f32, e as u32, at_o));
        }
    }
    (o, lse)
}

/// `o = softmax(logits) . V` with the sink in the denominator; returns the log-sum-exp.
fn softmax_rows<V: Variant>(
    variant: &V,
    at_o: &Pos,
    kv: &KvRows,
    logits: &[(usize, f64)],
    o: &mut [f64],
) -> f64 {
    let d = o.len();
    let sink = V::SPEC.hooks.sink.then(|| f64::from(variant.sink(*at_o)));
    // `f64::max` ignores NaN, so a row of NaN scores would look empty. A NaN score (from a NaN in q
    // or k, or from a hook) makes the whole row NaN instead: bad input must show, not vanish.
    let scores = || logits.iter().map(|&(_, l)| l).chain(sink);
    if scores().any(f64::is_nan) {
        o.fill(f64::NAN);
        return f64::NAN;
    }
    let m = scores().fold(f64::NEG_INFINITY, f64::max);
    if m == f64::NEG_INFINITY {
        // Nothing to attend to (or only -inf logits): o stays 0 rather than 0/0.
        return f64::NEG_INFINITY;
    }
    let mut z = sink.map_or(0.0, |s| (s - m).exp());
    for &(j, l) in logits {
        let w = (l - m).exp();
        z += w;
        for (acc, &x) in o.iter_mut().zip(&kv.values[j * d..(j + 1) * d]) {
            *acc += w * x;
        }
    }
    for x in o.iter_mut() {
        *x /= z;
    }
    m + z.ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rel_l2_catches_nan_and_mismatch() {
        assert_eq!(rel_l2(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
        assert!((rel_l2(&[3.0, 4.0], &[0.0, 5.0]) - (10.0f64).sqrt() / 5.0).abs() < 1e-12);
        assert_eq!(rel_l2(&[f32::NAN, 1.0], &[1.0, 1.0]), f64::INFINITY);
        assert_eq!(rel_l2(&[1.0], &[1.0, 1.0]), f64::INFINITY);
        assert_eq!(rel_l2(&[0.0], &[0.0]), 0.0);
        assert_eq!(rel_l2(&[1.0], &[0.0]), f64::INFINITY);
        assert_eq!(
            rel_l2(&[f32::NEG_INFINITY, 2.0], &[f64::NEG_INFINITY, 2.0]),
            0.0
        );
        assert_eq!(
            rel_l2(&[1.0, 2.0], &[f64::NEG_INFINITY, 2.0]),
            f64::INFINITY
        );
        assert!(has_nan(&[0.0, f32::NAN]) && !has_nan(&[0.0, f32::INFINITY]));
    }
}
