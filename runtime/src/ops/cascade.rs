//! Cascade attention's combining step: merging attention states over disjoint parts of a KV set.
//!
//! A state is an output `v` (normalised within its part) and the natural-log log-sum-exp `s` of
//! that part's logits. Attention over parts A and B together is
//! `s = logaddexp(s_a, s_b)`, `v = exp(s_a - s) v_a + exp(s_b - s) v_b`, and the merge is
//! associative, so a batch can be split into BSR components (a shared prefix, per-request
//! suffixes), each attended separately with its LSE, and merged here. An empty part has
//! `s = -inf` and contributes nothing: the other part comes back exactly, and all-empty gives
//! `v = 0`, `s = -inf`, never NaN.
//!
//! On the CPU the merge is plain Rust in f64; on a GPU it is one JIT-compiled kernel
//! (`kernels/cuda/ops/merge_states.cuh`), asynchronous like every launch.
//!
//! ```
//! use ferrinfer_runtime::ops::cascade::{self, State, StateMut, StateShape};
//! use ferrinfer_runtime::{Backend, prelude::bf16};
//! # fn main() -> ferrinfer_runtime::Result<()> {
//! let backend = Backend::Cpu;
//! // 3 query rows, 2 heads, head dim 4; part B of row 0 head 0 was empty.
//! let shape = StateShape::new(3, 2, 4)?;
//! let v_a = backend.upload(&vec![bf16::from_f32(1.0); shape.v_len()])?;
//! let v_b = backend.upload(&vec![bf16::from_f32(3.0); shape.v_len()])?;
//! let s_a = backend.upload(&vec![0.5f32; shape.s_len()])?;
//! let mut s = vec![0.5f32; shape.s_len()];
//! s[0] = f32::NEG_INFINITY;
//! let s_b = backend.upload(&s)?;
//! let mut v = backend.filled(shape.v_len(), bf16::ZERO)?;
//! let mut s_out = backend.filled(shape.s_len(), 0.0f32)?;
//! cascade::merge_state(
//!     &backend,
//!     shape,
//!     State::new(&v_a, &s_a),
//!     State::new(&v_b, &s_b),
//!     StateMut::new(&mut v, &mut s_out),
//! )?;
//! let (v, s) = (v.to_vec()?, s_out.to_vec()?);
//! assert_eq!(v[0].to_f32(), 1.0); // only part A: exactly A
//! assert_eq!(v[4].to_f32(), 2.0); // equal LSEs: the mean
//! assert_eq!(s[0], 0.5);
//! assert!((s[1] - (0.5 + 2f32.ln())).abs() < 1e-6);
//! # Ok(()) }
//! ```

use std::sync::Arc;

use ferrinfer_kernels::{DType, MergeStatesArgs, TranslationUnit};

use crate::device::backend::Backend;
use crate::device::dtype::Element;
use crate::device::gpu::Gpu;
use crate::device::view::{Dst, Src, put};
use crate::error::{Error, Result};
use crate::jit::{Arch, CompiledKernel, Jit};
use crate::ops::kernel;

/// Elements per access the merge kernel is instantiated for (see [`compile`]).
pub use ferrinfer_kernels::MERGE_STATES_VEC_WIDTHS as VEC_WIDTHS;

/// The shape of one set of states: outputs `[rows, num_heads, head_dim]`, LSEs `[rows, num_heads]`.
/// Any head dim works (the kernel uses 16-byte accesses when the head dim and buffers allow).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StateShape {
    /// Query rows (e.g. `total_qo` of a batch).
    pub rows: u32,
    /// Heads per row.
    pub num_heads: u32,
    /// Elements per head.
    pub head_dim: u32,
}

impl StateShape {
    /// A shape with at least one head and a head dim of at least 1 (zero rows is fine).
    pub fn new(rows: u32, num_heads: u32, head_dim: u32) -> Result<Self> {
        let shape = StateShape {
            rows,
            num_heads,
            head_dim,
        };
        shape.validate()?;
        Ok(shape)
    }
    /// What [`StateShape::new`] checks (the fields are public, so every merge checks again).
    pub fn validate(&self) -> Result<()> {
        if self.num_heads == 0 || self.head_dim == 0 {
            return Err(Error::invalid(format!(
                "merge states: num_heads and head_dim must be at least 1 ({})",
                self.describe()
            )));
        }
        let elements = u64::from(self.rows) * u64::from(self.num_heads);
        if elements
            .checked_mul(u64::from(self.head_dim))
            .is_none_or(|n| usize::try_from(n).is_err())
        {
            return Err(Error::invalid(format!(
                "merge states: [{}] does not fit in memory",
                self.describe()
            )));
        }
        Ok(())
    }
    /// Elements of one state's outputs, `rows * num_heads * head_dim`.
    pub fn v_len(&self) -> usize {
        self.s_len() * self.head_dim as usize
    }
    /// Elements of one state's LSEs, `rows * num_heads`.
    pub fn s_len(&self) -> usize {
        self.rows as usize * self.num_heads as usize
    }
    fn describe(&self) -> String {
        format!(
            "rows={}, num_heads={}, head_dim={}",
            self.rows, self.num_heads, self.head_dim
        )
    }
}

/// Outputs and natural-log LSEs of one state (or, for [`merge_states`], of many).
#[derive(Debug)]
pub struct State<'a, T: Element> {
    /// Outputs, each normalised within its part.
    pub v: &'a dyn Src<T>,
    /// Natural-log LSEs; `-inf` marks an empty part.
    pub s: &'a dyn Src<f32>,
}

impl<T: Element> Clone for State<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T: Element> Copy for State<'_, T> {}

impl<'a, T: Element> State<'a, T> {
    /// The state with outputs `v` and LSEs `s`.
    pub fn new(v: &'a dyn Src<T>, s: &'a dyn Src<f32>) -> Self {
        State { v, s }
    }
}

/// Where a merge writes (or, for [`merge_state_in_place`], the state it updates).
#[derive(Debug)]
pub struct StateMut<'a, T: Element> {
    /// Outputs.
    pub v: &'a mut dyn Dst<T>,
    /// Natural-log LSEs.
    pub s: &'a mut dyn Dst<f32>,
}

impl<'a, T: Element> StateMut<'a, T> {
    /// The state with outputs `v` and LSEs `s`.
    pub fn new(v: &'a mut dyn Dst<T>, s: &'a mut dyn Dst<f32>) -> Self {
        StateMut { v, s }
    }
}

/// Merge states `a` and `b` (each `shape`) into `out`. Asynchronous on a GPU.
///
/// Errors: a buffer whose length does not match `shape` (named in the message), or a buffer of
/// another backend.
pub fn merge_state<T: Element>(
    backend: &Backend,
    shape: StateShape,
    a: State<'_, T>,
    b: State<'_, T>,
    out: StateMut<'_, T>,
) -> Result<()> {
    shape.validate()?;
    check(shape, 1, "a", a)?;
    check(shape, 1, "b", b)?;
    check(shape, 1, "out", State::new(out.v, out.s))?;
    match backend {
        Backend::Cpu => {
            let (v, s) = merge_host(&Inputs::pair(shape, a, b)?)?;
            put(out.v.host_mut()?, &v)?;
            put(out.s.host_mut()?, &s)?;
            Ok(())
        }
        Backend::Cuda(gpu) => {
            let (v_out, s_out) = (out.v.device_ptr(gpu)?, out.s.device_ptr(gpu)?);
            launch::<T>(gpu, pair_args(gpu, shape, a, b, v_out, s_out)?)
        }
    }
}

/// Merge state `b` into `a` (each `shape`): `a` becomes the merge of both. Asynchronous on a GPU.
///
/// Errors as [`merge_state`].
pub fn merge_state_in_place<T: Element>(
    backend: &Backend,
    shape: StateShape,
    a: StateMut<'_, T>,
    b: State<'_, T>,
) -> Result<()> {
    shape.validate()?;
    check(shape, 1, "a", State::new(a.v, a.s))?;
    check(shape, 1, "b", b)?;
    match backend {
        Backend::Cpu => {
            let (v, s) = merge_host(&Inputs::pair(shape, State::new(a.v, a.s), b)?)?;
            put(a.v.host_mut()?, &v)?;
            put(a.s.host_mut()?, &s)?;
            Ok(())
        }
        Backend::Cuda(gpu) => {
            // The kernel reads each element and LSE of `a` before it writes it (see
            // merge_states.cuh), so `a` may be its own output.
            let (v_out, s_out) = (a.v.device_ptr(gpu)?, a.s.device_ptr(gpu)?);
            let args = pair_args(gpu, shape, State::new(a.v, a.s), b, v_out, s_out)?;
            launch::<T>(gpu, args)
        }
    }
}

/// Merge `num_states` states per row: `states.v` is `[rows, num_states, num_heads, head_dim]` and
/// `states.s` `[rows, num_states, num_heads]`; `out` has `shape`. Zero states give `v = 0`,
/// `s = -inf` (the merge's identity). Asynchronous on a GPU.
///
/// Errors as [`merge_state`].
pub fn merge_states<T: Element>(
    backend: &Backend,
    shape: StateShape,
    num_states: u32,
    states: State<'_, T>,
    out: StateMut<'_, T>,
) -> Result<()> {
    shape.validate()?;
    check(shape, num_states, "states", states)?;
    check(shape, 1, "out", State::new(out.v, out.s))?;
    match backend {
        Backend::Cpu => {
            let (v, s) = merge_host(&Inputs::stacked(shape, num_states, states)?)?;
            put(out.v.host_mut()?, &v)?;
            put(out.s.host_mut()?, &s)?;
            Ok(())
        }
        Backend::Cuda(gpu) => {
            let (v, s) = (states.v.device_ptr(gpu)?, states.s.device_ptr(gpu)?);
            let (v_out, s_out) = (out.v.device_ptr(gpu)?, out.s.device_ptr(gpu)?);
            let state_v = u64::from(shape.num_heads) * u64::from(shape.head_dim);
            let args = MergeStatesArgs {
                v_first: v,
                v_rest: v + state_v * size_of::<T>() as u64,
                s_first: s,
                s_rest: s + u64::from(shape.num_heads) * size_of::<f32>() as u64,
                v_out,
                s_out,
                v_row_stride: state_v * u64::from(num_states),
                s_row_stride: u64::from(shape.num_heads) * u64::from(num_states),
                ..shape_args(shape, num_states)
            };
            launch::<T>(gpu, args)
        }
    }
}

/// [`merge_states`] on host data in f64, with the CPU backend's arithmetic: `v` is
/// `[rows, num_states, num_heads, head_dim]`, `s` `[rows, num_states, num_heads]`; returns the
/// merged `v` `[rows, num_heads, head_dim]` and `s` `[rows, num_heads]`. The oracle of the tests,
/// and a merge for callers who keep states in f64.
pub fn merge_states_f64(
    shape: StateShape,
    num_states: u32,
    v: &[f64],
    s: &[f64],
) -> Result<(Vec<f64>, Vec<f64>)> {
    shape.validate()?;
    check_len("states.v", v.len(), shape.v_len(), num_states, shape)?;
    check_len("states.s", s.len(), shape.s_len(), num_states, shape)?;
    let n = num_states as usize;
    let (h, d) = (shape.num_heads as usize, shape.head_dim as usize);
    let hd = h * d;
    let (mut v_out, mut s_out) = (vec![0.0; shape.v_len()], vec![0.0; shape.s_len()]);
    for (pair, (o, lse)) in v_out.chunks_mut(d).zip(s_out.iter_mut()).enumerate() {
        let (row, head) = (pair / h, pair % h);
        *lse = merge_one(
            n,
            |k| s[(row * n + k) * h + head],
            |k, e| v[(row * n + k) * hd + head * d + e],
            o,
        );
    }
    Ok((v_out, s_out))
}

/// The compiled merge kernel for `dtype`, `vec` elements per access (one of
/// [`ferrinfer_kernels::MERGE_STATES_VEC_WIDTHS`]) and `arch`, through `jit`. Needs NVRTC but no
/// GPU (CI compiles every instance this way).
pub fn compile(jit: &Jit, dtype: DType, vec: u32, arch: Arch) -> Result<Arc<CompiledKernel>> {
    jit.compile(&unit(dtype, vec)?, arch)
}

fn unit(dtype: DType, vec: u32) -> Result<TranslationUnit> {
    ferrinfer_kernels::merge_states_unit(dtype, vec)
        .map_err(|e| Error::unsupported(format!("merge states kernel: {e}")))
}

/// For one (row, head): the merged outputs into `out`, and the merged LSE returned. States with
/// `s = -inf` are skipped rather than weighted by 0, so whatever their `v` holds cannot leak in.
fn merge_one(
    n: usize,
    lse: impl Fn(usize) -> f64,
    value: impl Fn(usize, usize) -> f64,
    out: &mut [f64],
) -> f64 {
    let m = (0..n).map(&lse).fold(f64::NEG_INFINITY, f64::max);
    out.fill(0.0);
    if m == f64::NEG_INFINITY {
        return m;
    }
    let live: Vec<(usize, f64)> = (0..n)
        .filter(|&k| lse(k) != f64::NEG_INFINITY)
        .map(|k| (k, (lse(k) - m).exp()))
        .collect();
    let z: f64 = live.iter().map(|&(_, w)| w).sum();
    for &(k, w) in &live {
        let w = w / z;
        for (e, o) in out.iter_mut().enumerate() {
            *o += w * value(k, e);
        }
    }
    m + z.ln()
}

/// Host views of the states to merge, laid out as the kernel sees them (merge_states.cuh): state 0
/// of row `r` at `first + r * row_stride`, state `k >= 1` at `rest + (k - 1) * state + r *
/// row_stride`.
struct Inputs<'a, T> {
    shape: StateShape,
    num_states: u32,
    v_first: &'a [T],
    v_rest: &'a [T],
    s_first: &'a [f32],
    s_rest: &'a [f32],
    /// `num_states` for a stacked buffer, 1 for two separate ones.
    row_states: usize,
}

impl<'a, T: Element> Inputs<'a, T> {
    fn pair(shape: StateShape, a: State<'a, T>, b: State<'a, T>) -> Result<Self> {
        Ok(Inputs {
            shape,
            num_states: 2,
            v_first: a.v.host()?,
            v_rest: b.v.host()?,
            s_first: a.s.host()?,
            s_rest: b.s.host()?,
            row_states: 1,
        })
    }
    fn stacked(shape: StateShape, num_states: u32, states: State<'a, T>) -> Result<Self> {
        let (v, s) = (states.v.host()?, states.s.host()?);
        let state_s = shape.num_heads as usize;
        let state_v = state_s * shape.head_dim as usize;
        Ok(Inputs {
            shape,
            num_states,
            v_first: v,
            v_rest: v.get(state_v..).unwrap_or_default(),
            s_first: s,
            s_rest: s.get(state_s..).unwrap_or_default(),
            row_states: num_states as usize,
        })
    }
}

/// The CPU backend: [`merge_one`] for every (row, head), rounded to `T` and f32 at the end.
fn merge_host<T: Element>(x: &Inputs<'_, T>) -> Result<(Vec<T>, Vec<f32>)> {
    let (h, d) = (x.shape.num_heads as usize, x.shape.head_dim as usize);
    let (state_s, state_v) = (h, h * d);
    let (row_s, row_v) = (state_s * x.row_states, state_v * x.row_states);
    let mut v_out = Vec::with_capacity(x.shape.v_len());
    let mut s_out = Vec::with_capacity(x.shape.s_len());
    let mut o = vec![0.0f64; d];
    for pair in 0..x.shape.s_len() {
        let (row, head) = (pair / h, pair % h);
        let s_at = row * row_s + head;
        let v_at = row * row_v + head * d;
        let lse = |k: usize| {
            f64::from(match k {
                0 => x.s_first[s_at],
                _ => x.s_rest[(k - 1) * state_s + s_at],
            })
        };
        let value = |k: usize, e: usize| {
            f64::from(
                match k {
                    0 => x.v_first[v_at + e],
                    _ => x.v_rest[(k - 1) * state_v + v_at + e],
                }
                .to_f32(),
            )
        };
        let s = merge_one(x.num_states as usize, lse, value, &mut o);
        v_out.extend(o.iter().map(|&e| T::from_f32(e as f32)));
        s_out.push(s as f32);
    }
    Ok((v_out, s_out))
}

fn check<T: Element>(
    shape: StateShape,
    num_states: u32,
    name: &str,
    state: State<'_, T>,
) -> Result<()> {
    let v_name = format!("{name}.v");
    let s_name = format!("{name}.s");
    check_len(&v_name, state.v.len(), shape.v_len(), num_states, shape)?;
    check_len(&s_name, state.s.len(), shape.s_len(), num_states, shape)
}

fn check_len(
    name: &str,
    got: usize,
    per_state: usize,
    num_states: u32,
    shape: StateShape,
) -> Result<()> {
    let want = per_state.checked_mul(num_states as usize).ok_or_else(|| {
        Error::invalid(format!(
            "merge states: {num_states} states of [{}] do not fit in memory",
            shape.describe()
        ))
    })?;
    if got == want {
        return Ok(());
    }
    let states = if num_states == 1 {
        String::new()
    } else {
        format!(" x {num_states} states")
    };
    Err(Error::invalid(format!(
        "merge states: {name} has {got} elements; [{}]{states} needs {want}",
        shape.describe()
    )))
}

fn shape_args(shape: StateShape, num_states: u32) -> MergeStatesArgs {
    MergeStatesArgs {
        rows: shape.rows,
        num_states,
        num_heads: shape.num_heads,
        head_dim: shape.head_dim,
        ..MergeStatesArgs::default()
    }
}

fn pair_args<T: Element>(
    gpu: &Gpu,
    shape: StateShape,
    a: State<'_, T>,
    b: State<'_, T>,
    v_out: u64,
    s_out: u64,
) -> Result<MergeStatesArgs> {
    Ok(MergeStatesArgs {
        v_first: a.v.device_ptr(gpu)?,
        v_rest: b.v.device_ptr(gpu)?,
        s_first: a.s.device_ptr(gpu)?,
        s_rest: b.s.device_ptr(gpu)?,
        v_out,
        s_out,
        v_row_stride: u64::from(shape.num_heads) * u64::from(shape.head_dim),
        s_row_stride: u64::from(shape.num_heads),
        ..shape_args(shape, 2)
    })
}

// SAFETY: MergeStatesArgs is #[repr(C)] of u64 and u32 fields only (8 eight-byte then 4
// four-byte fields, no padding), matching fi::MergeStatesArgs (its size is asserted on both sides).
unsafe impl kernel::KernelArgs for MergeStatesArgs {}

/// Launch the merge kernel for `args` on the GPU's stream (compiling it on first use).
fn launch<T: Element>(gpu: &Gpu, args: MergeStatesArgs) -> Result<()> {
    if args.rows == 0 {
        return Ok(());
    }
    let dims = ferrinfer_kernels::merge_states_launch_dims(&args).ok_or_else(|| {
        Error::unsupported(format!(
            "merge states of {} rows x {} heads exceeds CUDA's grid limit",
            args.rows, args.num_heads
        ))
    })?;
    // v_rest of a stacked buffer is v_first + one state, so its alignment follows from these.
    let vec = ferrinfer_kernels::merge_states_vec_width(
        args.head_dim,
        &[args.v_first, args.v_rest, args.v_out],
    );
    let dtype = T::DTYPE;
    let name = format!("merge_states_{}_v{vec}", dtype.name());
    // SAFETY: the unit's entry takes (MergeStatesArgs) by value; every pointer in `args` was taken
    // from a live buffer on this GPU whose length `check` compared with the shape (and the number
    // of states), and the buffers outlive the launch because the caller holds them and all work is
    // ordered on the backend's one stream.
    unsafe {
        kernel::launch(
            gpu,
            &name,
            || ferrinfer_kernels::merge_states_unit(dtype, vec),
            dims,
            args,
        )
    }
}
