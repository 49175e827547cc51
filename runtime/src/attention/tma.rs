//! The FA3 template's TMA maps (`Sm90Maps`) of a K/V cache and of Q: which caches and queries
//! they can describe, their shape, and their encoding by the driver. A tile that lies inside its
//! request is then one TMA copy per 64 columns (and page) from one producer thread, where
//! cp.async takes a copy per 16 bytes from every producer thread (`kernels/notes/fa3.md`). Also
//! the consumers' loop that suits a launch's maps ([`sm90_loop`]).

use std::ffi::c_void;
use std::sync::OnceLock;

use cudarc::driver::sys;
use ferrinfer_kernels::DType;
use ferrinfer_kernels::abi::Sm90Maps;
use ferrinfer_kernels::attention::prefill::{Sm90Loop, sm90_overlaps};

use super::KvStrides;
use crate::error::{Error, Result};

/// Columns one copy moves: 128 bytes of 2-byte elements, the span of the 128-byte swizzle the
/// template's tiles are stored with.
const BOX_COLUMNS: u32 = 64;
/// Bytes of an element (f16, bf16).
const ELEMENT_BYTES: u64 = 2;
/// The smallest page whose tiles go by TMA. One thread issues a copy per page and 64 columns,
/// each after a page-table load, where cp.async spreads the lookups over 128 threads: at page 16
/// (16 copies a K tile at head dim 128) TMA lost to cp.async (H200, 2026-11-30 session 7 call A,
/// TFLOP/s TMA / cp.async: paged b16 l1024 241 / 296, b4 l8192 366 / 452, append 351 / 443).
const MIN_TMA_PAGE: u32 = 64;

/// K or V as TMA sees it: dims innermost first (head dim, KV heads, rows for a ragged cache;
/// head dim, KV heads, page slots, pages for a paged one), the byte strides of the outer dims,
/// and the box one copy moves (64 columns, one head, some rows, one page). `rank` entries of
/// each are used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct MapShape {
    pub rank: u32,
    pub dims: [u64; 4],
    pub strides: [u64; 3],
    pub boxes: [u32; 4],
}

impl MapShape {
    /// Rows a copy moves (the kernel's `rows_per_copy`).
    pub fn rows_per_copy(&self) -> u32 {
        self.boxes[2]
    }
}

/// Whether TMA takes `st` (elements) as a stride: a multiple of 16 bytes, under 2^40, not 0.
fn stride_ok(st: u64) -> bool {
    let bytes = st * ELEMENT_BYTES;
    bytes.is_multiple_of(16) && bytes < (1 << 40) && st > 0
}

/// A rank-3 map of rows of `heads` heads of `head_dim` (dims head dim, heads, rows) with a box of
/// 64 columns x `box_heads` x `box_rows`: a ragged K/V cache, or Q. Its rows are those whose every
/// head lies in the buffer of `elements`; `None` where not one does or there are more than an
/// `int` coordinate.
fn rows_of_heads(
    head_dim: u32,
    heads: u32,
    head_stride: u64,
    row_stride: u64,
    elements: u64,
    (box_heads, box_rows): (u32, u32),
) -> Option<MapShape> {
    let heads_span = u64::from(heads - 1) * head_stride + u64::from(head_dim);
    let rows = elements.checked_sub(heads_span)? / row_stride + 1;
    (rows <= i32::MAX as u64).then_some(MapShape {
        rank: 3,
        dims: [u64::from(head_dim), u64::from(heads), rows, 1],
        strides: [head_stride * ELEMENT_BYTES, row_stride * ELEMENT_BYTES, 0],
        boxes: [BOX_COLUMNS, box_heads, box_rows, 1],
    })
}

/// The maps' shape for a cache of `elements` elements (K's or V's buffer), or `None` where TMA
/// cannot describe it and every tile goes through cp.async: strides TMA refuses (multiples of 16
/// bytes below 2^40); for a ragged cache, a block stride other than the token stride (a ragged
/// block id is then not a row); for a paged one, a page under [`MIN_TMA_PAGE`] or one that
/// neither divides the K/V tile nor is divided by it (a copy must also start 1024-byte aligned in
/// the 128-byte swizzle: a multiple of 8 rows); a buffer shorter than one row or page; more rows or pages than an
/// `int` coordinate.
pub(crate) fn shape(
    page_size: Option<u32>,
    s: KvStrides,
    num_kv_heads: u32,
    head_dim: u32,
    elements: u64,
    kv_tile: u32,
) -> Option<MapShape> {
    if !head_dim.is_multiple_of(BOX_COLUMNS) || !stride_ok(s.token) || !stride_ok(s.head) {
        return None;
    }
    match page_size {
        None => {
            if s.block != s.token {
                return None;
            }
            rows_of_heads(
                head_dim,
                num_kv_heads,
                s.head,
                s.token,
                elements,
                (1, kv_tile),
            )
        }
        Some(page) => {
            let fits = kv_tile.is_multiple_of(page) || page.is_multiple_of(kv_tile);
            if page < MIN_TMA_PAGE || !page.is_multiple_of(8) || !fits || !stride_ok(s.block) {
                return None;
            }
            // Pages whose every slot and head lies in the buffer.
            let heads_span = u64::from(num_kv_heads - 1) * s.head + u64::from(head_dim);
            let span = heads_span + u64::from(page - 1) * s.token;
            let pages = elements.checked_sub(span)? / s.block + 1;
            (pages <= i32::MAX as u64).then_some(MapShape {
                rank: 4,
                dims: [
                    u64::from(head_dim),
                    u64::from(num_kv_heads),
                    u64::from(page),
                    pages,
                ],
                strides: [
                    s.head * ELEMENT_BYTES,
                    s.token * ELEMENT_BYTES,
                    s.block * ELEMENT_BYTES,
                ],
                boxes: [BOX_COLUMNS, 1, page.min(kv_tile), 1],
            })
        }
    }
}

/// Q's map shape for the FA3 template's tiles of `tile_q` packed rows (packed row r of a KV head:
/// query row r / group, qo head r % group of the head's group): dims head dim, qo heads, query
/// rows; a box of 64 columns x `group` heads x `tile_q / group` rows, which lands as one column
/// block of a tile's packed rows in order. `None` (Q then goes by cp.async) where the group does
/// not divide the tile (a tile would not start on a query row), where a stride is not what TMA
/// takes, or where the buffer is shorter than one row. Rows are bounded by the buffer, not the
/// batch, so a CUDA graph's map holds for every batch its buffer takes.
pub(crate) fn q_shape(
    row_stride: u64,
    head_stride: u64,
    num_qo_heads: u32,
    group: u32,
    head_dim: u32,
    elements: u64,
    tile_q: u32,
) -> Option<MapShape> {
    let fits = group > 0 && tile_q.is_multiple_of(group) && tile_q / group <= 256;
    if !fits || !head_dim.is_multiple_of(BOX_COLUMNS) || !stride_ok(row_stride) {
        return None;
    }
    // A single head never steps by its stride, so any valid one stands in for it.
    let head_stride = if num_qo_heads > 1 {
        head_stride
    } else {
        u64::from(head_dim)
    };
    if !stride_ok(head_stride) {
        return None;
    }
    let rows = tile_q / group;
    rows_of_heads(
        head_dim,
        num_qo_heads,
        head_stride,
        row_stride,
        elements,
        (group, rows),
    )
}

/// Set to `0` to copy every FA3 tile (K, V and Q) with cp.async (an A/B switch, and a way around
/// a driver that refuses the maps).
pub const TMA_VAR: &str = "FERRINFER_SM90_TMA";

/// The entry's `Sm90Maps` for K and V at device addresses `k` and `v` and Q at `q` (16-byte
/// aligned, checked by the caller): `tma` 0 where `kv` is `None`, `q_tma` 0 where `q_map` is
/// `None`, both 0 where [`TMA_VAR`] is `0`, and either where the driver refuses its map (cp.async
/// computes the same result, only slower).
pub(crate) fn sm90_maps(
    k: u64,
    v: u64,
    kv: Option<MapShape>,
    q: u64,
    q_map: Option<MapShape>,
    dtype: DType,
) -> Sm90Maps {
    if std::env::var(TMA_VAR).is_ok_and(|v| v.trim() == "0") {
        return Sm90Maps::default();
    }
    let mut maps = Sm90Maps::default();
    if let Some(shape) = kv
        && let (Ok(km), Ok(vm)) = (encode(k, &shape, dtype), encode(v, &shape, dtype))
    {
        maps.k = km;
        maps.v = vm;
        maps.tma = 1;
        maps.rows_per_copy = shape.rows_per_copy();
    }
    if let Some(shape) = q_map
        && let Ok(qm) = encode(q, &shape, dtype)
    {
        maps.q = qm;
        maps.q_tma = 1;
    }
    maps
}

/// Set to `0` to build the FA3 consumers in order at every head dim, `1` for the template's
/// default loop (the overlap at head dims 64 and 128) whatever copies K and V: an A/B switch over
/// [`sm90_loop`]'s choice. Read once per process; other values are ignored.
pub const OVERLAP_VAR: &str = "FERRINFER_SM90_OVERLAP";

/// The consumers' loop for an FA3 launch at `head_dim` with these maps: in order at head dim 128
/// where no tile goes by TMA (`maps.tma` 0: a paged cache under [`MIN_TMA_PAGE`] or of pages TMA
/// cannot copy, [`TMA_VAR`] `0`, a map the driver refused), the template's default otherwise;
/// [`OVERLAP_VAR`] overrides. With cp.async the producer's per-row copies take issue slots from
/// the consumers, and the overlap's register pressure and V held a tile longer no longer pay
/// (H200, session 7 call C, TFLOP/s in order / overlapped: paged b16 l1024 p16 293 / 288, append
/// q256 kv4096 p16 451 / 438); with TMA the overlap wins 9-10% (s8192 causal 565 / 514). At head
/// dim 64 it won 14-17% on cp.async too (v16), and 256 is in order in the default build.
///
/// The maps and the build are chosen together for each launch, from the cache's page size and
/// strides (which a CUDA-graph plan pins) and K's and V's buffers; a captured graph holds both.
pub(crate) fn sm90_loop(head_dim: u32, maps: &Sm90Maps) -> Sm90Loop {
    choose_loop(head_dim, maps.tma != 0, forced_overlap_setting())
}

/// [`OVERLAP_VAR`] as this process read it (once): `Some(overlap)` where it forces a loop.
pub(crate) fn forced_overlap_setting() -> Option<bool> {
    static FORCED: OnceLock<Option<bool>> = OnceLock::new();
    *FORCED.get_or_init(|| forced_overlap(std::env::var(OVERLAP_VAR).ok()))
}

/// [`sm90_loop`] given whether tiles go by TMA and [`OVERLAP_VAR`]'s value (`Some(overlap)`).
pub(crate) fn choose_loop(head_dim: u32, tma: bool, forced: Option<bool>) -> Sm90Loop {
    let overlap = forced.unwrap_or(tma || head_dim != 128);
    if overlap || !sm90_overlaps(head_dim) {
        Sm90Loop::Default
    } else {
        Sm90Loop::InOrder
    }
}

/// [`OVERLAP_VAR`]'s value: `Some(false)` for `0`, `Some(true)` for `1`, else `None`.
fn forced_overlap(value: Option<String>) -> Option<bool> {
    match value?.trim() {
        "0" => Some(false),
        "1" => Some(true),
        _ => None,
    }
}

fn encode(ptr: u64, shape: &MapShape, dtype: DType) -> Result<[u64; 16]> {
    let data_type = match dtype {
        DType::F16 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
        DType::Bf16 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
    };
    let element_strides = [1u32; 4];
    let mut map = std::mem::MaybeUninit::<sys::CUtensorMap>::zeroed();
    // SAFETY: the array arguments hold at least the rank's entries (4 dims, 3 strides, 4 boxes, 4
    // element strides for a rank of 3 or 4), `map` is a CUtensorMap the driver writes and nothing
    // else; the global address is only recorded in the map, not dereferenced (`shape` bounded the
    // rows or pages by the buffer's length).
    let status = unsafe {
        sys::cuTensorMapEncodeTiled(
            map.as_mut_ptr(),
            data_type,
            shape.rank,
            ptr as *mut c_void,
            shape.dims.as_ptr(),
            shape.strides.as_ptr(),
            shape.boxes.as_ptr(),
            element_strides.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    if status != sys::CUresult::CUDA_SUCCESS {
        return Err(Error::Driver(format!(
            "cuTensorMapEncodeTiled failed ({status:?}) for a map of {shape:?}"
        )));
    }
    // SAFETY: the driver wrote the map (CUDA_SUCCESS); it was zeroed before in any case.
    Ok(unsafe { map.assume_init() }.opaque)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nhd(heads: u64, d: u64, page: u64) -> KvStrides {
        KvStrides {
            block: page * heads * d,
            token: heads * d,
            head: d,
        }
    }

    #[test]
    fn a_ragged_nhd_cache_is_rows_of_heads() {
        // 1000 tokens of 8 heads of 128.
        let s = shape(None, nhd(8, 128, 1), 8, 128, 1000 * 8 * 128, 128).unwrap();
        assert_eq!(s.rank, 3);
        assert_eq!(&s.dims[..3], &[128, 8, 1000]);
        assert_eq!(&s.strides[..2], &[256, 8 * 256]);
        assert_eq!(&s.boxes[..3], &[64, 1, 128]);
        // A buffer one element short of the last row's last head drops that row.
        let short = shape(None, nhd(8, 128, 1), 8, 128, 1000 * 8 * 128 - 1, 128).unwrap();
        assert_eq!(short.dims[2], 999);
    }

    #[test]
    fn a_ragged_hnd_cache_has_heads_outermost() {
        // HND with a capacity of 4096 tokens: a head is 4096 rows further on.
        let s = KvStrides {
            block: 256,
            token: 256,
            head: 4096 * 256,
        };
        let shape = shape(None, s, 4, 256, 4 * 4096 * 256, 64).unwrap();
        assert_eq!(&shape.dims[..3], &[256, 4, 4096]);
        assert_eq!(&shape.strides[..2], &[4096 * 512, 512]);
        assert_eq!(&shape.boxes[..3], &[64, 1, 64]);
    }

    #[test]
    fn a_paged_cache_is_pages_of_slots() {
        // 100 pages of 64 slots, 8 heads of 128, NHD: a copy is one page of one head.
        let s = shape(Some(64), nhd(8, 128, 64), 8, 128, 100 * 64 * 8 * 128, 128).unwrap();
        assert_eq!(s.rank, 4);
        assert_eq!(s.dims, [128, 8, 64, 100]);
        assert_eq!(s.strides, [256, 8 * 256, 64 * 8 * 256]);
        assert_eq!(s.boxes, [64, 1, 64, 1]);
        assert_eq!(s.rows_per_copy(), 64);
        // HND pages of 256 slots at a 128-key tile: half a page a copy.
        let hnd = KvStrides {
            block: 4 * 256 * 128,
            token: 128,
            head: 256 * 128,
        };
        let s = shape(Some(256), hnd, 4, 128, 10 * 4 * 256 * 128, 128).unwrap();
        assert_eq!(s.dims, [128, 4, 256, 10]);
        assert_eq!(s.strides, [256 * 256, 256, 4 * 256 * 256]);
        assert_eq!(s.rows_per_copy(), 128);
    }

    #[test]
    fn what_tma_cannot_describe_stays_on_cp_async() {
        let s = nhd(8, 128, 1);
        let odd = KvStrides { block: 2048, ..s };
        assert_eq!(
            shape(None, odd, 8, 128, 1 << 20, 128),
            None,
            "block != token"
        );
        let narrow = KvStrides {
            block: 8 * 128 + 4,
            token: 8 * 128 + 4,
            head: 128,
        };
        assert_eq!(
            shape(None, narrow, 8, 128, 1 << 20, 128),
            None,
            "8-byte rows"
        );
        assert_eq!(shape(None, s, 8, 128, 100, 128), None, "shorter than a row");
        // Pages TMA cannot start a copy in (not a multiple of 8), and small ones it is slower on.
        for page in [1, 4, 12, 16, 24, 32, 48] {
            let p = nhd(8, 128, u64::from(page));
            assert_eq!(
                shape(Some(page), p, 8, 128, 1 << 22, 128),
                None,
                "page {page}"
            );
        }
        let p = nhd(8, 128, 64);
        assert_eq!(
            shape(Some(64), p, 8, 128, 1000, 128),
            None,
            "shorter than a page"
        );
    }

    #[test]
    fn a_q_box_is_a_tiles_packed_rows() {
        // 1000 rows of 32 heads of 128 (NHD), GQA 4: a box is 32 rows of 4 heads, which land as
        // the tile's 128 packed rows (row r: query row r / 4, head r % 4).
        let s = q_shape(32 * 128, 128, 32, 4, 128, 1000 * 32 * 128, 128).unwrap();
        assert_eq!(s.rank, 3);
        assert_eq!(&s.dims[..3], &[128, 32, 1000]);
        assert_eq!(&s.strides[..2], &[256, 32 * 256]);
        assert_eq!(&s.boxes[..3], &[64, 4, 32]);
        // MHA: a box is 128 rows of one head; GQA 8 at head dim 64: 16 rows of 8 heads.
        let mha = q_shape(8 * 128, 128, 8, 1, 128, 10 * 8 * 128, 128).unwrap();
        assert_eq!(&mha.boxes[..3], &[64, 1, 128]);
        let g8 = q_shape(8 * 64, 64, 8, 8, 64, 10 * 8 * 64, 128).unwrap();
        assert_eq!(&g8.boxes[..3], &[64, 8, 16]);
        // HND (heads outermost, 4096 rows a head), and a buffer one element short of the last
        // row's last head, which drops that row.
        let hnd = q_shape(128, 4096 * 128, 8, 2, 128, 8 * 4096 * 128, 128).unwrap();
        assert_eq!(&hnd.dims[..3], &[128, 8, 4096]);
        assert_eq!(&hnd.strides[..2], &[4096 * 256, 256]);
        let short = q_shape(32 * 128, 128, 32, 4, 128, 1000 * 32 * 128 - 1, 128).unwrap();
        assert_eq!(short.dims[2], 999);
        // One head: its stride is never stepped, so an odd one does not matter.
        let one = q_shape(128, 1, 1, 1, 128, 100 * 128, 128).unwrap();
        assert_eq!(&one.strides[..2], &[256, 256]);
    }

    #[test]
    fn a_q_tma_cannot_describe_goes_by_cp_async() {
        // Groups that do not divide the 128-row tile: a tile would start inside a query row.
        for group in [3, 5, 6, 12, 256] {
            let heads = 2 * group;
            let q = q_shape(u64::from(heads) * 128, 128, heads, group, 128, 1 << 24, 128);
            assert_eq!(q, None, "group {group}");
        }
        assert_eq!(
            q_shape(32 * 128, 128, 32, 0, 128, 1 << 24, 128),
            None,
            "no group"
        );
        assert_eq!(
            q_shape(32 * 128 + 4, 128, 32, 4, 128, 1 << 24, 128),
            None,
            "8-byte rows"
        );
        assert_eq!(
            q_shape(32 * 128, 132, 32, 4, 128, 1 << 24, 128),
            None,
            "8-byte heads"
        );
        assert_eq!(
            q_shape(32 * 96, 96, 32, 4, 96, 1 << 24, 128),
            None,
            "head dim 96"
        );
        assert_eq!(
            q_shape(32 * 128, 128, 32, 4, 128, 100, 128),
            None,
            "shorter than a row"
        );
    }

    #[test]
    fn fa3_runs_in_order_at_head_dim_128_where_kv_goes_by_cp_async() {
        use Sm90Loop::{Default, InOrder};
        // The loop for a cache of 8 NHD heads (`None`: ragged), as the launch derives it: the
        // maps exist where `shape` describes the cache.
        let chosen = |page: Option<u32>, head_dim: u32, forced: Option<bool>| {
            let s = nhd(8, u64::from(head_dim), u64::from(page.unwrap_or(1)));
            let kv_tile = ferrinfer_kernels::attention::prefill::sm90_kv_tile(head_dim).unwrap();
            let tma = shape(page, s, 8, head_dim, 1 << 24, kv_tile).is_some();
            choose_loop(head_dim, tma, forced)
        };
        // Pages of 16, 32 or 12 keys go by cp.async; in order at 128, where it was measured.
        for page in [16, 32, 12] {
            assert_eq!(chosen(Some(page), 128, None), InOrder, "page {page}");
        }
        // Ragged caches and pages of 64 or more go by TMA: the overlap.
        for page in [None, Some(64), Some(128)] {
            assert_eq!(chosen(page, 128, None), Default, "page {page:?}");
        }
        // Head dim 64 overlaps on cp.async too; 256 is in order in the default build.
        assert_eq!(chosen(Some(16), 64, None), Default);
        assert_eq!(chosen(Some(16), 256, None), Default);
        // A map the driver refused, or FERRINFER_SM90_TMA=0: no TMA, in order.
        assert_eq!(choose_loop(128, false, None), InOrder);
        // FERRINFER_SM90_OVERLAP: 1 overlaps everywhere, 0 never (256 is its default build).
        assert_eq!(chosen(Some(16), 128, Some(true)), Default);
        assert_eq!(chosen(None, 128, Some(false)), InOrder);
        assert_eq!(chosen(Some(16), 64, Some(false)), InOrder);
        assert_eq!(chosen(None, 256, Some(false)), Default);
        // The launch reads the maps' flag (and the variable, which this test does not set).
        let forced = forced_overlap(std::env::var(OVERLAP_VAR).ok());
        for tma in [0, 1] {
            let maps = Sm90Maps {
                tma,
                ..Sm90Maps::default()
            };
            assert_eq!(sm90_loop(128, &maps), choose_loop(128, tma == 1, forced));
        }
    }

    #[test]
    fn the_overlap_switch_takes_0_and_1_and_ignores_the_rest() {
        assert_eq!(forced_overlap(None), None);
        assert_eq!(forced_overlap(Some("0".into())), Some(false));
        assert_eq!(forced_overlap(Some(" 1\n".into())), Some(true));
        for other in ["", "2", "yes", "off"] {
            assert_eq!(forced_overlap(Some(other.into())), None, "{other:?}");
        }
    }
}
