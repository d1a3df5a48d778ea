//! Reduce-scatter and all-gather with NCCL's semantics and argument order
//! (docs/scatter_gather.md), on the all-reduce's machinery: the same path
//! choice, stream order, buffer table, staging and bounce buffers.
//!
//! What every rank must do alike (the path, the cut into launches, the
//! grid) depends only on the count, the dtype and shared settings; where
//! this rank's input is read from and its output written is its own
//! decision, told to peers through the source words of the start barrier.

mod layout;

use std::sync::Arc;

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};

use super::enqueue::{copy, Source};
use super::{CallOptions, Communicator};
use crate::algorithm::{blocks_for, Algorithm};
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::kernels::{
    AllReduceArgs, ScatterGather, ScatterGatherArgs, PACKET_BYTES, THREADS_PER_BLOCK,
};
use crate::path::CallPath;
use layout::{chunk_elements, launches, Layout, Placement, PACKET};

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
        self.on_stream(stream, |comm, capturing| match chunk {
            Some(chunk) => {
                comm.scatter_gather_on_kernels(stream, layout, chunk, options.zero_copy, capturing)
            }
            None => comm.on_nccl(stream, capturing, |nccl| {
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
            }),
        })
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
        let function = custom
            .scatter_gather_kernels
            .get(&(layout.op, layout.dtype))
            .ok_or_else(|| {
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
