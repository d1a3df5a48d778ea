//! Building a rank: what it sets up alone (context, stream, kernels, its
//! memory), what it agrees with its peers (settings, grid size), and the
//! memory every peer reaches (signal regions, staging buffers, push areas).
//! Also the orderly end of a rank.

use std::sync::Arc;

use cudarc::driver::sys;
use cudarc::driver::{CudaContext, CudaFunction, CudaStream};
use sha2::{Digest, Sha256};

use super::register::Buffers;
use super::{Communicator, Config, Gpu};
use crate::algorithm::Tuning;
use crate::error::{Error, Result};
use crate::kernels::{
    load_kernels, load_norm_kernels, Fault, Kernels, MAX_RANKS, PACKET_BYTES, PUSH_EMPTY,
    PUSH_HEADER, PUSH_SLOTS, SCRATCH_OFFSET, THREADS_PER_BLOCK, WORLD_SIZES,
};
use crate::memory::{device_count, DeviceMemory, HostMapped};
use crate::registry::{Registry, STAGING_INDEX};
use crate::rendezvous::{
    agree, all_gather_u64s, u64_at, Rendezvous, TcpRendezvous, TcpRendezvousConfig,
};
use crate::transport::Transport;

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

/// Tags of the set-up addresses every rank shares.
const SIGNAL_TAG: u64 = 0;
const STAGING_TAG: u64 = 1;
const PUSH_TAG: u64 = 2;

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
        mine.extend([local.capacity.resident as u64, local.capacity.sms as u64]);
        mine.extend(shared_settings);
        let peers = all_gather_u64s(rendezvous.as_ref(), "set-up", &mine)?;
        if let Some(bad) = peers.iter().position(|p| p[4..] != shared_settings) {
            return Err(Error::RankMismatch {
                what: "set-up",
                detail: format!(
                    "rank {bad} has another Config (staging, scratch, push, records, timeout or \
                     tuning table) than this rank; give every rank the same"
                ),
            });
        }
        // Ranks that share a GPU spin on each other, so all their blocks
        // must be resident at once, and the work each queues before its
        // kernel must still find room beside its co-tenants' spinning
        // blocks: sharing ranks together touch at most half the SMs
        // (docs/design.md, "Ranks sharing a GPU").
        let max_blocks = peers
            .iter()
            .map(|p| {
                let sharing = peers.iter().filter(|q| q[..2] == p[..2]).count() as u64;
                let (resident, sms) = (p[2], p[3]);
                if sharing == 1 {
                    resident
                } else {
                    (resident / sharing).min(sms / (2 * sharing))
                }
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
        let communicator = Communicator {
            rank,
            world_size,
            gpu: Gpu {
                ctx: local.ctx,
                stream: local.stream,
                kernels: local.kernels,
                max_blocks,
            },
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
            config,
            rendezvous,
            poisoned: None,
        };
        // Nobody launches before every signal region is zeroed, every table
        // knows every staging buffer, and every rank is ready.
        let staging_entries: Vec<(usize, usize, u64)> = (0..world_size)
            .map(|owner| (owner, STAGING_INDEX, staging_peers[owner]))
            .collect();
        let written = communicator.write_table(&staging_entries);
        agree(communicator.rendezvous.as_ref(), "set-up", written)?;
        Ok(communicator)
    }

    /// Builds the communicator of a process started the torchrun way (for
    /// example by `linkreduce launch`): RANK, WORLD_SIZE, MASTER_ADDR and
    /// MASTER_PORT say where to meet, and LOCAL_RANK picks the GPU
    /// (modulo the visible GPUs, so that several ranks may share one).
    pub fn from_env(config: Config) -> Result<Self> {
        Self::from_env_on(None, None, config)
    }

    /// Like [`from_env`](Self::from_env), on GPU `device` instead of
    /// LOCAL_RANK's when given, and meeting on `port` instead of MASTER_PORT
    /// when given (for bindings whose launcher already listens there).
    /// Device problems are reported before meeting the other ranks.
    pub fn from_env_on(device: Option<usize>, port: Option<u16>, config: Config) -> Result<Self> {
        let lookup = |name: &str| match (name, port) {
            ("MASTER_PORT", Some(port)) => Some(port.to_string()),
            _ => std::env::var_os(name).map(|value| value.to_string_lossy().into_owned()),
        };
        // Missing variables are named before a missing driver.
        let local_rank = match device {
            Some(_) => 0,
            None => TcpRendezvousConfig::local_rank_from_vars(lookup)?,
        };
        let count = device_count()?;
        let device = device.unwrap_or(local_rank % count);
        if device >= count {
            return Err(Error::DeviceOutOfRange {
                ordinal: device,
                count,
            });
        }
        let mut tcp = TcpRendezvousConfig::from_vars(lookup)?;
        if lookup(TcpRendezvousConfig::TIMEOUT_VAR).is_none() {
            tcp.timeout = config.rendezvous_timeout;
        }
        let rendezvous = TcpRendezvous::connect(tcp)?;
        Communicator::new(Arc::new(rendezvous), device, config)
    }
}

/// What one rank builds alone before meeting its peers.
struct LocalSetup {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    kernels: Arc<Kernels>,
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
        let norm_kernels = load_norm_kernels(&ctx, world_size)?;
        let meeting_norm_kernels = norm_kernels
            .iter()
            .filter(|((kind, _), _)| kind.meets_peers())
            .map(|(_, function)| function);
        let capacity = Capacity::of(&ctx, kernels.values().chain(meeting_norm_kernels))?;
        let uuid = ctx.uuid().map_err(Error::driver("cuDeviceGetUuid"))?;
        let uuid_bytes: Vec<u8> = uuid.bytes.iter().map(|&b| b as u8).collect();
        let signal = DeviceMemory::zeroed(&stream, SCRATCH_OFFSET + config.scratch_bytes)?;
        let staging = DeviceMemory::zeroed(&stream, config.staging_bytes)?;
        let bounce = DeviceMemory::zeroed(&stream, config.staging_bytes)?;
        let push_segment = config.push_bytes.div_ceil(PACKET_BYTES) * PACKET_BYTES;
        let push = DeviceMemory::zeroed(
            &stream,
            PUSH_HEADER + PUSH_SLOTS * world_size * push_segment,
        )?;
        // Slots start empty; the header (call counter) starts at zero.
        push.fill_words(&stream, PUSH_HEADER, PUSH_EMPTY)?;
        let table = DeviceMemory::zeroed(&stream, world_size * config.max_records * 8)?;
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
        })
    }
}

impl Drop for Communicator {
    fn drop(&mut self) {
        // Peers finished with this rank's memory once its last kernel passed
        // its end barrier; wait for that before freeing.
        let _ = self.gpu.stream.synchronize();
        // Peers in other processes map this rank's memory: they unmap it
        // before anyone frees (freeing memory a peer still maps is undefined
        // in CUDA). Attempted even after a failure, which may have struck
        // only some ranks; a dead peer ends the wait at once (its socket
        // closes), a live one that never comes after the rendezvous timeout.
        if self.buffers.crosses_processes() {
            self.buffers.close_peers();
            let _ = self.rendezvous.barrier();
        }
    }
}

/// What one GPU holds at once.
struct Capacity {
    /// Blocks of the heaviest kernel, on the whole GPU.
    resident: u32,
    /// Streaming multiprocessors.
    sms: u32,
}

impl Capacity {
    /// `kernels`: every kernel that meets peers at barriers.
    fn of<'a>(
        ctx: &Arc<CudaContext>,
        kernels: impl Iterator<Item = &'a CudaFunction>,
    ) -> Result<Capacity> {
        let sms = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(Error::driver("cuDeviceGetAttribute"))? as u32;
        let mut per_sm = u32::MAX;
        for function in kernels {
            let blocks = function
                .occupancy_max_active_blocks_per_multiprocessor(THREADS_PER_BLOCK, 0, None)
                .map_err(Error::driver("cuOccupancyMaxActiveBlocksPerMultiprocessor"))?;
            per_sm = per_sm.min(blocks);
        }
        Ok(Capacity {
            resident: per_sm.saturating_mul(sms),
            sms,
        })
    }
}
