//! The decode kernel: which template, and its launch geometry. Mirrors the constants of
//! `cuda/decode.cuh`.

use crate::abi::AttnArgs;
use crate::tu::Template;
use crate::{KernelConfig, LaunchDims};

/// Warps per decode block (at most); `kDecodeMaxWarps` in decode.cuh.
pub(crate) const DECODE_MAX_WARPS: u32 = 8;
const WARP: u32 = 32;

pub(crate) fn template(_cfg: &KernelConfig) -> Template {
    Template {
        header: "decode.cuh",
        function: "fi::decode",
        extra_args: String::new(),
        max_threads: "fi::kDecodeMaxWarps * fi::kWarpSize",
        merge: false,
    }
}

/// One block per (request, KV head, chunk of the group's query heads).
pub(crate) fn launch_dims(_cfg: &KernelConfig, args: &AttnArgs) -> LaunchDims {
    let heads = args.num_qo_heads.max(1);
    let group = (heads / args.num_kv_heads.max(1)).max(1);
    let warps = group.min(DECODE_MAX_WARPS);
    LaunchDims {
        grid: [
            args.batch.max(1),
            args.num_kv_heads.max(1),
            group.div_ceil(warps),
        ],
        block: [warps * WARP, 1, 1],
        shared_bytes: 0,
    }
}
