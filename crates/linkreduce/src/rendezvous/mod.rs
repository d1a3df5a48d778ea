//! Rendezvous: how ranks find each other and exchange a few bytes at set-up.
//!
//! The GPU kernels never use this; it carries signal-region addresses, IPC
//! handles, NCCL unique ids and graph-buffer records between ranks while a
//! communicator is built or buffers are registered. Everything here is
//! collective: every rank calls the same operations in the same order.
//!
//! Two implementations ship: [`ThreadRendezvous`] for ranks that are threads of
//! one process and [`TcpRendezvous`] for ranks that are processes. Callers with
//! their own transport (MPI, a framework's store) implement [`Rendezvous`].

mod tcp;
mod threads;

use std::time::Duration;

pub use tcp::{TcpRendezvous, TcpRendezvousConfig};
pub use threads::ThreadRendezvous;

/// The operations a communicator needs from its ranks' meeting point.
/// Shared (`Arc`) by a communicator and whoever else coordinates the same
/// ranks, such as an NCCL communicator or a benchmark.
pub trait Rendezvous: Send + Sync {
    /// This rank, in `0..world_size()`.
    fn rank(&self) -> usize;

    /// How many ranks take part.
    fn world_size(&self) -> usize;

    /// Sends `bytes` to every rank and returns what every rank sent, indexed
    /// by rank (this rank's own contribution included).
    fn all_gather(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>, RendezvousError>;

    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<(), RendezvousError> {
        self.all_gather(&[]).map(|_| ())
    }
}

/// Why a rendezvous operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RendezvousError {
    #[error("rank {rank} did not take part within {timeout:?}; check that every rank was started and calls the same collective operations")]
    Timeout { rank: usize, timeout: Duration },
    #[error(
        "rank {rank} disconnected during the rendezvous ({reason}); it probably exited or crashed"
    )]
    PeerLost { rank: usize, reason: String },
    #[error("bad rendezvous configuration: {0}")]
    Config(String),
    #[error("rendezvous I/O error at {context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("rendezvous protocol error: {0}")]
    Protocol(String),
}

/// All-gathers a list of u64 per rank.
pub(crate) fn all_gather_u64s(
    rendezvous: &dyn Rendezvous,
    values: &[u64],
) -> crate::Result<Vec<Vec<u64>>> {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    gather_or_fail(rendezvous, "an exchange of addresses", Ok(bytes))?
        .into_iter()
        .enumerate()
        .map(|(rank, bytes)| {
            if bytes.len() % 8 != 0 {
                return Err(crate::Error::RankMismatch {
                    what: "an exchange of addresses",
                    detail: format!("rank {rank} sent {} bytes", bytes.len()),
                });
            }
            Ok(bytes
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                .collect())
        })
        .collect()
}

/// All-gathers each rank's payload, or, when any rank's step failed, makes
/// every rank fail: the rank that failed with its own error, the others
/// with one naming it. Without this a rank that fails alone would leave its
/// peers waiting in their next collective step until it times out.
pub(crate) fn gather_or_fail(
    rendezvous: &dyn Rendezvous,
    what: &'static str,
    local: crate::Result<Vec<u8>>,
) -> crate::Result<Vec<Vec<u8>>> {
    let gathered = exchange(rendezvous, what, local.as_deref());
    local?;
    gathered
}

/// Like [`gather_or_fail`] for a step whose result stays on this rank.
pub(crate) fn agree<T>(
    rendezvous: &dyn Rendezvous,
    what: &'static str,
    local: crate::Result<T>,
) -> crate::Result<T> {
    let gathered = exchange(rendezvous, what, local.as_ref().map(|_| &[][..]));
    let value = local?;
    gathered.map(|_| value)
}

/// Sends a status byte (1: ok, 0: failed) and the payload or the error's
/// text; returns every payload, or the first failed rank as an error.
fn exchange(
    rendezvous: &dyn Rendezvous,
    what: &'static str,
    local: Result<&[u8], &crate::Error>,
) -> crate::Result<Vec<Vec<u8>>> {
    let message = match local {
        Ok(payload) => [&[1u8][..], payload].concat(),
        Err(error) => [&[0u8][..], error.to_string().as_bytes()].concat(),
    };
    rendezvous
        .all_gather(&message)?
        .into_iter()
        .enumerate()
        .map(|(rank, message)| match message.split_first() {
            Some((1, payload)) => Ok(payload.to_vec()),
            _ => Err(crate::Error::PeerFailed {
                rank,
                what,
                reason: String::from_utf8_lossy(message.get(1..).unwrap_or_default()).into_owned(),
            }),
        })
        .collect()
}
