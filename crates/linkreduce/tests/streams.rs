//! Calls on the caller's stream, as an inference engine makes them: compute
//! kernel, all-reduce, compute kernel on one stream, no host wait between
//! them; graphs captured on that stream; calls that change streams. Skip
//! without a GPU (fail with LINKREDUCE_REQUIRE_GPU=1).

mod common;

use std::sync::Arc;

use common::gpus;
use cudarc::driver::sys::CUstreamCaptureMode;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use linkreduce::group::in_process;
use linkreduce::verify::{on_every_rank, DeviceChecks, Expect};
use linkreduce::{Algorithm, AlgorithmChoice, CallOptions, Communicator, Config, DType, Error};

/// Two ranks: one per GPU when there are two, both on GPU 0 otherwise.
fn pair(gpus: usize) -> Vec<Communicator> {
    let devices = if gpus >= 2 { vec![0, 1] } else { vec![0, 0] };
    let comms =
        in_process(&devices, Config::default()).unwrap_or_else(|e| panic!("{devices:?}: {e}"));
    for comm in &comms {
        // SAFETY: each test uses a buffer on the stream it was allocated on
        // only; across streams the library orders its calls. cudarc's
        // tracking would record and wait on events inside captures.
        unsafe { comm.context().disable_event_tracking() };
    }
    comms
}

const LEN: usize = 300_001;
const DTYPE: DType = DType::BF16;

fn options(algorithm: Algorithm) -> CallOptions {
    CallOptions {
        algorithm: AlgorithmChoice::Force(algorithm),
        zero_copy: false,
        max_blocks: None,
    }
}

/// An input and an output of LEN elements on `stream`.
fn buffers(
    stream: &Arc<CudaStream>,
) -> linkreduce::Result<(CudaSlice<half::bf16>, CudaSlice<half::bf16>)> {
    let alloc = || {
        stream
            .alloc_zeros::<half::bf16>(LEN)
            .map_err(Error::driver("cuMemAllocAsync"))
    };
    Ok((alloc()?, alloc()?))
}

/// A stream of the engine's own on `comm`'s context.
fn new_stream(comm: &Communicator) -> linkreduce::Result<Arc<CudaStream>> {
    comm.context()
        .new_stream()
        .map_err(Error::driver("cuStreamCreate"))
}

/// Every rank's wrong elements per step must be 0.
fn assert_all_right(wrong: &[Vec<u64>]) {
    for (rank, wrong) in wrong.iter().enumerate() {
        assert!(
            wrong.iter().all(|&w| w == 0),
            "rank {rank}: wrong elements per step {wrong:?}"
        );
    }
}

/// Fills this rank's input for `seed`, all-reduces into `output` and checks
/// it, all on `stream` (the fill and the check are the engine's compute
/// kernels), then waits once. Returns the wrong elements.
fn engine_step(
    comm: &mut Communicator,
    stream: &Arc<CudaStream>,
    checks: &DeviceChecks,
    seed: u64,
    algorithm: Algorithm,
) -> linkreduce::Result<u64> {
    let rank = comm.rank() as u32;
    let world = comm.world_size() as u32;
    let (input, mut output) = buffers(stream)?;
    let (input_ptr, _) = input.device_ptr(stream);
    let (output_ptr, _) = output.device_ptr(stream);
    checks.reset()?;
    // SAFETY: both buffers hold LEN elements of bf16.
    unsafe { checks.fill(DTYPE, input_ptr, LEN, seed, rank) }?;
    comm.all_reduce_on(stream, &input, &mut output, options(algorithm))?;
    let sum = Expect::Sum {
        seed,
        world,
        push: algorithm == Algorithm::Push,
    };
    // SAFETY: as above.
    unsafe { checks.expect(0, DTYPE, output_ptr, LEN, sum) }?;
    Ok(checks.read(1)?[0].mismatches)
}

#[test]
fn an_engine_loop_on_its_own_stream_gets_right_sums() {
    let Some(gpus) = gpus() else { return };
    let mut comms = pair(gpus);
    let wrong = on_every_rank(&mut comms, |comm| {
        let stream = new_stream(comm)?;
        let checks = DeviceChecks::new(&stream, 1)?;
        let mut wrong = Vec::new();
        for (step, algorithm) in Algorithm::ALL.iter().cycle().take(12).enumerate() {
            wrong.push(engine_step(
                comm,
                &stream,
                &checks,
                step as u64,
                *algorithm,
            )?);
        }
        Ok(wrong)
    })
    .unwrap();
    assert_all_right(&wrong);
}

#[test]
fn calls_that_change_streams_stay_in_order() {
    let Some(gpus) = gpus() else { return };
    let mut comms = pair(gpus);
    let wrong = on_every_rank(&mut comms, |comm| {
        let streams = [new_stream(comm)?, new_stream(comm)?, comm.stream().clone()];
        let mut wrong = Vec::new();
        for step in 0..12u64 {
            let stream = &streams[step as usize % streams.len()];
            let checks = DeviceChecks::new(stream, 1)?;
            // One-stage reads peers' staging: a call overlapping the next
            // one on another stream would read the next one's input.
            wrong.push(engine_step(
                comm,
                stream,
                &checks,
                100 + step,
                Algorithm::OneStage,
            )?);
        }
        Ok(wrong)
    })
    .unwrap();
    assert_all_right(&wrong);
}

#[test]
fn a_graph_captured_on_the_callers_stream_replays_right() {
    let Some(gpus) = gpus() else { return };
    let mut comms = pair(gpus);
    let wrong = on_every_rank(&mut comms, |comm| {
        let stream = new_stream(comm)?;
        let checks = DeviceChecks::new(&stream, 1)?;
        let rank = comm.rank() as u32;
        let world = comm.world_size() as u32;
        let (input, mut output) = buffers(&stream)?;
        let (input_ptr, _) = input.device_ptr(&stream);
        let (output_ptr, _) = output.device_ptr(&stream);
        stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
            .map_err(Error::driver("cuStreamBeginCapture"))?;
        // SAFETY: both buffers hold LEN elements of bf16.
        let captured = unsafe { checks.fill(DTYPE, input_ptr, LEN, 7, rank) }.and_then(|()| {
            comm.all_reduce_on(&stream, &input, &mut output, options(Algorithm::TwoStage))
        });
        let graph = stream
            .end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0))
            .map_err(Error::driver("cuStreamEndCapture"));
        captured?;
        let graph = graph?.ok_or_else(|| Error::InvalidConfig("capture made no graph".into()))?;
        comm.register_graph_buffers()?;
        let mut wrong = Vec::new();
        for _ in 0..20 {
            // Poison the output outside the graph, so each replay must
            // write every element again.
            // SAFETY: the output holds LEN elements of bf16.
            unsafe {
                cudarc::driver::result::memset_d8_async(
                    output_ptr,
                    0xff,
                    LEN * 2,
                    stream.cu_stream(),
                )
            }
            .map_err(Error::driver("cuMemsetD8Async"))?;
            checks.reset()?;
            graph.launch().map_err(Error::driver("cuGraphLaunch"))?;
            let sum = Expect::Sum {
                seed: 7,
                world,
                push: false,
            };
            // SAFETY: as above.
            unsafe { checks.expect(0, DTYPE, output_ptr, LEN, sum) }?;
            wrong.push(checks.read(1)?[0].mismatches);
        }
        drop(graph);
        comm.release_graph_buffers()?;
        Ok(wrong)
    })
    .unwrap();
    assert_all_right(&wrong);
}

#[test]
fn a_stream_of_another_device_is_refused() {
    let Some(gpus) = gpus() else { return };
    if gpus < 2 {
        eprintln!("skipping: needs two GPUs");
        return;
    }
    let mut comms = pair(gpus);
    let other = comms[1].stream().clone();
    let comm = &mut comms[0];
    let input = comm.alloc::<f32>(1024).unwrap();
    let mut output = comm.alloc::<f32>(1024).unwrap();
    let error = comm
        .all_reduce_on(&other, &input, &mut output, CallOptions::default())
        .unwrap_err();
    assert!(
        matches!(&error, Error::InvalidConfig(why) if why.contains("another CUDA context")),
        "{error}"
    );
}
