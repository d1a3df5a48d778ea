//! Device memory that peers may read, host memory the GPU can write, peer
//! access, and pointer queries: the small safe types, over cudarc's result
//! layer and [`crate::driver`], that the rest of the crate builds on.
//!
//! Memory that peers in other processes map comes from `cuMemAlloc`: legacy
//! CUDA IPC refuses pool memory. Memory only this process's ranks read may
//! come from the device's stream-ordered pool instead, whose frees are
//! ordered on a stream: `cuMemFree` waits for the whole context, which for
//! ranks sharing a GPU in one process would wait on a peer's kernel that
//! waits for this rank (docs/design.md, "Ranks sharing a GPU").

use std::marker::PhantomData;
use std::sync::Arc;

use cudarc::driver::result as cuda;
use cudarc::driver::sys;
use cudarc::driver::{CudaContext, CudaStream, DevicePtr, DevicePtrMut, DeviceSlice, SyncOnDrop};

use crate::driver;
use crate::error::{Error, Result};
use crate::path::Reach;
use crate::rendezvous::u64_at;

/// Loads libcuda and initialises it; the first thing every entry point does,
/// so that a missing driver is an error rather than a panic inside cudarc.
pub fn ensure_driver() -> Result<()> {
    // SAFETY: only tries to dlopen the library by its candidate names.
    if !unsafe { sys::is_culib_present() } {
        return Err(Error::DriverNotFound);
    }
    cudarc::driver::result::init().map_err(Error::driver("cuInit"))
}

/// Number of visible devices (an error when there is none).
pub fn device_count() -> Result<usize> {
    ensure_driver()?;
    let count = cudarc::driver::result::device::get_count()
        .map_err(Error::driver("cuDeviceGetCount"))? as usize;
    if count == 0 {
        return Err(Error::NoDevice);
    }
    Ok(count)
}

/// The granularity at which CUDA IPC maps memory.
const IPC_PAGE: usize = 2 << 20;

/// Where an allocation came from, which says how it is freed.
enum Backing {
    /// `cuMemAlloc`: exportable through CUDA IPC; `cuMemFree` on drop.
    Legacy,
    /// The device's default pool: `cuMemFreeAsync` on this stream on drop.
    Pool(Arc<CudaStream>),
}

/// A device allocation, freed on drop. Never wraps memory opened from a
/// peer: that is closed, not freed.
pub(crate) struct DeviceMemory {
    ctx: Arc<CudaContext>,
    ptr: u64,
    bytes: usize,
    backing: Backing,
}

impl DeviceMemory {
    /// Allocates `bytes` (at least one) and zeroes them in `stream`'s order.
    ///
    /// The zeroing must be ordered with the stream that later uses the
    /// memory: a plain `cuMemsetD8` runs on the legacy stream, which
    /// cudarc's non-blocking streams do not wait for.
    pub fn zeroed(stream: &CudaStream, bytes: usize) -> Result<Self> {
        let ctx = stream.context();
        ctx.bind_to_thread()
            .map_err(Error::driver("cuCtxSetCurrent"))?;
        // The driver packs small allocations into shared 2 MiB pages, and
        // CUDA IPC maps whole pages: a peer process that opened one
        // allocation of a page cannot open another (ALREADY_MAPPED). Whole
        // pages keep every allocation separately mappable.
        let reserved = bytes.max(1).div_ceil(IPC_PAGE) * IPC_PAGE;
        // SAFETY: the context is current; the memory is zeroed below before
        // anything reads it.
        let ptr = unsafe { cuda::malloc_sync(reserved) }.map_err(Error::driver("cuMemAlloc"))?;
        let memory = DeviceMemory {
            ctx: ctx.clone(),
            ptr,
            bytes,
            backing: Backing::Legacy,
        };
        memory.zero(stream)?;
        Ok(memory)
    }

    /// Allocates `bytes` (at least one) from the device's default pool in
    /// `stream`'s order, zeroed; freed in the same stream's order. Not
    /// exportable through CUDA IPC. Falls back to [`zeroed`](Self::zeroed)
    /// on devices without pools.
    pub fn zeroed_in_pool(stream: &Arc<CudaStream>, bytes: usize) -> Result<Self> {
        let ctx = stream.context();
        if !ctx.has_async_alloc() {
            return Self::zeroed(stream, bytes);
        }
        ctx.bind_to_thread()
            .map_err(Error::driver("cuCtxSetCurrent"))?;
        // SAFETY: the stream belongs to the current context; the memory is
        // zeroed below, in the same stream's order, before anything reads it.
        let ptr = unsafe { cuda::malloc_async(stream.cu_stream(), bytes.max(1)) }
            .map_err(Error::driver("cuMemAllocAsync"))?;
        let memory = DeviceMemory {
            ctx: ctx.clone(),
            ptr,
            bytes,
            backing: Backing::Pool(stream.clone()),
        };
        memory.zero(stream)?;
        Ok(memory)
    }

    fn zero(&self, stream: &CudaStream) -> Result<()> {
        // SAFETY: the allocation holds at least `bytes` bytes and lives
        // until its free, which is ordered after this.
        unsafe { cuda::memset_d8_async(self.ptr, 0, self.bytes, stream.cu_stream()) }
            .map_err(Error::driver("cuMemsetD8Async"))
    }

    /// Sets every 32-bit word from byte `from` (a multiple of 4) to the
    /// end to `value`, in `stream`'s order.
    pub fn fill_words(&self, stream: &CudaStream, from: usize, value: u32) -> Result<()> {
        let words = self.bytes.saturating_sub(from) / 4;
        // SAFETY: `words` 32-bit words from `from` lie inside the allocation,
        // which lives until its free, ordered after this.
        unsafe {
            driver::memset_d32_async(self.ptr + from as u64, value, words, stream.cu_stream())
        }
        .map_err(Error::driver("cuMemsetD32Async"))
    }

    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for DeviceMemory {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_err() {
            return;
        }
        match &self.backing {
            // SAFETY: `ptr` came from cuMemAlloc and is freed exactly once;
            // cuMemFree waits for work still using it.
            Backing::Legacy => {
                let _ = unsafe { cuda::free_sync(self.ptr) };
            }
            // SAFETY: `ptr` came from cuMemAllocAsync and is freed exactly
            // once, after the work enqueued on its stream so far.
            Backing::Pool(stream) => {
                let _ = unsafe { cuda::free_async(self.ptr, stream.cu_stream()) };
            }
        }
    }
}

/// A device buffer of `T` in memory peers can read (and that CUDA IPC can
/// export), usable wherever cudarc takes a device slice.
pub struct DeviceBuffer<T> {
    memory: DeviceMemory,
    len: usize,
    stream: Arc<CudaStream>,
    marker: PhantomData<T>,
}

impl<T> DeviceBuffer<T> {
    /// A zeroed buffer of `len` elements whose copies go through `stream`,
    /// from `cuMemAlloc`: peers in other processes can map it.
    pub fn zeroed(stream: &Arc<CudaStream>, len: usize) -> Result<Self> {
        let bytes = Self::bytes_of(len)?;
        Self::wrap(DeviceMemory::zeroed(stream, bytes)?, stream, len)
    }

    /// Like [`zeroed`](Self::zeroed), but from the device's stream-ordered
    /// pool and freed in `stream`'s order: for buffers that only ranks of
    /// this process read.
    pub(crate) fn zeroed_in_pool(stream: &Arc<CudaStream>, len: usize) -> Result<Self> {
        let bytes = Self::bytes_of(len)?;
        Self::wrap(DeviceMemory::zeroed_in_pool(stream, bytes)?, stream, len)
    }

    fn bytes_of(len: usize) -> Result<usize> {
        len.checked_mul(std::mem::size_of::<T>())
            .ok_or_else(|| Error::InvalidConfig(format!("{len} elements overflow a byte count")))
    }

    fn wrap(memory: DeviceMemory, stream: &Arc<CudaStream>, len: usize) -> Result<Self> {
        Ok(DeviceBuffer {
            memory,
            len,
            stream: stream.clone(),
            marker: PhantomData,
        })
    }

    /// The device address of the first element.
    pub fn device_address(&self) -> u64 {
        self.memory.ptr()
    }

    /// Elements `range` of the buffer, for reading (an input).
    pub fn slice(&self, range: std::ops::Range<usize>) -> Result<DeviceView<'_, T>> {
        let (ptr, len) = self.sub_range(range)?;
        Ok(DeviceView {
            ptr,
            len,
            stream: &self.stream,
            marker: PhantomData,
        })
    }

    /// Elements `range` of the buffer, for writing (an output, or in place).
    pub fn slice_mut(&mut self, range: std::ops::Range<usize>) -> Result<DeviceViewMut<'_, T>> {
        let (ptr, len) = self.sub_range(range)?;
        Ok(DeviceViewMut {
            ptr,
            len,
            stream: &self.stream,
            marker: PhantomData,
        })
    }

    fn sub_range(&self, range: std::ops::Range<usize>) -> Result<(u64, usize)> {
        if range.start > range.end || range.end > self.len {
            return Err(Error::InvalidConfig(format!(
                "elements {range:?} are not inside a buffer of {}",
                self.len
            )));
        }
        let offset = (range.start * std::mem::size_of::<T>()) as u64;
        Ok((self.memory.ptr() + offset, range.len()))
    }
}

/// A view of part of a [`DeviceBuffer`], for reading.
pub struct DeviceView<'a, T> {
    ptr: u64,
    len: usize,
    stream: &'a Arc<CudaStream>,
    marker: PhantomData<&'a T>,
}

/// A view of part of a [`DeviceBuffer`], for writing.
pub struct DeviceViewMut<'a, T> {
    ptr: u64,
    len: usize,
    stream: &'a Arc<CudaStream>,
    marker: PhantomData<&'a mut T>,
}

/// Device-slice traits for a type that is a pointer and a length; ordering
/// is the caller's, as for [`DeviceBuffer`].
macro_rules! device_slice {
    ($type:ident, $($mut:ident)?) => {
        impl<T> DeviceSlice<T> for $type<'_, T> {
            fn len(&self) -> usize {
                self.len
            }
            fn stream(&self) -> &Arc<CudaStream> {
                self.stream
            }
        }

        impl<T> DevicePtr<T> for $type<'_, T> {
            fn device_ptr<'a>(&'a self, _stream: &'a CudaStream) -> (sys::CUdeviceptr, SyncOnDrop<'a>) {
                (self.ptr, SyncOnDrop::Record(None))
            }
        }

        $(
            impl<T> $mut<T> for $type<'_, T> {
                fn device_ptr_mut<'a>(
                    &'a mut self,
                    _stream: &'a CudaStream,
                ) -> (sys::CUdeviceptr, SyncOnDrop<'a>) {
                    (self.ptr, SyncOnDrop::Record(None))
                }
            }
        )?
    };
}

device_slice!(DeviceView,);
device_slice!(DeviceViewMut, DevicePtrMut);

impl<T> DeviceSlice<T> for DeviceBuffer<T> {
    fn len(&self) -> usize {
        self.len
    }
    fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
}

impl<T> DevicePtr<T> for DeviceBuffer<T> {
    fn device_ptr<'a>(&'a self, _stream: &'a CudaStream) -> (sys::CUdeviceptr, SyncOnDrop<'a>) {
        // Ordering is the caller's: streams are not tracked for this memory.
        (self.memory.ptr(), SyncOnDrop::Record(None))
    }
}

impl<T> DevicePtrMut<T> for DeviceBuffer<T> {
    fn device_ptr_mut<'a>(
        &'a mut self,
        _stream: &'a CudaStream,
    ) -> (sys::CUdeviceptr, SyncOnDrop<'a>) {
        (self.memory.ptr(), SyncOnDrop::Record(None))
    }
}

/// Copies `src` to device address `dst` in `stream`'s order and waits for
/// it, so that neither side can race with work on other streams.
///
/// # Safety
/// `dst` must address at least `size_of_val(src)` writable bytes on the
/// stream's device.
pub unsafe fn copy_to_device<T: Copy>(stream: &CudaStream, dst: u64, src: &[T]) -> Result<()> {
    stream
        .context()
        .bind_to_thread()
        .map_err(Error::driver("cuCtxSetCurrent"))?;
    // SAFETY: the caller vouches for `dst`; `src` outlives the copy (the
    // stream is synchronised below).
    unsafe { cuda::memcpy_htod_async(dst, src, stream.cu_stream()) }
        .map_err(Error::driver("cuMemcpyHtoDAsync"))?;
    stream
        .synchronize()
        .map_err(Error::driver("cuStreamSynchronize"))
}

/// Copies device address `src` into `dst` in `stream`'s order and waits.
///
/// # Safety
/// `src` must address at least `size_of_val(dst)` readable bytes.
pub unsafe fn copy_to_host<T: Copy>(stream: &CudaStream, dst: &mut [T], src: u64) -> Result<()> {
    stream
        .context()
        .bind_to_thread()
        .map_err(Error::driver("cuCtxSetCurrent"))?;
    // SAFETY: the caller vouches for `src`; `dst` outlives the copy (the
    // stream is synchronised below).
    unsafe { cuda::memcpy_dtoh_async(dst, src, stream.cu_stream()) }
        .map_err(Error::driver("cuMemcpyDtoHAsync"))?;
    stream
        .synchronize()
        .map_err(Error::driver("cuStreamSynchronize"))
}

/// A value of `T` in page-locked host memory that the GPU writes directly;
/// the host reads it without synchronising (kernels' fault reports).
pub(crate) struct HostMapped<T: Copy + Default> {
    ctx: Arc<CudaContext>,
    host: *mut T,
    device: u64,
}

// SAFETY: the pointer is owned by this value and only read or written
// through volatile accesses of a `Copy` type.
unsafe impl<T: Copy + Default> Send for HostMapped<T> {}

impl<T: Copy + Default> HostMapped<T> {
    pub fn new(ctx: &Arc<CudaContext>) -> Result<Self> {
        ctx.bind_to_thread()
            .map_err(Error::driver("cuCtxSetCurrent"))?;
        let flags = sys::CU_MEMHOSTALLOC_DEVICEMAP | sys::CU_MEMHOSTALLOC_PORTABLE;
        // SAFETY: the context is current; the memory is written below
        // before anything reads it.
        let host = unsafe { cuda::malloc_host(std::mem::size_of::<T>(), flags) }
            .map_err(Error::driver("cuMemHostAlloc"))?;
        let mut mapped = HostMapped {
            ctx: ctx.clone(),
            host: host as *mut T,
            device: 0,
        };
        mapped.write(T::default());
        // SAFETY: `host` is a mapped allocation from cuMemHostAlloc above.
        mapped.device = unsafe { driver::host_device_pointer(host) }
            .map_err(Error::driver("cuMemHostGetDevicePointer"))?;
        Ok(mapped)
    }

    pub fn device_ptr(&self) -> u64 {
        self.device
    }

    pub fn read(&self) -> T {
        // SAFETY: `host` points to a live, aligned `T` (page-locked memory);
        // volatile because the GPU writes it behind the compiler's back.
        unsafe { std::ptr::read_volatile(self.host) }
    }

    pub fn write(&self, value: T) {
        // SAFETY: as in `read`.
        unsafe { std::ptr::write_volatile(self.host, value) }
    }
}

impl<T: Copy + Default> Drop for HostMapped<T> {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: allocated by cuMemHostAlloc and freed exactly once.
            let _ = unsafe { cuda::free_host(self.host as *mut _) };
        }
    }
}

/// Whether `from` can read and write `to`'s memory directly.
pub fn can_access_peer(from: &CudaContext, to: &CudaContext) -> Result<bool> {
    if from.cu_device() == to.cu_device() {
        return Ok(true);
    }
    driver::can_access_peer(from.cu_device(), to.cu_device())
        .map_err(Error::driver("cuDeviceCanAccessPeer"))
}

/// A GPU's uuid as two words: how ranks tell GPUs apart.
pub(crate) fn uuid_words(uuid: &sys::CUuuid) -> [u64; 2] {
    let bytes: Vec<u8> = uuid.bytes.iter().map(|&b| b as u8).collect();
    [u64_at(&bytes), u64_at(&bytes[8..])]
}

/// The uuid of `ctx`'s GPU as two words.
pub fn gpu_uuid(ctx: &CudaContext) -> Result<[u64; 2]> {
    let uuid = ctx.uuid().map_err(Error::driver("cuDeviceGetUuid"))?;
    Ok(uuid_words(&uuid))
}

/// Whether `ctx`'s GPU reaches the GPU whose uuid is `peer` directly: the
/// same GPU, or a visible one with peer access.
pub(crate) fn reach(ctx: &CudaContext, peer: [u64; 2]) -> Result<Reach> {
    if gpu_uuid(ctx)? == peer {
        return Ok(Reach::Direct);
    }
    for ordinal in 0..device_count()? {
        let device = cuda::device::get(ordinal as i32).map_err(Error::driver("cuDeviceGet"))?;
        let uuid = cuda::device::get_uuid(device).map_err(Error::driver("cuDeviceGetUuid"))?;
        if uuid_words(&uuid) == peer {
            let access = driver::can_access_peer(ctx.cu_device(), device)
                .map_err(Error::driver("cuDeviceCanAccessPeer"))?;
            return Ok(if access {
                Reach::Direct
            } else {
                Reach::NoPeerAccess
            });
        }
    }
    Ok(Reach::NotVisible)
}

/// Lets `from` map `to`'s memory (legacy allocations and the default pool).
/// Enabling twice is not an error.
pub(crate) fn enable_peer_access(from: &CudaContext, to: &CudaContext) -> Result<()> {
    if from.cu_device() == to.cu_device() {
        return Ok(());
    }
    if !can_access_peer(from, to)? {
        return Err(Error::NoPeerAccess {
            from: from.ordinal(),
            to: to.ordinal(),
        });
    }
    from.bind_to_thread()
        .map_err(Error::driver("cuCtxSetCurrent"))?;
    // SAFETY: `to` is a live context (we hold it); `from` is current.
    unsafe { driver::enable_peer_access(to.cu_ctx()) }
        .map_err(Error::driver("cuCtxEnablePeerAccess"))?;
    // Memory from `to`'s default stream-ordered pool (what cudarc allocates)
    // needs its own grant.
    let pool = default_pool(to)?;
    // SAFETY: `pool` is `to`'s default pool, which lives as long as `to`.
    unsafe { driver::mem_pool_grant_access(pool, from.cu_device()) }
        .map_err(Error::driver("cuMemPoolSetAccess"))
}

/// The default stream-ordered pool of `ctx`'s device.
fn default_pool(ctx: &CudaContext) -> Result<sys::CUmemoryPool> {
    // SAFETY: the device handle comes from a live context.
    unsafe { cuda::device::get_default_mem_pool(ctx.cu_device()) }
        .map_err(Error::driver("cuDeviceGetDefaultMemPool"))
}

/// Makes the default pool of `ctx`'s device safe for ranks that share the
/// context, so that no rank's pool call waits for a peer's kernel, which may
/// itself wait for this rank (docs/design.md, "Ranks sharing a GPU"):
/// - memory freed on one stream is not handed to an allocation on another
///   by making the second wait for the first (reuse after the free has
///   completed, or after an explicit event wait, stays allowed);
/// - freed memory is kept for reuse instead of being given back to the OS
///   at the next synchronisation, which would unmap it under running work.
pub(crate) fn prepare_shared_pool(ctx: &CudaContext) -> Result<()> {
    if !ctx.has_async_alloc() {
        return Ok(());
    }
    let pool = default_pool(ctx)?;
    // SAFETY: both attributes take the types given (int, cuuint64_t).
    unsafe {
        set_pool_attribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_REUSE_ALLOW_INTERNAL_DEPENDENCIES,
            0i32,
        )?;
        set_pool_attribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            u64::MAX,
        )
    }
}

/// # Safety
/// `pool` must be live and `value` of the type the driver documents for
/// `attribute`.
unsafe fn set_pool_attribute<T>(
    pool: sys::CUmemoryPool,
    attribute: sys::CUmemPool_attribute,
    mut value: T,
) -> Result<()> {
    // SAFETY: the caller vouches for the pool and the value's type; the
    // value lives across the call.
    unsafe { cuda::mem_pool::set_attribute(pool, attribute, &mut value as *mut T as *mut _) }
        .map_err(Error::driver("cuMemPoolSetAttribute"))
}

/// Pointer attribute `which` of `ptr`.
///
/// # Safety
/// As for [`driver::pointer_attribute`]: `T` is what the driver writes.
unsafe fn pointer_attribute<T: Copy + Default>(
    ptr: u64,
    which: sys::CUpointer_attribute,
) -> Result<T> {
    // SAFETY: the caller vouches for `T`.
    unsafe { driver::pointer_attribute(ptr, which) }.map_err(Error::driver("cuPointerGetAttribute"))
}

/// What the driver knows about a device address.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PointerInfo {
    pub device_ordinal: i32,
    /// Start and size of the allocation that contains the address.
    pub base: u64,
    pub size: usize,
    pub is_device_memory: bool,
    /// Whether `cuIpcGetMemHandle` can export it (plain `cuMemAlloc`).
    pub legacy_ipc_capable: bool,
}

impl PointerInfo {
    pub fn query(ptr: u64) -> Result<PointerInfo> {
        use sys::CUpointer_attribute::*;
        // SAFETY: each call reads into the type the driver writes for its
        // attribute: u32 for enums and flags, i32 for the ordinal, u64 for
        // the start address, usize for the size.
        let memory_type: u32 =
            unsafe { driver::pointer_attribute(ptr, CU_POINTER_ATTRIBUTE_MEMORY_TYPE) }.map_err(
                |_| Error::NotShareable {
                    ptr,
                    reason: "the driver does not know this address: it is not CUDA memory".into(),
                },
            )?;
        // SAFETY: as above.
        let (managed, ordinal, base, size, ipc_capable) = unsafe {
            (
                pointer_attribute::<u32>(ptr, CU_POINTER_ATTRIBUTE_IS_MANAGED)?,
                pointer_attribute::<i32>(ptr, CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL)?,
                pointer_attribute::<u64>(ptr, CU_POINTER_ATTRIBUTE_RANGE_START_ADDR)?,
                pointer_attribute::<usize>(ptr, CU_POINTER_ATTRIBUTE_RANGE_SIZE)?,
                pointer_attribute::<u32>(ptr, CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE)?,
            )
        };
        Ok(PointerInfo {
            legacy_ipc_capable: ipc_capable != 0,
            device_ordinal: ordinal,
            base,
            size,
            is_device_memory: memory_type == sys::CUmemorytype::CU_MEMORYTYPE_DEVICE as u32
                && managed == 0,
        })
    }

    /// Checks that peers of a rank on `ordinal` can read `bytes` at `ptr`.
    pub fn shareable(ptr: u64, bytes: usize, ordinal: usize) -> Result<PointerInfo> {
        let info = PointerInfo::query(ptr)?;
        let reason = if !info.is_device_memory {
            Some("it is host or managed memory; use device memory".to_string())
        } else if info.device_ordinal != ordinal as i32 {
            Some(format!(
                "it lives on device {} but this rank uses device {ordinal}",
                info.device_ordinal
            ))
        } else if ptr + bytes as u64 > info.base + info.size as u64 {
            Some(format!(
                "{bytes} bytes from it overrun its allocation ({} bytes from {:#x})",
                info.size, info.base
            ))
        } else {
            None
        };
        match reason {
            Some(reason) => Err(Error::NotShareable { ptr, reason }),
            None => Ok(info),
        }
    }
}
