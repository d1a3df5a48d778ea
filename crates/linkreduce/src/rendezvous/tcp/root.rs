//! Rank 0's side of the TCP rendezvous: it accepts one connection per other
//! rank, gathers every round's contributions and sends the result back, and
//! on a failure tells every rank why.

use std::collections::HashMap;
use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use super::config::{resolve, TcpRendezvousConfig};
use super::wire::{
    self, Contribution, FrameError, Hello, OpeningError, MAX_MESSAGE_BYTES, PROTOCOL_VERSION,
};
use crate::rendezvous::RendezvousError;

/// How long rank 0 waits for events between polls of its (non-blocking)
/// listener while ranks join. std has no way to wait on a listener and a
/// channel at once, and a few milliseconds of join latency do not matter.
const ACCEPT_POLL: Duration = Duration::from_millis(5);

/// Longest time rank 0 spends writing an `ABORT` message to one rank. The
/// message is small and normally fits the socket buffer; a rank that does not
/// read must not delay telling the others.
const ABORT_WRITE_MAX: Duration = Duration::from_secs(1);

/// What a connection's reader thread on rank 0 reports.
enum Event {
    /// Not a linkreduce rank: wrong magic, or closed before a whole hello.
    Stray {
        conn: u64,
        reason: String,
    },
    /// A linkreduce rank of another protocol version.
    WrongVersion {
        conn: u64,
        version: u32,
    },
    Hello {
        conn: u64,
        hello: Hello,
    },
    Contribution {
        conn: u64,
        contribution: Contribution,
    },
    /// A frame that breaks the protocol; the reader stops.
    Malformed {
        conn: u64,
        problem: String,
    },
    /// The connection ended (EOF or error); the reader stops.
    Closed {
        conn: u64,
        reason: String,
    },
}

/// Reads one connection on rank 0 until it ends, forwarding what arrives.
///
/// One thread per connection because std cannot wait on several sockets at
/// once, and rank 0 must notice a rank that disconnects while it is still
/// waiting for another. The reads have no timeout: a rank may legitimately be
/// idle for a long time between operations, and deadlines are enforced by the
/// operation waiting on the channel.
fn read_connection(conn: u64, mut stream: TcpStream, events: Sender<Event>) {
    let ended = |error: io::Error| {
        if error.kind() == io::ErrorKind::UnexpectedEof {
            "connection closed".to_string()
        } else {
            error.to_string()
        }
    };
    if let Err(error) = wire::read_opening(&mut stream) {
        let _ = events.send(match error {
            OpeningError::Io(error) => Event::Stray {
                conn,
                reason: format!("no hello: {}", ended(error)),
            },
            OpeningError::NotLinkreduce => Event::Stray {
                conn,
                reason: "the hello does not start with the linkreduce magic".to_string(),
            },
            OpeningError::Version(version) => Event::WrongVersion { conn, version },
        });
        return;
    }
    let hello = match wire::read_hello_body(&mut stream) {
        Ok(hello) => hello,
        Err(error) => {
            let _ = events.send(Event::Stray {
                conn,
                reason: format!("incomplete hello: {}", ended(error)),
            });
            return;
        }
    };
    if events.send(Event::Hello { conn, hello }).is_err() {
        return;
    }
    loop {
        let event = match wire::read_contribution(&mut stream) {
            Ok(contribution) => Event::Contribution { conn, contribution },
            Err(FrameError::Io(error)) => Event::Closed {
                conn,
                reason: ended(error),
            },
            Err(FrameError::UnknownKind(kind)) => Event::Malformed {
                conn,
                problem: format!("a frame of unknown kind {kind}"),
            },
            Err(FrameError::TooLong(len)) => Event::Malformed {
                conn,
                problem: format!(
                    "a contribution of {len} bytes, more than the limit of {MAX_MESSAGE_BYTES}"
                ),
            },
        };
        // Anything but a contribution is the connection's last event.
        let last = !matches!(event, Event::Contribution { .. });
        if events.send(event).is_err() || last {
            return;
        }
    }
}

/// A rank connected to rank 0.
struct Peer {
    stream: TcpStream,
    addr: SocketAddr,
}

/// Rank 0's side: one connection per other rank, read by one thread each.
pub(super) struct Root {
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
    pub(super) fn accept_group(
        listener: TcpListener,
        config: &TcpRendezvousConfig,
    ) -> Result<Root, RendezvousError> {
        let deadline = wire::deadline_after(config.timeout);
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
        let welcome = wire::encode_welcome();
        let write_deadline = wire::deadline_after(config.timeout);
        for rank in 1..root.world_size {
            let sent = match &root.peers[rank] {
                Some(peer) => wire::write_all_by(&peer.stream, &welcome, write_deadline)
                    .map_err(|error| wire::classify(error, rank, root.timeout, "welcoming")),
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
            Event::Hello { conn, hello } => self.admit(conn, hello, local).map(|()| true),
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
    fn admit(&mut self, conn: u64, hello: Hello, local: &str) -> Result<(), RendezvousError> {
        let Hello { rank, world_size } = hello;
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
    pub(super) fn gather(
        &mut self,
        round: u64,
        bytes: &[u8],
        timeout: Duration,
    ) -> Result<Vec<Vec<u8>>, RendezvousError> {
        let deadline = wire::deadline_after(timeout);
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
                Event::Contribution { conn, contribution } => {
                    let Some(&rank) = self.conn_ranks.get(&conn) else {
                        continue;
                    };
                    let Contribution {
                        round: their_round,
                        bytes,
                    } = contribution;
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
        let message = wire::encode_result(round, &gathered);
        for rank in 1..self.world_size {
            if let Some(peer) = &self.peers[rank] {
                wire::write_all_by(&peer.stream, &message, deadline).map_err(|error| {
                    wire::classify(error, rank, timeout, "sending the all-gather result")
                })?;
            }
        }
        Ok(gathered)
    }

    /// Tells every connected rank why the rendezvous ended and closes the
    /// sending side, so that they fail at once with the real cause.
    pub(super) fn abort(&mut self, error: &RendezvousError) {
        let mut message = if self.welcomed {
            Vec::new()
        } else {
            wire::encode_opening()
        };
        message.extend_from_slice(&wire::encode_abort(error));
        let limit = self.timeout.min(ABORT_WRITE_MAX);
        let peers = self.peers.iter().flatten().chain(self.pending.values());
        for peer in peers {
            // Best effort: the rank may be the one that is gone.
            let _ = wire::write_all_by(&peer.stream, &message, wire::deadline_after(limit));
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

/// Binds rank 0's listener, turning the usual mistakes into configuration
/// errors that say what to change.
pub(super) fn bind(addr: &str, port: u16) -> Result<TcpListener, RendezvousError> {
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
