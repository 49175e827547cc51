//! One CUDA stream on one device: the stream ferrinfer queues its work on (a private one, or the
//! caller's), the device's architecture, the modules loaded in its context, and the launch of any
//! kernel. It knows nothing of attention: what a kernel is for is its caller's.
//!
//! # Streams, contexts and cudarc's event tracking
//!
//! Every `Gpu` of a device shares one [`Device`]: ferrinfer's own handle on the device's primary
//! context, its properties, and the modules loaded in it (modules belong to a context, and the
//! primary context is the same `CUcontext` for every handle on it, the caller's included). A `Gpu`
//! adds a stream: [`Gpu::get`] makes a private one; [`Gpu::on_stream`] uses the caller's.
//!
//! The rule for cudarc's event tracking: **every buffer ferrinfer allocates carries no events**,
//! because it is allocated through our own context handle, on which tracking is off. A caller's
//! handle keeps the setting it has (cudarc's default is on, and candle leaves it on); we never
//! change it. Concretely, with the caller's stream `S` (tracking on or off on their handle):
//! - allocation, upload, plan and workspace copies, and frees go through a handle on `S` made
//!   from our context handle, so cudarc records and waits on no event for them;
//! - `device_ptr` of our buffers (for launch arguments) waits and records nothing, so a launch
//!   inside a capture never waits on an event recorded outside it (which CUDA refuses,
//!   invalidating the capture);
//! - ordering is the stream's own: everything of ours on `S` is in the order it was queued, with
//!   the caller's work on `S` around it. Our graph stream (see [`Gpu::capture`]) is ordered
//!   against `S` by explicit events at capture and replay.
//!
//! A buffer therefore belongs to the stream of the backend that made it, and may be used only on
//! it (a buffer of another stream is refused, since nothing would order the two streams).
//!
//! What a capture cannot hold is refused with an error rather than recorded into a broken graph:
//! allocating, copying from the host, reading back, synchronising and loading a module all check
//! whether the stream is being captured (by the caller, or by [`Gpu::capture`] on this thread).

use std::any::Any;
use std::cell::Cell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use cudarc::driver::sys::CUstreamCaptureStatus;
use cudarc::driver::{
    CudaContext, CudaEvent, CudaFunction, CudaGraph, CudaSlice, CudaStream, DevicePtr, DeviceRepr,
    LaunchArgs, LaunchConfig, ValidAsZeroBits,
};
use cudarc::nvrtc::Ptx;
use ferrinfer_kernels::LaunchDims;

use crate::device::arch::Arch;
use crate::error::{Error, Result};

/// What every [`Gpu`] of one device shares: ferrinfer's handle on the device's primary context
/// (event tracking off), the device's properties, and the modules loaded in that context.
struct Device {
    ordinal: usize,
    ctx: Arc<CudaContext>,
    arch: Arch,
    sm_count: u32,
    /// Shared memory a block may opt in to.
    max_shared_bytes: u32,
    sm_resources: SmResources,
    /// Modules loaded in the context, by key: whatever their loader keeps (see [`Gpu::cached`]).
    loaded: Mutex<HashMap<String, Box<dyn Any + Send>>>,
    /// Modules loaded so far (each key once; see [`Gpu::modules_loaded`]).
    loads: AtomicUsize,
}

/// The devices opened so far: weak, so the last `Gpu`'s drop releases our context handle.
static DEVICES: Mutex<Vec<(usize, Weak<Device>)>> = Mutex::new(Vec::new());

impl Device {
    fn get(ordinal: usize) -> Result<Arc<Device>> {
        let mut open = DEVICES.lock().unwrap_or_else(|p| p.into_inner());
        open.retain(|(_, w)| w.strong_count() > 0);
        if let Some(d) = open
            .iter()
            .find(|(o, _)| *o == ordinal)
            .and_then(|(_, w)| w.upgrade())
        {
            return Ok(d);
        }
        let d = Arc::new(Device::open(ordinal)?);
        open.push((ordinal, Arc::downgrade(&d)));
        Ok(d)
    }

    fn open(ordinal: usize) -> Result<Self> {
        crate::device::toolkit::load_driver().map_err(|e| Error::CudaUnavailable(e.to_string()))?;
        check_driver_up_front()?;
        // The primary context: the one `CudaContext::new` (and candle) opens, so a caller's
        // stream on it can run our modules.
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| Error::CudaUnavailable(format!("cannot open GPU {ordinal}: {e}")))?;
        // SAFETY: this handle is ours alone (a caller's handle on the same context keeps its own
        // setting), and every buffer made through it is used on the one stream it was allocated
        // on, by the `Gpu` that holds it; our graph stream is ordered against that stream by
        // explicit events (Gpu::capture, Gpu::replay). So cudarc's per-buffer events, which order
        // a buffer across streams, are not needed, and they would break captures (see the module
        // documentation).
        unsafe { ctx.disable_event_tracking() };
        let (major, minor) = ctx.compute_capability()?;
        let attr = |a| -> Result<u32> { Ok(ctx.attribute(a)? as u32) };
        use cudarc::driver::sys::CUdevice_attribute as A;
        let sm_count = attr(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
        let max_shared_bytes = attr(A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?;
        let sm_resources = SmResources {
            shared_bytes: attr(A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR)?,
            reserved_shared_per_cta: attr(A::CU_DEVICE_ATTRIBUTE_RESERVED_SHARED_MEMORY_PER_BLOCK)?,
            registers: attr(A::CU_DEVICE_ATTRIBUTE_MAX_REGISTERS_PER_MULTIPROCESSOR)?,
        };
        Ok(Device {
            ordinal,
            ctx,
            arch: Arch::new(major as u32, minor as u32),
            sm_count,
            max_shared_bytes,
            sm_resources,
            loaded: Mutex::new(HashMap::new()),
            loads: AtomicUsize::new(0),
        })
    }
}

/// A CUDA device and the one stream on which a backend's work is ordered: a private stream
/// ([`Gpu::get`]) or the caller's ([`Gpu::on_stream`]).
///
/// CUDA graphs that `Gpu::capture` records go on a second, private stream, so that a capture on
/// one thread neither absorbs nor is broken by work other threads queue meanwhile; a replay is
/// ordered after the work queued on the main stream before it, and the work queued after it waits
/// for it.
///
/// [`Gpu::get`] gives one per device ordinal per process, so every plan, buffer and op made with
/// `Backend::cuda` shares its stream, and work that one call queues is ordered before the next
/// call's. Every `Gpu` of a device, on any stream, shares the modules loaded on it. `Gpu` is
/// `Send + Sync`; calls from several threads are safe and are ordered on the stream in the order
/// they are made.
///
/// # Event tracking
///
/// cudarc can record an event on every use of a buffer and wait on it from other streams. Buffers
/// of ours carry no such events: they are allocated through ferrinfer's own handle on the
/// context, with tracking off, whatever the setting of the caller's handle (left as it is). So
/// nothing we queue waits on an event recorded outside a capture, which CUDA refuses inside one.
/// The price: a buffer is ordered only by the stream of the backend that made it, and a backend
/// on another stream refuses it. Work of the caller's on our buffers
/// ([`Buffer::cuda_view`](crate::Buffer::cuda_view)) must go on that stream too, or be ordered
/// against it by the caller. Dropping a buffer or a plan frees it on its stream, after the work
/// queued there; do not drop one while that stream is being captured.
///
/// ```no_run
/// use ferrinfer_runtime::device::Gpu;
/// # fn main() -> ferrinfer_runtime::Result<()> {
/// let gpu = Gpu::get(0)?;
/// println!("{gpu:?}: {} SMs", gpu.sm_count());
/// # Ok(()) }
/// ```
pub struct Gpu {
    /// Unique for the life of the process (never reused): marks this thread's capture.
    id: usize,
    device: Arc<Device>,
    /// Where our work goes: a private stream, or our handle on the caller's (made from our
    /// context handle, so buffers allocated on it carry no events).
    stream: Arc<CudaStream>,
    /// Where graphs are recorded and replayed (see [`Gpu::capture`]).
    capture_stream: Arc<CudaStream>,
    /// One capture at a time per `Gpu`.
    capturing: Mutex<()>,
    /// The caller's stream, when built on one. Declared last, so it outlives our handle on it;
    /// every buffer allocated on that handle holds this `Gpu` and is freed before it is dropped.
    caller: Option<Arc<CudaStream>>,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Gpu({}, {}", self.ordinal(), self.arch().sm_name())?;
        if self.caller.is_some() {
            write!(f, ", caller stream {:p}", self.stream.cu_stream())?;
        }
        write!(f, ")")
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
    /// Whether one CTA using `shared_bytes` of dynamic shared memory fits an SM at all.
    pub fn fits(&self, shared_bytes: u32) -> bool {
        u64::from(shared_bytes) + u64::from(self.reserved_shared_per_cta)
            <= u64::from(self.shared_bytes)
    }
}

thread_local! {
    /// The `Gpu` (its id) this thread is recording a graph on, if any.
    static CAPTURING: Cell<Option<usize>> = const { Cell::new(None) };
}

/// Marks this thread as recording on a device until dropped (also on a panic).
struct CaptureGuard;

impl CaptureGuard {
    fn set(gpu: usize) -> Self {
        CAPTURING.set(Some(gpu));
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

/// The `Gpu`s of [`Gpu::get`], by ordinal: weak, so the last user's drop releases them.
static OPEN: Mutex<Vec<(usize, Weak<Gpu>)>> = Mutex::new(Vec::new());

/// The next [`Gpu`] id; ids are never reused, so a key made of one never names another `Gpu`.
static NEXT_ID: AtomicUsize = AtomicUsize::new(1);

/// `what` is refused on a stream whose capture status is `status` unless that is "none": a
/// graph records launches, and an allocation, a host copy, a read-back, a synchronisation or a
/// module load inside a capture either fails or invalidates it.
fn refuse_in_capture(what: &str, status: CUstreamCaptureStatus) -> Result<()> {
    if status == CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE {
        return Ok(());
    }
    Err(Error::unsupported(format!(
        "{what} while the stream is being captured into a CUDA graph: a capture records launches \
         only. Run the call once before capturing (that compiles and loads its kernels and \
         uploads its parameter arrays), and allocate, copy, re-plan and synchronise outside the \
         capture"
    )))
}

impl Gpu {
    /// How many CUDA GPUs this process sees: [`Error::CudaUnavailable`] when no CUDA driver can
    /// be loaded (cudarc's own count would panic there), 0 when the driver finds none.
    ///
    /// ```
    /// use ferrinfer_runtime::device::Gpu;
    /// match Gpu::count() {
    ///     Ok(n) => println!("{n} GPU(s)"),
    ///     Err(e) => println!("no CUDA: {e}"),
    /// }
    /// ```
    pub fn count() -> Result<usize> {
        crate::device::toolkit::load_driver().map_err(|e| Error::CudaUnavailable(e.to_string()))?;
        // cuInit fails with "no device" on a machine with a driver and no GPU: none to count.
        Ok(CudaContext::device_count().map_or(0, |n| n.max(0) as usize))
    }

    /// Device `ordinal` on a private stream: the one such `Gpu` of this process for it, opened on
    /// first use. Fails with [`Error::CudaUnavailable`] when there is no driver or no such GPU.
    ///
    /// ```no_run
    /// use ferrinfer_runtime::device::Gpu;
    /// # fn main() -> ferrinfer_runtime::Result<()> {
    /// let a = Gpu::get(0)?;
    /// let b = Gpu::get(0)?;
    /// assert!(std::sync::Arc::ptr_eq(&a, &b), "one per device and process");
    /// # Ok(()) }
    /// ```
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
        let device = Device::get(ordinal)?;
        // A stream of our own: the legacy default stream cannot be captured into a CUDA graph.
        let stream = device.ctx.new_stream()?;
        let gpu = Arc::new(Gpu::new(device, stream, None)?);
        open.push((ordinal, Arc::downgrade(&gpu)));
        Ok(gpu)
    }

    /// The device of `stream`, with every launch, copy, allocation, plan upload and
    /// synchronisation of ours on `stream` itself: work the caller queues on it before a call is
    /// ordered before ours, work queued after it waits for ours, and a CUDA graph the caller
    /// captures on it contains our launches. Modules are shared with every other `Gpu` of the
    /// device (a kernel is compiled and loaded once per device, whichever stream asked first).
    ///
    /// `stream` must belong to the device's primary context (the one `CudaContext::new` opens,
    /// as candle does); another context is refused. The caller's context handle keeps its event
    /// tracking as it is: our buffers are allocated through our own handle, carry no events, and
    /// may be used only with backends on this stream (see [`Gpu`], "Event tracking").
    /// A plan's or op's first call compiles and loads kernels and uploads parameter arrays: make
    /// it before capturing; inside a capture those are refused with an error.
    ///
    /// With the per-thread default stream (candle's `CudaDevice::new`), each thread has its own
    /// stream: make every call from the thread that queues the caller's work.
    ///
    /// ```no_run
    /// use ferrinfer_runtime::cudarc::driver::CudaContext;
    /// use ferrinfer_runtime::{Backend, device::Gpu};
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// // The engine's context (cudarc's default: event tracking on) and its stream.
    /// let ctx = CudaContext::new(0)?;
    /// let stream = ctx.new_stream()?;
    /// let backend = Backend::Cuda(Gpu::on_stream(stream.clone())?);
    /// let x = backend.upload(&[1.0f32, 2.0])?; // queued on `stream`
    /// # Ok(()) }
    /// ```
    pub fn on_stream(stream: Arc<CudaStream>) -> Result<Arc<Gpu>> {
        let theirs = stream.context();
        let device = Device::get(theirs.ordinal())?;
        if theirs.cu_ctx() != device.ctx.cu_ctx() {
            return Err(Error::unsupported(format!(
                "the stream belongs to a CUDA context of GPU {} that is not its primary context; \
                 ferrinfer runs on the primary context (the one CudaContext::new opens, as candle \
                 does), whose modules every stream on it can launch",
                device.ordinal
            )));
        }
        // SAFETY: the handle is a live stream of this very context (the same CUcontext, checked
        // above). `caller` keeps the caller's Arc, and so the stream, alive for as long as this
        // Gpu lives, and every buffer allocated on `ours` holds this Gpu until after it is freed
        // (Buffer, a plan's DeviceState and Array copies drop their slice before their Arc<Gpu>).
        // Ordering with the caller's own work needs nothing: it is the same stream.
        let ours = unsafe { device.ctx.wrap_borrowed_stream(stream.cu_stream()) };
        Ok(Arc::new(Gpu::new(device, ours, Some(stream))?))
    }

    fn new(
        device: Arc<Device>,
        stream: Arc<CudaStream>,
        caller: Option<Arc<CudaStream>>,
    ) -> Result<Self> {
        // Made through our context handle: the caller's handle (and its stream count, which
        // decides whether cudarc tracks events) is left alone.
        let capture_stream = device.ctx.new_stream()?;
        Ok(Gpu {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            device,
            stream,
            capture_stream,
            capturing: Mutex::new(()),
            caller,
        })
    }
    /// The device ordinal.
    ///
    /// ```no_run
    /// # let gpu = ferrinfer_runtime::device::Gpu::get(0).unwrap();
    /// assert_eq!(gpu.ordinal(), 0);
    /// ```
    pub fn ordinal(&self) -> usize {
        self.device.ordinal
    }
    /// The device's compute capability.
    ///
    /// ```no_run
    /// # let gpu = ferrinfer_runtime::device::Gpu::get(0).unwrap();
    /// println!("{}", gpu.arch().sm_name());
    /// ```
    pub fn arch(&self) -> Arch {
        self.device.arch
    }
    /// Streaming multiprocessors on the device.
    ///
    /// ```no_run
    /// # let gpu = ferrinfer_runtime::device::Gpu::get(0).unwrap();
    /// assert!(gpu.sm_count() > 0);
    /// ```
    pub fn sm_count(&self) -> u32 {
        self.device.sm_count
    }
    /// What one SM offers the CTAs resident on it.
    ///
    /// ```no_run
    /// # let gpu = ferrinfer_runtime::device::Gpu::get(0).unwrap();
    /// println!("{} bytes of shared memory per SM", gpu.sm_resources().shared_bytes);
    /// ```
    pub fn sm_resources(&self) -> SmResources {
        self.device.sm_resources
    }
    /// ferrinfer's own handle on the device's primary context, shared by every `Gpu` of the
    /// device. Its event tracking is off (buffers made through it carry no events); a caller's
    /// handle on the same context keeps its own setting.
    ///
    /// ```no_run
    /// # let gpu = ferrinfer_runtime::device::Gpu::get(0).unwrap();
    /// assert!(!gpu.context().is_event_tracking());
    /// ```
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.device.ctx
    }
    /// The stream our work is ordered on: the caller's, as given to [`Gpu::on_stream`], or the
    /// private stream of [`Gpu::get`].
    ///
    /// ```no_run
    /// # let gpu = ferrinfer_runtime::device::Gpu::get(0).unwrap();
    /// // Make a stream of your own wait for everything ferrinfer queued so far.
    /// let mine = gpu.context().new_stream()?;
    /// mine.join(gpu.stream())?;
    /// # Ok::<(), ferrinfer_runtime::cudarc::driver::DriverError>(())
    /// ```
    pub fn stream(&self) -> &Arc<CudaStream> {
        self.caller.as_ref().unwrap_or(&self.stream)
    }
    /// Whether this `Gpu` runs on a caller's stream ([`Gpu::on_stream`]).
    ///
    /// ```no_run
    /// # let gpu = ferrinfer_runtime::device::Gpu::get(0).unwrap();
    /// assert!(!gpu.on_caller_stream());
    /// ```
    pub fn on_caller_stream(&self) -> bool {
        self.caller.is_some()
    }
    /// Modules (compiled kernels) loaded into this device's context so far, by every `Gpu` of
    /// the device: each kernel is loaded once per device, whichever stream asked first.
    ///
    /// ```no_run
    /// # let gpu = ferrinfer_runtime::device::Gpu::get(0).unwrap();
    /// println!("{} kernels loaded", gpu.modules_loaded());
    /// ```
    pub fn modules_loaded(&self) -> usize {
        self.device.loads.load(Ordering::Relaxed)
    }
    /// Which stream of which device our work goes on: equal keys, one stream. A buffer of
    /// ours holds its stream (see `keep_alive`), so the handle of a live one is never reused.
    pub(crate) fn stream_key(&self) -> (usize, usize) {
        (self.device.ordinal, self.stream.cu_stream() as usize)
    }
    /// Whether work of `self` and `other` is ordered on one stream of one device, so that a
    /// buffer of one may be used by the other.
    pub(crate) fn same_stream(&self, other: &Gpu) -> bool {
        self.stream_key() == other.stream_key()
    }
    /// What a buffer allocated by this `Gpu` must hold, and drop after it, when it does not
    /// hold the `Gpu` itself: the caller's stream, which our handle on it borrows.
    pub(crate) fn keep_alive(&self) -> Option<Arc<CudaStream>> {
        self.caller.clone()
    }
    /// Refuse `what` while our stream is being captured, by the caller or by [`Gpu::capture`]
    /// on this thread.
    fn check_not_capturing(&self, what: &str) -> Result<()> {
        if CAPTURING.get() == Some(self.id) {
            return refuse_in_capture(what, CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_ACTIVE);
        }
        refuse_in_capture(what, self.stream.capture_status()?)
    }
    /// Copy host data to a new device buffer on this stream (no events: see the module docs).
    pub(crate) fn upload<T: DeviceRepr + ValidAsZeroBits>(
        &self,
        data: &[T],
    ) -> Result<CudaSlice<T>> {
        self.check_not_capturing("uploading a buffer")?;
        if data.is_empty() {
            // A zero-length allocation is refused by some drivers; one element keeps pointers valid.
            return Ok(self.stream.alloc_zeros::<T>(1)?);
        }
        Ok(self.stream.clone_htod(data)?)
    }
    /// A new zeroed device buffer of `len` elements (at least one) on this stream.
    pub(crate) fn zeros<T: DeviceRepr + ValidAsZeroBits>(
        &self,
        len: usize,
    ) -> Result<CudaSlice<T>> {
        self.check_not_capturing("allocating a buffer")?;
        Ok(self.stream.alloc_zeros::<T>(len.max(1))?)
    }
    /// Overwrite the start of `dst` with `data`, on this stream.
    pub(crate) fn write<T: DeviceRepr>(&self, dst: &mut CudaSlice<T>, data: &[T]) -> Result<()> {
        self.check_not_capturing("copying host data to a buffer")?;
        if data.len() > dst.len() {
            return Err(Error::invalid(format!(
                "a copy of {} elements into a device buffer of {}",
                data.len(),
                dst.len()
            )));
        }
        if !data.is_empty() {
            self.stream.memcpy_htod(data, dst)?;
        }
        Ok(())
    }
    /// Copy a device buffer back to the host (waits for the stream).
    pub(crate) fn download<T: DeviceRepr + ValidAsZeroBits + Default + Clone>(
        &self,
        s: &CudaSlice<T>,
    ) -> Result<Vec<T>> {
        self.check_not_capturing("reading a buffer back")?;
        Ok(self.stream.clone_dtoh(s)?)
    }
    /// Wait for all work queued on this `Gpu`'s stream (on a caller's stream, the caller's work
    /// too).
    ///
    /// ```no_run
    /// # let gpu = ferrinfer_runtime::device::Gpu::get(0).unwrap();
    /// gpu.synchronize()?;
    /// # Ok::<(), ferrinfer_runtime::Error>(())
    /// ```
    pub fn synchronize(&self) -> Result<()> {
        self.check_not_capturing("synchronising")?;
        Ok(self.stream.synchronize()?)
    }
    /// Record the kernels `f` launches through [`Gpu::launch`] on this thread into a CUDA graph,
    /// on the private capture stream; replay it with [`Gpu::replay`].
    ///
    /// Everything `f` runs must have run once before (so its kernels are compiled and loaded and
    /// its parameter arrays uploaded): capture records launches, and a load, an upload or a copy
    /// inside `f` is refused with an error.
    pub(crate) fn capture(&self, f: impl FnOnce() -> Result<()>) -> Result<CudaGraph> {
        // Also refuses a capture inside `f`, before the lock below could deadlock on it, and a
        // capture inside the caller's own (our graph stream would join theirs).
        self.check_not_capturing("recording a graph of our own (GraphRun)")?;
        let _one = self.capturing.lock().unwrap_or_else(|p| p.into_inner());
        // What was queued before (the warm-up run, buffer writes) precedes what is recorded.
        self.capture_stream.join(&self.stream)?;
        self.capture_stream.begin_capture(
            cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
        )?;
        let recorded = {
            let _on = CaptureGuard::set(self.id);
            f()
        };
        let graph = self
            .capture_stream
            .end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0));
        recorded?;
        graph?.ok_or_else(|| Error::Driver("the captured graph is empty".into()))
    }

    /// Replay a graph recorded by [`Gpu::capture`]: after the work queued on this stream so far,
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
            .device
            .ctx
            .new_event(Some(CUevent_flags::CU_EVENT_DISABLE_TIMING))?)
    }

    /// [`Gpu::launch_stream`], for work queued outside [`Gpu::launch`] (NCCL collectives).
    #[cfg_attr(not(feature = "nccl"), allow(dead_code))]
    pub(crate) fn current_stream(&self) -> &Arc<CudaStream> {
        self.launch_stream()
    }

    /// The stream launches go to: the capture stream while this thread records on this `Gpu`.
    fn launch_stream(&self) -> &Arc<CudaStream> {
        if CAPTURING.get() == Some(self.id) {
            &self.capture_stream
        } else {
            &self.stream
        }
    }

    /// The raw device address of one of our buffers, for kernel argument structs. It waits on
    /// and records no event, since our buffers carry none (see the module documentation): that
    /// is what keeps a launch capturable.
    pub(crate) fn device_ptr<T>(&self, s: &CudaSlice<T>) -> u64 {
        debug_assert!(
            !s.context().is_event_tracking(),
            "device_ptr is for ferrinfer's own buffers, which carry no events"
        );
        let (ptr, _no_event) = s.device_ptr(&self.stream);
        ptr
    }

    /// What `load` makes of the module `key` (its loaded functions and whatever the caller keeps
    /// with them), built on first use and kept for the life of the device (shared by every `Gpu`
    /// on it). `load` runs under the cache's lock, so a kernel is compiled and loaded once
    /// however many threads ask. A load while the stream is being captured is refused.
    pub(crate) fn cached<M: Clone + Send + 'static>(
        &self,
        key: &str,
        load: impl FnOnce() -> Result<M>,
    ) -> Result<M> {
        let mut loaded = self.device.loaded.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = loaded.get(key).and_then(|m| m.downcast_ref::<M>()) {
            return Ok(m.clone());
        }
        self.check_not_capturing(&format!("loading kernel {key}"))?;
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
            .device
            .ctx
            .load_module(Ptx::from_binary(cubin.to_vec()))
            .map_err(|e| Error::Driver(format!("loading {what}: {e}")))?;
        self.device.loads.fetch_add(1, Ordering::Relaxed);
        use cudarc::driver::sys::CUfunction_attribute as F;
        let max_shared = self.device.max_shared_bytes as i32;
        names
            .iter()
            .map(|name| {
                let f = module
                    .load_function(name)
                    .map_err(|e| Error::Driver(format!("finding {name} in {what}: {e}")))?;
                let static_shared = f.get_attribute(F::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES)?;
                f.set_attribute(
                    F::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    max_shared - static_shared,
                )?;
                Ok(f)
            })
            .collect()
    }

    /// Launch `f` with the arguments `push` adds, on this `Gpu`'s stream (its graph stream while
    /// this thread records), after checking the geometry against CUDA's and this device's limits.
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
        let cfg = self.launch_config(dims)?;
        let mut launch = self.launch_stream().launch_builder(f);
        push(&mut launch);
        // SAFETY: the caller's contract (above) is what cudarc's launch requires.
        unsafe { launch.launch(cfg) }?;
        Ok(())
    }

    /// Launch `f` as the programmatic dependent of the kernel before it on the stream: on Hopper
    /// and later it may start once every CTA of that kernel has started (and called
    /// `let_next_grid_start`), and it waits for that kernel's end where it calls
    /// `wait_for_prior_grid` (kernels/cuda/core/grid_order.cuh). Before Hopper an ordinary launch.
    /// `params` holds one pointer to each argument's value, in the kernel's parameter order.
    ///
    /// # Safety
    /// As for [`Gpu::launch`], and `f` reads nothing the kernel before it writes until it has
    /// called `wait_for_prior_grid`.
    pub(crate) unsafe fn launch_dependent(
        &self,
        f: &CudaFunction,
        dims: LaunchDims,
        params: &mut [*mut std::ffi::c_void],
    ) -> Result<()> {
        use cudarc::driver::sys;
        let cfg = self.launch_config(dims)?;
        let stream = self.launch_stream();
        stream.context().bind_to_thread()?;
        // SAFETY: CUlaunchAttribute is plain C data, for which all zeros is a valid value.
        let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let ex = sys::CUlaunchConfig {
            gridDimX: cfg.grid_dim.0,
            gridDimY: cfg.grid_dim.1,
            gridDimZ: cfg.grid_dim.2,
            blockDimX: cfg.block_dim.0,
            blockDimY: cfg.block_dim.1,
            blockDimZ: cfg.block_dim.2,
            sharedMemBytes: cfg.shared_mem_bytes,
            hStream: stream.cu_stream(),
            attrs: &mut attr,
            // The attribute needs sm_90; older devices get an ordinary launch.
            numAttrs: u32::from(self.arch().major >= 9),
        };
        // SAFETY: the config and attribute outlive the call; `params` points at the arguments
        // (the caller's contract, as for `launch`), and `f` belongs to this stream's context.
        unsafe {
            sys::cuLaunchKernelEx(
                &ex,
                f.cu_function(),
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        }
        .result()
        .map_err(|e| Error::Driver(format!("launching a dependent kernel: {e}")))
    }

    /// The launch config of `dims`, checked against CUDA's and this device's limits.
    fn launch_config(&self, dims: LaunchDims) -> Result<LaunchConfig> {
        let max_grid_yz = 65_535;
        if dims.grid[1] > max_grid_yz || dims.grid[2] > max_grid_yz || dims.grid[0] == 0 {
            return Err(Error::unsupported(format!(
                "launch grid {:?} is outside CUDA's limits",
                dims.grid
            )));
        }
        if dims.shared_bytes > self.device.max_shared_bytes {
            return Err(Error::unsupported(format!(
                "the kernel asks for {} bytes of shared memory; this GPU has {} per block",
                dims.shared_bytes, self.device.max_shared_bytes
            )));
        }
        Ok(LaunchConfig {
            grid_dim: (dims.grid[0], dims.grid[1], dims.grid[2]),
            block_dim: (dims.block[0], dims.block[1], dims.block[2]),
            shared_mem_bytes: dims.shared_bytes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::{CUstreamCaptureStatus as S, SmResources, refuse_in_capture};

    #[test]
    fn only_an_idle_stream_takes_uploads_and_loads() {
        refuse_in_capture("uploading a buffer", S::CU_STREAM_CAPTURE_STATUS_NONE).unwrap();
        for status in [
            S::CU_STREAM_CAPTURE_STATUS_ACTIVE,
            S::CU_STREAM_CAPTURE_STATUS_INVALIDATED,
        ] {
            let e = refuse_in_capture("loading kernel ops/x", status)
                .unwrap_err()
                .to_string();
            assert!(e.contains("loading kernel ops/x"), "{e}");
            assert!(e.contains("captured into a CUDA graph"), "{e}");
            assert!(e.contains("once before capturing"), "{e}");
        }
    }

    #[test]
    fn resident_ctas_take_the_scarcer_resource() {
        // An H100 / H200 SM: 228 KiB of shared memory, 1 KiB reserved per CTA, 64 Ki registers.
        let sm = SmResources {
            shared_bytes: 233_472,
            reserved_shared_per_cta: 1024,
            registers: 65_536,
        };
        // The 16-row tile at hd128: one warp and 37.7 KB -> shared memory allows 6; two warps
        // along the keys and 71 KB -> 3.
        assert_eq!(sm.resident_ctas(32, 37_704, 255), 6);
        assert_eq!(sm.resident_ctas(64, 71_240, 255), 3);
        // 128-row tile: four warps of 255 registers -> registers allow 2.
        assert_eq!(sm.resident_ctas(128, 66_368, 255), 2);
        // Registers round up per warp: 129 per thread takes 136 x 32 = 4352 a warp.
        assert_eq!(sm.resident_ctas(128, 0, 129), 65_536 / (4 * 4352));
        // Something always runs, if slowly; whether it fits at all is `fits`.
        assert_eq!(sm.resident_ctas(1024, 300_000, 255), 1);
        assert!(!sm.fits(300_000));
        assert!(sm.fits(232_448) && !sm.fits(232_449));
    }
}
