//! The RoPE kernel (`cuda/ops/rope.cuh`): its arguments, translation units and launch geometry.
//! One kernel serves RoPE on q and k, KV append (k and v copied into a paged cache) and the fused
//! RoPE + append: three families of heads (q, k, v), each rotated or copied, k and v written
//! contiguously or to cache slots (`cuda/ops/kv_append.cuh`).

use crate::config::{DType, LaunchDims};
use crate::sources::Sources;
use crate::tu::{TranslationUnit, cuda_dtype};

/// Arguments of the RoPE kernel, passed by value; mirrors `fi::RopeArgs`. Pointers are device
/// addresses (0 for none), strides count elements. Family 0 is q, 1 is k, 2 is v.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RopeArgs {
    /// Sources of each family: token `t`'s heads at `t * src_row[f]`, `head_dim` apart.
    pub src: [u64; 3],
    /// Destinations: q in rows; k and v in rows or the cache (see `slot_mode`). May equal `src`
    /// (in place).
    pub dst: [u64; 3],
    /// Elements between consecutive tokens of each source (`heads[f] * head_dim` when dense).
    pub src_row: [u64; 3],
    /// Elements between consecutive tokens of each row destination (unused for a cached k or v).
    pub dst_row: [u64; 3],
    /// `[tokens]` i32 positions (`pos_mode` 0, and the positions of `slot_mode` 2).
    pub positions: u64,
    /// `[batch + 1]` i32 token ranges of the requests (`pos_mode` 1).
    pub indptr: u64,
    /// `[batch]` i32 position of each request's first token (`pos_mode` 1).
    pub offsets: u64,
    /// f32 `[max_position, rotary_dim]`: cos of pair j at column j, sin at `rotary_dim / 2 + j`;
    /// 0 to compute the angles.
    pub cos_sin: u64,
    /// `[tokens]` u64 element offset of head 0 of each token's cache slot (`slot_mode` 1).
    pub slots: u64,
    /// `[tokens]` i32 request of each token (`slot_mode` 2).
    pub batch_indices: u64,
    /// `[batch + 1]` i32 page ranges (`slot_mode` 2).
    pub kv_indptr: u64,
    /// `[num_kv_indices]` i32 page ids (`slot_mode` 2).
    pub kv_indices: u64,
    /// `[batch]` i32 tokens in each request's last page (`slot_mode` 2).
    pub kv_last_page_len: u64,
    /// Cache elements between pages (`slot_mode` 2).
    pub kv_page_stride: u64,
    /// Cache elements between the tokens of a page (`slot_mode` 2).
    pub kv_token_stride: u64,
    /// Cache elements between KV heads (`slot_mode` 1 and 2).
    pub kv_head_stride: u64,
    /// `ln(theta)`.
    pub ln_theta: f64,
    /// `1 / linear position scale`.
    pub rcp_scale: f64,
    /// Llama 3.1: `1 / factor` (1 without it).
    pub rcp_factor: f64,
    /// Llama 3.1: `smooth = clamp(f * smooth_a + smooth_b, 0, 1)` (0 without it).
    pub smooth_a: f64,
    /// Llama 3.1 (1 without it, so that every frequency is kept).
    pub smooth_b: f64,
    /// Tokens (rows of every family).
    pub tokens: u32,
    /// Heads of q, k and v (0 for an absent family).
    pub heads: [u32; 3],
    /// Elements per head.
    pub head_dim: u32,
    /// Rotated dims (even, at most `head_dim`); 0 rotates nothing.
    pub rotary_dim: u32,
    /// Bit f set: family f is rotated (else copied).
    pub rotate_mask: u32,
    /// 0: `positions`; 1: `indptr` and `offsets`.
    pub pos_mode: u32,
    /// 0: k and v contiguous; 1: `slots`; 2: the page table.
    pub slot_mode: u32,
    /// Requests of `indptr` (`pos_mode` 1) or of the page table (`slot_mode` 2).
    pub batch: u32,
    /// Rows of `cos_sin`.
    pub max_position: u32,
    /// Tokens per page (`slot_mode` 2).
    pub page_size: u32,
    /// Pages of the cache (`slot_mode` 2).
    pub num_pages: u32,
    /// Entries of `kv_indices` (`slot_mode` 2).
    pub num_kv_indices: u32,
    /// Heads each thread walks (at least 1); see [`rope_heads_per_thread`].
    pub heads_per_thread: u32,
    /// Padding to 8 bytes.
    pub pad: u32,
}

/// `slot_mode`: k and v written `[tokens, heads, head_dim]`.
pub const SLOT_CONTIGUOUS: u32 = 0;
/// `slot_mode`: k and v written at `slots[t] + head * kv_head_stride`.
pub const SLOT_PLANNED: u32 = 1;
/// `slot_mode`: k and v written where the page table puts `(batch_indices[t], positions[t])`;
/// out-of-range tokens are skipped.
pub const SLOT_EXPLICIT: u32 = 2;

/// Pairs per thread chunk the kernel is instantiated for, widest first (8 x 16 bits = 16 bytes).
pub const ROPE_VEC_WIDTHS: [u32; 4] = [8, 4, 2, 1];

const THREADS: u32 = 128;

/// Heads whose loads a thread issues before their stores (`kRopeBatch`).
pub const ROPE_HEAD_BATCH: u32 = 4;

/// The widest width that divides `rotary_dim / 2` and `head_dim` and to which every element
/// pointer in `ptrs` (16-bit elements) is aligned.
pub fn rope_vec_width(head_dim: u32, rotary_dim: u32, ptrs: &[u64]) -> u32 {
    ROPE_VEC_WIDTHS
        .into_iter()
        .find(|&v| {
            (rotary_dim / 2).is_multiple_of(v)
                && head_dim.is_multiple_of(v)
                && ptrs.iter().all(|p| p.is_multiple_of(2 * u64::from(v)))
        })
        .unwrap_or(1)
}

/// Heads each thread walks: enough threads to fill `sm_count` SMs (2048 threads each), and
/// beyond that more heads per thread, so that each (token, pair) angle serves several heads.
pub fn rope_heads_per_thread(tokens: u32, chunks: u32, heads: u32, sm_count: u32) -> u32 {
    let units = u64::from(tokens) * u64::from(chunks) * u64::from(heads);
    let target = u64::from(sm_count.max(1)) * 2048;
    (units / target).clamp(1, u64::from(heads.clamp(1, 8))) as u32
}

/// The lean copy kernel for `rotate_mask == 0` (KV append): `dtype`, `vec` elements per chunk
/// (one of [`ROPE_VEC_WIDTHS`]), no angle code (it copies whatever `rotate_mask` says); entry
/// `ferrinfer_rope_<dtype>_v<vec>_copy(const fi::RopeArgs)`.
pub fn rope_copy_unit(dtype: DType, vec: u32) -> Result<TranslationUnit, String> {
    assemble(&Sources::from_env(), dtype, vec, None)
}

/// The instance name of [`rope_copy_unit`].
pub fn rope_copy_kernel_name(dtype: DType, vec: u32) -> String {
    format!("rope_{}_v{vec}_copy", dtype.name())
}

/// The kernel for `dtype`, `vec` pairs per chunk (one of [`ROPE_VEC_WIDTHS`]) and the GPT-J
/// (interleaved) or NeoX (halves) layout: entry
/// `ferrinfer_rope_<dtype>_v<vec>_<neox|gptj>(const fi::RopeArgs)`.
pub fn rope_unit(dtype: DType, vec: u32, gptj: bool) -> Result<TranslationUnit, String> {
    assemble(&Sources::from_env(), dtype, vec, Some(gptj))
}

/// The instance name of [`rope_unit`].
pub fn rope_kernel_name(dtype: DType, vec: u32, gptj: bool) -> String {
    let layout = if gptj { "gptj" } else { "neox" };
    format!("rope_{}_v{vec}_{layout}", dtype.name())
}

/// `gptj`: `Some(layout)` for the rotating kernel, `None` for the copy kernel.
fn assemble(
    sources: &Sources,
    dtype: DType,
    vec: u32,
    gptj: Option<bool>,
) -> Result<TranslationUnit, String> {
    if !ROPE_VEC_WIDTHS.contains(&vec) {
        return Err(format!(
            "no rope kernel for {vec} pairs per chunk (instantiated: {ROPE_VEC_WIDTHS:?})"
        ));
    }
    let (name, body) = match gptj {
        Some(gptj) => (
            rope_kernel_name(dtype, vec, gptj),
            format!("fi::rope<{}, {vec}, {gptj}>(args);", cuda_dtype(dtype)),
        ),
        None => (
            rope_copy_kernel_name(dtype, vec),
            format!(
                "fi::rope<{}, {vec}, false, false>(args);",
                cuda_dtype(dtype)
            ),
        ),
    };
    super::assemble(
        sources,
        &name,
        "ops/rope.cuh",
        THREADS,
        "fi::RopeArgs",
        &body,
    )
}

/// Every instance: both dtypes x [`ROPE_VEC_WIDTHS`] x (both layouts and the copy kernel) (a row
/// of [`super::OPS`]).
pub fn all_units() -> Result<Vec<TranslationUnit>, String> {
    let sources = Sources::from_env();
    let mut units = Vec::new();
    for dtype in DType::ALL {
        for vec in ROPE_VEC_WIDTHS {
            for gptj in [Some(false), Some(true), None] {
                units.push(assemble(&sources, dtype, vec, gptj)?);
            }
        }
    }
    Ok(units)
}

/// Chunks per head for `vec`: `rotary_dim / (2 vec)` rotating ones, then one per `vec` dims past
/// `rotary_dim`.
pub fn rope_chunks(head_dim: u32, rotary_dim: u32, vec: u32) -> u32 {
    rotary_dim / 2 / vec + (head_dim - rotary_dim) / vec
}

/// One thread per (token, head group, chunk), 128 per block; `None` past CUDA's grid limit. The
/// caller skips the launch when there are no tokens or no chunks.
pub fn rope_launch_dims(args: &RopeArgs, vec: u32) -> Option<LaunchDims> {
    let heads: u64 = args.heads.iter().map(|&h| u64::from(h)).sum();
    let groups = heads.div_ceil(u64::from(args.heads_per_thread.max(1)));
    let chunks = rope_chunks(args.head_dim, args.rotary_dim, vec);
    let items = u64::from(args.tokens)
        .checked_mul(groups)?
        .checked_mul(u64::from(chunks))?;
    let blocks = items.div_ceil(u64::from(THREADS)).max(1);
    Some(LaunchDims {
        grid: [u32::try_from(blocks).ok().filter(|&b| b < 1 << 31)?, 1, 1],
        block: [THREADS, 1, 1],
        shared_bytes: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_size_matches_rope_cuh() {
        assert_eq!(std::mem::size_of::<RopeArgs>(), 24 * 8 + 5 * 8 + 16 * 4);
        assert_eq!(std::mem::offset_of!(RopeArgs, src_row), 6 * 8);
        assert_eq!(std::mem::offset_of!(RopeArgs, dst_row), 9 * 8);
        assert_eq!(std::mem::offset_of!(RopeArgs, positions), 12 * 8);
        assert_eq!(std::mem::offset_of!(RopeArgs, ln_theta), 24 * 8);
        assert_eq!(std::mem::offset_of!(RopeArgs, tokens), 29 * 8);
        let header = Sources::BuiltIn.header("ops/rope.cuh").unwrap();
        assert!(header.contains("sizeof(RopeArgs) == 24 * 8 + 5 * 8 + 16 * 4"));
        assert!(header.contains("5 doubles from byte 192, 16 unsigned from byte 232"));
        // The row strides follow the pointers, as in the header.
        assert!(header.contains("unsigned long long src_row[3], dst_row[3];"));
        assert!(header.contains(&format!("kRopeThreads = {THREADS};")));
        assert!(header.contains(&format!("kRopeBatch = {ROPE_HEAD_BATCH};")));
        let slots = Sources::BuiltIn.header("ops/kv_append.cuh").unwrap();
        for (name, v) in [
            ("kSlotContiguous", SLOT_CONTIGUOUS),
            ("kSlotPlanned", SLOT_PLANNED),
            ("kSlotExplicit", SLOT_EXPLICIT),
        ] {
            assert!(slots.contains(&format!("{name} = {v};")), "{name}");
        }
    }

    #[test]
    fn every_instance_is_self_contained() {
        let units = all_units().unwrap();
        assert_eq!(units.len(), 24);
        for tu in &units {
            assert!(!tu.source.contains("#include") && !tu.source.contains("#pragma once"));
            for name in ["core/dtype.cuh", "ops/kv_append.cuh", "ops/rope.cuh"] {
                let marker = format!("// ---- {name} ----");
                assert_eq!(tu.source.matches(&marker).count(), 1, "{name}");
            }
        }
        let tu = rope_unit(DType::Bf16, 8, true).unwrap();
        assert_eq!(tu.entry, "ferrinfer_rope_bf16_v8_gptj");
        assert!(tu.source.contains("fi::rope<fi::bf16, 8, true>(args);"));
        let copy = rope_copy_unit(DType::F16, 4).unwrap();
        assert_eq!(copy.entry, "ferrinfer_rope_f16_v4_copy");
        assert!(
            copy.source
                .contains("fi::rope<fi::f16, 4, false, false>(args);")
        );
        assert!(
            rope_unit(DType::F16, 3, false)
                .unwrap_err()
                .contains("3 pairs")
        );
    }

    #[test]
    fn vec_width_divides_the_half_and_the_head() {
        assert_eq!(rope_vec_width(128, 128, &[0x1000, 0x2000]), 8);
        assert_eq!(rope_vec_width(128, 64, &[0x1000]), 8);
        assert_eq!(rope_vec_width(128, 8, &[0x1000]), 4);
        assert_eq!(rope_vec_width(6, 6, &[0x1000]), 1);
        assert_eq!(rope_vec_width(12, 4, &[0x1000]), 2);
        assert_eq!(rope_vec_width(128, 128, &[0x1008]), 4);
        assert_eq!(rope_vec_width(128, 0, &[0x1000]), 8);
    }

    #[test]
    fn launch_covers_every_token_group_and_chunk() {
        let args = RopeArgs {
            tokens: 10,
            heads: [3, 1, 0],
            head_dim: 12,
            rotary_dim: 8,
            heads_per_thread: 3,
            ..RopeArgs::default()
        };
        // vec 2: 2 rotating + 2 copying chunks; 2 groups; 10 tokens: 40 threads.
        assert_eq!(rope_chunks(12, 8, 2), 4);
        assert_eq!(rope_launch_dims(&args, 2).unwrap().grid, [1, 1, 1]);
        let big = RopeArgs {
            tokens: u32::MAX,
            heads: [u32::MAX / 4, 0, 0],
            head_dim: 256,
            heads_per_thread: 1,
            ..args
        };
        assert!(rope_launch_dims(&big, 1).is_none());
        assert_eq!(rope_heads_per_thread(4096, 8, 40, 132), 4);
        assert_eq!(rope_heads_per_thread(1, 8, 40, 132), 1);
        assert_eq!(rope_heads_per_thread(1 << 20, 8, 40, 132), 8);
    }
}
