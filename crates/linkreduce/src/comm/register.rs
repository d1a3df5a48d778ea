//! The buffer table (docs/design.md, "Buffer table"): buffers registered
//! eagerly, buffers that captured graphs read, and the peer mappings both
//! hold. Every step here is collective.

use std::collections::HashMap;

use cudarc::driver::DevicePtr;

use super::Communicator;
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::ipc::Handle;
use crate::registry::Registry;
use crate::rendezvous::{agree, exchange};
use crate::transport::{PeerAddress, Transport};

/// This rank's numbering of its buffers and what it mapped of its peers'.
pub(super) struct Buffers {
    pub registry: Registry,
    pub transport: Transport,
    /// Peer allocations each eager registration mapped, by the index this
    /// rank registered in the same step.
    mapped: HashMap<usize, Vec<Handle>>,
    /// Peer allocations the buffers of registered graphs mapped.
    graph_mapped: Vec<Handle>,
}

impl Buffers {
    pub fn new(registry: Registry, transport: Transport) -> Self {
        Buffers {
            registry,
            transport,
            mapped: HashMap::new(),
            graph_mapped: Vec::new(),
        }
    }

    /// Whether some peer lives in another process.
    pub fn crosses_processes(&self) -> bool {
        self.transport.crosses_processes()
    }

    /// Unmaps every peer allocation this rank opened.
    pub fn close_peers(&mut self) {
        self.transport.close_peers();
    }

    /// Unmaps what the registration step of `index` mapped.
    fn release_mapped(&mut self, index: usize) {
        if let Some(mapped) = self.mapped.remove(&index) {
            self.transport.release(&mapped);
        }
    }
}

/// Table entries (owner, index, address) and the peer allocations mapped
/// for them, from what every rank shared.
fn entries_of(shared: Vec<Vec<PeerAddress>>) -> (Vec<(usize, usize, u64)>, Vec<Handle>) {
    let mut entries = Vec::new();
    let mut mapped = Vec::new();
    for (owner, addresses) in shared.into_iter().enumerate() {
        for address in addresses {
            entries.push((owner, address.tag as usize, address.address));
            mapped.extend(address.mapped);
        }
    }
    (entries, mapped)
}

impl Communicator {
    /// Registers `buffer` so that all-reduces read it where it is instead of
    /// copying it into staging. Collective: every rank registers one buffer
    /// (of any size) in the same step. Calls may then pass it, or any part
    /// of it at a 16-byte aligned address, on any rank. Not while the stream
    /// is captured.
    pub fn register<T: Element>(&mut self, buffer: &impl DevicePtr<T>) -> Result<()> {
        self.check_usable()?;
        let stream = self.gpu.stream.clone();
        let (ptr, _read) = buffer.device_ptr(&stream);
        let bytes = buffer.num_bytes() as u64;
        let local = self
            .not_capturing("register")
            .and_then(|()| self.shareable(ptr, bytes as usize))
            .and_then(|()| self.buffers.registry.reserve());
        let agreed = exchange(
            self.rendezvous.as_ref(),
            "registration",
            local.as_ref().map(|_| &[][..]),
        );
        let index = local?;
        let shared = agreed.and_then(|_| {
            self.buffers.transport.share(
                self.rendezvous.as_ref(),
                "registration",
                &[(index as u64, ptr)],
            )
        });
        let shared = match shared {
            Ok(shared) => shared,
            Err(error) => {
                self.buffers.registry.release(index);
                return Err(error);
            }
        };
        let (entries, mapped) = entries_of(shared);
        self.buffers.mapped.insert(index, mapped);
        self.write_table(&entries)?;
        // Registering a start address again replaces the earlier index,
        // whose peer mappings this rank no longer needs.
        if let Some(replaced) = self.buffers.registry.insert(ptr, bytes, index) {
            self.buffers.release_mapped(replaced);
            self.buffers.registry.release(replaced);
        }
        Ok(())
    }

    /// Ends a registration so that the buffer may be freed. Collective, like
    /// [`register`](Self::register): every rank deregisters one buffer, and
    /// returns only once no peer maps it any more (freeing memory that a
    /// peer process still maps is undefined behaviour in CUDA). Graphs
    /// captured with the buffer must not be replayed afterwards.
    pub fn deregister<T: Element>(&mut self, buffer: &impl DevicePtr<T>) -> Result<()> {
        self.check_usable()?;
        let stream = self.gpu.stream.clone();
        let (ptr, _read) = buffer.device_ptr(&stream);
        // Every rank first finishes the work that reads through the
        // mappings, and all agree that the buffer can go.
        let removable = self
            .not_capturing("deregister")
            .and_then(|()| {
                self.buffers
                    .registry
                    .index_of(ptr)
                    .ok_or(Error::NotRegistered { ptr })
            })
            .and_then(|index| self.wait_for_calls().map(|()| index));
        let index = agree(self.rendezvous.as_ref(), "deregistration", removable)?;
        self.buffers.registry.remove(ptr);
        self.buffers.release_mapped(index);
        // Nobody frees before every peer has unmapped.
        agree(self.rendezvous.as_ref(), "deregistration", Ok(()))
    }

    /// Fills the table entries that calls reserved while the stream was
    /// being captured, so that the captured graph reads every peer's
    /// buffers. Collective; call it after capture ends and before the first
    /// replay. Ranks may have captured different numbers of such buffers.
    /// Returns how many this rank had. Peers' buffers stay mapped until
    /// [`release_graph_buffers`](Self::release_graph_buffers) or drop.
    pub fn register_graph_buffers(&mut self) -> Result<usize> {
        self.check_usable()?;
        let captured = self.not_capturing("register_graph_buffers");
        agree(
            self.rendezvous.as_ref(),
            "graph buffer registration",
            captured,
        )?;
        let pending: Vec<(u64, u64)> = self
            .buffers
            .registry
            .pending()
            .iter()
            .map(|&(index, ptr)| (index as u64, ptr))
            .collect();
        let filled = self
            .buffers
            .transport
            .share(
                self.rendezvous.as_ref(),
                "graph buffer registration",
                &pending,
            )
            .and_then(|shared| {
                let (entries, mapped) = entries_of(shared);
                self.buffers.graph_mapped.extend(mapped);
                self.buffers.registry.adopt_pending();
                self.write_table(&entries)?;
                Ok(pending.len())
            });
        // Entries left empty would make a replay read null pointers: a
        // communicator that failed here is not used again.
        if let Err(error) = &filled {
            self.poisoned = Some(error.to_string());
        }
        filled
    }

    /// Unmaps the peer buffers of every graph registered so far, so that
    /// peers may free them, and frees their table entries. Collective.
    /// Graphs captured before must not be replayed afterwards: their entries
    /// point at the unmapped buffers.
    pub fn release_graph_buffers(&mut self) -> Result<()> {
        self.check_usable()?;
        let idle = self
            .not_capturing("release_graph_buffers")
            .and_then(|()| self.wait_for_calls());
        agree(self.rendezvous.as_ref(), "graph buffer release", idle)?;
        let mapped = std::mem::take(&mut self.buffers.graph_mapped);
        self.buffers.transport.release(&mapped);
        self.buffers.registry.release_graphs();
        // Nobody frees before every peer has unmapped.
        agree(self.rendezvous.as_ref(), "graph buffer release", Ok(()))
    }

    /// Writes table entries (owner, index, address) in this rank's stream
    /// order, so that later launches see them, and waits for the copies.
    pub(super) fn write_table(&self, entries: &[(usize, usize, u64)]) -> Result<()> {
        let capacity = self.regions.table_capacity;
        let stream = &self.gpu.stream;
        self.gpu
            .ctx
            .bind_to_thread()
            .map_err(Error::driver("cuCtxSetCurrent"))?;
        for (owner, index, address) in entries {
            if *owner >= self.world_size || *index >= capacity {
                return Err(Error::RankMismatch {
                    what: "registration",
                    detail: format!(
                        "rank {owner} named buffer-table index {index}; the table holds \
                         {capacity} per rank (every rank needs the same max_records)"
                    ),
                });
            }
            let at = self.regions.table.ptr() + ((owner * capacity + index) * 8) as u64;
            // SAFETY: `at` lies inside the table (owner < world size and
            // index < capacity, checked above); `address` lives until the
            // copy is done (the stream is synchronised below).
            unsafe {
                cudarc::driver::result::memcpy_htod_async(
                    at,
                    std::slice::from_ref(address),
                    stream.cu_stream(),
                )
            }
            .map_err(Error::driver("cuMemcpyHtoDAsync"))?;
        }
        stream
            .synchronize()
            .map_err(Error::driver("cuStreamSynchronize"))
    }
}
