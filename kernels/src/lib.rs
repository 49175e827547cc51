//! ferrinfer's CUDA kernel templates, and the code that assembles one NVRTC translation unit from a
//! template, a lowered variant, a head dim and a dtype.
//!
//! The templates live in `cuda/<concept>/` and are compiled into this crate; `FERRINFER_KERNEL_DIR`
//! points at a checkout's `kernels/cuda` to read them from disk instead while developing.

pub mod abi;
mod decode;
mod merge;
mod merge_states;
mod prefill;
mod sources;
mod tu;
pub mod workspace;

pub use merge::merge_launch_dims;
pub use merge_states::{
    MERGE_STATES_VEC_WIDTHS, MergeStatesArgs, merge_states_launch_dims, merge_states_unit,
    merge_states_vec_width,
};
pub use sources::{HEADER_NAMES, KERNEL_DIR_VAR, header};
pub use tu::{TranslationUnit, VariantSource, translation_unit};

/// Element type of Q, K, V and O (accumulation is always f32).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    F16,
    Bf16,
}

impl DType {
    pub const ALL: [DType; 2] = [DType::F16, DType::Bf16];
    /// Short name used in kernel names and cache keys.
    pub fn name(self) -> &'static str {
        match self {
            DType::F16 => "f16",
            DType::Bf16 => "bf16",
        }
    }
}

/// Which kernel template.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KernelKind {
    /// Prefill and append: many query rows per request, over ragged or paged KV.
    Prefill,
    /// Decode: one query row per request, over paged (or ragged) KV.
    Decode,
}

impl KernelKind {
    pub const ALL: [KernelKind; 2] = [KernelKind::Prefill, KernelKind::Decode];
    pub fn name(self) -> &'static str {
        match self {
            KernelKind::Prefill => "prefill",
            KernelKind::Decode => "decode",
        }
    }
}

/// Head dims for which kernels are instantiated.
pub const HEAD_DIMS: [u32; 3] = [64, 128, 256];

/// One kernel instance, short of the variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KernelConfig {
    pub kind: KernelKind,
    pub head_dim: u32,
    pub dtype: DType,
    /// Query rows (packed with the GQA group) per CTA, chosen by the plan: 16, 64 or 128 for
    /// prefill; 0 where the kernel does not tile queries (decode).
    pub cta_tile_q: u32,
    /// Keys per K/V shared-memory tile of the prefill template, 32 or 64; 0 for the template's
    /// default (64 at head dim 64, 32 above). See [`wide_kv_tile`].
    pub kv_tile: u32,
}

impl KernelConfig {
    /// Kernel name in cache keys and logs, e.g. `prefill_hd128_bf16_q64`.
    pub fn name(&self) -> String {
        let mut tile = if self.cta_tile_q > 0 {
            format!("_q{}", self.cta_tile_q)
        } else {
            String::new()
        };
        if self.kv_tile > 0 {
            tile += &format!("_k{}", self.kv_tile);
        }
        format!(
            "{}_hd{}_{}{tile}",
            self.kind.name(),
            self.head_dim,
            self.dtype.name()
        )
    }
    /// Whether the kernel reads the plan's work list (and so may split the KV and need a merge).
    pub fn uses_work_list(&self) -> bool {
        tu::uses_work_list(self)
    }
}

/// How to launch an instance: grid, block and dynamic shared memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchDims {
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub shared_bytes: u32,
}

/// The same instance with a 64-key K/V tile, where the prefill template offers one: the 128-row
/// tile at head dim 128 (half the per-tile softmax, rescale and barrier cost per key; +14-16% on
/// an H200). It pays only where two CTAs of it fit an SM, and its registers are tight: the
/// runtime checks the first against the device and keeps it only if ptxas reports no spills.
pub fn wide_kv_tile(cfg: &KernelConfig) -> Option<KernelConfig> {
    prefill::wide_kv_tile(cfg)
}

/// The launch geometry the template of `cfg` expects for these arguments.
pub fn launch_dims(cfg: &KernelConfig, args: &abi::AttnArgs) -> LaunchDims {
    tu::launch_dims(cfg, args)
}
