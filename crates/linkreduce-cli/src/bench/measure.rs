//! Timing one implementation at one size on one rank: its buffers, the
//! calls eager and captured in a CUDA graph, events around repetitions,
//! the correctness check of the timed buffers, and the slowest rank's
//! figures gathered over the rendezvous.

use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaGraph, CudaStream};
use linkreduce::nccl::{NcclComm, SymmetricBuffer};
use linkreduce::rendezvous::Rendezvous;
use linkreduce::verify::values::small_integer;
use linkreduce::{CallOptions, Communicator, DeviceBuffer, Element, Error};

use super::Implementation;
use crate::error::{CliError, Result};

/// One rank's state kept across sizes.
pub(super) struct Rank<'a> {
    pub comm: &'a mut Communicator,
    pub nccl: Option<NcclComm>,
}

/// Calls per timed repetition: enough to dwarf launch overheads, few
/// enough that the largest sizes stay quick.
fn calls_per_repetition(bytes: usize) -> usize {
    ((256usize << 20) / bytes).clamp(5, 50)
}

pub(super) struct Measured {
    pub eager_us: f64,
    pub graph_us: f64,
    pub wrong: usize,
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

fn event_pair(
    stream: &CudaStream,
) -> Result<(cudarc::driver::CudaEvent, cudarc::driver::CudaEvent)> {
    let ctx = stream.context();
    let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
    Ok((
        ctx.new_event(flags)
            .map_err(Error::driver("cuEventCreate"))?,
        ctx.new_event(flags)
            .map_err(Error::driver("cuEventCreate"))?,
    ))
}

/// Times `work` (which enqueues `calls` all-reduces) `repetitions` times,
/// each after a barrier of all ranks; microseconds per call.
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

fn capture<T: Element>(
    rank: &mut Rank,
    implementation: Implementation,
    buffers: &mut Buffers<T>,
    count: usize,
    calls: usize,
) -> Result<CudaGraph> {
    let stream = rank.comm.stream().clone();
    stream
        .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .map_err(Error::driver("cuStreamBeginCapture"))?;
    let captured = (0..calls).try_for_each(|_| call(rank, implementation, buffers, count));
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

pub(super) fn measure<T: Element + Default>(
    rank: &mut Rank,
    implementation: Implementation,
    count: usize,
    repetitions: usize,
) -> Result<RankRun> {
    let calls = calls_per_repetition(count * std::mem::size_of::<T>());
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
    for _ in 0..3 {
        call(rank, implementation, &mut buffers, count)?;
    }
    let eager = time_calls(&stream, rendezvous.as_ref(), repetitions, calls, || {
        (0..calls).try_for_each(|_| call(rank, implementation, &mut buffers, count))
    })?;
    let graph = capture(rank, implementation, &mut buffers, count, calls)?;
    graph.launch().map_err(Error::driver("cuGraphLaunch"))?;
    let graphed = time_calls(&stream, rendezvous.as_ref(), repetitions, calls, || {
        Ok(graph.launch().map_err(Error::driver("cuGraphLaunch"))?)
    })?;
    stream
        .synchronize()
        .map_err(Error::driver("cuStreamSynchronize"))?;
    rank.comm.synchronize()?;
    if let Buffers::Linkreduce { input, .. } = &buffers {
        rank.comm.deregister(input)?;
    }
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
