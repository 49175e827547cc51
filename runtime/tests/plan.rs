//! Property tests of the scheduler: hundreds of random batches, each plan checked against the work
//! list contract (exact coverage, bounds, merge lists, padding), plus the split heuristics and the
//! workspace round trip.

use std::collections::HashMap;

use ferrinfer_runtime::attention::plan::{
    self, Capacity, KV_CHUNK_ALIGN, Layout, NONE, PlanOptions, WorkList, cta_tile_q, header,
    workspace_bytes,
};
use ferrinfer_runtime::{Batch, Error, Heads, KernelKind, KvIndex, KvLayout};
use ferrinfer_testkit::Rng;

const CASES: usize = 200;

fn pick<T: Copy>(rng: &mut Rng, xs: &[T]) -> T {
    xs[rng.below(xs.len())]
}

fn heads(rng: &mut Rng) -> Heads {
    let kv = pick(rng, &[1, 2, 8]);
    let group = pick(rng, &[1, 4, 8]);
    Heads::new(kv * group, kv, pick(rng, &[64, 128, 256])).unwrap()
}

fn random_qo(rng: &mut Rng) -> u32 {
    match rng.below(5) {
        0 => 0,
        1 | 2 => 1,
        3 => rng.below(64) as u32,
        _ => rng.below(2000) as u32,
    }
}

fn random_kv(rng: &mut Rng) -> u32 {
    match rng.below(10) {
        0 => 0,
        1..=4 => rng.below(512) as u32,
        _ => rng.below(20000) as u32,
    }
}

/// A batch of the given lengths, on a ragged cache or a paged one (identity page table).
fn batch_of(heads: Heads, qo: &[u32], kv: &[u32], page: Option<u32>) -> Batch {
    let mut qo_indptr = vec![0i32];
    for &q in qo {
        qo_indptr.push(qo_indptr.last().unwrap() + q as i32);
    }
    let index = match page {
        None => {
            let mut indptr = vec![0i32];
            for &k in kv {
                indptr.push(indptr.last().unwrap() + k as i32);
            }
            KvIndex::ragged(&indptr, KvLayout::Nhd).unwrap()
        }
        Some(p) => {
            let (mut indptr, mut last) = (vec![0i32], Vec::new());
            for &k in kv {
                let pages = k.div_ceil(p);
                indptr.push(indptr.last().unwrap() + pages as i32);
                last.push(if pages == 0 {
                    0
                } else {
                    (k - (pages - 1) * p) as i32
                });
            }
            let n = *indptr.last().unwrap();
            let indices: Vec<i32> = (0..n).collect();
            KvIndex::paged(p, &indptr, &indices, &last, n.max(1) as u32, KvLayout::Hnd).unwrap()
        }
    };
    let b = Batch::new(heads, &qo_indptr, index).unwrap();
    for (i, (&q, &k)) in qo.iter().zip(kv).enumerate() {
        assert_eq!((b.qo_len(i), b.kv().kv_len(i)), (q, k));
    }
    b
}

fn random_batch(rng: &mut Rng) -> Batch {
    let n = 1 + rng.below(64);
    let qo: Vec<u32> = (0..n).map(|_| random_qo(rng)).collect();
    let kv: Vec<u32> = (0..n).map(|_| random_kv(rng)).collect();
    let page = pick(rng, &[None, Some(1), Some(16), Some(64)]);
    batch_of(heads(rng), &qo, &kv, page)
}

fn random_options(rng: &mut Rng) -> PlanOptions {
    let mut opts = PlanOptions::new(pick(rng, &[1, 8, 108, 132]), 1 + rng.below(4) as u32);
    if rng.below(2) == 0 {
        opts = opts.with_fixed_kv_chunk(KV_CHUNK_ALIGN * (32 + rng.below(480) as u32));
    }
    if rng.below(4) == 0 {
        opts.query_tile = Some(pick(rng, &[16, 64, 128]));
    }
    opts
}

/// Every property of the work list contract, for one plan.
fn check(batch: &Batch, opts: &PlanOptions, list: &WorkList) {
    let heads = batch.heads();
    let g = heads.group_size();
    let tile = list.cta_tile_q;
    assert!([16, 64, 128].contains(&tile), "tile {tile}");
    assert_eq!(list.kv_chunk % KV_CHUNK_ALIGN, 0);
    if let Some(c) = opts.fixed_kv_chunk {
        assert_eq!(list.kv_chunk, c);
    }
    match opts.graph_capacity {
        Some(c) => assert!(list.padded_len == c && list.items.len() <= c as usize),
        None => assert_eq!(list.padded_len as usize, list.items.len()),
    }

    // Bounds, tile and chunk alignment, and longest first.
    let block = if list.kind == KernelKind::Prefill && !opts.one_row_per_request {
        (plan::PREFILL_BLOCK_ROUNDS * opts.num_sms) as usize
    } else {
        usize::MAX
    };
    for (e, w) in list.items.iter().enumerate() {
        let b = w.request as usize;
        assert!(
            b < batch.batch() && w.kv_head < heads.num_kv_heads(),
            "{w:?}"
        );
        let (packed, kv) = (batch.qo_len(b) * g, batch.kv().kv_len(b));
        assert!(
            w.qo_tile_start < w.qo_tile_end && w.qo_tile_end <= packed,
            "{w:?}"
        );
        assert!(w.qo_tile_start % tile == 0 && w.qo_tile_end - w.qo_tile_start <= tile);
        assert!(
            w.kv_start <= w.kv_end && w.kv_end <= kv,
            "{w:?} kv_len {kv}"
        );
        assert_eq!(w.kv_start % list.kv_chunk, 0);
        assert!(w.kv_end - w.kv_start <= list.kv_chunk);
        assert!(
            kv == 0 || w.kv_start < w.kv_end,
            "empty chunk of a non-empty KV: {w:?}"
        );
        // A prefill list runs in blocks of a few rounds (KV head by KV head), each longest first.
        if e % block > 0 {
            assert!(
                // Longest first but for ties within a cost bucket (under 1/8 apart).
                list.items[e - 1].cost_in(batch) * 9 >= w.cost_in(batch) * 8,
                "not longest first at {e}"
            );
        }
    }
    let blocks: Vec<_> = list.items.chunks(block).collect();
    for pair in blocks.windows(2) {
        let last_head = pair[0].iter().map(|w| w.kv_head).max();
        let next_head = pair[1].iter().map(|w| w.kv_head).min();
        assert!(last_head <= next_head, "blocks out of head order");
    }

    check_coverage(batch, list);
    check_merge(batch, list);
}

/// Every (request, KV head, packed row, key) is covered by exactly one item; a request with no key
/// has every packed row covered by exactly one (empty) item.
fn check_coverage(batch: &Batch, list: &WorkList) {
    let mut by_head: HashMap<(u32, u32), Vec<_>> = HashMap::new();
    for w in &list.items {
        by_head.entry((w.request, w.kv_head)).or_default().push(*w);
    }
    for b in 0..batch.batch() {
        let packed = batch.qo_len(b) * batch.heads().group_size();
        let kv = batch.kv().kv_len(b);
        for h in 0..batch.heads().num_kv_heads() {
            let items = by_head.remove(&(b as u32, h)).unwrap_or_default();
            if packed == 0 {
                assert!(
                    items.is_empty(),
                    "request {b} has no query row but has items"
                );
                continue;
            }
            // Compress coordinates to the item boundaries, then count covers per cell. An empty
            // KV is one virtual cell that empty ranges cover.
            let mut qs: Vec<u32> = vec![0, packed];
            let mut ks: Vec<u32> = vec![0, kv.max(1)];
            for w in &items {
                qs.extend([w.qo_tile_start, w.qo_tile_end]);
                ks.extend([w.kv_start, w.kv_end.max(if kv == 0 { 1 } else { 0 })]);
            }
            qs.sort_unstable();
            qs.dedup();
            ks.sort_unstable();
            ks.dedup();
            let at = |xs: &[u32], x: u32| xs.binary_search(&x).unwrap();
            let mut cover = vec![0u32; (qs.len() - 1) * (ks.len() - 1)];
            for w in &items {
                let k_end = if kv == 0 { 1 } else { w.kv_end };
                for qi in at(&qs, w.qo_tile_start)..at(&qs, w.qo_tile_end) {
                    for ki in at(&ks, w.kv_start)..at(&ks, k_end) {
                        cover[qi * (ks.len() - 1) + ki] += 1;
                    }
                }
            }
            assert!(
                cover.iter().all(|&c| c == 1),
                "request {b} head {h}: a cell covered {:?} times",
                cover.iter().find(|&&c| c != 1)
            );
        }
    }
    assert!(
        by_head.is_empty(),
        "items for requests or heads that do not exist"
    );
}

/// Merge lists: every partial row is written by the items of exactly one query row and appears in
/// that row's list only; a split row's list covers its whole KV in order; unsplit rows have none.
fn check_merge(batch: &Batch, list: &WorkList) {
    let g = batch.heads().group_size();
    let total = batch.total_qo();
    assert_eq!(list.merge_indptr.len(), total + 1);
    assert_eq!(list.merge_indptr[0], 0);
    assert!(list.merge_indptr.windows(2).all(|w| w[0] <= w[1]));
    assert_eq!(
        *list.merge_indptr.last().unwrap() as usize,
        list.merge_index.len()
    );
    assert_eq!(list.merge_index.len(), list.partial_rows as usize);
    let mut seen = vec![false; list.partial_rows as usize];
    for &s in &list.merge_index {
        assert!(
            !std::mem::replace(&mut seen[s as usize], true),
            "partial row {s} merged twice"
        );
    }

    // Who writes each partial row: (request, query row, KV range); all writers must agree.
    let mut owner: HashMap<u32, (u32, u32, u32, u32)> = HashMap::new();
    let mut split = vec![None; batch.batch()];
    for w in &list.items {
        let is_split = w.partial != NONE;
        let prev = split[w.request as usize].replace(is_split);
        assert!(
            prev.is_none_or(|p| p == is_split),
            "request {} half split",
            w.request
        );
        if !is_split {
            continue;
        }
        for i in w.qo_tile_start / g..=(w.qo_tile_end - 1) / g {
            let slot = w.partial + i;
            assert!(
                slot < list.partial_rows,
                "{w:?} writes past the partial rows"
            );
            let who = (w.request, i, w.kv_start, w.kv_end);
            assert_eq!(*owner.entry(slot).or_insert(who), who, "partial row {slot}");
        }
    }
    assert_eq!(
        owner.len(),
        list.partial_rows as usize,
        "unwritten partial rows"
    );

    for (b, &is_split) in split.iter().enumerate() {
        let first = batch.qo_indptr()[b] as usize;
        for i in 0..batch.qo_len(b) {
            let r = first + i as usize;
            let merged =
                &list.merge_index[list.merge_indptr[r] as usize..list.merge_indptr[r + 1] as usize];
            if is_split != Some(true) {
                assert!(merged.is_empty(), "unsplit row {r} has a merge list");
                continue;
            }
            assert!(
                merged.len() > 1,
                "split row {r} merges {} rows",
                merged.len()
            );
            let mut next = 0;
            for s in merged {
                let (req, row, k0, k1) = owner[s];
                assert_eq!(
                    (req as usize, row),
                    (b, i),
                    "row {r} merges another row's partial"
                );
                assert_eq!(k0, next, "row {r}: KV ranges not contiguous");
                next = k1;
            }
            assert_eq!(
                next,
                batch.kv().kv_len(b),
                "row {r}: merge does not cover the KV"
            );
        }
    }
}

fn round_trip(list: &WorkList, opts: &PlanOptions) {
    let mut ws = vec![0xAAu8; workspace_bytes(opts, &list.capacity())];
    let layout = list.write(&mut ws).unwrap();
    assert_eq!(layout, list.layout());
    assert!(layout.bytes <= ws.len());
    assert_eq!(&WorkList::read(&ws).unwrap(), list);
    // The valid flags, as a kernel reads them: ones, then zeros for the padding.
    let valid: Vec<i32> = (0..list.padded_len as usize)
        .map(|e| {
            let at = layout.valid + 4 * e;
            i32::from_le_bytes(ws[at..at + 4].try_into().unwrap())
        })
        .collect();
    let n = list.items.len();
    assert!(valid[..n].iter().all(|&v| v == 1) && valid[n..].iter().all(|&v| v == 0));
    kernels_read_back(&ws, list);
}

#[test]
fn random_batches_satisfy_the_contract() {
    let mut rng = Rng::from_time();
    let seed = rng.seed();
    eprintln!("seed {seed}: replay with FERRINFER_SEED={seed}");
    for case in 0..CASES {
        let batch = random_batch(&mut rng);
        let kind = pick(&mut rng, &KernelKind::ALL);
        let opts = random_options(&mut rng);
        let ctx = format!("seed {seed} case {case} {kind:?} {opts:?}");
        let list = plan::plan(&batch, kind, &opts).unwrap_or_else(|e| panic!("{ctx}: {e}"));
        check(&batch, &opts, &list);
        assert_eq!(
            plan::plan(&batch, kind, &opts).unwrap(),
            list,
            "{ctx}: not deterministic"
        );
        if kind == KernelKind::Decode {
            let packed = u64::from(batch.heads().group_size());
            assert_eq!(
                list.cta_tile_q,
                cta_tile_q(packed, 1, batch.heads().head_dim())
            );
        } else if let Some(t) = opts.query_tile {
            assert_eq!(list.cta_tile_q, t, "{ctx}: the fixed query tile");
        }
        assert_eq!(
            plan::query_tile(&batch, kind, &opts).unwrap(),
            list.cta_tile_q
        );
        if opts.fixed_kv_chunk.is_none() {
            let target = (opts.num_sms * opts.ctas_per_sm) as usize;
            // A decode over more than a wave may split to fill its last wave, in up to 4 pieces.
            let decode = kind == KernelKind::Decode || opts.one_row_per_request;
            let unsplit = || {
                let longest = (0..batch.batch())
                    .map(|b| batch.kv().kv_len(b))
                    .max()
                    .unwrap_or(0);
                let whole = opts.with_fixed_kv_chunk(longest.div_ceil(16).max(8) * 16);
                plan::plan(&batch, kind, &whole).unwrap().items.len()
            };
            assert!(
                !list.is_split()
                    || list.items.len() <= target
                    || (decode && unsplit() > target && list.items.len() <= 4 * unsplit()),
                "{ctx}: over-split"
            );
        }
        round_trip(&list, &opts);

        // Graph mode with room to spare: the same plan, padded.
        let room = list.items.len() as u32 + rng.below(64) as u32;
        let graph = opts.with_graph_capacity(room.max(1));
        let padded = plan::plan(&batch, kind, &graph).unwrap_or_else(|e| panic!("{ctx}: {e}"));
        check(&batch, &graph, &padded);
        assert_eq!(padded.items, list.items, "{ctx}");
        round_trip(&padded, &graph);

        // A random, maybe too small, capacity: a fitting plan or a clear error.
        let graph = opts.with_graph_capacity(1 + rng.below(list.items.len() + 1) as u32);
        match plan::plan(&batch, kind, &graph) {
            Ok(tight) => {
                check(&batch, &graph, &tight);
                let bound =
                    Capacity::for_graph(&graph, batch.heads().num_qo_heads(), 1 << 20).unwrap();
                assert!(tight.partial_rows <= bound.partial_rows, "{ctx}");
                round_trip(&tight, &graph);
            }
            Err(Error::InvalidInput(m)) => assert!(m.contains("graph capacity"), "{ctx}: {m}"),
            Err(e) => panic!("{ctx}: {e}"),
        }
    }
}

#[test]
fn fixed_chunk_split_is_batch_invariant() {
    let mut rng = Rng::from_time();
    let seed = rng.seed();
    eprintln!("seed {seed}: replay with FERRINFER_SEED={seed}");
    for case in 0..50 {
        let h = heads(&mut rng);
        let kind = pick(&mut rng, &KernelKind::ALL);
        let opts = random_options(&mut rng).with_fixed_kv_chunk(KV_CHUNK_ALIGN * 32);
        let (q, k) = (random_qo(&mut rng).max(1), random_kv(&mut rng));
        // The same request alone, and at a random place among random others.
        let mut qo: Vec<u32> = (0..rng.below(40)).map(|_| random_qo(&mut rng)).collect();
        let mut kv: Vec<u32> = qo.iter().map(|_| random_kv(&mut rng)).collect();
        let at = rng.below(qo.len() + 1);
        qo.insert(at, q);
        kv.insert(at, k);
        let split_of = |batch: &Batch, r: u32| {
            let list = plan::plan(batch, kind, &opts).unwrap();
            let mut mine: Vec<_> = (list.items.iter().filter(|w| w.request == r))
                .map(|w| {
                    let (q0, q1, k0, k1) = (w.qo_tile_start, w.qo_tile_end, w.kv_start, w.kv_end);
                    (w.kv_head, q0, q1, k0, k1, w.partial == NONE)
                })
                .collect();
            mine.sort_unstable();
            (list.cta_tile_q, list.kv_chunk, mine)
        };
        let alone = split_of(&batch_of(h, &[q], &[k], None), 0);
        let among = split_of(&batch_of(h, &qo, &kv, Some(16)), at as u32);
        assert_eq!(alone, among, "seed {seed} case {case}");
    }
}

fn decode_batch(num_qo: u32, num_kv: u32, batch: usize, kv_len: u32) -> Batch {
    let h = Heads::new(num_qo, num_kv, 128).unwrap();
    batch_of(h, &vec![1; batch], &vec![kv_len; batch], Some(16))
}

#[test]
fn small_batches_are_split_to_fill_the_device() {
    let h100 = PlanOptions::new(132, 2);
    // One long decode: 8 KV heads alone would leave 124 of 132 SMs idle.
    let batch = decode_batch(32, 8, 1, 32768);
    let list = plan::plan(&batch, KernelKind::Decode, &h100).unwrap();
    assert!(list.is_split());
    assert!(
        (132..=264).contains(&list.items.len()),
        "{}",
        list.items.len()
    );
    check(&batch, &h100, &list);

    // One long prefill, with one KV head: the query tiles alone do not fill the device either.
    let one = Heads::new(8, 1, 128).unwrap();
    let batch = batch_of(one, &[64], &[32768], None);
    let list = plan::plan(&batch, KernelKind::Prefill, &h100).unwrap();
    assert_eq!(list.cta_tile_q, 128);
    assert!(
        (132..=264).contains(&list.items.len()),
        "{}",
        list.items.len()
    );
    check(&batch, &h100, &list);
}

/// One long causal prompt: its tiles all span the whole KV, but the last tile sees every key and
/// the first only its own, so the list must run from the last tile to the first (the kernels
/// hand items out in list order).
#[test]
fn a_causal_prompt_is_listed_from_its_longest_tile() {
    let batch = batch_of(Heads::new(32, 8, 128).unwrap(), &[8192], &[8192], None).with_causal(true);
    let list = plan::plan(&batch, KernelKind::Prefill, &PlanOptions::new(132, 1)).unwrap();
    assert!(!list.is_split());
    let (first, last) = (list.items[0], *list.items.last().unwrap());
    let tile = list.cta_tile_q;
    // The tiles of the last rows first (within 1/8 of the longest: its cost bucket, where a
    // head's tiles stay together, so the list opens on head 0), the first rows last.
    let longest = list.items.iter().map(|w| w.cost_in(&batch)).max().unwrap();
    assert_eq!(longest, 2 * 128 + 8192);
    assert!(first.cost_in(&batch) * 9 >= longest * 8);
    assert_eq!(first.kv_head, 0);
    assert_eq!(
        (last.qo_tile_start, last.qo_tile_end),
        (0, tile),
        "the first rows last"
    );
    // 128 packed rows are 32 query rows of 4 heads: the first tile sees keys 0..=31.
    assert_eq!(last.cost_in(&batch), 2 * 128 + 32);
    // Not causal, the same tiles cost alike.
    let full = batch.clone().with_causal(false);
    assert_eq!(first.cost_in(&full), last.cost_in(&full));

    // A context-parallel shard: keys 1000..4999 of a 5000-key request, whose 100 query rows are
    // its last (positions 4900..4999): row i sees local keys up to i + 3900.
    let heads = Heads::new(32, 8, 128).unwrap();
    let kv = KvIndex::ragged(&[0, 4000], KvLayout::Nhd)
        .unwrap()
        .with_key_positions(&[1000], &[5000])
        .unwrap();
    let shard = Batch::new(heads, &[0, 100], kv).unwrap().with_causal(true);
    let list = plan::plan(&shard, KernelKind::Prefill, &PlanOptions::new(132, 1)).unwrap();
    let tile = list.cta_tile_q;
    // The plan may split these few rows' keys into chunks: every chunk of the first tile.
    let tops: Vec<_> = list.items.iter().filter(|w| w.qo_tile_start == 0).collect();
    assert!(tops.iter().any(|w| w.kv_end == 4000));
    for top in tops {
        let rows = top.qo_tile_end;
        assert_eq!(rows, tile.min(400));
        // Its last row is (rows - 1) / 4, which sees keys 0..=that + 3900.
        let end = ((rows - 1) / 4 + 3901).clamp(top.kv_start, top.kv_end);
        assert_eq!(
            top.cost_in(&shard),
            2 * u64::from(rows) + u64::from(end - top.kv_start),
            "{top:?}"
        );
    }

    // Split into 256-key chunks: a chunk wholly past a tile's diagonal streams nothing, and
    // costs its rows alone. More query rows than keys: the first rows see no key at all.
    let batch = batch_of(
        Heads::new(8, 8, 128).unwrap(),
        &[1024, 300],
        &[1024, 200],
        None,
    )
    .with_causal(true);
    let opts = PlanOptions {
        fixed_kv_chunk: Some(256),
        ..PlanOptions::new(132, 1)
    };
    let list = plan::plan(&batch, KernelKind::Prefill, &opts).unwrap();
    let tile = list.cta_tile_q;
    let past = list
        .items
        .iter()
        .find(|w| w.request == 0 && w.qo_tile_start == 0 && w.kv_start == 768)
        .unwrap();
    assert_eq!(past.cost_in(&batch), 2 * u64::from(tile));
    // Request 1: 300 rows on 200 keys, bottom-right aligned: row i sees keys up to i - 100.
    let blind = list
        .items
        .iter()
        .find(|w| w.request == 1 && w.qo_tile_start == 0)
        .unwrap();
    let seen = (blind.qo_tile_end - 1).saturating_sub(100 - 1).min(200);
    assert_eq!(
        blind.cost_in(&batch),
        2 * u64::from(blind.qo_tile_end) + u64::from(seen)
    );
}

#[test]
fn large_batches_are_not_split() {
    let h100 = PlanOptions::new(132, 2);
    let batch = decode_batch(32, 8, 256, 2048);
    let list = plan::plan(&batch, KernelKind::Decode, &h100).unwrap();
    assert!(!list.is_split());
    assert_eq!(list.items.len(), 256 * 8);
    assert!(list.merge_index.is_empty() && list.items.iter().all(|w| w.partial == NONE));
    assert!(list.kv_chunk >= 2048);
}

#[test]
fn short_kv_is_never_split_below_the_minimum_chunk() {
    let batch = decode_batch(8, 8, 1, 1000);
    let list = plan::plan(&batch, KernelKind::Decode, &PlanOptions::new(132, 4)).unwrap();
    assert_eq!(list.kv_chunk, plan::MIN_KV_CHUNK);
    assert_eq!(list.items.len(), 8 * 8);
}

#[test]
fn the_skewed_decode_batch_splits_the_long_requests_more() {
    // Every 16th request has 8192 tokens, the rest 512 (the decode_skew benchmark).
    let h = Heads::new(32, 8, 128).unwrap();
    let kv: Vec<u32> = (0..64)
        .map(|b| if b % 16 == 0 { 8192 } else { 512 })
        .collect();
    let batch = batch_of(h, &[1; 64], &kv, Some(16));
    let list = plan::plan(&batch, KernelKind::Decode, &PlanOptions::new(132, 2)).unwrap();
    check(&batch, &PlanOptions::new(132, 2), &list);
    assert_eq!(
        list.items[0].request % 16,
        0,
        "the longest items come first"
    );
}

#[test]
fn graph_capacity_exceeded_is_an_error() {
    let batch = decode_batch(32, 8, 64, 100);
    let opts = PlanOptions::new(132, 2).with_graph_capacity(100);
    let err = plan::plan(&batch, KernelKind::Decode, &opts).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::InvalidInput(_)), "{msg}");
    assert!(
        msg.contains("needs 512 work items") && msg.contains("graph capacity is 100"),
        "{msg}"
    );
}

#[test]
fn graph_mode_pads_to_the_capacity() {
    let batch = decode_batch(32, 8, 4, 300);
    let opts = PlanOptions::new(132, 1).with_graph_capacity(1000);
    let list = plan::plan(&batch, KernelKind::Decode, &opts).unwrap();
    assert_eq!(list.padded_len, 1000);
    assert!(list.items.len() <= 132);
    assert!(list.is_valid(list.items.len() - 1) && !list.is_valid(list.items.len()));
    // One allocation for every batch of up to 4096 rows fits this plan.
    let cap = Capacity::for_graph(&opts, 32, 4096).unwrap();
    let mut ws = vec![0u8; workspace_bytes(&opts, &cap)];
    let layout = list.write(&mut ws).unwrap();
    // The item arrays sit where any plan of this capacity puts them.
    let other = plan::plan(&decode_batch(32, 8, 9, 7000), KernelKind::Decode, &opts).unwrap();
    assert_eq!(other.layout().partial, layout.partial);
    assert_eq!(other.layout().merge_indptr, layout.merge_indptr);
    round_trip(&list, &opts);
}

#[test]
fn empty_requests_and_empty_kv() {
    let h = Heads::new(4, 2, 64).unwrap();
    let batch = batch_of(h, &[0, 3, 2], &[50, 0, 10], None);
    let opts = PlanOptions::new(132, 2);
    let list = plan::plan(&batch, KernelKind::Prefill, &opts).unwrap();
    check(&batch, &opts, &list);
    assert!(list.items.iter().all(|w| w.request != 0));
    // The request with no key still has items, so its output (zero, or a sink) is written.
    let empty: Vec<_> = list.items.iter().filter(|w| w.request == 1).collect();
    assert_eq!(empty.len(), 2);
    assert!(
        empty
            .iter()
            .all(|w| w.kv_start == 0 && w.kv_end == 0 && w.partial == NONE)
    );

    let none = batch_of(h, &[0, 0], &[5, 0], None);
    let list = plan::plan(&none, KernelKind::Prefill, &opts).unwrap();
    assert!(list.items.is_empty() && list.merge_indptr == vec![0]);
    round_trip(&list, &opts);
}

#[test]
fn the_tile_follows_the_packed_query_length() {
    assert_eq!(cta_tile_q(16, 1, 128), 16); // decode, group 16
    assert_eq!(cta_tile_q(8 * 64, 64, 128), 16); // 64 decodes of group 8
    assert_eq!(cta_tile_q(17, 1, 128), 64);
    assert_eq!(cta_tile_q(64 * 10, 10, 128), 64);
    assert_eq!(cta_tile_q(65 * 10, 10, 128), 128);
    assert_eq!(cta_tile_q(8192 * 4, 1, 256), 64); // 128 rows do not fit at head dim 256
    assert_eq!(cta_tile_q(0, 0, 128), 16);
}

#[test]
fn bad_options_and_workspaces_are_refused() {
    let batch = decode_batch(8, 2, 2, 100);
    let run = |o: PlanOptions| {
        plan::plan(&batch, KernelKind::Decode, &o)
            .unwrap_err()
            .to_string()
    };
    assert!(run(PlanOptions::new(0, 1)).contains("num_sms"));
    assert!(run(PlanOptions::new(1, 0)).contains("ctas_per_sm"));
    assert!(run(PlanOptions::new(1, 1).with_fixed_kv_chunk(100)).contains("multiple of 16"));
    assert!(run(PlanOptions::new(1, 1).with_fixed_kv_chunk(0)).contains("positive"));
    assert!(run(PlanOptions::new(1, 1).with_graph_capacity(0)).contains("at least 1"));
    let mut odd_tile = PlanOptions::new(1, 1);
    odd_tile.query_tile = Some(32);
    assert!(run(odd_tile).contains("query_tile"));
    assert!(Capacity::for_graph(&PlanOptions::new(1, 1), 8, 10).is_err());

    let list = plan::plan(&batch, KernelKind::Decode, &PlanOptions::new(1, 1)).unwrap();
    let mut small = vec![0u8; list.layout().bytes - 1];
    let msg = list.write(&mut small).unwrap_err().to_string();
    assert!(msg.contains("needs"), "{msg}");
    let mut ws = vec![0u8; list.layout().bytes];
    assert!(
        WorkList::read(&ws).is_err(),
        "an unwritten workspace must not read"
    );
    list.write(&mut ws).unwrap();
    ws[4 * header::NUM_VALID] = 200;
    assert!(
        WorkList::read(&ws).is_err(),
        "a corrupt count must not read"
    );
}

#[test]
fn layout_is_aligned_and_ordered() {
    let l = Layout::new(5, 7, 3);
    let offs = l.offsets();
    assert_eq!(offs[0], header::BYTES);
    assert!(offs.iter().all(|o| o % 16 == 0));
    assert!(offs.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(l.bytes, offs[9] + 16); // 12 bytes of merge_index, rounded up to 16
    assert_eq!(Layout::ARRAYS.len(), offs.len());
}

/// `static constexpr int <name> = <value>;` lines of struct `ns` of the generated workspace header.
fn cuda_constants(text: &str, ns: &str) -> HashMap<String, i64> {
    let start = text.find(&format!("struct {ns} {{")).unwrap();
    let body = &text[start..start + text[start..].find('}').unwrap()];
    body.lines()
        .filter_map(|l| l.trim().strip_prefix("static constexpr int "))
        .map(|l| {
            let (name, value) = l.trim_end_matches(';').split_once(" = ").unwrap();
            (name.to_string(), value.parse().unwrap())
        })
        .collect()
}

/// Reads `ws` as the kernels do (attention/work.cuh, attention/merge.cuh), with every word index
/// and array position taken from the CUDA header generated for them, not from the Rust constants
/// the writer used: what the GPU sees is the plan.
fn kernels_read_back(ws: &[u8], list: &WorkList) {
    let text = ferrinfer_kernels::workspace::cuda_header();
    let (words, arrays) = (
        cuda_constants(&text, "ws_header"),
        cuda_constants(&text, "ws_array"),
    );
    let word = |at: usize| i32::from_le_bytes(ws[at..at + 4].try_into().unwrap());
    let head = |name: &str| word(4 * words[name] as usize);
    assert_eq!(i64::from(head("kMagicWord")), words["kMagic"]);
    assert_eq!(i64::from(head("kVersionWord")), words["kVersion"]);
    // Word ws_header::kOffsets + ws_array::k<Array> holds the array's byte offset (work_array).
    let array = |name: &str| word(4 * (words["kOffsets"] + arrays[name]) as usize) as usize;
    let padded = head("kPaddedLen") as usize;
    assert_eq!(padded, list.padded_len as usize);
    let valid = array("kValid");
    let fields = [
        "kRequest",
        "kKvHead",
        "kQoTileStart",
        "kQoTileEnd",
        "kKvStart",
        "kKvEnd",
        "kPartial",
    ]
    .map(array);
    for e in 0..padded {
        assert_eq!(word(valid + 4 * e) != 0, e < list.items.len(), "entry {e}");
        if let Some(w) = list.items.get(e) {
            let want = [
                w.request,
                w.kv_head,
                w.qo_tile_start,
                w.qo_tile_end,
                w.kv_start,
                w.kv_end,
                w.partial,
            ];
            for (k, (&at, want)) in fields.iter().zip(want).enumerate() {
                assert_eq!(word(at + 4 * e) as u32, want, "entry {e}, field {k}");
            }
        }
    }
    assert_eq!(head("kTotalQo") as u32, list.total_qo());
    assert_eq!(head("kBatch") as u32, list.batch);
    let (indptr, index) = (array("kMergeIndptr"), array("kMergeIndex"));
    for (r, &x) in list.merge_indptr.iter().enumerate() {
        assert_eq!(word(indptr + 4 * r) as u32, x, "merge_indptr[{r}]");
    }
    for (k, &x) in list.merge_index.iter().enumerate() {
        assert_eq!(word(index + 4 * k) as u32, x, "merge_index[{k}]");
    }
}

/// Sixteen causal prompts of 1024 tokens at GQA 4 (the ragged benchmark): 4096 items, 512 a KV
/// head. Blocks of eight rounds of 132 hold two or three heads each, longest first, so a block
/// reads a few heads' K/V (which stay in L2) and its rounds balance.
#[test]
fn a_prefill_list_runs_head_by_head_in_blocks_of_rounds() {
    let h = Heads::new(32, 8, 128).unwrap();
    let batch = batch_of(h, &[1024; 16], &[1024; 16], None).with_causal(true);
    let opts = PlanOptions::new(132, 1);
    let list = plan::plan(&batch, KernelKind::Prefill, &opts).unwrap();
    check(&batch, &opts, &list);
    assert_eq!(list.items.len(), 4096);
    let block = (plan::PREFILL_BLOCK_ROUNDS * 132) as usize;
    for (i, b) in list.items.chunks(block).enumerate() {
        let heads: std::collections::BTreeSet<u32> = b.iter().map(|w| w.kv_head).collect();
        assert!(heads.len() <= 3, "block {i}: heads {heads:?}");
        // Longest first within the block: it opens on a prompt's last tile (1024 keys).
        assert_eq!(b[0].cost_in(&batch), 2 * 128 + 1024, "block {i}");
    }
}
