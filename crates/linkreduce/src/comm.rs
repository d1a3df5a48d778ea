//! The communicator: one rank's handle for all-reduces, and the enqueue path
//! that turns a call into staging copies and kernel launches.
//!
//! Set-up is collective (every rank builds its communicator at the same time
//! through a [`Rendezvous`]); so are [`Communicator::register`] and
//! [`Communicator::register_graph_buffers`]. All-reduces are collective on the
//! GPU: every rank must make the same calls, with the same lengths, in the
//! same order.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use cudarc::driver::sys::{self, CUstreamCaptureStatus};
use cudarc::driver::{
    CudaContext, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg,
};
use sha2::{Digest, Sha256};

use crate::algorithm::{blocks_for, choose_tuned, Algorithm, AlgorithmChoice, Tuning};
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::ipc::Handle;
use crate::kernels::{
    load_kernels, AllReduceArgs, BarrierArgs, Fault, Kernels, PushArgs, Record, MAX_BLOCKS,
    MAX_RANKS, PACKET_BYTES, PUSH_EMPTY, PUSH_HEADER, PUSH_SLOTS, SCRATCH_OFFSET,
    SCRATCH_TAIL_BYTES, THREADS_PER_BLOCK, WORLD_SIZES,
};
use crate::memory::{
    check, copy_to_device, device_count, DeviceBuffer, DeviceMemory, HostMapped, PointerInfo,
};
use crate::nccl::NcclComm;
use crate::registry::{Located, Registry};
use crate::rendezvous::{
    agree, all_gather_u64s, exchange, u64_at, Rendezvous, TcpRendezvous, TcpRendezvousConfig,
};
use crate::transport::Transport;

/// Where a launch reads this rank's input from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// The caller's buffer, through its record.
    Direct(Located),
    /// The caller's buffer, read by this rank alone (push).
    Local,
    /// A copy in this rank's staging buffer (record `staging_record`).
    Staged,
}

/// The input as one launch names it.
#[derive(Debug, Clone, Copy)]
enum LaunchInput {
    /// Through a record of the device table (peers read it too).
    Record(Located),
    /// By this rank's address (push: only this rank reads it).
    Address(u64),
}

/// Tunables of a communicator. Every rank must use the same values.
#[derive(Debug, Clone)]
pub struct Config {
    /// How long a kernel waits for a peer at a barrier before giving up.
    pub timeout: Duration,
    /// How long set-up and registration wait for the other ranks.
    pub rendezvous_timeout: Duration,
    /// Registered staging buffer for inputs that are not registered.
    pub staging_bytes: usize,
    /// Scratch for the two-stage algorithm's reduced slices; larger
    /// messages are split into several launches.
    pub scratch_bytes: usize,
    /// Largest push launch in bytes; each rank's push area holds
    /// `3 x world size` times this. Larger pushes are split.
    pub push_bytes: usize,
    /// Capacity of the device table of registered buffers.
    pub max_records: usize,
    /// Measured algorithm choices for automatic calls; None reads the file
    /// `LINKREDUCE_TUNING` names, if set. Every rank must use the same.
    pub tuning: Option<Tuning>,
    /// Upper bound on blocks per launch, further limited so that every
    /// rank's grid stays resident. Large messages need many blocks to reach
    /// NVLink bandwidth; small ones use few whatever this is.
    pub max_blocks: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            timeout: Duration::from_secs(5),
            rendezvous_timeout: Duration::from_secs(60),
            staging_bytes: 32 << 20,
            scratch_bytes: 32 << 20,
            push_bytes: 1 << 20,
            max_records: 65536,
            tuning: None,
            max_blocks: MAX_BLOCKS as u32,
        }
    }
}

impl Config {
    pub(crate) fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(Error::InvalidConfig(what));
        if self.timeout.is_zero() {
            return bad("timeout must be positive".into());
        }
        if self.staging_bytes < PACKET_BYTES {
            return bad(format!("staging_bytes must be at least {PACKET_BYTES}"));
        }
        let least_scratch = (MAX_RANKS + 2) * PACKET_BYTES + SCRATCH_TAIL_BYTES;
        if self.scratch_bytes < least_scratch {
            return bad(format!("scratch_bytes must be at least {least_scratch}"));
        }
        // A push that must be staged (misaligned input) goes through
        // staging in the same pieces as any other push: every rank cuts a
        // message alike, whatever its own pointers.
        if self.push_bytes < PACKET_BYTES
            || self.push_bytes > self.staging_bytes.min(MAX_PUSH_BYTES)
        {
            return bad(format!(
                "push_bytes must be in {PACKET_BYTES}..={} and at most staging_bytes",
                MAX_PUSH_BYTES
            ));
        }
        if self.max_records < 1 {
            return bad("max_records must be at least 1 (the staging buffer's)".into());
        }
        if self.max_blocks < 1 || self.max_blocks as usize > MAX_BLOCKS {
            return bad(format!("max_blocks must be in 1..={MAX_BLOCKS}"));
        }
        Ok(())
    }
}

/// The largest push segment: 3 x 8 x this stays far from overflow and
/// within reason for a buffer every peer maps.
const MAX_PUSH_BYTES: usize = 64 << 20;

/// Per-call options.
#[derive(Debug, Clone, Copy, Default)]
pub struct CallOptions {
    pub algorithm: AlgorithmChoice,
    /// Refuse (instead of copying into staging) an input that is not
    /// registered.
    pub zero_copy: bool,
}

/// One rank of a group that all-reduces across GPUs.
pub struct Communicator {
    rank: usize,
    world_size: usize,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    kernels: Arc<Kernels>,
    /// Blocks per launch at most: the same on every rank.
    max_blocks: u32,
    signal_peers: [u64; MAX_RANKS],
    /// Every rank's push area, as this rank reaches it.
    push_peers: [u64; MAX_RANKS],
    /// Bytes of one rank's segment of a push slot (a multiple of the packet).
    push_segment: usize,
    tuning: Option<Tuning>,
    registry: Registry,
    staging_record: usize,
    config: Config,
    /// Why the communicator cannot be used any more, once it cannot.
    poisoned: Option<String>,
    rendezvous: Arc<dyn Rendezvous>,
    transport: Transport,
    /// Peer allocations each eagerly registered record mapped.
    mapped: HashMap<usize, Vec<Handle>>,
    /// Peer allocations the records of captured graphs mapped.
    graph_mapped: Vec<Handle>,
    fault: HostMapped<Fault>,
    table: DeviceMemory,
    staging: DeviceMemory,
    /// Owned here, used through `signal_peers` (by this rank and its peers).
    _signal: DeviceMemory,
    /// Owned here, used through `push_peers`.
    _push: DeviceMemory,
}

impl Communicator {
    /// Builds this rank's communicator on GPU `device`; collective over
    /// `rendezvous`, whose ranks may be threads of this process, other
    /// processes, or both. Peers in this process get peer access to this
    /// rank's device; peers in other processes map its memory through CUDA
    /// IPC.
    pub fn new(rendezvous: Arc<dyn Rendezvous>, device: usize, config: Config) -> Result<Self> {
        let rank = rendezvous.rank();
        let world_size = rendezvous.world_size();
        // What each rank sets up alone comes first; `agree` then fails every
        // rank if one failed, instead of leaving its peers to time out.
        let local = LocalSetup::new(rank, world_size, device, &config);
        let local = agree(rendezvous.as_ref(), "set-up", local)?;
        let mut transport = Transport::connect(rendezvous.as_ref(), &local.ctx)?;

        // Ranks that share a GPU spin on each other, so all their blocks
        // must be resident at once: split each GPU's capacity among them.
        // What every rank must share: sizes that decide how calls are cut
        // and where peers write, the deadline, and the tuning table.
        let shared_settings = [
            config.staging_bytes as u64,
            config.scratch_bytes as u64,
            local.push_segment as u64,
            config.max_records as u64,
            config.timeout.as_nanos() as u64,
            local.tuning_digest,
        ];
        let mut mine = local.uuid.to_vec();
        mine.push(local.resident as u64);
        mine.extend(shared_settings);
        let peers = all_gather_u64s(rendezvous.as_ref(), "set-up", &mine)?;
        if let Some(bad) = peers.iter().position(|p| p[3..] != shared_settings) {
            return Err(Error::RankMismatch {
                what: "set-up",
                detail: format!(
                    "rank {bad} has another Config (staging, scratch, push, records, timeout or \
                     tuning table) than this rank; give every rank the same"
                ),
            });
        }
        let max_blocks = peers
            .iter()
            .map(|p| {
                let sharing = peers.iter().filter(|q| q[..2] == p[..2]).count() as u64;
                p[2] / sharing
            })
            .min()
            .unwrap_or(0)
            .min(config.max_blocks as u64) as u32;
        if max_blocks == 0 {
            return Err(Error::InvalidConfig(
                "a GPU cannot keep one block of every rank on it resident; use fewer ranks per GPU"
                    .into(),
            ));
        }

        let shared = transport.share(
            rendezvous.as_ref(),
            "set-up",
            &[local.signal.ptr(), local.staging.ptr(), local.push.ptr()],
        )?;
        let (signal_peers, staging_peers, push_peers) =
            (shared[0].record, shared[1].record, shared[2].record);
        let mut registry = Registry::new(config.max_records);
        let staging_record = registry.reserve()?;
        let communicator = Communicator {
            rank,
            world_size,
            ctx: local.ctx,
            stream: local.stream,
            kernels: local.kernels,
            max_blocks,
            signal_peers,
            push_peers,
            push_segment: local.push_segment,
            tuning: local.tuning,
            registry,
            staging_record,
            config,
            poisoned: None,
            rendezvous,
            transport,
            mapped: HashMap::new(),
            graph_mapped: Vec::new(),
            fault: local.fault,
            table: local.table,
            staging: local.staging,
            _signal: local.signal,
            _push: local.push,
        };
        // Nobody launches before every signal region is zeroed and every
        // rank is ready.
        let written = communicator.write_record(staging_record, &staging_peers);
        agree(communicator.rendezvous.as_ref(), "set-up", written)?;
        Ok(communicator)
    }

    /// Builds the communicator of a process started the torchrun way (for
    /// example by `linkreduce launch`): RANK, WORLD_SIZE, MASTER_ADDR and
    /// MASTER_PORT say where to meet, and LOCAL_RANK picks the GPU
    /// (modulo the visible GPUs, so that several ranks may share one).
    pub fn from_env(config: Config) -> Result<Self> {
        let local_rank = TcpRendezvousConfig::local_rank_from_env()?;
        let device = local_rank % device_count()?;
        let mut tcp = TcpRendezvousConfig::from_env()?;
        if std::env::var_os(TcpRendezvousConfig::TIMEOUT_VAR).is_none() {
            tcp.timeout = config.rendezvous_timeout;
        }
        let rendezvous = TcpRendezvous::connect(tcp)?;
        Communicator::new(Arc::new(rendezvous), device, config)
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// The device this rank runs on.
    pub fn device(&self) -> usize {
        self.ctx.ordinal()
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream every operation of this communicator is enqueued on; to
    /// capture all-reduces in a CUDA graph, capture this stream.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The meeting point of this communicator's ranks, for callers that
    /// coordinate the same ranks (an NCCL communicator, a benchmark).
    pub fn rendezvous(&self) -> &Arc<dyn Rendezvous> {
        &self.rendezvous
    }

    /// An NCCL communicator over the same ranks and devices, on this
    /// communicator's stream. Collective.
    pub fn nccl(&self) -> Result<NcclComm> {
        NcclComm::from_rendezvous(self.rendezvous.as_ref(), &self.stream)
    }

    /// The largest grid a launch uses (same on every rank).
    pub fn max_blocks(&self) -> u32 {
        self.max_blocks
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The algorithm an automatic call of `bytes` uses.
    pub fn algorithm_for(&self, bytes: usize) -> Algorithm {
        choose_tuned(
            self.world_size,
            bytes,
            AlgorithmChoice::Auto,
            self.tuning.as_ref(),
        )
    }

    /// Allocates a zeroed buffer that peers can read, on this rank's stream.
    pub fn alloc<T: Element>(&self, len: usize) -> Result<DeviceBuffer<T>> {
        DeviceBuffer::zeroed(&self.stream, len)
    }

    /// Allocates a buffer peers can read and copies `host` into it.
    pub fn upload<T: Element>(&self, host: &[T]) -> Result<DeviceBuffer<T>> {
        let mut buffer = self.alloc::<T>(host.len())?;
        self.stream
            .memcpy_htod(host, &mut buffer)
            .map_err(Error::driver("cuMemcpyHtoD"))?;
        Ok(buffer)
    }

    /// Copies `buffer` to the host once this rank's stream reaches it.
    pub fn download<T: Element + Default>(&self, buffer: &impl DevicePtr<T>) -> Result<Vec<T>> {
        self.stream
            .clone_dtoh(buffer)
            .map_err(Error::driver("cuMemcpyDtoH"))
    }

    /// Sums `input` over all ranks into `output` (any device buffer of the
    /// same length on this rank's device).
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
        if input.len() != output.len() {
            return Err(Error::LengthMismatch {
                input: input.len(),
                output: output.len(),
            });
        }
        let stream = self.stream.clone();
        let (input_ptr, _read) = input.device_ptr(&stream);
        let (output_ptr, _write) = output.device_ptr_mut(&stream);
        self.enqueue(T::DTYPE, input_ptr, output_ptr, input.len(), options)
    }

    /// Sums `buffer` over all ranks in place.
    pub fn all_reduce_in_place<T: Element>(
        &mut self,
        buffer: &mut impl DevicePtrMut<T>,
        options: CallOptions,
    ) -> Result<()> {
        let stream = self.stream.clone();
        let len = buffer.len();
        let (ptr, _write) = buffer.device_ptr_mut(&stream);
        self.enqueue(T::DTYPE, ptr, ptr, len, options)
    }

    /// Registers `buffer` so that all-reduces read it directly instead of
    /// copying it into staging. Collective: every rank registers its own
    /// buffer of the same size, in the same order. Calls must then use the
    /// same offset into it on every rank. Not while the stream is captured.
    pub fn register<T: Element>(&mut self, buffer: &impl DevicePtr<T>) -> Result<()> {
        self.check_usable()?;
        let stream = self.stream.clone();
        let (ptr, _read) = buffer.device_ptr(&stream);
        let bytes = buffer.num_bytes() as u64;
        let local = self
            .not_capturing("register")
            .and_then(|()| self.shareable(ptr, bytes as usize))
            .and_then(|()| self.registry.reserve());
        let payload = bytes.to_le_bytes();
        let gathered = exchange(
            self.rendezvous.as_ref(),
            "registration",
            local.as_ref().map(|_| &payload[..]),
        );
        let record = local?;
        let all = gathered?;
        if let Some(bad) = all.iter().position(|b| u64_at(b) != bytes) {
            return Err(Error::RankMismatch {
                what: "registration",
                detail: format!(
                    "rank {bad} registered {} bytes, this rank {bytes}",
                    u64_at(&all[bad])
                ),
            });
        }
        let shared = self
            .transport
            .share_one(self.rendezvous.as_ref(), "registration", ptr)?;
        self.write_record(record, &shared.record)?;
        // Registering a start address again replaces the earlier record,
        // whose peer mappings this rank no longer needs.
        if let Some(replaced) = self.registry.insert(ptr, bytes, record) {
            self.release_record(replaced);
        }
        self.mapped.insert(record, shared.mapped);
        Ok(())
    }

    /// Ends a registration so that the buffer may be freed. Collective, like
    /// [`register`](Self::register): every rank deregisters its buffer, and
    /// returns only once no peer maps it any more (freeing memory that a
    /// peer process still maps is undefined behaviour in CUDA). The record
    /// stays taken.
    pub fn deregister<T: Element>(&mut self, buffer: &impl DevicePtr<T>) -> Result<()> {
        self.check_usable()?;
        let stream = self.stream.clone();
        let (ptr, _read) = buffer.device_ptr(&stream);
        // Every rank first finishes the work that reads through the
        // mappings, and all agree that the buffer can go.
        let removable = self
            .not_capturing("deregister")
            .and_then(|()| {
                self.registry
                    .record_of(ptr)
                    .ok_or(Error::NotRegistered { ptr })
            })
            .and_then(|record| {
                self.stream
                    .synchronize()
                    .map_err(Error::driver("cuStreamSynchronize"))
                    .map(|()| record)
            });
        let record = agree(self.rendezvous.as_ref(), "deregistration", removable)?;
        self.registry.remove(ptr);
        self.release_record(record);
        // Nobody frees before every peer has unmapped.
        agree(self.rendezvous.as_ref(), "deregistration", Ok(()))
    }

    /// Unmaps the peer allocations an eager registration's record mapped.
    fn release_record(&mut self, record: usize) {
        if let Some(mapped) = self.mapped.remove(&record) {
            self.transport.release(&mapped);
        }
    }

    /// Records of the device table in use (the staging buffer's included).
    pub fn records_used(&self) -> usize {
        self.registry.records_used()
    }

    /// Fills the records that calls reserved while the stream was being
    /// captured, so that the captured graph reads every peer's buffers.
    /// Collective; call it after capture ends and before the first replay.
    /// Returns how many records were filled. Peers' buffers stay mapped
    /// until [`release_graph_buffers`](Self::release_graph_buffers) or drop.
    pub fn register_graph_buffers(&mut self) -> Result<usize> {
        self.check_usable()?;
        let captured = self.not_capturing("register_graph_buffers");
        let local: Vec<u64> = self.registry.pending().iter().map(|&(_, p)| p).collect();
        agree(
            self.rendezvous.as_ref(),
            "graph buffer registration",
            captured,
        )?;
        let filled = self
            .transport
            .share(
                self.rendezvous.as_ref(),
                "graph buffer registration",
                &local,
            )
            .and_then(|shared| {
                let pending = self.registry.take_pending();
                for (&(index, _), shared) in pending.iter().zip(shared) {
                    self.write_record(index, &shared.record)?;
                    self.graph_mapped.extend(shared.mapped);
                }
                Ok(pending.len())
            });
        // Reserved records left empty would make a replay read null
        // pointers: a communicator that failed here is not used again.
        if let Err(error) = &filled {
            self.poisoned = Some(error.to_string());
        }
        filled
    }

    /// Unmaps the peer buffers of every graph registered so far, so that
    /// peers may free them. Collective. Graphs captured before must not be
    /// replayed afterwards: their records point at the unmapped buffers.
    pub fn release_graph_buffers(&mut self) -> Result<()> {
        self.check_usable()?;
        let idle = self.not_capturing("release_graph_buffers").and_then(|()| {
            self.stream
                .synchronize()
                .map_err(Error::driver("cuStreamSynchronize"))
        });
        agree(self.rendezvous.as_ref(), "graph buffer release", idle)?;
        let mapped = std::mem::take(&mut self.graph_mapped);
        self.transport.release(&mapped);
        // Nobody frees before every peer has unmapped.
        agree(self.rendezvous.as_ref(), "graph buffer release", Ok(()))
    }

    /// Waits for this rank's enqueued work and reports a peer timeout that
    /// happened in it.
    pub fn synchronize(&mut self) -> Result<()> {
        self.check_usable()?;
        self.stream
            .synchronize()
            .map_err(Error::driver("cuStreamSynchronize"))?;
        self.check_usable()
    }

    /// Fails when the communicator was poisoned or a kernel reported a
    /// timed-out peer since the last check.
    fn check_usable(&mut self) -> Result<()> {
        if let Some(reason) = &self.poisoned {
            return Err(Error::Poisoned(reason.clone()));
        }
        let fault = self.fault.read();
        if fault.code == 0 {
            return Ok(());
        }
        let error = Error::PeerTimeout {
            rank: fault.rank as usize,
            peer: fault.peer as usize,
            barrier: fault.barrier,
            block: fault.block,
        };
        self.poisoned = Some(error.to_string());
        Err(error)
    }

    fn shareable(&self, ptr: u64, bytes: usize) -> Result<()> {
        let info = PointerInfo::shareable(ptr, bytes, self.device())?;
        self.transport.check_shareable(ptr, &info)
    }

    /// Fails when the stream is being captured: `what` synchronises the
    /// stream, which would invalidate the capture.
    fn not_capturing(&self, what: &str) -> Result<()> {
        if self.capturing()? {
            return Err(Error::InvalidConfig(format!(
                "{what} cannot run while the stream is being captured; call it before or after capture"
            )));
        }
        Ok(())
    }

    fn capturing(&self) -> Result<bool> {
        let status = self
            .stream
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

    /// Decides where the kernel reads this rank's input from: in place
    /// (registered, or captured and registered after capture) or from a
    /// staging copy.
    fn locate_input(
        &mut self,
        algorithm: Algorithm,
        input: u64,
        output: u64,
        bytes: usize,
        zero_copy: bool,
    ) -> Result<Source> {
        let overlaps = input < output + bytes as u64 && output < input + bytes as u64;
        if overlaps && input != output {
            return Err(Error::PartialOverlap {
                input,
                output,
                bytes,
            });
        }
        let aligned = input % PACKET_BYTES as u64 == 0;
        if algorithm == Algorithm::Push {
            // Only this rank reads its input, each packet before writing
            // the same packet of the output: in place is safe, and nothing
            // needs registering. Whole packets need 16-byte alignment.
            return match (aligned, zero_copy) {
                (true, _) => Ok(Source::Local),
                (false, false) => Ok(Source::Staged),
                (false, true) => Err(Error::Misaligned {
                    ptr: input,
                    alignment: PACKET_BYTES as u64,
                }),
            };
        }
        // One-stage writes the output while peers may still read the input.
        let hazard = algorithm == Algorithm::OneStage && overlaps;
        let registered = self.registry.lookup(input, bytes as u64);
        if let (Some(located), true, false) = (registered, aligned, hazard) {
            return Ok(Source::Direct(located));
        }
        if registered.is_none() && aligned && !hazard && self.capturing()? {
            self.shareable(input, bytes)?;
            let record = self.registry.reserve_pending(input)?;
            return Ok(Source::Direct(Located { record, offset: 0 }));
        }
        if zero_copy && registered.is_none() {
            return Err(Error::NotRegistered { ptr: input });
        }
        // A registered input staged only because of the in-place hazard may
        // be of any size: it goes through staging in pieces.
        if registered.is_none() && bytes > self.staging.bytes() {
            return Err(Error::InputTooLarge {
                bytes,
                capacity: self.staging.bytes(),
            });
        }
        Ok(Source::Staged)
    }

    /// Copies `bytes` of input into this rank's staging buffer.
    fn stage(&self, input: u64, bytes: usize) -> Result<()> {
        debug_assert!(bytes <= self.staging.bytes());
        // SAFETY: the input holds at least `bytes` bytes (it came from a
        // device slice at least that long) and so does staging (callers
        // never stage more than its size).
        check(
            unsafe {
                sys::cuMemcpyDtoDAsync_v2(self.staging.ptr(), input, bytes, self.stream.cu_stream())
            },
            "cuMemcpyDtoDAsync",
        )
    }

    /// The most elements one launch may take: two-stage slices must fit in
    /// scratch. A multiple of the packet so that chunks stay aligned.
    fn max_chunk(&self, algorithm: Algorithm, dtype: DType) -> usize {
        match algorithm {
            Algorithm::OneStage => usize::MAX,
            Algorithm::Push => self.push_segment / dtype.size(),
            Algorithm::TwoStage => {
                let slice_packets = (self.config.scratch_bytes - SCRATCH_TAIL_BYTES) / PACKET_BYTES;
                // The last slice may hold up to W-1 packets more than the rest.
                let packets = (slice_packets - self.world_size) * self.world_size;
                packets * (PACKET_BYTES / dtype.size())
            }
        }
    }

    fn enqueue(
        &mut self,
        dtype: DType,
        input: u64,
        output: u64,
        count: usize,
        options: CallOptions,
    ) -> Result<()> {
        self.check_usable()?;
        if count == 0 {
            return Ok(());
        }
        if output % PACKET_BYTES as u64 != 0 {
            return Err(Error::Misaligned {
                ptr: output,
                alignment: PACKET_BYTES as u64,
            });
        }
        self.ctx
            .bind_to_thread()
            .map_err(Error::driver("cuCtxSetCurrent"))?;
        let bytes = count * dtype.size();
        let algorithm = choose_tuned(
            self.world_size,
            bytes,
            options.algorithm,
            self.tuning.as_ref(),
        );
        let source = self.locate_input(algorithm, input, output, bytes, options.zero_copy)?;
        let mut chunk = self.max_chunk(algorithm, dtype);
        if source == Source::Staged {
            chunk = chunk.min(self.staging.bytes() / PACKET_BYTES * PACKET_BYTES / dtype.size());
        }
        let mut done = 0;
        while done < count {
            let n = chunk.min(count - done);
            let offset = (done * dtype.size()) as u64;
            let launch_input = match source {
                Source::Direct(located) => LaunchInput::Record(Located {
                    record: located.record,
                    offset: located.offset + offset,
                }),
                Source::Local => LaunchInput::Address(input + offset),
                Source::Staged => {
                    // The previous chunk's kernel ended on this stream, so
                    // every peer has finished reading staging.
                    self.stage(input + offset, n * dtype.size())?;
                    if algorithm == Algorithm::Push {
                        LaunchInput::Address(self.staging.ptr())
                    } else {
                        LaunchInput::Record(Located {
                            record: self.staging_record,
                            offset: 0,
                        })
                    }
                }
            };
            self.launch(algorithm, dtype, launch_input, output + offset, n)?;
            done += n;
        }
        Ok(())
    }

    fn launch(
        &self,
        algorithm: Algorithm,
        dtype: DType,
        input: LaunchInput,
        output: u64,
        count: usize,
    ) -> Result<()> {
        // Push kernels take the partial last packet as a packet; the others
        // give it to a scalar tail path.
        let packets = match algorithm {
            Algorithm::Push => (count * dtype.size()).div_ceil(PACKET_BYTES),
            _ => count * dtype.size() / PACKET_BYTES,
        };
        let blocks = blocks_for(
            algorithm,
            self.world_size,
            packets,
            THREADS_PER_BLOCK,
            self.max_blocks,
        );
        let barrier = BarrierArgs {
            peers: self.signal_peers,
            fault: self.fault.device_ptr(),
            timeout_ns: self.config.timeout.as_nanos().min(u64::MAX as u128) as u64,
            rank: self.rank as u32,
        };
        let function = self.kernels.get(&(algorithm, dtype)).ok_or_else(|| {
            Error::InvalidConfig(format!("no {algorithm} kernel for {dtype} was loaded"))
        })?;
        let config = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (THREADS_PER_BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut launch = self.stream.launch_builder(function);
        let record_args;
        let push_args;
        match input {
            LaunchInput::Record(source) => {
                record_args = AllReduceArgs {
                    barrier,
                    input_record: self.table.ptr()
                        + (source.record * std::mem::size_of::<Record>()) as u64,
                    input_offset: source.offset,
                    output,
                    count: count as u64,
                };
                launch.arg(&record_args);
            }
            LaunchInput::Address(input) => {
                push_args = PushArgs {
                    barrier,
                    push: self.push_peers,
                    input,
                    output,
                    count: count as u64,
                    segment_bytes: self.push_segment as u64,
                };
                launch.arg(&push_args);
            }
        }
        // SAFETY: the one-stage and two-stage kernels take exactly one
        // `AllReduceArgs` by value, the push kernels one `PushArgs`; which
        // one `input` says (locate_input gives push inputs by address, the
        // others by record). Their pointers are valid: signal regions, push
        // areas and the record table live as long as their communicators
        // (collectively dropped), a record's buffers were checked shareable
        // when recorded, a push input holds `count` elements and fits the
        // push segment (chunks are cut to it), and the output holds `count`
        // elements (it came from a slice that long).
        unsafe { launch.launch(config) }
            .map(|_| ())
            .map_err(Error::driver("cuLaunchKernel"))
    }

    fn write_record(&self, index: usize, record: &Record) -> Result<()> {
        let at = self.table.ptr() + (index * std::mem::size_of::<Record>()) as u64;
        // SAFETY: `index` came from the registry, which never hands out one
        // past the table's capacity, so the record fits inside the table.
        unsafe { copy_to_device(&self.stream, at, record) }
    }
}

/// What one rank builds alone before meeting its peers.
struct LocalSetup {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    kernels: Arc<Kernels>,
    /// Blocks of the heaviest kernel the GPU holds at once.
    resident: u32,
    /// The GPU's uuid as two words: ranks with equal ones share a GPU.
    uuid: [u64; 2],
    signal: DeviceMemory,
    staging: DeviceMemory,
    push: DeviceMemory,
    push_segment: usize,
    tuning: Option<Tuning>,
    /// A hash of `tuning`, to check that every rank chooses alike.
    tuning_digest: u64,
    table: DeviceMemory,
    fault: HostMapped<Fault>,
}

impl LocalSetup {
    fn new(rank: usize, world_size: usize, device: usize, config: &Config) -> Result<Self> {
        config.validate()?;
        if !WORLD_SIZES.contains(&world_size) {
            return Err(Error::UnsupportedWorldSize(world_size));
        }
        if rank >= world_size {
            return Err(Error::InvalidConfig(format!(
                "the rendezvous says rank {rank} of {world_size}"
            )));
        }
        let tuning = match &config.tuning {
            Some(tuning) => Some(tuning.clone()),
            None => Tuning::from_env()?,
        };
        // The entries decide; `measured_on` is a comment.
        let tuning_json = serde_json::to_vec(&tuning.as_ref().map(|t| &t.entries))
            .map_err(|e| Error::InvalidConfig(format!("cannot encode the tuning table: {e}")))?;
        let tuning_digest = u64_at(&Sha256::digest(&tuning_json));
        let count = device_count()?;
        if device >= count {
            return Err(Error::DeviceOutOfRange {
                ordinal: device,
                count,
            });
        }
        let ctx = CudaContext::new(device).map_err(Error::driver("cuDevicePrimaryCtxRetain"))?;
        ctx.bind_to_thread()
            .map_err(Error::driver("cuCtxSetCurrent"))?;
        let stream = ctx.new_stream().map_err(Error::driver("cuStreamCreate"))?;
        let kernels = load_kernels(&ctx, world_size)?;
        let resident = resident_blocks(&ctx, &kernels)?;
        let uuid = ctx.uuid().map_err(Error::driver("cuDeviceGetUuid"))?;
        let uuid_bytes: Vec<u8> = uuid.bytes.iter().map(|&b| b as u8).collect();
        let signal = DeviceMemory::zeroed(&stream, SCRATCH_OFFSET + config.scratch_bytes)?;
        let staging = DeviceMemory::zeroed(&stream, config.staging_bytes)?;
        let push_segment = config.push_bytes.div_ceil(PACKET_BYTES) * PACKET_BYTES;
        let push = DeviceMemory::zeroed(
            &stream,
            PUSH_HEADER + PUSH_SLOTS * world_size * push_segment,
        )?;
        // Slots start empty; the header (call counter) starts at zero.
        push.fill_words(&stream, PUSH_HEADER, PUSH_EMPTY)?;
        let table =
            DeviceMemory::zeroed(&stream, config.max_records * std::mem::size_of::<Record>())?;
        let fault = HostMapped::<Fault>::new(&ctx)?;
        // Peers use the signal region as soon as they learn its address.
        stream
            .synchronize()
            .map_err(Error::driver("cuStreamSynchronize"))?;
        Ok(LocalSetup {
            uuid: [u64_at(&uuid_bytes), u64_at(&uuid_bytes[8..])],
            ctx,
            stream,
            kernels,
            resident,
            signal,
            staging,
            push,
            push_segment,
            tuning,
            tuning_digest,
            table,
            fault,
        })
    }
}

impl Drop for Communicator {
    fn drop(&mut self) {
        // Peers finished with this rank's memory once its last kernel passed
        // its end barrier; wait for that before freeing.
        let _ = self.stream.synchronize();
        // Peers in other processes map this rank's memory: they unmap it
        // before anyone frees (freeing memory a peer still maps is undefined
        // in CUDA). Attempted even after a failure, which may have struck
        // only some ranks; a dead peer ends the wait at once (its socket
        // closes), a live one that never comes after the rendezvous timeout.
        if self.transport.crosses_processes() {
            self.transport.close_peers();
            let _ = self.rendezvous.barrier();
        }
    }
}

/// Blocks of the heaviest kernel that fit on the whole GPU at once.
fn resident_blocks(ctx: &Arc<CudaContext>, kernels: &Kernels) -> Result<u32> {
    let sms = ctx
        .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .map_err(Error::driver("cuDeviceGetAttribute"))? as u32;
    let mut per_sm = u32::MAX;
    for function in kernels.values() {
        let blocks = function
            .occupancy_max_active_blocks_per_multiprocessor(THREADS_PER_BLOCK, 0, None)
            .map_err(Error::driver("cuOccupancyMaxActiveBlocksPerMultiprocessor"))?;
        per_sm = per_sm.min(blocks);
    }
    Ok(per_sm.saturating_mul(sms))
}
