//! The merge pass of split-KV work lists (`cuda/merge.cuh`): its launch geometry.

use crate::abi::AttnArgs;
use crate::{KernelConfig, LaunchDims};

/// Threads per merge block; `kMergeThreads` in merge.cuh.
pub(crate) const MERGE_THREADS: u32 = 128;

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
