//! `linkreduce launch`: start N processes of a command as the ranks of one
//! job, setting the variables that `TcpRendezvousConfig::from_env` reads (the
//! ones torchrun sets), so multi-process jobs need no external launcher.

use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use linkreduce::{Error, Result};

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

/// How long output may stay idle after the ranks have exited before the
/// launcher stops waiting for it: a grandchild that outlived its rank (a
/// killed `sh` leaves its `sleep` running) keeps the pipe open forever.
const DRAIN_IDLE: Duration = Duration::from_secs(1);

pub fn run(args: Args) -> Result<ExitCode> {
    let Some((program, rest)) = args.command.split_first() else {
        return Err(Error::InvalidConfig(
            "no command given; usage: linkreduce launch -n N [--] CMD ARGS...".to_string(),
        ));
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
/// Returns 0 when every rank exits 0. When one fails, the others are killed
/// and its status is returned (128 + signal for a signal), so one crashed
/// rank never leaves its peers blocked at a rendezvous.
pub fn launch(
    ranks: usize,
    program: &OsStr,
    args: &[OsString],
    extra_env: &[(String, String)],
) -> Result<u8> {
    if ranks == 0 {
        return Err(Error::InvalidConfig(
            "-n 0: at least one rank must be started".to_string(),
        ));
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

    let forwarded = Arc::new(AtomicUsize::new(0));
    let mut children = Vec::with_capacity(ranks);
    let mut readers = Vec::with_capacity(2 * ranks);
    for rank in 0..ranks {
        if let Err(error) = start(
            rank,
            program,
            args,
            &env,
            &forwarded,
            &mut children,
            &mut readers,
        ) {
            stop(&mut children);
            return Err(error);
        }
    }

    let outcome = supervise(&mut children);
    drain(&readers, &forwarded);
    let Some((rank, status)) = outcome? else {
        return Ok(0);
    };
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

/// A port nobody listens on now. Rank 0 binds it moments later; the race with
/// other programs is the one torchrun accepts too.
fn free_port() -> Result<u16> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .map_err(|error| {
            Error::InvalidConfig(format!(
                "could not find a free port for MASTER_PORT ({error}); pass --master-port"
            ))
        })
}

/// Spawns one rank and its two output readers. The child is pushed into
/// `children` before the readers start, so that a failure here still lets
/// the caller kill it.
fn start(
    rank: usize,
    program: &OsStr,
    args: &[OsString],
    env: &[(String, String)],
    forwarded: &Arc<AtomicUsize>,
    children: &mut Vec<Option<Child>>,
    readers: &mut Vec<JoinHandle<()>>,
) -> Result<()> {
    let mut command = Command::new(program);
    command
        .args(args)
        .env("RANK", rank.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .envs(env.iter().map(|(name, value)| (name, value)))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().map_err(|error| {
        Error::InvalidConfig(format!(
            "could not start `{}` for rank {rank}: {error}",
            program.to_string_lossy()
        ))
    })?;
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    children.push(Some(child));
    if let Some(pipe) = stdout {
        readers.push(spawn_reader(
            rank,
            "stdout",
            pipe,
            std::io::stdout(),
            forwarded,
        )?);
    }
    if let Some(pipe) = stderr {
        readers.push(spawn_reader(
            rank,
            "stderr",
            pipe,
            std::io::stderr(),
            forwarded,
        )?);
    }
    Ok(())
}

fn spawn_reader(
    rank: usize,
    stream: &str,
    pipe: impl Read + Send + 'static,
    sink: impl Write + Send + 'static,
    forwarded: &Arc<AtomicUsize>,
) -> Result<JoinHandle<()>> {
    let forwarded = Arc::clone(forwarded);
    thread::Builder::new()
        .name(format!("rank{rank}-{stream}"))
        .spawn(move || forward(rank, pipe, sink, &forwarded))
        .map_err(|error| {
            Error::InvalidConfig(format!(
                "could not start a thread to read rank {rank}'s {stream}: {error}"
            ))
        })
}

/// Copies `pipe` to `sink` a line at a time. Each line goes out in one
/// `write_all`, which holds the stream's lock, so ranks never interleave
/// mid-line. Write errors (a closed terminal) are ignored so the pipe keeps
/// draining and the child never blocks on a full pipe.
fn forward(rank: usize, pipe: impl Read, mut sink: impl Write, forwarded: &AtomicUsize) {
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
        forwarded.fetch_add(1, Ordering::Relaxed);
    }
}

/// Waits for every rank. Returns the first rank that failed and its status,
/// after killing the others, or `None` when all exited successfully.
fn supervise(children: &mut [Option<Child>]) -> Result<Option<(usize, ExitStatus)>> {
    let outcome = 'poll: loop {
        let mut running = false;
        for (rank, slot) in children.iter_mut().enumerate() {
            let Some(child) = slot else { continue };
            match child.try_wait() {
                Ok(None) => running = true,
                Ok(Some(status)) => {
                    *slot = None;
                    if !status.success() {
                        break 'poll Ok(Some((rank, status)));
                    }
                }
                Err(error) => {
                    break 'poll Err(Error::InvalidConfig(format!(
                        "could not check on rank {rank}: {error}"
                    )))
                }
            }
        }
        if !running {
            break Ok(None);
        }
        thread::sleep(POLL);
    };
    stop(children);
    outcome
}

/// Kills and reaps every rank still running.
fn stop(children: &mut [Option<Child>]) {
    for mut child in children.iter_mut().filter_map(Option::take) {
        // Either call fails only when the child has already exited and been
        // reaped, which is the state wanted here.
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Waits until every reader has hit end of file, or output has been idle for
/// `DRAIN_IDLE`: the ranks are gone, so idle pipes are held only by
/// processes they left behind.
fn drain(readers: &[JoinHandle<()>], forwarded: &AtomicUsize) {
    let mut seen = forwarded.load(Ordering::Relaxed);
    let mut idle_since = Instant::now();
    while !readers.iter().all(JoinHandle::is_finished) {
        let now = forwarded.load(Ordering::Relaxed);
        if now != seen {
            seen = now;
            idle_since = Instant::now();
        } else if idle_since.elapsed() >= DRAIN_IDLE {
            return;
        }
        thread::sleep(POLL);
    }
}

/// The shell's convention: the exit code itself, or 128 + the signal.
fn exit_code(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(code), _) => u8::try_from(code).unwrap_or(1),
        (None, Some(signal)) => u8::try_from(128 + signal).unwrap_or(255),
        (None, None) => 1,
    }
}
