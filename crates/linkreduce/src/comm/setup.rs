//! Building a rank: its GPU and stream, the plan every rank shares (which
//! path calls take), the kernels' side where they serve the group
//! (`custom`), NCCL where calls need it. Also the orderly end of a rank.

use std::sync::Arc;

use super::custom::CustomPath;
use super::facts::gather_plan;
use super::{Communicator, Config, Gpu};
use crate::error::{Error, Result};
use crate::memory::device_count;
use crate::nccl::NcclComm;
use crate::rendezvous::{agree, Rendezvous, TcpRendezvous, TcpRendezvousConfig};

impl Communicator {
    /// Builds this rank's communicator on GPU `device`; collective over
    /// `rendezvous`, whose ranks may be threads of this process, other
    /// processes, or both. Ranks first learn which host and GPU each is on
    /// and whether the kernels can reach every peer's GPU; where they can,
    /// peers in this process get peer access to this rank's device and
    /// peers in other processes map its memory through CUDA IPC. Where they
    /// cannot (one rank, more than 8, several hosts, a pair without peer
    /// access), no custom memory is set up and every call takes NCCL, which
    /// is set up here (docs/design.md, "Path choice").
    pub fn new(rendezvous: Arc<dyn Rendezvous>, device: usize, config: Config) -> Result<Self> {
        let rank = rendezvous.rank();
        let world_size = rendezvous.world_size();
        // What each rank sets up alone comes first; `agree` then fails every
        // rank if one failed, instead of leaving its peers to time out.
        let gpu = Gpu::open(rank, world_size, device, &config);
        let gpu = agree(rendezvous.as_ref(), "set-up", gpu)?;
        let plan = gather_plan(rendezvous.as_ref(), &gpu.ctx)?;
        let custom = match plan.custom_blocked {
            None => Some(CustomPath::new(
                rendezvous.as_ref(),
                &gpu,
                world_size,
                &config,
            )?),
            Some(_) => None,
        };
        let mut communicator = Communicator {
            rank,
            world_size,
            gpu,
            plan,
            custom,
            nccl: None,
            nccl_watch: Default::default(),
            config,
            rendezvous,
            poisoned: None,
        };
        if communicator.plan.nccl_only() {
            communicator.prepare_nccl()?;
        }
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

impl Communicator {
    /// Sets up the NCCL communicator that calls on the NCCL path use, on
    /// the same ranks (nothing when it exists). Collective. Set-up already
    /// did it where every call takes NCCL; elsewhere (a tuning table that
    /// sends large sizes to NCCL, as the one shipped for 4 x H200 does) the
    /// first call on the
    /// NCCL path does it, which cannot happen during a CUDA-graph capture:
    /// call this before capturing calls that may take NCCL
    /// ([`path_for`](Self::path_for) says which do).
    pub fn prepare_nccl(&mut self) -> Result<()> {
        self.check_usable()?;
        if self.nccl.is_some() {
            return Ok(());
        }
        let ready = match self.plan.shared_gpu {
            Some((first, second)) => Err(Error::NcclSharedGpu { first, second }),
            None => self.not_capturing("prepare_nccl"),
        };
        agree(self.rendezvous.as_ref(), "NCCL set-up", ready)?;
        let mut nccl = NcclComm::from_rendezvous(self.rendezvous.as_ref(), &self.gpu.stream)?;
        nccl.connect()?;
        self.nccl = Some(nccl);
        Ok(())
    }
}

impl Gpu {
    /// This rank's context and stream on GPU `device`, after the checks
    /// that need no GPU.
    fn open(rank: usize, world_size: usize, device: usize, config: &Config) -> Result<Gpu> {
        config.validate()?;
        if world_size == 0 || i32::try_from(world_size).is_err() {
            return Err(Error::UnsupportedWorldSize(world_size));
        }
        if rank >= world_size {
            return Err(Error::InvalidConfig(format!(
                "the rendezvous says rank {rank} of {world_size}"
            )));
        }
        let count = device_count()?;
        if device >= count {
            return Err(Error::DeviceOutOfRange {
                ordinal: device,
                count,
            });
        }
        let ctx = cudarc::driver::CudaContext::new(device)
            .map_err(Error::driver("cuDevicePrimaryCtxRetain"))?;
        ctx.bind_to_thread()
            .map_err(Error::driver("cuCtxSetCurrent"))?;
        let stream = ctx.new_stream().map_err(Error::driver("cuStreamCreate"))?;
        let handoff = ctx
            .new_event(Some(
                cudarc::driver::sys::CUevent_flags::CU_EVENT_DISABLE_TIMING,
            ))
            .map_err(Error::driver("cuEventCreate"))?;
        Ok(Gpu {
            ctx,
            stream,
            handoff,
        })
    }
}

impl Drop for Communicator {
    fn drop(&mut self) {
        // Peers finished with this rank's memory once its last kernel passed
        // its end barrier; wait for that before freeing. Work stuck in NCCL
        // on a dead peer is aborted first (wait_for_calls), not waited for.
        let _ = self.wait_for_calls();
        // Peers in other processes map this rank's memory: they unmap it
        // before anyone frees (freeing memory a peer still maps is undefined
        // in CUDA). Attempted even after a failure, which may have struck
        // only some ranks; a dead peer ends the wait at once (its socket
        // closes), a live one that never comes after the rendezvous timeout.
        if let Some(custom) = self
            .custom
            .as_mut()
            .filter(|c| c.buffers.crosses_processes())
        {
            custom.buffers.close_peers();
            let _ = self.rendezvous.barrier();
        }
    }
}
