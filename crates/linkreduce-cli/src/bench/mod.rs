//! `linkreduce bench`: linkreduce and NCCL timed in the same run, eagerly and
//! as CUDA-graph replays, one rank per GPU as threads or processes. Every
//! rank times its own calls; rank 0 gathers the times through the
//! rendezvous and reports the slowest rank's.

use std::fmt;
use std::process::ExitCode;

use indicatif::{ProgressBar, ProgressStyle};
use linkreduce::rendezvous::Rendezvous;
use linkreduce::{Algorithm, AlgorithmChoice, Communicator, Config, DType, TunedPath};
use serde::Serialize;

use crate::error::{CliError, Result};
use crate::ranks::{exit_code, on_ranks, Mode as RankMode};
use crate::sizes::{format_size, parse_sizes};

mod measure;

use measure::{measure, slowest_rank, Rank};

#[derive(clap::Args)]
pub struct Args {
    /// GPUs, one rank each (default: all visible).
    #[arg(long, value_delimiter = ',')]
    devices: Option<Vec<usize>>,
    /// Message sizes in bytes: lists and LOW:HIGH doubling ranges.
    #[arg(long, default_value = "1K:256M")]
    sizes: String,
    #[arg(long, default_value = "bf16")]
    dtype: DType,
    /// Implementations to time.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "nccl,auto,one-stage,two-stage,push,nccl-symmetric"
    )]
    implementations: Vec<Implementation>,
    /// Timed repetitions; the median is reported.
    #[arg(long, default_value_t = 7)]
    repetitions: usize,
    /// Write every figure and the run's facts here as JSON, and the plot
    /// beside it (same name, .png).
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Ranks (default: one per GPU); more ranks than GPUs share them, which
    /// checks the machinery but says nothing about speed.
    #[arg(long)]
    ranks: Option<usize>,
    /// Where the ranks live.
    #[arg(long, value_enum, default_value_t = RankMode::Threads)]
    mode: RankMode,
    /// Most blocks per launch (default: what keeps every rank's grid
    /// resident), to measure how the grid changes each algorithm's speed.
    #[arg(long)]
    max_blocks: Option<u32>,
    /// Also write a tuning table here: per size, the fastest linkreduce
    /// algorithm among those timed (CUDA-graph times, right results only).
    #[arg(long)]
    tune_out: Option<std::path::PathBuf>,
}

/// `linkreduce tune`: the benchmark of every linkreduce algorithm and of
/// NCCL, written as the tuning table that automatic calls then follow
/// (LINKREDUCE_TUNING=FILE or Config::tuning): sizes where NCCL was fastest
/// take NCCL.
pub fn tune(mut args: Args) -> Result<ExitCode> {
    args.implementations = Algorithm::ALL
        .iter()
        .map(|&algorithm| match algorithm {
            Algorithm::OneStage => Implementation::OneStage,
            Algorithm::TwoStage => Implementation::TwoStage,
            Algorithm::Push => Implementation::Push,
        })
        .chain([Implementation::Nccl])
        .collect();
    args.tune_out
        .get_or_insert_with(|| "linkreduce-tuning.json".into());
    run(args)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Implementation {
    Auto,
    OneStage,
    TwoStage,
    Push,
    Nccl,
    NcclSymmetric,
}

impl fmt::Display for Implementation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Implementation::Auto => "linkreduce",
            Implementation::OneStage => "lr-one-stage",
            Implementation::TwoStage => "lr-two-stage",
            Implementation::Push => "lr-push",
            Implementation::Nccl => "nccl",
            Implementation::NcclSymmetric => "nccl-symm",
        })
    }
}

impl Implementation {
    fn algorithm(self) -> Option<AlgorithmChoice> {
        match self {
            Implementation::Auto => Some(AlgorithmChoice::Auto),
            Implementation::OneStage => Some(AlgorithmChoice::Force(Algorithm::OneStage)),
            Implementation::TwoStage => Some(AlgorithmChoice::Force(Algorithm::TwoStage)),
            Implementation::Push => Some(AlgorithmChoice::Force(Algorithm::Push)),
            Implementation::Nccl | Implementation::NcclSymmetric => None,
        }
    }

    /// What a tuning table entry names when this implementation is the
    /// fastest (NCCL as the library's NCCL path calls it: plain buffers).
    fn tuned_path(self) -> Option<TunedPath> {
        match self.algorithm() {
            Some(AlgorithmChoice::Force(algorithm)) => Some(TunedPath::Custom(algorithm)),
            _ if self == Implementation::Nccl => Some(TunedPath::Nccl),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Mode {
    Eager,
    Graph,
}

#[derive(Debug, Clone, Serialize)]
struct Row {
    bytes: usize,
    count: usize,
    dtype: DType,
    implementation: Implementation,
    /// For linkreduce's implementations, the path its calls took
    /// (`one-stage`, `two-stage`, `push` or `nccl`): automatic calls show
    /// the choice at each size.
    path: Option<String>,
    mode: Mode,
    /// Median over repetitions of the slowest rank's time per call.
    time_us: f64,
    algbw_gbps: f64,
    busbw_gbps: f64,
    wrong: usize,
    /// NCCL's time over this one's in the same run and mode (>1: faster).
    speedup_vs_nccl: Option<f64>,
}

#[derive(Serialize)]
struct Report {
    command: String,
    /// Commit of the binary (LINKREDUCE_COMMIT, set by scripts/gpu-run.sh).
    commit: Option<String>,
    /// Where the ranks lived: threads or processes.
    mode: &'static str,
    /// The GPUs the ranks ran on, each once (ranks may share one).
    gpus: Vec<String>,
    /// For each rank, its GPU's index in `gpus`.
    rank_gpus: Vec<usize>,
    driver: String,
    nccl: String,
    world_size: usize,
    /// The largest grid of the kernels; None where every call took NCCL.
    max_blocks: Option<u32>,
    rows: Vec<Row>,
}

pub fn run(args: Args) -> Result<ExitCode> {
    let sizes = parse_sizes(&args.sizes).map_err(|problem| CliError::BadArgument {
        arg: "--sizes".into(),
        problem,
    })?;
    if args.repetitions == 0 {
        return Err(CliError::BadArgument {
            arg: "--repetitions 0".into(),
            problem: "must be at least 1".into(),
        });
    }
    let devices = crate::pick_devices(&args.devices)?;
    let world = args.ranks.unwrap_or(devices.len());
    // The default configuration, as users get it: launches are cut at the
    // staging size on every rank (docs/design.md, "Chunks"), so a smaller
    // staging buffer would time extra launches, not the kernels.
    let mut config = Config::default();
    if let Some(blocks) = args.max_blocks {
        config.max_blocks = blocks;
    }
    let passed = on_ranks(args.mode, &devices, world, config, |comm| {
        bench_rank(comm, &args, &sizes)
    })?;
    Ok(exit_code(passed != Some(false)))
}

/// Every implementation and size on this rank; rank 0 prints and writes
/// the report. Returns whether every result was right.
fn bench_rank(comm: &mut Communicator, args: &Args, sizes: &[usize]) -> Result<bool> {
    let world = comm.world_size();
    let leader = comm.rank() == 0;
    let rendezvous = comm.rendezvous().clone();
    let wants_nccl = args.implementations.iter().any(|i| i.algorithm().is_none());
    // NCCL refuses two ranks on one GPU; linkreduce is still timed then.
    let nccl = if wants_nccl {
        comm.nccl()
            .inspect_err(|error| {
                if leader {
                    eprintln!("linkreduce: NCCL unavailable, timing linkreduce only: {error}");
                }
            })
            .ok()
    } else {
        None
    };
    let (gpus, rank_gpus) =
        distinct_gpus(&gather_strings(rendezvous.as_ref(), &gpu_identity(comm))?);
    let max_blocks = comm.max_blocks();
    let progress = if leader {
        ProgressBar::new((sizes.len() * args.implementations.len()) as u64)
    } else {
        ProgressBar::hidden()
    };
    progress.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut rank = Rank { comm, nccl };
    let mut rows = Vec::new();
    if leader {
        print_header();
    }
    // Implementations outer, sizes inner: NCCL's rows exist before the
    // ratios need them, and one implementation that stalls costs only its
    // own rows.
    for &implementation in &args.implementations {
        if implementation.algorithm().is_none() && rank.nccl.is_none() {
            progress.inc(sizes.len() as u64);
            continue;
        }
        for &bytes in sizes {
            let count = bytes / args.dtype.size();
            if count == 0 {
                continue;
            }
            progress.set_message(format!("{} {implementation}", format_size(bytes)));
            let mine = match args.dtype {
                DType::F32 => measure::<f32>(&mut rank, implementation, count, args.repetitions),
                DType::F16 => {
                    measure::<half::f16>(&mut rank, implementation, count, args.repetitions)
                }
                DType::BF16 => {
                    measure::<half::bf16>(&mut rank, implementation, count, args.repetitions)
                }
            }?;
            let measured = slowest_rank(rendezvous.as_ref(), &mine)?;
            let path = match implementation.algorithm() {
                Some(AlgorithmChoice::Auto) => Some(rank.comm.path_for(bytes).name().to_string()),
                Some(choice) => Some(choice.to_string()),
                None => None,
            };
            for (mode, time_us) in [
                (Mode::Eager, measured.eager_us),
                (Mode::Graph, measured.graph_us),
            ] {
                let algbw = bytes as f64 / (time_us * 1e3);
                let mut row = Row {
                    bytes,
                    count,
                    dtype: args.dtype,
                    implementation,
                    path: path.clone(),
                    mode,
                    time_us,
                    algbw_gbps: algbw,
                    busbw_gbps: algbw * 2.0 * (world - 1) as f64 / world as f64,
                    wrong: measured.wrong,
                    speedup_vs_nccl: None,
                };
                row.speedup_vs_nccl = speedup_vs_nccl(&rows, &row);
                if leader {
                    progress.suspend(|| print_row(&row));
                }
                rows.push(row);
            }
            progress.inc(1);
        }
    }
    progress.finish_and_clear();
    let wrong: usize = rows.iter().map(|r| r.wrong).sum();
    if leader {
        rows.sort_by_key(|r| (r.bytes, r.implementation as u8, r.mode as u8));
        println!();
        print_header();
        rows.iter().for_each(print_row);
        let report = Report {
            command: std::env::args().collect::<Vec<_>>().join(" "),
            commit: std::env::var("LINKREDUCE_COMMIT").ok(),
            mode: args.mode.name(),
            gpus,
            rank_gpus,
            driver: driver_string(),
            nccl: linkreduce::nccl::version()
                .map(|(a, b, c)| format!("{a}.{b}.{c}"))
                .unwrap_or_else(|e| e.to_string()),
            world_size: world,
            max_blocks,
            rows,
        };
        if let Some(path) = &args.tune_out {
            write_tuning(&report, path)?;
        }
        if let Some(path) = &args.json {
            write_report(&report, path)?;
        }
    }
    Ok(wrong == 0)
}

/// Writes the tuning table measured by `report`.
fn write_tuning(report: &Report, path: &std::path::Path) -> Result<()> {
    if report.gpus.len() < report.world_size {
        return Err(CliError::Tuning(
            "ranks shared GPUs in this run, so its times say nothing about speed; \
             tune with one rank per GPU",
        ));
    }
    let mut fastest: Vec<(usize, TunedPath, f64)> = Vec::new();
    for row in &report.rows {
        let Some(algorithm) = row.implementation.tuned_path() else {
            continue;
        };
        if row.wrong > 0 || !matches!(row.mode, Mode::Graph) {
            continue;
        }
        match fastest.iter_mut().find(|f| f.0 == row.bytes) {
            Some(best) if best.2 <= row.time_us => {}
            Some(best) => *best = (row.bytes, algorithm, row.time_us),
            None => fastest.push((row.bytes, algorithm, row.time_us)),
        }
    }
    if fastest.is_empty() {
        return Err(CliError::Tuning(
            "no forced linkreduce algorithm (one-stage, two-stage, push) was timed with right \
             results",
        ));
    }
    let winners: Vec<(usize, TunedPath)> = fastest.iter().map(|f| (f.0, f.1)).collect();
    let tuning = linkreduce::Tuning {
        measured_on: format!(
            "{} x {}, {} ranks as {}, commit {}",
            report.gpus.len(),
            report.gpus.first().map_or("?", String::as_str),
            report.world_size,
            report.mode,
            report.commit.as_deref().unwrap_or("unknown")
        ),
        entries: linkreduce::Tuning::from_fastest(report.world_size, &winners),
    };
    let text = serde_json::to_string_pretty(&tuning).map_err(|source| CliError::JsonEncode {
        what: "the tuning table",
        source,
    })?;
    std::fs::write(path, text).map_err(|source| CliError::Io {
        action: "write",
        path: path.to_path_buf(),
        source,
    })?;
    eprintln!(
        "wrote {}; use it with {}={}",
        path.display(),
        linkreduce::Tuning::PATH_VAR,
        path.display()
    );
    Ok(())
}

/// Writes the JSON report and its plot beside it. A plot that cannot be
/// drawn (no font on this machine) is a warning: `linkreduce plot` can
/// draw it elsewhere from the JSON.
fn write_report(report: &Report, path: &std::path::Path) -> Result<()> {
    let text = serde_json::to_string_pretty(report).map_err(|source| CliError::JsonEncode {
        what: "the report",
        source,
    })?;
    std::fs::write(path, &text).map_err(|source| CliError::Io {
        action: "write",
        path: path.to_path_buf(),
        source,
    })?;
    let picture = path.with_extension("png");
    match crate::plot::render(&text, &picture) {
        Ok(()) => eprintln!("wrote {} and {}", path.display(), picture.display()),
        Err(error) => eprintln!(
            "wrote {}; no plot ({error}); draw it later with `linkreduce plot {}`",
            path.display(),
            path.display()
        ),
    }
    Ok(())
}

/// "uuid name": the uuid tells ranks that share a GPU apart from ranks on
/// two GPUs of the same model.
fn gpu_identity(comm: &Communicator) -> String {
    let ctx = comm.context();
    let uuid = ctx.uuid().map_or_else(
        |_| format!("device-{}", comm.device()),
        |uuid| {
            uuid.bytes
                .iter()
                .map(|b| format!("{:02x}", *b as u8))
                .collect()
        },
    );
    let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
    format!("{uuid} {name}")
}

/// The distinct GPUs' names, in order of first use, and each rank's index
/// among them.
fn distinct_gpus(identities: &[String]) -> (Vec<String>, Vec<usize>) {
    let mut seen: Vec<&String> = Vec::new();
    let rank_gpus = identities
        .iter()
        .map(|identity| match seen.iter().position(|s| *s == identity) {
            Some(index) => index,
            None => {
                seen.push(identity);
                seen.len() - 1
            }
        })
        .collect();
    let names = seen
        .iter()
        .map(|identity| {
            identity
                .split_once(' ')
                .map_or(identity.as_str(), |(_, name)| name)
                .to_string()
        })
        .collect();
    (names, rank_gpus)
}

/// Every rank's string, in rank order.
fn gather_strings(rendezvous: &dyn Rendezvous, mine: &str) -> Result<Vec<String>> {
    Ok(rendezvous
        .all_gather(mine.as_bytes())?
        .into_iter()
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .collect())
}

fn driver_string() -> String {
    match linkreduce::driver::driver_version() {
        Ok(version) => format!("{}.{}", version / 1000, (version % 1000) / 10),
        Err(_) => "unknown".into(),
    }
}

/// NCCL's time over `row`'s at the same size and mode (>1: `row` is faster).
fn speedup_vs_nccl(rows: &[Row], row: &Row) -> Option<f64> {
    rows.iter()
        .find(|r| {
            r.implementation == Implementation::Nccl
                && r.bytes == row.bytes
                && r.mode as u8 == row.mode as u8
        })
        .map(|nccl| nccl.time_us / row.time_us)
}

/// The implementation as the table prints it: automatic calls with the
/// path they took, as in `linkreduce(one-stage)`.
fn label(row: &Row) -> String {
    match (row.implementation, &row.path) {
        (Implementation::Auto, Some(path)) => format!("{}({path})", row.implementation),
        _ => row.implementation.to_string(),
    }
}

fn print_header() {
    println!(
        "{:>9} {:>11} {:>5} {:>21} {:>6} {:>10} {:>9} {:>9} {:>6} {:>8}",
        "size", "count", "type", "impl", "mode", "time(us)", "algbw", "busbw", "wrong", "vs nccl"
    );
}

fn print_row(row: &Row) {
    let ratio = row
        .speedup_vs_nccl
        .map(|r| format!("{r:.2}x"))
        .unwrap_or_else(|| "-".into());
    println!(
        "{:>9} {:>11} {:>5} {:>21} {:>6} {:>10.2} {:>9.2} {:>9.2} {:>6} {:>8}",
        format_size(row.bytes),
        row.count,
        row.dtype.name(),
        label(row),
        format!("{:?}", row.mode).to_lowercase(),
        row.time_us,
        row.algbw_gbps,
        row.busbw_gbps,
        row.wrong,
        ratio
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(bytes: usize, implementation: Implementation, mode: Mode, time_us: f64) -> Row {
        Row {
            bytes,
            count: bytes / 2,
            dtype: DType::BF16,
            implementation,
            path: None,
            mode,
            time_us,
            algbw_gbps: 0.0,
            busbw_gbps: 0.0,
            wrong: 0,
            speedup_vs_nccl: None,
        }
    }

    #[test]
    fn tuning_keeps_the_fastest_right_path_per_size_in_graph_mode() {
        use Implementation::{Nccl, NcclSymmetric, OneStage, Push, TwoStage};
        let mut wrong = row(1024, Push, Mode::Graph, 0.5);
        wrong.wrong = 3;
        let rows = vec![
            row(1024, OneStage, Mode::Graph, 4.0),
            row(1024, Push, Mode::Graph, 2.0),
            row(1024, Nccl, Mode::Graph, 1.0),
            row(1024, OneStage, Mode::Eager, 1.0),
            row(1 << 20, OneStage, Mode::Graph, 8.0),
            row(1 << 20, Push, Mode::Graph, 9.0),
            // The library's NCCL path uses plain buffers: symmetric
            // memory's times do not count.
            row(1 << 20, NcclSymmetric, Mode::Graph, 0.1),
            row(1 << 28, OneStage, Mode::Graph, 900.0),
            row(1 << 28, TwoStage, Mode::Graph, 800.0),
            wrong,
        ];
        let report = Report {
            command: "test".into(),
            commit: None,
            mode: "threads",
            gpus: vec!["GPU".into(), "GPU".into()],
            rank_gpus: vec![0, 1],
            driver: String::new(),
            nccl: String::new(),
            world_size: 2,
            max_blocks: Some(1),
            rows,
        };
        let dir = std::env::temp_dir().join(format!("linkreduce-tune-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tuning.json");
        write_tuning(&report, &path).unwrap();
        let tuning: linkreduce::Tuning =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let custom = TunedPath::Custom;
        assert_eq!(tuning.pick(2, 1024), Some(TunedPath::Nccl));
        assert_eq!(tuning.pick(2, 1 << 20), Some(custom(Algorithm::OneStage)));
        assert_eq!(tuning.pick(2, 1 << 28), Some(custom(Algorithm::TwoStage)));
        assert_eq!(tuning.pick(4, 1024), None);
        let shared = Report {
            gpus: vec!["GPU".into()],
            rank_gpus: vec![0, 0],
            ..report
        };
        assert!(write_tuning(&shared, &path).is_err());
    }

    #[test]
    fn ranks_sharing_a_gpu_list_it_once() {
        let identities = [
            "aa NVIDIA H100".to_string(),
            "bb NVIDIA H100".to_string(),
            "aa NVIDIA H100".to_string(),
        ];
        let (gpus, rank_gpus) = distinct_gpus(&identities);
        assert_eq!(gpus, ["NVIDIA H100", "NVIDIA H100"]);
        assert_eq!(rank_gpus, [0, 1, 0]);
    }
}
