//! NCCL, for what the custom kernels do not cover and as the yardstick of
//! every benchmark. A thin safe layer over cudarc's raw NCCL calls: cudarc's
//! own `Comm` is not `Send` and panics when NCCL reports an error on drop.

use std::sync::Arc;

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};
use cudarc::nccl::{result as nccl, sys as nccl_sys};

use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::memory::DeviceMemory;
use crate::rendezvous::{agree, gather_or_fail, Rendezvous};

/// `NCCL_WIN_COLL_SYMMETRIC`: the window is allocated alike on every rank,
/// which lets NCCL 2.27+ use its symmetric-memory kernels.
const WIN_COLL_SYMMETRIC: i32 = 0x01;

fn ensure_nccl() -> Result<()> {
    // SAFETY: only tries to dlopen the library by its candidate names.
    if unsafe { nccl_sys::is_culib_present() } {
        Ok(())
    } else {
        Err(Error::NcclNotFound)
    }
}

fn nccl_error(call: &'static str) -> impl FnOnce(nccl::NcclError) -> Error {
    move |error| Error::Nccl {
        call,
        reason: format!("{error:?}"),
    }
}

/// NCCL's version as (major, minor, patch).
pub fn version() -> Result<(i32, i32, i32)> {
    ensure_nccl()?;
    let mut code = 0;
    // SAFETY: the library is present; `code` is valid for writes.
    unsafe { nccl_sys::ncclGetVersion(&mut code) }
        .result()
        .map_err(nccl_error("ncclGetVersion"))?;
    // Since 2.9 the code is major*10000 + minor*100 + patch.
    Ok((code / 10000, (code % 10000) / 100, code % 100))
}

fn nccl_dtype(dtype: DType) -> nccl_sys::ncclDataType_t {
    match dtype {
        DType::F32 => nccl_sys::ncclDataType_t::ncclFloat32,
        DType::F16 => nccl_sys::ncclDataType_t::ncclFloat16,
        DType::BF16 => nccl_sys::ncclDataType_t::ncclBfloat16,
    }
}

/// An NCCL communicator handle, destroyed when the last owner (the
/// communicator or a symmetric buffer registered with it) drops it, unless
/// it was aborted (which frees it).
struct RawComm {
    handle: nccl_sys::ncclComm_t,
    aborted: std::sync::atomic::AtomicBool,
}

impl RawComm {
    fn new(handle: nccl_sys::ncclComm_t) -> Self {
        RawComm {
            handle,
            aborted: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

// SAFETY: a plain handle; NCCL calls on it are made by one thread at a
// time (the owners' `&mut`/ownership rules), and destruction happens once.
unsafe impl Send for RawComm {}
unsafe impl Sync for RawComm {}

impl Drop for RawComm {
    fn drop(&mut self) {
        if self.aborted.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        // SAFETY: the handle came from ncclCommInitAll or ncclCommInitRank
        // and is destroyed once, after every window registered with it.
        let _ = unsafe { nccl::comm_destroy(self.handle) };
    }
}

/// One rank's NCCL communicator, bound to a stream.
pub struct NcclComm {
    comm: Arc<RawComm>,
    stream: Arc<CudaStream>,
    rank: usize,
}

// SAFETY: an NCCL communicator may be used from any thread as long as one
// thread uses it at a time, which `&mut`/ownership rules ensure here for
// the operations that enqueue work.
unsafe impl Send for NcclComm {}

impl NcclComm {
    /// One communicator per rank of `rendezvous` (threads or processes),
    /// on `stream`: rank 0's unique id travels over the rendezvous.
    /// Collective.
    pub fn from_rendezvous(rendezvous: &dyn Rendezvous, stream: &Arc<CudaStream>) -> Result<Self> {
        let rank = rendezvous.rank();
        let world = rendezvous.world_size();
        let id = ensure_nccl().and_then(|()| {
            if rank == 0 {
                let id = nccl::get_uniqueid().map_err(nccl_error("ncclGetUniqueId"))?;
                Ok(id.internal.iter().map(|&c| c as u8).collect())
            } else {
                Ok(Vec::new())
            }
        });
        let ids = gather_or_fail(rendezvous, "NCCL set-up", id)?;
        let mut id = nccl_sys::ncclUniqueId { internal: [0; 128] };
        let root_id = ids.first().map(Vec::as_slice).unwrap_or_default();
        if root_id.len() != id.internal.len() {
            return Err(Error::RankMismatch {
                what: "NCCL set-up",
                detail: format!("rank 0 sent a {}-byte unique id", root_id.len()),
            });
        }
        for (to, &from) in id.internal.iter_mut().zip(root_id) {
            *to = from as _;
        }
        stream
            .context()
            .bind_to_thread()
            .map_err(Error::driver("cuCtxSetCurrent"))?;
        let mut comm = std::ptr::null_mut();
        // SAFETY: `comm` is valid for writes; every rank passes the same id
        // and world size and its own rank.
        let created = unsafe { nccl::comm_init_rank(&mut comm, world as i32, id, rank as i32) }
            .map(|_| Arc::new(RawComm::new(comm)))
            .map_err(nccl_error("ncclCommInitRank"));
        // Dropped (destroyed) here if a peer failed.
        let comm = agree(rendezvous, "NCCL set-up", created)?;
        Ok(NcclComm {
            comm,
            stream: stream.clone(),
            rank,
        })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Stops this rank's NCCL work for good (its kernels leave their waits)
    /// and frees the communicator: the way out when a peer died. Only this
    /// rank's side; later calls on it are refused by its owner.
    pub fn abort(&self) -> Result<()> {
        if self
            .comm
            .aborted
            .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            return Ok(());
        }
        // SAFETY: the handle is live (not destroyed: that happens only on
        // the last drop, which skips aborted handles) and aborted once.
        unsafe { nccl::comm_abort(self.comm.handle) }
            .map(|_| ())
            .map_err(nccl_error("ncclCommAbort"))
    }

    /// Makes NCCL connect its peers now, for small and large messages:
    /// NCCL connects them at the first call that needs them (its runtime
    /// connection), which allocates memory and so invalidates a CUDA-graph
    /// capture when that first call is captured (seen on 2 x H200, NCCL
    /// 2.28). All-reduces 4 bytes to 16 MiB on this rank's stream and waits.
    /// Collective.
    pub fn connect(&mut self) -> Result<()> {
        const LONGEST: usize = 1 << 22;
        let scratch = DeviceMemory::zeroed(&self.stream, LONGEST * DType::F32.size())?;
        for count in [1, 1 << 10, 1 << 16, LONGEST] {
            // SAFETY: `scratch` holds LONGEST f32 elements on this rank's
            // device and lives until the stream is synchronised below.
            unsafe { self.all_reduce_raw(DType::F32, scratch.ptr(), scratch.ptr(), count) }?;
        }
        self.stream
            .synchronize()
            .map_err(Error::driver("cuStreamSynchronize"))
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Sums `input` over all ranks into `output` on this rank's stream.
    pub fn all_reduce<T: Element>(
        &mut self,
        input: &impl DevicePtr<T>,
        output: &mut impl DevicePtrMut<T>,
    ) -> Result<()> {
        if input.len() != output.len() {
            return Err(Error::LengthMismatch {
                input: input.len(),
                output: output.len(),
            });
        }
        let stream = self.stream.clone();
        let (send, _read) = input.device_ptr(&stream);
        let (recv, _write) = output.device_ptr_mut(&stream);
        // SAFETY: both pointers address `len` elements of T on this rank's
        // device (they come from device slices of that length).
        unsafe { self.all_reduce_raw(T::DTYPE, send, recv, input.len()) }
    }

    /// # Safety
    /// `send` and `recv` must each address `count` elements of `dtype` on
    /// this communicator's device, alive until the enqueued work completes.
    pub unsafe fn all_reduce_raw(
        &mut self,
        dtype: DType,
        send: u64,
        recv: u64,
        count: usize,
    ) -> Result<()> {
        let stream = self.stream.clone();
        // SAFETY: the caller vouches for the addresses; the stream is this
        // communicator's own.
        unsafe { self.all_reduce_raw_on(&stream, dtype, send, recv, count) }
    }

    /// Like [`all_reduce_raw`](Self::all_reduce_raw), enqueued on `stream`
    /// instead of this communicator's stream.
    ///
    /// # Safety
    /// As for `all_reduce_raw`, and `stream` must be a live stream of this
    /// communicator's context.
    pub unsafe fn all_reduce_raw_on(
        &mut self,
        stream: &CudaStream,
        dtype: DType,
        send: u64,
        recv: u64,
        count: usize,
    ) -> Result<()> {
        nccl::all_reduce(
            send as *const _,
            recv as *mut _,
            count,
            nccl_dtype(dtype),
            nccl_sys::ncclRedOp_t::ncclSum,
            self.comm.handle,
            stream.cu_stream() as _,
        )
        .map(|_| ())
        .map_err(nccl_error("ncclAllReduce"))
    }

    /// Sums block r (`recv_count` elements) of every rank's `send`
    /// (`recv_count` x world size elements) into rank r's `recv`, on
    /// `stream` (`ncclReduceScatter`).
    ///
    /// # Safety
    /// `send` and `recv` must address that many elements of `dtype` on this
    /// communicator's device, alive until the enqueued work completes, and
    /// be apart or in NCCL's in-place layout (`recv` = `send` + rank x
    /// `recv_count`); `stream` must be a live stream of this communicator's
    /// context.
    pub unsafe fn reduce_scatter_raw_on(
        &mut self,
        stream: &CudaStream,
        dtype: DType,
        send: u64,
        recv: u64,
        recv_count: usize,
    ) -> Result<()> {
        nccl::reduce_scatter(
            send as *const _,
            recv as *mut _,
            recv_count,
            nccl_dtype(dtype),
            nccl_sys::ncclRedOp_t::ncclSum,
            self.comm.handle,
            stream.cu_stream() as _,
        )
        .map(|_| ())
        .map_err(nccl_error("ncclReduceScatter"))
    }

    /// Gathers every rank's `send` (`send_count` elements) into block r of
    /// `recv` (`send_count` x world size elements), on `stream`
    /// (`ncclAllGather`).
    ///
    /// # Safety
    /// As for [`reduce_scatter_raw_on`](Self::reduce_scatter_raw_on); the
    /// in-place layout is `send` = `recv` + rank x `send_count`.
    pub unsafe fn all_gather_raw_on(
        &mut self,
        stream: &CudaStream,
        dtype: DType,
        send: u64,
        recv: u64,
        send_count: usize,
    ) -> Result<()> {
        nccl::all_gather(
            send as *const _,
            recv as *mut _,
            send_count,
            nccl_dtype(dtype),
            self.comm.handle,
            stream.cu_stream() as _,
        )
        .map(|_| ())
        .map_err(nccl_error("ncclAllGather"))
    }
}

/// A buffer from `ncclMemAlloc` registered as a symmetric window of one
/// communicator. Creating and dropping it are collective over that
/// communicator's ranks.
pub struct SymmetricBuffer {
    /// Keeps the communicator alive until the window is deregistered.
    comm: Arc<RawComm>,
    ctx: Arc<cudarc::driver::CudaContext>,
    ptr: *mut std::ffi::c_void,
    window: nccl_sys::ncclWindow_t,
    bytes: usize,
}

// SAFETY: plain handles, used by one thread at a time.
unsafe impl Send for SymmetricBuffer {}

impl SymmetricBuffer {
    pub fn new(comm: &NcclComm, bytes: usize) -> Result<Self> {
        comm.stream
            .context()
            .bind_to_thread()
            .map_err(Error::driver("cuCtxSetCurrent"))?;
        let mut ptr = std::ptr::null_mut();
        // SAFETY: `ptr` is valid for writes.
        unsafe { nccl_sys::ncclMemAlloc(&mut ptr, bytes) }
            .result()
            .map_err(nccl_error("ncclMemAlloc"))?;
        let mut window = std::ptr::null_mut();
        // SAFETY: `ptr` holds `bytes` bytes from ncclMemAlloc; `window` is
        // valid for writes.
        let registered = unsafe {
            nccl_sys::ncclCommWindowRegister(
                comm.comm.handle,
                ptr,
                bytes,
                &mut window,
                WIN_COLL_SYMMETRIC,
            )
        }
        .result();
        if let Err(error) = registered {
            // SAFETY: allocated above, freed once.
            let _ = unsafe { nccl_sys::ncclMemFree(ptr) };
            return Err(nccl_error("ncclCommWindowRegister")(error));
        }
        Ok(SymmetricBuffer {
            comm: comm.comm.clone(),
            ctx: comm.stream.context().clone(),
            ptr,
            window,
            bytes,
        })
    }

    pub fn device_address(&self) -> u64 {
        self.ptr as u64
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for SymmetricBuffer {
    fn drop(&mut self) {
        // ncclMemFree releases memory of the current device.
        let _ = self.ctx.bind_to_thread();
        // SAFETY: the window and the memory were created in `new` and are
        // released once, window first.
        unsafe {
            let _ = nccl_sys::ncclCommWindowDeregister(self.comm.handle, self.window);
            let _ = nccl_sys::ncclMemFree(self.ptr);
        }
    }
}
