//! Gated activations of an MLP: `out = act(x[:, :d]) * x[:, d:]` for `x` `[rows, 2 * d]` and
//! `out` `[rows, d]`, with `act` SiLU ([`silu_and_mul`]), GELU with erf ([`gelu_and_mul`]) or
//! GELU's tanh approximation ([`gelu_tanh_and_mul`]).
//! Rows are dense: `x` is `[rows, 2 * d]` and `out` `[rows, d]` with no gaps between rows (a
//! view of part of a larger tensor works when its rows are contiguous; rows at another stride
//! need a copy).
//!
//! Any `d` and any number of rows (0 too). On the CPU each op is plain Rust in f64, rounded to the
//! element type at the end; on a GPU it is one JIT-compiled kernel
//! (`kernels/cuda/ops/activation.cuh`, f32 arithmetic), asynchronous, with no allocation or host
//! synchronisation in the call. It reads and writes 16 bytes per access when `d` and the buffers
//! allow, narrower accesses otherwise.
//!
//! ```
//! use ferrinfer_runtime::ops::activation::{self, ActShape};
//! use ferrinfer_runtime::{Backend, prelude::f16};
//! # fn main() -> ferrinfer_runtime::Result<()> {
//! let backend = Backend::Cpu;
//! // One row, d = 2: gate [0, 1], up [3, 2].
//! let shape = ActShape::new(1, 2)?;
//! let x = backend.upload(&[0.0, 1.0, 3.0, 2.0].map(f16::from_f32))?;
//! let mut out = backend.filled(shape.output_len(), f16::ZERO)?;
//! activation::silu_and_mul(&backend, shape, &x, &mut out)?;
//! let out: Vec<f32> = out.to_vec()?.iter().map(|v| v.to_f32()).collect();
//! // silu(0) * 3 = 0; silu(1) * 2 = 2 / (1 + e^-1).
//! assert_eq!(out[0], 0.0);
//! assert!((out[1] - 2.0 / (1.0 + (-1f32).exp())).abs() < 1e-3);
//! # Ok(()) }
//! ```

use std::sync::Arc;

use ferrinfer_kernels::ops::activation::{ActArgs, act_launch_dims, act_unit, act_vec_width};
use ferrinfer_kernels::{DType, TranslationUnit};

use crate::device::backend::Backend;
use crate::device::dtype::Element;
use crate::device::gpu::Gpu;
use crate::device::view::{Dst, Src, put};
use crate::error::{Error, Result};
use crate::jit::{Arch, CompiledKernel, Jit};
use crate::ops::kernel;

/// Elements per access the activation kernels are instantiated for (see [`compile`]).
pub use ferrinfer_kernels::ops::activation::ACT_VEC_WIDTHS as VEC_WIDTHS;
/// The activation applied to the first half of each row.
pub use ferrinfer_kernels::ops::activation::Act;

/// The largest `d`: the kernels index a row's outputs in 32 bits.
pub const MAX_D: u32 = i32::MAX as u32;

/// The shape of a gated activation: `rows` rows of `2 * d` inputs and `d` outputs. Validated and
/// opaque: every op trusts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ActShape {
    rows: u32,
    d: u32,
}

impl ActShape {
    /// A shape of `rows` rows (0 is fine) with `d` outputs each, `1 <= d <= MAX_D`.
    pub fn new(rows: u32, d: u32) -> Result<Self> {
        if d == 0 || d > MAX_D {
            return Err(Error::invalid(format!(
                "activation: d = {d}; expected 1..={MAX_D}"
            )));
        }
        if u64::from(rows)
            .checked_mul(2 * u64::from(d))
            .is_none_or(|n| usize::try_from(n).is_err())
        {
            return Err(Error::invalid(format!(
                "activation: [rows={rows}, 2 * d={}] does not fit in memory",
                2 * u64::from(d)
            )));
        }
        Ok(ActShape { rows, d })
    }
    /// Rows.
    pub fn rows(&self) -> u32 {
        self.rows
    }
    /// Outputs per row (half the inputs per row).
    pub fn d(&self) -> u32 {
        self.d
    }
    /// Elements of the input, `rows * 2 * d`.
    pub fn input_len(&self) -> usize {
        2 * self.output_len()
    }
    /// Elements of the output, `rows * d`.
    pub fn output_len(&self) -> usize {
        self.rows as usize * self.d as usize
    }
    fn describe(&self) -> String {
        format!("[rows={}, d={}]", self.rows, self.d)
    }
}

/// `out = act(x[:, :d]) * x[:, d:]`. `x` holds `shape.input_len()` elements, `out`
/// `shape.output_len()`. Asynchronous on a GPU.
///
/// Errors: a buffer whose length does not match `shape` (named in the message), or a buffer of
/// another backend.
pub fn act_and_mul<T: Element>(
    backend: &Backend,
    act: Act,
    shape: ActShape,
    x: &dyn Src<T>,
    out: &mut dyn Dst<T>,
) -> Result<()> {
    check_len(act, "x", x.len(), shape.input_len(), shape)?;
    check_len(act, "out", out.len(), shape.output_len(), shape)?;
    match backend {
        Backend::Cpu => {
            let x: Vec<f64> = x.host()?.iter().map(|v| f64::from(v.to_f32())).collect();
            let f = act_and_mul_f64(act, shape, &x)?;
            put(
                out.host_mut()?,
                &(f.iter().map(|&v| T::from_f32(v as f32)).collect::<Vec<_>>()),
            )?;
            Ok(())
        }
        Backend::Cuda(gpu) => {
            let args = ActArgs {
                x: x.device_ptr(gpu)?,
                out: out.device_ptr(gpu)?,
                rows: shape.rows,
                d: shape.d,
            };
            launch::<T>(gpu, act, args)
        }
    }
}

/// `out = silu(x[:, :d]) * x[:, d:]`, `silu(v) = v / (1 + exp(-v))`. Errors as [`act_and_mul`].
pub fn silu_and_mul<T: Element>(
    backend: &Backend,
    shape: ActShape,
    x: &dyn Src<T>,
    out: &mut dyn Dst<T>,
) -> Result<()> {
    act_and_mul(backend, Act::Silu, shape, x, out)
}

/// `out = gelu(x[:, :d]) * x[:, d:]`, `gelu(v) = v / 2 * (1 + erf(v / sqrt 2))`. Errors as
/// [`act_and_mul`].
///
/// ```
/// use ferrinfer_runtime::ops::activation::{self, ActShape};
/// use ferrinfer_runtime::{Backend, prelude::bf16};
/// # fn main() -> ferrinfer_runtime::Result<()> {
/// let backend = Backend::Cpu;
/// // Two rows, d = 1: [gate, up] each.
/// let shape = ActShape::new(2, 1)?;
/// let x = backend.upload(&[0.0, 5.0, 8.0, 0.5].map(bf16::from_f32))?;
/// let mut out = backend.filled(shape.output_len(), bf16::ZERO)?;
/// activation::gelu_and_mul(&backend, shape, &x, &mut out)?;
/// let out: Vec<f32> = out.to_vec()?.iter().map(|v| v.to_f32()).collect();
/// assert_eq!(out, [0.0, 4.0]); // gelu(0) = 0; gelu(8) = 8 to bf16 precision
/// # Ok(()) }
/// ```
pub fn gelu_and_mul<T: Element>(
    backend: &Backend,
    shape: ActShape,
    x: &dyn Src<T>,
    out: &mut dyn Dst<T>,
) -> Result<()> {
    act_and_mul(backend, Act::Gelu, shape, x, out)
}

/// `out = gelu_tanh(x[:, :d]) * x[:, d:]`,
/// `gelu_tanh(v) = v / 2 * (1 + tanh(sqrt(2 / pi) * (v + 0.044715 v^3)))`. Errors as
/// [`act_and_mul`].
pub fn gelu_tanh_and_mul<T: Element>(
    backend: &Backend,
    shape: ActShape,
    x: &dyn Src<T>,
    out: &mut dyn Dst<T>,
) -> Result<()> {
    act_and_mul(backend, Act::GeluTanh, shape, x, out)
}

/// The activation of one value in f64.
pub fn act_f64(act: Act, v: f64) -> f64 {
    match act {
        Act::Silu => v / (1.0 + (-v).exp()),
        Act::Gelu => 0.5 * v * (1.0 + erf(v / std::f64::consts::SQRT_2)),
        Act::GeluTanh => {
            let u = (2.0 / std::f64::consts::PI).sqrt() * (v + 0.044715 * v * v * v);
            0.5 * v * (1.0 + u.tanh())
        }
    }
}

/// [`act_and_mul`] on host data in f64 (`x` `[rows, 2 * d]`, the result `[rows, d]`): the CPU
/// backend's arithmetic and the oracle of the tests.
pub fn act_and_mul_f64(act: Act, shape: ActShape, x: &[f64]) -> Result<Vec<f64>> {
    check_len(act, "x", x.len(), shape.input_len(), shape)?;
    let d = shape.d as usize;
    let mut out = Vec::with_capacity(shape.output_len());
    for row in x.chunks(2 * d) {
        let (gate, up) = row.split_at(d);
        out.extend(gate.iter().zip(up).map(|(&g, &u)| act_f64(act, g) * u));
    }
    Ok(out)
}

/// The error function in f64, to about 1e-13: its Maclaurin series below 3, Laplace's continued
/// fraction for erfc above (where the series would cancel badly).
pub fn erf(x: f64) -> f64 {
    if x.is_nan() {
        return x;
    }
    let a = x.abs();
    let value = if a < 3.0 {
        // erf(a) = 2 / sqrt(pi) * sum_n (-1)^n a^(2n+1) / (n! (2n+1))
        let (mut term, mut sum) = (a, a);
        for n in 1..200 {
            term *= -a * a / f64::from(n);
            let t = term / f64::from(2 * n + 1);
            sum += t;
            if t.abs() < 1e-17 * sum.abs() {
                break;
            }
        }
        sum * std::f64::consts::FRAC_2_SQRT_PI
    } else {
        // erfc(a) = exp(-a^2) / sqrt(pi) / (a + (1/2) / (a + 1 / (a + (3/2) / (a + ...)))),
        // evaluated from the tail; 60 terms are ample at a >= 3.
        let mut f = a;
        for k in (1..=60).rev() {
            f = a + f64::from(k) / 2.0 / f;
        }
        1.0 - (-a * a).exp() / (std::f64::consts::PI.sqrt() * f)
    };
    value.copysign(x)
}

/// The compiled kernel of `act` for `dtype`, `vec` elements per access (one of [`VEC_WIDTHS`])
/// and `arch`, through `jit`. Needs NVRTC but no GPU.
pub fn compile(
    jit: &Jit,
    act: Act,
    dtype: DType,
    vec: u32,
    arch: Arch,
) -> Result<Arc<CompiledKernel>> {
    jit.compile(&unit(act, dtype, vec)?, arch)
}

fn unit(act: Act, dtype: DType, vec: u32) -> Result<TranslationUnit> {
    act_unit(act, dtype, vec).map_err(|e| Error::unsupported(format!("activation kernel: {e}")))
}

fn check_len(act: Act, name: &str, got: usize, want: usize, shape: ActShape) -> Result<()> {
    if got == want {
        return Ok(());
    }
    Err(Error::invalid(format!(
        "{}: {name} has {got} elements; {} needs {want}",
        act.name(),
        shape.describe()
    )))
}

// SAFETY: ActArgs is #[repr(C)] of two u64 then two u32 fields, no padding, matching fi::ActArgs
// (its size is asserted on both sides).
unsafe impl kernel::KernelArgs for ActArgs {}

/// Launch the kernel of `act` for `args` on the GPU's stream (compiling it on first use).
fn launch<T: Element>(gpu: &Gpu, act: Act, args: ActArgs) -> Result<()> {
    if args.rows == 0 {
        return Ok(());
    }
    let vec = act_vec_width(args.d, &[args.x, args.out]);
    let dims = act_launch_dims(args.rows, args.d, vec);
    let dtype = T::DTYPE;
    let name = format!("{}_{}_v{vec}", act.name(), dtype.name());
    // SAFETY: the unit's entry takes (ActArgs) by value. Both pointers were taken from live
    // buffers on this GPU whose lengths `check_len` compared with rows * 2d and rows * d;
    // `act_vec_width` made d a multiple of `vec` and both pointers aligned to a pack, and the
    // kernel touches only rows < args.rows and packs < d / vec of each half. The buffers outlive
    // the launch: the caller holds them and all work is ordered on the backend's one stream.
    unsafe { kernel::launch(gpu, &name, || act_unit(act, dtype, vec), dims, args) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_matches_known_values() {
        // Values from the closed-form tables (Abramowitz and Stegun 7.1), to 16 digits.
        for (x, want) in [
            (0.0, 0.0),
            (0.1, 0.1124629160182849),
            (0.5, 0.5204998778130465),
            (1.0, 0.8427007929497149),
            (2.0, 0.9953222650189527),
            (2.9, 0.9999589021219005),
            (3.0, 0.9999779095030014),
            (3.5, 0.9999992569016276),
            (5.0, 0.9999999999984626),
            (30.0, 1.0),
        ] {
            assert!((erf(x) - want).abs() <= 1e-13, "erf({x}) = {}", erf(x));
            assert!((erf(-x) + want).abs() <= 1e-13, "erf(-{x})");
        }
        assert!(erf(f64::NAN).is_nan());
        assert_eq!(erf(f64::INFINITY), 1.0);
    }
}
