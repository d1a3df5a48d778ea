//! How one rank reaches its peers' memory (NCCL calls this the transport):
//! ranks in this process by their own device addresses, with peer access
//! enabled; ranks in other processes through CUDA IPC.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::{Arc, OnceLock};

use cudarc::driver::CudaContext;

use crate::error::{Error, Result};
use crate::ipc::{Exported, Handle, OpenedPeers, HANDLE_BYTES, IPC_HINT};
use crate::kernels::{Record, MAX_RANKS};
use crate::memory::{enable_peer_access, PointerInfo};
use crate::rendezvous::{agree, all_gather_u64s, gather_or_fail, u64_at, Rendezvous};

/// A value that differs between processes, so ranks can tell which peers
/// share theirs (process ids alone can repeat across PID namespaces).
fn process_token() -> u64 {
    static TOKEN: OnceLock<u64> = OnceLock::new();
    *TOKEN.get_or_init(|| RandomState::new().hash_one(std::process::id()))
}

/// Bytes per shared address on the wire: address, offset, IPC handle.
const ENTRY_BYTES: usize = 16 + HANDLE_BYTES;

/// One shared address: every rank's copy as this rank reaches it, and the
/// peer allocations this rank mapped for it (to release when done).
pub(crate) struct Shared {
    pub record: Record,
    pub mapped: Vec<Handle>,
}

pub(crate) struct Transport {
    /// Per rank: whether it lives in this process.
    same_process: Vec<bool>,
    opened: OpenedPeers,
}

impl Transport {
    /// Collective: learns which ranks share this process and enables peer
    /// access to their devices.
    pub fn connect(rendezvous: &dyn Rendezvous, ctx: &Arc<CudaContext>) -> Result<Transport> {
        let token = process_token();
        let ranks = all_gather_u64s(
            rendezvous,
            "finding peers in this process",
            &[token, ctx.ordinal() as u64],
        )?;
        let same_process: Vec<bool> = ranks.iter().map(|r| r[0] == token).collect();
        let enabled = ranks.iter().filter(|r| r[0] == token).try_for_each(|r| {
            let peer = CudaContext::new(r[1] as usize)
                .map_err(Error::driver("cuDevicePrimaryCtxRetain"))?;
            enable_peer_access(ctx, &peer)
        });
        agree(rendezvous, "enabling peer access", enabled)?;
        Ok(Transport {
            same_process,
            opened: OpenedPeers::new(ctx.clone()),
        })
    }

    /// Unmaps every peer allocation this rank opened.
    pub fn close_peers(&mut self) {
        self.opened.close_all();
    }

    /// Releases the peer allocations one shared address mapped.
    pub fn release(&mut self, mapped: &[Handle]) {
        mapped.iter().for_each(|handle| self.opened.release(handle));
    }

    /// Whether some peer lives in another process.
    pub fn crosses_processes(&self) -> bool {
        self.same_process.iter().any(|&same| !same)
    }

    /// Checks that every peer can be handed `info`'s memory.
    pub fn check_shareable(&self, ptr: u64, info: &PointerInfo) -> Result<()> {
        if self.crosses_processes() && !info.legacy_ipc_capable {
            return Err(Error::NotShareable {
                ptr,
                reason: IPC_HINT.into(),
            });
        }
        Ok(())
    }

    /// [`share`](Self::share) of one address.
    pub fn share_one(
        &mut self,
        rendezvous: &dyn Rendezvous,
        what: &'static str,
        address: u64,
    ) -> Result<Shared> {
        let mut shared = self.share(rendezvous, what, &[address])?;
        shared.pop().ok_or(Error::RankMismatch {
            what,
            detail: "one address was shared but none came back".into(),
        })
    }

    /// Collective: every rank passes its own addresses, as many as every
    /// other rank and in the same order; returns for each the record of
    /// every rank's address as this rank reaches it.
    pub fn share(
        &mut self,
        rendezvous: &dyn Rendezvous,
        what: &'static str,
        addresses: &[u64],
    ) -> Result<Vec<Shared>> {
        let export = self.crosses_processes();
        let encoded = addresses
            .iter()
            .map(|&ptr| {
                let exported = if export {
                    Exported::of(ptr)?
                } else {
                    Exported {
                        handle: [0; HANDLE_BYTES],
                        offset: 0,
                    }
                };
                Ok([
                    &ptr.to_le_bytes()[..],
                    &exported.offset.to_le_bytes(),
                    &exported.handle,
                ]
                .concat())
            })
            .collect::<Result<Vec<_>>>()
            .map(|entries| entries.concat());
        let all = gather_or_fail(rendezvous, what, encoded)?;
        let expected = addresses.len() * ENTRY_BYTES;
        if let Some(bad) = all.iter().position(|entries| entries.len() != expected) {
            return Err(Error::RankMismatch {
                what,
                detail: format!(
                    "rank {bad} shared {} buffers, this rank {}",
                    all[bad].len() / ENTRY_BYTES,
                    addresses.len()
                ),
            });
        }
        let shared = (0..addresses.len())
            .map(|index| {
                let mut shared = Shared {
                    record: [0; MAX_RANKS],
                    mapped: Vec::new(),
                };
                for (peer, entries) in all.iter().enumerate() {
                    let entry = &entries[index * ENTRY_BYTES..(index + 1) * ENTRY_BYTES];
                    shared.record[peer] = if self.same_process[peer] {
                        u64_at(entry)
                    } else {
                        let mut handle = [0; HANDLE_BYTES];
                        handle.copy_from_slice(&entry[16..]);
                        let exported = Exported {
                            handle,
                            offset: u64_at(&entry[8..]),
                        };
                        let address = self.opened.address(&exported)?;
                        shared.mapped.push(handle);
                        address
                    };
                }
                Ok(shared)
            })
            .collect::<Result<Vec<_>>>();
        // Opening can fail on one rank only (no peer access between its GPU
        // and a peer's): every rank must learn of it.
        agree(rendezvous, what, shared)
    }
}
