//! The buffer table (docs/design.md, "Buffer table"): buffers registered
//! eagerly, buffers that captured graphs read, and the peer mappings both
//! hold. Every step here is collective.

use std::collections::HashMap;

use cudarc::driver::DevicePtr;

use super::custom::CustomPath;
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
    /// is captured. Where every call takes NCCL, which reads buffers where
    /// they are, there is nothing to do.
    pub fn register<T: Element>(&mut self, buffer: &impl DevicePtr<T>) -> Result<()> {
        self.check_usable()?;
        if self.custom.is_none() {
            return Ok(());
        }
        let stream = self.gpu.stream.clone();
        let (ptr, _read) = buffer.device_ptr(&stream);
        let bytes = buffer.num_bytes() as u64;
        let local = self
            .not_capturing("register")
            .and_then(|()| self.shareable(self.custom()?, ptr, bytes as usize))
            .and_then(|()| self.custom_mut()?.buffers.registry.reserve());
        let agreed = exchange(
            self.rendezvous.as_ref(),
            "registration",
            local.as_ref().map(|_| &[][..]),
        );
        let index = local?;
        let Communicator {
            gpu,
            world_size,
            custom,
            rendezvous,
            ..
        } = self;
        let custom = custom.as_mut().ok_or_else(no_kernels)?;
        let shared = agreed.and_then(|_| {
            custom.buffers.transport.share(
                rendezvous.as_ref(),
                "registration",
                &[(index as u64, ptr)],
            )
        });
        let shared = match shared {
            Ok(shared) => shared,
            Err(error) => {
                custom.buffers.registry.release(index);
                return Err(error);
            }
        };
        let (entries, mapped) = entries_of(shared);
        custom.buffers.mapped.insert(index, mapped);
        custom.regions.write_table(gpu, *world_size, &entries)?;
        // Registering a start address again replaces the earlier index,
        // whose peer mappings this rank no longer needs.
        if let Some(replaced) = custom.buffers.registry.insert(ptr, bytes, index) {
            custom.buffers.release_mapped(replaced);
            custom.buffers.registry.release(replaced);
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
        if self.custom.is_none() {
            return Ok(());
        }
        let stream = self.gpu.stream.clone();
        let (ptr, _read) = buffer.device_ptr(&stream);
        // Every rank first finishes the work that reads through the
        // mappings, and all agree that the buffer can go.
        let removable = self
            .not_capturing("deregister")
            .and_then(|()| {
                self.custom()?
                    .buffers
                    .registry
                    .index_of(ptr)
                    .ok_or(Error::NotRegistered { ptr })
            })
            .and_then(|index| self.wait_for_calls().map(|()| index));
        let index = agree(self.rendezvous.as_ref(), "deregistration", removable)?;
        let buffers = &mut self.custom_mut()?.buffers;
        buffers.registry.remove(ptr);
        buffers.release_mapped(index);
        // Nobody frees before every peer has unmapped.
        agree(self.rendezvous.as_ref(), "deregistration", Ok(()))
    }

    /// Fills the table entries that calls reserved while the stream was
    /// being captured, so that the captured graph reads every peer's
    /// buffers. Collective; call it after capture ends and before the first
    /// replay. Ranks may have captured different numbers of such buffers.
    /// Returns how many this rank had (none where every call takes NCCL).
    /// Peers' buffers stay mapped until
    /// [`release_graph_buffers`](Self::release_graph_buffers) or drop.
    pub fn register_graph_buffers(&mut self) -> Result<usize> {
        self.check_usable()?;
        if self.custom.is_none() {
            return Ok(0);
        }
        let captured = self.not_capturing("register_graph_buffers");
        agree(
            self.rendezvous.as_ref(),
            "graph buffer registration",
            captured,
        )?;
        let Communicator {
            gpu,
            world_size,
            custom,
            rendezvous,
            poisoned,
            ..
        } = self;
        let custom = custom.as_mut().ok_or_else(no_kernels)?;
        let pending: Vec<(u64, u64)> = custom
            .buffers
            .registry
            .pending()
            .iter()
            .map(|&(index, ptr)| (index as u64, ptr))
            .collect();
        let filled = custom
            .buffers
            .transport
            .share(rendezvous.as_ref(), "graph buffer registration", &pending)
            .and_then(|shared| {
                let (entries, mapped) = entries_of(shared);
                custom.buffers.graph_mapped.extend(mapped);
                custom.buffers.registry.adopt_pending();
                custom.regions.write_table(gpu, *world_size, &entries)?;
                Ok(pending.len())
            });
        // Entries left empty would make a replay read null pointers: a
        // communicator that failed here is not used again.
        if let Err(error) = &filled {
            *poisoned = Some(error.to_string());
        }
        filled
    }

    /// Unmaps the peer buffers of every graph registered so far, so that
    /// peers may free them, and frees their table entries. Collective.
    /// Graphs captured before must not be replayed afterwards: their entries
    /// point at the unmapped buffers.
    pub fn release_graph_buffers(&mut self) -> Result<()> {
        self.check_usable()?;
        if self.custom.is_none() {
            return Ok(());
        }
        let idle = self
            .not_capturing("release_graph_buffers")
            .and_then(|()| self.wait_for_calls());
        agree(self.rendezvous.as_ref(), "graph buffer release", idle)?;
        let buffers = &mut self.custom_mut()?.buffers;
        let mapped = std::mem::take(&mut buffers.graph_mapped);
        buffers.transport.release(&mapped);
        buffers.registry.release_graphs();
        // Nobody frees before every peer has unmapped.
        agree(self.rendezvous.as_ref(), "graph buffer release", Ok(()))
    }

    /// The kernels' side, which a call on their path has (the plan chose
    /// them only where set-up built it).
    pub(super) fn custom(&self) -> Result<&CustomPath> {
        self.custom.as_ref().ok_or_else(no_kernels)
    }

    pub(super) fn custom_mut(&mut self) -> Result<&mut CustomPath> {
        self.custom.as_mut().ok_or_else(no_kernels)
    }
}

fn no_kernels() -> Error {
    Error::InvalidConfig("the custom kernels are not set up on this communicator".into())
}
