//! The prefill (and append) family: its templates, tile function, launch geometry and instances.
//! Mirrors `PrefillShape` in `cuda/attention/prefill.cuh`: one CTA per work item of the plan, one warp per
//! 16 packed query rows (at most `kPrefillWarps`, except at head dim 256), two stages of K/V
//! tiles of `kv_tile` keys and a table of their offsets. The 16-row tile also has a form with two
//! warps along the keys ([`KernelConfig::kv_warps`]): its K/V tile is two `kv_tile`-key slices,
//! one a warp, merged in shared memory at the end; the plan picks one form or the other per batch
//! (see [`tiles`]). On sm_90a the 128-row tile also has an
//! FA3 form at every head dim (`cuda/attention/prefill_sm90.cuh`, `PrefillSm90Shape`): the
//! instances whose K/V tile is [`sm90_kv_tile`] of their head dim, which [`sm90_form`] names, and
//! at head dim 128 a second one for long prompts ([`sm90_long_kv_tile`], [`sm90_long_form`]).

use super::Family;
use super::tiles::{MAX_REGISTERS, SmResidency, TileInput, Tiles, query_tile};
use crate::TranslationUnit;
use crate::abi::AttnArgs;
use crate::config::{ArchClass, HEAD_DIMS, InstanceTiles, KernelConfig, KernelKind, LaunchDims};

/// The prefill row of [`super::FAMILIES`].
pub const FAMILY: Family = Family {
    kind: KernelKind::Prefill,
    name: "prefill",
    code: 0,
    header: |cfg| {
        if is_sm90(cfg) {
            "attention/prefill_sm90.cuh"
        } else {
            "attention/prefill.cuh"
        }
    },
    function: |cfg| {
        if is_sm90(cfg) {
            "fi::prefill_sm90"
        } else {
            "fi::prefill"
        }
    },
    template_args,
    entry_extra: |cfg| {
        if takes_sm90_maps(cfg) {
            (", const __grid_constant__ fi::Sm90Maps maps", ", maps")
        } else {
            ("", "")
        }
    },
    launch_bounds,
    launch_dims,
    head_dims: &HEAD_DIMS,
    query_tiles: &[0, 16, 64, 128],
    // 32 and 64 for FA2 (0: its default), 16 at its one-warp 16-row tile; 128 for FA3 at head
    // dims 64 and 128, and 176 at 128 for long prompts (at 256 its tile is 64, which FA2 leaves
    // to it there: see `check_tiles`).
    kv_tiles: &[0, NARROW_KV_TILE, 32, 64, 128, SM90_LONG_KV_TILE],
    // One warp along the keys (0), or two at the 16-row tile (see `check_tiles`).
    kv_warps: &[0, SHORT_TILE_KV_WARPS],
    tiles,
    check_tiles,
    instances,
};

/// Warps of a 64-row query tile; `kPrefillWarps` in prefill.cuh.
pub(crate) const PREFILL_WARPS: u32 = 4;
/// Warps along the keys of the 16-row query tile's second form (decode on tensor cores, prefill
/// of very short requests): each streams its own `kv_tile` keys of the CTA's K/V tile, so a CTA
/// keeps twice the bytes of one warp in flight. Four were measured too, and lost on every decode
/// benchmark (one 138 KB CTA an H200 SM; kernels/notes/decode.md).
const SHORT_TILE_KV_WARPS: u32 = 2;
/// Keys per K/V tile of the one-warp 16-row tile's narrow form: half the shared memory of the
/// default at head dim 128 (20.9 KB against 37.7), so an H200 SM holds eight CTAs of it against
/// six (as the plan counts, with the most registers a variant may take; ten by shared memory).
/// Each streams slower (8 KiB in flight against 16), so the plan takes it only where its model
/// says a wave of more CTAs pays: a decode whose requests differ in length, which split into
/// equal items only with more items than the default's wave holds (runtime's `plan`, "the
/// narrow tile"). Offered at head dim 128, where it was measured (at 256 its one-warp build
/// spills on sm_80).
pub const NARROW_KV_TILE: u32 = 16;
/// The head dim of the narrow tile.
const NARROW_HEAD_DIM: u32 = 128;
/// Two warps along the keys need the batch's grid, unsplit, to be at least this many waves of
/// two-warp CTAs (see [`choose_kv_warps`] for the measurements).
const KV_WARPS_MIN_WAVES: u64 = 2;
/// ... and query heads per KV head at most this many (MHA), or pages of one key.
const KV_WARPS_MAX_GROUP: u32 = 1;
const WARP: u32 = 32;
/// Shared bytes of the per-CTA scalars; `kPrefillCtaBytes` in prefill.cuh.
const PREFILL_CTA_BYTES: u32 = 72;
/// K/V tiles resident in shared memory; `PrefillShape::kStages`.
const STAGES: u32 = 2;
/// Bytes per element of q, k and v (f16 and bf16).
const ELEMENT_BYTES: u32 = 2;

/// Keys per K/V tile of the sm_90a (FA3) template at a head dim (`PrefillSm90Shape::kTileKv`),
/// `None` where it is not built. A consumer warpgroup holds O (head_dim / 2 f32 a thread), S
/// (tile / 2) and P (tile / 4) in its 232 registers (224 at 256): 128 keys at head dims 64 and
/// 128, 64 at 256 (O alone is 128 floats there). A prefill instance whose K/V tile is this one is the FA3
/// template's: FA2 uses 32 and 64 keys, and leaves 64 at head dim 256 to FA3 (two stages of 64
/// keys beside a 128-row Q tile would not fit an sm_80 SM's shared memory).
///
/// ```
/// use ferrinfer_kernels::attention::prefill::sm90_kv_tile;
/// assert_eq!(sm90_kv_tile(64), Some(128));
/// assert_eq!(sm90_kv_tile(128), Some(128));
/// assert_eq!(sm90_kv_tile(256), Some(64));
/// assert_eq!(sm90_kv_tile(96), None);
/// ```
pub const fn sm90_kv_tile(head_dim: u32) -> Option<u32> {
    match head_dim {
        64 | 128 => Some(128),
        256 => Some(64),
        _ => None,
    }
}

/// Keys per K/V tile of the sm_90a template's second instance at head dim 128, for long prompts:
/// FlashAttention-3's tile there (S is 88 floats a thread, P 44). Two stages of it fit beside
/// the Q tile (208 KiB), and it takes fewer softmax turns a key; it pays where the prompts are
/// long and K and V come by TMA (the runtime's choice: `PrefillKernel`'s docs), and costs more
/// masked keys and a cp.async tail on short ones. Measured on an H200 against the 128-key tile
/// in the same call (kernels/notes/fa3.md, session 23): s8192 full 1.015, causal 1.030; ragged
/// b16 l1024 causal 0.946, pages of 64 (whose copies a 176-key tile misaligns) 0.903.
///
/// ```
/// use ferrinfer_kernels::attention::prefill::sm90_long_kv_tile;
/// assert_eq!(sm90_long_kv_tile(128), Some(176));
/// assert_eq!(sm90_long_kv_tile(64), None);
/// assert_eq!(sm90_long_kv_tile(256), None);
/// ```
pub const fn sm90_long_kv_tile(head_dim: u32) -> Option<u32> {
    match head_dim {
        128 => Some(SM90_LONG_KV_TILE),
        _ => None,
    }
}

/// [`sm90_long_kv_tile`] at head dim 128.
const SM90_LONG_KV_TILE: u32 = 176;

/// K/V stages of the sm_90a template (`PrefillSm90Shape::kStages`): three of 128-key tiles beside
/// one Q tile; two of the others (at head dim 256 a Q tile of 64 KiB and two stages of 64-key K
/// and V, 32 KiB each, fill the shared memory; at 128, two of 176 keys, 44 KiB each).
const fn sm90_stages(kv_tile: u32) -> u32 {
    if kv_tile == 128 { 3 } else { 2 }
}

/// Q tiles of the sm_90a template (`PrefillSm90Shape::kQSlots`): two at head dim 64, so the next
/// item's Q lands while this one's is read; one elsewhere (the third stage took its place).
const fn sm90_q_slots(head_dim: u32) -> u32 {
    if head_dim == 64 { 2 } else { 1 }
}

/// Query rows of the sm_90a template's tile: two consumer warpgroups of 64 rows.
const SM90_TILE_Q: u32 = 128;
/// Threads of the sm_90a template: a producer warpgroup and two consumers of 64 rows.
const SM90_THREADS: u32 = 384;
/// Slots of its key offset table (`kOffsetSlots`).
const SM90_OFFSET_SLOTS: u32 = 2;
/// Bytes a work item takes in shared memory (`kItemBytes`): the producer hands each item over
/// with its Q, in two slots more than there are Q slots (`kItemSlots`).
const SM90_ITEM_BYTES: u32 = 128;

/// Whether `cfg` names the sm_90a template: its K/V tile is that template's at its head dim
/// (`check_tiles` keeps FA2 off those tiles, so the name alone tells the templates apart).
/// Whether an instance is the FA3 form, whose entry takes the TMA maps (`abi::Sm90Maps`) third:
/// the runtime launches it so.
pub fn takes_sm90_maps(cfg: &KernelConfig) -> bool {
    is_sm90(cfg)
}

fn is_sm90(cfg: &KernelConfig) -> bool {
    sm90_kv_tile(cfg.head_dim_qk) == Some(cfg.kv_tile) || is_sm90_long(cfg)
}

/// The sm_90a template's tile exists only in its one form, FA2 has 32- and 64-key tiles, and
/// warps along the keys exist at FA2's 16-row tile only.
fn check_tiles(cfg: &KernelConfig) -> Result<(), String> {
    if cfg.kv_warps > 1 && (is_sm90(cfg) || tile_q(cfg) != 16) {
        return Err(format!(
            "{} warps along the keys: the FA2 template's 16-row query tile only (asked: {})",
            cfg.kv_warps,
            cfg.name()
        ));
    }
    if is_sm90(cfg) {
        if sm90_form(cfg) != Some(*cfg) {
            return Err(format!(
                "the {}-key K/V tile at head dim {} is the sm_90a template's: 128-row query tiles \
                 on sm_90a only (asked: {})",
                cfg.kv_tile,
                cfg.head_dim_qk,
                cfg.name()
            ));
        }
    } else if cfg.kv_tile == NARROW_KV_TILE
        && !offers_narrow_kv_tile(cfg.head_dim_qk, tile_q(cfg), cfg.kv_warps.max(1))
    {
        return Err(format!(
            "the {NARROW_KV_TILE}-key K/V tile is the one-warp 16-row tile's only, at head dim \
             {NARROW_HEAD_DIM} (asked: {})",
            cfg.name()
        ));
    } else if ![0, NARROW_KV_TILE, 32, 64].contains(&cfg.kv_tile) {
        return Err(format!(
            "no prefill kernel with a {}-key K/V tile at head dim {}: FA2 has 32 and 64 keys (16 \
             at its one-warp 16-row tile), and the sm_90a template {} (asked: {})",
            cfg.kv_tile,
            cfg.head_dim_qk,
            match (
                sm90_kv_tile(cfg.head_dim_qk),
                sm90_long_kv_tile(cfg.head_dim_qk)
            ) {
                (Some(k), Some(long)) => format!("{k} and {long} on sm_90a"),
                (Some(k), None) => format!("{k} on sm_90a"),
                _ => "none at this head dim".to_string(),
            },
            cfg.name()
        ));
    }
    Ok(())
}

/// The sm_90a (FA3) form of a prefill instance, where one exists: the 128-row tile on sm_90a at
/// head dims 64, 128 and 256, same element types, with the K/V tile [`sm90_kv_tile`] gives. It
/// reads the same work list (128-row items) and writes the same results as the FA2 instance,
/// for every variant (query and key hooks rewrite its tiles in shared memory). An FA3 instance is
/// its own form (with either of its K/V tiles at head dim 128).
///
/// ```
/// use ferrinfer_kernels::attention::prefill::sm90_form;
/// use ferrinfer_kernels::{ArchClass, DType, InstanceTiles, KernelConfig, KernelKind};
///
/// let tiles = InstanceTiles { cta_tile_q: 128, ..InstanceTiles::default() };
/// let fa2 = KernelConfig::new(KernelKind::Prefill, 256, DType::Bf16, ArchClass::Sm90a)
///     .with_tiles(tiles);
/// let fa3 = sm90_form(&fa2).unwrap();
/// assert_eq!(fa3.name(), "prefill_hd256_bf16_q128_k64_sm90a");
/// assert_eq!(sm90_form(&fa3), Some(fa3));
/// // No FA3 form on sm_80, nor for a 64-row tile.
/// assert_eq!(sm90_form(&KernelConfig { arch: ArchClass::Sm80, ..fa2 }), None);
/// let short = fa2.with_tiles(InstanceTiles { cta_tile_q: 64, ..InstanceTiles::default() });
/// assert_eq!(sm90_form(&short), None);
/// ```
pub fn sm90_form(cfg: &KernelConfig) -> Option<KernelConfig> {
    let default = sm90_kv_tile(cfg.head_dim_qk)?;
    let kv_tile = if is_sm90(cfg) { cfg.kv_tile } else { default };
    let offered = cfg.kind == KernelKind::Prefill
        && cfg.arch == ArchClass::Sm90a
        && cfg.head_dim_vo == cfg.head_dim_qk
        && cfg.kv_dtype == cfg.dtype
        && tile_q(cfg) == SM90_TILE_Q;
    offered.then_some(KernelConfig {
        cta_tile_q: SM90_TILE_Q,
        kv_tile,
        ..*cfg
    })
}

/// The FA3 form of a prefill instance with the long prompts' K/V tile ([`sm90_long_kv_tile`]),
/// where the head dim has one: [`sm90_form`] with 176 keys at head dim 128.
///
/// ```
/// use ferrinfer_kernels::attention::prefill::{sm90_form, sm90_long_form};
/// use ferrinfer_kernels::{ArchClass, DType, InstanceTiles, KernelConfig, KernelKind};
///
/// let tiles = InstanceTiles { cta_tile_q: 128, ..InstanceTiles::default() };
/// let fa2 = KernelConfig::new(KernelKind::Prefill, 128, DType::Bf16, ArchClass::Sm90a)
///     .with_tiles(tiles);
/// let long = sm90_long_form(&fa2).unwrap();
/// assert_eq!(long.name(), "prefill_hd128_bf16_q128_k176_sm90a");
/// assert_eq!(sm90_form(&long), Some(long));
/// assert_eq!(sm90_long_form(&sm90_form(&fa2).unwrap()), Some(long));
/// let hd64 = KernelConfig { head_dim_qk: 64, head_dim_vo: 64, ..fa2 };
/// assert_eq!(sm90_long_form(&hd64), None);
/// ```
pub fn sm90_long_form(cfg: &KernelConfig) -> Option<KernelConfig> {
    let kv_tile = sm90_long_kv_tile(cfg.head_dim_qk)?;
    sm90_form(cfg).map(|f| KernelConfig { kv_tile, ..f })
}

/// Whether `cfg` is an FA3 instance with the long prompts' K/V tile.
pub fn is_sm90_long(cfg: &KernelConfig) -> bool {
    sm90_long_kv_tile(cfg.head_dim_qk) == Some(cfg.kv_tile)
}

/// The consumers' loop of an FA3 build. Both loops read the same work list and maps, with the
/// same launch and shared memory, and compute the same attention (the GPU tests check each
/// against the CPU reference; their sums may round differently): only the source differs (and
/// so every cache key).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Sm90Loop {
    /// The template's default (`FI_SM90_OVERLAP 1`): FA3's intra-warpgroup overlap (the
    /// softmax of tile t under P V of tile t - 1) where [`sm90_overlaps`], in order elsewhere.
    #[default]
    Default,
    /// S, softmax and P V in order each tile, at every head dim ([`sm90_in_order`]).
    InOrder,
}

/// Whether the template's default build overlaps at `head_dim` (`kSm90Overlap`): at 64 and
/// 128; at 256 it is in order already, so [`Sm90Loop::InOrder`] changes nothing there.
///
/// ```
/// use ferrinfer_kernels::attention::prefill::sm90_overlaps;
/// assert!(sm90_overlaps(64) && sm90_overlaps(128) && !sm90_overlaps(256));
/// ```
pub const fn sm90_overlaps(head_dim: u32) -> bool {
    matches!(head_dim, 64 | 128)
}

/// An FA3 translation unit with its consumers in order (S, softmax, P V each tile) instead of
/// FA3's intra-warpgroup overlap (the softmax of tile t under P V of tile t - 1). The overlap
/// keeps P live across the softmax: variants with heavy hooks (ALiBi, a custom mask, a sink)
/// spill with it at head dims 64 and 128, and fit in order. The runtime builds this form when
/// the overlapping build spills (and FA2 when this one spills too), and where the launch's K/V
/// all go through cp.async at head dim 128 (the overlap lost there). Same kernel, launch and
/// shared memory; only the source (and so the cache key) differs.
///
/// ```
/// use ferrinfer_kernels::TranslationUnit;
/// use ferrinfer_kernels::attention::prefill::sm90_in_order;
///
/// let tu = TranslationUnit {
///     name: "V.prefill_hd128_bf16_q128_k128_sm90a".into(),
///     source: "// kernel".into(),
///     entry: "ferrinfer_prefill_hd128_bf16_q128_k128_sm90a".into(),
///     merge_entry: None,
/// };
/// let in_order = sm90_in_order(&tu);
/// assert!(in_order.source.starts_with("#define FI_SM90_OVERLAP 0\n"));
/// assert_eq!((in_order.name, in_order.entry), (tu.name, tu.entry));
/// ```
pub fn sm90_in_order(tu: &TranslationUnit) -> TranslationUnit {
    TranslationUnit {
        source: format!("#define FI_SM90_OVERLAP 0\n{}", tu.source),
        ..tu.clone()
    }
}

/// The template's shape for a head dim and tiles: what `PrefillShape` derives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Shape {
    tile_q: u32,
    /// Keys of a warp's slice of a K/V tile (the whole tile with one warp along the keys).
    kv_tile: u32,
    /// Warps along the keys (1 or 2): the CTA's K/V tile is `kv_warps * kv_tile` keys.
    kv_warps: u32,
    /// All warps of the CTA: along the rows times along the keys.
    warps: u32,
    shared_bytes: u32,
}

impl Shape {
    fn new(head_dim: u32, tile_q: u32, kv_tile: u32, kv_warps: u32) -> Self {
        // One warp per 16 rows, capped at four (two 16-row blocks per warp then) except at head
        // dim 256, where two blocks' f32 accumulators would not fit the registers.
        let blocks = tile_q / 16;
        let q_warps = if head_dim == 256 {
            blocks
        } else {
            blocks.min(PREFILL_WARPS)
        };
        // The Q tile and `STAGES` K and V tiles of the CTA, then two tiles' key byte offsets
        // (u64) and block ids (i32), then `PrefillCta`. The merge of the warps along the keys
        // reuses the K/V stages.
        let cta_kv = kv_warps * kv_tile;
        let rows = tile_q + 2 * STAGES * cta_kv;
        let table = 2 * cta_kv * (8 + 4) + PREFILL_CTA_BYTES;
        Shape {
            tile_q,
            kv_tile,
            kv_warps,
            warps: q_warps * kv_warps,
            shared_bytes: rows * head_dim * ELEMENT_BYTES + table,
        }
    }

    /// Keys of the CTA's K/V tile (what one stage holds).
    fn cta_kv_tile(&self) -> u32 {
        self.kv_warps * self.kv_tile
    }

    /// The sm_90a template's shape (`PrefillSm90Shape`) at a head dim and its K/V tile
    /// ([`sm90_kv_tile`]): the Q slots, the stages of K and V in 128-byte-swizzled blocks, two
    /// tiles' key byte offsets (u64), the mbarriers (each Q slot's full and empty, then each
    /// stage's K full, V full, K empty and V empty) and the work item slots.
    fn sm90(head_dim: u32, kv_tile: u32) -> Self {
        let q_slots = sm90_q_slots(head_dim);
        let stages = sm90_stages(kv_tile);
        let rows = q_slots * SM90_TILE_Q + 2 * stages * kv_tile;
        let barriers = 2 * q_slots + 4 * stages;
        Shape {
            tile_q: SM90_TILE_Q,
            kv_tile,
            kv_warps: 1,
            warps: SM90_THREADS / WARP,
            shared_bytes: rows * head_dim * ELEMENT_BYTES
                + SM90_OFFSET_SLOTS * kv_tile * 8
                + barriers * 8
                + (q_slots + 2) * SM90_ITEM_BYTES,
        }
    }

    /// The shape an instance is built with.
    fn of(cfg: &KernelConfig) -> Self {
        if is_sm90(cfg) {
            return Shape::sm90(cfg.head_dim_qk, cfg.kv_tile);
        }
        Shape::new(
            cfg.head_dim_qk,
            tile_q(cfg),
            kv_tile(cfg),
            cfg.kv_warps.max(1),
        )
    }
}

/// Keys per K/V shared-memory tile the template uses when the config leaves it open (0): 64 at
/// head dim 64; above, 32, which keeps two stages of K and V and a 128-row Q tile in the shared
/// memory of an sm_80 SM with room for a second CTA.
fn default_kv_tile(head_dim: u32) -> u32 {
    if head_dim >= 128 { 32 } else { 64 }
}

/// Keys per K/V shared-memory tile; `PrefillShape::kTileKv`.
fn kv_tile(cfg: &KernelConfig) -> u32 {
    match cfg.kv_tile {
        0 => default_kv_tile(cfg.head_dim_qk),
        k => k,
    }
}

/// The query tile the kernel is built for: the plan's, or, when the config leaves it open (0),
/// the one the plan picks for long prompts.
fn tile_q(cfg: &KernelConfig) -> u32 {
    match cfg.cta_tile_q {
        16 | 64 | 128 => cfg.cta_tile_q,
        _ if cfg.head_dim_qk >= 256 => 64,
        _ => 128,
    }
}

/// Keys of the wide K/V tile.
const WIDE_KV_TILE: u32 = 64;

/// Whether the template offers the wide K/V tile at this head dim and query tile: the 128-row
/// tile at head dim 128 (half the per-tile softmax, rescale and barrier cost per key; +14-16% on
/// an H200). Whether it pays is [`wide_kv_tile_pays`].
fn offers_wide_kv_tile(head_dim: u32, tile_q: u32) -> bool {
    head_dim == 128 && tile_q == 128
}

/// The same instance with the wide K/V tile, where the template offers one.
pub(crate) fn wide_kv_tile(cfg: &KernelConfig) -> Option<KernelConfig> {
    let offered = cfg.kind == KernelKind::Prefill
        && cfg.kv_tile == 0
        && offers_wide_kv_tile(cfg.head_dim_qk, tile_q(cfg));
    offered.then_some(KernelConfig {
        kv_tile: WIDE_KV_TILE,
        ..*cfg
    })
}

/// Whether two CTAs of the `wide` shape are resident on an SM like `sm` with the most registers a
/// variant may take: one CTA alone would hide no latency, and the narrow tile then runs two.
fn wide_kv_tile_pays(wide: &Shape, sm: &dyn SmResidency) -> bool {
    sm.resident_ctas(wide.warps * WARP, wide.shared_bytes, MAX_REGISTERS) >= 2
}

/// The same instance with two warps along the keys, where the template offers them: FA2's
/// 16-row tile.
pub(crate) fn two_kv_warps(cfg: &KernelConfig) -> Option<KernelConfig> {
    let offered =
        cfg.kind == KernelKind::Prefill && cfg.kv_warps == 0 && tile_q(cfg) == 16 && !is_sm90(cfg);
    offered.then_some(KernelConfig {
        kv_warps: SHORT_TILE_KV_WARPS,
        ..*cfg
    })
}

/// Whether the FA2 template offers the narrow K/V tile ([`NARROW_KV_TILE`]) at this head dim,
/// query tile and count of warps along the keys: the one-warp 16-row tile at head dim 128.
fn offers_narrow_kv_tile(head_dim: u32, tile_q: u32, kv_warps: u32) -> bool {
    head_dim == NARROW_HEAD_DIM && tile_q == 16 && kv_warps == 1
}

/// The one-warp 16-row instance with the narrow K/V tile ([`NARROW_KV_TILE`]).
pub(crate) fn narrow_kv_tile(cfg: &KernelConfig) -> Option<KernelConfig> {
    let offered = cfg.kind == KernelKind::Prefill
        && cfg.kv_tile == 0
        && offers_narrow_kv_tile(cfg.head_dim_qk, tile_q(cfg), cfg.kv_warps.max(1))
        && !is_sm90(cfg);
    offered.then_some(KernelConfig {
        kv_tile: NARROW_KV_TILE,
        ..*cfg
    })
}

/// CTAs of the 16-row tile at head dim `hd` an SM like `sm` holds with the most registers a
/// variant may take: with one warp along the keys, and with two; 0 where one CTA does not fit
/// (two warps at head dim 256 need 141 KB: more than an sm_86 or sm_89 SM has).
fn short_tile_residency(hd: u32, sm: &dyn SmResidency) -> (u32, u32) {
    let resident = |kv_warps| {
        let s = Shape::new(hd, 16, default_kv_tile(hd), kv_warps);
        if sm.fits(s.shared_bytes) {
            sm.resident_ctas(s.warps * WARP, s.shared_bytes, MAX_REGISTERS)
        } else {
            0
        }
    };
    (resident(1), resident(SHORT_TILE_KV_WARPS))
}

/// Whether, by [`short_tile_residency`]'s `(one, two)`, an SM holds as many warps along the keys
/// (so as many keys in flight) in two-warp CTAs of the 16-row tile as in one-warp CTAs: true at
/// head dims 64 and 128 (three CTAs of two warps against six of one on an H200, two against four
/// on an A100), false at 256 on Hopper (one of 141 KB against three of 75 KB) and where a
/// two-warp CTA does not fit at all.
fn two_kv_warps_fit((one, two): (u32, u32)) -> bool {
    two > 0 && two * SHORT_TILE_KV_WARPS >= one
}

/// Warps along the keys of the 16-row tile for a batch (1 or 2), and why, where the SM holds as
/// many keys in flight in two-warp CTAs ([`two_kv_warps_fit`]): two where the grid before any KV
/// split is under one wave of two-warp CTAs (few long requests, which the plan splits to fill
/// the device whichever count runs); else two for one query head a KV head (MHA,
/// [`KV_WARPS_MAX_GROUP`]) or pages of one key, when that grid is at least
/// [`KV_WARPS_MIN_WAVES`] waves of two-warp CTAs; one otherwise. Measured on an H200 (2026-11-30,
/// session 7, both counts forced in one call: call C, the group rows in call D; decode on tensor
/// cores, bf16, head dim 128, 32 query and 8 KV heads unless said, page size 16, GB/s; one warp
/// is six 37.7 KB CTAs an SM, 792 a wave, two warps three 71 KB CTAs, 396 a wave; FlashInfer's
/// best of its two decode paths from call C):
///
/// | batch | work items | one warp | two warps | FlashInfer's best |
/// |---|---:|---:|---:|---:|
/// | 64 x 4096 | 512 | 4147 | 3965 | 4194 |
/// | 256 x 2048 | 2048 | 4233 | 4041 | 4277 |
/// | 128 x 1024, page size 1 | 1024 | 3419 | 3638 | 3574 |
/// | 16 x 32768 | 128 | 4280 | 4296 | 4373 |
/// | 64, every 16th 8192 tokens, the rest 512 | 512 | 2813 | 2744 | 2443 |
/// | 64 x 4096, soft-cap 30 | 512 | 4143 | 3897 | 4198 |
/// | 64 x 4096, 32 / 16 heads (GQA 2) | 1024 | 4304 | 4233 | 4375 |
/// | 64 x 4096, 32 / 32 heads (MHA) | 2048 | 4323 | 4403 | 4494 |
///
/// Both forms keep about the same K/V bytes in flight an SM (six CTAs of 32 keys, three of 64).
/// With two or more rows of a group a tile and pages of 16, one warp wins at every size: two-warp
/// CTAs cut a small grid into coarser waves (512 items: -4.4%) and a large one (2048 items,
/// split in four by `balance_tail_wave`) into more merge work (-4.6%; GQA 2: -1.6%). With one key
/// a page each key's page id is a dependent load, and with one row a tile (MHA) a CTA's stream
/// carries the least work a key: there twice the keys a CTA stream faster (+6.4%, +1.8%). The
/// long-context batch (128 items, under a wave of either form, split to fill the device either
/// way) measured a tie in that call, and two warps ahead in the five calls since (GB/s, two /
/// one, forced rows beside FlashInfer's best: session 10, three calls: 4237 / 4203, 4242 / 4196,
/// 4250 / 4208; session 13 (2026-12-01), two calls: 4318 / 4291, 4349 / 4294, against 4363 and
/// 4360): +0.6 to +1.3%. Batch-invariant plans keep one warp: the count changes the order of the
/// sums, so it must not depend on the batch. Not measured: pages of 2-8 keys, other head dims,
/// other GPUs, a batch of under 16 long requests.
fn choose_kv_warps(x: &TileInput<'_>) -> (u32, String) {
    if let Some(n) = x.kv_warps {
        let n = if n > 1 { SHORT_TILE_KV_WARPS } else { 1 };
        let s = if n > 1 { "s" } else { "" };
        return (
            n,
            format!("{n} warp{s} along the keys: fixed by the caller"),
        );
    }
    if x.batch_invariant {
        return (
            1,
            "1 warp along the keys: batch-invariant, and the count changes the order of the \
             sums, so it must not depend on the batch"
                .to_string(),
        );
    }
    let Some(sm) = x.sm else {
        return (
            1,
            "1 warp along the keys: no SM was described to count the grid's waves".to_string(),
        );
    };
    let (one, two) = short_tile_residency(x.head_dim_qk, sm);
    if !two_kv_warps_fit((one, two)) {
        return (
            1,
            format!(
                "1 warp along the keys: an SM holds {two} CTAs of {SHORT_TILE_KV_WARPS} warps \
                 against {one} of one, fewer keys in flight"
            ),
        );
    }
    let wave = u64::from(x.num_sms) * u64::from(two);
    let items = (x.work_items)(16);
    if wave > 0 && items < wave {
        return (
            SHORT_TILE_KV_WARPS,
            format!(
                "{SHORT_TILE_KV_WARPS} warps along the keys: {items} work items are under a wave \
                 of {wave} two-warp CTAs ({two} an SM), so the plan splits the keys to fill the \
                 device whichever count runs, and twice the keys a CTA stream faster"
            ),
        );
    }
    if x.group_size > KV_WARPS_MAX_GROUP && x.page_size != Some(1) {
        return (
            1,
            format!(
                "1 warp along the keys: {} query heads a KV head over {}, where one-warp CTAs \
                 streamed faster at every batch size measured",
                x.group_size,
                x.page_size
                    .map_or("a ragged cache".to_string(), |p| format!(
                        "pages of {p} keys"
                    ))
            ),
        );
    }
    if items >= KV_WARPS_MIN_WAVES * wave {
        (
            SHORT_TILE_KV_WARPS,
            format!(
                "{SHORT_TILE_KV_WARPS} warps along the keys: {items} work items are at least \
                 {KV_WARPS_MIN_WAVES} waves of {wave} two-warp CTAs ({two} an SM, as many keys \
                 in flight as {one} one-warp CTAs), where half as many CTAs of twice the keys \
                 stream faster"
            ),
        )
    } else {
        (
            1,
            format!(
                "1 warp along the keys: {items} work items are under {KV_WARPS_MIN_WAVES} waves \
                 of {wave} two-warp CTAs, and one-warp CTAs ({one} an SM) cut such a grid into \
                 finer waves"
            ),
        )
    }
}

/// The prefill tile function: every tile of a batch and why (see [`super::tiles`]).
pub fn tiles(x: &TileInput<'_>) -> Tiles {
    let hd = x.head_dim_qk;
    let mut why = Vec::new();

    // Query tile: rows of packed (query row, head of the group) pairs per CTA.
    let cta_tile_q = if let Some(t) = x.query_tile {
        why.push(format!("query tile {t}: fixed by the caller"));
        t
    } else if x.one_row_per_request {
        let (t, reason) = query_tile(u64::from(x.group_size), 1, hd);
        why.push(format!(
            "query tile {t}: every request has one row, so its packed rows are the group ({}) \
             whatever the batch (which keeps the batch-invariant mode invariant too); {reason}",
            x.group_size
        ));
        t
    } else if x.batch_invariant {
        let (t, reason) = query_tile(u64::MAX, 1, hd);
        why.push(format!(
            "query tile {t}: batch-invariant, and the tile may change the reduction order, so it \
             must not depend on the other requests: the long-prompt tile; {reason}"
        ));
        t
    } else {
        let (t, reason) = query_tile(x.packed_rows, x.requests, hd);
        why.push(format!(
            "query tile {t}: {} packed rows over {} requests; {reason}",
            x.packed_rows, x.requests
        ));
        t
    };

    // K/V tile: the template's default, or the wide one where it pays on this device.
    let narrow = Shape::new(hd, cta_tile_q, default_kv_tile(hd), 1);
    let with_kv = |kv_tile| InstanceTiles {
        cta_tile_q,
        kv_tile,
        kv_warps: 0,
    };
    let (shape, instance, fallback) = if offers_wide_kv_tile(hd, cta_tile_q) {
        let wide = Shape::new(hd, cta_tile_q, WIDE_KV_TILE, 1);
        match x.sm {
            Some(sm) if wide_kv_tile_pays(&wide, sm) => {
                why.push(format!(
                    "K/V tile {WIDE_KV_TILE} keys: at head dim 128 with 128 query rows, \
                     {WIDE_KV_TILE} keys halve the per-tile softmax, rescale and barrier cost per \
                     key (+14-16% on an H200), and two CTAs of it fit this SM; registers are \
                     tight, so a variant whose build spills runs the {}-key tile instead",
                    narrow.kv_tile
                ));
                (wide, with_kv(WIDE_KV_TILE), Some(with_kv(0)))
            }
            sm => {
                why.push(format!(
                    "K/V tile {} keys: the {WIDE_KV_TILE}-key tile is offered here, but {}",
                    narrow.kv_tile,
                    if sm.is_some() {
                        "two CTAs of it do not fit this SM (one alone would hide no latency)"
                    } else {
                        "no SM was described to tell whether two CTAs of it fit"
                    }
                ));
                (narrow, with_kv(0), None)
            }
        }
    } else {
        why.push(format!(
            "K/V tile {} keys: {}",
            narrow.kv_tile,
            if hd >= 128 {
                "two stages of K and V and the Q tile stay within an sm_80 SM's shared memory"
            } else {
                "at head dim 64 a 64-key tile is as small in bytes as 32 keys of head dim 128"
            }
        ));
        (narrow, with_kv(0), None)
    };

    // Warps along the keys: the 16-row tile has a one-warp and a two-warp form.
    let (shape, instance, fallback) = match cta_tile_q {
        16 => {
            let (kv_warps, reason) = choose_kv_warps(x);
            why.push(reason);
            if kv_warps > 1 {
                let two = Shape::new(hd, 16, narrow.kv_tile, kv_warps);
                // A variant whose two-warp build spills runs the one-warp form.
                (
                    two,
                    InstanceTiles {
                        kv_warps,
                        ..instance
                    },
                    Some(instance),
                )
            } else {
                (shape, instance, fallback)
            }
        }
        _ => (shape, instance, fallback),
    };
    if shape.kv_warps > 1 {
        why.push(format!(
            "{} warps along the keys of the 16 rows: each computes S and the softmax over its own \
             {} keys of every {}-key K/V tile, so a CTA keeps {} times the K/V bytes of one warp \
             in flight; their states merge in shared memory at the end",
            shape.kv_warps,
            shape.kv_tile,
            shape.cta_kv_tile(),
            shape.kv_warps
        ));
    } else {
        why.push(format!(
            "{} warps: one per 16 query rows, at most {PREFILL_WARPS} (two row blocks each) \
             except at head dim 256, where two blocks' f32 accumulators would not fit the \
             registers",
            shape.warps
        ));
    }
    why.push(format!(
        "{STAGES} stages: the next K/V tile loads (cp.async) while this one is computed"
    ));
    let ctas_per_sm = x.sm.map(|sm| {
        let n = sm.resident_ctas(shape.warps * WARP, shape.shared_bytes, MAX_REGISTERS);
        why.push(format!(
            "{n} CTAs per SM: resident with {} B of shared memory and {MAX_REGISTERS} registers \
             a thread (the most a variant may take; the plan is made before the variant is known)",
            shape.shared_bytes
        ));
        n
    });
    let alternative = x
        .sm
        .filter(|_| offers_narrow_kv_tile(hd, cta_tile_q, shape.kv_warps) && !x.batch_invariant)
        .map(|sm| Box::new(narrow_tiles(hd, instance, sm)));
    Tiles {
        cta_tile_q,
        kv_tile: shape.cta_kv_tile(),
        threads: shape.warps * WARP,
        stages: STAGES,
        shared_bytes: shape.shared_bytes,
        ctas_per_sm,
        instance,
        fallback,
        alternative,
        reasons: why,
    }
}

/// The narrow form of the one-warp 16-row tile `instance`, which the plan may run instead
/// ([`Tiles::alternative`]); a variant whose build of it spills runs `instance`.
fn narrow_tiles(hd: u32, instance: InstanceTiles, sm: &dyn SmResidency) -> Tiles {
    let shape = Shape::new(hd, 16, NARROW_KV_TILE, 1);
    let n = sm.resident_ctas(WARP, shape.shared_bytes, MAX_REGISTERS);
    Tiles {
        cta_tile_q: 16,
        kv_tile: NARROW_KV_TILE,
        threads: WARP,
        stages: STAGES,
        shared_bytes: shape.shared_bytes,
        ctas_per_sm: Some(n),
        instance: InstanceTiles {
            kv_tile: NARROW_KV_TILE,
            ..instance
        },
        fallback: Some(instance),
        alternative: None,
        reasons: vec![format!(
            "K/V tile {NARROW_KV_TILE} keys (the narrow form): {} B of shared memory, {n} CTAs per \
             SM",
            shape.shared_bytes
        )],
    }
}

/// Each query tile (16, 64, 128) of each head dim and dtype, each followed by its wide-K/V-tile
/// or two-warp instance where the tile function may choose it on SMs like `sm`, and on sm_90a by
/// its FA3 forms where it has them (the long prompts' one too at head dim 128).
fn instances(arch: ArchClass, sm: &dyn SmResidency) -> Vec<KernelConfig> {
    let mut all = FAMILY.each_instance(arch, &[16, 64, 128], |cfg| {
        let wide = wide_kv_tile(cfg).filter(|w| wide_kv_tile_pays(&Shape::of(w), sm));
        let two = two_kv_warps(cfg)
            .filter(|_| two_kv_warps_fit(short_tile_residency(cfg.head_dim_qk, sm)));
        wide.into_iter()
            .chain(two)
            .chain(narrow_kv_tile(cfg))
            .collect()
    });
    let sm90: Vec<_> = all
        .iter()
        .filter(|c| c.kv_tile == 0)
        .flat_map(|c| sm90_form(c).into_iter().chain(sm90_long_form(c)))
        .collect();
    all.extend(sm90);
    all
}

/// `TILE_Q, TILE_KV` of the FA2 template, then `KV_WARPS` where there are two warps along the
/// keys (the other instances keep the default, 1, and their source); the FA3 template's `KV`.
fn template_args(cfg: &KernelConfig) -> String {
    if is_sm90(cfg) {
        return format!(", {}", cfg.kv_tile);
    }
    match Shape::of(cfg).kv_warps {
        1 => format!(", {}, {}", tile_q(cfg), kv_tile(cfg)),
        n => format!(", {}, {}, {n}", tile_q(cfg), kv_tile(cfg)),
    }
}

fn launch_bounds(cfg: &KernelConfig) -> &'static str {
    let s = Shape::of(cfg);
    if s.kv_warps > 1 {
        // Two warps along the keys: at most three CTAs an SM fit their shared memory whatever
        // the registers, so the bounds ask for one and leave ptxas every register (with the
        // thread count alone it capped the four-warp form's at 96-128, and spilled).
        return "64, 1";
    }
    match s.warps {
        1 => "32",
        4 => "128",
        8 => "256",
        // One CTA an SM: setmaxnreg moves registers within it (ptxas keeps it only then).
        _ => "384, 1",
    }
}

/// One CTA per work item (the plan's padded length); an empty work list still gets one CTA,
/// which finds no valid item and returns (a zero grid would not launch). The sm_90a template is
/// persistent: one CTA an SM (its shared memory allows no second), each taking one item of every
/// `grid` of the list (a snake over the longest-first order).
fn launch_dims(cfg: &KernelConfig, args: &AttnArgs) -> LaunchDims {
    let s = Shape::of(cfg);
    let ctas = if is_sm90(cfg) && args.num_sms > 0 {
        args.num_items.min(args.num_sms)
    } else {
        args.num_items
    };
    LaunchDims {
        grid: [ctas.max(1), 1, 1],
        block: [s.warps * WARP, 1, 1],
        shared_bytes: s.shared_bytes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DType;

    fn cfg(head_dim: u32, cta_tile_q: u32) -> KernelConfig {
        KernelConfig::new(KernelKind::Prefill, head_dim, DType::Bf16, ArchClass::Sm80).with_tiles(
            InstanceTiles {
                cta_tile_q,
                kv_tile: 0,
                kv_warps: 0,
            },
        )
    }

    /// The 16-row tile with two warps along the keys.
    fn two(head_dim: u32) -> KernelConfig {
        two_kv_warps(&cfg(head_dim, 16)).expect("offered at the 16-row tile")
    }

    fn warps(cfg: &KernelConfig) -> u32 {
        Shape::of(cfg).warps
    }

    #[test]
    fn the_wide_kv_tile_is_offered_at_the_long_prompt_tile_of_head_dim_128() {
        let wide = wide_kv_tile(&cfg(128, 128)).expect("offered");
        assert_eq!(wide.kv_tile, 64);
        assert_eq!(
            launch_dims(&wide, &AttnArgs::default()).shared_bytes,
            98304 + 1536 + 72
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
            ([300, 1, 1], [128, 1, 1], 65536 + 768 + 72)
        );
        // The 16-row tile: one warp, two stages of 32 keys; with two warps along the keys, two
        // stages of two 32-key slices.
        let d = launch_dims(&cfg(128, 16), &args);
        assert_eq!((d.block, d.shared_bytes), ([32, 1, 1], 36864 + 768 + 72));
        let d = launch_dims(&two(128), &args);
        assert_eq!(
            (d.block, d.shared_bytes),
            ([64, 1, 1], (16 + 2 * 2 * 64) * 256 + 2 * 64 * 12 + 72)
        );
        let d = launch_dims(&cfg(64, 128), &args);
        assert_eq!(d.shared_bytes, 49152 + 1536 + 72);
        let d = launch_dims(&cfg(256, 128), &args);
        assert_eq!((d.block, d.shared_bytes), ([256, 1, 1], 131072 + 768 + 72));
        let d = launch_dims(&cfg(256, 0), &AttnArgs::default());
        assert_eq!((d.grid, d.block), ([1, 1, 1], [128, 1, 1]));
        for hd in crate::HEAD_DIMS {
            for tile in [0, 16, 64, 128] {
                // One warp along the keys: the launch bounds and template arguments of the
                // template without them.
                let c = cfg(hd, tile);
                assert_eq!(Shape::of(&c).kv_warps, 1);
                assert_eq!(launch_bounds(&c), (warps(&c) * WARP).to_string());
                assert_eq!(
                    template_args(&c),
                    format!(", {}, {}", tile_q(&c), kv_tile(&c))
                );
                // Within the opt-in shared memory of an sm_80 SM (163 KiB).
                assert!(launch_dims(&c, &AttnArgs::default()).shared_bytes <= 163 * 1024);
                // Two warps: the 16-row tile only.
                assert_eq!(two_kv_warps(&c).is_some(), tile == 16, "{}", c.name());
            }
            let c = two(hd);
            assert_eq!(launch_bounds(&c), "64, 1");
            assert_eq!(template_args(&c), format!(", 16, {}, 2", kv_tile(&c)));
            assert!(launch_dims(&c, &AttnArgs::default()).shared_bytes <= 163 * 1024);
        }
    }

    #[test]
    fn the_16_row_tile_has_a_one_and_a_two_warp_form() {
        // (head dim, keys a warp, shared bytes with one warp, with two): the Q tile, two stages
        // of K and V of one or two slices, the offset and id tables, PrefillCta.
        let shapes = [
            (64, 64, (16 + 4 * 64) * 128 + 2 * 64 * 12 + 72, 70_728),
            (128, 32, 37_704, (16 + 4 * 64) * 256 + 2 * 64 * 12 + 72),
            (256, 32, 74_568, (16 + 4 * 64) * 512 + 2 * 64 * 12 + 72),
        ];
        for (hd, kv_tile, one_bytes, two_bytes) in shapes {
            let one = Shape::of(&cfg(hd, 16));
            assert_eq!((one.kv_warps, one.kv_tile, one.warps), (1, kv_tile, 1));
            assert_eq!((one.cta_kv_tile(), one.shared_bytes), (kv_tile, one_bytes));
            let c = two(hd);
            assert_eq!(c.name(), format!("prefill_hd{hd}_bf16_q16_kw2"));
            let s = Shape::of(&c);
            assert_eq!((s.kv_warps, s.kv_tile, s.warps), (2, kv_tile, 2));
            assert_eq!((s.cta_kv_tile(), s.shared_bytes), (2 * kv_tile, two_bytes));
            assert_eq!(FAMILY.check(&c), Ok(()));
            // The two-warp form has no two-warp form of its own.
            assert_eq!(two_kv_warps(&c), None);
        }
        // Two warps elsewhere are refused, naming the tile; four do not exist.
        for bad in [
            KernelConfig {
                kv_warps: 2,
                ..cfg(128, 64)
            },
            KernelConfig {
                kv_warps: 2,
                ..sm90_form(&sm90a(128, 128, 0)).unwrap()
            },
        ] {
            let e = FAMILY.check(&bad).unwrap_err();
            assert!(e.contains("16-row query tile only"), "{e}");
        }
        let e = FAMILY
            .check(&KernelConfig {
                kv_warps: 4,
                ..cfg(128, 16)
            })
            .unwrap_err();
        assert!(e.contains("4 warps along the keys"), "{e}");
        // Residency of the two forms: an H200 SM holds six one-warp CTAs or three two-warp ones
        // at head dims 64 and 128 (as many warps), but at 256 three against one.
        let hopper = Sm(228 * 1024);
        assert_eq!(short_tile_residency(64, &hopper), (6, 3));
        assert_eq!(short_tile_residency(128, &hopper), (6, 3));
        assert_eq!(short_tile_residency(256, &hopper), (3, 1));
        let fit = |hd| two_kv_warps_fit(short_tile_residency(hd, &hopper));
        assert!(fit(128) && !fit(256));
        let a100 = Sm(164 * 1024);
        assert_eq!(short_tile_residency(128, &a100), (4, 2));
        assert_eq!(short_tile_residency(256, &a100), (2, 1));
    }

    /// Tiles of a decode batch on an H200 (132 SMs like [`Sm`] of 228 KiB): `items` work items
    /// at the 16-row tile, head dim `hd`.
    fn decode_tiles(items: u64, hd: u32, change: impl Fn(&mut TileInput<'_>)) -> Tiles {
        let hopper = Sm(228 * 1024);
        let work_items = |tile: u32| {
            assert_eq!(tile, 16, "asked only at the 16-row tile");
            items
        };
        let mut x = TileInput {
            one_row_per_request: true,
            head_dim_qk: hd,
            head_dim_vo: hd,
            num_sms: 132,
            work_items: &work_items,
            ..input(4 * items, items, Some(&hopper))
        };
        change(&mut x);
        tiles(&x)
    }

    #[test]
    fn the_one_warp_16_row_tile_offers_its_narrow_form_to_the_plan() {
        // GQA 4, b64: one warp; the plan may take the narrow form: eight CTAs an H200 SM as the
        // plan counts (255 registers a thread, what a variant may take; its shared memory alone
        // would allow ten).
        let t = decode_tiles(512, 128, |_| {});
        assert_eq!((t.kv_tile, t.ctas_per_sm), (32, Some(6)));
        let alt = t.alternative.as_deref().expect("a narrow alternative");
        assert_eq!(
            (
                alt.cta_tile_q,
                alt.kv_tile,
                alt.threads,
                alt.shared_bytes,
                alt.ctas_per_sm
            ),
            (16, NARROW_KV_TILE, 32, 20_936, Some(8))
        );
        assert_eq!(alt.instance.kv_tile, NARROW_KV_TILE);
        assert_eq!(alt.fallback, Some(t.instance));
        assert!(alt.alternative.is_none());
        assert_eq!(FAMILY.check(&alt.config(sm90a(128, 16, 0))), Ok(()));
        // None for two warps (MHA over two waves), in batch-invariant mode, or without an SM.
        let two = decode_tiles(8192, 128, |x| x.group_size = 1);
        assert_eq!(two.instance.kv_warps, SHORT_TILE_KV_WARPS);
        assert!(two.alternative.is_none());
        assert!(
            decode_tiles(512, 128, |x| x.batch_invariant = true)
                .alternative
                .is_none()
        );
        assert!(
            decode_tiles(512, 128, |x| x.sm = None)
                .alternative
                .is_none()
        );
        // None at head dims 64 and 256.
        assert!(decode_tiles(512, 64, |_| {}).alternative.is_none());
        assert!(decode_tiles(512, 256, |_| {}).alternative.is_none());
        // The narrow tile is the one-warp 16-row tile's only, at head dim 128.
        for (hd, tile, kv_warps) in [
            (128, 64, 0),
            (128, 128, 0),
            (128, 16, SHORT_TILE_KV_WARPS),
            (64, 16, 0),
            (256, 16, 0),
        ] {
            let cfg = KernelConfig {
                kv_warps,
                ..sm90a(hd, tile, NARROW_KV_TILE)
            };
            let cfg = KernelConfig {
                arch: ArchClass::Sm80,
                ..cfg
            };
            assert!(FAMILY.check(&cfg).is_err(), "{}", cfg.name());
        }
    }

    #[test]
    fn the_16_row_tile_takes_two_warps_along_the_keys_for_small_groups_and_pages_over_waves() {
        let one_warp = |t: &Tiles| {
            (
                t.cta_tile_q,
                t.kv_tile,
                t.threads,
                t.shared_bytes,
                t.ctas_per_sm,
            ) == (16, 32, 32, 37_704, Some(6))
                && t.instance.kv_warps == 0
                && t.fallback.is_none()
        };
        let two_warps = |t: &Tiles| {
            (
                t.cta_tile_q,
                t.kv_tile,
                t.threads,
                t.shared_bytes,
                t.ctas_per_sm,
            ) == (16, 64, 64, 71_240, Some(3))
                && t.instance
                    == InstanceTiles {
                        cta_tile_q: 16,
                        kv_tile: 0,
                        kv_warps: 2,
                    }
                && t.fallback
                    == Some(InstanceTiles {
                        cta_tile_q: 16,
                        kv_tile: 0,
                        kv_warps: 0,
                    })
        };
        // A wave of two-warp CTAs on an H200 is 132 x 3 = 396 items, two are 792. The measured
        // batches (`choose_kv_warps`): MHA 64 x 4096 (2048 items) and page size 1 128 x 1024
        // (1024): two warps; group 4 over pages of 16 at 2048 and 512 items: one; at 128 items
        // (16 x 32768, under a wave): two.
        let mha = |x: &mut TileInput<'_>| x.group_size = 1;
        for (items, two) in [
            (2048, true),
            (1024, true),
            (792, true),
            (791, false),
            (512, false),
            (396, false),
            (395, true),
            (128, true),
        ] {
            let t = decode_tiles(items, 128, mha);
            assert!(
                if two { two_warps(&t) } else { one_warp(&t) },
                "{items}: {t}"
            );
            assert_eq!(t.reasons.len(), 6, "{t}");
            let warps = if two {
                "2 warps along the keys"
            } else {
                "1 warp along the keys"
            };
            assert!(t.to_string().contains(warps), "{t}");
        }
        // Pages of one key likewise; groups of 2 and more over larger pages or a ragged cache
        // keep one warp at any size.
        let group = |g: u32, page: Option<u32>| {
            move |x: &mut TileInput<'_>| {
                x.group_size = g;
                x.page_size = page;
            }
        };
        assert!(one_warp(&decode_tiles(1024, 128, group(2, Some(16)))));
        assert!(two_warps(&decode_tiles(1024, 128, group(4, Some(1)))));
        assert!(one_warp(&decode_tiles(512, 128, group(4, Some(1)))));
        for page in [Some(16), Some(2), None] {
            let t = decode_tiles(2048, 128, group(4, page));
            assert!(one_warp(&t), "{t}");
            assert!(
                t.to_string().contains("one-warp CTAs streamed faster"),
                "{t}"
            );
        }
        assert!(one_warp(&decode_tiles(1 << 20, 128, group(8, Some(16)))));
        // Under a wave of two-warp CTAs the plan splits the keys either way: two, at any group.
        for g in [2, 4, 8] {
            let t = decode_tiles(128, 128, group(g, Some(16)));
            assert!(two_warps(&t), "{t}");
            assert!(t.to_string().contains("under a wave of 396"), "{t}");
        }
        assert!(one_warp(&decode_tiles(396, 128, group(4, None))));
        // Head dim 64 likewise; at 256 an SM holds one two-warp CTA against three: one warp.
        assert!(decode_tiles(2048, 64, mha).instance.kv_warps == 2);
        let t = decode_tiles(1 << 20, 256, mha);
        assert_eq!(
            (t.instance.kv_warps, t.threads, t.ctas_per_sm),
            (0, 32, Some(3))
        );
        assert!(t.to_string().contains("fewer keys in flight"), "{t}");
        // An SM of 100 KiB (sm_86, sm_89) holds one one-warp CTA at 256 (75 KB) and no two-warp
        // one (141 KB): one warp, not a CTA that cannot launch.
        let small = Sm(100 * 1024);
        let work_items = |_: u32| 1u64 << 20;
        let t = tiles(&TileInput {
            one_row_per_request: true,
            head_dim_qk: 256,
            head_dim_vo: 256,
            num_sms: 132,
            work_items: &work_items,
            group_size: 1,
            ..input(1 << 20, 1 << 20, Some(&small))
        });
        assert_eq!(
            (t.instance.kv_warps, t.threads, t.ctas_per_sm),
            (0, 32, Some(1))
        );
        assert!(t.to_string().contains("holds 0 CTAs of 2 warps"), "{t}");
        // Batch-invariant, or no SM described: one warp, whatever the grid.
        let t = decode_tiles(1 << 20, 128, |x| {
            x.group_size = 1;
            x.batch_invariant = true;
        });
        assert!(one_warp(&t), "{t}");
        let t = decode_tiles(1 << 20, 128, |x| {
            x.group_size = 1;
            x.sm = None;
        });
        assert_eq!(
            (t.instance.kv_warps, t.threads, t.ctas_per_sm),
            (0, 32, None)
        );
        // A caller's count wins, also at head dim 256 and in batch-invariant mode.
        assert!(two_warps(&decode_tiles(1, 128, |x| x.kv_warps = Some(2))));
        assert!(one_warp(
            &decode_tiles(1 << 20, 128, |x| x.kv_warps = Some(1))
        ));
        let t = decode_tiles(1, 256, |x| {
            x.kv_warps = Some(2);
            x.batch_invariant = true;
        });
        assert_eq!(
            (t.instance.kv_warps, t.threads, t.ctas_per_sm),
            (2, 64, Some(1))
        );
        assert!(t.to_string().contains("fixed by the caller"), "{t}");
        // The longer tiles have one warp along the keys whatever the caller asks.
        let t = tiles(&TileInput {
            kv_warps: Some(2),
            ..input(8192 * 4, 1, Some(&Sm(228 * 1024)))
        });
        assert_eq!((t.cta_tile_q, t.instance.kv_warps), (128, 0));
    }

    /// An SM with `shared` bytes of shared memory, 1 KiB reserved per CTA, 64 Ki registers.
    struct Sm(u32);

    impl SmResidency for Sm {
        fn resident_ctas(&self, threads: u32, shared: u32, regs: u32) -> u32 {
            let per_warp = (regs * 32).div_ceil(256) * 256;
            let by_registers = 65_536 / (per_warp * threads.div_ceil(32)).max(1);
            (self.0 / (shared + 1024)).min(by_registers).max(1)
        }
        fn fits(&self, shared: u32) -> bool {
            shared + 1024 <= self.0
        }
    }

    fn input(packed_rows: u64, requests: u64, sm: Option<&dyn SmResidency>) -> TileInput<'_> {
        TileInput {
            packed_rows,
            requests,
            group_size: 4,
            page_size: None,
            head_dim_qk: 128,
            head_dim_vo: 128,
            sm,
            num_sms: 132,
            work_items: &|_| 0,
            batch_invariant: false,
            one_row_per_request: false,
            query_tile: None,
            kv_warps: None,
        }
    }

    #[test]
    fn the_tile_function_reports_every_parameter_and_why() {
        let hopper = Sm(228 * 1024);
        let t = tiles(&input(8192 * 4, 1, Some(&hopper)));
        assert_eq!(
            (t.cta_tile_q, t.kv_tile, t.threads, t.stages),
            (128, 64, 128, 2)
        );
        assert_eq!(t.shared_bytes, 98304 + 1536 + 72);
        assert_eq!(t.ctas_per_sm, Some(2));
        assert_eq!(
            (t.instance, t.fallback),
            (
                InstanceTiles {
                    cta_tile_q: 128,
                    kv_tile: 64,
                    kv_warps: 0,
                },
                Some(InstanceTiles {
                    cta_tile_q: 128,
                    kv_tile: 0,
                    kv_warps: 0,
                })
            )
        );
        assert_eq!(t.reasons.len(), 5, "{t}");
        // An A100 SM holds one CTA of the wide tile: it keeps 32 keys.
        let a100 = Sm(164 * 1024);
        let t = tiles(&input(8192 * 4, 1, Some(&a100)));
        assert_eq!((t.kv_tile, t.fallback, t.ctas_per_sm), (32, None, Some(2)));
        // Without an SM: no occupancy, the narrow tile.
        let t = tiles(&input(8192 * 4, 1, None));
        assert_eq!((t.kv_tile, t.ctas_per_sm), (32, None));
        // Decode rows on tensor cores: the group's tile, whatever the batch.
        let t = tiles(&TileInput {
            one_row_per_request: true,
            ..input(8192 * 4, 1, None)
        });
        assert_eq!((t.cta_tile_q, t.threads, t.kv_tile), (16, 32, 32));
        // Batch-invariant: the long-prompt tile; a caller's tile wins over both.
        let t = tiles(&TileInput {
            batch_invariant: true,
            ..input(4, 1, None)
        });
        assert_eq!(t.cta_tile_q, 128);
        let t = tiles(&TileInput {
            batch_invariant: true,
            query_tile: Some(64),
            ..input(4, 1, None)
        });
        assert_eq!(t.cta_tile_q, 64);
    }

    #[test]
    fn instances_add_the_wide_tile_where_two_ctas_fit_and_the_fa3_form_on_hopper() {
        let hopper = instances(ArchClass::Sm90a, &Sm(228 * 1024));
        let a100 = instances(ArchClass::Sm80, &Sm(164 * 1024));
        // 18 FA2 tiles, the two-warp 16-row tile where it keeps as many warps an SM (Hopper:
        // head dims 64 and 128; A100: every head dim), the narrow 16-row tile of head dim 128
        // (both dtypes), the 64-key tile of both dtypes, and the FA3 form of each head dim and
        // dtype, with the long prompts' form at head dim 128.
        assert_eq!(
            (a100.len(), hopper.len()),
            (18 + 6 + 2, 18 + 4 + 2 + 2 + 6 + 2)
        );
        let narrow = |c: &&KernelConfig| c.kv_tile == NARROW_KV_TILE;
        assert!(
            hopper
                .iter()
                .chain(&a100)
                .filter(narrow)
                .all(|c| c.cta_tile_q == 16
                    && c.kv_warps == 0
                    && narrow_kv_tile(&KernelConfig { kv_tile: 0, ..*c }) == Some(*c))
        );
        let kw2 = |c: &&KernelConfig| c.kv_warps == 2;
        assert!(hopper.iter().filter(kw2).all(|c| c.head_dim_qk < 256));
        assert_eq!(a100.iter().filter(kw2).count(), 6);
        assert!(
            hopper
                .iter()
                .chain(&a100)
                .filter(kw2)
                .all(|c| c.cta_tile_q == 16)
        );
        assert!(hopper.iter().all(|c| c.arch == ArchClass::Sm90a));
        for c in hopper.iter().chain(&a100) {
            assert_eq!(FAMILY.check(c), Ok(()), "{}", c.name());
        }
        let fa3: Vec<_> = hopper.iter().filter(|c| is_sm90(c)).collect();
        assert_eq!(fa3.len(), 8);
        assert_eq!(fa3.iter().filter(|c| is_sm90_long(c)).count(), 2);
        for hd in crate::HEAD_DIMS {
            let at: Vec<_> = fa3
                .iter()
                .filter(|c| c.head_dim_qk == hd && !is_sm90_long(c))
                .collect();
            assert_eq!(at.len(), 2, "both dtypes at head dim {hd}");
            assert!(at.iter().all(|c| c.cta_tile_q == 128
                && Some(c.kv_tile) == sm90_kv_tile(hd)
                && sm90_form(c) == Some(***c)));
            let long = fa3
                .iter()
                .filter(|c| c.head_dim_qk == hd && is_sm90_long(c));
            assert_eq!(long.count(), if hd == 128 { 2 } else { 0 });
        }
        // No FA2 instance is taken for the FA3 template, and every name is its own.
        assert!(a100.iter().all(|c| !is_sm90(c)));
        let mut names: Vec<_> = hopper.iter().map(|c| c.name()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), hopper.len());
    }

    fn sm90a(hd: u32, tile: u32, kv_tile: u32) -> KernelConfig {
        KernelConfig::new(KernelKind::Prefill, hd, DType::Bf16, ArchClass::Sm90a).with_tiles(
            InstanceTiles {
                cta_tile_q: tile,
                kv_tile,
                kv_warps: 0,
            },
        )
    }

    #[test]
    fn the_fa3_form_exists_on_hopper_at_the_128_row_tile_of_every_head_dim() {
        // (head dim, name, K/V tile, shared bytes: Q and the stages of K and V, the two offset
        // slots, the mbarriers, the item slots of 128 bytes).
        // At head dim 64 two Q slots and three stages of 128-key K and V (sixteen barriers, four
        // item slots); at 128 one Q slot and three stages (fourteen, three); at 256 one Q slot
        // (64 KiB) and two stages of 64-key K and V (32 KiB each; ten, three).
        let forms = [
            (
                64,
                "prefill_hd64_bf16_q128_k128_sm90a",
                128,
                8 * 16_384 + 2048 + 128 + 4 * 128,
            ),
            (
                128,
                "prefill_hd128_bf16_q128_k128_sm90a",
                128,
                7 * 32_768 + 2048 + 112 + 3 * 128,
            ),
            (
                256,
                "prefill_hd256_bf16_q128_k64_sm90a",
                64,
                65_536 + 4 * 32_768 + 1024 + 80 + 3 * 128,
            ),
        ];
        for (hd, name, kv_tile, shared) in forms {
            let fa3 = sm90_form(&sm90a(hd, 128, 0)).unwrap();
            assert_eq!(fa3.name(), name);
            assert_eq!(fa3.kv_tile, kv_tile);
            assert!(is_sm90(&fa3));
            // From the tile left open where that means 128 rows (64 at head dim 256), from an
            // FA2 K/V tile, and from itself.
            let open = sm90_form(&sm90a(hd, 0, 0));
            assert_eq!(open, (hd < 256).then_some(fa3));
            assert_eq!(sm90_form(&sm90a(hd, 128, 32)), Some(fa3));
            assert_eq!(sm90_form(&fa3), Some(fa3));
            assert_eq!(FAMILY.check(&fa3), Ok(()));
            let d = launch_dims(&fa3, &AttnArgs::default());
            assert_eq!((d.block, d.shared_bytes), ([384, 1, 1], shared), "{name}");
            // Within an H100/H200 SM's opt-in shared memory (227 KiB).
            assert!(shared <= 227 * 1024, "{name}: {shared}");
            assert_eq!(launch_bounds(&fa3), "384, 1");
            assert_eq!(template_args(&fa3), format!(", {kv_tile}"));
            assert_eq!((FAMILY.header)(&fa3), "attention/prefill_sm90.cuh");
            assert_eq!((FAMILY.function)(&fa3), "fi::prefill_sm90");
            // Another arch, a shorter tile, unequal head dims or a K/V type: no form.
            for other in [
                KernelConfig {
                    arch: ArchClass::Sm80,
                    ..sm90a(hd, 128, 0)
                },
                sm90a(hd, 64, 0),
                sm90a(hd, 16, 0),
                sm90a(hd, 128, 0).with_head_dims(hd, 128.min(hd / 2)),
                sm90a(hd, 128, 0).with_kv_dtype(DType::F16),
            ] {
                assert_eq!(sm90_form(&other), None, "{}", other.name());
            }
            // The FA3 tile elsewhere is refused, naming the tile and the head dim.
            for bad in [
                KernelConfig {
                    arch: ArchClass::Sm80,
                    ..fa3
                },
                sm90a(hd, 64, kv_tile),
            ] {
                let e = FAMILY.check(&bad).unwrap_err();
                assert!(
                    e.contains("sm_90a") && e.contains(&format!("head dim {hd}")),
                    "{e}"
                );
            }
        }
        // Persistent: at most one CTA an SM; without the SM count, one an item. FA2 stays one CTA
        // an item.
        let fa3 = sm90_form(&sm90a(128, 128, 0)).unwrap();
        let args = |num_items, num_sms| AttnArgs {
            num_items,
            num_sms,
            ..AttnArgs::default()
        };
        assert_eq!(launch_dims(&fa3, &AttnArgs::default()).grid, [1, 1, 1]);
        assert_eq!(launch_dims(&fa3, &args(300, 132)).grid, [132, 1, 1]);
        assert_eq!(launch_dims(&fa3, &args(100, 132)).grid, [100, 1, 1]);
        assert_eq!(launch_dims(&fa3, &args(300, 0)).grid, [300, 1, 1]);
        assert_eq!(
            launch_dims(&sm90a(128, 128, 0), &args(300, 132)).grid,
            [300, 1, 1]
        );
        assert_eq!(sm90_form(&sm90a(96, 128, 0)), None);
        // The long prompts' form at head dim 128: one Q slot and two stages of 176-key K and V
        // (44 KiB each; ten barriers, three item slots), under the opt-in 227 KiB.
        let long = sm90_long_form(&sm90a(128, 128, 0)).unwrap();
        assert_eq!(long.name(), "prefill_hd128_bf16_q128_k176_sm90a");
        assert!(is_sm90(&long) && is_sm90_long(&long) && !is_sm90_long(&fa3));
        assert_eq!(FAMILY.check(&long), Ok(()));
        let shared = 32_768 + 4 * 45_056 + 2 * 176 * 8 + 80 + 3 * 128;
        assert_eq!(launch_dims(&long, &args(300, 132)).shared_bytes, shared);
        assert!(shared <= 227 * 1024);
        assert_eq!(template_args(&long), ", 176");
        assert_eq!(sm90_long_form(&fa3), Some(long));
        assert_eq!(sm90_long_form(&sm90a(128, 64, 0)), None);
        // Elsewhere the 176-key tile is refused: the 64-row tile, head dim 64, sm_80.
        for bad in [
            sm90a(128, 64, 176),
            sm90a(64, 128, 176),
            KernelConfig {
                arch: ArchClass::Sm80,
                ..long
            },
        ] {
            assert!(FAMILY.check(&bad).is_err(), "{}", bad.name());
        }
        // FA2 keeps its tiles: 64 keys at head dims 64 and 128 is FA2's, 128 keys at head dim
        // 256 is nobody's.
        assert!(!is_sm90(&sm90a(128, 128, 64)));
        assert_eq!(FAMILY.check(&sm90a(128, 128, 64)), Ok(()));
        assert_eq!(FAMILY.check(&sm90a(64, 64, 64)), Ok(()));
        let e = FAMILY.check(&sm90a(256, 64, 128)).unwrap_err();
        assert!(e.contains("128-key") && e.contains("64 on sm_90a"), "{e}");
    }
}
