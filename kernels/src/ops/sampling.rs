//! The sampling kernels (`cuda/ops/sampling.cuh`, with the Philox generator of
//! `cuda/ops/philox.cuh`): their arguments, translation units and launch geometry. One block
//! samples one row, from f32 probabilities or logits, with top-k, top-p and min-p filters; a
//! one-thread kernel then advances the generator's offset in device memory.

use crate::config::LaunchDims;
use crate::sources::Sources;
use crate::tu::TranslationUnit;

/// Arguments of a sampling kernel, passed by value; mirrors `fi::SamplingArgs`.
///
/// Pointers are device addresses (a null per-request array means "use the scalar"); the row of
/// request `r` starts at element `r * row_stride` of `x`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SamplingArgs {
    /// `[batch, row_stride]` f32 probabilities or logits.
    pub x: u64,
    /// `[batch]` i32 token ids.
    pub out: u64,
    /// The generator state, two u64: seed, offset.
    pub state: u64,
    /// `[batch]` i32 top-k per request, or 0 for [`SamplingArgs::top_k`].
    pub top_k_arr: u64,
    /// `[batch]` f32 top-p per request, or 0 for [`SamplingArgs::top_p`].
    pub top_p_arr: u64,
    /// `[batch]` f32 min-p per request, or 0 for [`SamplingArgs::min_p`].
    pub min_p_arr: u64,
    /// `[batch]` f32 temperature per request (logits), or 0 for [`SamplingArgs::temperature`].
    pub temperature_arr: u64,
    /// Elements between consecutive rows of `x`.
    pub row_stride: u64,
    /// Rows (requests).
    pub batch: u32,
    /// Tokens per row.
    pub vocab: u32,
    /// Top-k for every request.
    pub top_k: i32,
    /// Top-p for every request.
    pub top_p: f32,
    /// Min-p for every request.
    pub min_p: f32,
    /// Temperature for every request (logits).
    pub temperature: f32,
    /// Which filters apply: [`FLAG_TOP_K`] | [`FLAG_TOP_P`] | [`FLAG_MIN_P`].
    pub flags: u32,
    /// Padding to a multiple of 8 bytes.
    pub pad: u32,
}

/// Arguments of the offset-advancing kernel; mirrors `fi::SamplingAdvanceArgs`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SamplingAdvanceArgs {
    /// The generator state, two u64: seed, offset (the offset is advanced).
    pub state: u64,
    /// What is added to the offset.
    pub add: u64,
}

/// [`SamplingArgs::flags`]: the top-k filter applies.
pub const FLAG_TOP_K: u32 = 1;
/// [`SamplingArgs::flags`]: the top-p filter applies.
pub const FLAG_TOP_P: u32 = 2;
/// [`SamplingArgs::flags`]: the min-p filter applies.
pub const FLAG_MIN_P: u32 = 4;

/// Elements per access the sampling kernels are instantiated for, widest first (4 x f32 = 16 bytes).
pub const SAMPLING_VEC_WIDTHS: [u32; 3] = [4, 2, 1];

/// Threads per block; `kSamplingThreads` in sampling.cuh.
const THREADS: u32 = 512;

/// What a sampling kernel reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SamplingInput {
    /// Probabilities (any non-negative weights; they need not sum to 1).
    Probs,
    /// Logits, softmaxed with a per-request temperature on the fly.
    Logits,
}

impl SamplingInput {
    fn name(self) -> &'static str {
        match self {
            SamplingInput::Probs => "probs",
            SamplingInput::Logits => "logits",
        }
    }
}

/// The widest access that divides `row_stride` and to which the f32 pointer `x` is aligned.
pub fn sampling_vec_width(row_stride: u64, x: u64) -> u32 {
    SAMPLING_VEC_WIDTHS
        .into_iter()
        .find(|&vec| {
            row_stride.is_multiple_of(u64::from(vec)) && x.is_multiple_of(4 * u64::from(vec))
        })
        .unwrap_or(1)
}

/// The name of the sampling instance for `input` and `vec` (the runtime's module key part).
pub fn sampling_kernel_name(input: SamplingInput, vec: u32) -> String {
    format!("sampling_{}_v{vec}", input.name())
}

/// The sampling kernel for `input` and `vec` elements per access (one of
/// [`SAMPLING_VEC_WIDTHS`]): one entry `ferrinfer_sampling_<input>_v<vec>(const fi::SamplingArgs)`.
pub fn sampling_unit(input: SamplingInput, vec: u32) -> Result<TranslationUnit, String> {
    assemble(&Sources::from_env(), input, vec)
}

fn assemble(sources: &Sources, input: SamplingInput, vec: u32) -> Result<TranslationUnit, String> {
    if !SAMPLING_VEC_WIDTHS.contains(&vec) {
        return Err(format!(
            "no sampling kernel for {vec} elements per access (instantiated: \
             {SAMPLING_VEC_WIDTHS:?})"
        ));
    }
    let logits = input == SamplingInput::Logits;
    super::assemble(
        sources,
        &sampling_kernel_name(input, vec),
        "ops/sampling.cuh",
        THREADS,
        "fi::SamplingArgs",
        &format!("fi::sample_row<{logits}, {vec}>(args, blockIdx.x);"),
    )
}

/// The name of the offset-advancing kernel.
pub const SAMPLING_ADVANCE_KERNEL: &str = "sampling_advance";

/// The one-thread kernel that adds to the generator's offset after a sampling launch.
pub fn sampling_advance_unit() -> Result<TranslationUnit, String> {
    advance(&Sources::from_env())
}

fn advance(sources: &Sources) -> Result<TranslationUnit, String> {
    super::assemble(
        sources,
        SAMPLING_ADVANCE_KERNEL,
        "ops/philox.cuh",
        32,
        "fi::SamplingAdvanceArgs",
        "if (threadIdx.x == 0 && blockIdx.x == 0) args.state[1] += args.add;",
    )
}

/// Every instance: both inputs x [`SAMPLING_VEC_WIDTHS`], the advance kernel and the
/// speculative kernels (a row of [`super::OPS`]).
pub fn all_units() -> Result<Vec<TranslationUnit>, String> {
    let sources = Sources::from_env();
    let mut units = Vec::new();
    for input in [SamplingInput::Probs, SamplingInput::Logits] {
        for vec in SAMPLING_VEC_WIDTHS {
            units.push(assemble(&sources, input, vec)?);
        }
    }
    units.push(advance(&sources)?);
    Ok(units)
}

/// One block of 512 threads per row; `None` when `batch` exceeds CUDA's grid limit.
pub fn sampling_launch_dims(batch: u32) -> Option<LaunchDims> {
    Some(LaunchDims {
        grid: [Some(batch.max(1)).filter(|&b| b < 1 << 31)?, 1, 1],
        block: [THREADS, 1, 1],
        shared_bytes: 0,
    })
}

/// The advance kernel's geometry: one warp (one thread works).
pub fn sampling_advance_launch_dims() -> LaunchDims {
    LaunchDims {
        grid: [1, 1, 1],
        block: [32, 1, 1],
        shared_bytes: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_sizes_match_sampling_cuh() {
        assert_eq!(std::mem::size_of::<SamplingArgs>(), 8 * 8 + 8 * 4);
        assert_eq!(std::mem::size_of::<SamplingAdvanceArgs>(), 2 * 8);
        let header = Sources::BuiltIn.header("ops/sampling.cuh").unwrap();
        let philox = Sources::BuiltIn.header("ops/philox.cuh").unwrap();
        assert!(header.contains("sizeof(SamplingArgs) == 8 * 8 + 8 * 4"));
        assert!(philox.contains("sizeof(SamplingAdvanceArgs) == 2 * 8"));
        assert!(header.contains(&format!("kSamplingThreads = {THREADS};")));
        assert!(header.contains(&format!(
            "kSampleTopK = {FLAG_TOP_K}u, kSampleTopP = {FLAG_TOP_P}u, kSampleMinP = {FLAG_MIN_P}u;"
        )));
    }

    #[test]
    fn units_are_self_contained_and_named() {
        for input in [SamplingInput::Probs, SamplingInput::Logits] {
            for vec in SAMPLING_VEC_WIDTHS {
                let tu = sampling_unit(input, vec).unwrap();
                assert!(!tu.source.contains("#include"));
                for name in [
                    "core/math.cuh",
                    "core/warp.cuh",
                    "ops/philox.cuh",
                    "ops/sampling.cuh",
                ] {
                    assert_eq!(
                        tu.source.matches(&format!("// ---- {name} ----")).count(),
                        1
                    );
                }
                assert_eq!(
                    tu.entry,
                    format!("ferrinfer_{}", sampling_kernel_name(input, vec))
                );
            }
        }
        assert!(
            sampling_unit(SamplingInput::Probs, 8)
                .unwrap_err()
                .contains("8 elements")
        );
        let adv = sampling_advance_unit().unwrap();
        assert!(adv.source.contains("args.state[1] += args.add"));
        assert_eq!(all_units().unwrap().len(), 7);
    }

    #[test]
    fn vec_width_is_the_widest_aligned_divisor() {
        assert_eq!(sampling_vec_width(128256, 0x1000), 4);
        assert_eq!(sampling_vec_width(6, 0x1000), 2);
        assert_eq!(sampling_vec_width(7, 0x1000), 1);
        assert_eq!(sampling_vec_width(8, 0x1008), 2);
        assert_eq!(sampling_vec_width(8, 0x1004), 1);
    }

    #[test]
    fn one_block_per_row() {
        assert_eq!(sampling_launch_dims(128).unwrap().grid, [128, 1, 1]);
        assert_eq!(sampling_launch_dims(0).unwrap().grid, [1, 1, 1]);
        assert!(sampling_launch_dims(u32::MAX).is_none());
    }
}
