//! The cascade merge kernel (`cuda/ops/merge_states.cuh`): its arguments, translation unit and launch
//! geometry. It merges attention states (output, natural-log LSE) computed over disjoint parts of
//! one KV set.

use crate::config::{DType, LaunchDims};
use crate::sources::Sources;
use crate::tu::{TranslationUnit, cuda_dtype};

/// Arguments of the merge kernel, passed by value; mirrors `fi::MergeStatesArgs`.
///
/// Pointers are device addresses and strides count elements. State 0 of row `r` is at
/// `v_first + r * v_row_stride`; state `k >= 1` at
/// `v_rest + ((k - 1) * num_heads * head_dim + r * v_row_stride)` (LSEs alike, without the
/// head dim). Two buffers merged pairwise and one `[rows, num_states, num_heads, head_dim]`
/// buffer are both described this way.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MergeStatesArgs {
    /// The first state's outputs, element type of the instance.
    pub v_first: u64,
    /// The other states' outputs.
    pub v_rest: u64,
    /// The first state's f32 LSEs.
    pub s_first: u64,
    /// The other states' f32 LSEs.
    pub s_rest: u64,
    /// `[rows, num_heads, head_dim]`; may equal `v_first` (in place).
    pub v_out: u64,
    /// `[rows, num_heads]` f32; may equal `s_first` (in place).
    pub s_out: u64,
    /// Elements between consecutive rows of the inputs' outputs.
    pub v_row_stride: u64,
    /// Elements between consecutive rows of the inputs' LSEs.
    pub s_row_stride: u64,
    /// Rows of the output.
    pub rows: u32,
    /// States merged into each row (2 for a pair).
    pub num_states: u32,
    /// Heads per row.
    pub num_heads: u32,
    /// Elements per head.
    pub head_dim: u32,
}

/// Elements per access the kernel is instantiated for, widest first (8 x 16 bits = 16 bytes).
pub const MERGE_STATES_VEC_WIDTHS: [u32; 4] = [8, 4, 2, 1];

/// Warps per block; `kMergeStatesWarps` in merge_states.cuh. Each warp merges one (row, head).
const WARPS: u32 = 4;
const WARP: u32 = 32;

/// The widest access that divides `head_dim` and to which every element pointer in `ptrs` (of a
/// 16-bit element type) is aligned.
pub fn merge_states_vec_width(head_dim: u32, ptrs: &[u64]) -> u32 {
    MERGE_STATES_VEC_WIDTHS
        .into_iter()
        .find(|&vec| {
            head_dim.is_multiple_of(vec) && ptrs.iter().all(|p| p.is_multiple_of(2 * vec as u64))
        })
        .unwrap_or(1)
}

/// The merge kernel for `dtype` and `vec` elements per access (one of
/// [`MERGE_STATES_VEC_WIDTHS`]): headers inlined, one entry
/// `ferrinfer_merge_states_<dtype>_v<vec>(const fi::MergeStatesArgs)`.
pub fn merge_states_unit(dtype: DType, vec: u32) -> Result<TranslationUnit, String> {
    assemble(&Sources::from_env(), dtype, vec)
}

fn assemble(sources: &Sources, dtype: DType, vec: u32) -> Result<TranslationUnit, String> {
    if !MERGE_STATES_VEC_WIDTHS.contains(&vec) {
        return Err(format!(
            "no merge_states kernel for {vec} elements per access (instantiated: \
             {MERGE_STATES_VEC_WIDTHS:?})"
        ));
    }
    super::assemble(
        sources,
        &format!("merge_states_{}_v{vec}", dtype.name()),
        "ops/merge_states.cuh",
        WARPS * WARP,
        "fi::MergeStatesArgs",
        &format!("fi::merge_states<{}, {vec}>(args);", cuda_dtype(dtype)),
    )
}

/// Every instance: both dtypes x [`MERGE_STATES_VEC_WIDTHS`] (a row of [`super::OPS`]).
pub fn all_units() -> Result<Vec<TranslationUnit>, String> {
    let sources = Sources::from_env();
    DType::ALL
        .into_iter()
        .flat_map(|d| MERGE_STATES_VEC_WIDTHS.map(|v| (d, v)))
        .map(|(d, v)| assemble(&sources, d, v))
        .collect()
}

/// One warp per (row, head), four warps per block; `None` when the grid would exceed CUDA's
/// limit of 2^31 - 1 blocks. An empty merge still gets one block (whose warps return at once).
pub fn merge_states_launch_dims(args: &MergeStatesArgs) -> Option<LaunchDims> {
    let pairs = u64::from(args.rows) * u64::from(args.num_heads);
    let blocks = pairs.div_ceil(u64::from(WARPS)).max(1);
    Some(LaunchDims {
        grid: [u32::try_from(blocks).ok().filter(|&b| b < 1 << 31)?, 1, 1],
        block: [WARPS * WARP, 1, 1],
        shared_bytes: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_size_matches_merge_states_cuh() {
        // 8 eight-byte fields and 4 four-byte fields; merge_states.cuh static_asserts the same.
        assert_eq!(std::mem::size_of::<MergeStatesArgs>(), 8 * 8 + 4 * 4);
        let header = Sources::BuiltIn.header("ops/merge_states.cuh").unwrap();
        assert!(header.contains("sizeof(MergeStatesArgs) == 8 * 8 + 4 * 4"));
        assert!(header.contains(&format!("kMergeStatesWarps = {WARPS};")));
    }

    #[test]
    fn unit_is_self_contained_and_instantiates_the_template() {
        for dtype in DType::ALL {
            for vec in MERGE_STATES_VEC_WIDTHS {
                let tu = merge_states_unit(dtype, vec).unwrap();
                assert_eq!(tu, merge_states_unit(dtype, vec).unwrap());
                assert!(!tu.source.contains("#include") && !tu.source.contains("#pragma once"));
                for name in [
                    "core/math.cuh",
                    "core/dtype.cuh",
                    "core/warp.cuh",
                    "ops/merge_states.cuh",
                ] {
                    let marker = format!("// ---- {name} ----");
                    assert_eq!(tu.source.matches(&marker).count(), 1, "{name}");
                }
                let name = format!("merge_states_{}_v{vec}", dtype.name());
                assert_eq!(tu.entry, format!("ferrinfer_{name}"));
                assert!(tu.source.contains(&format!(
                    "fi::merge_states<{}, {vec}>(args);",
                    cuda_dtype(dtype)
                )));
                assert_eq!(tu.merge_entry, None);
            }
        }
        assert!(
            merge_states_unit(DType::F16, 3)
                .unwrap_err()
                .contains("3 elements")
        );
    }

    #[test]
    fn vec_width_is_the_widest_aligned_divisor() {
        assert_eq!(merge_states_vec_width(128, &[0x1000, 0x2000]), 8);
        assert_eq!(merge_states_vec_width(12, &[0x1000]), 4);
        assert_eq!(merge_states_vec_width(6, &[0x1000]), 2);
        assert_eq!(merge_states_vec_width(5, &[0x1000]), 1);
        assert_eq!(merge_states_vec_width(128, &[0x1000, 0x2008]), 4);
        assert_eq!(merge_states_vec_width(128, &[0x1002]), 1);
    }

    #[test]
    fn launch_covers_every_row_and_head() {
        let args = |rows, num_heads| MergeStatesArgs {
            rows,
            num_heads,
            ..MergeStatesArgs::default()
        };
        let d = merge_states_launch_dims(&args(10, 3)).unwrap();
        assert_eq!((d.grid, d.block), ([8, 1, 1], [128, 1, 1]));
        assert_eq!(
            merge_states_launch_dims(&args(0, 8)).unwrap().grid,
            [1, 1, 1]
        );
        assert!(merge_states_launch_dims(&args(u32::MAX, u32::MAX)).is_none());
    }
}
