//! The decode family: its template, tile function, launch geometry and instances. Mirrors the
//! constants of `cuda/attention/decode.cuh`: one CTA of `kDecodeMaxWarps` warps per work item of the plan,
//! streaming K/V through a `kDecodeStages`-deep pipeline of `2048 / head_dim`-key tiles.

use super::Family;
use super::tiles::{SmResidency, TileInput, Tiles, query_tile};
use crate::abi::AttnArgs;
use crate::config::{ArchClass, HEAD_DIMS, InstanceTiles, KernelConfig, KernelKind, LaunchDims};

/// The decode row of [`super::FAMILIES`].
pub const FAMILY: Family = Family {
    kind: KernelKind::Decode,
    name: "decode",
    code: 1,
    header: |_| "attention/decode.cuh",
    function: |_| "fi::decode",
    template_args,
    entry_extra: |_| ("", ""),
    launch_bounds,
    launch_dims,
    head_dims: &HEAD_DIMS,
    query_tiles: &[0],
    kv_tiles: &[0],
    kv_warps: &[0],
    tiles,
    check_tiles: |_| Ok(()),
    instances,
};

/// Warps per decode CTA; `kDecodeMaxWarps` in decode.cuh.
pub(crate) const DECODE_MAX_WARPS: u32 = 4;
const WARP: u32 = 32;
/// CTAs the launch bounds ask ptxas to fit on an SM; `kDecodeMinCtas` in decode.cuh.
const MIN_CTAS: u32 = 4;
/// Depth of the K/V copy pipeline; `kDecodeStages` in decode.cuh.
const STAGES: u32 = 4;

/// The decode tile function (see [`super::tiles`]).
pub fn tiles(x: &TileInput<'_>) -> Tiles {
    let hd = x.head_dim_qk;
    let (cta_tile_q, reason) = query_tile(u64::from(x.group_size), 1, hd);
    let kv_tile = 2048 / hd;
    let reasons = vec![
        format!(
            "work-list tile {cta_tile_q} rows: a decode request has one query row, so its packed \
             rows are the group ({}) whatever the batch; {reason}",
            x.group_size
        ),
        format!(
            "K/V tile {kv_tile} keys: 4 KiB of 16-bit K (or V) per stage whatever the head dim \
             (DecodeShape::kTile)"
        ),
        format!(
            "{DECODE_MAX_WARPS} warps; the query heads of a KV head share its loads, so one CTA \
             per (request, KV head, chunk)"
        ),
        format!("{STAGES} stages: a cp.async pipeline deep enough to keep HBM busy"),
        format!(
            "{} work items per SM: two waves of the {MIN_CTAS} resident CTAs, so that a skewed \
             batch (a few long requests among short ones) is cut into chunks short enough that \
             the long requests do not finish last, alone on a few SMs",
            2 * MIN_CTAS
        ),
    ];
    Tiles {
        cta_tile_q,
        kv_tile,
        threads: DECODE_MAX_WARPS * WARP,
        stages: STAGES,
        shared_bytes: 0,
        ctas_per_sm: Some(2 * MIN_CTAS),
        instance: InstanceTiles::default(),
        fallback: None,
        alternative: None,
        reasons,
    }
}

/// One instance per head dim and dtype: the kernel does not tile queries.
fn instances(arch: ArchClass, _sm: &dyn SmResidency) -> Vec<KernelConfig> {
    FAMILY.each_instance(arch, &[0], |_| Vec::new())
}

fn template_args(_cfg: &KernelConfig) -> String {
    String::new()
}

/// Both bounds: four CTAs per SM is what the plan counts on (the tile function's occupancy).
fn launch_bounds(_cfg: &KernelConfig) -> &'static str {
    "fi::kDecodeThreads, fi::kDecodeMinCtas"
}

/// One CTA per work item (the plan's padded length); an empty work list still gets one CTA, which
/// finds no valid item and returns (a zero grid would not launch). Shared memory is static.
fn launch_dims(_cfg: &KernelConfig, args: &AttnArgs) -> LaunchDims {
    LaunchDims {
        grid: [args.num_items.max(1), 1, 1],
        block: [DECODE_MAX_WARPS * WARP, 1, 1],
        shared_bytes: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DType;

    #[test]
    fn one_cta_per_work_item() {
        let cfg = KernelConfig {
            cta_tile_q: 16,
            ..KernelConfig::new(KernelKind::Decode, 128, DType::Bf16, ArchClass::Sm80)
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
    }

    #[test]
    fn the_tile_follows_the_group() {
        let x = TileInput {
            packed_rows: 1 << 20,
            requests: 1,
            group_size: 32,
            page_size: None,
            head_dim_qk: 128,
            head_dim_vo: 128,
            sm: None,
            num_sms: 132,
            work_items: &|_| 1,
            batch_invariant: false,
            one_row_per_request: true,
            query_tile: Some(16),
            kv_warps: Some(2),
        };
        let t = tiles(&x);
        assert_eq!((t.cta_tile_q, t.kv_tile, t.threads), (64, 16, 128));
        assert_eq!(
            (t.ctas_per_sm, t.instance),
            (Some(8), InstanceTiles::default())
        );
        assert_eq!(t.reasons.len(), 5);
    }
}
