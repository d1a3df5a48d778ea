//! The pure part of a reduce-scatter or all-gather: the buffers checked
//! against NCCL's layout, the cut into launches, and where each launch
//! reads and writes (docs/scatter_gather.md). No GPU needed to test it.

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::kernels::{source_word, ScatterGather, MAX_RANKS, PACKET_BYTES};
use crate::registry::STAGING_INDEX;

use super::super::enqueue::{span_bytes, Source};

/// A packet in bytes: where blocks must start to be read or written whole.
pub(super) const PACKET: u64 = PACKET_BYTES as u64;

/// A buffer of a call: its device address and length in elements.
pub(super) type Span = (u64, usize);

/// One call's buffers, checked against each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Layout {
    pub op: ScatterGather,
    pub dtype: DType,
    pub send: u64,
    pub recv: u64,
    /// Elements of one rank's block: the reduce-scatter's recv, the
    /// all-gather's send.
    pub count: usize,
    pub world_size: usize,
    pub rank: usize,
}

impl Layout {
    /// Checks the lengths (the larger buffer holds one block per rank) and
    /// that the buffers are apart or in NCCL's in-place layout.
    pub fn new(
        op: ScatterGather,
        dtype: DType,
        (world_size, rank): (usize, usize),
        (send, send_len): Span,
        (recv, recv_len): Span,
    ) -> Result<Layout> {
        span_bytes(send, send_len, dtype)?;
        span_bytes(recv, recv_len, dtype)?;
        let (count, larger, rule) = match op {
            ScatterGather::ReduceScatter => (
                recv_len,
                send_len,
                "a reduce-scatter's send holds world size x recv's elements",
            ),
            ScatterGather::AllGather => (
                send_len,
                recv_len,
                "an all-gather's recv holds world size x send's elements",
            ),
        };
        if count.checked_mul(world_size) != Some(larger) {
            return Err(Error::ScatterGatherLength {
                op,
                send: send_len,
                recv: recv_len,
                world_size,
                rule,
            });
        }
        let layout = Layout {
            op,
            dtype,
            send,
            recv,
            count,
            world_size,
            rank,
        };
        let size = dtype.size() as u64;
        let (send_end, recv_end) = (send_len as u64 * size, recv_len as u64 * size);
        let overlap = send < recv.saturating_add(recv_end) && recv < send.saturating_add(send_end);
        if overlap && !layout.in_place() {
            return Err(Error::ScatterGatherOverlap {
                op,
                send,
                recv,
                rule: match op {
                    ScatterGather::ReduceScatter => "recv = send + rank x recv's length",
                    ScatterGather::AllGather => "send = recv + rank x send's length",
                },
            });
        }
        Ok(layout)
    }

    /// Whether the call is in NCCL's in-place layout: this rank's block of
    /// the larger buffer is the smaller one.
    pub fn in_place(&self) -> bool {
        let own_block = self.rank as u64 * self.block_bytes();
        match self.op {
            ScatterGather::ReduceScatter => self.send.checked_add(own_block) == Some(self.recv),
            ScatterGather::AllGather => self.recv.checked_add(own_block) == Some(self.send),
        }
    }

    pub fn block_bytes(&self) -> u64 {
        (self.count * self.dtype.size()) as u64
    }

    /// Bytes of the larger buffer: what the path choice goes by.
    pub fn larger_bytes(&self) -> usize {
        self.count * self.world_size * self.dtype.size()
    }

    pub fn send_bytes(&self) -> usize {
        match self.op {
            ScatterGather::ReduceScatter => self.larger_bytes(),
            ScatterGather::AllGather => self.block_bytes() as usize,
        }
    }

    /// Whether the kernel may write the output where it is: whole packets
    /// at every block's start (else through the bounce buffer).
    pub fn output_direct(&self) -> bool {
        let blocks_aligned = match self.op {
            ScatterGather::ReduceScatter => true,
            ScatterGather::AllGather => self.block_bytes() % PACKET == 0,
        };
        self.recv % PACKET == 0 && blocks_aligned
    }
}

/// Elements of a block one launch takes: a world size-th of staging, in
/// whole packets, since staging holds every block of a reduce-scatter's
/// launch and the bounce buffer every block of an all-gather's. The same on
/// every rank (staging's size is checked equal at set-up).
pub(super) fn chunk_elements(
    staging_bytes: usize,
    world_size: usize,
    dtype: DType,
) -> Result<usize> {
    let per_block = staging_bytes / world_size / PACKET_BYTES * PACKET_BYTES;
    match per_block / dtype.size() {
        0 => Err(Error::InvalidConfig(format!(
            "reduce-scatter and all-gather on {world_size} ranks need staging_bytes of at \
             least {}; raise Config::staging_bytes",
            world_size * PACKET_BYTES
        ))),
        chunk => Ok(chunk),
    }
}

/// The launches of a call of `count` elements per block: (first element,
/// elements).
pub(super) fn launches(count: usize, chunk: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..count)
        .step_by(chunk.max(1))
        .map(move |start| (start, chunk.min(count - start)))
}

/// Where a whole call reads and writes on this rank.
#[derive(Debug, Clone, Copy)]
pub(super) struct Placement {
    pub input: Source,
    pub output_direct: bool,
    pub staging: u64,
    pub bounce: u64,
}

/// A device-to-device copy: (destination, source, bytes).
pub(super) type Copy = (u64, u64, usize);

/// What one launch reads and writes, and the copies around it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct LaunchPlan {
    /// Into staging, before the kernel.
    pub before: Vec<Copy>,
    pub sources: [u64; MAX_RANKS],
    pub output: u64,
    pub out_stride: u64,
    /// Out of the bounce buffer, after the kernel.
    pub after: Vec<Copy>,
}

impl Placement {
    /// The launch of elements `start..start + n` of every block. Staged
    /// and bounced blocks lie `n` elements rounded up to a packet apart.
    pub fn launch(&self, layout: &Layout, start: usize, n: usize) -> Result<LaunchPlan> {
        let size = layout.dtype.size();
        let per_pack = PACKET_BYTES / size;
        let (bytes, first) = (n * size, (start * size) as u64);
        let padded = (n.div_ceil(per_pack) * per_pack * size) as u64;
        let block = layout.block_bytes();
        let word = |index, offset| {
            source_word(index, offset).ok_or(Error::InvalidConfig(
                "an input's offset outgrew its source word".into(),
            ))
        };
        let mut plan = LaunchPlan {
            before: Vec::new(),
            sources: [0; MAX_RANKS],
            output: layout.recv + first,
            out_stride: layout.count as u64,
            after: Vec::new(),
        };
        let ranks = 0..layout.world_size as u64;
        match layout.op {
            ScatterGather::ReduceScatter => {
                // Each peer reads its own block of this rank's input.
                for (peer, source) in ranks.zip(&mut plan.sources) {
                    let from = layout.send + peer * block + first;
                    *source = match self.input {
                        Source::Table(at) => word(at.index, at.offset + peer * block + first)?,
                        Source::Staged | Source::Local => {
                            plan.before
                                .push((self.staging + peer * padded, from, bytes));
                            word(STAGING_INDEX, peer * padded)?
                        }
                    };
                }
                if !self.output_direct {
                    plan.output = self.bounce;
                    plan.after.push((layout.recv + first, self.bounce, bytes));
                }
            }
            ScatterGather::AllGather => {
                let source = match self.input {
                    Source::Table(at) => word(at.index, at.offset + first)?,
                    Source::Staged | Source::Local => {
                        plan.before.push((self.staging, layout.send + first, bytes));
                        word(STAGING_INDEX, 0)?
                    }
                };
                plan.sources[..layout.world_size].fill(source);
                if !self.output_direct {
                    plan.output = self.bounce;
                    plan.out_stride = padded / size as u64;
                    plan.after = ranks
                        .map(|r| {
                            (
                                layout.recv + r * block + first,
                                self.bounce + r * padded,
                                bytes,
                            )
                        })
                        .collect();
                }
            }
        }
        Ok(plan)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Located;

    const RS: ScatterGather = ScatterGather::ReduceScatter;
    const AG: ScatterGather = ScatterGather::AllGather;

    fn layout(op: ScatterGather, rank: usize, send: Span, recv: Span) -> Result<Layout> {
        Layout::new(op, DType::BF16, (4, rank), send, recv)
    }

    #[test]
    fn lengths_follow_nccl() {
        assert_eq!(layout(RS, 1, (0x1000, 40), (0x9000, 10)).unwrap().count, 10);
        assert_eq!(layout(AG, 1, (0x1000, 10), (0x9000, 40)).unwrap().count, 10);
        for (op, send, recv) in [(RS, 41, 10), (RS, 10, 10), (AG, 40, 10), (AG, 10, 39)] {
            assert!(matches!(
                layout(op, 0, (0x1000, send), (0x9000, recv)),
                Err(Error::ScatterGatherLength { send: s, recv: r, world_size: 4, .. })
                    if (s, r) == (send, recv)
            ));
        }
        let empty = layout(AG, 3, (0x1000, 0), (0x1000, 0)).unwrap();
        assert_eq!(empty.count, 0);
    }

    #[test]
    fn only_nccls_in_place_layout_may_overlap() {
        // bf16 blocks of 10 elements are 20 bytes; rank 2's starts at 40.
        let rs = layout(RS, 2, (0x1000, 40), (0x1000 + 40, 10)).unwrap();
        assert!(rs.in_place());
        let ag = layout(AG, 2, (0x1000 + 40, 10), (0x1000, 40)).unwrap();
        assert!(ag.in_place());
        assert!(!layout(AG, 2, (0x9000, 10), (0x1000, 40))
            .unwrap()
            .in_place());
        // Another rank's block, the same start on a rank other than 0, or
        // a partial overlap.
        for (op, send, recv) in [
            (RS, 0x1000, 0x1000 + 20),
            (RS, 0x1000, 0x1000),
            (AG, 0x1000, 0x1000),
            (AG, 0x1000 + 41, 0x1000),
        ] {
            let (send_len, recv_len) = if op == RS { (40, 10) } else { (10, 40) };
            assert!(matches!(
                layout(op, 2, (send, send_len), (recv, recv_len)),
                Err(Error::ScatterGatherOverlap { .. })
            ));
        }
        // Rank 0's in-place reduce-scatter receives at the send's start.
        assert!(layout(RS, 0, (0x1000, 40), (0x1000, 10))
            .unwrap()
            .in_place());
    }

    #[test]
    fn launches_cut_alike_at_a_world_size_th_of_staging() {
        // 2 MiB of staging on 3 ranks: 699040 bytes, whole packets, per block.
        assert_eq!(chunk_elements(2 << 20, 3, DType::F16).unwrap(), 349_520);
        assert_eq!(chunk_elements(2 << 20, 3, DType::F32).unwrap(), 174_760);
        assert!(matches!(
            chunk_elements(100, 8, DType::F32),
            Err(Error::InvalidConfig(_))
        ));
        let cut: Vec<_> = launches(10, 4).collect();
        assert_eq!(cut, [(0, 4), (4, 4), (8, 2)]);
        assert_eq!(launches(0, 4).count(), 0);
        assert_eq!(launches(4, 4).collect::<Vec<_>>(), [(0, 4)]);
    }

    fn placement(input: Source, output_direct: bool) -> Placement {
        Placement {
            input,
            output_direct,
            staging: 0x10_0000,
            bounce: 0x20_0000,
        }
    }

    #[test]
    fn a_staged_reduce_scatter_gives_each_peer_its_block() {
        // f32, 2 ranks, 13 elements per block (52 bytes: not whole packets).
        let rs = Layout::new(RS, DType::F32, (2, 1), (0x1000, 26), (0x5004, 13)).unwrap();
        assert!(!rs.output_direct());
        let plan = placement(Source::Staged, false).launch(&rs, 8, 5).unwrap();
        // 5 f32 round up to 8 (two packets): 32 bytes between staged blocks.
        assert_eq!(
            plan.before,
            [
                (0x10_0000, 0x1000 + 32, 20),
                (0x10_0000 + 32, 0x1000 + 52 + 32, 20)
            ]
        );
        let word = |offset| source_word(STAGING_INDEX, offset).unwrap();
        assert_eq!(plan.sources[..2], [word(0), word(32)]);
        assert_eq!(plan.output, 0x20_0000);
        assert_eq!(plan.after, [(0x5004 + 32, 0x20_0000, 20)]);
    }

    #[test]
    fn a_registered_reduce_scatter_is_read_in_place_at_every_block() {
        let rs = Layout::new(RS, DType::F16, (3, 0), (0x2000, 48), (0x9000, 16)).unwrap();
        assert!(rs.output_direct());
        let at = Located {
            index: 5,
            offset: 64,
        };
        let plan = placement(Source::Table(at), true)
            .launch(&rs, 8, 8)
            .unwrap();
        assert!(plan.before.is_empty() && plan.after.is_empty());
        let expected: Vec<u64> = (0..3)
            .map(|peer| source_word(5, 64 + peer * 32 + 16).unwrap())
            .collect();
        assert_eq!(plan.sources[..3], expected[..]);
        assert_eq!(plan.output, 0x9000 + 16);
    }

    #[test]
    fn an_all_gather_writes_odd_blocks_through_the_bounce_buffer() {
        // bf16, 2 ranks, 9 elements per block: blocks 18 bytes apart.
        let ag = Layout::new(AG, DType::BF16, (2, 0), (0x3000, 9), (0x8000, 18)).unwrap();
        assert!(!ag.output_direct());
        let plan = placement(Source::Staged, false).launch(&ag, 0, 9).unwrap();
        assert_eq!(plan.before, [(0x10_0000, 0x3000, 18)]);
        let staged = source_word(STAGING_INDEX, 0).unwrap();
        assert_eq!(plan.sources[..2], [staged, staged]);
        // 9 elements round up to 16 (two packets) in the bounce buffer.
        assert_eq!((plan.output, plan.out_stride), (0x20_0000, 16));
        assert_eq!(
            plan.after,
            [(0x8000, 0x20_0000, 18), (0x8000 + 18, 0x20_0000 + 32, 18)]
        );
        // Whole-packet blocks go straight to recv, blocks `count` apart.
        let aligned = Layout::new(AG, DType::BF16, (2, 1), (0x3000, 64), (0x8000, 128)).unwrap();
        assert!(aligned.output_direct());
        let at = Located {
            index: 2,
            offset: 0,
        };
        let plan = placement(Source::Table(at), true)
            .launch(&aligned, 32, 32)
            .unwrap();
        assert_eq!((plan.output, plan.out_stride), (0x8000 + 64, 64));
        assert_eq!(plan.sources[1], source_word(2, 64).unwrap());
    }
}
