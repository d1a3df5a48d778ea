//! The soak's cases: a seeded generator shared by every rank, and what a
//! case draws from it (see the module above).

use std::fmt;

use crate::algorithm::{Algorithm, AlgorithmChoice};
use crate::dtype::DType;

/// Largest element offset of a view.
pub(super) const MAX_OFFSET: usize = 23;

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

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// True with probability `percent` / 100.
    fn percent(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// An element offset of a view: the same on every rank, or its own on each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offset {
    Same(usize),
    PerRank(u64),
}

impl Offset {
    /// This rank's offset.
    pub(super) fn on(self, rank: usize) -> usize {
        match self {
            Offset::Same(offset) => offset,
            Offset::PerRank(salt) => {
                Rng::new(salt, rank as u64).below(MAX_OFFSET as u64 + 1) as usize
            }
        }
    }

    fn random(rng: &mut Rng) -> Offset {
        match rng.below(4) {
            0 => Offset::Same(0),
            1 => Offset::PerRank(rng.next()),
            _ => Offset::Same(rng.below(MAX_OFFSET as u64 + 1) as usize),
        }
    }
}

impl fmt::Display for Offset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Offset::Same(offset) => write!(f, "+{offset}"),
            Offset::PerRank(_) => write!(f, "+per-rank"),
        }
    }
}

/// Where a buffer of a case comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Memory {
    /// `Communicator::alloc`, not registered.
    Buffer,
    /// `Communicator::alloc`, registered for the case (collective) and
    /// deregistered after it.
    Registered,
    /// cudarc's stream-ordered pool (`CudaStream::alloc_zeros`), viewed at
    /// an element offset.
    Pool(Offset),
    /// A view into this rank's arena, registered for the whole soak.
    Arena(Offset),
}

impl Memory {
    fn random(rng: &mut Rng, output: bool) -> Memory {
        match (rng.below(100), output) {
            (0..=24, _) => Memory::Buffer,
            (25..=39, false) => Memory::Registered,
            (25..=64, _) => Memory::Pool(Offset::random(rng)),
            _ => Memory::Arena(Offset::random(rng)),
        }
    }

    /// Whether buffers of this kind belong to one case, to be freed (or
    /// held) by it.
    fn owned_by_case(self) -> bool {
        matches!(self, Memory::Buffer | Memory::Pool(_))
    }
}

impl fmt::Display for Memory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Memory::Buffer => write!(f, "buffer"),
            Memory::Registered => write!(f, "registered buffer"),
            Memory::Pool(offset) => write!(f, "cudarc pool{offset}"),
            Memory::Arena(offset) => write!(f, "registered arena{offset}"),
        }
    }
}

/// One random all-reduce, the same on every rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SoakCase {
    pub number: u64,
    pub dtype: DType,
    pub len: usize,
    pub algorithm: AlgorithmChoice,
    pub input: Memory,
    /// None: in place, in the input's buffer.
    pub output: Option<Memory>,
    /// 0: eager; n: captured in a CUDA graph and replayed n times.
    pub replays: u32,
    /// The input is freed right after the call is enqueued.
    pub free_input_early: bool,
    /// The case's own buffers are kept this many cases longer and freed in
    /// the middle of a later case (0: freed at the end of this one).
    pub hold: u64,
}

impl SoakCase {
    pub fn generate(seed: u64, number: u64, max_len: usize) -> SoakCase {
        let mut rng = Rng::new(seed, number);
        let dtype = DType::ALL[rng.below(3) as usize];
        let len = ((max_len.max(1) as f64).ln() * rng.unit()).exp() as usize;
        let algorithm = match rng.below(10) {
            0..=3 => AlgorithmChoice::Auto,
            n => AlgorithmChoice::Force(Algorithm::ALL[(n as usize - 4) / 2]),
        };
        let input = Memory::random(&mut rng, false);
        let output = (!rng.percent(40)).then(|| Memory::random(&mut rng, true));
        let replays = if rng.percent(20) {
            1 + rng.below(3) as u32
        } else {
            0
        };
        let free_input_early =
            replays == 0 && output.is_some() && input.owned_by_case() && rng.percent(40);
        let hold = if rng.percent(20) { 1 + rng.below(4) } else { 0 };
        SoakCase {
            number,
            dtype,
            len: len.clamp(1, max_len.max(1)),
            algorithm,
            input,
            output,
            replays,
            free_input_early,
            hold,
        }
    }
}

impl fmt::Display for SoakCase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "case {}: {} len {} {}, input {}",
            self.number, self.dtype, self.len, self.algorithm, self.input
        )?;
        match self.output {
            Some(output) => write!(f, ", output {output}")?,
            None => write!(f, ", in place")?,
        }
        match self.replays {
            0 => write!(f, ", eager")?,
            n => write!(f, ", graph replayed {n}x")?,
        }
        if self.free_input_early {
            write!(f, ", input freed after enqueue")?;
        }
        if self.hold > 0 {
            write!(f, ", buffers held {} more case(s)", self.hold)?;
        }
        Ok(())
    }
}

/// The coverage counters a passed case adds to.
pub(super) fn coverage(case: &SoakCase) -> Vec<String> {
    let mut names = vec![
        format!("dtype {}", case.dtype),
        format!("algorithm {}", case.algorithm),
        format!("input {}", kind_name(case.input)),
        match case.output {
            Some(output) => format!("output {}", kind_name(output)),
            None => "in place".into(),
        },
    ];
    let offsets = [Some(case.input), case.output]
        .into_iter()
        .flatten()
        .filter_map(|m| match m {
            Memory::Pool(offset) | Memory::Arena(offset) => Some(offset),
            _ => None,
        });
    for offset in offsets {
        names.push(match offset {
            Offset::Same(0) => "view at offset 0".into(),
            Offset::Same(_) => "view at an offset".into(),
            Offset::PerRank(_) => "view at per-rank offsets".into(),
        });
    }
    if case.replays > 0 {
        names.push("graph".into());
    }
    if case.free_input_early {
        names.push("input freed after enqueue".into());
    }
    if case.hold > 0 {
        names.push("buffers freed in a later case".into());
    }
    names
}

fn kind_name(memory: Memory) -> &'static str {
    match memory {
        Memory::Buffer => "buffer",
        Memory::Registered => "registered buffer",
        Memory::Pool(_) => "cudarc pool",
        Memory::Arena(_) => "registered arena",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cases_depend_on_seed_and_number_only() {
        assert_eq!(
            SoakCase::generate(7, 12, 1 << 20),
            SoakCase::generate(7, 12, 1 << 20)
        );
        assert_ne!(
            SoakCase::generate(7, 12, 1 << 20),
            SoakCase::generate(8, 12, 1 << 20)
        );
        assert_ne!(
            SoakCase::generate(7, 12, 1 << 20),
            SoakCase::generate(7, 13, 1 << 20)
        );
    }

    #[test]
    fn cases_cover_every_choice() {
        let cases: Vec<SoakCase> = (0..5000)
            .map(|n| SoakCase::generate(1, n, 1 << 22))
            .collect();
        assert!(cases.iter().all(|c| (1..=1 << 22).contains(&c.len)));
        let short = cases.iter().filter(|c| c.len < 100).count();
        let long = cases.iter().filter(|c| c.len > 1 << 20).count();
        assert!(
            short > 500 && long > 200,
            "log-uniform lengths: {short} short, {long} long"
        );
        for dtype in DType::ALL {
            assert!(cases.iter().any(|c| c.dtype == dtype));
        }
        for algorithm in Algorithm::ALL {
            assert!(cases
                .iter()
                .any(|c| c.algorithm == AlgorithmChoice::Force(algorithm)));
        }
        assert!(cases.iter().any(|c| c.algorithm == AlgorithmChoice::Auto));
        assert!(cases.iter().any(|c| c.output.is_none()));
        assert!(cases.iter().any(|c| c.replays > 0 && c.output.is_none()));
        assert!(cases.iter().any(|c| c.free_input_early));
        assert!(cases.iter().any(|c| c.hold > 0));
        let memories: Vec<Memory> = cases
            .iter()
            .flat_map(|c| [Some(c.input), c.output])
            .flatten()
            .collect();
        assert!(memories.contains(&Memory::Buffer));
        assert!(memories.contains(&Memory::Registered));
        assert!(memories
            .iter()
            .any(|m| matches!(m, Memory::Pool(Offset::PerRank(_)))));
        assert!(memories
            .iter()
            .any(|m| matches!(m, Memory::Arena(Offset::Same(o)) if o % 8 != 0)));
        assert!(
            cases.iter().all(|c| c.output != Some(Memory::Registered)),
            "outputs are never registered"
        );
    }

    #[test]
    fn per_rank_offsets_differ_between_ranks_and_stay_in_range() {
        let offset = Offset::PerRank(99);
        let offsets: Vec<usize> = (0..8).map(|rank| offset.on(rank)).collect();
        assert!(offsets.iter().all(|&o| o <= MAX_OFFSET));
        assert!(offsets.windows(2).any(|w| w[0] != w[1]));
        assert_eq!(offset.on(3), offset.on(3));
    }
}
