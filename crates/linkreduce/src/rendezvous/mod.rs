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

/// All-gathers as many u64 from every rank as this rank sends.
pub(crate) fn all_gather_u64s(
    rendezvous: &dyn Rendezvous,
    what: &'static str,
    values: &[u64],
) -> crate::Result<Vec<Vec<u64>>> {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    gather_or_fail(rendezvous, what, Ok(bytes))?
        .into_iter()
        .enumerate()
        .map(|(rank, bytes)| {
            if bytes.len() != values.len() * 8 {
                return Err(crate::Error::RankMismatch {
                    what,
                    detail: format!(
                        "rank {rank} sent {} bytes, this rank {}",
                        bytes.len(),
                        values.len() * 8
                    ),
                });
            }
            Ok(bytes.chunks_exact(8).map(u64_at).collect())
        })
        .collect()
}

/// The little-endian u64 at the start of `bytes` (zero-padded if shorter).
pub(crate) fn u64_at(bytes: &[u8]) -> u64 {
    let mut word = [0u8; 8];
    let n = bytes.len().min(8);
    word[..n].copy_from_slice(&bytes[..n]);
    u64::from_le_bytes(word)
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

/// Sends a status byte (1: ok, 0: failed), a tag of the step (`what`) and
/// the payload or the error's text; returns every payload, or the first
/// failed rank as an error (this rank's own failure included: callers
/// report their own error first). A rank at another step (a caller bug:
/// collective calls out of order) is an error too, not a silent pairing.
pub(crate) fn exchange(
    rendezvous: &dyn Rendezvous,
    what: &'static str,
    local: Result<&[u8], &crate::Error>,
) -> crate::Result<Vec<Vec<u8>>> {
    gather_statuses(rendezvous, what, local)?
        .into_iter()
        .collect()
}

/// Like [`exchange`], but returns every rank's payload or failure, for
/// callers that report them all.
pub(crate) fn gather_statuses(
    rendezvous: &dyn Rendezvous,
    what: &'static str,
    local: Result<&[u8], &crate::Error>,
) -> crate::Result<Vec<crate::Result<Vec<u8>>>> {
    let tag = step_tag(what).to_le_bytes();
    let message = match local {
        Ok(payload) => [&[1u8][..], &tag, payload].concat(),
        Err(error) => [&[0u8][..], &tag, error.to_string().as_bytes()].concat(),
    };
    let gathered = rendezvous.all_gather(&message)?;
    if gathered.len() != rendezvous.world_size() {
        return Err(crate::Error::RankMismatch {
            what,
            detail: format!(
                "the rendezvous returned {} contributions for {} ranks",
                gathered.len(),
                rendezvous.world_size()
            ),
        });
    }
    Ok(gathered
        .into_iter()
        .enumerate()
        .map(|(rank, message)| {
            let status = message.first().copied();
            let body = message.get(1 + tag.len()..).unwrap_or_default();
            if message.get(1..1 + tag.len()) != Some(&tag[..]) {
                return Err(crate::Error::RankMismatch {
                    what,
                    detail: format!(
                        "rank {rank} is at another collective step; every rank must make the \
                         same collective calls in the same order"
                    ),
                });
            }
            match status {
                Some(1) => Ok(body.to_vec()),
                _ => Err(crate::Error::PeerFailed {
                    rank,
                    what,
                    reason: String::from_utf8_lossy(body).into_owned(),
                }),
            }
        })
        .collect())
}

/// A stable 64-bit FNV-1a hash of a step's name, the same in every process.
fn step_tag(what: &str) -> u64 {
    what.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Error;

    /// Runs `step` on every rank of a thread group, returning each result.
    fn on_ranks<R: Send>(world: usize, step: impl Fn(&ThreadRendezvous) -> R + Sync) -> Vec<R> {
        let ranks = ThreadRendezvous::group(world, Duration::from_secs(5));
        std::thread::scope(|scope| {
            let handles: Vec<_> = ranks
                .iter()
                .map(|rank| scope.spawn(|| step(rank)))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn a_rank_that_fails_alone_fails_every_rank_at_once() {
        let results = on_ranks(3, |rv| {
            let local = if rv.rank() == 1 {
                Err(Error::InvalidConfig("out of memory".into()))
            } else {
                Ok(rv.rank())
            };
            agree(rv, "set-up", local)
        });
        assert!(matches!(&results[1], Err(Error::InvalidConfig(_))));
        for rank in [0, 2] {
            match &results[rank] {
                Err(Error::PeerFailed {
                    rank: 1,
                    what,
                    reason,
                }) => {
                    assert_eq!(*what, "set-up");
                    assert!(reason.contains("out of memory"), "{reason}");
                }
                other => panic!("rank {rank}: {other:?}"),
            }
        }
    }

    #[test]
    fn ranks_at_different_steps_are_told_so() {
        let results = on_ranks(2, |rv| {
            let what = if rv.rank() == 0 {
                "registration"
            } else {
                "deregistration"
            };
            agree(rv, what, Ok(()))
        });
        for result in results {
            assert!(
                matches!(result, Err(Error::RankMismatch { .. })),
                "{result:?}"
            );
        }
    }

    #[test]
    fn words_gather_in_rank_order_and_counts_must_match() {
        let results = on_ranks(2, |rv| all_gather_u64s(rv, "test", &[rv.rank() as u64, 7]));
        for result in results {
            assert_eq!(result.unwrap(), vec![vec![0, 7], vec![1, 7]]);
        }
        let results = on_ranks(2, |rv| {
            let words = vec![1; 1 + rv.rank()];
            all_gather_u64s(rv, "test", &words)
        });
        for result in results {
            assert!(
                matches!(result, Err(Error::RankMismatch { .. })),
                "{result:?}"
            );
        }
        assert_eq!(u64_at(&[1, 2]), 0x0201);
    }
}
