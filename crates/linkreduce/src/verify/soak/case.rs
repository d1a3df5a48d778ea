//! The soak's cases: a seeded generator shared by every rank, which op a
//! case runs, and what a fused-norm, reduce-scatter or all-gather case
//! draws (the all-reduce's own draws are in `all_reduce.rs`).

use std::fmt;

use super::all_reduce::AllReduceCase;
use crate::algorithm::{Algorithm, AlgorithmChoice};
use crate::dtype::DType;
use crate::kernels::{ScatterGather, MAX_RANKS, NORM_DTYPES};
use crate::verify::fused::NormCase;
use crate::verify::scatter_gather::{SgBuffers, SgCase};

/// splitmix64: the soak's generator, the same on every rank.
pub(super) struct Rng(u64);

impl Rng {
    pub(super) fn new(seed: u64, salt: u64) -> Rng {
        let mut rng = Rng(seed ^ salt.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        rng.next();
        rng
    }

    pub(super) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub(super) fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// True with probability `percent` / 100.
    pub(super) fn percent(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// 1..=max, log-uniform: short and long sizes alike.
    pub(super) fn log_uniform(&mut self, max: usize) -> usize {
        let max = max.max(1);
        (((max as f64).ln() * self.unit()).exp() as usize).clamp(1, max)
    }

    /// Automatic, or one of the kernels' algorithms forced.
    pub(super) fn algorithm(&mut self) -> AlgorithmChoice {
        let forced = 2 * Algorithm::ALL.len() as u64;
        match self.below(4 + forced) {
            0..=3 => AlgorithmChoice::Auto,
            n => AlgorithmChoice::Force(Algorithm::ALL[(n as usize - 4) / 2]),
        }
    }

    /// 0 (eager) or how many times a captured graph is replayed.
    pub(super) fn graph_replays(&mut self) -> u32 {
        if self.percent(20) {
            1 + self.below(3) as u32
        } else {
            0
        }
    }
}

/// The op a case runs, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SoakOp {
    AllReduce(AllReduceCase),
    /// All-reduce + residual add + RMSNorm, checked by `verify::fused`.
    FusedNorm(NormCase),
    /// Reduce-scatter or all-gather, checked by `verify::scatter_gather`.
    ScatterGather(SgCase),
}

/// One random case, the same on every rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SoakCase {
    pub number: u64,
    pub op: SoakOp,
}

/// Percent of cases of each op other than the all-reduce.
const FUSED_NORM_PERCENT: u64 = 15;
const SCATTER_GATHER_PERCENT: u64 = 15;

/// Salt of the generator that picks a case's op: a stream of its own, so
/// an all-reduce case draws what it drew before other ops joined the soak.
const OP_SALT: u64 = 0x6f70_7320_6472_6177;

/// The largest hidden size of a fused-norm case.
const MAX_HIDDEN: usize = 16384;
/// Hidden sizes of real models: whole packets, some launches cut in rows.
const MODEL_HIDDEN: [usize; 6] = [1024, 2048, 4096, 5120, 8192, 16384];
/// The most rows of a fused-norm case: the host mirror's cost per row does
/// not shrink with `hidden`.
const MAX_ROWS: usize = 4096;

impl SoakCase {
    pub fn generate(seed: u64, number: u64, max_len: usize) -> SoakCase {
        let pick = Rng::new(seed ^ OP_SALT, number).below(100);
        let mut rng = Rng::new(seed, number);
        let op = if pick < FUSED_NORM_PERCENT {
            SoakOp::FusedNorm(norm_case(&mut rng, max_len))
        } else if pick < FUSED_NORM_PERCENT + SCATTER_GATHER_PERCENT {
            SoakOp::ScatterGather(sg_case(&mut rng, ScatterGather::ReduceScatter, max_len))
        } else if pick < FUSED_NORM_PERCENT + 2 * SCATTER_GATHER_PERCENT {
            SoakOp::ScatterGather(sg_case(&mut rng, ScatterGather::AllGather, max_len))
        } else {
            SoakOp::AllReduce(AllReduceCase::generate(&mut rng, max_len))
        };
        SoakCase { number, op }
    }

    /// The op's name, as `covered` counts it.
    pub fn op_name(&self) -> &'static str {
        match self.op {
            SoakOp::AllReduce(_) => "all-reduce",
            SoakOp::FusedNorm(_) => "fused-norm",
            SoakOp::ScatterGather(case) => case.op.name(),
        }
    }
}

/// A fused call of at most a quarter of `max_len` elements: the host
/// mirror that checks it is the soak's slowest part.
fn norm_case(rng: &mut Rng, max_len: usize) -> NormCase {
    let budget = (max_len / 4).max(1);
    let dtype = NORM_DTYPES[rng.below(NORM_DTYPES.len() as u64) as usize];
    let hidden = if rng.percent(30) {
        MODEL_HIDDEN[rng.below(MODEL_HIDDEN.len() as u64) as usize]
    } else {
        rng.log_uniform(MAX_HIDDEN)
    }
    .min(budget);
    let rows = if rng.percent(5) {
        0
    } else {
        rng.log_uniform((budget / hidden).min(MAX_ROWS))
    };
    NormCase {
        dtype,
        rows,
        hidden,
        algorithm: rng.algorithm(),
        graph_replays: rng.graph_replays() as usize,
    }
}

/// A reduce-scatter or all-gather whose larger buffer (count x world)
/// holds at most `max_len` elements on any world size.
fn sg_case(rng: &mut Rng, op: ScatterGather, max_len: usize) -> SgCase {
    let dtype = DType::ALL[rng.below(DType::ALL.len() as u64) as usize];
    let count = if rng.percent(5) {
        0
    } else {
        rng.log_uniform(max_len / MAX_RANKS)
    };
    SgCase {
        op,
        dtype,
        count,
        algorithm: rng.algorithm(),
        buffers: SgBuffers::ALL[rng.below(SgBuffers::ALL.len() as u64) as usize],
        graph_replays: rng.graph_replays() as usize,
    }
}

impl fmt::Display for SoakCase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "case {}: ", self.number)?;
        match &self.op {
            SoakOp::AllReduce(case) => case.fmt(f),
            SoakOp::FusedNorm(case) => case.fmt(f),
            SoakOp::ScatterGather(case) => case.fmt(f),
        }
    }
}

/// The coverage counters a passed case adds to.
pub(super) fn coverage(case: &SoakCase) -> Vec<String> {
    let mut names = vec![format!("op {}", case.op_name())];
    let (dtype, replays) = match case.op {
        SoakOp::AllReduce(op) => {
            names.extend(op.coverage());
            return names;
        }
        SoakOp::FusedNorm(op) => {
            names.push(format!("fused-norm algorithm {}", op.algorithm));
            if op.rows == 0 {
                names.push("fused-norm no rows".into());
            }
            if op.hidden % 8 != 0 {
                names.push("fused-norm hidden not a multiple of 8".into());
            }
            (op.dtype, op.graph_replays)
        }
        SoakOp::ScatterGather(op) => {
            names.push(format!("{} {}", op.op, op.buffers));
            if op.count % 2 == 1 {
                names.push(format!("{} odd count", op.op));
            }
            (op.dtype, op.graph_replays)
        }
    };
    names.push(format!("dtype {dtype}"));
    if replays > 0 {
        names.push("graph".into());
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draws(seed: u64, cases: u64, max_len: usize) -> Vec<SoakCase> {
        (0..cases)
            .map(|n| SoakCase::generate(seed, n, max_len))
            .collect()
    }

    /// What `pick` takes from `cases` draws.
    fn picked<T>(seed: u64, cases: u64, max_len: usize, pick: fn(SoakOp) -> Option<T>) -> Vec<T> {
        let ops = draws(seed, cases, max_len).into_iter().map(|c| c.op);
        ops.filter_map(pick).collect()
    }

    fn norm_draws(seed: u64, cases: u64, max_len: usize) -> Vec<NormCase> {
        picked(seed, cases, max_len, |op| match op {
            SoakOp::FusedNorm(norm) => Some(norm),
            _ => None,
        })
    }

    #[test]
    fn cases_depend_on_seed_and_number_only() {
        let case = SoakCase::generate(7, 12, 1 << 20);
        assert_eq!(case, SoakCase::generate(7, 12, 1 << 20));
        assert_ne!(case, SoakCase::generate(8, 12, 1 << 20));
        assert_ne!(case, SoakCase::generate(7, 13, 1 << 20));
        // `--first-case N` runs case N of the seed: a replay draws it again.
        let sequence = draws(7, 40, 1 << 20);
        for (number, case) in (0..).zip(&sequence) {
            assert_eq!(*case, SoakCase::generate(7, number, 1 << 20));
            assert_eq!(case.number, number);
        }
    }

    #[test]
    fn every_op_is_drawn_in_a_modest_soak() {
        let cases = draws(3, 300, 4 << 20);
        let count = |name| cases.iter().filter(|c| c.op_name() == name).count();
        for name in ["fused-norm", "reduce-scatter", "all-gather"] {
            assert!((20..=80).contains(&count(name)), "{name}: {}", count(name));
        }
        assert!(count("all-reduce") > 120, "{}", count("all-reduce"));
    }

    #[test]
    fn fused_norm_cases_vary_and_stay_within_a_quarter_of_the_limit() {
        let max_len = 4 << 20;
        let norms = norm_draws(5, 4000, max_len);
        for norm in &norms {
            assert!(NORM_DTYPES.contains(&norm.dtype));
            assert!(norm.rows * norm.hidden <= max_len / 4, "{norm}");
            assert!((1..=MAX_HIDDEN).contains(&norm.hidden), "{norm}");
            assert!(norm.rows <= MAX_ROWS, "{norm}");
        }
        assert!(norms.iter().any(|n| n.rows == 0));
        assert!(norms.iter().any(|n| n.hidden % 2 == 1 && n.rows > 1));
        assert!(norms.iter().any(|n| n.hidden == MAX_HIDDEN && n.rows > 8));
        assert!(norms.iter().any(|n| n.graph_replays > 0));
        for dtype in NORM_DTYPES {
            assert!(norms.iter().any(|n| n.dtype == dtype));
        }
        for algorithm in Algorithm::ALL {
            let forced = AlgorithmChoice::Force(algorithm);
            assert!(norms.iter().any(|n| n.algorithm == forced));
        }
        // A small limit shrinks the rows and hidden sizes, not the limit.
        for norm in norm_draws(5, 500, 100) {
            assert!(norm.rows * norm.hidden <= 25 && norm.hidden >= 1, "{norm}");
        }
    }

    #[test]
    fn scatter_gather_cases_cover_every_buffer_kind_within_the_limit() {
        let max_len = 1 << 20;
        let sgs = picked(9, 3000, max_len, |op| match op {
            SoakOp::ScatterGather(sg) => Some(sg),
            _ => None,
        });
        assert!(sgs.iter().all(|s| s.count * MAX_RANKS <= max_len));
        for op in ScatterGather::ALL {
            for buffers in SgBuffers::ALL {
                assert!(
                    sgs.iter().any(|s| s.op == op && s.buffers == buffers),
                    "{op} {buffers}"
                );
            }
            assert!(sgs.iter().any(|s| s.op == op && s.graph_replays > 0));
        }
        for dtype in DType::ALL {
            assert!(sgs.iter().any(|s| s.dtype == dtype));
        }
        assert!(sgs.iter().any(|s| s.count == 0));
        assert!(sgs.iter().any(|s| s.count % 2 == 1 && s.count > 1000));
    }

    #[test]
    fn coverage_names_the_op_of_every_case() {
        for case in draws(11, 200, 1 << 20) {
            let names = coverage(&case);
            assert_eq!(names[0], format!("op {}", case.op_name()));
            assert!(names.iter().any(|n| n.starts_with("dtype ")), "{case}");
        }
    }
}
