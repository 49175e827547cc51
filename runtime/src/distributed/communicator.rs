//! One rank's NCCL communicator, bound to that rank's GPU backend and its stream.

use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use cudarc::nccl::sys::{ncclComm_t, ncclUniqueId};

use crate::device::backend::Backend;
use crate::device::dtype::Pod;
use crate::device::gpu::Gpu;
use crate::device::view::Dst;
use crate::distributed::library::{NcclLibrary, nccl_library};
use crate::error::{Error, Result};

/// `ncclSum`, NCCL's `ncclRedOp_t` for a sum (stable across NCCL 2.x).
const NCCL_SUM: i32 = 0;

pub(crate) mod sealed {
    /// NCCL's `ncclDataType_t` value of an element type (stable across NCCL 2.x).
    pub trait NcclType {
        const NCCL: i32;
    }
}

/// An element type NCCL reduces: `f32`, `f64`, `half::f16`, `half::bf16`, `i32`, `i64`, `u8`.
/// Sealed. bf16 and f16 are summed by NCCL in their own precision, rank by rank.
///
/// ```
/// use ferrinfer_runtime::distributed::ReduceElement;
/// fn reducible<T: ReduceElement>() {}
/// reducible::<half::bf16>();
/// reducible::<f32>();
/// ```
pub trait ReduceElement: Pod + sealed::NcclType {}

macro_rules! reduce_element {
    ($($t:ty => $code:expr),* $(,)?) => {$(
        impl sealed::NcclType for $t {
            const NCCL: i32 = $code;
        }
        impl ReduceElement for $t {}
    )*};
}
// ncclUint8 1, ncclInt32 2, ncclInt64 4, ncclFloat16 6, ncclFloat32 7, ncclFloat64 8,
// ncclBfloat16 9 (nccl.h).
reduce_element!(
    u8 => 1,
    i32 => 2,
    i64 => 4,
    half::f16 => 6,
    f32 => 7,
    f64 => 8,
    half::bf16 => 9,
);

/// The identity of one communicator, made once (by one rank) and given to every rank: to other
/// threads by copy, to other processes as its 128 bytes ([`NcclId::to_bytes`] /
/// [`NcclId::from_bytes`]).
///
/// ```no_run
/// use ferrinfer_runtime::distributed::NcclId;
/// let id = NcclId::new()?;
/// let same = NcclId::from_bytes(id.to_bytes());
/// assert_eq!(same.to_bytes(), id.to_bytes());
/// # Ok::<(), ferrinfer_runtime::Error>(())
/// ```
#[derive(Clone, Copy)]
pub struct NcclId(ncclUniqueId);

impl std::fmt::Debug for NcclId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NcclId(..)")
    }
}

impl NcclId {
    /// A fresh id (`ncclGetUniqueId`). Fails with [`Error::CudaUnavailable`] when libnccl is not
    /// found (see [`nccl_library`]).
    pub fn new() -> Result<Self> {
        let lib = nccl_library()?;
        let mut id = ncclUniqueId { internal: [0; 128] };
        // SAFETY: ncclGetUniqueId writes one ncclUniqueId through a valid pointer.
        lib.check("ncclGetUniqueId", unsafe { (lib.get_unique_id)(&mut id) })?;
        Ok(NcclId(id))
    }
    /// The id's bytes, to send to ranks in other processes.
    pub fn to_bytes(&self) -> [u8; 128] {
        self.0.internal.map(|c| c as u8)
    }
    /// The id another process made, from its bytes.
    pub fn from_bytes(bytes: [u8; 128]) -> Self {
        NcclId(ncclUniqueId {
            internal: bytes.map(|b| b as _),
        })
    }
}

/// One rank of an NCCL communicator, on one GPU [`Backend`]: its collectives run on that
/// backend's stream (the caller's, for [`Backend::on_stream`]), ordered with ferrinfer's launches
/// there, and inside a CUDA graph captured there.
///
/// Creating it is collective: every rank of `world` must call [`Communicator::new`] with the same
/// id, each from its own thread (or process), or the call waits for the missing ones. World size
/// 1 is a communicator of one GPU. `Send + Sync`; its collectives are serialised by a lock.
///
/// ```no_run
/// use ferrinfer_runtime::Backend;
/// use ferrinfer_runtime::distributed::{Communicator, NcclId};
/// # fn main() -> ferrinfer_runtime::Result<()> {
/// let world = 2;
/// let id = NcclId::new()?;
/// let comms: Vec<Communicator> = std::thread::scope(|s| {
///     let ranks: Vec<_> = (0..world)
///         .map(|rank| s.spawn(move || Communicator::new(&Backend::cuda(rank)?, &id, rank, world)))
///         .collect();
///     ranks.into_iter().map(|r| r.join().unwrap()).collect::<ferrinfer_runtime::Result<_>>()
/// })?;
/// assert_eq!(comms[1].rank(), 1);
/// # Ok(()) }
/// ```
pub struct Communicator {
    lib: &'static NcclLibrary,
    /// Locked around each group of calls: NCCL forbids concurrent use of one communicator.
    comm: Mutex<ncclComm_t>,
    backend: Backend,
    rank: usize,
    world: usize,
}

// SAFETY: the raw ncclComm_t is only used under the `comm` lock (NCCL allows a communicator to be
// used from any thread, one at a time), and destroyed once, in Drop.
unsafe impl Send for Communicator {}
// SAFETY: as above: every use of the handle takes the lock.
unsafe impl Sync for Communicator {}

impl std::fmt::Debug for Communicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Communicator")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("backend", &self.backend.describe())
            .finish()
    }
}

impl Communicator {
    /// Rank `rank` of `world` on `backend` (a GPU), joining the communicator `id` names. Blocks
    /// until every rank has joined.
    ///
    /// Errors: a CPU backend, `rank >= world`, a world past `i32::MAX`, libnccl not found, or
    /// NCCL's own failure (named).
    pub fn new(backend: &Backend, id: &NcclId, rank: usize, world: usize) -> Result<Self> {
        let Backend::Cuda(gpu) = backend else {
            return Err(Error::unsupported(
                "a Communicator needs a GPU backend; simulate ranks on the CPU with shard_kv and \
                 merge_ranks instead",
            ));
        };
        if rank >= world || world > i32::MAX as usize {
            return Err(Error::invalid(format!(
                "Communicator: rank must be below world and world below 2^31, got rank {rank} of \
                 {world}"
            )));
        }
        let lib = nccl_library()?;
        // NCCL takes the device from the thread's current context.
        gpu.context().bind_to_thread()?;
        let mut comm: ncclComm_t = std::ptr::null_mut();
        // SAFETY: ncclCommInitRank writes one communicator handle through a valid pointer; rank
        // and world were checked to fit c_int and rank < world above.
        let rc = unsafe { (lib.comm_init_rank)(&mut comm, world as i32, id.0, rank as i32) };
        lib.check("ncclCommInitRank", rc)?;
        Ok(Communicator {
            lib,
            comm: Mutex::new(comm),
            backend: backend.clone(),
            rank,
            world,
        })
    }
    /// This rank, in `0..world`.
    pub fn rank(&self) -> usize {
        self.rank
    }
    /// Ranks in the communicator.
    pub fn world(&self) -> usize {
        self.world
    }
    /// The GPU backend whose stream the collectives run on.
    pub fn backend(&self) -> &Backend {
        &self.backend
    }
    pub(crate) fn gpu(&self) -> &Arc<Gpu> {
        match &self.backend {
            Backend::Cuda(gpu) => gpu,
            Backend::Cpu => unreachable!("Communicator::new refuses the CPU backend"),
        }
    }

    /// Sum `buf` over every rank, in place: afterwards each rank's `buf` holds the element-wise
    /// sum of all ranks' (the same values on every rank). Collective: every rank calls it with
    /// a buffer of the same length and type, in the same order as its other collectives.
    ///
    /// Asynchronous and capturable, as ferrinfer's ops: it is queued on the stream launches
    /// currently go to (the backend's; the capture stream while this thread records a graph
    /// with [`crate::GraphRun`] or the plans' `capture`; a caller's stream given to
    /// [`Backend::on_stream`], captured by the caller), allocates nothing and waits for nothing.
    /// A first, eager call sets up NCCL's connections, which a capture cannot do.
    ///
    /// Errors: `buf` on the host or on another GPU, a length whose bytes overflow, NCCL's own
    /// failure (named). An empty `buf` is a no-op on every rank. NCCL cannot see the other
    /// ranks' lengths: a rank passing another length hangs or reads past the shorter buffer's
    /// peers, so keep the lengths in lockstep (as a tensor-parallel model does by construction).
    ///
    /// ```no_run
    /// use ferrinfer_runtime::Backend;
    /// use ferrinfer_runtime::distributed::{Communicator, NcclId};
    /// # fn main() -> ferrinfer_runtime::Result<()> {
    /// let (world, id) = (2, NcclId::new()?);
    /// let sums: Vec<Vec<f32>> = std::thread::scope(|s| {
    ///     let ranks: Vec<_> = (0..world)
    ///         .map(|rank| {
    ///             s.spawn(move || -> ferrinfer_runtime::Result<Vec<f32>> {
    ///                 let backend = Backend::cuda(rank)?;
    ///                 let comm = Communicator::new(&backend, &id, rank, world)?;
    ///                 let mut x = backend.upload(&[rank as f32 + 1.0; 4])?;
    ///                 comm.all_reduce_sum(&mut x)?;
    ///                 x.to_vec() // waits for the stream
    ///             })
    ///         })
    ///         .collect();
    ///     ranks.into_iter().map(|r| r.join().unwrap()).collect::<ferrinfer_runtime::Result<_>>()
    /// })?;
    /// assert!(sums.iter().all(|x| x == &[3.0; 4])); // 1 + 2 on both ranks
    /// # Ok(()) }
    /// ```
    pub fn all_reduce_sum<T: ReduceElement>(&self, buf: &mut dyn Dst<T>) -> Result<()> {
        let count = checked_count::<T>(buf.len())?;
        // Checks that the memory is on this communicator's GPU (an error for host memory).
        let ptr = buf.device_ptr(self.gpu()).map_err(|e| {
            Error::invalid(format!(
                "Communicator::all_reduce_sum (rank {} of {}): {e}",
                self.rank, self.world
            ))
        })?;
        if count == 0 {
            return Ok(());
        }
        let comm = self.comm.lock().unwrap_or_else(|p| p.into_inner());
        let stream = self.gpu().current_stream().cu_stream() as _;
        // SAFETY: `ptr` is device memory of this communicator's GPU holding `count` elements of
        // T (device_ptr checked the device, `buf.len()` is its length), borrowed mutably for this
        // call and, as every buffer of ferrinfer's ops, used afterwards only by work queued on
        // the same stream; send and receive being one buffer is NCCL's in-place form; T's NCCL
        // code comes from the sealed table above; the handle is live and used under its lock.
        let rc = unsafe {
            (self.lib.all_reduce)(
                ptr as *const c_void,
                ptr as *mut c_void,
                count,
                <T as sealed::NcclType>::NCCL,
                NCCL_SUM,
                *comm,
                stream,
            )
        };
        self.lib.check("ncclAllReduce", rc)
    }

    /// All-gathers, grouped into one NCCL group, on the stream launches currently go to (the
    /// backend's, or the capture stream while this thread records a graph on it). Each entry is
    /// (send address, receive address, elements sent, NCCL data type); every receive buffer holds
    /// `world` times the elements sent.
    ///
    /// # Safety
    /// Every address must be of live device memory on this communicator's GPU, each send buffer
    /// holding `count` and each receive buffer `world * count` elements of the given type, and
    /// stay alive until the stream has run the collective.
    pub(crate) unsafe fn all_gather(&self, ops: &[(u64, u64, usize, i32)]) -> Result<()> {
        let comm = self.comm.lock().unwrap_or_else(|p| p.into_inner());
        let stream = self.gpu().current_stream().cu_stream() as _;
        let lib = self.lib;
        // SAFETY: group start/end take no arguments.
        lib.check("ncclGroupStart", unsafe { (lib.group_start)() })?;
        let mut first_err = Ok(());
        for &(send, recv, count, dtype) in ops {
            // SAFETY: the caller guarantees the buffers (see # Safety); the communicator handle
            // is live (destroyed only in Drop) and used under its lock.
            let rc = unsafe {
                (lib.all_gather)(
                    send as *const c_void,
                    recv as *mut c_void,
                    count,
                    dtype,
                    *comm,
                    stream,
                )
            };
            if first_err.is_ok() {
                first_err = lib.check("ncclAllGather", rc);
            }
        }
        // The group must be closed even when a call in it failed.
        // SAFETY: as group start.
        let end = lib.check("ncclGroupEnd", unsafe { (lib.group_end)() });
        first_err.and(end)
    }
}

/// `len` elements of `T`, refused when their bytes do not fit an allocation (`isize::MAX`).
fn checked_count<T>(len: usize) -> Result<usize> {
    match len.checked_mul(std::mem::size_of::<T>()) {
        Some(bytes) if bytes <= isize::MAX as usize => Ok(len),
        _ => Err(Error::invalid(format!(
            "Communicator::all_reduce_sum: {len} elements of {} bytes overflow an allocation",
            std::mem::size_of::<T>()
        ))),
    }
}

impl Drop for Communicator {
    fn drop(&mut self) {
        let comm = *self.comm.get_mut().unwrap_or_else(|p| p.into_inner());
        // SAFETY: the handle came from ncclCommInitRank and is destroyed once, here.
        let rc = unsafe { (self.lib.comm_destroy)(comm) };
        if let Err(e) = self.lib.check("ncclCommDestroy", rc) {
            log::warn!("{e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::sealed::NcclType;
    use super::*;

    /// The codes are nccl.h's `ncclDataType_t`; the context-parallel path names the same ones.
    #[test]
    fn nccl_type_codes_match_nccl_h() {
        assert_eq!(<u8 as NcclType>::NCCL, 1);
        assert_eq!(<i32 as NcclType>::NCCL, 2);
        assert_eq!(<i64 as NcclType>::NCCL, 4);
        assert_eq!(<half::f16 as NcclType>::NCCL, 6);
        assert_eq!(<f32 as NcclType>::NCCL, 7);
        assert_eq!(<f64 as NcclType>::NCCL, 8);
        assert_eq!(<half::bf16 as NcclType>::NCCL, 9);
        assert_eq!(NCCL_SUM, 0);
    }

    #[test]
    fn counts_whose_bytes_overflow_are_refused() {
        assert_eq!(checked_count::<half::bf16>(1 << 20).unwrap(), 1 << 20);
        assert_eq!(checked_count::<f32>(0).unwrap(), 0);
        let e = checked_count::<f32>(usize::MAX / 2)
            .unwrap_err()
            .to_string();
        assert!(e.contains("overflow"), "{e}");
    }
}
