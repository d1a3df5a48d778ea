//! `linkreduce info`: what linkreduce sees on this machine.

use std::process::ExitCode;

use cudarc::driver::sys::{self, CUdevice_P2PAttribute};
use cudarc::driver::CudaContext;
use linkreduce::driver;
use linkreduce::kernels::nvrtc_version;
use linkreduce::memory::{can_access_peer, gpu_uuid};
use linkreduce::path::{Plan, RankFacts, Reach};
use linkreduce::{Error, Result, TuningSource};

use crate::topology::{self, Topology};

#[derive(clap::Args)]
pub struct Args {
    /// GPUs to report on (default: all visible).
    #[arg(long, value_delimiter = ',')]
    devices: Option<Vec<usize>>,
}

fn driver_version() -> Result<i32> {
    driver::driver_version().map_err(Error::driver("cuDriverGetVersion"))
}

fn p2p_attribute(
    from: &CudaContext,
    to: &CudaContext,
    attribute: CUdevice_P2PAttribute,
) -> Result<i32> {
    driver::p2p_attribute(attribute, from.cu_device(), to.cu_device())
        .map_err(Error::driver("cuDeviceGetP2PAttribute"))
}

/// The device's PCI bus id as CUDA prints it ("0000:18:00.0").
fn pci_bus_id(ctx: &CudaContext) -> Result<String> {
    driver::pci_bus_id(ctx.cu_device()).map_err(Error::driver("cuDeviceGetPCIBusId"))
}

pub fn run(args: Args) -> crate::error::Result<ExitCode> {
    let devices = crate::pick_devices(&args.devices)?;
    let driver = driver_version()?;
    println!("CUDA driver: {}.{}", driver / 1000, (driver % 1000) / 10);
    match nvrtc_version() {
        Ok((major, minor)) => println!("NVRTC: {major}.{minor}"),
        Err(error) => println!("NVRTC: unavailable ({error})"),
    }
    match linkreduce::nccl::version() {
        Ok((major, minor, patch)) => println!("NCCL: {major}.{minor}.{patch}"),
        Err(error) => println!("NCCL: unavailable ({error})"),
    }
    let mut contexts = Vec::new();
    for &ordinal in &devices {
        let ctx = CudaContext::new(ordinal).map_err(Error::driver("cuDevicePrimaryCtxRetain"))?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(Error::driver("cuDeviceGetAttribute"))?;
        let sms = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(Error::driver("cuDeviceGetAttribute"))?;
        let name = ctx.name().unwrap_or_else(|_| "unknown".into());
        let memory = ctx.total_mem().unwrap_or(0) >> 30;
        println!("GPU {ordinal}: {name}, sm_{major}{minor}, {sms} SMs, {memory} GiB");
        contexts.push(ctx);
    }
    if let (Some(ctx), 2..=8) = (contexts.first(), devices.len()) {
        print_kernel_resources(ctx, devices.len())?;
    }
    let topology = Topology::query();
    if topology.is_none() {
        println!("links: unknown (nvidia-smi topo -m did not answer)");
    }
    let buses = contexts
        .iter()
        .map(|ctx| pci_bus_id(ctx))
        .collect::<Result<Vec<_>>>()?;
    let mut all_nvlink = true;
    let mut reach = vec![vec![Reach::Direct; contexts.len()]; contexts.len()];
    for (i, from) in contexts.iter().enumerate() {
        for (j, to) in contexts.iter().enumerate() {
            if i == j {
                continue;
            }
            let access = can_access_peer(from, to)?;
            let rank = p2p_attribute(
                from,
                to,
                CUdevice_P2PAttribute::CU_DEVICE_P2P_ATTRIBUTE_PERFORMANCE_RANK,
            )?;
            let atomics = p2p_attribute(
                from,
                to,
                CUdevice_P2PAttribute::CU_DEVICE_P2P_ATTRIBUTE_NATIVE_ATOMIC_SUPPORTED,
            )?;
            if !access {
                reach[i][j] = Reach::NoPeerAccess;
            }
            let link = topology.as_ref().and_then(|t| t.link(&buses[i], &buses[j]));
            let nvlinks = link.and_then(topology::nvlinks);
            all_nvlink &= nvlinks.is_some() || devices[i] == devices[j];
            let link = match (link, nvlinks) {
                (_, Some(count)) => format!("{count} NVLinks"),
                (Some(other), None) => format!("no NVLink ({other})"),
                (None, None) => "link unknown".into(),
            };
            println!(
                "GPU {} -> GPU {}: peer access {}, {link}, performance rank {rank}, native atomics {}",
                devices[i],
                devices[j],
                if access { "yes" } else { "NO" },
                if atomics != 0 { "yes" } else { "no" },
            );
        }
    }
    print_paths(&contexts, &reach)?;
    let world = devices.len();
    if world > 2 && !all_nvlink {
        println!(
            "note: some pair of the {world} GPUs is not NVLink-connected, or the links are \
             unknown: the kernels are slow there; tune (`linkreduce tune`) to send sizes to NCCL"
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// What each all-reduce kernel takes from an SM: registers, shared and
/// local memory decide how many blocks run at once.
fn print_kernel_resources(ctx: &std::sync::Arc<CudaContext>, world: usize) -> Result<()> {
    println!("kernels for {world} ranks on GPU {} (per thread: registers, local bytes; per block: static shared bytes; blocks per SM):", ctx.ordinal());
    for k in linkreduce::kernels::kernel_resources(ctx, world)? {
        println!(
            "  {:>12} {:>4}: {} registers, {} B local, {} B shared, {} blocks/SM",
            k.algorithm.to_string(),
            k.dtype.to_string(),
            k.registers,
            k.local_bytes,
            k.static_shared_bytes,
            k.blocks_per_sm
        );
    }
    Ok(())
}

/// The path an automatic call of each size takes with one rank per listed
/// GPU on this host, and why: what `Communicator::path_for` says for such a
/// group (ranks on several hosts take NCCL).
fn print_paths(contexts: &[std::sync::Arc<CudaContext>], reach: &[Vec<Reach>]) -> Result<()> {
    let world = contexts.len();
    let ranks = contexts
        .iter()
        .map(|ctx| {
            Ok(RankFacts {
                host: 0,
                gpu: gpu_uuid(ctx)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let plan = match Plan::decide(&ranks, Some(reach)) {
        Ok(plan) => plan,
        Err(error) => {
            println!("paths for {world} rank(s), one per GPU listed: none ({error})");
            return Ok(());
        }
    };
    // As set-up chooses (without a caller's Config::tuning).
    let name = contexts.first().and_then(|ctx| ctx.name().ok());
    let resolved = linkreduce::Tuning::resolve(name.as_deref(), world)?;
    println!(
        "paths for {world} rank(s), one per GPU listed ({}):",
        match &resolved {
            Some((t, TuningSource::Env)) => format!("LINKREDUCE_TUNING's table: {}", t.measured_on),
            Some((t, TuningSource::Shipped)) => {
                format!("the table shipped for these GPUs: {}", t.measured_on)
            }
            None => "reference rule: no LINKREDUCE_TUNING, no table shipped for these GPUs".into(),
        }
    );
    let tuning = resolved.map(|(table, _)| table);
    for bytes in [
        1 << 10,
        64 << 10,
        128 << 10,
        256 << 10,
        512 << 10,
        1 << 20,
        256 << 20,
    ] {
        let path = plan.auto_path(world, bytes, tuning.as_ref());
        println!("  {:>9}: {path}", crate::sizes::format_size(bytes));
    }
    Ok(())
}
