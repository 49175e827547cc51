//! Attention: the batch description (validated, opaque), the planner, the dispatcher, the plan/run
//! wrappers, the single-request calls, and the CPU reference they are all tested against.

pub mod batch;
pub mod dispatch;
mod launch;
pub mod plan;
pub mod reference;
pub mod single;
pub mod wrappers;
