//! CUDA IPC: naming this process's device memory so that peer processes can
//! map it, and mapping theirs.
//!
//! A legacy IPC handle names a whole `cuMemAlloc` allocation, so an address
//! travels as (handle of its allocation's base, offset from that base).
//! Memory from stream-ordered pools or `cuMemCreate` has no such handle.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use cudarc::driver::sys;
use cudarc::driver::{CudaContext, DriverError};

use crate::driver;
use crate::error::{Error, Result};
use crate::memory::PointerInfo;

/// Why memory handed to peers in other processes must come from `cuMemAlloc`.
pub(crate) const IPC_HINT: &str = "peers in other processes map memory through legacy CUDA IPC, \
     which memory from a stream-ordered pool (such as cudarc's CudaStream::alloc) or from \
     cuMemCreate does not support; allocate it with Communicator::alloc, or leave it \
     unregistered so that calls copy it into the staging buffer";

/// Bytes of a `CUipcMemHandle`.
pub(crate) const HANDLE_BYTES: usize = 64;

/// Peer allocations mapped in this process right now, over all
/// communicators: what a leak test watches.
static OPEN_HANDLES: AtomicUsize = AtomicUsize::new(0);

/// How many peer allocations this process has mapped through CUDA IPC and
/// not yet closed.
pub fn open_handles() -> usize {
    OPEN_HANDLES.load(Ordering::Relaxed)
}

/// A CUDA IPC handle's bytes.
pub(crate) type Handle = [u8; HANDLE_BYTES];

/// A device address as another process can name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Exported {
    pub handle: Handle,
    pub offset: u64,
}

impl Exported {
    /// Exports the allocation holding `ptr`.
    pub fn of(ptr: u64) -> Result<Exported> {
        let info = PointerInfo::query(ptr)?;
        let handle =
            driver::ipc_get_mem_handle(info.base).map_err(|error| Error::NotShareable {
                ptr,
                reason: format!("CUDA IPC cannot export it ({error}): {IPC_HINT}"),
            })?;
        Ok(Exported {
            handle: handle.reserved.map(|b| b as u8),
            offset: ptr - info.base,
        })
    }
}

/// Peers' allocations mapped into this rank's context, each once however
/// many registrations use it; closed when the last one is released, or on
/// drop. Opened memory is never freed here: it belongs to the peer.
pub(crate) struct OpenedPeers {
    ctx: Arc<CudaContext>,
    /// Base address and number of users of each mapped allocation.
    bases: HashMap<Handle, (u64, usize)>,
}

impl OpenedPeers {
    pub fn new(ctx: Arc<CudaContext>) -> Self {
        OpenedPeers {
            ctx,
            bases: HashMap::new(),
        }
    }

    /// This process's address for a peer's exported address; counts one
    /// more user of its allocation until [`release`](Self::release).
    pub fn address(&mut self, exported: &Exported) -> Result<u64> {
        if let Some((base, users)) = self.bases.get_mut(&exported.handle) {
            *users += 1;
            return Ok(*base + exported.offset);
        }
        self.ctx
            .bind_to_thread()
            .map_err(Error::driver("cuCtxSetCurrent"))?;
        let handle = sys::CUipcMemHandle {
            reserved: exported.handle.map(|b| b as _),
        };
        let base = match driver::ipc_open_mem_handle(handle) {
            Ok(base) => base,
            Err(DriverError(sys::CUresult::CUDA_ERROR_ALREADY_MAPPED)) => {
                return Err(Error::NotShareable {
                    ptr: exported.offset,
                    reason: "a peer's buffer (at this offset in its allocation) shares a 2 MiB \
                         page with another of its buffers that this rank already mapped, \
                         and CUDA IPC maps whole pages; allocate registered buffers with \
                         Communicator::alloc (whole pages each)"
                        .into(),
                });
            }
            Err(error) => return Err(Error::driver("cuIpcOpenMemHandle")(error)),
        };
        OPEN_HANDLES.fetch_add(1, Ordering::Relaxed);
        self.bases.insert(exported.handle, (base, 1));
        Ok(base + exported.offset)
    }
}

impl OpenedPeers {
    /// One user of `handle`'s allocation is done; unmaps it after the last.
    pub fn release(&mut self, handle: &Handle) {
        let Some((base, users)) = self.bases.get_mut(handle) else {
            return;
        };
        *users -= 1;
        if *users == 0 {
            let base = *base;
            self.bases.remove(handle);
            self.close(base);
        }
    }

    /// Unmaps every opened allocation; addresses from them become invalid.
    pub fn close_all(&mut self) {
        let bases: Vec<u64> = self.bases.drain().map(|(_, (base, _))| base).collect();
        bases.into_iter().for_each(|base| self.close(base));
    }

    fn close(&self, base: u64) {
        if self.ctx.bind_to_thread().is_err() {
            return;
        }
        // SAFETY: `base` was returned by cuIpcOpenMemHandle in this context
        // and is closed once: callers removed it from `bases` first.
        if unsafe { driver::ipc_close_mem_handle(base) }.is_ok() {
            OPEN_HANDLES.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Drop for OpenedPeers {
    fn drop(&mut self) {
        self.close_all();
    }
}
