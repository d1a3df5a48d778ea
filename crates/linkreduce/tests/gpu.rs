//! Tests on real GPUs. Without one they print why and pass; with
//! LINKREDUCE_REQUIRE_GPU=1 (set on the GPU machine) a missing GPU fails.
//! Run them one at a time (`--test-threads=1`): ranks of two groups on one
//! GPU would compete for residency.
//!
//! The long sweeps (every world size 2..8) live in `linkreduce check`;
//! these cover worlds 2, 3 and 8, a short random soak, and one test per
//! failure the first soaks found (issue 15).

mod common;

use std::time::{Duration, Instant};

use cudarc::driver::{CudaContext, DevicePtr};

use common::gpus;
use linkreduce::group::in_process;
use linkreduce::verify::soak::{AllReduceCase, Memory, Offset, Soak, SoakCase, SoakOp};
use linkreduce::verify::{
    check_case, check_graph, on_every_rank, sweep_cases, values, Case, DeviceChecks, Expect,
    Placement,
};
use linkreduce::{Algorithm, AlgorithmChoice, CallOptions, Communicator, Config, DType, Error};

/// Ranks on `devices`, folded onto the visible GPUs.
fn group_on(devices: &[usize], gpus: usize, config: Config) -> Vec<Communicator> {
    let devices: Vec<usize> = devices.iter().map(|d| d % gpus).collect();
    in_process(&devices, config).unwrap_or_else(|e| panic!("devices {devices:?}: {e}"))
}

/// `world` ranks spread round-robin over (at most two of) the GPUs.
fn group(world: usize, gpus: usize, config: Config) -> Vec<Communicator> {
    let devices: Vec<usize> = (0..world).map(|rank| rank % 2).collect();
    group_on(&devices, gpus, config)
}

/// 73740 leaves an odd number of packets in every dtype (the last two-stage
/// slice then holds an extra packet) and a scalar tail in bf16 and f16.
const LENGTHS: [usize; 8] = [1, 7, 8, 4097, 65536, 73740, (1 << 20) + 3, 32 << 20];

fn sweep_world(world: usize) {
    sweep(world, Config::default(), &Algorithm::ALL);
}

/// Every dtype, length and placement with each of `algorithms` forced, on
/// `world` ranks with `config`; every case must be bitwise right.
fn sweep(world: usize, config: Config, algorithms: &[Algorithm]) {
    let Some(gpus) = gpus() else { return };
    let mut comms = group(world, gpus, config);
    let started = Instant::now();
    let cases: Vec<Case> = sweep_cases(&DType::ALL, &LENGTHS)
        .into_iter()
        .filter(|case| {
            algorithms
                .iter()
                .any(|&a| case.algorithm == AlgorithmChoice::Force(a))
        })
        .collect();
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
fn world_8_ranks_sharing_gpus() {
    sweep_world(8);
}

/// Chunked push through rings of a few packets a slot (64 KiB of scratch:
/// 8 packets at world 2, 4 at world 3): a call cycles every ring many
/// times, blocks take thousands of chunks, and the partial last chunk and
/// packet come at every length.
#[test]
fn chunked_push_through_the_smallest_rings() {
    let config = Config {
        scratch_bytes: 64 << 10,
        ..Config::default()
    };
    sweep(2, config.clone(), &[Algorithm::ChunkedPush]);
    sweep(3, config, &[Algorithm::ChunkedPush]);
}

/// Every algorithm with the grid capped below its default (as a tuned
/// table or `CallOptions::max_blocks` caps it) still sums bitwise right:
/// blocks then stride over more packets, chunks and slices each.
#[test]
fn capped_grids_give_the_same_sums() {
    let Some(gpus) = gpus() else { return };
    let mut comms = group(2, gpus, Config::default());
    let lengths = [7, 4097, 73740, (1 << 20) + 3];
    let mut failures = Vec::new();
    let mut cases = 0;
    for blocks in [1, 3, 50] {
        for case in sweep_cases(&DType::ALL, &lengths) {
            let case = Case {
                max_blocks: Some(blocks),
                ..case
            };
            let outcome =
                check_case(&mut comms, case, cases).unwrap_or_else(|e| panic!("{case}: {e}"));
            if !outcome.passed() {
                failures.push(format!("{case}: {outcome}"));
            }
            cases += 1;
        }
    }
    eprintln!("{cases} cases with capped grids, {} failed", failures.len());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Runs random cases `0..warmup` of `seed` (they leave freed, reused and
/// held buffers behind, as a caller would), then `cases`, then `after`
/// more random ones, on ranks on `devices`; every one must pass.
fn replay(devices: &[usize], warmup: u64, cases: &[SoakCase], after: u64) {
    let Some(gpus) = gpus() else { return };
    let max_len = 1 << 20;
    let seed = 15;
    let mut comms = group_on(devices, gpus, Config::default());
    let results = on_every_rank(&mut comms, |comm| {
        let mut soak = Soak::new(comm, max_len)?;
        let random = |n| SoakCase::generate(seed, n, max_len);
        let sequence = (0..warmup)
            .map(random)
            .chain(cases.iter().copied())
            .chain((0..after).map(|n| random(1000 + n)));
        for case in sequence {
            let outcome = soak.run(comm, &case, seed)?;
            if !outcome.passed() {
                return Ok(Err(format!("{case}: {outcome}")));
            }
        }
        soak.finish(comm)?;
        Ok(Ok(()))
    })
    .unwrap_or_else(|e| panic!("devices {devices:?}: {e}"));
    for result in results {
        result.unwrap_or_else(|why| panic!("devices {devices:?}: {why}"));
    }
}

fn case(
    dtype: DType,
    len: usize,
    algorithm: AlgorithmChoice,
    input: Memory,
    output: Option<Memory>,
) -> SoakCase {
    SoakCase {
        number: 500,
        op: SoakOp::AllReduce(AllReduceCase {
            dtype,
            len,
            algorithm,
            input,
            output,
            replays: 0,
            free_input_early: false,
            hold: 0,
        }),
    }
}

const POOL: Memory = Memory::Pool(Offset::Same(0));
const PUSH: AlgorithmChoice = AlgorithmChoice::Force(Algorithm::Push);

/// Failure 1: f32, 17 789 elements, automatic, in place on cudarc pool
/// memory, ranks sharing GPUs: wrong sums and illegal addresses.
#[test]
fn failure_1_in_place_pool_memory_on_shared_gpus() {
    let failing = case(DType::F32, 17789, AlgorithmChoice::Auto, POOL, None);
    replay(&[0, 1, 0, 1], 40, &[failing], 10);
    replay(&[0, 1, 0], 40, &[failing], 10);
}

/// Failure 2: bf16, 100 288 elements, push, in place on pool memory.
#[test]
fn failure_2_push_in_place_on_pool_memory() {
    let failing = case(DType::BF16, 100288, PUSH, POOL, None);
    replay(&[0, 0], 40, &[failing], 10);
    replay(&[0, 1, 0], 40, &[failing], 10);
}

/// Failure 3: f16, 8 elements, push, out of place from a pool view at
/// element offset 2, the first call of its group.
#[test]
fn failure_3_push_from_a_misaligned_pool_view_first_call() {
    let failing = case(
        DType::F16,
        8,
        PUSH,
        Memory::Pool(Offset::Same(2)),
        Some(Memory::Buffer),
    );
    replay(&[0, 1, 0, 1], 0, &[failing], 10);
}

/// Failure 4: bf16, 949 750 elements, one-stage, registered buffers freed
/// right after deregistration while the rank sharing the GPU already runs
/// the next call (it timed out). Failure 5: the ranks stay in step after.
#[test]
fn failure_4_and_5_buffers_freed_after_deregistration_on_a_shared_gpu() {
    let one_stage = AlgorithmChoice::Force(Algorithm::OneStage);
    let from = |input| case(DType::BF16, 949750, one_stage, input, Some(Memory::Buffer));
    let failing = from(Memory::Registered);
    let next = from(Memory::Buffer);
    replay(&[0, 0], 20, &[failing, failing, next, failing], 20);
}

/// Failure 6: buffers and views at addresses that are not a multiple of
/// 16 bytes, in place and as outputs, alike on every rank or not.
#[test]
fn failure_6_misaligned_inputs_and_outputs_work() {
    let mut cases = Vec::new();
    for dtype in DType::ALL {
        for algorithm in [
            AlgorithmChoice::Auto,
            PUSH,
            AlgorithmChoice::Force(Algorithm::TwoStage),
        ] {
            for (input, output) in [
                (Memory::Arena(Offset::Same(1)), None),
                (Memory::Pool(Offset::Same(3)), None),
                (Memory::Buffer, Some(Memory::Pool(Offset::Same(5)))),
                (
                    Memory::Arena(Offset::PerRank(7)),
                    Some(Memory::Arena(Offset::PerRank(9))),
                ),
                (Memory::Pool(Offset::PerRank(3)), None),
            ] {
                cases.push(case(dtype, 4099, algorithm, input, output));
            }
        }
    }
    replay(&[0, 1, 0, 1], 0, &cases, 0);
}

#[test]
fn random_soak_with_ranks_sharing_gpus() {
    replay(&[0, 1, 0, 1], 400, &[], 0);
    replay(&[0, 1, 0], 200, &[], 0);
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
    // One-stage, whose start barrier waits for every peer (a shipped
    // tuning table may send this size to push, which waits at barrier 99).
    let one_stage = CallOptions {
        algorithm: AlgorithmChoice::Force(Algorithm::OneStage),
        zero_copy: false,
        max_blocks: None,
    };
    let started = Instant::now();
    comm.all_reduce_with(&input, &mut output, one_stage)
        .unwrap();
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
            // A kernel that reads peers' inputs (push reads only its own,
            // so it needs no registration).
            CallOptions {
                algorithm: AlgorithmChoice::Force(Algorithm::OneStage),
                zero_copy: true,
                max_blocks: None,
            },
        );
        comm.register(&input)?;
        let full = comm.register(&comm.alloc::<f32>(16)?);
        Ok((length, zero_copy, full))
    })
    .unwrap();
    for (length, zero_copy, full) in results {
        assert!(matches!(
            length,
            Err(Error::LengthMismatch {
                input: 1024,
                output: 1000
            })
        ));
        assert!(matches!(zero_copy, Err(Error::NotRegistered { .. })));
        assert!(matches!(full, Err(Error::RecordTableFull { capacity: 2 })));
    }
    // Nothing above reached the GPU, so the group still works, with inputs
    // larger than the staging buffer too (they go through it in pieces).
    for len in [4099, 3 << 20] {
        let case = Case {
            dtype: DType::BF16,
            len,
            algorithm: AlgorithmChoice::Auto,
            placement: Placement::Staged,
            max_blocks: None,
        };
        let outcome = check_case(&mut comms, case, 5).unwrap();
        assert!(outcome.passed(), "{case}: {outcome}");
    }
}

/// The negative control: the device checker must see one wrong bit among
/// millions of elements, at either end, in every dtype and both rules.
#[test]
fn the_checker_catches_a_single_wrong_element() {
    let Some(_) = gpus() else { return };
    let ctx = CudaContext::new(0).unwrap();
    let stream = ctx.new_stream().unwrap();
    let checks = DeviceChecks::new(&stream, 1).unwrap();
    let (seed, world, len) = (99, 3, 3_000_001u64);
    for dtype in DType::ALL {
        for push in [false, true] {
            let size = dtype.size();
            let bytes: Vec<u8> = (0..len)
                .flat_map(|i| {
                    let bits = values::sum_bits(dtype, seed, world, i, push);
                    bits.to_le_bytes()[..size].to_vec()
                })
                .collect();
            let mut data = stream.clone_htod(&bytes).unwrap();
            let expect = Expect::Sum { seed, world, push };
            let check = |data: &cudarc::driver::CudaSlice<u8>| {
                let (ptr, _record) = data.device_ptr(&stream);
                checks.reset().unwrap();
                // SAFETY: `data` holds `len` elements of `dtype`.
                unsafe { checks.expect(0, dtype, ptr, len as usize, expect) }.unwrap();
                checks.read(1).unwrap()[0]
            };
            assert_eq!(check(&data).mismatches, 0, "{dtype} push {push}: intact");
            // A sign flip near the start (on a non-zero: push may flip a
            // zero's sign), the lowest mantissa bit at the end.
            let magnitude = |i| values::sum_bits(dtype, seed, world, i, push) << (33 - 8 * size);
            let nonzero = (0..len).find(|&i| magnitude(i) != 0).unwrap();
            for (index, flip) in [(nonzero, 0x80u8), (len - 1, 0x01)] {
                let at = (index as usize) * size + if flip == 0x80 { size - 1 } else { 0 };
                let mut wrong = bytes[at..at + 1].to_vec();
                wrong[0] ^= flip;
                stream
                    .memcpy_htod(&wrong, &mut data.slice_mut(at..at + 1))
                    .unwrap();
                let found = check(&data);
                assert_eq!(
                    (found.mismatches, found.first),
                    (1, Some(index)),
                    "{dtype} push {push}: element {index} changed"
                );
                stream
                    .memcpy_htod(&bytes[at..at + 1], &mut data.slice_mut(at..at + 1))
                    .unwrap();
            }
        }
    }
}
