//! Context-parallel decode: this rank's [`BatchDecode`] over its KV shard with the LSE, an NCCL
//! all-gather of every rank's (o, lse), and [`super::merge_ranks`] into the caller's output, all on the
//! backend's one stream, with nothing allocated or synchronised in `run`.

use std::sync::Arc;

use crate::attention::batch::{Heads, KvIndex};
use crate::attention::wrappers::{BatchDecode, PlanConfig, RunBuffers};
use crate::device::dtype::Element;
use crate::device::view::{Dst, Src};
use crate::distributed::communicator::Communicator;
use crate::distributed::graph::ContextParallelGraph;
use crate::distributed::rank::Rank;
use crate::error::Result;
use crate::variant::Variant;

/// The name errors of the context-parallel decode start with.
const WHO: &str = "ContextParallelDecode";

/// Decode over a KV cache sharded across the ranks of a [`Communicator`]: every rank plans over
/// its own shard (e.g. from [`crate::distributed::shard_kv`], or its own pages of each request)
/// with the same requests in the same order, and every rank's `run` returns the attention of the
/// whole context, as one GPU would compute it, in its `o` (and `lse`).
///
/// `plan`, `replan` and `run` are collective: every rank calls them, in the same order (each
/// from its own thread or process). `plan` and `replan` check that the ranks agree on the
/// request count, heads, `sm_scale` and element type (a host synchronisation), so a mismatch is
/// an error on every rank rather than a hang; a rank whose plan fails (bad input) still takes
/// part in that check, and every rank's plan then fails too. `run` allocates nothing and waits for nothing: it
/// queues the decode, the all-gather and the merge on the communicator's stream, so it can be
/// captured in a CUDA graph ([`ContextParallelDecode::capture`], or on a caller's stream given to
/// [`crate::Backend::on_stream`] after one eager run).
///
/// Variants whose result depends on where a key sits in the request are refused (see
/// [`check_shardable`](super::check_shardable)). `q` is `[rows, num_qo_heads, head_dim]` and `o` the same, dense, where
/// `rows` is the batch (or [`crate::GraphCapacity::qo_rows`] in CUDA-graph mode).
///
/// ```no_run
/// use std::sync::Arc;
/// use ferrinfer_runtime::distributed::{Communicator, ContextParallelDecode, NcclId, shard_kv};
/// use ferrinfer_runtime::prelude::*;
/// # fn rank<V: ferrinfer_runtime::variant::Variant>(variant: &V, id: NcclId, rank: usize, world: usize)
/// #     -> ferrinfer_runtime::Result<()> {
/// let backend = Backend::cuda(rank)?;
/// let comm = Arc::new(Communicator::new(&backend, &id, rank, world)?);
/// let heads = Heads::new(32, 8, 128)?;
/// let whole = KvIndex::paged_from_lens(16, &[100_000], &(0..6250).collect::<Vec<_>>(), 6250, KvLayout::Nhd)?;
/// let shard = shard_kv(&whole, world)?.swap_remove(rank);
/// let plan = ContextParallelDecode::<bf16>::plan(comm, heads, shard.into_kv(), None, PlanConfig::default())?;
/// let n = whole.buffer_len(&heads);
/// let (k, v) = (backend.filled(n, bf16::ONE)?, backend.filled(n, bf16::ONE)?);
/// let q = backend.filled(32 * 128, bf16::ONE)?;
/// let mut o = backend.filled(32 * 128, bf16::ZERO)?;
/// plan.run(variant, &q, &k, &v, &mut o, None)?; // o: attention over all 100k keys, on every rank
/// # Ok(()) }
/// ```
pub struct ContextParallelDecode<T: Element> {
    rank: Rank<T>,
    decode: BatchDecode,
}

impl<T: Element> ContextParallelDecode<T> {
    /// Plan this rank's decode over `kv`, its shard (collective; see above). `config` as for
    /// [`BatchDecode::plan_with`]; in CUDA-graph mode every rank must give the same capacity.
    pub fn plan(
        comm: Arc<Communicator>,
        heads: Heads,
        kv: KvIndex,
        sm_scale: Option<f32>,
        config: PlanConfig,
    ) -> Result<Self> {
        let local = BatchDecode::plan_with(comm.backend(), heads, kv, sm_scale, config);
        let (decode, rank) = Rank::plan(comm, local, config.graph, BatchDecode::batch, WHO)?;
        Ok(ContextParallelDecode { rank, decode })
    }

    /// Plan the next decode step over this rank's new shard (collective). In CUDA-graph mode the
    /// buffers stay where they are, so a captured run replays the new step.
    pub fn replan(&mut self, kv: KvIndex, sm_scale: Option<f32>) -> Result<()> {
        let local = self
            .decode
            .replan(kv, sm_scale)
            .map(|()| self.decode.batch());
        self.rank.replan(local, WHO)
    }

    /// Attention of `q` over the whole context (every rank's shard) into `o`, and its LSE into
    /// `lse` when given; `k` and `v` are this rank's cache. Collective and asynchronous.
    ///
    /// Errors: a variant [`check_shardable`](super::check_shardable) refuses, buffers of the wrong length (named) or of
    /// another device, and NCCL's failures.
    pub fn run<V: Variant>(
        &self,
        variant: &V,
        q: &dyn Src<T>,
        k: &dyn Src<T>,
        v: &dyn Src<T>,
        o: &mut dyn Dst<T>,
        lse: Option<&mut dyn Dst<f32>>,
    ) -> Result<()> {
        let batch = self.decode.batch();
        self.rank.run::<V>(batch, false, o, lse, WHO, |so, slse| {
            self.decode.run(variant, q, k, v, so, Some(slse))
        })
    }

    /// Run once, then record `run` (decode, all-gather, merge) into a CUDA graph that owns this
    /// plan, the variant and the buffers; replan with [`ContextParallelGraph::replan`] and replay
    /// with [`ContextParallelGraph::launch`], both collective. The plan must be in CUDA-graph mode
    /// and the buffers sized for its capacity (`o` and `lse` as `q`).
    pub fn capture<V: Variant>(
        self,
        variant: V,
        buffers: RunBuffers<T>,
    ) -> Result<ContextParallelGraph<T>> {
        let (graph_mode, gpu) = (self.rank.graph_mode, self.rank.comm.gpu().clone());
        ContextParallelGraph::record(self, graph_mode, gpu, variant, buffers, |p, v, b| {
            let lse = b.lse.as_mut().map(|l| l as &mut dyn Dst<f32>);
            p.run(v, &b.q, &b.k, &b.v, &mut b.o, lse)
        })
    }

    /// This rank's decode plan (over its shard).
    pub fn decode(&self) -> &BatchDecode {
        &self.decode
    }
    /// The communicator.
    pub fn communicator(&self) -> &Arc<Communicator> {
        &self.rank.comm
    }
}

impl<T: Element> ContextParallelGraph<T> {
    /// Plan the next step over this rank's new shard (see [`ContextParallelDecode::replan`]).
    pub fn replan(&mut self, kv: KvIndex, sm_scale: Option<f32>) -> Result<()> {
        self.plan.replan(kv, sm_scale)
    }
}
