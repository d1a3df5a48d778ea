//! The custom kernels' side of a communicator: what a rank builds alone
//! (kernels, its memory), what it agrees with its peers (settings, grid
//! size), and the memory every peer reaches (signal regions, staging
//! buffers, push areas). Built only where the kernels can serve the group
//! (docs/design.md, "Path choice").

use std::sync::Arc;

use cudarc::driver::sys;
use cudarc::driver::{CudaContext, CudaFunction};
use sha2::{Digest, Sha256};

use super::register::Buffers;
use super::{Config, Gpu};
use crate::algorithm::Algorithm;
use crate::algorithm::Tuning;
use crate::driver::driver_version;
use crate::error::{Error, Result};
use crate::kernels::{
    load_kernels, load_norm_kernels, load_scatter_gather_kernels, programmatic_launch, Fault,
    Kernels, NormKernels, ScatterGatherKernels, MAX_RANKS, PACKET_BYTES, PUSH_EMPTY, PUSH_HEADER,
    PUSH_SLOTS, SCRATCH_OFFSET, THREADS_PER_BLOCK,
};
use crate::memory::{gpu_uuid, DeviceMemory, HostMapped};
use crate::registry::{Registry, STAGING_INDEX};
use crate::rendezvous::{agree, all_gather_u64s, u64_at, Rendezvous};
use crate::transport::Transport;

/// What the kernels need besides the caller's buffers.
pub(super) struct CustomPath {
    pub kernels: Arc<Kernels>,
    pub norm_kernels: Arc<NormKernels>,
    pub scatter_gather_kernels: Arc<ScatterGatherKernels>,
    /// Blocks per launch at most: the same on every rank.
    pub max_blocks: u32,
    /// The same for the chunked push, whose kernels are the heaviest: kept
    /// apart so that they do not lower every other kernel's grid (they fit
    /// one block per SM where the other all-reduce kernels fit three or
    /// four).
    pub chunked_max_blocks: u32,
    pub regions: Regions,
    pub buffers: Buffers,
    /// Measured choices for automatic calls (the same on every rank).
    pub tuning: Option<Tuning>,
    /// Whether this rank launches its all-reduce kernels programmatically
    /// (kernels/launch.rs).
    pub programmatic: bool,
}

/// A rank's memory that kernels use besides the caller's buffers.
pub(super) struct Regions {
    /// Every rank's signal region (counters, then scratch), as this rank
    /// reaches it.
    pub signal_peers: [u64; MAX_RANKS],
    /// Every rank's push area, as this rank reaches it.
    pub push_peers: [u64; MAX_RANKS],
    /// Bytes of one rank's segment of a push slot (a multiple of the packet).
    pub push_segment: usize,
    /// This rank's buffer table: `world size x capacity` addresses.
    pub table: DeviceMemory,
    pub table_capacity: usize,
    /// Inputs copied here are read by peers through table index 0.
    pub staging: DeviceMemory,
    /// Where kernels write an output that is not 16-byte aligned, before a
    /// copy into place (staging's size: calls are cut no larger); only this
    /// rank uses it. Allocated at set-up: allocating inside a capture is
    /// refused in the capture mode frameworks use.
    pub bounce: DeviceMemory,
    pub fault: HostMapped<Fault>,
    /// Owned here, used through `signal_peers` (by this rank and its peers).
    _signal: DeviceMemory,
    /// Owned here, used through `push_peers`.
    _push: DeviceMemory,
}

impl Regions {
    /// Writes table entries (owner, index, address) in this rank's stream
    /// order, so that later launches see them, and waits for the copies.
    pub fn write_table(
        &self,
        gpu: &Gpu,
        world_size: usize,
        entries: &[(usize, usize, u64)],
    ) -> Result<()> {
        let capacity = self.table_capacity;
        let stream = &gpu.stream;
        gpu.ctx
            .bind_to_thread()
            .map_err(Error::driver("cuCtxSetCurrent"))?;
        for (owner, index, address) in entries {
            if *owner >= world_size || *index >= capacity {
                return Err(Error::RankMismatch {
                    what: "registration",
                    detail: format!(
                        "rank {owner} named buffer-table index {index}; the table holds \
                         {capacity} per rank (every rank needs the same max_records)"
                    ),
                });
            }
            let at = self.table.ptr() + ((owner * capacity + index) * 8) as u64;
            // SAFETY: `at` lies inside the table (owner < world size and
            // index < capacity, checked above); `address` lives until the
            // copy is done (the stream is synchronised below).
            unsafe {
                cudarc::driver::result::memcpy_htod_async(
                    at,
                    std::slice::from_ref(address),
                    stream.cu_stream(),
                )
            }
            .map_err(Error::driver("cuMemcpyHtoDAsync"))?;
        }
        stream
            .synchronize()
            .map_err(Error::driver("cuStreamSynchronize"))
    }
}

/// Tags of the set-up addresses every rank shares.
const SIGNAL_TAG: u64 = 0;
const STAGING_TAG: u64 = 1;
const PUSH_TAG: u64 = 2;

impl CustomPath {
    /// The most blocks a launch of `algorithm` may use.
    pub fn max_blocks_for(&self, algorithm: Algorithm) -> u32 {
        match algorithm {
            Algorithm::ChunkedPush => self.chunked_max_blocks,
            _ => self.max_blocks,
        }
    }

    /// Collective: builds this rank's side of the kernels on `gpu`.
    pub fn new(
        rendezvous: &dyn Rendezvous,
        gpu: &Gpu,
        world_size: usize,
        config: &Config,
    ) -> Result<Self> {
        let local = LocalSetup::new(gpu, world_size, config);
        let local = agree(rendezvous, "set-up", local)?;
        let mut transport = Transport::connect(rendezvous, &gpu.ctx)?;

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
        let capacity = &local.capacity;
        mine.extend([capacity.resident, capacity.sms, capacity.resident_chunked].map(u64::from));
        mine.extend(shared_settings);
        let peers = all_gather_u64s(rendezvous, "set-up", &mine)?;
        if let Some(bad) = peers.iter().position(|p| p[5..] != shared_settings) {
            return Err(Error::RankMismatch {
                what: "set-up",
                detail: format!(
                    "rank {bad} has another Config (staging, scratch, push, records, timeout or \
                     tuning table) than this rank; give every rank the same"
                ),
            });
        }
        // Where ranks share a GPU, none launches programmatically
        // (kernels/launch.rs says why).
        let shares_gpu = peers
            .iter()
            .any(|p| peers.iter().filter(|q| q[..2] == p[..2]).count() > 1);
        // Ranks that share a GPU spin on each other, so all their blocks
        // must be resident at once, and the work each queues before its
        // kernel must still find room beside its co-tenants' spinning
        // blocks: sharing ranks together touch at most half the SMs
        // (docs/design.md, "Ranks sharing a GPU").
        // `resident`: where in a peer's row its GPU's resident blocks are.
        let limit = |resident: usize| {
            peers
                .iter()
                .map(|p| {
                    let sharing = peers.iter().filter(|q| q[..2] == p[..2]).count() as u64;
                    let (resident, sms) = (p[resident], p[3]);
                    if sharing == 1 {
                        resident
                    } else {
                        (resident / sharing).min(sms / (2 * sharing))
                    }
                })
                .min()
                .unwrap_or(0)
                .min(config.max_blocks as u64) as u32
        };
        let (max_blocks, chunked_max_blocks) = (limit(2), limit(4));
        if max_blocks == 0 || chunked_max_blocks == 0 {
            return Err(Error::InvalidConfig(
                "a GPU cannot keep one block of every rank on it resident; use fewer ranks per GPU"
                    .into(),
            ));
        }

        let shared = transport.share(
            rendezvous,
            "set-up",
            &[
                (SIGNAL_TAG, local.signal.ptr()),
                (STAGING_TAG, local.staging.ptr()),
                (PUSH_TAG, local.push.ptr()),
            ],
        )?;
        let mut reached = [[0u64; MAX_RANKS]; 3];
        for (owner, addresses) in shared.iter().enumerate() {
            if addresses.len() != reached.len() {
                return Err(Error::RankMismatch {
                    what: "set-up",
                    detail: format!("rank {owner} shared {} set-up buffers", addresses.len()),
                });
            }
            for address in addresses {
                let slot = reached
                    .get_mut(address.tag as usize)
                    .ok_or(Error::RankMismatch {
                        what: "set-up",
                        detail: format!("rank {owner} shared an unknown buffer {}", address.tag),
                    })?;
                slot[owner] = address.address;
            }
        }
        let [signal_peers, staging_peers, push_peers] = reached;
        let mut registry = Registry::new(config.max_records);
        let staging_index = registry.reserve()?;
        debug_assert_eq!(staging_index, STAGING_INDEX);
        let custom = CustomPath {
            kernels: local.kernels,
            norm_kernels: local.norm_kernels,
            scatter_gather_kernels: local.scatter_gather_kernels,
            max_blocks,
            chunked_max_blocks,
            regions: Regions {
                signal_peers,
                push_peers,
                push_segment: local.push_segment,
                table: local.table,
                table_capacity: config.max_records,
                staging: local.staging,
                bounce: local.bounce,
                fault: local.fault,
                _signal: local.signal,
                _push: local.push,
            },
            buffers: Buffers::new(registry, transport),
            tuning: local.tuning,
            programmatic: programmatic_launch(
                local.wants_programmatic,
                local.compute_capability,
                local.driver,
                shares_gpu,
            ),
        };
        // Nobody launches before every signal region is zeroed, every table
        // knows every staging buffer, and every rank is ready.
        let staging_entries: Vec<(usize, usize, u64)> = (0..world_size)
            .map(|owner| (owner, STAGING_INDEX, staging_peers[owner]))
            .collect();
        let written = custom
            .regions
            .write_table(gpu, world_size, &staging_entries);
        agree(rendezvous, "set-up", written)?;
        Ok(custom)
    }
}

/// What one rank builds alone before meeting its peers.
struct LocalSetup {
    kernels: Arc<Kernels>,
    norm_kernels: Arc<NormKernels>,
    scatter_gather_kernels: Arc<ScatterGatherKernels>,
    /// How many blocks the GPU holds at once.
    capacity: Capacity,
    /// The GPU's uuid as two words: ranks with equal ones share a GPU.
    uuid: [u64; 2],
    signal: DeviceMemory,
    staging: DeviceMemory,
    bounce: DeviceMemory,
    push: DeviceMemory,
    push_segment: usize,
    tuning: Option<Tuning>,
    /// A hash of `tuning`, to check that every rank chooses alike.
    tuning_digest: u64,
    table: DeviceMemory,
    fault: HostMapped<Fault>,
    /// What decides programmatic launches besides the group.
    wants_programmatic: bool,
    compute_capability: (i32, i32),
    driver: i32,
}

impl LocalSetup {
    fn new(gpu: &Gpu, world_size: usize, config: &Config) -> Result<Self> {
        // Precedence: the caller's table, LINKREDUCE_TUNING, the table
        // shipped for this GPU and world size, the reference rule.
        let tuning = match &config.tuning {
            Some(tuning) => Some(tuning.clone()),
            None => {
                Tuning::resolve(gpu.ctx.name().ok().as_deref(), world_size)?.map(|(table, _)| table)
            }
        };
        // The entries decide; `measured_on` is a comment.
        let tuning_json = serde_json::to_vec(&tuning.as_ref().map(|t| &t.entries))
            .map_err(|e| Error::InvalidConfig(format!("cannot encode the tuning table: {e}")))?;
        let tuning_digest = u64_at(&Sha256::digest(&tuning_json));
        let (ctx, stream) = (&gpu.ctx, &gpu.stream);
        ctx.bind_to_thread()
            .map_err(Error::driver("cuCtxSetCurrent"))?;
        let kernels = load_kernels(ctx, world_size)?;
        let norm_kernels = load_norm_kernels(ctx, world_size)?;
        let meeting_norm_kernels = norm_kernels
            .iter()
            .filter(|((kind, _), _)| kind.meets_peers())
            .map(|(_, function)| function);
        let scatter_gather_kernels = load_scatter_gather_kernels(ctx, world_size)?;
        let (chunked, others): (Vec<_>, Vec<_>) = kernels
            .iter()
            .partition(|((algorithm, _), _)| *algorithm == Algorithm::ChunkedPush);
        let capacity = Capacity::of(
            ctx,
            (others.into_iter().map(|(_, function)| function))
                .chain(meeting_norm_kernels)
                .chain(scatter_gather_kernels.values()),
            chunked.into_iter().map(|(_, function)| function),
        )?;
        let signal = DeviceMemory::zeroed(stream, SCRATCH_OFFSET + config.scratch_bytes)?;
        let staging = DeviceMemory::zeroed(stream, config.staging_bytes)?;
        let bounce = DeviceMemory::zeroed(stream, config.staging_bytes)?;
        let push_segment = config.push_bytes.div_ceil(PACKET_BYTES) * PACKET_BYTES;
        let push =
            DeviceMemory::zeroed(stream, PUSH_HEADER + PUSH_SLOTS * world_size * push_segment)?;
        // Slots start empty; the header (call counter) starts at zero.
        push.fill_words(stream, PUSH_HEADER, PUSH_EMPTY)?;
        let table = DeviceMemory::zeroed(stream, world_size * config.max_records * 8)?;
        let fault = HostMapped::<Fault>::new(ctx)?;
        let compute_capability = ctx
            .compute_capability()
            .map_err(Error::driver("cuDeviceGetAttribute"))?;
        let driver = driver_version().map_err(Error::driver("cuDriverGetVersion"))?;
        // Peers use the signal region as soon as they learn its address.
        stream
            .synchronize()
            .map_err(Error::driver("cuStreamSynchronize"))?;
        Ok(LocalSetup {
            uuid: gpu_uuid(ctx)?,
            kernels,
            norm_kernels,
            scatter_gather_kernels,
            capacity,
            signal,
            staging,
            bounce,
            push,
            push_segment,
            tuning,
            tuning_digest,
            table,
            fault,
            wants_programmatic: config.wants_programmatic_launch()?,
            compute_capability,
            driver,
        })
    }
}

/// Blocks of the heaviest of `kernels` that one SM holds at once.
fn resident_blocks<'a>(kernels: impl Iterator<Item = &'a CudaFunction>) -> Result<u32> {
    let mut per_sm = u32::MAX;
    for function in kernels {
        let blocks = function
            .occupancy_max_active_blocks_per_multiprocessor(THREADS_PER_BLOCK, 0, None)
            .map_err(Error::driver("cuOccupancyMaxActiveBlocksPerMultiprocessor"))?;
        per_sm = per_sm.min(blocks);
    }
    Ok(per_sm)
}

/// What one GPU holds at once.
struct Capacity {
    /// Blocks of the heaviest kernel but the chunked push's, on the whole GPU.
    resident: u32,
    /// Streaming multiprocessors.
    sms: u32,
    /// Blocks of the heaviest chunked-push kernel, on the whole GPU.
    resident_chunked: u32,
}

impl Capacity {
    /// `kernels`: every kernel that waits for peers but the chunked push's
    /// (`chunked`).
    fn of<'a>(
        ctx: &Arc<CudaContext>,
        kernels: impl Iterator<Item = &'a CudaFunction>,
        chunked: impl Iterator<Item = &'a CudaFunction>,
    ) -> Result<Capacity> {
        let sms = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(Error::driver("cuDeviceGetAttribute"))? as u32;
        Ok(Capacity {
            resident: resident_blocks(kernels)?.saturating_mul(sms),
            sms,
            resident_chunked: resident_blocks(chunked)?.saturating_mul(sms),
        })
    }
}
