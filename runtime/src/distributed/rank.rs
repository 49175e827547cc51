//! What every context-parallel plan does on its rank, whatever its attention ([`Rank`]): the
//! scratch its state and the gathered states live in, the checks of a `run`'s outputs and shard,
//! the ranks' agreement at plan time, and the NCCL all-gather and merge into the caller's output.

use std::sync::{Arc, Mutex};

use ferrinfer_kernels::DType;

use crate::attention::batch::{Batch, Heads};
use crate::attention::wrappers::GraphCapacity;
use crate::device::backend::{Backend, Buffer};
use crate::device::dtype::Element;
use crate::device::view::Dst;
use crate::device::view::sealed::Access;
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

/// A context-parallel plan's part beside its attention plan over the shard: the communicator,
/// the scratch, and the query rows `run` takes. `ContextParallelDecode` and
/// `ContextParallelPrefill` are each one of these and their plan.
pub(super) struct Rank<T: Element> {
    pub(super) comm: Arc<Communicator>,
    /// Query rows `run` takes: the batch's, or the graph capacity.
    rows: usize,
    /// CUDA-graph mode: the scratch buffers never move.
    pub(super) graph_mode: bool,
    scratch: Mutex<Scratch<T>>,
}

impl<T: Element> Rank<T> {
    /// The rank for this rank's attention plan `local` (over the batch `batch` gives) and the
    /// ranks' agreement on it (collective). A rank whose plan failed still takes part in the
    /// agreement (saying so), so that no other rank waits for it in NCCL.
    pub(super) fn plan<P>(
        comm: Arc<Communicator>,
        local: Result<P>,
        graph: Option<GraphCapacity>,
        batch: impl Fn(&P) -> &Batch,
        who: &str,
    ) -> Result<(P, Self)> {
        let local = local.and_then(|p| {
            let b = batch(&p);
            let rows = graph.map_or(b.total_qo(), |g| g.qo_rows as usize);
            let scratch = Scratch::new(comm.backend(), comm.world(), rows, &b.heads())?;
            Ok((p, rows, scratch))
        });
        let (p, rows, scratch) =
            agree::<T, _>(&comm, local, who, |(p, rows, _)| (batch(p), *rows))?;
        let rank = Rank {
            comm,
            rows,
            graph_mode: graph.is_some(),
            scratch: Mutex::new(scratch),
        };
        Ok((p, rank))
    }

    /// After this rank's replan (`local`: the new batch, or why not): the scratch fitted to it and
    /// the ranks' agreement (collective; a failed rank takes part, as in `plan`).
    pub(super) fn replan(&mut self, local: Result<&Batch>, who: &str) -> Result<()> {
        let local = local.and_then(|b| {
            let heads = b.heads();
            let (comm, mode) = (&self.comm, self.graph_mode);
            Scratch::fit(
                &mut self.scratch,
                comm,
                mode,
                b.total_qo(),
                &heads,
                &mut self.rows,
            )?;
            Ok(b)
        });
        let rows = self.rows;
        agree::<T, _>(&self.comm, local, who, |b| (*b, rows)).map(|_| ())
    }

    /// A context-parallel `run` of `V` over `batch` (`causal`: whether its mask needs key
    /// positions on a shard): the checks, then `local` (this rank's attention with the LSE into
    /// the scratch state), the all-gather and the merge into `o` (and `lse`).
    pub(super) fn run<V: Variant>(
        &self,
        batch: &Batch,
        causal: bool,
        o: &mut dyn Dst<T>,
        lse: Option<&mut dyn Dst<f32>>,
        who: &str,
        local: impl FnOnce(&mut Buffer<T>, &mut Buffer<f32>) -> Result<()>,
    ) -> Result<()> {
        check_shardable(V::SPEC)?;
        check_positions(V::SPEC, batch, self.comm.world(), causal, who)?;
        let shape = state_shape(batch, self.rows)?;
        check_outputs(who, shape, o.len(), lse.as_ref().map(|l| l.len()))?;
        let mut guard = self.scratch.lock().unwrap_or_else(|p| p.into_inner());
        let s = &mut *guard;
        local(&mut s.o, &mut s.lse)?;
        gather_merge(&self.comm, s, shape, o, lse)
    }
}

/// This rank's state and every rank's, gathered; sized at plan time.
struct Scratch<T: Element> {
    o: Buffer<T>,
    lse: Buffer<f32>,
    gathered_o: Buffer<T>,
    gathered_lse: Buffer<f32>,
    /// Where the merged LSE goes when the caller wants none.
    merged_lse: Buffer<f32>,
}

/// The (o, lse) state shape of `rows` query rows of `batch`'s heads.
fn state_shape(batch: &Batch, rows: usize) -> Result<StateShape> {
    let h = batch.heads();
    let rows =
        u32::try_from(rows).map_err(|_| Error::invalid(format!("{rows} query rows exceed u32")))?;
    StateShape::new(rows, h.num_qo_heads(), h.head_dim())
}

/// Refuse what would give a wrong answer on a shard that does not say where its keys sit in
/// their requests ([`crate::KvIndex::with_key_positions`]): a variant that reads key positions, and
/// (`causal`) a causal mask, whose diagonal depends on them. One rank holds the whole context.
fn check_positions(
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
fn check_outputs(who: &str, shape: StateShape, o: usize, lse: Option<usize>) -> Result<()> {
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
fn gather_merge<T: Element>(
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
fn agree<T: Element, P>(
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
    fn new(backend: &Backend, world: usize, rows: usize, heads: &Heads) -> Result<Self> {
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

    /// Outside CUDA-graph mode (whose buffers never move), resized when the plan's query rows
    /// changed from `*current`, which then holds the new count.
    fn fit(
        scratch: &mut Mutex<Self>,
        comm: &Communicator,
        graph_mode: bool,
        rows: usize,
        heads: &Heads,
        current: &mut usize,
    ) -> Result<()> {
        if !graph_mode && rows != *current {
            *scratch.get_mut().unwrap_or_else(|p| p.into_inner()) =
                Scratch::new(comm.backend(), comm.world(), rows, heads)?;
            *current = rows;
        }
        Ok(())
    }
}
