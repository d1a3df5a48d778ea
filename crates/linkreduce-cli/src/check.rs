//! `linkreduce check`: the correctness sweep.

use std::process::ExitCode;

use linkreduce::group::in_process;
use linkreduce::verify::{check_case, check_graph, Case, Placement};
use linkreduce::{Algorithm, AlgorithmChoice, Config, DType, Result};

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
        default_value = "1,7,8,4097,65536,1048579,8388608"
    )]
    lengths: Vec<usize>,
    /// CUDA-graph replays checked per world size (0 to skip graphs).
    #[arg(long, default_value_t = 100)]
    graph_replays: usize,
}

pub fn run(args: Args) -> Result<ExitCode> {
    let gpus = crate::pick_devices(&args.devices)?;
    let mut failures = 0usize;
    let mut cases = 0usize;
    for &world in &args.worlds {
        let devices: Vec<usize> = (0..world).map(|rank| gpus[rank % gpus.len()]).collect();
        let mut comms = in_process(&devices, Config::default())?;
        let staging = comms[0].config().staging_bytes;
        for &dtype in &args.dtypes {
            for algorithm in Algorithm::ALL {
                for &len in &args.lengths {
                    for placement in Placement::ALL {
                        let staged =
                            matches!(placement, Placement::Staged | Placement::InPlaceStaged);
                        if staged && len * dtype.size() > staging {
                            continue;
                        }
                        let case = Case {
                            dtype,
                            len,
                            algorithm: AlgorithmChoice::Force(algorithm),
                            placement,
                        };
                        let outcome = check_case(&mut comms, case, cases as u64)?;
                        cases += 1;
                        if !outcome.passed() {
                            failures += 1;
                            println!(
                                "MISMATCH world {world} {dtype} {algorithm} len {len} {placement}: {outcome}"
                            );
                        }
                    }
                }
            }
            if args.graph_replays > 0 {
                for algorithm in Algorithm::ALL {
                    let (replay, outcome) = check_graph(
                        &mut comms,
                        dtype,
                        65539,
                        AlgorithmChoice::Force(algorithm),
                        args.graph_replays,
                    )?;
                    cases += 1;
                    if !outcome.passed() {
                        failures += 1;
                        println!("MISMATCH world {world} {dtype} graph ({algorithm} in place) replay {replay}: {outcome}");
                    }
                }
            }
        }
        println!("world {world} on GPUs {devices:?}: done, {failures} failure(s) so far");
    }
    println!("{} passed, {failures} failed", cases - failures);
    Ok(if failures == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
