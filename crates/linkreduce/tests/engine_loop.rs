//! An inference engine's loop on a stream of its own per rank: a compute
//! kernel (compiled here by NVRTC), an all-reduce on that stream, another
//! compute kernel, repeated with no host wait between them; only the final
//! download waits. The result is checked against the same arithmetic on
//! the CPU. Once on the kernels' path (the automatic choice) and once on
//! the NCCL path (forced), which must follow the caller's stream alike; and
//! NCCL's set-up, which cannot happen inside a capture, is refused there
//! with a clear error and works after `prepare_nccl`. Skip without a GPU
//! (fail with LINKREDUCE_REQUIRE_GPU=1).

mod common;

use std::sync::Arc;

use common::gpus;
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg};
use linkreduce::group::in_process;
use linkreduce::verify::on_every_rank;
use linkreduce::{AlgorithmChoice, CallOptions, Communicator, Config, Error};

/// The engine's compute: `x = 2x + rank`, then `x = x / 4`.
const COMPUTE: &str = r#"
extern "C" __global__ void double_plus_rank(float* x, float rank, unsigned int n) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] = x[i] * 2.0f + rank;
}
extern "C" __global__ void quarter(float* x, unsigned int n) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] = x[i] * 0.25f;
}
"#;

/// An odd length: a scalar tail after the last whole packet.
const LEN: usize = (1 << 20) + 3;
const STEPS: usize = 40;

fn initial(rank: usize, i: usize) -> f32 {
    ((i % 13) + rank) as f32
}

/// Element `i` after the loop, on the CPU: each step doubles and adds the
/// rank, sums over ranks in rank order, and quarters (all exact in f32 for
/// these small values, so the GPU must match bit for bit).
fn expected(world: usize, i: usize) -> f32 {
    let mut x: Vec<f32> = (0..world).map(|rank| initial(rank, i)).collect();
    for _ in 0..STEPS {
        let sum = x
            .iter()
            .enumerate()
            .fold(0.0f32, |sum, (rank, &v)| sum + (v * 2.0 + rank as f32));
        x = vec![sum * 0.25; world];
    }
    x[0]
}

/// The two compute kernels, loaded into `comm`'s context.
fn compute_kernels(comm: &Communicator) -> linkreduce::Result<(CudaFunction, CudaFunction)> {
    let ptx = cudarc::nvrtc::compile_ptx(COMPUTE)
        .map_err(|e| Error::InvalidConfig(format!("the test's kernels: {e:?}")))?;
    let module = comm
        .context()
        .load_module(ptx)
        .map_err(Error::driver("cuModuleLoadData"))?;
    let load = |name| {
        module
            .load_function(name)
            .map_err(Error::driver("cuModuleGetFunction"))
    };
    Ok((load("double_plus_rank")?, load("quarter")?))
}

/// This rank's engine: its stream, its activations and its kernels.
struct Engine {
    stream: Arc<CudaStream>,
    x: CudaSlice<f32>,
    double_plus_rank: CudaFunction,
    quarter: CudaFunction,
}

impl Engine {
    fn new(comm: &Communicator) -> linkreduce::Result<Engine> {
        // SAFETY: the engine uses its buffer on its own stream only, and the
        // library orders its calls; cudarc's tracking would record and wait
        // on events inside captures.
        unsafe { comm.context().disable_event_tracking() };
        let stream = comm
            .context()
            .new_stream()
            .map_err(Error::driver("cuStreamCreate"))?;
        let host: Vec<f32> = (0..LEN).map(|i| initial(comm.rank(), i)).collect();
        let x = stream
            .clone_htod(&host)
            .map_err(Error::driver("cuMemcpyHtoD"))?;
        let (double_plus_rank, quarter) = compute_kernels(comm)?;
        Ok(Engine {
            stream,
            x,
            double_plus_rank,
            quarter,
        })
    }

    /// One step on the engine's stream: compute, all-reduce, compute.
    fn step(&mut self, comm: &mut Communicator, options: CallOptions) -> linkreduce::Result<()> {
        let config = LaunchConfig::for_num_elems(LEN as u32);
        let (rank, n) = (comm.rank() as f32, LEN as u32);
        let mut first = self.stream.launch_builder(&self.double_plus_rank);
        first.arg(&mut self.x).arg(&rank).arg(&n);
        // SAFETY: double_plus_rank takes (float*, float, unsigned int), and
        // `x` holds `n` floats.
        unsafe { first.launch(config) }.map_err(Error::driver("cuLaunchKernel"))?;
        comm.all_reduce_in_place_on(&self.stream, &mut self.x, options)?;
        let mut second = self.stream.launch_builder(&self.quarter);
        second.arg(&mut self.x).arg(&n);
        // SAFETY: quarter takes (float*, unsigned int), and `x` holds `n`
        // floats.
        unsafe { second.launch(config) }.map_err(Error::driver("cuLaunchKernel"))?;
        Ok(())
    }

    /// Downloads the activations: the only host wait.
    fn result(&self) -> linkreduce::Result<Vec<f32>> {
        self.stream
            .clone_dtoh(&self.x)
            .map_err(Error::driver("cuMemcpyDtoH"))
    }
}

/// Runs the loop on every rank with `algorithm` and checks every element.
fn run_loop(comms: &mut [Communicator], algorithm: AlgorithmChoice) {
    let world = comms.len();
    let options = CallOptions {
        algorithm,
        zero_copy: false,
        max_blocks: None,
    };
    let results = on_every_rank(comms, |comm| {
        let mut engine = Engine::new(comm)?;
        for _ in 0..STEPS {
            engine.step(comm, options)?;
        }
        engine.result()
    })
    .unwrap_or_else(|e| panic!("{algorithm}: {e}"));
    for (rank, values) in results.iter().enumerate() {
        let wrong: Vec<usize> = (0..LEN)
            .filter(|&i| values[i].to_bits() != expected(world, i).to_bits())
            .collect();
        assert!(
            wrong.is_empty(),
            "{algorithm}, rank {rank}: {} wrong elements, first at {} ({} instead of {})",
            wrong.len(),
            wrong[0],
            values[wrong[0]],
            expected(world, wrong[0])
        );
    }
}

/// Two ranks on two GPUs, as NCCL needs; None (after saying why) when the
/// test must skip.
fn one_rank_per_gpu() -> Option<Vec<Communicator>> {
    if gpus()? < 2 {
        eprintln!("skipping: NCCL needs one GPU per rank and only one is visible");
        return None;
    }
    Some(in_process(&[0, 1], Config::default()).unwrap())
}

#[test]
fn an_engine_loop_on_its_own_stream_takes_the_kernels_without_host_waits() {
    let Some(gpus) = gpus() else { return };
    let devices = if gpus >= 2 { vec![0, 1] } else { vec![0, 0] };
    let mut comms = in_process(&devices, Config::default()).unwrap();
    assert!(comms[0].path_for(LEN * 4).algorithm().is_some());
    run_loop(&mut comms, AlgorithmChoice::Auto);
}

#[test]
fn an_engine_loop_on_its_own_stream_takes_nccl_without_host_waits() {
    let Some(mut comms) = one_rank_per_gpu() else {
        return;
    };
    run_loop(&mut comms, AlgorithmChoice::Nccl);
}

#[test]
fn nccl_is_not_set_up_inside_a_capture_but_is_captured_after_prepare_nccl() {
    let Some(mut comms) = one_rank_per_gpu() else {
        return;
    };
    let nccl = CallOptions {
        algorithm: AlgorithmChoice::Nccl,
        zero_copy: false,
        max_blocks: None,
    };
    let results = on_every_rank(&mut comms, |comm| {
        let mut engine = Engine::new(comm)?;
        let capture = |stream: &Arc<CudaStream>| {
            stream
                .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
                .map_err(Error::driver("cuStreamBeginCapture"))
        };
        capture(&engine.stream)?;
        let refused = engine.step(comm, nccl);
        let ended = engine.stream.end_capture(CUgraphInstantiate_flags(0));
        match refused {
            Err(Error::NcclDuringCapture) => {}
            other => panic!("a first NCCL call inside a capture gave {other:?}"),
        }
        drop(ended);
        // The refused step's first kernel was captured, not run: start over.
        let mut engine = Engine::new(comm)?;
        comm.prepare_nccl()?;
        capture(&engine.stream)?;
        let captured = (0..STEPS).try_for_each(|_| engine.step(comm, nccl));
        let graph = engine
            .stream
            .end_capture(CUgraphInstantiate_flags(0))
            .map_err(Error::driver("cuStreamEndCapture"))?;
        captured?;
        graph
            .ok_or_else(|| Error::InvalidConfig("the capture made no graph".into()))?
            .launch()
            .map_err(Error::driver("cuGraphLaunch"))?;
        engine.result()
    })
    .unwrap_or_else(|e| panic!("{e}"));
    for values in results {
        assert!((0..LEN).all(|i| values[i].to_bits() == expected(2, i).to_bits()));
    }
}
