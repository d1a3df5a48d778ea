//! `linkreduce bench`: linkreduce and NCCL timed in the same run, eagerly and
//! as CUDA-graph replays, one rank per GPU as threads or processes. Every
//! rank times its own calls; rank 0 gathers the times through the
//! rendezvous and reports the slowest rank's.
//!
//! Each op (`--op`) has its own module: what it times, its table and its
//! report. They share the timing (measure.rs), the run's facts and the
//! JSON report's frame (here).

use std::fmt;
use std::process::ExitCode;

use indicatif::{ProgressBar, ProgressStyle};
use linkreduce::nccl::NcclComm;
use linkreduce::rendezvous::Rendezvous;
use linkreduce::{Algorithm, Communicator, Config, DType};
use serde::Serialize;

use crate::error::{CliError, Result};
use crate::ranks::{exit_code, on_ranks, Mode as RankMode};
use crate::sizes::parse_sizes;

mod all_reduce;
mod fused_norm;
mod measure;
mod scatter_gather;
mod sweep;

pub(crate) use all_reduce::Implementation;

#[derive(clap::Args)]
pub struct Args {
    /// The operation to time.
    #[arg(long, value_enum, default_value_t = Op::AllReduce)]
    op: Op,
    /// GPUs, one rank each (default: all visible).
    #[arg(long, value_delimiter = ',')]
    devices: Option<Vec<usize>>,
    /// all-reduce, reduce-scatter, all-gather: message sizes in bytes,
    /// lists and LOW:HIGH doubling ranges; all-reduce: the buffer [default:
    /// 1K:256M]; reduce-scatter: each rank's receive block, all-gather: each
    /// rank's send block (the gathered buffer is world size x that)
    /// [default: 1K:64M].
    #[arg(long)]
    sizes: Option<String>,
    #[arg(long, default_value = "bf16")]
    dtype: DType,
    /// all-reduce: implementations to time [default:
    /// nccl,auto,one-stage,two-stage,push,chunked-push,nccl-symmetric].
    #[arg(long, value_delimiter = ',')]
    implementations: Option<Vec<Implementation>>,
    /// fused-norm: rows per call [default: 1,8,32,128,512,2048].
    #[arg(long, value_delimiter = ',')]
    rows: Option<Vec<usize>>,
    /// fused-norm: elements per row [default: 4096,8192].
    #[arg(long, value_delimiter = ',')]
    hidden: Option<Vec<usize>>,
    /// Timed repetitions; the median is reported.
    #[arg(long, default_value_t = 7)]
    repetitions: usize,
    /// Write every figure and the run's facts here as JSON (all-reduce,
    /// reduce-scatter, all-gather: and the plot beside it, same name, .png).
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
    /// all-reduce: also write a tuning table here: per size, the fastest
    /// linkreduce algorithm among those timed (CUDA-graph times, right
    /// results only).
    #[arg(long)]
    tune_out: Option<std::path::PathBuf>,
    /// Launch the all-reduce kernels as programmatic dependent launches
    /// (Config::programmatic_launch; sm_90 and newer, one rank per GPU).
    /// Without it LINKREDUCE_PDL decides (on where unset). The report says
    /// whether the ranks did.
    #[arg(long, value_enum)]
    pdl: Option<crate::pdl::Pdl>,
}

/// The operations `bench` times. Another op is a variant here, its
/// options' owner in [`Args::workload`], and a module beside all_reduce.rs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Op {
    /// Sums over ranks, against NCCL.
    AllReduce,
    /// All-reduce + residual add + RMSNorm, fused against unfused
    /// (docs/fused.md).
    FusedNorm,
    /// Sums of each rank's block over ranks, against NCCL
    /// (docs/scatter_gather.md).
    ReduceScatter,
    /// Every rank's block on every rank, against NCCL.
    AllGather,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::AllReduce => "all-reduce",
            Op::FusedNorm => "fused-norm",
            Op::ReduceScatter => "reduce-scatter",
            Op::AllGather => "all-gather",
        })
    }
}

/// What one run times, from the options of its op.
#[derive(Debug)]
enum Workload {
    AllReduce(all_reduce::Sweep),
    FusedNorm(fused_norm::Shapes),
    ScatterGather(scatter_gather::Sweep),
}

impl Args {
    /// The workload the options ask for. Options of another op are
    /// refused rather than ignored, so that a run is what was asked.
    fn workload(&self) -> Result<Workload> {
        if self.repetitions == 0 {
            return Err(CliError::BadArgument {
                arg: "--repetitions 0".into(),
                problem: "must be at least 1".into(),
            });
        }
        const SWEEPS: &[Op] = &[Op::AllReduce, Op::ReduceScatter, Op::AllGather];
        let owned: [(&str, &[Op], bool); 5] = [
            ("--sizes", SWEEPS, self.sizes.is_some()),
            (
                "--implementations",
                &[Op::AllReduce],
                self.implementations.is_some(),
            ),
            ("--tune-out", &[Op::AllReduce], self.tune_out.is_some()),
            ("--rows", &[Op::FusedNorm], self.rows.is_some()),
            ("--hidden", &[Op::FusedNorm], self.hidden.is_some()),
        ];
        if let Some((flag, owners, _)) = owned
            .iter()
            .find(|(_, owners, given)| *given && !owners.contains(&self.op))
        {
            let owners: Vec<String> = owners.iter().map(Op::to_string).collect();
            return Err(CliError::BadArgument {
                arg: flag.to_string(),
                problem: format!(
                    "applies to --op {} only; leave it out for --op {}",
                    owners.join(", "),
                    self.op
                ),
            });
        }
        let sizes = |default| {
            parse_sizes(self.sizes.as_deref().unwrap_or(default)).map_err(|problem| {
                CliError::BadArgument {
                    arg: "--sizes".into(),
                    problem,
                }
            })
        };
        match self.op {
            Op::AllReduce => {
                let sizes = sizes(all_reduce::DEFAULT_SIZES)?;
                let implementations = self
                    .implementations
                    .clone()
                    .unwrap_or_else(|| all_reduce::DEFAULT_IMPLEMENTATIONS.to_vec());
                Ok(Workload::AllReduce(all_reduce::Sweep {
                    sizes,
                    implementations,
                }))
            }
            Op::FusedNorm => Ok(Workload::FusedNorm(fused_norm::Shapes::new(
                self.dtype,
                self.rows.as_deref(),
                self.hidden.as_deref(),
            )?)),
            Op::ReduceScatter | Op::AllGather => Ok(Workload::ScatterGather(
                scatter_gather::Sweep::new(self.op, sizes(scatter_gather::DEFAULT_SIZES)?)?,
            )),
        }
    }
}

/// `linkreduce tune`: the benchmark of every linkreduce algorithm and of
/// NCCL, then of each algorithm on smaller grids, written as the tuning
/// table that automatic calls then follow (LINKREDUCE_TUNING=FILE or
/// Config::tuning): sizes where NCCL was fastest take NCCL, and a grid is
/// kept where a smaller one beat the default by more than 2 %.
pub fn tune(mut args: Args) -> Result<ExitCode> {
    if args.op != Op::AllReduce {
        return Err(CliError::BadArgument {
            arg: format!("--op {}", args.op),
            problem: format!(
                "`linkreduce tune` times the all-reduce only; use `linkreduce bench --op {}`",
                args.op
            ),
        });
    }
    args.implementations = Some(
        Algorithm::ALL
            .iter()
            .map(|&algorithm| match algorithm {
                Algorithm::OneStage => Implementation::OneStage,
                Algorithm::TwoStage => Implementation::TwoStage,
                Algorithm::Push => Implementation::Push,
                Algorithm::ChunkedPush => Implementation::ChunkedPush,
            })
            .chain([Implementation::Nccl])
            .collect(),
    );
    args.tune_out
        .get_or_insert_with(|| "linkreduce-tuning.json".into());
    run(args)
}

pub fn run(args: Args) -> Result<ExitCode> {
    let workload = args.workload()?;
    let devices = crate::pick_devices(&args.devices)?;
    let world = args.ranks.unwrap_or(devices.len());
    // The default configuration, as users get it: launches are cut at the
    // staging size on every rank (docs/design.md, "How a call is cut"), so a smaller
    // staging buffer would time extra launches, not the kernels.
    let mut config = Config::default();
    if let Some(blocks) = args.max_blocks {
        config.max_blocks = blocks;
    }
    crate::pdl::Pdl::apply(args.pdl, &mut config);
    let passed = on_ranks(args.mode, &devices, world, config, |comm| match &workload {
        Workload::AllReduce(sweep) => all_reduce::bench_rank(comm, &args, sweep),
        Workload::FusedNorm(shapes) => fused_norm::bench_rank(comm, &args, shapes),
        Workload::ScatterGather(sweep) => scatter_gather::bench_rank(comm, &args, sweep),
    })?;
    Ok(exit_code(passed != Some(false)))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Mode {
    Eager,
    Graph,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Eager => "eager",
            Mode::Graph => "graph",
        }
    }
}

/// A `--json` report: the op, the run's facts and the op's rows.
#[derive(Serialize)]
struct Report<R> {
    op: Op,
    #[serde(flatten)]
    facts: RunFacts,
    rows: Vec<R>,
}

/// What every report says about the run, whatever the op.
#[derive(Serialize)]
struct RunFacts {
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
    /// Whether every rank launched its all-reduce kernels as programmatic
    /// dependent launches (the default where allowed; `--pdl off` or
    /// LINKREDUCE_PDL=0 turn them off).
    programmatic_launch: bool,
}

impl RunFacts {
    /// The facts of this run. Collective: the ranks' GPUs are gathered.
    fn gather(comm: &Communicator, mode: RankMode) -> Result<RunFacts> {
        let rendezvous = comm.rendezvous().as_ref();
        let identities = gather_strings(rendezvous, &gpu_identity(comm))?;
        let (gpus, rank_gpus) = distinct_gpus(&identities);
        let programmatic = gather_strings(rendezvous, &comm.programmatic_launch().to_string())?;
        let programmatic_launch = programmatic.iter().all(|p| p == "true");
        let wanted = comm.config().wants_programmatic_launch().unwrap_or(false);
        if comm.rank() == 0 && programmatic_launch {
            println!("all-reduce kernels launched as programmatic dependent launches (PDL)");
        } else if comm.rank() == 0 && wanted {
            eprintln!(
                "linkreduce: programmatic launches were asked for but are off on some rank \
                 (they need sm_90 or newer, a CUDA 12.3 driver and one rank per GPU)"
            );
        }
        Ok(RunFacts {
            command: std::env::args().collect::<Vec<_>>().join(" "),
            commit: std::env::var("LINKREDUCE_COMMIT").ok(),
            mode: mode.name(),
            gpus,
            rank_gpus,
            driver: driver_string(),
            nccl: linkreduce::nccl::version()
                .map(|(a, b, c)| format!("{a}.{b}.{c}"))
                .unwrap_or_else(|e| e.to_string()),
            world_size: comm.world_size(),
            max_blocks: comm.max_blocks(),
            programmatic_launch,
        })
    }
}

/// An NCCL communicator over the same ranks, or None (said once) where
/// NCCL cannot run: it refuses two ranks on one GPU, and linkreduce is
/// still timed then. Collective; every rank gets the same answer.
fn nccl_or_warn(comm: &Communicator) -> Option<NcclComm> {
    comm.nccl()
        .inspect_err(|error| {
            if comm.rank() == 0 {
                eprintln!("linkreduce: NCCL unavailable, timing linkreduce only: {error}");
            }
        })
        .ok()
}

/// A progress bar of `steps` on rank 0, hidden elsewhere.
fn progress_bar(leader: bool, steps: usize) -> ProgressBar {
    let progress = if leader {
        ProgressBar::new(steps as u64)
    } else {
        ProgressBar::hidden()
    };
    progress.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    progress
}

/// Writes `report` as JSON at `path`; returns the text written.
fn write_json(report: &impl Serialize, path: &std::path::Path) -> Result<String> {
    let text = serde_json::to_string_pretty(report).map_err(|source| CliError::JsonEncode {
        what: "the report",
        source,
    })?;
    std::fs::write(path, &text).map_err(|source| CliError::Io {
        action: "write",
        path: path.to_path_buf(),
        source,
    })?;
    Ok(text)
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use linkreduce::ScatterGather;

    #[derive(Parser)]
    struct Command {
        #[command(flatten)]
        args: Args,
    }

    fn workload(line: &str) -> Result<Workload> {
        let words = std::iter::once("bench").chain(line.split_whitespace());
        Command::try_parse_from(words)
            .map_err(|error| CliError::BadArgument {
                arg: line.into(),
                problem: error.to_string(),
            })?
            .args
            .workload()
    }

    fn refusal(line: &str) -> String {
        match workload(line) {
            Err(error) => error.to_string(),
            Ok(workload) => panic!("`{line}` was accepted as {workload:?}"),
        }
    }

    #[test]
    fn all_reduce_is_the_default_with_its_sizes_and_implementations() {
        let Ok(Workload::AllReduce(sweep)) = workload("") else {
            panic!("the default op is not the all-reduce");
        };
        assert_eq!(sweep.sizes.first(), Some(&1024));
        assert_eq!(sweep.sizes.last(), Some(&(256 << 20)));
        assert_eq!(sweep.implementations, all_reduce::DEFAULT_IMPLEMENTATIONS);
        let Ok(Workload::AllReduce(sweep)) =
            workload("--op all-reduce --sizes 4K,8K --implementations nccl")
        else {
            panic!("an all-reduce sweep was refused");
        };
        assert_eq!(sweep.sizes, [4096, 8192]);
        assert_eq!(sweep.implementations, [Implementation::Nccl]);
    }

    #[test]
    fn options_of_another_op_are_refused_with_their_owner() {
        assert_eq!(
            refusal("--rows 8"),
            "invalid argument --rows: applies to --op fused-norm only; leave it out for \
             --op all-reduce"
        );
        assert!(refusal("--hidden 64").contains("--op fused-norm only"));
        for flag in ["--implementations nccl", "--tune-out t.json"] {
            for op in ["fused-norm", "reduce-scatter", "all-gather"] {
                let text = refusal(&format!("--op {op} {flag}"));
                assert!(
                    text.contains(&format!(
                        "applies to --op all-reduce only; leave it out for --op {op}"
                    )),
                    "{flag}: {text}"
                );
            }
        }
        assert_eq!(
            refusal("--op fused-norm --sizes 1K"),
            "invalid argument --sizes: applies to --op all-reduce, reduce-scatter, all-gather \
             only; leave it out for --op fused-norm"
        );
        for op in ["reduce-scatter", "all-gather"] {
            let text = refusal(&format!("--op {op} --rows 8"));
            assert!(text.contains("--op fused-norm only"), "{op}: {text}");
        }
        assert!(refusal("--op reduce-scatter --sizes 0").contains("not a positive size"));
        assert!(refusal("--op all-gather --sizes 8K:1K").contains("runs backwards"));
        assert!(refusal("--op scatter").contains("invalid value 'scatter'"));
        assert!(refusal("--repetitions 0").contains("must be at least 1"));
    }

    #[test]
    fn scatter_gather_ops_sweep_blocks_to_64m_by_default() {
        let Ok(Workload::ScatterGather(sweep)) = workload("--op reduce-scatter") else {
            panic!("--op reduce-scatter was refused");
        };
        assert_eq!(sweep.collective, ScatterGather::ReduceScatter);
        assert_eq!(sweep.sizes.first(), Some(&1024));
        assert_eq!(sweep.sizes.last(), Some(&(64 << 20)));
        let Ok(Workload::ScatterGather(sweep)) = workload("--op all-gather --sizes 4K,8K") else {
            panic!("an all-gather sweep was refused");
        };
        assert_eq!(sweep.collective, ScatterGather::AllGather);
        assert_eq!(sweep.sizes, [4096, 8192]);
    }

    #[test]
    fn tune_refuses_other_ops_before_touching_a_gpu() {
        let args = Command::try_parse_from(["bench", "--op", "fused-norm"])
            .unwrap()
            .args;
        let error = tune(args).unwrap_err().to_string();
        assert!(
            error.contains("`linkreduce bench --op fused-norm`"),
            "{error}"
        );
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
