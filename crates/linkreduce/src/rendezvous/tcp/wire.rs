//! The bytes of the TCP rendezvous (the format is described in the parent
//! module), and reads and writes bounded by one deadline per operation.
//!
//! Encoders return whole messages as bytes. Decoders read from any [`Read`]:
//! a socket in the rendezvous, a byte slice in tests. They read a frame field
//! by field, in the order the fields arrive, and check each length prefix
//! before allocating for what follows, so that a stray or hostile peer is
//! refused as soon as its bytes stop making sense rather than after it has
//! sent (or failed to send) more.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::rendezvous::RendezvousError;

/// Opens every hello and handshake reply, so that a connection from something
/// that is not a linkreduce rendezvous (a port scanner, a health check, a
/// different program on the same port) is recognised instead of misread.
const MAGIC: [u8; 8] = *b"LNKRDZV\0";

/// Bumped on any change of the wire format; ranks from different builds are
/// refused instead of misparsing each other.
pub(super) const PROTOCOL_VERSION: u32 = 1;

/// Largest message one rank may contribute to one round. Rendezvous traffic is
/// handles and addresses; the cap keeps a corrupt or hostile length prefix from
/// making a rank allocate without bound.
pub(super) const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// Largest reason text in an `ABORT` message.
const MAX_REASON_BYTES: usize = 64 << 10;

/// Length of the opening of a hello or handshake reply: `MAGIC` and the
/// protocol version.
const OPENING_LEN: usize = MAGIC.len() + 4;

const FRAME_CONTRIBUTION: u8 = 1;

const REPLY_WELCOME: u8 = 1;
const REPLY_RESULT: u8 = 2;
const REPLY_ABORT: u8 = 3;

const ABORT_TIMEOUT: u8 = 1;
const ABORT_PEER_LOST: u8 = 2;
const ABORT_CONFIG: u8 = 3;
const ABORT_IO: u8 = 4;
const ABORT_PROTOCOL: u8 = 5;

/// `timeout` from now, saturating instead of panicking for absurd timeouts.
pub(super) fn deadline_after(timeout: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(timeout)
        .or_else(|| now.checked_add(Duration::from_secs(365 * 24 * 3600)))
        .unwrap_or(now)
}

/// Turns an I/O error on the connection to `rank` into the error the caller
/// should see: a timeout or a lost peer where that is what happened.
pub(super) fn classify(
    error: io::Error,
    rank: usize,
    timeout: Duration,
    context: &str,
) -> RendezvousError {
    match error.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            RendezvousError::Timeout { rank, timeout }
        }
        io::ErrorKind::UnexpectedEof => RendezvousError::PeerLost {
            rank,
            reason: "connection closed".to_string(),
        },
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::NotConnected => RendezvousError::PeerLost {
            rank,
            reason: error.to_string(),
        },
        _ => RendezvousError::Io {
            context: format!("{context} (rank {rank})"),
            source: error,
        },
    }
}

fn deadline_passed() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "rendezvous deadline passed")
}

/// `write_all` that gives up at `deadline` as a whole, not per system call.
pub(super) fn write_all_by(
    stream: &TcpStream,
    mut buf: &[u8],
    deadline: Instant,
) -> io::Result<()> {
    while !buf.is_empty() {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(deadline_passed());
        }
        stream.set_write_timeout(Some(remaining))?;
        match (&*stream).write(buf) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(written) => buf = &buf[written..],
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

/// Reads a socket under one deadline for everything read through it, not a
/// timeout per system call, so that a peer trickling bytes cannot stretch an
/// operation past its deadline. `read_exact` (which the decoders use) retries
/// short and interrupted reads and reports an early end of file as
/// [`io::ErrorKind::UnexpectedEof`].
pub(super) struct ReadBy<'a> {
    stream: &'a TcpStream,
    deadline: Instant,
}

impl<'a> ReadBy<'a> {
    pub(super) fn new(stream: &'a TcpStream, deadline: Instant) -> Self {
        ReadBy { stream, deadline }
    }
}

impl Read for ReadBy<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let remaining = self.deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(deadline_passed());
        }
        self.stream.set_read_timeout(Some(remaining))?;
        let mut stream = self.stream;
        stream.read(buf)
    }
}

fn read_u8(source: &mut impl Read) -> io::Result<u8> {
    let mut buf = [0u8; 1];
    source.read_exact(&mut buf)?;
    Ok(buf[0])
}

fn read_u64(source: &mut impl Read) -> io::Result<u64> {
    let mut buf = [0u8; 8];
    source.read_exact(&mut buf)?;
    Ok(u64::from_le_bytes(buf))
}

/// A length prefix as `usize`, or `None` when it is above `limit`.
fn checked_len(len: u64, limit: usize) -> Option<usize> {
    usize::try_from(len).ok().filter(|&len| len <= limit)
}

/// The opening of a hello and of a handshake reply: magic and protocol
/// version. Rank 0 also sends it alone before an `ABORT` that ends the
/// handshake.
pub(super) fn encode_opening() -> Vec<u8> {
    let mut opening = MAGIC.to_vec();
    opening.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    opening
}

/// Why an opening was refused.
#[derive(Debug)]
pub(super) enum OpeningError {
    /// The connection failed or ended before the whole opening arrived.
    Io(io::Error),
    /// The bytes are not the linkreduce magic: the peer is something else.
    NotLinkreduce,
    /// A linkreduce rendezvous of another protocol version: this one.
    Version(u32),
}

/// Reads and checks an opening. Only the opening is read, so that a peer that
/// is not a linkreduce rank is refused without waiting for more of its bytes.
pub(super) fn read_opening(source: &mut impl Read) -> Result<(), OpeningError> {
    let mut opening = [0u8; OPENING_LEN];
    source.read_exact(&mut opening).map_err(OpeningError::Io)?;
    if opening[..MAGIC.len()] != MAGIC {
        return Err(OpeningError::NotLinkreduce);
    }
    let version = u32::from_le_bytes([opening[8], opening[9], opening[10], opening[11]]);
    if version != PROTOCOL_VERSION {
        return Err(OpeningError::Version(version));
    }
    Ok(())
}

/// Who a connecting rank says it is. Kept as sent (`u64`), so that rank 0
/// can name a value that does not fit this host's `usize` in its refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Hello {
    pub(super) rank: u64,
    pub(super) world_size: u64,
}

/// A whole hello: opening, rank and world size.
pub(super) fn encode_hello(hello: Hello) -> Vec<u8> {
    let mut message = encode_opening();
    message.extend_from_slice(&hello.rank.to_le_bytes());
    message.extend_from_slice(&hello.world_size.to_le_bytes());
    message
}

/// Reads the rest of a hello, after [`read_opening`].
pub(super) fn read_hello_body(source: &mut impl Read) -> io::Result<Hello> {
    Ok(Hello {
        rank: read_u64(source)?,
        world_size: read_u64(source)?,
    })
}

/// Rank 0's handshake reply admitting a rank.
pub(super) fn encode_welcome() -> Vec<u8> {
    let mut message = encode_opening();
    message.push(REPLY_WELCOME);
    message
}

/// The kind of a message from rank 0, after the opening of the handshake
/// reply or in a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ReplyKind {
    Welcome,
    Result,
    /// The body follows; read it with [`read_abort_body`].
    Abort,
    /// A kind this protocol version does not have.
    Unknown(u8),
}

impl ReplyKind {
    /// The kind byte on the wire, for reporting a kind that is out of place.
    pub(super) fn code(self) -> u8 {
        match self {
            ReplyKind::Welcome => REPLY_WELCOME,
            ReplyKind::Result => REPLY_RESULT,
            ReplyKind::Abort => REPLY_ABORT,
            ReplyKind::Unknown(code) => code,
        }
    }
}

/// Reads the kind byte of a message from rank 0.
pub(super) fn read_reply_kind(source: &mut impl Read) -> io::Result<ReplyKind> {
    Ok(match read_u8(source)? {
        REPLY_WELCOME => ReplyKind::Welcome,
        REPLY_RESULT => ReplyKind::Result,
        REPLY_ABORT => ReplyKind::Abort,
        other => ReplyKind::Unknown(other),
    })
}

/// The start of a contribution frame; the `len` contributed bytes follow it.
/// Separate so that the contribution need not be copied into one buffer.
pub(super) fn encode_contribution_header(round: u64, len: usize) -> Vec<u8> {
    let mut header = vec![FRAME_CONTRIBUTION];
    header.extend_from_slice(&round.to_le_bytes());
    header.extend_from_slice(&(len as u64).to_le_bytes());
    header
}

/// One rank's contribution to one round, as rank 0 receives it.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Contribution {
    pub(super) round: u64,
    pub(super) bytes: Vec<u8>,
}

/// Why a frame from a rank was refused.
#[derive(Debug)]
pub(super) enum FrameError {
    /// The connection failed or ended, possibly in the middle of the frame.
    Io(io::Error),
    /// A frame kind this protocol version does not have.
    UnknownKind(u8),
    /// A contribution longer than [`MAX_MESSAGE_BYTES`]; its bytes are not
    /// read.
    TooLong(u64),
}

/// Reads one contribution frame.
pub(super) fn read_contribution(source: &mut impl Read) -> Result<Contribution, FrameError> {
    let kind = read_u8(source).map_err(FrameError::Io)?;
    if kind != FRAME_CONTRIBUTION {
        return Err(FrameError::UnknownKind(kind));
    }
    let round = read_u64(source).map_err(FrameError::Io)?;
    let len = read_u64(source).map_err(FrameError::Io)?;
    let len = checked_len(len, MAX_MESSAGE_BYTES).ok_or(FrameError::TooLong(len))?;
    let mut bytes = vec![0u8; len];
    source.read_exact(&mut bytes).map_err(FrameError::Io)?;
    Ok(Contribution { round, bytes })
}

/// A whole `RESULT` message: every rank's contribution to `round`, in rank
/// order.
pub(super) fn encode_result(round: u64, gathered: &[Vec<u8>]) -> Vec<u8> {
    let total: usize = gathered.iter().map(|bytes| bytes.len() + 8).sum();
    let mut message = Vec::with_capacity(17 + total);
    message.push(REPLY_RESULT);
    message.extend_from_slice(&round.to_le_bytes());
    message.extend_from_slice(&(gathered.len() as u64).to_le_bytes());
    for bytes in gathered {
        message.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
        message.extend_from_slice(bytes);
    }
    message
}

/// Why a `RESULT` message was refused.
#[derive(Debug)]
pub(super) enum ResultError {
    /// The connection failed or ended, possibly in the middle of the message.
    Io(io::Error),
    /// The result of this other round; nothing after the round is read.
    Round(u64),
    /// This many contributions instead of one per rank; nothing after the
    /// count is read.
    Count(u64),
    /// The contribution of `rank` is longer than [`MAX_MESSAGE_BYTES`]; its
    /// bytes are not read.
    TooLong { rank: usize, len: u64 },
}

/// Reads the rest of a `RESULT` message, after its kind, expecting the result
/// of `round` in a world of `world_size` ranks.
pub(super) fn read_result_body(
    source: &mut impl Read,
    round: u64,
    world_size: usize,
) -> Result<Vec<Vec<u8>>, ResultError> {
    let their_round = read_u64(source).map_err(ResultError::Io)?;
    if their_round != round {
        return Err(ResultError::Round(their_round));
    }
    let count = read_u64(source).map_err(ResultError::Io)?;
    if count != world_size as u64 {
        return Err(ResultError::Count(count));
    }
    let mut gathered = Vec::with_capacity(world_size);
    for rank in 0..world_size {
        let len = read_u64(source).map_err(ResultError::Io)?;
        let len = checked_len(len, MAX_MESSAGE_BYTES).ok_or(ResultError::TooLong { rank, len })?;
        let mut contribution = vec![0u8; len];
        source
            .read_exact(&mut contribution)
            .map_err(ResultError::Io)?;
        gathered.push(contribution);
    }
    Ok(gathered)
}

/// Encodes `error` as an `ABORT` message (kind byte included) for the other
/// ranks.
pub(super) fn encode_abort(error: &RendezvousError) -> Vec<u8> {
    let (code, rank, timeout, reason) = match error {
        RendezvousError::Timeout { rank, timeout } => {
            (ABORT_TIMEOUT, *rank, *timeout, String::new())
        }
        RendezvousError::PeerLost { rank, reason } => {
            (ABORT_PEER_LOST, *rank, Duration::ZERO, reason.clone())
        }
        RendezvousError::Config(message) => (ABORT_CONFIG, 0, Duration::ZERO, message.clone()),
        RendezvousError::Io { .. } => (ABORT_IO, 0, Duration::ZERO, error.to_string()),
        RendezvousError::Protocol(message) => (ABORT_PROTOCOL, 0, Duration::ZERO, message.clone()),
    };
    let mut reason = reason.into_bytes();
    if reason.len() > MAX_REASON_BYTES {
        reason.truncate(MAX_REASON_BYTES);
    }
    let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
    let mut message = vec![REPLY_ABORT, code];
    message.extend_from_slice(&(rank as u64).to_le_bytes());
    message.extend_from_slice(&timeout_ms.to_le_bytes());
    message.extend_from_slice(&(reason.len() as u64).to_le_bytes());
    message.extend_from_slice(&reason);
    message
}

/// Reads the body of an `ABORT` message (after its kind byte) and rebuilds
/// the error rank 0 reported. A message that cannot be read whole yields the
/// error that explains why, as if rank 0 had reported it; `timeout` is the
/// operation's, for a read that runs out of time.
pub(super) fn read_abort_body(source: &mut impl Read, timeout: Duration) -> RendezvousError {
    let context = "reading rank 0's abort message";
    let mut read = || -> io::Result<(u8, u64, u64, u64)> {
        Ok((
            read_u8(source)?,
            read_u64(source)?,
            read_u64(source)?,
            read_u64(source)?,
        ))
    };
    let (code, rank, timeout_ms, reason_len) = match read() {
        Ok(fields) => fields,
        Err(error) => return classify(error, 0, timeout, context),
    };
    let Some(reason_len) = checked_len(reason_len, MAX_REASON_BYTES) else {
        return RendezvousError::Protocol(format!(
            "rank 0 sent an abort reason of {reason_len} bytes, more than the limit of \
             {MAX_REASON_BYTES}"
        ));
    };
    let mut reason = vec![0u8; reason_len];
    if let Err(error) = source.read_exact(&mut reason) {
        return classify(error, 0, timeout, context);
    }
    let reason = String::from_utf8_lossy(&reason).into_owned();
    let Ok(rank) = usize::try_from(rank) else {
        return RendezvousError::Protocol(format!(
            "rank 0 ended the rendezvous naming rank {rank}, which does not exist: {reason}"
        ));
    };
    match code {
        ABORT_TIMEOUT => RendezvousError::Timeout {
            rank,
            timeout: Duration::from_millis(timeout_ms),
        },
        ABORT_PEER_LOST => RendezvousError::PeerLost {
            rank,
            reason: format!("reported by rank 0: {reason}"),
        },
        ABORT_CONFIG => RendezvousError::Config(format!("rank 0 ended the rendezvous: {reason}")),
        ABORT_IO => RendezvousError::Io {
            context: "rank 0 ended the rendezvous".to_string(),
            source: io::Error::other(reason),
        },
        ABORT_PROTOCOL => {
            RendezvousError::Protocol(format!("rank 0 ended the rendezvous: {reason}"))
        }
        other => RendezvousError::Protocol(format!(
            "rank 0 ended the rendezvous with unknown error code {other}: {reason}"
        )),
    }
}

#[cfg(test)]
mod tests;
