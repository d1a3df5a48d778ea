//! `bench --op reduce-scatter` and `bench --op all-gather`: linkreduce's
//! automatic call (the kernels or NCCL, by the library's size rule) against
//! NCCL's own collective on the same kind of buffers, through the shared
//! sweep (sweep.rs). A size is one rank's block: the reduce-scatter's
//! receive block, the all-gather's send block.

use linkreduce::verify::values::{round_to, small_integer};
use linkreduce::{
    Algorithm, AlgorithmChoice, CallOptions, Communicator, DType, DeviceBuffer, Element,
    ScatterGather,
};

use super::all_reduce::Implementation;
use super::measure::{time_eager_and_graphed, Rank, RankRun};
use super::sweep::{sweep_rank, write_report, Labels};
use super::{Args, Op};
use crate::error::{CliError, Result};

pub(super) const DEFAULT_SIZES: &str = "1K:64M";

/// NCCL first: its rows exist before the ratios to it need them. The
/// kernels forced as well as the automatic call, so that the sizes the
/// automatic rule sends to NCCL still show what the kernels would do
/// there: the crossover is read off these rows.
const IMPLEMENTATIONS: [Implementation; 3] = [
    Implementation::Nccl,
    Implementation::Auto,
    Implementation::OneStage,
];

/// Seed of the inputs' small integers.
const SEED: u64 = 21;

/// What the output holds before a call: no sum or copy of small integers
/// is 0.5, so an element left unwritten counts as wrong.
const POISON: f64 = 0.5;

/// The collective and block sizes of one run.
#[derive(Debug)]
pub(super) struct Sweep {
    pub collective: ScatterGather,
    pub sizes: Vec<usize>,
}

impl Sweep {
    pub fn new(op: Op, sizes: Vec<usize>) -> Result<Sweep> {
        let collective = match op {
            Op::ReduceScatter => ScatterGather::ReduceScatter,
            Op::AllGather => ScatterGather::AllGather,
            Op::AllReduce | Op::FusedNorm => {
                return Err(CliError::Internal("a scatter-gather sweep for another op"))
            }
        };
        Ok(Sweep { collective, sizes })
    }

    fn op(&self) -> Op {
        match self.collective {
            ScatterGather::ReduceScatter => Op::ReduceScatter,
            ScatterGather::AllGather => Op::AllGather,
        }
    }
}

/// Every implementation and size on this rank; rank 0 prints and writes
/// the report. Returns whether every result was right.
pub(super) fn bench_rank(comm: &mut Communicator, args: &Args, sweep: &Sweep) -> Result<bool> {
    let (collective, repetitions) = (sweep.collective, args.repetitions);
    let measure = |rank: &mut Rank, implementation, count| match args.dtype {
        DType::F32 => measure::<f32>(rank, collective, implementation, count, repetitions),
        DType::F16 => measure::<half::f16>(rank, collective, implementation, count, repetitions),
        DType::BF16 => measure::<half::bf16>(rank, collective, implementation, count, repetitions),
    };
    let path_of = |comm: &Communicator, implementation, _bytes: usize| {
        (implementation == Implementation::Auto)
            .then(|| comm.scatter_gather_path().name().to_string())
    };
    let (right, report) = sweep_rank(
        comm,
        args,
        sweep.op(),
        &sweep.sizes,
        &IMPLEMENTATIONS,
        measure,
        Labels {
            path_of,
            blocks_of: |_: &Communicator, _, _| None,
        },
    )?;
    if let (Some(report), Some(path)) = (report, &args.json) {
        write_report(&report, path)?;
    }
    Ok(right)
}

/// One rank's blocks: its input and what its output must hold. Inputs are
/// small integers, so every sum is exact in any order and NCCL's results
/// are compared bit for bit on any number of ranks.
#[derive(Debug, Clone, Copy)]
struct Blocks {
    collective: ScatterGather,
    world: usize,
    rank: usize,
    /// Elements per block.
    count: usize,
}

impl Blocks {
    fn send_len(&self) -> usize {
        match self.collective {
            ScatterGather::ReduceScatter => self.world * self.count,
            ScatterGather::AllGather => self.count,
        }
    }

    fn recv_len(&self) -> usize {
        match self.collective {
            ScatterGather::ReduceScatter => self.count,
            ScatterGather::AllGather => self.world * self.count,
        }
    }

    /// Element `index` of `rank`'s send buffer.
    fn sent(rank: usize, index: usize) -> f64 {
        small_integer(SEED, rank, index)
    }

    fn send<T: Element>(&self) -> Vec<T> {
        (0..self.send_len())
            .map(|i| T::from_f64(Self::sent(self.rank, i)))
            .collect()
    }

    /// Element `index` of this rank's receive buffer: the reduce-scatter's
    /// sum of this rank's block over ranks, the all-gather's element of
    /// the sender's block.
    fn expected(&self, index: usize) -> f64 {
        match self.collective {
            ScatterGather::ReduceScatter => (0..self.world)
                .map(|r| Self::sent(r, self.rank * self.count + index))
                .sum(),
            ScatterGather::AllGather => Self::sent(index / self.count, index % self.count),
        }
    }

    /// Elements of `received` whose bits differ from the expected ones.
    fn wrong<T: Element>(&self, received: &[T]) -> usize {
        let bits = |value: f64| round_to(T::DTYPE, value as f32);
        let unwritten = self.recv_len().saturating_sub(received.len());
        unwritten
            + (received.iter().enumerate())
                .filter(|(i, got)| bits(got.to_f64()) != bits(self.expected(*i)))
                .count()
    }
}

/// One call of `implementation` on this rank's stream.
fn call<T: Element>(
    rank: &mut Rank,
    blocks: &Blocks,
    implementation: Implementation,
    send: &DeviceBuffer<T>,
    recv: &mut DeviceBuffer<T>,
) -> Result<()> {
    let (collective, count) = (blocks.collective, blocks.count);
    let stream = rank.comm.stream().clone();
    match implementation {
        Implementation::Auto | Implementation::OneStage => {
            // Registered inputs are read in place where the kernels can;
            // the rest is staged rather than refused (odd block sizes).
            let options = CallOptions {
                algorithm: match implementation {
                    Implementation::OneStage => AlgorithmChoice::Force(Algorithm::OneStage),
                    _ => AlgorithmChoice::Auto,
                },
                zero_copy: false,
                max_blocks: None,
            };
            Ok(match collective {
                ScatterGather::ReduceScatter => {
                    rank.comm.reduce_scatter_on(&stream, send, recv, options)
                }
                ScatterGather::AllGather => rank.comm.all_gather_on(&stream, send, recv, options),
            }?)
        }
        Implementation::Nccl => {
            let nccl = rank
                .nccl
                .as_mut()
                .ok_or(CliError::Internal("NCCL was not initialised"))?;
            let (dtype, from, to) = (T::DTYPE, send.device_address(), recv.device_address());
            // SAFETY: `send` and `recv` are separate buffers of this rank's
            // device with the lengths the collective reads and writes at
            // `count` per block (measure allocates Blocks::send_len and
            // recv_len elements), alive until
            // the work completes (the caller synchronises before dropping
            // them); `stream` is the communicator's, NCCL's context.
            Ok(unsafe {
                match collective {
                    ScatterGather::ReduceScatter => {
                        nccl.reduce_scatter_raw_on(&stream, dtype, from, to, count)
                    }
                    ScatterGather::AllGather => {
                        nccl.all_gather_raw_on(&stream, dtype, from, to, count)
                    }
                }
            }?)
        }
        _ => Err(CliError::Internal(
            "only linkreduce and nccl time the reduce-scatter and all-gather",
        )),
    }
}

/// One implementation at one block size on this rank: its buffers, the
/// check of the buffers that are then timed, and the timing.
fn measure<T: Element + Default>(
    rank: &mut Rank,
    collective: ScatterGather,
    implementation: Implementation,
    count: usize,
    repetitions: usize,
) -> Result<RankRun> {
    let blocks = Blocks {
        collective,
        world: rank.comm.world_size(),
        rank: rank.comm.rank(),
        count,
    };
    let send = rank.comm.upload(&blocks.send::<T>())?;
    let mut recv = rank
        .comm
        .upload(&vec![T::from_f64(POISON); blocks.recv_len()])?;
    let registered = !implementation.is_nccl();
    if registered {
        rank.comm.register(&send)?;
    }
    // Correctness first, on the same buffers that are timed.
    call(rank, &blocks, implementation, &send, &mut recv)?;
    rank.comm.synchronize()?;
    let wrong = blocks.wrong(&rank.comm.download(&recv)?);
    let stream = rank.comm.stream().clone();
    let rendezvous = rank.comm.rendezvous().clone();
    let run = time_eager_and_graphed(
        &stream,
        rendezvous.as_ref(),
        blocks.world * count * std::mem::size_of::<T>(),
        repetitions,
        wrong,
        || call(rank, &blocks, implementation, &send, &mut recv),
    )?;
    rank.comm.synchronize()?;
    if registered {
        rank.comm.deregister(&send)?;
    }
    Ok(run)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blocks(collective: ScatterGather, world: usize, rank: usize) -> Blocks {
        Blocks {
            collective,
            world,
            rank,
            count: 5,
        }
    }

    #[test]
    fn reduce_scatter_expects_the_sum_of_its_block_over_ranks() {
        let world = 3;
        let sends: Vec<Vec<f32>> = (0..world)
            .map(|r| blocks(ScatterGather::ReduceScatter, world, r).send())
            .collect();
        assert_eq!(sends[0].len(), 15);
        assert_ne!(sends[0], sends[1], "ranks send different values");
        for rank in 0..world {
            let me = blocks(ScatterGather::ReduceScatter, world, rank);
            assert_eq!(me.recv_len(), 5);
            let sums: Vec<f32> = (0..5)
                .map(|i| sends.iter().map(|s| s[rank * 5 + i]).sum())
                .collect();
            assert_eq!(me.wrong(&sums), 0, "rank {rank}");
            // Another rank's block is not this rank's result.
            let other = (rank + 1) % world;
            let theirs: Vec<f32> = (0..5)
                .map(|i| sends.iter().map(|s| s[other * 5 + i]).sum())
                .collect();
            assert!(me.wrong(&theirs) > 0, "rank {rank}");
        }
    }

    #[test]
    fn all_gather_expects_every_rank_block_in_rank_order() {
        let world = 4;
        let gathered: Vec<half::bf16> = (0..world)
            .flat_map(|r| blocks(ScatterGather::AllGather, world, r).send::<half::bf16>())
            .collect();
        let me = blocks(ScatterGather::AllGather, world, 2);
        assert_eq!((me.send_len(), me.recv_len()), (5, 20));
        assert_eq!(me.wrong(&gathered), 0);
        let mut swapped = gathered.clone();
        swapped.swap(0, 5);
        let differ = usize::from(gathered[0] != gathered[5]);
        assert_eq!(me.wrong(&swapped), 2 * differ);
        // The poison and missing elements count.
        let mut poisoned = gathered.clone();
        poisoned[19] = half::bf16::from_f64(POISON);
        assert_eq!(me.wrong(&poisoned), 1);
        assert_eq!(me.wrong(&gathered[..18]), 2);
    }

    #[test]
    fn a_negative_zero_is_wrong_where_a_positive_zero_is_expected() {
        let me = Blocks {
            count: 200,
            ..blocks(ScatterGather::AllGather, 1, 0)
        };
        let mut received: Vec<f32> = me.send();
        let zero = (0..received.len()).find(|&i| received[i] == 0.0);
        let Some(i) = zero else {
            panic!("no zero among 200 small integers");
        };
        assert_eq!(me.wrong(&received), 0);
        received[i] = -0.0;
        assert_eq!(me.wrong(&received), 1);
    }
}
