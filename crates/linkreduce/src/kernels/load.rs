//! Loading the compiled kernels into a device's context, once per process.
//!
//! A device's module is kept for the life of the process rather than per
//! communicator: with the driver's lazy loading, unloading a module whose
//! functions were used leaves about 90 KiB of device memory behind each
//! time (measured on H100, driver 580), so loading per communicator leaked
//! memory across create/destroy cycles. Loading once is also faster.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::{CUfunction_attribute, CUshared_carveout};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule};

use super::{compile_cubin, kernel_name, Arch, CheckKernel, Program, THREADS_PER_BLOCK};
use crate::algorithm::Algorithm;
use crate::dtype::DType;
use crate::error::{Error, Result};

/// Every algorithm and dtype of one world size, in one context.
pub(crate) type Kernels = HashMap<(Algorithm, DType), CudaFunction>;

/// The kernels of [`Program::Check`] in one context.
pub(crate) type CheckKernels = HashMap<(CheckKernel, DType), CudaFunction>;

/// This world size's kernels in `ctx` (a device's primary context), looked
/// up once per process in the device's module, itself loaded once.
pub(crate) fn load_kernels(ctx: &Arc<CudaContext>, world_size: usize) -> Result<Arc<Kernels>> {
    static LOADED: Cache<(Algorithm, DType)> = Mutex::new(BTreeMap::new());
    let names = Algorithm::ALL.into_iter().flat_map(|algorithm| {
        DType::ALL.map(|dtype| {
            (
                (algorithm, dtype),
                kernel_name(algorithm, dtype, world_size),
            )
        })
    });
    load_once(&LOADED, ctx, world_size, names, StreamsPeers::Yes)
}

/// Kernels of one world size by (device ordinal, world size).
pub(super) type Cache<K> = Mutex<BTreeMap<(usize, usize), Arc<HashMap<K, CudaFunction>>>>;

/// Whether kernels stream peers' memory, so that L1 must not shrink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum StreamsPeers {
    Yes,
    No,
}

/// The functions `names` gives from the all-reduce program in `ctx`, kept
/// in `cache` for the process.
pub(super) fn load_once<K: std::hash::Hash + Eq>(
    cache: &Cache<K>,
    ctx: &Arc<CudaContext>,
    world_size: usize,
    names: impl Iterator<Item = (K, String)>,
    streams_peers: StreamsPeers,
) -> Result<Arc<HashMap<K, CudaFunction>>> {
    let key = (ctx.ordinal(), world_size);
    if let Some(kernels) = lock(cache).get(&key) {
        return Ok(kernels.clone());
    }
    let kernels = functions(ctx, Program::AllReduce, names)?;
    // Such kernels stream peers' memory through L1, which holds the data
    // of loads in flight; their few bytes of static shared memory (peers'
    // input pointers) should not let the driver trade L1 for shared
    // memory. Every published figure was measured with this preference;
    // its own effect was never isolated (the 2.6x slowdown once blamed on
    // it came from launches cut at a 1 MiB staging size:
    // bench/results/2026-11-26-h200x2/regression-fixed).
    // A preference only: a driver that refuses it still runs the kernels.
    for function in kernels
        .values()
        .filter(|_| streams_peers == StreamsPeers::Yes)
    {
        if let Err(error) = function.set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT,
            CUshared_carveout::CU_SHAREDMEM_CARVEOUT_MAX_L1 as i32,
        ) {
            tracing::warn!(%error, "the driver refused a preference for L1 over shared memory");
        }
    }
    Ok(lock(cache).entry(key).or_insert(Arc::new(kernels)).clone())
}

/// What one compiled kernel needs from an SM, as the driver reports it.
#[derive(Debug, Clone)]
pub struct KernelResources {
    pub algorithm: Algorithm,
    pub dtype: DType,
    pub registers: i32,
    pub static_shared_bytes: i32,
    /// Local memory (spills, arrays indexed at run time), per thread.
    pub local_bytes: i32,
    /// Blocks of [`THREADS_PER_BLOCK`] threads one SM holds at once.
    pub blocks_per_sm: u32,
}

/// Resources of this world size's all-reduce kernels on `ctx`'s device:
/// what decides how many blocks run at once, for `linkreduce info`.
pub fn kernel_resources(ctx: &Arc<CudaContext>, world_size: usize) -> Result<Vec<KernelResources>> {
    let kernels = load_kernels(ctx, world_size)?;
    let attribute = |function: &CudaFunction, attribute| {
        function
            .get_attribute(attribute)
            .map_err(Error::driver("cuFuncGetAttribute"))
    };
    let mut report = kernels
        .iter()
        .map(|(&(algorithm, dtype), function)| {
            Ok(KernelResources {
                algorithm,
                dtype,
                registers: attribute(function, CUfunction_attribute::CU_FUNC_ATTRIBUTE_NUM_REGS)?,
                static_shared_bytes: attribute(
                    function,
                    CUfunction_attribute::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES,
                )?,
                local_bytes: attribute(
                    function,
                    CUfunction_attribute::CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES,
                )?,
                blocks_per_sm: function
                    .occupancy_max_active_blocks_per_multiprocessor(THREADS_PER_BLOCK, 0, None)
                    .map_err(Error::driver("cuOccupancyMaxActiveBlocksPerMultiprocessor"))?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    report.sort_by_key(|k| (k.algorithm as u8, k.dtype as u8));
    Ok(report)
}

/// The check kernels in `ctx`, loaded once per process and device.
pub(crate) fn load_check_kernels(ctx: &Arc<CudaContext>) -> Result<Arc<CheckKernels>> {
    static LOADED: Mutex<BTreeMap<usize, Arc<CheckKernels>>> = Mutex::new(BTreeMap::new());
    if let Some(kernels) = lock(&LOADED).get(&ctx.ordinal()) {
        return Ok(kernels.clone());
    }
    let names = CheckKernel::ALL
        .into_iter()
        .flat_map(|kind| DType::ALL.map(|dtype| ((kind, dtype), kind.symbol(dtype))));
    let kernels = functions(ctx, Program::Check, names)?;
    Ok(lock(&LOADED)
        .entry(ctx.ordinal())
        .or_insert(Arc::new(kernels))
        .clone())
}

/// The functions `names` gives (key, symbol) from `program`'s module.
pub(super) fn functions<K: std::hash::Hash + Eq>(
    ctx: &Arc<CudaContext>,
    program: Program,
    names: impl Iterator<Item = (K, String)>,
) -> Result<HashMap<K, CudaFunction>> {
    let module = module_for(ctx, program)?;
    names
        .map(|(key, name)| {
            module
                .load_function(&name)
                .map(|function| (key, function))
                .map_err(Error::driver("cuModuleGetFunction"))
        })
        .collect()
}

/// A lock whose holder cannot leave the map half-updated, so a panic while
/// holding it elsewhere does not make it unusable.
pub(super) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn module_for(ctx: &Arc<CudaContext>, program: Program) -> Result<Arc<CudaModule>> {
    /// By device ordinal and program.
    static LOADED: Mutex<BTreeMap<(usize, Program), Arc<CudaModule>>> = Mutex::new(BTreeMap::new());
    let mut loaded = lock(&LOADED);
    if let Some(module) = loaded.get(&(ctx.ordinal(), program)) {
        return Ok(module.clone());
    }
    let (major, minor) = ctx
        .compute_capability()
        .map_err(Error::driver("cuDeviceGetAttribute"))?;
    let cubin = compile_cubin(
        program,
        Arch {
            major: major as u32,
            minor: minor as u32,
        },
    )?;
    let module = ctx
        .load_module(cudarc::nvrtc::Ptx::from_binary(cubin.to_vec()))
        .map_err(Error::driver("cuModuleLoadData"))?;
    loaded.insert((ctx.ordinal(), program), module.clone());
    Ok(module)
}
