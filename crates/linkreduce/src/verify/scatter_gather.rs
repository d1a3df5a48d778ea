//! Checks of the reduce-scatter and the all-gather: inputs from check.cu's
//! generator (random, non-integer, mixed sign and magnitude), every element
//! of every output compared bitwise on the host with the reference (the
//! rank-order f32 sum rounded once; the gathered inputs), and every element
//! the call must not write (the input out of place, other ranks' blocks in
//! place, guards around views) compared with what it held. Eager, or as
//! replays of a captured graph with fresh data.

use std::fmt;

use cudarc::driver::DeviceSlice;

use super::fused::Digest;
use super::{
    capture, first_outcome, host_bits, judge, on_every_rank, poison, values, DeviceChecks, Outcome,
    RankFindings,
};
use crate::algorithm::AlgorithmChoice;
use crate::comm::{CallOptions, Communicator};
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::kernels::ScatterGather;
use crate::memory::DeviceBuffer;

/// How a case hands its buffers to the call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SgBuffers {
    /// Separate send and recv, unregistered: the input is staged.
    Separate,
    /// Separate, the send registered: peers read it in place.
    Registered,
    /// Views at a per-rank odd offset (misaligned) into unregistered buffers.
    OddViews,
    /// Views at a per-rank aligned offset into a registered send buffer.
    RegisteredViews,
    /// NCCL's in-place layout in one unregistered buffer.
    InPlace,
    /// NCCL's in-place layout in one registered buffer.
    InPlaceRegistered,
}

impl SgBuffers {
    pub const ALL: [SgBuffers; 6] = [
        SgBuffers::Separate,
        SgBuffers::Registered,
        SgBuffers::OddViews,
        SgBuffers::RegisteredViews,
        SgBuffers::InPlace,
        SgBuffers::InPlaceRegistered,
    ];

    fn registered(self) -> bool {
        matches!(
            self,
            SgBuffers::Registered | SgBuffers::RegisteredViews | SgBuffers::InPlaceRegistered
        )
    }

    fn in_place(self) -> bool {
        matches!(self, SgBuffers::InPlace | SgBuffers::InPlaceRegistered)
    }

    /// Elements before the view in its buffer on `rank` (the rest of the
    /// buffer is guard).
    fn lead(self, rank: usize) -> usize {
        match self {
            SgBuffers::OddViews => 3 + rank,
            SgBuffers::RegisteredViews => 8 * (rank + 1),
            _ => GUARD,
        }
    }
}

impl fmt::Display for SgBuffers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SgBuffers::Separate => "separate",
            SgBuffers::Registered => "registered",
            SgBuffers::OddViews => "odd-views",
            SgBuffers::RegisteredViews => "registered-views",
            SgBuffers::InPlace => "in-place",
            SgBuffers::InPlaceRegistered => "in-place-registered",
        })
    }
}

/// Guard elements after every view (and before it, unless a view's lead
/// says otherwise): a whole number of packets in every dtype.
const GUARD: usize = 64;

/// The generator's "rank" for guards (a rank no group has).
const GUARD_RANK: u32 = 300;

/// One reduce-scatter or all-gather to check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SgCase {
    pub op: ScatterGather,
    pub dtype: DType,
    /// Elements per rank's block.
    pub count: usize,
    pub algorithm: AlgorithmChoice,
    pub buffers: SgBuffers,
    /// 0: one eager call; otherwise captured once and replayed this many
    /// times with fresh data.
    pub graph_replays: usize,
}

impl fmt::Display for SgCase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} {} count {} {}",
            self.op, self.dtype, self.algorithm, self.count, self.buffers
        )?;
        if self.graph_replays > 0 {
            write!(f, " graph x{}", self.graph_replays)?;
        }
        Ok(())
    }
}

/// Every collective, dtype, count and buffer kind, eager, with `algorithm`.
pub fn sg_sweep_cases(
    dtypes: &[DType],
    counts: &[usize],
    algorithm: AlgorithmChoice,
) -> Vec<SgCase> {
    let mut cases = Vec::new();
    for op in ScatterGather::ALL {
        for &dtype in dtypes {
            for &count in counts {
                for buffers in SgBuffers::ALL {
                    cases.push(SgCase {
                        op,
                        dtype,
                        count,
                        algorithm,
                        buffers,
                        graph_replays: 0,
                    });
                }
            }
        }
    }
    cases
}

/// Runs one case on every rank, one thread each, and checks it.
pub fn check_sg_case(comms: &mut [Communicator], case: SgCase, seed: u64) -> Result<Outcome> {
    first_outcome(on_every_rank(comms, |comm| {
        check_sg_case_on_rank(comm, case, seed)
    })?)
}

/// This rank's part of [`check_sg_case`], for ranks that are processes.
/// Collective; every rank gets the same outcome.
pub fn check_sg_case_on_rank(comm: &mut Communicator, case: SgCase, seed: u64) -> Result<Outcome> {
    match case.dtype {
        DType::F32 => check_typed::<f32>(comm, case, seed),
        DType::F16 => check_typed::<half::f16>(comm, case, seed),
        DType::BF16 => check_typed::<half::bf16>(comm, case, seed),
    }
}

/// Where a case's views lie in its buffers on this rank, in elements.
#[derive(Debug, Clone, Copy)]
struct Shape {
    case: SgCase,
    world: usize,
    rank: usize,
    lead: usize,
}

impl Shape {
    fn send_len(&self) -> usize {
        match self.case.op {
            ScatterGather::ReduceScatter => self.case.count * self.world,
            ScatterGather::AllGather => self.case.count,
        }
    }

    fn recv_len(&self) -> usize {
        match self.case.op {
            ScatterGather::ReduceScatter => self.case.count,
            ScatterGather::AllGather => self.case.count * self.world,
        }
    }

    /// The larger view: the one buffer of an in-place call.
    fn larger(&self) -> usize {
        self.case.count * self.world
    }

    /// Where the send starts in its buffer (in place: this rank's block of
    /// the all-gather's recv).
    fn send_at(&self) -> usize {
        match (self.case.buffers.in_place(), self.case.op) {
            (true, ScatterGather::AllGather) => self.lead + self.rank * self.case.count,
            _ => self.lead,
        }
    }

    /// Where the recv starts in its buffer.
    fn recv_at(&self) -> usize {
        match (self.case.buffers.in_place(), self.case.op) {
            (true, ScatterGather::ReduceScatter) => self.lead + self.rank * self.case.count,
            _ => self.lead,
        }
    }
}

/// A case's buffers on one rank: send, and recv unless in place.
struct Buffers<T: Element> {
    send: DeviceBuffer<T>,
    recv: Option<DeviceBuffer<T>>,
}

impl<T: Element> Buffers<T> {
    fn new(comm: &Communicator, shape: &Shape) -> Result<Self> {
        let around = |len| comm.alloc::<T>(shape.lead + len + GUARD);
        Ok(if shape.case.buffers.in_place() {
            Buffers {
                send: around(shape.larger())?,
                recv: None,
            }
        } else {
            Buffers {
                send: around(shape.send_len())?,
                recv: Some(around(shape.recv_len())?),
            }
        })
    }

    /// The call's recv buffer: the one buffer in place.
    fn recv_buffer(&self) -> &DeviceBuffer<T> {
        self.recv.as_ref().unwrap_or(&self.send)
    }

    /// The call itself, on this rank's stream.
    fn call(&mut self, comm: &mut Communicator, shape: &Shape) -> Result<()> {
        let stream = comm.stream().clone();
        let options = CallOptions {
            algorithm: shape.case.algorithm,
            zero_copy: false,
            max_blocks: None,
        };
        let (op, lead) = (shape.case.op, shape.lead);
        match &mut self.recv {
            None => {
                let mut buffer = self.send.slice_mut(lead..lead + shape.larger())?;
                match op {
                    ScatterGather::ReduceScatter => {
                        comm.reduce_scatter_in_place_on(&stream, &mut buffer, options)
                    }
                    ScatterGather::AllGather => {
                        comm.all_gather_in_place_on(&stream, &mut buffer, options)
                    }
                }
            }
            Some(recv) => {
                let send = self.send.slice(lead..lead + shape.send_len())?;
                let mut recv = recv.slice_mut(lead..lead + shape.recv_len())?;
                match op {
                    ScatterGather::ReduceScatter => {
                        comm.reduce_scatter_on(&stream, &send, &mut recv, options)
                    }
                    ScatterGather::AllGather => {
                        comm.all_gather_on(&stream, &send, &mut recv, options)
                    }
                }
            }
        }
    }

    /// Fills guards, the input and (poisoned) the output for `seed`.
    fn prepare(
        &self,
        comm: &Communicator,
        checks: &DeviceChecks,
        shape: &Shape,
        seed: u64,
    ) -> Result<()> {
        let dtype = T::DTYPE;
        let size = dtype.size() as u64;
        let guard_seed = !seed;
        for buffer in std::iter::once(&self.send).chain(&self.recv) {
            // SAFETY: the buffer holds its own length.
            unsafe {
                checks.fill(
                    dtype,
                    buffer.device_address(),
                    buffer.len(),
                    guard_seed,
                    GUARD_RANK,
                )
            }?;
        }
        let recv = self.recv_buffer().device_address() + shape.recv_at() as u64 * size;
        poison(comm, recv, shape.recv_len() * dtype.size())?;
        let send = self.send.device_address() + shape.send_at() as u64 * size;
        let rank = shape.rank as u32;
        // SAFETY: the send view holds send_len elements inside its buffer.
        unsafe { checks.fill(dtype, send, shape.send_len(), seed, rank) }
    }
}

/// What every element of a buffer must hold after the call, as storage bits.
fn expected_buffer(shape: &Shape, seed: u64, len: usize, is_send_buffer: bool) -> Vec<u32> {
    let dtype = shape.case.dtype;
    let count = shape.case.count;
    let guard = |i: usize| values::input_bits(dtype, !seed, GUARD_RANK, i as u64);
    let mut expected: Vec<u32> = (0..len).map(guard).collect();
    let rank = shape.rank as u32;
    if is_send_buffer {
        let at = shape.send_at();
        for (i, bits) in expected[at..at + shape.send_len()].iter_mut().enumerate() {
            *bits = values::input_bits(dtype, seed, rank, i as u64);
        }
    }
    if is_send_buffer == shape.case.buffers.in_place() {
        let at = shape.recv_at();
        let out = &mut expected[at..at + shape.recv_len()];
        for (i, bits) in out.iter_mut().enumerate() {
            *bits = match shape.case.op {
                ScatterGather::ReduceScatter => {
                    let index = (shape.rank * count + i) as u64;
                    values::sum_bits(dtype, seed, shape.world as u32, index, false)
                }
                ScatterGather::AllGather => {
                    let owner = (i / count) as u32;
                    values::input_bits(dtype, seed, owner, (i % count) as u64)
                }
            };
        }
    }
    expected
}

fn check_typed<T: Element>(comm: &mut Communicator, case: SgCase, seed: u64) -> Result<Outcome> {
    let shape = Shape {
        case,
        world: comm.world_size(),
        rank: comm.rank(),
        lead: case.buffers.lead(comm.rank()),
    };
    let stream = comm.stream().clone();
    let checks = DeviceChecks::new(&stream, 1)?;
    let mut buffers = Buffers::<T>::new(comm, &shape)?;
    if case.buffers.registered() {
        comm.register(&buffers.send)?;
    }
    let graph = match case.graph_replays {
        0 => None,
        _ => {
            let graph = capture(&stream, || buffers.call(comm, &shape))?;
            comm.register_graph_buffers()?;
            Some(graph)
        }
    };
    let mut outcome = Outcome::default();
    for replay in 0..case.graph_replays.max(1) {
        let seed = seed.wrapping_mul(1000).wrapping_add(replay as u64);
        let called = buffers
            .prepare(comm, &checks, &shape, seed)
            .and_then(|()| match &graph {
                Some(graph) => graph.launch().map_err(Error::driver("cuGraphLaunch")),
                None => buffers.call(comm, &shape),
            });
        let findings = called
            .and_then(|()| comm.synchronize())
            .and_then(|()| findings(&buffers, &shape, seed, &stream));
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
    if case.buffers.registered() {
        comm.deregister(&buffers.send)?;
    }
    Ok(outcome)
}

/// Compares every element of this rank's buffers with what it must hold.
fn findings<T: Element>(
    buffers: &Buffers<T>,
    shape: &Shape,
    seed: u64,
    stream: &std::sync::Arc<cudarc::driver::CudaStream>,
) -> Result<RankFindings> {
    let dtype = T::DTYPE;
    let mut findings = RankFindings::default();
    let mut digest = Digest::default();
    for (buffer, is_send) in std::iter::once((&buffers.send, true))
        .chain(buffers.recv.as_ref().map(|recv| (recv, false)))
    {
        // SAFETY: the buffer holds its own length.
        let got = unsafe { host_bits(stream, dtype, buffer.device_address(), buffer.len()) }?;
        let expected = expected_buffer(shape, seed, buffer.len(), is_send);
        let out = shape.recv_at()..shape.recv_at() + shape.recv_len();
        let holds_output = is_send == shape.case.buffers.in_place();
        if holds_output && shape.case.op == ScatterGather::AllGather {
            // Every rank gathers the same bits.
            digest.add(&got[out.clone()]);
        }
        for (index, (&got, &expected)) in got.iter().zip(&expected).enumerate() {
            if got == expected {
                continue;
            }
            if holds_output && out.contains(&index) {
                findings.mismatches += 1;
                let at = (index - out.start) as u64;
                findings.first.get_or_insert((at, got, expected));
            } else {
                findings.corrupted += 1;
            }
        }
    }
    findings.digest = digest.0;
    Ok(findings)
}
