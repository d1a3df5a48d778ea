//! `bench --op all-reduce`: sizes x implementations (linkreduce's
//! algorithms, automatic or forced, and NCCL with plain or symmetric
//! buffers) through the shared sweep (sweep.rs), and the tuning table.

use std::fmt;

use linkreduce::nccl::SymmetricBuffer;
use linkreduce::verify::values::small_integer;
use linkreduce::{
    Algorithm, AlgorithmChoice, CallOptions, Communicator, DType, DeviceBuffer, Element, Error,
    TunedPath,
};
use serde::Serialize;

use super::measure::{time_eager_and_graphed, Rank, RankRun};
use super::sweep::{sweep_rank, write_report, Row};
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

/// Every implementation and size on this rank; rank 0 prints and writes
/// the report and the tuning table. Returns whether every result was right.
pub(super) fn bench_rank(comm: &mut Communicator, args: &Args, sweep: &Sweep) -> Result<bool> {
    let repetitions = args.repetitions;
    let measure = |rank: &mut Rank, implementation, count| match args.dtype {
        DType::F32 => measure::<f32>(rank, implementation, count, repetitions),
        DType::F16 => measure::<half::f16>(rank, implementation, count, repetitions),
        DType::BF16 => measure::<half::bf16>(rank, implementation, count, repetitions),
    };
    let path_of = |comm: &Communicator, implementation: Implementation, bytes| match implementation
        .algorithm()
    {
        Some(AlgorithmChoice::Auto) => Some(comm.path_for(bytes).name().to_string()),
        Some(choice) => Some(choice.to_string()),
        None => None,
    };
    let (right, report) = sweep_rank(
        comm,
        args,
        Op::AllReduce,
        &sweep.sizes,
        &sweep.implementations,
        measure,
        path_of,
    )?;
    if let Some(report) = report {
        if let Some(path) = &args.tune_out {
            write_tuning(&report, path)?;
        }
        if let Some(path) = &args.json {
            write_report(&report, path)?;
        }
    }
    Ok(right)
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

fn call<T: Element>(
    rank: &mut Rank,
    implementation: Implementation,
    buffers: &mut Buffers<T>,
    count: usize,
) -> Result<()> {
    match (implementation.algorithm(), buffers) {
        (Some(algorithm), Buffers::Linkreduce { input, output }) => Ok(rank.comm.all_reduce_with(
            input,
            output,
            CallOptions {
                algorithm,
                zero_copy: true,
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
    implementation: Implementation,
    count: usize,
    repetitions: usize,
) -> Result<RankRun> {
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
    call(rank, implementation, &mut buffers, count)?;
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
        || call(rank, implementation, &mut buffers, count),
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
