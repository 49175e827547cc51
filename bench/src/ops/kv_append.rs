//! KV append rows: one new token for each of 256 requests of 2048 tokens (decode), and 1024 new
//! tokens for each of 16 requests (prefill), page 16, NHD, into a cache of the anchor's shape
//! (every request's pages in a shuffled order, no spare page), as the anchor's
//! `append_paged_kv_cache` with `get_batch_indices_positions`.
//!
//! Every input set shares one cache (a decode cache is 2 GB) and deals its pages in its own
//! order, so the sets write different slots.

use std::cell::RefCell;
use std::rc::Rc;

use ferrinfer::indptr;
use ferrinfer::ops::kv_append::{AppendPlan, KvCacheMut, NewKv};
use ferrinfer::prelude::*;
use ferrinfer_testkit::Rng;

use super::{Call, OpCase};
use crate::configs::{D, ELT, HKV};
use crate::inputs::normal_bf16;
use crate::timing::BenchResult;

const PAGE: u32 = 16;

/// The KV append cases.
pub fn cases() -> Vec<OpCase> {
    let moved = |tokens: u64| 2 * tokens * u64::from(HKV) * u64::from(D) * ELT * 2;
    vec![
        OpCase {
            key: "append_kv_decode_b256_l2048_p16",
            bytes: moved(256),
            set_bytes: moved(256) / 2,
            setup: decode,
        },
        OpCase {
            key: "append_kv_prefill_b16_l1024_p16",
            bytes: moved(16 * 1024),
            set_bytes: moved(16 * 1024) / 2,
            setup: prefill,
        },
    ]
}

fn decode(backend: &Backend, seed: u64) -> BenchResult<Call> {
    setup(backend, seed, 256, 2048, 1)
}

fn prefill(backend: &Backend, seed: u64) -> BenchResult<Call> {
    setup(backend, seed, 16, 1024, 1024)
}

type Cache = Rc<RefCell<(Buffer<bf16>, Buffer<bf16>)>>;

thread_local! {
    /// The cache every input set of the running case writes into, by element count.
    static SHARED: RefCell<Option<(usize, Cache)>> = const { RefCell::new(None) };
}

fn shared_cache(backend: &Backend, len: usize) -> BenchResult<Cache> {
    SHARED.with(|s| {
        let mut s = s.borrow_mut();
        if let Some((l, c)) = s.as_ref()
            && *l == len
        {
            return Ok(c.clone());
        }
        // Drop the previous case's cache before making this one.
        *s = None;
        let c = Rc::new(RefCell::new((
            backend.filled(len, bf16::ZERO)?,
            backend.filled(len, bf16::ZERO)?,
        )));
        *s = Some((len, c.clone()));
        Ok(c)
    })
}

fn setup(backend: &Backend, seed: u64, batch: usize, len: u32, new: u32) -> BenchResult<Call> {
    let heads = Heads::new(4 * HKV, HKV, D)?;
    let pages_per = len.div_ceil(PAGE) as usize;
    let total = batch * pages_per;
    let mut pages: Vec<i32> = (0..total as i32).collect();
    Rng::new(seed).shuffle(&mut pages);
    let lens = vec![len; batch];
    let kv = KvIndex::paged_from_lens(PAGE, &lens, &pages, total as u32, KvLayout::Nhd)?;
    let qo_indptr = indptr(&vec![new; batch]);
    let rows = batch as u32 * new;
    let plan = AppendPlan::new(backend, heads, &kv, &qo_indptr, rows)?;
    let row = (HKV * D) as usize;
    let k = backend.upload(&normal_bf16(rows as usize * row, 2 * seed))?;
    let v = backend.upload(&normal_bf16(rows as usize * row, 2 * seed + 1))?;
    let cache = shared_cache(backend, kv.buffer_len(&heads))?;
    let backend = backend.clone();
    Ok(Box::new(move || {
        let mut c = cache.borrow_mut();
        let (kc, vc) = &mut *c;
        plan.run(
            &backend,
            NewKv { k: &k, v: &v },
            KvCacheMut { k: kc, v: vc },
        )
    }))
}
