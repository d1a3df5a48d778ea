//! `bench --op fused-norm`: the all-reduce fused with residual add and
//! RMSNorm (docs/fused.md) against the unfused sequences a model would run
//! otherwise: our all-reduce, then the plain kernel; NCCL's, then the same
//! plain kernel. Every implementation's first call, from the same residual,
//! is checked bit for bit against the library's host mirror before it is
//! timed.

use std::fmt;

use linkreduce::verify::norm::add_rms_norm_row;
use linkreduce::verify::values;
use linkreduce::{
    AlgorithmChoice, CallOptions, CallPath, Communicator, DType, DeviceBuffer, Element, RmsNorm,
};
use serde::Serialize;

use super::measure::{slowest_rank, time_eager_and_graphed, Rank, RankRun};
use super::{nccl_or_warn, progress_bar, write_json, Args, Mode, Op, Report, RunFacts};
use crate::error::{CliError, Result};
use crate::sizes::format_size;

const DEFAULT_ROWS: [usize; 6] = [1, 8, 32, 128, 512, 2048];
const DEFAULT_HIDDEN: [usize; 2] = [4096, 8192];

/// A usual RMSNorm epsilon; the time does not depend on it.
const EPS: f32 = 1e-6;

/// Seeds of the library's generator (random, non-integer, mixed sign and
/// magnitude) for the inputs, the residual and the weight.
const INPUT_SEED: u64 = 14;
const RESIDUAL_SEED: u64 = 15;
const WEIGHT_SEED: u64 = 16;

/// The generator's rank for the residual and weight, which every rank
/// shares as in a model: no rank's own (the generator keeps a rank's low 8
/// bits, and worlds have at most 8 ranks).
const SHARED_RANK: u32 = 255;

/// The shapes of one run: every (rows, hidden) pair.
#[derive(Debug)]
pub(super) struct Shapes {
    rows: Vec<usize>,
    hidden: Vec<usize>,
}

impl Shapes {
    /// The shapes asked for (or the defaults), refusing what the fused
    /// call cannot take.
    pub fn new(dtype: DType, rows: Option<&[usize]>, hidden: Option<&[usize]>) -> Result<Shapes> {
        if dtype == DType::F32 {
            return Err(CliError::BadArgument {
                arg: "--dtype f32".into(),
                problem: "the fused norm takes f16 and bf16 activations only; pass --dtype bf16 \
                          or --dtype f16"
                    .into(),
            });
        }
        for (flag, values) in [("--rows", rows), ("--hidden", hidden)] {
            if values.is_some_and(|values| values.contains(&0)) {
                return Err(CliError::BadArgument {
                    arg: format!("{flag} 0"),
                    problem: "must be at least 1".into(),
                });
            }
        }
        Ok(Shapes {
            rows: rows.unwrap_or(&DEFAULT_ROWS).to_vec(),
            hidden: hidden.unwrap_or(&DEFAULT_HIDDEN).to_vec(),
        })
    }

    /// (rows, hidden) in the order they are timed: hidden outer.
    fn each(&self) -> impl Iterator<Item = Shape> + '_ {
        (self.hidden.iter())
            .flat_map(|&hidden| self.rows.iter().map(move |&rows| Shape { rows, hidden }))
    }

    fn count(&self) -> usize {
        self.rows.len() * self.hidden.len()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Shape {
    rows: usize,
    hidden: usize,
}

impl Shape {
    fn elements(self) -> usize {
        self.rows * self.hidden
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Implementation {
    /// `all_reduce_add_rms_norm_on`, automatic path.
    Fused,
    /// Our all-reduce (automatic path), then `add_rms_norm_on`.
    LinkreduceThenNorm,
    /// NCCL's all-reduce, then `add_rms_norm_on`.
    NcclThenNorm,
}

const IMPLEMENTATIONS: [Implementation; 3] = [
    Implementation::Fused,
    Implementation::LinkreduceThenNorm,
    Implementation::NcclThenNorm,
];

impl Implementation {
    fn name(self) -> &'static str {
        match self {
            Implementation::Fused => "fused",
            Implementation::LinkreduceThenNorm => "lr+norm",
            Implementation::NcclThenNorm => "nccl+norm",
        }
    }

    /// Whether its results are compared with the mirror on `world` ranks
    /// when our automatic all-reduce takes `path`: our kernels sum in rank
    /// order as the mirror does (docs/fused.md, "Rounding"); NCCL, called
    /// directly or on our NCCL path, rounds partial sums in its own order
    /// beyond two ranks, so its last bits may differ with nothing wrong.
    fn compared(self, world: usize, path: &CallPath) -> bool {
        world <= 2 || (self != Implementation::NcclThenNorm && path.algorithm().is_some())
    }
}

impl fmt::Display for Implementation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Serialize for Implementation {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.name())
    }
}

#[derive(Debug, Clone, Serialize)]
struct Row {
    rows: usize,
    hidden: usize,
    bytes: usize,
    dtype: DType,
    implementation: Implementation,
    /// For our implementations, the all-reduce path of the call
    /// (the kernels' algorithms fuse, `nccl` does not; docs/fused.md).
    path: Option<String>,
    mode: Mode,
    /// Median over repetitions of the slowest rank's time per call.
    time_us: f64,
    /// Elements of normed output and residual unlike the host mirror's;
    /// None where not compared (NCCL beyond two ranks).
    wrong: Option<usize>,
    /// lr+norm's time over this one's in the same shape and mode (>1:
    /// faster).
    speedup_vs_lr_norm: Option<f64>,
    /// nccl+norm's time over this one's in the same shape and mode.
    speedup_vs_nccl_norm: Option<f64>,
}

/// Every shape and implementation on this rank; rank 0 prints and writes
/// the report. Returns whether every compared result was right.
pub(super) fn bench_rank(comm: &mut Communicator, args: &Args, shapes: &Shapes) -> Result<bool> {
    let world = comm.world_size();
    let leader = comm.rank() == 0;
    let rendezvous = comm.rendezvous().clone();
    let nccl = nccl_or_warn(comm);
    let facts = RunFacts::gather(comm, args.mode)?;
    let implementations: Vec<Implementation> = IMPLEMENTATIONS
        .into_iter()
        .filter(|&i| i != Implementation::NcclThenNorm || nccl.is_some())
        .collect();
    let progress = progress_bar(leader, shapes.count());
    let mut rank = Rank { comm, nccl };
    let mut rows = Vec::new();
    if leader {
        println!("{}", header());
    }
    for shape in shapes.each() {
        progress.set_message(format!("{} rows x {}", shape.rows, shape.hidden));
        let runs = match args.dtype {
            DType::F16 => {
                bench_shape::<half::f16>(&mut rank, &implementations, shape, args.repetitions)
            }
            DType::BF16 => {
                bench_shape::<half::bf16>(&mut rank, &implementations, shape, args.repetitions)
            }
            DType::F32 => Err(CliError::Internal("f32 reached the fused-norm benchmark")),
        }?;
        let bytes = shape.elements() * args.dtype.size();
        let mut of_shape = Vec::new();
        let path = rank.comm.path_for(bytes);
        for (implementation, run) in runs {
            let measured = slowest_rank(rendezvous.as_ref(), &run)?;
            let path_name =
                (implementation != Implementation::NcclThenNorm).then(|| path.name().to_string());
            for (mode, time_us) in [
                (Mode::Eager, measured.eager_us),
                (Mode::Graph, measured.graph_us),
            ] {
                of_shape.push(Row {
                    rows: shape.rows,
                    hidden: shape.hidden,
                    bytes,
                    dtype: args.dtype,
                    implementation,
                    path: path_name.clone(),
                    mode,
                    time_us,
                    wrong: implementation
                        .compared(world, &path)
                        .then_some(measured.wrong),
                    speedup_vs_lr_norm: None,
                    speedup_vs_nccl_norm: None,
                });
            }
        }
        set_ratios(&mut of_shape);
        if leader {
            progress.suspend(|| {
                of_shape
                    .iter()
                    .for_each(|row| println!("{}", format_row(row)))
            });
        }
        rows.extend(of_shape);
        progress.inc(1);
    }
    progress.finish_and_clear();
    let wrong: usize = rows.iter().filter_map(|r| r.wrong).sum();
    if let (true, Some(path)) = (leader, &args.json) {
        let report = Report {
            op: Op::FusedNorm,
            facts,
            rows,
        };
        write_json(&report, path)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(wrong == 0)
}

/// One shape's data on this rank, as storage bits, and what every
/// implementation must leave in the residual and the normed output.
struct HostData {
    input: Vec<u32>,
    residual: Vec<u32>,
    weight: Vec<u32>,
    expected_residual: Vec<u32>,
    expected_out: Vec<u32>,
}

impl HostData {
    fn new(dtype: DType, rank: usize, world: usize, shape: Shape) -> HostData {
        let len = shape.elements() as u64;
        let shared = |seed, count: u64| -> Vec<u32> {
            (0..count)
                .map(|i| values::input_bits(dtype, seed, SHARED_RANK, i))
                .collect()
        };
        // No input is -0: push would send it as +0 (it is push's marker)
        // where NCCL keeps it, and an automatic call may take push.
        let input = (0..len)
            .map(|i| values::unmarked(dtype, values::input_bits(dtype, INPUT_SEED, rank as u32, i)))
            .collect();
        let residual = shared(RESIDUAL_SEED, len);
        let weight = shared(WEIGHT_SEED, shape.hidden as u64);
        // `true`: every rank's input with -0 rewritten, as above.
        let sum: Vec<u32> = (0..len)
            .map(|i| values::sum_bits(dtype, INPUT_SEED, world as u32, i, true))
            .collect();
        let mut expected_residual = residual.clone();
        let expected_out = (expected_residual.chunks_mut(shape.hidden))
            .zip(sum.chunks(shape.hidden))
            .flat_map(|(row, sum)| add_rms_norm_row(dtype, sum, row, &weight, EPS))
            .collect();
        HostData {
            input,
            residual,
            weight,
            expected_residual,
            expected_out,
        }
    }

    /// Elements of `out` and `residual` (storage bits) unlike the mirror's.
    fn wrong(&self, out: &[u32], residual: &[u32]) -> usize {
        let unlike = |got: &[u32], expected: &[u32]| {
            got.iter().zip(expected).filter(|(g, e)| g != e).count()
        };
        unlike(out, &self.expected_out) + unlike(residual, &self.expected_residual)
    }
}

/// Storage bits as elements (exact: the bits are of T's dtype).
fn elements<T: Element>(bits: &[u32]) -> Vec<T> {
    (bits.iter())
        .map(|&b| T::from_f64(f64::from(values::to_f32(T::DTYPE, b))))
        .collect()
}

/// Elements as storage bits (exact).
fn storage_bits<T: Element>(elements: &[T]) -> Vec<u32> {
    (elements.iter())
        .map(|e| values::round_to(T::DTYPE, e.to_f64() as f32))
        .collect()
}

/// The buffers every implementation reads, and the sum the unfused ones
/// all-reduce into.
struct Operands<T> {
    input: DeviceBuffer<T>,
    weight: DeviceBuffer<T>,
    sum: DeviceBuffer<T>,
}

/// What one implementation updates and writes.
struct Results<T> {
    residual: DeviceBuffer<T>,
    out: DeviceBuffer<T>,
}

/// One call of `implementation` on this rank's stream.
fn call<T: Element>(
    rank: &mut Rank,
    implementation: Implementation,
    operands: &mut Operands<T>,
    results: &mut Results<T>,
) -> Result<()> {
    let stream = rank.comm.stream().clone();
    let Operands { input, weight, sum } = operands;
    let norm = RmsNorm {
        weight: &*weight,
        eps: EPS,
    };
    // The input is registered: read in place, as the all-reduce bench does.
    let options = CallOptions {
        algorithm: AlgorithmChoice::Auto,
        zero_copy: true,
        max_blocks: None,
    };
    let Results { residual, out } = results;
    match implementation {
        Implementation::Fused => {
            return Ok(rank
                .comm
                .all_reduce_add_rms_norm_on(&stream, input, residual, norm, out, options)?);
        }
        Implementation::LinkreduceThenNorm => rank.comm.all_reduce_with(input, sum, options)?,
        Implementation::NcclThenNorm => rank
            .nccl
            .as_mut()
            .ok_or(CliError::Internal("NCCL was not initialised"))?
            .all_reduce(input, sum)?,
    }
    Ok(rank
        .comm
        .add_rms_norm_on(&stream, sum, residual, norm, out)?)
}

/// Every implementation at one shape on this rank: each checked from the
/// same residual, then timed.
fn bench_shape<T: Element + Default>(
    rank: &mut Rank,
    implementations: &[Implementation],
    shape: Shape,
    repetitions: usize,
) -> Result<Vec<(Implementation, RankRun)>> {
    let world = rank.comm.world_size();
    let path = rank.comm.path_for(shape.elements() * T::DTYPE.size());
    let data = HostData::new(T::DTYPE, rank.comm.rank(), world, shape);
    let stream = rank.comm.stream().clone();
    let rendezvous = rank.comm.rendezvous().clone();
    let mut operands = Operands {
        input: rank.comm.upload(&elements::<T>(&data.input))?,
        weight: rank.comm.upload(&elements::<T>(&data.weight))?,
        sum: rank.comm.alloc::<T>(shape.elements())?,
    };
    rank.comm.register(&operands.input)?;
    let residual = elements::<T>(&data.residual);
    let mut runs = Vec::new();
    for &implementation in implementations {
        // A fresh residual each: every call adds into it in place.
        let mut results = Results {
            residual: rank.comm.upload(&residual)?,
            out: rank.comm.alloc::<T>(shape.elements())?,
        };
        call(rank, implementation, &mut operands, &mut results)?;
        rank.comm.synchronize()?;
        let wrong = if implementation.compared(world, &path) {
            let out = storage_bits(&rank.comm.download(&results.out)?);
            let residual = storage_bits(&rank.comm.download(&results.residual)?);
            data.wrong(&out, &residual)
        } else {
            0
        };
        let run = time_eager_and_graphed(
            &stream,
            rendezvous.as_ref(),
            shape.elements() * T::DTYPE.size(),
            repetitions,
            wrong,
            || call(rank, implementation, &mut operands, &mut results),
        )?;
        rank.comm.synchronize()?;
        runs.push((implementation, run));
    }
    rank.comm.deregister(&operands.input)?;
    Ok(runs)
}

/// Sets each row's ratios to the unfused sequences of its shape (`rows`
/// holds one shape) in the same mode.
fn set_ratios(rows: &mut [Row]) {
    let time_of = |rows: &[Row], implementation, mode| {
        (rows.iter())
            .find(|r| r.implementation == implementation && r.mode == mode)
            .map(|r| r.time_us)
    };
    for i in 0..rows.len() {
        let (mode, time_us) = (rows[i].mode, rows[i].time_us);
        let lr_norm = time_of(rows, Implementation::LinkreduceThenNorm, mode);
        let nccl_norm = time_of(rows, Implementation::NcclThenNorm, mode);
        rows[i].speedup_vs_lr_norm = lr_norm.map(|t| t / time_us);
        rows[i].speedup_vs_nccl_norm = nccl_norm.map(|t| t / time_us);
    }
}

fn header() -> String {
    format!(
        "{:>5} {:>6} {:>7} {:>20} {:>5} {:>10} {:>6} {:>10} {:>12}",
        "rows",
        "hidden",
        "bytes",
        "impl",
        "mode",
        "time(us)",
        "wrong",
        "vs lr+norm",
        "vs nccl+norm"
    )
}

fn format_row(row: &Row) -> String {
    let ratio = |r: Option<f64>| r.map_or_else(|| "-".into(), |r| format!("{r:.2}x"));
    let label = match &row.path {
        Some(path) => format!("{}({path})", row.implementation),
        None => row.implementation.to_string(),
    };
    format!(
        "{:>5} {:>6} {:>7} {:>20} {:>5} {:>10.2} {:>6} {:>10} {:>12}",
        row.rows,
        row.hidden,
        format_size(row.bytes),
        label,
        row.mode.name(),
        row.time_us,
        row.wrong.map_or_else(|| "-".into(), |w| w.to_string()),
        ratio(row.speedup_vs_lr_norm),
        ratio(row.speedup_vs_nccl_norm),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use linkreduce::{Algorithm, NcclReason};

    #[test]
    fn shapes_default_to_the_issue_sweep_hidden_outer() {
        let shapes = Shapes::new(DType::BF16, None, None).unwrap();
        assert_eq!(shapes.count(), 12);
        let each: Vec<Shape> = shapes.each().collect();
        assert_eq!(
            each[0],
            Shape {
                rows: 1,
                hidden: 4096
            }
        );
        assert_eq!(
            each[5],
            Shape {
                rows: 2048,
                hidden: 4096
            }
        );
        assert_eq!(
            each[6],
            Shape {
                rows: 1,
                hidden: 8192
            }
        );
        let asked = Shapes::new(DType::F16, Some(&[3]), Some(&[100, 7])).unwrap();
        let each: Vec<Shape> = asked.each().collect();
        assert_eq!(
            each,
            [
                Shape {
                    rows: 3,
                    hidden: 100
                },
                Shape { rows: 3, hidden: 7 }
            ]
        );
    }

    #[test]
    fn f32_and_empty_shapes_are_refused() {
        let f32 = Shapes::new(DType::F32, None, None).unwrap_err().to_string();
        assert!(
            f32.contains("--dtype f32") && f32.contains("--dtype bf16"),
            "{f32}"
        );
        let rows = Shapes::new(DType::BF16, Some(&[8, 0]), None).unwrap_err();
        assert_eq!(
            rows.to_string(),
            "invalid argument --rows 0: must be at least 1"
        );
        assert!(Shapes::new(DType::BF16, None, Some(&[0])).is_err());
    }

    #[test]
    fn inputs_avoid_push_marker_and_the_mirror_counts_each_unlike_element() {
        let shape = Shape {
            rows: 3,
            hidden: 40,
        };
        let data = HostData::new(DType::BF16, 1, 2, shape);
        assert!(!data.input.contains(&0x8000));
        // Random, not integers: sums round.
        let integers = (data.input.iter())
            .filter(|&&b| values::to_f32(DType::BF16, b).fract() == 0.0)
            .count();
        assert!(integers < data.input.len() / 4, "{integers} integers");
        let (out, mut residual) = (data.expected_out.clone(), data.expected_residual.clone());
        assert_eq!(data.wrong(&out, &residual), 0);
        residual[7] ^= 1;
        assert_eq!(data.wrong(&out, &residual), 1);
        let mut out = out;
        out[0] ^= 0x8000;
        assert_eq!(data.wrong(&out, &residual), 2);
        // Every rank expects the same results from its own input.
        let other = HostData::new(DType::BF16, 0, 2, shape);
        assert_ne!(other.input, data.input);
        assert_eq!(other.expected_out, data.expected_out);
    }

    #[test]
    fn bits_survive_the_round_trip_through_elements() {
        let bits: Vec<u32> = vec![0, 0x8000, 0x3f80, 0xc2f7, 0x0001, 0x7f7f];
        assert_eq!(storage_bits(&elements::<half::bf16>(&bits)), bits);
        let half_bits: Vec<u32> = vec![0, 0x8000, 0x3c00, 0x7bff, 0x0001];
        assert_eq!(storage_bits(&elements::<half::f16>(&half_bits)), half_bits);
    }

    #[test]
    fn nccl_sums_are_compared_on_two_ranks_only() {
        use Implementation::{Fused, LinkreduceThenNorm, NcclThenNorm};
        let kernels = CallPath::Custom(Algorithm::OneStage);
        let tuned_nccl = CallPath::Nccl(NcclReason::Tuned);
        for implementation in IMPLEMENTATIONS {
            assert!(implementation.compared(2, &tuned_nccl));
            assert!(!implementation.compared(4, &tuned_nccl));
        }
        assert!(Fused.compared(8, &kernels));
        assert!(LinkreduceThenNorm.compared(8, &kernels));
        assert!(!NcclThenNorm.compared(4, &kernels));
    }

    fn row(implementation: Implementation, mode: Mode, time_us: f64) -> Row {
        Row {
            rows: 8,
            hidden: 4096,
            bytes: 8 * 4096 * 2,
            dtype: DType::BF16,
            implementation,
            path: (implementation != Implementation::NcclThenNorm).then(|| "one-stage".into()),
            mode,
            time_us,
            wrong: Some(0),
            speedup_vs_lr_norm: None,
            speedup_vs_nccl_norm: None,
        }
    }

    #[test]
    fn ratios_compare_within_a_mode_and_the_table_lines_up() {
        use Implementation::{Fused, LinkreduceThenNorm, NcclThenNorm};
        let mut rows = vec![
            row(Fused, Mode::Eager, 5.0),
            row(Fused, Mode::Graph, 2.0),
            row(LinkreduceThenNorm, Mode::Eager, 10.0),
            row(LinkreduceThenNorm, Mode::Graph, 4.0),
            row(NcclThenNorm, Mode::Graph, 8.0),
        ];
        rows[4].wrong = None;
        set_ratios(&mut rows);
        assert_eq!(rows[0].speedup_vs_lr_norm, Some(2.0));
        assert_eq!(rows[0].speedup_vs_nccl_norm, None);
        assert_eq!(rows[1].speedup_vs_nccl_norm, Some(4.0));
        assert_eq!(rows[3].speedup_vs_lr_norm, Some(1.0));
        let header = header();
        let line = format_row(&rows[1]);
        assert_eq!(line.len(), header.len(), "\n{header}\n{line}");
        assert_eq!(
            line.split_whitespace().collect::<Vec<_>>(),
            [
                "8",
                "4096",
                "64K",
                "fused(one-stage)",
                "graph",
                "2.00",
                "0",
                "2.00x",
                "4.00x"
            ]
        );
        let nccl = format_row(&rows[4]);
        assert_eq!(nccl.len(), header.len());
        assert_eq!(
            nccl.split_whitespace().skip(3).collect::<Vec<_>>(),
            ["nccl+norm", "graph", "8.00", "-", "0.50x", "1.00x"]
        );
        let json = serde_json::to_value(&rows[4]).unwrap();
        assert_eq!(json["implementation"], "nccl+norm");
        assert_eq!(json["wrong"], serde_json::Value::Null);
    }
}
