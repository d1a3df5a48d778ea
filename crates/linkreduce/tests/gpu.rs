//! Tests on real GPUs. Without one they print why and pass; with
//! LINKREDUCE_REQUIRE_GPU=1 (set on the GPU machine) a missing GPU fails.
//! Run them one at a time (`--test-threads=1`): ranks of two groups on one
//! GPU would compete for residency.

mod common;

use std::time::{Duration, Instant};

use common::gpus;
use linkreduce::group::in_process;
use linkreduce::verify::{check_case, check_graph, on_every_rank, sweep_cases, Case, Placement};
use linkreduce::{Algorithm, AlgorithmChoice, CallOptions, Communicator, Config, DType, Error};

/// `world` ranks spread round-robin over the visible GPUs.
fn group(world: usize, gpus: usize, config: Config) -> Vec<Communicator> {
    let devices: Vec<usize> = (0..world).map(|rank| rank % gpus.min(2)).collect();
    in_process(&devices, config).unwrap_or_else(|e| panic!("world {world}: {e}"))
}

/// 73740 leaves an odd number of packets in every dtype (the last two-stage
/// slice then holds an extra packet) and a scalar tail in bf16 and f16.
const LENGTHS: [usize; 8] = [1, 7, 8, 4097, 65536, 73740, (1 << 20) + 3, 32 << 20];

fn sweep_world(world: usize) {
    let Some(gpus) = gpus() else { return };
    let mut comms = group(world, gpus, Config::default());
    let started = Instant::now();
    let cases = sweep_cases(&DType::ALL, &LENGTHS, comms[0].config().staging_bytes);
    let mut failures = Vec::new();
    for (seed, &case) in cases.iter().enumerate() {
        let outcome =
            check_case(&mut comms, case, seed as u64).unwrap_or_else(|e| panic!("{case}: {e}"));
        if !outcome.passed() {
            failures.push(format!("{case}: {outcome}"));
        }
    }
    eprintln!(
        "world {world}: {} cases in {:.1} s, {} failed",
        cases.len(),
        started.elapsed().as_secs_f64(),
        failures.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn world_2_every_dtype_algorithm_length_and_placement() {
    sweep_world(2);
}

#[test]
fn world_3_ranks_sharing_gpus() {
    sweep_world(3);
}

#[test]
fn world_4_ranks_sharing_gpus() {
    sweep_world(4);
}

#[test]
fn world_5_ranks_sharing_gpus() {
    sweep_world(5);
}

#[test]
fn world_6_ranks_sharing_gpus() {
    sweep_world(6);
}

#[test]
fn world_7_ranks_sharing_gpus() {
    sweep_world(7);
}

#[test]
fn world_8_ranks_sharing_gpus() {
    sweep_world(8);
}

#[test]
fn captured_graph_replayed_1000_times_stays_correct() {
    let Some(gpus) = gpus() else { return };
    for (world, dtype, in_place) in [
        (2, DType::BF16, Algorithm::TwoStage),
        (4, DType::F16, Algorithm::TwoStage),
        (3, DType::F32, Algorithm::OneStage),
    ] {
        let mut comms = group(world, gpus, Config::default());
        let (replay, outcome) = check_graph(
            &mut comms,
            dtype,
            65536 + 3,
            AlgorithmChoice::Force(in_place),
            1000,
        )
        .unwrap_or_else(|e| panic!("world {world} {dtype}: {e}"));
        assert!(
            outcome.passed(),
            "world {world} {dtype}: replay {replay}: {outcome}"
        );
        assert_eq!(replay, 999);
    }
}

#[test]
fn a_rank_that_never_arrives_makes_the_others_time_out() {
    let Some(gpus) = gpus() else { return };
    let config = Config {
        timeout: Duration::from_millis(1500),
        ..Config::default()
    };
    let mut comms = group(2, gpus, config);
    // Rank 1 exists but never calls.
    let comm = &mut comms[0];
    let input = comm.alloc::<f32>(4096).unwrap();
    let mut output = comm.alloc::<f32>(4096).unwrap();
    let started = Instant::now();
    comm.all_reduce(&input, &mut output).unwrap();
    let error = comm.synchronize().unwrap_err();
    let waited = started.elapsed();
    match error {
        Error::PeerTimeout {
            rank: 0,
            peer: 1,
            barrier: 0,
            ..
        } => {}
        other => panic!("expected a timeout waiting for rank 1, got {other}"),
    }
    assert!(waited < Duration::from_secs(5), "took {waited:?}");
    assert!(matches!(
        comm.all_reduce(&input, &mut output),
        Err(Error::Poisoned(_))
    ));
}

#[test]
fn bad_calls_get_clear_errors_and_leave_the_group_usable() {
    let Some(gpus) = gpus() else { return };
    let config = Config {
        max_records: 2,
        staging_bytes: 1 << 20,
        ..Config::default()
    };
    let mut comms = group(2, gpus, config);
    let results = on_every_rank(&mut comms, |comm| {
        let input = comm.alloc::<f32>(1024)?;
        let mut short = comm.alloc::<f32>(1000)?;
        let length = comm.all_reduce(&input, &mut short);
        let zero_copy = comm.all_reduce_with(
            &input,
            &mut comm.alloc::<f32>(1024)?,
            CallOptions {
                zero_copy: true,
                ..CallOptions::default()
            },
        );
        let big = comm.alloc::<f32>(1 << 20)?;
        let too_large = comm.all_reduce(&big, &mut comm.alloc::<f32>(1 << 20)?);
        comm.register(&input)?;
        let full = comm.register(&comm.alloc::<f32>(16)?);
        Ok((length, zero_copy, too_large, full))
    })
    .unwrap();
    for (length, zero_copy, too_large, full) in results {
        assert!(matches!(
            length,
            Err(Error::LengthMismatch {
                input: 1024,
                output: 1000
            })
        ));
        assert!(matches!(zero_copy, Err(Error::NotRegistered { .. })));
        assert!(matches!(too_large, Err(Error::InputTooLarge { .. })));
        assert!(matches!(full, Err(Error::RecordTableFull { capacity: 2 })));
    }
    // Nothing above reached the GPU, so the group still works.
    let case = Case {
        dtype: DType::BF16,
        len: 4099,
        algorithm: AlgorithmChoice::Auto,
        placement: Placement::Staged,
    };
    let outcome = check_case(&mut comms, case, 5).unwrap();
    assert!(outcome.passed(), "{outcome}");
}
