//! The merge pass every attention family has (`cuda/attention/merge.cuh`): it combines the partial results
//! of split-KV work items into `o` and `lse`. Its entry and launch geometry.

use crate::abi::AttnArgs;
use crate::config::{KernelConfig, LaunchDims};
use crate::tu::cuda_dtype;

/// Threads per merge block; `kMergeThreads` in merge.cuh.
pub(crate) const MERGE_THREADS: u32 = 128;

/// The merge entry of an instance's unit: `<entry>_merge`, with the main entry's arguments.
pub(crate) fn entry(main_entry: &str, cfg: &KernelConfig) -> (String, String) {
    let name = format!("{main_entry}_merge");
    let text = format!(
        "\nextern \"C\" __global__ void __launch_bounds__(fi::kMergeThreads, fi::kMergeMinCtas)\n\
         {name}(const fi::AttnArgs args, const Params params) {{\n  \
         fi::merge<Variant, Params, {dtype}, {d}>(args, params);\n}}\n",
        dtype = cuda_dtype(cfg.dtype),
        d = cfg.head_dim_vo,
    );
    (name, text)
}

/// Launch geometry of the merge kernel for at most `max_rows` query rows (the plan's capacity: in
/// CUDA-graph mode the grid must fit every later plan; rows past the plan's `total_qo` return).
pub fn merge_launch_dims(_cfg: &KernelConfig, args: &AttnArgs, max_rows: u32) -> LaunchDims {
    let warps = MERGE_THREADS / 32;
    LaunchDims {
        grid: [max_rows.max(1), args.num_qo_heads.max(1).div_ceil(warps), 1],
        block: [MERGE_THREADS, 1, 1],
        shared_bytes: 0,
    }
}
