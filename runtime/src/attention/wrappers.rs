//! The calls a serving engine makes every step: `plan` once per batch composition (on the CPU: it
//! validates the batch, schedules the work list and copies it and the page table to the device in
//! one copy), then `run` for every layer with any variant (no host synchronisation, no allocation,
//! so it can be captured in a CUDA graph).

use cudarc::driver::CudaSlice;
use ferrinfer_kernels::abi::AttnArgs;
use ferrinfer_kernels::{DType, KernelKind};

use crate::attention::batch::{Batch, Heads, KvIndex};
use crate::attention::plan::{self, Capacity, PlanOptions, WorkList};
use crate::attention::{dispatch, reference};
use crate::device::backend::{Backend, Buffer};
use crate::device::dtype::Element;
use crate::device::gpu::Gpu;
use crate::error::{Error, Result};
use crate::variant::Variant;
use crate::variant::params;

/// How to plan.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PlanConfig {
    /// Batch-invariant mode: split every request's KV into chunks of exactly this many tokens (a
    /// multiple of 16), so a request's result is the same bit for bit whatever it is batched with.
    pub fixed_kv_chunk: Option<u32>,
    /// CUDA-graph mode: buffers sized once for these bounds; every later `replan` reuses them, so a
    /// captured `run` stays valid.
    pub graph: Option<GraphCapacity>,
    /// Which kernel runs [`BatchDecode`] (ignored by [`BatchPrefill`]).
    pub decode_kernel: DecodeKernel,
}

/// The kernel template of a batch decode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DecodeKernel {
    /// Tensor cores when at least [`TENSOR_CORE_MIN_GROUP`] query heads share each KV head, CUDA
    /// cores otherwise.
    #[default]
    Auto,
    /// The decode template: CUDA-core dot products, the query heads of a KV head sharing its loads.
    CudaCores,
    /// The prefill template: each request's query heads packed as the rows of 16-row MMA tiles, so
    /// that K and V are read once per KV head and the arithmetic runs on tensor cores.
    TensorCores,
}

/// Group size from which [`DecodeKernel::Auto`] takes tensor cores. At group 4 (H200, bf16,
/// hd128, 64 x 4096 tokens) they stream K/V at 4297 GB/s against 2442 for the CUDA-core kernel,
/// which is bound by instruction issue; below 4 the MMA tile is mostly padding.
pub const TENSOR_CORE_MIN_GROUP: u32 = 4;

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

/// Bounds of every batch a CUDA-graph plan will hold.
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
        q: &Buffer<T>,
        k: &Buffer<T>,
        v: &Buffer<T>,
        o: &mut Buffer<T>,
        lse: Option<&mut Buffer<f32>>,
    ) -> Result<()> {
        self.planned.run(variant, q, k, v, o, lse)
    }
    pub fn batch(&self) -> &Batch {
        &self.planned.batch
    }
    /// The scheduled work list (GPU backends only).
    pub fn work_list(&self) -> Option<&WorkList> {
        self.planned.work.as_ref()
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
    /// Plan another decode step into the same buffers (see [`BatchPrefill::replan`]).
    pub fn replan(&mut self, kv: KvIndex, sm_scale: Option<f32>) -> Result<()> {
        let batch = decode_batch(self.planned.batch.heads, kv, sm_scale)?;
        self.planned.replan(batch)
    }
    /// See [`BatchPrefill::run`].
    pub fn run<V: Variant, T: Element>(
        &self,
        variant: &V,
        q: &Buffer<T>,
        k: &Buffer<T>,
        v: &Buffer<T>,
        o: &mut Buffer<T>,
        lse: Option<&mut Buffer<f32>>,
    ) -> Result<()> {
        self.planned.run(variant, q, k, v, o, lse)
    }
    pub fn batch(&self) -> &Batch {
        &self.planned.batch
    }
    /// The scheduled work list (GPU backends only).
    pub fn work_list(&self) -> Option<&WorkList> {
        self.planned.work.as_ref()
    }
}

fn decode_batch(heads: Heads, kv: KvIndex, sm_scale: Option<f32>) -> Result<Batch> {
    let mut batch = Batch::decode(heads, kv)?;
    if let Some(s) = sm_scale {
        batch.sm_scale = s;
    }
    Ok(batch)
}

/// Byte offsets of the arrays in the device workspace: the plan's own layout first, then the index
/// arrays of the batch, each region sized by the capacity so that it never moves.
#[derive(Clone, Copy, Debug)]
struct Regions {
    qo_indptr: usize,
    kv_indptr: usize,
    kv_indices: usize,
    kv_last_len: usize,
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
        let bytes = align(kv_last_len + 4 * self.batch.max(1));
        Regions {
            qo_indptr,
            kv_indptr,
            kv_indices,
            kv_last_len,
            bytes,
        }
    }
    fn holds(&self, need: &Sizes) -> bool {
        self.plan.items >= need.plan.items
            && self.plan.qo_rows >= need.plan.qo_rows
            && self.plan.partial_rows >= need.plan.partial_rows
            && self.batch >= need.batch
            && self.kv_blocks >= need.kv_blocks
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
}

/// What both wrappers share: the validated batch, its work list, and its device buffers.
struct Planned {
    backend: Backend,
    kind: KernelKind,
    /// A batch decode (on either template).
    decode: bool,
    config: PlanConfig,
    batch: Batch,
    work: Option<WorkList>,
    dev: Option<DeviceState>,
}

impl Planned {
    fn new(
        backend: &Backend,
        batch: Batch,
        kind: KernelKind,
        decode: bool,
        config: PlanConfig,
    ) -> Result<Self> {
        let mut p = Planned {
            backend: backend.clone(),
            kind,
            decode,
            config,
            batch,
            work: None,
            dev: None,
        };
        let batch = p.batch.clone();
        p.replan(batch)?;
        Ok(p)
    }

    fn options(&self, gpu: &Gpu) -> PlanOptions {
        let mut o = PlanOptions::for_device(gpu.sm_count(), gpu.sm_resources());
        o.fixed_kv_chunk = self.config.fixed_kv_chunk;
        o.graph_capacity = self.config.graph.map(|g| g.work_items);
        // A decode on the prefill template: the family's tile function sizes the tile by the group.
        o.one_row_per_request = self.decode_rows();
        o
    }

    /// Whether this is a decode planned on the prefill template.
    fn decode_rows(&self) -> bool {
        self.decode && self.kind == KernelKind::Prefill
    }

    fn replan(&mut self, batch: Batch) -> Result<()> {
        batch.heads.validate()?;
        if batch.qo_indptr.len() != batch.kv.indptr.len() {
            return Err(Error::invalid(
                "qo_indptr and the KV index describe different batches",
            ));
        }
        if self.dev.is_some() && batch.heads != self.batch.heads {
            return Err(Error::invalid(
                "replan needs the same heads as the first plan",
            ));
        }
        if u32::try_from(batch.total_qo()).is_err() || batch.kv.capacity == u32::MAX {
            return Err(Error::invalid("batch too large for 32-bit row indices"));
        }
        let Backend::Cuda(gpu) = self.backend.clone() else {
            self.batch = batch;
            return Ok(());
        };
        // Refuse unsupported head dims and archs at plan time, not at the first layer.
        let cfg = dispatch::config(gpu.arch(), self.kind, batch.heads.head_dim, DType::Bf16)?;
        dispatch::check_supported(&cfg, gpu.arch())?;
        let opts = self.options(&gpu);
        let work = plan::plan(&batch, self.kind, &opts)?;
        let need = Sizes {
            plan: work.capacity(),
            batch: batch.batch(),
            kv_blocks: batch.kv.indices.len(),
        };
        let sizes = match (&self.config.graph, &self.dev) {
            (Some(_), Some(dev)) if !dev.sizes.holds(&need) => {
                return Err(Error::invalid(format!(
                    "the batch needs {need:?} but the CUDA-graph plan was sized for {:?}",
                    dev.sizes
                )));
            }
            (Some(g), None) => {
                let cap = Capacity::for_graph(&opts, batch.heads.num_qo_heads, g.qo_rows)?;
                let sizes = Sizes {
                    plan: cap,
                    batch: g.batch as usize,
                    kv_blocks: g.kv_blocks as usize,
                };
                if !sizes.holds(&need) {
                    return Err(Error::invalid(format!(
                        "the batch needs {need:?} but the graph capacity is {sizes:?}"
                    )));
                }
                sizes
            }
            (_, Some(dev)) if dev.sizes.holds(&need) => dev.sizes,
            _ => need,
        };
        if self.dev.as_ref().is_none_or(|d| !d.sizes.holds(&sizes)) {
            self.dev = Some(allocate(&gpu, &opts, sizes, &batch.heads)?);
        }
        let dev = self.dev.as_mut().expect("allocated above");
        let r = dev.regions;
        work.write(&mut dev.staging[..r.qo_indptr])?;
        put_i32(&mut dev.staging, r.qo_indptr, &batch.qo_indptr);
        put_i32(&mut dev.staging, r.kv_indptr, &batch.kv.indptr);
        put_i32(&mut dev.staging, r.kv_indices, &batch.kv.indices);
        put_i32(&mut dev.staging, r.kv_last_len, &batch.kv.last_len);
        // The one host-to-device copy of the plan.
        gpu.stream().memcpy_htod(&dev.staging, &mut dev.ws)?;
        self.work = Some(work);
        self.batch = batch;
        Ok(())
    }

    fn run<V: Variant, T: Element>(
        &self,
        variant: &V,
        q: &Buffer<T>,
        k: &Buffer<T>,
        v: &Buffer<T>,
        o: &mut Buffer<T>,
        lse: Option<&mut Buffer<f32>>,
    ) -> Result<()> {
        let b = &self.batch;
        b.check_lengths(q.len(), k.len(), v.len(), o.len())?;
        if let Some(l) = &lse {
            if !V::SPEC.softmax {
                return Err(Error::unsupported(format!(
                    "variant {} has no softmax, so it has no log-sum-exp to return",
                    V::SPEC.name
                )));
            }
            if l.len() != b.lse_len() {
                return Err(Error::invalid(format!(
                    "lse has {} elements; [total_qo={}, num_qo_heads={}] needs {}",
                    l.len(),
                    b.total_qo(),
                    b.heads.num_qo_heads,
                    b.lse_len()
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
        q: &Buffer<T>,
        k: &Buffer<T>,
        v: &Buffer<T>,
        o: &mut Buffer<T>,
        lse: Option<&mut Buffer<f32>>,
    ) -> Result<()> {
        let r = reference::attention_typed(variant, &self.batch, q.host()?, k.host()?, v.host()?)?;
        for (dst, x) in o.host_mut()?.iter_mut().zip(&r.o) {
            *dst = T::from_f32(*x as f32);
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
        q: &Buffer<T>,
        k: &Buffer<T>,
        v: &Buffer<T>,
        o: &mut Buffer<T>,
        lse: Option<&mut Buffer<f32>>,
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
        let base = dispatch::config(gpu.arch(), self.kind, b.heads.head_dim, T::DTYPE)?;
        let fallback = tiles.fallback_config(base);
        let kernel = dispatch::kernel(gpu, V::SPEC, &tiles.config(base), fallback.as_ref())?;
        let cfg = kernel.cfg;
        let (hq, d) = (u64::from(b.heads.num_qo_heads), u64::from(b.heads.head_dim));
        let s = b.kv.strides(&b.heads);
        let ws = gpu.device_ptr(&dev.ws);
        let r = dev.regions;
        let args = AttnArgs {
            q: q.device_ptr(gpu)?,
            k: k.device_ptr(gpu)?,
            v: v.device_ptr(gpu)?,
            o: o.device_ptr(gpu)?,
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
            q_stride_n: hq * d,
            q_stride_h: d,
            o_stride_n: hq * d,
            o_stride_h: d,
            kv_stride_block: s.block,
            kv_stride_n: s.token,
            kv_stride_h: s.head,
            batch: b.batch() as u32,
            total_qo: b.total_qo() as u32,
            num_qo_heads: b.heads.num_qo_heads,
            num_kv_heads: b.heads.num_kv_heads,
            block_size: b.kv.page_size.unwrap_or(0),
            causal: u32::from(b.causal),
            sm_scale: b.sm_scale,
            num_items: work.padded_len,
        };
        let param_bytes = params::pack(variant, Some(gpu))?;
        let dims = ferrinfer_kernels::launch_dims(&cfg, &args);
        gpu.launch_attention(&kernel.main, dims, args, &param_bytes)?;
        // In graph mode the merge always runs: a later replan may split what this one did not.
        if work.is_split() || graph {
            let dims = ferrinfer_kernels::merge_launch_dims(&cfg, &args, dev.sizes.plan.qo_rows);
            gpu.launch_attention(&kernel.merge, dims, args, &param_bytes)?;
        }
        Ok(())
    }
}

fn allocate(gpu: &Gpu, opts: &PlanOptions, sizes: Sizes, heads: &Heads) -> Result<DeviceState> {
    let regions = sizes.regions(opts);
    let rows = sizes.plan.partial_rows as usize * heads.num_qo_heads as usize;
    let stream = gpu.stream();
    Ok(DeviceState {
        sizes,
        regions,
        staging: vec![0; regions.bytes],
        ws: stream.alloc_zeros::<u8>(regions.bytes)?,
        partial_o: stream.alloc_zeros::<f32>((rows * heads.head_dim as usize).max(1))?,
        partial_lse: stream.alloc_zeros::<f32>(rows.max(1))?,
    })
}

fn put_i32(buf: &mut [u8], at: usize, xs: &[i32]) {
    for (i, x) in xs.iter().enumerate() {
        buf[at + 4 * i..at + 4 * i + 4].copy_from_slice(&x.to_le_bytes());
    }
}
