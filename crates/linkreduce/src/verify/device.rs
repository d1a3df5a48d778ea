//! The check kernels (check.cu) on one rank's stream: fill buffers with a
//! rank's input, and compare buffers with an input or a sum without
//! copying them to the host.

use std::sync::Arc;

use cudarc::driver::{CudaStream, LaunchConfig, PushKernelArg};

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::kernels::{
    load_check_kernels, CheckArgs, CheckKernel, CheckKernels, CHECK_MAX_BLOCKS, CHECK_THREADS,
};
use crate::memory::{copy_to_host, DeviceMemory};

/// What a buffer should hold (check.cu `Expect`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// `rank`'s input for `seed`: an input left alone, or memory around an
    /// output that nothing may write.
    Input { seed: u64, rank: u32 },
    /// The sum of `world` ranks' inputs for `seed`; `push` rewrites push's
    /// marker first, as push does.
    Sum { seed: u64, world: u32, push: bool },
}

/// What one check found in one buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Findings {
    pub mismatches: u64,
    /// The lowest index that differs.
    pub first: Option<u64>,
    /// An order-independent hash of the buffer's bits.
    pub digest: u64,
}

/// Words per check in the results buffer.
const RESULT_WORDS: usize = 3;

/// The check kernels of one rank, and room for the findings of `slots`
/// checks between two [`reset`](Self::reset)s.
pub struct DeviceChecks {
    kernels: Arc<CheckKernels>,
    stream: Arc<CudaStream>,
    results: DeviceMemory,
    slots: usize,
}

impl DeviceChecks {
    pub fn new(stream: &Arc<CudaStream>, slots: usize) -> Result<Self> {
        let kernels = load_check_kernels(stream.context())?;
        Ok(DeviceChecks {
            kernels,
            stream: stream.clone(),
            results: DeviceMemory::zeroed_in_pool(stream, slots * RESULT_WORDS * 8)?,
            slots,
        })
    }

    /// The stream the checks run on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Clears every slot, in stream order.
    pub fn reset(&self) -> Result<()> {
        // SAFETY: the results buffer holds every slot's words.
        unsafe {
            cudarc::driver::result::memset_d8_async(
                self.results.ptr(),
                0,
                self.results.bytes(),
                self.stream.cu_stream(),
            )
        }
        .map_err(Error::driver("cuMemsetD8Async"))
    }

    /// Writes `rank`'s input for `seed` into `count` elements at `ptr`.
    ///
    /// # Safety
    /// `ptr` must hold `count` elements of `dtype` on this stream's device.
    pub unsafe fn fill(
        &self,
        dtype: DType,
        ptr: u64,
        count: usize,
        seed: u64,
        rank: u32,
    ) -> Result<()> {
        let function = self.function(CheckKernel::Fill, dtype)?;
        let count = count as u64;
        let mut launch = self.stream.launch_builder(function);
        launch.arg(&ptr).arg(&count).arg(&seed).arg(&rank);
        // SAFETY: the fill kernels take (char*, u64, u64, u32) and write
        // `count` elements at `ptr`, which the caller vouches for.
        unsafe { launch.launch(grid(count)) }
            .map(|_| ())
            .map_err(Error::driver("cuLaunchKernel"))
    }

    /// Compares `count` elements at `ptr` with `expect`, into `slot`.
    ///
    /// # Safety
    /// `ptr` must hold `count` elements of `dtype` on this stream's device.
    pub unsafe fn expect(
        &self,
        slot: usize,
        dtype: DType,
        ptr: u64,
        count: usize,
        expect: Expect,
    ) -> Result<()> {
        if slot >= self.slots {
            return Err(Error::InvalidConfig(format!(
                "check slot {slot} of {}",
                self.slots
            )));
        }
        let (seed, world, rank, kind) = match expect {
            Expect::Input { seed, rank } => (seed, 1, rank, 0),
            Expect::Sum { seed, world, push } => (seed, world, 0, 1 + u32::from(push)),
        };
        let args = CheckArgs {
            data: ptr,
            count: count as u64,
            seed,
            world,
            rank,
            expect: kind,
            result: self.results.ptr() + (slot * RESULT_WORDS * 8) as u64,
        };
        let function = self.function(CheckKernel::Check, dtype)?;
        let mut launch = self.stream.launch_builder(function);
        launch.arg(&args);
        // SAFETY: the check kernels take one `CheckArgs`; they read `count`
        // elements at `ptr` (the caller vouches for them) and write the
        // slot's words, which lie in the results buffer (slot checked).
        unsafe { launch.launch(grid(args.count)) }
            .map(|_| ())
            .map_err(Error::driver("cuLaunchKernel"))
    }

    /// Waits for the stream and returns the findings of the first `slots`.
    pub fn read(&self, slots: usize) -> Result<Vec<Findings>> {
        let mut words = vec![0u64; slots.min(self.slots) * RESULT_WORDS];
        // SAFETY: the results buffer holds at least that many words.
        unsafe { copy_to_host(&self.stream, &mut words, self.results.ptr()) }?;
        Ok(words
            .chunks_exact(RESULT_WORDS)
            .map(|w| Findings {
                mismatches: w[0],
                first: (w[0] > 0).then_some(!w[1]),
                digest: w[2],
            })
            .collect())
    }

    fn function(&self, kind: CheckKernel, dtype: DType) -> Result<&cudarc::driver::CudaFunction> {
        self.kernels.get(&(kind, dtype)).ok_or_else(|| {
            Error::InvalidConfig(format!("no {} check kernel was loaded", kind.symbol(dtype)))
        })
    }
}

/// One element per thread, grid-striding past the block limit.
fn grid(count: u64) -> LaunchConfig {
    let blocks = count
        .div_ceil(u64::from(CHECK_THREADS))
        .clamp(1, u64::from(CHECK_MAX_BLOCKS));
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (CHECK_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}
