//! The CLI's own error type. The library's errors pass through unchanged
//! (they already say what to do); everything else the commands can run into
//! (files, JSON, plotting, command-line values, starting ranks, a signal)
//! has a variant of its own that names what went wrong and, where there is
//! one, what to do about it.

use std::io;
use std::path::PathBuf;
use std::process::ExitCode;

use nix::sys::signal::Signal;

/// Result alias used by the commands.
pub type Result<T, E = CliError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The library refused or failed; its message says what to do.
    #[error(transparent)]
    Library(#[from] linkreduce::Error),
    /// The command needs a GPU and this machine shows none: the library's
    /// error says which part is missing (driver library, device).
    #[error("no usable NVIDIA GPU: {0}")]
    NoGpu(linkreduce::Error),
    /// A value on the command line that the command cannot use; `arg` is
    /// the option as the user wrote it (with its value where that helps).
    #[error("invalid argument {arg}: {problem}")]
    BadArgument { arg: String, problem: String },
    /// Reading or writing a file failed.
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        /// What was being done: "read", "write".
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Serialising a report or table as JSON failed.
    #[error("cannot encode {what} as JSON: {source}")]
    JsonEncode {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    /// The input of `linkreduce plot` is not a report bench wrote.
    #[error("{input} is not a `linkreduce bench --json` report: {source}; write one with `linkreduce bench --json FILE`")]
    NotAReport {
        input: String,
        #[source]
        source: serde_json::Error,
    },
    /// A report of an op the plot does not draw.
    #[error("{input} is a `bench --op {op}` report; `linkreduce plot` draws the all-reduce, reduce-scatter and all-gather reports only (the table and the JSON hold its figures)")]
    NotASizeSweep { input: String, op: String },
    /// A report that parses but holds nothing a log-log plot can show.
    #[error("{input} has no rows with a positive size and time to plot")]
    NothingToPlot { input: String },
    /// No font for the plot's labels could be found or loaded; the message
    /// says which and how to name another (LINKREDUCE_FONT).
    #[error("{0}")]
    Font(String),
    /// Drawing or encoding the plot failed.
    #[error("drawing the plot failed: {0}")]
    Plot(String),
    /// Writing the finished plot failed.
    #[error("cannot write the plot to {}: {reason}", path.display())]
    PlotWrite { path: PathBuf, reason: String },
    /// `--tune-out` was asked for but the run's times cannot make a table.
    #[error("no tuning table written: {0}")]
    Tuning(&'static str),
    /// A rank's command could not be started.
    #[error("could not start `{program}` for rank {rank}: {source}; check that the command exists and is executable")]
    Spawn {
        program: String,
        rank: usize,
        #[source]
        source: io::Error,
    },
    /// The launcher could not find a port for the rendezvous.
    #[error("could not find a free port for MASTER_PORT ({0}); pass --master-port")]
    NoFreePort(#[source] io::Error),
    /// Something else the launcher needs from the system failed (a thread,
    /// a signal handler, the state of a rank).
    #[error("could not {what}: {source}")]
    Launch {
        what: String,
        #[source]
        source: io::Error,
    },
    /// The launcher got SIGINT or SIGTERM and stopped its ranks; the
    /// program ends as the signal would have ended it (status 128 + the
    /// signal), so that a command running one job per world size does not
    /// go on to the next.
    #[error("received {} ({signal}); stopped the ranks", signal_name(*.signal))]
    Interrupted { signal: i32 },
    /// A state the CLI's own logic should never reach.
    #[error("internal error: {0}; please report it with the command line")]
    Internal(&'static str),
}

impl CliError {
    /// The process's exit status for this error: 128 + the signal for
    /// [`CliError::Interrupted`], as the shell reports a process the signal
    /// ended; 2 for every other error (1 is kept for a run whose results
    /// were wrong).
    pub fn exit_code(&self) -> ExitCode {
        match self {
            CliError::Interrupted { signal } => {
                ExitCode::from(u8::try_from(128 + signal).unwrap_or(255))
            }
            _ => ExitCode::from(2),
        }
    }

    /// Who says the error: `launch` for the end of a job stopped by a
    /// signal (its line has always been the launcher's), the program for
    /// the rest.
    pub fn speaker(&self) -> &'static str {
        match self {
            CliError::Interrupted { .. } => "linkreduce launch",
            _ => "linkreduce",
        }
    }
}

/// Rendezvous failures are the library's errors, as they are when the
/// library itself meets them.
impl From<linkreduce::rendezvous::RendezvousError> for CliError {
    fn from(error: linkreduce::rendezvous::RendezvousError) -> CliError {
        CliError::Library(error.into())
    }
}

/// "SIGINT", "SIGTERM", or "a signal" for a number nix does not name.
fn signal_name(signal: i32) -> &'static str {
    Signal::try_from(signal).map_or("a signal", Signal::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interrupted_ends_as_the_signal_would_and_others_exit_2() {
        let interrupted = CliError::Interrupted {
            signal: libc::SIGINT,
        };
        assert_eq!(interrupted.exit_code(), ExitCode::from(130));
        assert_eq!(interrupted.speaker(), "linkreduce launch");
        assert_eq!(
            interrupted.to_string(),
            "received SIGINT (2); stopped the ranks"
        );
        let terminated = CliError::Interrupted {
            signal: libc::SIGTERM,
        };
        assert_eq!(terminated.exit_code(), ExitCode::from(143));
        let other = CliError::BadArgument {
            arg: "--repetitions 0".into(),
            problem: "must be at least 1".into(),
        };
        assert_eq!(other.exit_code(), ExitCode::from(2));
        assert_eq!(other.speaker(), "linkreduce");
    }

    #[test]
    fn messages_name_the_file_and_the_missing_piece() {
        let io = CliError::Io {
            action: "write",
            path: "/no/such/dir/report.json".into(),
            source: io::Error::from(io::ErrorKind::NotFound),
        };
        let text = io.to_string();
        assert!(
            text.starts_with("cannot write /no/such/dir/report.json: "),
            "{text}"
        );
        let no_gpu = CliError::NoGpu(linkreduce::Error::DriverNotFound);
        let text = no_gpu.to_string();
        assert!(text.starts_with("no usable NVIDIA GPU: "), "{text}");
        assert!(text.contains("libcuda.so"), "{text}");
        assert!(!text.contains('\n'), "{text}");
    }
}
