//! The all-reduce fused with residual add and RMSNorm, on real GPUs: the
//! fused call and the unfused sequence (all-reduce, then the plain kernel)
//! must both equal the host's mirror bit for bit on random non-integer
//! data, for odd hidden sizes, many rows, graphs, and ranks sharing GPUs.
//! Without a GPU they print why and pass; with LINKREDUCE_REQUIRE_GPU=1 a
//! missing GPU fails. Run them one at a time (`--test-threads=1`).

mod common;

use common::gpus;
use linkreduce::group::in_process;
use linkreduce::verify::fused::{check_norm_case, norm_sweep_cases, NormCase};
use linkreduce::verify::on_every_rank;
use linkreduce::{Algorithm, AlgorithmChoice, Communicator, Config, DType, Error, RmsNorm};

/// `world` ranks round-robin over (at most two of) the GPUs, with staging
/// and push segments small enough that long calls take several launches
/// (fused push takes calls up to 1 MiB; 64 KiB segments cut them).
fn group(world: usize, gpus: usize) -> Vec<Communicator> {
    let devices: Vec<usize> = (0..world).map(|rank| rank % 2 % gpus).collect();
    let config = Config {
        staging_bytes: 2 << 20,
        push_bytes: 64 << 10,
        ..Config::default()
    };
    in_process(&devices, config).unwrap_or_else(|e| panic!("devices {devices:?}: {e}"))
}

fn check_all(comms: &mut [Communicator], cases: &[NormCase]) {
    let mut failures = Vec::new();
    for (seed, &case) in cases.iter().enumerate() {
        let outcome =
            check_norm_case(comms, case, seed as u64).unwrap_or_else(|e| panic!("{case}: {e}"));
        if !outcome.passed() {
            failures.push(format!("{case}: {outcome}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Hidden sizes of models, odd ones (not a multiple of a packet, not of a
/// warp), one row longer than a block covers in one pass, and row counts
/// from one to more than one launch holds (2 MiB staging: 2048 x 4096 x 2
/// bytes takes 8 launches of 128 rows).
const SHAPES: [(usize, usize); 9] = [
    (1, 4096),
    (8, 8192),
    (3, 16384),
    (5, 16387),
    (32, 1000),
    (7, 13),
    (1, 1),
    (2048, 4096),
    (129, 2050),
];

#[test]
fn fused_and_unfused_equal_the_mirror_on_two_ranks() {
    let Some(gpus) = gpus() else { return };
    let mut comms = group(2, gpus);
    check_all(
        &mut comms,
        &norm_sweep_cases(&[DType::BF16, DType::F16], &SHAPES),
    );
}

#[test]
fn ranks_sharing_gpus_three_and_eight() {
    let Some(gpus) = gpus() else { return };
    for world in [3, 8] {
        let mut comms = group(world, gpus);
        let shapes = [(1, 4096), (33, 8192), (4, 16387), (600, 512)];
        check_all(&mut comms, &norm_sweep_cases(&[DType::BF16], &shapes));
    }
}

#[test]
fn graphs_replayed_with_fresh_data_stay_exact() {
    let Some(gpus) = gpus() else { return };
    let mut comms = group(2, gpus);
    let mut cases = Vec::new();
    for algorithm in [
        AlgorithmChoice::Force(Algorithm::OneStage),
        AlgorithmChoice::Force(Algorithm::TwoStage),
        AlgorithmChoice::Force(Algorithm::Push),
    ] {
        // Push: 8 x 4096 fills one 64 KiB segment; 3 x 4099 pads its rows;
        // 300 x 8192 is past what push fuses, so it runs unfused.
        for (rows, hidden) in [(8, 4096), (300, 8192), (3, 4099), (60, 1000)] {
            cases.push(NormCase {
                dtype: DType::F16,
                rows,
                hidden,
                algorithm,
                graph_replays: 20,
            });
        }
    }
    check_all(&mut comms, &cases);
}

#[test]
fn bad_calls_get_typed_errors_and_leave_the_group_usable() {
    let Some(gpus) = gpus() else { return };
    let mut comms = group(2, gpus);
    let results = on_every_rank(&mut comms, |comm| {
        let input = comm.alloc::<half::bf16>(4096)?;
        let mut residual = comm.alloc::<half::bf16>(4096)?;
        let mut out = comm.alloc::<half::bf16>(4096)?;
        let odd_weight = comm.alloc::<half::bf16>(3000)?;
        let weight = comm.alloc::<half::bf16>(1024)?;
        let rows = comm.all_reduce_add_rms_norm(&input, &mut residual, &odd_weight, 1e-6, &mut out);
        let eps = comm.all_reduce_add_rms_norm(&input, &mut residual, &weight, -1.0, &mut out);
        let f32_input = comm.alloc::<f32>(1024)?;
        let mut f32_out = comm.alloc::<f32>(1024)?;
        let f32_weight = comm.alloc::<f32>(1024)?;
        let dtype = comm.add_rms_norm_on(
            &comm.stream().clone(),
            &f32_input,
            &mut comm.alloc::<f32>(1024)?,
            RmsNorm {
                weight: &f32_weight,
                eps: 1e-6,
            },
            &mut f32_out,
        );
        Ok((rows, eps, dtype))
    })
    .unwrap();
    for (rows, eps, dtype) in results {
        assert!(matches!(
            rows,
            Err(Error::RowLength {
                len: 4096,
                hidden: 3000
            })
        ));
        assert!(matches!(eps, Err(Error::InvalidEps(_))));
        assert!(matches!(dtype, Err(Error::UnsupportedDType { .. })));
    }
    check_all(&mut comms, &norm_sweep_cases(&[DType::BF16], &[(16, 4096)]));
}
