//! linkreduce: the all-reduce of tensor-parallel inference on one node of
//! NVIDIA GPUs, with kernels that read peers' memory directly over NVLink.
//!
//! Layout, from the bottom up:
//! - [`kernels`]: the CUDA C++ device code (the barrier protocol in
//!   `barrier.cu`, the algorithms in `allreduce.cu`) and its NVRTC compilation;
//! - [`memory`]: device memory peers can read, peer access, pointer queries;
//! - [`ipc`] and `transport`: how a rank maps peers' memory, through CUDA IPC
//!   across processes or directly within one;
//! - `registry`: which entry of the device buffer table a buffer uses;
//! - [`rendezvous`]: how ranks exchange bytes at set-up;
//! - [`algorithm`]: which algorithm and grid a call uses;
//! - [`path`]: whether a call takes the kernels or NCCL, and why;
//! - [`comm`]: the communicator and its enqueue path; [`group`] builds one
//!   per rank inside a process, [`Communicator::from_env`] one per process.

pub mod algorithm;
pub mod comm;
pub mod driver;
pub mod dtype;
pub mod error;
pub mod group;
pub mod ipc;
pub mod kernels;
pub mod memory;
pub mod nccl;
pub mod path;
mod registry;
pub mod rendezvous;
mod transport;
pub mod verify;

pub use algorithm::{Algorithm, AlgorithmChoice, TunedPath, Tuning, TuningEntry, TuningSource};
pub use comm::{CallOptions, Communicator, Config, RmsNorm};
pub use dtype::{DType, Element};
pub use error::{Error, Result};
pub use kernels::ScatterGather;
pub use memory::DeviceBuffer;
pub use path::{CallPath, NcclReason};
