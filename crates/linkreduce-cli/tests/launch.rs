//! `linkreduce launch` run as a real process, with `sh -c` scripts as ranks:
//! no GPU needed.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// The binary under test: cargo's, or LINKREDUCE_BIN where test binaries
/// run away from the build tree (the GPU machine's staged copies).
fn launch(args: &[&str]) -> Output {
    let binary = std::env::var_os("LINKREDUCE_BIN")
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_linkreduce").into());
    Command::new(binary)
        .arg("launch")
        .args(args)
        .output()
        .expect("run linkreduce")
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

#[test]
fn a_failing_rank_stops_the_others_and_sets_the_exit_code() {
    let start = Instant::now();
    let output = launch(&[
        "-n",
        "3",
        "--",
        "sh",
        "-c",
        "if [ \"$RANK\" = 1 ]; then exit 3; fi; sleep 30",
    ]);
    let elapsed = start.elapsed();
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
}

#[test]
fn a_rank_killed_by_a_signal_exits_128_plus_the_signal() {
    let output = launch(&[
        "-n",
        "2",
        "--",
        "sh",
        "-c",
        "if [ \"$RANK\" = 0 ]; then kill -9 $$; fi; sleep 30",
    ]);
    assert_eq!(output.status.code(), Some(128 + 9), "{output:?}");
    assert!(
        stderr(&output).contains("rank 0 exited with status 137 (signal 9)"),
        "{output:?}"
    );
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
