//! The communicator: one rank's handle for its group's collectives
//! (all-reduce, the fused all-reduce + RMSNorm, reduce-scatter, all-gather).
//!
//! Set-up is collective (every rank builds its communicator at the same time
//! through a [`Rendezvous`]); so are [`Communicator::register`] and
//! [`Communicator::register_graph_buffers`]. Calls are collective on the
//! GPU: every rank must make the same calls, with the same lengths, in the
//! same order; each rank passes its own buffers, which need not be alike.
//!
//! Every call takes one of two paths, the same on every rank: the custom
//! kernels where they serve the group, NCCL elsewhere (docs/design.md,
//! "Path choice"); [`Communicator::path_for`] says which and why.
//!
//! The concerns live apart, as NCCL keeps init, enqueue and registration
//! apart: `config` (what callers tune), `setup` (building a rank),
//! `facts` (what ranks learn about each other to choose a path), `custom`
//! (the kernels' memory), `register` (the buffer table: registered buffers
//! and buffers of captured graphs), `enqueue` (turning a call into
//! staging copies and launches, or an NCCL call), `fused` and
//! `scatter_gather` (the other operations on the same machinery) and
//! `watch` (bounded waits on NCCL's work). See docs/design.md for the
//! protocols.

mod config;
mod custom;
mod enqueue;
mod facts;
mod fused;
mod register;
mod scatter_gather;
mod setup;
mod watch;

use std::sync::Arc;

use cudarc::driver::sys::CUstreamCaptureStatus;
use cudarc::driver::{CudaContext, CudaStream, DevicePtr, DevicePtrMut};

pub use config::{CallOptions, Config};
pub use facts::HOST_ID_VAR;
pub use fused::RmsNorm;

use crate::algorithm::AlgorithmChoice;
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::memory::{DeviceBuffer, PointerInfo};
use crate::nccl::NcclComm;
use crate::path::{CallPath, Plan};
use crate::rendezvous::Rendezvous;

use custom::CustomPath;
use watch::{NcclWatch, Progress};

/// The device side of a rank.
struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    /// Orders calls on a caller's stream against this rank's own stream
    /// (recorded on one, waited on by the other). One event made at set-up:
    /// making one per call cost microseconds per eager call.
    handoff: cudarc::driver::CudaEvent,
}

/// One rank of a group that all-reduces across GPUs.
pub struct Communicator {
    rank: usize,
    world_size: usize,
    gpu: Gpu,
    /// Which path calls take; the same on every rank.
    plan: Plan,
    /// The kernels' side; None where they cannot serve the group.
    custom: Option<CustomPath>,
    /// NCCL over the same ranks, once a call needed it.
    nccl: Option<NcclComm>,
    /// This rank's eager NCCL calls, so that host waits on them are bounded.
    nccl_watch: NcclWatch,
    config: Config,
    rendezvous: Arc<dyn Rendezvous>,
    /// Why the communicator cannot be used any more, once it cannot.
    poisoned: Option<String>,
}

impl Communicator {
    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// The device this rank runs on.
    pub fn device(&self) -> usize {
        self.gpu.ctx.ordinal()
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.gpu.ctx
    }

    /// This rank's own stream: where calls without a stream of their own
    /// go, and where [`alloc`](Self::alloc)'s buffers are allocated and
    /// freed. Capture it to put such calls in a CUDA graph.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.gpu.stream
    }

    /// Wraps a stream that another library owns (PyTorch's current stream,
    /// an engine's raw handle) for the `*_on` calls.
    ///
    /// # Safety
    /// `stream` must be a live stream of this rank's context
    /// ([`context`](Self::context)), and its owner must keep it alive while
    /// the returned handle, any call enqueued on it, or any graph captured
    /// on it may still run.
    pub unsafe fn borrow_stream(&self, stream: cudarc::driver::sys::CUstream) -> Arc<CudaStream> {
        // SAFETY: the caller vouches for the stream's context and lifetime.
        unsafe { self.gpu.ctx.wrap_borrowed_stream(stream) }
    }

    /// The meeting point of this communicator's ranks, for callers that
    /// coordinate the same ranks (an NCCL communicator, a benchmark).
    pub fn rendezvous(&self) -> &Arc<dyn Rendezvous> {
        &self.rendezvous
    }

    /// A separate NCCL communicator over the same ranks and devices, on
    /// this communicator's stream, for callers that time or use NCCL
    /// directly (calls on the NCCL path use one of their own). Collective.
    pub fn nccl(&self) -> Result<NcclComm> {
        NcclComm::from_rendezvous(self.rendezvous.as_ref(), &self.gpu.stream)
    }

    /// The largest grid a launch uses (same on every rank), but for the
    /// chunked push, whose heavier kernels may get fewer; None where every
    /// call takes NCCL.
    pub fn max_blocks(&self) -> Option<u32> {
        self.custom.as_ref().map(|custom| custom.max_blocks)
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The path an automatic call of `bytes` takes, and why (its Display
    /// says so): the same on every rank (docs/design.md, "Path choice").
    pub fn path_for(&self, bytes: usize) -> CallPath {
        self.plan.auto_path(self.world_size, bytes, self.tuning())
    }

    /// The path automatic reduce-scatters and all-gathers take, at every
    /// size, and why: the same on every rank (docs/scatter_gather.md,
    /// "Path choice").
    pub fn scatter_gather_path(&self) -> CallPath {
        self.plan.scatter_gather_auto_path()
    }

    /// Whether every call takes NCCL (the kernels cannot serve the group).
    pub fn nccl_only(&self) -> bool {
        self.plan.nccl_only()
    }

    /// The path a call of `bytes` with `choice` takes, or why it has none.
    fn call_path(&self, bytes: usize, choice: AlgorithmChoice) -> Result<CallPath> {
        self.plan
            .path(self.world_size, bytes, choice, self.tuning())
    }

    /// The tuning table automatic calls follow (the kernels' set-up loads it).
    fn tuning(&self) -> Option<&crate::algorithm::Tuning> {
        self.custom
            .as_ref()
            .and_then(|custom| custom.tuning.as_ref())
    }

    /// Allocates a zeroed buffer that peers can read, on this rank's stream.
    /// Where every rank lives in this process it comes from the device's
    /// stream-ordered pool and is freed in this stream's order; otherwise
    /// from `cuMemAlloc`, which CUDA IPC can export.
    pub fn alloc<T: Element>(&self, len: usize) -> Result<DeviceBuffer<T>> {
        let mapped_by_peers = self
            .custom
            .as_ref()
            .is_some_and(|custom| custom.buffers.crosses_processes());
        if mapped_by_peers {
            DeviceBuffer::zeroed(&self.gpu.stream, len)
        } else {
            DeviceBuffer::zeroed_in_pool(&self.gpu.stream, len)
        }
    }

    /// Allocates a buffer peers can read and copies `host` into it.
    pub fn upload<T: Element>(&self, host: &[T]) -> Result<DeviceBuffer<T>> {
        let mut buffer = self.alloc::<T>(host.len())?;
        self.gpu
            .stream
            .memcpy_htod(host, &mut buffer)
            .map_err(Error::driver("cuMemcpyHtoD"))?;
        Ok(buffer)
    }

    /// Copies `buffer` to the host once this rank's stream reaches it.
    pub fn download<T: Element + Default>(&self, buffer: &impl DevicePtr<T>) -> Result<Vec<T>> {
        self.gpu
            .stream
            .clone_dtoh(buffer)
            .map_err(Error::driver("cuMemcpyDtoH"))
    }

    /// Sums `input` over all ranks into `output` (any device buffer of the
    /// same length on this rank's device, at any address).
    pub fn all_reduce<T: Element>(
        &mut self,
        input: &impl DevicePtr<T>,
        output: &mut impl DevicePtrMut<T>,
    ) -> Result<()> {
        self.all_reduce_with(input, output, CallOptions::default())
    }

    pub fn all_reduce_with<T: Element>(
        &mut self,
        input: &impl DevicePtr<T>,
        output: &mut impl DevicePtrMut<T>,
        options: CallOptions,
    ) -> Result<()> {
        let stream = self.gpu.stream.clone();
        self.all_reduce_on(&stream, input, output, options)
    }

    /// Sums `buffer` over all ranks in place.
    pub fn all_reduce_in_place<T: Element>(
        &mut self,
        buffer: &mut impl DevicePtrMut<T>,
        options: CallOptions,
    ) -> Result<()> {
        let stream = self.gpu.stream.clone();
        self.all_reduce_in_place_on(&stream, buffer, options)
    }

    /// Like [`all_reduce_with`](Self::all_reduce_with), enqueued on
    /// `stream`, a stream of this rank's context (an engine's own, or one
    /// from [`borrow_stream`](Self::borrow_stream)): ordered after the work
    /// before it on that stream and before the work after it, with nothing
    /// waiting on the host. Captured when `stream` is being captured.
    /// Calls may change streams; each is ordered after the previous call
    /// (docs/design.md, "Streams").
    pub fn all_reduce_on<T: Element>(
        &mut self,
        stream: &Arc<CudaStream>,
        input: &impl DevicePtr<T>,
        output: &mut impl DevicePtrMut<T>,
        options: CallOptions,
    ) -> Result<()> {
        if input.len() != output.len() {
            return Err(Error::LengthMismatch {
                input: input.len(),
                output: output.len(),
            });
        }
        let (input_ptr, _read) = input.device_ptr(stream);
        let (output_ptr, _write) = output.device_ptr_mut(stream);
        self.enqueue(
            stream,
            T::DTYPE,
            input_ptr,
            output_ptr,
            input.len(),
            options,
        )
    }

    /// Like [`all_reduce_in_place`](Self::all_reduce_in_place), enqueued on
    /// `stream` as [`all_reduce_on`](Self::all_reduce_on) is.
    pub fn all_reduce_in_place_on<T: Element>(
        &mut self,
        stream: &Arc<CudaStream>,
        buffer: &mut impl DevicePtrMut<T>,
        options: CallOptions,
    ) -> Result<()> {
        let len = buffer.len();
        let (ptr, _write) = buffer.device_ptr_mut(stream);
        self.enqueue(stream, T::DTYPE, ptr, ptr, len, options)
    }

    /// Sums `count` elements of `dtype` at device address `input` over all
    /// ranks into `output` (the same address for in place), on `stream`:
    /// [`all_reduce_on`](Self::all_reduce_on) for bindings that hold raw
    /// pointers (PyTorch's `data_ptr()`, DLPack).
    ///
    /// # Safety
    /// `input` and `output` must each address `count` elements of `dtype`
    /// on this rank's device, readable (`input`) and writable (`output`)
    /// until the call has run on `stream`, and either be the same or not
    /// overlap (partial overlap is refused, other misuse is not detected).
    pub unsafe fn all_reduce_raw(
        &mut self,
        stream: &Arc<CudaStream>,
        dtype: DType,
        input: u64,
        output: u64,
        count: usize,
        options: CallOptions,
    ) -> Result<()> {
        self.enqueue(stream, dtype, input, output, count, options)
    }

    /// Waits for this rank's enqueued work and reports a peer timeout that
    /// happened in it.
    pub fn synchronize(&mut self) -> Result<()> {
        self.check_usable()?;
        self.wait_for_calls()?;
        self.check_usable()
    }

    /// Waits on the host until every call enqueued so far has finished:
    /// this rank's own stream is ordered after each of them (calls on a
    /// caller's stream included; docs/design.md, "Streams").
    /// Work on the NCCL path is waited for first, within the timeout
    /// (comm/watch.rs); the kernels bound their own waits.
    fn wait_for_calls(&mut self) -> Result<()> {
        if let Some(nccl) = &self.nccl {
            if let Progress::Stalled = self.nccl_watch.wait(self.config.timeout)? {
                let error = Error::NcclStalled {
                    rank: self.rank,
                    waited_ms: self.config.timeout.as_millis() as u64,
                };
                // The error says what happened; a failed abort adds nothing.
                let _ = nccl.abort();
                self.poisoned = Some(error.to_string());
                // Aborted, NCCL's kernels leave, and the kernels bound their
                // own waits: the stream drains (seen on 2 x H200), so that
                // nothing this rank frees later is still in use.
                let _ = self.gpu.stream.synchronize();
                return Err(error);
            }
        }
        self.gpu
            .stream
            .synchronize()
            .map_err(Error::driver("cuStreamSynchronize"))
    }

    /// Fails when the communicator was poisoned or a kernel reported a
    /// timed-out peer since the last check.
    fn check_usable(&mut self) -> Result<()> {
        if let Some(reason) = &self.poisoned {
            return Err(Error::Poisoned(reason.clone()));
        }
        let Some(custom) = &self.custom else {
            return Ok(());
        };
        let fault = custom.regions.fault.read();
        if fault.code == 0 {
            return Ok(());
        }
        let error = Error::PeerTimeout {
            rank: fault.rank as usize,
            peer: fault.peer as usize,
            barrier: fault.barrier,
            block: fault.block,
            expected: fault.expected,
            seen: fault.seen,
        };
        self.poisoned = Some(error.to_string());
        Err(error)
    }

    /// Checks that peers can read `bytes` at `ptr` where it is.
    fn shareable(&self, custom: &CustomPath, ptr: u64, bytes: usize) -> Result<()> {
        let info = PointerInfo::shareable(ptr, bytes, self.device())?;
        custom.buffers.transport.check_shareable(ptr, &info)
    }

    /// Fails when a stream calls go on is being captured: `what`
    /// synchronises it, which would invalidate the capture.
    fn not_capturing(&self, what: &str) -> Result<()> {
        if capturing(&self.gpu.stream)? {
            return Err(Error::InvalidConfig(format!(
                "{what} cannot run while the stream is being captured; call it before or after capture"
            )));
        }
        Ok(())
    }
}

/// Whether `stream` is being captured into a graph.
fn capturing(stream: &CudaStream) -> Result<bool> {
    let status = stream
        .capture_status()
        .map_err(Error::driver("cuStreamIsCapturing"))?;
    match status {
        CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE => Ok(false),
        CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_ACTIVE => Ok(true),
        _ => Err(Error::InvalidConfig(
            "the stream's capture was invalidated; end the capture and start again".into(),
        )),
    }
}
