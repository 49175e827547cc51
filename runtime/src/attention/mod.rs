//! Attention: the batch description (validated, opaque), the planner, the dispatcher, the plan/run
//! wrappers, the single-request calls, and the CPU reference they are all tested against.

pub(crate) mod batch;
pub mod dispatch;
pub(crate) mod launch;
pub mod plan;
pub mod reference;
pub(crate) mod single;
pub(crate) mod tma;
mod wave_model;
pub(crate) mod wrappers;

pub use batch::{Batch, Heads, KvIndex, KvLayout, KvStrides, QoStrides, indptr};
pub use single::Single;
pub use wrappers::{
    BatchDecode, BatchPrefill, DecodeKernel, FA3_LONG_TILE_MIN_KV, GraphCapacity, GraphRun, Input,
    KvTile, KvWarps, PlanConfig, PrefillKernel, RunBuffers, TENSOR_CORE_MIN_GROUP,
};
