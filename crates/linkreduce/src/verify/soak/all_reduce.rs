//! The soak's all-reduce cases: what one draws (see the module above).

use std::fmt;

use super::case::Rng;
use crate::algorithm::AlgorithmChoice;
use crate::dtype::DType;

/// Largest element offset of a view.
pub(super) const MAX_OFFSET: usize = 23;

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
pub struct AllReduceCase {
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

impl AllReduceCase {
    pub(super) fn generate(rng: &mut Rng, max_len: usize) -> AllReduceCase {
        let dtype = DType::ALL[rng.below(3) as usize];
        let len = rng.log_uniform(max_len);
        let algorithm = rng.algorithm();
        let input = Memory::random(rng, false);
        let output = (!rng.percent(40)).then(|| Memory::random(rng, true));
        let replays = rng.graph_replays();
        let free_input_early =
            replays == 0 && output.is_some() && input.owned_by_case() && rng.percent(40);
        let hold = if rng.percent(20) { 1 + rng.below(4) } else { 0 };
        AllReduceCase {
            dtype,
            len,
            algorithm,
            input,
            output,
            replays,
            free_input_early,
            hold,
        }
    }

    /// The coverage counters this case adds to when it passes.
    pub(super) fn coverage(&self) -> Vec<String> {
        let mut names = vec![
            format!("dtype {}", self.dtype),
            format!("algorithm {}", self.algorithm),
            format!("input {}", kind_name(self.input)),
            match self.output {
                Some(output) => format!("output {}", kind_name(output)),
                None => "in place".into(),
            },
        ];
        let offsets = [Some(self.input), self.output]
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
        if self.replays > 0 {
            names.push("graph".into());
        }
        if self.free_input_early {
            names.push("input freed after enqueue".into());
        }
        if self.hold > 0 {
            names.push("buffers freed in a later case".into());
        }
        names
    }
}

impl fmt::Display for AllReduceCase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "all-reduce {} len {} {}, input {}",
            self.dtype, self.len, self.algorithm, self.input
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
    use crate::algorithm::Algorithm;

    #[test]
    fn cases_cover_every_choice() {
        let cases: Vec<AllReduceCase> = (0..5000)
            .map(|n| AllReduceCase::generate(&mut Rng::new(1, n), 1 << 22))
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
