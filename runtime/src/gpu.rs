//! One CUDA device: its context and stream, its architecture, and the kernels loaded on it.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, DeviceRepr, ValidAsZeroBits};

use crate::error::{Error, Result};

/// A CUDA device with one stream on which all of ferrinfer's work is ordered.
pub struct Gpu {
    ordinal: usize,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
}

impl Gpu {
    /// Open device `ordinal`. Fails with [`Error::CudaUnavailable`] when there is no driver or GPU.
    pub fn new(ordinal: usize) -> Result<Self> {
        crate::jit::toolkit::load_driver()?;
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| Error::CudaUnavailable(format!("cannot open GPU {ordinal}: {e}")))?;
        let stream = ctx.default_stream();
        Ok(Gpu {
            ordinal,
            ctx,
            stream,
        })
    }
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
    /// Copy host data to a new device buffer.
    pub fn upload<T: DeviceRepr + ValidAsZeroBits>(&self, data: &[T]) -> Result<CudaSlice<T>> {
        if data.is_empty() {
            // A zero-length allocation is refused by some drivers; one element keeps pointers valid.
            return Ok(self.stream.alloc_zeros::<T>(1)?);
        }
        Ok(self.stream.clone_htod(data)?)
    }
    /// The raw device address of a buffer, for kernel argument structs.
    pub fn device_ptr<T>(&self, s: &CudaSlice<T>) -> u64 {
        let (ptr, _sync) = s.device_ptr(&self.stream);
        ptr
    }
}
