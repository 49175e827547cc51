//! The prefill (and append) kernel: which template, and its launch geometry. Mirrors the constants
//! of `cuda/prefill.cuh`.

use crate::abi::AttnArgs;
use crate::tu::Template;
use crate::{KernelConfig, LaunchDims};

/// Warps per prefill block (at most); `kPrefillWarps` in prefill.cuh.
pub(crate) const PREFILL_WARPS: u32 = 4;
const WARP: u32 = 32;

pub(crate) fn template(_cfg: &KernelConfig) -> Template {
    Template {
        header: "prefill.cuh",
        function: "fi::prefill",
        extra_args: String::new(),
        max_threads: "fi::kPrefillWarps * fi::kWarpSize",
        merge: false,
    }
}

/// One warp per (query row, query head); empty batches still get one block, which returns at once
/// (a zero grid would not launch).
pub(crate) fn launch_dims(_cfg: &KernelConfig, args: &AttnArgs) -> LaunchDims {
    let heads = args.num_qo_heads.max(1);
    let warps = heads.min(PREFILL_WARPS);
    LaunchDims {
        grid: [args.total_qo.max(1), heads.div_ceil(warps), 1],
        block: [warps * WARP, 1, 1],
        shared_bytes: 0,
    }
}
