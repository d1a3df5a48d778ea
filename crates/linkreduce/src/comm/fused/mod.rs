//! All-reduce fused with residual add and RMSNorm, and the plain residual
//! add and RMSNorm it must equal bit for bit (docs/fused.md).
//!
//! The fused call reuses the all-reduce's enqueue path: where this rank's
//! input is read from, staging copies, the order of streams. It cuts calls
//! into launches on row boundaries, so that one block normalises a whole
//! row in one fixed order.

use std::sync::Arc;

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};

use super::enqueue::{span_bytes, LaunchInput};
use super::{CallOptions, Communicator};
use crate::algorithm::{Algorithm, AlgorithmChoice};
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::kernels::{
    load_norm_kernels, AddRmsNormArgs, AllReduceArgs, FusedNormArgs, FusedPushArgs, NormArgs,
    NormKernel, PushArgs, PACKET_BYTES, SCRATCH_TAIL_BYTES, THREADS_PER_BLOCK,
};
use crate::path::CallPath;
use rows::{NormBuffers, Rows};

mod rows;

/// The largest call push runs fused. Beyond it the fused kernel, one block
/// per row, was slower than push + norm on 2 x H200 (0.86x at 2 MiB, 0.75x
/// at 32 MiB), while up to it fused gained 1.02x-1.13x (0.99x at 512 KiB
/// with 8192-element rows; docs/fused.md, "Benchmark").
const FUSED_PUSH_MAX_BYTES: usize = 1 << 20;

/// Whether a push call of `rows` runs fused, given the rows one fused push
/// launch takes (0: a row does not fit a push segment). The same on every
/// rank: both depend only on the call's shape and shared settings.
fn fuses_push(rows: Rows, rows_per_launch: usize) -> bool {
    rows_per_launch > 0 && rows.bytes() <= FUSED_PUSH_MAX_BYTES
}

/// Rows a plain launch takes at most (blocks stride over the rest).
const PLAIN_MAX_BLOCKS: usize = 65535;

/// Launches of a call with more rows than fit one launch take a multiple
/// of this many rows, so that each starts on a packet (docs/fused.md).
const ROWS_PER_PACKET: usize = 8;

impl Communicator {
    /// Sums `input` over all ranks, adds the sum into `residual` in place,
    /// and writes `rmsnorm(residual) * weight` into `normed_out`, per row of
    /// `weight.len()` elements: what [`all_reduce`](Self::all_reduce)
    /// followed by [`add_rms_norm_on`](Self::add_rms_norm_on) gives, bit
    /// for bit, in fewer launches (docs/fused.md). f16 and bf16 only. On
    /// this rank's stream; collective like an all-reduce.
    pub fn all_reduce_add_rms_norm<T: Element>(
        &mut self,
        input: &impl DevicePtr<T>,
        residual: &mut impl DevicePtrMut<T>,
        weight: &impl DevicePtr<T>,
        eps: f32,
        normed_out: &mut impl DevicePtrMut<T>,
    ) -> Result<()> {
        let stream = self.gpu.stream.clone();
        let norm = RmsNorm { weight, eps };
        self.all_reduce_add_rms_norm_on(
            &stream,
            input,
            residual,
            norm,
            normed_out,
            CallOptions::default(),
        )
    }

    /// Like [`all_reduce_add_rms_norm`](Self::all_reduce_add_rms_norm), on
    /// `stream` as [`all_reduce_on`](Self::all_reduce_on) is (graphs
    /// included). `options.algorithm` picks the all-reduce: each of the
    /// kernels' algorithms runs fused; NCCL (and push rows longer than a
    /// push segment) run the all-reduce, then the plain kernel.
    pub fn all_reduce_add_rms_norm_on<T: Element, W: DevicePtr<T>>(
        &mut self,
        stream: &Arc<CudaStream>,
        input: &impl DevicePtr<T>,
        residual: &mut impl DevicePtrMut<T>,
        norm: RmsNorm<'_, W>,
        normed_out: &mut impl DevicePtrMut<T>,
        options: CallOptions,
    ) -> Result<()> {
        with_norm_call(
            stream,
            input,
            residual,
            norm,
            normed_out,
            |rows, input, buffers| self.enqueue_fused(stream, rows, input, buffers, options),
        )
    }

    /// The fused call on raw device addresses, for bindings that hold raw
    /// pointers (PyTorch's `data_ptr()`):
    /// [`all_reduce_add_rms_norm_on`](Self::all_reduce_add_rms_norm_on)
    /// with `input`, `residual` and `normed_out` holding `count` elements
    /// of `dtype` and `weight` holding `hidden`.
    ///
    /// # Safety
    /// Each address must hold that many elements of `dtype` on this rank's
    /// device, readable (`input`, `weight`) and writable (`residual`,
    /// `normed_out`) until the call has run on `stream`. Overlaps are
    /// refused as for the typed call; other misuse is not detected.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn all_reduce_add_rms_norm_raw(
        &mut self,
        stream: &Arc<CudaStream>,
        dtype: DType,
        (input, residual, normed_out): (u64, u64, u64),
        count: usize,
        (weight, hidden): (u64, usize),
        eps: f32,
        options: CallOptions,
    ) -> Result<()> {
        for address in [input, residual, normed_out] {
            span_bytes(address, count, dtype)?;
        }
        span_bytes(weight, hidden, dtype)?;
        let rows = Rows::of(dtype, count, count, hidden, count)?;
        let buffers = NormBuffers {
            residual,
            weight,
            out: normed_out,
            eps,
        };
        self.enqueue_fused(stream, rows, input, buffers, options)
    }

    /// The plain kernel: adds `sum` (an all-reduce's output) into
    /// `residual` in place and writes `rmsnorm(residual) * weight` into
    /// `out`, per row of `weight.len()` elements. Local to this rank (no
    /// peer takes part); ordered on `stream` only. `sum` may be `out`.
    pub fn add_rms_norm_on<T: Element, W: DevicePtr<T>>(
        &self,
        stream: &Arc<CudaStream>,
        sum: &impl DevicePtr<T>,
        residual: &mut impl DevicePtrMut<T>,
        norm: RmsNorm<'_, W>,
        out: &mut impl DevicePtrMut<T>,
    ) -> Result<()> {
        with_norm_call(stream, sum, residual, norm, out, |rows, sum, buffers| {
            buffers.check(rows, sum, true)?;
            self.gpu
                .ctx
                .bind_to_thread()
                .map_err(Error::driver("cuCtxSetCurrent"))?;
            self.launch_plain(stream, rows, sum, buffers)
        })
    }

    fn enqueue_fused(
        &mut self,
        stream: &Arc<CudaStream>,
        rows: Rows,
        input: u64,
        buffers: NormBuffers,
        options: CallOptions,
    ) -> Result<()> {
        self.check_usable()?;
        buffers.check(rows, input, false)?;
        if rows.rows == 0 {
            return Ok(());
        }
        self.gpu
            .ctx
            .bind_to_thread()
            .map_err(Error::driver("cuCtxSetCurrent"))?;
        let path = self.call_path(rows.bytes(), options.algorithm)?;
        let fused_push = match path {
            CallPath::Custom(Algorithm::Push) => {
                let per_launch = self.push_rows_per_launch(rows)?;
                fuses_push(rows, per_launch).then_some(per_launch)
            }
            _ => None,
        };
        match (path, fused_push) {
            (CallPath::Custom(algorithm @ (Algorithm::OneStage | Algorithm::TwoStage)), _) => {
                self.enqueue_fused_pull(stream, algorithm, (rows, input, buffers), options)
            }
            (_, Some(per_launch)) => {
                self.enqueue_fused_push(stream, (rows, input, buffers), per_launch)
            }
            (other, None) => {
                // Not fused (NCCL, or push where fusing does not pay):
                // the all-reduce into the output, then the plain kernel
                // there; the own stream waits for both (on_stream).
                let forced = CallOptions {
                    algorithm: match other {
                        CallPath::Custom(algorithm) => AlgorithmChoice::Force(algorithm),
                        CallPath::Nccl(_) => AlgorithmChoice::Nccl,
                    },
                    ..options
                };
                self.enqueue(
                    stream,
                    rows.dtype,
                    input,
                    buffers.out,
                    rows.elements(),
                    forced,
                )?;
                self.on_stream(stream, |comm, _| {
                    comm.launch_plain(stream, rows, buffers.out, buffers)
                })
            }
        }
    }

    /// The one-stage or two-stage fused kernel: peers read this rank's
    /// input through the buffer table (or staging), as in the all-reduce.
    fn enqueue_fused_pull(
        &mut self,
        stream: &Arc<CudaStream>,
        algorithm: Algorithm,
        (rows, input, buffers): (Rows, u64, NormBuffers),
        options: CallOptions,
    ) -> Result<()> {
        // Checked before anything is enqueued, on every rank alike.
        let per_launch = self.rows_per_launch(algorithm, rows)?;
        self.on_stream(stream, |comm, capturing| {
            let source = comm.locate_input(
                algorithm,
                input,
                buffers.out,
                rows.bytes(),
                options.zero_copy,
                capturing,
            )?;
            tracing::trace!(
                rank = comm.rank,
                ?source,
                ?rows,
                per_launch,
                "fused all-reduce and RMSNorm"
            );
            for (first, count) in rows.launches(per_launch) {
                let offset = (first * rows.row_bytes()) as u64;
                let launch_input = comm.custom()?.launch_input(
                    stream,
                    algorithm,
                    source,
                    input,
                    offset,
                    count * rows.row_bytes(),
                )?;
                let LaunchInput::Table(source_word) = launch_input else {
                    return Err(Error::InvalidConfig(
                        "a fused pull input was not named through the buffer table".into(),
                    ));
                };
                let norm = buffers.args(rows, first, count, None);
                let args = comm.pull_args(algorithm, source_word, norm)?;
                comm.launch_fused(stream, rows.dtype, args)?;
            }
            Ok(())
        })
    }

    /// The push fused kernel: only this rank reads its input, at any
    /// address, so nothing is registered or staged; each launch takes
    /// `per_launch` rows, whose packets fit a push segment (docs/fused.md).
    fn enqueue_fused_push(
        &mut self,
        stream: &Arc<CudaStream>,
        (rows, input, buffers): (Rows, u64, NormBuffers),
        per_launch: usize,
    ) -> Result<()> {
        self.on_stream(stream, |comm, _| {
            tracing::trace!(
                rank = comm.rank,
                ?rows,
                per_launch,
                "fused push and RMSNorm"
            );
            for (first, count) in rows.launches(per_launch) {
                let norm = buffers.args(rows, first, count, Some(input));
                let launch_input = input + (first * rows.row_bytes()) as u64;
                let args = comm.push_args(launch_input, norm)?;
                comm.launch_fused(stream, rows.dtype, args)?;
            }
            Ok(())
        })
    }

    /// Rows one fused push launch takes: as many whole rows (each padded
    /// to whole packets) as a push segment holds; 0 where one row does not
    /// fit. Depends only on shared facts.
    fn push_rows_per_launch(&self, rows: Rows) -> Result<usize> {
        let per_pack = PACKET_BYTES / rows.dtype.size();
        let row_packets = rows.hidden.div_ceil(per_pack);
        Ok(self.custom()?.regions.push_segment / PACKET_BYTES / row_packets)
    }

    /// Rows one launch of `algorithm` takes: all, or else a multiple of
    /// [`ROWS_PER_PACKET`] that fits a chunk (staging, for an input that is
    /// staged) and, for two-stage, this rank's runs of them its scratch.
    /// Depends only on shared facts.
    fn rows_per_launch(&self, algorithm: Algorithm, rows: Rows) -> Result<usize> {
        let per_pack = PACKET_BYTES / rows.dtype.size();
        let chunk = self.chunk_elements(self.custom()?, Algorithm::OneStage, rows.dtype);
        let (mut fit, mut most) = (chunk / rows.hidden, chunk / ROWS_PER_PACKET);
        if algorithm == Algorithm::TwoStage {
            let share = rows.hidden.div_ceil(per_pack).div_ceil(self.world_size);
            let scratch_packets = (self.config.scratch_bytes - SCRATCH_TAIL_BYTES) / PACKET_BYTES;
            fit = fit.min(scratch_packets / share);
            most = most.min(scratch_packets / ROWS_PER_PACKET * self.world_size * per_pack);
        }
        if rows.rows <= fit {
            return Ok(rows.rows);
        }
        match fit / ROWS_PER_PACKET * ROWS_PER_PACKET {
            0 => Err(Error::RowTooLong {
                hidden: rows.hidden,
                most,
            }),
            whole => Ok(whole),
        }
    }

    /// The one-stage or two-stage fused kernel's arguments for one launch.
    fn pull_args(&self, algorithm: Algorithm, source: u64, norm: NormArgs) -> Result<FusedArgs> {
        let custom = self.custom()?;
        let kernel = match algorithm {
            Algorithm::TwoStage => NormKernel::FusedTwoStage,
            _ => NormKernel::FusedOneStage,
        };
        Ok(FusedArgs::Pull(
            kernel,
            FusedNormArgs {
                all_reduce: AllReduceArgs {
                    barrier: self.barrier_args(custom),
                    table: custom.regions.table.ptr(),
                    source,
                    output: norm.out,
                    count: norm.rows * norm.hidden,
                    capacity: custom.regions.table_capacity as u32,
                },
                norm,
            },
        ))
    }

    /// The push fused kernel's arguments for one launch: `input` and
    /// `norm` address its own rows.
    fn push_args(&self, input: u64, norm: NormArgs) -> Result<FusedArgs> {
        let custom = self.custom()?;
        Ok(FusedArgs::Push(FusedPushArgs {
            push: PushArgs {
                barrier: self.barrier_args(custom),
                push: custom.regions.push_peers,
                input,
                output: norm.out,
                count: norm.rows * norm.hidden,
                segment_bytes: custom.regions.push_segment as u64,
            },
            norm,
        }))
    }

    fn launch_fused(&self, stream: &Arc<CudaStream>, dtype: DType, args: FusedArgs) -> Result<()> {
        let custom = self.custom()?;
        let (kernel, rows) = match &args {
            FusedArgs::Pull(kernel, a) => (*kernel, a.norm.rows),
            FusedArgs::Push(a) => (NormKernel::FusedPush, a.norm.rows),
        };
        // Every rank launches the same grid: rows and max_blocks are shared.
        let blocks = (rows as usize).min(custom.max_blocks as usize);
        let function = custom
            .norm_kernels
            .get(&(kernel, dtype))
            .ok_or_else(|| Error::InvalidConfig(format!("no {kernel:?} kernel for {dtype}")))?;
        let mut launch = stream.launch_builder(function);
        match &args {
            FusedArgs::Pull(_, a) => launch.arg(a),
            FusedArgs::Push(a) => launch.arg(a),
        };
        // SAFETY: each fused kernel takes one argument struct by value,
        // the one its `FusedArgs` variant holds. The table, signal regions
        // (a two-stage launch's runs fit scratch: rows_per_launch),
        // staging and push areas live as long as the communicator; every
        // table entry a peer names holds a buffer checked shareable when
        // shared; a push launch's rows, each padded to whole packets, fit
        // a push segment (push_rows_per_launch); input, residual and
        // output hold `rows x hidden` elements from where the arguments
        // point and the weight `hidden` (Rows::of and the offsets of whole
        // launches).
        unsafe { launch.launch(grid(blocks)) }
            .map(|_| ())
            .map_err(Error::driver("cuLaunchKernel"))
    }

    fn launch_plain(
        &self,
        stream: &Arc<CudaStream>,
        rows: Rows,
        sum: u64,
        buffers: NormBuffers,
    ) -> Result<()> {
        if rows.rows == 0 {
            return Ok(());
        }
        let args = AddRmsNormArgs {
            sum,
            norm: buffers.args(rows, 0, rows.rows, Some(sum)),
        };
        // Loaded at set-up where the kernels serve the group; a group on
        // NCCL alone loads them here (the process keeps them).
        let kernels = match &self.custom {
            Some(custom) => custom.norm_kernels.clone(),
            None => load_norm_kernels(&self.gpu.ctx, self.world_size)?,
        };
        let function = kernels
            .get(&(NormKernel::Plain, rows.dtype))
            .ok_or_else(|| Error::InvalidConfig(format!("no norm kernel for {}", rows.dtype)))?;
        let mut launch = stream.launch_builder(function);
        launch.arg(&args);
        // SAFETY: the plain kernels take one `AddRmsNormArgs` by value; sum,
        // residual and output hold `rows x hidden` elements, the weight
        // `hidden` (Rows::of); `sum` is the output or apart from it
        // (NormBuffers::check, or the fused call's own output).
        unsafe { launch.launch(grid(rows.rows.min(PLAIN_MAX_BLOCKS))) }
            .map(|_| ())
            .map_err(Error::driver("cuLaunchKernel"))
    }
}

/// One fused launch's arguments, by kernel.
enum FusedArgs {
    /// One-stage or two-stage: peers' inputs through the buffer table.
    Pull(NormKernel, FusedNormArgs),
    Push(FusedPushArgs),
}

/// The weight and epsilon of an RMSNorm: `weight` holds one row (hidden
/// elements) in the activations' dtype.
#[derive(Debug)]
pub struct RmsNorm<'a, W> {
    pub weight: &'a W,
    pub eps: f32,
}

impl<W> Clone for RmsNorm<'_, W> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<W> Copy for RmsNorm<'_, W> {}

/// Checks the lengths of a call's buffers and runs `call` with its rows,
/// the address of `input` (the all-reduce's input or the plain kernel's
/// sum) and the norm's buffers, in `stream`'s order for the buffers.
fn with_norm_call<T: Element, W: DevicePtr<T>>(
    stream: &Arc<CudaStream>,
    input: &impl DevicePtr<T>,
    residual: &mut impl DevicePtrMut<T>,
    norm: RmsNorm<'_, W>,
    out: &mut impl DevicePtrMut<T>,
    call: impl FnOnce(Rows, u64, NormBuffers) -> Result<()>,
) -> Result<()> {
    let rows = Rows::of(
        T::DTYPE,
        input.len(),
        residual.len(),
        norm.weight.len(),
        out.len(),
    )?;
    let (input, _read) = input.device_ptr(stream);
    let (residual, _update) = residual.device_ptr_mut(stream);
    let (weight, _weight) = norm.weight.device_ptr(stream);
    let (out, _write) = out.device_ptr_mut(stream);
    let buffers = NormBuffers {
        residual,
        weight,
        out,
        eps: norm.eps,
    };
    call(rows, input, buffers)
}

fn grid(blocks: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks.max(1) as u32, 1, 1),
        block_dim: (THREADS_PER_BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_fuses_up_to_a_mebibyte_of_rows_that_fit_a_segment() {
        let rows = |count, hidden| Rows::of(DType::BF16, count, count, hidden, count).unwrap();
        assert!(fuses_push(rows(8 * 4096, 4096), 8));
        assert!(fuses_push(rows(128 * 4096, 4096), 128));
        assert!(!fuses_push(rows(129 * 4096, 4096), 128));
        assert!(!fuses_push(rows(4096, 4096), 0));
    }
}
