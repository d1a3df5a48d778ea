//! Rendezvous between processes over TCP, torchrun-style.
//!
//! Rank 0 listens on `MASTER_ADDR:MASTER_PORT`; every other rank connects to
//! it. Rank 0 is a star's centre: in an all-gather every other rank sends its
//! bytes to rank 0, which sends the gathered vector back to everyone. Set-up
//! traffic is a few kilobytes per rank, so the extra hop costs nothing and
//! keeps the protocol to one connection per rank.
//!
//! # Wire format
//!
//! All integers are little-endian.
//!
//! * Hello, rank → rank 0, once: `MAGIC`, protocol version (`u32`), rank
//!   (`u64`), world size (`u64`).
//! * Handshake reply, rank 0 → rank, once: `MAGIC`, protocol version (`u32`),
//!   then a `WELCOME` or `ABORT` message.
//! * Contribution, rank → rank 0, once per round: kind `1` (`u8`), round
//!   (`u64`), length (`u64`), bytes.
//! * Messages, rank 0 → rank: kind (`u8`), then for `RESULT` the round
//!   (`u64`), the count (`u64`, the world size) and per rank a length (`u64`)
//!   and bytes; for `ABORT` an error code (`u8`), a rank (`u64`), a timeout in
//!   milliseconds (`u64`), a reason length (`u64`) and the UTF-8 reason.
//!
//! Rounds are numbered from 0 on every rank; a frame from another round means
//! the ranks called different collective operations, which is reported as a
//! [`RendezvousError::Protocol`] error instead of silently mixing data.
//!
//! # Failures
//!
//! Every blocking step has a deadline of one `timeout` per operation. When
//! rank 0 sees a failure (a rank missing, disconnected or misbehaving) it
//! sends every other rank an `ABORT` message carrying the cause and closes its
//! side, so that the other ranks report the same cause at once instead of each
//! waiting for its own timeout. After a failure a [`TcpRendezvous`] is spent:
//! the connections may be in the middle of a frame, so every later call
//! returns the first error again.

/// Where the ranks meet: the configuration and its environment variables.
mod config;
/// Other ranks' side: one connection to rank 0.
mod member;
/// Rank 0's side: accepts the other ranks and relays every all-gather.
mod root;
/// The bytes on the connections, and reads and writes under a deadline.
mod wire;

use std::io;
use std::net::TcpListener;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use super::{Rendezvous, RendezvousError};
use member::Member;
use root::Root;

pub use config::TcpRendezvousConfig;

/// A rank's handle on a rendezvous between processes over TCP.
///
/// Every rank calls [`TcpRendezvous::connect`] with the same address, port and
/// world size; the call returns once all ranks have joined. Operations are
/// collective (see [`Rendezvous`]). Dropping the handle closes the
/// connections; other ranks then see this rank as lost.
pub struct TcpRendezvous {
    rank: usize,
    world_size: usize,
    timeout: Duration,
    /// A mutex rather than a cell so that the handle is `Sync` too; calls are
    /// collective, so there is never contention in correct use.
    state: Mutex<State>,
}

struct State {
    /// Number of the next all-gather, the same on every rank.
    round: u64,
    /// The first error; once set, every call returns it again.
    failed: Option<RendezvousError>,
    role: Role,
}

enum Role {
    /// A world of one: nothing to exchange, so no socket is opened.
    Solo,
    Root(Root),
    Member(Member),
}

impl TcpRendezvous {
    /// Largest message one rank may pass to one `all_gather`.
    pub const MAX_MESSAGE_BYTES: usize = wire::MAX_MESSAGE_BYTES;

    /// Joins the rendezvous: rank 0 listens on `config.addr:config.port` and
    /// waits for every other rank; the other ranks connect to it, retrying
    /// until rank 0 is up. Returns once every rank has joined, or fails after
    /// `config.timeout` naming a missing rank.
    ///
    /// A world of one rank opens no socket.
    pub fn connect(config: TcpRendezvousConfig) -> Result<Self, RendezvousError> {
        config.validate(false)?;
        let role = if config.world_size == 1 {
            Role::Solo
        } else if config.rank == 0 {
            let listener = root::bind(&config.addr, config.port)?;
            Role::Root(Root::accept_group(listener, &config)?)
        } else {
            Role::Member(Member::join(&config)?)
        };
        Ok(Self::with_role(&config, role))
    }

    /// Rank 0's start-up on a listener the caller bound, for instance to port
    /// 0 so that the system picks a free port without a race: bind, read
    /// `listener.local_addr()`, start the other ranks with that port, then
    /// call this. `config.addr` and `config.port` are not used.
    pub fn with_listener(
        config: TcpRendezvousConfig,
        listener: TcpListener,
    ) -> Result<Self, RendezvousError> {
        config.validate(true)?;
        if config.rank != 0 {
            return Err(RendezvousError::Config(format!(
                "TcpRendezvous::with_listener is for rank 0, but the configuration says rank {}; \
                 other ranks use TcpRendezvous::connect",
                config.rank
            )));
        }
        let role = if config.world_size == 1 {
            Role::Solo
        } else {
            Role::Root(Root::accept_group(listener, &config)?)
        };
        Ok(Self::with_role(&config, role))
    }

    fn with_role(config: &TcpRendezvousConfig, role: Role) -> Self {
        TcpRendezvous {
            rank: config.rank,
            world_size: config.world_size,
            timeout: config.timeout,
            state: Mutex::new(State {
                round: 0,
                failed: None,
                role,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while the lock was held leaves at worst a half-done round,
        // which the protocol's round numbers and the peers' timeouts report;
        // there is nothing to gain from poisoning the handle as well.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Rendezvous for TcpRendezvous {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_gather(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>, RendezvousError> {
        let mut state = self.lock();
        if let Some(error) = &state.failed {
            return Err(duplicate(error));
        }
        let round = state.round;
        let result = if bytes.len() > Self::MAX_MESSAGE_BYTES {
            Err(RendezvousError::Protocol(format!(
                "rank {} passed {} bytes to all_gather, more than the limit of {} bytes",
                self.rank,
                bytes.len(),
                Self::MAX_MESSAGE_BYTES
            )))
        } else {
            match &mut state.role {
                Role::Solo => Ok(vec![bytes.to_vec()]),
                Role::Root(root) => root.gather(round, bytes, self.timeout),
                Role::Member(member) => member.exchange(round, bytes, self.timeout),
            }
        };
        match result {
            Ok(gathered) => {
                state.round += 1;
                Ok(gathered)
            }
            Err(error) => {
                tracing::warn!(rank = self.rank, round, %error, "TCP rendezvous failed");
                match &mut state.role {
                    Role::Solo => {}
                    Role::Root(root) => root.abort(&error),
                    Role::Member(member) => member.give_up(&error),
                }
                state.failed = Some(duplicate(&error));
                Err(error)
            }
        }
    }
}

/// Copies an error so that it can be both stored and returned (the enum is
/// not `Clone` because `io::Error` is not).
fn duplicate(error: &RendezvousError) -> RendezvousError {
    match error {
        RendezvousError::Timeout { rank, timeout } => RendezvousError::Timeout {
            rank: *rank,
            timeout: *timeout,
        },
        RendezvousError::PeerLost { rank, reason } => RendezvousError::PeerLost {
            rank: *rank,
            reason: reason.clone(),
        },
        RendezvousError::Config(message) => RendezvousError::Config(message.clone()),
        RendezvousError::Io { context, source } => RendezvousError::Io {
            context: context.clone(),
            source: io::Error::new(source.kind(), source.to_string()),
        },
        RendezvousError::Protocol(message) => RendezvousError::Protocol(message.clone()),
    }
}
