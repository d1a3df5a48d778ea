//! Multi-process GPU tests: one process per rank, meeting over the TCP
//! rendezvous and sharing memory through CUDA IPC. The binary runs itself
//! again as the workers (LINKREDUCE_TEST_WORKER names the scenario), so it
//! has its own `main` instead of the test harness. Ranks go round-robin
//! over the visible GPUs (two processes share a GPU where there is one).
//!
//! Without a GPU it prints why and passes; with LINKREDUCE_REQUIRE_GPU=1 a
//! missing GPU fails.

mod common;
#[macro_use]
#[path = "common/workers.rs"]
mod workers;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use linkreduce::rendezvous::{TcpRendezvous, TcpRendezvousConfig};
use linkreduce::verify::{check_case_on_rank, check_graph_on_rank, sweep_cases};
use linkreduce::{AlgorithmChoice, Communicator, Config, DType, Error};

/// 73740 leaves an odd number of packets in every dtype (the last two-stage
/// slice then holds an extra packet) and a scalar tail in bf16 and f16.
const LENGTHS: [usize; 8] = [1, 7, 8, 4097, 65536, 73740, (1 << 20) + 3, 32 << 20];
/// Where loop workers say that they are looping.
const READY_DIR_VAR: &str = "LINKREDUCE_TEST_READY_DIR";
/// Exit status of a worker whose check found a wrong result.
const MISMATCH: u8 = 3;

fn main() -> ExitCode {
    workers::main_of(
        worker,
        &[
            ("two_processes_sweep_and_graph_replays", sweep),
            (
                "killing_a_rank_makes_the_other_fail_within_the_deadline",
                kill,
            ),
            ("a_thousand_create_destroy_cycles_leak_nothing", cycles),
        ],
    )
}

/// No variables besides torchrun's.
fn no_env(_rank: usize) -> Vec<(&'static str, String)> {
    Vec::new()
}

fn sweep() -> Result<(), String> {
    workers::expect_success("sweep", 2, Duration::from_secs(540), &no_env)
}

fn cycles() -> Result<(), String> {
    workers::expect_success("cycles", 2, Duration::from_secs(540), &no_env)
}

/// Rank 1 is killed with SIGKILL while both loop over all-reduces; rank 0
/// must report an error within its barrier deadline and exit.
fn kill() -> Result<(), String> {
    let ready = std::env::temp_dir().join(format!("linkreduce-kill-{}", std::process::id()));
    std::fs::create_dir_all(&ready).map_err(|e| e.to_string())?;
    std::env::set_var(READY_DIR_VAR, &ready);
    let mut children = workers::spawn("loop", 2, &no_env)?;
    let both_ready = || (0..2).all(|rank| ready.join(format!("ready-{rank}")).exists());
    let waiting = Instant::now();
    while !both_ready() {
        if waiting.elapsed() > Duration::from_secs(120) {
            children.iter_mut().for_each(|c| drop(c.kill()));
            return Err("the ranks never reached their loop".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    children[1].kill().map_err(|e| e.to_string())?;
    let killed = Instant::now();
    let codes = workers::wait_all(&mut children[..1], Duration::from_secs(20));
    drop(children[1].wait());
    drop(std::fs::remove_dir_all(&ready));
    let took = killed.elapsed();
    match codes?.first() {
        Some(0) if took < Duration::from_secs(10) => {
            println!("rank 0 reported the dead peer {took:?} after the kill");
            Ok(())
        }
        other => Err(format!(
            "rank 0 ended with {other:?} {took:?} after the kill (expected 0 within 10 s)"
        )),
    }
}

/// A worker's communicator (device LOCAL_RANK modulo the GPUs).
fn communicator(config: Config) -> linkreduce::Result<Communicator> {
    Communicator::from_env(config)
}

fn worker(scenario: &str) -> linkreduce::Result<ExitCode> {
    match scenario {
        "sweep" => worker_sweep(),
        "loop" => worker_loop(),
        "cycles" => worker_cycles(),
        other => Err(Error::InvalidConfig(format!("unknown scenario {other}"))),
    }
}

fn worker_sweep() -> linkreduce::Result<ExitCode> {
    let mut comm = communicator(Config::default())?;
    let cases = sweep_cases(&DType::ALL, &LENGTHS);
    let mut failures = 0;
    let started = Instant::now();
    for (seed, &case) in cases.iter().enumerate() {
        let outcome = check_case_on_rank(&mut comm, case, seed as u64)?;
        if !outcome.passed() {
            failures += 1;
            say!("rank {}: MISMATCH {case}: {outcome}", comm.rank());
        }
    }
    for dtype in DType::ALL {
        for algorithm in linkreduce::Algorithm::ALL {
            let (replay, outcome) = check_graph_on_rank(
                &mut comm,
                dtype,
                65536 + 3,
                AlgorithmChoice::Force(algorithm),
                1000,
            )?;
            if !outcome.passed() || replay != 999 {
                failures += 1;
                say!(
                    "rank {}: MISMATCH graph {dtype} ({algorithm} in place) replay {replay}: {outcome}",
                    comm.rank()
                );
            }
        }
    }
    say!(
        "rank {}: {} cases and 6 graphs x 1000 replays in {:.1} s, {failures} failed",
        comm.rank(),
        cases.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(if failures == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(MISMATCH)
    })
}

/// All-reduces until something fails; exits 0 when that something is the
/// dead peer reported within the deadline.
fn worker_loop() -> linkreduce::Result<ExitCode> {
    let deadline = Duration::from_secs(2);
    let mut comm = communicator(Config {
        timeout: deadline,
        ..Config::default()
    })?;
    let input = comm.alloc::<half::bf16>(1 << 20)?;
    let mut output = comm.alloc::<half::bf16>(1 << 20)?;
    comm.register(&input)?;
    let mut calls = 0u64;
    loop {
        let last_success = Instant::now();
        let result = comm
            .all_reduce(&input, &mut output)
            .and_then(|()| comm.synchronize());
        match result {
            Ok(()) => {
                calls += 1;
                if calls == 100 {
                    if let Ok(dir) = std::env::var(READY_DIR_VAR) {
                        let file =
                            std::path::Path::new(&dir).join(format!("ready-{}", comm.rank()));
                        std::fs::write(file, b"")
                            .map_err(|e| Error::InvalidConfig(format!("ready file: {e}")))?;
                    }
                }
            }
            Err(error) => {
                let waited = last_success.elapsed();
                say!(
                    "rank {} after {calls} calls: {error} (reported {waited:?} after the last success)",
                    comm.rank()
                );
                let in_time = waited < deadline * 3;
                return Ok(if in_time && comm.rank() == 0 {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(1)
                });
            }
        }
    }
}

/// Creates and destroys a communicator 1000 times on one rendezvous; GPU
/// memory and open IPC handles must end where they started.
fn worker_cycles() -> linkreduce::Result<ExitCode> {
    let device = TcpRendezvousConfig::local_rank_from_env()? % linkreduce::memory::device_count()?;
    let rendezvous: Arc<dyn linkreduce::rendezvous::Rendezvous> =
        Arc::new(TcpRendezvous::connect(TcpRendezvousConfig::from_env()?)?);
    // Keeps the primary context alive between cycles.
    let ctx = cudarc::driver::CudaContext::new(device)
        .map_err(Error::driver("cuDevicePrimaryCtxRetain"))?;
    let config = Config {
        staging_bytes: 1 << 20,
        scratch_bytes: 1 << 20,
        ..Config::default()
    };
    // `register`: the input is registered (mapped by the peer);
    // `buffers_first`: the caller frees its buffers before the communicator.
    let cycle = |register: bool, buffers_first: bool| -> linkreduce::Result<()> {
        let mut comm = Communicator::new(rendezvous.clone(), device, config.clone())?;
        let input = comm.alloc::<f32>(4096)?;
        let mut output = comm.alloc::<f32>(4096)?;
        if register {
            comm.register(&input)?;
        }
        comm.all_reduce(&input, &mut output)?;
        comm.synchronize()?;
        if buffers_first {
            if register {
                // Peers stop mapping it before it is freed.
                comm.deregister(&input)?;
            }
            drop((input, output));
        }
        drop(comm);
        Ok(())
    };
    let rank = rendezvous.rank();
    let started = Instant::now();
    // The first cycles grow driver-internal state once (module, IPC
    // bookkeeping); a leak keeps growing after them.
    for _ in 0..50 {
        cycle(true, false)?;
    }
    let mut leaks = Vec::new();
    for (register, buffers_first) in [(true, false), (true, true), (false, true)] {
        rendezvous.barrier()?;
        let before = free_memory(&ctx)? >> 20;
        for _ in 0..320 {
            cycle(register, buffers_first)?;
        }
        rendezvous.barrier()?;
        let after = free_memory(&ctx)? >> 20;
        say!(
            "rank {rank}: 320 cycles (registered input {register}, buffers freed first {buffers_first}): free GPU memory {before} -> {after} MiB"
        );
        leaks.push(before.saturating_sub(after));
    }
    // The same cycles without IPC: two ranks as threads of rank 0's
    // process (rank 1 waits at the barrier).
    rendezvous.barrier()?;
    if rank == 0 {
        let before = free_memory(&ctx)? >> 20;
        for _ in 0..320 {
            drop(linkreduce::group::in_process(
                &[device, device],
                config.clone(),
            )?);
        }
        let after = free_memory(&ctx)? >> 20;
        say!("rank 0: 320 in-process groups of 2: free GPU memory {before} -> {after} MiB");
        leaks.push(before.saturating_sub(after));
    }
    rendezvous.barrier()?;
    let handles = linkreduce::ipc::open_handles();
    say!(
        "rank {rank}: cycles done in {:.1} s; open IPC handles {handles}",
        started.elapsed().as_secs_f64()
    );
    // A communicator leaked per cycle would be over 4 MiB each.
    Ok(if leaks.iter().all(|&mib| mib <= 16) && handles == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(MISMATCH)
    })
}

fn free_memory(ctx: &Arc<cudarc::driver::CudaContext>) -> linkreduce::Result<usize> {
    ctx.bind_to_thread()
        .map_err(Error::driver("cuCtxSetCurrent"))?;
    let (free, _total) =
        cudarc::driver::result::mem_get_info().map_err(Error::driver("cuMemGetInfo"))?;
    Ok(free)
}
