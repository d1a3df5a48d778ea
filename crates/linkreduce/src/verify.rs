//! Correctness checks on real GPUs, shared by the GPU tests and
//! `linkreduce check`: integer-valued inputs (so every dtype sums exactly),
//! a CPU reference in f64, and a comparison of every rank's output with the
//! reference and, by digest through the rendezvous, with every other rank's
//! (so the same checks run whether ranks are threads or processes).

use std::fmt;

use cudarc::driver::sys::CUstreamCaptureMode;
use cudarc::driver::DeviceSlice;

use crate::algorithm::{Algorithm, AlgorithmChoice};
use crate::comm::{CallOptions, Communicator};
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::memory::DeviceBuffer;
use crate::rendezvous::all_gather_u64s;
use sha2::{Digest, Sha256};

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
}

/// Every combination of dtype, algorithm (forced), length and placement,
/// less staged ones whose input would not fit in `staging_bytes`.
pub fn sweep_cases(dtypes: &[DType], lengths: &[usize], staging_bytes: usize) -> Vec<Case> {
    let mut cases = Vec::new();
    for &dtype in dtypes {
        for algorithm in Algorithm::ALL {
            for &len in lengths {
                for placement in Placement::ALL {
                    let staged = !placement.registered();
                    if staged && len * dtype.size() > staging_bytes {
                        continue;
                    }
                    cases.push(Case {
                        dtype,
                        len,
                        algorithm: AlgorithmChoice::Force(algorithm),
                        placement,
                    });
                }
            }
        }
    }
    cases
}

/// What a check found.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// Elements (over all ranks) that differ from the reference.
    pub mismatches: usize,
    /// The first of them: (rank, index, got, expected).
    pub first_mismatch: Option<(usize, usize, f64, f64)>,
    /// Whether every rank's output has the same bits as rank 0's.
    pub ranks_identical: bool,
}

impl Outcome {
    pub fn passed(&self) -> bool {
        self.mismatches == 0 && self.ranks_identical
    }
}

impl fmt::Display for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} len {} {}",
            self.dtype, self.algorithm, self.len, self.placement
        )
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.first_mismatch {
            None if self.ranks_identical => write!(f, "ok"),
            None => write!(f, "ranks differ from rank 0"),
            Some((rank, index, got, want)) => {
                write!(
                f,
                "{} wrong element(s); first: rank {rank} index {index} got {got} expected {want}{}",
                self.mismatches,
                if self.ranks_identical { "" } else { "; ranks differ" }
            )
            }
        }
    }
}

/// A small integer in -16..=16, different for every (seed, rank, index):
/// sums of up to 8 of them are exact in bf16, f16 and f32. Half of the
/// zeros are negative zeros, the value push reserves as its empty marker,
/// so that its rewriting is exercised (sums compare equal either way).
pub fn input_value(seed: u64, rank: usize, index: usize) -> f64 {
    let mut x = seed ^ ((rank as u64) << 40) ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    let value = (x % 33) as f64 - 16.0;
    if value == 0.0 && (x >> 40) & 1 == 1 {
        -0.0
    } else {
        value
    }
}

fn inputs<T: Element>(seed: u64, rank: usize, len: usize) -> Vec<T> {
    (0..len)
        .map(|i| T::from_f64(input_value(seed, rank, i)))
        .collect()
}

/// What one rank found in its own output.
#[derive(Debug, Clone, Copy, PartialEq)]
struct RankFindings {
    mismatches: usize,
    /// The first wrong element: (index, got, expected).
    first: Option<(usize, f64, f64)>,
    /// A hash of the output's bits, to compare ranks without moving outputs.
    digest: u64,
}

impl RankFindings {
    /// Compares `output` of a world of `world` ranks with the f64 sum of
    /// every rank's input.
    fn of<T: Element>(seed: u64, world: usize, output: &[T]) -> RankFindings {
        let mut hasher = Sha256::new();
        let mut findings = RankFindings {
            mismatches: 0,
            first: None,
            digest: 0,
        };
        for (i, value) in output.iter().enumerate() {
            let expected = T::from_f64((0..world).map(|r| input_value(seed, r, i)).sum()).to_f64();
            let got = value.to_f64();
            hasher.update(got.to_bits().to_le_bytes());
            if got != expected {
                findings.mismatches += 1;
                findings.first.get_or_insert((i, got, expected));
            }
        }
        let digest = hasher.finalize();
        findings.digest = u64::from_le_bytes(digest[..8].try_into().unwrap_or_default());
        findings
    }

    fn to_words(self) -> [u64; 6] {
        let (index, got, expected) = self.first.unwrap_or((0, 0.0, 0.0));
        [
            self.mismatches as u64,
            u64::from(self.first.is_some()),
            index as u64,
            got.to_bits(),
            expected.to_bits(),
            self.digest,
        ]
    }

    fn from_words(words: &[u64]) -> Option<RankFindings> {
        let &[mismatches, has_first, index, got, expected, digest] = words else {
            return None;
        };
        Some(RankFindings {
            mismatches: mismatches as usize,
            first: (has_first == 1).then(|| {
                (
                    index as usize,
                    f64::from_bits(got),
                    f64::from_bits(expected),
                )
            }),
            digest,
        })
    }
}

/// Every rank's findings, in rank order, as one outcome.
fn combine(per_rank: &[RankFindings]) -> Outcome {
    Outcome {
        mismatches: per_rank.iter().map(|f| f.mismatches).sum(),
        first_mismatch: per_rank
            .iter()
            .enumerate()
            .find_map(|(rank, f)| f.first.map(|(i, got, want)| (rank, i, got, want))),
        ranks_identical: per_rank.iter().all(|f| f.digest == per_rank[0].digest),
    }
}

/// Judges this rank's output against the reference and, through the
/// rendezvous, against every other rank's: the same outcome on every rank,
/// whether the ranks are threads or processes. Collective.
fn judge<T: Element>(comm: &Communicator, seed: u64, output: &[T]) -> Result<Outcome> {
    let mine = RankFindings::of(seed, comm.world_size(), output);
    let all = all_gather_u64s(
        comm.rendezvous().as_ref(),
        "a correctness check",
        &mine.to_words(),
    )?;
    let per_rank = all
        .iter()
        .enumerate()
        .map(|(rank, words)| {
            RankFindings::from_words(words).ok_or_else(|| Error::RankMismatch {
                what: "a correctness check",
                detail: format!("rank {rank} sent {} words of findings", words.len()),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(combine(&per_rank))
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

/// Fills a buffer with all-ones bits (NaN in every dtype), so that an
/// element the kernel never writes cannot pass.
fn poison<T: Element>(comm: &Communicator, buffer: &mut DeviceBuffer<T>) -> Result<()> {
    let bytes = buffer.num_bytes();
    let stream = comm.stream();
    // SAFETY: the buffer owns `bytes` bytes at its address.
    crate::memory::check(
        unsafe {
            cudarc::driver::sys::cuMemsetD8Async(
                buffer.device_address(),
                0xff,
                bytes,
                stream.cu_stream(),
            )
        },
        "cuMemsetD8Async",
    )
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

fn check_typed<T: Element + Default>(
    comm: &mut Communicator,
    case: Case,
    seed: u64,
) -> Result<Outcome> {
    let options = CallOptions {
        algorithm: case.algorithm,
        zero_copy: false,
    };
    let mut input = comm.upload(&inputs::<T>(seed, comm.rank(), case.len))?;
    if case.placement.registered() {
        comm.register(&input)?;
    }
    let output = if case.placement.in_place() {
        comm.all_reduce_in_place(&mut input, options)?;
        comm.synchronize()?;
        comm.download(&input)
    } else {
        let mut output = comm.alloc::<T>(case.len)?;
        poison(comm, &mut output)?;
        comm.all_reduce_with(&input, &mut output, options)?;
        comm.synchronize()?;
        comm.download(&output)
    };
    if case.placement.registered() {
        comm.deregister(&input)?;
    }
    // Free before the collective judgement: freeing memory synchronises the
    // device, which for ranks sharing a GPU would wait on a peer's next
    // kernel, itself waiting for this rank.
    drop(input);
    judge(comm, seed, &output?)
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

fn check_graph_typed<T: Element + Default>(
    comm: &mut Communicator,
    len: usize,
    in_place: AlgorithmChoice,
    replays: usize,
) -> Result<(usize, Outcome)> {
    let stream = comm.stream().clone();
    let mut input = comm.alloc::<T>(len)?;
    let mut output = comm.alloc::<T>(len)?;
    let mut inout = comm.alloc::<T>(len)?;
    stream
        .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
        .map_err(Error::driver("cuStreamBeginCapture"))?;
    let captured = comm.all_reduce(&input, &mut output).and_then(|_| {
        let options = CallOptions {
            algorithm: in_place,
            zero_copy: false,
        };
        comm.all_reduce_in_place(&mut inout, options)
    });
    let graph = stream
        .end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0))
        .map_err(Error::driver("cuStreamEndCapture"));
    captured?;
    let graph = graph?.ok_or_else(|| Error::InvalidConfig("capture produced no graph".into()))?;
    comm.register_graph_buffers()?;
    let mut replay_all = || -> Result<(usize, Outcome)> {
        let mut last = (0, Outcome::default());
        for replay in 0..replays {
            let seed = replay as u64 * 2 + 1;
            let a = inputs::<T>(seed, comm.rank(), len);
            let b = inputs::<T>(seed + 1, comm.rank(), len);
            stream
                .memcpy_htod(&a, &mut input)
                .map_err(Error::driver("cuMemcpyHtoD"))?;
            stream
                .memcpy_htod(&b, &mut inout)
                .map_err(Error::driver("cuMemcpyHtoD"))?;
            poison(comm, &mut output)?;
            graph.launch().map_err(Error::driver("cuGraphLaunch"))?;
            comm.synchronize()?;
            for (buffer, seed) in [(&output, seed), (&inout, seed + 1)] {
                let outcome = judge(comm, seed, &comm.download(buffer)?)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_are_small_integers_that_vary() {
        let values: Vec<f64> = (0..1000).map(|i| input_value(7, 3, i)).collect();
        assert!(values
            .iter()
            .all(|v| v.fract() == 0.0 && (-16.0..=16.0).contains(v)));
        let distinct: std::collections::BTreeSet<i64> = values.iter().map(|&v| v as i64).collect();
        assert!(distinct.len() > 20);
        let zeros = values.iter().filter(|v| **v == 0.0);
        assert!(zeros.clone().any(|v| v.is_sign_negative()));
        assert!(zeros.clone().any(|v| v.is_sign_positive()));
        assert_ne!(input_value(7, 3, 5), input_value(7, 4, 5));
    }

    #[test]
    fn findings_catch_wrong_elements_nan_and_rank_disagreement() {
        let seed = 11;
        let reference: Vec<f32> = (0..16)
            .map(|i| (0..2).map(|r| input_value(seed, r, i)).sum::<f64>() as f32)
            .collect();
        let good = RankFindings::of(seed, 2, &reference);
        assert_eq!(RankFindings::from_words(&good.to_words()), Some(good));
        let outcome = combine(&[good, good]);
        assert!(outcome.passed(), "{outcome}");
        let mut wrong = reference.clone();
        wrong[5] += 1.0;
        let bad = RankFindings::of(seed, 2, &wrong);
        assert_eq!(RankFindings::from_words(&bad.to_words()), Some(bad));
        let outcome = combine(&[good, bad]);
        assert_eq!(outcome.mismatches, 1);
        assert_eq!(outcome.first_mismatch.map(|m| (m.0, m.1)), Some((1, 5)));
        assert!(!outcome.ranks_identical);
        let mut nan = reference;
        nan[0] = f32::NAN;
        let nan = RankFindings::of(seed, 2, &nan);
        assert!(!combine(&[nan, nan]).passed());
    }
}
