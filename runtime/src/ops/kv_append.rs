//! KV append: write the new keys and values of a step into the paged (or ragged) cache that the
//! attention wrappers read, and the fused form that also applies RoPE to the new keys on their way
//! in and to the queries in place.
//!
//! Two ways to say where each new token goes:
//! - [`AppendPlan`]: built on the host from the step's validated [`KvIndex`] (the index *after*
//!   the append, as the attention plan of the same step uses it) and the new tokens' `qo_indptr`;
//!   each request's new tokens are its last ones. Every slot is checked and computed on the host
//!   and uploaded once; [`AppendPlan::replan`] rewrites the same device buffers, so a CUDA graph
//!   that captured [`AppendPlan::run`] stays valid. Runs allocate nothing.
//! - [`append_explicit`]: FlashInfer's `append_paged_kv_cache` form, with device arrays (request
//!   and position of every new token, and the page table). The host cannot read them without a
//!   synchronisation, so the GPU kernel checks every index against the bounds the host knows
//!   (batch, page table length, page count, each request's length) and skips a token that fails
//!   any check: it writes nothing for it, never out of bounds. The CPU backend returns an error
//!   naming the token instead.
//!
//! Keys and values are `[rows, num_kv_heads, head_dim]`; the cache is K and V as the attention
//! wrappers take them (`[num_pages, page_size, num_kv_heads, head_dim]` for NHD,
//! `[num_pages, num_kv_heads, page_size, head_dim]` for HND). One kernel (`cuda/ops/rope.cuh`)
//! does RoPE, append and both at once.
//!
//! ```
//! use ferrinfer_runtime::ops::kv_append::{AppendPlan, KvCacheMut, NewKv};
//! use ferrinfer_runtime::{Backend, Heads, KvIndex, KvLayout, prelude::bf16};
//! # fn main() -> ferrinfer_runtime::Result<()> {
//! let backend = Backend::Cpu;
//! let heads = Heads::new(2, 1, 4)?;
//! // Two requests on pages of 2 tokens; after this step they hold 3 and 1 tokens.
//! let kv = KvIndex::paged_from_lens(2, &[3, 1], &[5, 0, 2], 6, KvLayout::Nhd)?;
//! // Request 0 appends 2 tokens (positions 1 and 2), request 1 appends 1 (position 0).
//! let plan = AppendPlan::new(&backend, heads, &kv, &[0, 2, 3], 8)?;
//! let new_k = backend.upload(&vec![bf16::ONE; 3 * 4])?;
//! let new_v = backend.upload(&vec![bf16::ONE; 3 * 4])?;
//! let mut k_cache = backend.filled(kv.buffer_len(&heads), bf16::ZERO)?;
//! let mut v_cache = backend.filled(kv.buffer_len(&heads), bf16::ZERO)?;
//! plan.run(&backend, NewKv { k: &new_k, v: &new_v }, KvCacheMut { k: &mut k_cache, v: &mut v_cache })?;
//! let k = k_cache.to_vec()?;
//! // Position 1 of request 0 is slot 1 of page 5; position 2 is slot 0 of page 0.
//! assert_eq!(k[(5 * 2 + 1) * 4], bf16::ONE);
//! assert_eq!(k[0], bf16::ONE);
//! assert_eq!(k[5 * 2 * 4], bf16::ZERO); // position 0 of request 0 was there before
//! # Ok(()) }
//! ```

use ferrinfer_kernels::ops::rope::{RopeArgs, SLOT_EXPLICIT, SLOT_PLANNED};

use crate::attention::batch::{Heads, KvIndex, KvLayout, KvStrides, disjoint, extent};
use crate::device::backend::{Backend, Buffer};
use crate::device::dtype::Element;
use crate::device::view::{Dst, Src};
use crate::error::{Error, Result};
use crate::ops::rope::{self, Angles, HostAngles, Rope, RopeLayout, RowStrides};

/// The new keys and values, each `[rows, num_kv_heads, head_dim]`.
#[derive(Debug)]
pub struct NewKv<'a, T: Element> {
    /// Keys.
    pub k: &'a dyn Src<T>,
    /// Values.
    pub v: &'a dyn Src<T>,
}

/// The K and V caches written.
#[derive(Debug)]
pub struct KvCacheMut<'a, T: Element> {
    /// Keys.
    pub k: &'a mut dyn Dst<T>,
    /// Values.
    pub v: &'a mut dyn Dst<T>,
}

/// Where each new token of a step goes, computed and checked on the host and held on the backend.
///
/// Built by [`AppendPlan::new`] for at most `capacity` new tokens; [`AppendPlan::replan`] moves
/// it to the next step in place. A run may pass more rows than the step has (up to the capacity,
/// e.g. a CUDA graph's padded batch): rows past [`AppendPlan::tokens`] are not written to the
/// cache, and their queries (in [`AppendPlan::run_with_rope`]) turn as position 0. What a CUDA
/// graph freezes is pinned: heads, the cache's layout, page size and size; a replan that changes
/// them is refused. Runs only read the plan (`&self`); a replan needs `&mut self`, so no run can
/// overlap it on the host (on the device, the stream orders the replan's copy after queued runs).
#[derive(Debug)]
pub struct AppendPlan {
    heads: Heads,
    layout: KvLayout,
    page_size: Option<u32>,
    cache_len: usize,
    /// The caller gave the cache's strides: caches may be longer than `cache_len`.
    custom: bool,
    strides: KvStrides,
    /// Row strides of the new q, k and v.
    rows: RowStrides,
    tokens: u32,
    capacity: u32,
    /// `[capacity]`: element offset of head 0 of each new token's slot; `u64::MAX` past `tokens`.
    slots: Buffer<u64>,
    /// `[capacity]`: each new token's position in its request (0 past `tokens`).
    positions: Buffer<i32>,
}

impl AppendPlan {
    /// A plan for `capacity` new tokens at most, placed by `kv` (the cache index after the append)
    /// and `qo_indptr` (`[batch + 1]`: request `b`'s new tokens are rows
    /// `qo_indptr[b]..qo_indptr[b + 1]`, and they are its last ones). Allocates its two buffers.
    ///
    /// Errors: a `qo_indptr` of the wrong length, not starting at 0, decreasing, past the
    /// capacity, or giving a request more new tokens than its KV length.
    pub fn new(
        backend: &Backend,
        heads: Heads,
        kv: &KvIndex,
        qo_indptr: &[i32],
        capacity: u32,
    ) -> Result<Self> {
        if capacity > i32::MAX as u32 {
            return Err(Error::invalid(format!(
                "kv append: capacity = {capacity} must be below 2^31"
            )));
        }
        kv.check_strides(&heads)?;
        let (slots, positions) = place(heads, kv, qo_indptr, capacity)?;
        Ok(AppendPlan {
            heads,
            layout: kv.layout(),
            page_size: kv.page_size(),
            cache_len: kv.buffer_len(&heads),
            custom: kv.has_custom_strides(),
            strides: kv.strides(&heads),
            rows: RowStrides::dense(&heads),
            tokens: (qo_indptr[qo_indptr.len() - 1]) as u32,
            capacity,
            slots: backend.upload(&slots)?,
            positions: backend.upload(&positions)?,
        })
    }

    /// Move the plan to another step: the same checks as [`AppendPlan::new`], and the same heads
    /// and cache (layout, page size, size) as the plan was built for. Rewrites the plan's buffers
    /// in place (their addresses stay, so a captured CUDA graph stays valid); it waits for the copy.
    pub fn replan(&mut self, kv: &KvIndex, qo_indptr: &[i32]) -> Result<()> {
        kv.check_strides(&self.heads)?;
        let cache_len = kv.buffer_len(&self.heads);
        if kv.layout() != self.layout
            || kv.page_size() != self.page_size
            || cache_len != self.cache_len
            || kv.strides(&self.heads) != self.strides
        {
            return Err(Error::invalid(format!(
                "kv append replan: the cache is {:?}, page size {:?}, {cache_len} elements, \
                 strides {:?}; the plan was built for {:?}, page size {:?}, {} elements, strides \
                 {:?}",
                kv.layout(),
                kv.page_size(),
                kv.strides(&self.heads),
                self.layout,
                self.page_size,
                self.cache_len,
                self.strides
            )));
        }
        let (slots, positions) = place(self.heads, kv, qo_indptr, self.capacity)?;
        self.slots.copy_from(&slots)?;
        self.positions.copy_from(&positions)?;
        self.tokens = qo_indptr[qo_indptr.len() - 1] as u32;
        Ok(())
    }

    /// New tokens of the current step.
    pub fn tokens(&self) -> u32 {
        self.tokens
    }
    /// The most new tokens a step (and a run's rows) may have.
    pub fn capacity(&self) -> u32 {
        self.capacity
    }
    /// Heads the plan was built for.
    pub fn heads(&self) -> Heads {
        self.heads
    }
    /// `[capacity]` i32: each new token's position in its request (0 past [`AppendPlan::tokens`]),
    /// e.g. for [`rope::Positions::PerToken`].
    pub fn positions(&self) -> &Buffer<i32> {
        &self.positions
    }

    /// With the new tokens' q (for [`AppendPlan::run_with_rope`]), k and v read at these row
    /// strides instead of densely, e.g. all three inside one fused QKV buffer
    /// ([`RowStrides::fused_qkv`]). A run then takes as many rows as the new k holds whole.
    /// Errors: a stride below its row width (rows would overlap).
    ///
    /// ```
    /// use ferrinfer_runtime::ops::{kv_append::AppendPlan, rope::RowStrides};
    /// use ferrinfer_runtime::{Backend, Heads, KvIndex, KvLayout};
    /// # fn main() -> ferrinfer_runtime::Result<()> {
    /// let heads = Heads::new(2, 1, 8)?;
    /// let kv = KvIndex::paged_from_lens(2, &[3], &[1, 0], 2, KvLayout::Nhd)?;
    /// let plan = AppendPlan::new(&Backend::Cpu, heads, &kv, &[0, 1], 1)?
    ///     .with_row_strides(RowStrides::fused_qkv(&heads))?;
    /// assert_eq!(plan.row_strides().k, 32);
    /// # Ok(()) }
    /// ```
    pub fn with_row_strides(mut self, rows: RowStrides) -> Result<Self> {
        rows.check("kv append", "new ", &self.heads)?;
        self.rows = rows;
        Ok(self)
    }
    /// Row strides of the new q, k and v (dense unless [`AppendPlan::with_row_strides`] said
    /// otherwise).
    pub fn row_strides(&self) -> RowStrides {
        self.rows
    }

    /// Write `new` into `cache` at the planned slots. Asynchronous on a GPU; no allocation.
    ///
    /// Errors: K and V of different rows or not whole rows, fewer rows than the step's tokens
    /// or more than the capacity, a cache of another size than planned, a buffer of another
    /// backend.
    pub fn run<T: Element>(
        &self,
        backend: &Backend,
        new: NewKv<'_, T>,
        cache: KvCacheMut<'_, T>,
    ) -> Result<()> {
        let rows = self.check(&new, &cache)?;
        let target = Target::from(cache);
        self.write(backend, rows, &new, target, None)
    }

    /// [`AppendPlan::run`] into one interleaved cache (`[num_pages, 2, page_size, num_kv_heads,
    /// head_dim]`, K then V in each page; HND swaps the middle two), for a plan built on
    /// [`KvIndex::interleaved`]. Asynchronous on a GPU; no allocation.
    ///
    /// Errors as [`AppendPlan::run`], and a plan whose index is not interleaved.
    ///
    /// ```
    /// use ferrinfer_runtime::ops::kv_append::{AppendPlan, NewKv};
    /// use ferrinfer_runtime::{Backend, Heads, KvIndex, KvLayout, ViewMut, prelude::bf16};
    /// # fn main() -> ferrinfer_runtime::Result<()> {
    /// let backend = Backend::Cpu;
    /// let heads = Heads::new(2, 1, 8)?;
    /// // One request of 3 tokens on pages 1 and 0 (2 tokens each); it appends its last token.
    /// let kv = KvIndex::paged_from_lens(2, &[3], &[1, 0], 2, KvLayout::Nhd)?.interleaved(&heads)?;
    /// let plan = AppendPlan::new(&backend, heads, &kv, &[0, 1], 1)?;
    /// let (k, v) = (backend.upload(&[bf16::ONE; 8])?, backend.upload(&[bf16::MAX; 8])?);
    /// let mut cache = vec![bf16::ZERO; 2 * 2 * 2 * 8];
    /// plan.run_interleaved(&backend, NewKv { k: &k, v: &v }, &mut ViewMut::host(&mut cache))?;
    /// // Position 2 is slot 0 of page 0: K at element 0, V one page of K later.
    /// assert_eq!((cache[0], cache[2 * 8]), (bf16::ONE, bf16::MAX));
    /// # Ok(()) }
    /// ```
    pub fn run_interleaved<T: Element>(
        &self,
        backend: &Backend,
        new: NewKv<'_, T>,
        cache: &mut dyn Dst<T>,
    ) -> Result<()> {
        let rows = self.check_new(&new)?;
        let target = self.interleaved_target(cache)?;
        self.write(backend, rows, &new, target, None)
    }

    /// [`AppendPlan::run`] that also turns the new keys by `rope` at their KV positions on the way
    /// into the cache, and `q` (`[rows, num_qo_heads, head_dim]`, or rows at the plan's
    /// [`RowStrides`], the same rows as k) in place. Row strides are the plan's
    /// ([`AppendPlan::with_row_strides`]); the rope's must be dense. Asynchronous on a GPU; no
    /// allocation.
    ///
    /// Errors as [`AppendPlan::run`], a `rope` of other heads than the plan's or with row
    /// strides, a `q` of other rows, a bad cos/sin cache; on the CPU backend also a position
    /// outside the cache (the GPU writes NaN in that token's rotated dims).
    pub fn run_with_rope<T: Element>(
        &self,
        backend: &Backend,
        rope: &Rope,
        angles: Angles<'_>,
        q: &mut dyn Dst<T>,
        new: NewKv<'_, T>,
        cache: KvCacheMut<'_, T>,
    ) -> Result<()> {
        let rows = self.check(&new, &cache)?;
        self.check_rope(rope, rows, &*q)?;
        let target = Target::from(cache);
        self.write(backend, rows, &new, target, Some((rope, angles, q)))
    }

    /// [`AppendPlan::run_with_rope`] into one interleaved cache, as
    /// [`AppendPlan::run_interleaved`] writes it. Asynchronous on a GPU; no allocation.
    ///
    /// Errors as [`AppendPlan::run_with_rope`], and a plan whose index is not interleaved.
    ///
    /// ```
    /// use ferrinfer_runtime::ops::kv_append::{AppendPlan, NewKv};
    /// use ferrinfer_runtime::ops::rope::{Angles, Frequencies, Rope, RopeLayout, RowStrides};
    /// use ferrinfer_runtime::{Backend, Heads, KvIndex, KvLayout, View, ViewMut, prelude::bf16};
    /// # fn main() -> ferrinfer_runtime::Result<()> {
    /// let backend = Backend::Cpu;
    /// let heads = Heads::new(2, 1, 8)?;
    /// let kv = KvIndex::paged_from_lens(2, &[3], &[1, 0], 2, KvLayout::Nhd)?.interleaved(&heads)?;
    /// // One new token in a fused [1, (2 + 1 + 1) * 8] QKV row: q, then k, then v.
    /// let plan = AppendPlan::new(&backend, heads, &kv, &[0, 1], 1)?
    ///     .with_row_strides(RowStrides::fused_qkv(&heads))?;
    /// let qkv = vec![bf16::ONE; 4 * 8];
    /// let mut q = qkv[..16].to_vec();
    /// let (k, v) = (View::host(&qkv).slice(16..)?, View::host(&qkv).slice(24..)?);
    /// let mut cache = vec![bf16::ZERO; 2 * 2 * 2 * 8];
    /// let rope = Rope::new(heads, 8, RopeLayout::NeoX)?;
    /// let angles = Angles::Computed(Frequencies::new(1e4)?);
    /// plan.run_with_rope_interleaved(&backend, &rope, angles, &mut ViewMut::host(&mut q),
    ///     NewKv { k: &k, v: &v }, &mut ViewMut::host(&mut cache))?;
    /// // Position 2 turned K's first pair; V is copied one page of K later.
    /// assert_ne!(cache[0], bf16::ONE);
    /// assert_eq!(cache[2 * 8], bf16::ONE);
    /// # Ok(()) }
    /// ```
    pub fn run_with_rope_interleaved<T: Element>(
        &self,
        backend: &Backend,
        rope: &Rope,
        angles: Angles<'_>,
        q: &mut dyn Dst<T>,
        new: NewKv<'_, T>,
        cache: &mut dyn Dst<T>,
    ) -> Result<()> {
        let rows = self.check_new(&new)?;
        self.check_rope(rope, rows, &*q)?;
        let target = self.interleaved_target(cache)?;
        self.write(backend, rows, &new, target, Some((rope, angles, q)))
    }

    /// The interleaved cache as K from its start and V from one page of K on, checked.
    fn interleaved_target<'x, T: Element>(
        &self,
        cache: &'x mut dyn Dst<T>,
    ) -> Result<Target<'x, T>> {
        let v_off = self.interleaved_v_offset().ok_or_else(|| {
            Error::invalid(format!(
                "kv append: an interleaved run needs a plan built on KvIndex::interleaved; its \
                 strides are {:?}",
                self.strides
            ))
        })?;
        // K reaches `cache_len`, V the same from `v_off`.
        self.check_cache("cache", cache.len().saturating_sub(v_off))?;
        Ok(Target::interleaved(cache, v_off))
    }

    /// Elements from K to V when the plan's strides are an interleaved cache's.
    fn interleaved_v_offset(&self) -> Option<usize> {
        let p = u64::from(self.page_size?);
        let (hk, d) = (
            u64::from(self.heads.num_kv_heads()),
            u64::from(self.heads.head_dim()),
        );
        let (token, head) = match self.layout {
            KvLayout::Nhd => (hk * d, d),
            KvLayout::Hnd => (d, p * d),
        };
        let s = self.strides;
        (s.block == 2 * p * hk * d && s.token == token && s.head == head)
            .then_some((p * hk * d) as usize)
    }

    /// Check a fused run's rope and q against the plan and the run's rows.
    fn check_rope<T: Element>(&self, rope: &Rope, rows: u32, q: &dyn Dst<T>) -> Result<()> {
        if rope.heads() != self.heads {
            return Err(Error::invalid(format!(
                "kv append: rope is for {:?} but the plan for {:?}",
                rope.heads(),
                self.heads
            )));
        }
        let dense = RowStrides::dense(&self.heads);
        if rope.row_strides() != (dense, dense) {
            return Err(Error::invalid(format!(
                "kv append: the rope has row strides {:?}; a fused run takes q's, k's and v's \
                 from the plan (AppendPlan::with_row_strides), so the rope's must be dense",
                rope.row_strides()
            )));
        }
        let wq = u64::from(self.heads.num_qo_heads()) * u64::from(self.heads.head_dim());
        rope::check_rows("kv append", "q", q.len(), rows, self.rows.q, wq)
    }

    /// Check a run's buffers; returns its rows.
    fn check<T: Element>(&self, new: &NewKv<'_, T>, cache: &KvCacheMut<'_, T>) -> Result<u32> {
        let rows = self.check_new(new)?;
        for (name, len) in [("k_cache", cache.k.len()), ("v_cache", cache.v.len())] {
            self.check_cache(name, len)?;
        }
        Ok(rows)
    }

    /// Check the new K and V; returns their rows (those k holds, at its row stride).
    fn check_new<T: Element>(&self, new: &NewKv<'_, T>) -> Result<u32> {
        let row = u64::from(self.heads.num_kv_heads()) * u64::from(self.heads.head_dim());
        let dense = self.rows.k == row && self.rows.v == row;
        if dense && new.k.len() != new.v.len() {
            return Err(Error::invalid(format!(
                "kv append: new k has {} and v {} elements; both must be [rows, num_kv_heads x \
                 head_dim = {row}] with {} to {} rows",
                new.k.len(),
                new.v.len(),
                self.tokens,
                self.capacity
            )));
        }
        let rows = rope::rows_held("kv append", "new k", new.k.len(), self.rows.k, row)?;
        rope::check_rows("kv append", "new v", new.v.len(), rows, self.rows.v, row)?;
        if rows < self.tokens || rows > self.capacity {
            return Err(Error::invalid(format!(
                "kv append: new k and v hold {rows} rows of num_kv_heads x head_dim = {row} (at \
                 row strides {} and {}); the plan takes them with {} to {} rows",
                self.rows.k, self.rows.v, self.tokens, self.capacity
            )));
        }
        Ok(rows)
    }

    /// A cache of `len` elements: exactly the planned size, or at least it with custom strides.
    fn check_cache(&self, name: &str, len: usize) -> Result<()> {
        if (self.custom && len < self.cache_len) || (!self.custom && len != self.cache_len) {
            return Err(Error::invalid(format!(
                "kv append: {name} has {len} elements; the plan's cache has {}{}",
                if self.custom { "at least " } else { "" },
                self.cache_len
            )));
        }
        Ok(())
    }

    /// Every run, once checked: the new K (turned by `rope`, with q in place, when given) and V
    /// of `rows` rows into their planned slots of `target`.
    fn write<T: Element>(
        &self,
        backend: &Backend,
        rows: u32,
        new: &NewKv<'_, T>,
        target: Target<'_, T>,
        rope: Option<(&Rope, Angles<'_>, &mut dyn Dst<T>)>,
    ) -> Result<()> {
        match backend {
            Backend::Cpu => {
                let key: Box<KeyFn<T>> = match rope {
                    None => Box::new(|_, k: &[T]| Ok(k.to_vec())),
                    Some((rope, angles, q)) => {
                        let cs = self.rotate_q_host(rope, angles, rows, q)?;
                        let (layout, d) = (rope.layout(), self.heads.head_dim() as usize);
                        Box::new(move |t, k: &[T]| {
                            let mut out = k.to_vec();
                            for (x, o) in k.chunks(d).zip(out.chunks_mut(d)) {
                                rope::rotate_head(layout, &cs[t], x, o);
                            }
                            Ok(out)
                        })
                    }
                };
                match target.v {
                    Some(v) => {
                        let (kc, vc) = (target.k.host_mut()?, v.host_mut()?);
                        self.write_slots(rows, new, key, |at, k, v| {
                            kc[at..at + k.len()].copy_from_slice(k);
                            vc[at..at + v.len()].copy_from_slice(v);
                        })
                    }
                    None => {
                        let (c, off) = (target.k.host_mut()?, target.v_off);
                        self.write_slots(rows, new, key, |at, k, v| {
                            c[at..at + k.len()].copy_from_slice(k);
                            c[off + at..off + at + v.len()].copy_from_slice(v);
                        })
                    }
                }
            }
            Backend::Cuda(gpu) => {
                let kc = target.k.device_ptr(gpu)?;
                let vc = match target.v {
                    Some(v) => v.device_ptr(gpu)?,
                    None => kc + (target.v_off * size_of::<T>()) as u64,
                };
                let (hq, hk) = (self.heads.num_qo_heads(), self.heads.num_kv_heads());
                let mut args = RopeArgs {
                    src: [0, new.k.device_ptr(gpu)?, new.v.device_ptr(gpu)?],
                    dst: [0, kc, vc],
                    src_row: [0, self.rows.k, self.rows.v],
                    heads: [0, hk, hk],
                    slots: self.slots.device_ptr(gpu)?,
                    kv_head_stride: self.strides.head,
                    // Unused by planned slots; `rope::launch` picks a vector width that they
                    // keep aligned.
                    kv_page_stride: self.strides.block,
                    kv_token_stride: self.strides.token,
                    tokens: rows,
                    head_dim: self.heads.head_dim(),
                    slot_mode: SLOT_PLANNED,
                    ..RopeArgs::default()
                };
                let mut layout = RopeLayout::NeoX;
                if let Some((rope, angles, q)) = rope {
                    let qp = q.device_ptr(gpu)?;
                    let positions = rope::Positions::PerToken(&self.positions);
                    let base =
                        rope::rope_args(gpu, rope, angles, positions, rows, [qp, 0], [qp, 0])?;
                    args = RopeArgs {
                        src: [qp, args.src[1], args.src[2]],
                        dst: [qp, kc, vc],
                        src_row: [self.rows.q, self.rows.k, self.rows.v],
                        dst_row: [self.rows.q, 0, 0],
                        heads: [hq, hk, hk],
                        rotary_dim: rope.rotary_dim(),
                        rotate_mask: 0b11,
                        ..RopeArgs {
                            positions: base.positions,
                            cos_sin: base.cos_sin,
                            max_position: base.max_position,
                            ln_theta: base.ln_theta,
                            rcp_scale: base.rcp_scale,
                            rcp_factor: base.rcp_factor,
                            smooth_a: base.smooth_a,
                            smooth_b: base.smooth_b,
                            ..args
                        }
                    };
                    layout = rope.layout();
                }
                // SAFETY: `check_new` made k and v hold `rows` rows at the plan's row strides, at
                // most the capacity (the length of `slots` and of the plan's positions); the
                // cache checks (`check`, or `interleaved_target`: the cache holds `v_off` plus
                // the planned extent) made K's cache and V's (from `v_off` when interleaved)
                // hold the planned KvIndex's buffer length, and every slot `place` wrote is that
                // KvIndex's offset of a valid (request, position), so slot + head * head stride
                // + head_dim stays inside them (rows past the step's tokens have slot u64::MAX,
                // which the kernel skips); interleaved strides keep K's and V's elements apart.
                // With a rope, `check_rope` made q hold `rows` rows at the plan's q stride and
                // `rope_args` read the cos/sin cache's length.
                unsafe { rope::launch::<T>(gpu, layout, args) }
            }
        }
    }

    /// The CPU backend's fused run: every row's angles first (a bad position leaves q and the
    /// cache untouched), then q turned in place; returns the angles for the keys.
    fn rotate_q_host<T: Element>(
        &self,
        rope: &Rope,
        angles: Angles<'_>,
        rows: u32,
        q: &mut dyn Dst<T>,
    ) -> Result<Vec<Vec<(f64, f64)>>> {
        let host = HostAngles::new(rope, angles)?;
        let pos = self.positions.host()?;
        let cs = (0..rows as usize)
            .map(|t| host.at(t, i64::from(pos[t])))
            .collect::<Result<Vec<_>>>()?;
        let (d, hq) = (
            self.heads.head_dim() as usize,
            self.heads.num_qo_heads() as usize,
        );
        let q = q.host_mut()?;
        for (t, cs) in cs.iter().enumerate() {
            for h in 0..hq {
                let at = t * self.rows.q as usize + h * d;
                let x = q[at..at + d].to_vec();
                rope::rotate_head(rope.layout(), cs, &x, &mut q[at..at + d]);
            }
        }
        Ok(cs)
    }

    /// Each planned token's K and V head rows with their slot offsets, to `put`.
    fn write_slots<T: Element>(
        &self,
        rows: u32,
        new: &NewKv<'_, T>,
        key: impl Fn(usize, &[T]) -> Result<Vec<T>>,
        mut put: impl FnMut(usize, &[T], &[T]),
    ) -> Result<()> {
        let slots = self.slots.host()?;
        let (nk, nv) = (new.k.host()?, new.v.host()?);
        let (hk, d) = (
            self.heads.num_kv_heads() as usize,
            self.heads.head_dim() as usize,
        );
        let (sk, sv) = (self.rows.k as usize, self.rows.v as usize);
        for t in 0..(rows.min(self.tokens) as usize) {
            let k = key(t, &nk[t * sk..][..hk * d])?;
            let v = &nv[t * sv..][..hk * d];
            for h in 0..hk {
                let at = (slots[t] + h as u64 * self.strides.head) as usize;
                put(at, &k[h * d..][..d], &v[h * d..][..d]);
            }
        }
        Ok(())
    }
}

/// What a host run does to a new key row (token index, row): copy it, or turn it.
type KeyFn<'a, T> = dyn Fn(usize, &[T]) -> Result<Vec<T>> + 'a;

/// Where a host append puts one head: (K's cache offset, its K, its V).
type PutFn<'a, T> = dyn FnMut(usize, &[T], &[T]) + 'a;

/// Where a run writes: K's cache and V's, or one interleaved cache (`v: None`) with V `v_off`
/// elements after K.
struct Target<'x, T: Element> {
    k: &'x mut dyn Dst<T>,
    v: Option<&'x mut dyn Dst<T>>,
    v_off: usize,
}

impl<'x, T: Element> From<KvCacheMut<'x, T>> for Target<'x, T> {
    fn from(cache: KvCacheMut<'x, T>) -> Self {
        Target {
            k: cache.k,
            v: Some(cache.v),
            v_off: 0,
        }
    }
}

impl<'x, T: Element> Target<'x, T> {
    /// One interleaved cache, V `v_off` elements after K in each page.
    fn interleaved(cache: &'x mut dyn Dst<T>, v_off: usize) -> Self {
        Target {
            k: cache,
            v: None,
            v_off,
        }
    }
}

/// Slots and positions of the new tokens (`capacity` entries each), checked.
fn place(
    heads: Heads,
    kv: &KvIndex,
    qo_indptr: &[i32],
    capacity: u32,
) -> Result<(Vec<u64>, Vec<i32>)> {
    let batch = kv.batch();
    if qo_indptr.len() != batch + 1 {
        return Err(Error::invalid(format!(
            "kv append: qo_indptr has {} entries for a batch of {batch} (needs batch + 1)",
            qo_indptr.len()
        )));
    }
    if qo_indptr[0] != 0 {
        return Err(Error::invalid(format!(
            "kv append: qo_indptr[0] must be 0, got {}",
            qo_indptr[0]
        )));
    }
    let mut slots = vec![u64::MAX; capacity as usize];
    let mut positions = vec![0i32; capacity as usize];
    for b in 0..batch {
        let (first, end) = (qo_indptr[b], qo_indptr[b + 1]);
        if end < first {
            return Err(Error::invalid(format!(
                "kv append: qo_indptr must not decrease: qo_indptr[{b}] = {first} > \
                 qo_indptr[{}] = {end}",
                b + 1
            )));
        }
        if end as u32 > capacity {
            return Err(Error::invalid(format!(
                "kv append: qo_indptr[{}] = {end} new tokens exceed the plan's capacity of \
                 {capacity}",
                b + 1
            )));
        }
        let (n, len) = ((end - first) as u32, kv.kv_len(b));
        if n > len {
            return Err(Error::invalid(format!(
                "kv append: request {b} appends {n} tokens but holds only {len} after the append"
            )));
        }
        for i in 0..n {
            let j = len - n + i;
            let t = (first as u32 + i) as usize;
            slots[t] = kv.offset(&heads, b, j, 0) as u64;
            positions[t] = j as i32;
        }
    }
    Ok((slots, positions))
}

/// FlashInfer's page table, as device arrays: new token `t` belongs to request
/// `batch_indices[t]` at position `positions[t]`; request `b`'s pages are
/// `kv_indices[kv_indptr[b]..kv_indptr[b + 1]]`, its last page holding `kv_last_page_len[b]`
/// tokens (the request's length includes the new tokens).
#[derive(Clone, Copy, Debug)]
pub struct PageTable<'a> {
    /// `[rows]` request of each new token.
    pub batch_indices: &'a dyn Src<i32>,
    /// `[rows]` position of each new token in its request.
    pub positions: &'a dyn Src<i32>,
    /// `[batch + 1]` page ranges.
    pub kv_indptr: &'a dyn Src<i32>,
    /// Page ids.
    pub kv_indices: &'a dyn Src<i32>,
    /// `[batch]` tokens in each request's last page.
    pub kv_last_page_len: &'a dyn Src<i32>,
}

/// The cache's geometry for [`append_explicit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PagedCache {
    /// Heads (only the KV heads and head dim are used).
    pub heads: Heads,
    /// Tokens per page (at least 1).
    pub page_size: u32,
    /// Token/head order inside a page.
    pub layout: KvLayout,
}

/// Write `new` (`[rows, num_kv_heads, head_dim]`) into a paged `cache` where `table` says.
/// Asynchronous on a GPU; no allocation. The GPU kernel skips (writes nothing for) a token whose
/// request, position or page is out of range; the CPU backend returns an error naming it.
///
/// Errors: lengths that do not match (named), a cache that is not whole pages, a page size of 0,
/// a buffer of another backend.
pub fn append_explicit<T: Element>(
    backend: &Backend,
    geometry: PagedCache,
    table: PageTable<'_>,
    new: NewKv<'_, T>,
    cache: KvCacheMut<'_, T>,
) -> Result<()> {
    let target = Target::from(cache);
    explicit(backend, geometry, None, table, new, target)
}

/// [`append_explicit`] into K and V caches at the caller's element `strides` (padded pages, a
/// cache inside a larger tensor): page `p`, slot `s`, head `h` is at `p * block + s * token +
/// h * head`. The caches' pages are those that fit both; the GPU skips a token whose page is past
/// them. Asynchronous on a GPU; no allocation.
///
/// Errors as [`append_explicit`], and strides that make two elements of a page table's cache
/// alias (a block stride of 0, pages or heads that overlap).
///
/// ```
/// use ferrinfer_runtime::ops::kv_append::{self, KvCacheMut, NewKv, PageTable, PagedCache};
/// use ferrinfer_runtime::{Backend, Heads, KvLayout, ViewMut, attention::KvStrides, prelude::bf16};
/// # fn main() -> ferrinfer_runtime::Result<()> {
/// let cpu = Backend::Cpu;
/// let heads = Heads::new(2, 1, 4)?;
/// let geometry = PagedCache { heads, page_size: 2, layout: KvLayout::Nhd };
/// // Pages padded from 8 to 12 elements; 2 pages.
/// let strides = KvStrides { block: 12, token: 4, head: 4 };
/// let (bi, pos) = (cpu.upload(&[0i32])?, cpu.upload(&[2i32])?);
/// let (indptr, indices, last) =
///     (cpu.upload(&[0i32, 2])?, cpu.upload(&[1i32, 0])?, cpu.upload(&[1i32])?);
/// let table = PageTable { batch_indices: &bi, positions: &pos, kv_indptr: &indptr,
///     kv_indices: &indices, kv_last_page_len: &last };
/// let (k, v) = (cpu.upload(&[bf16::ONE; 4])?, cpu.upload(&[bf16::MAX; 4])?);
/// let (mut kc, mut vc) = (vec![bf16::ZERO; 20], vec![bf16::ZERO; 20]);
/// kv_append::append_explicit_strided(&cpu, geometry, strides, table, NewKv { k: &k, v: &v },
///     KvCacheMut { k: &mut ViewMut::host(&mut kc), v: &mut ViewMut::host(&mut vc) })?;
/// // Position 2 is slot 0 of the request's second page, page 0.
/// assert_eq!((kc[0], vc[3]), (bf16::ONE, bf16::MAX));
/// # Ok(()) }
/// ```
pub fn append_explicit_strided<T: Element>(
    backend: &Backend,
    geometry: PagedCache,
    strides: KvStrides,
    table: PageTable<'_>,
    new: NewKv<'_, T>,
    cache: KvCacheMut<'_, T>,
) -> Result<()> {
    let target = Target::from(cache);
    explicit(backend, geometry, Some(strides), table, new, target)
}

/// [`append_explicit`] into one interleaved cache (`[num_pages, 2, page_size, num_kv_heads,
/// head_dim]`, K then V in each page; HND swaps the middle two), as [`KvIndex::interleaved`]
/// reads it. Asynchronous on a GPU; no allocation.
///
/// Errors as [`append_explicit`]; the cache must be whole interleaved pages.
///
/// ```
/// use ferrinfer_runtime::ops::kv_append::{self, NewKv, PageTable, PagedCache};
/// use ferrinfer_runtime::{Backend, Heads, KvLayout, ViewMut, prelude::bf16};
/// # fn main() -> ferrinfer_runtime::Result<()> {
/// let cpu = Backend::Cpu;
/// let heads = Heads::new(2, 1, 4)?;
/// let geometry = PagedCache { heads, page_size: 2, layout: KvLayout::Nhd };
/// let (bi, pos) = (cpu.upload(&[0i32])?, cpu.upload(&[1i32])?);
/// let (indptr, indices, last) =
///     (cpu.upload(&[0i32, 1])?, cpu.upload(&[1i32])?, cpu.upload(&[2i32])?);
/// let table = PageTable { batch_indices: &bi, positions: &pos, kv_indptr: &indptr,
///     kv_indices: &indices, kv_last_page_len: &last };
/// let (k, v) = (cpu.upload(&[bf16::ONE; 4])?, cpu.upload(&[bf16::MAX; 4])?);
/// // 2 pages of 2 x 2 tokens x 4 elements.
/// let mut cache = vec![bf16::ZERO; 2 * 2 * 2 * 4];
/// kv_append::append_explicit_interleaved(&cpu, geometry, table, NewKv { k: &k, v: &v },
///     &mut ViewMut::host(&mut cache))?;
/// // Slot 1 of page 1: K at 16 + 4, V one page of K (8 elements) later.
/// assert_eq!((cache[20], cache[28]), (bf16::ONE, bf16::MAX));
/// # Ok(()) }
/// ```
pub fn append_explicit_interleaved<T: Element>(
    backend: &Backend,
    geometry: PagedCache,
    table: PageTable<'_>,
    new: NewKv<'_, T>,
    cache: &mut dyn Dst<T>,
) -> Result<()> {
    let (p, hk, d) = (
        u64::from(geometry.page_size),
        u64::from(geometry.heads.num_kv_heads()),
        u64::from(geometry.heads.head_dim()),
    );
    let (token, head) = match geometry.layout {
        KvLayout::Nhd => (hk * d, d),
        KvLayout::Hnd => (d, p * d),
    };
    let page = p * hk * d;
    if page > 0 && !(cache.len() as u64).is_multiple_of(2 * page) {
        return Err(Error::invalid(format!(
            "kv append: the interleaved cache has {} elements; it must be whole pages of \
             2 x {page}",
            cache.len()
        )));
    }
    let strides = KvStrides {
        block: 2 * page,
        token,
        head,
    };
    let target = Target::interleaved(cache, page as usize);
    explicit(backend, geometry, Some(strides), table, new, target)
}

/// The explicit append on any backend: dense caches (`strides: None`) or the caller's strides.
fn explicit<T: Element>(
    backend: &Backend,
    geometry: PagedCache,
    strides: Option<KvStrides>,
    table: PageTable<'_>,
    new: NewKv<'_, T>,
    target: Target<'_, T>,
) -> Result<()> {
    let (hk, d) = (
        geometry.heads.num_kv_heads() as u64,
        geometry.heads.head_dim() as u64,
    );
    let p = u64::from(geometry.page_size);
    let (page, row) = (p * hk * d, (hk * d) as usize);
    let rows = new.k.len() / row.max(1);
    let k_len = target.k.len() as u64;
    let v_len = match &target.v {
        Some(v) => v.len() as u64,
        None => k_len.saturating_sub(target.v_off as u64),
    };
    let mut bad = None;
    if geometry.page_size == 0 {
        bad = Some("page_size must be at least 1".to_string());
    } else if new.k.len() != new.v.len() || !new.k.len().is_multiple_of(row) {
        bad = Some(format!(
            "new k has {} and v {} elements; both must be whole rows of {row}",
            new.k.len(),
            new.v.len()
        ));
    } else if table.batch_indices.len() != rows || table.positions.len() != rows {
        bad = Some(format!(
            "batch_indices has {} and positions {} entries for {rows} new tokens",
            table.batch_indices.len(),
            table.positions.len()
        ));
    } else if table.kv_indptr.len() != table.kv_last_page_len.len() + 1 {
        bad = Some(format!(
            "kv_indptr has {} entries and kv_last_page_len {}; they must be [batch + 1] and [batch]",
            table.kv_indptr.len(),
            table.kv_last_page_len.len()
        ));
    } else if strides.is_none() && (k_len != v_len || !k_len.is_multiple_of(page)) {
        bad = Some(format!(
            "k_cache has {k_len} and v_cache {v_len} elements; both must be whole pages of {page}"
        ));
    }
    if let Some(msg) = bad {
        return Err(Error::invalid(format!("kv append: {msg}")));
    }
    let (s, num_pages) = match strides {
        None => {
            let s = match geometry.layout {
                KvLayout::Nhd => KvStrides {
                    block: page,
                    token: hk * d,
                    head: d,
                },
                KvLayout::Hnd => KvStrides {
                    block: page,
                    token: d,
                    head: p * d,
                },
            };
            (s, k_len / page.max(1))
        }
        Some(s) => (s, strided_pages(geometry, s, k_len.min(v_len))?),
    };
    let fits = |n: usize| u32::try_from(n).is_ok_and(|n| n < i32::MAX as u32);
    if !(fits(rows)
        && fits(table.kv_indices.len())
        && fits(table.kv_last_page_len.len())
        && num_pages < i32::MAX as u64)
    {
        return Err(Error::invalid(
            "kv append: more than 2^31 rows, pages or page ids",
        ));
    }
    match backend {
        Backend::Cpu => {
            let (bi, pos) = (table.batch_indices.host()?, table.positions.host()?);
            let (indptr, indices) = (table.kv_indptr.host()?, table.kv_indices.host()?);
            let last = table.kv_last_page_len.host()?;
            let (nk, nv) = (new.k.host()?, new.v.host()?);
            // Every slot first, so that a bad token leaves the cache untouched.
            let slots = (0..rows)
                .map(|t| {
                    let slot = explicit_slot(
                        bi[t],
                        pos[t],
                        indptr,
                        indices,
                        last,
                        geometry.page_size,
                        num_pages,
                    );
                    slot.map(|(page, i)| page * s.block + i * s.token)
                        .ok_or_else(|| {
                            Error::invalid(format!(
                                "kv append: new token {t} (request {}, position {}) is outside \
                                 the page table or the cache",
                                bi[t], pos[t]
                            ))
                        })
                })
                .collect::<Result<Vec<u64>>>()?;
            let d = d as usize;
            // Every (cache offset of K's head, its K row, its V row).
            let each = |put: &mut PutFn<T>| {
                for (t, &at) in slots.iter().enumerate() {
                    for h in 0..hk as usize {
                        let o = (at + h as u64 * s.head) as usize;
                        put(o, &nk[t * row + h * d..][..d], &nv[t * row + h * d..][..d]);
                    }
                }
            };
            match target.v {
                Some(v) => {
                    let (kc, vc) = (target.k.host_mut()?, v.host_mut()?);
                    each(&mut |o, k, v| {
                        kc[o..o + d].copy_from_slice(k);
                        vc[o..o + d].copy_from_slice(v);
                    });
                }
                None => {
                    let (c, off) = (target.k.host_mut()?, target.v_off);
                    each(&mut |o, k, v| {
                        c[o..o + d].copy_from_slice(k);
                        c[off + o..off + o + d].copy_from_slice(v);
                    });
                }
            }
            Ok(())
        }
        Backend::Cuda(gpu) => {
            let kc = target.k.device_ptr(gpu)?;
            let vc = match target.v {
                Some(v) => v.device_ptr(gpu)?,
                None => kc + (target.v_off * size_of::<T>()) as u64,
            };
            let args = RopeArgs {
                src: [0, new.k.device_ptr(gpu)?, new.v.device_ptr(gpu)?],
                dst: [0, kc, vc],
                positions: table.positions.device_ptr(gpu)?,
                batch_indices: table.batch_indices.device_ptr(gpu)?,
                kv_indptr: table.kv_indptr.device_ptr(gpu)?,
                kv_indices: table.kv_indices.device_ptr(gpu)?,
                kv_last_page_len: table.kv_last_page_len.device_ptr(gpu)?,
                kv_page_stride: s.block,
                kv_token_stride: s.token,
                kv_head_stride: s.head,
                tokens: rows as u32,
                heads: [0, hk as u32, hk as u32],
                head_dim: d as u32,
                slot_mode: SLOT_EXPLICIT,
                batch: table.kv_last_page_len.len() as u32,
                page_size: geometry.page_size,
                num_pages: num_pages as u32,
                num_kv_indices: table.kv_indices.len() as u32,
                ..RopeArgs::default()
            };
            // SAFETY: k and v hold `rows` dense rows and the page-table arrays the lengths
            // passed (batch_indices and positions `rows`, kv_indptr `batch + 1`,
            // kv_last_page_len `batch`, kv_indices `num_kv_indices`), checked above; K's cache
            // and V's (from `v_off` when interleaved) hold `num_pages` pages at the strides
            // (whole dense pages, or `strided_pages` counted the pages whose every element fits
            // both); the kernel writes a token only after `explicit_slot` checked its request,
            // position and page against those bounds.
            unsafe { rope::launch::<T>(gpu, RopeLayout::NeoX, args) }
        }
    }
}

/// Pages of `geometry` at strides `s` that fit a cache of `len` elements, checked: no two
/// elements of those pages alias, and they fit the address space.
fn strided_pages(geometry: PagedCache, s: KvStrides, len: u64) -> Result<u64> {
    let (hk, d) = (
        u64::from(geometry.heads.num_kv_heads()),
        u64::from(geometry.heads.head_dim()),
    );
    let in_page = [
        (1, d),
        (s.token, u64::from(geometry.page_size)),
        (s.head, hk),
    ];
    let bad = || {
        Error::invalid(format!(
            "kv append: cache strides {s:?} make two elements of the cache alias or reach past \
             the address space (head_dim {d}, {hk} KV heads, page size {})",
            geometry.page_size
        ))
    };
    let page = extent(&in_page).ok_or_else(bad)?;
    if s.block == 0 || !disjoint(&in_page) {
        return Err(bad());
    }
    let pages = if len < page {
        0
    } else {
        (len - page) / s.block + 1
    };
    let all = [in_page[0], in_page[1], in_page[2], (s.block, pages)];
    if !disjoint(&all) || extent(&all).is_none_or(|e| e > isize::MAX as u64 / 4) {
        return Err(bad());
    }
    Ok(pages)
}

/// `(page, slot in page)` of request `b`'s position `pos`, or `None` when any index is out of
/// range; the checks of `explicit_slot` in kv_append.cuh.
fn explicit_slot(
    b: i32,
    pos: i32,
    indptr: &[i32],
    indices: &[i32],
    last: &[i32],
    page_size: u32,
    num_pages: u64,
) -> Option<(u64, u64)> {
    let b = usize::try_from(b).ok().filter(|&b| b < last.len())?;
    let pos = u64::try_from(pos).ok()?;
    let (first, end) = (indptr[b], indptr[b + 1]);
    if first < 0 || end <= first || end as usize > indices.len() {
        return None;
    }
    let l = last[b];
    if l < 1 || l as u32 > page_size {
        return None;
    }
    let len = (end - first - 1) as u64 * u64::from(page_size) + l as u64;
    if pos >= len {
        return None;
    }
    let page = indices[first as usize + (pos / u64::from(page_size)) as usize];
    let page = u64::try_from(page).ok().filter(|&p| p < num_pages)?;
    Some((page, pos % u64::from(page_size)))
}
