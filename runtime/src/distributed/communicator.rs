//! One rank's NCCL communicator, bound to that rank's GPU backend and its stream.

use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use cudarc::nccl::sys::{ncclComm_t, ncclUniqueId};

use crate::device::backend::Backend;
use crate::device::gpu::Gpu;
use crate::distributed::library::{NcclLibrary, nccl_library};
use crate::error::{Error, Result};

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
