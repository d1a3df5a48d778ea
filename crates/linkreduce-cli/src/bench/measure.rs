//! Timing on one rank, shared by every op: calls eager and captured in a
//! CUDA graph, events around repetitions that start after a barrier of all
//! ranks, and the slowest rank's figures gathered over the rendezvous.

use std::sync::Arc;

use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaEvent, CudaGraph, CudaStream};
use linkreduce::nccl::NcclComm;
use linkreduce::rendezvous::Rendezvous;
use linkreduce::{Communicator, Error};

use crate::error::{CliError, Result};

/// One rank's state kept across sizes.
pub(super) struct Rank<'a> {
    pub comm: &'a mut Communicator,
    pub nccl: Option<NcclComm>,
}

/// Calls per timed repetition: enough to dwarf launch overheads, few
/// enough that the largest sizes stay quick.
fn calls_per_repetition(bytes: usize) -> usize {
    ((256usize << 20) / bytes.max(1)).clamp(5, 50)
}

pub(super) struct Measured {
    pub eager_us: f64,
    pub graph_us: f64,
    pub wrong: usize,
}

fn event_pair(stream: &CudaStream) -> Result<(CudaEvent, CudaEvent)> {
    let ctx = stream.context();
    let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
    Ok((
        ctx.new_event(flags)
            .map_err(Error::driver("cuEventCreate"))?,
        ctx.new_event(flags)
            .map_err(Error::driver("cuEventCreate"))?,
    ))
}

/// Times `work` (which enqueues `calls` calls) `repetitions` times, each
/// after a barrier of all ranks; microseconds per call.
fn time_calls(
    stream: &CudaStream,
    start_line: &dyn Rendezvous,
    repetitions: usize,
    calls: usize,
    mut work: impl FnMut() -> Result<()>,
) -> Result<Vec<f64>> {
    let (start, end) = event_pair(stream)?;
    let mut times = Vec::with_capacity(repetitions);
    for _ in 0..repetitions {
        start_line.barrier()?;
        start
            .record(stream)
            .map_err(Error::driver("cuEventRecord"))?;
        work()?;
        end.record(stream).map_err(Error::driver("cuEventRecord"))?;
        end.synchronize()
            .map_err(Error::driver("cuEventSynchronize"))?;
        let ms = start
            .elapsed_ms(&end)
            .map_err(Error::driver("cuEventElapsedTime"))?;
        times.push(ms as f64 * 1e3 / calls as f64);
    }
    Ok(times)
}

/// `calls` calls of `call`, captured on `stream` as one graph.
fn capture(
    stream: &Arc<CudaStream>,
    calls: usize,
    call: &mut impl FnMut() -> Result<()>,
) -> Result<CudaGraph> {
    stream
        .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .map_err(Error::driver("cuStreamBeginCapture"))?;
    let captured = (0..calls).try_for_each(|_| call());
    let graph = stream
        .end_capture(CUgraphInstantiate_flags(0))
        .map_err(Error::driver("cuStreamEndCapture"));
    captured?;
    graph?.ok_or(CliError::Internal("stream capture produced no CUDA graph"))
}

/// What one rank measured for one size: per-repetition microseconds per
/// call, eager and graphed, and its wrong elements.
pub(super) struct RankRun {
    eager: Vec<f64>,
    graphed: Vec<f64>,
    wrong: usize,
}

/// Times `call` (one call on this rank's stream, with every rank calling
/// alike) after a few warm-up calls: `repetitions` of a batch of calls
/// eagerly, then as replays of the batch captured in a CUDA graph. The
/// caller has checked the results and says how many were `wrong`.
pub(super) fn time_eager_and_graphed(
    stream: &Arc<CudaStream>,
    start_line: &dyn Rendezvous,
    bytes: usize,
    repetitions: usize,
    wrong: usize,
    mut call: impl FnMut() -> Result<()>,
) -> Result<RankRun> {
    let calls = calls_per_repetition(bytes);
    for _ in 0..3 {
        call()?;
    }
    let eager = time_calls(stream, start_line, repetitions, calls, || {
        (0..calls).try_for_each(|_| call())
    })?;
    let graph = capture(stream, calls, &mut call)?;
    graph.launch().map_err(Error::driver("cuGraphLaunch"))?;
    let graphed = time_calls(stream, start_line, repetitions, calls, || {
        Ok(graph.launch().map_err(Error::driver("cuGraphLaunch"))?)
    })?;
    stream
        .synchronize()
        .map_err(Error::driver("cuStreamSynchronize"))?;
    Ok(RankRun {
        eager,
        graphed,
        wrong,
    })
}

/// All ranks' runs as one figure: per repetition the slowest rank's time,
/// then the median over repetitions; wrong elements summed.
pub(super) fn slowest_rank(rendezvous: &dyn Rendezvous, mine: &RankRun) -> Result<Measured> {
    let words: Vec<u8> = std::iter::once(mine.wrong as f64)
        .chain(mine.eager.iter().copied())
        .chain(mine.graphed.iter().copied())
        .flat_map(f64::to_le_bytes)
        .collect();
    let runs: Vec<Vec<f64>> = rendezvous
        .all_gather(&words)?
        .iter()
        .map(|bytes| {
            bytes
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap_or_default()))
                .collect()
        })
        .collect();
    let repetitions = mine.eager.len();
    if let Some(bad) = runs.iter().position(|r| r.len() != 1 + 2 * repetitions) {
        return Err(Error::RankMismatch {
            what: "benchmark timing",
            detail: format!("rank {bad} sent {} figures", runs[bad].len()),
        }
        .into());
    }
    let median_of_slowest = |first: usize| {
        let mut worst: Vec<f64> = (0..repetitions)
            .map(|rep| runs.iter().map(|r| r[first + rep]).fold(0.0, f64::max))
            .collect();
        worst.sort_by(f64::total_cmp);
        worst[worst.len() / 2]
    };
    Ok(Measured {
        eager_us: median_of_slowest(1),
        graph_us: median_of_slowest(1 + repetitions),
        wrong: runs.iter().map(|r| r[0] as usize).sum(),
    })
}
