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
pub trait Rendezvous: Send {
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
