//! Rendezvous between threads of one process.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::{Rendezvous, RendezvousError};

/// One round of an all-gather: contributions fill up, then every rank reads.
struct Round {
    generation: u64,
    contributions: Vec<Option<Vec<u8>>>,
    /// Result of the last completed round, kept until every rank has read it.
    published: Option<Arc<Vec<Vec<u8>>>>,
    readers_left: usize,
}

struct Shared {
    round: Mutex<Round>,
    changed: Condvar,
    timeout: Duration,
}

/// A rank's handle on a rendezvous shared by threads of one process.
///
/// Create all handles at once with [`ThreadRendezvous::group`] and move one to
/// each rank's thread.
pub struct ThreadRendezvous {
    rank: usize,
    world_size: usize,
    shared: Arc<Shared>,
}

impl ThreadRendezvous {
    /// Handles for `world_size` ranks; every operation waits at most `timeout`
    /// for the other ranks.
    pub fn group(world_size: usize, timeout: Duration) -> Vec<ThreadRendezvous> {
        let shared = Arc::new(Shared {
            round: Mutex::new(Round {
                generation: 0,
                contributions: vec![None; world_size],
                published: None,
                readers_left: 0,
            }),
            changed: Condvar::new(),
            timeout,
        });
        (0..world_size)
            .map(|rank| ThreadRendezvous {
                rank,
                world_size,
                shared: shared.clone(),
            })
            .collect()
    }

    fn lock(&self) -> MutexGuard<'_, Round> {
        // A rank that panicked while holding the lock left consistent data
        // behind (every update is a single assignment), so keep going.
        self.shared
            .round
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Waits on the condition variable until `done` holds or the deadline
    /// passes; names the first rank still missing on timeout.
    fn wait_until<'a>(
        &'a self,
        mut round: MutexGuard<'a, Round>,
        deadline: Instant,
        done: impl Fn(&Round) -> bool,
    ) -> Result<MutexGuard<'a, Round>, RendezvousError> {
        while !done(&round) {
            let now = Instant::now();
            if now >= deadline {
                let missing = round
                    .contributions
                    .iter()
                    .position(Option::is_none)
                    .unwrap_or(self.rank);
                return Err(RendezvousError::Timeout {
                    rank: missing,
                    timeout: self.shared.timeout,
                });
            }
            round = self
                .shared
                .changed
                .wait_timeout(round, deadline - now)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
        Ok(round)
    }
}

impl Rendezvous for ThreadRendezvous {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_gather(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>, RendezvousError> {
        let deadline = Instant::now() + self.shared.timeout;
        // Wait until the previous round's result has been read by everyone.
        let mut round = self.wait_until(self.lock(), deadline, |r| r.readers_left == 0)?;
        round.contributions[self.rank] = Some(bytes.to_vec());
        let generation = round.generation;
        if round.contributions.iter().all(Option::is_some) {
            let gathered: Vec<Vec<u8>> = round
                .contributions
                .iter_mut()
                .map(|c| c.take().unwrap_or_default())
                .collect();
            round.published = Some(Arc::new(gathered));
            round.readers_left = self.world_size;
            round.generation += 1;
            self.shared.changed.notify_all();
        }
        let mut round = match self.wait_until(round, deadline, |r| r.generation != generation) {
            Ok(round) => round,
            Err(error) => {
                // Withdraw so that a later retry does not see a stale entry.
                let mut round = self.lock();
                if round.generation == generation {
                    round.contributions[self.rank] = None;
                }
                return Err(error);
            }
        };
        let gathered = round.published.clone().unwrap_or_default();
        round.readers_left -= 1;
        if round.readers_left == 0 {
            round.published = None;
            self.shared.changed.notify_all();
        }
        Ok(gathered.as_ref().clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_gather_returns_every_contribution_in_rank_order() {
        let handles = ThreadRendezvous::group(4, Duration::from_secs(5));
        let results: Vec<_> = std::thread::scope(|s| {
            let joins: Vec<_> = handles
                .iter()
                .map(|h| {
                    s.spawn(move || {
                        (0..50u8)
                            .map(|round| h.all_gather(&[h.rank() as u8, round]).unwrap())
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            joins.into_iter().map(|j| j.join().unwrap()).collect()
        });
        for per_rank in &results {
            for (round, gathered) in per_rank.iter().enumerate() {
                let expected: Vec<Vec<u8>> = (0..4u8).map(|rank| vec![rank, round as u8]).collect();
                assert_eq!(gathered, &expected);
            }
        }
    }

    #[test]
    fn a_missing_rank_is_named_after_the_timeout() {
        let handles = ThreadRendezvous::group(3, Duration::from_millis(100));
        let started = Instant::now();
        let error = std::thread::scope(|s| {
            let a = s.spawn(|| handles[0].barrier());
            let b = s.spawn(|| handles[2].barrier());
            let _ = b.join().unwrap();
            a.join().unwrap()
        })
        .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(2));
        match error {
            RendezvousError::Timeout { rank, .. } => assert_eq!(rank, 1),
            other => panic!("expected a timeout, got {other}"),
        }
    }
}
