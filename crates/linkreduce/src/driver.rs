//! The CUDA driver calls that cudarc's result layer lacks: CUDA IPC, peer
//! access, pool access, pointer attributes, host-mapped pointers, 32-bit
//! memsets, programmatic launches, and the device facts `linkreduce info`
//! reports.
//!
//! Each is a thin wrapper in the manner of `cudarc::driver::result`: it
//! turns the driver's status into a [`DriverError`] and states its contract
//! under `# Safety` where the caller must uphold one. Everything cudarc
//! already wraps is called through cudarc, not from here, so that raw
//! driver calls live in this one file.

use std::ffi::{c_char, c_void, CStr};
use std::mem::MaybeUninit;

use cudarc::driver::result::DriverError;
use cudarc::driver::sys;

/// What a call here returns.
pub type DriverResult<T> = Result<T, DriverError>;

/// Sets `words` 32-bit words from `dst` to `value` in `stream`'s order.
///
/// # Safety
/// `dst` must address `4 * words` writable bytes on the stream's device
/// that stay allocated until the stream reaches the operation.
pub(crate) unsafe fn memset_d32_async(
    dst: sys::CUdeviceptr,
    value: u32,
    words: usize,
    stream: sys::CUstream,
) -> DriverResult<()> {
    // SAFETY: the caller vouches for the range and its lifetime.
    unsafe { sys::cuMemsetD32Async(dst, value, words, stream) }.result()
}

/// The device address of page-locked host memory mapped into the device.
///
/// # Safety
/// `host` must come from `cuMemHostAlloc` with `CU_MEMHOSTALLOC_DEVICEMAP`
/// and still be allocated.
pub(crate) unsafe fn host_device_pointer(host: *mut c_void) -> DriverResult<sys::CUdeviceptr> {
    let mut device = MaybeUninit::uninit();
    // SAFETY: `device` is valid for writes; flags must be 0; the caller
    // vouches for `host`.
    unsafe { sys::cuMemHostGetDevicePointer_v2(device.as_mut_ptr(), host, 0) }.result()?;
    // SAFETY: written by the successful call above.
    Ok(unsafe { device.assume_init() })
}

/// Whether device `from` can read and write device `to`'s memory.
pub(crate) fn can_access_peer(from: sys::CUdevice, to: sys::CUdevice) -> DriverResult<bool> {
    let mut can = 0;
    // SAFETY: `can` is valid for writes; the driver checks the handles.
    unsafe { sys::cuDeviceCanAccessPeer(&mut can, from, to) }.result()?;
    Ok(can != 0)
}

/// Lets the current context map `peer`'s legacy allocations. Enabling twice
/// is not an error.
///
/// # Safety
/// `peer` must be a live context, and a context must be current.
pub(crate) unsafe fn enable_peer_access(peer: sys::CUcontext) -> DriverResult<()> {
    // SAFETY: the caller vouches for `peer`; flags must be 0.
    match unsafe { sys::cuCtxEnablePeerAccess(peer, 0) } {
        sys::CUresult::CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED => Ok(()),
        status => status.result(),
    }
}

/// Grants `device` read-write access to the memory of `pool`.
///
/// # Safety
/// `pool` must be a live memory pool.
pub(crate) unsafe fn mem_pool_grant_access(
    pool: sys::CUmemoryPool,
    device: sys::CUdevice,
) -> DriverResult<()> {
    let access = sys::CUmemAccessDesc {
        location: sys::CUmemLocation {
            type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE,
            id: device,
        },
        flags: sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
    };
    // SAFETY: one descriptor is passed; the caller vouches for `pool`.
    unsafe { sys::cuMemPoolSetAccess(pool, &access, 1) }.result()
}

/// Pointer attribute `attribute` of `ptr`.
///
/// # Safety
/// `T` must be the type the driver writes for `attribute` (`u32` for enums
/// and flags, `i32` for ordinals, `u64` for addresses, `usize` for sizes).
pub(crate) unsafe fn pointer_attribute<T: Copy + Default>(
    ptr: sys::CUdeviceptr,
    attribute: sys::CUpointer_attribute,
) -> DriverResult<T> {
    let mut value = T::default();
    // SAFETY: `value` is valid for writes of a `T`, which the caller
    // vouches is what the driver writes; the driver checks `ptr`.
    unsafe { sys::cuPointerGetAttribute(&mut value as *mut T as *mut c_void, attribute, ptr) }
        .result()?;
    Ok(value)
}

/// A CUDA IPC handle for the allocation that starts at `base`.
pub(crate) fn ipc_get_mem_handle(base: sys::CUdeviceptr) -> DriverResult<sys::CUipcMemHandle> {
    let mut handle = MaybeUninit::uninit();
    // SAFETY: `handle` is valid for writes; the driver checks `base`.
    unsafe { sys::cuIpcGetMemHandle(handle.as_mut_ptr(), base) }.result()?;
    // SAFETY: written by the successful call above.
    Ok(unsafe { handle.assume_init() })
}

/// Maps another process's exported allocation into the current context and
/// returns its address here (to be closed with [`ipc_close_mem_handle`]).
/// A handle that names no live allocation makes the call fail.
pub(crate) fn ipc_open_mem_handle(handle: sys::CUipcMemHandle) -> DriverResult<sys::CUdeviceptr> {
    let mut base = MaybeUninit::uninit();
    let flags = sys::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32;
    // SAFETY: `base` is valid for writes; the driver checks the handle.
    unsafe { sys::cuIpcOpenMemHandle_v2(base.as_mut_ptr(), handle, flags) }.result()?;
    // SAFETY: written by the successful call above.
    Ok(unsafe { base.assume_init() })
}

/// Unmaps an allocation mapped by [`ipc_open_mem_handle`].
///
/// # Safety
/// `base` must come from `ipc_open_mem_handle` in the current context, be
/// closed once, and not be used afterwards.
pub(crate) unsafe fn ipc_close_mem_handle(base: sys::CUdeviceptr) -> DriverResult<()> {
    // SAFETY: the caller vouches for `base`.
    unsafe { sys::cuIpcCloseMemHandle(base) }.result()
}

/// Launches `function` with its one parameter `arg` as a programmatic
/// dependent launch (`CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION`):
/// the grid may start before the kernel ahead of it on `stream` has ended,
/// so the kernel itself waits for that one (`griddepcontrol.wait`) before
/// it touches anything the other may write. cudarc's launch builder has no
/// launch attributes, hence this call.
///
/// # Safety
/// `function` must take exactly one parameter, laid out as `T`; the memory
/// it touches must stay valid until `stream` reaches it; it must wait for
/// the previous kernel as above; the current context must be `stream`'s.
pub(crate) unsafe fn launch_programmatic<T>(
    function: sys::CUfunction,
    stream: sys::CUstream,
    (blocks, threads): (u32, u32),
    arg: &T,
) -> DriverResult<()> {
    let mut value = sys::CUlaunchAttributeValue { pad: [0; 64] };
    value.programmaticStreamSerializationAllowed = 1;
    let mut attribute = sys::CUlaunchAttribute {
        id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
        pad: [0; 4],
        value,
    };
    let config = sys::CUlaunchConfig {
        gridDimX: blocks,
        gridDimY: 1,
        gridDimZ: 1,
        blockDimX: threads,
        blockDimY: 1,
        blockDimZ: 1,
        sharedMemBytes: 0,
        hStream: stream,
        attrs: &mut attribute,
        numAttrs: 1,
    };
    let mut params = [arg as *const T as *mut c_void];
    // SAFETY: `config`, the attribute it points to and `params` live until
    // the call returns, and the driver copies the parameter's bytes at
    // launch, so `arg` need not outlive it; the caller vouches for the
    // function, its parameter, its memory and the context.
    unsafe { sys::cuLaunchKernelEx(&config, function, params.as_mut_ptr(), std::ptr::null_mut()) }
        .result()
}

/// The CUDA version the driver supports, as 1000 * major + 10 * minor.
pub fn driver_version() -> DriverResult<i32> {
    let mut version = 0;
    // SAFETY: `version` is valid for writes.
    unsafe { sys::cuDriverGetVersion(&mut version) }.result()?;
    Ok(version)
}

/// A fact about the link from device `from` to device `to`.
pub fn p2p_attribute(
    attribute: sys::CUdevice_P2PAttribute,
    from: sys::CUdevice,
    to: sys::CUdevice,
) -> DriverResult<i32> {
    let mut value = 0;
    // SAFETY: `value` is valid for writes; the driver checks the handles.
    unsafe { sys::cuDeviceGetP2PAttribute(&mut value, attribute, from, to) }.result()?;
    Ok(value)
}

/// The device's PCI bus id, as `domain:bus:device.function`.
pub fn pci_bus_id(device: sys::CUdevice) -> DriverResult<String> {
    // The driver writes at most 13 characters and a NUL.
    let mut text = [0 as c_char; 32];
    // SAFETY: `text` is valid for writes of its length.
    unsafe { sys::cuDeviceGetPCIBusId(text.as_mut_ptr(), text.len() as i32, device) }.result()?;
    // SAFETY: the driver NUL-terminates within the length it was given.
    let id = unsafe { CStr::from_ptr(text.as_ptr()) };
    Ok(id.to_string_lossy().into_owned())
}
