//! Reduce-scatter and all-gather with NCCL's semantics and argument order
//! (docs/scatter_gather.md), on the all-reduce's machinery: the same path
//! choice, stream order, buffer table, staging and bounce buffers.
//!
//! What every rank must do alike (the path, the cut into launches, the
//! grid) depends only on the count, the dtype and shared settings; where
//! this rank's input is read from and its output written is its own
//! decision, told to peers through the source words of the start barrier.

use std::sync::Arc;

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};

use super::enqueue::{copy, Source};
use super::{CallOptions, Communicator};
use crate::algorithm::{blocks_for, Algorithm};
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::kernels::{
    load_scatter_gather_kernels, source_word, AllReduceArgs, ScatterGather, ScatterGatherArgs,
    MAX_RANKS, PACKET_BYTES, THREADS_PER_BLOCK,
};
use crate::path::CallPath;
use crate::registry::STAGING_INDEX;

const PACKET: u64 = PACKET_BYTES as u64;

/// A buffer of a call: its device address and length in elements.
type Span = (u64, usize);

/// One call's buffers, checked against each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Layout {
    op: ScatterGather,
    dtype: DType,
    send: u64,
    recv: u64,
    /// Elements of one rank's block: the reduce-scatter's recv, the
    /// all-gather's send.
    count: usize,
    world_size: usize,
    rank: usize,
}

impl Layout {
    /// Checks the lengths (the larger buffer holds one block per rank) and
    /// that the buffers are apart or in NCCL's in-place layout.
    fn new(
        op: ScatterGather,
        dtype: DType,
        (world_size, rank): (usize, usize),
        (send, send_len): Span,
        (recv, recv_len): Span,
    ) -> Result<Layout> {
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
    fn in_place(&self) -> bool {
        let own_block = self.rank as u64 * self.block_bytes();
        match self.op {
            ScatterGather::ReduceScatter => self.send.checked_add(own_block) == Some(self.recv),
            ScatterGather::AllGather => self.recv.checked_add(own_block) == Some(self.send),
        }
    }

    fn block_bytes(&self) -> u64 {
        (self.count * self.dtype.size()) as u64
    }

    /// Bytes of the larger buffer: what the path choice goes by.
    fn larger_bytes(&self) -> usize {
        self.count * self.world_size * self.dtype.size()
    }

    fn send_bytes(&self) -> usize {
        match self.op {
            ScatterGather::ReduceScatter => self.larger_bytes(),
            ScatterGather::AllGather => self.block_bytes() as usize,
        }
    }

    /// Whether the kernel may write the output where it is: whole packets
    /// at every block's start (else through the bounce buffer).
    fn output_direct(&self) -> bool {
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
fn chunk_elements(staging_bytes: usize, world_size: usize, dtype: DType) -> Result<usize> {
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
fn launches(count: usize, chunk: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..count)
        .step_by(chunk.max(1))
        .map(move |start| (start, chunk.min(count - start)))
}

/// Where a whole call reads and writes on this rank.
#[derive(Debug, Clone, Copy)]
struct Placement {
    input: Source,
    output_direct: bool,
    staging: u64,
    bounce: u64,
}

/// A device-to-device copy: (destination, source, bytes).
type Copy = (u64, u64, usize);

/// What one launch reads and writes, and the copies around it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct LaunchPlan {
    /// Into staging, before the kernel.
    before: Vec<Copy>,
    sources: [u64; MAX_RANKS],
    output: u64,
    out_stride: u64,
    /// Out of the bounce buffer, after the kernel.
    after: Vec<Copy>,
}

impl Placement {
    /// The launch of elements `start..start + n` of every block. Staged
    /// and bounced blocks lie `n` elements rounded up to a packet apart.
    fn launch(&self, layout: &Layout, start: usize, n: usize) -> Result<LaunchPlan> {
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

impl Communicator {
    /// Sums block r (`recv.len()` elements) of every rank's `send` (world
    /// size x `recv.len()` elements) in rank order into rank r's `recv`,
    /// like NCCL's `ncclReduceScatter`: f32 accumulation, rounded once,
    /// the same bits as the all-reduce's. On this rank's stream;
    /// collective (docs/scatter_gather.md).
    pub fn reduce_scatter<T: Element>(
        &mut self,
        send: &impl DevicePtr<T>,
        recv: &mut impl DevicePtrMut<T>,
    ) -> Result<()> {
        let stream = self.gpu.stream.clone();
        self.reduce_scatter_on(&stream, send, recv, CallOptions::default())
    }

    /// Like [`reduce_scatter`](Self::reduce_scatter), on `stream` as
    /// [`all_reduce_on`](Self::all_reduce_on) is (graphs included).
    /// `options.algorithm`: automatic, NCCL, or any of the kernels'
    /// algorithms for the kernels (they have one for this collective).
    pub fn reduce_scatter_on<T: Element>(
        &mut self,
        stream: &Arc<CudaStream>,
        send: &impl DevicePtr<T>,
        recv: &mut impl DevicePtrMut<T>,
        options: CallOptions,
    ) -> Result<()> {
        self.scatter_gather_on(ScatterGather::ReduceScatter, stream, send, recv, options)
    }

    /// The reduce-scatter in NCCL's in-place layout: `buffer` (world size
    /// x count elements) is the send, and this rank's block of it (from
    /// rank x count) receives the sum.
    pub fn reduce_scatter_in_place_on<T: Element>(
        &mut self,
        stream: &Arc<CudaStream>,
        buffer: &mut impl DevicePtrMut<T>,
        options: CallOptions,
    ) -> Result<()> {
        self.scatter_gather_in_place_on(ScatterGather::ReduceScatter, stream, buffer, options)
    }

    /// The reduce-scatter on raw device addresses, for bindings:
    /// [`reduce_scatter_on`](Self::reduce_scatter_on) with `send` holding
    /// world size x `recv_count` elements.
    ///
    /// # Safety
    /// `send` and `recv` must address that many elements of `dtype` on this
    /// rank's device, readable (`send`) and writable (`recv`) until the
    /// call has run on `stream`. Overlaps other than NCCL's in-place layout
    /// are refused; other misuse is not detected.
    pub unsafe fn reduce_scatter_raw(
        &mut self,
        stream: &Arc<CudaStream>,
        dtype: DType,
        send: u64,
        recv: u64,
        recv_count: usize,
        options: CallOptions,
    ) -> Result<()> {
        let op = ScatterGather::ReduceScatter;
        self.scatter_gather_raw(op, stream, dtype, (send, recv), recv_count, options)
    }

    /// Writes every rank's `send` (`send.len()` elements) into block r of
    /// `recv` (world size x `send.len()` elements), like NCCL's
    /// `ncclAllGather`. On this rank's stream; collective
    /// (docs/scatter_gather.md).
    pub fn all_gather<T: Element>(
        &mut self,
        send: &impl DevicePtr<T>,
        recv: &mut impl DevicePtrMut<T>,
    ) -> Result<()> {
        let stream = self.gpu.stream.clone();
        self.all_gather_on(&stream, send, recv, CallOptions::default())
    }

    /// Like [`all_gather`](Self::all_gather), on `stream` as
    /// [`reduce_scatter_on`](Self::reduce_scatter_on) is.
    pub fn all_gather_on<T: Element>(
        &mut self,
        stream: &Arc<CudaStream>,
        send: &impl DevicePtr<T>,
        recv: &mut impl DevicePtrMut<T>,
        options: CallOptions,
    ) -> Result<()> {
        self.scatter_gather_on(ScatterGather::AllGather, stream, send, recv, options)
    }

    /// The all-gather in NCCL's in-place layout: this rank's block of
    /// `buffer` (from rank x count of world size x count elements) is the
    /// send.
    pub fn all_gather_in_place_on<T: Element>(
        &mut self,
        stream: &Arc<CudaStream>,
        buffer: &mut impl DevicePtrMut<T>,
        options: CallOptions,
    ) -> Result<()> {
        self.scatter_gather_in_place_on(ScatterGather::AllGather, stream, buffer, options)
    }

    /// The all-gather on raw device addresses:
    /// [`all_gather_on`](Self::all_gather_on) with `recv` holding world
    /// size x `send_count` elements.
    ///
    /// # Safety
    /// As for [`reduce_scatter_raw`](Self::reduce_scatter_raw).
    pub unsafe fn all_gather_raw(
        &mut self,
        stream: &Arc<CudaStream>,
        dtype: DType,
        send: u64,
        recv: u64,
        send_count: usize,
        options: CallOptions,
    ) -> Result<()> {
        let op = ScatterGather::AllGather;
        self.scatter_gather_raw(op, stream, dtype, (send, recv), send_count, options)
    }

    /// A call on raw (send, recv) addresses with `count` elements per block.
    fn scatter_gather_raw(
        &mut self,
        op: ScatterGather,
        stream: &Arc<CudaStream>,
        dtype: DType,
        (send, recv): (u64, u64),
        count: usize,
        options: CallOptions,
    ) -> Result<()> {
        let larger = count.saturating_mul(self.world_size);
        let (send_len, recv_len) = match op {
            ScatterGather::ReduceScatter => (larger, count),
            ScatterGather::AllGather => (count, larger),
        };
        let ranks = (self.world_size, self.rank);
        let layout = Layout::new(op, dtype, ranks, (send, send_len), (recv, recv_len))?;
        self.enqueue_scatter_gather(stream, layout, options)
    }

    fn scatter_gather_on<T: Element>(
        &mut self,
        op: ScatterGather,
        stream: &Arc<CudaStream>,
        send: &impl DevicePtr<T>,
        recv: &mut impl DevicePtrMut<T>,
        options: CallOptions,
    ) -> Result<()> {
        let (send_len, recv_len) = (send.len(), recv.len());
        let (send, _read) = send.device_ptr(stream);
        let (recv, _write) = recv.device_ptr_mut(stream);
        let ranks = (self.world_size, self.rank);
        let layout = Layout::new(op, T::DTYPE, ranks, (send, send_len), (recv, recv_len))?;
        self.enqueue_scatter_gather(stream, layout, options)
    }

    fn scatter_gather_in_place_on<T: Element>(
        &mut self,
        op: ScatterGather,
        stream: &Arc<CudaStream>,
        buffer: &mut impl DevicePtrMut<T>,
        options: CallOptions,
    ) -> Result<()> {
        let len = buffer.len();
        let count = len / self.world_size;
        let (whole, _write) = buffer.device_ptr_mut(stream);
        let own = whole + (self.rank * count * T::DTYPE.size()) as u64;
        let (send, recv) = match op {
            ScatterGather::ReduceScatter => ((whole, len), (own, count)),
            ScatterGather::AllGather => ((own, count), (whole, len)),
        };
        let ranks = (self.world_size, self.rank);
        let layout = Layout::new(op, T::DTYPE, ranks, send, recv)?;
        self.enqueue_scatter_gather(stream, layout, options)
    }

    /// Checks, chooses the path and enqueues; every refusal comes before
    /// anything is enqueued.
    fn enqueue_scatter_gather(
        &mut self,
        stream: &Arc<CudaStream>,
        layout: Layout,
        options: CallOptions,
    ) -> Result<()> {
        self.check_usable()?;
        if layout.count == 0 {
            return Ok(());
        }
        self.gpu
            .ctx
            .bind_to_thread()
            .map_err(Error::driver("cuCtxSetCurrent"))?;
        let path = self.plan.scatter_gather_path(
            self.world_size,
            layout.larger_bytes(),
            options.algorithm,
        )?;
        let chunk = match path {
            CallPath::Custom(_) => Some(chunk_elements(
                self.config.staging_bytes,
                self.world_size,
                layout.dtype,
            )?),
            CallPath::Nccl(_) => None,
        };
        let capturing = self.enter_stream(stream)?;
        match chunk {
            Some(chunk) => {
                self.scatter_gather_on_kernels(stream, layout, chunk, options.zero_copy, capturing)?
            }
            None => self.on_nccl(capturing, |nccl| {
                let Layout {
                    dtype, send, recv, ..
                } = layout;
                // SAFETY: Layout::new checked that send and recv hold the
                // lengths NCCL reads and writes (they come from device
                // slices that long, or the raw call's caller vouches) and
                // are apart or in NCCL's in-place layout; `stream` belongs
                // to this rank's context (enter_stream checked).
                unsafe {
                    match layout.op {
                        ScatterGather::ReduceScatter => {
                            nccl.reduce_scatter_raw_on(stream, dtype, send, recv, layout.count)
                        }
                        ScatterGather::AllGather => {
                            nccl.all_gather_raw_on(stream, dtype, send, recv, layout.count)
                        }
                    }
                }
            })?,
        }
        self.leave_stream(stream, capturing)
    }

    /// Where peers read this rank's input. A reduce-scatter's peers read
    /// each block at its own offset: in place only where every block starts
    /// on a packet; the rest is staged.
    fn scatter_gather_input(
        &mut self,
        layout: &Layout,
        zero_copy: bool,
        capturing: bool,
    ) -> Result<Source> {
        let blocks_aligned =
            layout.op == ScatterGather::AllGather || layout.block_bytes() % PACKET == 0;
        match (blocks_aligned, zero_copy) {
            (true, _) => self.locate_for_peers(
                layout.send,
                layout.send_bytes(),
                zero_copy,
                capturing,
                false,
            ),
            (false, false) => Ok(Source::Staged),
            (false, true) => Err(Error::Misaligned {
                ptr: layout.send + layout.block_bytes(),
                alignment: PACKET,
            }),
        }
    }

    fn scatter_gather_on_kernels(
        &mut self,
        stream: &Arc<CudaStream>,
        layout: Layout,
        chunk: usize,
        zero_copy: bool,
        capturing: bool,
    ) -> Result<()> {
        let input = self.scatter_gather_input(&layout, zero_copy, capturing)?;
        let custom = self.custom()?;
        let placement = Placement {
            input,
            output_direct: layout.output_direct(),
            staging: custom.regions.staging.ptr(),
            bounce: custom.regions.bounce.ptr(),
        };
        tracing::trace!(
            rank = self.rank,
            ?layout,
            ?placement,
            chunk,
            "scatter-gather"
        );
        let kernels = load_scatter_gather_kernels(&self.gpu.ctx, self.world_size)?;
        let function = kernels.get(&(layout.op, layout.dtype)).ok_or_else(|| {
            Error::InvalidConfig(format!(
                "no {} kernel for {} was loaded",
                layout.op, layout.dtype
            ))
        })?;
        for (start, n) in launches(layout.count, chunk) {
            let plan = placement.launch(&layout, start, n)?;
            for &(dst, src, bytes) in &plan.before {
                copy(stream, dst, src, bytes)?;
            }
            let packets = n * layout.dtype.size() / PACKET_BYTES;
            let blocks = blocks_for(
                Algorithm::OneStage,
                self.world_size,
                packets,
                THREADS_PER_BLOCK,
                custom.max_blocks,
            );
            let args = ScatterGatherArgs {
                frame: AllReduceArgs {
                    barrier: self.barrier_args(custom),
                    table: custom.regions.table.ptr(),
                    source: 0,
                    output: plan.output,
                    count: n as u64,
                    capacity: custom.regions.table_capacity as u32,
                },
                sources: plan.sources,
                out_stride: plan.out_stride,
            };
            let mut launch = stream.launch_builder(function);
            launch.arg(&args);
            let config = LaunchConfig {
                grid_dim: (blocks, 1, 1),
                block_dim: (THREADS_PER_BLOCK, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: the kernels take one `ScatterGatherArgs` by value. The
            // table, signal regions, staging and bounce buffer live as long
            // as the communicator; every table entry a peer names holds a
            // buffer checked shareable when shared, and its word an offset
            // inside it (locate_for_peers checked the input's extent); the
            // output holds every block the kernel writes: the caller's recv
            // (Layout::new checked its length), or the bounce buffer, which
            // holds a world size-th of staging per block (chunk_elements).
            unsafe { launch.launch(config) }.map_err(Error::driver("cuLaunchKernel"))?;
            for &(dst, src, bytes) in &plan.after {
                copy(stream, dst, src, bytes)?;
            }
        }
        Ok(())
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
