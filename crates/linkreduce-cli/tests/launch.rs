//! `linkreduce launch` run as a real process, with `sh -c` scripts as ranks:
//! no GPU needed. Tests about stopping ranks have each rank write its pid
//! (and its children's) to a temporary folder, then check through /proc
//! that none of those processes is left.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// The binary under test: cargo's, or LINKREDUCE_BIN where test binaries
/// run away from the build tree (the GPU machine's staged copies).
fn launcher(args: &[&str]) -> Command {
    let binary = std::env::var_os("LINKREDUCE_BIN")
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_linkreduce").into());
    let mut command = Command::new(binary);
    command.arg("launch").args(args);
    command
}

fn launch(args: &[&str]) -> Output {
    launcher(args).output().expect("run linkreduce")
}

/// A folder the ranks write pid files to (its path is in $PIDS). Dropping it
/// kills whatever those files name that still runs, so a failing test
/// leaves nothing behind, and removes the folder.
struct PidDir(PathBuf);

impl PidDir {
    fn new() -> PidDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "linkreduce-launch-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).expect("create a temporary folder");
        PidDir(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    /// The pids written so far, by file name. A file still being written
    /// is left out.
    fn pids(&self) -> Vec<(String, i32)> {
        let mut pids: Vec<(String, i32)> = std::fs::read_dir(&self.0)
            .expect("read the pid folder")
            .flatten()
            .filter_map(|entry| {
                let pid = std::fs::read_to_string(entry.path()).ok()?;
                let pid = pid.trim().parse().ok()?;
                Some((entry.file_name().to_string_lossy().into_owned(), pid))
            })
            .collect();
        pids.sort();
        pids
    }

    /// Waits until `count` pids have been written.
    fn wait_for(&self, count: usize) -> Vec<(String, i32)> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let pids = self.pids();
            if pids.len() >= count {
                return pids;
            }
            assert!(
                Instant::now() < deadline,
                "only {pids:?} of {count} pids were written"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Asserts that every pid written is gone within a few seconds.
    fn assert_all_gone(&self, expected: usize) {
        let pids = self.pids();
        assert_eq!(pids.len(), expected, "pid files: {pids:?}");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let left: Vec<_> = pids.iter().filter(|(_, pid)| running(*pid)).collect();
            if left.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "still running after the launcher exited: {left:?}"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for PidDir {
    fn drop(&mut self) {
        for (_, pid) in self.pids() {
            if running(pid) {
                // SAFETY: kill takes two integers; the pid is one of this
                // test's processes, checked alive just now.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Whether `pid` is a process that has not exited: zombies are gone for
/// this purpose (their parent may be an init that is slow to reap them).
fn running(pid: i32) -> bool {
    let Ok(stat) = std::fs::read(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let close = stat.iter().rposition(|&byte| byte == b')').unwrap_or(0);
    let state = stat[close + 1..]
        .iter()
        .find(|byte| !byte.is_ascii_whitespace());
    !matches!(state, Some(b'Z' | b'X') | None)
}

/// A launcher started in the background, killed (SIGKILL) if the test ends
/// while it runs.
struct Running(Child);

impl Running {
    /// Starts the launcher with SIGINT's disposition `sigint` (SIG_DFL or
    /// SIG_IGN), whatever the test runner's is: a background job of a
    /// non-interactive shell inherits SIGINT ignored.
    fn start(args: &[&str], pids: &PidDir, sigint: libc::sighandler_t) -> Running {
        let mut command = launcher(args);
        // SAFETY: between fork and exec only signal() runs, which is
        // async-signal-safe.
        unsafe {
            command.pre_exec(move || {
                libc::signal(libc::SIGINT, sigint);
                libc::signal(libc::SIGTERM, libc::SIG_DFL);
                Ok(())
            });
        }
        let child = command
            .env("PIDS", pids.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start linkreduce");
        Running(child)
    }

    fn signal(&self, signal: libc::c_int) {
        let pid = i32::try_from(self.0.id()).expect("pid fits i32");
        // SAFETY: kill takes two integers; the pid is the launcher, which
        // this test started and has not reaped.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
    }

    fn is_running(&mut self) -> bool {
        matches!(self.0.try_wait(), Ok(None))
    }

    /// Waits, at most 10 s, for the launcher to exit; returns its output.
    fn finish(mut self) -> Output {
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(status) = self.0.try_wait().expect("wait for linkreduce") {
                break status;
            }
            assert!(Instant::now() < deadline, "the launcher did not exit");
            thread::sleep(Duration::from_millis(20));
        };
        let mut output = Output {
            status,
            stdout: Vec::new(),
            stderr: Vec::new(),
        };
        if let Some(mut pipe) = self.0.stdout.take() {
            pipe.read_to_end(&mut output.stdout).expect("read stdout");
        }
        if let Some(mut pipe) = self.0.stderr.take() {
            pipe.read_to_end(&mut output.stderr).expect("read stderr");
        }
        output
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

const ECHO_ENV: &str = "echo \"rank=$RANK world=$WORLD_SIZE local=$LOCAL_RANK/$LOCAL_WORLD_SIZE \
                        addr=$MASTER_ADDR port=$MASTER_PORT\"";

#[test]
fn every_rank_gets_its_environment_and_prefix() {
    let output = launch(&["-n", "2", "--", "sh", "-c", ECHO_ENV]);
    assert!(output.status.success(), "{output:?}");
    let text = stdout(&output);
    let mut ports = Vec::new();
    for rank in 0..2 {
        let prefix =
            format!("[rank {rank}] rank={rank} world=2 local={rank}/2 addr=127.0.0.1 port=");
        let line = text
            .lines()
            .find(|line| line.starts_with(&prefix))
            .unwrap_or_else(|| panic!("no line starting {prefix:?} in {text:?}"));
        let port: u16 = line[prefix.len()..].parse().expect("MASTER_PORT is a port");
        assert_ne!(port, 0);
        ports.push(port);
    }
    assert_eq!(ports[0], ports[1], "ranks must share one MASTER_PORT");
}

#[test]
fn master_options_are_passed_and_separator_is_optional() {
    let output = launch(&[
        "--master-addr",
        "10.1.2.3",
        "--master-port",
        "29555",
        "-n",
        "1",
        "sh",
        "-c",
        ECHO_ENV,
    ]);
    assert!(output.status.success(), "{output:?}");
    assert_eq!(
        stdout(&output),
        "[rank 0] rank=0 world=1 local=0/1 addr=10.1.2.3 port=29555\n"
    );
}

#[test]
fn stderr_lines_are_prefixed_and_stay_on_stderr() {
    let output = launch(&["-n", "2", "--", "sh", "-c", "echo \"oops $RANK\" >&2"]);
    assert!(output.status.success(), "{output:?}");
    let text = stderr(&output);
    assert!(text.contains("[rank 0] oops 0\n"), "{text:?}");
    assert!(text.contains("[rank 1] oops 1\n"), "{text:?}");
    assert_eq!(stdout(&output), "");
}

#[test]
fn partial_and_non_utf8_lines_are_forwarded() {
    let output = launch(&["-n", "1", "--", "sh", "-c", r"printf 'a\377b\nno newline'"]);
    assert!(output.status.success(), "{output:?}");
    assert_eq!(
        stdout(&output),
        "[rank 0] a\u{FFFD}b\n[rank 0] no newline\n"
    );
}

#[test]
fn lines_of_different_ranks_never_interleave() {
    let script = "i=0; while [ $i -lt 300 ]; do \
                  echo \"begin-$RANK-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx-end-$RANK\"; \
                  i=$((i + 1)); done";
    let output = launch(&["-n", "4", "--", "sh", "-c", script]);
    assert!(output.status.success(), "{output:?}");
    let text = stdout(&output);
    let mut counts = [0; 4];
    for line in text.lines() {
        let rank: usize = line
            .strip_prefix("[rank ")
            .and_then(|rest| rest.split(']').next())
            .and_then(|rank| rank.parse().ok())
            .unwrap_or_else(|| panic!("line without a rank prefix: {line:?}"));
        let x = "x".repeat(64);
        assert_eq!(line, format!("[rank {rank}] begin-{rank}-{x}-end-{rank}"));
        counts[rank] += 1;
    }
    assert_eq!(counts, [300; 4]);
}

/// Records the rank's shell and a `sleep` it starts in `$PIDS`, then waits
/// for the `sleep`. The files appear under a final name only once written.
const SLEEP_AND_RECORD: &str = "sleep 30 & echo $! > \"$PIDS/tmp$RANK\" && mv \"$PIDS/tmp$RANK\" \"$PIDS/child$RANK\"; \
                                echo $$ > \"$PIDS/tmp$RANK\" && mv \"$PIDS/tmp$RANK\" \"$PIDS/rank$RANK\"; \
                                wait";

/// Runs `script` as `ranks` ranks with `$PIDS` naming `pids`; returns the
/// launcher's output and how long it took.
fn run_timed(ranks: usize, script: &str, pids: &PidDir) -> (Output, Duration) {
    let start = Instant::now();
    let output = launcher(&["-n", &ranks.to_string(), "--", "sh", "-c", script])
        .env("PIDS", pids.path())
        .output()
        .expect("run linkreduce");
    (output, start.elapsed())
}

/// Exits 3 once `n` pid files are in `$PIDS` (at most 5 s later).
fn fail_after(files: usize) -> String {
    format!(
        "i=0; while [ $(ls \"$PIDS\" | grep -c -v tmp) -lt {files} ] && [ $i -lt 100 ]; do \
         sleep 0.05; i=$((i + 1)); done; exit 3"
    )
}

#[test]
fn a_failing_rank_stops_the_others_and_sets_the_exit_code() {
    let pids = PidDir::new();
    let script = format!(
        "if [ \"$RANK\" = 1 ]; then {}; fi; {SLEEP_AND_RECORD}",
        fail_after(4)
    );
    let (output, elapsed) = run_timed(3, &script, &pids);
    assert_eq!(output.status.code(), Some(3), "{output:?}");
    assert!(
        elapsed < Duration::from_secs(10),
        "took {elapsed:?}: the sleeping ranks were not stopped"
    );
    let text = stderr(&output);
    assert!(
        text.contains("linkreduce launch: rank 1 exited with status 3; stopped the other ranks"),
        "{text:?}"
    );
    // Ranks 0 and 2 and their `sleep`s: killing only the shells would leave
    // the `sleep`s running.
    pids.assert_all_gone(4);
}

#[test]
fn a_rank_ignoring_sigterm_is_killed_after_the_grace_period() {
    let pids = PidDir::new();
    let script = format!(
        "if [ \"$RANK\" = 1 ]; then {}; fi; trap '' TERM; {SLEEP_AND_RECORD}",
        fail_after(2)
    );
    let (output, elapsed) = run_timed(2, &script, &pids);
    assert_eq!(output.status.code(), Some(3), "{output:?}");
    assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}");
    pids.assert_all_gone(2);
}

#[test]
fn what_a_successful_rank_leaves_running_is_stopped() {
    let pids = PidDir::new();
    let script =
        "sleep 30 & echo $! > \"$PIDS/tmp\" && mv \"$PIDS/tmp\" \"$PIDS/child\"; echo done";
    let (output, elapsed) = run_timed(1, script, &pids);
    assert!(output.status.success(), "{output:?}");
    assert!(elapsed < Duration::from_secs(10));
    assert_eq!(stdout(&output), "[rank 0] done\n");
    pids.assert_all_gone(1);
}

fn a_signal_stops_every_rank(signal: libc::c_int) {
    let pids = PidDir::new();
    let launcher = Running::start(
        &["-n", "3", "--", "sh", "-c", SLEEP_AND_RECORD],
        &pids,
        libc::SIG_DFL,
    );
    pids.wait_for(6);
    launcher.signal(signal);
    let output = launcher.finish();
    assert_eq!(output.status.code(), Some(128 + signal), "{output:?}");
    let text = stderr(&output);
    assert!(
        text.contains(&format!("({signal}); stopped the ranks")),
        "{text:?}"
    );
    pids.assert_all_gone(6);
}

#[test]
fn sigterm_to_the_launcher_stops_every_rank() {
    a_signal_stops_every_rank(libc::SIGTERM);
}

#[test]
fn sigint_to_the_launcher_stops_every_rank() {
    a_signal_stops_every_rank(libc::SIGINT);
}

#[test]
fn an_ignored_sigint_stays_ignored() {
    let pids = PidDir::new();
    let mut launcher = Running::start(
        &["-n", "2", "--", "sh", "-c", SLEEP_AND_RECORD],
        &pids,
        libc::SIG_IGN,
    );
    let recorded = pids.wait_for(4);
    launcher.signal(libc::SIGINT);
    thread::sleep(Duration::from_millis(300));
    assert!(launcher.is_running(), "SIGINT stopped the launcher");
    for (name, pid) in &recorded {
        assert!(running(*pid), "SIGINT stopped {name} ({pid})");
    }
    launcher.signal(libc::SIGTERM);
    let output = launcher.finish();
    assert_eq!(
        output.status.code(),
        Some(128 + libc::SIGTERM),
        "{output:?}"
    );
    pids.assert_all_gone(4);
}

#[test]
fn ranks_die_with_a_launcher_killed_by_sigkill() {
    let pids = PidDir::new();
    let script = "echo $$ > \"$PIDS/tmp$RANK\" && mv \"$PIDS/tmp$RANK\" \"$PIDS/rank$RANK\"; \
                  exec sleep 30";
    let launcher = Running::start(&["-n", "2", "--", "sh", "-c", script], &pids, libc::SIG_DFL);
    pids.wait_for(2);
    launcher.signal(libc::SIGKILL);
    let output = launcher.finish();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&output.status),
        Some(libc::SIGKILL)
    );
    pids.assert_all_gone(2);
}

#[test]
fn a_rank_killed_by_a_signal_exits_128_plus_the_signal() {
    let pids = PidDir::new();
    let script = "if [ \"$RANK\" = 0 ]; then \
                  i=0; while [ ! -e \"$PIDS/rank1\" ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i + 1)); done; \
                  kill -9 $$; fi; \
                  echo $$ > \"$PIDS/tmp\" && mv \"$PIDS/tmp\" \"$PIDS/rank1\"; exec sleep 30";
    let output = launcher(&["-n", "2", "--", "sh", "-c", script])
        .env("PIDS", pids.path())
        .output()
        .expect("run linkreduce");
    assert_eq!(output.status.code(), Some(128 + 9), "{output:?}");
    assert!(
        stderr(&output).contains("rank 0 exited with status 137 (signal 9)"),
        "{output:?}"
    );
    pids.assert_all_gone(1);
}

#[test]
fn a_missing_command_is_named_in_the_error() {
    let output = launch(&["-n", "2", "--", "linkreduce-no-such-command", "--flag"]);
    assert!(!output.status.success(), "{output:?}");
    let text = stderr(&output);
    assert!(
        text.contains("could not start `linkreduce-no-such-command`"),
        "{text:?}"
    );
}

#[test]
fn zero_ranks_is_an_error() {
    let output = launch(&["-n", "0", "--", "true"]);
    assert!(!output.status.success(), "{output:?}");
    let text = stderr(&output);
    assert!(text.contains("at least one rank"), "{text:?}");
}

#[test]
fn a_command_is_required() {
    let output = launch(&["-n", "2"]);
    assert!(!output.status.success(), "{output:?}");
}
