//! Ranks on several hosts, posed on one machine: two processes with
//! different LINKREDUCE_HOST_ID take the NCCL path for every call (set up
//! at once, no custom memory), with right results on the communicator's
//! stream and on the caller's, eagerly and in a CUDA graph; with the same
//! host id they take the kernels. The binary runs itself again as the
//! workers (tests/common/workers.rs).
//!
//! NCCL needs one GPU per rank: with one visible GPU the two "hosts" share
//! it, and set-up must refuse with `Error::NoPath` instead. Without a GPU
//! it prints why and passes; with LINKREDUCE_REQUIRE_GPU=1 a missing GPU
//! fails.

mod common;
#[macro_use]
#[path = "common/workers.rs"]
mod workers;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaStream, DevicePtr};
use linkreduce::comm::HOST_ID_VAR;
use linkreduce::verify::values::small_integer;
use linkreduce::{
    Algorithm, AlgorithmChoice, CallOptions, Communicator, Config, Element, Error, NcclReason,
};

/// Odd lengths: a partial packet, and more than one staging chunk would be.
const LENGTHS: [usize; 4] = [1, 4097, (1 << 20) + 3, (40 << 20) + 1];

fn main() -> ExitCode {
    workers::main_of(
        worker,
        &[
            ("two_processes_posing_as_two_hosts_take_nccl", two_hosts),
            ("two_processes_on_one_named_host_take_the_kernels", one_host),
            (
                "a_peer_that_leaves_makes_nccl_work_fail_within_the_deadline",
                peer_leaves,
            ),
        ],
    )
}

fn two_hosts() -> Result<(), String> {
    let env = |rank: usize| vec![(HOST_ID_VAR, format!("posed-host-{rank}"))];
    workers::expect_success("two_hosts", 2, Duration::from_secs(300), &env)
}

fn one_host() -> Result<(), String> {
    let env = |_rank: usize| vec![(HOST_ID_VAR, "posed-host".to_string())];
    workers::expect_success("one_host", 2, Duration::from_secs(300), &env)
}

fn peer_leaves() -> Result<(), String> {
    let env = |rank: usize| vec![(HOST_ID_VAR, format!("posed-host-{rank}"))];
    workers::expect_success("peer_leaves", 2, Duration::from_secs(120), &env)
}

/// The host-wait deadline of the `peer_leaves` scenario.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(2);

fn worker(scenario: &str) -> linkreduce::Result<ExitCode> {
    let config = match scenario {
        "peer_leaves" => Config {
            timeout: LEAVE_TIMEOUT,
            ..Config::default()
        },
        _ => Config::default(),
    };
    let built = Communicator::from_env(config);
    let gpus = linkreduce::memory::device_count()?;
    match (scenario, built) {
        ("two_hosts" | "peer_leaves", Err(Error::NoPath { .. })) if gpus < 2 => {
            say!("one GPU: set-up refused ranks on two hosts sharing it, as it must");
            Ok(ExitCode::SUCCESS)
        }
        ("two_hosts", built) => worker_two_hosts(built?),
        ("peer_leaves", built) => worker_peer_leaves(built?),
        ("one_host", built) => {
            let comm = built?;
            let path = comm.path_for(1 << 20);
            say!("rank {}: one named host: {path}", comm.rank());
            Ok(exit(!comm.nccl_only() && path.algorithm().is_some()))
        }
        (other, _) => Err(Error::InvalidConfig(format!("unknown scenario {other}"))),
    }
}

fn exit(passed: bool) -> ExitCode {
    if passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    }
}

fn worker_two_hosts(mut comm: Communicator) -> linkreduce::Result<ExitCode> {
    let rank = comm.rank();
    let mut passed = comm.nccl_only() && comm.max_blocks().is_none();
    let path = comm.path_for(1024);
    say!("rank {rank}: {path}");
    passed &= path == linkreduce::CallPath::Nccl(NcclReason::SeveralHosts { hosts: 2 });
    let forced = CallOptions {
        algorithm: AlgorithmChoice::Force(Algorithm::OneStage),
        zero_copy: false,
        max_blocks: None,
    };
    let mut buffer = comm.alloc::<f32>(64)?;
    match comm.all_reduce_in_place(&mut buffer, forced) {
        Err(Error::CustomUnavailable { .. }) => {}
        other => {
            say!("rank {rank}: forcing a kernel gave {other:?}");
            passed = false;
        }
    }
    // Registration has nothing to do on NCCL's path, on every rank alike.
    comm.register(&buffer)?;
    comm.deregister(&buffer)?;
    let stream = comm
        .context()
        .new_stream()
        .map_err(Error::driver("cuStreamCreate"))?;
    for (seed, &len) in LENGTHS.iter().enumerate() {
        passed &= check::<f32>(&mut comm, &stream, len, seed as u64)?;
        passed &= check::<half::bf16>(&mut comm, &stream, len, seed as u64 + 100)?;
    }
    passed &= check_graph(&mut comm, &stream)?;
    comm.synchronize()?;
    Ok(exit(passed))
}

/// Rank 1 leaves right after set-up; rank 0's next all-reduce goes through
/// NCCL, whose kernel waits for rank 1 forever: `synchronize` must give
/// `NcclStalled` within the deadline, and the communicator must refuse
/// further calls.
fn worker_peer_leaves(mut comm: Communicator) -> linkreduce::Result<ExitCode> {
    if comm.rank() == 1 {
        say!("rank 1: leaving without a call");
        // Leaves as a crashed process would: no collective teardown.
        std::mem::forget(comm);
        return Ok(ExitCode::SUCCESS);
    }
    std::thread::sleep(Duration::from_millis(500));
    let input = comm.alloc::<f32>(1 << 20)?;
    let mut output = comm.alloc::<f32>(1 << 20)?;
    let started = std::time::Instant::now();
    comm.all_reduce(&input, &mut output)?;
    let waited = comm.synchronize();
    let took = started.elapsed();
    say!("rank 0: synchronize gave {waited:?} after {took:?}");
    let stalled = matches!(waited, Err(Error::NcclStalled { rank: 0, .. }));
    let bounded = took < LEAVE_TIMEOUT + Duration::from_secs(3);
    let refused = matches!(
        comm.all_reduce(&input, &mut output),
        Err(Error::Poisoned(_))
    );
    say!("rank 0: stalled {stalled}, within the deadline {bounded}, later calls refused {refused}");
    Ok(exit(stalled && bounded && refused))
}

/// `len` elements of this rank's small integers on `comm`'s allocation.
fn upload<T: Element>(
    comm: &Communicator,
    len: usize,
    seed: u64,
) -> linkreduce::Result<linkreduce::DeviceBuffer<T>> {
    let host: Vec<T> = (0..len)
        .map(|i| T::from_f64(small_integer(seed, comm.rank(), i)))
        .collect();
    comm.upload(&host)
}

/// Whether `values` hold the sum over ranks of their small integers
/// (exact in every dtype and summation order); says where not.
fn right<T: Element>(comm: &Communicator, values: &[T], seed: u64, what: &str) -> bool {
    let world = comm.world_size();
    let wrong = (0..values.len()).find(|&i| {
        let sum: f64 = (0..world).map(|r| small_integer(seed, r, i)).sum();
        values[i].to_f64() != sum
    });
    if let Some(i) = wrong {
        say!(
            "rank {}: {what}, {} {}: element {i} is {} (expected the sum over ranks)",
            comm.rank(),
            values.len(),
            T::DTYPE,
            values[i].to_f64()
        );
    }
    wrong.is_none()
}

/// Out of place on the communicator's stream, then in place on `stream`.
fn check<T: Element + Default>(
    comm: &mut Communicator,
    stream: &Arc<CudaStream>,
    len: usize,
    seed: u64,
) -> linkreduce::Result<bool> {
    let input = upload::<T>(comm, len, seed)?;
    let mut output = comm.alloc::<T>(len)?;
    comm.all_reduce(&input, &mut output)?;
    let mut passed = right(comm, &comm.download(&output)?, seed, "out of place");
    let mut buffer = upload::<T>(comm, len, seed)?;
    comm.all_reduce_in_place_on(stream, &mut buffer, CallOptions::default())?;
    // The own stream follows every call (docs/design.md, "Streams").
    passed &= right(comm, &comm.download(&buffer)?, seed, "in place on a stream");
    Ok(passed)
}

/// An NCCL call captured on `stream` and replayed (NCCL was set up with
/// the communicator, so capture needs no `prepare_nccl`).
fn check_graph(comm: &mut Communicator, stream: &Arc<CudaStream>) -> linkreduce::Result<bool> {
    let seed = 7;
    let len = 65536 + 5;
    let input = upload::<half::bf16>(comm, len, seed)?;
    let mut output = comm.alloc::<half::bf16>(len)?;
    stream
        .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .map_err(Error::driver("cuStreamBeginCapture"))?;
    let captured = comm.all_reduce_on(stream, &input, &mut output, CallOptions::default());
    let graph = stream
        .end_capture(CUgraphInstantiate_flags(0))
        .map_err(Error::driver("cuStreamEndCapture"))?;
    captured?;
    let graph = graph.ok_or_else(|| Error::InvalidConfig("the capture made no graph".into()))?;
    for _ in 0..3 {
        graph.launch().map_err(Error::driver("cuGraphLaunch"))?;
    }
    stream
        .synchronize()
        .map_err(Error::driver("cuStreamSynchronize"))?;
    let (ptr, _read) = output.device_ptr(stream);
    let mut values = vec![half::bf16::default(); len];
    // SAFETY: `output` holds `len` bf16 elements.
    unsafe { linkreduce::memory::copy_to_host(stream, &mut values, ptr) }?;
    Ok(right(comm, &values, seed, "graph replays"))
}
