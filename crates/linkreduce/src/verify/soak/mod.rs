//! The random soak (`linkreduce check --random N`): a seeded sequence of
//! collectives used the way callers use them, each checked bitwise.
//!
//! Case `n` of seed `s` is the same on every rank and in every run. Most
//! are all-reduces, which draw the dtype, a log-uniform length, the
//! algorithm (automatic or forced), in place or not, where each buffer
//! comes from (our allocation, registered or not; cudarc's stream-ordered
//! pool; a view into a registered arena), element offsets that may differ
//! between ranks (so some ranks read in place while others stage), eager or
//! captured in a graph and replayed, and when buffers are freed: right
//! after the call is enqueued, at the end of the case, or in the middle of
//! a later case. About 15% each are fused all-reduce + residual add +
//! RMSNorm, reduce-scatter and all-gather cases (random shapes, dtypes,
//! buffers, eager or graphs), run by the checkers the fixed sweep uses
//! (`verify::fused`, `verify::scatter_gather`).
//!
//! `case` picks each case's op and draws the fused and scatter/gather
//! cases, `all_reduce` draws the all-reduces; `run` runs a case on a rank
//! and checks it.

mod all_reduce;
mod case;
mod run;

use std::collections::HashMap;

pub use all_reduce::{AllReduceCase, Memory, Offset};
pub use case::{SoakCase, SoakOp};
pub use run::Soak;

use crate::comm::Communicator;
use crate::error::Result;

/// What a soak runs.
#[derive(Debug, Clone, Copy)]
pub struct SoakOptions {
    pub seed: u64,
    /// The first case's number (cases before it are skipped, not run).
    pub first_case: u64,
    pub cases: u64,
    /// Longest message, in elements.
    pub max_len: usize,
}

/// How a soak ended.
#[derive(Debug, Clone)]
pub struct SoakReport {
    /// Cases that ran and passed.
    pub passed: u64,
    /// The first case that failed, and why.
    pub failure: Option<(SoakCase, String)>,
    /// Counts of what the passed cases covered, by name.
    pub covered: Vec<(String, u64)>,
}

/// Runs the soak on this rank; collective (every rank runs the same cases).
/// `passed` hears the count of passed cases after each one.
pub fn soak(
    comm: &mut Communicator,
    options: &SoakOptions,
    mut passed: impl FnMut(u64),
) -> Result<SoakReport> {
    let mut state = Soak::new(comm, options.max_len)?;
    let mut report = SoakReport {
        passed: 0,
        failure: None,
        covered: Vec::new(),
    };
    let mut covered: HashMap<String, u64> = HashMap::new();
    for number in options.first_case..options.first_case + options.cases {
        let case = SoakCase::generate(options.seed, number, options.max_len);
        match state.run(comm, &case, options.seed) {
            Ok(outcome) if outcome.passed() => {
                report.passed += 1;
                passed(report.passed);
                for name in case::coverage(&case) {
                    *covered.entry(name).or_default() += 1;
                }
            }
            Ok(outcome) => {
                report.failure = Some((case, outcome.to_string()));
                break;
            }
            Err(error) => {
                report.failure = Some((case, format!("error: {error}")));
                break;
            }
        }
    }
    if report.failure.is_none() {
        state.finish(comm)?;
    }
    report.covered = covered.into_iter().collect();
    report.covered.sort();
    Ok(report)
}
