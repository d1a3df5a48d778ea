//! Which algorithm an all-reduce uses. The choice lives here and nowhere else.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::kernels::CHUNK_BLOCKS;

/// The data-movement schemes the kernels implement (docs/design.md,
/// "Algorithms").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Algorithm {
    /// Every rank reads every peer's whole input: (W-1) x N bytes pulled per
    /// rank, two barriers. Best for small messages and two GPUs.
    OneStage,
    /// Reduce-scatter into scratch, then all-gather: 2(W-1)/W x N bytes per
    /// rank, three barriers. Best for large messages on more than two GPUs.
    TwoStage,
    /// Every rank writes its input into every peer's push area and polls
    /// its own for theirs: (W-1) x N bytes pushed per rank, no barrier (the
    /// data marks its own arrival). For small messages, where a tuning
    /// table picks it (the shipped 2 x H200 table: up to 100000 bytes).
    Push,
    /// Every rank writes its input, chunk by chunk, into a ring in every
    /// peer's scratch, with one flag per chunk, and sums the chunks as
    /// they land: (W-1) x N bytes pushed per rank, no barrier. For large
    /// messages on two GPUs, where stores reach more NVLink bandwidth than
    /// one-stage's loads, and where a tuning table picks it.
    ChunkedPush,
}

impl Algorithm {
    pub const ALL: [Algorithm; 4] = [
        Algorithm::OneStage,
        Algorithm::TwoStage,
        Algorithm::Push,
        Algorithm::ChunkedPush,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Algorithm::OneStage => "one-stage",
            Algorithm::TwoStage => "two-stage",
            Algorithm::Push => "push",
            Algorithm::ChunkedPush => "chunked-push",
        }
    }

    /// Whether only this rank reads its input, by address, with no
    /// buffer table, registration or barrier (the push kernels).
    pub(crate) fn reads_input_locally(self) -> bool {
        matches!(self, Algorithm::Push | Algorithm::ChunkedPush)
    }

    /// The prefix of this algorithm's kernel symbols.
    pub(crate) fn kernel_prefix(self) -> &'static str {
        match self {
            Algorithm::OneStage => "one_stage",
            Algorithm::TwoStage => "two_stage",
            Algorithm::Push => "push",
            Algorithm::ChunkedPush => "chunked_push",
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Algorithm {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "one-stage" | "one_stage" | "oneshot" | "one-shot" | "1" => Ok(Algorithm::OneStage),
            "two-stage" | "two_stage" | "twoshot" | "two-shot" | "2" => Ok(Algorithm::TwoStage),
            "push" => Ok(Algorithm::Push),
            "chunked-push" | "chunked_push" => Ok(Algorithm::ChunkedPush),
            _ => Err(format!(
                "unknown algorithm {s:?}: expected one-stage, two-stage, push or chunked-push"
            )),
        }
    }
}

/// The caller's wish: let linkreduce decide, force one of the kernels'
/// algorithms, or force NCCL (docs/design.md, "Path choice").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum AlgorithmChoice {
    #[default]
    Auto,
    Force(Algorithm),
    Nccl,
}

impl fmt::Display for AlgorithmChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AlgorithmChoice::Auto => f.write_str("auto"),
            AlgorithmChoice::Force(algorithm) => algorithm.fmt(f),
            AlgorithmChoice::Nccl => f.write_str("nccl"),
        }
    }
}

/// The rule where no tuning table covers a size (docs/design.md,
/// "Algorithms"): two GPUs always
/// one-stage; up to four ranks below 512 KiB and up to eight below 256 KiB
/// one-stage; otherwise two-stage.
pub fn reference_rule(world_size: usize, message_bytes: usize) -> Algorithm {
    let one_stage = match world_size {
        0..=2 => true,
        3..=4 => message_bytes < 512 * 1024,
        _ => message_bytes < 256 * 1024,
    };
    if one_stage {
        Algorithm::OneStage
    } else {
        Algorithm::TwoStage
    }
}

/// Where a tuning table came from, besides a caller's `Config::tuning`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TuningSource {
    /// The file LINKREDUCE_TUNING names.
    Env,
    /// The table shipped for the GPU and world size.
    Shipped,
}

/// Tables measured on machines we had: (device name as CUDA reports it,
/// world size, table). Each must parse (a unit test checks).
const BUILTIN_TABLES: [(&str, usize, &str); 2] = [
    (
        "NVIDIA H200",
        2,
        include_str!("../tuning/nvidia-h200-2-ranks.json"),
    ),
    (
        "NVIDIA H200",
        4,
        include_str!("../tuning/nvidia-h200-4-ranks.json"),
    ),
];

/// What a tuning entry names: one of the kernels' algorithms, or NCCL
/// (past a measured crossover). Written as the algorithm's name or `nccl`,
/// so tables written before NCCL entries existed still load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum TunedPath {
    Custom(Algorithm),
    Nccl,
}

impl fmt::Display for TunedPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TunedPath::Custom(algorithm) => algorithm.fmt(f),
            TunedPath::Nccl => f.write_str("nccl"),
        }
    }
}

impl FromStr for TunedPath {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("nccl") {
            return Ok(TunedPath::Nccl);
        }
        s.parse()
            .map(TunedPath::Custom)
            .map_err(|message| format!("{message} (or nccl)"))
    }
}

impl TryFrom<String> for TunedPath {
    type Error = String;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        text.parse()
    }
}

impl From<TunedPath> for String {
    fn from(path: TunedPath) -> String {
        path.to_string()
    }
}

/// A measured choice of path by world size and message size, written
/// by `linkreduce tune` and read through `LINKREDUCE_TUNING` or
/// [`crate::Config::tuning`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tuning {
    /// What the table was measured on (for people; not checked).
    #[serde(default)]
    pub measured_on: String,
    pub entries: Vec<TuningEntry>,
}

/// Messages of `world_size` ranks up to `up_to_bytes` (inclusive; `None`:
/// any larger size) take `algorithm` (a kernel's, or NCCL), unless an entry
/// with a smaller bound covers them first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TuningEntry {
    pub world_size: usize,
    pub up_to_bytes: Option<usize>,
    pub algorithm: TunedPath,
    /// At most this many blocks per launch of the kernel `algorithm`
    /// names, where `linkreduce tune` measured a smaller grid faster than
    /// the default (one packet per thread up to the group's limit). Absent:
    /// the default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocks: Option<u32>,
}

impl Tuning {
    /// The variable naming a tuning file.
    pub const PATH_VAR: &'static str = "LINKREDUCE_TUNING";

    /// The entry for `bytes` on `world_size` ranks, if the table has one.
    fn entry(&self, world_size: usize, bytes: usize) -> Option<&TuningEntry> {
        self.entries
            .iter()
            .filter(|e| e.world_size == world_size && e.up_to_bytes.is_none_or(|up| bytes <= up))
            .min_by_key(|e| e.up_to_bytes.unwrap_or(usize::MAX))
    }

    /// The path for `bytes` on `world_size` ranks, if the table says.
    pub fn pick(&self, world_size: usize, bytes: usize) -> Option<TunedPath> {
        self.entry(world_size, bytes).map(|e| e.algorithm)
    }

    /// The grid the table measured best for `bytes` on `world_size` ranks
    /// with `algorithm`: only where its entry for the size names that
    /// algorithm (a grid is tuned for one kernel) and a grid.
    pub fn blocks(&self, world_size: usize, bytes: usize, algorithm: Algorithm) -> Option<u32> {
        self.entry(world_size, bytes)
            .filter(|e| e.algorithm == TunedPath::Custom(algorithm))
            .and_then(|e| e.blocks)
    }

    /// The table for one world size from the fastest (path, grid) measured
    /// at each size (bytes, path, grid; None: the default grid): runs of
    /// sizes with the same winner become one entry, the last bounded by
    /// the largest size measured.
    pub fn from_fastest(
        world_size: usize,
        fastest: &[(usize, TunedPath, Option<u32>)],
    ) -> Vec<TuningEntry> {
        let mut sorted = fastest.to_vec();
        sorted.sort_by_key(|&(bytes, _, _)| bytes);
        let mut entries: Vec<TuningEntry> = Vec::new();
        for (index, &(bytes, algorithm, blocks)) in sorted.iter().enumerate() {
            let next = sorted.get(index + 1);
            if next.is_some_and(|&(_, path, grid)| (path, grid) == (algorithm, blocks)) {
                continue;
            }
            // Bounded by the largest size measured: beyond it the
            // reference rule decides, not an extrapolation.
            entries.push(TuningEntry {
                world_size,
                up_to_bytes: Some(bytes),
                algorithm,
                blocks,
            });
        }
        entries
    }

    /// The table shipped for `world_size` ranks on GPUs named `device_name`
    /// (one rank per GPU, all alike), measured with `linkreduce tune`; None
    /// where none was measured, and the reference rule decides.
    pub fn builtin(device_name: &str, world_size: usize) -> Option<Tuning> {
        BUILTIN_TABLES
            .iter()
            .find(|(name, world, _)| *name == device_name && *world == world_size)
            .and_then(|(_, _, json)| serde_json::from_str(json).ok())
    }

    /// The table set-up follows without a caller's `Config::tuning`:
    /// LINKREDUCE_TUNING's, else the one shipped for GPUs named
    /// `device_name` and `world_size` ranks; with where it came from.
    pub fn resolve(
        device_name: Option<&str>,
        world_size: usize,
    ) -> crate::Result<Option<(Tuning, TuningSource)>> {
        if let Some(table) = Self::from_env()? {
            return Ok(Some((table, TuningSource::Env)));
        }
        Ok(device_name
            .and_then(|name| Self::builtin(name, world_size))
            .map(|table| (table, TuningSource::Shipped)))
    }

    /// The table `LINKREDUCE_TUNING` names, or None when it is not set.
    pub fn from_env() -> crate::Result<Option<Tuning>> {
        let Some(path) = std::env::var_os(Self::PATH_VAR) else {
            return Ok(None);
        };
        let bad = |what: String| {
            crate::Error::InvalidConfig(format!(
                "{}={}: {what}; run `linkreduce tune` to write one, or unset it",
                Self::PATH_VAR,
                std::path::Path::new(&path).display()
            ))
        };
        let text = std::fs::read_to_string(&path).map_err(|e| bad(e.to_string()))?;
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| bad(format!("not a tuning table ({e})")))
    }
}

/// How many blocks a launch uses: enough for one packet per thread, at most
/// `max_blocks` (the group-wide limit that keeps every rank's grid resident)
/// and, for chunked push, at most the blocks its rings are laid out for.
/// Depends only on values every rank shares, so all ranks launch the same
/// grid, which the barrier needs.
pub fn blocks_for(
    algorithm: Algorithm,
    world_size: usize,
    packets: usize,
    threads_per_block: u32,
    max_blocks: u32,
) -> u32 {
    let per_rank = match algorithm {
        Algorithm::OneStage | Algorithm::Push | Algorithm::ChunkedPush => packets,
        Algorithm::TwoStage => packets.div_ceil(world_size.max(1)),
    };
    let limit = match algorithm {
        Algorithm::ChunkedPush => max_blocks.min(CHUNK_BLOCKS as u32),
        _ => max_blocks,
    };
    let wanted = per_rank.div_ceil(threads_per_block as usize).max(1);
    wanted.min(limit.max(1) as usize) as u32
}

/// Packets per chunk of a chunked push of `packets` over `blocks` blocks:
/// one chunk per block where a ring slot (`slot_packets`) holds it, else
/// whole slots, so that large messages pipeline several chunks per block.
/// Shared by every rank, as the grid is, so that all count chunks alike.
pub fn chunk_packets(packets: usize, blocks: u32, slot_packets: usize) -> usize {
    packets
        .div_ceil(blocks.max(1) as usize)
        .min(slot_packets)
        .max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_builtin_table_parses_and_covers_its_world_size() {
        for (name, world, json) in BUILTIN_TABLES {
            let table: Tuning = serde_json::from_str(json).expect("a builtin table parses");
            assert!(table.entries.iter().all(|e| e.world_size == world));
            assert!(table.pick(world, usize::MAX).is_some(), "{name}: unbounded");
            assert_eq!(Tuning::builtin(name, world), Some(table));
        }
        assert_eq!(Tuning::builtin("NVIDIA H200", 3), None);
        assert_eq!(Tuning::builtin("NVIDIA H200 NVL", 2), None);
        let h200 = Tuning::builtin("NVIDIA H200", 2).expect("shipped");
        assert_eq!(h200.pick(2, 1024), Some(TunedPath::Custom(Algorithm::Push)));
        assert_eq!(
            h200.pick(2, 100_000),
            Some(TunedPath::Custom(Algorithm::Push))
        );
        assert_eq!(
            h200.pick(2, 100_001),
            Some(TunedPath::Custom(Algorithm::OneStage))
        );
        let four = Tuning::builtin("NVIDIA H200", 4).expect("shipped");
        let path = |bytes| four.pick(4, bytes);
        assert_eq!(
            path(512 << 10),
            Some(TunedPath::Custom(Algorithm::OneStage))
        );
        assert_eq!(path(1 << 20), Some(TunedPath::Custom(Algorithm::TwoStage)));
        assert_eq!(path(32 << 20), Some(TunedPath::Custom(Algorithm::TwoStage)));
        assert_eq!(path((32 << 20) + 1), Some(TunedPath::Nccl));
    }

    #[test]
    fn grids_grow_with_the_work_up_to_the_limit() {
        let one = Algorithm::OneStage;
        assert_eq!(blocks_for(one, 2, 0, 512, 36), 1);
        assert_eq!(blocks_for(one, 2, 512, 512, 36), 1);
        assert_eq!(blocks_for(one, 2, 513, 512, 36), 2);
        assert_eq!(blocks_for(one, 2, 1 << 30, 512, 36), 36);
        assert_eq!(blocks_for(Algorithm::TwoStage, 4, 4 * 512 + 1, 512, 36), 2);
        assert_eq!(blocks_for(one, 2, 1 << 20, 512, 0), 1);
        let chunked = Algorithm::ChunkedPush;
        assert_eq!(
            blocks_for(chunked, 2, 1 << 24, 512, 256),
            CHUNK_BLOCKS as u32
        );
        assert_eq!(blocks_for(chunked, 2, 1 << 24, 512, 33), 33);
        assert_eq!(blocks_for(chunked, 2, 4 * 512, 512, 256), 4);
    }

    #[test]
    fn chunks_fill_the_grid_and_never_outgrow_a_slot() {
        // 1 MiB of packets over 128 blocks: one 8 KiB chunk each.
        assert_eq!(chunk_packets(1 << 16, 128, 4096), 512);
        // 256 MiB: slots of 64 KiB, 32 chunks per block.
        assert_eq!(chunk_packets(1 << 24, 128, 4096), 4096);
        // A partial last chunk, and a message under one packet per block.
        assert_eq!(chunk_packets(1001, 2, 4096), 501);
        assert_eq!(chunk_packets(1, 1, 4096), 1);
    }

    #[test]
    fn two_ranks_always_use_one_stage() {
        for bytes in [0, 1 << 10, 1 << 20, 1 << 30] {
            assert_eq!(reference_rule(2, bytes), Algorithm::OneStage);
        }
    }

    #[test]
    fn thresholds_follow_the_reference_rule() {
        assert_eq!(reference_rule(4, 512 * 1024 - 1), Algorithm::OneStage);
        assert_eq!(reference_rule(4, 512 * 1024), Algorithm::TwoStage);
        assert_eq!(reference_rule(3, 256 * 1024), Algorithm::OneStage);
        assert_eq!(reference_rule(8, 256 * 1024 - 1), Algorithm::OneStage);
        assert_eq!(reference_rule(8, 256 * 1024), Algorithm::TwoStage);
        assert_eq!(reference_rule(6, 300 * 1024), Algorithm::TwoStage);
    }

    #[test]
    fn a_tuning_table_picks_by_the_smallest_bound_that_covers() {
        let custom = TunedPath::Custom;
        let fastest = [
            (1 << 10, custom(Algorithm::Push), None),
            (64 << 10, custom(Algorithm::Push), None),
            (1 << 20, custom(Algorithm::OneStage), None),
            (16 << 20, custom(Algorithm::TwoStage), None),
            (256 << 20, TunedPath::Nccl, None),
        ];
        let tuning = Tuning {
            measured_on: "test".into(),
            entries: Tuning::from_fastest(2, &fastest),
        };
        assert_eq!(tuning.entries.len(), 4);
        assert_eq!(tuning.pick(2, 100), Some(custom(Algorithm::Push)));
        assert_eq!(tuning.pick(2, 64 << 10), Some(custom(Algorithm::Push)));
        assert_eq!(
            tuning.pick(2, (64 << 10) + 1),
            Some(custom(Algorithm::OneStage))
        );
        assert_eq!(tuning.pick(2, 16 << 20), Some(custom(Algorithm::TwoStage)));
        assert_eq!(tuning.pick(2, 256 << 20), Some(TunedPath::Nccl));
        // Past the largest size measured, and for other world sizes, the
        // table says nothing.
        assert_eq!(tuning.pick(2, 1 << 30), None);
        assert_eq!(tuning.pick(4, 100), None);
        let text = serde_json::to_string(&tuning).unwrap();
        assert!(text.contains(r#""algorithm":"nccl""#), "{text}");
        assert_eq!(serde_json::from_str::<Tuning>(&text).unwrap(), tuning);
    }

    #[test]
    fn a_tuned_grid_splits_runs_and_applies_only_to_its_algorithm() {
        let one = TunedPath::Custom(Algorithm::OneStage);
        let fastest = [
            (1 << 20, one, None),
            (4 << 20, one, Some(64)),
            (16 << 20, one, Some(64)),
            (64 << 20, one, None),
        ];
        let tuning = Tuning {
            measured_on: "test".into(),
            entries: Tuning::from_fastest(2, &fastest),
        };
        assert_eq!(tuning.entries.len(), 3);
        assert_eq!(tuning.blocks(2, 1 << 20, Algorithm::OneStage), None);
        assert_eq!(tuning.blocks(2, 2 << 20, Algorithm::OneStage), Some(64));
        assert_eq!(tuning.blocks(2, 2 << 20, Algorithm::TwoStage), None);
        assert_eq!(tuning.blocks(2, 32 << 20, Algorithm::OneStage), None);
        // Tables without grids (all shipped before) still load, and write
        // no grid where there is none.
        let text = serde_json::to_string(&tuning).unwrap();
        assert_eq!(text.matches("blocks").count(), 1, "{text}");
        assert_eq!(serde_json::from_str::<Tuning>(&text).unwrap(), tuning);
    }

    #[test]
    fn tables_written_before_nccl_entries_still_load() {
        let text = r#"{"measured_on": "2 x H200", "entries": [
            {"world_size": 2, "up_to_bytes": 65536, "algorithm": "push"},
            {"world_size": 2, "up_to_bytes": null, "algorithm": "one-stage"}]}"#;
        let tuning: Tuning = serde_json::from_str(text).unwrap();
        assert_eq!(
            tuning.pick(2, 1 << 30),
            Some(TunedPath::Custom(Algorithm::OneStage))
        );
        let bad = text.replace("push", "three-stage");
        let error = serde_json::from_str::<Tuning>(&bad).unwrap_err();
        assert!(error.to_string().contains("or nccl"), "{error}");
    }

    #[test]
    fn names_parse_back() {
        for algorithm in Algorithm::ALL {
            assert_eq!(algorithm.name().parse::<Algorithm>().unwrap(), algorithm);
        }
        assert!("three-stage".parse::<Algorithm>().is_err());
        assert_eq!("NCCL".parse::<TunedPath>(), Ok(TunedPath::Nccl));
    }
}
