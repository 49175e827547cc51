//! One CUDA device: its context and stream, its architecture, the modules loaded on it, and the
//! launch of any kernel. It knows nothing of attention: what a kernel is for is its caller's.

use std::any::Any;
use std::cell::Cell;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use cudarc::driver::{
    CudaContext, CudaEvent, CudaFunction, CudaGraph, CudaSlice, CudaStream, DevicePtr, DeviceRepr,
    LaunchArgs, LaunchConfig, ValidAsZeroBits,
};
use cudarc::nvrtc::Ptx;
use ferrinfer_kernels::LaunchDims;

use crate::device::arch::Arch;
use crate::error::{Error, Result};

/// A CUDA device with one stream on which all of ferrinfer's work is ordered.
///
/// CUDA graphs are recorded on a second, private stream, so that a capture on one thread neither
/// absorbs nor is broken by work other threads queue meanwhile; a replay is ordered after the work
/// queued on the main stream before it, and the work queued after it waits for it.
///
/// One per device ordinal per process: [`Gpu::get`] (and `Backend::cuda`) hand out the same one,
/// so every plan, buffer and op on a device shares its stream, and work that one call queues is
/// ordered before the next call's. `Gpu` is `Send + Sync`; calls from several threads are safe and
/// are ordered on the stream in the order they are made.
pub struct Gpu {
    ordinal: usize,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    /// Where graphs are recorded and replayed (see [`Gpu::capture`]).
    capture_stream: Arc<CudaStream>,
    /// One capture at a time per device.
    capturing: Mutex<()>,
    arch: Arch,
    sm_count: u32,
    /// Shared memory a block may opt in to.
    max_shared_bytes: u32,
    sm_resources: SmResources,
    /// Modules loaded on this device, by key: whatever their loader keeps (see [`Gpu::cached`]).
    loaded: Mutex<HashMap<String, Box<dyn Any + Send>>>,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Gpu({}, {})", self.ordinal, self.arch.sm_name())
    }
}

/// The per-SM limits that decide how many CTAs of a kernel are resident at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SmResources {
    /// Shared memory of one SM, in bytes.
    pub shared_bytes: u32,
    /// Shared memory the system reserves for each resident CTA, in bytes.
    pub reserved_shared_per_cta: u32,
    /// 32-bit registers of one SM.
    pub registers: u32,
}

impl SmResources {
    /// A typical SM of `arch`, for planning without a GPU at hand (filling caches, compiling
    /// every instance): Hopper's 228 KiB of shared memory, else the A100's 164 KiB (the most of
    /// the other sm_80+ parts); 1 KiB reserved per CTA and 64 Ki registers on all of them.
    pub fn typical(arch: Arch) -> Self {
        SmResources {
            shared_bytes: if arch.major >= 9 {
                228 * 1024
            } else {
                164 * 1024
            },
            reserved_shared_per_cta: 1024,
            registers: 65_536,
        }
    }
    /// CTAs of `threads` threads using `shared_bytes` of dynamic shared memory that fit on one SM
    /// when every thread holds `registers_per_thread` registers (at least 1).
    pub fn resident_ctas(&self, threads: u32, shared_bytes: u32, registers_per_thread: u32) -> u32 {
        // Registers are allocated per warp in units of 256.
        let per_warp = (registers_per_thread * 32).div_ceil(256) * 256;
        let by_registers = self.registers / (per_warp * threads.div_ceil(32)).max(1);
        let by_shared = self.shared_bytes / (shared_bytes + self.reserved_shared_per_cta).max(1);
        by_registers.min(by_shared).max(1)
    }
}

thread_local! {
    /// The device this thread is recording a graph on, if any.
    static CAPTURING: Cell<Option<usize>> = const { Cell::new(None) };
}

/// Marks this thread as recording on a device until dropped (also on a panic).
struct CaptureGuard;

impl CaptureGuard {
    fn set(ordinal: usize) -> Self {
        CAPTURING.set(Some(ordinal));
        CaptureGuard
    }
}

impl Drop for CaptureGuard {
    fn drop(&mut self) {
        CAPTURING.set(None);
    }
}

/// Refuse, before any work, a driver older than ferrinfer needs, or one too old for every NVRTC
/// this process could compile with (when compiling is allowed; a `FERRINFER_NO_JIT` process loads
/// no NVRTC, and each cache entry is checked against the driver when it is loaded instead).
fn check_driver_up_front() -> Result<()> {
    use crate::device::toolkit;
    let Some(driver) = toolkit::driver_version() else {
        return Ok(());
    };
    let nvrtc = if crate::jit::Jit::global().config().compile {
        match toolkit::nvrtc_library() {
            Ok(lib) => Some(lib.version()),
            // Every NVRTC found is too new for this driver: say so now, not at the first compile.
            Err(e) if e.message().contains(toolkit::TOO_NEW) => {
                return Err(Error::CudaUnavailable(e.into_message()));
            }
            // No NVRTC at all: a warm disk cache may still serve every kernel.
            Err(_) => None,
        }
    } else {
        None
    };
    toolkit::check_driver(driver, nvrtc.unwrap_or((12, 0))).map_err(Error::CudaUnavailable)
}

/// The devices opened so far: weak, so the last user's drop releases the context.
static OPEN: Mutex<Vec<(usize, Weak<Gpu>)>> = Mutex::new(Vec::new());

impl Gpu {
    /// Device `ordinal`: the one `Gpu` of this process for it, opened on first use. Fails with
    /// [`Error::CudaUnavailable`] when there is no driver or no such GPU.
    pub fn get(ordinal: usize) -> Result<Arc<Gpu>> {
        let mut open = OPEN.lock().unwrap_or_else(|p| p.into_inner());
        open.retain(|(_, w)| w.strong_count() > 0);
        if let Some(gpu) = open
            .iter()
            .find(|(o, _)| *o == ordinal)
            .and_then(|(_, w)| w.upgrade())
        {
            return Ok(gpu);
        }
        let gpu = Arc::new(Gpu::open(ordinal)?);
        open.push((ordinal, Arc::downgrade(&gpu)));
        Ok(gpu)
    }

    fn open(ordinal: usize) -> Result<Self> {
        crate::device::toolkit::load_driver().map_err(|e| Error::CudaUnavailable(e.to_string()))?;
        check_driver_up_front()?;
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| Error::CudaUnavailable(format!("cannot open GPU {ordinal}: {e}")))?;
        // SAFETY: ferrinfer orders all of its work on the one stream below, so cudarc's per-buffer
        // events, which synchronise buffers across streams, are not needed.
        unsafe { ctx.disable_event_tracking() };
        // A stream of our own: the legacy default stream cannot be captured into a CUDA graph.
        let stream = ctx.new_stream()?;
        let capture_stream = ctx.new_stream()?;
        let (major, minor) = ctx.compute_capability()?;
        let sm_count = ctx.attribute(
            cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
        )? as u32;
        let attr = |a| -> Result<u32> { Ok(ctx.attribute(a)? as u32) };
        use cudarc::driver::sys::CUdevice_attribute as A;
        let max_shared_bytes = attr(A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?;
        let sm_resources = SmResources {
            shared_bytes: attr(A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR)?,
            reserved_shared_per_cta: attr(A::CU_DEVICE_ATTRIBUTE_RESERVED_SHARED_MEMORY_PER_BLOCK)?,
            registers: attr(A::CU_DEVICE_ATTRIBUTE_MAX_REGISTERS_PER_MULTIPROCESSOR)?,
        };
        Ok(Gpu {
            ordinal,
            ctx,
            stream,
            capture_stream,
            capturing: Mutex::new(()),
            arch: Arch::new(major as u32, minor as u32),
            sm_count,
            max_shared_bytes,
            sm_resources,
            loaded: Mutex::new(HashMap::new()),
        })
    }
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }
    pub fn arch(&self) -> Arch {
        self.arch
    }
    /// Streaming multiprocessors on the device.
    pub fn sm_count(&self) -> u32 {
        self.sm_count
    }
    /// What one SM offers the CTAs resident on it.
    pub fn sm_resources(&self) -> SmResources {
        self.sm_resources
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
    /// Copy a device buffer back to the host (waits for the stream).
    pub fn download<T: DeviceRepr + ValidAsZeroBits + Default + Clone>(
        &self,
        s: &CudaSlice<T>,
    ) -> Result<Vec<T>> {
        Ok(self.stream.clone_dtoh(s)?)
    }
    /// Wait for all work queued by ferrinfer on this device.
    pub fn synchronize(&self) -> Result<()> {
        Ok(self.stream.synchronize()?)
    }
    /// Record the kernels `f` launches through [`Gpu::launch`] on this thread into a CUDA graph,
    /// on the private capture stream; replay it with [`Gpu::replay`].
    ///
    /// Everything `f` runs must have run once before (so its kernels are compiled and loaded and
    /// its parameter arrays uploaded): capture records launches, it cannot compile or allocate.
    pub(crate) fn capture(&self, f: impl FnOnce() -> Result<()>) -> Result<CudaGraph> {
        let _one = self.capturing.lock().unwrap_or_else(|p| p.into_inner());
        // What was queued before (the warm-up run, buffer writes) precedes what is recorded.
        self.capture_stream.join(&self.stream)?;
        self.capture_stream.begin_capture(
            cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
        )?;
        let recorded = {
            let _on = CaptureGuard::set(self.ordinal);
            f()
        };
        let graph = self
            .capture_stream
            .end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0))?;
        recorded?;
        graph.ok_or_else(|| Error::Driver("the captured graph is empty".into()))
    }

    /// Replay a graph recorded by [`Gpu::capture`]: after the work queued on this device so far,
    /// and before the work queued after this call. `before` and `after` are the caller's events
    /// (reused across replays).
    pub(crate) fn replay(
        &self,
        graph: &CudaGraph,
        before: &CudaEvent,
        after: &CudaEvent,
    ) -> Result<()> {
        before.record(&self.stream)?;
        self.capture_stream.wait(before)?;
        graph.launch()?;
        after.record(&self.capture_stream)?;
        self.stream.wait(after)?;
        Ok(())
    }

    /// An event for [`Gpu::replay`].
    pub(crate) fn event(&self) -> Result<CudaEvent> {
        use cudarc::driver::sys::CUevent_flags;
        Ok(self
            .ctx
            .new_event(Some(CUevent_flags::CU_EVENT_DISABLE_TIMING))?)
    }

    /// The stream launches go to: the capture stream while this thread records on this device.
    fn launch_stream(&self) -> &Arc<CudaStream> {
        if CAPTURING.get() == Some(self.ordinal) {
            &self.capture_stream
        } else {
            &self.stream
        }
    }

    /// The raw device address of a buffer, for kernel argument structs.
    pub fn device_ptr<T>(&self, s: &CudaSlice<T>) -> u64 {
        let (ptr, _sync) = s.device_ptr(&self.stream);
        ptr
    }

    /// What `load` makes of the module `key` (its loaded functions and whatever the caller keeps
    /// with them), built on first use and kept for the life of this `Gpu`. `load` runs under the
    /// cache's lock, so a kernel is compiled and loaded once however many threads ask.
    pub(crate) fn cached<M: Clone + Send + 'static>(
        &self,
        key: &str,
        load: impl FnOnce() -> Result<M>,
    ) -> Result<M> {
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = loaded.get(key).and_then(|m| m.downcast_ref::<M>()) {
            return Ok(m.clone());
        }
        let m = load()?;
        loaded.insert(key.to_string(), Box::new(m.clone()));
        Ok(m)
    }

    /// Load a CUBIN and find its functions `names` (in that order), each allowed the device's
    /// opt-in shared memory now, so that no launch (nor a graph capture) has to. `what` names the
    /// module in errors.
    pub(crate) fn load(
        &self,
        what: &str,
        cubin: &[u8],
        names: &[&str],
    ) -> Result<Vec<CudaFunction>> {
        let module = self
            .ctx
            .load_module(Ptx::from_binary(cubin.to_vec()))
            .map_err(|e| Error::Driver(format!("loading {what}: {e}")))?;
        use cudarc::driver::sys::CUfunction_attribute as F;
        names
            .iter()
            .map(|name| {
                let f = module
                    .load_function(name)
                    .map_err(|e| Error::Driver(format!("finding {name} in {what}: {e}")))?;
                let static_shared = f.get_attribute(F::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES)?;
                f.set_attribute(
                    F::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    self.max_shared_bytes as i32 - static_shared,
                )?;
                Ok(f)
            })
            .collect()
    }

    /// Launch `f` with the arguments `push` adds, on this device's stream, after checking the
    /// geometry against CUDA's and this device's limits.
    ///
    /// # Safety
    /// The arguments must match the kernel's parameters in number, order and layout, and every
    /// device address among them must point into memory that the kernel, with these dims, stays
    /// inside of and that lives until the stream has run the launch.
    pub(crate) unsafe fn launch<'a>(
        &'a self,
        f: &'a CudaFunction,
        dims: LaunchDims,
        push: impl FnOnce(&mut LaunchArgs<'a>),
    ) -> Result<()> {
        let max_grid_yz = 65_535;
        if dims.grid[1] > max_grid_yz || dims.grid[2] > max_grid_yz || dims.grid[0] == 0 {
            return Err(Error::unsupported(format!(
                "launch grid {:?} is outside CUDA's limits",
                dims.grid
            )));
        }
        if dims.shared_bytes > self.max_shared_bytes {
            return Err(Error::unsupported(format!(
                "the kernel asks for {} bytes of shared memory; this GPU has {} per block",
                dims.shared_bytes, self.max_shared_bytes
            )));
        }
        let cfg = LaunchConfig {
            grid_dim: (dims.grid[0], dims.grid[1], dims.grid[2]),
            block_dim: (dims.block[0], dims.block[1], dims.block[2]),
            shared_mem_bytes: dims.shared_bytes,
        };
        let mut launch = self.launch_stream().launch_builder(f);
        push(&mut launch);
        // SAFETY: the caller's contract (above) is what cudarc's launch requires.
        unsafe { launch.launch(cfg) }?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::SmResources;

    #[test]
    fn resident_ctas_take_the_scarcer_resource() {
        // An H100 / H200 SM: 228 KiB of shared memory, 1 KiB reserved per CTA, 64 Ki registers.
        let sm = SmResources {
            shared_bytes: 233_472,
            reserved_shared_per_cta: 1024,
            registers: 65_536,
        };
        // Prefill, 16-row tile, hd128: one warp, 37.7 KB -> shared memory allows 6.
        assert_eq!(sm.resident_ctas(32, 37_696, 255), 6);
        // 128-row tile: four warps of 255 registers -> registers allow 2.
        assert_eq!(sm.resident_ctas(128, 66_368, 255), 2);
        // Registers round up per warp: 129 per thread takes 136 x 32 = 4352 a warp.
        assert_eq!(sm.resident_ctas(128, 0, 129), 65_536 / (4 * 4352));
        // Something always runs, if slowly.
        assert_eq!(sm.resident_ctas(1024, 300_000, 255), 1);
    }
}
