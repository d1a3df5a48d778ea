//! `linkreduce check`: the correctness sweep, or with `--random N` the
//! random soak, with ranks as threads or as processes.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use linkreduce::kernels::NORM_DTYPES;
use linkreduce::verify::fused::{check_norm_case_on_rank, norm_sweep_cases, NormCase};
use linkreduce::verify::scatter_gather::{
    check_sg_case_on_rank, sg_sweep_cases, SgBuffers, SgCase,
};
use linkreduce::verify::soak::{soak, SoakOptions};
use linkreduce::verify::{check_case_on_rank, check_graph_on_rank, sweep_cases};
use linkreduce::{Algorithm, AlgorithmChoice, Communicator, Config, DType, ScatterGather};

use crate::error::Result;
use crate::pdl::Pdl;

use crate::ranks::{exit_code, is_worker, on_ranks, placement, Mode};

/// Carries the soak's seed from the command to the ranks it starts as
/// processes, when the command line gave none.
const SEED_VAR: &str = "LINKREDUCE_CHECK_SEED";

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
    /// Element counts of the sweep (odd ones included on purpose).
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
    /// Run N random cases per world size (the soak) instead of the sweep.
    #[arg(long, value_name = "N")]
    random: Option<u64>,
    /// The soak's seed (default: from the clock, printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Start the soak at this case number (to replay one case).
    #[arg(long, default_value_t = 0)]
    first_case: u64,
    /// The soak's longest message, in elements.
    #[arg(long, default_value_t = 4 << 20)]
    max_len: usize,
    /// How long a kernel waits for a peer before the call fails, in
    /// milliseconds (raise it under compute-sanitizer).
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
    /// Most blocks per launch (the default is what keeps every rank's grid
    /// resident).
    #[arg(long)]
    max_blocks: Option<u32>,
    /// Staging buffer size: calls longer than it are cut into several
    /// launches, which the checks must cover, hence a default (2M) below
    /// the library's.
    #[arg(long, default_value = "2M", value_parser = crate::sizes::parse_size)]
    staging_bytes: usize,
    /// Where the ranks live.
    #[arg(long, value_enum, default_value_t = Mode::Threads)]
    mode: Mode,
    /// Shapes (ROWSxHIDDEN) of the fused all-reduce + residual add +
    /// RMSNorm checked after the sweep, in f16 and bf16 (those of
    /// --dtypes; none for f32 alone); the first is also replayed in graphs.
    /// 512x4096 takes two launches with the default --staging-bytes.
    #[arg(
        long,
        value_delimiter = ',',
        value_parser = parse_shape,
        default_value = "8x4096,1x8192,3x16384,5x16387,33x1000,512x4096"
    )]
    norm_shapes: Vec<(usize, usize)>,
    /// Elements per rank's block of the reduce-scatters and all-gathers
    /// checked after the fused norm, with every buffer kind (views, in
    /// place, registered or not); the first is also replayed in graphs.
    #[arg(long, value_delimiter = ',', default_value = "65539,1,7,4097,1048579")]
    sg_counts: Vec<usize>,
    /// Launch the all-reduce kernels as programmatic dependent launches
    /// (Config::programmatic_launch): only worlds with one rank per GPU on
    /// sm_90 and newer get them; each world says whether it did. Without
    /// it LINKREDUCE_PDL decides (on where unset).
    #[arg(long, value_enum)]
    pdl: Option<Pdl>,
}

/// ROWSxHIDDEN.
fn parse_shape(text: &str) -> std::result::Result<(usize, usize), String> {
    let bad = || format!("{text:?} is not ROWSxHIDDEN (e.g. 8x4096)");
    let (rows, hidden) = text.split_once('x').ok_or_else(bad)?;
    Ok((
        rows.trim().parse().map_err(|_| bad())?,
        hidden.trim().parse().map_err(|_| bad())?,
    ))
}

pub fn run(mut args: Args) -> Result<ExitCode> {
    let gpus = crate::pick_devices(&args.devices)?;
    if args.random.is_some() && args.seed.is_none() {
        args.seed = Some(soak_seed());
    }
    let config = config_of(&args);
    let mut failed_worlds = Vec::new();
    for &world in &args.worlds {
        let started = Instant::now();
        let passed = on_ranks(args.mode, &gpus, world, config.clone(), |comm| {
            say_how_kernels_launch(comm);
            match args.random {
                Some(cases) => soak_world(comm, &args, &gpus, cases),
                None => check_world(comm, &args),
            }
        })?;
        match passed {
            Some(true) => {}
            Some(false) => failed_worlds.push(world),
            None => continue,
        }
        // Ranks that are processes report through their rank 0.
        if !is_worker() {
            println!(
                "world {world} on GPUs {:?} ({}): {} in {:.1} s",
                placement(&gpus, world),
                args.mode.name(),
                if passed == Some(true) {
                    "passed"
                } else {
                    "FAILED"
                },
                started.elapsed().as_secs_f64()
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

/// The communicators' configuration the options ask for.
fn config_of(args: &Args) -> Config {
    let mut config = Config {
        timeout: Duration::from_millis(args.timeout_ms.max(1)),
        ..Config::default()
    };
    config.set_staging_bytes(args.staging_bytes);
    if let Some(blocks) = args.max_blocks {
        config.max_blocks = blocks;
    }
    Pdl::apply(args.pdl, &mut config);
    config
}

/// Rank 0 says whether this world's all-reduce kernels are launched
/// programmatically, where that was asked for: worlds of ranks sharing a
/// GPU are not, so a run shows which worlds tested it.
fn say_how_kernels_launch(comm: &Communicator) {
    // Set-up refused a bad LINKREDUCE_PDL already.
    let wanted = comm.config().wants_programmatic_launch().unwrap_or(false);
    if comm.rank() == 0 && wanted {
        let how = if comm.programmatic_launch() {
            "as programmatic dependent launches"
        } else {
            "plainly (programmatic launches need sm_90 or newer and one rank per GPU)"
        };
        println!(
            "world {}: all-reduce kernels launched {how}",
            comm.world_size()
        );
    }
}

/// The seed of a soak run without `--seed`: the one the parent process
/// chose, in a rank it started, else a new one from the clock.
fn soak_seed() -> u64 {
    if let Some(seed) = std::env::var(SEED_VAR).ok().and_then(|s| s.parse().ok()) {
        return seed;
    }
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64 % 1_000_000_007);
    // The ranks started as processes inherit it. Set before any thread
    // exists: the command has not started its ranks yet.
    std::env::set_var(SEED_VAR, seed.to_string());
    seed
}

/// The soak on this rank; rank 0 prints the outcome, and for a failure the
/// commands that replay it.
fn soak_world(comm: &mut Communicator, args: &Args, gpus: &[usize], cases: u64) -> Result<bool> {
    let options = SoakOptions {
        seed: args.seed.unwrap_or(1),
        first_case: args.first_case,
        cases,
        max_len: args.max_len,
    };
    let started = Instant::now();
    let world = comm.world_size();
    let leader = comm.rank() == 0;
    let mut said = Instant::now();
    let report = soak(comm, &options, |passed| {
        if leader && said.elapsed() > Duration::from_secs(15) {
            said = Instant::now();
            println!("world {world}: {passed} cases passed so far");
        }
    })?;
    if !leader {
        return Ok(report.failure.is_none());
    }
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "world {world}: soak seed {} cases {}..{} (launches of at most {} blocks): {} passed in {seconds:.1} s ({:.0} cases/s)",
        options.seed,
        options.first_case,
        options.first_case + cases,
        comm.max_blocks().unwrap_or_default(),
        report.passed,
        report.passed as f64 / seconds.max(1e-9)
    );
    let covered: Vec<String> = report
        .covered
        .iter()
        .map(|(name, count)| format!("{name}: {count}"))
        .collect();
    println!("world {world}: covered {}", covered.join(", "));
    if let Some((case, why)) = &report.failure {
        let devices: Vec<String> = gpus.iter().map(usize::to_string).collect();
        let common = format!(
            "--seed {} --worlds {world} --devices {} --mode {} --max-len {} --staging-bytes {}{}",
            options.seed,
            devices.join(","),
            args.mode.name(),
            options.max_len,
            args.staging_bytes,
            Pdl::flag(args.pdl)
        );
        println!("MISMATCH world {world} {case}: {why}");
        println!(
            "replay the case alone: linkreduce check --random 1 --first-case {} {common}",
            case.number
        );
        println!(
            "replay the sequence:   linkreduce check --random {} --first-case {} {common}",
            case.number + 1 - options.first_case,
            options.first_case
        );
    }
    Ok(report.failure.is_none())
}

/// The fused-norm cases: every dtype that has them, every algorithm and
/// shape, then the first shape in graphs (fused and not).
fn norm_cases(args: &Args) -> Vec<NormCase> {
    let dtypes: Vec<DType> = args
        .dtypes
        .iter()
        .copied()
        .filter(|d| NORM_DTYPES.contains(d))
        .collect();
    let mut cases = norm_sweep_cases(&dtypes, &args.norm_shapes);
    if let (Some(&(rows, hidden)), true) = (args.norm_shapes.first(), args.graph_replays > 0) {
        for &dtype in &dtypes {
            for algorithm in [Algorithm::OneStage, Algorithm::TwoStage] {
                cases.push(NormCase {
                    dtype,
                    rows,
                    hidden,
                    algorithm: AlgorithmChoice::Force(algorithm),
                    graph_replays: args.graph_replays,
                });
            }
        }
    }
    cases
}

/// The reduce-scatter and all-gather cases: every collective, dtype, count
/// and buffer kind, then the first count in graphs.
fn sg_cases(args: &Args) -> Vec<SgCase> {
    let mut cases = sg_sweep_cases(&args.dtypes, &args.sg_counts, AlgorithmChoice::Auto);
    if let (Some(&count), true) = (args.sg_counts.first(), args.graph_replays > 0) {
        for op in ScatterGather::ALL {
            for &dtype in &args.dtypes {
                for buffers in [SgBuffers::Separate, SgBuffers::InPlace] {
                    cases.push(SgCase {
                        op,
                        dtype,
                        count,
                        algorithm: AlgorithmChoice::Auto,
                        buffers,
                        graph_replays: args.graph_replays,
                    });
                }
            }
        }
    }
    cases
}

/// Every case of the sweep and the graph replays on this rank; rank 0 prints
/// each mismatch (every rank reaches the same verdict) and the tally.
fn check_world(comm: &mut Communicator, args: &Args) -> Result<bool> {
    let leader = comm.rank() == 0;
    let world = comm.world_size();
    let cases = sweep_cases(&args.dtypes, &args.lengths);
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
    let norm_cases = norm_cases(args);
    for (seed, &case) in norm_cases.iter().enumerate() {
        let outcome = check_norm_case_on_rank(comm, case, seed as u64)?;
        failures += usize::from(!outcome.passed());
        if leader && !outcome.passed() {
            println!("MISMATCH world {world} {case}: {outcome}");
        }
    }
    let sg_cases = sg_cases(args);
    for (seed, &case) in sg_cases.iter().enumerate() {
        let outcome = check_sg_case_on_rank(comm, case, seed as u64)?;
        failures += usize::from(!outcome.passed());
        if leader && !outcome.passed() {
            println!("MISMATCH world {world} {case}: {outcome}");
        }
    }
    if leader {
        println!(
            "world {world}: {} passed, {failures} failed ({} cases, {graphs} graphs x {} replays, {} fused-norm cases, {} reduce-scatter and all-gather cases)",
            cases.len() + graphs + norm_cases.len() + sg_cases.len() - failures,
            cases.len(),
            args.graph_replays,
            norm_cases.len(),
            sg_cases.len()
        );
    }
    Ok(failures == 0)
}

#[cfg(test)]
mod tests {
    use super::{config_of, parse_shape, Args};
    use clap::Parser;

    #[derive(Parser)]
    struct Command {
        #[command(flatten)]
        args: Args,
    }

    #[test]
    fn pdl_asks_for_programmatic_launches_and_its_absence_leaves_the_variable_to_decide() {
        let config = |line: &[&str]| {
            let words = std::iter::once("check").chain(line.iter().copied());
            config_of(&Command::parse_from(words).args)
        };
        assert_eq!(config(&["--pdl", "on"]).programmatic_launch, Some(true));
        assert_eq!(config(&["--pdl", "off"]).programmatic_launch, Some(false));
        assert_eq!(config(&[]).programmatic_launch, None);
        assert_eq!(config(&["--max-blocks", "4"]).max_blocks, 4);
    }

    #[test]
    fn shapes_parse_as_rows_by_hidden() {
        assert_eq!(parse_shape("8x4096"), Ok((8, 4096)));
        assert_eq!(parse_shape(" 5 x 16387"), Ok((5, 16387)));
        assert!(parse_shape("4096").is_err());
        assert!(parse_shape("8xabc").is_err());
    }
}
