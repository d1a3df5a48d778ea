//! `linkreduce`: benchmarks side by side with NCCL, correctness sweeps and
//! topology reports for the linkreduce library.

mod bench;
mod check;
mod error;
mod info;
mod launch;
mod pdl;
mod plot;
mod ranks;
mod sizes;
mod topology;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::error::{CliError, Result};

#[derive(Parser)]
#[command(
    name = "linkreduce",
    version,
    about = "Custom GPU all-reduce: benchmark, check, inspect"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Time linkreduce and NCCL side by side: all-reduce (default),
    /// reduce-scatter and all-gather over sizes, or the fused all-reduce +
    /// RMSNorm over row shapes (--op).
    Bench(bench::Args),
    /// Check results against a CPU reference over sizes, dtypes, algorithms
    /// and world sizes; exits non-zero on any mismatch.
    Check(check::Args),
    /// Show devices, peer access, library versions and algorithm choices.
    Info(info::Args),
    /// Time every linkreduce algorithm, on its default grid and smaller
    /// ones, and write the tuning table that automatic calls then follow
    /// (LINKREDUCE_TUNING=FILE).
    Tune(bench::Args),
    /// Start N processes of a command as ranks of one job, torchrun-style.
    Launch(launch::Args),
    /// Draw a `bench --json` report as a PNG: latency and bus bandwidth
    /// against message size, per implementation and timing mode.
    Plot(plot::Args),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Bench(args) => bench::run(args),
        Command::Check(args) => check::run(args),
        Command::Info(args) => info::run(args),
        Command::Tune(args) => bench::tune(args),
        Command::Launch(args) => launch::run(args),
        Command::Plot(args) => plot::run(args),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("{}: {error}", error.speaker());
            error.exit_code()
        }
    }
}

/// The GPUs to use: the ones asked for, or every visible one. No driver
/// library or no device is [`CliError::NoGpu`]: the first thing a command
/// says on a machine without an NVIDIA GPU.
fn pick_devices(asked: &Option<Vec<usize>>) -> Result<Vec<usize>> {
    let count = linkreduce::memory::device_count().map_err(|error| match error {
        linkreduce::Error::DriverNotFound | linkreduce::Error::NoDevice => CliError::NoGpu(error),
        other => CliError::Library(other),
    })?;
    Ok(match asked {
        Some(devices) => devices.clone(),
        None => (0..count).collect(),
    })
}
