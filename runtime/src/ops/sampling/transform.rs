//! Row transforms beside sampling, all without sorting: softmax with a per-request temperature,
//! top-k and top-p renormalisation of probabilities, and top-k masking of logits.
//!
//! Values are canonical as for sampling (module docs of [`super`]): logits that are NaN or
//! infinite count as `-inf`, probabilities that are NaN, negative or infinite as 0. A softmax row
//! without a finite logit, and a renormalised row without positive weight, become zeros. Top-k
//! keeps ties at the k-th value; top-p keeps the smallest set of largest probabilities whose mass
//! reaches `p` of the row's mass (ties kept). On a GPU each is one JIT-compiled kernel, one block
//! per row (top-k by a three-pass radix select, top-p by a radix select over the mass, whose
//! float atomics can move the boundary where the mass above a value is within rounding of `p`).
//!
//! ```
//! use ferrinfer_runtime::Backend;
//! use ferrinfer_runtime::ops::sampling::{Param, SampleShape, transform};
//! # fn main() -> ferrinfer_runtime::Result<()> {
//! let backend = Backend::Cpu;
//! let shape = SampleShape::new(1, 4)?;
//! let probs = backend.upload(&[0.1f32, 0.4, 0.3, 0.2])?;
//! let mut out = backend.filled(4, f32::NAN)?;
//! transform::top_k_renorm_probs(&backend, shape, &probs, Param::All(2), &mut out)?;
//! let out = out.to_vec()?;
//! assert_eq!(out[0], 0.0);
//! assert!((out[1] - 4.0 / 7.0).abs() < 1e-6);
//! # Ok(()) }
//! ```

use ferrinfer_kernels::ops::sampling::{self as kern, RowTransform, RowTransformArgs};

use super::{Param, SampleShape, canonical_logit, canonical_prob};
use crate::device::backend::Backend;
use crate::device::gpu::Gpu;
use crate::device::view::{Dst, Src};
use crate::error::{Error, Result};
use crate::ops::kernel;

/// `probs = softmax(logits / temperature)` row by row (`[batch, vocab]` f32 each). A scalar
/// temperature must be positive and finite; per-request values that are not are taken as 1.
/// Asynchronous on a GPU, no allocation, no host synchronisation.
pub fn softmax(
    backend: &Backend,
    shape: SampleShape,
    logits: &dyn Src<f32>,
    temperature: Param<'_, f32>,
    probs: &mut dyn Dst<f32>,
) -> Result<()> {
    temperature.check_len("temperature", shape.batch())?;
    if let Param::All(t) = temperature
        && !(t > 0.0 && t.is_finite())
    {
        return Err(Error::invalid(format!(
            "softmax: temperature = {t}; expected positive and finite"
        )));
    }
    run(
        backend,
        shape,
        RowTransform::Softmax,
        logits,
        Knobs {
            temperature,
            ..Knobs::default()
        },
        probs,
    )
}

/// Probabilities restricted to the `top_k` largest of each row (ties kept) and renormalised; 0
/// elsewhere. A scalar k must be in `1..=vocab`; per-request values are clamped to it.
pub fn top_k_renorm_probs(
    backend: &Backend,
    shape: SampleShape,
    probs: &dyn Src<f32>,
    top_k: Param<'_, i32>,
    out: &mut dyn Dst<f32>,
) -> Result<()> {
    check_k(top_k, shape, "top_k_renorm_probs")?;
    run(
        backend,
        shape,
        RowTransform::TopKRenorm,
        probs,
        Knobs {
            top_k,
            ..Knobs::default()
        },
        out,
    )
}

/// Probabilities restricted to each row's top-p set and renormalised; 0 elsewhere. A scalar p
/// must be in `(0, 1]`; per-request values: NaN is 1, others are clamped to `[0, 1]`.
pub fn top_p_renorm_probs(
    backend: &Backend,
    shape: SampleShape,
    probs: &dyn Src<f32>,
    top_p: Param<'_, f32>,
    out: &mut dyn Dst<f32>,
) -> Result<()> {
    top_p.check_len("top_p", shape.batch())?;
    if let Param::All(p) = top_p
        && !(p > 0.0 && p <= 1.0)
    {
        return Err(Error::invalid(format!(
            "top_p_renorm_probs: top_p = {p}; expected in (0, 1]"
        )));
    }
    run(
        backend,
        shape,
        RowTransform::TopPRenorm,
        probs,
        Knobs {
            top_p,
            ..Knobs::default()
        },
        out,
    )
}

/// Logits below each row's `top_k`-th largest set to `-inf` (ties kept). A scalar k must be in
/// `1..=vocab`; per-request values are clamped to it.
pub fn top_k_mask_logits(
    backend: &Backend,
    shape: SampleShape,
    logits: &dyn Src<f32>,
    top_k: Param<'_, i32>,
    out: &mut dyn Dst<f32>,
) -> Result<()> {
    check_k(top_k, shape, "top_k_mask_logits")?;
    run(
        backend,
        shape,
        RowTransform::TopKMask,
        logits,
        Knobs {
            top_k,
            ..Knobs::default()
        },
        out,
    )
}

fn check_k(top_k: Param<'_, i32>, shape: SampleShape, op: &str) -> Result<()> {
    top_k.check_len("top_k", shape.batch())?;
    if let Param::All(k) = top_k
        && (k < 1 || i64::from(k) > i64::from(shape.vocab()))
    {
        return Err(Error::invalid(format!(
            "{op}: top_k = {k}; expected 1..={}",
            shape.vocab()
        )));
    }
    Ok(())
}

#[derive(Clone, Copy)]
struct Knobs<'a> {
    top_k: Param<'a, i32>,
    top_p: Param<'a, f32>,
    temperature: Param<'a, f32>,
}

impl Default for Knobs<'_> {
    fn default() -> Self {
        Knobs {
            top_k: Param::All(i32::MAX),
            top_p: Param::All(1.0),
            temperature: Param::All(1.0),
        }
    }
}

fn run(
    backend: &Backend,
    shape: SampleShape,
    op: RowTransform,
    x: &dyn Src<f32>,
    knobs: Knobs<'_>,
    out: &mut dyn Dst<f32>,
) -> Result<()> {
    for (name, len) in [("input", x.len()), ("out", out.len())] {
        if len != shape.len() {
            return Err(Error::invalid(format!(
                "{}: {name} has {len} elements; [batch = {}, vocab = {}] needs {}",
                op_name(op),
                shape.batch(),
                shape.vocab(),
                shape.len()
            )));
        }
    }
    if shape.is_empty() {
        return Ok(());
    }
    match backend {
        Backend::Cpu => {
            let v = shape.vocab() as usize;
            let x = x.host()?;
            let mut y = Vec::with_capacity(x.len());
            for (row, xs) in x.chunks(v).enumerate() {
                y.extend(transform_row_host(op, xs, knobs, row)?);
            }
            out.host_mut()?.copy_from_slice(&y);
            Ok(())
        }
        Backend::Cuda(gpu) => {
            let (top_k, top_k_arr) = knobs.top_k.device(gpu, 1)?;
            let (top_p, top_p_arr) = knobs.top_p.device(gpu, 1.0)?;
            let (temperature, temperature_arr) = knobs.temperature.device(gpu, 1.0)?;
            let args = RowTransformArgs {
                x: x.device_ptr(gpu)?,
                out: out.device_ptr(gpu)?,
                top_k_arr,
                top_p_arr,
                temperature_arr,
                row_stride: u64::from(shape.vocab()),
                batch: shape.batch(),
                vocab: shape.vocab(),
                top_k,
                top_p,
                temperature,
                pad: 0,
            };
            launch(gpu, op, args)
        }
    }
}

fn op_name(op: RowTransform) -> &'static str {
    match op {
        RowTransform::Softmax => "softmax",
        RowTransform::TopKRenorm => "top_k_renorm_probs",
        RowTransform::TopPRenorm => "top_p_renorm_probs",
        RowTransform::TopKMask => "top_k_mask_logits",
    }
}

/// The CPU backend: one row in f64 (sorting for the thresholds), rounded to f32 at the end.
fn transform_row_host(
    op: RowTransform,
    x: &[f32],
    knobs: Knobs<'_>,
    row: usize,
) -> Result<Vec<f32>> {
    let n = x.len();
    let kth = |v: &[f32], k: usize| -> f32 {
        let mut s = v.to_vec();
        *s.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a)).1
    };
    let k = || -> Result<usize> {
        Ok(knobs
            .top_k
            .host_value(row)?
            .clamp(1, n.min(i32::MAX as usize) as i32) as usize)
    };
    Ok(match op {
        RowTransform::Softmax => {
            let t = knobs.temperature.host_value(row)?;
            let t = f64::from(if t > 0.0 && t.is_finite() { t } else { 1.0 });
            let v: Vec<f32> = x.iter().map(|&e| canonical_logit(e)).collect();
            let m = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            if m == f32::NEG_INFINITY {
                return Ok(vec![0.0; n]);
            }
            let w: Vec<f64> = v
                .iter()
                .map(|&e| ((f64::from(e) - f64::from(m)) / t).exp())
                .collect();
            let z: f64 = w.iter().sum();
            w.iter().map(|&e| (e / z) as f32).collect()
        }
        RowTransform::TopKMask => {
            let v: Vec<f32> = x.iter().map(|&e| canonical_logit(e)).collect();
            let k = k()?;
            let t = if k < n { kth(&v, k) } else { f32::NEG_INFINITY };
            v.iter()
                .map(|&e| if e >= t { e } else { f32::NEG_INFINITY })
                .collect()
        }
        RowTransform::TopKRenorm | RowTransform::TopPRenorm => {
            let v: Vec<f32> = x.iter().map(|&e| canonical_prob(e)).collect();
            let t = if op == RowTransform::TopKRenorm {
                let k = k()?;
                if k < n { kth(&v, k) } else { 0.0 }
            } else {
                let p = knobs.top_p.host_value(row)?;
                let p = if p.is_nan() { 1.0 } else { p.clamp(0.0, 1.0) };
                if p < 1.0 {
                    top_p_threshold(&v, f64::from(p))
                } else {
                    0.0
                }
            };
            let kept: f64 = v.iter().filter(|&&e| e >= t).map(|&e| f64::from(e)).sum();
            v.iter()
                .map(|&e| {
                    if e >= t && kept > 0.0 {
                        (f64::from(e) / kept) as f32
                    } else {
                        0.0
                    }
                })
                .collect()
        }
    })
}

/// The smallest value `t` whose mass strictly above is below `p` of the row's (or is 0): the
/// top-p set is `{v >= t}`.
pub(crate) fn top_p_threshold(v: &[f32], p: f64) -> f32 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| b.total_cmp(a));
    let target = p * s.iter().map(|&e| f64::from(e)).sum::<f64>();
    let mut above = 0.0;
    let mut t = s.first().copied().unwrap_or(0.0);
    let mut i = 0;
    while i < s.len() {
        let mut j = i;
        while j < s.len() && s[j] == s[i] {
            j += 1;
        }
        if above > 0.0 && above >= target {
            break;
        }
        t = s[i];
        above += f64::from(s[i]) * (j - i) as f64;
        i = j;
    }
    t
}

// SAFETY: RowTransformArgs is #[repr(C)] of 6 u64 then 6 four-byte fields (no padding), matching
// fi::RowTransformArgs (sizes asserted on both sides).
unsafe impl kernel::KernelArgs for RowTransformArgs {}

fn launch(gpu: &Gpu, op: RowTransform, args: RowTransformArgs) -> Result<()> {
    let dims = kern::sampling_launch_dims(args.batch).ok_or_else(|| {
        Error::unsupported(format!("{} rows exceed CUDA's grid limit", args.batch))
    })?;
    // Widths are powers of two, so the narrower of the two suits both pointers.
    let vec = kern::sampling_vec_width(args.row_stride, args.x)
        .min(kern::sampling_vec_width(args.row_stride, args.out));
    let name = kern::row_transform_kernel_name(op, vec);
    // SAFETY: the entry takes RowTransformArgs by value; `run` checked that x and out hold
    // batch * vocab elements (the kernel touches rows r < batch, elements < vocab, in packs of
    // `vec` that divide vocab and match both pointers' alignment) and each per-request array
    // holds batch values; the addresses are live buffers of this GPU that the caller holds past
    // the launch (work is ordered on the one stream).
    unsafe { kernel::launch(gpu, &name, || kern::row_transform_unit(op, vec), dims, args) }
}
