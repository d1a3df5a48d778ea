//! How one rank reaches its peers' memory (NCCL calls this the transport):
//! ranks in this process by their own device addresses, with peer access
//! enabled; ranks in other processes through CUDA IPC.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::{Arc, OnceLock};

use cudarc::driver::CudaContext;

use crate::error::{Error, Result};
use crate::ipc::{Exported, Handle, OpenedPeers, HANDLE_BYTES, IPC_HINT};
use crate::memory::{enable_peer_access, prepare_shared_pool, PointerInfo};
use crate::rendezvous::{agree, all_gather_u64s, gather_or_fail, u64_at, Rendezvous};

/// A value that differs between processes, so ranks can tell which peers
/// share theirs (process ids alone can repeat across PID namespaces).
fn process_token() -> u64 {
    static TOKEN: OnceLock<u64> = OnceLock::new();
    *TOKEN.get_or_init(|| RandomState::new().hash_one(std::process::id()))
}

/// Bytes per shared address on the wire: tag, address, offset, IPC handle.
const ENTRY_BYTES: usize = 24 + HANDLE_BYTES;

/// A peer's address as this rank reaches it, with the tag its owner gave it
/// (the owner's buffer index), and the peer allocation this rank mapped for
/// it (to release when done; None within the process).
pub(crate) struct PeerAddress {
    pub tag: u64,
    pub address: u64,
    pub mapped: Option<Handle>,
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
        let mine = [token, ctx.ordinal() as u64];
        let context_shared = ranks.iter().filter(|r| r[..] == mine).count() > 1;
        let enabled = ranks
            .iter()
            .filter(|r| r[0] == token)
            .try_for_each(|r| {
                let peer = CudaContext::new(r[1] as usize)
                    .map_err(Error::driver("cuDevicePrimaryCtxRetain"))?;
                enable_peer_access(ctx, &peer)
            })
            .and_then(|()| {
                // Ranks that share this context also share its default
                // memory pool: keep one rank's allocation from waiting on
                // another rank's stream (docs/design.md, "Ranks sharing a GPU").
                if context_shared {
                    prepare_shared_pool(ctx)
                } else {
                    Ok(())
                }
            })
            .and_then(|()| {
                ctx.bind_to_thread()
                    .map_err(Error::driver("cuCtxSetCurrent"))
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

    /// Collective: every rank passes its own (tag, address) pairs, as many
    /// as it likes (ranks may pass different numbers); returns, for every
    /// rank in rank order, its addresses as this rank reaches them.
    pub fn share(
        &mut self,
        rendezvous: &dyn Rendezvous,
        what: &'static str,
        addresses: &[(u64, u64)],
    ) -> Result<Vec<Vec<PeerAddress>>> {
        let export = self.crosses_processes();
        let encoded = addresses
            .iter()
            .map(|&(tag, ptr)| {
                let exported = if export {
                    Exported::of(ptr)?
                } else {
                    Exported {
                        handle: [0; HANDLE_BYTES],
                        offset: 0,
                    }
                };
                Ok([
                    &tag.to_le_bytes()[..],
                    &ptr.to_le_bytes(),
                    &exported.offset.to_le_bytes(),
                    &exported.handle,
                ]
                .concat())
            })
            .collect::<Result<Vec<_>>>()
            .map(|entries| entries.concat());
        let all = gather_or_fail(rendezvous, what, encoded)?;
        if let Some(bad) = all
            .iter()
            .position(|entries| entries.len() % ENTRY_BYTES != 0)
        {
            return Err(Error::RankMismatch {
                what,
                detail: format!(
                    "rank {bad} sent {} bytes of addresses, not whole entries",
                    all[bad].len()
                ),
            });
        }
        let shared = all
            .iter()
            .enumerate()
            .map(|(owner, entries)| {
                entries
                    .chunks_exact(ENTRY_BYTES)
                    .map(|entry| self.reach(owner, entry))
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<Vec<_>>>();
        // Opening can fail on one rank only (no peer access between its GPU
        // and a peer's): every rank must learn of it.
        agree(rendezvous, what, shared)
    }

    /// `owner`'s address in one wire entry, as this rank reaches it.
    fn reach(&mut self, owner: usize, entry: &[u8]) -> Result<PeerAddress> {
        let tag = u64_at(entry);
        if self.same_process[owner] {
            return Ok(PeerAddress {
                tag,
                address: u64_at(&entry[8..]),
                mapped: None,
            });
        }
        let mut handle = [0; HANDLE_BYTES];
        handle.copy_from_slice(&entry[24..]);
        let exported = Exported {
            handle,
            offset: u64_at(&entry[16..]),
        };
        Ok(PeerAddress {
            tag,
            address: self.opened.address(&exported)?,
            mapped: Some(handle),
        })
    }
}
