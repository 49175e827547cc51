//! Compiles only if ferrinfer and this crate's cudarc agree on one set of cudarc features.

/// A ferrinfer backend and a cudarc context type side by side, and ferrinfer's runtime checks.
pub fn both() -> (ferrinfer::Backend, Option<std::sync::Arc<cudarc::driver::CudaContext>>) {
    let ctx = cudarc::driver::CudaContext::new(0).ok();
    (ferrinfer::Backend::Cpu, ctx)
}
