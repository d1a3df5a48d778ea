//! One rank per process: start it with the launcher, which sets RANK,
//! WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT the way torchrun does.
//!
//! `linkreduce launch -n 2 -- target/release/examples/processes`

use half::bf16;
use linkreduce::{Communicator, Config};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Meets the other ranks over TCP; peers map each other's buffers
    // through CUDA IPC. LOCAL_RANK picks the GPU.
    let mut comm = Communicator::from_env(Config::default())?;
    let len = 1 << 20;
    let value = bf16::from_f32((comm.rank() + 1) as f32);
    let input = comm.upload(&vec![value; len])?;
    let mut output = comm.alloc::<bf16>(len)?;
    // Registered buffers are read in place by peers; unregistered ones
    // are copied into a staging buffer first.
    comm.register(&input)?;
    comm.all_reduce(&input, &mut output)?;
    let sum = comm.download(&output)?[len - 1].to_f32();
    let world = comm.world_size();
    println!(
        "rank {} of {world} on GPU {}: sum {sum} (expected {})",
        comm.rank(),
        comm.device(),
        world * (world + 1) / 2
    );
    // The same ranks can also use NCCL, for what the custom kernels do not
    // cover: comm.nccl()?.all_reduce(&input, &mut output)?
    Ok(())
}
