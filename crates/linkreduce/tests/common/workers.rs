//! Multi-process test binaries: the binary runs itself again as one worker
//! process per rank (LINKREDUCE_TEST_WORKER names the scenario), started
//! torchrun-style, so it has its own `main` instead of the test harness.
//! Included with `#[macro_use] #[path = "common/workers.rs"] mod workers;`.

use std::net::TcpListener;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

pub const WORKER_VAR: &str = "LINKREDUCE_TEST_WORKER";

/// Writes one line to stderr in a single write, so that lines of workers
/// sharing the parent's stderr do not interleave.
macro_rules! say {
    ($($arg:tt)*) => {{
        let line = format!("{}\n", format_args!($($arg)*));
        drop(std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes()));
    }};
}

/// A parent-side test: Err says what went wrong.
pub type Scenario = fn() -> Result<(), String>;

/// Environment variables of one rank's worker, besides torchrun's.
pub type RankEnv<'a> = &'a dyn Fn(usize) -> Vec<(&'static str, String)>;

/// The binary's `main`: a worker runs its scenario; the parent runs every
/// test (none without a GPU, after saying why) and reports like the harness.
pub fn main_of(
    worker: fn(&str) -> linkreduce::Result<ExitCode>,
    tests: &[(&str, Scenario)],
) -> ExitCode {
    if let Ok(scenario) = std::env::var(WORKER_VAR) {
        return match worker(&scenario) {
            Ok(code) => code,
            Err(error) => {
                say!("rank error in {scenario}: {error}");
                ExitCode::from(1)
            }
        };
    }
    if super::common::gpus().is_none() {
        return ExitCode::SUCCESS;
    }
    let mut failed = 0;
    for (name, test) in tests {
        let started = Instant::now();
        let result = test();
        let seconds = started.elapsed().as_secs_f64();
        match result {
            Ok(()) => println!("test {name} ... ok ({seconds:.1} s)"),
            Err(why) => {
                failed += 1;
                println!("test {name} ... FAILED ({seconds:.1} s)\n{why}");
            }
        }
    }
    println!(
        "test result: {}. {} passed; {failed} failed",
        if failed == 0 { "ok" } else { "FAILED" },
        tests.len() - failed
    );
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Starts `world` workers of `scenario`, torchrun-style, each with `env`'s
/// variables for its rank.
pub fn spawn(scenario: &str, world: usize, env: RankEnv) -> Result<Vec<Child>, String> {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("no free port: {e}"))?
        .port();
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    (0..world)
        .map(|rank| {
            Command::new(&exe)
                .env(WORKER_VAR, scenario)
                .env("RANK", rank.to_string())
                .env("LOCAL_RANK", rank.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .envs(env(rank))
                .stdin(Stdio::null())
                .spawn()
                .map_err(|e| format!("cannot start a worker: {e}"))
        })
        .collect()
}

/// Waits for every worker, at most `limit`; kills the rest after that.
pub fn wait_all(children: &mut [Child], limit: Duration) -> Result<Vec<i32>, String> {
    let deadline = Instant::now() + limit;
    let mut codes = vec![None; children.len()];
    while codes.iter().any(Option::is_none) {
        for (code, child) in codes.iter_mut().zip(children.iter_mut()) {
            if code.is_none() {
                if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
                    *code = Some(status.code().unwrap_or(-1));
                }
            }
        }
        if Instant::now() > deadline {
            children.iter_mut().for_each(|c| drop(c.kill()));
            return Err(format!("workers still running after {limit:?}: {codes:?}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(codes.into_iter().flatten().collect())
}

/// Runs `world` workers of `scenario`; all must exit 0 within `limit`.
pub fn expect_success(
    scenario: &str,
    world: usize,
    limit: Duration,
    env: RankEnv,
) -> Result<(), String> {
    let mut children = spawn(scenario, world, env)?;
    let codes = wait_all(&mut children, limit)?;
    if codes.iter().all(|&c| c == 0) {
        Ok(())
    } else {
        Err(format!(
            "worker exit codes {codes:?} (see their output above)"
        ))
    }
}
