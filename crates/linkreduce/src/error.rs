//! The one error type of the library. Every variant says what was wrong and,
//! where there is one, what the caller can do about it.

use crate::dtype::DType;
use crate::rendezvous::RendezvousError;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the CUDA driver library (libcuda.so) was not found: install an NVIDIA driver or add its folder to LD_LIBRARY_PATH")]
    DriverNotFound,
    #[error("no CUDA device is visible (check nvidia-smi and CUDA_VISIBLE_DEVICES)")]
    NoDevice,
    #[error("device {ordinal} does not exist: {count} CUDA device(s) are visible")]
    DeviceOutOfRange { ordinal: usize, count: usize },
    #[error("NVRTC (libnvrtc.so) was not found: install the CUDA toolkit or `pip install nvidia-cuda-nvrtc` and add its lib folder to LD_LIBRARY_PATH")]
    NvrtcNotFound,
    #[error("NCCL (libnccl.so) was not found: install NCCL or add its folder to LD_LIBRARY_PATH")]
    NcclNotFound,
    #[error("NVRTC failed to compile the kernels for {arch} (options {options:?}):\n{log}")]
    Compile {
        arch: String,
        options: Vec<String>,
        log: String,
    },
    #[error("CUDA driver call {call} failed: {source}")]
    Driver {
        call: &'static str,
        #[source]
        source: cudarc::driver::DriverError,
    },
    #[error("NCCL call {call} failed: {reason}")]
    Nccl { call: &'static str, reason: String },
    #[error("unsupported world size {0}: a group needs 1 to {max} ranks", max = i32::MAX)]
    UnsupportedWorldSize(usize),
    #[error("GPU {from} cannot access GPU {to} directly (no peer access); such groups take NCCL")]
    NoPeerAccess { from: usize, to: usize },
    #[error("{algorithm} was forced, but the custom kernels cannot serve this communicator: {reason}; use AlgorithmChoice::Auto, which takes NCCL here")]
    CustomUnavailable {
        algorithm: crate::Algorithm,
        reason: crate::path::NcclReason,
    },
    #[error("NCCL cannot serve this communicator: ranks {first} and {second} use the same GPU, which NCCL refuses; give every rank its own GPU, or use the custom kernels")]
    NcclSharedGpu { first: usize, second: usize },
    #[error("no path can serve this group: the custom kernels cannot ({reason}), and NCCL refuses ranks {first} and {second} on the same GPU; give every rank its own GPU")]
    NoPath {
        reason: crate::path::NcclReason,
        first: usize,
        second: usize,
    },
    #[error("this call goes through NCCL, which is not set up yet and cannot be set up while the stream is being captured; make one eager call of this size first, or call Communicator::prepare_nccl() (collective) before capturing")]
    NcclDuringCapture,
    #[error("rank {rank}: work on the NCCL path made no progress for {waited_ms} ms: a peer died, hangs, or was not called with the same operation; NCCL was aborted and this communicator can no longer be used")]
    NcclStalled { rank: usize, waited_ms: u64 },
    #[error(
        "input has {input} elements but output has {output}; an all-reduce needs equal lengths"
    )]
    LengthMismatch { input: usize, output: usize },
    #[error("input at {input:#x} and output at {output:#x} overlap without being the same buffer ({bytes} bytes); pass the same buffer for in place, or separate buffers")]
    PartialOverlap {
        input: u64,
        output: u64,
        bytes: usize,
    },
    #[error("buffer at {ptr:#x} is not {alignment}-byte aligned; allocate it through CUDA or offset it by a multiple of {alignment} bytes")]
    Misaligned { ptr: u64, alignment: u64 },
    #[error("input at {ptr:#x} is not registered and the call asked for zero-copy; register the buffer with Communicator::register first, or allow the staging copy")]
    NotRegistered { ptr: u64 },
    #[error("the buffer record table is full ({capacity} records); raise Config::max_records")]
    RecordTableFull { capacity: usize },
    #[error("pointer {ptr:#x} cannot be shared with peers: {reason}")]
    NotShareable { ptr: u64, reason: String },
    #[error("ranks disagree during {what}: {detail}")]
    RankMismatch { what: &'static str, detail: String },
    #[error("rank {rank} timed out at barrier {barrier} (block {block}) waiting for rank {peer} (epoch {expected}, its counter held {seen}): the peer died, hangs, or was not called with the same operation; this communicator can no longer be used")]
    PeerTimeout {
        rank: usize,
        peer: usize,
        /// Which barrier of the kernel (0: start); 99: a push waiting for
        /// the peer's data; 97 and 98: a chunked push waiting for the
        /// peer's chunk and for a slot the peer had to free.
        barrier: u32,
        block: u32,
        /// The epoch awaited and the last one the peer's counter showed
        /// (low 16 bits; 0 for push; for chunked push the chunk numbers,
        /// low 32 bits): they tell a peer that never came from one at
        /// another step.
        expected: u32,
        seen: u32,
    },
    #[error("this communicator failed earlier ({0}) and cannot be used again; create a new one")]
    Poisoned(String),
    #[error("rank {rank} failed during {what}: {reason}")]
    PeerFailed {
        rank: usize,
        what: &'static str,
        reason: String,
    },
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    #[error(transparent)]
    Rendezvous(#[from] RendezvousError),
    #[error("{op} supports f16 and bf16 activations, not {dtype}; convert the activations, or call all_reduce and normalise yourself")]
    UnsupportedDType { op: &'static str, dtype: DType },
    #[error("the weight has {hidden} elements, so rows are {hidden} long, but the input has {len} elements, not a whole number of rows; pass rows x hidden elements and a weight of hidden elements")]
    RowLength { len: usize, hidden: usize },
    #[error("the {what} has {len} elements but the input has {expected}; give it as many")]
    NormBufferLength {
        what: &'static str,
        len: usize,
        expected: usize,
    },
    #[error("eps is {0}; RMSNorm needs a finite, non-negative eps")]
    InvalidEps(f32),
    #[error("the {first} and the {second} overlap; they must be separate buffers")]
    BuffersOverlap {
        first: &'static str,
        second: &'static str,
    },
    #[error("a row of {hidden} elements is longer than one launch takes ({most}); raise Config::staging_bytes")]
    RowTooLong { hidden: usize, most: usize },
    #[error("{op} on {world_size} ranks: send has {send} elements and recv {recv}; {rule}")]
    ScatterGatherLength {
        op: crate::kernels::ScatterGather,
        send: usize,
        recv: usize,
        world_size: usize,
        /// What the lengths must be.
        rule: &'static str,
    },
    #[error("{op}: send at {send:#x} and recv at {recv:#x} overlap, but not in NCCL's in-place layout ({rule}); pass separate buffers or that layout")]
    ScatterGatherOverlap {
        op: crate::kernels::ScatterGather,
        send: u64,
        recv: u64,
        /// The in-place layout NCCL allows.
        rule: &'static str,
    },
}

impl Error {
    /// Wraps a driver error with the name of the call that failed.
    pub fn driver(call: &'static str) -> impl FnOnce(cudarc::driver::DriverError) -> Error {
        move |source| Error::Driver { call, source }
    }
}
