//! Set-up errors that need no GPU.

use linkreduce::group::in_process;
use linkreduce::{Config, Error};

#[test]
fn world_sizes_outside_2_to_8_are_refused_before_touching_a_gpu() {
    for devices in [vec![], vec![0], vec![0; 9]] {
        match in_process(&devices, Config::default()) {
            Err(Error::UnsupportedWorldSize(n)) => assert_eq!(n, devices.len()),
            Err(other) => panic!(
                "{} ranks: expected UnsupportedWorldSize, got {other}",
                devices.len()
            ),
            Ok(_) => panic!("{} ranks: a group was created", devices.len()),
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
