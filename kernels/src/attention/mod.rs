//! The attention kernel families and [`FAMILIES`], the table that lists them.
//!
//! A family is one kernel template (a header under `cuda/` and its device function) and
//! everything the rest of the code asks about it: how its entry instantiates the template, its
//! launch geometry, the head dims and tiles it is built for, its tile function (see [`tiles`]) and
//! the instances a device may load. Each family describes itself in its own file by one
//! [`Family`] value; the assembler, the planner and the dispatcher look the row up by
//! [`KernelKind`] and never match on the kind. Every attention family reads the plan's work list
//! and has the [`merge`] pass for split-KV partial results.
//!
//! Adding a family: its header, a file here with its `FAMILY`, its variant of [`KernelKind`] (its
//! identity in names and on the wire) and one row in [`FAMILIES`].

pub mod decode;
pub mod merge;
pub mod prefill;
pub mod tiles;

use crate::abi::AttnArgs;
use crate::config::{ArchClass, DType, KernelConfig, KernelKind, LaunchDims};
use tiles::{SmResidency, TileInput, Tiles};

/// One kernel family: its template and the answers the rest of the code needs about it.
pub struct Family {
    /// Which family (its name is `name`).
    pub kind: KernelKind,
    /// Short name, in kernel names, cache keys and messages.
    pub name: &'static str,
    /// Its number in the plan workspace's header (the kernel kind word); unique in the table.
    pub code: u32,
    /// The header that defines the kernel of an instance (it includes what it needs): a family
    /// may have one template per architecture class.
    pub header: fn(&KernelConfig) -> &'static str,
    /// The device function the entry calls, e.g. `fi::prefill`, as
    /// `function<Variant, Params, dtype, head_dim{template_args}>(args, params)`.
    pub function: fn(&KernelConfig) -> &'static str,
    /// Template arguments after `<Variant, Params, dtype, head_dim`, e.g. `, 128, 32` for tiles.
    pub template_args: fn(&KernelConfig) -> String,
    /// Parameters the entry takes after `(args, params)` and hands on after them, as
    /// (declarations, arguments); both empty for none. The FA3 form takes its TMA maps.
    pub entry_extra: fn(&KernelConfig) -> (&'static str, &'static str),
    /// C++ arguments of `__launch_bounds__`, from the header's own constants where it has them.
    pub launch_bounds: fn(&KernelConfig) -> &'static str,
    /// The launch geometry the template expects for these arguments.
    pub launch_dims: fn(&KernelConfig, &AttnArgs) -> LaunchDims,
    /// Head dims it is instantiated for (q/k and v/o equal).
    pub head_dims: &'static [u32],
    /// Values of [`KernelConfig::cta_tile_q`] an instance may have (0: the family's default).
    pub query_tiles: &'static [u32],
    /// Values of [`KernelConfig::kv_tile`] an instance may have (0: the family's default).
    pub kv_tiles: &'static [u32],
    /// Values of [`KernelConfig::kv_warps`] an instance may have (0: one warp along the keys).
    pub kv_warps: &'static [u32],
    /// The tile function: every tile parameter of a batch, with its reasons.
    pub tiles: fn(&TileInput<'_>) -> Tiles,
    /// Rules on an instance's tiles beyond the lists above (a tile some template alone has).
    pub check_tiles: fn(&KernelConfig) -> Result<(), String>,
    /// Every instance a device of `arch` with SMs like the given one may load (short of the
    /// variant), for filling caches ahead of time and for checking every instance compiles.
    pub instances: fn(ArchClass, &dyn SmResidency) -> Vec<KernelConfig>,
}

/// Every attention kernel family.
pub static FAMILIES: &[&Family] = &[&prefill::FAMILY, &decode::FAMILY];

/// The row of `kind`; a test checks that every kind has exactly one.
pub(crate) fn family(kind: KernelKind) -> &'static Family {
    FAMILIES
        .iter()
        .find(|f| f.kind == kind)
        .expect("every KernelKind has a row in FAMILIES")
}

impl Family {
    /// The family whose [`Family::code`] is `code`.
    pub fn from_code(code: u32) -> Option<&'static Family> {
        FAMILIES.iter().copied().find(|f| f.code == code)
    }

    /// Whether an instance exists for `cfg` (of this family); the error says what is supported.
    pub fn check(&self, cfg: &KernelConfig) -> Result<(), String> {
        let name = self.name;
        if cfg.head_dim_qk != cfg.head_dim_vo {
            return Err(format!(
                "no {name} kernel with different q/k and v/o head dims ({} and {}): only equal \
                 head dims are instantiated",
                cfg.head_dim_qk, cfg.head_dim_vo
            ));
        }
        if !self.head_dims.contains(&cfg.head_dim_qk) {
            return Err(format!(
                "no {name} kernel for head_dim {} (instantiated: {:?})",
                cfg.head_dim_qk, self.head_dims
            ));
        }
        if cfg.kv_dtype != cfg.dtype {
            return Err(format!(
                "no {name} kernel with a {} KV cache for {} queries: only equal element types are \
                 instantiated",
                cfg.kv_dtype.name(),
                cfg.dtype.name()
            ));
        }
        if !self.query_tiles.contains(&cfg.cta_tile_q) {
            return Err(format!(
                "no {name} kernel with a query tile of {} rows (possible: {:?})",
                cfg.cta_tile_q, self.query_tiles
            ));
        }
        if !self.kv_tiles.contains(&cfg.kv_tile) {
            return Err(format!(
                "no {name} kernel with a K/V tile of {} keys (possible: {:?})",
                cfg.kv_tile, self.kv_tiles
            ));
        }
        if !self.kv_warps.contains(&cfg.kv_warps) {
            return Err(format!(
                "no {name} kernel with {} warps along the keys (possible: {:?}, where 0 is one)",
                cfg.kv_warps, self.kv_warps
            ));
        }
        (self.check_tiles)(cfg)
    }

    /// The family's instances of `tiles` (its [`Family::query_tiles`] choices, in order) for every
    /// head dim and dtype, each followed by the extra instances `extra` adds (the wide K/V tile,
    /// two warps along the keys).
    pub(crate) fn each_instance(
        &self,
        arch: ArchClass,
        tiles: &[u32],
        extra: impl Fn(&KernelConfig) -> Vec<KernelConfig>,
    ) -> Vec<KernelConfig> {
        let mut out = Vec::new();
        for &head_dim in self.head_dims {
            for dtype in DType::ALL {
                for &cta_tile_q in tiles {
                    let cfg = KernelConfig::new(self.kind, head_dim, dtype, arch).with_tiles(
                        crate::InstanceTiles {
                            cta_tile_q,
                            kv_tile: 0,
                            kv_warps: 0,
                        },
                    );
                    out.push(cfg);
                    out.extend(extra(&cfg));
                }
            }
        }
        out
    }
}

impl std::fmt::Debug for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Family({})", self.name)
    }
}

/// The launch geometry the template of `cfg` expects for these arguments.
pub fn launch_dims(cfg: &KernelConfig, args: &AttnArgs) -> LaunchDims {
    (cfg.kind.family().launch_dims)(cfg, args)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_one_row() {
        assert_eq!(FAMILIES.len(), KernelKind::ALL.len());
        for (row, kind) in FAMILIES.iter().zip(KernelKind::ALL) {
            assert_eq!(row.kind, kind, "FAMILIES follows KernelKind::ALL");
            assert_eq!(FAMILIES.iter().filter(|f| f.kind == kind).count(), 1);
            assert_eq!(Family::from_code(row.code).map(|f| f.kind), Some(kind));
        }
    }

    #[test]
    fn unbuilt_shapes_are_refused_with_what_exists() {
        let cfg = KernelConfig::new(KernelKind::Decode, 128, DType::Bf16, ArchClass::Sm80);
        let family = cfg.kind.family();
        assert_eq!(family.check(&cfg), Ok(()));
        let mla = cfg.with_head_dims(576, 512);
        assert!(family.check(&mla).unwrap_err().contains("576 and 512"));
        let fp8ish = cfg.with_kv_dtype(DType::F16);
        assert!(family.check(&fp8ish).unwrap_err().contains("f16 KV cache"));
        let tiled = KernelConfig {
            cta_tile_q: 64,
            ..cfg
        };
        assert!(
            family
                .check(&tiled)
                .unwrap_err()
                .contains("query tile of 64")
        );
        let warps = KernelConfig { kv_warps: 2, ..cfg };
        assert!(
            family
                .check(&warps)
                .unwrap_err()
                .contains("2 warps along the keys")
        );
    }
}
