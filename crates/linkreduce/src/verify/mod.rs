//! Correctness checks on real GPUs, shared by the GPU tests and
//! `linkreduce check`: random non-integer inputs of mixed sign and
//! magnitude, generated on the device from (seed, rank, index); every
//! element of every output compared bitwise with the reference (every
//! rank's input summed in f32 in rank order, rounded once) by a check
//! kernel that regenerates the inputs itself; outputs compared across ranks
//! by digest through the rendezvous, so the same checks run whether ranks
//! are threads or processes. Small outputs are also checked on the host
//! against `values`, which keeps the device checker honest.
//!
//! [`check_case`] and [`check_graph`] are the fixed sweep; [`soak`] the
//! random one.

mod device;
pub mod fused;
pub mod norm;
pub mod scatter_gather;
pub mod soak;
pub mod values;

use std::fmt;
use std::sync::Arc;

use cudarc::driver::sys::CUstreamCaptureMode;
use cudarc::driver::{CudaGraph, CudaStream, DeviceSlice};

pub use device::{DeviceChecks, Expect, Findings};

use crate::algorithm::{Algorithm, AlgorithmChoice};
use crate::comm::{CallOptions, Communicator};
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::memory::{copy_to_host, DeviceBuffer};
use crate::rendezvous::gather_statuses;

/// How a case hands its buffers to the all-reduce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Unregistered input, separate output: the call copies into staging.
    Staged,
    /// Registered input, separate output: read in place by peers.
    Registered,
    /// Output = input, registered.
    InPlaceRegistered,
    /// Output = input, not registered.
    InPlaceStaged,
}

impl Placement {
    pub const ALL: [Placement; 4] = [
        Placement::Staged,
        Placement::Registered,
        Placement::InPlaceRegistered,
        Placement::InPlaceStaged,
    ];

    fn registered(self) -> bool {
        matches!(self, Placement::Registered | Placement::InPlaceRegistered)
    }

    fn in_place(self) -> bool {
        matches!(
            self,
            Placement::InPlaceRegistered | Placement::InPlaceStaged
        )
    }
}

impl fmt::Display for Placement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Placement::Staged => "staged",
            Placement::Registered => "registered",
            Placement::InPlaceRegistered => "in-place-registered",
            Placement::InPlaceStaged => "in-place-staged",
        })
    }
}

/// One all-reduce to check.
#[derive(Debug, Clone, Copy)]
pub struct Case {
    pub dtype: DType,
    pub len: usize,
    pub algorithm: AlgorithmChoice,
    pub placement: Placement,
    /// The grid the call asks for (`CallOptions::max_blocks`).
    pub max_blocks: Option<u32>,
}

impl fmt::Display for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} len {} {}",
            self.dtype, self.algorithm, self.len, self.placement
        )?;
        match self.max_blocks {
            Some(blocks) => write!(f, " at most {blocks} blocks"),
            None => Ok(()),
        }
    }
}

/// Every combination of dtype, algorithm (forced), length and placement.
pub fn sweep_cases(dtypes: &[DType], lengths: &[usize]) -> Vec<Case> {
    let mut cases = Vec::new();
    for &dtype in dtypes {
        for algorithm in Algorithm::ALL {
            for &len in lengths {
                for placement in Placement::ALL {
                    cases.push(Case {
                        dtype,
                        len,
                        algorithm: AlgorithmChoice::Force(algorithm),
                        placement,
                        max_blocks: None,
                    });
                }
            }
        }
    }
    cases
}

/// The first wrong element of an output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mismatch {
    pub rank: usize,
    pub index: u64,
    pub dtype: DType,
    /// Storage bits.
    pub got: u32,
    pub expected: u32,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let value = |bits| values::to_f32(self.dtype, bits);
        write!(
            f,
            "rank {} index {}: got {:#x} ({:e}), expected {:#x} ({:e})",
            self.rank,
            self.index,
            self.got,
            value(self.got),
            self.expected,
            value(self.expected)
        )
    }
}

/// What a check found, over every rank.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// Output elements (over all ranks) that differ from the reference.
    pub mismatches: u64,
    pub first_mismatch: Option<Mismatch>,
    /// Elements the call had no business writing that changed: an
    /// out-of-place input, memory around a view.
    pub corrupted: u64,
    /// Whether every rank's output has the same bits.
    pub ranks_identical: bool,
    /// Ranks whose host spot check disagreed with the device check (a bug
    /// in the checker, not necessarily in the all-reduce).
    pub checker_disagreements: usize,
    /// Every rank's error, where the call or its check failed on some rank.
    pub errors: Vec<String>,
}

impl Outcome {
    pub fn passed(&self) -> bool {
        self.mismatches == 0
            && self.corrupted == 0
            && self.ranks_identical
            && self.checker_disagreements == 0
            && self.errors.is_empty()
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.passed() {
            return write!(f, "ok");
        }
        let mut parts = self.errors.clone();
        if self.mismatches > 0 {
            parts.push(format!("{} wrong element(s)", self.mismatches));
        }
        if let Some(first) = self.first_mismatch {
            parts.push(format!("first: {first}"));
        }
        if self.corrupted > 0 {
            parts.push(format!(
                "{} element(s) outside the output changed",
                self.corrupted
            ));
        }
        if !self.ranks_identical {
            parts.push("ranks' outputs differ".into());
        }
        if self.checker_disagreements > 0 {
            parts.push(format!(
                "host and device checks disagree on {} rank(s)",
                self.checker_disagreements
            ));
        }
        f.write_str(&parts.join("; "))
    }
}

/// Outputs this short are also checked on the host.
const SPOT_CHECK_LEN: usize = 4096;

/// What one rank found in one call's buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct RankFindings {
    mismatches: u64,
    /// The first wrong element: (index, got, expected) bits.
    first: Option<(u64, u32, u32)>,
    digest: u64,
    corrupted: u64,
    checker_disagrees: bool,
}

impl RankFindings {
    fn to_words(self) -> [u64; 8] {
        let (index, got, expected) = self.first.unwrap_or_default();
        [
            self.mismatches,
            u64::from(self.first.is_some()),
            index,
            u64::from(got),
            u64::from(expected),
            self.digest,
            self.corrupted,
            u64::from(self.checker_disagrees),
        ]
    }

    fn from_words(words: &[u64]) -> Option<RankFindings> {
        let &[mismatches, has_first, index, got, expected, digest, corrupted, disagrees] = words
        else {
            return None;
        };
        Some(RankFindings {
            mismatches,
            first: (has_first == 1).then_some((index, got as u32, expected as u32)),
            digest,
            corrupted,
            checker_disagrees: disagrees == 1,
        })
    }
}

/// One output of one call, and what around it must stay as it was.
struct Examined {
    dtype: DType,
    output: u64,
    len: usize,
    sum: Expect,
    /// Buffers that must still hold what they held: (address, elements,
    /// what they hold).
    untouched: Vec<(u64, usize, Expect)>,
}

impl Examined {
    /// Enqueues the checks, waits, and gathers this rank's findings.
    ///
    /// # Safety
    /// Every address must hold its number of `dtype` elements.
    unsafe fn findings(&self, checks: &DeviceChecks) -> Result<RankFindings> {
        checks.reset()?;
        checks.expect(0, self.dtype, self.output, self.len, self.sum)?;
        for (slot, &(ptr, len, expect)) in self.untouched.iter().enumerate() {
            checks.expect(slot + 1, self.dtype, ptr, len, expect)?;
        }
        let found = checks.read(1 + self.untouched.len())?;
        let output = found[0];
        let mut findings = RankFindings {
            mismatches: output.mismatches,
            digest: output.digest,
            corrupted: found[1..].iter().map(|f| f.mismatches).sum(),
            ..RankFindings::default()
        };
        if self.len <= SPOT_CHECK_LEN {
            let bits = self.host_bits(checks, 0, self.len)?;
            let wrong: Vec<(u64, u32, u32)> = (0..)
                .zip(bits)
                .map(|(index, got)| (index, got, self.expected_bits(index)))
                .filter(|(_, got, expected)| got != expected)
                .collect();
            findings.first = wrong.first().copied();
            findings.checker_disagrees = wrong.len() as u64 != output.mismatches;
        } else if let Some(index) = output.first {
            let got = self.host_bits(checks, index, 1)?[0];
            findings.first = Some((index, got, self.expected_bits(index)));
        }
        Ok(findings)
    }

    /// `len` of the output's elements from `start`, as storage bits.
    ///
    /// # Safety
    /// The output must hold `start + len` elements.
    unsafe fn host_bits(&self, checks: &DeviceChecks, start: u64, len: usize) -> Result<Vec<u32>> {
        let size = self.dtype.size() as u64;
        host_bits(checks.stream(), self.dtype, self.output + start * size, len)
    }

    fn expected_bits(&self, index: u64) -> u32 {
        match self.sum {
            Expect::Sum { seed, world, push } => {
                values::sum_bits(self.dtype, seed, world, index, push)
            }
            Expect::Input { seed, rank } => values::input_bits(self.dtype, seed, rank, index),
        }
    }
}

/// `len` elements of `dtype` at `ptr`, as storage bits, once `stream`
/// reaches them.
///
/// # Safety
/// `ptr` must hold `len` elements of `dtype`.
unsafe fn host_bits(stream: &CudaStream, dtype: DType, ptr: u64, len: usize) -> Result<Vec<u32>> {
    let size = dtype.size();
    let mut bytes = vec![0u8; len * size];
    copy_to_host(stream, &mut bytes, ptr)?;
    Ok(bytes
        .chunks_exact(size)
        .map(|b| match *b {
            [a, b, c, d] => u32::from_le_bytes([a, b, c, d]),
            [a, b] => u32::from(u16::from_le_bytes([a, b])),
            _ => 0,
        })
        .collect())
}

/// Shares this rank's findings (or its failure) with every rank and judges
/// them together: the same outcome on every rank, naming every rank's error
/// if some failed. Collective.
fn judge(comm: &Communicator, dtype: DType, mine: Result<RankFindings>) -> Result<Outcome> {
    let words: Vec<u8> = match &mine {
        Ok(findings) => findings
            .to_words()
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect(),
        Err(_) => Vec::new(),
    };
    let statuses = gather_statuses(
        comm.rendezvous().as_ref(),
        "a correctness check",
        mine.as_ref().map(|_| &words[..]),
    )?;
    let errors: Vec<String> = statuses
        .iter()
        .enumerate()
        .filter_map(
            |(rank, status)| match (rank == comm.rank(), status, &mine) {
                (true, _, Err(error)) => Some(format!("rank {rank}: {error}")),
                (_, Err(error), _) => Some(format!("rank {rank}: {error}")),
                _ => None,
            },
        )
        .collect();
    if !errors.is_empty() {
        return Ok(Outcome {
            errors,
            ..Outcome::default()
        });
    }
    let per_rank = statuses
        .into_iter()
        .enumerate()
        .map(|(rank, bytes)| {
            let bytes = bytes?;
            let words: Vec<u64> = bytes
                .chunks_exact(8)
                .map(crate::rendezvous::u64_at)
                .collect();
            RankFindings::from_words(&words).ok_or_else(|| Error::RankMismatch {
                what: "a correctness check",
                detail: format!("rank {rank} sent {} bytes of findings", bytes.len()),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Outcome {
        mismatches: per_rank.iter().map(|f| f.mismatches).sum(),
        first_mismatch: per_rank.iter().enumerate().find_map(|(rank, f)| {
            f.first.map(|(index, got, expected)| Mismatch {
                rank,
                index,
                dtype,
                got,
                expected,
            })
        }),
        corrupted: per_rank.iter().map(|f| f.corrupted).sum(),
        ranks_identical: per_rank.iter().all(|f| f.digest == per_rank[0].digest),
        checker_disagreements: per_rank.iter().filter(|f| f.checker_disagrees).count(),
        errors: Vec::new(),
    })
}

/// Runs `f` on every communicator at once, one thread per rank.
pub fn on_every_rank<R: Send>(
    comms: &mut [Communicator],
    f: impl Fn(&mut Communicator) -> Result<R> + Sync,
) -> Result<Vec<R>> {
    std::thread::scope(|scope| {
        let f = &f;
        let handles: Vec<_> = comms
            .iter_mut()
            .map(|comm| scope.spawn(move || f(comm)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(Error::InvalidConfig("a rank's thread panicked".into()))
                })
            })
            .collect()
    })
}

/// Fills `bytes` at `ptr` with all-ones bits (NaN in every dtype), so that
/// an element the kernel never writes cannot pass.
fn poison(comm: &Communicator, ptr: u64, bytes: usize) -> Result<()> {
    // SAFETY: callers pass a buffer of theirs that holds `bytes`.
    unsafe { cudarc::driver::result::memset_d8_async(ptr, 0xff, bytes, comm.stream().cu_stream()) }
        .map_err(Error::driver("cuMemsetD8Async"))
}

/// Whether a call with `choice` of `bytes` runs push (which rewrites its
/// marker value).
fn runs_push(comm: &Communicator, choice: AlgorithmChoice, bytes: usize) -> bool {
    match choice {
        AlgorithmChoice::Force(algorithm) => algorithm == Algorithm::Push,
        AlgorithmChoice::Auto => comm.path_for(bytes).algorithm() == Some(Algorithm::Push),
        AlgorithmChoice::Nccl => false,
    }
}

/// Runs one all-reduce on every rank, one thread each, and checks it.
pub fn check_case(comms: &mut [Communicator], case: Case, seed: u64) -> Result<Outcome> {
    first_outcome(on_every_rank(comms, |comm| {
        check_case_on_rank(comm, case, seed)
    })?)
}

/// This rank's part of [`check_case`], for ranks that are processes.
/// Collective; every rank gets the same outcome.
pub fn check_case_on_rank(comm: &mut Communicator, case: Case, seed: u64) -> Result<Outcome> {
    match case.dtype {
        DType::F32 => check_typed::<f32>(comm, case, seed),
        DType::F16 => check_typed::<half::f16>(comm, case, seed),
        DType::BF16 => check_typed::<half::bf16>(comm, case, seed),
    }
}

fn first_outcome<R>(per_rank: Vec<R>) -> Result<R> {
    per_rank
        .into_iter()
        .next()
        .ok_or_else(|| Error::InvalidConfig("no ranks".into()))
}

fn check_typed<T: Element>(comm: &mut Communicator, case: Case, seed: u64) -> Result<Outcome> {
    let options = CallOptions {
        algorithm: case.algorithm,
        zero_copy: false,
        max_blocks: case.max_blocks,
    };
    let dtype = case.dtype;
    let rank = comm.rank() as u32;
    let sum = Expect::Sum {
        seed,
        world: comm.world_size() as u32,
        push: runs_push(comm, case.algorithm, case.len * dtype.size()),
    };
    let checks = DeviceChecks::new(comm.stream(), 2)?;
    let mut input = comm.alloc::<T>(case.len)?;
    // SAFETY: the buffer holds `len` elements.
    unsafe { checks.fill(dtype, input.device_address(), case.len, seed, rank) }?;
    if case.placement.registered() {
        comm.register(&input)?;
    }
    let mut output: Option<DeviceBuffer<T>> = None;
    if !case.placement.in_place() {
        let buffer = comm.alloc::<T>(case.len)?;
        poison(comm, buffer.device_address(), buffer.num_bytes())?;
        output = Some(buffer);
    }
    let called = match &mut output {
        None => comm.all_reduce_in_place(&mut input, options),
        Some(output) => comm.all_reduce_with(&input, output, options),
    };
    let findings = called.and_then(|()| comm.synchronize()).and_then(|()| {
        // Out of place, the input must still hold what was filled in.
        let (result, untouched) = match &output {
            None => (input.device_address(), Vec::new()),
            Some(output) => (
                output.device_address(),
                vec![(
                    input.device_address(),
                    case.len,
                    Expect::Input { seed, rank },
                )],
            ),
        };
        let examined = Examined {
            dtype,
            output: result,
            len: case.len,
            sum,
            untouched,
        };
        // SAFETY: every buffer named holds `len` elements.
        unsafe { examined.findings(&checks) }
    });
    if case.placement.registered() {
        comm.deregister(&input)?;
    }
    drop(input);
    judge(comm, dtype, findings)
}

/// Captures an out-of-place all-reduce of unregistered buffers and an
/// in-place one (algorithm `in_place`) in one CUDA graph, registers the
/// graph's buffers, then replays it `replays` times with fresh inputs,
/// checking every replay, one thread per rank. Returns the first failing
/// replay's outcome, or the last one.
pub fn check_graph(
    comms: &mut [Communicator],
    dtype: DType,
    len: usize,
    in_place: AlgorithmChoice,
    replays: usize,
) -> Result<(usize, Outcome)> {
    first_outcome(on_every_rank(comms, |comm| {
        check_graph_on_rank(comm, dtype, len, in_place, replays)
    })?)
}

/// This rank's part of [`check_graph`], for ranks that are processes.
pub fn check_graph_on_rank(
    comm: &mut Communicator,
    dtype: DType,
    len: usize,
    in_place: AlgorithmChoice,
    replays: usize,
) -> Result<(usize, Outcome)> {
    match dtype {
        DType::F32 => check_graph_typed::<f32>(comm, len, in_place, replays),
        DType::F16 => check_graph_typed::<half::f16>(comm, len, in_place, replays),
        DType::BF16 => check_graph_typed::<half::bf16>(comm, len, in_place, replays),
    }
}

fn check_graph_typed<T: Element>(
    comm: &mut Communicator,
    len: usize,
    in_place: AlgorithmChoice,
    replays: usize,
) -> Result<(usize, Outcome)> {
    let dtype = T::DTYPE;
    let rank = comm.rank() as u32;
    let world = comm.world_size() as u32;
    let stream = comm.stream().clone();
    let checks = DeviceChecks::new(&stream, 2)?;
    let input = comm.alloc::<T>(len)?;
    let mut output = comm.alloc::<T>(len)?;
    let mut inout = comm.alloc::<T>(len)?;
    let graph = capture(&stream, || {
        comm.all_reduce(&input, &mut output)?;
        let options = CallOptions {
            algorithm: in_place,
            zero_copy: false,
            max_blocks: None,
        };
        comm.all_reduce_in_place(&mut inout, options)
    })?;
    comm.register_graph_buffers()?;
    let bytes = len * dtype.size();
    let out_of_place_push = runs_push(comm, AlgorithmChoice::Auto, bytes);
    let in_place_push = runs_push(comm, in_place, bytes);
    let mut replay_all = || -> Result<(usize, Outcome)> {
        let mut last = (0, Outcome::default());
        for replay in 0..replays {
            let seed = replay as u64 * 2 + 1;
            // SAFETY: every buffer holds `len` elements.
            unsafe {
                checks.fill(dtype, input.device_address(), len, seed, rank)?;
                checks.fill(dtype, inout.device_address(), len, seed + 1, rank)?;
            }
            poison(comm, output.device_address(), bytes)?;
            graph.launch().map_err(Error::driver("cuGraphLaunch"))?;
            let synced = comm.synchronize();
            for (buffer, seed, push, untouched) in [
                (&output, seed, out_of_place_push, true),
                (&inout, seed + 1, in_place_push, false),
            ] {
                let examined = Examined {
                    dtype,
                    output: buffer.device_address(),
                    len,
                    sum: Expect::Sum { seed, world, push },
                    untouched: if untouched {
                        vec![(input.device_address(), len, Expect::Input { seed, rank })]
                    } else {
                        Vec::new()
                    },
                };
                let findings = match &synced {
                    // SAFETY: every buffer holds `len` elements.
                    Ok(()) => unsafe { examined.findings(&checks) },
                    Err(error) => Err(Error::InvalidConfig(error.to_string())),
                };
                let outcome = judge(comm, dtype, findings)?;
                if !outcome.passed() {
                    return Ok((replay, outcome));
                }
                last = (replay, outcome);
            }
        }
        Ok(last)
    };
    let result = replay_all()?;
    // Peers unmap this graph's buffers before they are freed.
    drop(graph);
    comm.release_graph_buffers()?;
    Ok(result)
}

/// What `calls` enqueue on `stream`, captured into a graph (not yet
/// launched; the caller registers its buffers).
pub fn capture(stream: &Arc<CudaStream>, calls: impl FnOnce() -> Result<()>) -> Result<CudaGraph> {
    stream
        .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
        .map_err(Error::driver("cuStreamBeginCapture"))?;
    let captured = calls();
    let graph = stream
        .end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0))
        .map_err(Error::driver("cuStreamEndCapture"));
    captured?;
    graph?.ok_or_else(|| Error::InvalidConfig("capture produced no graph".into()))
}
