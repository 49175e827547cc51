//! The prefill (and append) kernel: which template, and its launch geometry. Mirrors
//! `PrefillShape` in `cuda/prefill.cuh`: one CTA per work item of the plan, one warp per 16
//! packed query rows (at most [`PREFILL_WARPS`], except at head dim 256), two stages of K/V
//! tiles of [`kv_tile`] keys and a table of their offsets.

use crate::abi::AttnArgs;
use crate::tu::Template;
use crate::{KernelConfig, KernelKind, LaunchDims};

/// Warps of a 64-row query tile; `kPrefillWarps` in prefill.cuh.
pub(crate) const PREFILL_WARPS: u32 = 4;
const WARP: u32 = 32;
/// Shared bytes of the per-CTA scalars; `kPrefillCtaBytes` in prefill.cuh.
const PREFILL_CTA_BYTES: u32 = 64;
/// K/V tiles resident in shared memory; `PrefillShape::kStages`.
const STAGES: u32 = 2;

/// Keys per K/V shared-memory tile; `PrefillShape::kTileKv`.
pub(crate) fn kv_tile(cfg: &KernelConfig) -> u32 {
    match cfg.kv_tile {
        0 if cfg.head_dim >= 128 => 32,
        0 => 64,
        k => k,
    }
}

/// See [`crate::wide_kv_tile`].
pub(crate) fn wide_kv_tile(cfg: &KernelConfig) -> Option<KernelConfig> {
    let offered = cfg.kind == KernelKind::Prefill
        && cfg.kv_tile == 0
        && cfg.head_dim == 128
        && tile_q(cfg) == 128;
    offered.then_some(KernelConfig {
        kv_tile: 64,
        ..*cfg
    })
}

/// The query tile the kernel is built for: the plan's, or, when the config leaves it open (0),
/// the one the plan picks for long prompts (ferrinfer_runtime::plan::cta_tile_q).
pub(crate) fn tile_q(cfg: &KernelConfig) -> u32 {
    match cfg.cta_tile_q {
        16 | 64 | 128 => cfg.cta_tile_q,
        _ if cfg.head_dim >= 256 => 64,
        _ => 128,
    }
}

/// Warps per CTA: one per 16 rows, capped at four (two 16-row blocks per warp then) except at
/// head dim 256, where two blocks' f32 accumulators would not fit the registers.
fn warps(cfg: &KernelConfig) -> u32 {
    let blocks = tile_q(cfg) / 16;
    if cfg.head_dim == 256 {
        blocks
    } else {
        blocks.min(PREFILL_WARPS)
    }
}

pub(crate) fn template(cfg: &KernelConfig) -> Template {
    Template {
        header: "attention/prefill.cuh",
        function: "fi::prefill",
        extra_args: format!(", {}, {}", tile_q(cfg), kv_tile(cfg)),
        max_threads: match warps(cfg) {
            1 => "32",
            4 => "128",
            _ => "256",
        },
        merge: true,
    }
}

/// One CTA per work item (the plan's padded length); an empty work list still gets one CTA,
/// which finds no valid item and returns (a zero grid would not launch).
pub(crate) fn launch_dims(cfg: &KernelConfig, args: &AttnArgs) -> LaunchDims {
    let rows = tile_q(cfg) + 2 * STAGES * kv_tile(cfg);
    // Two tiles' key byte offsets (u64) and block ids (i32), then `PrefillCta`.
    let table = 2 * kv_tile(cfg) * (8 + 4) + PREFILL_CTA_BYTES;
    LaunchDims {
        grid: [args.num_items.max(1), 1, 1],
        block: [warps(cfg) * WARP, 1, 1],
        shared_bytes: rows * cfg.head_dim * 2 + table,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DType;

    fn cfg(head_dim: u32, cta_tile_q: u32) -> KernelConfig {
        KernelConfig {
            kind: KernelKind::Prefill,
            head_dim,
            dtype: DType::Bf16,
            cta_tile_q,
            kv_tile: 0,
        }
    }

    #[test]
    fn the_wide_kv_tile_is_offered_at_the_long_prompt_tile_of_head_dim_128() {
        let wide = wide_kv_tile(&cfg(128, 128)).expect("offered");
        assert_eq!(wide.kv_tile, 64);
        assert_eq!(
            launch_dims(&wide, &AttnArgs::default()).shared_bytes,
            98304 + 1536 + 64
        );
        assert_eq!(wide.name(), "prefill_hd128_bf16_q128_k64");
        assert!(wide_kv_tile(&cfg(128, 0)).is_some()); // 0: the long-prompt tile, 128
        for other in [cfg(128, 64), cfg(64, 128), cfg(256, 64), wide] {
            assert!(wide_kv_tile(&other).is_none(), "{other:?}");
        }
    }

    #[test]
    fn geometry_follows_the_tile() {
        let args = AttnArgs {
            num_items: 300,
            ..AttnArgs::default()
        };
        let d = launch_dims(&cfg(128, 128), &args);
        assert_eq!(
            (d.grid, d.block, d.shared_bytes),
            ([300, 1, 1], [128, 1, 1], 65536 + 768 + 64)
        );
        let d = launch_dims(&cfg(128, 16), &args);
        assert_eq!((d.block, d.shared_bytes), ([32, 1, 1], 36864 + 768 + 64));
        let d = launch_dims(&cfg(64, 128), &args);
        assert_eq!(d.shared_bytes, 49152 + 1536 + 64);
        let d = launch_dims(&cfg(256, 128), &args);
        assert_eq!((d.block, d.shared_bytes), ([256, 1, 1], 131072 + 768 + 64));
        let d = launch_dims(&cfg(256, 0), &AttnArgs::default());
        assert_eq!((d.grid, d.block), ([1, 1, 1], [128, 1, 1]));
        for hd in crate::HEAD_DIMS {
            for tile in [0, 16, 64, 128] {
                let t = template(&cfg(hd, tile));
                assert_eq!(t.max_threads, (warps(&cfg(hd, tile)) * WARP).to_string());
                let c = cfg(hd, tile);
                assert_eq!(t.extra_args, format!(", {}, {}", tile_q(&c), kv_tile(&c)));
                // Within the opt-in shared memory of an sm_80 SM (163 KiB).
                assert!(
                    launch_dims(&cfg(hd, tile), &AttnArgs::default()).shared_bytes <= 163 * 1024
                );
            }
        }
    }
}
