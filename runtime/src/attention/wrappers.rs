//! The calls a serving engine makes every step: `plan` once per batch composition (on the CPU: it
//! validates the batch, schedules the work list and copies it and the page table to the device in
//! one copy), then `run` for every layer with any variant (no host synchronisation, no allocation,
//! so it can be captured in a CUDA graph).
//!
//! # Threading
//!
//! A plan is `Send + Sync`. `run` takes `&self` and may be called from several threads: the
//! launches of one `run` (the attention kernel and, for a split KV, its merge pass, which share the
//! plan's scratch buffers) are queued under a lock, on the backend's one stream (the caller's, for
//! [`Backend::on_stream`]), so two runs never interleave. `replan` takes `&mut self`. A [`GraphRun`] owns its plan and buffers.

use std::any::Any;
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaEvent, CudaGraph, CudaSlice, CudaStream};
use ferrinfer_kernels::abi::AttnArgs;
use ferrinfer_kernels::attention::prefill::{Sm90Loop, sm90_form, sm90_long_form, takes_sm90_maps};
use ferrinfer_kernels::{ArchClass, DType, KernelConfig, KernelKind};

use crate::attention::batch::{Batch, Heads, KvIndex, KvStrides, QoStrides};
use crate::attention::plan::{self, Capacity, PlanOptions, WorkList};
use crate::attention::{dispatch, launch, reference, tma};
use crate::device::arch::Arch;
use crate::device::backend::{Backend, Buffer};
use crate::device::dtype::Element;
use crate::device::gpu::Gpu;
use crate::device::view::{Dst, Src};
use crate::error::{Error, Result};
use crate::variant::params;
use crate::variant::{Variant, VariantSpec};

/// How to plan.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PlanConfig {
    /// Batch-invariant mode: split every request's KV into chunks of exactly this many tokens (a
    /// multiple of 16), so a request's result is the same bit for bit whatever it is batched with.
    pub fixed_kv_chunk: Option<u32>,
    /// CUDA-graph mode: scratch buffers sized once for these bounds; every later `replan` reuses
    /// them, so a captured `run` stays valid. What a capture freezes (heads, causal, `sm_scale`,
    /// the cache's page size, layout and capacity) is pinned by the first plan, and a `replan`
    /// that changes it is refused. The first plan's kernel instance holds too (its query tile and
    /// warps along the keys): a later batch is cut into items of that tile, and one that needs
    /// more items than [`GraphCapacity::work_items`] is refused. `run` then takes q and o (and
    /// the LSE) sized for [`GraphCapacity::qo_rows`] rows, not for the batch. Capture with
    /// [`BatchPrefill::capture`] / [`BatchDecode::capture`]. GPU backends only.
    pub graph: Option<GraphCapacity>,
    /// Which kernel runs [`BatchDecode`] (ignored by [`BatchPrefill`]).
    pub decode_kernel: DecodeKernel,
    /// Which template runs [`BatchPrefill`]'s long-prompt tiles on Hopper (ignored by
    /// [`BatchDecode`]).
    pub prefill_kernel: PrefillKernel,
    /// How many warps stream the keys of a work item on the 16-row tile, which runs
    /// [`BatchDecode`] on tensor cores and the shortest prefills.
    pub kv_warps: KvWarps,
    /// Which K/V tile the one-warp 16-row tile streams in a [`BatchDecode`] on tensor cores, and
    /// the FA3 template in a [`BatchPrefill`] at head dim 128.
    pub kv_tile: KvTile,
}

/// The K/V tile of the prefill template's one-warp 16-row tile in a decode on tensor cores at head
/// dim 128: the default (32 keys) or the narrow one (16 keys: half the shared memory, so an H200
/// SM holds ten CTAs instead of six, each streaming slower). And the FA3 template's in a batch
/// prefill at head dim 128: the default (128 keys, three stages) or the long prompts' (176 keys,
/// two stages). The two-warp form, the other tiles and the other head dims have one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KvTile {
    /// The plan's choice per batch: the narrow tile where its wave model predicts it 5% faster,
    /// which happens for batches of uneven requests in at most a wave of the default tile, whose
    /// split into equal items needs more CTAs than that wave holds; and for even batches whose
    /// unsplit items are over a wave of the default tile but within one of the narrow. Measured
    /// (H200, bf16, head dim 128, pages of 16): GQA 4, 4 requests of 8192 keys among 60 of 512,
    /// 3136 GB/s in 512-key chunks on the narrow tile against 2920 on the default tile's best
    /// split; GQA 2, 64 requests of 4096 keys (1024 items), 4308 unsplit on the narrow tile
    /// against 4234 split in three on the default (BENCHMARKS.md and kernels/notes/decode.md,
    /// sessions 15 and 21). The default in batch-invariant and CUDA-graph mode. A prefill on
    /// FA3 takes the long prompts' tile for the batches [`FA3_LONG_TILE_MIN_KV`] describes.
    #[default]
    Auto,
    /// The default K/V tile.
    Default,
    /// The narrow K/V tile, where the plan runs the one-warp 16-row tile (in batch-invariant and
    /// CUDA-graph mode too it keeps the default).
    Narrow,
    /// The long prompts' FA3 tile (176 keys at head dim 128) for every batch prefill that runs
    /// FA3 over a contiguous or ragged cache, whatever its lengths and modes (a paged cache keeps
    /// the default: its page copies would not align). A variant whose build of it spills, or
    /// loses the overlap (as a key hook does), runs the default tile instead.
    Long,
}

impl KvTile {
    /// The choice the caller fixed, if any: narrow or not.
    fn narrow(self) -> Option<bool> {
        match self {
            KvTile::Auto => None,
            KvTile::Default | KvTile::Long => Some(false),
            KvTile::Narrow => Some(true),
        }
    }
}

/// Warps along the keys of the prefill template's 16-row tile (decode on tensor cores, prefill
/// of requests of a few packed rows): one warp streams all of a work item's keys, or two stream
/// their own halves of every K/V tile and merge their states in shared memory at the end. The
/// other tiles have one form.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KvWarps {
    /// The plan's choice per batch, from measurements (H200, bf16, head dim 128, decode, both
    /// counts in one call; the table is at the tile function, `choose_kv_warps` in
    /// kernels/src/attention/prefill.rs), where the SM holds as many warps of two-warp CTAs as
    /// of one-warp CTAs: two where the batch's work items, before any KV split, are under one
    /// wave of two-warp CTAs (few long requests, split to fill the device either way: 16 x
    /// 32768, 4349 GB/s against 4294); two for MHA (one query head a KV head) or pages of one
    /// key when they are at least two waves (MHA 64 x 4096: 4403 against 4323; page size 1, 128
    /// x 1024: 3638 against 3419); one otherwise (GQA 4 64 x 4096: 4147 against 3965 with two;
    /// 256 x 2048: 4233 against 4041; GQA 2 64 x 4096: 4304 against 4233) and in batch-invariant
    /// mode. In CUDA-graph mode the first plan's count holds for every replan, since a captured
    /// kernel does not change.
    #[default]
    Auto,
    /// One warp along the keys (six CTAs an H200 SM at head dim 128).
    One,
    /// Two warps along the keys (three CTAs an H200 SM at head dim 128).
    Two,
}

impl KvWarps {
    /// The count the caller fixed, if any.
    fn fixed(self) -> Option<u32> {
        match self {
            KvWarps::Auto => None,
            KvWarps::One => Some(1),
            KvWarps::Two => Some(2),
        }
    }
}

/// The template of a batch prefill's 128-row tiles.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PrefillKernel {
    /// The faster template for the instance, from measurements: FA3 where it exists and was
    /// measured faster (Hopper, head dims 64, 128 and 256, the 128-row tile, a positive
    /// `sm_scale`), FA2 elsewhere. At head dim 256, where FA2 plans 64-row
    /// tiles (which have no FA3 form), a Hopper plan takes the 128-row tile for the batches that
    /// take it at 128 (requests of more than 64 packed rows on average); see
    /// [`auto_plans_fa3_tile`] for what that measured. The benchmark's prefill rows with each
    /// template forced (H200, bf16, 32/8 heads, TFLOP/s, one call on 2026-12-01, FA3 v27 of
    /// `kernels/notes/fa3.md`; head dim 128 unless named):
    ///
    /// | config | FA2 | FA3 |
    /// |---|---:|---:|
    /// | one request, 8192 causal | 350 | 589 |
    /// | one request, 8192 full | 353 | 617 |
    /// | 8192 causal, soft-cap 30 | 322 | 502 |
    /// | 16 x 1024 causal, ragged | 268 | 397 |
    /// | 16 x 1024 causal, page 16 | 262 | 365 |
    /// | 16 x 256 appended to 4096, page 16 | 323 | 485 |
    /// | 8192 causal, head dim 64 | 268 | 413 |
    /// | 8192 causal, head dim 256 | 262 | 571 |
    ///
    /// A variant whose FA3 build spills registers is rebuilt with its consumers in order, and
    /// runs FA2 if that spills too (today the attention sink at head dim 256). At head
    /// dim 128 a launch whose K/V all go through cp.async (no TMA maps: pages under 64 keys, or
    /// that neither divide nor are divided by the K/V tile, strides TMA cannot take, a map the
    /// driver refused, `FERRINFER_SM90_TMA=0`) runs the in-order build as well, where it
    /// measured 2-4% faster (2026-12-01: pages of 16, 358 against 343); TMA caches run FA3's
    /// overlap (`FERRINFER_SM90_OVERLAP=0`/`1` forces either).
    ///
    /// At head dim 128 a batch of long prompts over a contiguous or ragged cache takes FA3's
    /// 176-key K/V tile instead of its 128-key one ([`FA3_LONG_TILE_MIN_KV`] says which), where
    /// the variant builds it with its overlap and no spills (today `Standard`; the others take
    /// the 128-key tile).
    #[default]
    Auto,
    /// The FA2 template (mma.sync) everywhere.
    Fa2,
    /// The FA3 template (sm_90a: warpgroup MMAs, a producer warpgroup) at head dims 64, 128 and
    /// 256. Its one query tile is 128 rows, so the plan takes that tile for every batch (FA2
    /// would plan 16 or 64 rows for short requests, and 64 at head dim 256). Running a plan it
    /// does not cover (another arch) is an error; a variant whose FA3 build spills registers
    /// runs the planned FA2 instance instead (as under `Auto`), and so does a batch whose
    /// `sm_scale` is zero or negative (the FA3 build folds the scale into its exponents, which
    /// takes a positive one). Its K/V tile is chosen as under `Auto`.
    Fa3,
}

/// Whether [`PrefillKernel::Auto`] plans the FA3 template's 128-row tile for a batch the family's
/// tile function would give 64: at head dim 256 on sm_90a, for the batches that take 128 rows
/// (and so FA3) at head dim 128 by the shared rule ([`plan::cta_tile_q`]: requests of more than 64
/// packed query rows on average). FA2 plans 64 rows at 256, which have no FA3 form. A variant
/// whose FA3 build spills at 256 runs FA2's 128-row tile instead. Measured on one causal 8192
/// prompt (H200, bf16, 32/8 heads, TFLOP/s, one call on 2026-12-02, two rounds): Standard under
/// Auto 581 (FA3; FA2's 64-row tile 260, its 128-row tile 254); `LlamaRope` (FA2 then), whose key
/// hook runs on every K tile, 29.8 on FA2's 128-row tile against 16.1 on its 64-row tile (half
/// the query tiles, so half the key rotations).
///
/// In batch-invariant mode the tile (and so the template, whose reduction order differs) must
/// not depend on the other requests, so there it is 128 rows whatever the batch, as the tile
/// function's long-prompt tile is at head dims 64 and 128.
fn auto_plans_fa3_tile(arch: Arch, batch: &Batch, batch_invariant: bool) -> bool {
    let (rows, requests) = plan::packed_rows_and_requests(batch);
    batch.heads().head_dim() == 256
        && matches!(dispatch::arch_class(arch), Ok(ArchClass::Sm90a))
        && (batch_invariant || plan::cta_tile_q(rows, requests, 128) == FA3_QUERY_TILE)
}

impl PrefillKernel {
    /// The instance to run for the plan's `planned` one, and what to run, in order, if its build
    /// does not fit (`dispatch::kernel`). `long`: the batch takes the long prompts' FA3 tile
    /// where there is one (`long_prompts`).
    fn choose(
        self,
        spec: &VariantSpec,
        planned: KernelConfig,
        fallback: Option<KernelConfig>,
        sm_scale: f32,
        long: bool,
    ) -> Result<(KernelConfig, Vec<KernelConfig>)> {
        let supported = |c: &KernelConfig| dispatch::supports(spec, c).is_ok();
        let sm90 = sm90_form(&planned).filter(supported);
        let fa2 = || (planned, fallback.into_iter().collect());
        // The FA3 build folds sm_scale into its exponents for sm_scale > 0 only (a variant
        // without a logits hook has no copy of the softmax for other scales, which cut its
        // compile time by a third: kernels/notes/fa3.md, session 16): other scales run FA2.
        if sm90.is_some() && (sm_scale <= 0.0 || sm_scale.is_nan()) {
            return Ok(fa2());
        }
        // Auto takes FA3 wherever the plan's instance has a form of it: at every head dim it has
        // one (64, 128, 256) it was measured faster (the docs of `Auto`). The long prompts' tile
        // goes first where it applies, the 128-key one behind it, then the planned FA2.
        match (self, sm90) {
            (PrefillKernel::Auto | PrefillKernel::Fa3, Some(f)) => {
                match sm90_long_form(&f).filter(|l| long && supported(l)) {
                    Some(l) => Ok((l, vec![f, planned])),
                    None => Ok((f, vec![planned])),
                }
            }
            (PrefillKernel::Fa2 | PrefillKernel::Auto, _) => Ok(fa2()),
            (PrefillKernel::Fa3, None) => Err(Error::unsupported(format!(
                "PrefillKernel::Fa3: no FA3 instance for {} with variant {} (it needs sm_90a, \
                 head dim 64, 128 or 256 and the 128-row query tile)",
                planned.name(),
                spec.name
            ))),
        }
    }
}

/// Keys each request must hold for a batch to take the FA3 template's long prompts' K/V tile at
/// head dim 128 under [`KvTile::Auto`] (176 keys and two stages, against 128 keys and three). The
/// batch must also be over a contiguous or ragged cache (a 176-key tile would misalign the page
/// copies of a paged one, which then go by cp.async: 0.90 of the 128-key tile over pages of 64),
/// and in neither batch-invariant nor CUDA-graph mode (there the kernel must not depend on the
/// batch). Only requests with query rows count. Short requests lose: each request's last tile,
/// partial, goes by cp.async, and a causal diagonal masks more of a wider tile. Measured against
/// the 128-key tile (H200, bf16, 32/8 heads, both forced in one call, TFLOP/s ratios;
/// BENCHMARKS.md, session 23): one 8192 prompt, full and causal 1.021; ragged causal 4 x 4096
/// 1.002, 8 x 2048 0.987, 16 x 1024 0.959; 16 x 1024 full 0.911.
pub const FA3_LONG_TILE_MIN_KV: u32 = 4096;

/// Whether a batch takes the FA3 template's long prompts' K/V tile: as [`KvTile`] fixes it (never
/// over a paged cache), or by the rule of [`FA3_LONG_TILE_MIN_KV`] under [`KvTile::Auto`].
fn long_prompts(batch: &Batch, kv_tile: KvTile, invariant_or_graph: bool) -> bool {
    if batch.kv().page_size().is_some() {
        return false;
    }
    match kv_tile {
        KvTile::Long => true,
        KvTile::Default | KvTile::Narrow => false,
        KvTile::Auto => {
            !invariant_or_graph
                && (0..batch.batch())
                    .filter(|&b| batch.qo_len(b) > 0)
                    .all(|b| batch.kv().kv_len(b) >= FA3_LONG_TILE_MIN_KV)
        }
    }
}

/// The FA3 template's query tile, which [`PrefillKernel::Fa3`] plans.
const FA3_QUERY_TILE: u32 = 128;

/// The kernel template of a batch decode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DecodeKernel {
    /// Tensor cores when at least [`TENSOR_CORE_MIN_GROUP`] query heads share each KV head (today
    /// every group size, from measurements), CUDA cores otherwise.
    #[default]
    Auto,
    /// The decode template: CUDA-core dot products, the query heads of a KV head sharing its loads.
    CudaCores,
    /// The prefill template: each request's query heads packed as the rows of 16-row MMA tiles, so
    /// that K and V are read once per KV head and the arithmetic runs on tensor cores.
    TensorCores,
}

/// Group size from which [`DecodeKernel::Auto`] takes tensor cores: every group, from the
/// benchmark's decode rows with each kernel forced (H200, bf16, head dim 128, page 16, 64 x 4096
/// tokens unless said, GB/s, one call on 2026-11-29 at commit 71bc392):
///
/// | query / KV heads | tensor cores | CUDA cores |
/// |---|---|---|
/// | 32 / 32 (MHA) | 4292 | 4144 |
/// | 32 / 16 | 3512 | 3403 |
/// | 32 / 8 | 4203 | 2432 |
/// | 32 / 8, page size 1, 128 x 1024 | 3288 | 2331 |
/// | 64 / 8 | 4204 | 1525 |
///
/// The CUDA-core kernel is bound by instruction issue from group 4 on, and below that the MMA
/// tile's padding costs less than the CUDA-core kernel's dot products.
pub const TENSOR_CORE_MIN_GROUP: u32 = 1;

impl DecodeKernel {
    fn kind(self, heads: &Heads) -> KernelKind {
        let tensor = match self {
            DecodeKernel::Auto => heads.group_size() >= TENSOR_CORE_MIN_GROUP,
            DecodeKernel::CudaCores => false,
            DecodeKernel::TensorCores => true,
        };
        if tensor {
            KernelKind::Prefill
        } else {
            KernelKind::Decode
        }
    }
}

/// Bounds of every batch a CUDA-graph plan will hold. The query and output buffers of its `run` hold
/// `qo_rows` rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GraphCapacity {
    /// Work items (the fixed grid): a few times the SM count is plenty.
    pub work_items: u32,
    /// Requests.
    pub batch: u32,
    /// Query rows of all requests.
    pub qo_rows: u32,
    /// Pages (or, for a ragged cache, requests) of the KV index.
    pub kv_blocks: u32,
}

/// Batch prefill (and append) over a ragged or paged KV cache.
///
/// ```
/// use ferrinfer_runtime::prelude::*;
/// use ferrinfer_runtime::{Backend, BatchPrefill, variant::Variant};
/// # fn demo<V: Variant>(variant: &V) -> ferrinfer_runtime::Result<()> {
/// let heads = Heads::new(4, 2, 64)?;
/// // Two requests: 3 and 5 query rows, over 3 and 9 keys of a ragged cache.
/// let kv = KvIndex::ragged(&[0, 3, 12], KvLayout::Nhd)?;
/// let batch = Batch::new(heads, &[0, 3, 8], kv)?.with_causal(true);
/// let backend = Backend::Cpu;
/// let plan = BatchPrefill::plan(&backend, batch)?;
/// let q = backend.upload(&vec![bf16::from_f32(0.5); 8 * 4 * 64])?;
/// let k = backend.upload(&vec![bf16::from_f32(0.25); 12 * 2 * 64])?;
/// let v = backend.upload(&vec![bf16::from_f32(1.0); 12 * 2 * 64])?;
/// let mut o = backend.upload(&vec![bf16::ZERO; 8 * 4 * 64])?;
/// plan.run(variant, &q, &k, &v, &mut o, None)?;
/// # Ok(()) }
/// ```
pub struct BatchPrefill {
    planned: Planned,
}

impl BatchPrefill {
    /// Validate the batch and prepare it on `backend`.
    pub fn plan(backend: &Backend, batch: Batch) -> Result<Self> {
        Self::plan_with(backend, batch, PlanConfig::default())
    }
    /// [`BatchPrefill::plan`] with a fixed KV split or CUDA-graph buffers.
    pub fn plan_with(backend: &Backend, batch: Batch, config: PlanConfig) -> Result<Self> {
        Ok(BatchPrefill {
            planned: Planned::new(backend, batch, KernelKind::Prefill, false, config)?,
        })
    }
    /// Plan another batch with the same heads into the same buffers (in CUDA-graph mode the
    /// device addresses do not change, so a captured `run` replays the new batch).
    pub fn replan(&mut self, batch: Batch) -> Result<()> {
        self.planned.replan(batch)
    }
    /// Attention of `q` (`[total_qo, num_qo_heads, head_dim]`) over `k`, `v` into `o`, and the
    /// natural-log LSE (`[total_qo, num_qo_heads]`) into `lse` when given. Asynchronous on a GPU.
    pub fn run<V: Variant, T: Element>(
        &self,
        variant: &V,
        q: &dyn Src<T>,
        k: &dyn Src<T>,
        v: &dyn Src<T>,
        o: &mut dyn Dst<T>,
        lse: Option<&mut dyn Dst<f32>>,
    ) -> Result<()> {
        self.planned.run(variant, q, k, v, o, lse)
    }
    /// The backend the plan was made on: where `run` launches, in that backend's stream order.
    pub fn backend(&self) -> &Backend {
        &self.planned.backend
    }
    /// The batch of the last plan.
    pub fn batch(&self) -> &Batch {
        &self.planned.batch
    }
    /// The scheduled work list (GPU backends only).
    pub fn work_list(&self) -> Option<&WorkList> {
        self.planned.work.as_ref()
    }
    /// Run once, then record `run` into a CUDA graph that owns this plan, the variant and the
    /// buffers for as long as it lives; re-plan through [`GraphRun::replan`] and replay with
    /// [`GraphRun::launch`]. The plan must be in CUDA-graph mode ([`PlanConfig::graph`]) and the
    /// buffers sized for its capacity.
    pub fn capture<V: Variant, T: Element>(
        self,
        variant: V,
        buffers: RunBuffers<T>,
    ) -> Result<GraphRun<Self, T>> {
        GraphRun::capture(self, variant, buffers, |p| &p.planned)
    }
}

/// Batch decode: one query row per request, over a paged (or ragged) KV cache. From 4 query heads
/// per KV head it runs on tensor cores (see [`DecodeKernel`]; [`PlanConfig::decode_kernel`]
/// chooses otherwise).
pub struct BatchDecode {
    planned: Planned,
}

impl BatchDecode {
    /// Validate and prepare a decode step; `q` and `o` of `run` are `[batch, num_qo_heads, head_dim]`.
    pub fn plan(
        backend: &Backend,
        heads: Heads,
        kv: KvIndex,
        sm_scale: Option<f32>,
    ) -> Result<Self> {
        Self::plan_with(backend, heads, kv, sm_scale, PlanConfig::default())
    }
    /// [`BatchDecode::plan`] with a fixed KV split, CUDA-graph buffers or a chosen kernel.
    pub fn plan_with(
        backend: &Backend,
        heads: Heads,
        kv: KvIndex,
        sm_scale: Option<f32>,
        config: PlanConfig,
    ) -> Result<Self> {
        let batch = decode_batch(heads, kv, sm_scale)?;
        let kind = config.decode_kernel.kind(&heads);
        Ok(BatchDecode {
            planned: Planned::new(backend, batch, kind, true, config)?,
        })
    }
    /// [`BatchDecode::plan_with`] of a batch made by [`Batch::decode`] (one query row per
    /// request), which may carry q and o strides ([`Batch::with_qo_strides`]).
    ///
    /// ```
    /// use ferrinfer_runtime::prelude::*;
    /// use ferrinfer_runtime::attention::QoStrides;
    /// # fn demo<V: ferrinfer_runtime::variant::Variant>(v: &V) -> ferrinfer_runtime::Result<()> {
    /// let heads = Heads::new(4, 1, 64)?;
    /// let kv = KvIndex::ragged(&[0, 7, 9], KvLayout::Nhd)?;
    /// // q inside a fused QKV [2, (4 + 1 + 1) * 64]; o dense.
    /// let batch = Batch::decode(heads, kv)?
    ///     .with_qo_strides(QoStrides::new(6 * 64, 64), QoStrides::dense(&heads))?;
    /// let backend = Backend::Cpu;
    /// let plan = BatchDecode::plan_batch(&backend, batch, PlanConfig::default())?;
    /// let qkv = vec![bf16::from_f32(0.5); 2 * 6 * 64];
    /// let kv_data = vec![bf16::from_f32(0.25); 9 * 64];
    /// let mut o = vec![bf16::ZERO; 2 * 4 * 64];
    /// plan.run(v, &View::host(&qkv), &View::host(&kv_data), &View::host(&kv_data),
    ///          &mut ViewMut::host(&mut o), None)?;
    /// # Ok(()) }
    /// ```
    pub fn plan_batch(backend: &Backend, batch: Batch, config: PlanConfig) -> Result<Self> {
        if batch.total_qo() != batch.batch() || (0..batch.batch()).any(|b| batch.qo_len(b) != 1) {
            return Err(Error::invalid(
                "BatchDecode::plan_batch takes one query row per request (Batch::decode)",
            ));
        }
        let kind = config.decode_kernel.kind(&batch.heads());
        Ok(BatchDecode {
            planned: Planned::new(backend, batch, kind, true, config)?,
        })
    }
    /// Plan another decode step into the same buffers (see [`BatchPrefill::replan`]). The q and
    /// o strides of the first plan are kept.
    pub fn replan(&mut self, kv: KvIndex, sm_scale: Option<f32>) -> Result<()> {
        let old = &self.planned.batch;
        let batch = decode_batch(old.heads(), kv, sm_scale)?
            .with_qo_strides(old.q_strides(), old.o_strides())?;
        self.planned.replan(batch)
    }
    /// See [`BatchPrefill::run`].
    pub fn run<V: Variant, T: Element>(
        &self,
        variant: &V,
        q: &dyn Src<T>,
        k: &dyn Src<T>,
        v: &dyn Src<T>,
        o: &mut dyn Dst<T>,
        lse: Option<&mut dyn Dst<f32>>,
    ) -> Result<()> {
        self.planned.run(variant, q, k, v, o, lse)
    }
    /// The backend the plan was made on: where `run` launches, in that backend's stream order.
    pub fn backend(&self) -> &Backend {
        &self.planned.backend
    }
    /// The batch of the last plan.
    pub fn batch(&self) -> &Batch {
        &self.planned.batch
    }
    /// The scheduled work list (GPU backends only).
    pub fn work_list(&self) -> Option<&WorkList> {
        self.planned.work.as_ref()
    }
    /// See [`BatchPrefill::capture`].
    pub fn capture<V: Variant, T: Element>(
        self,
        variant: V,
        buffers: RunBuffers<T>,
    ) -> Result<GraphRun<Self, T>> {
        GraphRun::capture(self, variant, buffers, |p| &p.planned)
    }
}

/// The buffers of a captured `run`: `q` and `o` (and `lse`) sized for the plan's
/// [`GraphCapacity::qo_rows`], `k` and `v` for its KV index.
pub struct RunBuffers<T: Element> {
    /// `[qo_rows, num_qo_heads, head_dim]`.
    pub q: Buffer<T>,
    /// The cache's keys.
    pub k: Buffer<T>,
    /// The cache's values.
    pub v: Buffer<T>,
    /// Same shape as `q`.
    pub o: Buffer<T>,
    /// `[qo_rows, num_qo_heads]`, when the LSE is wanted.
    pub lse: Option<Buffer<f32>>,
}

impl<T: Element> RunBuffers<T> {
    /// Overwrite `input` with `data` (its full length), keeping its device address: what a
    /// captured graph reads on its next replay.
    pub(crate) fn write(&mut self, input: Input, data: &[T]) -> Result<()> {
        match input {
            Input::Q => self.q.copy_from(data),
            Input::K => self.k.copy_from(data),
            Input::V => self.v.copy_from(data),
        }
    }
}

/// Which input of a [`GraphRun`] to overwrite between replays.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Input {
    /// The queries.
    Q,
    /// The keys.
    K,
    /// The values.
    V,
}

/// A `run` recorded into a CUDA graph, together with everything the graph points at: the plan
/// (its workspace and scratch buffers), the variant (its parameter arrays) and the buffers. Nothing
/// it recorded can be dropped, moved or resized while it lives; a [`GraphRun::replan`] that would
/// change what the recording froze is refused. Replay with [`GraphRun::launch`].
///
/// The buffers are reachable only read-only (`q()`, `o()`...) and through [`GraphRun::write`],
/// which keeps their device addresses.
///
/// The graph is recorded on a private stream and each replay is ordered on the backend's stream:
/// after the work queued there before [`GraphRun::launch`], before the work queued after it. On a
/// caller's stream ([`Backend::on_stream`]) that is the caller's stream; to put a `run` into a
/// graph of your own instead, capture the plan's `run` on your stream after one eager `run`.
pub struct GraphRun<P, T: Element> {
    // Fields drop in order: the graph before what it points at.
    graph: CudaGraph,
    gpu: Arc<Gpu>,
    /// Order a replay after the work queued before it, and the work after it after the replay.
    before: CudaEvent,
    after: CudaEvent,
    plan: P,
    buffers: RunBuffers<T>,
    _variant: Box<dyn Any + Send + Sync>,
}

impl<P, T: Element> GraphRun<P, T> {
    fn capture<V: Variant>(
        plan: P,
        variant: V,
        mut b: RunBuffers<T>,
        planned: fn(&P) -> &Planned,
    ) -> Result<Self> {
        let p = planned(&plan);
        let Backend::Cuda(gpu) = &p.backend else {
            return Err(Error::unsupported(
                "capture needs a GPU backend: the CPU backend has no CUDA graphs",
            ));
        };
        if p.config.graph.is_none() {
            return Err(Error::invalid(
                "capture needs a plan made in CUDA-graph mode (PlanConfig::graph): a plan sized \
                 for one batch would be outgrown by the next replan",
            ));
        }
        let mut run = || {
            p.run(
                &variant,
                &b.q,
                &b.k,
                &b.v,
                &mut b.o,
                b.lse.as_mut().map(|l| l as &mut dyn Dst<f32>),
            )
        };
        // The first run compiles and loads the kernels and uploads parameter arrays, which a
        // capture cannot do.
        run()?;
        let graph = gpu.capture(run)?;
        Ok(GraphRun {
            graph,
            gpu: gpu.clone(),
            before: gpu.event()?,
            after: gpu.event()?,
            plan,
            buffers: b,
            _variant: Box::new(variant),
        })
    }

    /// Replay the recorded run on the plan's current batch. Asynchronous.
    pub fn launch(&self) -> Result<()> {
        // The recorded pointers are the workspace, scratch and buffers this value owns; the
        // recorded sizes are pinned by replan (Pinned::check) and the capacity.
        self.gpu.replay(&self.graph, &self.before, &self.after)
    }
    /// The plan (read-only: replan through [`GraphRun::replan`]).
    pub fn plan(&self) -> &P {
        &self.plan
    }
    /// Overwrite an input with `data` (its full length), keeping its device address.
    pub fn write(&mut self, input: Input, data: &[T]) -> Result<()> {
        self.buffers.write(input, data)
    }
    /// The queries.
    pub fn q(&self) -> &Buffer<T> {
        &self.buffers.q
    }
    /// The keys.
    pub fn k(&self) -> &Buffer<T> {
        &self.buffers.k
    }
    /// The values.
    pub fn v(&self) -> &Buffer<T> {
        &self.buffers.v
    }
    /// The output; rows past the batch's `total_qo` are not written.
    pub fn o(&self) -> &Buffer<T> {
        &self.buffers.o
    }
    /// The LSE, when captured with one.
    pub fn lse(&self) -> Option<&Buffer<f32>> {
        self.buffers.lse.as_ref()
    }
}

impl<T: Element> GraphRun<BatchPrefill, T> {
    /// Plan the next batch for the recorded run (see [`BatchPrefill::replan`]).
    pub fn replan(&mut self, batch: Batch) -> Result<()> {
        self.plan.replan(batch)
    }
}

impl<T: Element> GraphRun<BatchDecode, T> {
    /// Plan the next decode step for the recorded run (see [`BatchDecode::replan`]).
    pub fn replan(&mut self, kv: KvIndex, sm_scale: Option<f32>) -> Result<()> {
        self.plan.replan(kv, sm_scale)
    }
}

fn decode_batch(heads: Heads, kv: KvIndex, sm_scale: Option<f32>) -> Result<Batch> {
    let batch = Batch::decode(heads, kv)?;
    match sm_scale {
        Some(s) => batch.with_sm_scale(s),
        None => Ok(batch),
    }
}

/// Byte offsets of the arrays in the device workspace: the plan's own layout first, then the index
/// arrays of the batch, each region sized by the capacity so that it never moves.
#[derive(Clone, Copy, Debug)]
struct Regions {
    qo_indptr: usize,
    kv_indptr: usize,
    kv_indices: usize,
    kv_last_len: usize,
    /// `[batch][2]` key positions (offset, total), read through the header's `KEY_POSITIONS`.
    kv_positions: usize,
    bytes: usize,
}

/// Sizes the device buffers were allocated for.
#[derive(Clone, Copy, Debug)]
struct Sizes {
    plan: Capacity,
    batch: usize,
    kv_blocks: usize,
}

impl Sizes {
    fn regions(&self, opts: &PlanOptions) -> Regions {
        let align = |x: usize| x.div_ceil(16) * 16;
        let qo_indptr = align(plan::workspace_bytes(opts, &self.plan));
        let kv_indptr = align(qo_indptr + 4 * (self.batch + 1));
        let kv_indices = align(kv_indptr + 4 * (self.batch + 1));
        let kv_last_len = align(kv_indices + 4 * self.kv_blocks.max(1));
        let kv_positions = align(kv_last_len + 4 * self.batch.max(1));
        let bytes = align(kv_positions + 8 * self.batch.max(1));
        Regions {
            qo_indptr,
            kv_indptr,
            kv_indices,
            kv_last_len,
            kv_positions,
            bytes,
        }
    }
    /// The first size of `need` these do not hold: (what, needed, held).
    fn short_of(&self, need: &Sizes) -> Option<(&'static str, usize, usize)> {
        let p = |x: u32| x as usize;
        [
            ("work items", p(need.plan.items), p(self.plan.items)),
            ("query rows", p(need.plan.qo_rows), p(self.plan.qo_rows)),
            (
                "partial rows",
                p(need.plan.partial_rows),
                p(self.plan.partial_rows),
            ),
            ("requests", need.batch, self.batch),
            ("KV blocks", need.kv_blocks, self.kv_blocks),
        ]
        .into_iter()
        .find(|&(_, want, have)| want > have)
    }
    fn holds(&self, need: &Sizes) -> bool {
        self.short_of(need).is_none()
    }
    /// A CUDA-graph plan's sizes never grow: refuse a batch they do not hold, naming what overflows.
    fn check_graph(&self, need: &Sizes) -> Result<()> {
        match self.short_of(need) {
            None => Ok(()),
            Some((what, want, have)) => Err(Error::invalid(format!(
                "the batch needs {want} {what} but the CUDA-graph capacity holds {have}"
            ))),
        }
    }
}

/// The device side of a plan: one workspace (work list and index arrays, written with one copy)
/// and the scratch buffers of split-KV partial results.
struct DeviceState {
    sizes: Sizes,
    regions: Regions,
    /// Host copy of the workspace, rewritten by each plan.
    staging: Vec<u8>,
    ws: CudaSlice<u8>,
    partial_o: CudaSlice<f32>,
    partial_lse: CudaSlice<f32>,
    /// A caller's stream, which the slices above are freed on: declared after them.
    _stream: Option<Arc<CudaStream>>,
}

/// What a CUDA graph freezes besides buffer addresses: the first graph-mode plan pins it, and a
/// replan that differs is refused with the field's name.
#[derive(Clone, Debug, PartialEq)]
struct Pinned {
    heads: Heads,
    causal: bool,
    sm_scale: f32,
    page_size: Option<u32>,
    layout: crate::attention::batch::KvLayout,
    kv_capacity: u32,
    /// Strides of K/V, q and o, in that order.
    strides: (KvStrides, QoStrides, QoStrides),
}

impl Pinned {
    fn of(b: &Batch) -> Self {
        Pinned {
            heads: b.heads(),
            causal: b.causal(),
            sm_scale: b.sm_scale(),
            page_size: b.kv().page_size(),
            layout: b.kv().layout(),
            kv_capacity: b.kv().capacity(),
            strides: (b.kv().strides(&b.heads()), b.q_strides(), b.o_strides()),
        }
    }
    fn check(&self, b: &Batch) -> Result<()> {
        let now = Pinned::of(b);
        let differs = |field: &str, was: String, is: String| {
            Err(Error::invalid(format!(
                "a CUDA-graph plan cannot change {field} (captured with {was}, re-planned with \
                 {is}): make a new plan and capture again"
            )))
        };
        if now.heads != self.heads {
            return differs(
                "heads",
                format!("{:?}", self.heads),
                format!("{:?}", now.heads),
            );
        }
        if now.causal != self.causal {
            return differs("causal", self.causal.to_string(), now.causal.to_string());
        }
        if now.sm_scale.to_bits() != self.sm_scale.to_bits() {
            return differs(
                "sm_scale",
                self.sm_scale.to_string(),
                now.sm_scale.to_string(),
            );
        }
        if now.page_size != self.page_size {
            let s = |p: Option<u32>| p.map_or("ragged".to_string(), |p| p.to_string());
            return differs("page_size", s(self.page_size), s(now.page_size));
        }
        if now.layout != self.layout {
            return differs(
                "layout",
                format!("{:?}", self.layout),
                format!("{:?}", now.layout),
            );
        }
        if now.kv_capacity != self.kv_capacity {
            return differs(
                "the KV cache's capacity",
                self.kv_capacity.to_string(),
                now.kv_capacity.to_string(),
            );
        }
        if now.strides != self.strides {
            return differs(
                "the K/V, q or o strides",
                format!("{:?}", self.strides),
                format!("{:?}", now.strides),
            );
        }
        Ok(())
    }
}

/// What both wrappers share: the validated batch, its work list, and its device buffers.
pub(crate) struct Planned {
    backend: Backend,
    kind: KernelKind,
    /// A batch decode (on either template).
    decode: bool,
    config: PlanConfig,
    batch: Batch,
    /// Graph mode: what the first plan froze.
    pinned: Option<Pinned>,
    work: Option<WorkList>,
    dev: Option<DeviceState>,
    /// Held across the launches of one run: they share the scratch buffers.
    launch: Mutex<()>,
}

impl Planned {
    fn new(
        backend: &Backend,
        batch: Batch,
        kind: KernelKind,
        decode: bool,
        config: PlanConfig,
    ) -> Result<Self> {
        if let Some(g) = &config.graph {
            if backend.gpu().is_none() {
                return Err(Error::unsupported(
                    "CUDA-graph mode (PlanConfig::graph) needs a GPU backend",
                ));
            }
            if g.work_items == 0 || g.batch == 0 {
                return Err(Error::invalid(format!(
                    "GraphCapacity needs at least one work item and one request, got {g:?}"
                )));
            }
        }
        let mut p = Planned {
            backend: backend.clone(),
            kind,
            decode,
            config,
            pinned: config.graph.map(|_| Pinned::of(&batch)),
            batch,
            work: None,
            dev: None,
            launch: Mutex::new(()),
        };
        let batch = p.batch.clone();
        p.replan(batch)?;
        Ok(p)
    }

    fn options(&self, gpu: &Gpu, batch: &Batch) -> PlanOptions {
        let mut o = PlanOptions::for_device(gpu.sm_count(), gpu.sm_resources());
        o.fixed_kv_chunk = self.config.fixed_kv_chunk;
        o.graph_capacity = self.config.graph.map(|g| g.work_items);
        // A decode on the prefill template: the family's tile function sizes the tile by the group.
        o.one_row_per_request = self.decode_rows();
        let auto_fa3 = self.config.prefill_kernel == PrefillKernel::Auto
            && self.graph_tiles().is_none()
            && auto_plans_fa3_tile(gpu.arch(), batch, o.fixed_kv_chunk.is_some());
        if !self.decode && (self.config.prefill_kernel == PrefillKernel::Fa3 || auto_fa3) {
            o.query_tile = Some(FA3_QUERY_TILE);
        }
        // In CUDA-graph mode a replan keeps the plan before's query tile and warps along the keys
        // (so, by induction, the first plan's instance): a captured run replays its kernel, and a
        // kernel of 16 rows given items of 64 would leave their other rows unwritten. A batch
        // that needs more items at that tile than the graph holds is refused (its capacity).
        let pinned = self.graph_tiles();
        if self.kind == KernelKind::Prefill {
            o.query_tile = o.query_tile.or(pinned.map(|(q, _)| q));
        }
        o.kv_warps = self.config.kv_warps.fixed().or(pinned.map(|(_, w)| w));
        o.narrow_kv_tile = self.config.kv_tile.narrow();
        o
    }

    /// In CUDA-graph mode, the query tile and warps along the keys of the plan before.
    fn graph_tiles(&self) -> Option<(u32, u32)> {
        self.config.graph?;
        let tiles = self.work.as_ref()?.tiles.as_ref()?;
        Some((tiles.cta_tile_q, tiles.instance.kv_warps.max(1)))
    }

    /// Whether this is a decode planned on the prefill template.
    fn decode_rows(&self) -> bool {
        self.decode && self.kind == KernelKind::Prefill
    }

    fn replan(&mut self, batch: Batch) -> Result<()> {
        batch.validate()?;
        if let Some(pinned) = &self.pinned {
            pinned.check(&batch)?;
        } else if self.dev.is_some() && batch.heads() != self.batch.heads() {
            return Err(Error::invalid(format!(
                "replan needs the heads of the first plan ({:?}), got {:?}",
                self.batch.heads(),
                batch.heads()
            )));
        }
        let Backend::Cuda(gpu) = self.backend.clone() else {
            self.batch = batch;
            return Ok(());
        };
        // Refuse unsupported head dims and archs at plan time, not at the first layer.
        let cfg = dispatch::config(gpu.arch(), self.kind, batch.heads().head_dim(), DType::Bf16)?;
        dispatch::check_supported(&cfg, gpu.arch())?;
        let opts = self.options(&gpu, &batch);
        let work = plan::plan(&batch, self.kind, &opts)?;
        let need = Sizes {
            plan: work.capacity(),
            batch: batch.batch(),
            kv_blocks: batch.kv().indices().len(),
        };
        let sizes = match (&self.config.graph, &self.dev) {
            (Some(_), Some(dev)) => {
                dev.sizes.check_graph(&need)?;
                dev.sizes
            }
            (Some(g), None) => {
                let cap = Capacity::for_graph(&opts, batch.heads().num_qo_heads(), g.qo_rows)?;
                let sizes = Sizes {
                    plan: cap,
                    batch: g.batch as usize,
                    kv_blocks: g.kv_blocks as usize,
                };
                sizes.check_graph(&need)?;
                sizes
            }
            (_, Some(dev)) if dev.sizes.holds(&need) => dev.sizes,
            _ => need,
        };
        if self.dev.as_ref().is_none_or(|d| !d.sizes.holds(&sizes)) {
            // Not in graph mode (its first allocation holds every later batch, checked above).
            self.dev = Some(allocate(&gpu, &opts, sizes, &batch.heads())?);
        }
        let dev = self.dev.as_mut().expect("allocated above");
        let r = dev.regions;
        work.write(&mut dev.staging[..r.qo_indptr])?;
        put_i32(&mut dev.staging, r.qo_indptr, batch.qo_indptr());
        put_i32(&mut dev.staging, r.kv_indptr, batch.kv().indptr());
        put_i32(&mut dev.staging, r.kv_indices, batch.kv().indices());
        put_i32(&mut dev.staging, r.kv_last_len, batch.kv().last_len());
        plan::write_key_positions(&mut dev.staging, r.kv_positions, batch.kv())?;
        // The one host-to-device copy of the plan, on the backend's stream (refused inside a
        // capture: a graph cannot hold a copy from pageable memory).
        gpu.write(&mut dev.ws, &dev.staging)?;
        self.work = Some(work);
        self.batch = batch;
        Ok(())
    }

    fn run<V: Variant, T: Element>(
        &self,
        variant: &V,
        q: &dyn Src<T>,
        k: &dyn Src<T>,
        v: &dyn Src<T>,
        o: &mut dyn Dst<T>,
        lse: Option<&mut dyn Dst<f32>>,
    ) -> Result<()> {
        let b = &self.batch;
        // A graph's buffers hold its capacity, so that every replanned batch fits them.
        let rows = match &self.config.graph {
            Some(g) => g.qo_rows as usize,
            None => b.total_qo(),
        };
        b.check_rows(rows, q.len(), k.len(), v.len(), Some(o.len()))?;
        // A parameter array shorter than the heads (or requests) a hook indexes it by would trap
        // the CUDA context.
        params::check_coverage(variant, b)?;
        if let Some(l) = &lse {
            if !V::SPEC.softmax {
                return Err(Error::unsupported(format!(
                    "variant {} has no softmax, so it has no log-sum-exp to return",
                    V::SPEC.name
                )));
            }
            let want = rows * b.heads().num_qo_heads() as usize;
            if l.len() != want {
                return Err(Error::invalid(format!(
                    "lse has {} elements; [rows={rows}, num_qo_heads={}] needs {want}",
                    l.len(),
                    b.heads().num_qo_heads(),
                )));
            }
        }
        match (&self.backend, &self.dev, &self.work) {
            (Backend::Cuda(gpu), Some(dev), Some(work)) => {
                self.run_gpu(gpu, dev, work, variant, q, k, v, o, lse)
            }
            _ => self.run_cpu(variant, q, k, v, o, lse),
        }
    }

    fn run_cpu<V: Variant, T: Element>(
        &self,
        variant: &V,
        q: &dyn Src<T>,
        k: &dyn Src<T>,
        v: &dyn Src<T>,
        o: &mut dyn Dst<T>,
        lse: Option<&mut dyn Dst<f32>>,
    ) -> Result<()> {
        let b = &self.batch;
        let r = reference::attention_typed(variant, b, q.host()?, k.host()?, v.host()?)?;
        let (hq, d) = (
            b.heads().num_qo_heads() as usize,
            b.heads().head_dim() as usize,
        );
        let (os, out) = (b.o_strides(), o.host_mut()?);
        // `run` checked o against the strides (Batch::check_rows): every row and head fits.
        for (i, row) in r.o.chunks(d).enumerate() {
            let at = os.at(i / hq, i % hq);
            for (dst, x) in out[at..at + d].iter_mut().zip(row) {
                *dst = T::from_f32(*x as f32);
            }
        }
        if let Some(l) = lse {
            for (dst, x) in l.host_mut()?.iter_mut().zip(&r.lse) {
                *dst = *x as f32;
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn run_gpu<V: Variant, T: Element>(
        &self,
        gpu: &Gpu,
        dev: &DeviceState,
        work: &WorkList,
        variant: &V,
        q: &dyn Src<T>,
        k: &dyn Src<T>,
        v: &dyn Src<T>,
        o: &mut dyn Dst<T>,
        lse: Option<&mut dyn Dst<f32>>,
    ) -> Result<()> {
        let b = &self.batch;
        let graph = self.config.graph.is_some();
        if b.total_qo() == 0 && !graph {
            return Ok(());
        }
        let tiles = work
            .tiles
            .as_ref()
            .ok_or_else(|| Error::invalid("the work list holds no tile choice"))?;
        let heads = b.heads();
        let base = dispatch::config(gpu.arch(), self.kind, heads.head_dim(), T::DTYPE)?;
        let (cfg, fallbacks) = if self.decode {
            let fallback = tiles.fallback_config(base);
            (tiles.config(base), fallback.into_iter().collect())
        } else {
            let kernel = self.config.prefill_kernel;
            let fixed = self.config.fixed_kv_chunk.is_some() || graph;
            kernel.choose(
                V::SPEC,
                tiles.config(base),
                tiles.fallback_config(base),
                b.sm_scale(),
                long_prompts(b, self.config.kv_tile, fixed),
            )?
        };
        let s = b.kv().strides(&heads);
        let (qs, os) = (b.q_strides(), b.o_strides());
        let kv_elements = k.len().min(v.len()) as u64;
        let q_elements = q.len() as u64;
        let (q, k, v, o) = (
            q.device_ptr(gpu)?,
            k.device_ptr(gpu)?,
            v.device_ptr(gpu)?,
            o.device_ptr(gpu)?,
        );
        check_vector_alignment(
            [("q", q), ("k", k), ("v", v), ("o", o)],
            [
                ("q row", qs.row()),
                ("q head", qs.head()),
                ("o row", os.row()),
                ("o head", os.head()),
                ("KV block", s.block),
                ("KV token", s.token),
                ("KV head", s.head),
            ],
        )?;
        let ws = gpu.device_ptr(&dev.ws);
        let r = dev.regions;
        let args = AttnArgs {
            q,
            k,
            v,
            o,
            lse: match &lse {
                Some(l) => l.device_ptr(gpu)?,
                None => 0,
            },
            qo_indptr: ws + r.qo_indptr as u64,
            kv_indptr: ws + r.kv_indptr as u64,
            kv_indices: ws + r.kv_indices as u64,
            kv_last_len: ws + r.kv_last_len as u64,
            work: ws,
            partial_o: gpu.device_ptr(&dev.partial_o),
            partial_lse: gpu.device_ptr(&dev.partial_lse),
            q_stride_n: qs.row(),
            q_stride_h: qs.head(),
            o_stride_n: os.row(),
            o_stride_h: os.head(),
            kv_stride_block: s.block,
            kv_stride_n: s.token,
            kv_stride_h: s.head,
            batch: b.batch() as u32,
            total_qo: b.total_qo() as u32,
            num_qo_heads: heads.num_qo_heads(),
            num_kv_heads: heads.num_kv_heads(),
            block_size: b.kv().page_size().unwrap_or(0),
            causal: u32::from(b.causal()),
            sm_scale: b.sm_scale(),
            num_items: work.padded_len,
            num_sms: gpu.sm_count(),
        };
        // The FA3 form takes TMA maps of the cache and of Q (or none: those tiles by cp.async),
        // and its consumers' loop follows the cache's.
        let maps_for = |cfg: &KernelConfig| {
            let kv_shape = tma::shape(
                b.kv().page_size(),
                s,
                heads.num_kv_heads(),
                heads.head_dim(),
                kv_elements,
                cfg.kv_tile,
            );
            let q_shape = tma::q_shape(
                qs.row(),
                qs.head(),
                heads.num_qo_heads(),
                heads.group_size(),
                heads.head_dim(),
                q_elements,
                cfg.cta_tile_q,
            );
            tma::sm90_maps(k, v, kv_shape, q, q_shape, T::DTYPE)
        };
        let maps = takes_sm90_maps(&cfg).then(|| maps_for(&cfg));
        let lp = maps.map_or(Sm90Loop::Default, |m| tma::sm90_loop(heads.head_dim(), &m));
        let kernel = dispatch::kernel(gpu, V::SPEC, &cfg, lp, &fallbacks)?;
        // A fallback has its own maps: none for FA2, boxes of its K/V tile for FA3.
        let maps = if kernel.cfg == cfg {
            maps
        } else {
            takes_sm90_maps(&kernel.cfg).then(|| maps_for(&kernel.cfg))
        };
        let cfg = kernel.cfg;
        let param_bytes = params::pack(variant, Some(gpu))?;
        let dims = ferrinfer_kernels::launch_dims(&cfg, &args);
        // The main kernel writes the scratch partials the merge reads: no other run of this plan
        // may queue between them.
        let _launching = self.launch.lock().unwrap_or_else(|p| p.into_inner());
        // SAFETY: q, k, v, o and lse are live buffers on this GPU whose lengths `run` checked
        // against the batch (Batch::check_rows; a graph's against its capacity), and the batch
        // passed Batch::validate in replan; the index arrays, work list and partials are this
        // plan's workspace and scratch, sized by its capacity (Sizes::holds). All of them outlive
        // the launch: the caller holds the buffers, the plan its scratch (a GraphRun owns both),
        // and all work is ordered on the backend's one stream (Buffer::device_ptr refuses a
        // buffer of another stream). The TMA maps' rows end within K's, V's and Q's buffers
        // (tma::shape and tma::q_shape bound them by their lengths).
        unsafe {
            match maps {
                Some(maps) => {
                    launch::launch_sm90(gpu, &kernel.main, dims, args, &param_bytes, maps)
                }
                None => launch::launch(gpu, &kernel.main, dims, args, &param_bytes),
            }
        }?;
        // In graph mode the merge always runs: a later replan may split what this one did not.
        if work.is_split() || graph {
            let dims = ferrinfer_kernels::merge_launch_dims(&cfg, &args, dev.sizes.plan.qo_rows);
            // SAFETY: as for the main launch, with the same arguments; the main kernel, just
            // queued, is the one before it on the stream.
            unsafe { launch::launch_merge(gpu, &kernel.merge, dims, args, &param_bytes) }?;
        }
        Ok(())
    }
}

/// The attention kernels move q, K, V and o in 16-byte vectors (`cp.async` in the prefill
/// template): every address must be 16-byte aligned and every stride a multiple of 8 elements.
/// Refused here, so that no view or stride reaches a kernel as a misaligned access.
fn check_vector_alignment(ptrs: [(&str, u64); 4], strides: [(&str, u64); 7]) -> Result<()> {
    for (name, p) in ptrs {
        if !p.is_multiple_of(16) {
            return Err(Error::invalid(format!(
                "{name} starts at device address {p:#x}; the attention kernels load 16-byte \
                 vectors and need it 16-byte aligned (a view's offset a multiple of 8 elements)"
            )));
        }
    }
    for (name, st) in strides {
        if !st.is_multiple_of(8) {
            return Err(Error::invalid(format!(
                "the {name} stride is {st} elements; the attention kernels load 16-byte vectors \
                 and need strides that are multiples of 8 elements"
            )));
        }
    }
    Ok(())
}

fn allocate(gpu: &Gpu, opts: &PlanOptions, sizes: Sizes, heads: &Heads) -> Result<DeviceState> {
    let regions = sizes.regions(opts);
    let rows = sizes.plan.partial_rows as usize * heads.num_qo_heads() as usize;
    Ok(DeviceState {
        sizes,
        regions,
        staging: vec![0; regions.bytes],
        ws: gpu.zeros::<u8>(regions.bytes)?,
        partial_o: gpu.zeros::<f32>(rows * heads.head_dim() as usize)?,
        partial_lse: gpu.zeros::<f32>(rows)?,
        _stream: gpu.keep_alive(),
    })
}

fn put_i32(buf: &mut [u8], at: usize, xs: &[i32]) {
    for (i, x) in xs.iter().enumerate() {
        buf[at + 4 * i..at + 4 * i + 4].copy_from_slice(&x.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::variant::Hooks;
    use ferrinfer_kernels::InstanceTiles;

    /// A scale the FA3 build takes (head dim 128's default).
    const SCALE: f32 = 0.088;

    fn spec(with_key: bool) -> VariantSpec {
        VariantSpec {
            name: if with_key { "WithKey" } else { "Plain" },
            module_path: "tests",
            hooks: Hooks {
                query: with_key,
                key: with_key,
                logits: false,
                mask: false,
                output: false,
                sink: false,
            },
            softmax: true,
            params: &[],
            cuda: "",
        }
    }

    fn planned(arch: ArchClass, cta_tile_q: u32) -> KernelConfig {
        KernelConfig::new(KernelKind::Prefill, 128, DType::Bf16, arch).with_tiles(InstanceTiles {
            cta_tile_q,
            kv_tile: 64,
            kv_warps: 0,
        })
    }

    /// Head dim 256 on Hopper under Auto: the 128-row tile (and so FA3) for the batches that take
    /// it at 128, nowhere else.
    #[test]
    fn auto_plans_the_fa3_tile_at_head_dim_256_on_hopper() {
        use crate::attention::batch::KvLayout;
        let batch = |head_dim: u32, qo: &[i32]| {
            let kv = KvIndex::ragged(&[0, 4096, 8192], KvLayout::Nhd).unwrap();
            Batch::new(Heads::new(16, 8, head_dim).unwrap(), qo, kv).unwrap()
        };
        let hopper = Arch::new(9, 0);
        let plans = |arch, b: &Batch| auto_plans_fa3_tile(arch, b, false);
        // Group 2: 33 query rows a request are 66 packed rows, over 64; 32 are not.
        assert!(plans(hopper, &batch(256, &[0, 33, 66])));
        assert!(!plans(hopper, &batch(256, &[0, 32, 64])));
        // An empty request does not count against the others.
        assert!(plans(hopper, &batch(256, &[0, 0, 4096])));
        assert!(!plans(hopper, &batch(128, &[0, 4096, 8192])));
        assert!(!plans(Arch::new(8, 0), &batch(256, &[0, 4096, 8192])));
        assert!(!plans(Arch::new(10, 0), &batch(256, &[0, 4096, 8192])));
        // Batch-invariant: the 128-row tile whatever the batch, short requests too, and only
        // where it has an FA3 form.
        for qo in [&[0, 32, 64][..], &[0, 1, 2], &[0, 4096, 8192]] {
            assert!(auto_plans_fa3_tile(hopper, &batch(256, qo), true), "{qo:?}");
            assert!(!auto_plans_fa3_tile(Arch::new(8, 0), &batch(256, qo), true));
            assert!(!auto_plans_fa3_tile(hopper, &batch(128, qo), true));
        }
    }

    /// The long prompts' FA3 tile: contiguous or ragged caches whose requests with query rows
    /// all hold at least FA3_LONG_TILE_MIN_KV keys, outside batch-invariant and graph modes.
    #[test]
    fn long_prompts_take_the_wide_fa3_tile_over_ragged_caches_only() {
        use crate::attention::batch::KvLayout;
        let min = FA3_LONG_TILE_MIN_KV as i32;
        let ragged = |kv: &[i32], qo: &[i32]| {
            let kv = KvIndex::ragged(kv, KvLayout::Nhd).unwrap();
            Batch::new(Heads::new(32, 8, 128).unwrap(), qo, kv).unwrap()
        };
        let auto = |b: &Batch, fixed| long_prompts(b, KvTile::Auto, fixed);
        let both = ragged(&[0, min, 3 * min], &[0, 16, 32]);
        assert!(auto(&both, false));
        assert!(!auto(&both, true), "batch-invariant or graph mode");
        // One short request keeps the 128-key tile; one without query rows does not count.
        let short = ragged(&[0, min - 16, 3 * min], &[0, 16, 32]);
        assert!(!auto(&short, false));
        assert!(auto(&ragged(&[0, 16, 16 + min], &[0, 0, 32]), false));
        // Fixed by the caller, in every mode.
        for fixed in [false, true] {
            assert!(long_prompts(&short, KvTile::Long, fixed));
            assert!(!long_prompts(&both, KvTile::Default, fixed));
            assert!(!long_prompts(&both, KvTile::Narrow, fixed));
        }
        // A paged cache, however long: its page copies would not align with 176 keys.
        let pages: Vec<i32> = (0..8).collect();
        let kv = KvIndex::paged_from_lens(1024, &[8192], &pages, 8, KvLayout::Nhd).unwrap();
        let paged = Batch::new(Heads::new(32, 8, 128).unwrap(), &[0, 128], kv).unwrap();
        for kv_tile in [KvTile::Auto, KvTile::Long] {
            assert!(!long_prompts(&paged, kv_tile, false));
        }
    }

    #[test]
    fn long_prompts_run_the_176_key_tile_before_the_128_key_one_and_fa2() {
        let planned = planned(ArchClass::Sm90a, 128);
        for kernel in [PrefillKernel::Auto, PrefillKernel::Fa3] {
            let (cfg, fallbacks) = kernel
                .choose(&spec(false), planned, None, SCALE, true)
                .unwrap();
            assert_eq!(cfg.name(), "prefill_hd128_bf16_q128_k176_sm90a");
            let names: Vec<String> = fallbacks.iter().map(|c| c.name()).collect();
            assert_eq!(
                names,
                ["prefill_hd128_bf16_q128_k128_sm90a", &planned.name()],
                "{kernel:?}"
            );
        }
        // No long form at head dims 64 and 256, nor for FA2 or a scale FA3 refuses; with a key
        // hook, the 128-key tile alone.
        let hd64 = KernelConfig::new(KernelKind::Prefill, 64, DType::Bf16, ArchClass::Sm90a)
            .with_tiles(InstanceTiles {
                cta_tile_q: 128,
                kv_tile: 0,
                kv_warps: 0,
            });
        let (cfg, _) = PrefillKernel::Auto
            .choose(&spec(false), hd64, None, SCALE, true)
            .unwrap();
        assert_eq!(cfg.kv_tile, 128);
        for kernel in [PrefillKernel::Auto, PrefillKernel::Fa3] {
            let (cfg, fallbacks) = kernel
                .choose(&spec(true), planned, None, SCALE, true)
                .unwrap();
            assert_eq!(cfg.name(), "prefill_hd128_bf16_q128_k128_sm90a");
            assert_eq!(fallbacks, [planned], "{kernel:?}");
        }
        for (kernel, s, scale) in [
            (PrefillKernel::Fa2, spec(false), SCALE),
            (PrefillKernel::Auto, spec(false), 0.0),
        ] {
            let (cfg, _) = kernel.choose(&s, planned, None, scale, true).unwrap();
            assert_eq!(cfg, planned, "{kernel:?} {scale}");
        }
    }

    #[test]
    fn fa3_runs_where_it_exists_and_auto_follows_the_measurements() {
        let long = planned(ArchClass::Sm90a, 128);
        let narrow = Some(long.with_tiles(InstanceTiles {
            cta_tile_q: 128,
            kv_tile: 0,
            kv_warps: 0,
        }));
        let (cfg, fallback) = PrefillKernel::Fa3
            .choose(&spec(false), long, narrow, SCALE, false)
            .unwrap();
        assert_eq!(cfg.name(), "prefill_hd128_bf16_q128_k128_sm90a");
        assert_eq!(
            fallback,
            [long],
            "a spilling FA3 build falls back to the planned FA2"
        );
        let auto = PrefillKernel::Auto
            .choose(&spec(false), long, narrow, SCALE, false)
            .unwrap();
        assert_eq!(auto.0.kv_tile, 128, "Auto takes FA3 at head dim 128");
        // Query and key hooks run there too.
        let hooks = PrefillKernel::Auto
            .choose(&spec(true), long, narrow, SCALE, false)
            .unwrap();
        assert_eq!(hooks, auto);
        // Another tile, another arch, or FA2 asked for: the planned instance.
        for (kernel, s, c) in [
            (
                PrefillKernel::Auto,
                spec(false),
                planned(ArchClass::Sm90a, 64),
            ),
            (
                PrefillKernel::Auto,
                spec(false),
                planned(ArchClass::Sm80, 128),
            ),
            (PrefillKernel::Fa2, spec(false), long),
        ] {
            let fa2 = (c, narrow.into_iter().collect());
            assert_eq!(kernel.choose(&s, c, narrow, SCALE, false).unwrap(), fa2);
        }
    }

    #[test]
    fn a_scale_of_zero_or_below_runs_fa2_forced_or_not() {
        let long = planned(ArchClass::Sm90a, 128);
        for kernel in [PrefillKernel::Auto, PrefillKernel::Fa3] {
            for scale in [0.0, -0.0, -0.5, f32::MIN_POSITIVE] {
                let (cfg, _) = kernel
                    .choose(&spec(false), long, None, scale, false)
                    .unwrap();
                assert_eq!(cfg == long, scale <= 0.0, "{kernel:?} at sm_scale {scale}");
            }
        }
        // Where FA3 would be an error, it still is.
        let e = PrefillKernel::Fa3
            .choose(
                &spec(false),
                planned(ArchClass::Sm80, 128),
                None,
                0.0,
                false,
            )
            .unwrap_err();
        assert!(e.to_string().contains("sm_90a"), "{e}");
    }

    #[test]
    fn fa3_forced_where_it_does_not_exist_is_an_error() {
        let long = planned(ArchClass::Sm90a, 128);
        let e = PrefillKernel::Fa3
            .choose(
                &spec(false),
                planned(ArchClass::Sm80, 128),
                None,
                SCALE,
                false,
            )
            .unwrap_err();
        assert!(e.to_string().contains("sm_90a"), "{e}");
        let (cfg, _) = PrefillKernel::Fa3
            .choose(&spec(false), long, None, SCALE, false)
            .unwrap();
        assert_eq!(cfg.kv_tile, 128);
    }

    #[test]
    fn fa3_exists_at_head_dims_64_and_256_and_auto_takes_it_where_the_plan_allows() {
        for (hd, name) in [
            (64, "prefill_hd64_bf16_q128_k128_sm90a"),
            (256, "prefill_hd256_bf16_q128_k64_sm90a"),
        ] {
            let planned = KernelConfig::new(KernelKind::Prefill, hd, DType::Bf16, ArchClass::Sm90a)
                .with_tiles(InstanceTiles {
                    cta_tile_q: FA3_QUERY_TILE,
                    kv_tile: 0,
                    kv_warps: 0,
                });
            let (cfg, fallback) = PrefillKernel::Fa3
                .choose(&spec(false), planned, None, SCALE, false)
                .unwrap();
            assert_eq!((cfg.name().as_str(), fallback), (name, vec![planned]));
            // Auto takes FA3 at both (measured faster) where the plan has the 128-row tile.
            let auto = PrefillKernel::Auto
                .choose(&spec(false), planned, None, SCALE, false)
                .unwrap();
            assert_eq!(auto, (cfg, vec![planned]), "head dim {hd}");
            // The tile FA2 plans at head dim 256 (64 rows) has no FA3 form.
            let short = planned.with_tiles(InstanceTiles {
                cta_tile_q: 64,
                kv_tile: 0,
                kv_warps: 0,
            });
            let e = PrefillKernel::Fa3
                .choose(&spec(false), short, None, SCALE, false)
                .unwrap_err();
            assert!(e.to_string().contains("head dim 64, 128 or 256"), "{e}");
        }
    }
}
