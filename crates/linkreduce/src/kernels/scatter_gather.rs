//! Host side of scatter_gather.cu: the reduce-scatter and all-gather
//! kernels (docs/scatter_gather.md).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, CudaFunction, DeviceRepr};

use super::load::{load_once, Cache, StreamsPeers};
use super::{AllReduceArgs, MAX_RANKS, WORLD_SIZES};
use crate::dtype::DType;
use crate::error::Result;

/// The collectives of scatter_gather.cu, with NCCL's semantics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ScatterGather {
    /// Rank r receives the sum over ranks of block r of every send buffer.
    ReduceScatter,
    /// Block r of every rank's receive buffer is rank r's send buffer.
    AllGather,
}

impl ScatterGather {
    pub const ALL: [ScatterGather; 2] = [ScatterGather::ReduceScatter, ScatterGather::AllGather];

    /// `reduce-scatter` or `all-gather`.
    pub fn name(self) -> &'static str {
        match self {
            ScatterGather::ReduceScatter => "reduce-scatter",
            ScatterGather::AllGather => "all-gather",
        }
    }

    /// The symbol of this collective's kernel for `dtype` and `world_size`.
    pub fn symbol(self, dtype: DType, world_size: usize) -> String {
        let op = match self {
            ScatterGather::ReduceScatter => "reduce_scatter",
            ScatterGather::AllGather => "all_gather",
        };
        format!("linkreduce_{op}_{}_w{world_size}", dtype.name())
    }
}

impl fmt::Display for ScatterGather {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Every symbol scatter_gather.cu defines.
pub fn scatter_gather_kernel_names() -> Vec<String> {
    let mut names = Vec::new();
    for op in ScatterGather::ALL {
        for dtype in DType::ALL {
            for world_size in WORLD_SIZES {
                names.push(op.symbol(dtype, world_size));
            }
        }
    }
    names
}

/// One world size's reduce-scatter and all-gather kernels in one context.
pub(crate) type ScatterGatherKernels = HashMap<(ScatterGather, DType), CudaFunction>;

/// This world size's kernels in `ctx`, looked up once per process.
pub(crate) fn load_scatter_gather_kernels(
    ctx: &Arc<CudaContext>,
    world_size: usize,
) -> Result<Arc<ScatterGatherKernels>> {
    static LOADED: Cache<(ScatterGather, DType)> = Mutex::new(BTreeMap::new());
    let names = ScatterGather::ALL
        .into_iter()
        .flat_map(|op| DType::ALL.map(|dtype| ((op, dtype), op.symbol(dtype, world_size))));
    load_once(&LOADED, ctx, world_size, names, StreamsPeers::Yes)
}

/// Mirrors `ScatterGatherArgs`: the kernels' only parameter.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct ScatterGatherArgs {
    /// Its `source` is unused.
    pub frame: AllReduceArgs,
    /// The source word this rank sends to each peer.
    pub sources: [u64; MAX_RANKS],
    /// All-gather: elements between the output's blocks.
    pub out_stride: u64,
}

// SAFETY: plain-old-data with the layout of the C struct `ScatterGatherArgs`
// (repr(C), only integers; layout checked by the test below).
unsafe impl DeviceRepr for ScatterGatherArgs {}

#[cfg(test)]
mod tests {
    use std::mem::{offset_of, size_of};

    use super::super::Program;
    use super::*;

    #[test]
    fn host_mirror_has_the_c_layout() {
        assert_eq!(size_of::<ScatterGatherArgs>(), 200);
        assert_eq!(
            [
                offset_of!(ScatterGatherArgs, sources),
                offset_of!(ScatterGatherArgs, out_stride)
            ],
            [128, 192]
        );
    }

    #[test]
    fn the_source_defines_every_scatter_gather_kernel() {
        let source = Program::AllReduce.source();
        assert!(source.contains("linkreduce_reduce_scatter_##NAME##_w##W("));
        assert!(source.contains("linkreduce_all_gather_##NAME##_w##W("));
        for dtype in DType::ALL {
            let line = format!("LR_FOR_WORLDS(LR_SCATTER_GATHER_KERNELS, {},", dtype.name());
            assert!(source.contains(&line), "source lacks `{line}`");
        }
        assert_eq!(scatter_gather_kernel_names().len(), 2 * 3 * 7);
        assert_eq!(
            ScatterGather::ReduceScatter.symbol(DType::F16, 8),
            "linkreduce_reduce_scatter_f16_w8"
        );
    }
}
