//! What the CLI says when a user's input is wrong: one line on stderr that
//! names the problem, and status 2. None of these reach a GPU.

use std::process::{Command, Output};

/// The binary under test: cargo's, or LINKREDUCE_BIN where test binaries
/// run away from the build tree (the GPU machine's staged copies).
fn linkreduce(args: &[&str]) -> Output {
    let binary = std::env::var_os("LINKREDUCE_BIN")
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_linkreduce").into());
    Command::new(binary)
        .args(args)
        .output()
        .expect("run linkreduce")
}

/// Checks status 2 and a single stderr line, and returns that line.
fn one_line_and_status_2(output: &Output) -> String {
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    let text = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(text.lines().count(), 1, "{text:?}");
    text
}

#[test]
fn a_missing_report_is_named() {
    let path = std::env::temp_dir().join(format!(
        "linkreduce-no-such-report-{}.json",
        std::process::id()
    ));
    let path = path.to_string_lossy().into_owned();
    let text = one_line_and_status_2(&linkreduce(&["plot", &path]));
    assert!(
        text.starts_with(&format!("linkreduce: cannot read {path}: ")),
        "{text:?}"
    );
}

#[test]
fn a_file_that_is_not_a_report_says_so() {
    let path = std::env::temp_dir().join(format!(
        "linkreduce-not-a-report-{}.json",
        std::process::id()
    ));
    std::fs::write(&path, "not json").expect("write the file");
    let output = linkreduce(&["plot", &path.to_string_lossy()]);
    let _ = std::fs::remove_file(&path);
    let text = one_line_and_status_2(&output);
    assert!(
        text.contains("is not a `linkreduce bench --json` report"),
        "{text:?}"
    );
}

#[test]
fn bad_sizes_name_the_option() {
    let text = one_line_and_status_2(&linkreduce(&["bench", "--sizes", "12X"]));
    assert!(
        text.starts_with("linkreduce: invalid argument --sizes: \"12X\" has an unknown unit"),
        "{text:?}"
    );
}

#[test]
fn zero_repetitions_are_refused() {
    let text = one_line_and_status_2(&linkreduce(&["bench", "--repetitions", "0"]));
    assert!(
        text.contains("--repetitions 0: must be at least 1"),
        "{text:?}"
    );
}
