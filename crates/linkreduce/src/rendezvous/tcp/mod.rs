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

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::{Rendezvous, RendezvousError};

/// Opens every hello and handshake reply, so that a connection from something
/// that is not a linkreduce rendezvous (a port scanner, a health check, a
/// different program on the same port) is recognised instead of misread.
const MAGIC: [u8; 8] = *b"LNKRDZV\0";

/// Bumped on any change of the wire format; ranks from different builds are
/// refused instead of misparsing each other.
const PROTOCOL_VERSION: u32 = 1;

/// Largest message one rank may contribute to one round. Rendezvous traffic is
/// handles and addresses; the cap keeps a corrupt or hostile length prefix from
/// making a rank allocate without bound.
const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// Largest reason text in an `ABORT` message.
const MAX_REASON_BYTES: usize = 64 << 10;

const FRAME_CONTRIBUTION: u8 = 1;

const REPLY_WELCOME: u8 = 1;
const REPLY_RESULT: u8 = 2;
const REPLY_ABORT: u8 = 3;

const ABORT_TIMEOUT: u8 = 1;
const ABORT_PEER_LOST: u8 = 2;
const ABORT_CONFIG: u8 = 3;
const ABORT_IO: u8 = 4;
const ABORT_PROTOCOL: u8 = 5;

/// How long rank 0 waits for events between polls of its (non-blocking)
/// listener while ranks join. std has no way to wait on a listener and a
/// channel at once, and a few milliseconds of join latency do not matter.
const ACCEPT_POLL: Duration = Duration::from_millis(5);

/// First and longest pause between connection attempts while rank 0 is not
/// listening yet.
const CONNECT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const CONNECT_BACKOFF_MAX: Duration = Duration::from_millis(250);

/// Longest single connection attempt, so that one unresponsive address of
/// several does not use up the whole timeout.
const CONNECT_ATTEMPT_MAX: Duration = Duration::from_secs(5);

/// Longest time rank 0 spends writing an `ABORT` message to one rank. The
/// message is small and normally fits the socket buffer; a rank that does not
/// read must not delay telling the others.
const ABORT_WRITE_MAX: Duration = Duration::from_secs(1);

/// Where and how the ranks of a [`TcpRendezvous`] meet.
///
/// Usually built by [`TcpRendezvousConfig::from_env`] from the variables that
/// torchrun (and most launchers) set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpRendezvousConfig {
    /// This process's rank, in `0..world_size`.
    pub rank: usize,
    /// How many ranks take part.
    pub world_size: usize,
    /// Host name or IP address of rank 0; rank 0 listens on it, the others
    /// connect to it.
    pub addr: String,
    /// TCP port rank 0 listens on.
    pub port: u16,
    /// Longest wait of any one operation (start-up, one all-gather) for the
    /// other ranks.
    pub timeout: Duration,
}

impl TcpRendezvousConfig {
    /// `MASTER_ADDR` when the variable is not set: single-node jobs are the
    /// common case.
    pub const DEFAULT_ADDR: &'static str = "127.0.0.1";

    /// Timeout when `LINKREDUCE_RENDEZVOUS_TIMEOUT_S` is not set: long enough
    /// for ranks that start slowly (CUDA initialisation, model loading before
    /// the communicator is built), short enough that a lost rank is noticed.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

    /// The variable that overrides the timeout, in seconds.
    pub const TIMEOUT_VAR: &'static str = "LINKREDUCE_RENDEZVOUS_TIMEOUT_S";

    /// Reads the configuration from the process environment: `RANK`,
    /// `WORLD_SIZE` and `MASTER_PORT` are required, `MASTER_ADDR` defaults to
    /// `127.0.0.1` and `LINKREDUCE_RENDEZVOUS_TIMEOUT_S` (seconds, fractions
    /// allowed) to 60.
    pub fn from_env() -> Result<Self, RendezvousError> {
        Self::from_vars(env_var)
    }

    /// Like [`from_env`](Self::from_env), but reads variables through
    /// `lookup`, so that the parsing can be tested (or fed from another
    /// source) without changing the process environment.
    pub fn from_vars(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, RendezvousError> {
        let rank = parse_index("RANK", required(&lookup, "RANK", RANK_HINT)?, RANK_HINT)?;
        let world_size = parse_index(
            "WORLD_SIZE",
            required(&lookup, "WORLD_SIZE", WORLD_SIZE_HINT)?,
            WORLD_SIZE_HINT,
        )?;
        if world_size == 0 {
            return Err(RendezvousError::Config(format!(
                "WORLD_SIZE=0: at least one rank must take part; {WORLD_SIZE_HINT}"
            )));
        }
        if rank >= world_size {
            return Err(RendezvousError::Config(format!(
                "RANK={rank} is out of range for WORLD_SIZE={world_size}; set RANK to one of 0..={} \
                 (or WORLD_SIZE to the real number of ranks)",
                world_size - 1
            )));
        }
        let addr = match lookup("MASTER_ADDR") {
            None => Self::DEFAULT_ADDR.to_string(),
            Some(value) if value.trim().is_empty() => {
                return Err(RendezvousError::Config(
                    "MASTER_ADDR is set but empty; set it to the host name or IP address of \
                     rank 0, or unset it to use 127.0.0.1"
                        .to_string(),
                ))
            }
            Some(value) => value.trim().to_string(),
        };
        let port_text = required(&lookup, "MASTER_PORT", PORT_HINT)?;
        let port = match port_text.trim().parse::<u16>() {
            Ok(port) if port != 0 => port,
            _ => {
                return Err(RendezvousError::Config(format!(
                    "MASTER_PORT={port_text:?} is not a usable TCP port; {PORT_HINT}"
                )))
            }
        };
        let timeout = match lookup(Self::TIMEOUT_VAR) {
            None => Self::DEFAULT_TIMEOUT,
            Some(text) => parse_timeout(&text)?,
        };
        Ok(TcpRendezvousConfig {
            rank,
            world_size,
            addr,
            port,
            timeout,
        })
    }

    /// This process's rank among the ranks of its node: `LOCAL_RANK`, or
    /// `RANK` when `LOCAL_RANK` is not set (a single-node job, where the two
    /// agree). Used to pick the GPU.
    pub fn local_rank_from_env() -> Result<usize, RendezvousError> {
        Self::local_rank_from_vars(env_var)
    }

    /// Like [`local_rank_from_env`](Self::local_rank_from_env), reading
    /// variables through `lookup`.
    pub fn local_rank_from_vars(
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<usize, RendezvousError> {
        const HINT: &str = "set LOCAL_RANK to this process's rank on its node \
                            (0 .. number of GPUs used on the node - 1)";
        match lookup("LOCAL_RANK") {
            Some(value) => parse_index("LOCAL_RANK", value, HINT),
            None => match lookup("RANK") {
                Some(value) => parse_index("RANK", value, RANK_HINT),
                None => Err(RendezvousError::Config(format!(
                    "neither LOCAL_RANK nor RANK is set; {HINT}"
                ))),
            },
        }
    }

    /// Checks what `connect` needs before any socket is touched.
    fn validate(&self, allow_port_zero: bool) -> Result<(), RendezvousError> {
        if self.world_size == 0 {
            return Err(RendezvousError::Config(
                "world size 0: at least one rank must take part".to_string(),
            ));
        }
        if self.rank >= self.world_size {
            return Err(RendezvousError::Config(format!(
                "rank {} is out of range for world size {}; ranks are 0..={}",
                self.rank,
                self.world_size,
                self.world_size - 1
            )));
        }
        if self.timeout.is_zero() {
            return Err(RendezvousError::Config(
                "the rendezvous timeout is zero; give the ranks time to meet (e.g. 60 s)"
                    .to_string(),
            ));
        }
        if self.addr.trim().is_empty() {
            return Err(RendezvousError::Config(
                "the rendezvous address (MASTER_ADDR) is empty; set it to rank 0's host"
                    .to_string(),
            ));
        }
        if self.port == 0 && !allow_port_zero {
            return Err(RendezvousError::Config(
                "port 0 cannot be used: the other ranks could not know which port rank 0 got; \
                 set MASTER_PORT to a fixed free port (tests can pass a listener bound to port 0 \
                 to TcpRendezvous::with_listener)"
                    .to_string(),
            ));
        }
        Ok(())
    }
}

const RANK_HINT: &str = "set RANK to this process's rank, 0..WORLD_SIZE-1 \
                         (torchrun sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT)";
const WORLD_SIZE_HINT: &str = "set WORLD_SIZE to the number of ranks (processes) taking part";
const PORT_HINT: &str = "set MASTER_PORT to a free TCP port in 1..=65535 that rank 0 listens on \
                         and every rank is given";

/// Reads a variable; a value that is not valid Unicode is passed on (lossily)
/// so that it is reported as malformed rather than as missing.
fn env_var(name: &str) -> Option<String> {
    std::env::var_os(name).map(|value| value.to_string_lossy().into_owned())
}

fn required(
    lookup: &impl Fn(&str) -> Option<String>,
    name: &str,
    hint: &str,
) -> Result<String, RendezvousError> {
    lookup(name).ok_or_else(|| RendezvousError::Config(format!("{name} is not set; {hint}")))
}

fn parse_index(name: &str, value: String, hint: &str) -> Result<usize, RendezvousError> {
    value.trim().parse::<usize>().map_err(|_| {
        RendezvousError::Config(format!(
            "{name}={value:?} is not a non-negative integer; {hint}"
        ))
    })
}

fn parse_timeout(text: &str) -> Result<Duration, RendezvousError> {
    let invalid = || {
        RendezvousError::Config(format!(
            "{}={text:?} is not a positive number of seconds; set it to e.g. 60, \
             or unset it to use the default of 60 s",
            TcpRendezvousConfig::TIMEOUT_VAR
        ))
    };
    let seconds: f64 = text.trim().parse().map_err(|_| invalid())?;
    if seconds.is_nan() || seconds <= 0.0 {
        return Err(invalid());
    }
    let timeout = Duration::try_from_secs_f64(seconds).map_err(|_| invalid())?;
    if timeout.is_zero() {
        return Err(invalid());
    }
    Ok(timeout)
}

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
    pub const MAX_MESSAGE_BYTES: usize = MAX_MESSAGE_BYTES;

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
            let listener = bind(&config.addr, config.port)?;
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
        let result = if bytes.len() > MAX_MESSAGE_BYTES {
            Err(RendezvousError::Protocol(format!(
                "rank {} passed {} bytes to all_gather, more than the limit of {} bytes",
                self.rank,
                bytes.len(),
                MAX_MESSAGE_BYTES
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

/// `timeout` from now, saturating instead of panicking for absurd timeouts.
fn deadline_after(timeout: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(timeout)
        .or_else(|| now.checked_add(Duration::from_secs(365 * 24 * 3600)))
        .unwrap_or(now)
}

/// Turns an I/O error on the connection to `rank` into the error the caller
/// should see: a timeout or a lost peer where that is what happened.
fn classify(error: io::Error, rank: usize, timeout: Duration, context: &str) -> RendezvousError {
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
fn write_all_by(stream: &TcpStream, mut buf: &[u8], deadline: Instant) -> io::Result<()> {
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

/// `read_exact` that gives up at `deadline` as a whole, not per system call.
fn read_exact_by(stream: &TcpStream, mut buf: &mut [u8], deadline: Instant) -> io::Result<()> {
    while !buf.is_empty() {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(deadline_passed());
        }
        stream.set_read_timeout(Some(remaining))?;
        match (&*stream).read(buf) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(read) => buf = &mut buf[read..],
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

fn read_u8_by(stream: &TcpStream, deadline: Instant) -> io::Result<u8> {
    let mut buf = [0u8; 1];
    read_exact_by(stream, &mut buf, deadline)?;
    Ok(buf[0])
}

fn read_u64_by(stream: &TcpStream, deadline: Instant) -> io::Result<u64> {
    let mut buf = [0u8; 8];
    read_exact_by(stream, &mut buf, deadline)?;
    Ok(u64::from_le_bytes(buf))
}

/// A length prefix as `usize`, or `None` when it is above `limit`.
fn checked_len(len: u64, limit: usize) -> Option<usize> {
    usize::try_from(len).ok().filter(|&len| len <= limit)
}

/// The handshake reply's opening: magic and protocol version.
fn reply_header() -> Vec<u8> {
    let mut header = MAGIC.to_vec();
    header.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    header
}

/// Encodes `error` as an `ABORT` message for the other ranks.
fn encode_abort(error: &RendezvousError) -> Vec<u8> {
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
/// the error rank 0 reported.
fn read_abort(stream: &TcpStream, deadline: Instant, timeout: Duration) -> RendezvousError {
    let context = "reading rank 0's abort message";
    let read = || -> io::Result<(u8, u64, u64, u64)> {
        Ok((
            read_u8_by(stream, deadline)?,
            read_u64_by(stream, deadline)?,
            read_u64_by(stream, deadline)?,
            read_u64_by(stream, deadline)?,
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
    if let Err(error) = read_exact_by(stream, &mut reason, deadline) {
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

/// Binds rank 0's listener, turning the usual mistakes into configuration
/// errors that say what to change.
fn bind(addr: &str, port: u16) -> Result<TcpListener, RendezvousError> {
    let candidates = resolve(addr, port)?;
    let mut failures = Vec::new();
    for candidate in candidates {
        match TcpListener::bind(candidate) {
            Ok(listener) => return Ok(listener),
            Err(error) => failures.push((candidate, error)),
        }
    }
    // A port in use is the most useful thing to report when some addresses of
    // a name (e.g. `localhost` as ::1 and 127.0.0.1) fail for other reasons.
    let position = failures
        .iter()
        .position(|(_, error)| error.kind() == io::ErrorKind::AddrInUse)
        .unwrap_or(0);
    if position >= failures.len() {
        return Err(RendezvousError::Config(format!(
            "MASTER_ADDR={addr} resolves to no address"
        )));
    }
    let (candidate, error) = failures.swap_remove(position);
    Err(match error.kind() {
        io::ErrorKind::AddrInUse => RendezvousError::Config(format!(
            "port {port} on {addr} is already in use (by another job, or an earlier run that \
             has not exited); pick another MASTER_PORT"
        )),
        io::ErrorKind::AddrNotAvailable => RendezvousError::Config(format!(
            "MASTER_ADDR={addr} ({candidate}) is not an address of this host, but rank 0 \
             listens on MASTER_ADDR; run rank 0 on that host or set MASTER_ADDR to one of its \
             addresses"
        )),
        io::ErrorKind::PermissionDenied => RendezvousError::Config(format!(
            "not allowed to listen on port {port} (ports below 1024 need privileges); pick \
             another MASTER_PORT"
        )),
        _ => RendezvousError::Io {
            context: format!("listening on {candidate}"),
            source: error,
        },
    })
}

fn resolve(addr: &str, port: u16) -> Result<Vec<SocketAddr>, RendezvousError> {
    let addrs: Vec<SocketAddr> = (addr, port)
        .to_socket_addrs()
        .map_err(|error| {
            RendezvousError::Config(format!(
                "MASTER_ADDR={addr} does not resolve ({error}); set MASTER_ADDR to the host \
                 name or IP address of rank 0"
            ))
        })?
        .collect();
    if addrs.is_empty() {
        return Err(RendezvousError::Config(format!(
            "MASTER_ADDR={addr} resolves to no address; set MASTER_ADDR to the host name or IP \
             address of rank 0"
        )));
    }
    Ok(addrs)
}

/// What a connection's reader thread on rank 0 reports.
enum Event {
    /// Not a linkreduce rank: wrong magic, or closed before a whole hello.
    Stray { conn: u64, reason: String },
    /// A linkreduce rank of another protocol version.
    WrongVersion { conn: u64, version: u32 },
    Hello {
        conn: u64,
        rank: u64,
        world_size: u64,
    },
    Contribution {
        conn: u64,
        round: u64,
        bytes: Vec<u8>,
    },
    /// A frame that breaks the protocol; the reader stops.
    Malformed { conn: u64, problem: String },
    /// The connection ended (EOF or error); the reader stops.
    Closed { conn: u64, reason: String },
}

/// Reads one connection on rank 0 until it ends, forwarding what arrives.
///
/// One thread per connection because std cannot wait on several sockets at
/// once, and rank 0 must notice a rank that disconnects while it is still
/// waiting for another. The reads have no timeout: a rank may legitimately be
/// idle for a long time between operations, and deadlines are enforced by the
/// operation waiting on the channel.
fn read_connection(conn: u64, stream: TcpStream, events: Sender<Event>) {
    let mut stream = stream;
    let ended = |error: io::Error| {
        if error.kind() == io::ErrorKind::UnexpectedEof {
            "connection closed".to_string()
        } else {
            error.to_string()
        }
    };
    let mut opening = [0u8; 12];
    if let Err(error) = stream.read_exact(&mut opening) {
        let _ = events.send(Event::Stray {
            conn,
            reason: format!("no hello: {}", ended(error)),
        });
        return;
    }
    if opening[..8] != MAGIC {
        let _ = events.send(Event::Stray {
            conn,
            reason: "the hello does not start with the linkreduce magic".to_string(),
        });
        return;
    }
    let version = u32::from_le_bytes([opening[8], opening[9], opening[10], opening[11]]);
    if version != PROTOCOL_VERSION {
        let _ = events.send(Event::WrongVersion { conn, version });
        return;
    }
    let mut identity = [0u8; 16];
    if let Err(error) = stream.read_exact(&mut identity) {
        let _ = events.send(Event::Stray {
            conn,
            reason: format!("incomplete hello: {}", ended(error)),
        });
        return;
    }
    let (rank, world_size) = split_u64_pair(&identity);
    if events
        .send(Event::Hello {
            conn,
            rank,
            world_size,
        })
        .is_err()
    {
        return;
    }
    loop {
        let mut kind = [0u8; 1];
        if let Err(error) = stream.read_exact(&mut kind) {
            let _ = events.send(Event::Closed {
                conn,
                reason: ended(error),
            });
            return;
        }
        if kind[0] != FRAME_CONTRIBUTION {
            let _ = events.send(Event::Malformed {
                conn,
                problem: format!("a frame of unknown kind {}", kind[0]),
            });
            return;
        }
        let mut header = [0u8; 16];
        if let Err(error) = stream.read_exact(&mut header) {
            let _ = events.send(Event::Closed {
                conn,
                reason: ended(error),
            });
            return;
        }
        let (round, len) = split_u64_pair(&header);
        let Some(len) = checked_len(len, MAX_MESSAGE_BYTES) else {
            let _ = events.send(Event::Malformed {
                conn,
                problem: format!(
                    "a contribution of {len} bytes, more than the limit of {MAX_MESSAGE_BYTES}"
                ),
            });
            return;
        };
        let mut bytes = vec![0u8; len];
        if let Err(error) = stream.read_exact(&mut bytes) {
            let _ = events.send(Event::Closed {
                conn,
                reason: ended(error),
            });
            return;
        }
        if events
            .send(Event::Contribution { conn, round, bytes })
            .is_err()
        {
            return;
        }
    }
}

fn split_u64_pair(bytes: &[u8; 16]) -> (u64, u64) {
    let mut first = [0u8; 8];
    let mut second = [0u8; 8];
    first.copy_from_slice(&bytes[..8]);
    second.copy_from_slice(&bytes[8..]);
    (u64::from_le_bytes(first), u64::from_le_bytes(second))
}

/// A rank connected to rank 0.
struct Peer {
    stream: TcpStream,
    addr: SocketAddr,
}

/// Rank 0's side: one connection per other rank, read by one thread each.
struct Root {
    world_size: usize,
    timeout: Duration,
    /// Indexed by rank; entry 0 (this rank) stays `None`.
    peers: Vec<Option<Peer>>,
    /// Connections accepted but not (yet) known as ranks: during start-up,
    /// those whose hello has not arrived; kept so they can be closed.
    pending: HashMap<u64, Peer>,
    conn_ranks: HashMap<u64, usize>,
    events: Receiver<Event>,
    /// Whether the handshake reply has been sent; until then an abort message
    /// needs the reply's opening.
    welcomed: bool,
}

impl Root {
    /// Accepts connections until every rank has sent a valid hello, then
    /// welcomes them all.
    fn accept_group(
        listener: TcpListener,
        config: &TcpRendezvousConfig,
    ) -> Result<Root, RendezvousError> {
        let deadline = deadline_after(config.timeout);
        let local = listener
            .local_addr()
            .map(|addr| addr.to_string())
            .unwrap_or_else(|_| "its listener".to_string());
        listener
            .set_nonblocking(true)
            .map_err(|source| RendezvousError::Io {
                context: "making the rendezvous listener non-blocking".to_string(),
                source,
            })?;
        let (sender, events) = mpsc::channel();
        let mut root = Root {
            world_size: config.world_size,
            timeout: config.timeout,
            peers: (0..config.world_size).map(|_| None).collect(),
            pending: HashMap::new(),
            conn_ranks: HashMap::new(),
            events,
            welcomed: false,
        };
        tracing::debug!(listen = %local, world_size = config.world_size, "rank 0 waiting for ranks");
        match root.wait_for_ranks(&listener, &sender, deadline, &local) {
            Ok(()) => {}
            Err(error) => {
                root.abort(&error);
                return Err(error);
            }
        }
        // No more connections: later comers are refused by the system and
        // the reader threads own the only remaining senders.
        drop(listener);
        drop(sender);
        for (_, stray) in root.pending.drain() {
            let _ = stray.stream.shutdown(Shutdown::Both);
        }
        let welcome = {
            let mut message = reply_header();
            message.push(REPLY_WELCOME);
            message
        };
        let write_deadline = deadline_after(config.timeout);
        for rank in 1..root.world_size {
            let sent = match &root.peers[rank] {
                Some(peer) => write_all_by(&peer.stream, &welcome, write_deadline)
                    .map_err(|error| classify(error, rank, root.timeout, "welcoming")),
                None => Err(RendezvousError::Protocol(format!(
                    "rank {rank} has no connection after the handshake"
                ))),
            };
            if let Err(error) = sent {
                root.abort(&error);
                return Err(error);
            }
        }
        root.welcomed = true;
        tracing::info!(
            world_size = root.world_size,
            "TCP rendezvous complete on rank 0"
        );
        Ok(root)
    }

    fn wait_for_ranks(
        &mut self,
        listener: &TcpListener,
        sender: &Sender<Event>,
        deadline: Instant,
        local: &str,
    ) -> Result<(), RendezvousError> {
        let mut next_conn: u64 = 0;
        let mut joined = 1;
        while joined < self.world_size {
            loop {
                match listener.accept() {
                    Ok((stream, addr)) => {
                        let conn = next_conn;
                        next_conn += 1;
                        self.start_reader(conn, stream, addr, sender)?;
                    }
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                    // A connection that failed before it was accepted, or a
                    // signal: nothing to do with the ranks already known.
                    Err(error)
                        if matches!(
                            error.kind(),
                            io::ErrorKind::Interrupted
                                | io::ErrorKind::ConnectionAborted
                                | io::ErrorKind::ConnectionReset
                        ) => {}
                    Err(source) => {
                        return Err(RendezvousError::Io {
                            context: format!("accepting connections on {local}"),
                            source,
                        })
                    }
                }
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(RendezvousError::Timeout {
                    rank: self.first_missing(),
                    timeout: self.timeout,
                });
            }
            match self.events.recv_timeout(remaining.min(ACCEPT_POLL)) {
                Ok(event) => {
                    if self.on_handshake_event(event, local)? {
                        joined += 1;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                // Cannot happen while `sender` is alive; treat as a bug.
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(RendezvousError::Protocol(
                        "rank 0's connection readers stopped unexpectedly".to_string(),
                    ))
                }
            }
        }
        Ok(())
    }

    fn start_reader(
        &mut self,
        conn: u64,
        stream: TcpStream,
        addr: SocketAddr,
        sender: &Sender<Event>,
    ) -> Result<(), RendezvousError> {
        let io_error = |source| RendezvousError::Io {
            context: format!("setting up the connection from {addr}"),
            source,
        };
        // Accepted sockets may inherit the listener's non-blocking mode on
        // some systems; the readers want plain blocking reads.
        stream.set_nonblocking(false).map_err(io_error)?;
        let _ = stream.set_nodelay(true);
        let reader = stream.try_clone().map_err(io_error)?;
        let events = sender.clone();
        std::thread::Builder::new()
            .name(format!("linkreduce-rdzv-{conn}"))
            .spawn(move || read_connection(conn, reader, events))
            .map_err(io_error)?;
        tracing::debug!(%addr, conn, "rank 0 accepted a connection");
        self.pending.insert(conn, Peer { stream, addr });
        Ok(())
    }

    /// Handles one event while ranks join; `Ok(true)` when a rank joined.
    fn on_handshake_event(&mut self, event: Event, local: &str) -> Result<bool, RendezvousError> {
        match event {
            Event::Stray { conn, reason } => {
                if let Some(stray) = self.pending.remove(&conn) {
                    tracing::warn!(
                        addr = %stray.addr,
                        %reason,
                        "ignoring a connection to the rendezvous port that is not a linkreduce rank"
                    );
                    let _ = stray.stream.shutdown(Shutdown::Both);
                }
                Ok(false)
            }
            Event::WrongVersion { conn, version } => Err(RendezvousError::Protocol(format!(
                "the process at {} speaks rendezvous protocol version {version} but rank 0 \
                 speaks version {PROTOCOL_VERSION}; run the same linkreduce build on every rank",
                self.pending_addr(conn)
            ))),
            Event::Hello {
                conn,
                rank,
                world_size,
            } => self.admit(conn, rank, world_size, local).map(|()| true),
            Event::Contribution { conn, .. } | Event::Malformed { conn, .. } => {
                match self.conn_ranks.get(&conn) {
                    Some(&rank) => Err(RendezvousError::Protocol(format!(
                        "rank {rank} sent data before the rendezvous was complete"
                    ))),
                    None => Ok(false),
                }
            }
            Event::Closed { conn, reason } => match self.conn_ranks.get(&conn) {
                Some(&rank) => Err(RendezvousError::PeerLost { rank, reason }),
                None => {
                    self.pending.remove(&conn);
                    Ok(false)
                }
            },
        }
    }

    fn pending_addr(&self, conn: u64) -> String {
        self.pending
            .get(&conn)
            .map(|peer| peer.addr.to_string())
            .unwrap_or_else(|| "an unknown address".to_string())
    }

    /// Validates a hello and files the connection under its rank. A bad hello
    /// ends the whole rendezvous: it means the job was started wrongly, and
    /// going on would at best hang until the timeout.
    fn admit(
        &mut self,
        conn: u64,
        rank: u64,
        world_size: u64,
        local: &str,
    ) -> Result<(), RendezvousError> {
        let from = self.pending_addr(conn);
        if world_size != self.world_size as u64 {
            return Err(RendezvousError::Config(format!(
                "the process at {from} is rank {rank} of WORLD_SIZE={world_size}, but rank 0 was \
                 started with WORLD_SIZE={}; start every rank with the same WORLD_SIZE",
                self.world_size
            )));
        }
        if rank == 0 {
            return Err(RendezvousError::Config(format!(
                "the process at {from} also claims rank 0, which is the process listening on \
                 {local}; give every process a distinct RANK"
            )));
        }
        let index = match usize::try_from(rank) {
            Ok(index) if index < self.world_size => index,
            _ => {
                return Err(RendezvousError::Config(format!(
                    "the process at {from} claims rank {rank}, out of range for WORLD_SIZE={}; \
                     give every process a distinct RANK in 0..WORLD_SIZE",
                    self.world_size
                )))
            }
        };
        if let Some(existing) = &self.peers[index] {
            return Err(RendezvousError::Config(format!(
                "two processes claim rank {rank} ({} and {from}); give every process a \
                 distinct RANK",
                existing.addr
            )));
        }
        let Some(peer) = self.pending.remove(&conn) else {
            return Err(RendezvousError::Protocol(format!(
                "rank {rank}'s connection vanished during the handshake"
            )));
        };
        tracing::debug!(rank = index, addr = %peer.addr, "rank joined the rendezvous");
        self.peers[index] = Some(peer);
        self.conn_ranks.insert(conn, index);
        Ok(())
    }

    fn first_missing(&self) -> usize {
        (1..self.world_size)
            .find(|&rank| self.peers[rank].is_none())
            .unwrap_or(0)
    }

    /// One all-gather: collects every rank's contribution, then sends the
    /// gathered vector to everyone.
    fn gather(
        &mut self,
        round: u64,
        bytes: &[u8],
        timeout: Duration,
    ) -> Result<Vec<Vec<u8>>, RendezvousError> {
        let deadline = deadline_after(timeout);
        let mut gathered: Vec<Option<Vec<u8>>> = vec![None; self.world_size];
        gathered[0] = Some(bytes.to_vec());
        let mut missing = self.world_size - 1;
        while missing > 0 {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                let rank = gathered.iter().position(Option::is_none).unwrap_or(0);
                return Err(RendezvousError::Timeout { rank, timeout });
            }
            let event = match self.events.recv_timeout(remaining) {
                Ok(event) => event,
                Err(RecvTimeoutError::Timeout) => continue,
                // Every reader has stopped, so every connection has ended
                // (each reports `Closed` before stopping, so this is rare).
                Err(RecvTimeoutError::Disconnected) => {
                    let rank = gathered.iter().position(Option::is_none).unwrap_or(0);
                    return Err(RendezvousError::PeerLost {
                        rank,
                        reason: "connection closed".to_string(),
                    });
                }
            };
            match event {
                Event::Contribution {
                    conn,
                    round: their_round,
                    bytes,
                } => {
                    let Some(&rank) = self.conn_ranks.get(&conn) else {
                        continue;
                    };
                    if their_round != round {
                        return Err(RendezvousError::Protocol(format!(
                            "rank {rank} sent its contribution to all-gather round {their_round} \
                             while rank 0 is in round {round}; every rank must call the same \
                             collective operations in the same order"
                        )));
                    }
                    if gathered[rank].is_some() {
                        return Err(RendezvousError::Protocol(format!(
                            "rank {rank} sent two contributions to all-gather round {round}"
                        )));
                    }
                    gathered[rank] = Some(bytes);
                    missing -= 1;
                }
                Event::Closed { conn, reason } => {
                    if let Some(&rank) = self.conn_ranks.get(&conn) {
                        return Err(RendezvousError::PeerLost { rank, reason });
                    }
                }
                Event::Malformed { conn, problem } => {
                    if let Some(&rank) = self.conn_ranks.get(&conn) {
                        return Err(RendezvousError::Protocol(format!(
                            "rank {rank} sent {problem}"
                        )));
                    }
                }
                // Late reports from connections closed at start-up.
                Event::Stray { .. } | Event::WrongVersion { .. } | Event::Hello { .. } => {}
            }
        }
        let gathered: Vec<Vec<u8>> = gathered
            .into_iter()
            .map(Option::unwrap_or_default)
            .collect();
        let message = encode_result(round, &gathered);
        for rank in 1..self.world_size {
            if let Some(peer) = &self.peers[rank] {
                write_all_by(&peer.stream, &message, deadline).map_err(|error| {
                    classify(error, rank, timeout, "sending the all-gather result")
                })?;
            }
        }
        Ok(gathered)
    }

    /// Tells every connected rank why the rendezvous ended and closes the
    /// sending side, so that they fail at once with the real cause.
    fn abort(&mut self, error: &RendezvousError) {
        let mut message = if self.welcomed {
            Vec::new()
        } else {
            reply_header()
        };
        message.extend_from_slice(&encode_abort(error));
        let limit = self.timeout.min(ABORT_WRITE_MAX);
        let peers = self.peers.iter().flatten().chain(self.pending.values());
        for peer in peers {
            // Best effort: the rank may be the one that is gone.
            let _ = write_all_by(&peer.stream, &message, deadline_after(limit));
            let _ = peer.stream.shutdown(Shutdown::Write);
        }
    }
}

impl Drop for Root {
    fn drop(&mut self) {
        // The reader threads hold clones of the sockets, so dropping the
        // streams here would not close the connections; shutting them down
        // does, and it wakes the readers so that they stop.
        let peers = self.peers.iter().flatten().chain(self.pending.values());
        for peer in peers {
            let _ = peer.stream.shutdown(Shutdown::Both);
        }
    }
}

fn encode_result(round: u64, gathered: &[Vec<u8>]) -> Vec<u8> {
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

/// A non-zero rank's side: one connection to rank 0.
struct Member {
    stream: TcpStream,
    world_size: usize,
}

impl Member {
    fn join(config: &TcpRendezvousConfig) -> Result<Member, RendezvousError> {
        let deadline = deadline_after(config.timeout);
        let timeout = config.timeout;
        let candidates = resolve(&config.addr, config.port)?;
        let stream = connect_with_retry(&candidates, deadline, timeout)?;
        let _ = stream.set_nodelay(true);
        let mut hello = MAGIC.to_vec();
        hello.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        hello.extend_from_slice(&(config.rank as u64).to_le_bytes());
        hello.extend_from_slice(&(config.world_size as u64).to_le_bytes());
        write_all_by(&stream, &hello, deadline)
            .map_err(|error| send_failure(&stream, error, deadline, timeout, true))?;

        let mut opening = [0u8; 12];
        read_exact_by(&stream, &mut opening, deadline)
            .map_err(|error| classify(error, 0, timeout, "reading rank 0's reply"))?;
        if opening[..8] != MAGIC {
            return Err(RendezvousError::Protocol(format!(
                "the process listening on {}:{} is not a linkreduce rendezvous (its reply does \
                 not start with the linkreduce magic); check MASTER_ADDR and MASTER_PORT",
                config.addr, config.port
            )));
        }
        let version = u32::from_le_bytes([opening[8], opening[9], opening[10], opening[11]]);
        if version != PROTOCOL_VERSION {
            return Err(RendezvousError::Protocol(format!(
                "rank 0 speaks rendezvous protocol version {version} but rank {} speaks version \
                 {PROTOCOL_VERSION}; run the same linkreduce build on every rank",
                config.rank
            )));
        }
        match read_u8_by(&stream, deadline)
            .map_err(|error| classify(error, 0, timeout, "reading rank 0's reply"))?
        {
            REPLY_WELCOME => {
                tracing::debug!(rank = config.rank, "joined the TCP rendezvous");
                Ok(Member {
                    stream,
                    world_size: config.world_size,
                })
            }
            REPLY_ABORT => Err(read_abort(&stream, deadline, timeout)),
            other => Err(RendezvousError::Protocol(format!(
                "rank 0 answered the hello with a message of unknown kind {other}"
            ))),
        }
    }

    fn exchange(
        &mut self,
        round: u64,
        bytes: &[u8],
        timeout: Duration,
    ) -> Result<Vec<Vec<u8>>, RendezvousError> {
        let deadline = deadline_after(timeout);
        let stream = &self.stream;
        let mut header = vec![FRAME_CONTRIBUTION];
        header.extend_from_slice(&round.to_le_bytes());
        header.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
        write_all_by(stream, &header, deadline)
            .and_then(|()| write_all_by(stream, bytes, deadline))
            .map_err(|error| send_failure(stream, error, deadline, timeout, false))?;

        let receiving = |error| classify(error, 0, timeout, "receiving the all-gather result");
        match read_u8_by(stream, deadline).map_err(receiving)? {
            REPLY_RESULT => {}
            REPLY_ABORT => return Err(read_abort(stream, deadline, timeout)),
            other => {
                return Err(RendezvousError::Protocol(format!(
                    "rank 0 sent a message of unknown kind {other} in round {round}"
                )))
            }
        }
        let their_round = read_u64_by(stream, deadline).map_err(receiving)?;
        if their_round != round {
            return Err(RendezvousError::Protocol(format!(
                "rank 0 sent the result of all-gather round {their_round} while this rank is in \
                 round {round}; every rank must call the same collective operations in the same \
                 order"
            )));
        }
        let count = read_u64_by(stream, deadline).map_err(receiving)?;
        if count != self.world_size as u64 {
            return Err(RendezvousError::Protocol(format!(
                "rank 0 sent {count} contributions for a world of {} ranks",
                self.world_size
            )));
        }
        let mut gathered = Vec::with_capacity(self.world_size);
        for rank in 0..self.world_size {
            let len = read_u64_by(stream, deadline).map_err(receiving)?;
            let Some(len) = checked_len(len, MAX_MESSAGE_BYTES) else {
                return Err(RendezvousError::Protocol(format!(
                    "rank 0 sent a contribution of rank {rank} of {len} bytes, more than the \
                     limit of {MAX_MESSAGE_BYTES}"
                )));
            };
            let mut contribution = vec![0u8; len];
            read_exact_by(stream, &mut contribution, deadline).map_err(receiving)?;
            gathered.push(contribution);
        }
        Ok(gathered)
    }

    /// Called after a failure. A timeout keeps the connection, so that rank 0
    /// (which knows which rank is really missing) reports that rank rather
    /// than this one; any other failure closes it, so that rank 0 and through
    /// it every rank fail at once instead of waiting for their timeouts.
    fn give_up(&mut self, error: &RendezvousError) {
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
    let error = classify(error, 0, timeout, "sending to rank 0");
    if !matches!(error, RendezvousError::PeerLost { .. }) {
        // A timeout or local failure: rank 0 may still be alive, and reading
        // could block.
        return error;
    }
    // The connection is gone, so these reads return at once: queued data,
    // then end of file or an error.
    if in_handshake {
        let mut opening = [0u8; 12];
        let opened = read_exact_by(stream, &mut opening, deadline).is_ok()
            && opening[..8] == MAGIC
            && opening[8..] == PROTOCOL_VERSION.to_le_bytes();
        if !opened {
            return error;
        }
    }
    match read_u8_by(stream, deadline) {
        Ok(REPLY_ABORT) => read_abort(stream, deadline, timeout),
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
