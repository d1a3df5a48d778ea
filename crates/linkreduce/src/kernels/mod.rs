//! Device code: the CUDA C++ sources, their host-side mirror types, and
//! their run-time compilation (`compile.rs`).
//!
//! The sources include no CUDA headers so that libcuda and libnvrtc are all
//! a user needs at run time.

mod compile;
mod launch;
mod load;
mod norm;
mod scatter_gather;

use cudarc::driver::DeviceRepr;

use crate::algorithm::Algorithm;
use crate::dtype::DType;

pub use compile::{compile_cubin, nvrtc_version, Arch};
pub(crate) use launch::{launch, programmatic_launch};
pub use load::{kernel_resources, KernelResources};
pub(crate) use load::{load_check_kernels, load_kernels, CheckKernels, Kernels};
pub(crate) use norm::{
    load_norm_kernels, AddRmsNormArgs, FusedNormArgs, FusedPushArgs, NormArgs, NormKernels,
};
pub use norm::{norm_kernel_names, NormKernel, NORM_DTYPES};
pub(crate) use scatter_gather::{
    load_scatter_gather_kernels, ScatterGatherArgs, ScatterGatherKernels,
};
pub use scatter_gather::{scatter_gather_kernel_names, ScatterGather};

/// The all-reduce program's files in compile order: the shared layer, the
/// barrier protocol, the all-reduce kernels that use it, the barrier-free
/// push kernels (packets and chunks), then residual add and RMSNorm, plain
/// and fused with the all-reduce, then reduce-scatter and all-gather.
const ALL_REDUCE_FILES: [&str; 8] = [
    include_str!("common.cu"),
    include_str!("barrier.cu"),
    include_str!("allreduce.cu"),
    include_str!("push.cu"),
    include_str!("chunked.cu"),
    include_str!("norm.cu"),
    include_str!("fused.cu"),
    include_str!("scatter_gather.cu"),
];

/// The check program's files in compile order.
const CHECK_FILES: [&str; 2] = [include_str!("common.cu"), include_str!("check.cu")];

/// A program NVRTC compiles: the all-reduce kernels, or the kernels that
/// make and check data for correctness runs (loaded only by those).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Program {
    AllReduce,
    Check,
}

impl Program {
    pub const ALL: [Program; 2] = [Program::AllReduce, Program::Check];

    /// The whole source NVRTC compiles: the generated constants, then the
    /// program's files.
    pub(crate) fn source(self) -> String {
        let files: &[&str] = match self {
            Program::AllReduce => &ALL_REDUCE_FILES,
            Program::Check => &CHECK_FILES,
        };
        let mut source = generated_constants();
        files.iter().for_each(|file| source.push_str(file));
        source
    }

    /// The name NVRTC reports in its logs.
    pub(crate) fn file_name(self) -> &'static std::ffi::CStr {
        match self {
            Program::AllReduce => c"linkreduce.cu",
            Program::Check => c"linkreduce_check.cu",
        }
    }

    /// Every kernel symbol the program defines.
    pub fn kernel_names(self) -> Vec<String> {
        match self {
            Program::AllReduce => all_kernel_names()
                .into_iter()
                .chain(norm_kernel_names())
                .chain(scatter_gather_kernel_names())
                .collect(),
            Program::Check => DType::ALL
                .iter()
                .flat_map(|dtype| CheckKernel::ALL.map(|kind| kind.symbol(*dtype)))
                .collect(),
        }
    }
}

/// The kernels of [`Program::Check`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum CheckKernel {
    /// Writes a rank's input for a seed.
    Fill,
    /// Compares a buffer with an expected input or sum.
    Check,
}

impl CheckKernel {
    pub const ALL: [CheckKernel; 2] = [CheckKernel::Fill, CheckKernel::Check];

    pub fn symbol(self, dtype: DType) -> String {
        let kind = match self {
            CheckKernel::Fill => "fill",
            CheckKernel::Check => "check",
        };
        format!("linkreduce_{kind}_{}", dtype.name())
    }
}

/// Mirrors `CheckArgs` of check.cu.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct CheckArgs {
    pub data: u64,
    pub count: u64,
    pub seed: u64,
    pub world: u32,
    pub rank: u32,
    pub expect: u32,
    pub result: u64,
}

// SAFETY: plain-old-data with the layout of the C struct `CheckArgs`
// (repr(C), only integers; size checked by the test below).
unsafe impl DeviceRepr for CheckArgs {}

// The constants below that name an `LR_*` macro are written into every
// program's source by `generated_constants`: the kernels take them from
// here, so the two sides cannot drift apart.

/// Threads per block of the check kernels (`LR_CHECK_THREADS`).
pub(crate) const CHECK_THREADS: u32 = 256;
/// Most blocks a check kernel is launched with (they stride over the rest).
pub(crate) const CHECK_MAX_BLOCKS: u32 = 1024;

/// `LR_MAX_RANKS`.
pub const MAX_RANKS: usize = 8;
/// `LR_MAX_BLOCKS`: the largest grid a kernel may be launched with.
pub const MAX_BLOCKS: usize = 256;
/// `LR_THREADS`: threads per block of the all-reduce kernels.
pub const THREADS_PER_BLOCK: u32 = 512;
/// `LR_SCRATCH_OFFSET`: counters come first in a signal region, scratch
/// after (barrier.cu checks that the counters fit).
pub const SCRATCH_OFFSET: usize = 51200;
/// Bytes moved per packet.
pub const PACKET_BYTES: usize = 16;
/// Two-stage kernels keep a reduced tail (under one packet) after the slice.
pub(crate) const SCRATCH_TAIL_BYTES: usize = PACKET_BYTES;

/// `LR_PUSH_SLOTS`: push slots that rotate, one per call.
pub const PUSH_SLOTS: usize = 3;
/// `LR_PUSH_HEADER`: bytes before the first push slot.
pub const PUSH_HEADER: usize = 256;
/// `LR_PUSH_EMPTY`: what an empty push slot holds, per 32-bit word.
pub const PUSH_EMPTY: u32 = 0x8000_8000;

/// `LR_CHUNK_BLOCKS`: the largest grid of a chunked push; its rings in
/// scratch are laid out for this many blocks, whatever a launch uses.
pub const CHUNK_BLOCKS: usize = 128;
/// `LR_CHUNK_SLOTS`: slots of each chunked-push ring.
pub const CHUNK_SLOTS: usize = 4;
/// `LR_CHUNK_AHEAD`: chunks a chunked-push block sends before it reduces
/// the first; below `CHUNK_SLOTS`, so that a block never waits for a slot
/// its peer frees only later in the same step (docs/design.md, "Chunked
/// push").
pub const CHUNK_AHEAD: usize = 2;
const _: () = assert!(CHUNK_BLOCKS <= MAX_BLOCKS && CHUNK_AHEAD < CHUNK_SLOTS);

/// Bytes between the slots of a chunked-push ring, as chunked.cu lays the
/// rings out in a scratch of `scratch_bytes` for `world_size` ranks: a ring
/// per peer and per block of [`CHUNK_BLOCKS`], of [`CHUNK_SLOTS`] slots, in
/// whole packets.
pub(crate) fn chunk_slot_bytes(scratch_bytes: usize, world_size: usize) -> usize {
    let slots = world_size.saturating_sub(1).max(1) * CHUNK_BLOCKS * CHUNK_SLOTS;
    scratch_bytes / slots / PACKET_BYTES * PACKET_BYTES
}

/// The least scratch that gives every world size a packet per slot.
pub(crate) fn chunk_slot_bytes_needed() -> usize {
    (MAX_RANKS - 1) * CHUNK_BLOCKS * CHUNK_SLOTS * PACKET_BYTES
}

/// `LR_EPOCH_BITS`: a barrier word carries the epoch in this many low bits
/// and its payload above them.
pub(crate) const EPOCH_BITS: u32 = 16;
/// `LR_INDEX_BITS`: a source word names a buffer-table index in this many
/// bits and an offset in packets in the bits left above them.
pub(crate) const INDEX_BITS: u32 = 16;
/// Buffer-table entries per owner at most (what an index can name).
pub const MAX_TABLE_ENTRIES: usize = 1 << INDEX_BITS;

/// The source word a kernel publishes for an input at `offset` bytes into
/// buffer `index` of the table; None where the offset is not a whole number
/// of packets or too far for the word (such inputs are staged).
pub(crate) fn source_word(index: usize, offset: u64) -> Option<u64> {
    let packets = offset / PACKET_BYTES as u64;
    let offset_bits = 64 - EPOCH_BITS - INDEX_BITS;
    let fits = index < MAX_TABLE_ENTRIES && packets < 1 << offset_bits;
    (fits && offset % PACKET_BYTES as u64 == 0).then_some(index as u64 | packets << INDEX_BITS)
}

/// World sizes the kernels are instantiated for.
pub const WORLD_SIZES: std::ops::RangeInclusive<usize> = 2..=MAX_RANKS;

/// The `#define`s that open every program: the host's constants, and
/// `LR_FOR_WORLDS(KERNELS, NAME, D)`, which instantiates `KERNELS(NAME, D, W)`
/// for every world size in [`WORLD_SIZES`].
fn generated_constants() -> String {
    let defines = [
        ("LR_MAX_RANKS", MAX_RANKS.to_string()),
        ("LR_MAX_BLOCKS", MAX_BLOCKS.to_string()),
        ("LR_THREADS", THREADS_PER_BLOCK.to_string()),
        ("LR_SCRATCH_OFFSET", format!("{SCRATCH_OFFSET}ull")),
        ("LR_EPOCH_BITS", EPOCH_BITS.to_string()),
        ("LR_INDEX_BITS", INDEX_BITS.to_string()),
        ("LR_PUSH_SLOTS", PUSH_SLOTS.to_string()),
        ("LR_PUSH_HEADER", format!("{PUSH_HEADER}ull")),
        ("LR_PUSH_EMPTY", format!("{PUSH_EMPTY:#x}u")),
        ("LR_CHUNK_BLOCKS", CHUNK_BLOCKS.to_string()),
        ("LR_CHUNK_SLOTS", format!("{CHUNK_SLOTS}ull")),
        ("LR_CHUNK_AHEAD", format!("{CHUNK_AHEAD}ull")),
        ("LR_CHECK_THREADS", CHECK_THREADS.to_string()),
    ];
    let mut text = String::from("// Generated from the host's constants (src/kernels/mod.rs).\n");
    for (name, value) in defines {
        text.push_str(&format!("#define {name} {value}\n"));
    }
    text.push_str("#define LR_FOR_WORLDS(KERNELS, NAME, D)");
    for world_size in WORLD_SIZES {
        text.push_str(&format!(" KERNELS(NAME, D, {world_size})"));
    }
    text.push_str("\n\n");
    text
}

/// The symbol of one kernel variant.
pub fn kernel_name(algorithm: Algorithm, dtype: DType, world_size: usize) -> String {
    format!(
        "linkreduce_{}_{}_w{}",
        algorithm.kernel_prefix(),
        dtype.name(),
        world_size
    )
}

/// Every kernel symbol the source defines.
pub fn all_kernel_names() -> Vec<String> {
    let mut names = Vec::new();
    for dtype in DType::ALL {
        for world_size in WORLD_SIZES {
            for algorithm in Algorithm::ALL {
                names.push(kernel_name(algorithm, dtype, world_size));
            }
        }
    }
    names
}

/// What a timed-out kernel leaves in host-mapped memory (mirrors `Fault`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Fault {
    pub code: u32,
    pub rank: u32,
    pub peer: u32,
    pub barrier: u32,
    pub block: u32,
    pub expected: u32,
    pub seen: u32,
}

/// Mirrors `BarrierArgs`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct BarrierArgs {
    pub peers: [u64; MAX_RANKS],
    pub fault: u64,
    pub timeout_ns: u64,
    pub rank: u32,
    /// 1 where the kernel is launched programmatically (`launch.rs`), so
    /// that it lets the next kernel launch early; 0 elsewhere.
    pub programmatic: u32,
}

/// Mirrors `AllReduceArgs`: the kernels' only parameter, passed by value.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct AllReduceArgs {
    pub barrier: BarrierArgs,
    pub table: u64,
    pub source: u64,
    pub output: u64,
    pub count: u64,
    pub capacity: u32,
}

// SAFETY: plain-old-data with the layout of the C struct `AllReduceArgs`
// (repr(C), only integers; sizes checked by the test below).
unsafe impl DeviceRepr for AllReduceArgs {}

/// Mirrors `PushArgs`: the push kernels' only parameter.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct PushArgs {
    pub barrier: BarrierArgs,
    pub push: [u64; MAX_RANKS],
    pub input: u64,
    pub output: u64,
    pub count: u64,
    pub segment_bytes: u64,
}

// SAFETY: plain-old-data with the layout of the C struct `PushArgs`
// (repr(C), only integers; sizes checked by the test below).
unsafe impl DeviceRepr for PushArgs {}

/// Mirrors `ChunkedArgs`: the chunked-push kernels' only parameter.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct ChunkedArgs {
    pub barrier: BarrierArgs,
    pub input: u64,
    pub output: u64,
    pub count: u64,
    pub chunk_packets: u64,
    pub slot_bytes: u64,
}

// SAFETY: plain-old-data with the layout of the C struct `ChunkedArgs`
// (repr(C), only integers; sizes checked by the test below).
unsafe impl DeviceRepr for ChunkedArgs {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_mirrors_have_the_c_layout() {
        // Signal: two arrays of u64 counters, the chunked push's two arrays
        // and sequence, one u32 epoch per block (allreduce.cu asserts the fit).
        let chunk_bytes = 2 * CHUNK_BLOCKS * MAX_RANKS * 8 + CHUNK_BLOCKS * 8;
        let signal_bytes = 2 * MAX_BLOCKS * MAX_RANKS * 8 + chunk_bytes + MAX_BLOCKS * 4;
        assert!(signal_bytes <= SCRATCH_OFFSET && SCRATCH_OFFSET % 256 == 0);
        assert_eq!(std::mem::size_of::<Fault>(), 28);
        assert_eq!(std::mem::size_of::<BarrierArgs>(), 88);
        assert_eq!(std::mem::size_of::<AllReduceArgs>(), 128);
        assert_eq!(std::mem::size_of::<PushArgs>(), 184);
        assert_eq!(std::mem::size_of::<ChunkedArgs>(), 128);
        assert_eq!(std::mem::size_of::<CheckArgs>(), 48);
        assert_eq!(std::mem::offset_of!(CheckArgs, result), 40);
        // Field offsets as the C compiler lays the structs out.
        use std::mem::offset_of;
        assert_eq!(
            [
                offset_of!(BarrierArgs, fault),
                offset_of!(BarrierArgs, timeout_ns),
                offset_of!(BarrierArgs, rank),
                offset_of!(BarrierArgs, programmatic)
            ],
            [64, 72, 80, 84]
        );
        assert_eq!(
            [
                offset_of!(AllReduceArgs, table),
                offset_of!(AllReduceArgs, source),
                offset_of!(AllReduceArgs, output),
                offset_of!(AllReduceArgs, count),
                offset_of!(AllReduceArgs, capacity)
            ],
            [88, 96, 104, 112, 120]
        );
        assert_eq!(
            [
                offset_of!(PushArgs, push),
                offset_of!(PushArgs, input),
                offset_of!(PushArgs, output),
                offset_of!(PushArgs, count),
                offset_of!(PushArgs, segment_bytes)
            ],
            [88, 152, 160, 168, 176]
        );
        assert_eq!(
            [
                offset_of!(ChunkedArgs, input),
                offset_of!(ChunkedArgs, output),
                offset_of!(ChunkedArgs, count),
                offset_of!(ChunkedArgs, chunk_packets),
                offset_of!(ChunkedArgs, slot_bytes)
            ],
            [88, 96, 104, 112, 120]
        );
    }

    #[test]
    fn source_words_hold_index_and_whole_packets_only() {
        assert_eq!(source_word(0, 0), Some(0));
        assert_eq!(source_word(5, 32), Some(5 | 2 << INDEX_BITS));
        assert_eq!(source_word(5, 8), None, "not a whole packet");
        assert_eq!(source_word(MAX_TABLE_ENTRIES, 0), None, "index too large");
        let farthest = u64::from(u32::MAX) * PACKET_BYTES as u64;
        assert!(source_word(1, farthest).is_some());
        assert_eq!(source_word(1, farthest + PACKET_BYTES as u64), None);
    }

    #[test]
    fn the_source_defines_every_kernel_name() {
        // The macros build names from pieces, so check the pieces are there.
        let source = Program::AllReduce.source();
        assert!(source.contains("linkreduce_one_stage_##NAME##_w##W"));
        assert!(source.contains("linkreduce_two_stage_##NAME##_w##W"));
        assert!(source.contains("linkreduce_push_##NAME##_w##W"));
        assert!(source.contains("linkreduce_chunked_push_##NAME##_w##W"));
        for dtype in DType::ALL {
            for kernels in ["LR_KERNELS", "LR_PUSH_KERNELS", "LR_CHUNKED_KERNELS"] {
                let line = format!("LR_FOR_WORLDS({kernels}, {},", dtype.name());
                assert!(source.contains(&line), "source lacks `{line}`");
            }
        }
        let worlds = " KERNELS(NAME, D, 2) KERNELS(NAME, D, 3) KERNELS(NAME, D, 4) \
                      KERNELS(NAME, D, 5) KERNELS(NAME, D, 6) KERNELS(NAME, D, 7) \
                      KERNELS(NAME, D, 8)\n";
        assert!(source.contains(&format!("#define LR_FOR_WORLDS(KERNELS, NAME, D){worlds}")));
        assert_eq!(all_kernel_names().len(), 4 * 7 * 3);
        assert_eq!(
            kernel_name(Algorithm::TwoStage, DType::BF16, 5),
            "linkreduce_two_stage_bf16_w5"
        );
    }

    #[test]
    fn shared_constants_come_only_from_the_host() {
        let generated = generated_constants();
        for line in [
            "#define LR_MAX_RANKS 8",
            "#define LR_MAX_BLOCKS 256",
            "#define LR_THREADS 512",
            "#define LR_SCRATCH_OFFSET 51200ull",
            "#define LR_EPOCH_BITS 16",
            "#define LR_INDEX_BITS 16",
            "#define LR_PUSH_SLOTS 3",
            "#define LR_PUSH_HEADER 256ull",
            "#define LR_PUSH_EMPTY 0x80008000u",
            "#define LR_CHUNK_BLOCKS 128",
            "#define LR_CHUNK_SLOTS 4ull",
            "#define LR_CHUNK_AHEAD 2ull",
            "#define LR_CHECK_THREADS 256",
        ] {
            assert!(
                generated.contains(line),
                "generated constants lack `{line}`"
            );
            let name = line.split(' ').nth(1).unwrap_or_default();
            let by_hand = format!("#define {name} ");
            for file in ALL_REDUCE_FILES.iter().chain(&CHECK_FILES) {
                assert!(
                    !file.contains(&by_hand),
                    "a .cu file defines {name} by hand"
                );
            }
        }
        for program in Program::ALL {
            assert!(program.source().starts_with(&generated));
        }
    }
}
