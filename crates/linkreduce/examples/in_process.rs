//! Two ranks in one process, one thread each: every rank fills a buffer with
//! its rank + 1, all-reduces it, and checks the sum.
//!
//! `cargo run --release -p linkreduce --example in_process -- 0 1`
//! (device ordinals; a device may repeat to put several ranks on one GPU).

use half::bf16;
use linkreduce::{group, Config};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let devices: Vec<usize> = std::env::args()
        .skip(1)
        .map(|arg| arg.parse())
        .collect::<Result<_, _>>()?;
    let devices = if devices.is_empty() {
        vec![0, 1]
    } else {
        devices
    };
    let world = devices.len();
    let comms = group::in_process(&devices, Config::default())?;
    let sums = std::thread::scope(|scope| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|mut comm| {
                scope.spawn(move || -> linkreduce::Result<f32> {
                    let len = 4096;
                    let value = bf16::from_f32((comm.rank() + 1) as f32);
                    let input = comm.upload(&vec![value; len])?;
                    let mut output = comm.alloc::<bf16>(len)?;
                    comm.all_reduce(&input, &mut output)?;
                    let result = comm.download(&output)?;
                    Ok(result[len - 1].to_f32())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|handle| handle.join().expect("a rank thread panicked"))
            .collect::<linkreduce::Result<Vec<f32>>>()
    })?;
    let expected = (world * (world + 1) / 2) as f32;
    println!("world {world}: every rank got {sums:?}, expected {expected}");
    Ok(())
}
