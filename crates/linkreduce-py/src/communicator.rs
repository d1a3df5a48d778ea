//! The `Communicator` class: one rank's linkreduce communicator, driven
//! from Python with raw device addresses and stream handles.
//!
//! Every method detaches from the interpreter (releases the GIL) before it
//! locks the communicator, and works detached: other Python threads run
//! meanwhile, and a rendezvous callable that attaches again cannot
//! deadlock against a thread waiting for the lock.

use std::sync::{Arc, Mutex, MutexGuard};

use cudarc::driver::sys::CUstream;
use cudarc::driver::CudaStream;
use linkreduce::{Communicator, Error, ScatterGather};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

use crate::args;
use crate::checks::ScatterGatherCall;
use crate::errors::{to_py, Failure};
use crate::rendezvous::CallableRendezvous;

/// One rank of a group that all-reduces across the GPUs of one node.
///
/// Build it on every rank at once (set-up is collective) with
/// `Communicator.from_env()` (the variables torchrun sets; ranks meet over
/// TCP) or `Communicator.with_all_gather(...)` (ranks meet through a
/// callable, such as one over a torch.distributed group). All methods
/// release the GIL while they work. `close()` (or leaving a `with` block)
/// ends it; it is collective too.
#[pyclass(frozen, name = "Communicator", module = "linkreduce")]
pub struct PyCommunicator {
    inner: Mutex<Option<Communicator>>,
    /// Set when ranks meet through a Python callable: its exceptions become
    /// the causes of the errors raised here.
    rendezvous: Option<Arc<CallableRendezvous>>,
    rank: usize,
    world_size: usize,
    device: usize,
}

impl PyCommunicator {
    fn wrap(
        communicator: Communicator,
        rendezvous: Option<Arc<CallableRendezvous>>,
    ) -> PyCommunicator {
        PyCommunicator {
            rank: communicator.rank(),
            world_size: communicator.world_size(),
            device: communicator.device(),
            inner: Mutex::new(Some(communicator)),
            rendezvous,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Option<Communicator>> {
        // A panic while locked cannot come from a caller's input; if one
        // happened anyway, the communicator's own state (its poisoning on
        // peer failures) still tells whether it can be used.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs `f` on the communicator, detached from the interpreter.
    fn with<T, F>(&self, py: Python<'_>, f: F) -> PyResult<T>
    where
        T: Send,
        F: FnOnce(&mut Communicator) -> Result<T, Error> + Send,
    {
        let result = py.detach(|| match self.lock().as_mut() {
            None => Err(Failure::Closed),
            Some(communicator) => f(communicator).map_err(Failure::Library),
        });
        result.map_err(|failure| self.raise(py, failure))
    }

    /// Runs `call` on the stream the caller named (its raw handle) or, for
    /// None, on this communicator's own, detached from the interpreter.
    fn enqueue<F>(&self, py: Python<'_>, stream: Option<u64>, call: F) -> PyResult<()>
    where
        F: FnOnce(&mut Communicator, &Arc<CudaStream>) -> Result<(), Error> + Send,
    {
        self.with(py, move |communicator| {
            let stream = match stream {
                None => communicator.stream().clone(),
                // SAFETY: the caller of every method that takes `stream`
                // vouches that it is a live stream of this device's primary
                // context (the communicator's context) and stays alive
                // while the call or a graph captured with it may run
                // (all_reduce's docstring); 0 is CUDA's legacy default
                // stream, valid in every context.
                Some(raw) => unsafe { communicator.borrow_stream(raw as usize as CUstream) },
            };
            call(communicator, &stream)
        })
    }

    /// A reduce-scatter or all-gather from Python's arguments: checked,
    /// then enqueued. `count` is one rank's block; `options` the algorithm
    /// and zero_copy.
    #[allow(clippy::too_many_arguments)]
    fn scatter_gather(
        &self,
        py: Python<'_>,
        op: ScatterGather,
        dtype: &str,
        buffers: (&Bound<'_, PyAny>, &Bound<'_, PyAny>),
        count: &Bound<'_, PyAny>,
        stream: Option<&Bound<'_, PyAny>>,
        (algorithm, zero_copy): (&str, bool),
    ) -> PyResult<()> {
        let call = args::scatter_gather(
            op,
            dtype,
            buffers,
            count,
            self.world_size,
            algorithm,
            zero_copy,
        )?;
        self.enqueue(py, args::stream(stream)?, move |communicator, stream| {
            let ScatterGatherCall {
                dtype,
                send,
                recv,
                count,
                options,
                ..
            } = call;
            // SAFETY: the caller vouches that `send` and `recv` are on this
            // communicator's device and hold NCCL's lengths for `count`
            // elements per block (the larger one world size blocks),
            // readable (send) and writable (recv) until the call has run on
            // `stream` (reduce_scatter's docstring). ScatterGatherCall::new
            // checked that neither range wraps around the address space;
            // the library refuses overlaps other than the in-place layout.
            unsafe {
                match op {
                    ScatterGather::ReduceScatter => {
                        communicator.reduce_scatter_raw(stream, dtype, send, recv, count, options)
                    }
                    ScatterGather::AllGather => {
                        communicator.all_gather_raw(stream, dtype, send, recv, count, options)
                    }
                }
            }
        })
    }

    fn raise(&self, py: Python<'_>, failure: Failure) -> PyErr {
        let cause = self.rendezvous.as_ref().and_then(|r| r.take_error());
        to_py(py, failure, Some(self.rank), cause)
    }
}

#[pymethods]
impl PyCommunicator {
    /// from_env(device=None, *, port=None, timeout_s=None,
    ///          rendezvous_timeout_s=None, staging_bytes=None,
    ///          max_blocks=None) -> Communicator
    ///
    /// The communicator of a process started the torchrun way: RANK,
    /// WORLD_SIZE, MASTER_ADDR and MASTER_PORT say where the ranks meet over
    /// TCP (rank 0 listens on `port` when given, else on MASTER_PORT: under
    /// torchrun, whose agent already listens on MASTER_PORT, pass another
    /// free port, the same on every rank); LOCAL_RANK (or RANK) picks the
    /// GPU, modulo the visible GPUs, unless `device` names one. Collective.
    ///
    /// Keywords (the same on every rank): `timeout_s`, how long a kernel
    /// waits for a peer before the call fails naming it (default 5);
    /// `rendezvous_timeout_s`, how long set-up waits for the other ranks
    /// (default 60, or LINKREDUCE_RENDEZVOUS_TIMEOUT_S); `staging_bytes`,
    /// the staging buffer (default 32 MiB); `max_blocks`, the largest grid.
    ///
    /// Raises LinkreduceError when the variables are missing or wrong, when
    /// there is no usable GPU (checked before meeting the other ranks), or
    /// when set-up fails on any rank.
    #[staticmethod]
    #[pyo3(signature = (device = None, *, port = None, timeout_s = None, rendezvous_timeout_s = None, staging_bytes = None, max_blocks = None))]
    #[allow(clippy::too_many_arguments)]
    fn from_env(
        py: Python<'_>,
        device: Option<&Bound<'_, PyAny>>,
        port: Option<&Bound<'_, PyAny>>,
        timeout_s: Option<f64>,
        rendezvous_timeout_s: Option<f64>,
        staging_bytes: Option<&Bound<'_, PyAny>>,
        max_blocks: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<PyCommunicator> {
        let config = args::config(timeout_s, rendezvous_timeout_s, staging_bytes, max_blocks)?;
        let device = device
            .map(|d| args::non_negative(d, "device", "a CUDA device ordinal"))
            .transpose()?;
        let port = port
            .map(|p| {
                let port = args::non_negative(p, "port", "a TCP port")?;
                u16::try_from(port)
                    .ok()
                    .filter(|&port| port != 0)
                    .ok_or_else(|| {
                        PyValueError::new_err(format!("port must be in 1..=65535, got {port}"))
                    })
            })
            .transpose()?;
        let built =
            py.detach(move || Communicator::from_env_on(device.map(|d| d as usize), port, config));
        built
            .map(|communicator| PyCommunicator::wrap(communicator, None))
            .map_err(|error| to_py(py, Failure::Library(error), None, None))
    }

    /// with_all_gather(rank, world_size, device, all_gather, *, timeout_s=None,
    ///                 rendezvous_timeout_s=None, staging_bytes=None,
    ///                 max_blocks=None) -> Communicator
    ///
    /// The communicator of rank `rank` of `world_size` on CUDA device
    /// `device`, whose ranks meet through `all_gather`: a callable that takes
    /// this rank's `bytes`, sends them to every rank, and returns a list of
    /// every rank's `bytes` in rank order (this rank's own included). Every
    /// rank calls it the same number of times, in the same order; it is
    /// called during set-up, `register_graph_buffers`,
    /// `release_graph_buffers` and `close`, with the GIL held and never
    /// while a stream is being captured. An exception it raises fails the
    /// step with a LinkreduceError whose `__cause__` is that exception.
    /// Collective. Keywords as for `from_env`.
    #[staticmethod]
    #[pyo3(signature = (rank, world_size, device, all_gather, *, timeout_s = None, rendezvous_timeout_s = None, staging_bytes = None, max_blocks = None))]
    #[allow(clippy::too_many_arguments)]
    fn with_all_gather(
        py: Python<'_>,
        rank: &Bound<'_, PyAny>,
        world_size: &Bound<'_, PyAny>,
        device: &Bound<'_, PyAny>,
        all_gather: Bound<'_, PyAny>,
        timeout_s: Option<f64>,
        rendezvous_timeout_s: Option<f64>,
        staging_bytes: Option<&Bound<'_, PyAny>>,
        max_blocks: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<PyCommunicator> {
        let config = args::config(timeout_s, rendezvous_timeout_s, staging_bytes, max_blocks)?;
        let rank = args::non_negative(rank, "rank", "this process's rank")? as usize;
        let world_size = args::non_negative(world_size, "world_size", "the number of ranks")?;
        let world_size = world_size as usize;
        let device = args::non_negative(device, "device", "a CUDA device ordinal")? as usize;
        if rank >= world_size {
            return Err(PyValueError::new_err(format!(
                "rank {rank} is out of range for world_size {world_size}"
            )));
        }
        if !all_gather.is_callable() {
            return Err(PyTypeError::new_err(
                "all_gather must be a callable: bytes -> list of bytes, one per rank",
            ));
        }
        let rendezvous = Arc::new(CallableRendezvous::new(
            rank,
            world_size,
            all_gather.unbind(),
        ));
        let shared = rendezvous.clone();
        let built = py.detach(move || Communicator::new(shared, device, config));
        match built {
            Ok(communicator) => Ok(PyCommunicator::wrap(communicator, Some(rendezvous))),
            Err(error) => Err(to_py(
                py,
                Failure::Library(error),
                Some(rank),
                rendezvous.take_error(),
            )),
        }
    }

    /// all_reduce(dtype, input_ptr, output_ptr, count, stream=None,
    ///            algorithm="auto", zero_copy=False)
    ///
    /// Enqueues the sum over all ranks of `count` elements of `dtype` ("f32",
    /// "f16", "bf16") at device address `input_ptr` into `output_ptr` (the
    /// same address for in place) on `stream`: a raw CUstream handle as an
    /// int (torch.cuda.current_stream().cuda_stream, cupy's stream.ptr; 0
    /// is CUDA's legacy default stream), or None for this communicator's
    /// own stream. Returns once enqueued; a peer that died or hangs makes a
    /// later call or `synchronize()` raise LinkreduceError naming it.
    /// Collective on the GPU: every rank makes the same calls with the same
    /// counts, dtypes and algorithms, in the same order. `algorithm` is
    /// "auto" (linkreduce's kernels where they serve the group, NCCL
    /// elsewhere: `path_for` says which), "one-stage", "two-stage", "push",
    /// "chunked-push" or "nccl"; `zero_copy` refuses an input peers cannot read in place
    /// instead of copying it to staging.
    ///
    /// The caller vouches (nothing checks it; breaking it is undefined
    /// behaviour): both addresses lie on this communicator's device, the
    /// input is readable and the output writable for `count` elements until
    /// the call has run on `stream`, they are the same address or do not
    /// overlap, and `stream` is a live stream of the device's primary
    /// context that stays alive until the call, and any graph captured with
    /// it, has run. Argument errors (validate_all_reduce's checks) raise
    /// ValueError or TypeError before anything is enqueued.
    #[pyo3(signature = (dtype, input_ptr, output_ptr, count, stream = None, algorithm = "auto", zero_copy = false))]
    #[allow(clippy::too_many_arguments)]
    fn all_reduce(
        &self,
        py: Python<'_>,
        dtype: &str,
        input_ptr: &Bound<'_, PyAny>,
        output_ptr: &Bound<'_, PyAny>,
        count: &Bound<'_, PyAny>,
        stream: Option<&Bound<'_, PyAny>>,
        algorithm: &str,
        zero_copy: bool,
    ) -> PyResult<()> {
        let call = args::all_reduce(dtype, input_ptr, output_ptr, count, algorithm, zero_copy)?;
        self.enqueue(py, args::stream(stream)?, move |communicator, stream| {
            // SAFETY: the caller vouches that both addresses are on this
            // communicator's device, readable (input) and writable (output)
            // for `count` elements of `dtype` until the call has run on
            // `stream`, and equal or disjoint (all_reduce's docstring).
            // Call::new checked that neither range wraps around the
            // address space; the library refuses a partial overlap.
            unsafe {
                communicator.all_reduce_raw(
                    stream,
                    call.dtype,
                    call.input,
                    call.output,
                    call.count,
                    call.options,
                )
            }
        })
    }

    /// all_reduce_add_rms_norm(dtype, input_ptr, residual_ptr, out_ptr,
    ///                         count, weight_ptr, hidden, eps, stream=None,
    ///                         algorithm="auto", zero_copy=False)
    ///
    /// The all-reduce fused with a residual add and RMSNorm, per row of
    /// `hidden` elements (`count` is rows x hidden): sums `input_ptr` over
    /// all ranks, adds the sum into `residual_ptr` in place, and writes
    /// `residual / sqrt(mean(residual^2) + eps) * weight` into `out_ptr`,
    /// with the weight's `hidden` elements at `weight_ptr`. `dtype` is
    /// "f16" or "bf16", for all four buffers; `eps` a finite, non-negative
    /// float (used as an f32). Where the all-reduce's path for these bytes
    /// is one of the kernels' algorithms this is one kernel; on NCCL it is
    /// the all-reduce into `out_ptr`, then a norm kernel. Both round at the same
    /// points (docs/fused.md), so every rank and path gets the same bits.
    /// `stream`, `algorithm` and `zero_copy` (for the input) as for
    /// `all_reduce`; collective like it.
    ///
    /// The caller vouches, as for `all_reduce`: every address lies on this
    /// communicator's device; input and weight are readable, residual and
    /// output writable, for their elements until the call has run on
    /// `stream`. Overlapping buffers (other than input with weight) raise
    /// LinkreduceError (kind "BuffersOverlap"), as does a row longer than
    /// one launch takes ("RowTooLong"). Argument errors
    /// (validate_all_reduce_add_rms_norm's checks) raise ValueError or
    /// TypeError before anything is enqueued.
    #[pyo3(signature = (dtype, input_ptr, residual_ptr, out_ptr, count, weight_ptr, hidden, eps, stream = None, algorithm = "auto", zero_copy = false))]
    #[allow(clippy::too_many_arguments)]
    fn all_reduce_add_rms_norm(
        &self,
        py: Python<'_>,
        dtype: &str,
        input_ptr: &Bound<'_, PyAny>,
        residual_ptr: &Bound<'_, PyAny>,
        out_ptr: &Bound<'_, PyAny>,
        count: &Bound<'_, PyAny>,
        weight_ptr: &Bound<'_, PyAny>,
        hidden: &Bound<'_, PyAny>,
        eps: &Bound<'_, PyAny>,
        stream: Option<&Bound<'_, PyAny>>,
        algorithm: &str,
        zero_copy: bool,
    ) -> PyResult<()> {
        let call = args::fused_norm(
            dtype,
            (input_ptr, residual_ptr, out_ptr),
            count,
            (weight_ptr, hidden),
            eps,
            algorithm,
            zero_copy,
        )?;
        self.enqueue(py, args::stream(stream)?, move |communicator, stream| {
            // SAFETY: the caller vouches that every address is on this
            // communicator's device, holding `count` elements (the weight
            // `hidden`) of `dtype`, readable or writable as the call needs
            // until it has run on `stream` (all_reduce_add_rms_norm's
            // docstring). NormCall::new checked that no range wraps around
            // the address space; the library refuses overlaps.
            unsafe {
                communicator.all_reduce_add_rms_norm_raw(
                    stream,
                    call.dtype,
                    (call.input, call.residual, call.out),
                    call.count,
                    (call.weight, call.hidden),
                    call.eps,
                    call.options,
                )
            }
        })
    }

    /// reduce_scatter(dtype, send_ptr, recv_ptr, recv_count, stream=None,
    ///                algorithm="auto", zero_copy=False)
    ///
    /// NCCL's reduce-scatter (sum): `send_ptr` holds world_size x
    /// `recv_count` elements; rank r receives at `recv_ptr` the sum over
    /// ranks of block r (elements r x recv_count onwards) of every rank's
    /// send buffer, accumulated in f32 in rank order and rounded once, like
    /// the all-reduce. In place in NCCL's layout: `recv_ptr` = `send_ptr` +
    /// rank x recv_count elements. `algorithm`: "auto" (the kernels, or NCCL
    /// where `scatter_gather_path()` says so), "nccl", or any kernel
    /// algorithm's name for the kernels (they have one for this
    /// collective). `stream`, `zero_copy` and the caller's promises as for
    /// `all_reduce`; collective like it. Buffers that overlap other than in
    /// the in-place layout raise LinkreduceError (kind
    /// "ScatterGatherOverlap"). Argument errors (validate_reduce_scatter's
    /// checks) raise ValueError or TypeError before anything is enqueued.
    #[pyo3(signature = (dtype, send_ptr, recv_ptr, recv_count, stream = None, algorithm = "auto", zero_copy = false))]
    #[allow(clippy::too_many_arguments)]
    fn reduce_scatter(
        &self,
        py: Python<'_>,
        dtype: &str,
        send_ptr: &Bound<'_, PyAny>,
        recv_ptr: &Bound<'_, PyAny>,
        recv_count: &Bound<'_, PyAny>,
        stream: Option<&Bound<'_, PyAny>>,
        algorithm: &str,
        zero_copy: bool,
    ) -> PyResult<()> {
        let op = ScatterGather::ReduceScatter;
        let options = (algorithm, zero_copy);
        self.scatter_gather(
            py,
            op,
            dtype,
            (send_ptr, recv_ptr),
            recv_count,
            stream,
            options,
        )
    }

    /// all_gather(dtype, send_ptr, recv_ptr, send_count, stream=None,
    ///            algorithm="auto", zero_copy=False)
    ///
    /// NCCL's all-gather: `recv_ptr` holds world_size x `send_count`
    /// elements; block r of every rank's receive buffer gets rank r's
    /// `send_count` elements at `send_ptr`, bit for bit. In place in NCCL's
    /// layout: `send_ptr` = `recv_ptr` + rank x send_count elements.
    /// Everything else as for `reduce_scatter` (validate_all_gather's
    /// checks).
    #[pyo3(signature = (dtype, send_ptr, recv_ptr, send_count, stream = None, algorithm = "auto", zero_copy = false))]
    #[allow(clippy::too_many_arguments)]
    fn all_gather(
        &self,
        py: Python<'_>,
        dtype: &str,
        send_ptr: &Bound<'_, PyAny>,
        recv_ptr: &Bound<'_, PyAny>,
        send_count: &Bound<'_, PyAny>,
        stream: Option<&Bound<'_, PyAny>>,
        algorithm: &str,
        zero_copy: bool,
    ) -> PyResult<()> {
        let op = ScatterGather::AllGather;
        let options = (algorithm, zero_copy);
        self.scatter_gather(
            py,
            op,
            dtype,
            (send_ptr, recv_ptr),
            send_count,
            stream,
            options,
        )
    }

    /// register_graph_buffers() -> int
    ///
    /// After capturing CUDA graphs with calls of this communicator
    /// (all_reduce, all_reduce_add_rms_norm, reduce_scatter, all_gather),
    /// and before their first replay: shares the input buffers the captured
    /// calls read, so the replays read them in place. Collective. Returns how many this
    /// rank had. A failure here leaves the communicator unusable.
    fn register_graph_buffers(&self, py: Python<'_>) -> PyResult<usize> {
        self.with(py, |communicator| communicator.register_graph_buffers())
    }

    /// release_graph_buffers()
    ///
    /// Once the graphs registered so far are destroyed: unmaps their peers'
    /// buffers so that peers may free them. Collective. Those graphs must
    /// not be replayed afterwards.
    fn release_graph_buffers(&self, py: Python<'_>) -> PyResult<()> {
        self.with(py, |communicator| communicator.release_graph_buffers())
    }

    /// synchronize()
    ///
    /// Waits until every call enqueued so far has run, and raises
    /// LinkreduceError naming the peer when one timed out in them.
    fn synchronize(&self, py: Python<'_>) -> PyResult<()> {
        self.with(py, |communicator| communicator.synchronize())
    }

    /// algorithm_for(nbytes) -> str
    ///
    /// The path an automatic call of `nbytes` bytes takes: the algorithm of
    /// linkreduce's kernels ("one-stage", "two-stage", "push", "chunked-push"), or "nccl".
    fn algorithm_for(&self, py: Python<'_>, nbytes: &Bound<'_, PyAny>) -> PyResult<&'static str> {
        let bytes = message_bytes(nbytes)?;
        self.with(py, move |communicator| {
            Ok(communicator.path_for(bytes).name())
        })
    }

    /// path_for(nbytes) -> str
    ///
    /// Like `algorithm_for`, with the reason where the call takes NCCL
    /// ("nccl: 9 ranks (the kernels cover 2 to 8)").
    fn path_for(&self, py: Python<'_>, nbytes: &Bound<'_, PyAny>) -> PyResult<String> {
        let bytes = message_bytes(nbytes)?;
        self.with(py, move |communicator| {
            Ok(communicator.path_for(bytes).to_string())
        })
    }

    /// scatter_gather_algorithm() -> str
    ///
    /// The path automatic reduce_scatter and all_gather calls take, at
    /// every size: "one-stage" (the kernels) or "nccl" (a group the kernels
    /// cannot serve).
    fn scatter_gather_algorithm(&self, py: Python<'_>) -> PyResult<&'static str> {
        self.with(py, |communicator| {
            Ok(communicator.scatter_gather_path().name())
        })
    }

    /// scatter_gather_path() -> str
    ///
    /// Like `scatter_gather_algorithm`, with the reason where the calls
    /// take NCCL.
    fn scatter_gather_path(&self, py: Python<'_>) -> PyResult<String> {
        self.with(py, |communicator| {
            Ok(communicator.scatter_gather_path().to_string())
        })
    }

    /// nccl_only() -> bool
    ///
    /// Whether every call takes NCCL: the kernels cannot serve this group
    /// (ranks on several hosts, more than 8 ranks, a pair of GPUs without
    /// peer access). A forced algorithm is refused then.
    fn nccl_only(&self, py: Python<'_>) -> PyResult<bool> {
        self.with(py, |communicator| Ok(communicator.nccl_only()))
    }

    /// prepare_nccl()
    ///
    /// Sets up NCCL for the calls that take it, if not yet (set-up did
    /// where every call takes it). Collective. Call it before capturing
    /// CUDA graphs whose calls may take NCCL: NCCL cannot be set up during
    /// a capture.
    fn prepare_nccl(&self, py: Python<'_>) -> PyResult<()> {
        self.with(py, |communicator| communicator.prepare_nccl())
    }

    /// close()
    ///
    /// Ends the communicator: waits for its calls, lets peers unmap its
    /// memory, and frees it. Collective (every rank closes at the same
    /// point); a peer that died does not make it wait. Further calls raise
    /// LinkreduceError; closing again does nothing.
    fn close(&self, py: Python<'_>) {
        py.detach(|| {
            let communicator = self.lock().take();
            // Dropped unlocked: its closing barrier may call back into Python.
            drop(communicator);
        });
    }

    /// Whether `close()` ran.
    #[getter]
    fn closed(&self, py: Python<'_>) -> bool {
        py.detach(|| self.lock().is_none())
    }

    #[getter]
    fn rank(&self) -> usize {
        self.rank
    }

    #[getter]
    fn world_size(&self) -> usize {
        self.world_size
    }

    /// The CUDA device ordinal this rank runs on.
    #[getter]
    fn device(&self) -> usize {
        self.device
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (_kind = None, _value = None, _traceback = None))]
    fn __exit__(
        &self,
        py: Python<'_>,
        _kind: Option<&Bound<'_, PyAny>>,
        _value: Option<&Bound<'_, PyAny>>,
        _traceback: Option<&Bound<'_, PyAny>>,
    ) -> bool {
        self.close(py);
        false
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        format!(
            "Communicator(rank={}, world_size={}, device={}{})",
            self.rank,
            self.world_size,
            self.device,
            if self.closed(py) { ", closed" } else { "" }
        )
    }
}

/// A message size in bytes from Python.
fn message_bytes(nbytes: &Bound<'_, PyAny>) -> PyResult<usize> {
    let bytes = args::non_negative(nbytes, "nbytes", "a message size in bytes")?;
    usize::try_from(bytes)
        .map_err(|_| PyValueError::new_err("nbytes does not fit this machine's usize"))
}
