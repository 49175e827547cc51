//! The calls a serving engine makes every step: `plan` once per batch composition (on the CPU:
//! validate, upload the index arrays once), then `run` for every layer with any variant.

use cudarc::driver::CudaSlice;
use ferrinfer_kernels::abi::AttnArgs;
use ferrinfer_kernels::{KernelConfig, KernelKind};

use crate::backend::{Backend, Buffer};
use crate::batch::{Batch, Heads, KvIndex};
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::variant::Variant;
use crate::{dispatch, params, reference};

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
        Ok(BatchPrefill {
            planned: Planned::new(backend, batch, KernelKind::Prefill)?,
        })
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
}

/// Batch decode: one query row per request, over a paged (or ragged) KV cache.
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
        let mut batch = Batch::decode(heads, kv)?;
        if let Some(s) = sm_scale {
            batch.sm_scale = s;
        }
        Ok(BatchDecode {
            planned: Planned::new(backend, batch, KernelKind::Decode)?,
        })
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
}

/// The index arrays of a batch, on the device.
struct DeviceIndex {
    qo_indptr: CudaSlice<i32>,
    kv_indptr: CudaSlice<i32>,
    kv_indices: CudaSlice<i32>,
    kv_last_len: CudaSlice<i32>,
}

/// What both wrappers share: the validated batch, and its index arrays on the GPU.
struct Planned {
    backend: Backend,
    batch: Batch,
    kind: KernelKind,
    index: Option<DeviceIndex>,
}

impl Planned {
    fn new(backend: &Backend, batch: Batch, kind: KernelKind) -> Result<Self> {
        batch.heads.validate()?;
        if batch.qo_indptr.len() != batch.kv.indptr.len() {
            return Err(Error::invalid(
                "qo_indptr and the KV index describe different batches",
            ));
        }
        if u32::try_from(batch.total_qo()).is_err() || batch.kv.capacity == u32::MAX {
            return Err(Error::invalid("batch too large for 32-bit row indices"));
        }
        let index = match backend {
            Backend::Cpu => None,
            Backend::Cuda(gpu) => {
                // Refuse unsupported head dims and archs at plan time, not at the first layer.
                let cfg = KernelConfig {
                    kind,
                    head_dim: batch.heads.head_dim,
                    dtype: ferrinfer_kernels::DType::Bf16,
                    cta_tile_q: 0,
                };
                dispatch::check_supported(&cfg, gpu.arch())?;
                Some(DeviceIndex {
                    qo_indptr: gpu.upload(&batch.qo_indptr)?,
                    kv_indptr: gpu.upload(&batch.kv.indptr)?,
                    kv_indices: gpu.upload(&batch.kv.indices)?,
                    kv_last_len: gpu.upload(&batch.kv.last_len)?,
                })
            }
        };
        Ok(Planned {
            backend: backend.clone(),
            batch,
            kind,
            index,
        })
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
        match (&self.backend, &self.index) {
            (Backend::Cuda(gpu), Some(index)) => self.run_gpu(gpu, index, variant, q, k, v, o, lse),
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
        index: &DeviceIndex,
        variant: &V,
        q: &Buffer<T>,
        k: &Buffer<T>,
        v: &Buffer<T>,
        o: &mut Buffer<T>,
        lse: Option<&mut Buffer<f32>>,
    ) -> Result<()> {
        let b = &self.batch;
        if b.total_qo() == 0 {
            return Ok(());
        }
        let cfg = KernelConfig {
            kind: self.kind,
            head_dim: b.heads.head_dim,
            dtype: T::DTYPE,
            cta_tile_q: 0,
        };
        let f = dispatch::kernel(gpu, V::SPEC, &cfg)?;
        let (hq, d) = (u64::from(b.heads.num_qo_heads), u64::from(b.heads.head_dim));
        let s = b.kv.strides(&b.heads);
        let args = AttnArgs {
            q: q.device_ptr(gpu)?,
            k: k.device_ptr(gpu)?,
            v: v.device_ptr(gpu)?,
            o: o.device_ptr(gpu)?,
            lse: match &lse {
                Some(l) => l.device_ptr(gpu)?,
                None => 0,
            },
            qo_indptr: gpu.device_ptr(&index.qo_indptr),
            kv_indptr: gpu.device_ptr(&index.kv_indptr),
            kv_indices: gpu.device_ptr(&index.kv_indices),
            kv_last_len: gpu.device_ptr(&index.kv_last_len),
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
            work: 0,
            partial_o: 0,
            partial_lse: 0,
            num_items: 0,
        };
        let param_bytes = params::pack(variant, Some(gpu))?;
        let dims = ferrinfer_kernels::launch_dims(&cfg, &args);
        gpu.launch_attention(&f, dims, args, &param_bytes)
    }
}
