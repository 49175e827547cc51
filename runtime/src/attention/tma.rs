//! The FA3 template's TMA maps of a ragged K/V cache (`Sm90Kv`): which caches they can describe,
//! their shape, and their encoding by the driver. A tile that lies inside its request is then
//! one TMA copy per 64 columns from one producer thread, where cp.async takes a copy per 16
//! bytes from every producer thread (`kernels/notes/fa3.md`).

use std::ffi::c_void;

use cudarc::driver::sys;
use ferrinfer_kernels::DType;
use ferrinfer_kernels::abi::Sm90Kv;

use super::KvStrides;
use crate::error::{Error, Result};

/// Columns one copy moves: 128 bytes of 2-byte elements, the span of the 128-byte swizzle the
/// template's tiles are stored with.
const BOX_COLUMNS: u32 = 64;
/// Bytes of an element (f16, bf16).
const ELEMENT_BYTES: u64 = 2;

/// K or V as TMA sees it: dims innermost first (head dim, KV heads, rows), the byte strides of
/// the outer two, and the box one copy moves (64 columns, one head, a K/V tile of rows).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct MapShape {
    pub dims: [u64; 3],
    pub strides: [u64; 2],
    pub boxes: [u32; 3],
}

/// The maps' shape for a cache of `elements` elements (K's or V's buffer), or `None` where TMA
/// cannot describe it and every tile goes through cp.async: a paged cache; a block stride other
/// than the token stride (a ragged block id is then not a row); strides TMA refuses (multiples
/// of 16 bytes below 2^40); a buffer shorter than one row; more rows than an `int` coordinate.
pub(crate) fn ragged_shape(
    page_size: Option<u32>,
    s: KvStrides,
    num_kv_heads: u32,
    head_dim: u32,
    elements: u64,
    kv_tile: u32,
) -> Option<MapShape> {
    if page_size.is_some() || s.block != s.token || !head_dim.is_multiple_of(BOX_COLUMNS) {
        return None;
    }
    let stride_ok = |st: u64| {
        let bytes = st * ELEMENT_BYTES;
        bytes.is_multiple_of(16) && bytes < (1 << 40) && st > 0
    };
    if !stride_ok(s.token) || !stride_ok(s.head) {
        return None;
    }
    // Rows whose every head lies in the buffer: the last one starts `token` before the end of
    // the span of all heads of a row.
    let span = u64::from(num_kv_heads - 1) * s.head + u64::from(head_dim);
    let rows = elements.checked_sub(span)? / s.token + 1;
    if rows > i32::MAX as u64 {
        return None;
    }
    Some(MapShape {
        dims: [u64::from(head_dim), u64::from(num_kv_heads), rows],
        strides: [s.head * ELEMENT_BYTES, s.token * ELEMENT_BYTES],
        boxes: [BOX_COLUMNS, 1, kv_tile],
    })
}

/// Set to `0` to copy every FA3 tile with cp.async (an A/B switch, and a way around a driver
/// that refuses the maps).
pub const TMA_VAR: &str = "FERRINFER_SM90_TMA";

/// The entry's `Sm90Kv` for K and V at device addresses `k` and `v` (16-byte aligned, checked
/// by the caller): `tma` 0 where `shape` is `None`, [`TMA_VAR`] is `0`, or the driver refuses
/// a map (cp.async computes the same result, only slower).
pub(crate) fn sm90_kv(k: u64, v: u64, shape: Option<MapShape>, dtype: DType) -> Sm90Kv {
    let off = std::env::var(TMA_VAR).is_ok_and(|v| v.trim() == "0");
    let (Some(shape), false) = (shape, off) else {
        return Sm90Kv::default();
    };
    match (encode(k, &shape, dtype), encode(v, &shape, dtype)) {
        (Ok(k), Ok(v)) => Sm90Kv { k, v, tma: 1 },
        _ => Sm90Kv::default(),
    }
}

fn encode(ptr: u64, shape: &MapShape, dtype: DType) -> Result<[u64; 16]> {
    let data_type = match dtype {
        DType::F16 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
        DType::Bf16 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
    };
    let element_strides = [1u32; 3];
    let mut map = std::mem::MaybeUninit::<sys::CUtensorMap>::zeroed();
    // SAFETY: the array arguments are locals of the rank's length (3 dims, 2 strides, 3 boxes, 3
    // element strides), `map` is a CUtensorMap the driver writes and nothing else; the global
    // address is only recorded in the map, not dereferenced (ragged_shape bounded the rows by
    // the buffer's length).
    let status = unsafe {
        sys::cuTensorMapEncodeTiled(
            map.as_mut_ptr(),
            data_type,
            3,
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
            "cuTensorMapEncodeTiled failed ({status:?}) for a K/V map of {shape:?}"
        )));
    }
    // SAFETY: the driver wrote the map (CUDA_SUCCESS); it was zeroed before in any case.
    Ok(unsafe { map.assume_init() }.opaque)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nhd(heads: u64, d: u64) -> KvStrides {
        KvStrides {
            block: heads * d,
            token: heads * d,
            head: d,
        }
    }

    #[test]
    fn a_ragged_nhd_cache_is_rows_of_heads() {
        // 1000 tokens of 8 heads of 128.
        let s = ragged_shape(None, nhd(8, 128), 8, 128, 1000 * 8 * 128, 128).unwrap();
        assert_eq!(s.dims, [128, 8, 1000]);
        assert_eq!(s.strides, [256, 8 * 256]);
        assert_eq!(s.boxes, [64, 1, 128]);
        // A buffer one element short of the last row's last head drops that row.
        let short = ragged_shape(None, nhd(8, 128), 8, 128, 1000 * 8 * 128 - 1, 128).unwrap();
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
        let shape = ragged_shape(None, s, 4, 256, 4 * 4096 * 256, 64).unwrap();
        assert_eq!(shape.dims, [256, 4, 4096]);
        assert_eq!(shape.strides, [4096 * 512, 512]);
        assert_eq!(shape.boxes, [64, 1, 64]);
    }

    #[test]
    fn what_tma_cannot_describe_stays_on_cp_async() {
        let s = nhd(8, 128);
        assert_eq!(
            ragged_shape(Some(16), s, 8, 128, 1 << 20, 128),
            None,
            "paged"
        );
        let odd = KvStrides { block: 2048, ..s };
        assert_eq!(
            ragged_shape(None, odd, 8, 128, 1 << 20, 128),
            None,
            "block != token"
        );
        let narrow = KvStrides {
            block: 8 * 128 + 4,
            token: 8 * 128 + 4,
            head: 128,
        };
        assert_eq!(
            ragged_shape(None, narrow, 8, 128, 1 << 20, 128),
            None,
            "8-byte rows"
        );
        assert_eq!(
            ragged_shape(None, s, 8, 128, 100, 128),
            None,
            "shorter than a row"
        );
    }
}
