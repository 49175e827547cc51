//! What a family's tile function takes ([`TileInput`]) and returns ([`Tiles`]: every tile
//! parameter, and the reasons for each), and the query-tile rule the families share.
//!
//! The plan calls the family's function once per batch and records its answer in the work list;
//! nothing else chooses a tile.

use std::fmt;

use crate::config::{InstanceTiles, KernelConfig};

/// What decides how many CTAs of a kernel one SM runs at once: the runtime's description of the
/// device's SMs (`SmResources`) answers it.
pub trait SmResidency {
    /// CTAs of `threads` threads using `shared_bytes` of dynamic shared memory that fit on one
    /// SM when every thread holds `registers_per_thread` registers (at least 1).
    fn resident_ctas(&self, threads: u32, shared_bytes: u32, registers_per_thread: u32) -> u32;
    /// Whether one CTA using `shared_bytes` of dynamic shared memory fits an SM at all
    /// (`resident_ctas` counts at least 1, so a choice between shapes asks this first).
    fn fits(&self, shared_bytes: u32) -> bool;
}

/// Registers per thread a variant's instance may take (ptxas' limit). The plan is made before any
/// variant is known, so occupancy is counted with the most a variant could use.
pub const MAX_REGISTERS: u32 = 255;

/// What a tile function may look at: the batch's shape, the heads, the device and the mode.
#[derive(Clone, Copy)]
pub struct TileInput<'a> {
    /// Packed query rows (query rows times the group size) of the requests that have any.
    pub packed_rows: u64,
    /// Requests with at least one query row.
    pub requests: u64,
    /// Query heads per KV head.
    pub group_size: u32,
    /// Keys per page of a paged KV cache (`None`: contiguous or ragged).
    pub page_size: Option<u32>,
    /// Elements per query and key head.
    pub head_dim_qk: u32,
    /// Elements per value and output head.
    pub head_dim_vo: u32,
    /// The device's SMs, when known; without them the function cannot tell occupancy and keeps
    /// the choices that need none.
    pub sm: Option<&'a dyn SmResidency>,
    /// SMs of the device: with `sm`, how many CTAs make a wave.
    pub num_sms: u32,
    /// Work items (CTAs) of the batch at a query tile of this many packed rows, every request's
    /// keys in one chunk: the grid before any KV split.
    pub work_items: &'a dyn Fn(u32) -> u64,
    /// Batch-invariant mode: no tile may depend on the other requests of the batch.
    pub batch_invariant: bool,
    /// Every request has one query row (a decode step on a query-tiling template).
    pub one_row_per_request: bool,
    /// A query tile the caller fixed (16, 64 or 128), for families that tile queries.
    pub query_tile: Option<u32>,
    /// Warps along the keys the caller fixed (1 or 2), for the tiles that have a choice (the
    /// prefill template's 16-row tile).
    pub kv_warps: Option<u32>,
}

/// Every tile parameter of one plan, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tiles {
    /// Packed query rows per work item (what the plan cuts requests into).
    pub cta_tile_q: u32,
    /// Keys per K/V shared-memory tile the kernel streams.
    pub kv_tile: u32,
    /// Threads per CTA.
    pub threads: u32,
    /// K/V tiles in flight (the depth of the copy pipeline).
    pub stages: u32,
    /// Dynamic shared memory per CTA, in bytes (0 for a kernel with static shared memory only).
    pub shared_bytes: u32,
    /// Work items per SM the KV-split search aims for; `None` when it depends on an SM the input
    /// did not describe.
    pub ctas_per_sm: Option<u32>,
    /// The instance to run: its [`KernelConfig`] tile fields.
    pub instance: InstanceTiles,
    /// The instance to run instead when the variant's build of `instance` spills registers.
    pub fallback: Option<InstanceTiles>,
    /// Tiles the plan may take instead, when its KV split predicts them faster (the one-warp
    /// 16-row tile's narrow K/V form: more CTAs an SM, each slower). A plan's recorded tiles
    /// have none: the plan chose.
    pub alternative: Option<Box<Tiles>>,
    /// One line per decision, in the order they were made.
    pub reasons: Vec<String>,
}

impl Tiles {
    /// `base` (family, head dims, dtypes, arch) with the tiles of the instance to run.
    pub fn config(&self, base: KernelConfig) -> KernelConfig {
        base.with_tiles(self.instance)
    }

    /// `base` with the tiles of the fallback instance, if there is one.
    pub fn fallback_config(&self, base: KernelConfig) -> Option<KernelConfig> {
        self.fallback.map(|t| base.with_tiles(t))
    }

    /// Threads per CTA in warps.
    pub fn warps(&self) -> u32 {
        self.threads / 32
    }
}

impl fmt::Display for Tiles {
    /// One line of numbers, then the reasons, one per line (for logs).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "query tile {} rows, K/V tile {} keys, {} threads, {} stages, {} B shared",
            self.cta_tile_q, self.kv_tile, self.threads, self.stages, self.shared_bytes
        )?;
        if let Some(c) = self.ctas_per_sm {
            write!(f, ", {c} CTAs per SM")?;
        }
        for r in &self.reasons {
            write!(f, "\n  - {r}")?;
        }
        Ok(())
    }
}

/// Query tile rows for `requests` non-empty requests with `packed_rows` packed query rows in all
/// (query rows times group size), at head dim `head_dim`, and why.
pub fn query_tile(packed_rows: u64, requests: u64, head_dim: u32) -> (u32, &'static str) {
    let avg_at_most = |rows: u64| packed_rows <= rows * requests;
    if avg_at_most(16) {
        return (
            16,
            "16 rows: one tensor-core MMA tile (m16), the least a CTA can hold; decode and short \
             appends have a handful of packed rows, and a larger tile would be mostly padding",
        );
    }
    if head_dim >= 256 {
        return (
            64,
            "64 rows: at head dim 256 a 128-row f32 output accumulator (128 KiB) does not fit \
             the registers",
        );
    }
    if avg_at_most(64) {
        return (
            64,
            "64 rows (4 warps x 16) already reuse each K/V tile four times over, and keep four \
             times as many CTAs in the grid as 128 rows would for medium requests",
        );
    }
    (
        128,
        "128 rows: long prefills; halving the K/V traffic per query row again is what it takes \
         to be compute-bound rather than bandwidth-bound",
    )
}

/// [`query_tile`] without the reason.
pub fn cta_tile_q(packed_rows: u64, requests: u64, head_dim: u32) -> u32 {
    query_tile(packed_rows, requests, head_dim).0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tile_follows_the_packed_query_length() {
        assert_eq!(cta_tile_q(16, 1, 128), 16);
        assert_eq!(cta_tile_q(8 * 64, 64, 128), 16);
        assert_eq!(cta_tile_q(17, 1, 128), 64);
        assert_eq!(cta_tile_q(64 * 10, 10, 128), 64);
        assert_eq!(cta_tile_q(65 * 10, 10, 128), 128);
        assert_eq!(cta_tile_q(8192 * 4, 1, 256), 64);
        assert_eq!(cta_tile_q(17, 1, 256), 64);
        assert_eq!(cta_tile_q(0, 0, 128), 16);
    }
}
