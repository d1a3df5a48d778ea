//! `linkreduce check`: the correctness sweep, with ranks as threads or as
//! processes.

use std::process::ExitCode;

use linkreduce::verify::{check_case_on_rank, check_graph_on_rank, sweep_cases};
use linkreduce::{Algorithm, AlgorithmChoice, Communicator, Config, DType, Result};

use crate::ranks::{exit_code, is_worker, on_ranks, placement, Mode};

#[derive(clap::Args)]
pub struct Args {
    /// GPUs to spread ranks over (default: all visible).
    #[arg(long, value_delimiter = ',')]
    devices: Option<Vec<usize>>,
    /// World sizes; ranks beyond the GPU count share GPUs round-robin.
    #[arg(long, value_delimiter = ',', default_value = "2,3,4,5,6,7,8")]
    worlds: Vec<usize>,
    #[arg(long, value_delimiter = ',', default_value = "f32,f16,bf16")]
    dtypes: Vec<DType>,
    /// Element counts (odd ones included on purpose).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1,7,8,4097,65536,73740,1048579,8388608"
    )]
    lengths: Vec<usize>,
    /// CUDA-graph replays checked per world size, dtype and algorithm (0 to
    /// skip graphs).
    #[arg(long, default_value_t = 100)]
    graph_replays: usize,
    /// Where the ranks live.
    #[arg(long, value_enum, default_value_t = Mode::Threads)]
    mode: Mode,
}

pub fn run(args: Args) -> Result<ExitCode> {
    let gpus = crate::pick_devices(&args.devices)?;
    let mut failed_worlds = Vec::new();
    for &world in &args.worlds {
        let passed = on_ranks(args.mode, &gpus, world, Config::default(), |comm| {
            check_world(comm, &args)
        })?;
        match passed {
            Some(true) => {}
            Some(false) => failed_worlds.push(world),
            None => continue,
        }
        // Ranks that are processes report through their rank 0.
        if !is_worker() {
            println!(
                "world {world} on GPUs {:?} ({}): {}",
                placement(&gpus, world),
                args.mode.name(),
                if passed == Some(true) {
                    "passed"
                } else {
                    "FAILED"
                }
            );
        }
    }
    if !is_worker() {
        if failed_worlds.is_empty() {
            println!("all world sizes passed");
        } else {
            println!("FAILED world sizes: {failed_worlds:?}");
        }
    }
    Ok(exit_code(failed_worlds.is_empty()))
}

/// Every case of the sweep and the graph replays on this rank; rank 0 prints
/// each mismatch (every rank reaches the same verdict) and the tally.
fn check_world(comm: &mut Communicator, args: &Args) -> Result<bool> {
    let leader = comm.rank() == 0;
    let world = comm.world_size();
    let cases = sweep_cases(&args.dtypes, &args.lengths, comm.config().staging_bytes);
    let mut failures = 0;
    for (seed, &case) in cases.iter().enumerate() {
        let outcome = check_case_on_rank(comm, case, seed as u64)?;
        if !outcome.passed() {
            failures += 1;
            if leader {
                println!("MISMATCH world {world} {case}: {outcome}");
            }
        }
    }
    let mut graphs = 0;
    if args.graph_replays > 0 {
        for &dtype in &args.dtypes {
            for algorithm in Algorithm::ALL {
                let (replay, outcome) = check_graph_on_rank(
                    comm,
                    dtype,
                    65539,
                    AlgorithmChoice::Force(algorithm),
                    args.graph_replays,
                )?;
                graphs += 1;
                if !outcome.passed() {
                    failures += 1;
                    if leader {
                        println!("MISMATCH world {world} {dtype} graph ({algorithm} in place) replay {replay}: {outcome}");
                    }
                }
            }
        }
    }
    if leader {
        println!(
            "world {world}: {} passed, {failures} failed ({} cases, {graphs} graphs x {} replays)",
            cases.len() + graphs - failures,
            cases.len(),
            args.graph_replays
        );
    }
    Ok(failures == 0)
}
