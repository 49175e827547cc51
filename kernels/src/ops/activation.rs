//! The gated activation kernels (`cuda/ops/activation.cuh`): `out = act(x[:, :d]) * x[:, d:]` for
//! SiLU, GELU (erf) and GELU (tanh); their arguments, translation units and launch geometry.

use crate::config::{DType, LaunchDims};
use crate::sources::Sources;
use crate::tu::{TranslationUnit, cuda_dtype};

/// Arguments of an activation kernel, passed by value; mirrors `fi::ActArgs`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ActArgs {
    /// `[rows, 2 * d]` input: the gate half, then the half it multiplies.
    pub x: u64,
    /// `[rows, d]` output.
    pub out: u64,
    /// Rows.
    pub rows: u32,
    /// Output elements per row, a multiple of the instance's vector width.
    pub d: u32,
}

/// The activation applied to the first half of each row (`kAct*` in activation.cuh).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Act {
    /// `x * sigmoid(x)`.
    Silu,
    /// `x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2))`.
    Gelu,
    /// `0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))`.
    GeluTanh,
}

impl Act {
    /// Every activation, each instantiated for both dtypes and every vector width.
    pub const ALL: [Act; 3] = [Act::Silu, Act::Gelu, Act::GeluTanh];
    /// The kernel name's stem (`silu_and_mul`, `gelu_and_mul`, `gelu_tanh_and_mul`).
    pub fn name(self) -> &'static str {
        match self {
            Act::Silu => "silu_and_mul",
            Act::Gelu => "gelu_and_mul",
            Act::GeluTanh => "gelu_tanh_and_mul",
        }
    }
    fn template_arg(self) -> &'static str {
        match self {
            Act::Silu => "fi::kActSilu",
            Act::Gelu => "fi::kActGelu",
            Act::GeluTanh => "fi::kActGeluTanh",
        }
    }
}

/// Elements per access the activation kernels are instantiated for, widest first.
pub const ACT_VEC_WIDTHS: [u32; 4] = [8, 4, 2, 1];

/// Threads per block.
const THREADS: u32 = 256;
const WARP: u32 = 32;
/// CUDA's limit on grid.y; the kernel steps over rows beyond it.
const MAX_GRID_Y: u32 = 65535;

/// The widest access that divides `d` and to which both (16-bit element) pointers are aligned.
pub fn act_vec_width(d: u32, ptrs: &[u64]) -> u32 {
    ACT_VEC_WIDTHS
        .into_iter()
        .find(|&vec| d.is_multiple_of(vec) && ptrs.iter().all(|p| p.is_multiple_of(2 * vec as u64)))
        .unwrap_or(1)
}

/// The kernel of `act` for `dtype` and `vec` elements per access (one of [`ACT_VEC_WIDTHS`]):
/// one entry `ferrinfer_<act>_<dtype>_v<vec>(const fi::ActArgs)`.
pub fn act_unit(act: Act, dtype: DType, vec: u32) -> Result<TranslationUnit, String> {
    assemble(&Sources::from_env(), act, dtype, vec)
}

fn assemble(
    sources: &Sources,
    act: Act,
    dtype: DType,
    vec: u32,
) -> Result<TranslationUnit, String> {
    if !ACT_VEC_WIDTHS.contains(&vec) {
        return Err(format!(
            "no {} kernel for {vec} elements per access (instantiated: {ACT_VEC_WIDTHS:?})",
            act.name()
        ));
    }
    super::assemble(
        sources,
        &format!("{}_{}_v{vec}", act.name(), dtype.name()),
        "ops/activation.cuh",
        THREADS,
        "fi::ActArgs",
        &format!(
            "fi::act_and_mul<{}, {vec}, {}>(args);",
            cuda_dtype(dtype),
            act.template_arg()
        ),
    )
}

/// Every instance: each activation x both dtypes x [`ACT_VEC_WIDTHS`] (a row of [`super::OPS`]).
pub fn all_units() -> Result<Vec<TranslationUnit>, String> {
    let sources = Sources::from_env();
    let mut units = Vec::new();
    for act in Act::ALL {
        for dtype in DType::ALL {
            for vec in ACT_VEC_WIDTHS {
                units.push(assemble(&sources, act, dtype, vec)?);
            }
        }
    }
    Ok(units)
}

/// The launch over `rows` rows of `d` outputs at `vec` per access: a row's packs across
/// `block.x` (a multiple of 32, at most 256), short rows stacked in `block.y` up to 256 threads,
/// rows past grid.y's limit stepped over in the kernel. Zero rows still get one block.
pub fn act_launch_dims(rows: u32, d: u32, vec: u32) -> LaunchDims {
    let packs = d.div_ceil(vec.max(1));
    let tx = packs.next_multiple_of(WARP).clamp(WARP, THREADS);
    let ty = THREADS / tx;
    LaunchDims {
        grid: [
            packs.div_ceil(tx).max(1),
            rows.div_ceil(ty).clamp(1, MAX_GRID_Y),
            1,
        ],
        block: [tx, ty, 1],
        shared_bytes: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_size_matches_activation_cuh() {
        assert_eq!(std::mem::size_of::<ActArgs>(), 2 * 8 + 2 * 4);
        let header = Sources::BuiltIn.header("ops/activation.cuh").unwrap();
        assert!(header.contains("sizeof(ActArgs) == 2 * 8 + 2 * 4"));
    }

    #[test]
    fn units_are_self_contained_and_instantiate_the_template() {
        for act in Act::ALL {
            for dtype in DType::ALL {
                for vec in ACT_VEC_WIDTHS {
                    let tu = act_unit(act, dtype, vec).unwrap();
                    assert!(!tu.source.contains("#include") && !tu.source.contains("#pragma once"));
                    for name in ["core/dtype.cuh", "core/math.cuh", "ops/activation.cuh"] {
                        let marker = format!("// ---- {name} ----");
                        assert_eq!(tu.source.matches(&marker).count(), 1, "{name}");
                    }
                    assert_eq!(
                        tu.entry,
                        format!("ferrinfer_{}_{}_v{vec}", act.name(), dtype.name())
                    );
                    assert!(tu.source.contains(&format!(
                        "fi::act_and_mul<{}, {vec}, {}>(args);",
                        cuda_dtype(dtype),
                        act.template_arg()
                    )));
                }
            }
        }
        let e = act_unit(Act::Silu, DType::F16, 3).unwrap_err();
        assert!(e.contains("3 elements"), "{e}");
        assert_eq!(all_units().unwrap().len(), 3 * 2 * ACT_VEC_WIDTHS.len());
    }

    #[test]
    fn vec_width_is_the_widest_aligned_divisor() {
        assert_eq!(act_vec_width(14336, &[0x1000, 0x2000]), 8);
        assert_eq!(act_vec_width(12, &[0x1000, 0x2000]), 4);
        assert_eq!(act_vec_width(14336, &[0x1000, 0x2002]), 1);
        assert_eq!(act_vec_width(7, &[0x1000, 0x2000]), 1);
    }

    #[test]
    fn launch_covers_every_pack_and_row() {
        // 14336 bf16 at 8 per access: 1792 packs in 7 blocks of 256 per row.
        let d = act_launch_dims(2048, 14336, 8);
        assert_eq!((d.grid, d.block), ([7, 2048, 1], [256, 1, 1]));
        // Short rows stack: 8 packs in one warp, 8 rows per block.
        let d = act_launch_dims(100, 64, 8);
        assert_eq!((d.grid, d.block), ([1, 13, 1], [32, 8, 1]));
        assert_eq!(act_launch_dims(1 << 30, 8, 8).grid[1], MAX_GRID_Y);
        assert_eq!(act_launch_dims(0, 8, 8).grid, [1, 1, 1]);
        for (rows, d, vec) in [(3, 1, 1), (5, 1000, 4), (1, 14337, 1)] {
            let l = act_launch_dims(rows, d, vec);
            let packs = d / vec;
            assert!(l.grid[0] * l.block[0] >= packs && l.block[0] * l.block[1] <= THREADS);
            assert!(l.grid[1] * l.block[1] >= rows);
        }
    }

    /// The (row, pack) pairs each thread touches, walked as `fi::act_and_mul` walks them (pack
    /// `bx * nx + tx` when below `d / vec`, rows from `by * ny + ty` in steps of `gy * ny`):
    /// every one exactly once.
    #[test]
    fn every_pack_of_every_row_is_touched_exactly_once() {
        for (rows, d, vec) in [
            (1, 1, 1),
            (70, 13, 1),
            (5, 1000, 4),
            (3, 14336, 8),
            (9, 6, 2),
        ] {
            let l = act_launch_dims(rows, d, vec);
            let packs = d / vec;
            let mut seen = vec![0u8; (rows * packs) as usize];
            for (bx, by) in (0..l.grid[0]).flat_map(|x| (0..l.grid[1]).map(move |y| (x, y))) {
                for (tx, ty) in (0..l.block[0]).flat_map(|x| (0..l.block[1]).map(move |y| (x, y))) {
                    let col = bx * l.block[0] + tx;
                    if col >= packs {
                        continue;
                    }
                    let step = (l.grid[1] * l.block[1]) as usize;
                    for r in (by * l.block[1] + ty..rows).step_by(step) {
                        seen[(r * packs + col) as usize] += 1;
                    }
                }
            }
            assert!(seen.iter().all(|&n| n == 1), "rows {rows} d {d} vec {vec}");
        }
        // Past grid.y's limit: rows stepped over, still once each (65535 blocks of one row).
        let l = act_launch_dims(70_000, 2049, 1);
        assert_eq!((l.grid[1], l.block[1]), (MAX_GRID_Y, 1));
        let step = l.grid[1] * l.block[1];
        let per_thread = |first: u32| (first..70_000).step_by(step as usize).count();
        assert_eq!(per_thread(0) + per_thread(MAX_GRID_Y - 1), 2 + 1);
    }
}
