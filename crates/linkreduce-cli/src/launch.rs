//! `linkreduce launch`: start N processes of a command as the ranks of one
//! job, setting the variables that `TcpRendezvousConfig::from_env` reads (the
//! ones torchrun sets), so multi-process jobs need no external launcher.
//!
//! Every rank leads a process group of its own, so that stopping a rank
//! reaches whatever it started (a shell's children, a worker pool). The
//! ranks are therefore outside the terminal's foreground group and do not
//! see its Ctrl-C: the launcher catches SIGINT and SIGTERM and stops the
//! groups itself, and the kernel kills every rank if the launcher dies
//! without doing so (SIGKILL).
//!
//! System calls go through `nix`, except two it cannot express: `waitid`
//! without reaping for a rank a real-time signal killed (nix's status has no
//! such signal), and reading a signal's disposition without changing it.

use std::ffi::{OsStr, OsString};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::mem;
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::ptr;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread;
use std::time::{Duration, Instant};

use libc::c_int;
use nix::sys::signal::{self, killpg, SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::unistd::Pid;

use crate::error::{CliError, Result};

#[derive(clap::Args)]
pub struct Args {
    /// Number of processes (ranks) to start.
    #[arg(short = 'n', long)]
    ranks: usize,
    /// Host of rank 0's rendezvous listener, passed as MASTER_ADDR.
    #[arg(long, default_value = "127.0.0.1")]
    master_addr: String,
    /// Port of rank 0's rendezvous listener, passed as MASTER_PORT
    /// (default: a port that is free on loopback when the job starts).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    master_port: Option<u16>,
    /// The command every rank runs, with its arguments (`--` before it is
    /// optional).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
    command: Vec<OsString>,
}

/// How often children are polled: short enough that a failure stops the
/// other ranks promptly, long enough to cost nothing.
const POLL: Duration = Duration::from_millis(20);

/// How long a rank's process group has between SIGTERM and SIGKILL: time to
/// flush output and let go of what it holds (a rendezvous port, files being
/// written), short enough that Ctrl-C or a crashed peer still ends the job
/// within seconds when a rank ignores or is slow to act on SIGTERM.
const TERM_GRACE: Duration = Duration::from_secs(3);

/// How long ranks get to be reaped after SIGKILL. A process in
/// uninterruptible sleep (stuck in a driver call) can outlast SIGKILL; the
/// launcher leaves it to init rather than hang.
const KILL_WAIT: Duration = Duration::from_secs(1);

/// How long the output readers may take once every rank's group is gone.
/// Every writer is dead by then, so what is left is at most a pipe buffer per
/// stream and the readers reach end of file within milliseconds. Only a
/// process that left its rank's group (`setsid`) can still hold a pipe open,
/// and the launcher must not wait for that.
const DRAIN_LIMIT: Duration = Duration::from_secs(2);

pub fn run(args: Args) -> Result<ExitCode> {
    let Some((program, rest)) = args.command.split_first() else {
        return Err(CliError::BadArgument {
            arg: "COMMAND".into(),
            problem: "no command given; usage: linkreduce launch -n N [--] CMD ARGS...".into(),
        });
    };
    let mut env = vec![("MASTER_ADDR".to_string(), args.master_addr)];
    if let Some(port) = args.master_port {
        env.push(("MASTER_PORT".to_string(), port.to_string()));
    }
    launch(args.ranks, program, rest, &env).map(ExitCode::from)
}

/// Runs `program args` as `ranks` processes with RANK, WORLD_SIZE,
/// LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR (127.0.0.1) and MASTER_PORT (a
/// free loopback port) set, forwarding their output line by line with a
/// `[rank i] ` prefix. `extra_env` is applied last, so it can override
/// MASTER_ADDR or MASTER_PORT; no free port is looked for when it sets one.
///
/// Returns 0 when every rank exits 0. When one fails, the others are stopped
/// and its status is returned (128 + signal for a signal), so one crashed
/// rank never leaves its peers blocked at a rendezvous. Either way, what the
/// ranks left running in their process groups is stopped before returning.
///
/// While it runs, SIGINT and SIGTERM (unless ignored when it is called) stop
/// every rank and then return [`CliError::Interrupted`], with which `main`
/// ends this process with status 128 + the signal, as the signal itself
/// would have; the previous handlers are restored on return. One launch at
/// a time per process: the handlers are global.
pub fn launch(
    ranks: usize,
    program: &OsStr,
    args: &[OsString],
    extra_env: &[(String, String)],
) -> Result<u8> {
    if ranks == 0 {
        return Err(CliError::BadArgument {
            arg: "-n 0".into(),
            problem: "at least one rank must be started".into(),
        });
    }
    let mut env = vec![
        ("WORLD_SIZE".to_string(), ranks.to_string()),
        ("LOCAL_WORLD_SIZE".to_string(), ranks.to_string()),
        ("MASTER_ADDR".to_string(), "127.0.0.1".to_string()),
    ];
    if !extra_env.iter().any(|(name, _)| name == "MASTER_PORT") {
        env.push(("MASTER_PORT".to_string(), free_port()?.to_string()));
    }
    env.extend_from_slice(extra_env);

    // Before any rank exists, so that no signal can end the launcher and
    // leave ranks running.
    let signals = SignalWatch::install()?;
    // Every reader owns a clone of `reader_alive` and drops it at end of
    // file; `readers_done` then reports disconnection. Nothing is sent.
    let (reader_alive, readers_done) = mpsc::channel();
    let mut children = Vec::with_capacity(ranks);
    let started = (0..ranks)
        .try_for_each(|rank| start(rank, program, args, &env, &reader_alive, &mut children));
    drop(reader_alive);
    let outcome = started.and_then(|()| supervise(&children));
    stop(&mut children);
    drain(&readers_done);
    drop(signals);

    match outcome? {
        Outcome::Succeeded => Ok(0),
        Outcome::Failed { rank, status } => {
            let code = exit_code(status);
            let detail = match status.signal() {
                Some(signal) => format!("{code} (signal {signal})"),
                None => code.to_string(),
            };
            eprintln!(
                "linkreduce launch: rank {rank} exited with status {detail}; stopped the other ranks"
            );
            Ok(code)
        }
        // The caller asked the whole program to stop, not this job: the
        // error goes up through any caller that starts one job per world
        // size, and `main` exits with 128 + the signal.
        Outcome::Signalled(signal) => Err(CliError::Interrupted { signal }),
    }
}

/// A port nobody listens on now. Rank 0 binds it moments later; the race with
/// other programs is the one torchrun accepts too.
fn free_port() -> Result<u16> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .map_err(CliError::NoFreePort)
}

/// Spawns one rank, leading a process group of its own, and its two output
/// readers. The child is pushed into `children` before the readers start,
/// so that a failure here still lets the caller stop it.
fn start(
    rank: usize,
    program: &OsStr,
    args: &[OsString],
    env: &[(String, String)],
    reader_alive: &Sender<()>,
    children: &mut Vec<Child>,
) -> Result<()> {
    let mut command = Command::new(program);
    command
        .args(args)
        .env("RANK", rank.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .envs(env.iter().map(|(name, value)| (name, value)))
        // Outside the terminal's foreground group a read from the terminal
        // would stop the rank (SIGTTIN) and hang the job; ranks take no
        // input.
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    #[cfg(target_os = "linux")]
    {
        let parent = std::process::id();
        // SAFETY: the closure runs in the forked child before exec, where
        // only async-signal-safe calls are allowed: it makes two system
        // calls (prctl, getppid) through nix's thin wrappers, and allocates
        // nothing (its errors are plain errno values).
        unsafe {
            command.pre_exec(move || die_with_parent(parent));
        }
    }
    let mut child = command.spawn().map_err(|source| CliError::Spawn {
        program: program.to_string_lossy().into_owned(),
        rank,
        source,
    })?;
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    children.push(child);
    if let Some(pipe) = stdout {
        spawn_reader(rank, "stdout", pipe, std::io::stdout(), reader_alive)?;
    }
    if let Some(pipe) = stderr {
        spawn_reader(rank, "stderr", pipe, std::io::stderr(), reader_alive)?;
    }
    Ok(())
}

/// In a new rank before exec: asks the kernel for SIGKILL when the thread
/// that started the rank ends (the thread, not the process: `launch`'s
/// caller, which stays in `launch` until the ranks are reaped), then makes
/// sure the launcher did not already die before the request was made.
/// Async-signal-safe: system calls only, errors without allocation.
#[cfg(target_os = "linux")]
fn die_with_parent(parent: u32) -> io::Result<()> {
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
    if u32::try_from(nix::unistd::getppid().as_raw()) != Ok(parent) {
        // Reparented: the launcher is gone, and exec must not happen.
        return Err(nix::errno::Errno::ESRCH.into());
    }
    Ok(())
}

fn spawn_reader(
    rank: usize,
    stream: &str,
    pipe: impl Read + Send + 'static,
    sink: impl Write + Send + 'static,
    reader_alive: &Sender<()>,
) -> Result<()> {
    let alive = reader_alive.clone();
    thread::Builder::new()
        .name(format!("rank{rank}-{stream}"))
        .spawn(move || {
            forward(rank, pipe, sink);
            drop(alive);
        })
        .map(drop)
        .map_err(|source| CliError::Launch {
            what: format!("start a thread to read rank {rank}'s {stream}"),
            source,
        })
}

/// Copies `pipe` to `sink` a line at a time. Each line goes out in one
/// `write_all`, which holds the stream's lock, so ranks never interleave
/// mid-line. Write errors (a closed terminal) are ignored so the pipe keeps
/// draining and the child never blocks on a full pipe.
fn forward(rank: usize, pipe: impl Read, mut sink: impl Write) {
    let mut pipe = BufReader::new(pipe);
    let mut line = Vec::new();
    loop {
        line.clear();
        match pipe.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let text = line.strip_suffix(b"\n").unwrap_or(&line);
        let out = format!("[rank {rank}] {}\n", String::from_utf8_lossy(text));
        let _ = sink.write_all(out.as_bytes()).and_then(|()| sink.flush());
    }
}

enum Outcome {
    Succeeded,
    Failed { rank: usize, status: ExitStatus },
    Signalled(c_int),
}

/// Waits until every rank has exited successfully, one has failed, or the
/// launcher got SIGINT or SIGTERM. Ranks are not reaped here (see
/// [`exit_status`]); [`stop`] does that after stopping their groups.
fn supervise(children: &[Child]) -> Result<Outcome> {
    let mut exited = vec![false; children.len()];
    loop {
        let signal = RECEIVED.load(Ordering::SeqCst);
        if signal != 0 {
            return Ok(Outcome::Signalled(signal));
        }
        for (rank, child) in children.iter().enumerate() {
            if exited[rank] {
                continue;
            }
            let status = exit_status(child).map_err(|source| CliError::Launch {
                what: format!("check on rank {rank}"),
                source,
            })?;
            if let Some(status) = status {
                exited[rank] = true;
                if !status.success() {
                    return Ok(Outcome::Failed { rank, status });
                }
            }
        }
        if exited.iter().all(|&exited| exited) {
            return Ok(Outcome::Succeeded);
        }
        thread::sleep(POLL);
    }
}

/// The status of a rank that has exited, without reaping it: an unreaped
/// rank keeps its pid, which is also its group's id, from being reused, so
/// that [`stop`] can signal the group however long ago the rank exited.
///
/// Raw `waitid` rather than nix's: nix turns the status into a `Signal`,
/// which has no real-time signals, so a rank killed by one would be an
/// error instead of status 128 + its number.
fn exit_status(child: &Child) -> io::Result<Option<ExitStatus>> {
    // SAFETY: all-zero bytes are a valid siginfo_t (a plain C struct).
    let mut info: libc::siginfo_t = unsafe { mem::zeroed() };
    let options = libc::WEXITED | libc::WNOHANG | libc::WNOWAIT;
    // SAFETY: `info` is valid for writes for the duration of the call.
    if unsafe { libc::waitid(libc::P_PID, child.id(), &mut info, options) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: waitid returned 0, so `info` holds either a child's state
    // change (whose si_pid and si_status are set) or zeroes (no change).
    let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
    let raw = match info.si_code {
        _ if pid == 0 => return Ok(None),
        libc::CLD_EXITED => (status & 0xff) << 8,
        libc::CLD_KILLED => status,
        libc::CLD_DUMPED => status | 0x80,
        _ => return Ok(None),
    };
    Ok(Some(ExitStatus::from_raw(raw)))
}

/// Stops every rank's process group and reaps the ranks: SIGTERM (with
/// SIGCONT, so that a stopped process acts on it) to the groups that have a
/// live process, then SIGKILL to those that still have one after
/// [`TERM_GRACE`]. After a job that succeeded this only ends what the ranks
/// left running.
///
/// A group's id is its leader's pid, which the kernel does not hand out
/// again while the leader is unreaped. Ranks stay unreaped until every
/// signal has been sent, so no signal can reach a stranger's group.
fn stop(children: &mut [Child]) {
    // Pids fit pid_t: the kernel's limit is 2^22.
    let groups: Vec<Pid> = children
        .iter()
        .map(|child| Pid::from_raw(child.id() as libc::pid_t))
        .collect();
    let mut live = live_groups(&groups);
    for &group in &live {
        signal_group(group, Signal::SIGTERM);
        signal_group(group, Signal::SIGCONT);
    }
    let deadline = Instant::now() + TERM_GRACE;
    while !live.is_empty() && Instant::now() < deadline {
        thread::sleep(POLL);
        live = live_groups(&live);
    }
    for &group in &live {
        signal_group(group, Signal::SIGKILL);
    }
    let mut unreaped: Vec<&mut Child> = children.iter_mut().collect();
    let deadline = Instant::now() + KILL_WAIT;
    loop {
        // try_wait fails only when the child is already reaped: done too.
        unreaped.retain_mut(|child| matches!(child.try_wait(), Ok(None)));
        if unreaped.is_empty() || Instant::now() >= deadline {
            break;
        }
        thread::sleep(POLL);
    }
}

/// The groups among `groups` that have a process which has not exited.
/// Zombies do not count: they hold nothing, and one whose parent died waits
/// for init, which in a container may never reap it. Without /proc, a group
/// counts while it has any process, zombies included.
fn live_groups(groups: &[Pid]) -> Vec<Pid> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return groups
            .iter()
            .copied()
            .filter(|&group| signal_group(group, None))
            .collect();
    };
    let mut live = Vec::new();
    for entry in entries.flatten() {
        let is_pid = entry
            .file_name()
            .to_str()
            .is_some_and(|name| !name.is_empty() && name.bytes().all(|byte| byte.is_ascii_digit()));
        if !is_pid {
            continue;
        }
        // A process that exits meanwhile has no stat to read: not live.
        let Ok(stat) = std::fs::read(entry.path().join("stat")) else {
            continue;
        };
        if let Some((state, group)) = state_and_group(&stat) {
            if !matches!(state, b'Z' | b'X') && groups.contains(&group) && !live.contains(&group) {
                live.push(group);
            }
        }
    }
    live
}

/// The state and process group in a `/proc/PID/stat` line, `PID (COMM)
/// STATE PPID PGRP ...`. COMM may hold spaces, parentheses or bytes that
/// are not UTF-8, so fields are counted from its last `)`.
fn state_and_group(stat: &[u8]) -> Option<(u8, Pid)> {
    let close = stat.iter().rposition(|&byte| byte == b')')?;
    let rest = std::str::from_utf8(&stat[close + 1..]).ok()?;
    let mut fields = rest.split_ascii_whitespace();
    let state = *fields.next()?.as_bytes().first()?;
    let _parent = fields.next()?;
    let group = fields.next()?.parse().ok()?;
    Some((state, Pid::from_raw(group)))
}

/// Sends `signal` to every process of `group` (None: only checks that the
/// group has a process). False when that failed.
fn signal_group(group: Pid, signal: impl Into<Option<Signal>>) -> bool {
    killpg(group, signal).is_ok()
}

/// Waits, at most [`DRAIN_LIMIT`], for every reader to reach end of file,
/// which happens once the ranks' groups are gone.
fn drain(readers_done: &Receiver<()>) {
    // Nothing is ever sent: this returns when the last reader drops its
    // sender, or at the limit.
    let _ = readers_done.recv_timeout(DRAIN_LIMIT);
}

/// The last SIGINT or SIGTERM received while a [`SignalWatch`] is
/// installed, or 0.
static RECEIVED: AtomicI32 = AtomicI32::new(0);

extern "C" fn record_signal(signal: c_int) {
    // A lock-free atomic store is async-signal-safe.
    RECEIVED.store(signal, Ordering::SeqCst);
}

/// Records SIGINT and SIGTERM in [`RECEIVED`] for as long as it lives and
/// restores the previous dispositions when dropped. A signal the process
/// ignores stays ignored (a non-interactive shell starts background jobs
/// with SIGINT ignored), and the ranks inherit that as before.
struct SignalWatch {
    previous: Vec<(Signal, SigAction)>,
}

impl SignalWatch {
    fn install() -> Result<SignalWatch> {
        RECEIVED.store(0, Ordering::SeqCst);
        // Reads and sleeps interrupted by the signal resume.
        let ours = SigAction::new(
            SigHandler::Handler(record_signal),
            SaFlags::SA_RESTART,
            SigSet::empty(),
        );
        let mut watch = SignalWatch {
            previous: Vec::new(),
        };
        for signal in [Signal::SIGINT, Signal::SIGTERM] {
            let failed = |source: io::Error| CliError::Launch {
                what: format!("handle {signal}"),
                source,
            };
            if is_ignored(signal).map_err(failed)? {
                continue;
            }
            let previous = set_action(signal, &ours)
                .map_err(io::Error::from)
                .map_err(failed)?;
            watch.previous.push((signal, previous));
        }
        Ok(watch)
    }
}

impl Drop for SignalWatch {
    fn drop(&mut self) {
        for (signal, previous) in &self.previous {
            let _ = set_action(*signal, previous);
        }
    }
}

/// Sets the disposition of `signal` to `action` and returns the one before.
fn set_action(signal: Signal, action: &SigAction) -> nix::Result<SigAction> {
    // SAFETY: the actions installed are `record_signal`, which only stores
    // to a lock-free atomic (async-signal-safe), and dispositions that
    // `sigaction` returned earlier, put back as they were.
    unsafe { signal::sigaction(signal, action) }
}

/// Whether `signal` is ignored (SIG_IGN). nix's `sigaction` always sets a
/// new disposition; reading one without changing it, even for a moment,
/// takes libc's with a null new action.
fn is_ignored(signal: Signal) -> io::Result<bool> {
    // SAFETY: all-zero bytes are a valid sigaction: SIG_DFL, an empty mask,
    // no flags. A null new action only reads the current one into `current`,
    // which is valid for writes for the duration of the call.
    let current = unsafe {
        let mut current: libc::sigaction = mem::zeroed();
        if libc::sigaction(signal as c_int, ptr::null(), &mut current) != 0 {
            return Err(io::Error::last_os_error());
        }
        current
    };
    Ok(current.sa_sigaction == libc::SIG_IGN)
}

/// The shell's convention: the exit code itself, or 128 + the signal.
fn exit_code(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(code), _) => u8::try_from(code).unwrap_or(1),
        (None, Some(signal)) => u8::try_from(128 + signal).unwrap_or(255),
        (None, None) => 1,
    }
}
