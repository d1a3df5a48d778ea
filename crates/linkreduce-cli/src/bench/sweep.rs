//! The size sweep of the collectives (all-reduce, reduce-scatter,
//! all-gather): implementations outer, sizes inner, each timed eagerly and
//! graphed, with bandwidths by NCCL's definitions, wrong-element counts and
//! the ratio to NCCL; the table, and the JSON report with its plot.

use linkreduce::{Communicator, DType};
use serde::Serialize;

use super::all_reduce::Implementation;
use super::measure::{slowest_rank, Rank, RankRun};
use super::{nccl_or_warn, progress_bar, write_json, Args, Mode, Op, Report, RunFacts};
use crate::error::Result;
use crate::sizes::format_size;

#[derive(Debug, Clone, Serialize)]
pub(super) struct Row {
    /// All-reduce: the buffer; reduce-scatter: each rank's receive block;
    /// all-gather: each rank's send block.
    pub bytes: usize,
    /// Elements of `bytes`.
    pub count: usize,
    pub dtype: DType,
    pub implementation: Implementation,
    /// For linkreduce's implementations, the path its calls took
    /// (`one-stage`, `two-stage`, `push` or `nccl`): automatic calls show
    /// the choice at each size.
    pub path: Option<String>,
    /// The grid `linkreduce tune` forced on a forced algorithm (at most
    /// this many blocks); None: the call's own.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blocks: Option<u32>,
    pub mode: Mode,
    /// Median over repetitions of the slowest rank's time per call.
    pub time_us: f64,
    pub algbw_gbps: f64,
    pub busbw_gbps: f64,
    pub wrong: usize,
    /// NCCL's time over this one's in the same run and mode (>1: faster).
    pub speedup_vs_nccl: Option<f64>,
}

/// (algbw, busbw) in GB/s of one call of `op` on `world` ranks, by NCCL's
/// definitions (nccl-tests' PERFORMANCE.md): all-reduce moves the buffer
/// (`bytes`), algbw = bytes / time, busbw = algbw x 2(W-1)/W; reduce-scatter
/// and all-gather move W blocks of `bytes`, algbw = W x bytes / time, busbw
/// = algbw x (W-1)/W.
pub(super) fn bandwidths(op: Op, bytes: usize, world: usize, time_us: f64) -> (f64, f64) {
    let w = world as f64;
    let (moved, bus_factor) = match op {
        Op::ReduceScatter | Op::AllGather => (bytes as f64 * w, (w - 1.0) / w),
        Op::AllReduce | Op::FusedNorm => (bytes as f64, 2.0 * (w - 1.0) / w),
    };
    let algbw = moved / (time_us * 1e3);
    (algbw, algbw * bus_factor)
}

/// How a sweep names what its calls took at a size: the path
/// (`path_of`) and a grid the sweep forced (`blocks_of`), given the
/// implementation and the size in bytes.
pub(super) struct Labels<P, B> {
    pub path_of: P,
    pub blocks_of: B,
}

/// Every implementation and size of `op` on this rank. `measure` checks
/// and times one implementation at one count of `args.dtype`; `labels`
/// name what it took. Returns whether every result was right, and on rank
/// 0 the report (printed already).
pub(super) fn sweep_rank<P, B>(
    comm: &mut Communicator,
    args: &Args,
    op: Op,
    sizes: &[usize],
    implementations: &[Implementation],
    mut measure: impl FnMut(&mut Rank, Implementation, usize) -> Result<RankRun>,
    labels: Labels<P, B>,
) -> Result<(bool, Option<Report<Row>>)>
where
    P: Fn(&Communicator, Implementation, usize) -> Option<String>,
    B: Fn(&Communicator, Implementation, usize) -> Option<u32>,
{
    let world = comm.world_size();
    let leader = comm.rank() == 0;
    let rendezvous = comm.rendezvous().clone();
    let wants_nccl = implementations.iter().any(|i| i.is_nccl());
    let nccl = if wants_nccl { nccl_or_warn(comm) } else { None };
    let facts = RunFacts::gather(comm, args.mode)?;
    let progress = progress_bar(leader, sizes.len() * implementations.len());
    let mut rank = Rank { comm, nccl };
    let mut rows = Vec::new();
    if leader {
        print_header();
    }
    // Implementations outer, sizes inner: NCCL's rows exist before the
    // ratios need them, and one implementation that stalls costs only its
    // own rows.
    for &implementation in implementations {
        if implementation.is_nccl() && rank.nccl.is_none() {
            progress.inc(sizes.len() as u64);
            continue;
        }
        for &bytes in sizes {
            let count = bytes / args.dtype.size();
            if count == 0 {
                continue;
            }
            progress.set_message(format!("{} {implementation}", format_size(bytes)));
            let mine = measure(&mut rank, implementation, count)?;
            let measured = slowest_rank(rendezvous.as_ref(), &mine)?;
            let path = (labels.path_of)(rank.comm, implementation, bytes);
            let blocks = (labels.blocks_of)(rank.comm, implementation, bytes);
            for (mode, time_us) in [
                (Mode::Eager, measured.eager_us),
                (Mode::Graph, measured.graph_us),
            ] {
                let (algbw_gbps, busbw_gbps) = bandwidths(op, bytes, world, time_us);
                let mut row = Row {
                    bytes,
                    count,
                    dtype: args.dtype,
                    implementation,
                    path: path.clone(),
                    blocks,
                    mode,
                    time_us,
                    algbw_gbps,
                    busbw_gbps,
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
    let right = rows.iter().all(|r| r.wrong == 0);
    if !leader {
        return Ok((right, None));
    }
    rows.sort_by_key(|r| (r.bytes, r.implementation as u8, r.mode as u8));
    println!();
    print_header();
    rows.iter().for_each(print_row);
    Ok((right, Some(Report { op, facts, rows })))
}

/// Writes the JSON report and its plot beside it. A plot that cannot be
/// drawn (no font on this machine) is a warning: `linkreduce plot` can
/// draw it elsewhere from the JSON.
pub(super) fn write_report(report: &Report<Row>, path: &std::path::Path) -> Result<()> {
    let text = write_json(report, path)?;
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

/// NCCL's time over `row`'s at the same size and mode (>1: `row` is faster).
fn speedup_vs_nccl(rows: &[Row], row: &Row) -> Option<f64> {
    rows.iter()
        .find(|r| {
            r.implementation == Implementation::Nccl && r.bytes == row.bytes && r.mode == row.mode
        })
        .map(|nccl| nccl.time_us / row.time_us)
}

/// The implementation as the table prints it: automatic calls with the
/// path they took, as in `linkreduce(one-stage)`; a forced grid after an
/// `@`, as in `lr-one-stage@66`.
fn label(row: &Row) -> String {
    match (row.implementation, &row.path, row.blocks) {
        (Implementation::Auto, Some(path), _) => format!("{}({path})", row.implementation),
        (_, _, Some(blocks)) => format!("{}@{blocks}", row.implementation),
        _ => row.implementation.to_string(),
    }
}

fn header() -> String {
    format!(
        "{:>9} {:>11} {:>5} {:>21} {:>6} {:>10} {:>9} {:>9} {:>6} {:>8}",
        "size", "count", "type", "impl", "mode", "time(us)", "algbw", "busbw", "wrong", "vs nccl"
    )
}

fn print_header() {
    println!("{}", header());
}

fn format_row(row: &Row) -> String {
    let ratio = row
        .speedup_vs_nccl
        .map(|r| format!("{r:.2}x"))
        .unwrap_or_else(|| "-".into());
    format!(
        "{:>9} {:>11} {:>5} {:>21} {:>6} {:>10.2} {:>9.2} {:>9.2} {:>6} {:>8}",
        format_size(row.bytes),
        row.count,
        row.dtype.name(),
        label(row),
        row.mode.name(),
        row.time_us,
        row.algbw_gbps,
        row.busbw_gbps,
        row.wrong,
        ratio
    )
}

fn print_row(row: &Row) {
    println!("{}", format_row(row));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bandwidths_follow_nccl_definitions_per_op() {
        // 8 ranks, 1 MB blocks in 10 us: W x 1 MB / 10 us = 800 GB/s.
        for op in [Op::ReduceScatter, Op::AllGather] {
            let (algbw, busbw) = bandwidths(op, 1_000_000, 8, 10.0);
            assert!((algbw - 800.0).abs() < 1e-9, "{op}: {algbw}");
            assert!((busbw - 700.0).abs() < 1e-9, "{op}: {busbw}");
        }
        let (algbw, busbw) = bandwidths(Op::AllReduce, 1_000_000, 8, 10.0);
        assert!((algbw - 100.0).abs() < 1e-9, "{algbw}");
        assert!((busbw - 175.0).abs() < 1e-9, "{busbw}");
        // Two ranks: each moves half of the gathered buffer.
        let (algbw, busbw) = bandwidths(Op::AllGather, 1000, 2, 1.0);
        assert_eq!((algbw, busbw), (2.0, 1.0));
    }

    #[test]
    fn rows_line_up_with_the_header_and_name_the_path_taken() {
        let row = Row {
            bytes: 4096,
            count: 2048,
            dtype: DType::BF16,
            implementation: Implementation::Auto,
            path: Some("one-stage".into()),
            blocks: None,
            mode: Mode::Graph,
            time_us: 8.0,
            algbw_gbps: 4.096,
            busbw_gbps: 3.584,
            wrong: 0,
            speedup_vs_nccl: None,
        };
        let nccl = Row {
            implementation: Implementation::Nccl,
            path: None,
            time_us: 12.0,
            ..row.clone()
        };
        let row = Row {
            speedup_vs_nccl: speedup_vs_nccl(std::slice::from_ref(&nccl), &row),
            ..row
        };
        let line = format_row(&row);
        assert_eq!(line.len(), header().len(), "\n{}\n{line}", header());
        assert_eq!(
            line.split_whitespace().collect::<Vec<_>>(),
            [
                "4K",
                "2048",
                "bf16",
                "linkreduce(one-stage)",
                "graph",
                "8.00",
                "4.10",
                "3.58",
                "0",
                "1.50x"
            ]
        );
        assert_eq!(format_row(&nccl).split_whitespace().nth(3), Some("nccl"));
        assert_eq!(format_row(&nccl).split_whitespace().last(), Some("-"));
        let gridded = Row {
            implementation: Implementation::OneStage,
            blocks: Some(66),
            ..nccl
        };
        assert_eq!(
            format_row(&gridded).split_whitespace().nth(3),
            Some("lr-one-stage@66")
        );
    }
}
