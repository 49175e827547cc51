//! The decode kernel: which template, and its launch geometry. Mirrors the constants of
//! `cuda/decode.cuh`: one CTA of [`DECODE_MAX_WARPS`] warps per work item of the plan.

use crate::abi::AttnArgs;
use crate::tu::Template;
use crate::{KernelConfig, LaunchDims};

/// Warps per decode CTA; `kDecodeMaxWarps` in decode.cuh.
pub(crate) const DECODE_MAX_WARPS: u32 = 4;
const WARP: u32 = 32;

pub(crate) fn template(_cfg: &KernelConfig) -> Template {
    Template {
        header: "attention/decode.cuh",
        function: "fi::decode",
        extra_args: String::new(),
        // Both bounds: four CTAs per SM is what the plan counts on (wrappers.rs ctas_per_sm).
        max_threads: "fi::kDecodeThreads, fi::kDecodeMinCtas",
        merge: true,
    }
}

/// One CTA per work item (the plan's padded length); an empty work list still gets one CTA, which
/// finds no valid item and returns (a zero grid would not launch). Shared memory is static.
pub(crate) fn launch_dims(_cfg: &KernelConfig, args: &AttnArgs) -> LaunchDims {
    LaunchDims {
        grid: [args.num_items.max(1), 1, 1],
        block: [DECODE_MAX_WARPS * WARP, 1, 1],
        shared_bytes: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DType, KernelKind};

    #[test]
    fn one_cta_per_work_item() {
        let cfg = KernelConfig {
            kind: KernelKind::Decode,
            head_dim: 128,
            dtype: DType::Bf16,
            cta_tile_q: 16,
            kv_tile: 0,
        };
        let args = AttnArgs {
            num_items: 528,
            ..AttnArgs::default()
        };
        let d = launch_dims(&cfg, &args);
        assert_eq!(
            (d.grid, d.block, d.shared_bytes),
            ([528, 1, 1], [128, 1, 1], 0)
        );
        let d = launch_dims(&cfg, &AttnArgs::default());
        assert_eq!(d.grid, [1, 1, 1]);
        assert!(template(&cfg).merge);
    }
}
