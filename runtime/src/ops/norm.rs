//! Row norms of a `[rows, hidden]` activation: RMSNorm, fused residual add + RMSNorm, Gemma's
//! `(1 + w)` forms of both, and LayerNorm.
//!
//! - [`rmsnorm`]: `out = x / sqrt(mean(x^2) + eps) * w`.
//! - [`fused_add_rmsnorm`]: `residual = residual + x` (stored in the element type), then
//!   `x = rmsnorm(residual) * w`, both in place. The norm is taken of the residual as stored
//!   (rounded), so the pair gives exactly what an unfused add followed by [`rmsnorm`] gives.
//!   FlashInfer normalises the unrounded f32 sum instead; the two differ by at most the rounding
//!   of one element.
//! - [`gemma_rmsnorm`], [`gemma_fused_add_rmsnorm`]: the same with the weight applied as `1 + w`.
//! - [`layernorm`]: `out = (x - mean) / sqrt(var + eps) * gamma + beta`, the biased variance (as
//!   PyTorch), gamma and beta in f32 (as FlashInfer takes them).
//!
//! Rows are dense: every buffer is `[rows, hidden]` with rows `hidden` elements apart (a view of
//! part of a larger tensor works when its rows are contiguous; rows at another stride need a copy).
//!
//! Any hidden size and any number of rows (0 too). On the CPU each op is plain Rust in f64,
//! rounded to the element type at the end; on a GPU it is one JIT-compiled kernel
//! (`kernels/cuda/ops/norm.cuh`), asynchronous, with no allocation or host synchronisation in the
//! call (so a CUDA graph can capture it). A block's threads read a row once with 16-byte accesses
//! when the hidden size and the buffers allow (narrower ones otherwise), keep it in registers
//! through the reduction, and write it.
//!
//! ```
//! use ferrinfer_runtime::ops::norm::{self, NormShape};
//! use ferrinfer_runtime::{Backend, prelude::bf16};
//! # fn main() -> ferrinfer_runtime::Result<()> {
//! let backend = Backend::Cpu;
//! let shape = NormShape::new(2, 4)?;
//! let x = backend.upload(&[1.0, -1.0, 1.0, -1.0, 2.0, 2.0, 2.0, 2.0].map(bf16::from_f32))?;
//! let w = backend.upload(&[1.0, 2.0, 0.5, 1.0].map(bf16::from_f32))?;
//! let mut out = backend.filled(shape.elements(), bf16::ZERO)?;
//! norm::rmsnorm(&backend, shape, &x, &w, 0.0, &mut out)?;
//! let out: Vec<f32> = out.to_vec()?.iter().map(|v| v.to_f32()).collect();
//! assert_eq!(out, [1.0, -2.0, 0.5, -1.0, 1.0, 2.0, 0.5, 1.0]);
//!
//! // The fused form: residual += x, then x = rmsnorm(residual), in place.
//! let mut x = backend.upload(&[1.0; 4].map(bf16::from_f32))?;
//! let mut residual = backend.upload(&[2.0, -4.0, 2.0, -4.0].map(bf16::from_f32))?;
//! let shape = NormShape::new(1, 4)?;
//! norm::fused_add_rmsnorm(&backend, shape, &mut x, &mut residual, &w, 0.0)?;
//! let r: Vec<f32> = residual.to_vec()?.iter().map(|v| v.to_f32()).collect();
//! let x: Vec<f32> = x.to_vec()?.iter().map(|v| v.to_f32()).collect();
//! assert_eq!(r, [3.0, -3.0, 3.0, -3.0]);
//! assert_eq!(x, [1.0, -2.0, 0.5, -1.0]);
//! # Ok(()) }
//! ```

use std::sync::Arc;

use ferrinfer_kernels::ops::norm::{NormArgs, norm_launch_dims, norm_unit, norm_vec_width};
use ferrinfer_kernels::{DType, TranslationUnit};

use crate::device::backend::Backend;
use crate::device::dtype::Element;
use crate::device::gpu::Gpu;
use crate::device::view::{Dst, Src, put};
use crate::error::{Error, Result};
use crate::jit::{Arch, CompiledKernel, Jit};
use crate::ops::kernel;

/// Elements per access the norm kernels are instantiated for (see [`compile`]).
pub use ferrinfer_kernels::ops::norm::NORM_VEC_WIDTHS as VEC_WIDTHS;
/// Which norm a kernel computes: RMS (also Gemma's), fused add + RMS, LayerNorm.
pub use ferrinfer_kernels::ops::norm::NormKind;

/// The largest hidden size: the kernels count a row's elements in 32 bits with room to step.
pub const MAX_HIDDEN: u32 = i32::MAX as u32;

/// The shape of a norm's activations: `rows` rows of `hidden` contiguous elements. Validated and
/// opaque: every op trusts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NormShape {
    rows: u32,
    hidden: u32,
}

impl NormShape {
    /// A shape of `rows` rows (0 is fine) of `hidden` elements, `1 <= hidden <= MAX_HIDDEN`.
    pub fn new(rows: u32, hidden: u32) -> Result<Self> {
        if hidden == 0 || hidden > MAX_HIDDEN {
            return Err(Error::invalid(format!(
                "norm: hidden = {hidden}; expected 1..={MAX_HIDDEN}"
            )));
        }
        if u64::from(rows)
            .checked_mul(u64::from(hidden))
            .is_none_or(|n| usize::try_from(n).is_err())
        {
            return Err(Error::invalid(format!(
                "norm: [rows={rows}, hidden={hidden}] does not fit in memory"
            )));
        }
        Ok(NormShape { rows, hidden })
    }
    /// Rows.
    pub fn rows(&self) -> u32 {
        self.rows
    }
    /// Elements per row.
    pub fn hidden(&self) -> u32 {
        self.hidden
    }
    /// Elements of the activations, `rows * hidden`.
    pub fn elements(&self) -> usize {
        self.rows as usize * self.hidden as usize
    }
    fn describe(&self) -> String {
        format!("[rows={}, hidden={}]", self.rows, self.hidden)
    }
}

/// RMSNorm of every row: `out = x / sqrt(mean(x^2) + eps) * weight`. `x` and `out` hold
/// `shape.elements()` elements, `weight` `shape.hidden()`. Asynchronous on a GPU.
///
/// Errors: a buffer whose length does not match `shape` (named in the message), `eps` negative
/// or not finite, or a buffer of another backend.
pub fn rmsnorm<T: Element>(
    backend: &Backend,
    shape: NormShape,
    x: &dyn Src<T>,
    weight: &dyn Src<T>,
    eps: f32,
    out: &mut dyn Dst<T>,
) -> Result<()> {
    rms(backend, shape, x, weight, eps, 0.0, out, "rmsnorm")
}

/// Gemma's RMSNorm: [`rmsnorm`] with the weight applied as `1 + weight` (the sum in f32).
/// Errors as [`rmsnorm`].
///
/// ```
/// use ferrinfer_runtime::ops::norm::{self, NormShape};
/// use ferrinfer_runtime::{Backend, prelude::f16};
/// # fn main() -> ferrinfer_runtime::Result<()> {
/// let backend = Backend::Cpu;
/// let shape = NormShape::new(1, 2)?;
/// let x = backend.upload(&[3.0, -3.0].map(f16::from_f32))?;
/// // A zero weight is the identity scale in Gemma's form.
/// let w = backend.upload(&[0.0, 1.0].map(f16::from_f32))?;
/// let mut out = backend.filled(2, f16::ZERO)?;
/// norm::gemma_rmsnorm(&backend, shape, &x, &w, 0.0, &mut out)?;
/// let out: Vec<f32> = out.to_vec()?.iter().map(|v| v.to_f32()).collect();
/// assert_eq!(out, [1.0, -2.0]);
/// # Ok(()) }
/// ```
pub fn gemma_rmsnorm<T: Element>(
    backend: &Backend,
    shape: NormShape,
    x: &dyn Src<T>,
    weight: &dyn Src<T>,
    eps: f32,
    out: &mut dyn Dst<T>,
) -> Result<()> {
    rms(backend, shape, x, weight, eps, 1.0, out, "gemma_rmsnorm")
}

/// Residual add then RMSNorm, in place: `residual = residual + x` (rounded to `T`), then
/// `x = residual / sqrt(mean(residual^2) + eps) * weight`, the norm taken of the rounded residual.
/// Asynchronous on a GPU.
///
/// Errors as [`rmsnorm`].
pub fn fused_add_rmsnorm<T: Element>(
    backend: &Backend,
    shape: NormShape,
    x: &mut dyn Dst<T>,
    residual: &mut dyn Dst<T>,
    weight: &dyn Src<T>,
    eps: f32,
) -> Result<()> {
    fused(
        backend,
        shape,
        x,
        residual,
        weight,
        eps,
        0.0,
        "fused_add_rmsnorm",
    )
}

/// Gemma's fused residual add + RMSNorm: [`fused_add_rmsnorm`] with the weight applied as
/// `1 + weight`. Errors as [`rmsnorm`].
pub fn gemma_fused_add_rmsnorm<T: Element>(
    backend: &Backend,
    shape: NormShape,
    x: &mut dyn Dst<T>,
    residual: &mut dyn Dst<T>,
    weight: &dyn Src<T>,
    eps: f32,
) -> Result<()> {
    let name = "gemma_fused_add_rmsnorm";
    fused(backend, shape, x, residual, weight, eps, 1.0, name)
}

/// LayerNorm of every row: `out = (x - mean) / sqrt(var + eps) * gamma + beta`, with the biased
/// variance; `gamma` and `beta` are f32 `[hidden]`. Asynchronous on a GPU.
///
/// Errors as [`rmsnorm`].
///
/// ```
/// use ferrinfer_runtime::ops::norm::{self, NormShape};
/// use ferrinfer_runtime::{Backend, prelude::bf16};
/// # fn main() -> ferrinfer_runtime::Result<()> {
/// let backend = Backend::Cpu;
/// let shape = NormShape::new(1, 4)?;
/// // Mean 5, variance 1: the normalised row is [-1, 1, -1, 1].
/// let x = backend.upload(&[4.0, 6.0, 4.0, 6.0].map(bf16::from_f32))?;
/// let gamma = backend.upload(&[1.0, 1.0, 2.0, 2.0])?;
/// let beta = backend.upload(&[0.0, 0.0, 0.0, 0.5])?;
/// let mut out = backend.filled(4, bf16::ZERO)?;
/// norm::layernorm(&backend, shape, &x, &gamma, &beta, 0.0, &mut out)?;
/// let out: Vec<f32> = out.to_vec()?.iter().map(|v| v.to_f32()).collect();
/// assert_eq!(out, [-1.0, 1.0, -2.0, 2.5]);
/// # Ok(()) }
/// ```
pub fn layernorm<T: Element>(
    backend: &Backend,
    shape: NormShape,
    x: &dyn Src<T>,
    gamma: &dyn Src<f32>,
    beta: &dyn Src<f32>,
    eps: f32,
    out: &mut dyn Dst<T>,
) -> Result<()> {
    let op = "layernorm";
    check_eps(op, eps)?;
    check_len(op, "x", x.len(), shape.elements(), shape)?;
    check_len(op, "gamma", gamma.len(), shape.hidden as usize, shape)?;
    check_len(op, "beta", beta.len(), shape.hidden as usize, shape)?;
    check_len(op, "out", out.len(), shape.elements(), shape)?;
    match backend {
        Backend::Cpu => {
            let f = layernorm_f64(
                shape,
                &f64s(x.host()?),
                &gamma
                    .host()?
                    .iter()
                    .map(|&g| f64::from(g))
                    .collect::<Vec<_>>(),
                &beta
                    .host()?
                    .iter()
                    .map(|&b| f64::from(b))
                    .collect::<Vec<_>>(),
                f64::from(eps),
            )?;
            put(out.host_mut()?, &(round(&f)))?;
            Ok(())
        }
        Backend::Cuda(gpu) => {
            let args = NormArgs {
                x: x.device_ptr(gpu)?,
                weight: gamma.device_ptr(gpu)?,
                bias: beta.device_ptr(gpu)?,
                out: out.device_ptr(gpu)?,
                ..shape_args(shape, eps, 0.0)
            };
            launch::<T>(gpu, NormKind::Layer, args)
        }
    }
}

/// RMSNorm on host data in f64: `x[r, i] / sqrt(mean_i(x[r, i]^2) + eps) * (weight[i] +
/// weight_offset)`. The CPU backend's arithmetic and the oracle of the tests.
pub fn rmsnorm_f64(
    shape: NormShape,
    x: &[f64],
    weight: &[f64],
    weight_offset: f64,
    eps: f64,
) -> Result<Vec<f64>> {
    let op = "rmsnorm_f64";
    check_len(op, "x", x.len(), shape.elements(), shape)?;
    check_len(op, "weight", weight.len(), shape.hidden as usize, shape)?;
    let h = shape.hidden as usize;
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks(h) {
        let mean_square = row.iter().map(|v| v * v).sum::<f64>() / h as f64;
        let scale = 1.0 / (mean_square + eps).sqrt();
        out.extend(
            row.iter()
                .zip(weight)
                .map(|(v, w)| v * scale * (w + weight_offset)),
        );
    }
    Ok(out)
}

/// LayerNorm on host data in f64: `(x - mean) / sqrt(var + eps) * gamma + beta` per row, the
/// biased variance. The CPU backend's arithmetic and the oracle of the tests.
pub fn layernorm_f64(
    shape: NormShape,
    x: &[f64],
    gamma: &[f64],
    beta: &[f64],
    eps: f64,
) -> Result<Vec<f64>> {
    let op = "layernorm_f64";
    check_len(op, "x", x.len(), shape.elements(), shape)?;
    check_len(op, "gamma", gamma.len(), shape.hidden as usize, shape)?;
    check_len(op, "beta", beta.len(), shape.hidden as usize, shape)?;
    let h = shape.hidden as usize;
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks(h) {
        let mean = row.iter().sum::<f64>() / h as f64;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / h as f64;
        let rstd = 1.0 / (var + eps).sqrt();
        out.extend(
            row.iter()
                .zip(gamma.iter().zip(beta))
                .map(|(v, (g, b))| (v - mean) * rstd * g + b),
        );
    }
    Ok(out)
}

/// The compiled norm kernel of `kind` for `dtype`, `vec` elements per access (one of
/// [`VEC_WIDTHS`]) and `arch`, through `jit`. Needs NVRTC but no GPU.
pub fn compile(
    jit: &Jit,
    kind: NormKind,
    dtype: DType,
    vec: u32,
    arch: Arch,
) -> Result<Arc<CompiledKernel>> {
    jit.compile(&unit(kind, dtype, vec)?, arch)
}

fn unit(kind: NormKind, dtype: DType, vec: u32) -> Result<TranslationUnit> {
    norm_unit(kind, dtype, vec).map_err(|e| Error::unsupported(format!("norm kernel: {e}")))
}

#[allow(clippy::too_many_arguments)]
fn rms<T: Element>(
    backend: &Backend,
    shape: NormShape,
    x: &dyn Src<T>,
    weight: &dyn Src<T>,
    eps: f32,
    weight_offset: f32,
    out: &mut dyn Dst<T>,
    op: &str,
) -> Result<()> {
    check_eps(op, eps)?;
    check_len(op, "x", x.len(), shape.elements(), shape)?;
    check_len(op, "weight", weight.len(), shape.hidden as usize, shape)?;
    check_len(op, "out", out.len(), shape.elements(), shape)?;
    match backend {
        Backend::Cpu => {
            let f = rmsnorm_f64(
                shape,
                &f64s(x.host()?),
                &f64s(weight.host()?),
                f64::from(weight_offset),
                f64::from(eps),
            )?;
            put(out.host_mut()?, &(round(&f)))?;
            Ok(())
        }
        Backend::Cuda(gpu) => {
            let args = NormArgs {
                x: x.device_ptr(gpu)?,
                weight: weight.device_ptr(gpu)?,
                out: out.device_ptr(gpu)?,
                ..shape_args(shape, eps, weight_offset)
            };
            launch::<T>(gpu, NormKind::Rms, args)
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn fused<T: Element>(
    backend: &Backend,
    shape: NormShape,
    x: &mut dyn Dst<T>,
    residual: &mut dyn Dst<T>,
    weight: &dyn Src<T>,
    eps: f32,
    weight_offset: f32,
    op: &str,
) -> Result<()> {
    check_eps(op, eps)?;
    check_len(op, "x", x.len(), shape.elements(), shape)?;
    check_len(op, "residual", residual.len(), shape.elements(), shape)?;
    check_len(op, "weight", weight.len(), shape.hidden as usize, shape)?;
    match backend {
        Backend::Cpu => {
            // The sum of two 16-bit floats is exact in f64; one rounding to T, as the kernel's f32
            // sum rounds (that sum can round only where the smaller term is far below T's ulp).
            let sum: Vec<T> = x
                .host()?
                .iter()
                .zip(residual.host()?)
                .map(|(a, b)| T::from_f32((f64::from(a.to_f32()) + f64::from(b.to_f32())) as f32))
                .collect();
            let f = rmsnorm_f64(
                shape,
                &f64s(&sum),
                &f64s(weight.host()?),
                f64::from(weight_offset),
                f64::from(eps),
            )?;
            put(x.host_mut()?, &(round(&f)))?;
            put(residual.host_mut()?, &sum)?;
            Ok(())
        }
        Backend::Cuda(gpu) => {
            let args = NormArgs {
                x: x.device_ptr(gpu)?,
                residual: residual.device_ptr(gpu)?,
                weight: weight.device_ptr(gpu)?,
                ..shape_args(shape, eps, weight_offset)
            };
            launch::<T>(gpu, NormKind::FusedAddRms, args)
        }
    }
}

fn check_eps(op: &str, eps: f32) -> Result<()> {
    if eps.is_finite() && eps >= 0.0 {
        return Ok(());
    }
    Err(Error::invalid(format!(
        "{op}: eps = {eps}; expected a finite value >= 0"
    )))
}

fn check_len(op: &str, name: &str, got: usize, want: usize, shape: NormShape) -> Result<()> {
    if got == want {
        return Ok(());
    }
    Err(Error::invalid(format!(
        "{op}: {name} has {got} elements; {} needs {want}",
        shape.describe()
    )))
}

fn f64s<T: Element>(xs: &[T]) -> Vec<f64> {
    xs.iter().map(|x| f64::from(x.to_f32())).collect()
}

fn round<T: Element>(xs: &[f64]) -> Vec<T> {
    xs.iter().map(|&x| T::from_f32(x as f32)).collect()
}

fn shape_args(shape: NormShape, eps: f32, weight_offset: f32) -> NormArgs {
    NormArgs {
        rows: shape.rows,
        hidden: shape.hidden,
        eps,
        weight_offset,
        ..NormArgs::default()
    }
}

// SAFETY: NormArgs is #[repr(C)] of five u64 then four 4-byte fields (u32, u32, f32, f32), no
// padding, matching fi::NormArgs (its size is asserted on both sides).
unsafe impl kernel::KernelArgs for NormArgs {}

/// Launch the `kind` kernel for `args` on the GPU's stream (compiling it on first use).
fn launch<T: Element>(gpu: &Gpu, kind: NormKind, args: NormArgs) -> Result<()> {
    if args.rows == 0 {
        return Ok(());
    }
    // The unused pointers are 0, aligned to anything.
    let vec = norm_vec_width(
        args.hidden,
        &[
            args.x,
            args.residual,
            args.out,
            if kind == NormKind::Layer {
                0
            } else {
                args.weight
            },
        ],
        &[
            if kind == NormKind::Layer {
                args.weight
            } else {
                0
            },
            args.bias,
        ],
    );
    let dims =
        norm_launch_dims(kind, args.rows, args.hidden, vec, gpu.sm_count()).ok_or_else(|| {
            Error::unsupported(format!(
                "{} of {} rows x {} exceeds CUDA's grid limit",
                kind.name(),
                args.rows,
                args.hidden
            ))
        })?;
    let dtype = T::DTYPE;
    let name = format!("{}_{}_v{vec}", kind.name(), dtype.name());
    // SAFETY: the unit's entry takes (NormArgs) by value. Every non-zero pointer in `args` was
    // taken from a live buffer on this GPU whose length `check_len` compared with the shape
    // (rows * hidden for x, residual and out; hidden for the weights), `norm_vec_width` made
    // hidden a multiple of `vec` and every pointer aligned to a pack, and the kernel touches only
    // rows < args.rows and packs < hidden / vec. The buffers outlive the launch: the caller holds
    // them and all work is ordered on the backend's one stream.
    unsafe { kernel::launch(gpu, &name, || norm_unit(kind, dtype, vec), dims, args) }
}
