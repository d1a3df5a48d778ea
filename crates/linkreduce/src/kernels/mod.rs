//! Device code: the CUDA C++ sources, their host-side mirror types, and
//! their run-time compilation (see [`compile`]).
//!
//! The sources include no CUDA headers so that libcuda and libnvrtc are all
//! a user needs at run time.

mod compile;
mod load;

use cudarc::driver::DeviceRepr;

use crate::algorithm::Algorithm;
use crate::dtype::DType;

pub use compile::{compile_cubin, nvrtc_version, Arch};
pub(crate) use load::{load_kernels, Kernels};

/// The barrier protocol, the all-reduce kernels that use it, then the
/// barrier-free push kernels.
pub(crate) const SOURCE: &str = concat!(
    include_str!("barrier.cu"),
    include_str!("allreduce.cu"),
    include_str!("push.cu")
);

/// Mirrors `LR_MAX_RANKS`.
pub const MAX_RANKS: usize = 8;
/// Mirrors `LR_MAX_BLOCKS`: the largest grid a kernel may be launched with.
pub const MAX_BLOCKS: usize = 256;
/// Mirrors `LR_THREADS`.
pub const THREADS_PER_BLOCK: u32 = 512;
/// Mirrors `LR_SCRATCH_OFFSET`: counters come first, scratch after.
pub const SCRATCH_OFFSET: usize = 17408;
/// Bytes moved per packet.
pub const PACKET_BYTES: usize = 16;
/// Two-stage kernels keep a reduced tail (under one packet) after the slice.
pub(crate) const SCRATCH_TAIL_BYTES: usize = PACKET_BYTES;

/// Mirrors `LR_PUSH_SLOTS`: push slots that rotate, one per call.
pub const PUSH_SLOTS: usize = 3;
/// Mirrors `LR_PUSH_HEADER`: bytes before the first push slot.
pub const PUSH_HEADER: usize = 256;
/// Mirrors `LR_PUSH_EMPTY`: what an empty push slot holds, per 32-bit word.
pub const PUSH_EMPTY: u32 = 0x8000_8000;

/// World sizes the kernels are instantiated for.
pub const WORLD_SIZES: std::ops::RangeInclusive<usize> = 2..=MAX_RANKS;

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
}

/// Mirrors `BarrierArgs`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct BarrierArgs {
    pub peers: [u64; MAX_RANKS],
    pub fault: u64,
    pub timeout_ns: u64,
    pub rank: u32,
}

/// Mirrors `AllReduceArgs`: the kernels' only parameter, passed by value.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct AllReduceArgs {
    pub barrier: BarrierArgs,
    pub input_record: u64,
    pub input_offset: u64,
    pub output: u64,
    pub count: u64,
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

/// Mirrors `Record`: one registered buffer's address on every rank.
pub(crate) type Record = [u64; MAX_RANKS];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_mirrors_have_the_c_layout() {
        // Signal: two counter arrays plus one epoch per block, all u32.
        let signal_bytes = (2 * MAX_BLOCKS * MAX_RANKS + MAX_BLOCKS) * 4;
        assert!(signal_bytes <= SCRATCH_OFFSET && SCRATCH_OFFSET % 256 == 0);
        assert_eq!(std::mem::size_of::<Fault>(), 20);
        assert_eq!(std::mem::size_of::<BarrierArgs>(), 88);
        assert_eq!(std::mem::size_of::<AllReduceArgs>(), 120);
        assert_eq!(std::mem::size_of::<PushArgs>(), 184);
        // Field offsets as the C compiler lays the structs out.
        use std::mem::offset_of;
        assert_eq!(
            [
                offset_of!(BarrierArgs, fault),
                offset_of!(BarrierArgs, timeout_ns),
                offset_of!(BarrierArgs, rank)
            ],
            [64, 72, 80]
        );
        assert_eq!(
            [
                offset_of!(AllReduceArgs, input_record),
                offset_of!(AllReduceArgs, input_offset),
                offset_of!(AllReduceArgs, output),
                offset_of!(AllReduceArgs, count)
            ],
            [88, 96, 104, 112]
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
        assert_eq!(std::mem::size_of::<Record>(), 64);
    }

    #[test]
    fn the_source_defines_every_kernel_name() {
        // The macros build names from pieces, so check the pieces are there.
        assert!(SOURCE.contains("linkreduce_one_stage_##NAME##_w##W"));
        assert!(SOURCE.contains("linkreduce_two_stage_##NAME##_w##W"));
        assert!(SOURCE.contains("linkreduce_push_##NAME##_w##W"));
        for dtype in DType::ALL {
            for kernels in ["LR_KERNELS", "LR_PUSH_KERNELS"] {
                let line = format!("LR_FOR_WORLDS({kernels}, {},", dtype.name());
                assert!(SOURCE.contains(&line), "source lacks `{line}`");
            }
        }
        assert_eq!(all_kernel_names().len(), 3 * 7 * 3);
        assert_eq!(
            kernel_name(Algorithm::TwoStage, DType::BF16, 5),
            "linkreduce_two_stage_bf16_w5"
        );
    }

    #[test]
    fn source_constants_match_the_host() {
        for (name, value) in [
            ("LR_MAX_RANKS", MAX_RANKS.to_string()),
            ("LR_MAX_BLOCKS", MAX_BLOCKS.to_string()),
            ("LR_THREADS", THREADS_PER_BLOCK.to_string()),
            ("LR_SCRATCH_OFFSET", format!("{SCRATCH_OFFSET}ull")),
            ("LR_PUSH_SLOTS", PUSH_SLOTS.to_string()),
            ("LR_PUSH_HEADER", format!("{PUSH_HEADER}ull")),
            ("LR_PUSH_EMPTY", format!("{PUSH_EMPTY:#x}u")),
        ] {
            let line = format!("#define {name} {value}");
            assert!(SOURCE.contains(&line), "source lacks `{line}`");
        }
    }
}
