//! In-process groups: one communicator per rank, all in this process, each
//! meant to be moved to its own thread.

use std::sync::Arc;

use crate::comm::{Communicator, Config};
use crate::error::{Error, Result};
use crate::memory::device_count;
use crate::rendezvous::{Rendezvous, ThreadRendezvous};

/// Creates one communicator per entry of `devices` (rank i runs on
/// `devices[i]`). A device may appear several times: its ranks then share
/// it, which is how world sizes above the GPU count are tested (the
/// kernels' path only: NCCL refuses ranks sharing a GPU).
///
/// Where the kernels serve the group, peer access between every pair of
/// distinct devices is enabled while the communicators are built; where
/// they cannot, the communicators take NCCL (docs/design.md, "Path choice").
pub fn in_process(devices: &[usize], config: Config) -> Result<Vec<Communicator>> {
    if devices.is_empty() {
        return Err(Error::UnsupportedWorldSize(0));
    }
    config.validate()?;
    let count = device_count()?;
    if let Some(&ordinal) = devices.iter().find(|&&d| d >= count) {
        return Err(Error::DeviceOutOfRange { ordinal, count });
    }
    let rendezvous = ThreadRendezvous::group(devices.len(), config.rendezvous_timeout);
    std::thread::scope(|scope| {
        let builders: Vec<_> = rendezvous
            .into_iter()
            .map(|handle| {
                let device = devices[handle.rank()];
                let config = config.clone();
                scope.spawn(move || Communicator::new(Arc::new(handle), device, config))
            })
            .collect();
        builders
            .into_iter()
            .map(|builder| {
                builder.join().unwrap_or_else(|_| {
                    Err(Error::InvalidConfig(
                        "a rank's set-up thread panicked".into(),
                    ))
                })
            })
            .collect()
    })
}
