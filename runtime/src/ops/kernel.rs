//! What every op's GPU half shares: its argument struct passed by value, the module cache, the
//! arch check and the launch. An op file supplies its translation unit, launch dims and arguments.

use cudarc::driver::{DeviceRepr, PushKernelArg};
use ferrinfer_kernels::{LaunchDims, TranslationUnit};

use crate::attention::dispatch;
use crate::device::gpu::Gpu;
use crate::error::{Error, Result};
use crate::jit::Jit;

/// An op's `#[repr(C)]` argument struct, passed to its kernel by value.
///
/// # Safety
/// The type must be `#[repr(C)]`, made of plain integer and float fields with no padding, and
/// match the CUDA struct of the kernel field for field (each op file has a test tying the two).
pub(crate) unsafe trait KernelArgs: Copy + Send + Sync + 'static {}

#[repr(transparent)]
struct ByValue<A>(A);

// SAFETY: KernelArgs promises plain bytes laid out as the CUDA struct, which is what DeviceRepr
// asks of a by-value kernel argument.
unsafe impl<A: KernelArgs> DeviceRepr for ByValue<A> {}

/// Load (compiling on first use, through the disk cache) the op kernel `name` and launch it with
/// `args` on the GPU's stream. `unit` builds the translation unit and runs only when `name` is
/// not loaded yet, so `name` must tell apart every instance (`rmsnorm_bf16_v8`).
///
/// # Safety
/// `args` must be the argument struct of the unit's entry, and every device address in it must
/// point into live memory of this GPU that the kernel, launched with `dims`, stays inside of
/// (the op's checks make it so; its SAFETY comment names them) and that outlives the launch.
pub(crate) unsafe fn launch<A: KernelArgs>(
    gpu: &Gpu,
    name: &str,
    unit: impl FnOnce() -> std::result::Result<TranslationUnit, String>,
    dims: LaunchDims,
    args: A,
) -> Result<()> {
    let arch = gpu.arch();
    // The one arch check of every kernel (sm_80 or newer), with its message.
    dispatch::arch_class(arch)?;
    let key = format!("ops/{name}/{}", arch.sm_name());
    let kernel = gpu.cached(&key, || {
        let tu = unit().map_err(|e| Error::unsupported(format!("op kernel {name}: {e}")))?;
        let compiled = Jit::global().compile(&tu, arch)?;
        let mut f = gpu.load(&key, &compiled.cubin, &[&compiled.entry])?;
        Ok(f.remove(0))
    })?;
    let param = ByValue(args);
    // SAFETY: this function's contract: `args` is the entry's one by-value parameter and its
    // pointers stay in bounds of live memory for this launch.
    unsafe {
        gpu.launch(&kernel, dims, |l| {
            l.arg(&param);
        })
    }
}
