//! The scheduler behind `plan()`: from the sequence lengths of a batch, ask the kernel family's tile
//! function for its tiles (once; see `ferrinfer_kernels::attention::tiles`), pick the KV split, and
//! build a load-balanced work list that the kernels read from one workspace.
//!
//! # The work list contract
//!
//! Query heads are packed into the query dimension: packed row `p` of request `b` for KV head
//! `kv_head` is query row `p / group_size` of the request and query head
//! `kv_head * group_size + p % group_size`. A request has `qo_len * group_size` packed rows, cut
//! into tiles of [`WorkList::cta_tile_q`] rows, and `kv_len` keys, cut into chunks of
//! [`WorkList::kv_chunk`] tokens (one chunk when it is not split). Every (request, KV head, query
//! tile, KV chunk) is one [`WorkItem`], one CTA of the grid; a request with no key still gets its
//! items (an empty KV range), because its output must be written (zero, or the sink's share).
//!
//! A request is split when it has more than one chunk. Then each item writes un-normalised
//! partial results instead of the output: request-local query row `i` goes to partial row
//! `item.partial + i` of a scratch buffer of [`WorkList::partial_rows`] rows, each row holding
//! `[num_qo_heads, head_dim]` f32 outputs and `[num_qo_heads]` f32 LSEs (an item writes only the
//! heads of its packed rows). The partial rows of global query row `r` are
//! `merge_index[merge_indptr[r]..merge_indptr[r + 1]]`, in KV order; a merge pass combines them
//! into `o` and `lse` (merge states for softmax variants, a plain sum without softmax). Rows of
//! unsplit requests have an empty list: their items wrote the final output directly. A chunk the
//! causal mask hides entirely still writes its partial rows (LSE `-inf`), so merges must accept
//! `-inf`.
//!
//! # Workspace layout
//!
//! [`WorkList::write`] serialises the list for one host-to-device copy, in the format that
//! [`ferrinfer_kernels::workspace`] defines next to the kernel ABI (re-exported here as [`header`]
//! and [`Layout`]; its word indices and array positions are generated into the CUDA source from the
//! same constants): a 128-byte header of int32 words, then the item arrays `[padded_len]` and the
//! merge lists. The item arrays' offsets depend only on `padded_len`, so in CUDA-graph mode (fixed
//! `padded_len`) they never move; the kernels still take every offset from the header, which a
//! replayed graph reads afresh.

use ferrinfer_kernels::attention::tiles;
use ferrinfer_kernels::workspace::{kind_code, kind_from_code};
use ferrinfer_kernels::{KernelKind, SmResidency, TileInput, Tiles};
// The wire format lives with the kernels (see the module docs); the serialisation stays here.
pub use ferrinfer_kernels::workspace::{Layout, header};

use crate::attention::batch::{Batch, KvIndex};
use crate::attention::wave_model::{self, predicted_time};
use crate::device::gpu::SmResources;
use crate::error::{Error, Result};

/// KV chunks start at multiples of this many tokens, so a kernel's KV tiles (multiples of 16 keys,
/// the k dimension of a tensor-core MMA) never straddle two chunks.
pub const KV_CHUNK_ALIGN: u32 = 16;

/// The shortest chunk the split search may choose. Below it, a CTA's fixed costs (loading its query
/// tile, writing `head_dim` f32 partials per row, which the merge reads back) are no longer small
/// next to the keys and values it reads.
pub const MIN_KV_CHUNK: u32 = 128;

/// [`WorkItem::partial`] of an item that writes the final output directly.
pub const NONE: u32 = u32::MAX;

/// How to plan for a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlanOptions {
    /// Streaming multiprocessors of the device (132 on an H100 SXM).
    pub num_sms: u32,
    /// Work items per SM the KV-split search aims for (the kernel's occupancy), when `sm` does not
    /// describe the device; with `sm`, the family's tile function says it.
    pub ctas_per_sm: u32,
    /// What one SM of the device offers: the tile function derives occupancy from it (and whether
    /// the wide K/V tile pays).
    pub sm: Option<SmResources>,
    /// Batch-invariant mode: split every request's KV into chunks of exactly this many tokens (a
    /// multiple of [`KV_CHUNK_ALIGN`]), whatever the rest of the batch, and use a query tile that
    /// depends only on the kernel kind and head dim, so a request's result never depends on who it
    /// is batched with.
    pub fixed_kv_chunk: Option<u32>,
    /// CUDA-graph mode: the work list always has exactly this many entries (padding is marked
    /// invalid), so the grid of a captured graph fits every later plan; a batch that needs more
    /// items is an error.
    pub graph_capacity: Option<u32>,
    /// This query tile (16, 64 or 128 packed rows) instead of the one the batch suggests: a
    /// caller that knows every request's shape fixes it, also for the batch-invariant mode.
    pub query_tile: Option<u32>,
    /// Every request has one query row (a decode step on the prefill template): the query tile
    /// follows the group size whatever the batch.
    pub one_row_per_request: bool,
    /// This many warps along the keys (1 or 2) at the prefill template's 16-row tile instead of
    /// the count its tile function picks by the batch's grid: for benchmarks, and for a CUDA
    /// graph, whose captured kernel a replan must not change.
    pub kv_warps: Option<u32>,
    /// The one-warp 16-row tile's narrow K/V form (`Some(true)`) or its default one
    /// (`Some(false)`) for a decode, instead of the plan's choice by its wave model (`None`; see
    /// [`plan`]). Batch-invariant and CUDA-graph plans always take the default.
    pub narrow_kv_tile: Option<bool>,
}

impl PlanOptions {
    /// Options for a device of `num_sms` SMs running `ctas_per_sm` CTAs each; no fixed split, no
    /// graph padding.
    pub fn new(num_sms: u32, ctas_per_sm: u32) -> Self {
        PlanOptions {
            num_sms,
            ctas_per_sm,
            sm: None,
            fixed_kv_chunk: None,
            graph_capacity: None,
            query_tile: None,
            one_row_per_request: false,
            kv_warps: None,
            narrow_kv_tile: None,
        }
    }

    /// Options for a device of `num_sms` SMs like `sm`: the plan takes the occupancy of the tiles
    /// it chooses from the family's tile function.
    pub fn for_device(num_sms: u32, sm: SmResources) -> Self {
        PlanOptions {
            sm: Some(sm),
            ..PlanOptions::new(num_sms, 1)
        }
    }

    /// These options with a fixed KV chunk (batch-invariant mode).
    pub fn with_fixed_kv_chunk(mut self, tokens: u32) -> Self {
        self.fixed_kv_chunk = Some(tokens);
        self
    }

    /// These options padded for a CUDA graph of `entries` work items.
    pub fn with_graph_capacity(mut self, entries: u32) -> Self {
        self.graph_capacity = Some(entries);
        self
    }

    fn validate(&self) -> Result<()> {
        if self.num_sms == 0 || self.ctas_per_sm == 0 {
            return Err(Error::invalid(format!(
                "num_sms ({}) and ctas_per_sm ({}) must be at least 1",
                self.num_sms, self.ctas_per_sm
            )));
        }
        if let Some(c) = self.fixed_kv_chunk
            && (c == 0 || !c.is_multiple_of(KV_CHUNK_ALIGN) || c > i32::MAX as u32)
        {
            return Err(Error::invalid(format!(
                "fixed_kv_chunk must be a positive multiple of {KV_CHUNK_ALIGN} tokens below 2^31, got {c}"
            )));
        }
        if self.graph_capacity == Some(0) {
            return Err(Error::invalid("graph_capacity must be at least 1"));
        }
        if let Some(t) = self.query_tile
            && ![16, 64, 128].contains(&t)
        {
            return Err(Error::invalid(format!(
                "query_tile must be 16, 64 or 128 rows, got {t}"
            )));
        }
        if let Some(n) = self.kv_warps
            && ![1, 2].contains(&n)
        {
            return Err(Error::invalid(format!(
                "kv_warps must be 1 or 2 warps along the keys, got {n}"
            )));
        }
        Ok(())
    }

    /// Work items per SM for `tiles`: the tile function's occupancy when the device's SMs are
    /// described, else [`PlanOptions::ctas_per_sm`].
    fn occupancy(&self, tiles: &Tiles) -> u32 {
        match (self.sm, tiles.ctas_per_sm) {
            (Some(_), Some(n)) => n,
            _ => self.ctas_per_sm,
        }
    }

    /// Work items that fill the device once: one per resident CTA, and never more than a graph
    /// holds.
    fn target_items(&self, tiles: &Tiles) -> u64 {
        let wave = u64::from(self.num_sms) * u64::from(self.occupancy(tiles));
        self.graph_capacity.map_or(wave, |c| wave.min(u64::from(c)))
    }
}

/// One CTA's work: a tile of packed query rows of one request and KV head, over a range of keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct WorkItem {
    /// Index of the request in the batch.
    pub request: u32,
    /// KV head; the item computes the query heads of its group.
    pub kv_head: u32,
    /// First packed row of the tile (see the module docs for packing).
    pub qo_tile_start: u32,
    /// One past the last packed row; at most `qo_len * group_size`.
    pub qo_tile_end: u32,
    /// First key, within the request.
    pub kv_start: u32,
    /// One past the last key; at most `kv_len`.
    pub kv_end: u32,
    /// Partial row of request-local query row 0 for this item's chunk, or [`NONE`] when the
    /// request is not split and the item writes `o` and `lse` directly.
    pub partial: u32,
}

impl WorkItem {
    /// The load-balancing cost of this item of `batch`: the kernel's time grows with the keys it
    /// streams and, more weakly, with the query rows it holds. In a causal batch a tile streams
    /// only the keys up to its last row's diagonal (the kernels' bound), so the tiles of one long
    /// prompt cost from one key tile to all of them.
    pub fn cost_in(&self, batch: &Batch) -> u64 {
        2 * u64::from(self.qo_tile_end.saturating_sub(self.qo_tile_start))
            + u64::from(self.visible_end(batch).saturating_sub(self.kv_start))
    }

    /// One past the last key the item streams: `kv_end`, or in a causal batch the key after its
    /// last row's diagonal when that comes first (never before `kv_start`). An item that is not
    /// of `batch` (its request out of range) counts its whole key range.
    fn visible_end(&self, batch: &Batch) -> u32 {
        if !batch.causal() || self.qo_tile_end == 0 || self.request as usize >= batch.batch() {
            return self.kv_end;
        }
        let (b, kv) = (self.request as usize, batch.kv());
        let group = batch.heads().group_size();
        // Key j is visible to row i iff j <= i + total - qo_len - offset (attention/work.cuh).
        let shift =
            i64::from(kv.key_total(b)) - i64::from(batch.qo_len(b)) - i64::from(kv.key_offset(b));
        let end = i64::from((self.qo_tile_end - 1) / group) + shift + 1;
        // max then min, not clamp: a hand-built item may have kv_start > kv_end.
        end.max(i64::from(self.kv_start))
            .min(i64::from(self.kv_end)) as u32
    }
}

/// The plan of one batch: tile sizes, the work list (longest first) and the merge lists.
///
/// Two lists are equal when they schedule the same work, which is what a workspace holds:
/// [`WorkList::tiles`], the record of the decision, is not compared.
#[derive(Clone, Debug, Eq)]
pub struct WorkList {
    /// The kernel template the list was planned for.
    pub kind: KernelKind,
    /// Packed query rows per tile: 16, 64 or 128.
    pub cta_tile_q: u32,
    /// Tokens per KV chunk; at least every request's `kv_len` when nothing is split.
    pub kv_chunk: u32,
    /// The valid work items, longest first (a prefill list within each of its blocks of
    /// [`PREFILL_BLOCK_ROUNDS`] rounds).
    pub items: Vec<WorkItem>,
    /// Entries of the serialised work list (the grid size): `items.len()`, or the graph capacity.
    /// Entries past `items.len()` are padding, marked invalid.
    pub padded_len: u32,
    /// `[total_qo + 1]`: the merge list of global query row `r` is
    /// `merge_index[merge_indptr[r]..merge_indptr[r + 1]]`.
    pub merge_indptr: Vec<u32>,
    /// Partial rows to merge, grouped by query row, in KV order; `[partial_rows]`.
    pub merge_index: Vec<u32>,
    /// Rows of the partial-output scratch buffer (0 when nothing is split).
    pub partial_rows: u32,
    /// Requests in the batch (kernels that search `qo_indptr` take it from the header, since a
    /// CUDA-graph replay keeps the launch arguments of the capture).
    pub batch: u32,
    /// Every tile parameter the family's tile function chose for this list, with its reasons
    /// (its `Display` prints them for logs); `None` for a list read back from a workspace, which
    /// holds only `cta_tile_q`.
    pub tiles: Option<Tiles>,
}

impl PartialEq for WorkList {
    fn eq(&self, other: &Self) -> bool {
        // Every field but `tiles`, spelled out so that a new field is not forgotten.
        let WorkList {
            kind,
            cta_tile_q,
            kv_chunk,
            items,
            padded_len,
            merge_indptr,
            merge_index,
            partial_rows,
            batch,
            tiles: _,
        } = self;
        (
            kind,
            cta_tile_q,
            kv_chunk,
            items,
            padded_len,
            merge_indptr,
            merge_index,
            partial_rows,
            batch,
        ) == (
            &other.kind,
            &other.cta_tile_q,
            &other.kv_chunk,
            &other.items,
            &other.padded_len,
            &other.merge_indptr,
            &other.merge_index,
            &other.partial_rows,
            &other.batch,
        )
    }
}

/// The sizes a workspace is allocated for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Capacity {
    /// Work list entries (`padded_len`).
    pub items: u32,
    /// Query rows of the batch (`total_qo`).
    pub qo_rows: u32,
    /// Partial rows.
    pub partial_rows: u32,
}

impl Capacity {
    /// Bounds that hold for every batch of at most `max_qo_rows` query rows planned with `opts`,
    /// which must be in CUDA-graph mode: allocate once, re-plan forever.
    ///
    /// A split request `b` has `kv_heads * tiles * chunks` items and `qo_len * chunks` partial
    /// rows, and `qo_len <= tiles * cta_tile_q / group_size`, so partial rows never exceed
    /// `items * cta_tile_q / num_qo_heads` (with the largest tile, 128).
    pub fn for_graph(opts: &PlanOptions, num_qo_heads: u32, max_qo_rows: u32) -> Result<Self> {
        let Some(items) = opts.graph_capacity else {
            return Err(Error::invalid(
                "Capacity::for_graph needs PlanOptions::graph_capacity to bound the work list",
            ));
        };
        if num_qo_heads == 0 {
            return Err(Error::invalid("num_qo_heads must be at least 1"));
        }
        let partial = (u64::from(items) * 128).div_ceil(u64::from(num_qo_heads));
        Ok(Capacity {
            items,
            qo_rows: max_qo_rows,
            partial_rows: to_u32(partial, "the partial-row bound")?,
        })
    }
}

/// Query tile rows for a batch of `requests` non-empty requests with `packed_rows` packed query
/// rows in all (query rows times group size), at head dim `head_dim`: the rule the families' tile
/// functions share ([`ferrinfer_kernels::attention::tiles::query_tile`] says why).
pub fn cta_tile_q(packed_rows: u64, requests: u64, head_dim: u32) -> u32 {
    tiles::cta_tile_q(packed_rows, requests, head_dim)
}

/// What the shared query-tile rule ([`cta_tile_q`]) reads of `batch`: its packed query rows (query
/// rows times the group size) and its requests with at least one query row.
pub(crate) fn packed_rows_and_requests(batch: &Batch) -> (u64, u64) {
    let group = u64::from(batch.heads().group_size());
    (0..batch.batch())
        .map(|b| u64::from(batch.qo_len(b)))
        .filter(|&n| n > 0)
        .fold((0, 0), |(rows, n), len| (rows + len * group, n + 1))
}

/// Plan `batch` for kernel family `kind` on a device described by `opts`: the family's tile
/// function chooses the tiles once (recorded in [`WorkList::tiles`]), then the KV split is searched
/// and the work list built. A decode on the one-warp 16-row tile may then take that tile's narrow
/// K/V form instead, where the wave model predicts it faster (`take_narrow_tile`).
pub fn plan(batch: &Batch, kind: KernelKind, opts: &PlanOptions) -> Result<WorkList> {
    opts.validate()?;
    let reqs = requests(batch)?;
    let heads = batch.heads();
    let group = u64::from(heads.group_size());
    let tiles = choose_tiles(&reqs, batch, kind, opts);
    let tile = tiles.cta_tile_q;
    let kv_heads = u64::from(heads.num_kv_heads());
    let count = |chunk: u32| kv_heads * count_tiles(&reqs, group, tile, chunk);
    let decode = kind == KernelKind::Decode || opts.one_row_per_request;
    // The split that fills a wave of `tiles`' CTAs.
    let fill = |tiles: &Tiles| {
        let target = opts.target_items(tiles);
        let chunk = search_kv_chunk(&reqs, target, &count);
        if decode && count(chunk) > target {
            balance_tail_wave(chunk, target, opts.graph_capacity, &count)
        } else {
            chunk
        }
    };

    let kv_chunk = opts.fixed_kv_chunk.unwrap_or_else(|| fill(&tiles));
    let (tiles, kv_chunk) = if decode {
        take_narrow_tile(
            tiles,
            kv_chunk,
            &reqs,
            (kv_heads, group),
            opts,
            &count,
            &fill,
        )
    } else {
        // The list records the tile the plan runs with: no alternative.
        let tiles = Tiles {
            alternative: None,
            ..tiles
        };
        (tiles, kv_chunk)
    };
    let needed = count(kv_chunk);
    if let Some(cap) = opts.graph_capacity
        && needed > u64::from(cap)
    {
        return Err(Error::invalid(format!(
            "this batch needs {needed} work items but the graph capacity is {cap}; \
             plan with a larger PlanOptions::graph_capacity"
        )));
    }
    to_i32_range(needed, "work items")?;
    let block = (!decode).then(|| PREFILL_BLOCK_ROUNDS as usize * opts.num_sms as usize);
    build(
        batch,
        &reqs,
        kind,
        tiles,
        kv_chunk,
        block,
        opts.graph_capacity,
    )
}

/// The one-warp 16-row tile's narrow K/V form ([`Tiles::alternative`]) and its split instead of
/// `tiles` and `chunk`, where the wave model (wave_model.rs) predicts it [`NARROW_GAIN`] faster,
/// or where the caller asked for it. Only for batches whose longest request has at least
/// [`NARROW_MIN_SKEW`] times the keys of the shortest (equal requests split into equal items on
/// the default tile already, and there its CTAs stream faster: H200, b64 l4096, 4089 GB/s
/// against 3421 unsplit and 3806 split into 5632 items on the narrow tile), and whose default
/// plan is one wave at most (over a wave, CTAs that end take the next item); and for even
/// batches whose unsplit items fill more than a wave of the default tile but at most one of the
/// narrow (which then runs them unsplit, where the default would split them). The narrow tile's
/// splits tried: the one that fills its wave, and chunks of the request lengths (so the longer
/// requests split into items as long as a shorter one; up to [`NARROW_MAX_LENGTHS`] of them,
/// evenly spaced), each making at most [`NARROW_MAX_WAVES`] waves of items.
/// `heads` is the KV heads and the group size.
fn take_narrow_tile(
    mut tiles: Tiles,
    chunk: u32,
    reqs: &[Request],
    (kv_heads, group): (u64, u64),
    opts: &PlanOptions,
    count: &impl Fn(u32) -> u64,
    fill: &impl Fn(&Tiles) -> u32,
) -> (Tiles, u32) {
    let Some(narrow) = tiles.alternative.take().map(|b| *b) else {
        return (tiles, chunk);
    };
    let fixed = opts.fixed_kv_chunk.is_some() || opts.graph_capacity.is_some();
    // The narrow tiles, their reasons after the default's (the query tile's is there).
    let take = |tiles: Tiles, mut narrow: Tiles, chunk: u32, why: String| {
        let mut reasons = tiles.reasons;
        reasons.append(&mut narrow.reasons);
        reasons.push(why);
        (Tiles { reasons, ..narrow }, chunk)
    };
    match opts.narrow_kv_tile {
        _ if fixed => return (tiles, chunk),
        Some(false) => return (tiles, chunk),
        Some(true) => {
            let c = fill(&narrow);
            return take(
                tiles,
                narrow,
                c,
                "narrow K/V tile: fixed by the caller".into(),
            );
        }
        None => {}
    }
    let live: Vec<u32> = reqs
        .iter()
        .filter(|r| r.qo_len > 0)
        .map(|r| r.kv_len)
        .collect();
    let (Some(&shortest), Some(&longest)) = (live.iter().min(), live.iter().max()) else {
        return (tiles, chunk);
    };
    let default_slots = opts.target_items(&tiles);
    if longest < NARROW_MIN_SKEW * shortest.max(1) {
        // An even batch whose unsplit items are over a wave of the default tile but within one
        // of the narrow: the default splits them to balance its last wave and merges, the
        // narrow runs them in one wave (its own fill, unsplit here). H200, GQA 2 b64 l4096
        // (1024 items; 792 default slots, 1056 narrow; the default split them in three, 3072
        // items): 4303 / 4317 GB/s against 4232 / 4262 (kernels/notes/decode.md, sessions 15
        // and 21). Past the narrow wave both split, and the default's faster CTAs win (b256
        // l2048, 2048 items: 4027 / 4056 narrow against 4148 / 4163).
        let unsplit = count(longest.max(1));
        let narrow_slots = opts.target_items(&narrow);
        if unsplit > default_slots && unsplit <= narrow_slots {
            let why = format!(
                "narrow K/V tile: {unsplit} unsplit items, over a wave of the default tile \
                 ({default_slots}) and within one of the narrow ({narrow_slots})"
            );
            let c = fill(&narrow);
            return take(tiles, narrow, c, why);
        }
        return (tiles, chunk);
    }
    // Over a wave of the default tile, the hardware hands the next item to each CTA that ends,
    // longest first, so the short items fill the long ones' tail.
    if count(chunk) > default_slots {
        return (tiles, chunk);
    }
    // The items' keys as (keys, items) groups, longest first: a request's whole chunks and its
    // last, for each KV head and query tile.
    let tile_q = u64::from(tiles.cta_tile_q);
    let keys = |c: u32| {
        let mut k: Vec<(u64, u64)> = Vec::new();
        for r in reqs.iter().filter(|r| r.qo_len > 0) {
            let items = kv_heads * (u64::from(r.qo_len) * group).div_ceil(tile_q);
            let n = chunks(r.kv_len, c);
            let last = r.kv_len - (n - 1) * c;
            k.push((u64::from(c), items * u64::from(n - 1)));
            k.push((u64::from(last), items));
        }
        wave_model::groups(k)
    };
    let sms = f64::from(opts.num_sms);
    let default_time = predicted_time(
        &keys(chunk),
        default_slots,
        DEFAULT_TILE_SATURATING_PER_SM * sms,
    );
    let slots = opts.target_items(&narrow);
    let mut lens: Vec<u32> = live
        .iter()
        .map(|&l| l.div_ceil(KV_CHUNK_ALIGN).max(1) * KV_CHUNK_ALIGN)
        .filter(|&c| c >= MIN_KV_CHUNK)
        .collect();
    lens.sort_unstable();
    lens.dedup();
    // A batch of many distinct lengths tries evenly spaced ones among them (each try simulates
    // the whole list).
    let step = lens.len().div_ceil(NARROW_MAX_LENGTHS).max(1);
    let tried = lens.iter().step_by(step).copied().chain([fill(&narrow)]);
    let best = tried
        .filter(|&c| count(c) <= NARROW_MAX_WAVES * slots)
        .map(|c| {
            let t = predicted_time(&keys(c), slots, NARROW_TILE_SATURATING_PER_SM * sms);
            (t / NARROW_TILE_RATE, c)
        })
        .min_by(|a, b| a.0.total_cmp(&b.0));
    match best {
        Some((t, c)) if t * NARROW_GAIN < default_time => {
            let why = format!(
                "narrow K/V tile, {c}-key chunks: the wave model predicts {:.0}% of the default \
                 tile's time at its {chunk}-key chunks (requests of {shortest} to {longest} keys)",
                100.0 * t / default_time
            );
            take(tiles, narrow, c, why)
        }
        _ => (tiles, chunk),
    }
}

/// HBM-saturating CTAs per SM of the one-warp 16-row tile, default and narrow K/V form: the
/// device's decode rate over one CTA's rate alone (H200, bf16, head dim 128: 4089 GB/s; a default
/// CTA alone 8.9 GB/s, kernels/notes/decode.md session 9; a narrow one 6.7, its unsplit b64
/// l4096 at 512 CTAs), over 132 SMs.
const DEFAULT_TILE_SATURATING_PER_SM: f64 = 3.5;
const NARROW_TILE_SATURATING_PER_SM: f64 = 4.6;
/// A narrow CTA alone streams at this share of a default one's rate (6.7 / 8.9 GB/s).
const NARROW_TILE_RATE: f64 = 0.75;
/// The gain the model must predict for the narrow tile (its error on the keys measured).
const NARROW_GAIN: f64 = 1.05;
/// Longest over shortest request below which the narrow tile is not considered.
const NARROW_MIN_SKEW: u32 = 2;
/// Waves of narrow CTAs a split tried may make (each item pays a start).
const NARROW_MAX_WAVES: u64 = 4;
/// Request lengths tried as the narrow tile's chunk, at most.
const NARROW_MAX_LENGTHS: usize = 4;

/// One request's lengths.
#[derive(Clone, Copy, Debug)]
struct Request {
    qo_len: u32,
    kv_len: u32,
}

fn requests(batch: &Batch) -> Result<Vec<Request>> {
    let n = batch.batch();
    if batch.kv().batch() != n {
        return Err(Error::invalid(format!(
            "qo_indptr describes {n} requests but the KV index {}",
            batch.kv().batch()
        )));
    }
    to_i32_range(batch.total_qo() as u64, "total query rows")?;
    (0..n)
        .map(|b| {
            let kv_len = batch.kv().kv_len(b);
            to_i32_range(u64::from(kv_len), "a request's KV length")?;
            Ok(Request {
                qo_len: batch.qo_len(b),
                kv_len,
            })
        })
        .collect()
}

/// The tiles [`plan`] chooses for `batch` (the family's tile function, once), for a caller that
/// wants them without a plan.
pub fn tiles(batch: &Batch, kind: KernelKind, opts: &PlanOptions) -> Result<Tiles> {
    opts.validate()?;
    let reqs = requests(batch)?;
    Ok(choose_tiles(&reqs, batch, kind, opts))
}

/// The query tile [`plan`] uses for `batch`: the `cta_tile_q` of [`tiles()`].
pub fn query_tile(batch: &Batch, kind: KernelKind, opts: &PlanOptions) -> Result<u32> {
    Ok(tiles(batch, kind, opts)?.cta_tile_q)
}

/// What the family's tile function needs of the batch and the options, and its answer.
fn choose_tiles(reqs: &[Request], batch: &Batch, kind: KernelKind, opts: &PlanOptions) -> Tiles {
    let heads = batch.heads();
    let group = heads.group_size();
    // The grid before any split: every request's keys in one chunk.
    let kv_heads = u64::from(heads.num_kv_heads());
    let work_items = |tile: u32| kv_heads * count_tiles(reqs, u64::from(group), tile, u32::MAX);
    let (packed_rows, requests) = packed_rows_and_requests(batch);
    let input = TileInput {
        packed_rows,
        requests,
        group_size: group,
        page_size: batch.kv().page_size(),
        head_dim_qk: heads.head_dim(),
        head_dim_vo: heads.head_dim(),
        sm: opts.sm.as_ref().map(|sm| sm as &dyn SmResidency),
        num_sms: opts.num_sms,
        work_items: &work_items,
        batch_invariant: opts.fixed_kv_chunk.is_some(),
        one_row_per_request: opts.one_row_per_request,
        query_tile: opts.query_tile,
        kv_warps: opts.kv_warps,
    };
    (kind.family().tiles)(&input)
}

impl SmResidency for SmResources {
    fn resident_ctas(&self, threads: u32, shared_bytes: u32, registers_per_thread: u32) -> u32 {
        SmResources::resident_ctas(self, threads, shared_bytes, registers_per_thread)
    }
    fn fits(&self, shared_bytes: u32) -> bool {
        SmResources::fits(self, shared_bytes)
    }
}

/// Chunks of a request of `kv_len` keys; a request with no key still has one (empty) chunk.
fn chunks(kv_len: u32, chunk: u32) -> u32 {
    kv_len.div_ceil(chunk).max(1)
}

/// (query tile, KV chunk) pairs of the batch for one KV head.
fn count_tiles(reqs: &[Request], group: u64, tile: u32, chunk: u32) -> u64 {
    reqs.iter()
        .filter(|r| r.qo_len > 0)
        .map(|r| {
            let tiles = (u64::from(r.qo_len) * group).div_ceil(u64::from(tile));
            tiles * u64::from(chunks(r.kv_len, chunk))
        })
        .sum()
}

/// The smallest chunk (a multiple of [`KV_CHUNK_ALIGN`], at least [`MIN_KV_CHUNK`]) whose work
/// list still fits in `target` items: as many CTAs as the device runs at once, no more, since a
/// second wave of split items only adds merge work. A batch that fills the device unsplit is not
/// split.
fn search_kv_chunk(reqs: &[Request], target: u64, count: &impl Fn(u32) -> u64) -> u32 {
    let max_kv = reqs
        .iter()
        .filter(|r| r.qo_len > 0)
        .map(|r| r.kv_len)
        .max()
        .unwrap_or(0);
    let unsplit = max_kv.div_ceil(KV_CHUNK_ALIGN).max(1) * KV_CHUNK_ALIGN;
    let unsplit = unsplit.max(MIN_KV_CHUNK);
    if count(unsplit) >= target {
        return unsplit;
    }
    // count() never grows with the chunk; search the multiples of the alignment.
    let (mut lo, mut hi) = (MIN_KV_CHUNK / KV_CHUNK_ALIGN, unsplit / KV_CHUNK_ALIGN);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if count(mid * KV_CHUNK_ALIGN) <= target {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    lo * KV_CHUNK_ALIGN
}

/// A decode over more items than one wave of CTAs: the chunk, `unsplit` or a split of it into up
/// to [`MAX_TAIL_SPLIT`] pieces, whose last wave streams K/V the fastest. A decode CTA is bound by
/// memory latency, so an SM saturates HBM with [`SATURATING_SHARE`] of its resident CTAs, and a
/// last wave with fewer runs at their share of the bandwidth: a wave of n items costs as much as
/// max(n, saturating) items. Measured on the H200 (tensor-core decode, 6 CTAs an SM, 792 a wave,
/// bf16 hd128, 2026-11-29): 512 items in one wave 4203 GB/s; 2048 items (two waves and 464) 4282;
/// 1024 items (one wave and 232, GQA 2 at b64 l4096 and page size 1 at b128 l1024) 3518 and 3288,
/// which this model puts at 78% of full speed. Each split adds merge work, so a split must gain
/// more than [`SPLIT_GAIN`]. `wave` counts CTAs of the instance the tile function chose (its
/// `ctas_per_sm` from its real shared memory): six an SM for the one-warp 16-row tile on an H200,
/// three for the two-warp one, whose 2048-item decodes this model splits in four (the two-warp
/// build measured in kernels/notes/decode.md was planned with this model too).
fn balance_tail_wave(
    unsplit: u32,
    wave: u64,
    graph_capacity: Option<u32>,
    count: &impl Fn(u32) -> u64,
) -> u32 {
    let saturating = (wave * SATURATING_SHARE.0)
        .div_ceil(SATURATING_SHARE.1)
        .max(1);
    // Cost per item of work, in items of full-speed time: full waves, then the last one.
    let cost = |items: u64| {
        let (full, rest) = (items / wave, items % wave);
        let time = full * wave + if rest > 0 { rest.max(saturating) } else { 0 };
        time as f64 / items as f64
    };
    let mut best = (cost(count(unsplit)), unsplit);
    for pieces in 2..=MAX_TAIL_SPLIT {
        let chunk = unsplit.div_ceil(pieces).div_ceil(KV_CHUNK_ALIGN) * KV_CHUNK_ALIGN;
        if chunk < MIN_KV_CHUNK {
            break;
        }
        let items = count(chunk);
        if graph_capacity.is_some_and(|c| items > u64::from(c)) {
            break;
        }
        let c = cost(items) * SPLIT_GAIN;
        if c < best.0 {
            best = (c, chunk);
        }
    }
    best.1
}

/// The share of an SM's resident decode CTAs that saturates its memory bandwidth (4 of 6; the
/// measurements are at [`balance_tail_wave`]).
const SATURATING_SHARE: (u64, u64) = (2, 3);
/// Splits [`balance_tail_wave`] considers.
const MAX_TAIL_SPLIT: u32 = 4;
/// The gain a split must bring (its merge pass and partial states cost a few percent).
const SPLIT_GAIN: f64 = 1.05;

/// Rounds of a grid of one CTA an SM in a block of a prefill work list: the list runs KV head by
/// KV head in blocks of this many times the SMs, longest first within each block (`build`).
/// Measured on an H200 against one longest-first list (FA3, TFLOP/s, two runs each, same call;
/// kernels/notes/fa3.md, session 17): ragged b16 l1024 +3.7%, paged b16 l1024 +3.2% (pages of
/// 16) to +5.6% (64), paged b4 l8192 +2.1%, single prompts and append within 0.7%; FA2 within
/// 0.5% but head dim 256 (-1.3%). Blocks of 16 rounds measured about the same, of 4 less.
pub const PREFILL_BLOCK_ROUNDS: u32 = 8;

/// Lay out the items and the partial rows of a chosen tile and chunk; a prefill list in blocks of
/// `block` items (see [`PREFILL_BLOCK_ROUNDS`]).
fn build(
    batch: &Batch,
    reqs: &[Request],
    kind: KernelKind,
    tiles: Tiles,
    kv_chunk: u32,
    block: Option<usize>,
    graph_capacity: Option<u32>,
) -> Result<WorkList> {
    let tile = tiles.cta_tile_q;
    let group = batch.heads().group_size();
    let mut items = Vec::new();
    let mut merge_indptr = Vec::with_capacity(batch.total_qo() + 1);
    let mut merge_index = Vec::new();
    let mut partial_rows: u64 = 0;
    merge_indptr.push(0);
    for (b, r) in reqs.iter().enumerate() {
        let n = chunks(r.kv_len, kv_chunk);
        let split = n > 1 && r.qo_len > 0;
        // Chunk-major partial rows: chunk c of this request owns rows base + c * qo_len + (0..qo_len).
        let base = partial_rows;
        if split {
            partial_rows += u64::from(r.qo_len) * u64::from(n);
            to_i32_range(partial_rows, "partial rows")?;
        }
        for i in 0..r.qo_len {
            if split {
                merge_index.extend((0..n).map(|c| (base + u64::from(c * r.qo_len + i)) as u32));
            }
            merge_indptr.push(merge_index.len() as u32);
        }
        let packed = r.qo_len * group;
        for kv_head in 0..batch.heads().num_kv_heads() {
            for start in (0..packed).step_by(tile as usize) {
                for c in 0..n {
                    items.push(WorkItem {
                        request: b as u32,
                        kv_head,
                        qo_tile_start: start,
                        qo_tile_end: (start + tile).min(packed),
                        kv_start: (c * kv_chunk).min(r.kv_len),
                        kv_end: (c + 1).saturating_mul(kv_chunk).min(r.kv_len),
                        partial: if split {
                            (base + u64::from(c * r.qo_len)) as u32
                        } else {
                            NONE
                        },
                    });
                }
            }
        }
    }
    // Longest first, by the keys each item really streams (`cost_in`: a causal tile's stop at its
    // diagonal): the hardware hands CTAs out in grid order, and the persistent FA3 kernel deals
    // the list out in rounds, so big items start early and small ones fill the gaps at the end.
    // Ties keep a fixed order (request, head, rows), so the same batch gives the same list.
    let longest_first = |w: &WorkItem| {
        (
            std::cmp::Reverse(cost_bucket(w.cost_in(batch))),
            w.request,
            w.kv_head,
            w.qo_tile_start,
            w.kv_start,
        )
    };
    match block {
        // A prefill list: longest first within blocks of a few rounds, taken KV head by KV head,
        // so a block's items read the K/V of a head or two, which stays in L2 while the block
        // runs. Longest first over the whole list reads every head's K/V once per length class
        // (ncu, ragged b16 l1024 on an H200: 559 MB from DRAM, L2 hit rate 61%; by head 223 MB,
        // 80%, as FlashInfer's list, which runs head by head). Whole heads in order lose the
        // rounds' balance (ragged -2%, a single prompt -30%); the rounds of a block still balance.
        Some(len) => {
            items.sort_by_cached_key(|w| (w.kv_head, longest_first(w)));
            for b in items.chunks_mut(len.max(1)) {
                b.sort_by_cached_key(longest_first);
            }
        }
        None => items.sort_by_cached_key(longest_first),
    }
    let padded_len = graph_capacity.unwrap_or(items.len() as u32);
    Ok(WorkList {
        kind,
        cta_tile_q: tile,
        kv_chunk,
        items,
        padded_len,
        merge_indptr,
        merge_index,
        partial_rows: partial_rows as u32,
        batch: batch.batch() as u32,
        tiles: Some(tiles),
    })
}

/// `cost`'s bucket: eight an octave (the top bit's position and the three bits below it), so
/// items within about 12% of each other tie and keep their (request, head, rows) order, which
/// runs a head's tiles side by side and lets them share its K/V in L2 (append's K/V is five
/// times L2: interleaved across requests, every item streams its own from DRAM).
fn cost_bucket(cost: u64) -> u64 {
    if cost < 8 {
        return cost;
    }
    let top = 63 - u64::from(cost.leading_zeros());
    8 * top + ((cost >> (top - 3)) & 7)
}

fn to_u32(x: u64, what: &str) -> Result<u32> {
    u32::try_from(x).map_err(|_| Error::unsupported(format!("{what} = {x} does not fit 32 bits")))
}

/// Every count the kernels read must fit in an int32.
fn to_i32_range(x: u64, what: &str) -> Result<()> {
    if x > i32::MAX as u64 {
        return Err(Error::unsupported(format!(
            "{what} = {x} does not fit the work list's int32 fields"
        )));
    }
    Ok(())
}

/// Bytes a workspace needs to hold any plan within `capacity` made with `opts` (a graph plan always
/// writes `graph_capacity` entries), so the caller can allocate it once.
pub fn workspace_bytes(opts: &PlanOptions, capacity: &Capacity) -> usize {
    let items = capacity.items.max(opts.graph_capacity.unwrap_or(0));
    Layout::new(items, capacity.qo_rows, capacity.partial_rows).bytes
}

impl WorkList {
    /// Query rows of the planned batch.
    pub fn total_qo(&self) -> u32 {
        (self.merge_indptr.len() - 1) as u32
    }

    /// Whether any request is split (so a merge pass must run).
    pub fn is_split(&self) -> bool {
        self.partial_rows > 0
    }

    /// Whether serialised entry `entry` is a real item rather than graph padding.
    pub fn is_valid(&self, entry: usize) -> bool {
        entry < self.items.len()
    }

    /// The smallest capacity this plan fits in.
    pub fn capacity(&self) -> Capacity {
        Capacity {
            items: self.padded_len,
            qo_rows: self.total_qo(),
            partial_rows: self.partial_rows,
        }
    }

    /// The layout of this plan's workspace.
    pub fn layout(&self) -> Layout {
        Layout::new(self.padded_len, self.total_qo(), self.partial_rows)
    }

    /// Serialise into `ws` (see the module docs for the format); bytes past the layout's end are
    /// left as they were.
    pub fn write(&self, ws: &mut [u8]) -> Result<Layout> {
        let layout = self.layout();
        if ws.len() < layout.bytes {
            return Err(Error::invalid(format!(
                "the workspace has {} bytes but this plan needs {} (see plan::workspace_bytes)",
                ws.len(),
                layout.bytes
            )));
        }
        let mut head = [0i32; header::BYTES / 4];
        head[header::MAGIC_WORD] = header::MAGIC;
        head[header::VERSION_WORD] = header::VERSION;
        head[header::KIND] = kind_code(self.kind);
        head[header::CTA_TILE_Q] = self.cta_tile_q as i32;
        head[header::KV_CHUNK] = word(self.kv_chunk);
        head[header::PADDED_LEN] = self.padded_len as i32;
        head[header::NUM_VALID] = self.items.len() as i32;
        head[header::TOTAL_QO] = self.total_qo() as i32;
        head[header::PARTIAL_ROWS] = self.partial_rows as i32;
        head[header::BATCH] = self.batch as i32;
        for (k, off) in layout.offsets().into_iter().enumerate() {
            head[header::OFFSETS + k] = off as i32;
        }
        put(ws, 0, head);

        let pad = self.padded_len as usize;
        let field = |f: fn(&WorkItem) -> u32| {
            let items = self.items.iter().map(move |w| word(f(w)));
            items.chain(std::iter::repeat(word(f(&PADDING)))).take(pad)
        };
        put(ws, layout.request, field(|w| w.request));
        put(ws, layout.kv_head, field(|w| w.kv_head));
        put(ws, layout.qo_tile_start, field(|w| w.qo_tile_start));
        put(ws, layout.qo_tile_end, field(|w| w.qo_tile_end));
        put(ws, layout.kv_start, field(|w| w.kv_start));
        put(ws, layout.kv_end, field(|w| w.kv_end));
        put(ws, layout.partial, field(|w| w.partial));
        let valid = (0..pad).map(|e| i32::from(self.is_valid(e)));
        put(ws, layout.valid, valid);
        put(
            ws,
            layout.merge_indptr,
            self.merge_indptr.iter().map(|&x| x as i32),
        );
        put(
            ws,
            layout.merge_index,
            self.merge_index.iter().map(|&x| x as i32),
        );
        Ok(layout)
    }

    /// Read back a workspace written by [`WorkList::write`] (for tests and debugging).
    pub fn read(ws: &[u8]) -> Result<WorkList> {
        let bad = |what: &str| Error::invalid(format!("not a valid plan workspace: {what}"));
        let words = |at: usize, n: usize| -> Result<Vec<i32>> {
            let bytes = ws
                .get(at..at + 4 * n)
                .ok_or_else(|| bad("an array runs past its end"))?;
            Ok(bytes
                .chunks_exact(4)
                .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect())
        };
        let head = words(0, header::BYTES / 4)?;
        if head[header::MAGIC_WORD] != header::MAGIC
            || head[header::VERSION_WORD] != header::VERSION
        {
            return Err(bad("wrong magic number or version"));
        }
        let kind = kind_from_code(head[header::KIND]).ok_or_else(|| bad("unknown kernel kind"))?;
        let count = |w: usize| usize::try_from(head[w]).map_err(|_| bad("negative count"));
        let (pad, valid_n) = (count(header::PADDED_LEN)?, count(header::NUM_VALID)?);
        let (total_qo, partial_rows) = (count(header::TOTAL_QO)?, count(header::PARTIAL_ROWS)?);
        let layout = Layout::new(pad as u32, total_qo as u32, partial_rows as u32);
        let stored = &head[header::OFFSETS..header::OFFSETS + Layout::ARRAYS.len()];
        if layout
            .offsets()
            .iter()
            .zip(stored)
            .any(|(&a, &b)| a as i64 != i64::from(b))
        {
            return Err(bad("array offsets do not match the counts"));
        }
        let arr = |at: usize, n: usize| words(at, n);
        let valid = arr(layout.valid, pad)?;
        if valid_n > pad
            || valid
                .iter()
                .enumerate()
                .any(|(e, &v)| v != i32::from(e < valid_n))
        {
            return Err(bad("valid entries are not exactly the first NUM_VALID"));
        }
        let cols = [
            layout.request,
            layout.kv_head,
            layout.qo_tile_start,
            layout.qo_tile_end,
            layout.kv_start,
            layout.kv_end,
            layout.partial,
        ]
        .map(|at| arr(at, valid_n));
        let [request, kv_head, qs, qe, ks, ke, partial] = cols;
        let (request, kv_head, qs, qe, ks, ke, partial) =
            (request?, kv_head?, qs?, qe?, ks?, ke?, partial?);
        let items = (0..valid_n)
            .map(|e| WorkItem {
                request: request[e] as u32,
                kv_head: kv_head[e] as u32,
                qo_tile_start: qs[e] as u32,
                qo_tile_end: qe[e] as u32,
                kv_start: ks[e] as u32,
                kv_end: ke[e] as u32,
                partial: partial[e] as u32,
            })
            .collect();
        let unsigned = |v: Vec<i32>| v.into_iter().map(|x| x as u32).collect::<Vec<_>>();
        Ok(WorkList {
            kind,
            cta_tile_q: head[header::CTA_TILE_Q] as u32,
            kv_chunk: head[header::KV_CHUNK] as u32,
            items,
            padded_len: pad as u32,
            merge_indptr: unsigned(arr(layout.merge_indptr, total_qo + 1)?),
            merge_index: unsigned(arr(layout.merge_index, partial_rows)?),
            batch: count(header::BATCH)? as u32,
            partial_rows: partial_rows as u32,
            tiles: None,
        })
    }
}

/// Write `kv`'s key positions ([`KvIndex::with_key_positions`]) as `[batch][2]` int32 pairs
/// `(offset, total)` at byte `at` of a workspace already written by [`WorkList::write`], and
/// point its header's [`header::KEY_POSITIONS`] word at them; an index without positions leaves
/// the word 0 (every request whole), which is what the kernels did before positions existed.
pub fn write_key_positions(ws: &mut [u8], at: usize, kv: &KvIndex) -> Result<()> {
    let word_at = 4 * header::KEY_POSITIONS;
    if !kv.has_key_positions() {
        put(ws, word_at, [0]);
        return Ok(());
    }
    let batch = kv.batch();
    if at == 0 || !at.is_multiple_of(8) || ws.len() < at + 8 * batch || at > i32::MAX as usize {
        return Err(Error::invalid(format!(
            "write_key_positions: {batch} pairs at byte {at} do not fit a {}-byte workspace \
             (or the offset is 0 or not 8-byte aligned)",
            ws.len()
        )));
    }
    // with_key_positions validated every total below 2^31, and offsets end at or before them.
    let pairs = (0..batch).flat_map(|b| [kv.key_offset(b) as i32, kv.key_total(b) as i32]);
    put(ws, at, pairs);
    put(ws, word_at, [at as i32]);
    Ok(())
}

/// What padding entries hold: an empty item that writes nothing.
const PADDING: WorkItem = WorkItem {
    request: 0,
    kv_head: 0,
    qo_tile_start: 0,
    qo_tile_end: 0,
    kv_start: 0,
    kv_end: 0,
    partial: NONE,
};

/// A u32 as the int32 the kernels read; [`NONE`] becomes -1 (the only value above `i32::MAX` a
/// plan holds).
fn word(x: u32) -> i32 {
    x as i32
}

fn put(ws: &mut [u8], at: usize, words: impl IntoIterator<Item = i32>) {
    for (k, w) in words.into_iter().enumerate() {
        ws[at + 4 * k..at + 4 * k + 4].copy_from_slice(&w.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::batch::{Heads, KvIndex, KvLayout};
    use crate::jit::Arch;

    #[test]
    fn the_plan_chooses_the_tiles_once_and_records_them() {
        let hopper = PlanOptions::for_device(132, SmResources::typical(Arch::new(9, 0)));
        let heads = Heads::new(32, 8, 128).unwrap();
        let kv = KvIndex::ragged(&[0, 8192], KvLayout::Nhd).unwrap();
        let prompt = Batch::new(heads, &[0, 8192], kv).unwrap();
        let list = plan(&prompt, KernelKind::Prefill, &hopper).unwrap();
        let t = list
            .tiles
            .as_ref()
            .expect("a planned list records its tiles");
        // The long-prompt tile with the wide K/V tile, two CTAs an SM.
        assert_eq!((t.cta_tile_q, t.kv_tile, t.ctas_per_sm), (128, 64, Some(2)));
        assert_eq!(list.cta_tile_q, t.cta_tile_q);
        assert_eq!(t, &tiles(&prompt, KernelKind::Prefill, &hopper).unwrap());
        assert!(t.to_string().contains("two CTAs of it fit this SM"), "{t}");
        // The same schedule as an explicit occupancy of two.
        let explicit = plan(&prompt, KernelKind::Prefill, &PlanOptions::new(132, 2)).unwrap();
        assert_eq!(list, explicit);
        assert_eq!(explicit.tiles.unwrap().ctas_per_sm, None);

        // A decode step on the prefill template: the group's 16-row tile, two warps along the keys
        // for a grid this small (under a wave, split to fill the device), three CTAs of 71 KB on
        // a Hopper SM; on the decode template, two waves of its four.
        let kv = KvIndex::ragged(&[0, 4096, 8192], KvLayout::Nhd).unwrap();
        let step = Batch::decode(heads, kv).unwrap();
        let rows = PlanOptions {
            one_row_per_request: true,
            ..hopper
        };
        let t = plan(&step, KernelKind::Prefill, &rows)
            .unwrap()
            .tiles
            .unwrap();
        assert_eq!((t.cta_tile_q, t.threads, t.ctas_per_sm), (16, 64, Some(3)));
        assert_eq!(
            (t.kv_tile, t.shared_bytes, t.instance.kv_warps),
            (64, 71_240, 2)
        );
        let t = plan(&step, KernelKind::Decode, &hopper)
            .unwrap()
            .tiles
            .unwrap();
        assert_eq!((t.cta_tile_q, t.threads, t.ctas_per_sm), (16, 128, Some(8)));
    }

    #[test]
    fn a_decode_over_more_than_a_wave_splits_to_fill_its_last_wave() {
        // Six CTAs an SM, as the one-warp 16-row tile ran when `balance_tail_wave` was measured.
        let rows = PlanOptions {
            one_row_per_request: true,
            ..PlanOptions::new(132, 6)
        };
        let decode = |rows: &PlanOptions, q: u32, kv_heads: u32, b: usize, len: u32, page: u32| {
            let heads = Heads::new(q, kv_heads, 128).unwrap();
            let lens = vec![len; b];
            let pages: u32 = lens.iter().map(|l| l.div_ceil(page)).sum();
            let ids: Vec<i32> = (0..pages as i32).collect();
            let kv = KvIndex::paged_from_lens(page, &lens, &ids, pages, KvLayout::Nhd).unwrap();
            let list = plan(
                &Batch::decode(heads, kv).unwrap(),
                KernelKind::Prefill,
                rows,
            )
            .unwrap();
            (list.kv_chunk, list.items.len())
        };
        // 792 CTAs a wave. GQA 4, b64: 512 items, one wave: unsplit.
        assert_eq!(decode(&rows, 32, 8, 64, 4096, 16), (4096, 512));
        // GQA 2, b64: 1024 items leave a last wave of 232 (under 4 an SM): split in three.
        assert_eq!(decode(&rows, 32, 16, 64, 4096, 16), (1376, 3072));
        // Page size 1, b128 l1024: the same.
        assert_eq!(decode(&rows, 32, 8, 128, 1024, 1), (352, 3072));
        // MHA, b64: 2048 items, a last wave of 464 (3.5 an SM): the split would not pay.
        assert_eq!(decode(&rows, 32, 32, 64, 4096, 16), (4096, 2048));
        // On a described Hopper SM the plan takes the occupancy of the instance it chose: one
        // warp along the keys (six CTAs an SM) for GQA 4 over pages of 16, which plans as above
        // (GQA 2 does too on the default K/V tile, but its 1024 unsplit items fit a wave of the
        // narrow one, which it takes: see the narrow tile's test); two warps (three an SM, 396 a
        // wave) for page size 1 and MHA, where the tail model then sees other waves: page size 1
        // (1024 items, two waves and 232) stays unsplit, MHA's 2048 items (five waves and 68)
        // split in four.
        let hopper = PlanOptions {
            one_row_per_request: true,
            ..PlanOptions::for_device(132, SmResources::typical(Arch::new(9, 0)))
        };
        assert_eq!(decode(&hopper, 32, 8, 64, 4096, 16), (4096, 512));
        let default_tile = PlanOptions {
            narrow_kv_tile: Some(false),
            ..hopper
        };
        assert_eq!(decode(&default_tile, 32, 16, 64, 4096, 16), (1376, 3072));
        assert_eq!(decode(&hopper, 32, 16, 64, 4096, 16), (4096, 1024));
        assert_eq!(decode(&hopper, 32, 8, 128, 1024, 1), (1024, 1024));
        assert_eq!(decode(&hopper, 32, 32, 64, 4096, 16), (1024, 8192));
        // A graph capacity bounds the split.
        let capped = PlanOptions {
            graph_capacity: Some(2048),
            ..rows
        };
        let heads = Heads::new(32, 16, 128).unwrap();
        let kv = KvIndex::ragged(
            &(0..=64).map(|i| i * 4096).collect::<Vec<_>>(),
            KvLayout::Nhd,
        )
        .unwrap();
        let list = plan(
            &Batch::decode(heads, kv).unwrap(),
            KernelKind::Prefill,
            &capped,
        )
        .unwrap();
        assert_eq!((list.kv_chunk, list.items.len()), (2048, 2048));
    }

    /// A decode step of `lens` tokens a request, in pages of `page`.
    fn decode_step(q_heads: u32, kv_heads: u32, head_dim: u32, lens: &[u32], page: u32) -> Batch {
        let heads = Heads::new(q_heads, kv_heads, head_dim).unwrap();
        let pages: u32 = lens.iter().map(|l| l.div_ceil(page)).sum();
        let ids: Vec<i32> = (0..pages as i32).collect();
        let kv = KvIndex::paged_from_lens(page, lens, &ids, pages, KvLayout::Nhd).unwrap();
        Batch::decode(heads, kv).unwrap()
    }

    #[test]
    fn a_skewed_decode_takes_the_narrow_kv_tile_where_the_wave_model_says() {
        let hopper = PlanOptions {
            one_row_per_request: true,
            ..PlanOptions::for_device(132, SmResources::typical(Arch::new(9, 0)))
        };
        // (K/V tile, CTAs an SM, KV chunk, work items) of a plan.
        let shape = |batch: &Batch, opts: &PlanOptions| {
            let list = plan(batch, KernelKind::Prefill, opts).unwrap();
            let t = list.tiles.as_ref().unwrap();
            assert!(t.alternative.is_none(), "the plan chose");
            assert_eq!(t.instance.kv_tile, if t.kv_tile == 16 { 16 } else { 0 });
            (
                t.kv_tile,
                t.ctas_per_sm.unwrap(),
                list.kv_chunk,
                list.items.len(),
            )
        };
        let mut skewed = vec![512; 64];
        for l in skewed.iter_mut().step_by(16) {
            *l = 8192;
        }
        let skew = decode_step(32, 8, 128, &skewed, 16);
        // The benchmark's skewed batch (4 requests of 8192 keys among 60 of 512, GQA 4): on the
        // default tile its long requests split in nine (768 items, one wave of 792), and once
        // the short ones end they stream on too few CTAs; on the narrow tile (8 an SM as the
        // plan counts) every item is 512 keys, 992 of them in one wave of 1056.
        assert_eq!(shape(&skew, &hopper), (16, 8, 512, 992));
        let t = plan(&skew, KernelKind::Prefill, &hopper)
            .unwrap()
            .tiles
            .unwrap();
        assert_eq!(t.fallback.map(|f| f.kv_tile), Some(0));
        assert!(t.reasons.iter().any(|r| r.contains("wave model")), "{t}");
        assert!(
            t.reasons.iter().any(|r| r.starts_with("query tile 16")),
            "{t}"
        );
        let default = PlanOptions {
            narrow_kv_tile: Some(false),
            ..hopper
        };
        assert_eq!(shape(&skew, &default), (32, 6, 912, 768));
        // Even batches keep the default tile: b64 l4096, b16 l32768 (two warps along the keys
        // there), b256 l2048, and so do batch-invariant and CUDA-graph plans of the skewed one.
        for (b, len) in [(64, 4096), (16, 32768), (256, 2048)] {
            let batch = decode_step(32, 8, 128, &vec![len; b], 16);
            assert_ne!(shape(&batch, &hopper).0, 16, "{b} x {len}");
        }
        // Except where the unsplit items are over a wave of the default tile (792) and within
        // one of the narrow (1056): GQA 2 b64 l4096, 1024 items, run unsplit. GQA 4 b256 l2048
        // (2048 items, above) is past both.
        let gqa2 = decode_step(32, 16, 128, &vec![4096; 64], 16);
        assert_eq!(shape(&gqa2, &hopper), (16, 8, 4096, 1024));
        let t = plan(&gqa2, KernelKind::Prefill, &hopper)
            .unwrap()
            .tiles
            .unwrap();
        assert!(
            t.reasons.iter().any(|r| r.contains("1024 unsplit items")),
            "{t}"
        );
        assert_eq!(shape(&gqa2, &default).0, 32);
        assert_eq!(shape(&gqa2, &hopper.with_graph_capacity(4096)).0, 32);
        assert_eq!(shape(&skew, &hopper.with_fixed_kv_chunk(512)).0, 32);
        assert_eq!(shape(&skew, &hopper.with_graph_capacity(4096)).0, 32);
        // Uneven, but where the default tile's split is already even: two requests of 4096
        // keys among 62 of 2048 (GQA 4) split into 2048-key items on either tile, and the
        // default streams them faster.
        let mut mild = vec![2048; 64];
        mild[0] = 4096;
        mild[1] = 4096;
        assert_eq!(shape(&decode_step(32, 8, 128, &mild, 16), &hopper).0, 32);
        // The caller may fix either tile.
        let narrow = PlanOptions {
            narrow_kv_tile: Some(true),
            ..hopper
        };
        let b64 = decode_step(32, 8, 128, &vec![4096; 64], 16);
        assert_eq!(shape(&b64, &narrow).0, 16);
        // Not for the two-warp form (MHA over two waves), nor a prefill's 16-row tile.
        let mha = decode_step(32, 32, 128, &skewed, 16);
        let list = plan(&mha, KernelKind::Prefill, &narrow).unwrap();
        assert_eq!(list.tiles.unwrap().kv_tile, 64);
    }

    #[test]
    fn a_decode_takes_two_warps_along_the_keys_for_small_groups_and_pages_over_waves() {
        // The default K/V tile throughout (the narrow one has its own test below).
        let hopper = PlanOptions {
            one_row_per_request: true,
            narrow_kv_tile: Some(false),
            ..PlanOptions::for_device(132, SmResources::typical(Arch::new(9, 0)))
        };
        // (warps along the keys, CTAs an SM, KV chunk, work items) of a plan.
        let shape = |batch: &Batch, opts: &PlanOptions| {
            let list = plan(batch, KernelKind::Prefill, opts).unwrap();
            let t = list.tiles.as_ref().unwrap();
            assert_eq!(t.cta_tile_q, 16);
            let warps = t.instance.kv_warps.max(1);
            assert_eq!((t.threads, t.kv_tile), (32 * warps, 32 * warps));
            (
                warps,
                t.ctas_per_sm.unwrap(),
                list.kv_chunk,
                list.items.len(),
            )
        };
        // The benchmark's decode batches (bf16 in the measurements, head dim 128, page 16 unless
        // said). Two waves of two-warp CTAs are 792 items.
        let uniform = |b: usize, len: u32| vec![len; b];
        let mut skewed = vec![512; 64];
        for l in skewed.iter_mut().step_by(16) {
            *l = 8192;
        }
        let cases = [
            // GQA 4, 64 x 4096: 512 items, one wave of one-warp CTAs.
            (
                decode_step(32, 8, 128, &uniform(64, 4096), 16),
                (1, 6, 4096, 512),
            ),
            // The skewed batch: 512 items, its long requests split in nine to fill the wave.
            (decode_step(32, 8, 128, &skewed, 16), (1, 6, 912, 768)),
            // 16 x 32768: 128 items, under a wave of two-warp CTAs: two warps, split to fill the
            // wave (384 of 396).
            (
                decode_step(32, 8, 128, &uniform(16, 32768), 16),
                (2, 3, 10928, 384),
            ),
            // MHA 64 x 4096: 2048 items, two warps; GQA 4 256 x 2048, also 2048, keeps one (a
            // group of 4 over pages of 16); page size 1, 128 x 1024 (1024 items): two; GQA 2
            // 64 x 4096 (1024): one.
            (
                decode_step(32, 32, 128, &uniform(64, 4096), 16),
                (2, 3, 1024, 8192),
            ),
            (
                decode_step(32, 8, 128, &uniform(256, 2048), 16),
                (1, 6, 2048, 2048),
            ),
            (
                decode_step(32, 8, 128, &uniform(128, 1024), 1),
                (2, 3, 1024, 1024),
            ),
            (
                decode_step(32, 16, 128, &uniform(64, 4096), 16),
                (1, 6, 1376, 3072),
            ),
            // Head dim 256: an SM holds one two-warp CTA against three one-warp ones, so one
            // warp, whose 396-CTA waves split the 2048 items in four.
            (
                decode_step(32, 32, 256, &uniform(64, 4096), 16),
                (1, 3, 1024, 8192),
            ),
        ];
        for (n, (batch, want)) in cases.iter().enumerate() {
            assert_eq!(shape(batch, &hopper), *want, "case {n}");
        }
        let mha = &cases[3].0;
        let gqa4 = &cases[0].0;
        // Forced either way: the plan takes the forced instance's occupancy.
        let force = |n| PlanOptions {
            kv_warps: Some(n),
            ..hopper
        };
        assert_eq!(shape(mha, &force(1)), (1, 6, 4096, 2048));
        assert_eq!(shape(gqa4, &force(2)), (2, 3, 1376, 1536));
        // Batch-invariant: one warp whatever the grid, unless forced.
        let fixed = hopper.with_fixed_kv_chunk(1024);
        assert_eq!(shape(mha, &fixed), (1, 6, 1024, 8192));
        let fixed_two = PlanOptions {
            kv_warps: Some(2),
            ..fixed
        };
        assert_eq!(shape(mha, &fixed_two), (2, 3, 1024, 8192));
        // Without a described SM, one warp and the caller's occupancy.
        let plain = PlanOptions {
            one_row_per_request: true,
            ..PlanOptions::new(132, 6)
        };
        let t = plan(mha, KernelKind::Prefill, &plain)
            .unwrap()
            .tiles
            .unwrap();
        assert_eq!((t.instance.kv_warps, t.ctas_per_sm), (0, None));
        // A short prefill on the 16-row tile follows the same rule: 128 requests of two query
        // rows (two packed rows under MHA, one tile) over 100 keys, 32 KV heads, are 4096 items:
        // two warps; at a group of 4 (8 KV heads, 1024 items), one.
        let heads = Heads::new(32, 32, 128).unwrap();
        let kv_indptr: Vec<i32> = (0..=128).map(|i| i * 100).collect();
        let qo_indptr: Vec<i32> = (0..=128).map(|i| i * 2).collect();
        let kv = KvIndex::ragged(&kv_indptr, KvLayout::Nhd).unwrap();
        let short = Batch::new(heads, &qo_indptr, kv).unwrap();
        let prefill = PlanOptions {
            one_row_per_request: false,
            ..hopper
        };
        let list = plan(&short, KernelKind::Prefill, &prefill).unwrap();
        let t = list.tiles.unwrap();
        assert_eq!(
            (t.cta_tile_q, t.instance.kv_warps, list.items.len()),
            (16, 2, 4096)
        );
        let kv = KvIndex::ragged(&kv_indptr, KvLayout::Nhd).unwrap();
        let gqa4 = Batch::new(Heads::new(32, 8, 128).unwrap(), &qo_indptr, kv).unwrap();
        let list = plan(&gqa4, KernelKind::Prefill, &prefill).unwrap();
        let t = list.tiles.unwrap();
        assert_eq!(
            (t.cta_tile_q, t.instance.kv_warps, list.items.len()),
            (16, 0, 1024)
        );
        // Only 1 or 2 warps exist.
        let e = plan(mha, KernelKind::Prefill, &force(4))
            .unwrap_err()
            .to_string();
        assert!(e.contains("kv_warps must be 1 or 2"), "{e}");
    }
}
