//! The sampling kernels (`cuda/ops/sampling.cuh`, with the Philox generator of
//! `cuda/ops/philox.cuh`): their arguments, translation units and launch geometry. One block
//! samples one row, from f32 probabilities or logits, with top-k, top-p and min-p filters; a
//! one-thread kernel then advances the generator's offset in device memory. Beside them: softmax
//! with temperature, top-k / top-p renormalisation, top-k masking, and chain speculative sampling.

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

/// Arguments of a row transform kernel (softmax, renormalisation, masking), passed by value;
/// mirrors `fi::RowTransformArgs`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RowTransformArgs {
    /// `[batch, row_stride]` f32 input.
    pub x: u64,
    /// `[batch, row_stride]` f32 output; may equal `x`.
    pub out: u64,
    /// `[batch]` i32 top-k per request, or 0 for [`RowTransformArgs::top_k`].
    pub top_k_arr: u64,
    /// `[batch]` f32 top-p per request, or 0 for [`RowTransformArgs::top_p`].
    pub top_p_arr: u64,
    /// `[batch]` f32 temperature per request, or 0 for [`RowTransformArgs::temperature`].
    pub temperature_arr: u64,
    /// Elements between consecutive rows.
    pub row_stride: u64,
    /// Rows.
    pub batch: u32,
    /// Elements per row.
    pub vocab: u32,
    /// Top-k for every request.
    pub top_k: i32,
    /// Top-p for every request.
    pub top_p: f32,
    /// Temperature for every request.
    pub temperature: f32,
    /// Padding to a multiple of 8 bytes.
    pub pad: u32,
}

/// The row transforms (`OP` of `fi::transform_row`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RowTransform {
    /// Softmax of logits with a per-request temperature.
    Softmax,
    /// Probabilities restricted to the top k and renormalised.
    TopKRenorm,
    /// Probabilities restricted to the top-p set and renormalised.
    TopPRenorm,
    /// Logits below the k-th largest set to -inf.
    TopKMask,
}

impl RowTransform {
    /// Every transform.
    pub const ALL: [RowTransform; 4] = [
        RowTransform::Softmax,
        RowTransform::TopKRenorm,
        RowTransform::TopPRenorm,
        RowTransform::TopKMask,
    ];
    fn code(self) -> u32 {
        self as u32
    }
    fn name(self) -> &'static str {
        match self {
            RowTransform::Softmax => "softmax",
            RowTransform::TopKRenorm => "top_k_renorm",
            RowTransform::TopPRenorm => "top_p_renorm",
            RowTransform::TopKMask => "top_k_mask",
        }
    }
}

/// Arguments of the chain speculative sampling kernel, passed by value; mirrors
/// `fi::SpeculativeArgs`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpeculativeArgs {
    /// `[batch, n, vocab]` f32 draft probabilities.
    pub draft_probs: u64,
    /// `[batch, n]` i32 draft token ids.
    pub draft_ids: u64,
    /// `[batch, n + 1, vocab]` f32 target probabilities.
    pub target_probs: u64,
    /// `[batch, n + 1]` i32 output token ids, -1 after the last emitted one.
    pub out: u64,
    /// `[batch]` i32 draft tokens accepted.
    pub accepted: u64,
    /// `[batch]` i32 tokens emitted (accepted + 1).
    pub emitted: u64,
    /// The generator state, two u64: seed, offset.
    pub state: u64,
    /// Requests.
    pub batch: u32,
    /// Draft tokens per request.
    pub n: u32,
    /// Tokens per row.
    pub vocab: u32,
    /// Padding to a multiple of 8 bytes.
    pub pad: u32,
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
    check_vec(vec)?;
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

/// The name of the row transform instance for `op` and `vec`.
pub fn row_transform_kernel_name(op: RowTransform, vec: u32) -> String {
    format!("sampling_{}_v{vec}", op.name())
}

/// The row transform kernel for `op` and `vec` elements per access (one of
/// [`SAMPLING_VEC_WIDTHS`]): one entry `ferrinfer_sampling_<op>_v<vec>(const fi::RowTransformArgs)`.
pub fn row_transform_unit(op: RowTransform, vec: u32) -> Result<TranslationUnit, String> {
    assemble_transform(&Sources::from_env(), op, vec)
}

fn assemble_transform(
    sources: &Sources,
    op: RowTransform,
    vec: u32,
) -> Result<TranslationUnit, String> {
    check_vec(vec)?;
    super::assemble(
        sources,
        &row_transform_kernel_name(op, vec),
        "ops/sampling.cuh",
        THREADS,
        "fi::RowTransformArgs",
        &format!("fi::transform_row<{}, {vec}>(args, blockIdx.x);", op.code()),
    )
}

/// The name of the chain speculative sampling instance for `vec`.
pub fn speculative_kernel_name(vec: u32) -> String {
    format!("sampling_chain_speculative_v{vec}")
}

/// The chain speculative sampling kernel for `vec` elements per access: one entry
/// `ferrinfer_sampling_chain_speculative_v<vec>(const fi::SpeculativeArgs)`.
pub fn speculative_unit(vec: u32) -> Result<TranslationUnit, String> {
    assemble_speculative(&Sources::from_env(), vec)
}

fn assemble_speculative(sources: &Sources, vec: u32) -> Result<TranslationUnit, String> {
    check_vec(vec)?;
    super::assemble(
        sources,
        &speculative_kernel_name(vec),
        "ops/sampling.cuh",
        THREADS,
        "fi::SpeculativeArgs",
        &format!("fi::chain_speculative<{vec}>(args, blockIdx.x);"),
    )
}

fn check_vec(vec: u32) -> Result<(), String> {
    if SAMPLING_VEC_WIDTHS.contains(&vec) {
        Ok(())
    } else {
        Err(format!(
            "no sampling kernel for {vec} elements per access (instantiated: \
             {SAMPLING_VEC_WIDTHS:?})"
        ))
    }
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
    for vec in SAMPLING_VEC_WIDTHS {
        for op in RowTransform::ALL {
            units.push(assemble_transform(&sources, op, vec)?);
        }
        units.push(assemble_speculative(&sources, vec)?);
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
        assert_eq!(std::mem::size_of::<RowTransformArgs>(), 6 * 8 + 6 * 4);
        assert_eq!(std::mem::size_of::<SpeculativeArgs>(), 7 * 8 + 4 * 4);
        let header = Sources::BuiltIn.header("ops/sampling.cuh").unwrap();
        let philox = Sources::BuiltIn.header("ops/philox.cuh").unwrap();
        assert!(header.contains("sizeof(RowTransformArgs) == 6 * 8 + 6 * 4"));
        assert!(header.contains("sizeof(SpeculativeArgs) == 7 * 8 + 4 * 4"));
        assert!(header.contains("kSoftmax = 0, kTopKRenorm = 1, kTopPRenorm = 2, kTopKMask = 3;"));
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
        assert_eq!(all_units().unwrap().len(), 6 + 3 * 5 + 1);
        assert!(
            row_transform_unit(RowTransform::TopPRenorm, 2)
                .unwrap()
                .source
                .contains("fi::transform_row<2, 2>(args, blockIdx.x);")
        );
        assert!(
            speculative_unit(4)
                .unwrap()
                .source
                .contains("fi::chain_speculative<4>(args, blockIdx.x);")
        );
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
