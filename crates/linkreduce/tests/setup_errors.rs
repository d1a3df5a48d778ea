//! Set-up errors that need no GPU.

use linkreduce::group::in_process;
use linkreduce::{Config, Error};

#[test]
fn an_empty_group_is_refused_before_touching_a_gpu() {
    match in_process(&[], Config::default()) {
        Err(Error::UnsupportedWorldSize(0)) => {}
        Err(other) => panic!("expected UnsupportedWorldSize, got {other}"),
        Ok(_) => panic!("a group of no ranks was created"),
    }
}

/// One rank, or more than the kernels cover, take NCCL instead of being
/// refused (docs/design.md, "Path choice"); without a GPU set-up then fails
/// for the GPU.
#[test]
fn world_sizes_outside_the_kernels_are_not_refused_for_their_size() {
    for devices in [vec![0], vec![0; 9]] {
        let world = devices.len();
        match in_process(&devices, Config::default()) {
            Ok(comms) => {
                assert_eq!(comms.len(), world);
                assert!(comms.iter().all(|comm| comm.nccl_only()));
            }
            Err(Error::DriverNotFound | Error::NoDevice | Error::NcclNotFound) => {}
            // Nine ranks on one GPU: the kernels cover 8 and NCCL refuses
            // ranks sharing a GPU.
            Err(Error::NoPath { first, second, .. }) if world == 9 => {
                assert_eq!((first, second), (0, 1))
            }
            Err(other) => panic!("{world} ranks: unexpected error {other}"),
        }
    }
}

#[test]
fn without_a_gpu_set_up_fails_with_a_clear_error() {
    match in_process(&[0, 0], Config::default()) {
        Ok(_) => eprintln!("a GPU is present: nothing to check"),
        Err(Error::DriverNotFound | Error::NoDevice) => {}
        Err(other) => panic!("expected DriverNotFound or NoDevice, got {other}"),
    }
}

#[test]
fn invalid_configuration_is_refused() {
    let config = Config {
        max_blocks: 0,
        ..Config::default()
    };
    match in_process(&[0, 0], config) {
        Err(Error::InvalidConfig(_)) => {}
        Err(other) => panic!("expected InvalidConfig, got {other}"),
        Ok(_) => panic!("max_blocks 0 was accepted"),
    }
}
