//! Programmatic dependent launches (`Config::programmatic_launch`) on real
//! GPUs: all-reduces of every algorithm back to back on one stream, so that
//! each kernel may start while the one before it ends, eagerly and replayed
//! from a CUDA graph, on random non-integer inputs, every output compared
//! bitwise with the reference on the device and, up to 65 539 elements,
//! with the CPU's. Without a GPU they print why and pass; with
//! LINKREDUCE_REQUIRE_GPU=1 a missing GPU fails. Programmatic launches need
//! two GPUs of sm_90 or newer here (one rank per GPU): elsewhere the tests
//! check that they stay off, say so, and run the same calls plainly.
//! Run them one at a time (`--test-threads=1`).

mod common;

use cudarc::driver::CudaContext;

use common::gpus;
use linkreduce::group::in_process;
use linkreduce::verify::{capture, check_graph, on_every_rank, values, DeviceChecks, Expect};
use linkreduce::{
    Algorithm, AlgorithmChoice, CallOptions, Communicator, Config, DType, DeviceBuffer, Element,
    Error, Result,
};

/// Out-of-place calls from one registered input, in this order: every
/// algorithm after every other, push after push (its slots rotate).
const OUT_OF_PLACE: [Algorithm; 8] = [
    Algorithm::Push,
    Algorithm::OneStage,
    Algorithm::TwoStage,
    Algorithm::Push,
    Algorithm::Push,
    Algorithm::OneStage,
    Algorithm::TwoStage,
    Algorithm::Push,
];

/// In-place calls after them, each on a buffer of its own (one-stage in
/// place goes through staging: a copy between the kernels).
const IN_PLACE: [Algorithm; 3] = [Algorithm::Push, Algorithm::TwoStage, Algorithm::OneStage];

/// Outputs up to this length are also compared with the CPU's reference.
const HOST_CHECKED: usize = 65539;

fn options(algorithm: Algorithm) -> CallOptions {
    CallOptions {
        algorithm: AlgorithmChoice::Force(algorithm),
        zero_copy: false,
        max_blocks: None,
    }
}

/// Whether programmatic launches can be on for ranks on `devices`, and if
/// not, why.
fn allowed(devices: &[usize]) -> std::result::Result<(), String> {
    if devices
        .iter()
        .any(|d| devices.iter().filter(|e| *e == d).count() > 1)
    {
        return Err("ranks share a GPU (this machine has one)".into());
    }
    for &device in devices {
        let ctx = CudaContext::new(device).map_err(|e| e.to_string())?;
        let (major, minor) = ctx.compute_capability().map_err(|e| e.to_string())?;
        if major < 9 {
            return Err(format!("GPU {device} is sm_{major}{minor}"));
        }
    }
    let driver = linkreduce::driver::driver_version().map_err(|e| e.to_string())?;
    if driver < 12030 {
        return Err(format!("the driver supports CUDA {driver}"));
    }
    Ok(())
}

/// Two ranks asking for programmatic launches, one per GPU where there are
/// two; each must have them exactly where [`allowed`] says.
fn pair(gpus: usize) -> Vec<Communicator> {
    let devices = if gpus >= 2 { vec![0, 1] } else { vec![0, 0] };
    let config = Config {
        programmatic_launch: Some(true),
        ..Config::default()
    };
    let comms = in_process(&devices, config).unwrap_or_else(|e| panic!("{devices:?}: {e}"));
    let expected = allowed(&devices);
    if let Err(why) = &expected {
        eprintln!("programmatic launches stay off ({why}): the calls run plainly");
    }
    for comm in &comms {
        assert_eq!(
            comm.programmatic_launch(),
            expected.is_ok(),
            "rank {}",
            comm.rank()
        );
    }
    comms
}

/// One rank's buffers for the calls above.
struct Buffers<T> {
    input: DeviceBuffer<T>,
    outputs: Vec<DeviceBuffer<T>>,
    in_place: Vec<DeviceBuffer<T>>,
    len: usize,
}

impl<T: Element + Default> Buffers<T> {
    /// Allocates them and registers the input (peers read it in place, so
    /// no copy separates the out-of-place kernels).
    fn new(comm: &mut Communicator, len: usize) -> Result<Self> {
        let input = comm.alloc::<T>(len)?;
        comm.register(&input)?;
        let alloc = |_| comm.alloc::<T>(len);
        Ok(Buffers {
            outputs: OUT_OF_PLACE.iter().map(alloc).collect::<Result<_>>()?,
            in_place: IN_PLACE.iter().map(alloc).collect::<Result<_>>()?,
            input,
            len,
        })
    }

    /// Every call, back to back on the rank's stream.
    fn all_reduce(&mut self, comm: &mut Communicator) -> Result<()> {
        for (output, &algorithm) in self.outputs.iter_mut().zip(&OUT_OF_PLACE) {
            comm.all_reduce_with(&self.input, output, options(algorithm))?;
        }
        for (buffer, &algorithm) in self.in_place.iter_mut().zip(&IN_PLACE) {
            comm.all_reduce_in_place(buffer, options(algorithm))?;
        }
        Ok(())
    }

    /// Fresh inputs for `seed` (in-place buffer i gets seed + 1 + i), and
    /// outputs poisoned so that an element never written cannot pass.
    fn fill(&self, comm: &Communicator, checks: &DeviceChecks, seed: u64) -> Result<()> {
        let (dtype, rank) = (T::DTYPE, comm.rank() as u32);
        // SAFETY: every buffer holds `len` elements of T.
        unsafe {
            checks.fill(dtype, self.input.device_address(), self.len, seed, rank)?;
            for (i, buffer) in self.in_place.iter().enumerate() {
                let seed = seed + 1 + i as u64;
                checks.fill(dtype, buffer.device_address(), self.len, seed, rank)?;
            }
            for output in &self.outputs {
                cudarc::driver::result::memset_d8_async(
                    output.device_address(),
                    0xff,
                    self.len * dtype.size(),
                    comm.stream().cu_stream(),
                )
                .map_err(Error::driver("cuMemsetD8Async"))?;
            }
        }
        Ok(())
    }

    /// Every buffer against its reference after the calls of `seed`: what
    /// is wrong, one line per buffer.
    fn wrong(&self, comm: &Communicator, checks: &DeviceChecks, seed: u64) -> Result<Vec<String>> {
        let (dtype, world) = (T::DTYPE, comm.world_size() as u32);
        let sum = |seed, algorithm| Expect::Sum {
            seed,
            world,
            push: algorithm == Algorithm::Push,
        };
        let mut expected: Vec<(String, &DeviceBuffer<T>, Expect)> = vec![(
            "input".into(),
            &self.input,
            Expect::Input {
                seed,
                rank: comm.rank() as u32,
            },
        )];
        for (i, (output, &algorithm)) in self.outputs.iter().zip(&OUT_OF_PLACE).enumerate() {
            expected.push((
                format!("call {i} ({algorithm})"),
                output,
                sum(seed, algorithm),
            ));
        }
        for (i, (buffer, &algorithm)) in self.in_place.iter().zip(&IN_PLACE).enumerate() {
            let name = format!("{algorithm} in place");
            expected.push((name, buffer, sum(seed + 1 + i as u64, algorithm)));
        }
        checks.reset()?;
        for (slot, (_, buffer, expect)) in expected.iter().enumerate() {
            // SAFETY: every buffer holds `len` elements of T.
            unsafe { checks.expect(slot, dtype, buffer.device_address(), self.len, *expect) }?;
        }
        let findings = checks.read(expected.len())?;
        let mut wrong = Vec::new();
        for ((name, buffer, expect), found) in expected.iter().zip(findings) {
            if found.mismatches > 0 {
                wrong.push(format!(
                    "{name}: {} wrong, first at {:?}",
                    found.mismatches, found.first
                ));
            } else if let (Expect::Sum { seed, world, push }, true) =
                (*expect, self.len <= HOST_CHECKED)
            {
                let host = comm.download(*buffer)?;
                let first = (0..self.len).find(|&i| {
                    let bits = values::round_to(dtype, host[i].to_f64() as f32);
                    bits != values::sum_bits(dtype, seed, world, i as u64, push)
                });
                if let Some(i) = first {
                    wrong.push(format!("{name}: element {i} differs from the CPU's"));
                }
            }
        }
        Ok(wrong)
    }

    fn release(self, comm: &mut Communicator) -> Result<()> {
        comm.deregister(&self.input)
    }
}

/// How the calls reach the GPU.
#[derive(Debug, Clone, Copy)]
enum Launch {
    /// Enqueued anew each round.
    Eager,
    /// Captured once in a graph, then replayed each round.
    Graph,
}

/// Rounds of the calls at several lengths on this rank, each round on
/// fresh inputs; what was wrong.
fn rounds<T: Element + Default>(comm: &mut Communicator, how: Launch) -> Result<Vec<String>> {
    let (lengths, rounds): (&[usize], u64) = match how {
        Launch::Eager => (&[1, 7, 4097, 65539, 300_001], 3),
        Launch::Graph => (&[7, 4097, 65539], 20),
    };
    let mut wrong = Vec::new();
    for &len in lengths {
        let mut buffers = Buffers::<T>::new(comm, len)?;
        let checks = DeviceChecks::new(comm.stream(), OUT_OF_PLACE.len() + IN_PLACE.len() + 1)?;
        let graph = match how {
            Launch::Eager => None,
            Launch::Graph => {
                let stream = comm.stream().clone();
                let graph = capture(&stream, || buffers.all_reduce(comm))?;
                comm.register_graph_buffers()?;
                Some(graph)
            }
        };
        for round in 0..rounds {
            let seed = 100 * len as u64 + 10 * round;
            buffers.fill(comm, &checks, seed)?;
            match &graph {
                None => buffers.all_reduce(comm)?,
                Some(graph) => graph.launch().map_err(Error::driver("cuGraphLaunch"))?,
            }
            let found = buffers.wrong(comm, &checks, seed)?;
            wrong.extend(
                found
                    .into_iter()
                    .map(|w| format!("len {len} round {round}: {w}")),
            );
        }
        if let Some(graph) = graph {
            // Peers unmap the graph's buffers before they are freed.
            drop(graph);
            comm.release_graph_buffers()?;
        }
        buffers.release(comm)?;
    }
    Ok(wrong)
}

/// The rounds for every dtype on every rank of a fresh pair; every rank
/// must find nothing wrong.
fn on_pair(how: Launch) {
    let Some(gpus) = gpus() else { return };
    let mut comms = pair(gpus);
    for dtype in DType::ALL {
        let wrong = on_every_rank(&mut comms, |comm| match dtype {
            DType::F32 => rounds::<f32>(comm, how),
            DType::F16 => rounds::<half::f16>(comm, how),
            DType::BF16 => rounds::<half::bf16>(comm, how),
        })
        .unwrap_or_else(|e| panic!("{how:?} {dtype}: {e}"));
        for (rank, wrong) in wrong.iter().enumerate() {
            assert!(
                wrong.is_empty(),
                "{how:?} {dtype} rank {rank}:\n{}",
                wrong.join("\n")
            );
        }
    }
}

#[test]
fn back_to_back_eager_calls_match_the_cpu_reference() {
    on_pair(Launch::Eager);
}

#[test]
fn graph_replays_match_the_cpu_reference() {
    on_pair(Launch::Graph);
}

/// The library's own graph check (an automatic call, then an in-place one
/// of each algorithm, in one graph) with programmatic launches.
#[test]
fn the_graph_check_passes_for_every_algorithm() {
    let Some(gpus) = gpus() else { return };
    let mut comms = pair(gpus);
    for algorithm in Algorithm::ALL {
        for dtype in DType::ALL {
            let (replay, outcome) = check_graph(
                &mut comms,
                dtype,
                65539,
                AlgorithmChoice::Force(algorithm),
                50,
            )
            .unwrap_or_else(|e| panic!("{algorithm} {dtype}: {e}"));
            assert!(
                outcome.passed(),
                "{algorithm} {dtype} replay {replay}: {outcome}"
            );
        }
    }
}

#[test]
fn programmatic_launches_stay_off_unless_asked_for_and_where_ranks_share_a_gpu() {
    let Some(_) = gpus() else { return };
    let off = |devices: &[usize], programmatic_launch| {
        let config = Config {
            programmatic_launch,
            ..Config::default()
        };
        let comms = in_process(devices, config).unwrap_or_else(|e| panic!("{devices:?}: {e}"));
        comms.iter().all(|comm| !comm.programmatic_launch())
    };
    assert!(off(&[0, 0], Some(true)), "ranks sharing a GPU");
    assert!(off(&[0, 0], Some(false)));
}
