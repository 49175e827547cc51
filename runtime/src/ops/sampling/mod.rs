//! Sampling token ids from probabilities or logits, with top-k, top-p and min-p filters, without
//! sorting the vocabulary.
//!
//! Every draw is an exponential race: token `t` of weight `w_t > 0` gets `E_t = -ln(u_t)` with
//! `u_t` from Philox ([`rng`]) and the key `w_t / E_t`; the largest key wins, which happens with
//! probability `w_t / sum(w)`. A filter restricts the race to an allowed set:
//! - top-k: the tokens whose value is at least the k-th largest (ties at the k-th value are kept);
//! - top-p (after top-k): the tokens whose weight is exceeded by less than `p` of the mass (the
//!   smallest set of largest weights whose mass reaches `p`, ties kept);
//! - min-p (after top-k): the tokens with weight at least `min_p` times the largest.
//!
//! Top-p and min-p together are refused. From logits, the weights are the softmax with
//! temperature `T`, `exp((x - max) / T)`. Probabilities need not sum to 1 (they are weights).
//!
//! Bad values: probabilities that are NaN, negative or infinite weigh 0; logits that are NaN or
//! infinite count as `-inf`; a row with no positive weight gives token 0. Per-request parameters
//! in device arrays are not checked on the host (that would synchronise); the kernel clamps
//! them: k to `1..=vocab`, p NaN to 1 and otherwise to `[0, 1]` (0: only the largest weights),
//! min-p NaN to 0 and otherwise to `[0, 1]`, a temperature that is not positive and finite to 1.
//!
//! On a GPU one block of 512 threads samples one row (`kernels/cuda/ops/sampling.cuh`): passes
//! that only load find the allowed set's bounds (top-k: a three-pass radix select by count; min-p:
//! the largest weight, one pass for probabilities; top-p: a three-pass radix select by mass), then
//! one pass races over the allowed tokens alone, the only one that draws Philox numbers. Top-p
//! after top-k draws by rejection instead: a race keeping its best candidates, then a race above
//! them that also sums the mass above each, until a candidate's mass above is below `p` of the
//! row's (usually two passes; integer masses, so a seed reproduces bit for bit). The CPU
//! backend computes the allowed sets directly (sorting) in f64, with the same Philox uniforms: a
//! CPU and a GPU run of one seed draw the same tokens, except where two keys, or a weight and a
//! filter threshold, differ by about f32 rounding.
//!
//! ```
//! use ferrinfer_runtime::Backend;
//! use ferrinfer_runtime::ops::sampling::{self, Filter, Param, SampleShape, SamplerState};
//! # fn main() -> ferrinfer_runtime::Result<()> {
//! let backend = Backend::Cpu;
//! let shape = SampleShape::new(2, 4)?;
//! let probs = backend.upload(&[0.1f32, 0.2, 0.3, 0.4, 0.7, 0.0, 0.3, 0.0])?;
//! let mut state = SamplerState::new(&backend, 1234)?;
//! let mut tokens = backend.filled(2, -1i32)?;
//! // Top-2: row 0 draws 2 or 3, row 1 draws 0 or 2.
//! let filter = Filter::none().top_k(Param::All(2));
//! sampling::sample_from_probs(&backend, &mut state, shape, &probs, &filter, &mut tokens)?;
//! let t = tokens.to_vec()?;
//! assert!(t[0] == 2 || t[0] == 3);
//! assert!(t[1] == 0 || t[1] == 2);
//! assert_eq!(state.read()?, (1234, 1)); // the offset advanced
//! # Ok(()) }
//! ```

pub mod rng;
pub mod speculative;
pub mod transform;

use ferrinfer_kernels::ops::sampling::{
    self as kern, FLAG_MIN_P, FLAG_TOP_K, FLAG_TOP_P, SamplingAdvanceArgs, SamplingArgs,
    SamplingInput,
};

use crate::device::backend::Backend;
use crate::device::dtype::Pod;
use crate::device::gpu::Gpu;
use crate::device::view::{Dst, Src};
use crate::error::{Error, Result};
use crate::ops::kernel;

pub use rng::{RowDraws, SamplerState, philox_uniform, philox4x32_10};

/// The largest vocabulary (tokens per row) the sampling ops take.
pub const MAX_VOCAB: u32 = 1 << 30;

/// A batch of rows to sample from: `[batch, vocab]` f32, row-major.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SampleShape {
    batch: u32,
    vocab: u32,
}

impl SampleShape {
    /// `batch` rows (0 is fine: nothing is drawn) of `vocab` tokens, `1..=MAX_VOCAB`.
    pub fn new(batch: u32, vocab: u32) -> Result<Self> {
        if vocab == 0 || vocab > MAX_VOCAB {
            return Err(Error::invalid(format!(
                "sampling: vocab = {vocab}; expected 1..={MAX_VOCAB}"
            )));
        }
        if batch >= 1 << 31 {
            return Err(Error::invalid(format!(
                "sampling: batch = {batch}; expected below 2^31 (one block per row)"
            )));
        }
        Ok(SampleShape { batch, vocab })
    }
    /// Rows.
    pub fn batch(&self) -> u32 {
        self.batch
    }
    /// Tokens per row.
    pub fn vocab(&self) -> u32 {
        self.vocab
    }
    /// Elements of the input, `batch * vocab`.
    pub fn len(&self) -> usize {
        self.batch as usize * self.vocab as usize
    }
    /// Whether there is no row.
    pub fn is_empty(&self) -> bool {
        self.batch == 0
    }
}

/// A per-request parameter: one value for every request, or a `[batch]` buffer on the backend.
#[derive(Debug)]
pub enum Param<'a, T: Pod> {
    /// The same value for every request (checked on the host).
    All(T),
    /// One value per request (clamped by the kernel, see the module docs).
    PerRequest(&'a dyn Src<T>),
}

impl<T: Pod> Clone for Param<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T: Pod> Copy for Param<'_, T> {}

impl<T: Pod> Param<'_, T> {
    /// The value of request `row` on the CPU backend.
    fn host_value(&self, row: usize) -> Result<T> {
        match self {
            Param::All(v) => Ok(*v),
            Param::PerRequest(b) => Ok(b.host()?[row]),
        }
    }
    fn check_len(&self, name: &str, batch: u32) -> Result<()> {
        match self {
            Param::PerRequest(b) if b.len() != batch as usize => Err(Error::invalid(format!(
                "sampling: {name} has {} values; batch = {batch} needs one per request",
                b.len()
            ))),
            _ => Ok(()),
        }
    }
    /// (scalar, device address or 0) for the kernel.
    fn device(&self, gpu: &Gpu, fallback: T) -> Result<(T, u64)> {
        match self {
            Param::All(v) => Ok((*v, 0)),
            Param::PerRequest(b) => Ok((fallback, b.device_ptr(gpu)?)),
        }
    }
}

/// Which filters a draw applies (none by default). Top-p and min-p together are refused.
#[derive(Clone, Copy, Debug, Default)]
pub struct Filter<'a> {
    top_k: Option<Param<'a, i32>>,
    top_p: Option<Param<'a, f32>>,
    min_p: Option<Param<'a, f32>>,
}

impl<'a> Filter<'a> {
    /// No filter: a draw from the whole distribution.
    pub fn none() -> Self {
        Filter::default()
    }
    /// Keep the `k` largest (ties at the k-th kept); a scalar must be in `1..=vocab`.
    pub fn top_k(mut self, k: Param<'a, i32>) -> Self {
        self.top_k = Some(k);
        self
    }
    /// Keep the smallest set of largest weights whose mass reaches `p` (after top-k); a scalar
    /// must be in `(0, 1]`.
    pub fn top_p(mut self, p: Param<'a, f32>) -> Self {
        self.top_p = Some(p);
        self
    }
    /// Keep the weights of at least `min_p` times the largest (after top-k); a scalar must be in
    /// `[0, 1]`.
    pub fn min_p(mut self, min_p: Param<'a, f32>) -> Self {
        self.min_p = Some(min_p);
        self
    }

    fn validate(&self, shape: SampleShape) -> Result<()> {
        if self.top_p.is_some() && self.min_p.is_some() {
            return Err(Error::invalid(
                "sampling: top-p and min-p together are not supported; pick one",
            ));
        }
        if let Some(k) = self.top_k {
            k.check_len("top_k", shape.batch)?;
            if let Param::All(k) = k
                && (k < 1 || k as i64 > i64::from(shape.vocab))
            {
                return Err(Error::invalid(format!(
                    "sampling: top_k = {k}; expected 1..={}",
                    shape.vocab
                )));
            }
        }
        if let Some(p) = self.top_p {
            p.check_len("top_p", shape.batch)?;
            if let Param::All(p) = p
                && !(p > 0.0 && p <= 1.0)
            {
                return Err(Error::invalid(format!(
                    "sampling: top_p = {p}; expected in (0, 1]"
                )));
            }
        }
        if let Some(p) = self.min_p {
            p.check_len("min_p", shape.batch)?;
            if let Param::All(p) = p
                && !(0.0..=1.0).contains(&p)
            {
                return Err(Error::invalid(format!(
                    "sampling: min_p = {p}; expected in [0, 1]"
                )));
            }
        }
        Ok(())
    }
}

/// Draw one token per row from the probabilities `probs` (`[batch, vocab]` f32, any non-negative
/// weights) with `filter`, into `tokens` (`[batch]` i32), and advance `state`. Asynchronous on a
/// GPU: no allocation and no host synchronisation (a CUDA graph can capture it).
///
/// Errors: a buffer whose length does not match `shape` or that lives on another backend, a
/// scalar parameter out of range (each named with its value), top-p with min-p.
pub fn sample_from_probs(
    backend: &Backend,
    state: &mut SamplerState,
    shape: SampleShape,
    probs: &dyn Src<f32>,
    filter: &Filter<'_>,
    tokens: &mut dyn Dst<i32>,
) -> Result<()> {
    sample(
        backend,
        state,
        shape,
        SamplingInput::Probs,
        probs,
        Param::All(1.0),
        filter,
        tokens,
    )
}

/// Draw one token per row from the softmax of `logits / temperature` (`[batch, vocab]` f32) with
/// `filter` (top-k on the logits, top-p and min-p on the probabilities), into `tokens`, and
/// advance `state`. A scalar temperature must be positive and finite. Asynchronous on a GPU, no
/// allocation, no host synchronisation.
///
/// Errors as [`sample_from_probs`], and a temperature out of range.
pub fn sample_from_logits(
    backend: &Backend,
    state: &mut SamplerState,
    shape: SampleShape,
    logits: &dyn Src<f32>,
    temperature: Param<'_, f32>,
    filter: &Filter<'_>,
    tokens: &mut dyn Dst<i32>,
) -> Result<()> {
    temperature.check_len("temperature", shape.batch)?;
    if let Param::All(t) = temperature
        && !(t > 0.0 && t.is_finite())
    {
        return Err(Error::invalid(format!(
            "sampling: temperature = {t}; expected positive and finite"
        )));
    }
    sample(
        backend,
        state,
        shape,
        SamplingInput::Logits,
        logits,
        temperature,
        filter,
        tokens,
    )
}

#[allow(clippy::too_many_arguments)]
fn sample(
    backend: &Backend,
    state: &mut SamplerState,
    shape: SampleShape,
    input: SamplingInput,
    x: &dyn Src<f32>,
    temperature: Param<'_, f32>,
    filter: &Filter<'_>,
    tokens: &mut dyn Dst<i32>,
) -> Result<()> {
    filter.validate(shape)?;
    let what = match input {
        SamplingInput::Probs => "probs",
        SamplingInput::Logits => "logits",
    };
    if x.len() != shape.len() {
        return Err(Error::invalid(format!(
            "sampling: {what} has {} elements; [batch = {}, vocab = {}] needs {}",
            x.len(),
            shape.batch,
            shape.vocab,
            shape.len()
        )));
    }
    if tokens.len() != shape.batch as usize {
        return Err(Error::invalid(format!(
            "sampling: tokens has {} elements; batch = {} needs one per request",
            tokens.len(),
            shape.batch
        )));
    }
    if shape.is_empty() {
        return Ok(());
    }
    match backend {
        Backend::Cpu => {
            let (seed, offset) = {
                let s = state.buffer().host()?;
                (s[0], s[1])
            };
            let x = x.host()?;
            let mut out = Vec::with_capacity(shape.batch as usize);
            for row in 0..shape.batch as usize {
                let v = shape.vocab as usize;
                let p = RowParams::host(filter, temperature, row, shape.vocab)?;
                let draws = RowDraws::new(seed, offset, row as u32);
                out.push(sample_row_host(
                    &x[row * v..(row + 1) * v],
                    input,
                    &p,
                    &draws,
                ));
            }
            tokens.host_mut()?.copy_from_slice(&out);
            state.buffer_mut().host_mut()?[1] = offset.wrapping_add(1);
            Ok(())
        }
        Backend::Cuda(gpu) => {
            let mut flags = 0;
            let (top_k, top_k_arr) = match filter.top_k {
                Some(k) => {
                    flags |= FLAG_TOP_K;
                    k.device(gpu, 1)?
                }
                None => (1, 0),
            };
            let (top_p, top_p_arr) = match filter.top_p {
                Some(p) => {
                    flags |= FLAG_TOP_P;
                    p.device(gpu, 1.0)?
                }
                None => (1.0, 0),
            };
            let (min_p, min_p_arr) = match filter.min_p {
                Some(p) => {
                    flags |= FLAG_MIN_P;
                    p.device(gpu, 0.0)?
                }
                None => (0.0, 0),
            };
            let (temperature, temperature_arr) = temperature.device(gpu, 1.0)?;
            let args = SamplingArgs {
                x: x.device_ptr(gpu)?,
                out: tokens.device_ptr(gpu)?,
                state: state.buffer().device_ptr(gpu)?,
                top_k_arr,
                top_p_arr,
                min_p_arr,
                temperature_arr,
                row_stride: u64::from(shape.vocab),
                batch: shape.batch,
                vocab: shape.vocab,
                top_k,
                top_p,
                min_p,
                temperature,
                flags,
                pad: 0,
            };
            launch(gpu, input, args)?;
            advance(gpu, state, 1)
        }
    }
}

/// One row's parameters, clamped as the kernel clamps them.
#[derive(Clone, Copy, Debug)]
struct RowParams {
    k: u32,
    top_p: f32,
    min_p: f32,
    temperature: f32,
}

impl RowParams {
    fn host(
        filter: &Filter<'_>,
        temperature: Param<'_, f32>,
        row: usize,
        vocab: u32,
    ) -> Result<Self> {
        let k = match filter.top_k {
            Some(k) => k
                .host_value(row)?
                .clamp(1, vocab.min(i32::MAX as u32) as i32) as u32,
            None => vocab,
        };
        let clamp01 = |p: f32, nan: f32| if p.is_nan() { nan } else { p.clamp(0.0, 1.0) };
        let top_p = match filter.top_p {
            Some(p) => clamp01(p.host_value(row)?, 1.0),
            None => 1.0,
        };
        let min_p = match filter.min_p {
            Some(p) => clamp01(p.host_value(row)?, 0.0),
            None => 0.0,
        };
        let t = temperature.host_value(row)?;
        let temperature = if t > 0.0 && t.is_finite() { t } else { 1.0 };
        Ok(RowParams {
            k,
            top_p,
            min_p,
            temperature,
        })
    }
}

/// The canonical value of an input element (as `fi::RowValues::value`).
fn canonical(x: f32, input: SamplingInput) -> f32 {
    match input {
        SamplingInput::Logits => canonical_logit(x),
        SamplingInput::Probs => canonical_prob(x),
    }
}

/// A logit as the kernels see it: NaN and +-inf are -inf, -0 is 0.
fn canonical_logit(x: f32) -> f32 {
    if x.is_finite() {
        x + 0.0
    } else {
        f32::NEG_INFINITY
    }
}

/// A probability as the kernels see it: NaN, negative and infinite are 0.
fn canonical_prob(x: f32) -> f32 {
    if x > 0.0 && x.is_finite() { x } else { 0.0 }
}

/// The CPU backend's draw for one row: the allowed set computed directly (sorting), weights in
/// f64, the race keys `w / -ln(u)` with the kernel's uniforms.
fn sample_row_host(x: &[f32], input: SamplingInput, p: &RowParams, draws: &RowDraws) -> i32 {
    let v: Vec<f32> = x.iter().map(|&e| canonical(e, input)).collect();
    let n = v.len();
    let w: Vec<f64> = match input {
        SamplingInput::Probs => v.iter().map(|&e| f64::from(e)).collect(),
        SamplingInput::Logits => {
            let m = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            if m == f32::NEG_INFINITY {
                return 0;
            }
            let t = f64::from(p.temperature);
            v.iter()
                .map(|&e| {
                    if e == f32::NEG_INFINITY {
                        0.0
                    } else {
                        ((f64::from(e) - f64::from(m)) / t).exp()
                    }
                })
                .collect()
        }
    };
    // Top-k: values at least the k-th largest.
    let t_min = if (p.k as usize) < n {
        let mut scratch = v.clone();
        *scratch
            .select_nth_unstable_by(p.k as usize - 1, |a, b| b.total_cmp(a))
            .1
    } else {
        f32::NEG_INFINITY
    };
    let mut allowed: Vec<bool> = (0..n).map(|i| v[i] >= t_min && w[i] > 0.0).collect();
    if p.min_p > 0.0 {
        let top = (0..n)
            .filter(|&i| allowed[i])
            .map(|i| w[i])
            .fold(0.0, f64::max);
        let thr = f64::from(p.min_p) * top;
        for i in 0..n {
            allowed[i] &= w[i] >= thr;
        }
    }
    if p.top_p < 1.0 {
        let mut order: Vec<usize> = (0..n).filter(|&i| allowed[i]).collect();
        order.sort_by(|&a, &b| w[b].total_cmp(&w[a]));
        let mass: f64 = order.iter().map(|&i| w[i]).sum();
        let target = f64::from(p.top_p) * mass;
        // Mass strictly above each token: equal weights share the mass above their group.
        let mut above = 0.0;
        let mut g = 0;
        while g < order.len() {
            let mut end = g;
            while end < order.len() && w[order[end]] == w[order[g]] {
                end += 1;
            }
            let keep = above <= 0.0 || above < target;
            for &i in &order[g..end] {
                allowed[i] = keep;
            }
            above += order[g..end].iter().map(|&i| w[i]).sum::<f64>();
            g = end;
        }
    }
    // Top-p over a whole row of probabilities: the GPU's proposals (sampling.cuh, top_p_icdf)
    // when its table holds the row (rows up to 128K tokens always; longer ones at a vector width
    // the CPU assumes from the vocabulary, the GPU's from the row stride and the address).
    let whole_row =
        input == SamplingInput::Probs && p.top_p < 1.0 && p.k as usize >= n && p.min_p <= 0.0;
    let vec = || {
        [4, 2, 1]
            .into_iter()
            .find(|&v| n.is_multiple_of(v))
            .unwrap_or(1)
    };
    if whole_row
        && n.div_ceil(32 * vec()) <= ICDF_ENTRIES
        && let Some(t) = top_p_proposals(&w, &allowed, draws)
    {
        return t as i32;
    }
    race(&w, &allowed, draws).map_or(0, |t| t as i32)
}

/// Proposals a round (`kIcdfDraws`), rounds before the race decides (`kIcdfRounds`), and the
/// table's entries (`kIcdfEntries`) of the GPU's top-p over a whole row.
const ICDF_DRAWS: usize = 4;
const ICDF_ROUNDS: u32 = 8;
const ICDF_ENTRIES: usize = 4096;

/// The first of the GPU's proposals that lies in the nucleus (`allowed`): round `r` draws
/// [`ICDF_DRAWS`] tokens from the whole row by inverse CDF (uniforms of Philox group
/// `SCALAR_GROUPS + r`, each target `u S` found by the running sum in token order). `None` when
/// every proposal misses (then the race within the nucleus decides, as on the GPU) or no weight
/// is positive.
fn top_p_proposals(w: &[f64], allowed: &[bool], draws: &RowDraws) -> Option<usize> {
    let s: f64 = w.iter().filter(|&&x| x > 0.0).sum();
    if s.is_nan() || s <= 0.0 {
        return None;
    }
    for round in 0..ICDF_ROUNDS {
        let words = draws.block(rng::SCALAR_GROUPS + round);
        for &word in &words[..ICDF_DRAWS] {
            let target = f64::from(philox_uniform(word)) * s;
            let (mut c, mut last) = (0.0, 0);
            let t = w
                .iter()
                .enumerate()
                .filter(|&(_, &x)| x > 0.0)
                .find(|&(i, &x)| {
                    c += x;
                    last = i;
                    c >= target
                })
                .map_or(last, |(i, _)| i);
            if allowed[t] {
                return Some(t);
            }
        }
    }
    None
}

/// The race winner among the allowed tokens: the largest `w / -ln(u)`, ties to the lowest token.
fn race(w: &[f64], allowed: &[bool], draws: &RowDraws) -> Option<usize> {
    let mut best: Option<(f64, usize)> = None;
    let mut block = (u32::MAX, [0u32; 4]);
    for (t, (&w, &ok)) in w.iter().zip(allowed).enumerate() {
        if !ok || w <= 0.0 {
            continue;
        }
        let group = (t / 4) as u32;
        if block.0 != group {
            block = (group, draws.block(group));
        }
        let key = w / -f64::from(philox_uniform(block.1[t % 4])).ln();
        if best.is_none_or(|(b, _)| key > b) {
            best = Some((key, t));
        }
    }
    best.map(|(_, t)| t)
}

// SAFETY: SamplingArgs is #[repr(C)] of 8 u64 then 8 four-byte fields (no padding), matching
// fi::SamplingArgs (sizes asserted on both sides).
unsafe impl kernel::KernelArgs for SamplingArgs {}
// SAFETY: two u64 fields, matching fi::SamplingAdvanceArgs (size asserted on both sides).
unsafe impl kernel::KernelArgs for SamplingAdvanceArgs {}

fn launch(gpu: &Gpu, input: SamplingInput, args: SamplingArgs) -> Result<()> {
    let dims = kern::sampling_launch_dims(args.batch).ok_or_else(|| {
        Error::unsupported(format!(
            "sampling {} rows exceeds CUDA's grid limit",
            args.batch
        ))
    })?;
    let vec = kern::sampling_vec_width(args.row_stride, args.x);
    let name = kern::sampling_kernel_name(input, vec);
    // SAFETY: the entry takes SamplingArgs by value. `sample` checked x.len() == batch * vocab
    // (the kernel reads rows r * vocab .. + vocab for r < batch, in packs of `vec` that divide
    // vocab and match x's alignment), tokens.len() == batch, each per-request array's len ==
    // batch (read at r < batch), and that the state buffer holds its two words; every address
    // came from device_ptr on this GPU, and the buffers outlive the launch (the caller holds
    // them; work is ordered on the one stream).
    unsafe { kernel::launch(gpu, &name, || kern::sampling_unit(input, vec), dims, args) }
}

/// Add `add` to the state's offset on the device, after the draws that read it.
fn advance(gpu: &Gpu, state: &mut SamplerState, add: u64) -> Result<()> {
    let args = SamplingAdvanceArgs {
        state: state.buffer_mut().device_ptr(gpu)?,
        add,
    };
    // SAFETY: the entry takes SamplingAdvanceArgs by value and one thread writes word 1 of the
    // state buffer, which SamplerState always makes with two words on this GPU.
    unsafe {
        kernel::launch(
            gpu,
            kern::SAMPLING_ADVANCE_KERNEL,
            kern::sampling_advance_unit,
            kern::sampling_advance_launch_dims(),
            args,
        )
    }
}
