//! A context-parallel `run` recorded into a CUDA graph, for the decode and the prefill alike.

use std::any::Any;
use std::sync::Arc;

use cudarc::driver::{CudaEvent, CudaGraph};

use crate::attention::wrappers::{Input, RunBuffers};
use crate::device::backend::Buffer;
use crate::device::dtype::Element;
use crate::device::gpu::Gpu;
use crate::distributed::decode::ContextParallelDecode;
use crate::error::{Error, Result};
use crate::variant::Variant;

/// A context-parallel `run` (of a [`ContextParallelDecode`], or of a
/// [`super::ContextParallelPrefill`] as `ContextParallelGraph<T, ContextParallelPrefill<T>>`)
/// recorded into a CUDA graph with everything it points at (see [`crate::GraphRun`], whose rules
/// it follows). `launch` and `replan` are collective.
pub struct ContextParallelGraph<T: Element, P = ContextParallelDecode<T>> {
    // Fields drop in order: the graph before what it points at.
    graph: CudaGraph,
    gpu: Arc<Gpu>,
    before: CudaEvent,
    after: CudaEvent,
    pub(super) plan: P,
    buffers: RunBuffers<T>,
    _variant: Box<dyn Any + Send + Sync>,
}

impl<T: Element, P> ContextParallelGraph<T, P> {
    /// Run `run` once (it compiles and loads the kernels and sets up NCCL's connections, which a
    /// capture cannot do), then record it into a graph that owns the plan, variant and buffers.
    pub(super) fn record<V: Variant>(
        plan: P,
        graph_mode: bool,
        gpu: Arc<Gpu>,
        variant: V,
        mut buffers: RunBuffers<T>,
        run: fn(&P, &V, &mut RunBuffers<T>) -> Result<()>,
    ) -> Result<Self> {
        if !graph_mode {
            return Err(Error::invalid(
                "capture needs a plan made in CUDA-graph mode (PlanConfig::graph)",
            ));
        }
        let mut once = || run(&plan, &variant, &mut buffers);
        once()?;
        let graph = gpu.capture(once)?;
        Ok(ContextParallelGraph {
            graph,
            before: gpu.event()?,
            after: gpu.event()?,
            gpu,
            plan,
            buffers,
            _variant: Box::new(variant),
        })
    }

    /// Replay the recorded run on the plan's current step. Asynchronous.
    pub fn launch(&self) -> Result<()> {
        self.gpu.replay(&self.graph, &self.before, &self.after)
    }
    /// Overwrite an input with `data` (its full length), keeping its device address.
    pub fn write(&mut self, input: Input, data: &[T]) -> Result<()> {
        self.buffers.write(input, data)
    }
    /// The plan.
    pub fn plan(&self) -> &P {
        &self.plan
    }
    /// The merged output (rows past the batch hold unspecified values).
    pub fn o(&self) -> &Buffer<T> {
        &self.buffers.o
    }
    /// The merged LSE, when captured with one.
    pub fn lse(&self) -> Option<&Buffer<f32>> {
        self.buffers.lse.as_ref()
    }
}
