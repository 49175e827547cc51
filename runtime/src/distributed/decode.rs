//! Context-parallel decode: this rank's [`BatchDecode`] over its KV shard with the LSE, an NCCL
//! all-gather of every rank's (o, lse), and [`merge_ranks`] into the caller's output, all on the
//! backend's one stream, with nothing allocated or synchronised in `run`.

use std::any::Any;
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaEvent, CudaGraph};
use ferrinfer_kernels::DType;

use crate::attention::batch::{Batch, Heads, KvIndex};
use crate::attention::wrappers::{BatchDecode, Input, PlanConfig, RunBuffers};
use crate::device::backend::{Backend, Buffer};
use crate::device::dtype::Element;
use crate::device::gpu::Gpu;
use crate::device::view::sealed::Access;
use crate::device::view::{Dst, Src};
use crate::distributed::communicator::Communicator;
use crate::distributed::{check_shardable, merge_ranks};
use crate::error::{Error, Result};
use crate::ops::cascade::{State, StateMut, StateShape};
use crate::variant::Variant;

/// NCCL's `ncclDataType_t` values (stable across NCCL 2.x).
const NCCL_INT32: i32 = 2;
const NCCL_FLOAT16: i32 = 6;
const NCCL_FLOAT32: i32 = 7;
const NCCL_BFLOAT16: i32 = 9;

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
/// [`Backend::on_stream`] after one eager run).
///
/// Variants whose result depends on where a key sits in the request are refused (see
/// [`check_shardable`]). `q` is `[rows, num_qo_heads, head_dim]` and `o` the same, dense, where
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
    comm: Arc<Communicator>,
    decode: BatchDecode,
    /// Query rows `run` takes: the batch, or the graph capacity.
    rows: usize,
    /// CUDA-graph mode: the scratch buffers never move.
    graph_mode: bool,
    scratch: Mutex<Scratch<T>>,
}

/// This rank's state and every rank's, gathered; sized at plan time.
pub(super) struct Scratch<T: Element> {
    pub(super) o: Buffer<T>,
    pub(super) lse: Buffer<f32>,
    gathered_o: Buffer<T>,
    gathered_lse: Buffer<f32>,
    /// Where the merged LSE goes when the caller wants none.
    merged_lse: Buffer<f32>,
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
        let local = BatchDecode::plan_with(comm.backend(), heads, kv, sm_scale, config).and_then(
            |decode| {
                let rows = config
                    .graph
                    .map_or(decode.batch().batch(), |g| g.qo_rows as usize);
                let scratch = Scratch::new(comm.backend(), comm.world(), rows, &heads)?;
                Ok((decode, rows, scratch))
            },
        );
        // A rank whose plan failed still takes part in the agreement (saying so), so that no
        // other rank waits for it in NCCL.
        let (decode, rows, scratch) =
            agree::<T, _>(&comm, local, WHO, |(d, rows, _)| (d.batch(), *rows))?;
        Ok(ContextParallelDecode {
            comm,
            decode,
            rows,
            graph_mode: config.graph.is_some(),
            scratch: Mutex::new(scratch),
        })
    }

    /// Plan the next decode step over this rank's new shard (collective). In CUDA-graph mode the
    /// buffers stay where they are, so a captured run replays the new step.
    pub fn replan(&mut self, kv: KvIndex, sm_scale: Option<f32>) -> Result<()> {
        let local = self.replan_local(kv, sm_scale).map(|()| &*self);
        // As in `plan`: a failed rank still takes part in the agreement.
        agree::<T, _>(&self.comm, local, WHO, |p| (p.decode.batch(), p.rows)).map(|_| ())
    }

    fn replan_local(&mut self, kv: KvIndex, sm_scale: Option<f32>) -> Result<()> {
        self.decode.replan(kv, sm_scale)?;
        if !self.graph_mode {
            let rows = self.decode.batch().batch();
            if rows != self.rows {
                let heads = self.decode.batch().heads();
                *self.scratch.get_mut().unwrap_or_else(|p| p.into_inner()) =
                    Scratch::new(self.comm.backend(), self.comm.world(), rows, &heads)?;
                self.rows = rows;
            }
        }
        Ok(())
    }

    /// Attention of `q` over the whole context (every rank's shard) into `o`, and its LSE into
    /// `lse` when given; `k` and `v` are this rank's cache. Collective and asynchronous.
    ///
    /// Errors: a variant [`check_shardable`] refuses, buffers of the wrong length (named) or of
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
        check_shardable(V::SPEC)?;
        check_positions(V::SPEC, self.decode.batch(), self.comm.world(), false, WHO)?;
        let shape = state_shape(self.decode.batch(), self.rows)?;
        check_outputs(WHO, shape, o.len(), lse.as_ref().map(|l| l.len()))?;
        let mut guard = self.scratch.lock().unwrap_or_else(|p| p.into_inner());
        let s = &mut *guard;
        self.decode
            .run(variant, q, k, v, &mut s.o, Some(&mut s.lse))?;
        gather_merge(&self.comm, s, shape, o, lse)
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
        let (graph_mode, gpu) = (self.graph_mode, self.comm.gpu().clone());
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
        &self.comm
    }
}

/// The name errors of the context-parallel decode start with.
const WHO: &str = "ContextParallelDecode";

/// The (o, lse) state shape of `rows` query rows of `batch`'s heads.
pub(super) fn state_shape(batch: &Batch, rows: usize) -> Result<StateShape> {
    let h = batch.heads();
    let rows =
        u32::try_from(rows).map_err(|_| Error::invalid(format!("{rows} query rows exceed u32")))?;
    StateShape::new(rows, h.num_qo_heads(), h.head_dim())
}

/// Refuse what would give a wrong answer on a shard that does not say where its keys sit in
/// their requests ([`KvIndex::with_key_positions`]): a variant that reads key positions, and
/// (`causal`) a causal mask, whose diagonal depends on them. One rank holds the whole context.
pub(super) fn check_positions(
    spec: &crate::variant::VariantSpec,
    batch: &Batch,
    world: usize,
    causal: bool,
    who: &str,
) -> Result<()> {
    if world == 1 || batch.kv().has_key_positions() {
        return Ok(());
    }
    let why = if causal {
        "the causal mask"
    } else if super::reads_positions(spec) {
        "a hook of this variant"
    } else {
        return Ok(());
    };
    Err(Error::invalid(format!(
        "{who}: {why} needs each request's key positions on this rank's shard; plan over a \
         shard from shard_kv, or give them with KvIndex::with_key_positions"
    )))
}

/// `o` (and `lse`, when given) must hold the merged state of `shape`.
pub(super) fn check_outputs(
    who: &str,
    shape: StateShape,
    o: usize,
    lse: Option<usize>,
) -> Result<()> {
    for (name, got, want) in [
        ("o", o, shape.v_len()),
        ("lse", lse.unwrap_or(shape.s_len()), shape.s_len()),
    ] {
        if got != want {
            return Err(Error::invalid(format!(
                "{who}::run: {name} has {got} elements; [rows={}, num_qo_heads={}{}] needs {want}",
                shape.rows,
                shape.num_heads,
                if name == "o" {
                    format!(", head_dim={}", shape.head_dim)
                } else {
                    String::new()
                }
            )));
        }
    }
    Ok(())
}

/// All-gather this rank's (o, lse) from `s` over the ranks and merge them into `o` (and `lse`,
/// else the scratch's), queued on the communicator's stream.
pub(super) fn gather_merge<T: Element>(
    comm: &Communicator,
    s: &mut Scratch<T>,
    shape: StateShape,
    o: &mut dyn Dst<T>,
    lse: Option<&mut dyn Dst<f32>>,
) -> Result<()> {
    let gpu = comm.gpu();
    let ptr = |b: &dyn Access<T>| b.device_ptr(gpu);
    let ptr_f32 = |b: &dyn Access<f32>| b.device_ptr(gpu);
    // Scratch::new sized the buffers for `rows` rows; a shape of other rows would overrun them.
    if s.o.len() != shape.v_len() || s.lse.len() != shape.s_len() {
        return Err(Error::invalid(format!(
            "context-parallel scratch holds {} rows' state, the run {}",
            s.lse.len() / shape.num_heads.max(1) as usize,
            shape.rows
        )));
    }
    let ops = [
        (
            ptr(&s.o)?,
            ptr(&s.gathered_o)?,
            shape.v_len(),
            nccl_type::<T>(),
        ),
        (
            ptr_f32(&s.lse)?,
            ptr_f32(&s.gathered_lse)?,
            shape.s_len(),
            NCCL_FLOAT32,
        ),
    ];
    // SAFETY: the four buffers are a plan's scratch on the communicator's GPU (device_ptr
    // checked the device): o and lse hold one rank's v_len/s_len (checked just above), the
    // gathered ones `world` times that (Scratch::new); the plan owns them, and every later use
    // of them (the next run, a replan) is queued after this collective on the same stream, as
    // are the kernels of `run`.
    unsafe { comm.all_gather(&ops)? };
    let merged_lse: &mut dyn Dst<f32> = match lse {
        Some(l) => l,
        None => &mut s.merged_lse,
    };
    merge_ranks(
        comm.backend(),
        shape,
        comm.world() as u32,
        State::new(&s.gathered_o, &s.gathered_lse),
        StateMut::new(o, merged_lse),
    )
}

/// Check that every rank planned the same query rows, requests (`qo_indptr`), heads, causal
/// mask, `sm_scale` and element type: an all-gather of those numbers and one synchronisation. A
/// rank whose plan failed (`local` is its error) sends a marker instead, and every rank then
/// fails: the failed one with its own error, the others naming it. `what` gives a plan's batch
/// and query rows; `who` names the plan in errors.
pub(super) fn agree<T: Element, P>(
    comm: &Communicator,
    local: Result<P>,
    who: &str,
    what: impl Fn(&P) -> (&Batch, usize),
) -> Result<P> {
    const FAILED: i32 = -1;
    const WORDS: usize = 8;
    let mine: [i32; WORDS] = match &local {
        Ok(p) => {
            let (b, rows) = what(p);
            let h = b.heads();
            // FNV-1a of the query row pointer: the same requests with the same query rows.
            let requests = b.qo_indptr().iter().fold(0x811c_9dc5u32, |h, &x| {
                (h ^ x as u32).wrapping_mul(0x0100_0193)
            });
            [
                rows as i32,
                h.num_qo_heads() as i32,
                h.num_kv_heads() as i32,
                h.head_dim() as i32,
                b.sm_scale().to_bits() as i32,
                nccl_type::<T>(),
                i32::from(b.causal()),
                // Never the marker: the top bit is cleared.
                (requests >> 1) as i32,
            ]
        }
        Err(_) => [FAILED; WORDS],
    };
    let backend = comm.backend();
    let send = backend.upload(&mine)?;
    let recv = backend.filled(mine.len() * comm.world(), 0i32)?;
    let gpu = comm.gpu();
    let ops = [(
        send.device_ptr(gpu)?,
        recv.device_ptr(gpu)?,
        mine.len(),
        NCCL_INT32,
    )];
    // SAFETY: both buffers are on the communicator's GPU (device_ptr checked), `send` holds
    // `mine.len()` and `recv` `world` times that; both live past the synchronisation below.
    unsafe { comm.all_gather(&ops)? };
    backend.synchronize()?;
    let all = recv.to_vec()?;
    let local = local?;
    for (rank, theirs) in all.chunks(mine.len()).enumerate() {
        if theirs == [FAILED; WORDS] {
            return Err(Error::invalid(format!(
                "{who}: rank {rank} could not plan this step (its error says why)"
            )));
        }
        if theirs != mine {
            return Err(Error::invalid(format!(
                "{who}: rank {rank} planned [rows, qo heads, kv heads, head dim, sm_scale bits, \
                 dtype, causal, qo_indptr hash] = {theirs:?}, rank {} {mine:?}; every rank must \
                 plan the same requests and heads",
                comm.rank()
            )));
        }
    }
    Ok(local)
}

pub(super) fn nccl_type<T: Element>() -> i32 {
    match T::DTYPE {
        DType::F16 => NCCL_FLOAT16,
        DType::Bf16 => NCCL_BFLOAT16,
    }
}

impl<T: Element> Scratch<T> {
    pub(super) fn new(backend: &Backend, world: usize, rows: usize, heads: &Heads) -> Result<Self> {
        let s = rows * heads.num_qo_heads() as usize;
        let v = s * heads.head_dim() as usize;
        // Rows no rank writes (past a graph plan's batch) merge as empty: o 0, lse -inf.
        Ok(Scratch {
            o: backend.filled(v, T::from_f32(0.0))?,
            lse: backend.filled(s, f32::NEG_INFINITY)?,
            gathered_o: backend.filled(world * v, T::from_f32(0.0))?,
            gathered_lse: backend.filled(world * s, f32::NEG_INFINITY)?,
            merged_lse: backend.filled(s, 0.0)?,
        })
    }
}

/// A context-parallel `run` (of a [`ContextParallelDecode`], or of a
/// [`super::ContextParallelPrefill`] as `ContextParallelGraph<T, ContextParallelPrefill<T>>`)
/// recorded into a CUDA graph with everything it points at (see [`crate::GraphRun`], whose rules
/// it follows). `launch` and `replan` are collective.
pub struct ContextParallelGraph<T: Element, P = ContextParallelDecode<T>> {
    // Fields drop in order: the graph before what it points at.
    graph: CudaGraph,
    gpu: Arc<Gpu>,
    before: CudaEvent,
    after: CudaEvent,
    pub(super) plan: P,
    buffers: RunBuffers<T>,
    _variant: Box<dyn Any + Send + Sync>,
}

impl<T: Element> ContextParallelGraph<T> {
    /// Plan the next step over this rank's new shard (see [`ContextParallelDecode::replan`]).
    pub fn replan(&mut self, kv: KvIndex, sm_scale: Option<f32>) -> Result<()> {
        self.plan.replan(kv, sm_scale)
    }
}

impl<T: Element, P> ContextParallelGraph<T, P> {
    /// Run `run` once (it compiles and loads the kernels and sets up NCCL's connections, which a
    /// capture cannot do), then record it into a graph that owns the plan, variant and buffers.
    pub(super) fn record<V: Variant>(
        plan: P,
        graph_mode: bool,
        gpu: Arc<Gpu>,
        variant: V,
        mut buffers: RunBuffers<T>,
        run: fn(&P, &V, &mut RunBuffers<T>) -> Result<()>,
    ) -> Result<Self> {
        if !graph_mode {
            return Err(Error::invalid(
                "capture needs a plan made in CUDA-graph mode (PlanConfig::graph)",
            ));
        }
        let mut once = || run(&plan, &variant, &mut buffers);
        once()?;
        let graph = gpu.capture(once)?;
        Ok(ContextParallelGraph {
            graph,
            before: gpu.event()?,
            after: gpu.event()?,
            gpu,
            plan,
            buffers,
            _variant: Box::new(variant),
        })
    }

    /// Replay the recorded run on the plan's current step. Asynchronous.
    pub fn launch(&self) -> Result<()> {
        self.gpu.replay(&self.graph, &self.before, &self.after)
    }
    /// Overwrite an input with `data` (its full length), keeping its device address.
    pub fn write(&mut self, input: Input, data: &[T]) -> Result<()> {
        let b = &mut self.buffers;
        match input {
            Input::Q => b.q.copy_from(data),
            Input::K => b.k.copy_from(data),
            Input::V => b.v.copy_from(data),
        }
    }
    /// The plan.
    pub fn plan(&self) -> &P {
        &self.plan
    }
    /// The merged output (rows past the batch hold unspecified values).
    pub fn o(&self) -> &Buffer<T> {
        &self.buffers.o
    }
    /// The merged LSE, when captured with one.
    pub fn lse(&self) -> Option<&Buffer<f32>> {
        self.buffers.lse.as_ref()
    }
}
