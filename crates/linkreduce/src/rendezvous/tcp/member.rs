//! The other ranks' side of the TCP rendezvous: one connection to rank 0,
//! opened with retries because rank 0 may start later, over which every
//! round's contribution goes out and its result comes back.

use std::io;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use super::config::{resolve, TcpRendezvousConfig};
use super::wire::{
    self, Hello, OpeningError, ReadBy, ReplyKind, ResultError, MAX_MESSAGE_BYTES, PROTOCOL_VERSION,
};
use crate::rendezvous::RendezvousError;

/// First and longest pause between connection attempts while rank 0 is not
/// listening yet.
const CONNECT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const CONNECT_BACKOFF_MAX: Duration = Duration::from_millis(250);

/// Longest single connection attempt, so that one unresponsive address of
/// several does not use up the whole timeout.
const CONNECT_ATTEMPT_MAX: Duration = Duration::from_secs(5);

/// A non-zero rank's side: one connection to rank 0.
pub(super) struct Member {
    stream: TcpStream,
    world_size: usize,
}

impl Member {
    /// Connects to rank 0, introduces this rank and waits to be welcomed.
    pub(super) fn join(config: &TcpRendezvousConfig) -> Result<Member, RendezvousError> {
        let deadline = wire::deadline_after(config.timeout);
        let timeout = config.timeout;
        let candidates = resolve(&config.addr, config.port)?;
        let stream = connect_with_retry(&candidates, deadline, timeout)?;
        let _ = stream.set_nodelay(true);
        let hello = wire::encode_hello(Hello {
            rank: config.rank as u64,
            world_size: config.world_size as u64,
        });
        wire::write_all_by(&stream, &hello, deadline)
            .map_err(|error| send_failure(&stream, error, deadline, timeout, true))?;

        let mut reply = ReadBy::new(&stream, deadline);
        let reading = |error| wire::classify(error, 0, timeout, "reading rank 0's reply");
        match wire::read_opening(&mut reply) {
            Ok(()) => {}
            Err(OpeningError::Io(error)) => return Err(reading(error)),
            Err(OpeningError::NotLinkreduce) => {
                return Err(RendezvousError::Protocol(format!(
                    "the process listening on {}:{} is not a linkreduce rendezvous (its reply \
                     does not start with the linkreduce magic); check MASTER_ADDR and MASTER_PORT",
                    config.addr, config.port
                )))
            }
            Err(OpeningError::Version(version)) => {
                return Err(RendezvousError::Protocol(format!(
                    "rank 0 speaks rendezvous protocol version {version} but rank {} speaks \
                     version {PROTOCOL_VERSION}; run the same linkreduce build on every rank",
                    config.rank
                )))
            }
        }
        match wire::read_reply_kind(&mut reply).map_err(reading)? {
            ReplyKind::Welcome => {
                tracing::debug!(rank = config.rank, "joined the TCP rendezvous");
                Ok(Member {
                    stream,
                    world_size: config.world_size,
                })
            }
            ReplyKind::Abort => Err(wire::read_abort_body(&mut reply, timeout)),
            other @ (ReplyKind::Result | ReplyKind::Unknown(_)) => {
                Err(RendezvousError::Protocol(format!(
                    "rank 0 answered the hello with a message of unknown kind {}",
                    other.code()
                )))
            }
        }
    }

    /// One all-gather: sends this rank's contribution to rank 0 and reads
    /// back every rank's.
    pub(super) fn exchange(
        &mut self,
        round: u64,
        bytes: &[u8],
        timeout: Duration,
    ) -> Result<Vec<Vec<u8>>, RendezvousError> {
        let deadline = wire::deadline_after(timeout);
        let stream = &self.stream;
        let header = wire::encode_contribution_header(round, bytes.len());
        wire::write_all_by(stream, &header, deadline)
            .and_then(|()| wire::write_all_by(stream, bytes, deadline))
            .map_err(|error| send_failure(stream, error, deadline, timeout, false))?;

        let mut reply = ReadBy::new(stream, deadline);
        let receiving =
            |error| wire::classify(error, 0, timeout, "receiving the all-gather result");
        match wire::read_reply_kind(&mut reply).map_err(receiving)? {
            ReplyKind::Result => {}
            ReplyKind::Abort => return Err(wire::read_abort_body(&mut reply, timeout)),
            other @ (ReplyKind::Welcome | ReplyKind::Unknown(_)) => {
                return Err(RendezvousError::Protocol(format!(
                    "rank 0 sent a message of unknown kind {} in round {round}",
                    other.code()
                )))
            }
        }
        wire::read_result_body(&mut reply, round, self.world_size).map_err(|error| match error {
            ResultError::Io(error) => receiving(error),
            ResultError::Round(their_round) => RendezvousError::Protocol(format!(
                "rank 0 sent the result of all-gather round {their_round} while this rank is in \
                 round {round}; every rank must call the same collective operations in the same \
                 order"
            )),
            ResultError::Count(count) => RendezvousError::Protocol(format!(
                "rank 0 sent {count} contributions for a world of {} ranks",
                self.world_size
            )),
            ResultError::TooLong { rank, len } => RendezvousError::Protocol(format!(
                "rank 0 sent a contribution of rank {rank} of {len} bytes, more than the \
                 limit of {MAX_MESSAGE_BYTES}"
            )),
        })
    }

    /// Called after a failure. A timeout keeps the connection, so that rank 0
    /// (which knows which rank is really missing) reports that rank rather
    /// than this one; any other failure closes it, so that rank 0 and through
    /// it every rank fail at once instead of waiting for their timeouts.
    pub(super) fn give_up(&mut self, error: &RendezvousError) {
        if !matches!(error, RendezvousError::Timeout { .. }) {
            let _ = self.stream.shutdown(Shutdown::Both);
        }
    }
}

/// The error for a failed send to rank 0.
///
/// When rank 0 ends the rendezvous (say, because another rank disconnected)
/// it sends its `ABORT` message and closes; a rank that sends afterwards gets
/// "connection reset" or "broken pipe", although the message saying what
/// really happened is already in its receive buffer. Report that message when
/// it is there. `in_handshake`: whether the handshake reply's opening comes
/// first.
fn send_failure(
    stream: &TcpStream,
    error: io::Error,
    deadline: Instant,
    timeout: Duration,
    in_handshake: bool,
) -> RendezvousError {
    let error = wire::classify(error, 0, timeout, "sending to rank 0");
    if !matches!(error, RendezvousError::PeerLost { .. }) {
        // A timeout or local failure: rank 0 may still be alive, and reading
        // could block.
        return error;
    }
    // The connection is gone, so these reads return at once: queued data,
    // then end of file or an error.
    let mut queued = ReadBy::new(stream, deadline);
    if in_handshake && wire::read_opening(&mut queued).is_err() {
        return error;
    }
    match wire::read_reply_kind(&mut queued) {
        Ok(ReplyKind::Abort) => wire::read_abort_body(&mut queued, timeout),
        _ => error,
    }
}

/// Connects to rank 0, retrying while it is not listening yet (it may start
/// after this rank) until `deadline`.
fn connect_with_retry(
    candidates: &[SocketAddr],
    deadline: Instant,
    timeout: Duration,
) -> Result<TcpStream, RendezvousError> {
    let mut backoff = CONNECT_BACKOFF_MIN;
    loop {
        for candidate in candidates {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(RendezvousError::Timeout { rank: 0, timeout });
            }
            match TcpStream::connect_timeout(candidate, remaining.min(CONNECT_ATTEMPT_MAX)) {
                Ok(stream) => return Ok(stream),
                Err(error) if retryable(&error) => {
                    tracing::trace!(%candidate, %error, "rank 0 not reachable yet; retrying");
                }
                Err(source) => {
                    return Err(RendezvousError::Io {
                        context: format!("connecting to rank 0 at {candidate}"),
                        source,
                    })
                }
            }
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(RendezvousError::Timeout { rank: 0, timeout });
        }
        std::thread::sleep(backoff.min(remaining));
        backoff = (backoff * 2).min(CONNECT_BACKOFF_MAX);
    }
}

/// Connection errors that mean "not yet": rank 0 not listening, its backlog
/// full, or the network still coming up.
fn retryable(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::TimedOut
            | io::ErrorKind::WouldBlock
            | io::ErrorKind::Interrupted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::AddrNotAvailable
            | io::ErrorKind::HostUnreachable
            | io::ErrorKind::NetworkUnreachable
    )
}
