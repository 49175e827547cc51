//! Attention and the serving ops on candle [`Tensor`]s (feature `candle`; CUDA tensors with
//! `candle-cuda`), with no copy: each tensor's storage is viewed in place, at its layout's offset
//! and strides, on candle's device and, for CUDA, on candle's own stream.
//!
//! - [`backend`] turns a candle [`Device`] into the [`Backend`] every call takes: the CPU
//!   reference for `Device::Cpu`, the GPU on candle's stream for `Device::Cuda` (so ferrinfer's
//!   kernels are ordered with candle's work, and inside a CUDA graph candle captures).
//! - [`PagedKvCache`] is one tensor `[pages, 2, page_size, kv_heads, head_dim]` (NHD; HND swaps
//!   the last-but-one two), K then V in each page, as vLLM and FlashInfer keep it; it makes the
//!   [`KvIndex`] that plans use from a page table.
//! - [`batch_decode`], [`batch_prefill`] run a plan of the plain API; [`append_kv`], [`rmsnorm`],
//!   [`fused_add_rmsnorm`], [`silu_and_mul`] and [`rope`] are the ops around them.
//!
//! Outputs are tensors the caller allocated, written in place: candle tensors are shared
//! handles, so, as candle's own in-place ops ([`Tensor::inplace_op1`]), the functions take `&Tensor`
//! and hold candle's write lock on an output's storage (and a read lock on every input's) for
//! the call. A tensor that is written may not share storage with another argument of the call
//! (refused, as candle refuses it). Every tensor must be f16 or bf16 (all of a call the same;
//! positions i32), on the backend's device, of the shape the call states; attention's q and out
//! may be strided in rows and heads (see [`qo_strides`]), everything else must be contiguous (any
//! start offset): a strided tensor is an error, never a silent copy. Errors are
//! [`Error`](crate::Error)s; in a function returning `candle_core::Result`, map them with
//! `candle_core::Error::wrap`.
//!
//! On a GPU the calls are asynchronous on candle's stream, allocate nothing and do not
//! synchronise (the locks cover the queueing, not the kernels: candle orders its later work on
//! the same stream). With candle's per-thread default stream, make the backend and the calls on
//! the thread that runs the model.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use ferrinfer::candle::{self as fc, PagedKvCache};
//! use ferrinfer::prelude::*;
//! use ferrinfer::variants::Standard;
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let device = Device::Cpu;
//! let backend = fc::backend(&device)?;
//! // 4 pages of 16 tokens, 2 KV heads of dim 64; two requests of 20 and 5 tokens.
//! let cache = PagedKvCache::new(
//!     Tensor::randn(0f32, 1., (4, 2, 16, 2, 64), &device)?.to_dtype(DType::BF16)?,
//!     KvLayout::Nhd,
//! )?;
//! let kv = cache.paged_from_lens(&[20, 5], &[3, 0, 2])?;
//! let heads = cache.heads(8)?;
//! let plan = BatchDecode::plan(&backend, heads, kv, None)?;
//! let q = Tensor::randn(0f32, 1., (2, 8, 64), &device)?.to_dtype(DType::BF16)?;
//! let out = q.zeros_like()?;
//! fc::batch_decode(&backend, &plan, &Standard, &q, &cache, &out)?;
//! # Ok(()) }
//! ```

mod access;

use std::ops::Range;

use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};

use crate::attention::{KvStrides, QoStrides};
use crate::ops::activation::{self, ActShape};
use crate::ops::kv_append::{AppendPlan, NewKv};
use crate::ops::norm::{self, NormShape};
use crate::ops::rope::{self as rope_op, Angles, Frequencies, Positions, QkMut, Rope};
use crate::variant::Variant;
use crate::{
    Backend, Batch, BatchDecode, BatchPrefill, Element, Heads, KvIndex, KvLayout, Result, View,
    ViewMut,
};
use access::{Elem, check, dense, distinct, invalid, read, rows, write};

/// The backend for tensors of a candle `device`: [`Backend::Cpu`] for `Device::Cpu`; for a
/// `Device::Cuda` (feature `candle-cuda`), the GPU on candle's own stream
/// ([`Backend::on_stream`]). Make it once and keep it: every call of this module, and the plans
/// they run, take it.
///
/// Errors: a Metal device, a CUDA device without the `candle-cuda` feature, or a CUDA context
/// ferrinfer cannot run on.
///
/// ```
/// let backend = ferrinfer::candle::backend(&candle_core::Device::Cpu)?;
/// assert!(matches!(backend, ferrinfer::Backend::Cpu));
/// # Ok::<(), ferrinfer::Error>(())
/// ```
pub fn backend(device: &Device) -> Result<Backend> {
    match device {
        Device::Cpu => Ok(Backend::Cpu),
        #[cfg(feature = "candle-cuda")]
        Device::Cuda(dev) => Backend::on_stream(dev.cuda_stream()),
        other => Err(crate::Error::Unsupported(format!(
            "ferrinfer runs candle tensors on the CPU{}; this device is {:?}",
            if cfg!(feature = "candle-cuda") {
                " and on CUDA"
            } else {
                " (CUDA tensors need the `candle-cuda` feature)"
            },
            other.location()
        ))),
    }
}

/// The row and head strides of a q or out tensor `[rows, heads, head_dim]` (its head dim
/// contiguous), for [`Batch::with_qo_strides`] when q is a view into a larger tensor, such as a
/// narrowed fused QKV projection. Dense tensors need nothing: plans assume dense q and out.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// // A fused QKV [tokens, 8 + 2 + 2 heads, 64]; q is its first 8 heads, with no copy.
/// let qkv = Tensor::zeros((3, 12, 64), DType::BF16, &Device::Cpu)?;
/// let q = qkv.narrow(1, 0, 8)?;
/// let s = ferrinfer::candle::qo_strides(&q)?;
/// assert_eq!((s.row(), s.head()), (12 * 64, 64));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn qo_strides(t: &Tensor) -> Result<QoStrides> {
    let dims = t.dims();
    let [n, h, d] = dims else {
        return Err(invalid(format!(
            "q/out has shape {dims:?}; expected [rows, heads, head_dim]"
        )));
    };
    let (_, [row, head]) = rows("q/out", t, [*n, *h, *d])?;
    Ok(QoStrides::new(row, head))
}

/// A paged KV cache held in one candle tensor: `[pages, 2, page_size, kv_heads, head_dim]` for
/// [`KvLayout::Nhd`], `[pages, 2, kv_heads, page_size, head_dim]` for [`KvLayout::Hnd`]; slot 0
/// of dim 1 holds the keys, slot 1 the values. Contiguous (any start offset), f16 or bf16.
/// Validated at construction; the tensor is shared, never copied.
///
/// ```
/// use candle_core::{DType, Device};
/// use ferrinfer::{KvLayout, candle::PagedKvCache};
/// let cache = PagedKvCache::zeros(8, 16, 2, 128, KvLayout::Nhd, DType::F16, &Device::Cpu)?;
/// assert_eq!(cache.tensor().dims(), [8, 2, 16, 2, 128]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug)]
pub struct PagedKvCache {
    tensor: Tensor,
    layout: KvLayout,
    pages: u32,
    page_size: u32,
    kv_heads: u32,
    head_dim: u32,
}

impl PagedKvCache {
    /// The cache in `tensor`, laid out as `layout` says (see [`PagedKvCache`]).
    ///
    /// Errors: another rank, a dim 1 that is not 2, a dtype other than f16/bf16, a
    /// non-contiguous tensor, a size past `u32` in any dimension, or an invalid head dim.
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use ferrinfer::{KvLayout, candle::PagedKvCache};
    /// let t = Tensor::zeros((4, 2, 8, 16, 64), DType::BF16, &Device::Cpu)?;
    /// let cache = PagedKvCache::new(t.clone(), KvLayout::Hnd)?; // 8 KV heads, pages of 16
    /// assert_eq!((cache.kv_heads(), cache.page_size()), (8, 16));
    /// assert!(PagedKvCache::new(t.transpose(2, 3)?, KvLayout::Hnd).is_err()); // strided
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn new(tensor: Tensor, layout: KvLayout) -> Result<Self> {
        let dims = tensor.dims().to_vec();
        let [pages, two, a, b, head_dim] = dims[..] else {
            return Err(invalid(format!(
                "kv cache has shape {dims:?}; expected [pages, 2, page_size, kv_heads, head_dim] \
                 (NHD) or [pages, 2, kv_heads, page_size, head_dim] (HND)"
            )));
        };
        if two != 2 {
            return Err(invalid(format!(
                "kv cache has shape {dims:?}; its dim 1 must be 2 (K, V)"
            )));
        }
        if !matches!(tensor.dtype(), DType::BF16 | DType::F16) {
            return Err(invalid(format!(
                "kv cache is {:?}; expected f16 or bf16",
                tensor.dtype()
            )));
        }
        dense("kv cache", &tensor, &dims)?;
        let (page_size, kv_heads) = match layout {
            KvLayout::Nhd => (a, b),
            KvLayout::Hnd => (b, a),
        };
        let u = |v: usize, what: &str| {
            u32::try_from(v).map_err(|_| invalid(format!("kv cache: {what} = {v} exceeds u32")))
        };
        let cache = PagedKvCache {
            pages: u(pages, "pages")?,
            page_size: u(page_size, "page_size")?,
            kv_heads: u(kv_heads, "kv_heads")?,
            head_dim: u(head_dim, "head_dim")?,
            tensor,
            layout,
        };
        if cache.page_size == 0 {
            return Err(invalid("kv cache: page_size must be at least 1"));
        }
        cache.heads(cache.kv_heads)?;
        Ok(cache)
    }

    /// A zeroed cache of `pages` pages on `device` (see [`PagedKvCache::new`]).
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// use ferrinfer::{KvLayout, candle::PagedKvCache};
    /// let c = PagedKvCache::zeros(2, 4, 1, 64, KvLayout::Hnd, DType::BF16, &Device::Cpu)?;
    /// assert_eq!(c.tensor().dims(), [2, 2, 1, 4, 64]);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn zeros(
        pages: usize,
        page_size: usize,
        kv_heads: usize,
        head_dim: usize,
        layout: KvLayout,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let shape = match layout {
            KvLayout::Nhd => (pages, 2, page_size, kv_heads, head_dim),
            KvLayout::Hnd => (pages, 2, kv_heads, page_size, head_dim),
        };
        let t = Tensor::zeros(shape, dtype, device)
            .map_err(|e| invalid(format!("kv cache: candle: {e}")))?;
        Self::new(t, layout)
    }

    /// The tensor.
    ///
    /// ```
    /// # use ferrinfer::{KvLayout, candle::PagedKvCache};
    /// # let c = PagedKvCache::zeros(2, 4, 1, 64, KvLayout::Nhd, candle_core::DType::BF16, &candle_core::Device::Cpu)?;
    /// let keys_of_page_1 = c.tensor().get(1)?.get(0)?; // [page_size, kv_heads, head_dim]
    /// assert_eq!(keys_of_page_1.dims(), [4, 1, 64]);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn tensor(&self) -> &Tensor {
        &self.tensor
    }
    /// NHD or HND.
    ///
    /// ```
    /// # use ferrinfer::{KvLayout, candle::PagedKvCache};
    /// # let c = PagedKvCache::zeros(2, 4, 1, 64, KvLayout::Nhd, candle_core::DType::BF16, &candle_core::Device::Cpu)?;
    /// assert_eq!(c.layout(), KvLayout::Nhd);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn layout(&self) -> KvLayout {
        self.layout
    }
    /// Pages.
    ///
    /// ```
    /// # use ferrinfer::{KvLayout, candle::PagedKvCache};
    /// # let c = PagedKvCache::zeros(2, 4, 1, 64, KvLayout::Nhd, candle_core::DType::BF16, &candle_core::Device::Cpu)?;
    /// assert_eq!(c.num_pages(), 2);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn num_pages(&self) -> u32 {
        self.pages
    }
    /// Tokens per page.
    ///
    /// ```
    /// # use ferrinfer::{KvLayout, candle::PagedKvCache};
    /// # let c = PagedKvCache::zeros(2, 4, 1, 64, KvLayout::Nhd, candle_core::DType::BF16, &candle_core::Device::Cpu)?;
    /// assert_eq!(c.page_size(), 4);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn page_size(&self) -> u32 {
        self.page_size
    }
    /// KV heads.
    ///
    /// ```
    /// # use ferrinfer::{KvLayout, candle::PagedKvCache};
    /// # let c = PagedKvCache::zeros(2, 4, 1, 64, KvLayout::Nhd, candle_core::DType::BF16, &candle_core::Device::Cpu)?;
    /// assert_eq!(c.kv_heads(), 1);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn kv_heads(&self) -> u32 {
        self.kv_heads
    }
    /// Elements per head.
    ///
    /// ```
    /// # use ferrinfer::{KvLayout, candle::PagedKvCache};
    /// # let c = PagedKvCache::zeros(2, 4, 1, 64, KvLayout::Nhd, candle_core::DType::BF16, &candle_core::Device::Cpu)?;
    /// assert_eq!(c.head_dim(), 64);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn head_dim(&self) -> u32 {
        self.head_dim
    }

    /// The [`Heads`] of a model with `num_qo_heads` query heads over this cache.
    ///
    /// ```
    /// # use ferrinfer::{KvLayout, candle::PagedKvCache};
    /// # let c = PagedKvCache::zeros(2, 4, 2, 64, KvLayout::Nhd, candle_core::DType::BF16, &candle_core::Device::Cpu)?;
    /// assert_eq!(c.heads(8)?.group_size(), 4);
    /// assert!(c.heads(3).is_err()); // not a multiple of the 2 KV heads
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn heads(&self, num_qo_heads: u32) -> Result<Heads> {
        Heads::new(num_qo_heads, self.kv_heads, self.head_dim)
    }

    /// The index of a step's page table over this cache (see [`KvIndex::paged`]): request `b`
    /// owns pages `kv_indices[kv_indptr[b]..kv_indptr[b + 1]]` and fills `last_page_len[b]`
    /// tokens of its last one. It carries the cache's interleaved strides; plan with it.
    ///
    /// ```
    /// # use ferrinfer::{KvLayout, candle::PagedKvCache};
    /// # let c = PagedKvCache::zeros(4, 16, 2, 64, KvLayout::Nhd, candle_core::DType::BF16, &candle_core::Device::Cpu)?;
    /// let kv = c.paged(&[0, 2, 3], &[3, 0, 1], &[4, 16])?;
    /// assert_eq!((kv.kv_len(0), kv.kv_len(1)), (20, 16));
    /// assert!(c.paged(&[0, 1], &[4], &[1]).is_err()); // page 4 of a 4-page cache
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn paged(
        &self,
        kv_indptr: &[i32],
        kv_indices: &[i32],
        last_page_len: &[i32],
    ) -> Result<KvIndex> {
        let kv = KvIndex::paged(
            self.page_size,
            kv_indptr,
            kv_indices,
            last_page_len,
            self.pages,
            self.layout,
        )?;
        kv.interleaved(&self.heads(self.kv_heads)?)
    }

    /// [`PagedKvCache::paged`] from the requests' lengths (see [`KvIndex::paged_from_lens`]).
    ///
    /// ```
    /// # use ferrinfer::{KvLayout, candle::PagedKvCache};
    /// # let c = PagedKvCache::zeros(4, 16, 2, 64, KvLayout::Nhd, candle_core::DType::BF16, &candle_core::Device::Cpu)?;
    /// let kv = c.paged_from_lens(&[20, 16], &[3, 0, 1])?;
    /// assert_eq!(kv.indptr(), [0, 2, 3]);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn paged_from_lens(&self, kv_lens: &[u32], pages: &[i32]) -> Result<KvIndex> {
        let kv = KvIndex::paged_from_lens(self.page_size, kv_lens, pages, self.pages, self.layout)?;
        kv.interleaved(&self.heads(self.kv_heads)?)
    }

    /// Refuse a plan's index that is not over this cache (another page size, layout, page
    /// count, head geometry, or strides other than this interleaved tensor's).
    fn check_index(&self, kv: &KvIndex, heads: &Heads) -> Result<()> {
        let (p, hk, d) = (
            u64::from(self.page_size),
            u64::from(self.kv_heads),
            u64::from(self.head_dim),
        );
        let strides = match self.layout {
            KvLayout::Nhd => KvStrides {
                block: 2 * p * hk * d,
                token: hk * d,
                head: d,
            },
            KvLayout::Hnd => KvStrides {
                block: 2 * p * hk * d,
                token: d,
                head: p * d,
            },
        };
        if heads.num_kv_heads() != self.kv_heads
            || heads.head_dim() != self.head_dim
            || kv.page_size() != Some(self.page_size)
            || kv.layout() != self.layout
            || kv.capacity() != self.pages
            || kv.strides(heads) != strides
        {
            return Err(invalid(format!(
                "the plan's KV index ({:?}, page size {:?}, {} pages, strides {:?}, {} KV heads \
                 of dim {}) is not over this cache ({:?}, page size {}, {} pages, strides \
                 {strides:?}, {} KV heads of dim {}); make it with PagedKvCache::paged",
                kv.layout(),
                kv.page_size(),
                kv.capacity(),
                kv.strides(heads),
                heads.num_kv_heads(),
                heads.head_dim(),
                self.layout,
                self.page_size,
                self.pages,
                self.kv_heads,
                self.head_dim
            )));
        }
        Ok(())
    }

    fn range(&self) -> Result<Range<usize>> {
        dense("kv cache", &self.tensor, self.tensor.dims())
    }
}

/// Call `$f::<T>(args)` for the dtype of `$t` (f16 or bf16).
macro_rules! by_dtype {
    ($t:expr, $name:expr, $f:ident($($a:expr),*)) => {
        match $t.dtype() {
            DType::BF16 => $f::<bf16>($($a),*),
            DType::F16 => $f::<f16>($($a),*),
            d => Err(invalid(format!("{} is {d:?}; expected f16 or bf16", $name))),
        }
    };
}

/// Decode attention of `q` (`[batch, num_qo_heads, head_dim]`) over `cache` into `out` (same
/// shape), as `plan` (made on `backend` with an index of [`PagedKvCache::paged`]) says, with
/// `variant`. q and out may be strided in rows and heads if the plan's batch says so
/// ([`BatchDecode::plan_batch`] with [`qo_strides`]); otherwise dense.
///
/// Errors: a tensor of another dtype, device, shape or strides than the plan's (named), a plan
/// not over this cache, `out` sharing storage with q or the cache, or what
/// [`BatchDecode::run`] refuses.
///
/// ```
/// # use candle_core::{DType, Device, Tensor};
/// # use ferrinfer::{candle::{self as fc, PagedKvCache}, prelude::*, variants::Standard};
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let backend = fc::backend(&Device::Cpu)?;
/// let cache = PagedKvCache::zeros(2, 16, 1, 64, KvLayout::Nhd, DType::F16, &Device::Cpu)?;
/// let plan = BatchDecode::plan(&backend, cache.heads(4)?, cache.paged_from_lens(&[17], &[1, 0])?, None)?;
/// let q = Tensor::ones((1, 4, 64), DType::F16, &Device::Cpu)?;
/// let out = q.zeros_like()?;
/// fc::batch_decode(&backend, &plan, &Standard, &q, &cache, &out)?;
/// # Ok(()) }
/// ```
pub fn batch_decode<V: Variant>(
    backend: &Backend,
    plan: &BatchDecode,
    variant: &V,
    q: &Tensor,
    cache: &PagedKvCache,
    out: &Tensor,
) -> Result<()> {
    by_dtype!(q, "q", attend(backend, plan, variant, q, cache, out))
}

/// Prefill (or append) attention of `q` (`[total_qo, num_qo_heads, head_dim]`, the batch's
/// rows) over `cache` into `out`, as `plan` (made on `backend`) says; see [`batch_decode`].
///
/// ```
/// # use candle_core::{DType, Device, Tensor};
/// # use ferrinfer::{candle::{self as fc, PagedKvCache}, prelude::*, variants::Standard};
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let backend = fc::backend(&Device::Cpu)?;
/// let cache = PagedKvCache::zeros(2, 16, 1, 64, KvLayout::Nhd, DType::BF16, &Device::Cpu)?;
/// let heads = cache.heads(2)?;
/// // One request: 3 new rows at the end of its 17 tokens, causal.
/// let batch = Batch::new(heads, &[0, 3], cache.paged_from_lens(&[17], &[1, 0])?)?.with_causal(true);
/// let plan = BatchPrefill::plan(&backend, batch)?;
/// let q = Tensor::ones((3, 2, 64), DType::BF16, &Device::Cpu)?;
/// let out = q.zeros_like()?;
/// fc::batch_prefill(&backend, &plan, &Standard, &q, &cache, &out)?;
/// # Ok(()) }
/// ```
pub fn batch_prefill<V: Variant>(
    backend: &Backend,
    plan: &BatchPrefill,
    variant: &V,
    q: &Tensor,
    cache: &PagedKvCache,
    out: &Tensor,
) -> Result<()> {
    by_dtype!(q, "q", attend(backend, plan, variant, q, cache, out))
}

/// The plan/run wrappers [`attend`] runs.
trait Plan {
    fn backend(&self) -> &Backend;
    fn batch(&self) -> &Batch;
    fn run_on<T: Element>(
        &self,
        variant: &impl Variant,
        q: &View<'_, T>,
        k: &View<'_, T>,
        v: &View<'_, T>,
        o: &mut ViewMut<'_, T>,
    ) -> Result<()>;
}

macro_rules! plan {
    ($p:ty) => {
        impl Plan for $p {
            fn backend(&self) -> &Backend {
                <$p>::backend(self)
            }
            fn batch(&self) -> &Batch {
                <$p>::batch(self)
            }
            fn run_on<T: Element>(
                &self,
                variant: &impl Variant,
                q: &View<'_, T>,
                k: &View<'_, T>,
                v: &View<'_, T>,
                o: &mut ViewMut<'_, T>,
            ) -> Result<()> {
                self.run(variant, q, k, v, o, None)
            }
        }
    };
}
plan!(BatchDecode);
plan!(BatchPrefill);

fn attend<T: Elem + Element>(
    backend: &Backend,
    plan: &impl Plan,
    variant: &impl Variant,
    q: &Tensor,
    cache: &PagedKvCache,
    out: &Tensor,
) -> Result<()> {
    // The plan launches on its own backend: another stream would run unordered with candle's.
    if !plan.backend().same_stream(backend) {
        return Err(invalid(format!(
            "the plan was made on {} but the tensors are on {}: plan on \
             ferrinfer::candle::backend(tensor.device())",
            plan.backend().describe(),
            backend.describe()
        )));
    }
    let batch = plan.batch();
    let heads = batch.heads();
    check::<T>(backend, "q", q)?;
    check::<T>(backend, "kv cache", &cache.tensor)?;
    check::<T>(backend, "out", out)?;
    cache.check_index(batch.kv(), &heads)?;
    let dims = [
        batch.total_qo(),
        heads.num_qo_heads() as usize,
        heads.head_dim() as usize,
    ];
    let (q_range, qs) = rows("q", q, dims)?;
    let (o_range, os) = rows("out", out, dims)?;
    for (name, [row, head], want) in [("q", qs, batch.q_strides()), ("out", os, batch.o_strides())]
    {
        // A single row (or head) has no stride to speak of: candle may report any.
        let row_ok = dims[0] <= 1 || row == want.row();
        let head_ok = dims[1] <= 1 || head == want.head();
        if !(row_ok && head_ok) {
            return Err(invalid(format!(
                "{name} has row and head strides ({row}, {head}); the plan's batch has ({}, {}): \
                 plan with Batch::with_qo_strides(ferrinfer::candle::qo_strides(..)?, ..)",
                want.row(),
                want.head()
            )));
        }
    }
    distinct(("out", out), ("q", q))?;
    distinct(("out", out), ("kv cache", &cache.tensor))?;
    let c_range = cache.range()?;
    let v_off = batch.kv().interleaved_v_offset(&heads);
    read::<T, _>(backend, "q", q, q_range, |qv| {
        read::<T, _>(backend, "kv cache", &cache.tensor, c_range, |kv| {
            let vv = kv.slice(v_off..)?;
            write::<T, _>(backend, "out", out, o_range, |mut ov| {
                plan.run_on(variant, &qv, &kv, &vv, &mut ov)
            })
        })
    })
}

/// Write the step's new keys `k` and values `v` (each `[rows, kv_heads, head_dim]`, contiguous)
/// into `cache` at the slots of `plan` (an [`AppendPlan`] made on `backend` from an index of
/// [`PagedKvCache::paged`], the index after the append). Runs [`AppendPlan::run_interleaved`].
///
/// Errors: a tensor of another dtype, device or shape (named), k or v sharing storage with the
/// cache, or what [`AppendPlan::run_interleaved`] refuses (rows past the plan's capacity, a
/// cache of another size than planned).
///
/// ```
/// # use candle_core::{DType, Device, Tensor};
/// # use ferrinfer::{candle::{self as fc, PagedKvCache}, prelude::*, ops::kv_append::AppendPlan};
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let backend = fc::backend(&Device::Cpu)?;
/// let cache = PagedKvCache::zeros(2, 4, 1, 64, KvLayout::Nhd, DType::BF16, &Device::Cpu)?;
/// // One request, 5 tokens after this step on pages 1 then 0; it appends its last token.
/// let kv = cache.paged_from_lens(&[5], &[1, 0])?;
/// let plan = AppendPlan::new(&backend, cache.heads(1)?, &kv, &[0, 1], 1)?;
/// let k = Tensor::ones((1, 1, 64), DType::BF16, &Device::Cpu)?;
/// let v = (&k * 2.0)?;
/// fc::append_kv(&backend, &plan, &k, &v, &cache)?;
/// // Position 4 is slot 0 of page 0: K at [0, 0, 0], V at [0, 1, 0].
/// let page0 = cache.tensor().get(0)?.to_dtype(DType::F32)?;
/// assert_eq!(page0.get(1)?.get(0)?.get(0)?.get(0)?.to_scalar::<f32>()?, 2.0);
/// # Ok(()) }
/// ```
pub fn append_kv(
    backend: &Backend,
    plan: &AppendPlan,
    k: &Tensor,
    v: &Tensor,
    cache: &PagedKvCache,
) -> Result<()> {
    by_dtype!(k, "k", append(backend, plan, k, v, cache))
}

fn append<T: Elem + Element>(
    backend: &Backend,
    plan: &AppendPlan,
    k: &Tensor,
    v: &Tensor,
    cache: &PagedKvCache,
) -> Result<()> {
    let heads = plan.heads();
    if heads.num_kv_heads() != cache.kv_heads || heads.head_dim() != cache.head_dim {
        return Err(invalid(format!(
            "the append plan is for {} KV heads of dim {}; the cache has {} of dim {}",
            heads.num_kv_heads(),
            heads.head_dim(),
            cache.kv_heads,
            cache.head_dim
        )));
    }
    for (name, t) in [("k", k), ("v", v), ("kv cache", &cache.tensor)] {
        check::<T>(backend, name, t)?;
    }
    let n = k.dims().first().copied().unwrap_or(0);
    let dims = [n, cache.kv_heads as usize, cache.head_dim as usize];
    let (k_range, v_range) = (dense("k", k, &dims)?, dense("v", v, &dims)?);
    distinct(("kv cache", &cache.tensor), ("k", k))?;
    distinct(("kv cache", &cache.tensor), ("v", v))?;
    let c_range = cache.range()?;
    read::<T, _>(backend, "k", k, k_range, |kv| {
        read::<T, _>(backend, "v", v, v_range, |vv| {
            write::<T, _>(backend, "kv cache", &cache.tensor, c_range, |mut cv| {
                plan.run_interleaved(backend, NewKv { k: &kv, v: &vv }, &mut cv)
            })
        })
    })
}

/// Rows and hidden size of a `[.., hidden]` tensor, as the norms and activations take it.
fn rows_of(name: &str, t: &Tensor) -> Result<(usize, usize)> {
    let dims = t.dims();
    let Some((&hidden, lead)) = dims.split_last() else {
        return Err(invalid(format!(
            "{name} is a scalar; expected [.., hidden]"
        )));
    };
    Ok((lead.iter().product(), hidden))
}

fn u32_of(name: &str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| invalid(format!("{name}: {v} exceeds u32")))
}

/// RMSNorm of every row of `x` (`[.., hidden]`) with `weight` (`[hidden]`) into `out` (the shape
/// of `x`), all contiguous: `out = x / sqrt(mean(x^2) + eps) * weight`.
///
/// ```
/// # use candle_core::{DType, Device, Tensor};
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dev = Device::Cpu;
/// let backend = ferrinfer::candle::backend(&dev)?;
/// let x = Tensor::new(&[[3f32, -3.0], [1.0, 1.0]], &dev)?.to_dtype(DType::F16)?;
/// let w = Tensor::new(&[1f32, 2.0], &dev)?.to_dtype(DType::F16)?;
/// let out = x.zeros_like()?;
/// ferrinfer::candle::rmsnorm(&backend, &x, &w, 0.0, &out)?;
/// assert_eq!(out.to_dtype(DType::F32)?.to_vec2::<f32>()?, [[1.0, -2.0], [1.0, 2.0]]);
/// # Ok(()) }
/// ```
pub fn rmsnorm(
    backend: &Backend,
    x: &Tensor,
    weight: &Tensor,
    eps: f32,
    out: &Tensor,
) -> Result<()> {
    by_dtype!(x, "x", rmsnorm_t(backend, x, weight, eps, out))
}

fn rmsnorm_t<T: Elem + Element>(
    backend: &Backend,
    x: &Tensor,
    weight: &Tensor,
    eps: f32,
    out: &Tensor,
) -> Result<()> {
    for (name, t) in [("x", x), ("weight", weight), ("out", out)] {
        check::<T>(backend, name, t)?;
    }
    let (r, h) = rows_of("x", x)?;
    let shape = NormShape::new(u32_of("rmsnorm rows", r)?, u32_of("rmsnorm hidden", h)?)?;
    let xr = dense("x", x, x.dims())?;
    let wr = dense("weight", weight, &[h])?;
    let or = dense("out", out, x.dims())?;
    distinct(("out", out), ("x", x))?;
    distinct(("out", out), ("weight", weight))?;
    read::<T, _>(backend, "x", x, xr, |xv| {
        read::<T, _>(backend, "weight", weight, wr, |wv| {
            write::<T, _>(backend, "out", out, or, |mut ov| {
                norm::rmsnorm(backend, shape, &xv, &wv, eps, &mut ov)
            })
        })
    })
}

/// Residual add then RMSNorm, in place: `residual += x`, then `x = rmsnorm(residual) * weight`
/// (see [`norm::fused_add_rmsnorm`]). `x` and `residual` are `[.., hidden]` of one shape,
/// `weight` `[hidden]`, all contiguous; x and residual must not share storage.
///
/// ```
/// # use candle_core::{DType, Device, Tensor};
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dev = Device::Cpu;
/// let backend = ferrinfer::candle::backend(&dev)?;
/// let x = Tensor::new(&[[1f32, -4.0]], &dev)?.to_dtype(DType::BF16)?;
/// let residual = Tensor::new(&[[2f32, 1.0]], &dev)?.to_dtype(DType::BF16)?;
/// let w = Tensor::ones(2, DType::BF16, &dev)?;
/// ferrinfer::candle::fused_add_rmsnorm(&backend, &x, &residual, &w, 0.0)?;
/// assert_eq!(residual.to_dtype(DType::F32)?.to_vec2::<f32>()?, [[3.0, -3.0]]);
/// assert_eq!(x.to_dtype(DType::F32)?.to_vec2::<f32>()?, [[1.0, -1.0]]);
/// # Ok(()) }
/// ```
pub fn fused_add_rmsnorm(
    backend: &Backend,
    x: &Tensor,
    residual: &Tensor,
    weight: &Tensor,
    eps: f32,
) -> Result<()> {
    by_dtype!(x, "x", fused_t(backend, x, residual, weight, eps))
}

fn fused_t<T: Elem + Element>(
    backend: &Backend,
    x: &Tensor,
    residual: &Tensor,
    weight: &Tensor,
    eps: f32,
) -> Result<()> {
    for (name, t) in [("x", x), ("residual", residual), ("weight", weight)] {
        check::<T>(backend, name, t)?;
    }
    let (r, h) = rows_of("x", x)?;
    let shape = NormShape::new(u32_of("rmsnorm rows", r)?, u32_of("rmsnorm hidden", h)?)?;
    let xr = dense("x", x, x.dims())?;
    let rr = dense("residual", residual, x.dims())?;
    let wr = dense("weight", weight, &[h])?;
    distinct(("x", x), ("residual", residual))?;
    distinct(("x", x), ("weight", weight))?;
    distinct(("residual", residual), ("weight", weight))?;
    read::<T, _>(backend, "weight", weight, wr, |wv| {
        write::<T, _>(backend, "x", x, xr, |mut xv| {
            write::<T, _>(backend, "residual", residual, rr, |mut rv| {
                norm::fused_add_rmsnorm(backend, shape, &mut xv, &mut rv, &wv, eps)
            })
        })
    })
}

/// `out = silu(x[.., :d]) * x[.., d:]` for `x` `[.., 2 * d]` and `out` `[.., d]`, contiguous.
///
/// ```
/// # use candle_core::{DType, Device, Tensor};
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dev = Device::Cpu;
/// let backend = ferrinfer::candle::backend(&dev)?;
/// let x = Tensor::new(&[[0f32, 5.0]], &dev)?.to_dtype(DType::BF16)?; // gate 0, up 5
/// let out = Tensor::ones((1, 1), DType::BF16, &dev)?;
/// ferrinfer::candle::silu_and_mul(&backend, &x, &out)?;
/// assert_eq!(out.to_dtype(DType::F32)?.to_vec2::<f32>()?, [[0.0]]);
/// # Ok(()) }
/// ```
pub fn silu_and_mul(backend: &Backend, x: &Tensor, out: &Tensor) -> Result<()> {
    by_dtype!(x, "x", silu_t(backend, x, out))
}

fn silu_t<T: Elem + Element>(backend: &Backend, x: &Tensor, out: &Tensor) -> Result<()> {
    check::<T>(backend, "x", x)?;
    check::<T>(backend, "out", out)?;
    let (r, two_d) = rows_of("x", x)?;
    if two_d % 2 != 0 {
        return Err(invalid(format!(
            "silu_and_mul: x has shape {:?}; its last dimension must be even (gate, up)",
            x.dims()
        )));
    }
    let shape = ActShape::new(
        u32_of("silu_and_mul rows", r)?,
        u32_of("silu_and_mul d", two_d / 2)?,
    )?;
    let mut out_dims = x.dims().to_vec();
    *out_dims.last_mut().expect("rows_of: not a scalar") = two_d / 2;
    let xr = dense("x", x, x.dims())?;
    let or = dense("out", out, &out_dims)?;
    distinct(("out", out), ("x", x))?;
    read::<T, _>(backend, "x", x, xr, |xv| {
        write::<T, _>(backend, "out", out, or, |mut ov| {
            activation::silu_and_mul(backend, shape, &xv, &mut ov)
        })
    })
}

/// RoPE in place on `q` (`[tokens, num_qo_heads, head_dim]`) and `k` (`[tokens, num_kv_heads,
/// head_dim]`), contiguous, token `t` at `positions[t]` (`[tokens]`, i32), with angles computed
/// from `freqs` (see [`rope_op::apply_in_place`]).
///
/// ```
/// # use candle_core::{DType, Device, Tensor};
/// use ferrinfer::ops::rope::{Frequencies, Rope, RopeLayout};
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dev = Device::Cpu;
/// let backend = ferrinfer::candle::backend(&dev)?;
/// let rope = Rope::new(ferrinfer::Heads::new(2, 1, 4)?, 4, RopeLayout::NeoX)?;
/// let q = Tensor::ones((2, 2, 4), DType::BF16, &dev)?;
/// let k = Tensor::ones((2, 1, 4), DType::BF16, &dev)?;
/// let positions = Tensor::new(&[0i32, 1], &dev)?;
/// ferrinfer::candle::rope(&backend, &rope, Frequencies::new(10_000.0)?, &positions, &q, &k)?;
/// let k = k.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
/// assert_eq!(k[0], 1.0); // position 0 turns nothing
/// assert!((k[4] - (1f32.cos() - 1f32.sin())).abs() < 1e-2);
/// # Ok(()) }
/// ```
pub fn rope(
    backend: &Backend,
    rope: &Rope,
    freqs: Frequencies,
    positions: &Tensor,
    q: &Tensor,
    k: &Tensor,
) -> Result<()> {
    by_dtype!(q, "q", rope_t(backend, rope, freqs, positions, q, k))
}

fn rope_t<T: Elem + Element>(
    backend: &Backend,
    rope: &Rope,
    freqs: Frequencies,
    positions: &Tensor,
    q: &Tensor,
    k: &Tensor,
) -> Result<()> {
    check::<T>(backend, "q", q)?;
    check::<T>(backend, "k", k)?;
    check::<i32>(backend, "positions", positions)?;
    let heads = rope.heads();
    let n = q.dims().first().copied().unwrap_or(0);
    let d = heads.head_dim() as usize;
    let qr = dense("q", q, &[n, heads.num_qo_heads() as usize, d])?;
    let kr = dense("k", k, &[n, heads.num_kv_heads() as usize, d])?;
    let pr = dense("positions", positions, &[n])?;
    distinct(("q", q), ("k", k))?;
    distinct(("q", q), ("positions", positions))?;
    distinct(("k", k), ("positions", positions))?;
    read::<i32, _>(backend, "positions", positions, pr, |pv| {
        write::<T, _>(backend, "q", q, qr, |mut qv| {
            write::<T, _>(backend, "k", k, kr, |mut kv| {
                let qk = QkMut {
                    q: &mut qv,
                    k: &mut kv,
                };
                rope_op::apply_in_place(
                    backend,
                    rope,
                    Angles::Computed(freqs),
                    Positions::PerToken(&pv),
                    qk,
                )
            })
        })
    })
}
