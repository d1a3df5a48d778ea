//! Reduce-scatter and all-gather on real GPUs: every output element equal
//! bit for bit to the rank-order f32 reference on random non-integer data,
//! for odd counts, views at offsets, in place, graphs with replays, ranks
//! sharing GPUs, and NCCL on two GPUs; bad calls get typed errors and
//! write nothing. Without a GPU they print why and pass; with
//! LINKREDUCE_REQUIRE_GPU=1 a missing GPU fails. Run them one at a time
//! (`--test-threads=1`).

mod common;

use common::gpus;
use linkreduce::group::in_process;
use linkreduce::verify::on_every_rank;
use linkreduce::verify::scatter_gather::{check_sg_case, sg_sweep_cases, SgBuffers, SgCase};
use linkreduce::{
    Algorithm, AlgorithmChoice, CallOptions, Communicator, Config, DType, Error, ScatterGather,
};

/// Ranks on `devices` folded onto the visible GPUs, with staging small
/// enough that the longest counts take several launches.
fn group(devices: &[usize], gpus: usize) -> Vec<Communicator> {
    let devices: Vec<usize> = devices.iter().map(|d| d % gpus).collect();
    let config = Config {
        staging_bytes: 2 << 20,
        ..Config::default()
    };
    in_process(&devices, config).unwrap_or_else(|e| panic!("devices {devices:?}: {e}"))
}

fn check_all(comms: &mut [Communicator], cases: &[SgCase]) {
    let mut failures = Vec::new();
    for (seed, &case) in cases.iter().enumerate() {
        let outcome =
            check_sg_case(comms, case, seed as u64).unwrap_or_else(|e| panic!("{case}: {e}"));
        if !outcome.passed() {
            failures.push(format!("{case}: {outcome}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Odd counts (a scalar tail in every dtype, blocks that do not start on a
/// packet), whole packets, and counts longer than one launch (2 MiB of
/// staging on 2 ranks: 262144 f32 per block).
const COUNTS: [usize; 7] = [1, 7, 8, 4097, 65536, 73741, (1 << 19) + 3];

#[test]
fn two_ranks_every_dtype_count_and_buffer_kind() {
    let Some(gpus) = gpus() else { return };
    let mut comms = group(&[0, 1], gpus);
    check_all(
        &mut comms,
        &sg_sweep_cases(&DType::ALL, &COUNTS, AlgorithmChoice::Auto),
    );
}

#[test]
fn three_ranks_on_two_gpus_and_eight_sharing() {
    let Some(gpus) = gpus() else { return };
    for devices in [&[0, 1, 0][..], &[0, 1, 0, 1, 0, 1, 0, 1]] {
        let mut comms = group(devices, gpus);
        let counts = [5, 4096, 73741, 300_001];
        let cases = sg_sweep_cases(&[DType::BF16, DType::F32], &counts, AlgorithmChoice::Auto);
        check_all(&mut comms, &cases);
    }
}

#[test]
fn graphs_replayed_with_fresh_data_stay_exact() {
    let Some(gpus) = gpus() else { return };
    let mut comms = group(&[0, 1, 0], gpus);
    let mut cases = Vec::new();
    for op in ScatterGather::ALL {
        for buffers in [SgBuffers::Separate, SgBuffers::OddViews, SgBuffers::InPlace] {
            for count in [4096, 73741, 400_003] {
                cases.push(SgCase {
                    op,
                    dtype: DType::F16,
                    count,
                    algorithm: AlgorithmChoice::Force(Algorithm::OneStage),
                    buffers,
                    graph_replays: 10,
                });
            }
        }
    }
    check_all(&mut comms, &cases);
}

#[test]
fn nccl_gives_the_same_bits_on_two_gpus() {
    let Some(gpus) = gpus() else { return };
    if gpus < 2 {
        eprintln!("skipping: NCCL needs two GPUs, {gpus} visible");
        return;
    }
    let mut comms = group(&[0, 1], gpus);
    // Both paths are checked against the same reference, so they agree.
    for algorithm in [AlgorithmChoice::Nccl, AlgorithmChoice::Auto] {
        let cases = sg_sweep_cases(&DType::ALL, &[7, 4097, 73741], algorithm);
        check_all(&mut comms, &cases);
    }
}

/// Every bad call on one rank's buffers (each must fail before enqueueing),
/// and whether the buffers still hold their zeros afterwards.
type BadCalls = (Vec<linkreduce::Result<()>>, bool);

fn bad_calls(comm: &mut Communicator) -> linkreduce::Result<BadCalls> {
    let stream = comm.stream().clone();
    let world = comm.world_size();
    let options = CallOptions::default();
    let send = comm.alloc::<f32>(64 * world)?;
    let mut short = comm.alloc::<f32>(63)?;
    let mut results = vec![
        comm.reduce_scatter(&send, &mut short),
        comm.all_gather(&short, &mut comm.alloc::<f32>(64 * world + 1)?),
    ];
    let mut odd = comm.alloc::<f32>(64 * world + 1)?;
    results.push(comm.reduce_scatter_in_place_on(&stream, &mut odd, options));
    let buffer = comm.alloc::<f32>(64 * world * 2)?;
    let at = buffer.device_address();
    // SAFETY: every address lies inside `buffer` with the lengths named
    // (64 x world elements from `at`, at most 128 x world in all); the
    // calls are refused before anything reads or writes them.
    unsafe {
        // A partial overlap; another rank's block (wrong in-place layout).
        let other = ((comm.rank() + 1) % world * 64 * 4) as u64;
        results.push(comm.reduce_scatter_raw(&stream, DType::F32, at, at + 8, 64, options));
        results.push(comm.reduce_scatter_raw(&stream, DType::F32, at, at + other, 64, options));
        results.push(comm.all_gather_raw(&stream, DType::F32, at + other, at, 64, options));
    }
    let mut held = comm.download(&buffer)?;
    held.extend(comm.download(&short)?);
    held.extend(comm.download(&send)?);
    Ok((results, held.iter().all(|v| v.to_bits() == 0)))
}

#[test]
fn bad_calls_get_typed_errors_and_leave_the_group_usable() {
    let Some(gpus) = gpus() else { return };
    let mut comms = group(&[0, 1, 0], gpus);
    let results = on_every_rank(&mut comms, bad_calls).unwrap();
    for (per_rank, untouched) in results {
        assert!(untouched, "a refused call wrote into its buffers");
        let [rs_len, ag_len, in_place_len, partial, rs_layout, ag_layout] = &per_rank[..] else {
            panic!("expected six results, got {}", per_rank.len());
        };
        for length in [rs_len, ag_len, in_place_len] {
            assert!(
                matches!(length, Err(Error::ScatterGatherLength { .. })),
                "{length:?}"
            );
        }
        for overlap in [partial, rs_layout, ag_layout] {
            assert!(
                matches!(overlap, Err(Error::ScatterGatherOverlap { .. })),
                "{overlap:?}"
            );
        }
    }
    // Nothing was enqueued: the group still works and every guard holds.
    let cases = sg_sweep_cases(&[DType::F32], &[4097], AlgorithmChoice::Auto);
    check_all(&mut comms, &cases);
}
