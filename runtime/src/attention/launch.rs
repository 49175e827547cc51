//! Loading and launching an attention-template instance: its entry and merge pass, the by-value
//! `AttnArgs` and the variant's packed `struct Params`.

use std::sync::Arc;

use cudarc::driver::{CudaFunction, DeviceRepr, PushKernelArg};
use ferrinfer_kernels::abi::{AttnArgs, Sm90Maps};
use ferrinfer_kernels::{KernelConfig, LaunchDims};

use crate::device::Gpu;
use crate::error::{Error, Result};
use crate::jit::CompiledKernel;

/// A loaded instance: its entry, its merge pass, and the config it was compiled for (its launch
/// geometry follows it; the dispatcher may have chosen a wider K/V tile than was asked for).
#[derive(Clone, Debug)]
pub(crate) struct Kernel {
    pub main: CudaFunction,
    pub merge: CudaFunction,
    pub cfg: KernelConfig,
}

/// The instance cached on `gpu` under `key`, compiled by `compile` on first use.
pub(crate) fn load(
    gpu: &Gpu,
    key: &str,
    compile: impl FnOnce() -> Result<(Arc<CompiledKernel>, KernelConfig)>,
) -> Result<Kernel> {
    gpu.cached(key, || {
        let (compiled, cfg) = compile()?;
        let merge = format!("{}_merge", compiled.entry);
        let f = gpu.load(key, &compiled.cubin, &[&compiled.entry, &merge])?;
        let [main, merge] = <[CudaFunction; 2]>::try_from(f).expect("two names, two functions");
        Ok(Kernel { main, merge, cfg })
    })
}

/// Largest `struct Params` a variant may have, in bytes (kernel parameters are limited to 4 KiB).
const MAX_PARAM_BYTES: usize = 1024;

/// Packed `struct Params`, padded to a fixed size: the driver copies the kernel's declared size.
#[repr(C, align(8))]
struct ParamBlob([u8; MAX_PARAM_BYTES]);

/// `AttnArgs` as a kernel argument passed by value.
#[repr(transparent)]
struct ArgsParam(AttnArgs);

/// The FA3 entry's TMA maps, passed by value.
#[repr(transparent)]
struct MapsParam(Sm90Maps);

// SAFETY: both are plain bytes in C layout (AttnArgs is #[repr(C)] of integers and floats), which is
// what DeviceRepr requires of a by-value kernel argument.
unsafe impl DeviceRepr for ParamBlob {}
// SAFETY: as above.
unsafe impl DeviceRepr for ArgsParam {}
// SAFETY: as above (Sm90Maps is #[repr(C, align(64))] of integers).
unsafe impl DeviceRepr for MapsParam {}

/// Launch `f` (an instance's entry or merge pass, signature `(AttnArgs, Params)` by value) with
/// these arguments and packed variant parameters.
///
/// # Safety
/// Every address in `args` must point into a live buffer (or scratch) on `gpu` that holds what
/// the batch the plan validated (`Batch::validate`, buffer lengths by `Batch::check_rows`, the
/// workspace by its capacity) needs, and stay alive until the stream has run the launch.
pub(crate) unsafe fn launch(
    gpu: &Gpu,
    f: &CudaFunction,
    dims: LaunchDims,
    args: AttnArgs,
    params: &[u8],
) -> Result<()> {
    let blob = blob(params)?;
    let args = ArgsParam(args);
    // SAFETY: the entries of every attention unit take (AttnArgs, Params) by value, these two in
    // this order (kernels::tu); the addresses are the caller's contract above.
    unsafe {
        gpu.launch(f, dims, |l| {
            l.arg(&args).arg(&blob);
        })
    }
}

/// [`launch`] for an FA3 entry, which takes its TMA maps third.
///
/// # Safety
/// As for [`launch`]; the maps, where `maps.tma` is 1, describe K and V of `args` within their
/// buffers (`tma::shape` bounds the rows by the buffer's length).
pub(crate) unsafe fn launch_sm90(
    gpu: &Gpu,
    f: &CudaFunction,
    dims: LaunchDims,
    args: AttnArgs,
    params: &[u8],
    maps: Sm90Maps,
) -> Result<()> {
    let blob = blob(params)?;
    let (args, maps) = (ArgsParam(args), MapsParam(maps));
    // SAFETY: FA3 entries take (AttnArgs, Params, Sm90Maps) by value, in this order (kernels::tu,
    // the prefill family's entry_extra); the addresses are the caller's contract above.
    unsafe {
        gpu.launch(f, dims, |l| {
            l.arg(&args).arg(&blob).arg(&maps);
        })
    }
}

/// [`launch`] for an instance's merge pass, right after its entry on the stream: as that
/// entry's programmatic dependent (`Gpu::launch_dependent`), so that on Hopper the merge's index
/// work runs beside the entry's last tiles; it waits for the entry's end before it reads a
/// partial (`wait_for_prior_grid` in merge.cuh).
///
/// # Safety
/// As for [`launch`], and the kernel before it on the stream is the entry that writes the
/// partials this merge reads.
pub(crate) unsafe fn launch_merge(
    gpu: &Gpu,
    f: &CudaFunction,
    dims: LaunchDims,
    args: AttnArgs,
    params: &[u8],
) -> Result<()> {
    let mut blob = blob(params)?;
    let mut args = ArgsParam(args);
    let mut ptrs = [
        (&raw mut args).cast::<std::ffi::c_void>(),
        (&raw mut blob).cast::<std::ffi::c_void>(),
    ];
    // SAFETY: merge entries take (AttnArgs, Params) by value, in this order (kernels::attention::
    // merge::entry), and read partials only past wait_for_prior_grid; the addresses are the
    // caller's contract above. `args` and `blob` live until the call returns, and the driver
    // copies the values at launch.
    unsafe { gpu.launch_dependent(f, dims, &mut ptrs) }
}

fn blob(params: &[u8]) -> Result<ParamBlob> {
    if params.len() > MAX_PARAM_BYTES {
        return Err(Error::unsupported(format!(
            "variant parameters take {} bytes; at most {MAX_PARAM_BYTES} are supported",
            params.len()
        )));
    }
    let mut blob = ParamBlob([0; MAX_PARAM_BYTES]);
    blob.0[..params.len()].copy_from_slice(params);
    Ok(blob)
}
