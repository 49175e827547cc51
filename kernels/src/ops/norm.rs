//! The row-norm kernels (`cuda/ops/norm.cuh`): RMSNorm, fused residual add + RMSNorm and
//! LayerNorm; their arguments, translation units and launch geometry. Gemma's `(1 + w)` forms are
//! the RMS kernels with `weight_offset = 1`, not separate instances.

use crate::config::{DType, LaunchDims};
use crate::sources::Sources;
use crate::tu::{TranslationUnit, cuda_dtype};

/// Arguments of a norm kernel, passed by value; mirrors `fi::NormArgs`. Pointers are device
/// addresses; rows are `hidden` contiguous elements.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct NormArgs {
    /// `[rows, hidden]` input; for the fused kind also the output (overwritten in place).
    pub x: u64,
    /// Fused kind: `[rows, hidden]`, updated in place to `residual + x` (rounded to the element
    /// type). Unused (0) otherwise.
    pub residual: u64,
    /// `[hidden]`: the element type for the RMS kinds, f32 gamma for LayerNorm.
    pub weight: u64,
    /// LayerNorm: f32 beta `[hidden]`. Unused (0) otherwise.
    pub bias: u64,
    /// RMSNorm and LayerNorm: `[rows, hidden]` output. Unused (0) for the fused kind.
    pub out: u64,
    /// Rows.
    pub rows: u32,
    /// Elements per row, a multiple of the instance's vector width.
    pub hidden: u32,
    /// Added to the mean square (RMS) or the variance (LayerNorm) before the square root.
    pub eps: f32,
    /// Added to every weight before it scales (1 for Gemma, else 0); RMS kinds only.
    pub weight_offset: f32,
}

/// Which norm a kernel computes (`kNorm*` in norm.cuh).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NormKind {
    /// `x / sqrt(mean(x^2) + eps) * (w + weight_offset)` into `out`.
    Rms,
    /// `residual += x`, then `x = rms(residual) * (w + weight_offset)`, both in place.
    FusedAddRms,
    /// `(x - mean) / sqrt(var + eps) * gamma + beta` into `out`, gamma and beta in f32.
    Layer,
}

impl NormKind {
    /// Every kind, each instantiated for both dtypes and every vector width.
    pub const ALL: [NormKind; 3] = [NormKind::Rms, NormKind::FusedAddRms, NormKind::Layer];
    /// The kernel name's stem (`rmsnorm`, `fused_add_rmsnorm`, `layernorm`).
    pub fn name(self) -> &'static str {
        match self {
            NormKind::Rms => "rmsnorm",
            NormKind::FusedAddRms => "fused_add_rmsnorm",
            NormKind::Layer => "layernorm",
        }
    }
    fn template_arg(self) -> &'static str {
        match self {
            NormKind::Rms => "fi::kNormRms",
            NormKind::FusedAddRms => "fi::kNormFusedAddRms",
            NormKind::Layer => "fi::kNormLayer",
        }
    }
}

/// Elements per access the norm kernels are instantiated for, widest first (8 x 16 bits = 16
/// bytes).
pub const NORM_VEC_WIDTHS: [u32; 4] = [8, 4, 2, 1];

/// Threads of a block at most; `kNormMaxThreads` in norm.cuh (its shared array holds one partial
/// sum per warp).
const MAX_THREADS: u32 = 1024;
const WARP: u32 = 32;
/// Packs each thread keeps in registers per row: `norm_items<VEC, KIND>()` in norm.cuh (it holds
/// two rows' worth, this row and the next one's loads; fewer for the fused kind, which holds x and
/// residual packs of the next row at once, and for LayerNorm, whose f32 weights are wide). The
/// launch gives a row enough threads that each holds about this many, so a row of up to 1024
/// times as many packs is read once, and each thread has that many loads in flight.
fn items(kind: NormKind, vec: u32) -> u32 {
    match kind {
        NormKind::Rms if vec >= 4 => 4,
        NormKind::FusedAddRms if vec < 4 => 1,
        _ => 2,
    }
}

/// Threads a block aims for when rows are short, by putting several rows in one block.
const BLOCK_THREADS: u32 = 128;

/// Threads resident on an SM at least: `__launch_bounds__(1024)` caps a thread at 64 registers, so
/// 1024 threads fit in any SM's 64k. The persistent grid is this many threads per SM, so it is
/// one wave.
const RESIDENT_THREADS: u32 = 1024;

/// The widest access that divides `hidden` and to which every element pointer in `ptrs16` (of a
/// 16-bit element type) and every f32 pointer in `ptrs32` is aligned.
pub fn norm_vec_width(hidden: u32, ptrs16: &[u64], ptrs32: &[u64]) -> u32 {
    NORM_VEC_WIDTHS
        .into_iter()
        .find(|&vec| {
            hidden.is_multiple_of(vec)
                && ptrs16.iter().all(|p| p.is_multiple_of(2 * u64::from(vec)))
                && ptrs32.iter().all(|p| p.is_multiple_of(4 * u64::from(vec)))
        })
        .unwrap_or(1)
}

/// The norm kernel of `kind` for `dtype` and `vec` elements per access (one of
/// [`NORM_VEC_WIDTHS`]): headers inlined, one entry
/// `ferrinfer_<kind>_<dtype>_v<vec>(const fi::NormArgs)`.
pub fn norm_unit(kind: NormKind, dtype: DType, vec: u32) -> Result<TranslationUnit, String> {
    assemble(&Sources::from_env(), kind, dtype, vec)
}

fn assemble(
    sources: &Sources,
    kind: NormKind,
    dtype: DType,
    vec: u32,
) -> Result<TranslationUnit, String> {
    if !NORM_VEC_WIDTHS.contains(&vec) {
        return Err(format!(
            "no {} kernel for {vec} elements per access (instantiated: {NORM_VEC_WIDTHS:?})",
            kind.name()
        ));
    }
    super::assemble(
        sources,
        &format!("{}_{}_v{vec}", kind.name(), dtype.name()),
        "ops/norm.cuh",
        MAX_THREADS,
        "fi::NormArgs",
        &format!(
            "fi::norm<{}, {vec}, {}>(args);",
            cuda_dtype(dtype),
            kind.template_arg()
        ),
    )
}

/// Every instance: each kind x both dtypes x [`NORM_VEC_WIDTHS`] (a row of [`super::OPS`]).
pub fn all_units() -> Result<Vec<TranslationUnit>, String> {
    let sources = Sources::from_env();
    let mut units = Vec::new();
    for kind in NormKind::ALL {
        for dtype in DType::ALL {
            for vec in NORM_VEC_WIDTHS {
                units.push(assemble(&sources, kind, dtype, vec)?);
            }
        }
    }
    Ok(units)
}

/// The launch of a `kind` norm over `rows` rows of `hidden` elements at `vec` per access on a
/// device of `sms` SMs: each row gets a multiple of 32 threads (about as many packs each as it
/// keeps in registers, at most 1024), and short rows share a block. The grid is persistent: at
/// most one resident wave of blocks (`RESIDENT_THREADS` per SM), each walking its rows in steps of
/// the grid's rows. `None` when the grid would exceed CUDA's limit of 2^31 - 1 blocks. Zero rows
/// still get one block (whose threads write nothing).
pub fn norm_launch_dims(
    kind: NormKind,
    rows: u32,
    hidden: u32,
    vec: u32,
    sms: u32,
) -> Option<LaunchDims> {
    let packs = hidden.div_ceil(vec.max(1));
    let tx = packs
        .div_ceil(items(kind, vec))
        .next_multiple_of(WARP)
        .clamp(WARP, MAX_THREADS);
    let ty = (BLOCK_THREADS / tx).max(1);
    let wave = sms
        .max(1)
        .saturating_mul((RESIDENT_THREADS / (tx * ty)).max(1));
    let blocks = rows.div_ceil(ty).clamp(1, wave);
    Some(LaunchDims {
        grid: [Some(blocks).filter(|&b| b < 1 << 31)?, 1, 1],
        block: [tx, ty, 1],
        shared_bytes: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_size_matches_norm_cuh() {
        assert_eq!(std::mem::size_of::<NormArgs>(), 5 * 8 + 4 * 4);
        let header = Sources::BuiltIn.header("ops/norm.cuh").unwrap();
        assert!(header.contains("sizeof(NormArgs) == 5 * 8 + 4 * 4"));
        assert!(header.contains(&format!("kNormMaxThreads = {MAX_THREADS};")));
        assert!(header.contains(
            "return KIND == kNormRms ? (VEC >= 4 ? 4 : 2) : KIND == kNormFusedAddRms ? (VEC >= 4 ? 2 : 1) : 2;"
        ));
        let rms = NormKind::Rms;
        assert_eq!(
            (items(rms, 8), items(rms, 4), items(rms, 2), items(rms, 1)),
            (4, 4, 2, 2)
        );
        assert_eq!(
            (items(NormKind::Layer, 8), items(NormKind::Layer, 1)),
            (2, 2)
        );
        let fused = NormKind::FusedAddRms;
        assert_eq!(
            (items(fused, 8), items(fused, 4), items(fused, 1)),
            (2, 2, 1)
        );
    }

    #[test]
    fn units_are_self_contained_and_instantiate_the_template() {
        for kind in NormKind::ALL {
            for dtype in DType::ALL {
                for vec in NORM_VEC_WIDTHS {
                    let tu = norm_unit(kind, dtype, vec).unwrap();
                    assert!(!tu.source.contains("#include") && !tu.source.contains("#pragma once"));
                    for name in ["core/dtype.cuh", "core/warp.cuh", "ops/norm.cuh"] {
                        let marker = format!("// ---- {name} ----");
                        assert_eq!(tu.source.matches(&marker).count(), 1, "{name}");
                    }
                    assert_eq!(
                        tu.entry,
                        format!("ferrinfer_{}_{}_v{vec}", kind.name(), dtype.name())
                    );
                    assert!(tu.source.contains(&format!(
                        "fi::norm<{}, {vec}, {}>(args);",
                        cuda_dtype(dtype),
                        kind.template_arg()
                    )));
                }
            }
        }
        let e = norm_unit(NormKind::Rms, DType::Bf16, 16).unwrap_err();
        assert!(e.contains("16 elements"), "{e}");
        assert_eq!(all_units().unwrap().len(), 3 * 2 * NORM_VEC_WIDTHS.len());
    }

    #[test]
    fn vec_width_is_the_widest_aligned_divisor() {
        assert_eq!(norm_vec_width(8192, &[0x1000, 0x2000], &[]), 8);
        assert_eq!(norm_vec_width(12, &[0x1000], &[]), 4);
        assert_eq!(norm_vec_width(6, &[0x1000], &[]), 2);
        assert_eq!(norm_vec_width(7, &[0x1000], &[]), 1);
        assert_eq!(norm_vec_width(8192, &[0x1008], &[]), 4);
        // f32 gamma at 16-byte alignment allows 4 floats per access, not 8.
        assert_eq!(norm_vec_width(8192, &[0x1000], &[0x2010]), 4);
        assert_eq!(norm_vec_width(8192, &[0x1000], &[0x2004]), 1);
    }

    #[test]
    fn launch_covers_every_row_with_whole_warps() {
        let (rms, fused) = (NormKind::Rms, NormKind::FusedAddRms);
        // 8192 bf16 at 8 per access: 1024 packs, 4 per thread (2 for the fused kind); one wave of
        // 1024 threads per SM on 132 SMs.
        let d = norm_launch_dims(rms, 2048, 8192, 8, 132).unwrap();
        assert_eq!((d.grid, d.block), ([528, 1, 1], [256, 1, 1]));
        let d = norm_launch_dims(fused, 2048, 8192, 8, 132).unwrap();
        assert_eq!((d.grid, d.block), ([264, 1, 1], [512, 1, 1]));
        // Fewer rows than a wave: a block per row.
        let d = norm_launch_dims(rms, 100, 8192, 8, 132).unwrap();
        assert_eq!((d.grid, d.block), ([100, 1, 1], [256, 1, 1]));
        // Short rows share a block: 4 rows of one warp each.
        let d = norm_launch_dims(rms, 10, 128, 8, 132).unwrap();
        assert_eq!((d.grid, d.block), ([3, 1, 1], [32, 4, 1]));
        // Odd sizes round up to a warp (2 narrow packs per thread); huge rows cap at 1024 threads.
        assert_eq!(
            norm_launch_dims(rms, 3, 129, 1, 132).unwrap().block,
            [96, 1, 1]
        );
        let huge = norm_launch_dims(NormKind::Layer, 1000, 1 << 20, 8, 132).unwrap();
        assert_eq!((huge.grid, huge.block), ([132, 1, 1], [1024, 1, 1]));
        assert_eq!(
            norm_launch_dims(rms, 0, 64, 8, 132).unwrap().grid,
            [1, 1, 1]
        );
        // No SM count (0) is taken as one SM.
        assert_eq!(norm_launch_dims(rms, 50, 64, 8, 0).unwrap().grid, [8, 1, 1]);
        assert!(norm_launch_dims(rms, u32::MAX, 1 << 20, 8, u32::MAX).is_none());
        for kind in NormKind::ALL {
            for (rows, hidden, vec) in [(7, 1, 1), (100, 3000, 8), (5, 65536, 8), (9, 40000, 2)] {
                let d = norm_launch_dims(kind, rows, hidden, vec, 132).unwrap();
                let (tx, ty) = (d.block[0], d.block[1]);
                assert!(tx.is_multiple_of(WARP) && tx * ty <= MAX_THREADS);
                assert!(d.grid[0] >= 1);
            }
        }
    }

    /// The packs each thread of a launch touches, walked as `fi::norm` walks them (rows from
    /// `blockIdx.x * ny + ty` in steps of `gridDim.x * ny`; in each its first `items` packs at
    /// `tx + k * nx`, the rest from `tx + items * nx` in steps of `nx`), for rows past the end
    /// none: every (row, pack) of the tensor exactly once, nothing outside.
    #[test]
    fn every_pack_of_every_row_is_touched_exactly_once() {
        for kind in NormKind::ALL {
            for (rows, hidden, vec, sms) in [
                (1, 1, 1, 132),
                (7, 129, 1, 1),
                (5, 6, 2, 132),
                (9, 100, 4, 1),
                (300, 100, 4, 2),
                (3, 8192, 8, 132),
                (40, 8192, 8, 3),
                (2, 100_000, 8, 132),
                (5, 100_000, 8, 1),
                (2, 40_004, 4, 132),
                (1, 20_002, 2, 132),
            ] {
                let d = norm_launch_dims(kind, rows, hidden, vec, sms).unwrap();
                let (nx, ny) = (d.block[0], d.block[1]);
                let packs = hidden / vec;
                let mut seen = vec![0u8; (rows * packs) as usize];
                for block in 0..d.grid[0] {
                    for ty in 0..ny {
                        let rows_of_thread =
                            (block * ny + ty..rows).step_by((d.grid[0] * ny) as usize);
                        for row in rows_of_thread {
                            for tx in 0..nx {
                                let cached = (0..items(kind, vec)).map(|k| tx + k * nx);
                                let rest = (tx + items(kind, vec) * nx..packs).step_by(nx as usize);
                                for i in cached.filter(|&i| i < packs).chain(rest) {
                                    seen[(row * packs + i) as usize] += 1;
                                }
                            }
                        }
                    }
                }
                assert!(
                    seen.iter().all(|&n| n == 1),
                    "{kind:?} rows {rows} hidden {hidden} vec {vec} sms {sms}"
                );
            }
        }
    }
}
