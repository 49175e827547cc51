//! Context-parallel prefill: this rank's [`BatchPrefill`] over its KV shard (at the shard's key
//! positions, so the causal mask is the whole request's) with the LSE, an NCCL all-gather of
//! every rank's (o, lse), and [`super::merge_ranks`] into the caller's output, all on the
//! backend's one stream, with nothing allocated or synchronised in `run`.

use std::sync::Arc;

use crate::attention::batch::Batch;
use crate::attention::wrappers::{BatchPrefill, PlanConfig, RunBuffers};
use crate::device::dtype::Element;
use crate::device::view::{Dst, Src};
use crate::distributed::communicator::Communicator;
use crate::distributed::graph::ContextParallelGraph;
use crate::distributed::rank::Rank;
use crate::error::Result;
use crate::variant::Variant;

/// The name errors of the context-parallel prefill start with.
const WHO: &str = "ContextParallelPrefill";

/// Prefill (or append: query rows over a longer context) over a KV cache sharded across the
/// ranks of a [`Communicator`]: every rank holds the whole `q` of every request and a run of each
/// request's keys (its shard, e.g. from [`crate::distributed::shard_kv`], which records where the
/// run sits in its request: [`crate::KvIndex::with_key_positions`]); every rank's `run` returns
/// in its `o` (and `lse`) the attention over the whole context, as one GPU would compute it,
/// causal mask included.
///
/// `plan`, `replan` and `run` are collective, with the rules of
/// [`super::ContextParallelDecode`]: every rank calls them in the same order; `plan` and `replan`
/// check (with one host synchronisation) that the ranks agree on the query rows, requests, heads,
/// causal mask, `sm_scale` and element type, and a rank whose plan fails makes every rank's plan
/// fail; `run` allocates nothing and waits for nothing, so it can be captured in a CUDA graph
/// ([`ContextParallelPrefill::capture`]).
///
/// With more than one rank the shard must carry key positions when the batch is causal or the
/// variant reads key positions (an error otherwise); variants whose states do not merge across
/// ranks are refused (see [`check_shardable`](super::check_shardable)). `q` is `[rows, num_qo_heads, head_dim]` and `o`
/// the same, dense, where `rows` is the batch's `total_qo` (or [`crate::GraphCapacity::qo_rows`]
/// in CUDA-graph mode).
///
/// ```no_run
/// use std::sync::Arc;
/// use ferrinfer_runtime::distributed::{Communicator, ContextParallelPrefill, NcclId, shard_kv};
/// use ferrinfer_runtime::prelude::*;
/// # fn rank<V: ferrinfer_runtime::variant::Variant>(variant: &V, id: NcclId, rank: usize, world: usize)
/// #     -> ferrinfer_runtime::Result<()> {
/// let backend = Backend::cuda(rank)?;
/// let comm = Arc::new(Communicator::new(&backend, &id, rank, world)?);
/// let heads = Heads::new(32, 8, 128)?;
/// // One request: 4096 new tokens at the end of a 100k-token context, page size 16.
/// let whole = KvIndex::paged_from_lens(16, &[100_000], &(0..6250).collect::<Vec<_>>(), 6250, KvLayout::Nhd)?;
/// let shard = shard_kv(&whole, world)?.swap_remove(rank);
/// let batch = Batch::new(heads, &[0, 4096], shard.into_kv())?.with_causal(true);
/// let plan = ContextParallelPrefill::<bf16>::plan(comm, batch, PlanConfig::default())?;
/// let n = whole.buffer_len(&heads);
/// let (k, v) = (backend.filled(n, bf16::ONE)?, backend.filled(n, bf16::ONE)?);
/// let q = backend.filled(4096 * 32 * 128, bf16::ONE)?;
/// let mut o = backend.filled(4096 * 32 * 128, bf16::ZERO)?;
/// plan.run(variant, &q, &k, &v, &mut o, None)?; // o: causal attention over all 100k keys
/// # Ok(()) }
/// ```
pub struct ContextParallelPrefill<T: Element> {
    rank: Rank<T>,
    prefill: BatchPrefill,
}

impl<T: Element> ContextParallelPrefill<T> {
    /// Plan this rank's prefill of `batch`, whose KV index is its shard (collective; see above).
    /// `config` as for [`BatchPrefill::plan_with`]; in CUDA-graph mode every rank must give the
    /// same capacity.
    pub fn plan(comm: Arc<Communicator>, batch: Batch, config: PlanConfig) -> Result<Self> {
        let local = BatchPrefill::plan_with(comm.backend(), batch, config);
        let (prefill, rank) = Rank::plan(comm, local, config.graph, BatchPrefill::batch, WHO)?;
        Ok(ContextParallelPrefill { rank, prefill })
    }

    /// Plan the next batch over this rank's new shard (collective). In CUDA-graph mode the
    /// buffers stay where they are, so a captured run replays the new batch.
    pub fn replan(&mut self, batch: Batch) -> Result<()> {
        let local = self.prefill.replan(batch).map(|()| self.prefill.batch());
        self.rank.replan(local, WHO)
    }

    /// Attention of `q` over the whole context (every rank's shard) into `o`, and its LSE into
    /// `lse` when given; `k` and `v` are this rank's cache. Collective and asynchronous.
    ///
    /// Errors: a variant [`check_shardable`](super::check_shardable) refuses, a shard without key positions that needs
    /// them (see above), buffers of the wrong length (named) or of another device, and NCCL's
    /// failures.
    pub fn run<V: Variant>(
        &self,
        variant: &V,
        q: &dyn Src<T>,
        k: &dyn Src<T>,
        v: &dyn Src<T>,
        o: &mut dyn Dst<T>,
        lse: Option<&mut dyn Dst<f32>>,
    ) -> Result<()> {
        let batch = self.prefill.batch();
        self.rank
            .run::<V>(batch, batch.causal(), o, lse, WHO, |so, slse| {
                self.prefill.run(variant, q, k, v, so, Some(slse))
            })
    }

    /// Run once, then record `run` (prefill, all-gather, merge) into a CUDA graph that owns this
    /// plan, the variant and the buffers; replan with `ContextParallelGraph::replan` and
    /// replay with [`ContextParallelGraph::launch`], both collective. The plan must be in
    /// CUDA-graph mode and the buffers sized for its capacity (`o` and `lse` as `q`).
    pub fn capture<V: Variant>(
        self,
        variant: V,
        buffers: RunBuffers<T>,
    ) -> Result<ContextParallelGraph<T, Self>> {
        let (graph_mode, gpu) = (self.rank.graph_mode, self.rank.comm.gpu().clone());
        ContextParallelGraph::record(self, graph_mode, gpu, variant, buffers, |p, v, b| {
            let lse = b.lse.as_mut().map(|l| l as &mut dyn Dst<f32>);
            p.run(v, &b.q, &b.k, &b.v, &mut b.o, lse)
        })
    }

    /// This rank's prefill plan (over its shard).
    pub fn prefill(&self) -> &BatchPrefill {
        &self.prefill
    }
    /// The communicator.
    pub fn communicator(&self) -> &Arc<Communicator> {
        &self.rank.comm
    }
}

impl<T: Element> ContextParallelGraph<T, ContextParallelPrefill<T>> {
    /// Plan the next batch over this rank's new shard (see [`ContextParallelPrefill::replan`]).
    pub fn replan(&mut self, batch: Batch) -> Result<()> {
        self.plan.replan(batch)
    }
}
