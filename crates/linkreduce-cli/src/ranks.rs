//! How the CLI runs its ranks: as threads of this process, or as processes
//! (this same command started again through the launcher, each process
//! building its communicator from the environment). Subcommands write their
//! work once, per rank, and the mode decides where the ranks live.

use std::ffi::OsString;
use std::sync::Arc;

use linkreduce::group::in_process;
use linkreduce::rendezvous::{Rendezvous, TcpRendezvous, TcpRendezvousConfig};
use linkreduce::verify::on_every_rank;
use linkreduce::{Communicator, Config};

use crate::error::{CliError, Result};

/// Set by the parent in the processes it starts as ranks.
const WORKER_VAR: &str = "LINKREDUCE_CLI_WORKER";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Mode {
    /// One thread per rank in this process; peers' memory is addressed
    /// directly.
    #[default]
    Threads,
    /// One process per rank, started through `linkreduce launch`; peers'
    /// memory is mapped through CUDA IPC.
    Processes,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Threads => "threads",
            Mode::Processes => "processes",
        }
    }
}

/// The device of each of `world` ranks: round-robin over `devices`.
pub fn placement(devices: &[usize], world: usize) -> Vec<usize> {
    (0..world)
        .map(|rank| devices[rank % devices.len()])
        .collect()
}

/// Whether this process is a rank started by [`on_ranks`] in processes
/// mode.
pub fn is_worker() -> bool {
    std::env::var_os(WORKER_VAR).is_some()
}

/// The world size of this worker process's group.
fn worker_world() -> Option<usize> {
    std::env::var(WORKER_VAR).ok()?;
    std::env::var("WORLD_SIZE").ok()?.parse().ok()
}

/// Runs `per_rank` on `world` ranks placed over `devices`; `per_rank`
/// returns whether its work passed. Returns whether every rank passed, or
/// None in a worker process for a world size that belongs to another group
/// of workers (the command runs whole in every worker; only the matching
/// world size is this process's).
pub fn on_ranks(
    mode: Mode,
    devices: &[usize],
    world: usize,
    config: Config,
    per_rank: impl Fn(&mut Communicator) -> Result<bool> + Sync,
) -> Result<Option<bool>> {
    let places = placement(devices, world);
    match (mode, worker_world()) {
        (Mode::Threads, _) => {
            let mut comms = in_process(&places, config)?;
            // The CLI's errors ride through the library's runner as values;
            // the first failing rank's, in rank order, is the one reported.
            let outcomes = on_every_rank(&mut comms, |comm| Ok(per_rank(comm)))?;
            let passed = outcomes.into_iter().collect::<Result<Vec<bool>>>()?;
            Ok(Some(passed.into_iter().all(|p| p)))
        }
        (Mode::Processes, None) => {
            let exe = std::env::current_exe().map_err(|source| CliError::Launch {
                what: "find this program to start its ranks".into(),
                source,
            })?;
            let args: Vec<OsString> = std::env::args_os().skip(1).collect();
            let env = [(WORKER_VAR.to_string(), "1".to_string())];
            let status = crate::launch::launch(world, exe.as_os_str(), &args, &env)?;
            Ok(Some(status == 0))
        }
        (Mode::Processes, Some(mine)) if mine != world => Ok(None),
        (Mode::Processes, Some(_)) => {
            let rendezvous = TcpRendezvous::connect(TcpRendezvousConfig::from_env()?)?;
            let device = places[rendezvous.rank()];
            let mut comm = Communicator::new(Arc::new(rendezvous), device, config)?;
            per_rank(&mut comm).map(Some)
        }
    }
}

/// The exit status of a command whose work passed, or not.
pub fn exit_code(passed: bool) -> std::process::ExitCode {
    if passed {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::from(1)
    }
}
