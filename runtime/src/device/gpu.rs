//! One CUDA device: its context and stream, its architecture, and the kernels loaded on it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{
    CudaContext, CudaFunction, CudaGraph, CudaSlice, CudaStream, DevicePtr, DeviceRepr,
    LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use cudarc::nvrtc::Ptx;
use ferrinfer_kernels::abi::AttnArgs;
use ferrinfer_kernels::{KernelConfig, LaunchDims};

use crate::error::{Error, Result};
use crate::jit::{Arch, CompiledKernel};

/// A CUDA device with one stream on which all of ferrinfer's work is ordered.
pub struct Gpu {
    ordinal: usize,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    arch: Arch,
    sm_count: u32,
    /// Shared memory a block may opt in to.
    max_shared_bytes: u32,
    sm_resources: SmResources,
    /// Kernels loaded on this device, by dispatch key.
    loaded: Mutex<HashMap<String, Kernel>>,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Gpu({}, {})", self.ordinal, self.arch.sm_name())
    }
}

/// A loaded kernel instance: its entry, and the merge pass of split-KV work lists if it has one.
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

#[derive(Clone, Debug)]
pub(crate) struct Kernel {
    pub main: CudaFunction,
    pub merge: Option<CudaFunction>,
    /// The attention-template instance these come from (its launch geometry follows it); none
    /// for other kernels (cascade).
    pub cfg: Option<KernelConfig>,
}

/// Largest `struct Params` a variant may have, in bytes (kernel parameters are limited to 4 KiB).
const MAX_PARAM_BYTES: usize = 1024;

/// Packed `struct Params`, padded to a fixed size: the driver copies the kernel's declared size.
#[repr(C, align(8))]
struct ParamBlob([u8; MAX_PARAM_BYTES]);

/// `AttnArgs` as a kernel argument passed by value.
#[repr(transparent)]
struct ArgsParam(AttnArgs);

// SAFETY: both are plain bytes in C layout (AttnArgs is #[repr(C)] of integers and floats), which is
// what DeviceRepr requires of a by-value kernel argument.
unsafe impl DeviceRepr for ParamBlob {}
// SAFETY: as above.
unsafe impl DeviceRepr for ArgsParam {}

impl Gpu {
    /// Open device `ordinal`. Fails with [`Error::CudaUnavailable`] when there is no driver or GPU.
    pub fn new(ordinal: usize) -> Result<Self> {
        crate::device::toolkit::load_driver()?;
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| Error::CudaUnavailable(format!("cannot open GPU {ordinal}: {e}")))?;
        // SAFETY: ferrinfer orders all of its work on the one stream below, so cudarc's per-buffer
        // events, which synchronise buffers across streams, are not needed.
        unsafe { ctx.disable_event_tracking() };
        // A stream of our own: the legacy default stream cannot be captured into a CUDA graph.
        let stream = ctx.new_stream()?;
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
    /// Record the work `f` queues on this GPU into a CUDA graph, to replay with `launch()`.
    ///
    /// Everything `f` runs must have run once before (so its kernels are compiled and loaded and
    /// its parameter arrays uploaded): capture records launches, it cannot compile or allocate.
    pub fn capture(&self, f: impl FnOnce() -> Result<()>) -> Result<CudaGraph> {
        self.stream.begin_capture(
            cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
        )?;
        let recorded = f();
        let graph = self
            .stream
            .end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0))?;
        recorded?;
        graph.ok_or_else(|| Error::Driver("the captured graph is empty".into()))
    }

    /// The raw device address of a buffer, for kernel argument structs.
    pub fn device_ptr<T>(&self, s: &CudaSlice<T>) -> u64 {
        let (ptr, _sync) = s.device_ptr(&self.stream);
        ptr
    }

    /// The loaded kernel for `key`, loading the CUBIN `compile()` returns on first use; for an
    /// attention-template instance (the config it returns), with the unit's merge entry if any.
    pub(crate) fn kernel(
        &self,
        key: &str,
        compile: impl FnOnce() -> Result<(Arc<CompiledKernel>, Option<KernelConfig>)>,
    ) -> Result<Kernel> {
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(k) = loaded.get(key) {
            return Ok(k.clone());
        }
        let (compiled, cfg) = compile()?;
        let merge = cfg.map(|c| format!("ferrinfer_{}_merge", c.name()));
        let module = self
            .ctx
            .load_module(Ptx::from_binary(compiled.cubin.clone()))
            .map_err(|e| Error::Driver(format!("loading {key}: {e}")))?;
        let function = |name: &str| -> Result<CudaFunction> {
            let f = module
                .load_function(name)
                .map_err(|e| Error::Driver(format!("finding {name} in {key}: {e}")))?;
            // Allow the opt-in shared memory now, so that no launch (nor a graph capture) has to.
            f.set_attribute(
                cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                self.max_shared_bytes as i32 - f.get_attribute(
                    cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES,
                )?,
            )?;
            Ok(f)
        };
        let kernel = Kernel {
            main: function(&compiled.entry)?,
            merge: merge.as_deref().map(function).transpose()?,
            cfg,
        };
        loaded.insert(key.to_string(), kernel.clone());
        Ok(kernel)
    }

    /// Launch an attention kernel with its arguments and packed variant parameters.
    pub(crate) fn launch_attention(
        &self,
        f: &CudaFunction,
        dims: LaunchDims,
        args: AttnArgs,
        params: &[u8],
    ) -> Result<()> {
        if params.len() > MAX_PARAM_BYTES {
            return Err(Error::unsupported(format!(
                "variant parameters take {} bytes; at most {MAX_PARAM_BYTES} are supported",
                params.len()
            )));
        }
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
        let mut blob = ParamBlob([0; MAX_PARAM_BYTES]);
        blob.0[..params.len()].copy_from_slice(params);
        let args = ArgsParam(args);
        let cfg = LaunchConfig {
            grid_dim: (dims.grid[0], dims.grid[1], dims.grid[2]),
            block_dim: (dims.block[0], dims.block[1], dims.block[2]),
            shared_mem_bytes: dims.shared_bytes,
        };
        let mut launch = self.stream.launch_builder(f);
        launch.arg(&args).arg(&blob);
        // SAFETY: the kernel's signature is (AttnArgs, Params) by value, matching the two arguments;
        // every pointer in `args` was taken from a live buffer whose length the caller validated
        // against the batch (Batch::check_lengths), and the buffers outlive the launch because the
        // caller holds them and all work is ordered on this one stream.
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
