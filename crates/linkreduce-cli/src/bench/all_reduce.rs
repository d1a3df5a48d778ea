//! `bench --op all-reduce`: sizes x implementations (linkreduce's
//! algorithms, automatic or forced, and NCCL with plain or symmetric
//! buffers) through the shared sweep (sweep.rs), and the tuning table.

use std::fmt;

use linkreduce::algorithm::blocks_for;
use linkreduce::kernels::{PACKET_BYTES, THREADS_PER_BLOCK};
use linkreduce::nccl::SymmetricBuffer;
use linkreduce::verify::values::small_integer;
use linkreduce::{
    Algorithm, AlgorithmChoice, CallOptions, Communicator, DType, DeviceBuffer, Element, Error,
    TunedPath,
};
use serde::Serialize;

use super::measure::{time_eager_and_graphed, Rank, RankRun};
use super::sweep::{sweep_rank, write_report, Labels, Row};
use super::{Args, Mode, Op, Report};
use crate::error::{CliError, Result};

pub(super) const DEFAULT_SIZES: &str = "1K:256M";

pub(super) const DEFAULT_IMPLEMENTATIONS: [Implementation; 7] = [
    Implementation::Nccl,
    Implementation::Auto,
    Implementation::OneStage,
    Implementation::TwoStage,
    Implementation::Push,
    Implementation::ChunkedPush,
    Implementation::NcclSymmetric,
];

/// The sizes and implementations of one run.
#[derive(Debug)]
pub(super) struct Sweep {
    pub sizes: Vec<usize>,
    pub implementations: Vec<Implementation>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Implementation {
    Auto,
    OneStage,
    TwoStage,
    Push,
    ChunkedPush,
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
            Implementation::ChunkedPush => "lr-chunked-push",
            Implementation::Nccl => "nccl",
            Implementation::NcclSymmetric => "nccl-symm",
        })
    }
}

impl Implementation {
    /// Whether NCCL runs it (directly, not as linkreduce's NCCL path).
    pub(super) fn is_nccl(self) -> bool {
        self.algorithm().is_none()
    }

    fn algorithm(self) -> Option<AlgorithmChoice> {
        match self {
            Implementation::Auto => Some(AlgorithmChoice::Auto),
            Implementation::OneStage => Some(AlgorithmChoice::Force(Algorithm::OneStage)),
            Implementation::TwoStage => Some(AlgorithmChoice::Force(Algorithm::TwoStage)),
            Implementation::Push => Some(AlgorithmChoice::Force(Algorithm::Push)),
            Implementation::ChunkedPush => Some(AlgorithmChoice::Force(Algorithm::ChunkedPush)),
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

/// The grids `linkreduce tune` tries besides the default, as divisors of
/// it: each forced algorithm at half and a quarter of its default grid,
/// at sizes where that default has at least twice the divisor in blocks.
const TUNED_GRID_DIVISORS: [u32; 2] = [2, 4];

/// The grid a pass of the sweep gives the forced algorithms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Grid {
    /// The calls' own (bench): a tuning table's grid where it names one.
    Own,
    /// The group's limit (tune's first pass), so that a table in force
    /// does not time its own grids as the default.
    Limit,
    /// The default grid over this divisor (tune's grid passes).
    Divided(u32),
}

impl Grid {
    /// At most how many blocks a call of `implementation` of `bytes` gets
    /// (None: the call's own grid); the same on every rank.
    fn max_blocks(
        self,
        comm: &Communicator,
        implementation: Implementation,
        bytes: usize,
    ) -> Option<u32> {
        let Some(AlgorithmChoice::Force(algorithm)) = implementation.algorithm() else {
            return None;
        };
        match self {
            Grid::Own => None,
            Grid::Limit => comm.max_blocks(),
            Grid::Divided(divisor) => {
                Some((default_blocks(comm, algorithm, bytes)? / divisor).max(1))
            }
        }
    }

    /// Whether this pass times `bytes`: a divided grid only where it is
    /// smaller than the default (one-stage's).
    fn covers(self, comm: &Communicator, bytes: usize) -> bool {
        let Grid::Divided(divisor) = self else {
            return true;
        };
        default_blocks(comm, Algorithm::OneStage, bytes).is_some_and(|full| full >= 2 * divisor)
    }

    /// Whether this pass times `implementation`: the divided grids only the
    /// forced kernel algorithms.
    fn times(self, implementation: Implementation) -> bool {
        let forced = matches!(implementation.algorithm(), Some(AlgorithmChoice::Force(_)));
        forced || !matches!(self, Grid::Divided(_))
    }
}

/// The grid a call of `algorithm` of `bytes` gets without a cap.
fn default_blocks(comm: &Communicator, algorithm: Algorithm, bytes: usize) -> Option<u32> {
    let packets = bytes.div_ceil(PACKET_BYTES);
    let limit = comm.max_blocks()?;
    Some(blocks_for(
        algorithm,
        comm.world_size(),
        packets,
        THREADS_PER_BLOCK,
        limit,
    ))
}

/// Every implementation and size on this rank; rank 0 prints and writes
/// the report and the tuning table. Returns whether every result was right.
/// `tune` (a tuning table to write) adds passes that time the forced
/// algorithms on smaller grids.
pub(super) fn bench_rank(comm: &mut Communicator, args: &Args, sweep: &Sweep) -> Result<bool> {
    let passes = match args.tune_out {
        Some(_) => [Grid::Limit]
            .into_iter()
            .chain(TUNED_GRID_DIVISORS.map(Grid::Divided))
            .collect(),
        None => vec![Grid::Own],
    };
    let mut right = true;
    let mut merged: Option<Report<Row>> = None;
    for grid in passes {
        let sizes: Vec<usize> = (sweep.sizes.iter().copied())
            .filter(|&bytes| grid.covers(comm, bytes))
            .collect();
        let implementations: Vec<Implementation> = (sweep.implementations.iter().copied())
            .filter(|&i| grid.times(i))
            .collect();
        if sizes.is_empty() || implementations.is_empty() {
            continue;
        }
        if let (Grid::Divided(divisor), 0) = (grid, comm.rank()) {
            println!("\nforced algorithms on 1/{divisor} of their default grid:");
        }
        let (ok, report) = sweep_grid(comm, args, &sizes, &implementations, grid)?;
        right &= ok;
        match (&mut merged, report) {
            (Some(all), Some(report)) => all.rows.extend(report.rows),
            (None, report) => merged = report,
            (Some(_), None) => {}
        }
    }
    if let Some(report) = merged {
        if let Some(path) = &args.tune_out {
            write_tuning(&report, path)?;
        }
        if let Some(path) = &args.json {
            write_report(&report, path)?;
        }
    }
    Ok(right)
}

/// One pass of the sweep with `grid`.
fn sweep_grid(
    comm: &mut Communicator,
    args: &Args,
    sizes: &[usize],
    implementations: &[Implementation],
    grid: Grid,
) -> Result<(bool, Option<Report<Row>>)> {
    let repetitions = args.repetitions;
    let dtype = args.dtype;
    let measure = |rank: &mut Rank, implementation, count: usize| {
        let max_blocks = grid.max_blocks(rank.comm, implementation, count * dtype.size());
        let call = Call {
            implementation,
            count,
            max_blocks,
        };
        match dtype {
            DType::F32 => measure::<f32>(rank, call, repetitions),
            DType::F16 => measure::<half::f16>(rank, call, repetitions),
            DType::BF16 => measure::<half::bf16>(rank, call, repetitions),
        }
    };
    let path_of = |comm: &Communicator, implementation: Implementation, bytes| match implementation
        .algorithm()
    {
        Some(AlgorithmChoice::Auto) => Some(comm.path_for(bytes).name().to_string()),
        Some(choice) => Some(choice.to_string()),
        None => None,
    };
    let blocks_of = |comm: &Communicator, implementation, bytes| match grid {
        Grid::Divided(_) => grid.max_blocks(comm, implementation, bytes),
        Grid::Own | Grid::Limit => None,
    };
    sweep_rank(
        comm,
        args,
        Op::AllReduce,
        sizes,
        implementations,
        measure,
        Labels { path_of, blocks_of },
    )
}

/// One timed call: which implementation, how many elements, and the grid.
#[derive(Debug, Clone, Copy)]
struct Call {
    implementation: Implementation,
    count: usize,
    max_blocks: Option<u32>,
}

/// The buffers one rank all-reduces between.
enum Buffers<T> {
    Linkreduce {
        input: DeviceBuffer<T>,
        output: DeviceBuffer<T>,
    },
    Nccl {
        input: DeviceBuffer<T>,
        output: DeviceBuffer<T>,
    },
    Symmetric {
        input: SymmetricBuffer,
        output: SymmetricBuffer,
    },
}

impl<T: Element> Buffers<T> {
    fn addresses(&self) -> (u64, u64) {
        match self {
            Buffers::Linkreduce { input, output } | Buffers::Nccl { input, output } => {
                (input.device_address(), output.device_address())
            }
            Buffers::Symmetric { input, output } => {
                (input.device_address(), output.device_address())
            }
        }
    }
}

fn call<T: Element>(rank: &mut Rank, call: Call, buffers: &mut Buffers<T>) -> Result<()> {
    let Call {
        implementation,
        count,
        max_blocks,
    } = call;
    match (implementation.algorithm(), buffers) {
        (Some(algorithm), Buffers::Linkreduce { input, output }) => Ok(rank.comm.all_reduce_with(
            input,
            output,
            CallOptions {
                algorithm,
                zero_copy: true,
                max_blocks,
            },
        )?),
        (None, buffers) => {
            let nccl = rank
                .nccl
                .as_mut()
                .ok_or(CliError::Internal("NCCL was not initialised"))?;
            let (send, recv) = buffers.addresses();
            // SAFETY: both addresses hold `count` elements of T on this
            // rank's device and outlive the enqueued work (synchronised
            // before the buffers drop).
            Ok(unsafe { nccl.all_reduce_raw(T::DTYPE, send, recv, count) }?)
        }
        _ => Err(CliError::Internal(
            "buffers do not match the implementation",
        )),
    }
}

/// One implementation at one size on this rank: its buffers, the
/// correctness check of the buffers that are then timed, and the timing.
fn measure<T: Element + Default>(
    rank: &mut Rank,
    one: Call,
    repetitions: usize,
) -> Result<RankRun> {
    let Call {
        implementation,
        count,
        ..
    } = one;
    let stream = rank.comm.stream().clone();
    let rendezvous = rank.comm.rendezvous().clone();
    let world = rank.comm.world_size();
    let host: Vec<T> = (0..count)
        .map(|i| T::from_f64(small_integer(1, rank.comm.rank(), i)))
        .collect();
    let mut buffers = match implementation {
        Implementation::NcclSymmetric => {
            let nccl = rank
                .nccl
                .as_ref()
                .ok_or(CliError::Internal("NCCL was not initialised"))?;
            let bytes = count * std::mem::size_of::<T>();
            Buffers::Symmetric {
                input: SymmetricBuffer::new(nccl, bytes)?,
                output: SymmetricBuffer::new(nccl, bytes)?,
            }
        }
        Implementation::Nccl => Buffers::Nccl {
            input: rank.comm.alloc::<T>(count)?,
            output: rank.comm.alloc::<T>(count)?,
        },
        _ => {
            let input = rank.comm.alloc::<T>(count)?;
            rank.comm.register(&input)?;
            Buffers::Linkreduce {
                input,
                output: rank.comm.alloc::<T>(count)?,
            }
        }
    };
    let (input_address, output_address) = buffers.addresses();
    // SAFETY: the input holds `count` elements of T.
    unsafe { linkreduce::memory::copy_to_device(&stream, input_address, &host) }?;
    // Correctness first, on the same buffers that are timed.
    call(rank, one, &mut buffers)?;
    stream
        .synchronize()
        .map_err(Error::driver("cuStreamSynchronize"))?;
    let mut result = vec![T::default(); count];
    // SAFETY: the output holds `count` elements of T.
    unsafe { linkreduce::memory::copy_to_host(&stream, &mut result, output_address) }?;
    let wrong = (0..count)
        .filter(|&i| {
            let expected = T::from_f64((0..world).map(|r| small_integer(1, r, i)).sum());
            result[i].to_f64() != expected.to_f64()
        })
        .count();
    let run = time_eager_and_graphed(
        &stream,
        rendezvous.as_ref(),
        count * std::mem::size_of::<T>(),
        repetitions,
        wrong,
        || call(rank, one, &mut buffers),
    )?;
    rank.comm.synchronize()?;
    if let Buffers::Linkreduce { input, .. } = &buffers {
        rank.comm.deregister(input)?;
    }
    Ok(run)
}

/// Writes the tuning table measured by `report`.
fn write_tuning(report: &Report<Row>, path: &std::path::Path) -> Result<()> {
    let facts = &report.facts;
    if facts.gpus.len() < facts.world_size {
        return Err(CliError::Tuning(
            "ranks shared GPUs in this run, so its times say nothing about speed; \
             tune with one rank per GPU",
        ));
    }
    // Default grids first; a smaller grid replaces the fastest only where
    // it is faster by more than the noise (2 %).
    let (own, gridded): (Vec<&Row>, Vec<&Row>) =
        report.rows.iter().partition(|row| row.blocks.is_none());
    let mut fastest: Vec<(usize, TunedPath, Option<u32>, f64)> = Vec::new();
    for row in own.into_iter().chain(gridded) {
        let Some(algorithm) = row.implementation.tuned_path() else {
            continue;
        };
        if row.wrong > 0 || !matches!(row.mode, Mode::Graph) {
            continue;
        }
        let margin = if row.blocks.is_some() { 0.98 } else { 1.0 };
        let candidate = (row.bytes, algorithm, row.blocks, row.time_us);
        match fastest.iter_mut().find(|f| f.0 == row.bytes) {
            Some(best) if best.3 * margin <= row.time_us => {}
            Some(best) => *best = candidate,
            None => fastest.push(candidate),
        }
    }
    if fastest.is_empty() {
        return Err(CliError::Tuning(
            "no forced linkreduce algorithm (one-stage, two-stage, push, chunked-push) was \
             timed with right results",
        ));
    }
    let winners: Vec<(usize, TunedPath, Option<u32>)> =
        fastest.iter().map(|f| (f.0, f.1, f.2)).collect();
    let tuning = linkreduce::Tuning {
        measured_on: format!(
            "{} x {}, {} ranks as {}, commit {}{}",
            facts.gpus.len(),
            facts.gpus.first().map_or("?", String::as_str),
            facts.world_size,
            facts.mode,
            facts.commit.as_deref().unwrap_or("unknown"),
            if facts.programmatic_launch {
                ", programmatic launches"
            } else {
                ""
            }
        ),
        entries: linkreduce::Tuning::from_fastest(facts.world_size, &winners),
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

#[cfg(test)]
mod tests {
    use super::super::RunFacts;
    use super::*;

    fn row(bytes: usize, implementation: Implementation, mode: Mode, time_us: f64) -> Row {
        Row {
            bytes,
            count: bytes / 2,
            dtype: DType::BF16,
            implementation,
            path: None,
            blocks: None,
            mode,
            time_us,
            algbw_gbps: 0.0,
            busbw_gbps: 0.0,
            wrong: 0,
            speedup_vs_nccl: None,
        }
    }

    fn facts(gpus: usize) -> RunFacts {
        RunFacts {
            command: "test".into(),
            commit: None,
            mode: "threads",
            gpus: vec!["GPU".into(); gpus],
            rank_gpus: vec![0, gpus - 1],
            driver: String::new(),
            nccl: String::new(),
            world_size: 2,
            max_blocks: Some(1),
            programmatic_launch: false,
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
            // Smaller grids: one within the noise of the default's best
            // (kept out), one clearly faster (taken, with its grid).
            Row {
                blocks: Some(33),
                ..row(1 << 20, OneStage, Mode::Graph, 7.9)
            },
            Row {
                blocks: Some(66),
                ..row(1 << 28, TwoStage, Mode::Graph, 700.0)
            },
            wrong,
        ];
        let report = Report {
            op: Op::AllReduce,
            facts: facts(2),
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
        assert_eq!(tuning.blocks(2, 1 << 20, Algorithm::OneStage), None);
        assert_eq!(tuning.blocks(2, 1 << 28, Algorithm::TwoStage), Some(66));
        assert_eq!(tuning.pick(4, 1024), None);
        let shared = Report {
            facts: facts(1),
            ..report
        };
        assert!(write_tuning(&shared, &path).is_err());
    }

    #[test]
    fn the_report_keeps_its_fields_at_the_top_level_and_names_its_op() {
        let report = Report {
            op: Op::AllReduce,
            facts: facts(2),
            rows: vec![row(1024, Implementation::Auto, Mode::Graph, 2.0)],
        };
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["op"], "all-reduce");
        assert_eq!(json["world_size"], 2);
        assert_eq!(json["programmatic_launch"], false);
        assert_eq!(json["gpus"][1], "GPU");
        assert_eq!(json["rows"][0]["implementation"], "auto");
        assert_eq!(json["rows"][0]["mode"], "graph");
    }
}
