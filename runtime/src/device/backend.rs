//! Where attention runs: a CUDA GPU, or the CPU reference backend. Buffers live on their backend.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut};

use crate::device::dtype::Pod;
use crate::device::gpu::Gpu;
use crate::error::{Error, Result};

/// A backend: the CUDA device ferrinfer compiles kernels for, or the CPU reference.
#[derive(Clone, Debug)]
pub enum Backend {
    /// The CPU reference (f64 accumulation): correct everywhere, slow.
    Cpu,
    /// A CUDA GPU.
    Cuda(Arc<Gpu>),
}

impl Backend {
    /// GPU 0 when a CUDA driver and GPU are present, otherwise the CPU reference. The second value
    /// says why the GPU was not used, when it was not.
    pub fn auto() -> (Backend, Option<Error>) {
        match Gpu::get(0) {
            Ok(gpu) => (Backend::Cuda(gpu), None),
            Err(e) => (Backend::Cpu, Some(e)),
        }
    }
    /// CUDA device `ordinal`, or an error that says why not. Every call for one ordinal returns the
    /// same [`Gpu`] (one context and stream per device and process; see [`Gpu::get`]).
    pub fn cuda(ordinal: usize) -> Result<Backend> {
        Ok(Backend::Cuda(Gpu::get(ordinal)?))
    }
    /// The GPU of a caller's cudarc `stream`, with all of ferrinfer's work (launches, copies,
    /// allocations, plan uploads, [`Backend::synchronize`]) on that stream, so that it is
    /// ordered with the caller's work on it and a CUDA graph the caller captures on it contains
    /// ours. See [`Gpu::on_stream`] for what it needs of the stream and its context.
    ///
    /// ```no_run
    /// use ferrinfer_runtime::Backend;
    /// use ferrinfer_runtime::cudarc::driver::CudaContext;
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let ctx = CudaContext::new(0)?;
    /// let stream = ctx.new_stream()?;
    /// let backend = Backend::on_stream(stream.clone())?;
    /// let x = backend.upload(&[1.0f32, 2.0, 3.0])?;
    /// // The caller's own work on `stream` after this point sees `x` written.
    /// stream.synchronize()?;
    /// # Ok(()) }
    /// ```
    pub fn on_stream(stream: Arc<CudaStream>) -> Result<Backend> {
        Ok(Backend::Cuda(Gpu::on_stream(stream)?))
    }
    /// Whether work queued on `self` and on `other` is ordered: both the CPU backend, or one
    /// stream of one GPU (every `Backend::cuda(n)` of a process shares one; `on_stream` backends
    /// share the caller's).
    ///
    /// ```
    /// use ferrinfer_runtime::Backend;
    /// assert!(Backend::Cpu.same_stream(&Backend::Cpu));
    /// ```
    pub fn same_stream(&self, other: &Backend) -> bool {
        match (self, other) {
            (Backend::Cpu, Backend::Cpu) => true,
            (Backend::Cuda(a), Backend::Cuda(b)) => a.same_stream(b),
            _ => false,
        }
    }
    /// A short description, e.g. `cuda:0 (sm_90a, 132 SMs)`, `cuda:0 (sm_90a, 132 SMs, caller
    /// stream)` or `cpu (reference)`.
    pub fn describe(&self) -> String {
        match self {
            Backend::Cpu => "cpu (reference)".to_string(),
            Backend::Cuda(g) => format!(
                "cuda:{} ({}, {} SMs{})",
                g.ordinal(),
                g.arch().sm_name(),
                g.sm_count(),
                if g.on_caller_stream() {
                    ", caller stream"
                } else {
                    ""
                }
            ),
        }
    }
    pub fn gpu(&self) -> Option<&Arc<Gpu>> {
        match self {
            Backend::Cpu => None,
            Backend::Cuda(g) => Some(g),
        }
    }
    /// Copy host data into a buffer on this backend.
    pub fn upload<T: Pod>(&self, data: &[T]) -> Result<Buffer<T>> {
        Ok(match self {
            Backend::Cpu => Buffer {
                at: At::Host(data.to_vec()),
            },
            Backend::Cuda(g) => Buffer {
                at: At::Device {
                    len: data.len(),
                    slice: g.upload(data)?,
                    gpu: g.clone(),
                },
            },
        })
    }
    /// A buffer of `len` copies of `value` (tests poison outputs with NaN this way).
    pub fn filled<T: Pod>(&self, len: usize, value: T) -> Result<Buffer<T>> {
        self.upload(&vec![value; len])
    }
    /// Wait for all queued work (a no-op on the CPU).
    pub fn synchronize(&self) -> Result<()> {
        match self {
            Backend::Cpu => Ok(()),
            Backend::Cuda(g) => g.synchronize(),
        }
    }
}

/// A one-dimensional buffer on a backend. Shapes are given by the batch that uses it.
///
/// Opaque: made only by [`Backend::upload`] and [`Backend::filled`], so its length is always the
/// length of its allocation, and a device buffer always belongs to the stream of the backend that
/// made it (a backend on another stream refuses it).
pub struct Buffer<T: Pod> {
    at: At<T>,
}

enum At<T: Pod> {
    Host(Vec<T>),
    Device {
        slice: CudaSlice<T>,
        /// Elements the caller asked for (a zero-length upload allocates one element).
        len: usize,
        /// Declared after `slice`: the slice is freed on the stream this keeps alive.
        gpu: Arc<Gpu>,
    },
}

impl<T: Pod> Buffer<T> {
    /// Elements in the buffer.
    pub fn len(&self) -> usize {
        match &self.at {
            At::Host(v) => v.len(),
            At::Device { len, .. } => *len,
        }
    }
    /// Whether it holds no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Whether it lives on a GPU.
    pub fn is_device(&self) -> bool {
        matches!(self.at, At::Device { .. })
    }
    /// Overwrite the buffer with `data` (same length), keeping its device address: what a CUDA
    /// graph that captured this buffer needs between replays.
    pub fn copy_from(&mut self, data: &[T]) -> Result<()> {
        if data.len() != self.len() {
            return Err(Error::invalid(format!(
                "copy_from: {} elements into a buffer of {}",
                data.len(),
                self.len()
            )));
        }
        match &mut self.at {
            At::Host(v) => v.copy_from_slice(data),
            At::Device { slice, gpu, .. } => gpu.write(slice, data)?,
        }
        Ok(())
    }
    /// Copy to the host (waits for queued GPU work).
    pub fn to_vec(&self) -> Result<Vec<T>> {
        match &self.at {
            At::Host(v) => Ok(v.clone()),
            At::Device { slice, len, gpu } => {
                let mut v = gpu.download(slice)?;
                v.truncate(*len);
                Ok(v)
            }
        }
    }
    /// The device memory of a GPU buffer as a cudarc view of its `len()` elements (`None` for a
    /// host buffer), for the caller's own cudarc work: a copy out of it, or its address for a
    /// kernel of the caller's. Our buffers carry no cudarc events, so a copy through the view
    /// records and waits on none, also inside a CUDA graph capture. Queue such work on the
    /// backend's stream ([`Gpu::stream`]), or order your stream against it yourself.
    ///
    /// ```no_run
    /// use ferrinfer_runtime::Backend;
    /// use ferrinfer_runtime::cudarc::driver::CudaContext;
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let stream = CudaContext::new(0)?.new_stream()?;
    /// let backend = Backend::on_stream(stream.clone())?;
    /// let x = backend.upload(&[1.0f32, 2.0])?;
    /// let back = stream.clone_dtoh(&x.cuda_view().expect("a GPU buffer"))?;
    /// assert_eq!(back, [1.0, 2.0]);
    /// # Ok(()) }
    /// ```
    pub fn cuda_view(&self) -> Option<CudaView<'_, T>> {
        match &self.at {
            At::Host(_) => None,
            At::Device { slice, len, .. } => Some(slice.slice(..*len)),
        }
    }
    /// [`Buffer::cuda_view`], writable: for a copy into the buffer on the caller's stream
    /// (`stream.memcpy_htod(data, &mut view)`), which a CUDA graph can capture between two
    /// buffers of ours. The view cannot move or resize the buffer.
    ///
    /// ```no_run
    /// use ferrinfer_runtime::Backend;
    /// use ferrinfer_runtime::cudarc::driver::CudaContext;
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let stream = CudaContext::new(0)?.new_stream()?;
    /// let backend = Backend::on_stream(stream.clone())?;
    /// let mut x = backend.filled(2, 0.0f32)?;
    /// stream.memcpy_htod(&[3.0f32, 4.0], &mut x.cuda_view_mut().expect("a GPU buffer"))?;
    /// assert_eq!(x.to_vec()?, [3.0, 4.0]);
    /// # Ok(()) }
    /// ```
    pub fn cuda_view_mut(&mut self) -> Option<CudaViewMut<'_, T>> {
        match &mut self.at {
            At::Host(_) => None,
            At::Device { slice, len, .. } => Some(slice.slice_mut(..*len)),
        }
    }
    pub(crate) fn host(&self) -> Result<&[T]> {
        match &self.at {
            At::Host(v) => Ok(v),
            At::Device { .. } => Err(Error::invalid(
                "a GPU buffer was passed to the CPU backend; upload it with the same backend",
            )),
        }
    }
    pub(crate) fn host_mut(&mut self) -> Result<&mut Vec<T>> {
        match &mut self.at {
            At::Host(v) => Ok(v),
            At::Device { .. } => Err(Error::invalid(
                "a GPU buffer was passed to the CPU backend; upload it with the same backend",
            )),
        }
    }
    /// The allocation and its GPU, for a device buffer (views are made from them).
    pub(crate) fn device_parts(&self) -> Option<(&CudaSlice<T>, &Arc<Gpu>)> {
        match &self.at {
            At::Device { slice, gpu, .. } => Some((slice, gpu)),
            At::Host(_) => None,
        }
    }
    /// Device address, checking that the buffer lives on `on`.
    pub(crate) fn device_ptr(&self, on: &Gpu) -> Result<u64> {
        match &self.at {
            At::Device { slice, gpu, .. } if gpu.same_stream(on) => Ok(on.device_ptr(slice)),
            At::Device { gpu, .. } if gpu.ordinal() == on.ordinal() => {
                Err(Error::invalid(format!(
                    "a buffer of {gpu:?} was passed to a backend on another stream ({on:?}): \
                     nothing orders the two streams, so use a buffer of the same backend"
                )))
            }
            At::Device { gpu, .. } => Err(Error::invalid(format!(
                "a buffer of GPU {} was passed to GPU {}",
                gpu.ordinal(),
                on.ordinal()
            ))),
            At::Host(_) => Err(Error::invalid(
                "a host buffer was passed to the GPU backend; upload it with the same backend",
            )),
        }
    }
}

impl<T: Pod> std::fmt::Debug for Buffer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.at {
            At::Host(v) => write!(f, "Buffer(host, len {})", v.len()),
            At::Device { len, gpu, .. } => {
                write!(f, "Buffer(cuda:{}, len {len})", gpu.ordinal())
            }
        }
    }
}
