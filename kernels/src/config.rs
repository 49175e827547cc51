//! What names one kernel instance, short of the variant: [`KernelConfig`] and its parts (the
//! family, head dims, element types, arch class, tiles), and the launch geometry of an instance.

/// Element type of Q, K, V and O (accumulation is always f32).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    /// IEEE half precision.
    F16,
    /// bfloat16.
    Bf16,
}

impl DType {
    /// Every element type kernels are instantiated for.
    pub const ALL: [DType; 2] = [DType::F16, DType::Bf16];
    /// Short name used in kernel names and cache keys.
    pub fn name(self) -> &'static str {
        match self {
            DType::F16 => "f16",
            DType::Bf16 => "bf16",
        }
    }
}

/// Which kernel family: the identity of a row of [`crate::attention::FAMILIES`], which describes
/// everything else about it (template, tiles, launch geometry, instances).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KernelKind {
    /// Prefill and append: many query rows per request, over ragged or paged KV.
    Prefill,
    /// Decode: one query row per request, over paged (or ragged) KV.
    Decode,
}

impl KernelKind {
    /// Every family, in the order of [`crate::attention::FAMILIES`].
    pub const ALL: [KernelKind; 2] = [KernelKind::Prefill, KernelKind::Decode];
    /// Short name used in kernel names, cache keys and messages.
    pub fn name(self) -> &'static str {
        self.family().name
    }
    /// The family's row of [`crate::attention::FAMILIES`].
    pub fn family(self) -> &'static crate::attention::Family {
        crate::attention::family(self)
    }
}

/// A class of GPU architectures that share kernel code: the dispatcher fills it from the device
/// (compute capability), and it is part of the kernel name and so of every cache key.
///
/// Today both classes run the same FA2 templates; the FA3 (wgmma, TMA) templates will be sm90a only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ArchClass {
    /// sm_80 and newer, except sm_90: mma.sync, ldmatrix, cp.async (Ampere, Ada, Blackwell).
    Sm80,
    /// sm_90a (Hopper H100/H200): also wgmma, TMA and setmaxnreg, which exist on 9.0 alone.
    Sm90a,
}

impl ArchClass {
    /// Every class.
    pub const ALL: [ArchClass; 2] = [ArchClass::Sm80, ArchClass::Sm90a];

    /// The class of a device of compute capability `major.minor`; `None` below sm_80, which no
    /// kernel supports.
    pub fn of(major: u32, minor: u32) -> Option<ArchClass> {
        match (major, minor) {
            // wgmma and setmaxnreg are sm_90a only: sm_100 has tcgen05 instead, so Blackwell
            // runs the sm80 code.
            (9, 0) => Some(ArchClass::Sm90a),
            (8.., _) => Some(ArchClass::Sm80),
            _ => None,
        }
    }

    /// Short name, e.g. `sm90a`.
    pub fn name(self) -> &'static str {
        match self {
            ArchClass::Sm80 => "sm80",
            ArchClass::Sm90a => "sm90a",
        }
    }

    /// Whether a device of compute capability `major.minor` runs this class's code.
    pub fn runs_on(self, major: u32, minor: u32) -> bool {
        match self {
            ArchClass::Sm80 => major >= 8,
            ArchClass::Sm90a => (major, minor) == (9, 0),
        }
    }
}

/// Head dims for which kernels are instantiated (the same for q/k and v/o).
pub const HEAD_DIMS: [u32; 3] = [64, 128, 256];

/// One kernel instance, short of the variant. Build it with [`KernelConfig::new`] and the `with_`
/// methods; [`crate::attention::Family::check`] says whether a kernel exists for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KernelConfig {
    /// The kernel family.
    pub kind: KernelKind,
    /// Elements per query and key head.
    pub head_dim_qk: u32,
    /// Elements per value and output head (MLA: 512 against 576 for q/k); only equal head dims
    /// are instantiated today.
    pub head_dim_vo: u32,
    /// Element type of q and o.
    pub dtype: DType,
    /// Element type of the K/V cache (FP8 later); only `dtype` is instantiated today.
    pub kv_dtype: DType,
    /// The architecture class the instance is built for.
    pub arch: ArchClass,
    /// Query rows (packed with the GQA group) per CTA, chosen by the plan: 16, 64 or 128 for
    /// prefill; 0 where the kernel does not tile queries (decode).
    pub cta_tile_q: u32,
    /// Keys per K/V shared-memory tile of the prefill template, 32 or 64; 0 for the template's
    /// default (64 at head dim 64, 32 above), which the tile function chooses unless the wide
    /// tile pays (see [`crate::attention::prefill::tiles`]).
    pub kv_tile: u32,
    /// Warps along the keys of the prefill template's 16-row tile: 0 for one (the template's
    /// default, the only count of the other tiles), 2 for two, which stream their own halves of
    /// every K/V tile and merge in shared memory. The plan picks it per batch (see
    /// [`crate::attention::prefill::tiles`]).
    pub kv_warps: u32,
}

impl KernelConfig {
    /// The instance of `kind` for one head dim (q/k and v/o alike) and one element type (q, o
    /// and the KV cache alike) on `arch`, with the family's default tiles.
    pub fn new(kind: KernelKind, head_dim: u32, dtype: DType, arch: ArchClass) -> Self {
        KernelConfig {
            kind,
            head_dim_qk: head_dim,
            head_dim_vo: head_dim,
            dtype,
            kv_dtype: dtype,
            arch,
            cta_tile_q: 0,
            kv_tile: 0,
            kv_warps: 0,
        }
    }

    /// This config with other tiles.
    pub fn with_tiles(self, tiles: InstanceTiles) -> Self {
        KernelConfig {
            cta_tile_q: tiles.cta_tile_q,
            kv_tile: tiles.kv_tile,
            kv_warps: tiles.kv_warps,
            ..self
        }
    }

    /// This config with separate q/k and v/o head dims.
    pub fn with_head_dims(self, qk: u32, vo: u32) -> Self {
        KernelConfig {
            head_dim_qk: qk,
            head_dim_vo: vo,
            ..self
        }
    }

    /// This config with another K/V cache element type.
    pub fn with_kv_dtype(self, kv_dtype: DType) -> Self {
        KernelConfig { kv_dtype, ..self }
    }

    /// The tile fields.
    pub fn tiles(&self) -> InstanceTiles {
        InstanceTiles {
            cta_tile_q: self.cta_tile_q,
            kv_tile: self.kv_tile,
            kv_warps: self.kv_warps,
        }
    }

    /// Kernel name in entries, cache keys and logs, e.g. `prefill_hd128_bf16_q64` (sm80) or
    /// `prefill_hd128_bf16_q64_sm90a`. Each part beyond the family, head dim and dtype is named
    /// only where it differs from the plain case (unequal head dims `hd576x512`, a K/V type
    /// `_kvf16`, tiles `_q64_k64`, warps along the keys `_kw2`, a class other than sm80), so
    /// names of older fields stay.
    pub fn name(&self) -> String {
        let mut name = format!("{}_hd{}", self.kind.name(), self.head_dim_qk);
        if self.head_dim_vo != self.head_dim_qk {
            name += &format!("x{}", self.head_dim_vo);
        }
        name += &format!("_{}", self.dtype.name());
        if self.kv_dtype != self.dtype {
            name += &format!("_kv{}", self.kv_dtype.name());
        }
        if self.cta_tile_q > 0 {
            name += &format!("_q{}", self.cta_tile_q);
        }
        if self.kv_tile > 0 {
            name += &format!("_k{}", self.kv_tile);
        }
        if self.kv_warps > 0 {
            name += &format!("_kw{}", self.kv_warps);
        }
        if self.arch != ArchClass::Sm80 {
            name += &format!("_{}", self.arch.name());
        }
        name
    }
}

/// The tile fields of a [`KernelConfig`]: what is compiled into an instance.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InstanceTiles {
    /// [`KernelConfig::cta_tile_q`].
    pub cta_tile_q: u32,
    /// [`KernelConfig::kv_tile`].
    pub kv_tile: u32,
    /// [`KernelConfig::kv_warps`].
    pub kv_warps: u32,
}

/// How to launch an instance: grid, block and dynamic shared memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchDims {
    /// Blocks in x, y, z.
    pub grid: [u32; 3],
    /// Threads per block in x, y, z.
    pub block: [u32; 3],
    /// Dynamic shared memory per block, in bytes.
    pub shared_bytes: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_grow_only_where_a_config_leaves_the_plain_case() {
        let cfg = KernelConfig::new(KernelKind::Prefill, 128, DType::Bf16, ArchClass::Sm80);
        assert_eq!(cfg.name(), "prefill_hd128_bf16");
        let tiled = cfg.with_tiles(InstanceTiles {
            cta_tile_q: 64,
            kv_tile: 0,
            kv_warps: 0,
        });
        assert_eq!(tiled.name(), "prefill_hd128_bf16_q64");
        let short = cfg.with_tiles(InstanceTiles {
            cta_tile_q: 16,
            kv_tile: 0,
            kv_warps: 2,
        });
        assert_eq!(short.name(), "prefill_hd128_bf16_q16_kw2");
        assert_eq!(short.tiles().kv_warps, 2);
        let hopper = KernelConfig {
            arch: ArchClass::Sm90a,
            ..tiled
        };
        assert_eq!(hopper.name(), "prefill_hd128_bf16_q64_sm90a");
        let mla = KernelConfig::new(KernelKind::Decode, 576, DType::Bf16, ArchClass::Sm90a)
            .with_head_dims(576, 512)
            .with_kv_dtype(DType::F16);
        assert_eq!(mla.name(), "decode_hd576x512_bf16_kvf16_sm90a");
    }

    #[test]
    fn arch_classes_follow_the_compute_capability() {
        assert_eq!(ArchClass::of(7, 5), None);
        assert_eq!(ArchClass::of(8, 0), Some(ArchClass::Sm80));
        assert_eq!(ArchClass::of(8, 9), Some(ArchClass::Sm80));
        assert_eq!(ArchClass::of(9, 0), Some(ArchClass::Sm90a));
        assert_eq!(ArchClass::of(10, 0), Some(ArchClass::Sm80));
        for class in ArchClass::ALL {
            assert!(class.runs_on(9, 0));
            assert!(!class.runs_on(7, 5));
        }
        assert!(!ArchClass::Sm90a.runs_on(8, 0) && !ArchClass::Sm90a.runs_on(10, 0));
    }
}
