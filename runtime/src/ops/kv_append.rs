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

use crate::attention::batch::{Heads, KvIndex, KvLayout, KvStrides};
use crate::device::backend::{Backend, Buffer};
use crate::device::dtype::Element;
use crate::device::view::{Dst, Src};
use crate::error::{Error, Result};
use crate::ops::rope::{self, Angles, HostAngles, Rope, RopeLayout};

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

    /// Write `new` into `cache` at the planned slots. Asynchronous on a GPU; no allocation.
    ///
    /// Errors: K and V of different lengths or not whole rows, fewer rows than the step's tokens
    /// or more than the capacity, a cache of another size than planned, a buffer of another
    /// backend.
    pub fn run<T: Element>(
        &self,
        backend: &Backend,
        new: NewKv<'_, T>,
        cache: KvCacheMut<'_, T>,
    ) -> Result<()> {
        let rows = self.check(&new, &cache)?;
        match backend {
            Backend::Cpu => self.write_host(rows, &new, cache, |_, k| Ok(k.to_vec())),
            Backend::Cuda(gpu) => {
                let args = RopeArgs {
                    src: [0, new.k.device_ptr(gpu)?, new.v.device_ptr(gpu)?],
                    dst: [0, cache.k.device_ptr(gpu)?, cache.v.device_ptr(gpu)?],
                    heads: [0, self.heads.num_kv_heads(), self.heads.num_kv_heads()],
                    ..self.args(gpu, rows)?
                };
                // SAFETY: `check` made k and v `rows` rows, at most the capacity (the length of
                // `slots`), and each cache exactly the planned KvIndex's buffer length; every
                // slot `place` wrote is that KvIndex's offset of a valid (request, position), so
                // slot + head * head stride + head_dim stays inside the cache, and rows past the
                // step's tokens have slot u64::MAX, which the kernel skips.
                unsafe { rope::launch::<T>(gpu, RopeLayout::NeoX, args) }
            }
        }
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
        let v_off = self.interleaved_v_offset().ok_or_else(|| {
            Error::invalid(format!(
                "kv append: run_interleaved needs a plan built on KvIndex::interleaved; its \
                 strides are {:?}",
                self.strides
            ))
        })?;
        // K reaches `cache_len`, V the same from `v_off`.
        self.check_cache("cache", cache.len().saturating_sub(v_off))?;
        match backend {
            Backend::Cpu => {
                let c = cache.host_mut()?;
                self.write_slots(
                    rows,
                    &new,
                    |_, k| Ok(k.to_vec()),
                    |at, k, v| {
                        c[at..at + k.len()].copy_from_slice(k);
                        c[v_off + at..v_off + at + v.len()].copy_from_slice(v);
                    },
                )
            }
            Backend::Cuda(gpu) => {
                let c = cache.device_ptr(gpu)?;
                let args = RopeArgs {
                    src: [0, new.k.device_ptr(gpu)?, new.v.device_ptr(gpu)?],
                    dst: [0, c, c + (v_off * size_of::<T>()) as u64],
                    heads: [0, self.heads.num_kv_heads(), self.heads.num_kv_heads()],
                    ..self.args(gpu, rows)?
                };
                // SAFETY: as in `run`: `check_new` bounded the rows, the cache holds `v_off`
                // plus the planned extent, so K's slots (from the cache's start) and V's (from
                // `v_off`) stay inside it; the interleaved strides keep K's and V's elements
                // apart (a page's K half is `v_off` elements and V follows it).
                unsafe { rope::launch::<T>(gpu, RopeLayout::NeoX, args) }
            }
        }
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

    /// [`AppendPlan::run`] that also turns the new keys by `rope` at their KV positions on the way
    /// into the cache, and `q` (`[rows, num_qo_heads, head_dim]`, the same rows) in place.
    /// Asynchronous on a GPU; no allocation.
    ///
    /// Errors as [`AppendPlan::run`], a `rope` of other heads than the plan's, a `q` of other
    /// rows, a bad cos/sin cache; on the CPU backend also a position outside the cache (the GPU
    /// writes NaN in that token's rotated dims).
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
        if rope.heads() != self.heads {
            return Err(Error::invalid(format!(
                "kv append: rope is for {:?} but the plan for {:?}",
                rope.heads(),
                self.heads
            )));
        }
        if q.len() != rope.q_len(rows as usize) {
            return Err(Error::invalid(format!(
                "kv append: q has {} elements; {rows} rows need {}",
                q.len(),
                rope.q_len(rows as usize)
            )));
        }
        let positions = rope::Positions::PerToken(&self.positions);
        match backend {
            Backend::Cpu => {
                let host = HostAngles::new(rope, angles)?;
                let pos = self.positions.host()?;
                // Every angle first, so that a bad position leaves q and the cache untouched.
                let cs = (0..rows as usize)
                    .map(|t| host.at(t, i64::from(pos[t])))
                    .collect::<Result<Vec<_>>>()?;
                let (d, qt) = (self.heads.head_dim() as usize, rope.q_len(1));
                for (row, cs) in q.host_mut()?.chunks_mut(qt).zip(&cs) {
                    for h in row.chunks_mut(d) {
                        let x = h.to_vec();
                        rope::rotate_head(rope.layout(), cs, &x, h);
                    }
                }
                self.write_host(rows, &new, cache, |t, k| {
                    let mut out = k.to_vec();
                    for (x, o) in k.chunks(d).zip(out.chunks_mut(d)) {
                        rope::rotate_head(rope.layout(), &cs[t], x, o);
                    }
                    Ok(out)
                })
            }
            Backend::Cuda(gpu) => {
                let qp = q.device_ptr(gpu)?;
                let kv_new = [new.k.device_ptr(gpu)?, new.v.device_ptr(gpu)?];
                let kv_out = [cache.k.device_ptr(gpu)?, cache.v.device_ptr(gpu)?];
                let base = rope::rope_args(gpu, rope, angles, positions, rows, [qp, 0], [qp, 0])?;
                let args = RopeArgs {
                    src: [qp, kv_new[0], kv_new[1]],
                    dst: [qp, kv_out[0], kv_out[1]],
                    heads: [
                        self.heads.num_qo_heads(),
                        self.heads.num_kv_heads(),
                        self.heads.num_kv_heads(),
                    ],
                    rotary_dim: rope.rotary_dim(),
                    rotate_mask: 0b11,
                    ..RopeArgs {
                        slot_mode: SLOT_PLANNED,
                        slots: self.slots.device_ptr(gpu)?,
                        kv_head_stride: self.strides.head,
                        kv_page_stride: self.strides.block,
                        kv_token_stride: self.strides.token,
                        ..base
                    }
                };
                // SAFETY: as in `run` for k, v and the cache; q was checked to hold `rows` rows
                // of the rope's heads, the plan's positions hold `capacity >= rows` entries, and
                // `rope_args` read the cos/sin cache's length.
                unsafe { rope::launch::<T>(gpu, rope.layout(), args) }
            }
        }
    }

    /// Check a run's buffers; returns its rows.
    fn check<T: Element>(&self, new: &NewKv<'_, T>, cache: &KvCacheMut<'_, T>) -> Result<u32> {
        let rows = self.check_new(new)?;
        for (name, len) in [("k_cache", cache.k.len()), ("v_cache", cache.v.len())] {
            self.check_cache(name, len)?;
        }
        Ok(rows)
    }

    /// Check the new K and V; returns their rows.
    fn check_new<T: Element>(&self, new: &NewKv<'_, T>) -> Result<u32> {
        let row = (self.heads.num_kv_heads() * self.heads.head_dim()) as usize;
        let rows = new.k.len() / row;
        if new.k.len() != new.v.len()
            || !new.k.len().is_multiple_of(row)
            || rows < self.tokens as usize
            || rows > self.capacity as usize
        {
            return Err(Error::invalid(format!(
                "kv append: new k has {} and v {} elements; both must be [rows, num_kv_heads x \
                 head_dim = {row}] with {} to {} rows",
                new.k.len(),
                new.v.len(),
                self.tokens,
                self.capacity
            )));
        }
        Ok(rows as u32)
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

    /// The planned-slot fields of the kernel's arguments, nothing rotated.
    fn args(&self, gpu: &crate::device::gpu::Gpu, rows: u32) -> Result<RopeArgs> {
        Ok(RopeArgs {
            slots: self.slots.device_ptr(gpu)?,
            kv_head_stride: self.strides.head,
            // Unused by planned slots; `rope::launch` picks a vector width that they keep aligned.
            kv_page_stride: self.strides.block,
            kv_token_stride: self.strides.token,
            tokens: rows,
            head_dim: self.heads.head_dim(),
            slot_mode: SLOT_PLANNED,
            ..RopeArgs::default()
        })
    }

    /// The CPU backend: each planned token's K (through `key`, which may turn it) and V rows into
    /// their slots.
    fn write_host<T: Element>(
        &self,
        rows: u32,
        new: &NewKv<'_, T>,
        cache: KvCacheMut<'_, T>,
        key: impl Fn(usize, &[T]) -> Result<Vec<T>>,
    ) -> Result<()> {
        let (kc, vc) = (cache.k.host_mut()?, cache.v.host_mut()?);
        self.write_slots(rows, new, key, |at, k, v| {
            kc[at..at + k.len()].copy_from_slice(k);
            vc[at..at + v.len()].copy_from_slice(v);
        })
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
        for t in 0..(rows.min(self.tokens) as usize) {
            let k = key(t, &nk[t * hk * d..][..hk * d])?;
            let v = &nv[t * hk * d..][..hk * d];
            for h in 0..hk {
                let at = (slots[t] + h as u64 * self.strides.head) as usize;
                put(at, &k[h * d..][..d], &v[h * d..][..d]);
            }
        }
        Ok(())
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
    let (hk, d) = (
        geometry.heads.num_kv_heads() as u64,
        geometry.heads.head_dim() as u64,
    );
    let p = u64::from(geometry.page_size);
    let (page, row) = (p * hk * d, (hk * d) as usize);
    let rows = new.k.len() / row.max(1);
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
    } else if cache.k.len() != cache.v.len() || !(cache.k.len() as u64).is_multiple_of(page) {
        bad = Some(format!(
            "k_cache has {} and v_cache {} elements; both must be whole pages of {page}",
            cache.k.len(),
            cache.v.len()
        ));
    }
    let num_pages = cache.k.len() as u64 / page.max(1);
    let fits = |n: usize| u32::try_from(n).is_ok_and(|n| n < i32::MAX as u32);
    if bad.is_none()
        && !(fits(rows)
            && fits(table.kv_indices.len())
            && fits(table.kv_last_page_len.len())
            && num_pages < i32::MAX as u64)
    {
        bad = Some("more than 2^31 rows, pages or page ids".to_string());
    }
    if let Some(msg) = bad {
        return Err(Error::invalid(format!("kv append: {msg}")));
    }
    let (page_stride, token_stride, head_stride) = match geometry.layout {
        KvLayout::Nhd => (page, hk * d, d),
        KvLayout::Hnd => (page, d, p * d),
    };
    match backend {
        Backend::Cpu => {
            let (bi, pos) = (table.batch_indices.host()?, table.positions.host()?);
            let (indptr, indices) = (table.kv_indptr.host()?, table.kv_indices.host()?);
            let last = table.kv_last_page_len.host()?;
            let (nk, nv) = (new.k.host()?, new.v.host()?);
            let (kc, vc) = (cache.k.host_mut()?, cache.v.host_mut()?);
            let d = d as usize;
            for t in 0..rows {
                let slot = explicit_slot(
                    bi[t],
                    pos[t],
                    indptr,
                    indices,
                    last,
                    geometry.page_size,
                    num_pages,
                )
                .ok_or_else(|| {
                    Error::invalid(format!(
                        "kv append: new token {t} (request {}, position {}) is outside the \
                             page table or the cache",
                        bi[t], pos[t]
                    ))
                })?;
                let at = slot.0 * page_stride + slot.1 * token_stride;
                for h in 0..hk as usize {
                    let o = (at + h as u64 * head_stride) as usize;
                    kc[o..o + d].copy_from_slice(&nk[t * row + h * d..][..d]);
                    vc[o..o + d].copy_from_slice(&nv[t * row + h * d..][..d]);
                }
            }
            Ok(())
        }
        Backend::Cuda(gpu) => {
            let args = RopeArgs {
                src: [0, new.k.device_ptr(gpu)?, new.v.device_ptr(gpu)?],
                dst: [0, cache.k.device_ptr(gpu)?, cache.v.device_ptr(gpu)?],
                positions: table.positions.device_ptr(gpu)?,
                batch_indices: table.batch_indices.device_ptr(gpu)?,
                kv_indptr: table.kv_indptr.device_ptr(gpu)?,
                kv_indices: table.kv_indices.device_ptr(gpu)?,
                kv_last_page_len: table.kv_last_page_len.device_ptr(gpu)?,
                kv_page_stride: page_stride,
                kv_token_stride: token_stride,
                kv_head_stride: head_stride,
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
            // SAFETY: k and v hold `rows` rows and the page-table arrays the lengths passed
            // (batch_indices and positions `rows`, kv_indptr `batch + 1`, kv_last_page_len
            // `batch`, kv_indices `num_kv_indices`), checked above; the caches hold `num_pages`
            // whole pages; the kernel writes a token only after `explicit_slot` checked its
            // request, position and page against those bounds.
            unsafe { rope::launch::<T>(gpu, RopeLayout::NeoX, args) }
        }
    }
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
