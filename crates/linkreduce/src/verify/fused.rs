//! Checks of the all-reduce fused with residual add and RMSNorm: every
//! element of the fused call's residual and output, and of the unfused
//! sequence's (all-reduce, then the plain kernel), compared bitwise with
//! the host's mirror (`norm.rs`), eagerly or as replays of a captured
//! graph. Inputs come from check.cu's generator; residual and weight are
//! the same on every rank, so every rank's results must be identical.

use std::fmt;

use super::norm::add_rms_norm_row;
use super::{
    capture, first_outcome, host_bits, judge, on_every_rank, poison, runs_push, values,
    DeviceChecks, Outcome, RankFindings,
};
use crate::algorithm::{Algorithm, AlgorithmChoice};
use crate::comm::{CallOptions, Communicator, RmsNorm};
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::memory::DeviceBuffer;

/// The eps of every checked call.
pub const CHECK_EPS: f32 = 1e-6;

/// The generator's "rank" for data every rank shares (residual, weight).
const SHARED_RANK: u32 = 200;

/// One fused call to check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NormCase {
    pub dtype: DType,
    pub rows: usize,
    pub hidden: usize,
    pub algorithm: AlgorithmChoice,
    /// 0: one eager call; otherwise the call is captured once and the
    /// graph replayed this many times with fresh data.
    pub graph_replays: usize,
}

impl fmt::Display for NormCase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "fused-norm {} {} rows {} hidden {}",
            self.dtype, self.algorithm, self.rows, self.hidden
        )?;
        if self.graph_replays > 0 {
            write!(f, " graph x{}", self.graph_replays)?;
        }
        Ok(())
    }
}

/// Every combination of dtype, algorithm (automatic and each forced) and
/// shape (rows, hidden), eager.
pub fn norm_sweep_cases(dtypes: &[DType], shapes: &[(usize, usize)]) -> Vec<NormCase> {
    let algorithms = std::iter::once(AlgorithmChoice::Auto)
        .chain(Algorithm::ALL.map(AlgorithmChoice::Force))
        .collect::<Vec<_>>();
    let mut cases = Vec::new();
    for &dtype in dtypes {
        for &algorithm in &algorithms {
            for &(rows, hidden) in shapes {
                cases.push(NormCase {
                    dtype,
                    rows,
                    hidden,
                    algorithm,
                    graph_replays: 0,
                });
            }
        }
    }
    cases
}

/// Runs one case on every rank, one thread each, and checks it.
pub fn check_norm_case(comms: &mut [Communicator], case: NormCase, seed: u64) -> Result<Outcome> {
    first_outcome(on_every_rank(comms, |comm| {
        check_norm_case_on_rank(comm, case, seed)
    })?)
}

/// This rank's part of [`check_norm_case`], for ranks that are processes.
/// Collective; every rank gets the same outcome.
pub fn check_norm_case_on_rank(
    comm: &mut Communicator,
    case: NormCase,
    seed: u64,
) -> Result<Outcome> {
    match case.dtype {
        DType::F16 => check_typed::<half::f16>(comm, case, seed),
        DType::BF16 => check_typed::<half::bf16>(comm, case, seed),
        DType::F32 => Err(Error::UnsupportedDType {
            op: "the fused-norm check",
            dtype: case.dtype,
        }),
    }
}

/// A residual updated in place and the normed output written beside it.
struct Results<T: Element> {
    residual: DeviceBuffer<T>,
    out: DeviceBuffer<T>,
}

impl<T: Element> Results<T> {
    fn new(comm: &Communicator, len: usize) -> Result<Self> {
        Ok(Results {
            residual: comm.alloc(len)?,
            out: comm.alloc(len)?,
        })
    }
}

/// Where a replay's generated data comes from.
#[derive(Debug, Clone, Copy)]
struct Seeds {
    input: u64,
    weight: u64,
    residual: u64,
}

impl Seeds {
    fn of(seed: u64, replay: usize) -> Seeds {
        let base = seed.wrapping_mul(1000).wrapping_add(replay as u64 * 3);
        Seeds {
            input: base,
            weight: base + 1,
            residual: base + 2,
        }
    }
}

fn check_typed<T: Element>(comm: &mut Communicator, case: NormCase, seed: u64) -> Result<Outcome> {
    let len = case.rows * case.hidden;
    let stream = comm.stream().clone();
    let checks = DeviceChecks::new(&stream, 1)?;
    let input = comm.alloc::<T>(len)?;
    let weight = comm.alloc::<T>(case.hidden)?;
    let mut sum = comm.alloc::<T>(len)?;
    let mut fused = Results::<T>::new(comm, len)?;
    let mut unfused = Results::<T>::new(comm, len)?;
    let options = CallOptions {
        algorithm: case.algorithm,
        zero_copy: false,
        max_blocks: None,
    };
    let norm = RmsNorm {
        weight: &weight,
        eps: CHECK_EPS,
    };
    let graph = match case.graph_replays {
        0 => None,
        _ => {
            let graph = capture(&stream, || {
                let residual = &mut fused.residual;
                comm.all_reduce_add_rms_norm_on(
                    &stream,
                    &input,
                    residual,
                    norm,
                    &mut fused.out,
                    options,
                )
            })?;
            comm.register_graph_buffers()?;
            Some(graph)
        }
    };
    let mut outcome = Outcome::default();
    for replay in 0..case.graph_replays.max(1) {
        let seeds = Seeds::of(seed, replay);
        let rank = comm.rank() as u32;
        // SAFETY: every buffer holds `len` elements, the weight `hidden`.
        unsafe {
            checks.fill(T::DTYPE, input.device_address(), len, seeds.input, rank)?;
            checks.fill(
                T::DTYPE,
                weight.device_address(),
                case.hidden,
                seeds.weight,
                SHARED_RANK,
            )?;
            for results in [&fused, &unfused] {
                let residual = results.residual.device_address();
                checks.fill(T::DTYPE, residual, len, seeds.residual, SHARED_RANK)?;
            }
        }
        for out in [&fused.out, &unfused.out, &sum] {
            poison(comm, out.device_address(), len * T::DTYPE.size())?;
        }
        let called = match &graph {
            Some(graph) => graph.launch().map_err(Error::driver("cuGraphLaunch")),
            None => comm.all_reduce_add_rms_norm_on(
                &stream,
                &input,
                &mut fused.residual,
                norm,
                &mut fused.out,
                options,
            ),
        }
        .and_then(|()| comm.all_reduce_with(&input, &mut sum, options))
        .and_then(|()| {
            let residual = &mut unfused.residual;
            comm.add_rms_norm_on(&stream, &sum, residual, norm, &mut unfused.out)
        });
        let examined = Examined {
            case,
            seeds,
            world: comm.world_size() as u32,
            rank,
            push: runs_push(comm, case.algorithm, len * T::DTYPE.size()),
            input: input.device_address(),
            weight: weight.device_address(),
            results: [&fused, &unfused]
                .map(|r| (r.residual.device_address(), r.out.device_address())),
        };
        let findings = called
            .and_then(|()| comm.synchronize())
            // SAFETY: the addresses hold what `case` says.
            .and_then(|()| unsafe { examined.findings(&stream) });
        outcome = judge(comm, T::DTYPE, findings)?;
        if !outcome.passed() {
            break;
        }
    }
    if graph.is_some() {
        // Peers unmap the graph's buffers before they are freed.
        drop(graph);
        comm.release_graph_buffers()?;
    }
    Ok(outcome)
}

/// One replay's buffers and what they must hold.
struct Examined {
    case: NormCase,
    seeds: Seeds,
    world: u32,
    rank: u32,
    push: bool,
    input: u64,
    weight: u64,
    /// (residual, out) of the fused call, then of the unfused sequence.
    results: [(u64, u64); 2],
}

impl Examined {
    /// Compares every result with the host's mirror.
    ///
    /// # Safety
    /// Input, residuals and outputs must hold `rows x hidden` elements,
    /// the weight `hidden`.
    unsafe fn findings(
        &self,
        stream: &std::sync::Arc<cudarc::driver::CudaStream>,
    ) -> Result<RankFindings> {
        let (dtype, hidden) = (self.case.dtype, self.case.hidden);
        let len = self.case.rows * hidden;
        let generated = |seed, rank, count: usize| -> Vec<u32> {
            (0..count as u64)
                .map(|i| values::input_bits(dtype, seed, rank, i))
                .collect()
        };
        let weight = generated(self.seeds.weight, SHARED_RANK, hidden);
        let mut residual = generated(self.seeds.residual, SHARED_RANK, len);
        let sum: Vec<u32> = (0..len as u64)
            .map(|i| values::sum_bits(dtype, self.seeds.input, self.world, i, self.push))
            .collect();
        let mut out = Vec::with_capacity(len);
        for (row, sum) in residual.chunks_mut(hidden).zip(sum.chunks(hidden)) {
            out.extend(add_rms_norm_row(dtype, sum, row, &weight, CHECK_EPS));
        }
        let mut findings = RankFindings::default();
        let mut digest = Digest::default();
        for (which, &(residual_at, out_at)) in self.results.iter().enumerate() {
            for (at, expected) in [(out_at, &out), (residual_at, &residual)] {
                // SAFETY: the caller vouches for the addresses.
                let got = unsafe { host_bits(stream, dtype, at, len) }?;
                if which == 0 {
                    digest.add(&got);
                }
                for (index, (&got, &expected)) in (0..).zip(got.iter().zip(expected)) {
                    if got != expected {
                        findings.mismatches += 1;
                        findings.first.get_or_insert((index, got, expected));
                    }
                }
            }
        }
        findings.digest = digest.0;
        // The input and the weight must be left as they were.
        let untouched = [
            (self.input, generated(self.seeds.input, self.rank, len)),
            (self.weight, weight),
        ];
        for (at, expected) in untouched {
            // SAFETY: the caller vouches for the addresses.
            let got = unsafe { host_bits(stream, dtype, at, expected.len()) }?;
            findings.corrupted += got.iter().zip(&expected).filter(|(g, e)| g != e).count() as u64;
        }
        Ok(findings)
    }
}

/// FNV-1a over storage bits: the same results give the same digest on
/// every rank.
pub(super) struct Digest(pub(super) u64);

impl Default for Digest {
    fn default() -> Self {
        Digest(0xcbf2_9ce4_8422_2325)
    }
}

impl Digest {
    pub(super) fn add(&mut self, bits: &[u32]) {
        for &word in bits {
            self.0 = (self.0 ^ u64::from(word)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}
