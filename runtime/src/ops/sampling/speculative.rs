//! Chain speculative sampling: accept a chain of draft tokens against the target model's
//! probabilities, then emit one more token, so that the emitted tokens are distributed exactly as
//! the target model's (Leviathan et al., Chen et al. 2023).
//!
//! For each request, draft token `i` (in order) is accepted with probability
//! `min(1, p_target(d_i) / p_draft(d_i))` (uniform `u_i`: accepted when `u_i p_draft < p_target`;
//! an id outside the vocabulary is rejected). At the first rejection, at position `i`, the emitted
//! token is drawn from `max(0, p_target[i] - p_draft[i])` renormalised (from `p_target[i]` when
//! that residual has no mass); if all `n` are accepted, a bonus token is drawn from
//! `p_target[n]`. Probabilities are canonical as for sampling (NaN, negative, infinite are 0).
//! Outputs: `tokens [batch, n + 1]` (the accepted drafts, the emitted token, then -1),
//! `accepted [batch]` (draft tokens accepted) and `emitted [batch]` (tokens written, accepted + 1).
//! The generator's offset advances by 1 per call, as for [`super::sample_from_probs`].
//!
//! ```
//! use ferrinfer_runtime::Backend;
//! use ferrinfer_runtime::ops::sampling::SamplerState;
//! use ferrinfer_runtime::ops::sampling::speculative::{self, SpecShape};
//! # fn main() -> ferrinfer_runtime::Result<()> {
//! let backend = Backend::Cpu;
//! let shape = SpecShape::new(1, 2, 3)?;
//! // The draft proposes tokens 1 and 2; the target agrees with probability 1 on the first and
//! // gives the second probability 0, so it is rejected and a token is drawn from the residual.
//! let draft = backend.upload(&[0.0f32, 1.0, 0.0, 0.0, 0.0, 1.0])?;
//! let ids = backend.upload(&[1i32, 2])?;
//! let target = backend.upload(&[0.0f32, 1.0, 0.0, 0.5, 0.5, 0.0, 1.0, 0.0, 0.0])?;
//! let mut state = SamplerState::new(&backend, 7)?;
//! let mut tokens = backend.filled(3, 99i32)?;
//! let mut accepted = backend.filled(1, 99i32)?;
//! let mut emitted = backend.filled(1, 99i32)?;
//! speculative::chain_speculative_sampling(
//!     &backend, &mut state, shape, &draft, &ids, &target,
//!     &mut tokens, &mut accepted, &mut emitted,
//! )?;
//! let t = tokens.to_vec()?;
//! assert_eq!((t[0], t[2]), (1, -1));
//! assert!(t[1] == 0 || t[1] == 1);
//! assert_eq!((accepted.to_vec()?[0], emitted.to_vec()?[0]), (1, 2));
//! # Ok(()) }
//! ```

use ferrinfer_kernels::ops::sampling::{self as kern, SpeculativeArgs};

use super::rng::{RowDraws, SamplerState, philox_uniform};
use super::{MAX_VOCAB, advance, canonical_prob};
use crate::device::backend::Backend;
use crate::device::gpu::Gpu;
use crate::device::view::{Dst, Src};
use crate::error::{Error, Result};
use crate::ops::kernel;

/// The shape of a speculative step: `batch` requests, `n` draft tokens each, `vocab` tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SpecShape {
    batch: u32,
    n: u32,
    vocab: u32,
}

impl SpecShape {
    /// `batch` below 2^31 (0 is fine), `n` draft tokens (0 is fine: only the bonus token),
    /// `vocab` in `1..=MAX_VOCAB`, and the buffers' sizes fitting in memory.
    pub fn new(batch: u32, n: u32, vocab: u32) -> Result<Self> {
        if vocab == 0 || vocab > MAX_VOCAB {
            return Err(Error::invalid(format!(
                "chain speculative sampling: vocab = {vocab}; expected 1..={MAX_VOCAB}"
            )));
        }
        if batch >= 1 << 31 || n >= 1 << 16 {
            return Err(Error::invalid(format!(
                "chain speculative sampling: batch = {batch}, n = {n}; expected batch below \
                 2^31 and n below 65536"
            )));
        }
        let shape = SpecShape { batch, n, vocab };
        if u64::from(batch)
            .checked_mul(u64::from(n) + 1)
            .and_then(|r| r.checked_mul(u64::from(vocab)))
            .is_none_or(|e| usize::try_from(e).is_err())
        {
            return Err(Error::invalid(format!(
                "chain speculative sampling: [batch = {batch}, n + 1 = {}, vocab = {vocab}] \
                 does not fit in memory",
                n + 1
            )));
        }
        Ok(shape)
    }
    /// Requests.
    pub fn batch(&self) -> u32 {
        self.batch
    }
    /// Draft tokens per request.
    pub fn n(&self) -> u32 {
        self.n
    }
    /// Tokens per row.
    pub fn vocab(&self) -> u32 {
        self.vocab
    }
}

/// One chain speculative step (module docs): `draft_probs [batch, n, vocab]`,
/// `draft_ids [batch, n]`, `target_probs [batch, n + 1, vocab]` in; `tokens [batch, n + 1]`,
/// `accepted [batch]`, `emitted [batch]` out. Asynchronous on a GPU, no allocation, no host
/// synchronisation (the draft ids are checked by the kernel, not on the host).
///
/// Errors: a buffer whose length does not match `shape` (named with both lengths), or one on
/// another backend.
#[allow(clippy::too_many_arguments)]
pub fn chain_speculative_sampling(
    backend: &Backend,
    state: &mut SamplerState,
    shape: SpecShape,
    draft_probs: &dyn Src<f32>,
    draft_ids: &dyn Src<i32>,
    target_probs: &dyn Src<f32>,
    tokens: &mut dyn Dst<i32>,
    accepted: &mut dyn Dst<i32>,
    emitted: &mut dyn Dst<i32>,
) -> Result<()> {
    let (b, n, v) = (shape.batch as usize, shape.n as usize, shape.vocab as usize);
    for (name, got, want) in [
        ("draft_probs", draft_probs.len(), b * n * v),
        ("draft_ids", draft_ids.len(), b * n),
        ("target_probs", target_probs.len(), b * (n + 1) * v),
        ("tokens", tokens.len(), b * (n + 1)),
        ("accepted", accepted.len(), b),
        ("emitted", emitted.len(), b),
    ] {
        if got != want {
            return Err(Error::invalid(format!(
                "chain speculative sampling: {name} has {got} elements; [batch = {b}, n = {n}, \
                 vocab = {v}] needs {want}"
            )));
        }
    }
    if b == 0 {
        return Ok(());
    }
    match backend {
        Backend::Cpu => {
            let (seed, offset) = {
                let s = state.buffer().host()?;
                (s[0], s[1])
            };
            let (dp, ids, tp) = (draft_probs.host()?, draft_ids.host()?, target_probs.host()?);
            let (mut t, mut a, mut e) = (Vec::new(), Vec::new(), Vec::new());
            for r in 0..b {
                let draws = RowDraws::new(seed, offset, r as u32);
                let (row, acc) = row_host(
                    &dp[r * n * v..(r + 1) * n * v],
                    &ids[r * n..(r + 1) * n],
                    &tp[r * (n + 1) * v..(r + 1) * (n + 1) * v],
                    n,
                    v,
                    &draws,
                );
                t.extend(row);
                a.push(acc as i32);
                e.push(acc as i32 + 1);
            }
            tokens.host_mut()?.copy_from_slice(&t);
            accepted.host_mut()?.copy_from_slice(&a);
            emitted.host_mut()?.copy_from_slice(&e);
            state.buffer_mut().host_mut()?[1] = offset.wrapping_add(1);
            Ok(())
        }
        Backend::Cuda(gpu) => {
            let args = SpeculativeArgs {
                draft_probs: draft_probs.device_ptr(gpu)?,
                draft_ids: draft_ids.device_ptr(gpu)?,
                target_probs: target_probs.device_ptr(gpu)?,
                out: tokens.device_ptr(gpu)?,
                accepted: accepted.device_ptr(gpu)?,
                emitted: emitted.device_ptr(gpu)?,
                state: state.buffer().device_ptr(gpu)?,
                batch: shape.batch,
                n: shape.n,
                vocab: shape.vocab,
                pad: 0,
            };
            launch(gpu, args)?;
            advance(gpu, state, 1)
        }
    }
}

/// The CPU backend for one request: the tests in f32 as the kernel makes them, then the race over
/// the residual (or the bonus row) with f64 keys. Returns the `n + 1` tokens and the accepted count.
fn row_host(
    draft: &[f32],
    ids: &[i32],
    target: &[f32],
    n: usize,
    v: usize,
    draws: &RowDraws,
) -> (Vec<i32>, usize) {
    let mut out = vec![-1i32; n + 1];
    let mut acc = 0;
    while acc < n {
        let d = ids[acc];
        if d < 0 || d as usize >= v {
            break;
        }
        let pd = canonical_prob(draft[acc * v + d as usize]);
        let pt = canonical_prob(target[acc * v + d as usize]);
        let u = philox_uniform(draws.word(u64::from(super::rng::SCALAR_GROUPS) * 4 + acc as u64));
        // Canonical values are never NaN, so this is the negation of the acceptance test.
        if u * pd >= pt {
            break;
        }
        out[acc] = d;
        acc += 1;
    }
    let t_row = &target[acc * v..(acc + 1) * v];
    let residual: Vec<f64> = (0..v)
        .map(|i| {
            let pd = if acc < n {
                canonical_prob(draft[acc * v + i])
            } else {
                0.0
            };
            let w = canonical_prob(t_row[i]) - pd;
            if w > 0.0 { f64::from(w) } else { 0.0 }
        })
        .collect();
    let all = vec![true; v];
    let token = super::race(&residual, &all, draws)
        .or_else(|| {
            let w: Vec<f64> = t_row
                .iter()
                .map(|&p| f64::from(canonical_prob(p)))
                .collect();
            super::race(&w, &all, draws)
        })
        .unwrap_or(0);
    out[acc] = token as i32;
    (out, acc)
}

// SAFETY: SpeculativeArgs is #[repr(C)] of 7 u64 then 4 u32 (no padding), matching
// fi::SpeculativeArgs (sizes asserted on both sides).
unsafe impl kernel::KernelArgs for SpeculativeArgs {}

fn launch(gpu: &Gpu, args: SpeculativeArgs) -> Result<()> {
    let dims = kern::sampling_launch_dims(args.batch).ok_or_else(|| {
        Error::unsupported(format!("{} requests exceed CUDA's grid limit", args.batch))
    })?;
    // Rows start at multiples of vocab elements from both bases.
    let stride = u64::from(args.vocab);
    let vec = kern::sampling_vec_width(stride, args.draft_probs)
        .min(kern::sampling_vec_width(stride, args.target_probs));
    let name = kern::speculative_kernel_name(vec);
    // SAFETY: the entry takes SpeculativeArgs by value; chain_speculative_sampling checked every
    // buffer's length against (batch, n, vocab): the kernel reads draft rows r * n + i (i < n),
    // target rows r * (n + 1) + i (i <= n), ids r * n + i, element d of a row only for
    // 0 <= d < vocab (checked in the kernel), and writes tokens r * (n + 1) + i (i <= n),
    // accepted[r], emitted[r], for r < batch; vec divides vocab and matches both bases'
    // alignment. The buffers are live on this GPU and held by the caller past the launch.
    unsafe { kernel::launch(gpu, &name, || kern::speculative_unit(vec), dims, args) }
}
