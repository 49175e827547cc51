//! Context parallelism: one batch's KV cache sharded over several GPUs (ranks), each rank
//! running attention with the LSE over its shard, the partial states combined across ranks into
//! the result one GPU would give over the whole context.
//!
//! | item | what | needs |
//! |---|---|---|
//! | [`shard_kv`], [`KvShard`] | split a KV index by pages into per-rank indexes | nothing |
//! | [`merge_ranks`] | merge the ranks' gathered (o, lse) with the cascade merge kernel | nothing |
//! | [`check_shardable`] | whether a variant gives the same answer on shards | nothing |
//! | `Communicator`, `NcclId` | an NCCL communicator per rank (libnccl found at run time); its `all_reduce_sum` serves tensor parallelism | feature `nccl` |
//! | `ContextParallelDecode` | plan/run decode on this rank's shard, all-gather, merge | feature `nccl` |
//! | `ContextParallelPrefill` | plan/run prefill (causal or not) on this rank's shard, all-gather, merge | feature `nccl` |
//! | `ContextParallelGraph` | either of them captured in a CUDA graph | feature `nccl` |
//!
//! A shard knows where its keys sit in their requests ([`crate::KvIndex::with_key_positions`],
//! which [`shard_kv`] sets): the kernels and the CPU reference align the causal mask to the end
//! of the whole request and show hooks whole-request positions (`Pos::kv_pos`, `Pos::kv_len`),
//! so prefill with its causal mask, ALiBi, sliding windows, fused RoPE and custom masks give on
//! each shard the part of what they give on the whole context, and the merge of the parts is the
//! whole. What stays refused: attention sinks (each rank would add the sink), output transforms
//! (they do not commute with the merge) and softmax-free variants (their states do not merge by
//! LSE). Queries are replicated: every rank holds every request's whole `q`.
//!
//! The CPU side — shard, run each rank's plan with the LSE, [`merge_ranks`] — is the same code the
//! GPU path runs, so a simulated N-rank split on the CPU backend is a faithful test of it (here a
//! decode; a prefill plans a [`crate::BatchPrefill`] over a `Batch` of the shard the same way):
//!
//! ```
//! use ferrinfer_runtime::distributed::{merge_ranks, shard_kv};
//! use ferrinfer_runtime::ops::cascade::{State, StateMut, StateShape};
//! use ferrinfer_runtime::prelude::*;
//! # fn demo<V: ferrinfer_runtime::variant::Variant>(variant: &V) -> ferrinfer_runtime::Result<()> {
//! let heads = Heads::new(4, 2, 8)?;
//! let kv = KvIndex::paged_from_lens(4, &[9, 2], &[0, 1, 2, 3], 4, KvLayout::Nhd)?;
//! let (k, v) = (vec![bf16::ONE; kv.buffer_len(&heads)], vec![bf16::ONE; kv.buffer_len(&heads)]);
//! let q = vec![bf16::ONE; 2 * 4 * 8];
//! let world = 3;
//! let shape = StateShape::new(2, 4, 8)?;
//! let (mut go, mut gs) = (vec![bf16::ZERO; world * shape.v_len()], vec![0f32; world * shape.s_len()]);
//! for (shard, (o, s)) in shard_kv(&kv, world)?
//!     .into_iter()
//!     .zip(go.chunks_mut(shape.v_len()).zip(gs.chunks_mut(shape.s_len())))
//! {
//!     let plan = BatchDecode::plan(&Backend::Cpu, heads, shard.into_kv(), None)?;
//!     plan.run(variant, &View::host(&q), &View::host(&k), &View::host(&v),
//!              &mut ViewMut::host(o), Some(&mut ViewMut::host(s)))?;
//! }
//! let (mut o, mut lse) = (vec![bf16::ZERO; shape.v_len()], vec![0f32; shape.s_len()]);
//! merge_ranks(&Backend::Cpu, shape, world as u32,
//!             State::new(&View::host(&go), &View::host(&gs)),
//!             StateMut::new(&mut ViewMut::host(&mut o), &mut ViewMut::host(&mut lse)))?;
//! # Ok(()) }
//! ```

mod combine;
mod shard;

#[cfg(feature = "nccl")]
mod communicator;
#[cfg(feature = "nccl")]
mod decode;
#[cfg(feature = "nccl")]
mod graph;
#[cfg(feature = "nccl")]
mod library;
#[cfg(feature = "nccl")]
mod prefill;
#[cfg(feature = "nccl")]
mod rank;

pub use combine::merge_ranks;
pub use shard::{KvShard, shard_kv};

#[cfg(feature = "nccl")]
pub use communicator::{Communicator, NcclId, ReduceElement};
#[cfg(feature = "nccl")]
pub use decode::ContextParallelDecode;
#[cfg(feature = "nccl")]
pub use graph::ContextParallelGraph;
#[cfg(feature = "nccl")]
pub use library::{NcclLibrary, nccl_library};
#[cfg(feature = "nccl")]
pub use prefill::ContextParallelPrefill;

use crate::error::{Error, Result};
use crate::variant::VariantSpec;

/// Whether a variant computes on a KV shard what it computes on the whole context, so that the
/// merge of the shards' states is the whole context's attention; an error that says which hook
/// stands in the way otherwise (see the [module documentation](self)). Hooks that read key
/// positions are accepted: a shard with key positions shows them the whole request's.
///
/// ```
/// use ferrinfer_runtime::distributed::check_shardable;
/// use ferrinfer_runtime::variant::{Hooks, VariantSpec};
/// let plain = VariantSpec {
///     name: "Plain",
///     module_path: "demo",
///     hooks: Hooks::default(),
///     softmax: true,
///     params: &[],
///     cuda: "struct Variant {};",
/// };
/// assert!(check_shardable(&plain).is_ok());
/// let sink = VariantSpec { hooks: Hooks { sink: true, ..Hooks::default() }, ..plain };
/// assert!(check_shardable(&sink).unwrap_err().to_string().contains("sink"));
/// ```
pub fn check_shardable(spec: &VariantSpec) -> Result<()> {
    let why = if !spec.softmax {
        Some("it has no softmax, so its states do not merge by log-sum-exp")
    } else if spec.hooks.sink {
        Some("its attention sink would be added once per rank")
    } else if spec.hooks.output {
        Some("its output hook does not commute with merging the ranks' outputs")
    } else {
        None
    };
    match why {
        Some(why) => Err(Error::unsupported(format!(
            "context parallelism cannot run variant {}: {why}",
            spec.qualified_name()
        ))),
        None => Ok(()),
    }
}

/// Whether a hook of the variant reads a key position or the KV length (`Pos::kv_pos`,
/// `Pos::kv_len`), which a shard gives right only with key positions: found in the variant's
/// lowered CUDA, which names every field of `Pos` a hook reads.
#[cfg_attr(not(feature = "nccl"), allow(dead_code))]
pub(crate) fn reads_positions(spec: &VariantSpec) -> bool {
    spec.cuda.contains("kv_pos") || spec.cuda.contains("kv_len")
}
